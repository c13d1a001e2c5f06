"""Checks a remote engine must pass through engine.remote and the CLI; run against Helix and vLLM servers."""

from __future__ import annotations

import main
from engine.config import SamplingParams
from engine.remote import Endpoint, RemoteClient, RemoteError
from engine.sequence import FinishEvent, TokenEvent

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def check_stream(url: str, key: str | None, provenance: bool) -> FinishEvent:
    """Tokens arrive one event at a time, then one FinishEvent with the count and timings."""
    with RemoteClient(Endpoint(url, key)) as client:
        events = list(client.stream("Once upon a time", GREEDY))
    tokens, final = events[:-1], events[-1]
    assert isinstance(final, FinishEvent) and final.finish_reason == "length", final
    assert tokens and all(isinstance(t, TokenEvent) for t in tokens)
    assert final.stats.num_generated_tokens == 12
    assert final.stats.ttft_s is not None and 0 < final.stats.ttft_s <= final.stats.total_s
    assert final.text == "".join(t.text for t in tokens) + final.tail
    sources = {t.source for t in tokens}
    if provenance:  # Helix sends each token's source and the request's spec stats
        assert sources <= {"draft", "target", "bonus"} and len(final.token_ids) == len(tokens)
        assert final.stats.spec_reported and final.stats.to_dict()["acceptance_rate"] is not None
    else:  # never invented where the server sends none
        assert sources == {""} and not final.stats.spec_reported
        assert final.stats.to_dict()["acceptance_rate"] is None
    return final


def check_chat(url: str, key: str | None) -> None:
    with RemoteClient(Endpoint(url, key)) as client:
        final = client.generate([("user", "Tell me a story")], SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                             ignore_eos=True))
    assert final.finish_reason == "length" and final.stats.num_generated_tokens == 6


def check_metrics(url: str, key: str | None, server: str) -> None:
    """After a speculative request the counters are reported (not zero-filled) under the server's names."""
    with RemoteClient(Endpoint(url, key)) as client:
        m = client.metrics()
    assert m.server == server
    assert m.num_drafts and m.num_draft_tokens and m.num_accepted_tokens is not None
    assert 0.0 <= m.acceptance_rate <= 1.0 and m.mean_acceptance_length >= 1.0
    assert m.accepted_per_position and all(0.0 <= a <= 1.0 for a in m.acceptance_per_position)
    assert m.kv_cache_usage is not None and 0.0 <= m.kv_cache_usage <= 1.0
    assert m.requests_running is not None and m.requests_waiting is not None


def check_wrong_key(url: str) -> None:
    try:
        with RemoteClient(Endpoint(url, "wrong-key")) as client:
            list(client.stream("Hi", GREEDY))
    except RemoteError as exc:
        assert "401" in str(exc) and "API key" in str(exc), exc
    else:
        raise AssertionError("a wrong key was accepted")


def check_cli(url: str, key: str | None, capsys) -> None:
    argv = ["generate", "Once upon a time", "--endpoint", url, "--temperature", "0", "--max-new-tokens", "8"]
    assert main.main(argv + (["--api-key", key] if key else [])) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "8 tokens in" in err, err
    assert main.main(argv + ["--api-key", "wrong-key"]) == 2
    assert "401" in capsys.readouterr().err
