"""Adaptive draft length and method: pick, per request and batch size, the K that gives the most
tokens per second by this device's measured step times, switching speculation off when it does not pay.

Policy. For a request r at batch bucket b, the expected tokens of one step at K is
E_r(K) = 1 + sum_{i<K} s_i, with s_i the probability that the first i+1 draft tokens are all
accepted (per-position counts, as SpecDecodingStats keeps them, of the request shrunk towards
the shared counts of its method, and towards α^(i+1) before any exist). T(b, K) is the moving
average of real step wall times at (method, b, K); K = 0 is plain decoding. Unmeasured K is
predicted from the measured ones (or from the warm-up/doctor cost ratios c + γ per token).
We run argmax_K E_r(K) / T(b, K). When plain wins, the request decodes plain and probes its
best K once every ``probe_every`` steps, doubling the interval after each failed probe, so a
useless draft costs well under 2% of plain speed.

Probes run on the engine's step clock (``Policy.tick``): a request probes at the first step that
is a multiple of its interval once half of it has passed, so the rows of a batch probe together.
A step costs what its longest row costs, so one probing row makes the whole batch pay for a
drafting step; together, the batch pays once for every row's probe.

Acceptance is learnt per sampling class (``sampling_class``: greedy, or the temperature to a tenth and whether top-p /
top-k cut the tails): a draft's chance of acceptance depends on how both models sample, and one estimate for all
requests carried greedy acceptance into sampled requests. Step times are kept apart for steps with a sampled row
(``Policy.tick``): sampling costs a step more (on an H200 the demo pair's plain step ran 720 tok/s greedy and 465 at
T = 0.8, batch 1), and a sampled request predicted from greedy steps' times drafted where no fixed K beat plain.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from engine.acceptance_runs import RunLengths, RunSums, expected_from_runs
from engine.config import MAX_DRAFT_TOKENS
from engine.level_filter import LevelFilter
from engine.stats import SpecDecodingStats

EMA = 0.8  # weight of the past in step-time averages
START_MARGIN = 1.03  # predicted speed-up over plain a plain request needs to start drafting (hysteresis): at batch 8
# on the CPU a useless draft's n-gram lookup predicted 1.02x and lost 3-7% drafting on it
STALL_CLAMP = 1.25  # an observation counts as at most this times the average: with 2x, the tail of a CPU's step times
# (a step after a prefill chunk, a page fault) kept plain decoding's average at batch 8 15-30% above its median
KEEP_MARGIN = 1.01  # ... and a drafting request to keep drafting: the host's share of a drafting step (rollback,
# bookkeeping) is outside the step times, and n-gram that finds no match predicts 1 + the prior's crumbs at plain's time
SWITCH_MARGIN = 1.06  # predicted gain a drafting request needs to switch methods: the proposer it switches to first
# catches up on every token since it last drafted (at batch 8 on the CPU, switching between the draft model and the
# EAGLE head back and forth, such steps took 11% of the time)
K_MARGIN = 1.03  # predicted gain another K needs over the K a drafting request settled on, to move it there. The
# predictions of neighbouring K lie within a few per cent of each other and move with every draft, and each move
# costs: on an H200 (TinyLlama shape, acceptance ~0.5, batch 1) steps alternating K = 4 and 6 took 0.1-0.19 ms longer
# than the same K's steps in a fixed-K run (4-5 ms steps); adaptive, moving between K = 4..7 by the step, ran 0.93-0.95x
# fixed K = 4, whose tokens per step it matched
K_MARGIN_CUDA = 1.10  # ... and on a CUDA device, where a move costs what the step-time model does not see (the first
# steps at another K run other graphs and another draft chain; the emulation, which charges a step its K's time alone,
# found no margin between 1.03 and 1.25 better than another). On an H100 at batch 1 (demo pair, fp16, six rotated
# rounds, 2026-12-06) the default ran 0.957x fixed K = 6 greedy and 0.960x K = 4 at T = 0.8 with 1.03, 0.964x and
# 0.987x with 1.10, 0.967x and 0.976x with 1.25
PRIOR_WEIGHT = 8.0  # pseudo-drafts of the shared prior in a request's acceptance estimate
ALPHA_WEIGHT = 2.0  # pseudo-drafts of the α prior in the shared estimate: engine-wide evidence wins fast ...
ALPHA_FADE = 32.0  # ... and after this many recent drafts of the method, alone: the recent counts saturate near
# SHARED_MEMORY, and a prior that never faded (the draft model's α standing for n-gram that never matches) kept
# predicting crumbs of acceptance, 1.04x plain at plain's time, for drafts that never came
CARRY_WEIGHT = 8.0  # pseudo-drafts of the conditional acceptance before a position in its shared estimate: at two
# rejections of a position few drafts reach, the estimate drops to 0.8x the one before it, not 0.5x (survival_chain)
PROBE_FIRST, PROBE_MAX = 32, 512  # steps of plain decoding between probes of speculation
CLOSE_CALL, PROBE_SOON = 0.95, 8  # a request that stops drafting with its best K predicted at >= 0.95x plain probes
# within 8 steps, not 32: on the CPU demo pair a row whose first 4 EAGLE drafts were rejected stopped at 0.99x and
# decoded plain for 46 steps at 0.6x the speed drafting gave it. A plain request whose best K is predicted at >= 0.95x
# plain probes on its own interval (PROBE_FIRST, doubling after each of its failed probes), not the one other requests'
# failed probes raised engine-wide (``AdaptiveState.close``): such a probe costs a few per cent of one step, and the
# estimates it corrects are a few per cent off. On the 2-core CPU at 8 clients (T = 0.8), where fixed K = 2 ran 1.07x
# plain, new requests predicted K = 1 at 0.99-1.00x and waited 280-355 steps for their first probe: the pass decoded
# plain throughout
PROBE_CATCH_UP = 0.03  # a probe's catch-up at most this share of the plain time since the last probe: on an H200
# at batch 8 with 1536-token prompts, a useless draft's probe first read 8 x 1600 skipped tokens (380 ms, ~100
# plain steps), and two such probes took 46% of the time
SHARED_MEMORY = 64  # steps of drafts: the shared estimate follows the recent workload (another model, other prompts).
# Forgotten by the step, not by the draft (``RecentAcceptance.observe_draft``'s rows): at 8 clients 64 drafts were the
# last 8 steps, and after a wave of requests those were its tail, the rows that drafted worst and so ran longest (on
# the 2-core CPU at T = 0.8 the draft model's estimate after a K = 2 pass put K = 2 at 2.09 tokens a step where the
# pass realized 2.32): the next wave's requests started plain on it and stayed plain between probes
EXPLORE_EVERY, EXPLORE_MAX = 16, 128  # steps between one-step tries of K + 1 and K - 1, doubling after each while the K that
# rows settle on stays (``Policy._explore``): on an H200 at 8 clients (TinyLlama shape, acceptance 0.5) an explore step at
# K = 7 from K = 6 realized 4346 tok/s against K = 6's 5901, and one step in 16 cost 1.6% of the speed
METHOD_PROBE_FIRST, METHOD_PROBE_MAX = 32, 512  # steps between tries (PROBE_BURST steps) of a proposer the requests do not draft
# with, doubling after each (``Policy._probe_method``): its acceptance and step times are otherwise measured only while
# it is chosen, and a few early drafts or one cold step can keep it out for good (at 8 clients on the CPU the EAGLE
# head's first step took 62 ms, its later ones 25-30, and its first drafts of one prompt accepted nothing: adaptive
# predicted it at 1.02x plain and drafted with the draft model; at batch 1 it ran 0.92x what the head alone ran)
PROBE_BURST = 3  # steps a probe of another proposer stands (``_probe_method``): its first step reads what the proposer
# skipped since it last drafted and so is timed for nothing; the later ones are. With one-step probes a proposer left
# behind was never timed again: at 8 clients on the 2-core CPU (T = 0) the EAGLE head kept K = 2-4 step times of
# 19.7-25.4 ms from the first pass, where in fixed passes its K = 5 steps took 20 ms for 32.3 tokens and the draft
# model's K = 4 steps 20-21 ms for 30.0, and a proposer that cannot pay at this batch size (``_could_pay``) was never
# timed often enough to be ruled out
MIN_SHARED_EVIDENCE = 8.0  # drafts a method must have been measured for before its prior alone may rule it out
TIME_TRIES = 3  # steps in which a method never timed at a batch size, beside one that was, is tried there (a step
# that caught up or mixed methods is not timed): otherwise its time there comes from batch 1's cost slope. In process
# at 8 clients on the 2-core CPU, the draft model was timed at batch 8 and the EAGLE head, predicted from batch 1,
# was not; the batch drafted with the draft model for ~65 steps, then switched to the head at a 500-token catch-up
TIME_CATCH_UP = 2.0  # ... unless its catch-up for the row would cost more than this many plain steps
TIME_TRIES_MAX = 12  # a try whose step timed nothing (a catch-up, a thread count being measured, rows of mixed K) does
# not count, up to this many tries in all: in process at 8 clients on the 2-core CPU, the draft model's three tries
# were each spoiled, it was never timed there, and the batch drafted with the EAGLE head at 0.85x of what the draft
# model at K = 2 gave
RECHECK = 16  # while plain, steps between re-evaluations (a full decision costs ~35 us on this CPU) ...
RECHECK_MAX = 64  # ... growing with the probe interval after failed probes, up to this: on an H200 at acceptance
# ~0 the re-evaluations of plain rows took 20-100 us of a 2.7-3.7 ms step, 1-3% behind plain decoding
FAR_BELOW = 0.8  # a plain row whose best drafting option was predicted below this re-evaluates every RECHECK_MAX
# steps: between probes nothing it decides from moves by 25% (only probes and other rows' drafts bring evidence)
SPEC_RECHECK = 4  # while speculating, steps between re-evaluations: at batch 8 a full decision for every row
# every step cost ~0.3 ms of host time, 5-9% of a CUDA-graph step of a 1B model on an H200
SPEC_RECHECK_FROM = 4  # ... from this batch bucket on; smaller batches re-decide every step. Held at batch 1 too, one
# row's decisions cost 0.2 ms less of a 6 ms H200 step (TinyLlama shape, acceptance 0.5), but on the 2-core CPU over
# HTTP the default then ran 0.99-1.26x fixed K = 3 at batch 1 in three runs, against 1.42-1.49x in two runs of
# re-deciding every step alternating with them (demo pair: n-gram matches and the head's acceptance change by the step)
SPEC_RECHECK_FROM_CUDA = 1  # ... and on a CUDA device, from batch 1: there a full decision every step cost the batch-1
# step of an H200 0.11-0.2 ms of host work (5-6 ms steps; TinyLlama shape, acceptance ~0.5), and adaptive ran 0.97-0.99x
# fixed K = 6 re-deciding, 1.01-1.06x holding (one trace each); the shape bench passed 24 and 27 of 29 checks holding,
# 22-23 re-deciding (different code otherwise). On the CPU the evidence conflicts (in process, 6 alternating rounds:
# holding 1.03x re-deciding; over HTTP, the runs above), so the CPU keeps SPEC_RECHECK_FROM
SPEC_ROWS_CUDA = 1 / 32  # on a CUDA device, rows re-deciding per step at batch 4 and up (``spec_recheck``; at batch 8 a
# row's decision stands 256 steps, about a 1000-token request: a row keeps the K it was admitted with, new rows decide
# from what the batch measured, and the speed guard judges the batch). At batch 8 on an H200 (TinyLlama shape, acceptance
# ~0.5, 7 rounds of 24 requests), with one row a step adaptive's host work was 0.58 ms a step against fixed K = 6's 0.38
# and it ran 0.92x K = 6; with half a row 0.50 ms and 0.97x. On an H100 with the demo pair (fp16, 8 clients x 24
# requests of 128 tokens, T = 0, two processes of 3 rotated rounds, `scratch/gcad.py`) a step of the default cost
# 3.05 ms with half a row, 2.68 with 1/8 and 2.35 with 1/32, against fixed K = 6's 2.26-2.36, at the same 37 tokens a
# step: 0.79x, 0.88-0.90x and 0.95x fixed K = 6
FIT_TRUST = 9  # observations at which a K's own average counts fully (the effective sample of an EMA of 0.8)
FIT_WEIGHT = 3.0  # pseudo-observations of the line through every measured K in a K's predicted time
PLAIN_STALE = 32  # timed steps at a batch size after which plain decoding's time there is measured again, for one
# step with every row plain, where speculation is predicted to gain less than REFRESH_BELOW: while a batch drafts,
# nothing times a plain step, and a plain average taken in a slow phase of the machine stands. On the 2-core CPU at
# 8 clients with a useless draft, plain's average rose to 6.8 ms in a slow phase; n-gram K = 1 then looked nearly
# as cheap (7.1 ms, timed earlier) and, drafting on, ran at 5.2 ms against the stale 6.5 (predicted 1.02x plain)
# where plain steps took ~4.2 ms: the pass ran 0.8x plain
PLAIN_SETTLE = 4  # ... and, until plain decoding has PACE_FROM timings at a batch size (and context), after this many
# timed steps whatever the gain: a batch that drafts from its first decision times plain in one step only. On an H200 at
# 8 clients (demo pair, T = 0.8) that step took 2.1 ms where plain steps took 1.5: K = 2 was predicted 1.36x plain (its
# steps ran at plain's speed), the refresh never came (a clear gain), and the batch drafted K = 2 for two passes
PACE_RATE = 1.0  # the pace's rate, in units of a step-time average's (1 - EMA); 0 turns the pace off (``StepTimes``
# without ``level_filter``: the engine's tables run the filter since the fifty-fifth round, LEVEL_FILTER).
# A step of the K that runs on moves the pace, and its own average only as a long mean would (PACE_RUN); the first step
# of a K after another K's is compared with that pace, and moves the K's average alone. An earlier form split every
# deviation equally between the pace and the K's average: the K running through a slow phase kept half of it, so on the
# 2-core CPU at 8 clients K = 4's average (timed in a slow phase by its fixed-K pass) stood 24% above K = 3's where steps
# of the two differed by ~10%, and the batch drafted K = 3 (901 tok/s in its steps) over K = 4 (1155). The pace and the
# average both move by shares of one ratio, in logs, so neither walks under noise (a pace moved in logs beside an
# average moved by a linear mean did: 5000 noisy steps at one K took plain's prediction to 0.27x)
PACE_RATE_CUDA = 0.0  # ... and on a CUDA device, no pace: a GPU's speed holds (no VM phases), and with one K running,
# the pace and that K's average are one product whose split nothing measures. Where a K's first timings came low (or at
# a pace set high by another K's steps), the pace rose to carry the difference and raised every other K's prediction
# with it: in a CPU emulation of the H100's batch-1 step times (demo pair, `engine/bench/emulate.py`: the engine drafts and
# decides, each step is charged a time by its plan, noise 3%) the pace rose to 1.05-1.09 while every step took its
# true time, K = 3 and 5 were predicted 2-6% high while K = 4 ran; the default ran 0.952-0.997x fixed K = 5 over eight
# processes (mean 0.967), 0.970-0.984x (0.977) over four with no pace. A laptop GPU's clocks may move: the explore
# steps re-time the K beside the one that runs, and plain decoding is re-timed where the gain is close (PLAIN_STALE)
LEVEL_FILTER_CUDA = True  # on a CUDA device, the pace is the level of a Kalman filter (``LevelFilter``) that tells the
# machine's phases from the keys' costs by the steps where the key changes (the H100's hosts have phases of their own:
# forty-third round); every key's average moves with the covariance, not by a moving average of its own steps
LEVEL_FILTER = True  # ... and elsewhere (the CPU) too. Fed one stream of steps (2-core CPU, demo pair, batch 1, T = 0.8:
# plain, fixed K = 1-8 and the default rotated), the draft model's step times over plain's read at the default's
# decisions were off by 0.080-0.107 (rms, logs) with the filter, 0.117-0.155 with the pace's moving averages (which read
# every K 2-15% cheaper than its steps took: every gain over plain high), and alike at 8 clients (0.043-0.049). The
# default reading one or the other, both fed every step, ran 1.039x faster with the filter at batch 1 T = 0.8 (seven
# of eight rounds), 1.034x greedy, 1.033x / 1.053x at 8 clients T = 0.8 / greedy (medians; fifty-fifth round)
LEVEL_NOISE = 0.1  # ... the CPU filters' step noise (sd, log; the GPU's: ``engine.level_filter.STEP_NOISE``, 0.03): a
# 2-core VM's steps scatter far more. Fed one stream of steps, the draft model's step times over plain's at the
# default's decisions were off by 0.074 / 0.059 (rms, logs; batch 1 / 8 clients, T = 0.8) at 0.1 against 0.123 /
# 0.127 at 0.03 (0.097 / 0.087 at 0.06); the default at 0.1 over 0.03, both fed every step: 1.018x / 1.052x at T =
# 0.8, 1.001x / 1.015x greedy (medians of 8 / 4 rounds)
PACE_RUN = 0.02  # the rate at which the settled average of the K that runs on still moves (its steps move the pace)
PACE_FROM = 3  # observations a K's average needs before its steps move the pace (a first timing is the K's, not the pace's)
CTX_MEMORY = 0.995  # per timed step, the forgetting of the context slope's regression (``StepTimes``): ~200 steps
CTX_PRIOR = 0.03  # pseudo sum of squares (in squared bucket widths) shrinking the context slope towards 0 until the
# contexts of a key's steps vary (a few steps of a wave)
CTX_SLOPE_MAX = 2.0  # the slope's range, in log time per bucket width: a step never gets cheaper with context
REFRESH_BELOW = 1.15  # a clear gain is not overturned by a plain time some percent off, and a refresh costs it a step
STALE_WEIGHT = 0.5  # the weight of the past in a plain average measured again after PLAIN_STALE steps
FIRST_REACH = 4  # the largest K a method may run at a batch size before any of its K was timed there ...
REACH = 1  # ... and how far past its largest timed K: a prediction is trusted near what was measured only
REPLAYED = frozenset({"model"})  # methods whose expected tokens come from the runs of their accepted tokens
# (``engine.acceptance_runs``): a position's outcome is the same whatever K drafts it. Not calibrated (``Calibration``
# corrects the per-position model's shape, which the runs do not share)
RUN_SHARED = 8.0  # runs the shared runs of a method count as at most, beside a request's own ...
RUN_ALPHA = 8.0  # ... and positions of geometric runs at the α prior ...
RUN_FADE = 16.0  # ... fading to nothing as the runs measured (own and shared) reach this
CAL_MEMORY = 512  # drafts a position's calibration remembers (``Calibration``): a draft's positions are one outcome
# (accepted up to some point), so the ratios are noisy; 600 drafts of a right model put E[8] within ~3% (1 sd)
CAL_WEIGHT = 8.0  # predicted accepts of pseudo-evidence, at the ratio of the position before, in a position's ratio
CAL_RANGE = (0.25, 2.0)  # a ratio never leaves this range
CAL_FROM_ROWS = 2  # drafting rows a step needs for its drafts to count in the calibration (``Calibration``: one row
# alone drafts the K its own estimate chose)
_CAL_KEEP = 1.0 - 1.0 / CAL_MEMORY
_LOG_STALL = math.log(STALL_CLAMP)
GUARD_FROM = 4  # the batch bucket from which a batch's drafting is judged by the speed it realized (``SpeedGuard``):
# below it the step-time model carries (at batch 1 every target passes with it); above it, on an H200 at 8 clients
# (demo pair, T = 0.8), steps mixing n-gram, the draft model and the EAGLE head, each untimed, catching up after one
# another, realized 0.5-0.8x plain decoding's speed where every prediction put drafting above it
GUARD_WINDOW = 32  # drafting steps of a verdict
GUARD_BELOW = 1.0  # realized speed over plain decoding's below which the batch decodes plain for a hold (what the
# steps do not show costs drafting more: rows that finish apart read new prompts in prefill steps of their own, where
# plain rows finish together; on an H200 at 8 clients, T = 0.8, fixed K = 4 realized 1.03-1.10x plain in its drafting
# steps and 0.95x over its passes) ...
GUARD_EARLY = {8: 0.75, 16: 0.85}  # ... and, a window's verdict after fewer steps, further below: on an H200 at 8
# clients (demo pair, T = 0.8) windows realized 0.48-0.77x plain, and 32 steps of that cost each pass 5-10%
GUARD_RECHECK = 5  # plain steps of a hold that measure plain decoding again (``SpeedGuard.recheck``)
GUARD_PLAIN_STEPS = 16  # the recent plain steps at a batch size whose median is the guard's plain step time
GUARD_HOLD_FIRST, GUARD_HOLD_MAX = 32, 512  # ... of this many steps, doubling after each such verdict, back to the
# first after a window at or above plain decoding's speed
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CTX_BUCKETS = tuple(256 << i for i in range(10))  # 256 .. 131072 tokens
_BUCKET_OF = [next(b for b in BUCKETS if b >= n) for n in range(BUCKETS[-1] + 1)]


GREEDY = "greedy"


def sampling_class(temperature: float, top_p: float = 1.0, top_k: int = 0) -> str:
    """The class of requests that share acceptance estimates (``Policy.shared``, ``Policy.calibration``): greedy, or
    sampled at the temperature rounded to a tenth, with or without its tails cut (top-p < 1 or top-k). Drafts are
    accepted by min(1, p / q) of two sampled distributions: on the 2-core CPU at 8 clients, the demo pair's draft model
    at K = 2 accepted 0.81 of its drafted tokens greedily and 0.65 at T = 0.8, and with one estimate a T = 0.8 request
    that followed greedy ones drafted deeper than pays (0.90-0.92x plain decoding, where the best fixed K ran at plain's
    speed)."""
    if temperature == 0:
        return GREEDY
    return f"T={max(0.1, round(temperature, 1)):g}" + (" cut" if top_p < 1.0 or top_k > 0 else "")


def clamped_ema(old: float | None, seconds: float, weight: float = EMA) -> float:
    """A moving average of step times (``weight``: the past's) that one stall (another process, a page fault) cannot
    drag: an observation counts as at most STALL_CLAMP times the average. A faster step is real (the first timing of
    a K may have paid one-off costs); a slower one moves the average by at most (STALL_CLAMP - 1) x (1 - weight)."""
    if old is None:
        return seconds
    return weight * old + (1 - weight) * min(seconds, STALL_CLAMP * old)


def _median(xs: Collection[float]) -> float:
    """The upper median (an observed value)."""
    return sorted(xs)[len(xs) // 2]


def _robust_mean(times: list[float]) -> float:
    """A K's average from its first few timings: one alone; of two, their mean unless they differ by more than
    STALL_CLAMP, then the faster (a slower first step paid one-off costs: at 8 clients on the CPU the EAGLE head's first
    step at K = 4 took 62 ms and its later ones 25-30 ms); of three, the median."""
    if len(times) == 1:
        return times[0]
    if len(times) == 2:
        lo, hi = sorted(times)
        return lo if hi > STALL_CLAMP * lo else (lo + hi) / 2
    return _median(times)


def bucket(batch: int) -> int:
    return _BUCKET_OF[batch] if 0 <= batch < len(_BUCKET_OF) else next((b for b in BUCKETS if b >= batch), BUCKETS[-1])


def spec_recheck(batch_bucket: int, rows_per_step: float = 1.0) -> int:
    """Steps a speculating row's decision stands (``Policy.reuse``): SPEC_RECHECK, and from batch SPEC_RECHECK_FROM
    on as many steps as make ``rows_per_step`` rows re-decide per step at every batch size. The batch drafts one K per
    method, the sum of its rows' gains (``StepPlanner.one_k_per_method``), so a row's stale decision is one vote of
    many. Every 4 steps at batch 8 the full decisions took 0.25 ms of a ~6.5 ms H200 step (TinyLlama shape, acceptance
    0.8), 4% of adaptive's speed against fixed K = 8, whose K it drafted."""
    return max(SPEC_RECHECK, int(SPEC_RECHECK * (batch_bucket // SPEC_RECHECK_FROM) / rows_per_step))


def ctx_bucket(tokens: int) -> int:
    """The context bucket of a step whose longest row attends over ``tokens`` positions."""
    return next((c for c in CTX_BUCKETS if c >= tokens), CTX_BUCKETS[-1])


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per step at K with independent per-token acceptance α (the textbook model)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, k: int, draft_cost: float, verify_cost: float) -> float:
    return expected_tokens(alpha, k) / (1.0 + verify_cost * k + draft_cost * k)


def best_k(alpha: float, draft_cost: float, verify_cost: float, max_k: int = MAX_DRAFT_TOKENS) -> tuple[int, float]:
    """(K, predicted speed-up) maximising the textbook ratio; the doctor's recommendation."""
    return max(((k, predicted_speedup(alpha, k, draft_cost, verify_cost)) for k in range(1, max_k + 1)),
               key=lambda kv: kv[1])


class StepTimes:
    """Moving averages of real step wall times per (method, batch bucket, context bucket, K); K = 0 is plain.

    A step's cost grows with the context its rows attend over (the longest row's, on a GPU, where rows are
    padded to it), so the times are kept per context bucket (powers of two, ``ctx_bucket``): a K timed over
    short prompts must not stand for it over long ones. ``context`` is the bucket of the step being decided
    and timed (``Policy.tick`` sets it). Where a bucket lacks a time, the nearest bucket's is scaled by the
    ratio of the two buckets' times of keys timed in both (plain decoding first).

    The pace. A machine's speed drifts (a VM's slow phases, a GPU host's clocks), and a step is timed at the K that
    runs, so the averages of the K not running, plain decoding's among them, keep the pace of when they ran. Each
    batch bucket has a pace factor, and the averages are kept in its units. A step of a K whose average is settled
    (more than PACE_FROM steps) is compared with its prediction (the ratio in logs, clamped to STALL_CLAMP either
    way): where the step before ran the same key, the pace moves as a moving average would (1 - weight of the ratio)
    and the K's own average as a long mean (PACE_RUN of it); where it follows another key's step, the K's
    average alone moves, measured against the pace that step set. Every time read out is scaled by the current pace,
    so averages taken minutes apart compare as if taken now (a slow phase timed at one K raises the others'
    predictions by most of it); gains of K over plain are ratios of one bucket's times and do not move with the pace.

    The context within a bucket. A step's time grows across its context bucket (the batch attends over its longest
    row's context, rows padded to it), and the requests' contexts restart with every new request, so a pace that took
    it followed the batch's contexts: it rose through a wave of requests and stood high when the next wave started at
    short contexts, where the first timings of the key that wave started with were divided by it. Each pass of the
    bench's 8 clients ratcheted it on (2-core CPU, demo pair, T = 0: plain's stored time 13.3 ms where its steps took
    7.1, K = 8 predicted at 2.15x plain's step where its steps took 4.2x, and the batch drafted K = 8 at 0.78x the speed
    of K = 4; in another run K = 8 stood at 1.38x where its steps took 4.4x). So each step's time is read against the
    step's ``load`` (its longest row's context; None: no context term) by a slope per batch and context bucket,
    log t = key + pace + slope x (load - the bucket's centre) / its width, fitted within keys (each key's log times
    centred on their own mean, so neither the keys' costs nor which key ran when enter it) over recent steps
    (CTX_MEMORY) and shrunk towards 0 (CTX_PRIOR). Averages are kept at the
    bucket's centre and read out at the current step's load. The machine's drift does not follow the requests' contexts,
    so over a few waves of requests the slope is the context's (measured there: 0.13-0.28% a token of context).
    """

    def __init__(self, pace_rate: float = PACE_RATE, level_filter: bool = False, step_noise: float | None = None) -> None:
        self.avg: dict[tuple[str, int, int, int], float] = {}  # seconds / the bucket's pace at each observation
        self.pace: dict[int, float] = {}  # batch bucket -> the machine's pace there (1.0 at its first observation)
        self.pace_rate = pace_rate
        # batch bucket -> the Kalman filter of its level (the pace, in logs) and its keys' averages (``LevelFilter``):
        # with ``level_filter``, in place of the pace's moving averages
        self.filters: dict[int, LevelFilter] | None = {} if level_filter else None
        self.step_noise = step_noise  # the filters' step noise (None: ``engine.level_filter.STEP_NOISE``)
        self._last: dict[int, tuple[str, int, int, int]] = {}  # batch bucket -> the key its last step was timed at
        self.count: dict[tuple[str, int, int, int], int] = {}  # observations behind each average
        # the keys of ``avg`` per (method, batch bucket) and per batch bucket, in the order they came: a decision
        # reads the few keys of its bucket, not every key (a full decision of three methods at batch 1 cost ~0.4 ms
        # on the 2-core CPU, most of it in scans of ``avg``: 4% of a plain step there, 5% on an H200)
        self._keys: dict[tuple[str, int], list[tuple[str, int, int, int]]] = {}
        self._bucket_keys: dict[int, list[tuple[str, int, int, int]]] = {}
        # observations per (method, batch bucket) and per batch bucket: ``predicted`` keeps a method's predictions
        # until what they were made from changes (a step times one method; the others' predictions stand)
        self._stamps: dict[tuple[str, int], int] = {}
        self._bucket_stamps: dict[int, int] = {}
        self._predicted: dict[tuple[str, int, int], tuple] = {}
        self._read_others = self._read_slope = False  # what the prediction being made read (see ``predicted``)
        self.context = CTX_BUCKETS[0]
        self._plain_at: dict[tuple[int, int], int] = {}  # (batch, context bucket) -> its _bucket_stamps when plain was
        # last timed there
        self._first: dict[tuple[str, int, int, int], list[float]] = {}  # a key's first PACE_FROM timings (pace units)
        self._timed: set[tuple[str, int]] = set()  # (method, batch bucket) with a key timed more than once (``timed``)
        # (batch bucket, context bucket) -> (plain's stamp, the bucket's stamp where ``_scale`` read other keys, else
        # None, plain's time there in pace units): ``_plain`` runs in every prediction and several times a decision
        self._plain_memo: dict[tuple[int, int], tuple[int, int | None, float | None]] = {}
        self.load: int | None = None  # the current step's longest row's context in tokens (None: no context term)
        self._ctx_fit: dict[tuple[str, int, int, int], list[float]] = {}  # key -> [weight, mean x, mean log t]
        self._ctx_sums: dict[tuple[int, int], list[float]] = {}  # (batch, context bucket) -> [Sxx, Sxy] within keys

    def observe(self, method: str, batch: int, k: int, seconds: float,
                later: Callable[[Callable[[], None]], None] | None = None) -> None:
        """A step of ``method`` at K (0: plain) of ``batch`` rows took ``seconds``. ``later``: where given, a level
        filter's update (``_filter``, ~10 us of numpy a step) is handed to it to run later (the engine's deferred work,
        while the next step computes on the device)."""
        key = ("plain", bucket(batch), self.context, 0) if k == 0 else (method, bucket(batch), self.context, k)
        x = self._x()
        if x is not None:
            self._fit_context(key, x, math.log(seconds))
            seconds /= self._at_load(key[1], x)  # kept at the bucket's centre
        self.count[key] = self.count.get(key, 0) + 1
        if self.count[key] == 2:
            self._timed.add(key[:2])
        old = self.avg.get(key)
        b = key[1]
        weight = EMA
        if k == 0:
            age = self.plain_age(batch)
            if age is not None and age >= PLAIN_STALE:
                weight = STALE_WEIGHT  # an old average counts less: the machine may have changed pace since
        pace = self.pace.get(b, 1.0)
        self._stamps[key[:2]] = self._stamps.get(key[:2], 0) + 1
        n = self._bucket_stamps[b] = self._bucket_stamps.get(b, 0) + 1
        if k == 0:
            self._plain_at[(b, self.context)] = n
        if old is None:
            self._keys.setdefault(key[:2], []).append(key)
            self._bucket_keys.setdefault(key[1], []).append(key)
        running, self._last[b] = self._last.get(b) == key, key
        if self.count[key] <= PACE_FROM:  # a key's first timings: the median of them, not a moving average that the
            # first one, often cold (a shape's first run, a proposer's first steps after a switch, a batch's first plain
            # step), seeds; plain decoding's are taken PLAIN_SETTLE steps apart (``Policy.plain_refresh_below``)
            first = self._first.setdefault(key, [])
            first.append(seconds / pace)
            self.avg[key] = _robust_mean(first)
            if self.count[key] == PACE_FROM:
                del self._first[key]
                if self.filters is not None:
                    f = self.filters.get(b)
                    if f is None:
                        f = self.filters[b] = LevelFilter(_LOG_STALL, noise=self.step_noise)
                    f.add(key, math.log(self.avg[key]), PACE_FROM)
            return
        if self.filters is not None:
            if later is None:
                self._filter(b, key, seconds)
            else:
                later(lambda: self._filter(b, key, seconds))
            return
        if old is not None and self.count[key] > PACE_FROM and self.pace_rate:
            # a settled average: the step's ratio to its prediction (in logs, clamped) moves the pace where this K ran
            # the step before too, its own average by a long mean's share; after another K's step, the average alone
            dev = math.log(min(STALL_CLAMP, max(1.0 / STALL_CLAMP, seconds / (old * pace))))
            if running:
                self.pace[b] = pace * math.exp(self.pace_rate * (1 - weight) * dev)
                self.avg[key] = old * math.exp(PACE_RUN * dev)
            else:
                self.avg[key] = old * math.exp((1 - weight) * dev)
        else:
            self.avg[key] = clamped_ema(old, seconds / pace, weight)

    def _filter(self, b: int, key: tuple[str, int, int, int], seconds: float) -> None:
        """A settled key's step into its bucket's ``LevelFilter``: the pace is its level, and every key's average
        that the step moved (the filter's covariance moves keys beside the one timed) is read out; a method whose
        keys moved predicts again (``predicted``; the timed key's own method too: this may run after ``observe``
        counted the step, deferred, and a prediction made in between must not stand)."""
        f = self.filters[b]
        f.observe(key, math.log(seconds))
        self.pace[b] = math.exp(f.level)
        for other, offset in f.moved():
            self.avg[other] = math.exp(offset)
            self._stamps[other[:2]] = self._stamps.get(other[:2], 0) + 1

    def _x(self) -> float | None:
        """The step's load relative to its context bucket: (load - the bucket's centre) / the bucket's width, within
        [-0.5, 0.5]; None without a load."""
        if self.load is None:
            return None
        c = self.context
        lo = 0 if c == CTX_BUCKETS[0] else c // 2
        return max(-0.5, min(0.5, (self.load - (lo + c) / 2) / (c - lo)))

    def slope(self, b: int) -> float:
        """The context slope at batch bucket ``b`` and the current context bucket (log time per bucket width)."""
        sums = self._ctx_sums.get((b, self.context))
        if sums is None:
            return 0.0
        return max(0.0, min(CTX_SLOPE_MAX, sums[1] / (sums[0] + CTX_PRIOR)))

    def load_factor(self, batch: int) -> float:
        """The factor from a time at the bucket's centre to one at the current step's load, at this batch's bucket
        (``SpeedGuard`` compares steps at the bucket's centre: plain steps and the drafting steps it judges)."""
        return self._at_load(bucket(batch), self._x())

    def _at_load(self, b: int, x: float | None) -> float:
        """The factor from a time at the bucket's centre to one at load ``x``."""
        return math.exp(self.slope(b) * x) if x else 1.0

    def _fit_context(self, key: tuple[str, int, int, int], x: float, y: float) -> None:
        """One step's (x, log time) into the regression within keys: an exponentially weighted Welford update, the
        step's deviation from its key's mean clamped to STALL_CLAMP either way, as a step's is elsewhere."""
        fit = self._ctx_fit.get(key)
        if fit is None:
            self._ctx_fit[key] = [1.0, x, y]
            return
        w, mx, my = fit
        dx = x - mx
        dy = max(-_LOG_STALL, min(_LOG_STALL, y - my))
        w2 = CTX_MEMORY * w + 1.0
        share = CTX_MEMORY * w / w2
        fit[0], fit[1], fit[2] = w2, mx + dx / w2, my + dy / w2
        sums = self._ctx_sums.setdefault(key[1:3], [0.0, 0.0])
        sums[0] = CTX_MEMORY * sums[0] + share * dx * dx
        sums[1] = CTX_MEMORY * sums[1] + share * dx * dy

    def plain_settled(self, batch: int) -> bool:
        """Whether plain decoding has PACE_FROM timings at this batch bucket and the current context bucket."""
        return self.count.get(("plain", bucket(batch), self.context, 0), 0) >= PACE_FROM

    def plain_age(self, batch: int) -> int | None:
        """Steps timed at this batch bucket since plain decoding was last timed there at the current context bucket
        (None: never)."""
        b = bucket(batch)
        at = self._plain_at.get((b, self.context))
        return None if at is None else self._bucket_stamps.get(b, 0) - at

    def _scale(self, b: int, frm: int, to: int) -> float:
        """Factor from context bucket ``frm`` to ``to`` at batch bucket ``b``: the ratio of plain decoding's
        times, else the mean ratio over the keys timed in both, else 1."""
        if frm == to:
            return 1.0
        plain_to, plain_from = self.avg.get(("plain", b, to, 0)), self.avg.get(("plain", b, frm, 0))
        if plain_to and plain_from:
            return plain_to / plain_from
        self._read_others = True
        ratios = [self.avg[(m, bb, cc, kk)] / self.avg[(m, bb, frm, kk)] for (m, bb, cc, kk) in self._bucket_keys.get(b, ())
                  if cc == to and self.avg.get((m, bb, frm, kk))]
        return sum(ratios) / len(ratios) if ratios else 1.0

    def timings(self, method: str, batch: int) -> int:
        """Steps of ``method`` (any K and context) timed at this batch bucket."""
        return sum(self.count.get(key, 0) for key in self._keys.get((method, bucket(batch)), ()))

    def timed(self, method: str, batch: int) -> bool:
        """Whether some K of ``method`` was timed at this batch bucket (any context; plain is keyed "plain") more than
        once: a first timing alone may be a cold one (``_robust_mean``)."""
        return (method, bucket(batch)) in self._timed

    def at_pace(self, b: int, times: list[float | None]) -> list[float | None]:
        """Times kept in batch bucket ``b``'s pace units (``avg``, ``_predict_all``) in seconds at the current pace and
        the current step's load."""
        return _scaled(times, self._factor(b))

    def _factor(self, b: int) -> float:
        """Pace units (at the bucket's centre) to seconds: the pace, and the context slope at the step's load."""
        return self.pace.get(b, 1.0) * self._at_load(b, self._x())

    def plain(self, batch: int) -> float | None:
        b = bucket(batch)
        return self.at_pace(b, [self._plain(b)])[0]

    def _plain(self, b: int) -> float | None:
        """``plain`` in units of the bucket's pace (as ``avg``), kept until plain decoding is timed again at this
        batch bucket (or, where it was scaled by other keys' times, until any step there is)."""
        memo_key = (b, self.context)
        plain_stamp = self._stamps.get(("plain", b), 0)
        hit = self._plain_memo.get(memo_key)
        if hit is not None and hit[0] == plain_stamp and hit[1] in (None, self._bucket_stamps.get(b, 0)):
            if hit[1] is not None:
                self._read_others = True  # as computing it would (``predicted`` keeps what depends on it)
            return hit[2]
        have = [cc for (_m, _b, cc, _k) in self._keys.get(("plain", b), ())]
        if not have:
            t0, read = None, False
        else:
            near = _nearest(have, self.context)
            before, self._read_others = self._read_others, False
            t0 = self.avg[("plain", b, near, 0)] * self._scale(b, near, self.context)
            read, self._read_others = self._read_others, before or self._read_others
        self._plain_memo[memo_key] = (plain_stamp, self._bucket_stamps.get(b, 0) if read else None, t0)
        return t0

    def reach(self, method: str, batch: int) -> int:
        """The largest K ``method`` may run at ``batch``: REACH past its largest K timed there (any context), and
        FIRST_REACH before any. A K further out is predicted by extrapolating a line through few noisy steps (or by
        the prior slope, measured at batch 1): at batch 8 on the CPU, such predictions made the batch draft K = 8 at
        1.5x the time K = 4 took, for fewer tokens a second. Each step at the edge is timed and extends the reach."""
        b = bucket(batch)
        top = max((kk for (_m, _b, _c, kk) in self._keys.get((method, b), ()) if kk > 0), default=0)
        return min(MAX_DRAFT_TOKENS, top + REACH if top else FIRST_REACH)

    def predicted(self, method: str, batch: int, slope_prior: float) -> list[float | None]:
        """``predict_all`` up to the method's reach at this batch (``reach``; K past it: not predicted), kept until an
        input changes: the method's or plain decoding's times at this batch bucket, and where the prediction read them,
        the slope prior or other methods' times (``_scale``); kept in units of the pace, read out at the current one.
        The list returned is shared: read it, do not change it."""
        b = bucket(batch)
        key = (method, b, self.context)
        stamp = (self._stamps.get((method, b), 0), self._stamps.get(("plain", b), 0))
        hit = self._predicted.get(key)
        if hit is None or hit[0] != stamp or hit[1] not in (None, self._bucket_stamps.get(b, 0)) \
                or hit[2] not in (None, slope_prior):
            self._read_others = self._read_slope = False
            times = self._predict_all(method, b, slope_prior)
            times[self.reach(method, batch) + 1:] = []
            if len(self._predicted) > 256:
                self._predicted.clear()
            hit = self._predicted[key] = (stamp, self._bucket_stamps.get(b, 0) if self._read_others else None,
                                          slope_prior if self._read_slope else None, times, None, None)
        f = self._factor(b)
        if hit[4] != f:  # read out at the current pace and load, once per step (the rows of a step ask alike)
            hit = self._predicted[key] = (*hit[:4], f, _scaled(hit[3], f))
        return hit[5]

    def predict(self, method: str, batch: int, k: int, slope_prior: float) -> float | None:
        """Seconds for one step at K: measured, else interpolated from the nearest measured K."""
        return self.predict_all(method, batch, slope_prior)[k]

    def predict_all(self, method: str, batch: int, slope_prior: float) -> list[float | None]:
        """``predict`` for K = 0..MAX_DRAFT_TOKENS in one pass (None while plain is untimed). No K is predicted
        cheaper than plain: a step planned for n-gram where no row found a match costs a plain step, timed with noise
        on either side, and must not predict a gain for drafts that never come."""
        b = bucket(batch)
        return self.at_pace(b, self._predict_all(method, b, slope_prior))

    def _predict_all(self, method: str, b: int, slope_prior: float) -> list[float | None]:
        """``predict_all`` in units of the bucket's pace (as ``avg``)."""
        c = self.context
        t0 = self._plain(b)
        if t0 is None:
            return [None] * (MAX_DRAFT_TOKENS + 1)
        by_ctx: dict[int, list[tuple[int, float, int]]] = {}
        for key in self._keys.get((method, b), ()):
            if key[3] > 0:
                by_ctx.setdefault(key[2], []).append((key[3], self.avg[key], min(self.count.get(key, 1), FIT_TRUST)))
        measured: list[tuple[int, float, int]] = []
        if by_ctx:
            near = _nearest(list(by_ctx), c)
            f = self._scale(b, near, c)
            measured = [(kk, t * f, n) for kk, t, n in by_ctx[near]]
        line = _line(measured, t0)
        exact = {m[0]: m for m in measured}
        out: list[float | None] = [t0]
        for k in range(1, MAX_DRAFT_TOKENS + 1):
            if not measured:
                self._read_slope = True
                out.append(t0 * (1.0 + slope_prior * k))
                continue
            kk, t, n = exact[k] if k in exact else min(measured, key=lambda m: abs(m[0] - k))  # nearest measured K
            if line is not None:  # the measured average shrunk towards the line through every K's (see _line); a
                # drafting step never costs less than a plain one (a low intercept must not predict a gain at K = 1)
                fit = max(t0, line[0] + line[1] * k)
                w = n if kk == k else 0
                out.append(max(t0, (w * t + FIT_WEIGHT * fit) / (w + FIT_WEIGHT)))
            else:
                out.append(max(t0, t if kk == k else t0 + max(0.0, t - t0) / kk * k))
        return out


def _scaled(times: list[float | None], f: float) -> list[float | None]:
    return [t * f if t is not None else None for t in times]


def _line(measured: list[tuple[int, float, int]], t0: float) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line through (K, seconds) of the measured K of one method, weighted
    by their observations (at most FIT_TRUST each), and through plain decoding's time at K = 0 with FIT_WEIGHT
    pseudo-observations; None where none is measured or noise makes the line fall.

    A step's cost is close to linear in K (K drafting forwards, K + 1 positions verified) and starts from what a
    plain step costs, while each K's own average rests on few and noisy steps: on the 2-core CPU at batch 8 the
    EAGLE head's K = 3 stood at 43 ms beside 42 ms for K = 4, and a fixed K = 3 run measured 30 ms a step.
    Predictions shrink each K's average towards the line, the more the fewer steps it rests on. The anchor at
    K = 0 keeps two noisy K close together from drawing a flat line: at batch 8, K = 2 timed once at 54 ms beside
    K = 4 at 55 ms predicted K = 8 at 56 ms, and the batch then drafted 8 at 87-127 ms a step."""
    pts = [(0, t0, FIT_WEIGHT), *measured]
    if len(pts) < 2:
        return None
    w = sum(n for _, _, n in pts)
    sk = sum(n * k for k, _, n in pts)
    st = sum(n * t for _, t, n in pts)
    skk = sum(n * k * k for k, _, n in pts)
    skt = sum(n * k * t for k, t, n in pts)
    den = w * skk - sk * sk
    slope = (w * skt - sk * st) / den if den > 0 else 0.0
    if slope <= 0:
        return None
    return (st - slope * sk) / w, slope


def best_drafting_k(gains: dict[int, float]) -> int:
    """The drafting K (> 0) with the highest predicted gain (ties: the smaller K); 0 where none is predicted."""
    return max((k for k in gains if k), key=gains.get, default=0)


def keep_settled(gains: dict[int, float], best: int, held: int, margin: float = K_MARGIN) -> int:
    """``held``, the K settled on, unless ``best`` is predicted ``margin`` better (or ``held`` is not predicted): the
    predictions of neighbouring K differ by less than their noise, and each move between K costs."""
    return held if held and held in gains and gains[best] < margin * gains[held] else best


def _at(times: list[float | None], k: int) -> float:
    """The predicted time of K, 0.0 where it is not predicted (untimed, or past the reach)."""
    return (times[k] if k < len(times) else None) or 0.0


def _nearest(buckets: list[int], c: int) -> int:
    """The bucket closest to ``c`` (buckets are powers of two: by their ratio; ties to the longer)."""
    return min(buckets, key=lambda x: (max(x, c) / min(x, c), -x))


@dataclass
class Decision:
    """What adaptive K chose last, and why (shown by the snapshot and the charts tab)."""

    k: int = 0
    method: str = ""
    reason: str = "no decision yet"
    gains: dict[int, float] = field(default_factory=dict)  # K -> predicted tokens/s relative to plain
    fallback_k: int = 0  # for n-gram: the draft model's best K, used where n-gram finds no match
    forced: bool = False  # measuring, probing or exploring: K is what must be tried, whatever it is predicted to give
    steps: int = 1  # forced, interrupting a decision that stands (``AdaptiveState.resume``): the steps it runs
    others: dict[str, int] = field(default_factory=dict)  # drafting: other proposers that could gain, at their best K
    # (``Policy._probe_method``)


@dataclass
class AdaptiveState:
    """Per-request acceptance evidence per method, and the request's probing schedule."""

    stats: dict[str, SpecDecodingStats] = field(default_factory=dict)
    plain_steps: int = 0
    probe_every: int = PROBE_FIRST
    probing: bool = False
    spec_steps: int = 0
    last: Decision | None = None
    fallback_k: int = 0  # the draft model's K where n-gram finds no match (auto requests only)
    resume: Decision | None = None  # while exploring from a standing decision (``Policy.reuse``): that decision
    tried_steps: int = 0  # steps the forced decision interrupting ``resume`` has run (a probe stands PROBE_BURST)
    settled: tuple[str, int, int] | None = None  # (method, batch bucket, K) of the last drafting decision that was not
    # forced: another K must beat it by K_MARGIN
    bucket: int = 0  # the batch bucket of the last full decision
    probe_after: int = 0  # plain steps before a probe may run: its proposer's catch-up must be amortised first
    hold_until: int = 0  # while plain: the policy clock up to which the decision stands (``Policy.hold_plain``)
    stands: Decision | None = None  # while speculating: the decision ``Policy.standing`` repeats ...
    stand_batch: int = 0  # ... at this batch size ...
    stand_to: int = 0  # ... while ``spec_steps`` is below this
    far_below: bool = False  # while plain: the best drafting option was predicted below FAR_BELOW x plain
    close: str = ""  # while plain: the method predicted at CLOSE_CALL x plain or more, if any (its probes run on the
    # request's own interval)
    probe_method: str = ""  # while plain: the method the request's next probe looks at (``choose``)
    quiet_since: int = -1  # while plain and far below: ``Policy.drafts`` at the full decision (``hold_plain``)
    hold_ends_recheck: bool = False  # while plain: the hold ends at a re-evaluation, not at a probe
    expected_cache: dict[str, tuple] = field(default_factory=dict)  # Policy._expected's, per method
    runs: RunLengths | None = None  # the runs of the draft model's accepted tokens in this request (``Policy.observe``)
    sampling: str = GREEDY  # the request's sampling class (``sampling_class``): the shared estimates it reads and feeds
    ngram_now: list[float] | None = None  # n-gram's expected tokens by the lookup's match at the last full decision at
    # batch 1 (``NgramProposer.expected``; ``StepPlanner._match``): used for n-gram in place of the pooled estimate

    def observe(self, method: str, k: int, accepted: int) -> None:
        stats = self.stats.get(method)
        if stats is None:  # not setdefault: that would build a new one per row and step
            stats = self.stats[method] = SpecDecodingStats()
        stats.observe_draft(k, accepted)
        if self.probing:  # a probe that speculation then keeps resets the schedule (see Policy.choose)
            self.probing = False


def _recheck(state: AdaptiveState) -> int:
    """Plain steps between re-evaluations of a plain request: RECHECK, and longer once its probes failed (the
    probe interval has doubled), up to RECHECK_MAX, which is also where drafting was predicted far below plain
    (FAR_BELOW); a probe that is due, or a new batch bucket, re-decides anyway."""
    if state.far_below:
        return RECHECK_MAX
    return min(RECHECK_MAX, RECHECK * max(1, state.probe_every // PROBE_FIRST))


def survival(stats: SpecDecodingStats | RecentAcceptance | None, prior: list[float], weight: float,
             follow: bool = False) -> list[float]:
    """s_i = P(first i+1 drafts all accepted), counts shrunk towards ``prior``, non-increasing.

    Past the last position ever drafted, s continues geometrically with the conditional acceptance measured at the
    last drafted position (drafting K never shows position K+1); with ``follow``, at the prior's conditional
    acceptance there (prior[i] / prior[i-1]): a request that drafted at most K follows the shared estimate past K
    from its own level, where deep drafts of other requests (and explored steps) measured it."""
    out, last, ratio = [], 1.0, None
    for i in range(MAX_DRAFT_TOKENS):
        a = stats.accepted_per_position[i] if stats else 0
        d = stats.drafts_per_position[i] if stats else 0
        if d == 0 and ratio is not None:
            s = last * (min(1.0, prior[i] / prior[i - 1]) if prior[i - 1] > 0 else 0.0) if follow else last * ratio
        else:
            s = (a + weight * prior[i]) / (d + weight)
            if d:
                ratio = min(1.0, s / last) if last > 0 else 0.0
        last = min(last, s)
        out.append(last)
    return out


class RecentAcceptance:
    """Per-position acceptance counts that forget: each step's drafts scale the past by 1 - 1/SHARED_MEMORY (each of
    ``rows`` drafts of a step by its ``rows``-th root).

    All-time counts would let thousands of old drafts (a useless draft earlier in the session, a
    different kind of prompt) outvote what drafting achieves now, and requests would then start plain
    and rarely find their way back.

    Beside the marginal counts (drafts reaching past position i, drafts accepted past it), the conditional ones
    (``survival_chain``): per position, the drafts that reached it (it was drafted and everything before it accepted)
    and those of them that accepted it. A position's conditional counts forget only with drafts that reach it, so
    what a few deep drafts measured is kept while the workload drafts short."""

    def __init__(self) -> None:
        self.drafts_per_position = [0.0] * MAX_DRAFT_TOKENS
        self.accepted_per_position = [0.0] * MAX_DRAFT_TOKENS
        self.reached_per_position = [0.0] * MAX_DRAFT_TOKENS
        self.passed_per_position = [0.0] * MAX_DRAFT_TOKENS
        self.version = 0

    def observe_draft(self, k: int, accepted: int, rows: int = 1) -> None:
        """A draft of ``k`` tokens, ``accepted`` of them, one of ``rows`` drafts of its step."""
        self.version += 1
        keep = _keep(rows)
        # runs for every drafting row of every step: one comprehension per list (CPython runs it faster than a loop of
        # item updates)
        self.drafts_per_position = [x * keep + (i < k) for i, x in enumerate(self.drafts_per_position)]
        self.accepted_per_position = [x * keep + (i < accepted) for i, x in enumerate(self.accepted_per_position)]
        reached, passed = self.reached_per_position, self.passed_per_position
        for i in range(min(k, accepted + 1)):
            reached[i] = reached[i] * keep + 1.0
            passed[i] = passed[i] * keep + (i < accepted)

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(self.drafts_per_position)
        return sum(self.accepted_per_position) / drafted if drafted else 0.0


def _keep(rows: int) -> float:
    """The share of the past a draft keeps in ``RecentAcceptance``: 1 - 1/SHARED_MEMORY per step, its ``rows``-th root
    per draft of a step of ``rows`` drafts (kept per SHARED_MEMORY, which a run may set: ``engine.bench.emulate``)."""
    key = (SHARED_MEMORY, rows)
    keep = _KEEPS.get(key)
    if keep is None:
        keep = 1.0 - 1.0 / SHARED_MEMORY
        keep = _KEEPS[key] = keep ** (1.0 / rows) if rows > 1 else keep
    return keep


_KEEPS: dict[tuple[float, int], float] = {}


def _record(cal: Calibration | None, expected: list[float] | None, shared: RecentAcceptance, k: int, accepted: int,
            rows: int, runs: tuple[RunLengths, RunSums, int | None] | None = None) -> None:
    """``Policy.observe``'s updates: the calibration's (where the draft checks a prediction), the shared estimate's;
    for a REPLAYED method, ``runs``: (the request's runs, the shared runs, the draft's position)."""
    if cal is not None:
        cal.observe(expected, k, accepted)
    shared.observe_draft(k, accepted, rows)
    if runs is not None:
        own, shared_runs, at = runs
        # the conditional acceptance a bonus continues with: the request's own (the shared one's updates may be
        # deferred, and the runs closed would depend on when they ran)
        closed = own.observe(k, accepted, at, own.rate(0.5))
        shared_runs.count(k, accepted, _keep(rows))
        shared_runs.add_runs(closed)


def survival_chain(recent: RecentAcceptance | None, alpha: float, weight: float, fade: float,
                   carry_weight: float) -> list[float]:
    """s_i = c_0 ... c_i from conditional acceptance: c_i, the share of drafts reaching position i that accepted it
    (``RecentAcceptance``), shrunk towards the conditional before it (c_0: towards ``alpha``) with ``weight``
    pseudo-drafts, fading linearly to nothing as the position's own count reaches ``fade``. A position never reached
    continues at the conditional before it.

    Drafts are not independent: a draft that got past three tokens is in text it predicts well. On an H200 (TinyLlama
    shape, acceptance ~0.5) the conditional acceptance past position 4 was 0.8-0.9 where alpha was 0.5. Marginal counts
    shrunk towards alpha^(i+1) and forgetting with every draft put the estimate at position 7, reached by a fraction of
    a recent draft, at 0.01 for a measured 0.25, and adaptive K drafted 4-5 where K = 6 was 5-12% faster."""
    out, s, cond = [], 1.0, alpha
    for i in range(MAX_DRAFT_TOKENS):
        n = recent.reached_per_position[i] if recent else 0.0
        p = recent.passed_per_position[i] if recent else 0.0
        w = (carry_weight if i else weight) * max(0.0, 1.0 - n / fade)
        cond = (p + w * cond) / (n + w) if n + w > 0 else cond
        s *= cond
        out.append(s)
    return out


class Calibration:
    """The acceptance model checked against what drafts realized, per draft position, for one method.

    For every draft of K tokens, each position i < K adds what the model predicted for it before the step (s_i, the
    chance that the draft is accepted up to and including it: the request's expected tokens then, E[i + 1] - E[i]) and
    what happened (1 if it was). Their ratio corrects the expected tokens of every K: 1 + sum over i < K of s_i x r_i.
    Where the model is right the ratios stay near 1 and change nothing. Where it is not, the K chosen for a gain the
    drafts do not deliver measures its own shortfall. On an H200 (TinyLlama shape, acceptance ~0.5, 8 clients) the
    model carried the conditional acceptance of shallow positions to deep ones that few drafts reached, and drafted
    K = 7-8 for a predicted 5% over K = 4 at 0.87x fixed K = 4's speed; measured, positions 6-8 were accepted 0.4-0.5x
    as often as predicted. Calibrated, its expected tokens came within 3% of what fixed K = 4 and 6 realized, and it
    drafted K = 4-5 at 0.97x. A position with little evidence follows the ratio of the position before it
    (CAL_WEIGHT), so a K first tried inherits what the shallower positions showed.

    Only the drafts of steps where two or more rows draft count (CAL_FROM_ROWS): there the batch's K is chosen for all
    of them (``StepPlanner.one_k_per_method``), not by one row's estimate. A row drafting alone drafts deep only where
    its own estimate runs high, so the positions past its usual K are drafted on exactly the steps they are predicted
    too high on: on an H200 at batch 1 (the same shape) the model before calibration predicted K = 5's tokens over K = 4's
    to the digit, and the ratios of positions 5-8, read from the 18 steps in 281 that drafted K = 5, were 0.69 and held
    every request at K = 4 (0.982x fixed K = 4; on an H100 0.961x fixed K = 5). At batch 1, without a lone row's
    drafts: the demo pair's emulation at an H100's step times 0.989x fixed K = 6 against 0.973x (five seeds), the demo
    pair on the 2-core CPU +2.8% greedy and +0.7% at T = 0.8 (paired passes), the shape's emulation -0.5% and -1.2%
    (two seeds): not measured on a GPU yet.

    A request's first PRIOR_WEIGHT drafts of a method are not counted: until its own drafts outweigh the shared prior,
    the prediction follows the engine's recent workload, not the request's text, and after a change of workload (a
    useless draft after a good one) those drafts would charge the model with its lag, a shortfall that persists
    (plain rows draft rarely) and would keep the next good workload's drafts predicted below what they deliver."""

    def __init__(self) -> None:
        self.realized = [0.0] * MAX_DRAFT_TOKENS
        self.predicted = [0.0] * MAX_DRAFT_TOKENS
        self._ratios: list[float] | None = [1.0] * MAX_DRAFT_TOKENS
        self._applied: tuple | None = None  # (expected, ratios, result) of the last ``apply``: the objects themselves

    def observe(self, expected: list[float], k: int, accepted: int) -> None:
        """A draft of ``k`` tokens, ``accepted`` of them, of a request whose expected tokens were ``expected``."""
        keep, realized, predicted = _CAL_KEEP, self.realized, self.predicted
        for i in range(min(k, len(expected) - 1)):
            realized[i] = realized[i] * keep + (i < accepted)
            predicted[i] = predicted[i] * keep + (expected[i + 1] - expected[i])
        self._ratios = None

    def ratios(self) -> list[float]:
        """r_i per position: realized over predicted, shrunk towards r_(i-1) (r_-1 = 1) by CAL_WEIGHT."""
        if self._ratios is None:
            out, r = [], 1.0
            lo, hi = CAL_RANGE
            for a, p in zip(self.realized, self.predicted):
                r = min(hi, max(lo, (a + CAL_WEIGHT * r) / (p + CAL_WEIGHT)))
                out.append(r)
            self._ratios = out
        return self._ratios

    def apply(self, expected: list[float]) -> list[float]:
        """``expected`` (tokens of a step at K = 0..) with each position's share scaled by its ratio (kept while
        neither changes: the rows of a step ask for the same request's several times)."""
        ratios, hit = self.ratios(), self._applied
        if hit is not None and hit[0] is expected and hit[1] is ratios:
            return hit[2]
        out = [expected[0]]
        for r, e1, e0 in zip(ratios, expected[1:], expected):
            out.append(out[-1] + (e1 - e0) * r)
        self._applied = (expected, ratios, out)
        return out


class _Backoff:
    """Per proposer, the clock of one-step tries (explore steps, probes of another proposer): a try is due where the
    policy clock is a multiple of the proposer's interval (so the rows of a step try together), which doubles after
    each step that tried it, from ``first`` up to ``cap``, and starts again from ``first`` on ``reset``."""

    def __init__(self, first: int, cap: int) -> None:
        if cap % first:  # ``quiet`` reads every interval as a multiple of ``first``
            raise ValueError(f"a try's interval cap ({cap}) must be a multiple of its first interval ({first})")
        self.first, self.cap = first, cap
        self.every: dict[str, int] = {}  # per proposer, where it is not ``first``
        self._tried: set[str] = set()  # proposers tried at the current clock

    def due(self, method: str, clock: int) -> bool:
        """Whether ``method`` is tried at ``clock`` (counted as tried when it is)."""
        if clock and not clock % self.every.get(method, self.first):
            self._tried.add(method)
            return True
        return False

    def quiet(self, clock: int) -> bool:
        """Whether no proposer can be tried at ``clock``: every interval is ``first`` doubled (capped at a multiple
        of it), so none is due off multiples of ``first``."""
        return bool(clock % self.first)

    def advance(self) -> None:
        """A new step: the proposers tried at the last one wait twice as long for their next try."""
        for m in self._tried:
            self.every[m] = min(self.cap, 2 * self.every.get(m, self.first))
        self._tried.clear()

    def reset(self, method: str) -> None:
        self.every.pop(method, None)


class SpeedGuard:
    """Whether drafting pays, as realized: over every GUARD_WINDOW drafting steps of a batch bucket (fewer where it lost
    by far, GUARD_EARLY), the tokens the steps emitted against the tokens plain decoding would have emitted in their
    wall time (each step's rows over plain decoding's measured step time at its batch size). The step-time model
    predicts each K from what it has timed; what it never times (steps mixing methods or K, the host's share of a row's
    decision) the guard sees. A proposer's catch-up on tokens it skipped counts at its step's predicted time (the
    engine's ``_decode``): it is the cost of having decoded plain, paid once, and charged to the window after a hold it
    would keep the batch plain. A window below GUARD_BELOW holds the batch's adaptive rows plain
    for ``hold`` of their steps at this bucket (``left``; steps of fixed-K or plain requests do not count, so a hold
    outlasts them), doubling while drafting keeps losing; after a hold the rows draft as they decide again, which is
    the probe.

    The plain steps it compares with may be older than the window, and a machine's speed drifts (the 2-core CPU's by
    10-30% within a minute): the hold's first GUARD_RECHECK plain steps measure plain decoding again, and where the
    window, scaled by them, did not lose, the hold ends there (``recheck``)."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.plain_tokens = 0.0
        self.steps = 0  # drafting steps of the current window
        self.hold = GUARD_HOLD_FIRST  # the next hold's length
        self.left = 0  # steps left of the current hold
        self.ratio: float | None = None  # the last window's realized speed over plain decoding's
        self.yardstick: dict[int, float] = {}  # batch size -> the plain step time the current window was measured by
        self._was: dict[int, float] = {}  # ... and the last losing window's, while its hold is rechecked
        self._fresh: dict[int, list[float]] = {}  # plain steps measured in that hold, per batch size

    def observe(self, tokens: int, rows: int, seconds: float, plain_s: float, plain_rows: int | None = None) -> None:
        """A drafting step of ``rows`` rows emitted ``tokens`` in ``seconds``; plain decoding's step took ``plain_s``
        as last measured, at ``plain_rows`` rows (default ``rows``)."""
        self.tokens += tokens
        self.plain_tokens += rows * seconds / plain_s
        self.yardstick[plain_rows or rows] = plain_s
        self.steps += 1
        early = GUARD_EARLY.get(self.steps)
        if self.steps < GUARD_WINDOW and (early is None or self.tokens >= early * self.plain_tokens):
            return
        self.ratio = self.tokens / self.plain_tokens
        self.tokens = self.plain_tokens = 0.0
        self.steps = 0
        if self.ratio < GUARD_BELOW:
            self.left = self.hold
            self.hold = min(GUARD_HOLD_MAX, 2 * self.hold)
            self._was, self._fresh = self.yardstick, {}
        elif self.ratio >= 1.0:
            self.hold = GUARD_HOLD_FIRST
        self.yardstick = {}

    def recheck(self, rows: int, seconds: float) -> None:
        """A plain step of ``rows`` rows in the hold took ``seconds``. After GUARD_RECHECK of them at a batch size the
        window was measured at, its ratio is scaled by how much slower (or faster) plain decoding runs now; at
        GUARD_BELOW or above the hold ends, and the next one is no longer."""
        if not self.left or rows not in self._was:
            return
        fresh = self._fresh.setdefault(rows, [])
        fresh.append(seconds)
        if len(fresh) < GUARD_RECHECK:
            return
        self.ratio *= _median(fresh) / self._was.pop(rows)
        self._was = {}
        if self.ratio >= GUARD_BELOW:
            self.left = 0
            self.hold = max(GUARD_HOLD_FIRST, self.hold // 2)


class Policy:
    """Engine-wide: step times, recent shared acceptance per method, the last decision."""

    @classmethod
    def for_device(cls, cuda: bool) -> Policy:
        """The engine's policy on a CUDA device or elsewhere, from the module's constants as they are now (the
        emulation's ``--set`` changes them for a run)."""
        if cuda:
            return cls(SPEC_RECHECK_FROM_CUDA, SPEC_ROWS_CUDA, PACE_RATE_CUDA, LEVEL_FILTER_CUDA, K_MARGIN_CUDA)
        return cls(SPEC_RECHECK_FROM, 1.0, PACE_RATE, LEVEL_FILTER, K_MARGIN, LEVEL_NOISE)

    def __init__(self, spec_recheck_from: int = SPEC_RECHECK_FROM, spec_rows: float = 1.0,
                 pace_rate: float = PACE_RATE, level_filter: bool = False, k_margin: float = K_MARGIN,
                 step_noise: float | None = None) -> None:
        self.k_margin = k_margin  # ``keep_settled``'s margin (K_MARGIN_CUDA on a CUDA device)
        self.spec_recheck_from = spec_recheck_from  # the batch bucket from which speculating decisions stand a few steps
        self.spec_rows = spec_rows  # ... and how many rows re-decide per step from batch SPEC_RECHECK_FROM on
        # step times of greedy steps and of steps with a sampled row (``tick`` selects the step's): a sampled row pays
        # for its draws at every position it verifies, and on a GPU that is more launches a step. ``pace_rate`` and
        # ``level_filter``: the tables' (``StepTimes``; the engine's: ``for_device``)
        self._times = {False: StepTimes(pace_rate, level_filter, step_noise),
                       True: StepTimes(pace_rate, level_filter, step_noise)}
        self._sampled = False  # which of them ``times`` is: the current step's (``tick``)
        # per (method, sampling class): recent shared acceptance, and the acceptance model against realized drafts
        self.shared: dict[tuple[str, str], RecentAcceptance] = {}
        self.calibration: dict[tuple[str, str], Calibration] = {}
        self.shared_runs: dict[tuple[str, str], RunSums] = {}  # ... and the runs of REPLAYED methods' accepted tokens
        self._stream_runs: dict[tuple[str, str], RunLengths] = {}  # ``observe``'s drafts without a request's state
        self.drafts = 0  # drafts observed so far, of any method and row (``hold_plain``)
        self.decision = Decision()
        self.clock = 0  # decode steps so far (the engine ticks once per step)
        self._quiet_at = -1  # the clock if no explore step or probe of a proposer can be due at it (``tick``)
        # per method: the probe interval failed probes have reached on this engine. A new request starts there,
        # not at PROBE_FIRST, so a useless draft is not re-probed from scratch by every request (at batch 8
        # a probe costs the whole batch a drafting step plus the draft's catch-up on what it skipped)
        self.probe_floor: dict[str, int] = {}
        self.catch_up_s: dict[str, float] = {}  # per method: measured seconds per token a proposer catches up on
        # per (method, sampling class, alpha, version of its shared counts): the shared prior's survival, the same for
        # every row of a step (the predicted step times are kept by StepTimes.predicted)
        self._shared_cache: dict[tuple, list[float]] = {}
        self._timing_tries: dict[tuple[str, int], set[int]] = {}  # (method, batch bucket) -> clocks it was tried at
        self._spoiled_tries: dict[tuple[str, int], int] = {}  # ... and how many of those steps timed nothing
        self._tried_at = -1  # the clock of the last timing try (``settle_tries`` has nothing to do at other steps)
        self.method_probes = _Backoff(METHOD_PROBE_FIRST, METHOD_PROBE_MAX)  # ``_probe_method``'s clock
        self.explores = _Backoff(EXPLORE_EVERY, EXPLORE_MAX)  # ``_explore``'s clock
        self._explored_below: dict[str, tuple[int, bool]] = {}  # per method: (clock, below K) of its last explore step
        self._probed_above: dict[str, tuple[int, bool]] = {}  # per method: (clock, past the best K) of its last probe
        self._probed_at: dict[str, int] = {}  # per method: the clock of its last probe from plain decoding (any row)
        self.guards: dict[tuple[int, bool], SpeedGuard] = {}  # per (batch bucket, sampled steps): ``guard_holds``
        self._plain_walls: dict[tuple[int, bool], deque[float]] = {}  # per (batch, sampled): recent plain steps' walls
        self._plain_median: dict[tuple[int, bool], float] = {}  # ... and their median, from 3 of them on
        # (len(_plain_median) when built, {(batch, sampled): the batch size of it that ``guard_observe`` reads or None})
        self._yardstick_memo: list = [0, {}]

    def tick(self, context: int = 0, sampled: bool = False) -> None:
        """One decode step begins; its longest row attends over ``context`` positions (the step's context bucket, and
        its load within the bucket: ``StepTimes``), and ``sampled``: some row samples (the step is decided and timed
        with the step times of such steps)."""
        self._sampled = sampled
        self.clock += 1
        self._quiet_at = self.clock if self.explores.quiet(self.clock) and self.method_probes.quiet(self.clock) else -1
        self.times.context = ctx_bucket(context)
        self.times.load = context
        self.method_probes.advance()
        self.explores.advance()

    def _interval(self, state: AdaptiveState, method: str = "") -> int:
        """The request's probe interval for a probe of ``method`` (default: the one its next probe looks at, else its
        last decision's): at least the one failed probes of that method reached engine-wide (``probe_floor``), except
        for the method of a close call (``AdaptiveState.close``), whose probes run on the request's own interval."""
        if not method:
            method = state.probe_method or (state.last.method if state.last is not None else "")
        if state.close and state.close == method:
            return state.probe_every
        return max(state.probe_every, self.probe_floor.get(method, 0))

    def _probe_due(self, state: AdaptiveState, plain_steps: int) -> bool:
        """Probe at a step that is a multiple of the interval (so the rows of a batch probe together),
        once half the interval has passed; at twice the interval whatever the clock says."""
        every = self._interval(state)
        if plain_steps < state.probe_after:
            return False
        return (plain_steps >= every // 2 and self.clock and self.clock % every == 0) or plain_steps >= 2 * every

    def _steps_to_probe(self, state: AdaptiveState, plain_steps: int | None = None) -> int:
        """Steps until ``_probe_due`` holds, with the clock and the plain steps (default: the request's) both advanced
        (closed form)."""
        every, done = self._interval(state), state.plain_steps if plain_steps is None else plain_steps
        first = max(1, every // 2 - done, state.probe_after - done)
        on_clock = first + (-(self.clock + first)) % every
        return min(on_clock, max(1, 2 * every - done, state.probe_after - done))

    def _shared_prior(self, method: str, sampling: str, alpha: float) -> list[float]:
        """The shared survival estimate of ``method`` for a sampling class (``survival_chain``), kept until its counts
        or alpha change."""
        shared = self.shared.get((method, sampling))
        faded = shared is not None and shared.reached_per_position[0] >= ALPHA_FADE  # alpha no longer counts
        key = (method, sampling, None if faded else alpha, shared.version if shared is not None else -1)
        prior = self._shared_cache.get(key)
        if prior is None:
            prior = survival_chain(shared, alpha, ALPHA_WEIGHT, ALPHA_FADE, CARRY_WEIGHT)
            if len(self._shared_cache) > 64:
                self._shared_cache.clear()
            self._shared_cache[key] = prior
        return prior

    def observe(self, method: str, k: int, accepted: int, state: AdaptiveState | None = None,
                sampling: str | None = None, rows: int = 1, later: Callable[[Callable[[], None]], None] | None = None,
                at: int | None = None) -> None:
        """A draft of ``k`` tokens with ``method``, ``accepted`` of them, of a request of ``sampling`` class (default:
        its ``state``'s, else greedy), one of ``rows`` drafts of its step (the shared estimate forgets by the step);
        with the adaptive ``state`` of its request, checked against what the acceptance model expected of it
        (``Calibration``; call before ``state.observe``: what it expected is taken now). For a REPLAYED method, with
        the ``state`` of any request (fixed K too), the request's runs of accepted tokens, the draft from its position
        ``at`` (None: where its last draft's tokens ended).

        ``later``: where given, the shared estimate's and the calibration's updates are handed to it to run later (the
        engine's deferred work, while the next step computes on the device): decisions then read them a step late,
        which at a batch of rows that re-decide once in many steps changes nothing they decide, and the updates
        (per row and step, in Python) leave the step's critical path."""
        self.drafts += 1
        key = (method, sampling or (state.sampling if state is not None else GREEDY))
        own = state.stats.get(method) if state is not None else None
        cal = expected = None
        if k > 0 and own is not None and own.num_drafts >= PRIOR_WEIGHT and rows >= CAL_FROM_ROWS \
                and method not in REPLAYED:
            # see Calibration: not a request's first drafts, nor a row's that drafts alone
            hit = state.expected_cache.get(method)
            if hit is not None:
                expected = hit[3]
                cal = self.calibration.get(key)
                if cal is None:
                    cal = self.calibration[key] = Calibration()
        shared = self.shared.get(key)
        if shared is None:
            shared = self.shared[key] = RecentAcceptance()
        runs = None
        if method in REPLAYED:  # the request's runs too go with ``later``: read by its decisions only, which at the
            # batch sizes that defer stand many steps
            shared_runs = self.shared_runs.get(key)
            if shared_runs is None:
                shared_runs = self.shared_runs[key] = RunSums()
            if state is None:  # no request's state: the drafts are one stream's
                own_runs = self._stream_runs.get(key)
                if own_runs is None:
                    own_runs = self._stream_runs[key] = RunLengths()
            else:
                if state.runs is None:
                    state.runs = RunLengths()
                own_runs = state.runs
            runs = (own_runs, shared_runs, at)
        if later is None:
            _record(cal, expected, shared, k, accepted, rows, runs)
        else:
            later(lambda: _record(cal, expected, shared, k, accepted, rows, runs))

    def cut_runs(self, state: AdaptiveState, later: Callable[[Callable[[], None]], None] | None = None) -> None:
        """The request of ``state`` stopped drafting with the draft model for now (plain, another proposer, finished):
        its open run of accepted tokens is closed as ``RunLengths.cut`` has it, and the shared runs take it."""
        own = state.runs
        if own is None or (later is None and not own.pending):  # deferred, the draft before may be too: look then
            return
        shared = self.shared_runs.get(("model", state.sampling))

        def record() -> None:
            if not own.pending:
                return
            closed = own.cut(own.rate(0.5))
            if shared is not None:
                shared.add_runs(closed)
        if later is None:
            record()
        else:
            later(record)

    def guard_holds(self, batch: int) -> SpeedGuard | None:
        """The guard holding this step's adaptive rows plain (``SpeedGuard``; the step counts against its hold), or
        None: they decide as usual."""
        g = self.guards.get((bucket(batch), self._sampled))
        if g is None or not g.left:
            return None
        g.left -= 1
        return g

    def observe_plain(self, batch: int, seconds: float) -> None:
        """A step of ``batch`` rows, every one plain, took ``seconds``: the guard's yardstick, as measured. Not the
        step-time model's plain time: that moves with the pace the running K sets, so a K costlier than its average
        slows the predicted plain step with it, and drafting K = 1 at 2.2x plain's step time for 1.7 tokens a row
        (on the 2-core CPU at 8 clients) looked as fast as plain decoding.

        Kept at the context bucket's centre by the step times' context slope (``StepTimes.load_factor``), as the
        drafting steps judged against it are (``guard_observe``): the recent plain steps are the last wave's, its rows
        at their longest contexts (on the 2-core CPU at 8 clients the last 16 steps of a plain pass took 1.04-1.16x the
        pass's median step), and drafting steps at every context were judged against them: 8 clients at T = 0.8
        drafted at 0.92x plain's speed through five repeats."""
        seconds /= self.times.load_factor(batch)
        walls = self._plain_walls.get((batch, self._sampled))
        if walls is None:
            walls = self._plain_walls[(batch, self._sampled)] = deque(maxlen=GUARD_PLAIN_STEPS)
        walls.append(seconds)
        if len(walls) >= 3:  # kept here, not at every drafting step that reads it (``guard_observe``)
            self._plain_median[(batch, self._sampled)] = _median(walls)
        guard = self.guards.get((bucket(batch), self._sampled))
        if guard is not None:
            guard.recheck(batch, seconds)

    def guard_observe(self, batch: int, tokens: int, seconds: float) -> None:
        """A step of ``batch`` adaptive rows of which some drafted emitted ``tokens`` in ``seconds`` (from GUARD_FROM,
        where plain decoding was measured at this batch size)."""
        b = bucket(batch)
        if b < GUARD_FROM:
            return
        # plain decoding measured at this batch size, else at the nearest one of the bucket (a batch of 7 between waves
        # of 8 clients: plain rows finish together and rarely run it)
        memo = self._yardstick_memo
        if memo[0] != len(self._plain_median):  # a batch size measured for the first time: look again
            memo[0], memo[1] = len(self._plain_median), {}
        n = memo[1].get((batch, self._sampled), -1)
        if n == -1:
            measured = [m for (m, sampled) in self._plain_median if sampled == self._sampled and bucket(m) == b]
            n = memo[1][(batch, self._sampled)] = min(measured, key=lambda m: (abs(m - batch), -m)) if measured else None
        if n is None:
            return
        plain = self._plain_median[(n, self._sampled)]
        g = self.guards.get((b, self._sampled))
        if g is None:
            g = self.guards[(b, self._sampled)] = SpeedGuard()
        g.observe(tokens, batch, seconds / self.times.load_factor(batch), plain, n)  # both at the bucket's centre

    @property
    def times(self) -> StepTimes:
        """The step times of the current step's kind: greedy steps', or those of steps with a sampled row."""
        return self._times[self._sampled]

    @times.setter
    def times(self, table: StepTimes) -> None:
        self._times[self._sampled] = table

    def step_times(self) -> list[StepTimes]:
        """Both tables of step times: greedy steps', then those of steps with a sampled row."""
        return [self._times[False], self._times[True]]

    def plain_refresh_below(self, batch: int) -> float:
        """The predicted gain (over plain) below which a step planned to draft at ``batch`` runs plain instead, to time
        plain decoding again: REFRESH_BELOW once plain's time there is PLAIN_STALE steps old, any gain (inf) every
        PLAIN_SETTLE steps while plain has fewer than PACE_FROM timings here, else none (0)."""
        age = self.times.plain_age(batch)
        if age is None:
            return 0.0
        if age >= PLAIN_SETTLE and not self.times.plain_settled(batch):
            return math.inf
        return REFRESH_BELOW if age >= PLAIN_STALE else 0.0

    def evidence(self, method: str, sampling: str = GREEDY) -> float:
        """Drafts of ``method`` measured on this engine for a sampling class (recent ones weigh most)."""
        shared = self.shared.get((method, sampling))
        return shared.drafts_per_position[0] if shared is not None else 0.0

    def gains(self, state: AdaptiveState, method: str, batch: int, alpha: float, slope: float) -> dict[int, float]:
        """K -> predicted speed relative to plain (1.0 at K = 0) for K up to the method's reach at this batch size
        (``StepTimes.reach``); empty until plain was timed."""
        times = self.times.predicted(method, batch, slope)  # times[0]: plain's, None while untimed; K past the reach:
        # not predicted
        t0 = times[0]
        if t0 is None:
            return {}
        expected = self.expected(state, method, alpha)
        out = {0: 1.0}
        for k in range(1, len(times)):
            out[k] = expected[k] * t0 / times[k] if times[k] else 0.0
        return out

    def expected(self, state: AdaptiveState, method: str, alpha: float) -> list[float]:
        """Expected tokens of one step at K = 0..MAX_DRAFT_TOKENS for this request and method (calibrated); for n-gram,
        what its lookup's match predicts where the planner gave it (``AdaptiveState.ngram_now``)."""
        if method == "ngram" and state.ngram_now is not None:
            return state.ngram_now
        if method in REPLAYED:
            return self._replayed(state, method, alpha)
        return self._calibrated(method, state.sampling,
                                self._expected(state, method, alpha, self._shared_prior(method, state.sampling, alpha)))

    def _calibrated(self, method: str, sampling: str, expected: list[float]) -> list[float]:
        cal = self.calibration.get((method, sampling))
        return expected if cal is None else cal.apply(expected)

    def _expected(self, state: AdaptiveState, method: str, alpha: float, prior: list[float]) -> list[float]:
        """``expected`` from the shared prior, kept per request and method until its own drafts or the shared
        estimate change (a decision at batch 1 runs every step, for every method the request may use)."""
        own = state.stats.get(method)
        key = (own.num_drafts, own.num_accepted_tokens) if own is not None else None
        hit = state.expected_cache.get(method)
        if hit is not None and hit[0] is own and hit[1] == key and hit[2] is prior:
            return hit[3]
        out = [1.0]
        for s in survival(own, prior, PRIOR_WEIGHT, follow=True):
            out.append(out[-1] + s)
        state.expected_cache[method] = (own, key, prior, out)  # the objects themselves: compared by identity
        return out

    def _replayed(self, state: AdaptiveState, method: str, alpha: float) -> list[float]:
        """``expected`` from the runs of accepted tokens (``engine.acceptance_runs``): the request's, the shared ones
        of its sampling class, and the α prior while few runs were measured; kept until one of them changes."""
        own, shared = state.runs, self.shared_runs.get((method, state.sampling))
        measured = (own.runs if own is not None else 0.0) + (shared.runs if shared is not None else 0.0)
        key = (own.version if own is not None else -1, shared.version if shared is not None else -1,
               alpha if measured < RUN_FADE else None)  # alpha no longer counts once faded
        hit = state.expected_cache.get(method)
        if hit is not None and hit[0] is own and hit[2] is shared and hit[1] == key:
            return hit[3]
        out = expected_from_runs(own, shared, alpha, RUN_SHARED, RUN_ALPHA, RUN_FADE)
        state.expected_cache[method] = (own, key, shared, out)  # the objects themselves: compared by identity
        return out

    def step_cap(self, rows: list[tuple[AdaptiveState, str, int, float]], others: int, batch: int,
                 alpha: float) -> int | None:
        """The K cap that maximises the batch's expected tokens per second (None: plain is not timed yet).

        ``rows``: (state, method, planned K, cost slope) of the adaptive rows; ``others`` rows take one token.
        Each row decides as if the step's cost were its own, but a step costs what its longest row costs: one
        row drafting K makes all the rows' step a K-step (every row is verified at K + 1 positions). With most
        rows plain and one drafting, the batch can lose where that row gains."""
        t0 = self.times.plain(batch)
        if t0 is None:
            return None
        gains = [self.expected(st, m, alpha) for st, m, _k, _slope in rows]
        times = {(m, slope): self.times.predicted(m, batch, slope) for _, m, _k, slope in rows}
        best, best_value = 0, (sum(g[0] for g in gains) + others) / t0
        for cap in sorted({k for _, _, k, _ in rows if k}):
            cost = max(_at(times[(m, slope)], cap) for _, m, k, slope in rows if k >= cap)
            tokens = sum(g[min(k, cap)] for g, (_, _, k, _) in zip(gains, rows)) + others
            if cost > 0 and tokens / cost >= best_value:
                best, best_value = cap, tokens / cost
        return best

    def reuse(self, state: AdaptiveState, methods: Collection[str], batch: int) -> Decision | None:
        """The request's last decision when it still stands this step (None: decide with ``choose``): while
        plain, re-evaluated every RECHECK steps (more after failed probes, ``_recheck``), at probes and when the
        batch bucket changes; while speculating, every ``spec_recheck`` steps and at explore steps. Cheap, as it runs
        for every row at every step."""
        last = state.last
        if last is not None and last.forced and state.resume is not None:
            state.tried_steps += 1
            if state.tried_steps < last.steps and last.method in methods and bucket(batch) == state.bucket:
                self.decision = last  # a probe's burst goes on
                return last
            last = state.last = state.resume  # an explore step is over: the decision it interrupted stands again
            state.resume = None
        if last is None or last.forced:
            return None
        if not last.k:
            return self.hold_plain(state, batch)
        every = spec_recheck(state.bucket, self.spec_rows)
        if state.spec_steps % every and last.method in methods and bucket(batch) == state.bucket >= self.spec_recheck_from:
            state.spec_steps += 1  # speculating as decided a few steps ago (acceptance moves slowly)
            explore = None if self._quiet_at == self.clock else \
                self._probe_method(last) or self._explore(last.method, last.k, last.gains)  # as a full decision would
            if explore is not None:
                state.resume, last, state.tried_steps = last, explore, 0
                state.last = last
            else:  # the steps ``standing`` may repeat it: up to the one before its re-decision (``expires_next``)
                done = state.spec_steps
                state.stands, state.stand_batch = last, batch
                state.stand_to = (done // every + 1) * every - 1 if done % every else 0
            self.decision = last
            return last
        return None

    def standing(self, state: AdaptiveState, batch: int) -> Decision | None:
        """``reuse``'s answer for a speculating request in O(1), where it is sure: the decision ``reuse`` last kept
        (``AdaptiveState.stands``), at the same batch size, on a step where no explore step or probe of a proposer can
        be due (``_Backoff.quiet``), and short of the step before its re-decision (which ``expires_next`` sees and the
        planner decides ahead). None: ask ``reuse``. Runs first for every adaptive row of every step: at 8 clients
        on the 2-core CPU (CUDA's settings) ``reuse``'s checks, ``expires_next`` and the rest of a standing row's
        path cost ~4 us a row against fixed K's ~1.5."""
        last = state.last
        if last is None or last is not state.stands or batch != state.stand_batch or self._quiet_at != self.clock \
                or state.spec_steps >= state.stand_to:
            return None
        state.spec_steps += 1
        self.decision = last
        return last

    def _probe_method(self, d: Decision) -> Decision | None:
        """On a proposer's probe clock (rows probe together; METHOD_PROBE_FIRST, doubling up to METHOD_PROBE_MAX after
        each probe), PROBE_BURST steps with it at its best K for a row drafting with another (``d``) where it could gain
        (``Decision.others``): its acceptance and times are measured again. None at other steps."""
        for m, k in d.others.items():
            if self.method_probes.due(m, self.clock):
                return Decision(k, m, f"probing {m} K={k} (drafting with {d.method} K={d.k})", d.gains, forced=True,
                                steps=PROBE_BURST)
        return None

    def _explore(self, method: str, k: int, gains: dict[int, float]) -> Decision | None:
        """On the explore clock (rows explore together), one step at K + 1 or K - 1, in turn, for a row drafting K: the
        times and acceptance of a K that does not run are otherwise never measured again. Past K, they are not known;
        below it, a K's time is kept from when it last ran (StepTimes: the pace, set by the K that runs, carries that
        K's drift to the others), so a K chosen over its neighbour on a time measured low stays chosen: on an H200 at 8
        clients (demo pair, fp16) the batch held K = 5 where K = 4 ran 8% faster, and with explore steps below K too,
        its passes ran ~4% faster at T = 0 and at T = 0.8. The clock is the method's: EXPLORE_EVERY steps, doubling
        after each explore step up to EXPLORE_MAX, and back to EXPLORE_EVERY (first above K) when a request settles on
        another K (``choose``). None at other steps."""
        if not self.explores.due(method, self.clock):
            return None
        below = self._turn(self._explored_below, method)
        if k >= MAX_DRAFT_TOKENS or (below and k > 1):
            return Decision(k - 1, method, f"exploring {method} K={k - 1} (best predicted K={k})", gains, forced=True)
        return Decision(k + 1, method, f"exploring {method} K={k + 1} (best predicted K={k})", gains, forced=True)

    def _probe_k(self, method: str, best: int, gains: dict[int, float]) -> int:
        """The K of a probe from plain decoding: the best predicted K and, at every other probe of ``method``, the K past
        it where the reach allows (``StepTimes.reach``; rows probing at one step probe alike). Drafting rows explore
        K + 1 and K - 1 (``_explore``); plain rows never did, so a K past the timed ones stayed predicted by a line
        through them: on an H200 at 8 clients (demo pair, T = 0.8) the line through plain, K = 1 and K = 2 put K = 4 at
        5.8 ms (K = 1 runs no drafting chain; from K = 2 a chain's fixed cost is paid once), K = 2 was a close call, and
        the batch decoded plain through two passes until a fixed-K pass timed K = 4 at 4.6 ms; it then drafted K = 4."""
        return best + 1 if self._turn(self._probed_above, method) and best + 1 in gains else best

    def _turn(self, sides: dict[str, tuple[int, bool]], method: str) -> bool:
        """The side (``sides``: per method, the clock and side of its last turn) of this step's explore or probe of
        ``method``, False at its first: the first row of a step turns it, the others of that step follow it."""
        at, side = sides.get(method, (-1, True))
        if at != self.clock:
            side = not side
            sides[method] = (self.clock, side)
        return side

    def hold_plain(self, state: AdaptiveState, batch: int) -> Decision | None:
        """A request's decision to decode plain when it stands this step (counting the step), else None; in O(1), and
        without the request's methods (``reuse``'s plain half): up to the clock its last full decision set, when it
        re-evaluates (``_recheck``) or a probe is due, whichever comes first, and while the batch bucket is the one
        decided at. Runs for every plain row of every step: at batch 8 on an H200 with a useless draft, the per-row
        checks it replaced cost adaptive 2-4% of plain decoding's speed. A row predicted far below plain (FAR_BELOW)
        also skips its re-evaluations, not its probes, while no draft of any row was observed since its last full
        decision (``Policy.drafts``)."""
        last = state.last
        if last is None or last.forced or last.k or bucket(batch) != state.bucket:
            return None
        # past the hold: a re-evaluation of a row whose drafting was predicted far below plain, with no draft of any
        # row since, is skipped: none of the evidence it decided from moved (only plain's time did, by a few per cent
        # where 25% would matter), so the decision stands to the next re-evaluation or probe. On the 2-core CPU at 8
        # clients with a useless draft, this and ``one_k_per_method``'s all-plain shortcut took adaptive's host work
        # from 0.465 to 0.430 ms a step (plain decoding's 0.43)
        extend = self.clock >= state.hold_until
        if extend and not (state.hold_ends_recheck and state.far_below and state.quiet_since == self.drafts):
            return None
        state.plain_steps += 1
        if extend:
            self._hold_plain_until(state)
        self.decision = last
        return last

    def _hold_plain_until(self, state: AdaptiveState, waited: int | None = None) -> None:
        """After a full decision to decode plain: the clock up to which it stands (``hold_plain``). The next
        re-evaluation is where the plain steps reach a multiple of ``_recheck``; a probe, where ``_steps_to_probe``
        says. A probe interval raised meanwhile by other rows' failed probes only delays a probe, and re-deciding
        early is harmless."""
        every = _recheck(state)
        to_recheck = (every - state.plain_steps % every) % every + 1
        to_probe = self._steps_to_probe(state, waited)
        state.hold_until = self.clock + min(to_recheck, to_probe)
        state.hold_ends_recheck = to_recheck < to_probe

    def _untimed(self, state: AdaptiveState, options: dict[str, dict[int, float]], batch: int, alpha: float,
                 catch_up: dict[str, float]) -> list[str]:
        """Methods never timed at this batch bucket where another method is (TIME_TRIES, TIME_CATCH_UP), and whose
        drafts could beat the timed methods' best even at no cost: a step's time only lowers a gain from the expected
        tokens of its K (at plain decoding's time), so a method whose expected tokens stay below the best predicted
        gain is not worth a try (at 8 clients on the CPU, n-gram on stories that do not repeat took a dozen forced
        steps a run, each a row's drafts lost and a step that timed nothing else)."""
        if len(options) < 2:
            return []
        b = bucket(batch)
        timed = {m for m in options if self.times.timed(m, batch)}
        if not timed:
            return []
        t0 = self.times.plain(batch) or 0.0
        best = max(g for m in timed for g in options[m].values())
        return [m for m in options if m not in timed and catch_up.get(m, 0.0) <= TIME_CATCH_UP * t0
                and self._tries_left(m, b) and self._could_gain(state, m, alpha, max(options[m]), best)]

    def _others(self, state: AdaptiveState, options: dict[str, dict[int, float]], method: str, batch: int,
                alpha: float, catch_up: dict[str, float]) -> dict[str, int]:
        """The proposers other than ``method`` a drafting row may probe (``_probe_method``), at their best predicted K:
        those whose expected tokens could beat ``method``'s best gain (``_could_gain``) and whose catch-up on this
        row costs at most TIME_CATCH_UP plain steps."""
        best = max(options[method].values())
        t0 = self.times.plain(batch) or 0.0
        out = {}
        for m, gains in options.items():
            if m != method and catch_up.get(m, 0.0) <= TIME_CATCH_UP * t0 \
                    and self._could_gain(state, m, alpha, max(gains), best) and self._could_pay(state, m, gains, batch,
                                                                                            alpha, best):
                out[m] = best_drafting_k(gains)
        return out

    def _could_pay(self, state: AdaptiveState, method: str, gains: dict[int, float], batch: int, alpha: float,
                   best: float) -> bool:
        """Whether ``method`` could beat ``best`` (a gain over plain) at its step times here with every draft accepted:
        a probe measures acceptance again, not what its steps cost. Until PACE_FROM of its steps were timed at this
        batch bucket, it could. On an H200 at 8 clients (demo pair) the EAGLE head's steps took 2.7x a plain step at
        K = 1 and 3.7x at K = 2, no acceptance could make it pay, and its probes (each a catch-up on every row's tokens
        since the last, 6-13 ms steps among 3.5 ms ones) and the rows' decisions over three methods ran adaptive at
        0.86-0.91x fixed K = 4, against 0.93-0.99x with the head not loaded."""
        if self.times.timings(method, batch) < PACE_FROM:
            return True
        expected = self.expected(state, method, alpha)
        return any(g * (k + 1) / expected[k] > best for k, g in gains.items() if k and expected[k] > 0)

    def _could_gain(self, state: AdaptiveState, method: str, alpha: float, reach: int, best: float) -> bool:
        """Whether ``method``'s expected tokens of a step at some K up to ``reach`` exceed ``best`` (a gain over plain)."""
        return max(self.expected(state, method, alpha)[: reach + 1]) > best

    def _tries_left(self, method: str, b: int) -> bool:
        tries = len(self._timing_tries.get((method, b), ()))
        return tries - self._spoiled_tries.get((method, b), 0) < TIME_TRIES and tries < TIME_TRIES_MAX

    def settle_tries(self, batch: int, mixed: bool = False) -> None:
        """After a step: a timing try of this step that left its method untimed at this batch bucket does not count
        (TIME_TRIES_MAX), unless other rows drafted with other methods in it (``mixed``): such a step times no method,
        and its rows would mix again at the next try (at 8 clients on the CPU, n-gram's tries beside rows drafting with
        the draft model were each spoiled, 12-14 forced steps a run)."""
        if self._tried_at != self.clock or mixed:
            return
        b = bucket(batch)
        for (m, bb), clocks in self._timing_tries.items():
            if bb == b and self.clock in clocks and not self.times.timed(m, batch):
                self._spoiled_tries[(m, bb)] = self._spoiled_tries.get((m, bb), 0) + 1

    def _catch_up_wait(self, state: AdaptiveState, method: str, batch: int, seconds: float,
                       waited: int | None = None) -> int:
        """Further plain steps before a probe of ``method`` whose proposer would first read ``seconds`` of catch-up
        (tokens it skipped while the request decoded plain) costs at most PROBE_CATCH_UP of the plain time since
        the last probe; 0 when it may probe now.

        The request's plain time is its share of the batch's steps, ``t0 / batch``: the rows of a batch probe
        together and each reads its own backlog, so the step pays ``batch`` catch-ups. Weighed against the whole
        step instead, a probe at batch 8 could cost 8 x 3% of the plain time since the last: on this CPU with a
        useless draft, 8 probes of ~80 ms against a 21 ms plain step took 2% of an 8-client run."""
        t0 = self.times.plain(batch)
        done = state.plain_steps if waited is None else waited  # the plain steps since the last probe (``choose``)
        if not seconds or not t0 or done < state.probe_after:
            return 0
        need = int(seconds * max(1, batch) / (PROBE_CATCH_UP * t0)) + 1
        return max(0, need - done)

    def observe_catch_up(self, method: str, seconds: float, tokens: int) -> None:
        """A step whose ``method`` first read ``tokens`` it had skipped took ``seconds`` longer than its K-step."""
        if tokens > 0:
            per = max(0.0, seconds) / tokens
            old = self.catch_up_s.get(method)
            self.catch_up_s[method] = per if old is None else EMA * old + (1 - EMA) * per

    def expires_next(self, state: AdaptiveState) -> bool:
        """Whether a speculating request's standing decision, reused this step (``reuse``), is re-decided at the next
        step: then ``choose(..., ahead=True)`` may decide it while this step computes on the device."""
        last = state.last
        return last is not None and bool(last.k) and state.resume is None and not last.forced \
            and state.bucket >= self.spec_recheck_from \
            and not state.spec_steps % spec_recheck(state.bucket, self.spec_rows)

    def choose(self, state: AdaptiveState, methods: dict[str, float], batch: int, alpha: float,
               catch_up: dict[str, float] | None = None, ahead: bool = False) -> Decision | None:
        """K and method for this request's next step (K 0 = plain) and the reason.

        ``methods``: the proposers the request may use, each with its prior cost slope per drafted
        token (in plain steps). ``catch_up``: seconds each proposer would first spend reading what it skipped of
        this request (a probe waits until that is amortised). A decision that still stands (``reuse``) is kept.

        ``ahead``: decided a step early, while the step before computes on the device (``expires_next``), from the
        evidence up to the step before that: it stands from the next step on as if decided there (its explore and probe
        steps are ``reuse``'s, on their clocks). Only a decision to draft on is made ahead; None where the request is
        to measure, decode plain or wait (the next step decides it in full). At 8 clients on an H200 the full
        decisions were 0.1-0.15 ms of host time a step (demo pair, K = 4 steps of 3-4 ms) with the device idle.
        """
        if not ahead:
            d = self.reuse(state, methods, batch)
            if d is not None:
                return d
        state.resume = None
        state.bucket = bucket(batch)
        state.hold_until = 0  # set again below where this decision is to decode plain
        options = {m: self.gains(state, m, batch, alpha, slope) for m, slope in methods.items()}
        options = {m: g for m, g in options.items() if g}
        own = {m: st.drafts_per_position[0] for m, st in state.stats.items()}
        unmeasured = [m for m in options if self.evidence(m, state.sampling) + own.get(m, 0) < MIN_SHARED_EVIDENCE]
        untimed = [] if unmeasured else self._untimed(state, options, batch, alpha, catch_up or {})
        if ahead and (not options or unmeasured or untimed):
            return None
        if not options:
            d = Decision(0, next(iter(methods)), f"timing plain decoding at batch {batch} first")
        elif unmeasured or untimed:  # a prior alone must not switch a method off for good, nor a cost slope measured
            # at another batch size: measure it first (its acceptance, else its step time at this batch size)
            method = max(unmeasured or untimed, key=lambda m: max(g for kk, g in options[m].items() if kk))
            gains = options[method]
            k = best_drafting_k(gains)
            state.plain_steps = state.probe_after = 0
            if unmeasured:
                why = (f"measuring {method} K={k}: {self.evidence(method, state.sampling):.0f} drafts on this engine "
                       f"so far ({state.sampling})")
            else:
                self._timing_tries.setdefault((method, bucket(batch)), set()).add(self.clock)
                self._tried_at = self.clock
                why = f"timing {method} K={k} at batch {batch}, where other methods are timed"
            d = Decision(k, method, f"{why} (predicted {gains[k]:.2f}x plain)", gains, forced=True)
        else:
            method, k = max(((m, max(g, key=g.get)) for m, g in options.items()), key=lambda mk: options[mk[0]][mk[1]])
            last = state.last
            if last is not None and last.k and last.method != method and last.method in options:
                stay = best_drafting_k(options[last.method])
                if options[method][k] < SWITCH_MARGIN * options[last.method][stay]:
                    method, k = last.method, stay  # drafting on: a switch pays the other proposer's catch-up
            gains = options[method]
            if last is not None and last.k and not last.forced and last.method != method:
                self.method_probes.reset(last.method)  # a switch: the proposer left is looked at again soon
            held = state.settled
            if k and held is not None and held[:2] == (method, bucket(batch)):
                k = keep_settled(gains, k, held[2], self.k_margin)
                if k != held[2]:
                    self.explores.reset(method)  # a move: what lies past the new K is explored soon
                    self._explored_below.pop(method, None)
            if 0 < k and gains[k] < (KEEP_MARGIN if state.last is not None and state.last.k else START_MARGIN):
                k = 0  # from plain, a predicted gain within the estimates' noise is no reason to start drafting
            if ahead and not k:
                return None
            if k > 0:
                state.plain_steps = state.probe_after = 0
                state.spec_steps += 1
                if not state.probing:
                    state.probe_every = PROBE_FIRST
                    self.probe_floor.pop(method, None)  # speculation pays again: new requests probe early again
                d = Decision(k, method, f"{method} K={k} predicted {gains[k]:.2f}x plain at batch {batch}", gains,
                             others=self._others(state, options, method, batch, alpha, catch_up or {}))
                state.settled = (method, bucket(batch), k)
                tried = None if ahead else self._probe_method(d) or self._explore(method, k, gains)
                if tried is not None:  # the decision stands again after this one step (``reuse``), as where a
                    # standing decision is interrupted: not a full decision of every row the step after a probe
                    state.resume, d, state.tried_steps = d, tried, 0
            else:
                state.plain_steps += 1
                state.settled = None  # drafting again later starts from the best K then
                method, best = max(((m, best_drafting_k(g)) for m, g in options.items()),
                                   key=lambda mk: options[mk[0]][mk[1]])
                gains = options[method]
                state.far_below = gains[best] < FAR_BELOW
                close = gains[best] >= CLOSE_CALL
                if close and state.close != method:  # a close call now: its interval, raised to the engine's while it
                    state.probe_every = min(state.probe_every, PROBE_FIRST)  # was not, starts again at its own
                state.close = method if close else ""
                state.quiet_since = self.drafts
                if state.last is not None and state.last.k and not state.last.forced and gains[best] >= CLOSE_CALL:
                    state.probe_every = PROBE_SOON  # it just stopped drafting on a close call: look again soon
                # a probe's wait runs engine-wide too: the steps since the method's last probe by any row count where
                # they exceed the request's own. A request starts at the interval its method's failed probes reached
                # (``probe_floor``, up to PROBE_MAX / 2), and one shorter than half of it never probed on its own
                # count: after a bad phase the engine stayed plain for good (on an H200 at 8 clients x 128 tokens,
                # T = 0.8: two passes without a probe). The first row due probes; the others of that step wait on
                # their own counts, so short requests probe one row at a time
                # the method the next probe looks at: of those that could beat plain with every draft accepted, the
                # one probed longest ago (the best predicted first). Probing the best predicted alone, a method whose
                # estimate an old phase had set at nothing was never looked at again: on an H100 after the TinyLlama
                # shape's useless-draft level, n-gram's prior crumbs (1.02 tokens a step) kept every probe for n-gram,
                # and the draft model (now accepted at ~0.5, 2x plain) stayed unprobed for five passes
                probed = min((m for m in options if m == method or self._could_pay(state, m, options[m], batch, alpha,
                                                                                      1.0)),
                             key=lambda m: (self._probed_at.get(m, -1), m != method))
                if probed != method:
                    probe_gains = options[probed]
                    probe_best = best_drafting_k(probe_gains)
                else:
                    probe_gains, probe_best = gains, best
                state.probe_method = probed
                waited = max(state.plain_steps, self.clock - self._probed_at.get(probed, self.clock))
                wait = self._catch_up_wait(state, probed, batch, (catch_up or {}).get(probed, 0.0), waited)
                if wait:
                    state.probe_after = waited + wait
                if not wait and self._probe_due(state, waited):  # look again: acceptance or timings may have changed
                    self._probed_at[probed] = self.clock
                    state.plain_steps = state.probe_after = 0
                    # the floor: the interval a probe of the method failed at (the next decision to draft drops it).
                    # Short requests meet it and probe about once each: at the TinyLlama shape's useless draft on an
                    # H100, one probe of the draft model per 128-token request (1.3-1.5 ms over a 2.3 ms step, 0.7%
                    # of the time). Doubled by every failed probe instead (up to PROBE_MAX), that cost halved, but
                    # drafting did not come back when the draft paid again: one probe per 512 steps never outweighed
                    # the shared runs of the useless phase (the policy alone, 24 requests of 128 steps at acceptance
                    # 0 then 8 at 0.7: the last four drafted in 19-34% of their steps against 77-100%). A close
                    # call's own interval doubles only with probes of its own method: a probe of another (the
                    # rotation above) leaves it short
                    doubled = min(PROBE_MAX, 2 * self._interval(state, probed))
                    if not state.close or state.close == probed:
                        state.probe_every = doubled
                    self.probe_floor[probed] = max(self.probe_floor.get(probed, PROBE_FIRST), doubled // 2)
                    state.probing = True
                    k = self._probe_k(probed, probe_best, probe_gains)
                    d = Decision(k, probed, f"probing {probed} K={k} (predicted {probe_gains[k]:.2f}x plain; best "
                                            f"predicted K={probe_best})", probe_gains, forced=True)
                else:
                    d = Decision(0, method, f"plain: best is {method} K={best}, predicted {gains[best]:.2f}x plain "
                                            f"at batch {batch}; next probe in {self._steps_to_probe(state, waited)} "
                                            f"steps", gains)
                    self._hold_plain_until(state, waited)
        if d.method == "ngram" and d.k and "model" in options:
            model_k = max(options["model"], key=options["model"].get)
            d.fallback_k = model_k if options["model"][model_k] > 1.0 else 0
        state.last = d
        self.decision = d
        return d
