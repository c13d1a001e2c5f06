"""ServerRunner (the desktop app's embedded server) and `serve`: start/stop many times, clear bind
errors, the request-log hook, CORS, and 503 while models are missing or the queue is full."""

from __future__ import annotations

import dataclasses
import socket
import time

import httpx
import pytest
from tiny import tiny_engine

import main
from engine.config import EngineConfig
from engine.host import EngineHost
from engine.server import ServerRunner


@pytest.fixture(scope="module")
def host():
    h = EngineHost()
    h.adopt(tiny_engine())
    yield h
    h.shutdown()


@pytest.fixture
def runner(host):
    log: list[dict] = []
    r = ServerRunner(host, port=0, on_request=log.append)
    r.start()
    r.log = log
    yield r
    r.stop()


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/ping", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_starts_and_stops_five_times_on_the_same_port(host):
    runner = ServerRunner(host, port=0)
    for _ in range(6):
        runner.start()
        assert runner.running
        assert httpx.get(f"{runner.url}/ping").json() == {"status": "ok"}
        r = httpx.post(f"{runner.url}/generate", json={"prompt": "Once", "max_new_tokens": 2})
        assert r.status_code == 200
        runner.stop()
        assert not runner.running and _refused(runner.url)  # runner.port keeps the port it got: reused next time


def test_stop_cancels_open_streams_and_frees_blocks(host):
    runner = ServerRunner(host, port=0)
    runner.start()
    host.engine.fault_hook = lambda stage, rows: time.sleep(0.01)
    try:
        with httpx.stream("POST", f"{runner.url}/generate/stream", timeout=10,
                          json={"prompt": "Once", "max_new_tokens": 200, "ignore_eos": True}) as r:
            next(r.iter_lines())
            t0 = time.monotonic()
            runner.stop()
            assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5
        while (host.engine.num_running or host.worker.snapshot()["kv"]["used"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        host.engine.fault_hook = None
    assert host.engine.num_running == 0 and host.worker.snapshot()["kv"]["used"] == 0


def test_port_in_use_is_a_clear_error(host, runner):
    other = ServerRunner(host, port=runner.port)
    with pytest.raises(OSError, match=f"port {runner.port} is already in use on 127.0.0.1; choose another port"):
        other.start()
    assert not other.running
    assert httpx.get(f"{runner.url}/ping").status_code == 200  # the first server is untouched


def test_non_loopback_bind_needs_an_api_key(host):
    with pytest.raises(ValueError, match="API key"):
        ServerRunner(host, bind_host="0.0.0.0")
    ServerRunner(host, bind_host="0.0.0.0", api_key="k")  # allowed with a key (not started here)
    ServerRunner(host, bind_host="localhost")
    ServerRunner(host, bind_host="::1")


def test_on_request_hook_sees_every_finished_request(runner):
    before = len(runner.log)  # earlier tests' entries are already there
    httpx.post(f"{runner.url}/generate", json={"prompt": "Once", "max_new_tokens": 3, "ignore_eos": True},
               headers={"X-Request-ID": "hook-1"})  # (sampled at the default temperature: an EOS could end it early)
    httpx.post(f"{runner.url}/generate", json={"prompt": ""})
    deadline = time.monotonic() + 5
    while len(runner.log) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    ok, bad = runner.log[-2:]
    assert set(ok) == {"method", "path", "status", "tokens", "duration_s", "request_id"}
    assert (ok["request_id"], ok["status"], ok["tokens"], ok["path"]) == ("hook-1", 200, 3, "/generate")
    assert bad["status"] == 422 and bad["tokens"] == 0


def test_queue_full_is_503_with_retry_after(host, runner, monkeypatch):
    monkeypatch.setattr(host.engine, "config", dataclasses.replace(host.engine.config, max_waiting=0))
    for path, body in (("/generate", {"prompt": "Once"}), ("/generate/stream", {"prompt": "Once"}),
                       ("/v1/completions", {"prompt": "Once"})):
        r = httpx.post(runner.url + path, json=body)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "queue is full" in r.json()["error"]["message"]


def test_without_models_health_and_generate_are_503_with_the_reason():
    host = EngineHost()
    host.load(EngineConfig(target="/nonexistent/model", draft=None), wait=True)
    assert host.state == "failed"
    runner = ServerRunner(host, port=0)
    runner.start()
    try:
        h = httpx.get(f"{runner.url}/health")
        assert h.status_code == 503 and h.json()["status"] == "failed" and "/nonexistent/model" in h.json()["reason"]
        r = httpx.post(f"{runner.url}/generate", json={"prompt": "Once"})
        assert r.status_code == 503 and r.headers["retry-after"] and "not loaded" in r.json()["error"]["message"]
        assert httpx.get(f"{runner.url}/metrics").status_code == 503
        assert httpx.get(f"{runner.url}/ping").status_code == 200
    finally:
        runner.stop()


def test_cors_is_off_unless_origins_are_configured(host, runner):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{runner.url}/generate", headers=preflight).headers
    cors = ServerRunner(host, port=0, api_key="k", cors_origins=["http://app.example"])
    cors.start()
    try:
        r = httpx.options(f"{cors.url}/generate", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(f"{cors.url}/health", headers={"Origin": "http://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://app.example"
    finally:
        cors.stop()


def test_serve_refuses_bad_binds_before_loading_models(capsys, monkeypatch):
    monkeypatch.delenv("HELIX_API_KEY", raising=False)
    assert main.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "API key" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main.main(["serve", "--port", str(port)]) == 2
    assert f"port {port} is already in use" in capsys.readouterr().err
