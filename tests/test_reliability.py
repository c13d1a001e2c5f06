"""Faults that must not leak: a client that never reads its stream, a request cancelled while queued."""

import json
import socket
import time

import httpx
import pytest

from engine import SamplingParams
from engine.host import EngineHost
from engine.sequence import FinishEvent
from engine.server.runner import ServerRunner
from tests.tiny import tiny_pair_engine


def _wait_idle(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = httpx.get(f"{url}/metrics").json()
        if (m["requests_running"], m["requests_waiting"], m["kv"]["used"]) == (0, 0, 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server():
    host = EngineHost()
    host.adopt(tiny_pair_engine(kv_tokens=2048, max_running=2))
    runner = ServerRunner(host, "127.0.0.1", 0)
    runner.start()
    yield runner
    runner.stop()
    host.shutdown()


def test_a_client_that_never_reads_its_stream_holds_nothing(server):
    body = json.dumps({"prompt": "Once upon a time", "max_new_tokens": 4096, "temperature": 0.8}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.sendall(b"POST /generate/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        # while it never reads, other clients are served and the request finishes (context limit) and frees its blocks
        r = httpx.post(f"{server.url}/generate", json={"prompt": "Lily", "max_new_tokens": 8, "temperature": 0},
                       timeout=30)
        assert r.status_code == 200
        m = _wait_idle(server.url)
        assert (m["requests_running"], m["requests_waiting"], m["kv"]["used"]) == (0, 0, 0)
    finally:
        sock.close()
    assert httpx.get(f"{server.url}/ping").status_code == 200


def test_cancelled_while_waiting_in_the_queue_frees_everything():
    eng = tiny_pair_engine(kv_tokens=2048, max_running=1)
    done = {}

    def sink(ev):
        if isinstance(ev, FinishEvent):
            done[ev.request_id] = ev

    eng.add_request("Once upon a time", SamplingParams(max_new_tokens=30, temperature=0), request_id="running", sink=sink)
    eng.add_request("Tom found", SamplingParams(max_new_tokens=30, temperature=0), request_id="queued", sink=sink)
    eng.step()
    assert eng.num_running == 1 and eng.num_waiting == 1
    eng.abort("queued")
    eng.step()
    assert done["queued"].finish_reason == "cancelled" and done["queued"].token_ids == []
    while eng.has_work():
        eng.step()
    assert done["running"].finish_reason == "length"
    for runner in (eng.target, eng.draft):
        runner.blocks.check_invariants()
        assert runner.blocks.num_free == runner.blocks.num_blocks


def test_stream_disconnected_while_queued_is_cancelled(server):
    # two long requests fill max_running=2; a third stream waits in the queue and its client goes away
    slow = {"prompt": "Once", "max_new_tokens": 200, "temperature": 0.8}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        streams = [c.stream("POST", "/generate/stream", json=slow) for _ in range(2)]
        for s in streams:
            s.__enter__()
        queued = c.stream("POST", "/generate/stream", json=slow)
        queued.__enter__()
        queued.__exit__(None, None, None)  # disconnect before (or just after) it was admitted
        for s in streams:
            s.__exit__(None, None, None)
    m = _wait_idle(server.url)
    assert (m["requests_running"], m["requests_waiting"], m["kv"]["used"]) == (0, 0, 0)
