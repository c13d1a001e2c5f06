"""A short soak in CI: concurrent mixed clients, 20% of streams disconnecting, nothing leaks."""

import pytest

from engine.host import EngineHost
from engine.server.soak import run_soak
from tests.tiny import tiny_pair_engine


@pytest.mark.slow
def test_short_soak_leaves_no_blocks_no_requests_and_no_5xx():
    host = EngineHost()
    host.adopt(tiny_pair_engine(kv_tokens=2048, max_running=8, max_waiting=64))
    try:
        report, problems = run_soak(host, clients=12, requests=120, duration_s=60, max_tokens=24, rss_bound_mb=200)
    finally:
        host.shutdown()
    s = report.summary()
    assert not problems, problems
    assert s["requests"] == 120 and set(s["by_kind"]) == {"generate", "stream", "chat", "batch"}
    assert s["disconnects"] > 0
    assert s["kv_used_after"] == 0 and s["running_after"] == 0 and s["waiting_after"] == 0
