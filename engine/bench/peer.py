"""Helix's server against another OpenAI-compatible server (vLLM's CPU build, or any ``--endpoint``):
both separate processes driven over HTTP, greedy, ``max_tokens`` new tokens with EOS ignored, timed
in the same rounds (the order rotated each round), batch 1 and n concurrent, with issue 13's targets."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace

from engine.bench.endpoints import Endpoint, batch1, concurrent, median

# (what, target, bar) for Helix default / peer; issue 13
PEER_TARGETS = {
    "batch1": ("Helix default / peer, batch 1 (median per-request tok/s)", 1.5, 1.2),
    "concurrent": ("Helix default / peer, {n} concurrent (total tok/s)", 1.2, 1.0),
}


@dataclass(frozen=True)
class PeerConfig:
    num_prompts: int = 8
    max_tokens: int = 128
    rounds: int = 3
    concurrency: int = 8
    waves: int = 3  # requests per concurrent client (see endpoints.concurrent)
    k: int = 3
    quick: bool = False


QUICK_PEER = PeerConfig(num_prompts=2, max_tokens=16, rounds=1, concurrency=2, waves=1, quick=True)


def helix_modes(base: Endpoint, k: int, draft_methods: tuple[str, ...] = ()) -> list[Endpoint]:
    """Helix's modes as endpoints on one server: default (adaptive K), fixed K, plain, and any
    ``draft_method`` the server takes (e.g. ngram)."""
    out = [replace(base, name="helix default (adaptive)", fields={}),
           replace(base, name=f"helix K={k}", fields={"num_draft_tokens": k}),
           replace(base, name="helix plain", fields={"speculative": False})]
    out += [replace(base, name=f"helix {m}", fields={"draft_method": m}) for m in draft_methods]
    return out


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compare(systems: list[Endpoint], prompts: list[str], cfg: PeerConfig = PeerConfig(), progress=_say,
            processes: dict | None = None) -> dict:
    """Time every system in the same rounds; the last system is the peer the ratios are taken over.

    ``processes``: server URL -> its ServerProcess, for servers this run started. While one system is
    timed the others' processes are paused, so each is measured with the machine to itself (an idle
    server's busy-waiting threads took a core from the other on this 2-core CPU)."""
    processes = processes or {}
    prompts = prompts[: cfg.num_prompts]
    t_start = time.perf_counter()
    for ep in systems:  # warm-up: first requests compile, allocate and fill caches
        batch1(ep, prompts[:1], min(cfg.max_tokens, 16))
        concurrent(ep, prompts, min(2, cfg.concurrency), min(cfg.max_tokens, 8))
    per_request: dict[str, list[float]] = {ep.name: [] for ep in systems}
    round_b1: dict[str, list[float]] = {ep.name: [] for ep in systems}
    round_cc: dict[str, list[float]] = {ep.name: [] for ep in systems}
    texts: dict[str, list[str]] = {}
    for r in range(cfg.rounds):
        order = systems[r % len(systems):] + systems[: r % len(systems)]
        for ep in order:
            others = [p for url, p in processes.items() if url != ep.url]
            for p in others:
                p.pause()
            try:
                outs = batch1(ep, prompts, cfg.max_tokens)
                total, _ = concurrent(ep, prompts, cfg.concurrency, cfg.max_tokens, cfg.concurrency * cfg.waves)
            finally:
                for p in others:
                    p.resume()
            tps = [c.tokens_per_second for c in outs]
            per_request[ep.name] += tps
            round_b1[ep.name].append(median(tps))
            texts[ep.name] = [c.text for c in outs]
            round_cc[ep.name].append(round(total, 3))
            progress(f"round {r + 1}/{cfg.rounds} {ep.name}: batch 1 {median(tps):.1f} tok/s, "
                     f"{cfg.concurrency} concurrent {total:.1f} tok/s")
    peer = systems[-1].name
    rows = []
    for ep in systems:
        rows.append({"name": ep.name, "url": ep.url, "fields": ep.fields,
                     "batch1_tokens_per_second": median(per_request[ep.name]),
                     "batch1_round_medians": round_b1[ep.name],
                     "concurrent_tokens_per_second": median(round_cc[ep.name]),
                     "concurrent_rounds": round_cc[ep.name],
                     "greedy_identical_to_peer": sum(a == b for a, b in zip(texts[ep.name], texts[peer]))})
    base = rows[-1]
    for row in rows:
        row["batch1_vs_peer"] = _ratio(row["batch1_tokens_per_second"], base["batch1_tokens_per_second"])
        row["concurrent_vs_peer"] = _ratio(row["concurrent_tokens_per_second"], base["concurrent_tokens_per_second"])
    results = {"kind": "peer", "config": asdict(cfg), "peer": peer, "prompts": prompts, "systems": rows,
               "elapsed_s": round(time.perf_counter() - t_start, 1)}
    results["targets"] = peer_targets(results)
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def peer_targets(results: dict) -> list[dict]:
    """PASS/MISS against the target for Helix default over the peer; ``bar`` says whether the bar is met."""
    row = next((r for r in results["systems"] if r["name"].startswith("helix default")), None)
    if row is None:
        return []
    out = []
    n = results["config"]["concurrency"]
    for key, value in (("batch1", row["batch1_vs_peer"]), ("concurrent", row["concurrent_vs_peer"])):
        what, goal, bar = PEER_TARGETS[key]
        if value is None:
            continue
        out.append({"target": f"vs_peer_{key}", "what": what.format(n=n), "where": results["peer"],
                    "measured": value, "goal": f">= {goal:g} (bar {bar:g})",
                    "result": "PASS" if value >= goal else "MISS", "bar": "met" if value >= bar else "missed"})
    return out


def format_peer(results: dict, markdown: bool = False) -> str:
    from engine.bench.machine import describe
    from engine.bench.report import _fmt, _table

    cfg = results["config"]
    n, peer = cfg["concurrency"], results["peer"]
    head = "### " if markdown else "== "
    rows = [[r["name"], _fmt(r["batch1_tokens_per_second"], ".1f"), _fmt(r["batch1_vs_peer"], ".2f", "x"),
             _fmt(r["concurrent_tokens_per_second"], ".1f"), _fmt(r["concurrent_vs_peer"], ".2f", "x"),
             f"{r['greedy_identical_to_peer']}/{len(results['prompts'])}"] for r in results["systems"]]
    table = _table(["system", "batch 1 tok/s", "vs peer", f"{n} concurrent tok/s", "vs peer", "same text"],
                   rows, markdown)
    note = (f"{len(results['prompts'])} held-out prompts, greedy, {cfg['max_tokens']} new tokens (EOS ignored), "
            f"over HTTP /v1/completions, {cfg['rounds']} interleaved rounds; batch 1: median per-request tok/s; "
            f"{n} concurrent: median over rounds of total tok/s, {n} clients sending {cfg.get('waves', 1)} requests "
            f"each back to back; peer: {peer}"
            + ("; each server started here was paused (SIGSTOP) while the other was timed"
               if results.get("paused_while_other_timed") else ""))
    targets = results.get("targets") or []
    trows = [[t["what"], f"{t['measured']:.3f}", t["goal"], t["result"], t["bar"]] for t in targets]
    parts = [f"{head}Helix vs {peer}", describe(results["machine"]) if "machine" in results else "", table, note,
             f"{head}targets (issue 13)", _table(["target", "measured", "goal", "result", "bar"], trows, markdown)]
    return ("\n\n" if markdown else "\n").join(p for p in parts if p)
