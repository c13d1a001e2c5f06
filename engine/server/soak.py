"""Soak test: many concurrent clients against a real server on loopback, then check nothing leaked.

    python -m engine.server.soak --clients 32 --requests 600 --duration 180 [--target T --draft D]

Starts the API server in this process on 127.0.0.1 (so it can read the process memory), drives
a mix of /generate, /generate/stream (20% of streams disconnect mid-way), /v1/chat/completions
and /generate/batch with random lengths and parameters, then checks: the server still answers,
no unexpected 5xx, every KV block is free, nothing is running or waiting, and the process's
memory grew less than the stated bound. Bounded in request count and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx
import psutil

logger = logging.getLogger(__name__)

PROMPTS = [
    "Once upon a time", "Tom and his mom went to the park.", "Lily had a red ball. One day",
    "The little dog was sad because", "Sam wanted to bake a cake for his friend.", "The sun was hot and",
]


@dataclass
class SoakReport:
    requests: int = 0
    by_kind: dict = field(default_factory=dict)
    statuses: dict = field(default_factory=dict)
    unexpected: list = field(default_factory=list)
    latencies: list = field(default_factory=list)
    ttfts: list = field(default_factory=list)
    disconnects: int = 0
    wall_s: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    final_metrics: dict = field(default_factory=dict)

    def summary(self) -> dict:
        def pct(xs, q):
            return round(statistics.quantiles(xs, n=100)[q - 1], 4) if len(xs) >= 2 else (xs[0] if xs else None)

        return {
            "requests": self.requests, "wall_s": round(self.wall_s, 2),
            "requests_per_s": round(self.requests / self.wall_s, 2) if self.wall_s else 0.0,
            "latency_p50_s": pct(self.latencies, 50), "latency_p95_s": pct(self.latencies, 95),
            "ttft_p50_s": pct(self.ttfts, 50), "ttft_p95_s": pct(self.ttfts, 95),
            "by_kind": self.by_kind, "statuses": self.statuses, "disconnects": self.disconnects,
            "unexpected": self.unexpected[:10], "rss_before_mb": round(self.rss_before_mb, 1),
            "rss_after_mb": round(self.rss_after_mb, 1),
            "rss_growth_mb": round(self.rss_after_mb - self.rss_before_mb, 1),
            "kv_used_after": self.final_metrics.get("kv", {}).get("used"),
            "running_after": self.final_metrics.get("requests_running"),
            "waiting_after": self.final_metrics.get("requests_waiting"),
        }


def _params(rng: random.Random, max_tokens: int) -> dict:
    p = {"max_new_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.7, 1.0]),
         "top_p": rng.choice([1.0, 0.9]), "top_k": rng.choice([0, 40]), "seed": rng.randint(0, 2**31),
         "speculative": rng.random() < 0.8, "num_draft_tokens": rng.choice([None, 2, 4, 8])}
    if rng.random() < 0.1:
        p["stop"] = [rng.choice([".", "zzz-never"])]
    return p


async def _one(client: httpx.AsyncClient, rng: random.Random, report: SoakReport, max_tokens: int) -> None:
    kind = rng.choices(["generate", "stream", "chat", "batch"], weights=[3, 4, 2, 1])[0]
    params = _params(rng, max_tokens)
    t0 = time.perf_counter()
    status = None
    try:
        if kind == "generate":
            r = await client.post("/generate", json={"prompt": rng.choice(PROMPTS), **params})
            status = r.status_code
            if status == 200:
                report.ttfts.append(r.json()["stats"]["ttft_s"] or 0.0)
        elif kind == "batch":
            prompts = [rng.choice(PROMPTS) for _ in range(rng.randint(1, 4))]
            r = await client.post("/generate/batch", json={"prompts": prompts, **params})
            status = r.status_code
        elif kind == "chat":
            body = {"model": "helix", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": params["max_new_tokens"], "temperature": params["temperature"],
                    "stream": rng.random() < 0.5, "seed": params["seed"]}
            r = await client.post("/v1/chat/completions", json=body)
            status = r.status_code
        else:
            disconnect_after = rng.randint(1, 6) if rng.random() < 0.2 else None
            async with client.stream("POST", "/generate/stream", json={"prompt": rng.choice(PROMPTS), **params}) as r:
                status = r.status_code
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("event: token"):
                        if seen == 0:
                            report.ttfts.append(time.perf_counter() - t0)
                        seen += 1
                        if disconnect_after is not None and seen >= disconnect_after:
                            report.disconnects += 1
                            break
    except httpx.HTTPError as exc:
        report.unexpected.append(f"{kind}: {type(exc).__name__}: {exc}")
        status = "transport-error"
    report.latencies.append(time.perf_counter() - t0)
    report.requests += 1
    report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
    report.statuses[str(status)] = report.statuses.get(str(status), 0) + 1
    if isinstance(status, int) and status >= 500 and status != 503:  # 503 = queue full, deserved under load
        report.unexpected.append(f"{kind}: HTTP {status}")


async def drive(base_url: str, clients: int, requests: int, duration_s: float, max_tokens: int, seed: int = 0,
                api_key: str | None = None) -> SoakReport:
    report = SoakReport()
    deadline = time.perf_counter() + duration_s
    counter = iter(range(requests))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits, headers=headers) as client:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < deadline and next(counter, None) is not None:
                await _one(client, rng, report, max_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        report.wall_s = time.perf_counter() - t0
        # disconnected streams are cancelled at the engine's next step: give it a moment
        for _ in range(100):
            m = (await client.get("/metrics")).json()
            if m["requests_running"] == 0 and m["requests_waiting"] == 0 and m["kv"]["used"] == 0:
                break
            await asyncio.sleep(0.05)
        report.final_metrics = m
        if (await client.get("/ping")).status_code != 200:
            report.unexpected.append("server stopped answering /ping")
    return report


def check(report: SoakReport, rss_bound_mb: float) -> list[str]:
    """The soak's pass conditions; returns the failures (empty = pass)."""
    s = report.summary()
    problems = list(report.unexpected)
    if s["kv_used_after"] != 0:
        problems.append(f"{s['kv_used_after']} KV blocks still in use")
    if s["running_after"] != 0 or s["waiting_after"] != 0:
        problems.append(f"engine not idle: running={s['running_after']} waiting={s['waiting_after']}")
    if s["rss_growth_mb"] > rss_bound_mb:
        problems.append(f"memory grew {s['rss_growth_mb']} MB > {rss_bound_mb} MB")
    return problems


def run_soak(host, clients: int = 32, requests: int = 600, duration_s: float = 180, max_tokens: int = 64,
             rss_bound_mb: float = 300.0, seed: int = 0) -> tuple[SoakReport, list[str]]:
    """Start a server for ``host`` on a free loopback port, soak it, stop it."""
    from engine.server.runner import ServerRunner

    runner = ServerRunner(host, "127.0.0.1", 0)
    runner.start()
    proc = psutil.Process()
    try:
        # one small warm-up so lazily allocated KV layers and kernels count as baseline, not growth
        httpx.post(f"{runner.url}/generate", json={"prompt": "Once", "max_new_tokens": 8}, timeout=60)
        before = proc.memory_info().rss / 2**20
        report = asyncio.run(drive(runner.url, clients, requests, duration_s, max_tokens, seed))
        report.rss_before_mb, report.rss_after_mb = before, proc.memory_info().rss / 2**20
    finally:
        runner.stop()
    return report, check(report, rss_bound_mb)


def main(argv: list[str] | None = None) -> int:
    from engine.cli import add_common_args, build_engine_from_args, setup_logging
    from engine.host import EngineHost

    parser = argparse.ArgumentParser(prog="python -m engine.server.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--duration", type=float, default=180, help="seconds, upper bound")
    parser.add_argument("--max-tokens", type=int, default=64, help="largest max_new_tokens a request asks for")
    parser.add_argument("--rss-bound-mb", type=float, default=300.0)
    parser.add_argument("--json", default=None, help="write the report here")
    add_common_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    host = EngineHost()
    host.adopt(build_engine_from_args(args))
    try:
        report, problems = run_soak(host, args.clients, args.requests, args.duration, args.max_tokens,
                                    args.rss_bound_mb)
    finally:
        host.shutdown()
    summary = report.summary() | {"problems": problems, "passed": not problems}
    text = json.dumps(summary, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
