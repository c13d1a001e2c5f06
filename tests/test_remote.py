"""engine.remote against a real Helix server on loopback, and the failures: refused, wrong key, a server
that dies or goes silent mid-stream, metrics a server does not report."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from remote_checks import check_chat, check_cli, check_metrics, check_stream, check_wrong_key
from tiny import tiny_engine

from engine.config import SamplingParams
from engine.host import EngineHost
from engine.remote import Endpoint, RemoteClient, RemoteError
from engine.remote_metrics import parse_prometheus
from engine.server import ServerRunner

KEY = "test-key-123"


@pytest.fixture(scope="module")
def helix():
    host = EngineHost()
    host.adopt(tiny_engine())
    runner = ServerRunner(host, port=0, api_key=KEY)
    runner.start()
    yield runner
    runner.stop()
    host.shutdown()


def test_helix_stream_has_provenance_and_matches_the_server(helix):
    final = check_stream(helix.url, KEY, provenance=True)
    import httpx

    body = {"prompt": "Once upon a time", "max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    direct = httpx.post(f"{helix.url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert final.token_ids == direct["token_ids"]  # greedy: the stream carries exactly the server's tokens
    check_chat(helix.url, KEY)
    check_metrics(helix.url, KEY, "helix")


def test_plain_request_reports_no_drafts(helix):
    with RemoteClient(Endpoint(helix.url + "/v1/", KEY)) as client:
        final = client.generate("Once", SamplingParams(max_new_tokens=5, temperature=0, speculative=False))
    assert final.stats.spec_reported and final.stats.num_drafts == 0
    assert {client.info().kind, client.info().model} == {"helix", "tiny-target"}


def test_wrong_key_and_cli(helix, capsys):
    check_wrong_key(helix.url)
    check_cli(helix.url, KEY, capsys)


def test_refused_connection_is_clear_and_fast(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="cannot connect to http://127.0.0.1:.*server is running"):
        with RemoteClient(Endpoint(f"http://127.0.0.1:{port}")) as client:
            client.info()
    assert time.monotonic() - t0 < 5
    import main

    assert main.main(["generate", "x", "--endpoint", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot connect" in capsys.readouterr().err
    assert main.main(["generate", "x", "--endpoint", "localhost:8000"]) == 2
    assert "http://host:port" in capsys.readouterr().err


class DyingServer:
    """An OpenAI-shaped server on loopback whose stream sends two tokens, then breaks off or goes silent."""

    MODELS = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            request = self._read_request(conn)  # all of it: closing on unread bytes would reset the connection
            if request.startswith(b"GET /v1/models"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(self.MODELS), self.MODELS))
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                         b"connection: close\r\n\r\n")
            for word in (b"Once", b" upon"):
                event = b'data: {"choices": [{"index": 0, "text": "%s", "finish_reason": null}]}\n\n' % word
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            if self.mode == "silent":
                self.release.wait(10)  # holds the connection open, sending nothing
            # "die": the socket closes mid-body, as when the server process is killed

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return data

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.mark.parametrize("mode", ["die", "silent"])
def test_server_dying_or_silent_mid_stream_ends_with_an_error(mode):
    server = DyingServer(mode)
    try:
        t0 = time.monotonic()
        with RemoteClient(Endpoint(server.url, read_timeout_s=1.0)) as client:
            events = list(client.stream("Once", SamplingParams(max_new_tokens=8)))
        final = events[-1]
        assert [e.text for e in events[:-1]] == ["Once", " upon"]
        assert final.finish_reason == "error" and final.text == "Once upon"
        assert ("broke mid-stream after 2 tokens" if mode == "die" else "did not answer in time") in final.error
        assert time.monotonic() - t0 < 5
    finally:
        server.close()


def test_stop_while_the_server_is_silent_ends_at_once():
    server = DyingServer("silent")
    try:
        cancel = threading.Event()
        with RemoteClient(Endpoint(server.url, read_timeout_s=30.0)) as client:
            events = []
            for ev in client.stream("Once", SamplingParams(max_new_tokens=8), cancel=cancel):
                events.append(ev)
                if len(events) == 2:  # both tokens in; the server now sends nothing
                    t0 = time.monotonic()
                    threading.Timer(0.2, cancel.set).start()
        assert events[-1].finish_reason == "cancelled" and events[-1].text == "Once upon"
        assert time.monotonic() - t0 < 2  # not the 30 s read timeout
    finally:
        server.close()


VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo-target"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="demo-target"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="demo-target"} 0.25
# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="demo-target"} 10.0
# TYPE vllm:spec_decode_num_draft_tokens counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="demo-target"} 30.0
# TYPE vllm:spec_decode_num_accepted_tokens counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="demo-target"} 15.0
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="demo-target",position="0"} 8.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="demo-target",position="1"} 5.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="demo-target",position="2"} 2.0
"""


def test_vllm_names_parse_and_missing_figures_stay_none():
    m = parse_prometheus(VLLM_TEXT)
    assert m.server == "vllm" and m.requests_running == 1 and m.requests_waiting == 2 and m.kv_cache_usage == 0.25
    assert m.acceptance_rate == 0.5 and m.mean_acceptance_length == 2.5
    assert m.acceptance_per_position == [0.8, 0.5, 0.2]
    plain = parse_prometheus("\n".join(line for line in VLLM_TEXT.splitlines() if "spec_decode" not in line) + "\n")
    assert plain.num_drafts is None and plain.acceptance_rate is None and plain.acceptance_per_position is None
    assert plain.kv_cache_usage == 0.25  # what is reported still is
    other = parse_prometheus("# TYPE http_requests counter\nhttp_requests_total 3\n")
    assert other.server is None and other.kv_cache_usage is None and other.requests_running is None
