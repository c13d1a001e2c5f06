"""How many torch threads a CPU step runs with: the engine's default for small steps, every core for big ones,
if measuring shows the big ones gain.

On the CPU a one-token step of a small model is a chain of short ops, and two OpenMP threads spend more time
meeting at barriers than they save: one thread fewer than the cores is the engine's default (engine.factory).
A step over many tokens (8 rows, a verification of K drafts, a prefill chunk) is GEMM-bound and a second
core adds memory bandwidth and FLOPs. Measured on the 2-core EPYC here (demo pair, fp32, in process): 8
plain rows 796 -> 961 tok/s, 8 rows at K = 3 1054 -> 1218 tok/s; served over HTTP, 8 concurrent requests of
the default setting 828-987 -> 1190-1318 tok/s. But another busy process on those cores turns a step with
two threads many times slower (each barrier then waits for a descheduled thread), so the choice is measured,
not assumed: per size bucket of the step, the seconds per token of each thread count are averaged, the faster
count runs (all cores until the other is clearly faster: near ties flipping per bucket made plain and drafting
steps run at different counts and skewed adaptive K's comparison of their times), and the other is tried again
every ``RETRY`` big steps of that bucket.

A decode step is two phases with their own choice: the proposers' drafting (a chain of K small forwards, one token
per drafting row each) and the target's verification (one forward over every row's K + 1 tokens). At batch 1 a
verification of 5-8 tokens gains from the second core (oneDNN's packed GEMMs at 5 rows stream the weights at ~5
GB/s on one core here, ~8 on two) while the one-row draft steps lose; choosing for the whole step gave both one
count. Measured on the 2-core EPYC (demo pair, EAGLE head at batch 1, in process, interleaved runs of 4 prompts):
197 tok/s with one thread for the whole step, 211 with two for the verification alone. The drafting phase is chosen
per proposer too: the draft model's forwards and the EAGLE head's cost different times a token (``_bucket``'s kind).
"""

from __future__ import annotations

import os

import torch

BIG_TOKENS = 8  # steps over at least this many tokens (rows x positions) may use every core
MIN_TOKENS = {"prefill": BIG_TOKENS, "draft": BIG_TOKENS, "verify": 2}  # per phase (draft: rows per draft forward)
RETRY = 64  # big steps of a bucket between tries of the thread count not chosen (each costs ~20% of its step)
EMA = 0.8
SWITCH = 0.9  # the other count must take under 90% of the preferred one's time per token to take over


class StepThreads:
    """Chooses each step's torch thread count (``choose``) and learns from its wall time (``observe``)."""

    def __init__(self, small: int, big: int) -> None:
        self.small, self.big = small, big
        self.enabled = big > small
        self.avg: dict[tuple[tuple[str, int, int], int], float] = {}  # (bucket, threads) -> seconds per token
        self.count: dict[tuple[str, int, int], int] = {}  # bucket -> big steps so far
        self.prefer: dict[tuple[str, int, int], int] = {}  # bucket -> the count that runs (changes on a clear difference)
        self.exploring = False  # the last step ran at the count not preferred (to measure it): not a typical step

    @classmethod
    def for_device(cls, device: torch.device, setting: int | None) -> StepThreads:
        """``setting``: threads for big steps (None: every core; 0: never more than the default)."""
        small = torch.get_num_threads()
        if device.type != "cpu" or setting == 0:
            return cls(small, small)
        return cls(small, setting or os.cpu_count() or small)

    @staticmethod
    def _bucket(tokens: int, rows: int = 1, phase: str = "prefill", kind: str = "") -> tuple[str, int, int]:
        """(phase and kind, tokens, rows), the counts rounded down to powers of two (8-15 -> 8, ...): 8 rows of one
        token and one row verifying 8 are different steps, and may prefer different counts. ``kind``: what runs the
        phase where that changes its cost (a draft phase's proposer: the draft model's forwards and the EAGLE head's
        are different work, and each drafting row's time per token differs by which one drafted)."""
        return f"{phase}:{kind}" if kind else phase, 1 << max(0, tokens.bit_length() - 1), 1 << max(0, rows.bit_length() - 1)

    def choose(self, tokens: int, rows: int = 1, phase: str = "prefill", kind: str = "") -> int:
        """Threads for a forward (or, for ``draft``, each forward of a chain) over ``tokens`` tokens in ``rows`` rows;
        sets torch's count when it changes."""
        n = self.small
        self.exploring = False
        if self.enabled and tokens >= MIN_TOKENS[phase]:
            b = self._bucket(tokens, rows, phase, kind)
            seen = self.count.get(b, 0)
            self.count[b] = seen + 1
            fast = {c: self.avg.get((b, c)) for c in (self.small, self.big)}
            if fast[self.big] is None:
                n, self.exploring = self.big, True
            elif fast[self.small] is None:
                n, self.exploring = self.small, True
            else:
                n = self.prefer.get(b, self.big)
                other = self.small if n == self.big else self.big
                if fast[other] < SWITCH * fast[n]:  # clearly faster now: a near tie must not flip the count back and
                    n, other = other, n  # forth (adaptive K compares step times taken at the preferred count)
                self.prefer[b] = n
                if seen % RETRY == RETRY - 1:  # look at the other count again: the load on the machine changes
                    n, self.exploring = other, True
        if n != torch.get_num_threads():  # (read back: other code may have set it since)
            torch.set_num_threads(n)
        return n

    def observe(self, threads: int, tokens: int, seconds: float, rows: int = 1, phase: str = "prefill",
                per_tokens: int | None = None, kind: str = "") -> None:
        """The forward(s) chosen for by ``choose(tokens, rows, phase, kind)`` took ``seconds``; ``per_tokens``: the
        tokens the time is divided by (default ``tokens``; a draft phase divides by every token it drafted)."""
        if not self.enabled or tokens < MIN_TOKENS[phase] or seconds <= 0:
            return
        key = (self._bucket(tokens, rows, phase, kind), threads)
        per = seconds / max(1, per_tokens or tokens)
        old = self.avg.get(key)
        self.avg[key] = per if old is None else EMA * old + (1 - EMA) * per
