"""Every drafting method visible: per-method counters in the engine snapshot and request stats, the loaded
EAGLE head and the draft methods on /health and /v1/models, and the doctor measuring each method."""

import httpx
import pytest

import main
from engine import SamplingParams
from engine.bench.doctor import diagnose, format_report
from engine.bench.prompts import load_prompts
from tests.tiny import tiny_llama, tiny_pair_engine, tiny_tokenizer

REPEATING = "The cat sat on the mat and looked at the moon. The cat sat on the mat and"


@pytest.fixture(scope="module")
def engine():
    return tiny_pair_engine(eagle=True)


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 24, "temperature": 0, "ignore_eos": True, **kw})


def test_snapshot_and_request_stats_count_each_method(engine):
    before = {m: s.to_dict() for m, s in engine.method_stats.items()}
    finals = {m: engine.generate(REPEATING, _params(draft_method=m, num_draft_tokens=3)) for m in ("model", "eagle")}
    finals["ngram"] = engine.generate("zq xv", _params(draft_method="ngram", num_draft_tokens=3))  # rarely matches
    finals["plain"] = engine.generate(REPEATING, _params(speculative=False))
    methods = engine.snapshot()["methods"]
    assert set(methods) >= {"model", "ngram", "eagle", "plain"}
    for m, final in finals.items():
        got = methods[m]
        old = before.get(m, {"num_drafts": 0, "num_steps": 0, "num_tokens": 0, "num_misses": 0})
        drafts = final.stats.by_method.get(m, [0, 0, 0])
        assert got["num_drafts"] - old["num_drafts"] == drafts[0] == final.stats.num_drafts, m
        assert got["num_tokens"] - old["num_tokens"] > drafts[2], m  # its accepted tokens and more
        if m != "plain":  # (plain also holds the drafting requests' last steps, where no room was left to draft)
            assert got["num_steps"] - old["num_steps"] == drafts[0] + got["num_misses"] - old["num_misses"], m
        assert got["tokens_per_second"] > 0 and got["decode_time_s"] > 0
    # every token after the first (drawn at the end of the prompt) came from one decode step, plain or drafting
    produced = sum(s["num_tokens"] for s in methods.values()) - sum(s["num_tokens"] for s in before.values())
    assert produced == sum(len(f.token_ids) - 1 for f in finals.values())
    assert methods["plain"]["num_drafts"] == 0 and set(finals["plain"].stats.to_dict()["by_method"]) == set()
    assert methods["ngram"]["num_misses"] > 0  # a lookup that found nothing is an n-gram step, not a plain one
    d = finals["model"].stats.to_dict()["by_method"]["model"]
    assert d["num_draft_tokens"] == finals["model"].stats.num_draft_tokens
    assert d["acceptance_rate"] == round(finals["model"].stats.acceptance_rate, 4)


def test_health_and_models_name_the_eagle_head_and_the_methods():
    from engine.host import EngineHost
    from engine.server import ServerRunner

    host = EngineHost()
    host.adopt(tiny_pair_engine(eagle=True))  # the host's thread steps it from now on
    runner = ServerRunner(host, port=0)
    runner.start()
    try:
        health = httpx.get(f"{runner.url}/health", timeout=30).json()
        assert health["eagle"] == "tiny-eagle"
        assert health["draft_methods"] == ["auto", "model", "ngram", "eagle"]
        card = httpx.get(f"{runner.url}/v1/models", timeout=30).json()["data"][0]
        assert card["helix"]["eagle"] == "tiny-eagle" and card["helix"]["draft_methods"] == health["draft_methods"]
        r = httpx.post(f"{runner.url}/generate", json={"prompt": REPEATING, "max_new_tokens": 16, "temperature": 0,
                                                       "draft_method": "eagle", "num_draft_tokens": 2}, timeout=30)
        stats = r.json()["stats"]
        assert set(stats["by_method"]) == {"eagle"} and stats["by_method"]["eagle"]["num_drafts"] == stats["num_drafts"]
    finally:
        runner.stop()
        host.shutdown()


def test_doctor_measures_every_method_and_recommends_the_fastest(engine):
    heard = []
    report = diagnose(engine, load_prompts()[:2], temperature=0.0, max_new_tokens=16, progress=heard.append)
    by = {m.method: m for m in report.methods}
    assert set(by) == {"model", "ngram", "eagle"} and heard
    for m in by.values():
        assert len(m.speedup_by_k) == 8 and m.best_k == max(m.speedup_by_k, key=m.speedup_by_k.get)
        assert m.measured_speedup > 0 and m.tokens_per_second > 0 and 0 <= m.miss_rate <= 1
        assert m.draft_cost > 0 or m.method == "ngram"
    best = max(by.values(), key=lambda m: m.measured_speedup)
    top = max(best.measured_speedup, report.auto_measured_speedup)
    if top <= 1.0:
        assert (report.recommended_method, report.recommended_k) == ("", 0) and "will not pay" in report.verdict
    elif report.recommended_method == "auto":
        assert report.recommended_k is None and report.measured_speedup == report.auto_measured_speedup
    else:
        assert (report.recommended_method, report.recommended_k) == (best.method, best.best_k)
        assert report.measured_speedup == best.measured_speedup > 1.0
    assert engine.eagle_cost == by["eagle"].draft_cost and engine.draft_cost == by["model"].draft_cost
    text = format_report(report)
    assert all(f"{m}: acceptance" in text for m in by) and "recommended method and K" in text
    only = diagnose(engine, load_prompts()[:1], temperature=0.0, max_new_tokens=8, methods=["eagle"], apply=False)
    assert [m.method for m in only.methods] == ["eagle"]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor_target")
    tok = tiny_tokenizer()
    tiny_llama(len(tok), layers=2, seed=2).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_doctor_without_a_draft_model_measures_ngram(target_dir, capsys):
    rc = main.main(["doctor", "--target", str(target_dir), "--no-draft", "--device", "cpu", "--prompts", "1",
                    "--max-new-tokens", "8"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "no draft model" in out.out and "ngram: acceptance" in out.out and "model: acceptance" not in out.out
    assert main.main(["doctor", "--target", str(target_dir), "--no-draft", "--device", "cpu",
                      "--methods", "model"]) == 2
    assert "not loaded" in capsys.readouterr().err
