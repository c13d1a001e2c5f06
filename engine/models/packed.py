"""oneDNN-packed copies of the lean forward's weights, for GEMMs of several rows on the CPU.

MKL (torch's CPU BLAS) streams a weight fast for one row (a GEMV) but runs a GEMM of 2-32 rows at a
small fraction of the core's peak. oneDNN with the weight reordered once into its blocked layout
does much better there. Measured on the earlier 2-core EPYC (one thread, fp32, µs per GEMM, mm = MKL
over the ``[in, out]`` weight, packed = ``mkldnn::_linear_pointwise`` over the reordered weight):

=================  =====  ==========  ===========  ===========
weight (in x out)  rows   mm          packed       the step it is
=================  =====  ==========  ===========  ===========
256 x 1536         1      55          78           demo plain decode
256 x 1536         5      198         95           demo verify of K=4
256 x 4096 (head)  8      659         351          demo batch of 8
896 x 9728         4      4272        1914         Qwen2.5-0.5B verify of K=3
2048 x 2560        8      2741        1374         TinyLlama batch of 8
256 x 256          8      20          26           (small weights: never packed)
=================  =====  ==========  ===========  ===========

So one-row GEMMs keep MKL and every GEMM of ``MIN_ROWS`` rows or more on a big enough weight runs
packed, except, on some CPUs, GEMMs over weights of at most ``SMALL_BYTES``. Whether MKL or oneDNN wins there
depends on the CPU, so it is measured once per process: at the first load that packs such weights for 2 and 3 rows
(``calibrate_small_rows``: the model's own small weights in a loop, as in a forward, the two ways alternating;
~50 ms for the demo target), then by the engine's warm-up for every token count of ``ROW_PROBES``, timing the
target's own forwards (``calibrate_by_forward``). Measured (one thread, ms per loop, or per whole forward of the
demo target):

- the earlier 2-core EPYC (the sessions before 2026-12-02): MKL wins. Demo target, loop at 2 rows packed 9.8
  -> MKL 8.3, 3 rows 12.6 -> 10.2; its forward of 2 tokens 14.5 -> 11.8 ms, of 3 tokens 14.8 -> 13.5
  (one token: 9.8). Qwen2.5-0.5B's qkv and o (3-4 MiB): 2 rows 33.3 -> 32.0, 3 rows 38.9 -> 35.3.
- the 2-core EPYC of 2026-12-02 (CPU family 26, AVX-512; ~3x the earlier one's speed): oneDNN wins. The demo
  target's forward, 300 alternating pairs: 2 tokens MKL 4.65 -> packed 4.05 ms, 3 tokens 5.09 -> 4.12
  (one token 3.56; 4 tokens 3.93 either way).
- the 2-core Intel Xeon of 2026-12-02 evening (family 6 model 167, AVX-512, AMX): MKL wins at every token count in
  the demo target's forward (ms, medians, two processes each way): 4 tokens MKL 4.42-4.60 / packed 5.93-6.21, 5
  tokens 4.60-4.96 / 6.15-6.16, 8 tokens 5.05-5.87 / 6.89-7.27, 32 tokens 8.8-9.8 / 10.9-12.5; 8 rows of 5 tokens
  16.0-17.2 / 18.2-19.3 (one token 3.58 either way), while the loop of its weights alone timed them within 5% at
  5-17 rows.

Over weights past the caches (Qwen2.5-0.5B's MLP, 17-35 MiB) MKL at 2 rows took 1.8x its one-row time
(it streams the weight twice) and oneDNN 1.6x, so big weights keep oneDNN from 2 rows everywhere.

The packed copy doubles those weights' memory, so packing is skipped when the copy would
take more than ``MAX_RAM_FRACTION`` of the machine's RAM (``HELIX_PACKED_GEMM=1/0`` forces it).

Results differ from MKL's in the last bits (~4e-5 absolute on fp32 logits-scale values), as two
BLAS libraries do; a probe at load compares the two and disables packing when the op is missing
(an old torch, a CPU build without oneDNN) or disagrees.
"""

from __future__ import annotations

import bisect
import os
import statistics
import time
from collections.abc import Callable

import torch

MIN_ROWS = 2  # GEMMs with at least this many rows use the packed weight
SMALL_BYTES = 8 << 20  # ... except over a weight of at most this size: from the measured row count
SMALL_MIN_ROWS = 4  # that count before it is measured, and where the measurement cannot decide
SMALL_WIN = 0.95  # packed must take under 95% of MKL's time at a row count to take it over (a load-time measurement
# on a busy machine is noisy; a tie keeps MKL)
CALIBRATION_REPS = 9  # timed loops per way and row count, alternating
MIN_ELEMENTS = 1 << 17  # smaller weights (e.g. 256 x 256) are faster on MKL at every small row count
MAX_RAM_FRACTION = 0.25
_PACK_HINT = 8  # the row count the blocked layout is chosen for (8 and 32 measured the same)


_OPS: tuple | None = None
_small_rows: int | None = None  # measured by calibrate_small_rows (None: not yet; SMALL_MIN_ROWS meanwhile)
ROW_PROBES = (2, 3, 5, 9, 17, 33)  # token counts calibrate_by_forward times a forward at; each stands for the counts up
# to the next (verifications of K = 1, 2-3, 4-7, 8 at batch 1; batches of rows)
FORWARD_REPS = 7  # timed forwards per way and probe, alternating ...
FORWARD_BUDGET_S = 1.5  # ... fewer (at least 3) where a model's forwards would take longer than this in all
_small_table: dict[int, bool] | None = None  # probe -> small weights packed, from whole forwards (calibrate_by_forward)
_force_small: bool | None = None  # while calibrating: every GEMM over a small weight packed (True) or on MKL (False)
_have_small = False  # a load of this process packed small weights
_small_note = ""


def _ops():
    global _OPS
    if _OPS is None:
        ops = torch.ops.mkldnn
        _OPS = (ops._reorder_linear_weight, ops._linear_pointwise.default, ops._linear_pointwise.binary)
    return _OPS


def _probe() -> str | None:
    """None when packed GEMMs work and agree with MKL here, else why not."""
    try:
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN"
        reorder, _, binary = _ops()
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(384, 512, generator=gen)  # [out, in]
        x = torch.randn(5, 512, generator=gen)
        res = torch.randn(5, 384, generator=gen)
        packed = reorder(w, _PACK_HINT)
        got = binary(x, res, packed, None, "add")
        want = torch.addmm(res, x, w.t())
    except Exception as e:  # noqa: BLE001 - any failure means "do not pack"
        return f"oneDNN packed linear unavailable ({type(e).__name__}: {str(e)[:120]})"
    err = (got - want).abs().max().item()
    if not err <= 1e-3:
        return f"oneDNN packed linear disagrees with MKL (max abs error {err:.2e})"
    return None


def packing_decision(weights: list[torch.Tensor]) -> tuple[bool, str]:
    """Whether to pack ``weights`` (the lean forward's big CPU matrices), and why."""
    if not weights:
        return False, f"no weight has {MIN_ELEMENTS} elements or more (small ones are faster on MKL)"
    if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return False, "packing is for fp32 weights on the CPU"
    forced = os.environ.get("HELIX_PACKED_GEMM")
    if forced == "0":
        return False, "HELIX_PACKED_GEMM=0"
    reason = _probe()
    if reason is not None:
        return False, reason
    extra = sum(w.numel() * w.element_size() for w in weights)
    if forced != "1":
        try:
            import psutil

            total = psutil.virtual_memory().total
        except Exception:  # noqa: BLE001
            total = 0
        if total and extra > MAX_RAM_FRACTION * total:
            return False, (f"the packed copy ({extra / 2**30:.1f} GiB) would exceed {MAX_RAM_FRACTION:.0%} of RAM; "
                           "set HELIX_PACKED_GEMM=1 to pack anyway")
    return True, f"packed {len(weights)} weights ({extra / 2**20:.0f} MiB extra)"


def pack_all(slots: list[tuple[object, str, torch.Tensor]], transposed: bool) -> str:
    """For each ``(owner, attr, weight)`` with a big enough weight, set ``owner.attr`` to its packed
    copy when :func:`packing_decision` allows; returns what was done (for the log and the tests)."""
    slots = [s for s in slots if s[2].numel() >= MIN_ELEMENTS]
    ok, why = packing_decision([w for _, _, w in slots])
    if ok:
        for owner, attr, w in slots:
            setattr(owner, attr, pack(w, transposed))
        small = [(w, getattr(owner, attr)) for owner, attr, w in slots if w.numel() * w.element_size() <= SMALL_BYTES]
        if small:
            global _have_small
            _have_small = True
            calibrate_small_rows(small, transposed)
            why += f"; {_small_note}"
    return why


def small_min_rows() -> int:
    """The row count from which GEMMs over small weights run packed (measured once per process)."""
    return _small_rows or SMALL_MIN_ROWS


def calibrate_small_rows(weights: list[tuple[torch.Tensor, torch.Tensor]], transposed: bool,
                         timer: Callable[[Callable[[], None]], float] | None = None) -> int:
    """Measure, once per process, whether GEMMs of 2 or 3 rows over ``weights`` (``(weight, packed copy)`` pairs of
    one model, at most ``SMALL_BYTES`` each) run faster packed than on MKL here; sets and returns the row count
    from which they run packed (``small_min_rows``). ``HELIX_PACKED_SMALL_ROWS=N`` sets it instead. ``timer``
    (tests) times one call of its argument; default: the wall time of a loop over every weight, the two ways
    alternating ``CALIBRATION_REPS`` times, medians compared."""
    global _small_rows, _small_note
    forced = os.environ.get("HELIX_PACKED_SMALL_ROWS")
    if forced:
        try:
            _small_rows = max(MIN_ROWS, int(forced))
        except ValueError:
            raise ValueError(f"HELIX_PACKED_SMALL_ROWS must be a row count, not {forced!r}") from None
        _small_note = f"small weights packed from {_small_rows} rows (HELIX_PACKED_SMALL_ROWS)"
        return _small_rows
    if _small_rows is not None:
        return _small_rows
    timer = timer or _wall_time
    gen = torch.Generator().manual_seed(0)
    found, notes = SMALL_MIN_ROWS, []
    with torch.inference_mode():
        for rows in range(MIN_ROWS, SMALL_MIN_ROWS):
            xs = [torch.randn(rows, w.shape[0] if transposed else w.shape[1], generator=gen, dtype=w.dtype)
                  for w, _ in weights]

            def mkl(xs=xs):
                for x, (w, _) in zip(xs, weights):
                    torch.mm(x, w) if transposed else torch.nn.functional.linear(x, w)

            def onednn(xs=xs, op=_ops()[1]):
                for x, (_, pk) in zip(xs, weights):
                    op(x, pk, None, "none", [], "")

            t_mkl, t_packed = _race(mkl, onednn, CALIBRATION_REPS, timer)
            notes.append(f"{rows} rows MKL {1e3 * t_mkl:.2f} / packed {1e3 * t_packed:.2f} ms")
            if t_packed < SMALL_WIN * t_mkl:
                found = rows
                break
    _small_rows = found
    _small_note = (f"small weights packed from {found} rows (measured over {len(weights)} weights: "
                   f"{'; '.join(notes)})")
    return found


def _race(mkl: Callable[[], None], onednn: Callable[[], None], reps: int, timer: Callable[[Callable[[], None]], float],
          budget_s: float | None = None) -> tuple[float, float]:
    """Medians of ``timer(mkl)`` and ``timer(onednn)`` over ``reps`` rounds, the two ways alternating, after a first
    round whose times are dropped (allocations, oneDNN's primitive cache); with ``budget_s``, fewer rounds (at least 3)
    where the first round says they would take longer than that."""
    times: dict[Callable[[], None], list[float]] = {mkl: [], onednn: []}
    rep = 0
    while rep <= reps:
        for fn in (mkl, onednn) if rep % 2 else (onednn, mkl):
            t = timer(fn)
            if rep:
                times[fn].append(t)
            elif budget_s is not None:
                reps = max(3, min(reps, int(budget_s / max(2 * t, 1e-9))))
        rep += 1
    return statistics.median(times[mkl]), statistics.median(times[onednn])


def _wall_time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pack(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The oneDNN blocked copy of ``w`` (``[in, out]`` when ``transposed``, else ``[out, in]``)."""
    reorder = _ops()[0]
    with torch.no_grad():
        return reorder((w.t() if transposed else w).contiguous(), _PACK_HINT)


def use_packed(rows: int, w: torch.Tensor) -> bool:
    """Whether a GEMM of ``rows`` rows over weight ``w`` (which has a packed copy) runs packed."""
    if rows < MIN_ROWS:
        return False
    if w.numel() * w.element_size() > SMALL_BYTES:
        return True
    if _force_small is not None:
        return _force_small
    if _small_table is not None:
        return _small_table[ROW_PROBES[bisect.bisect_right(ROW_PROBES, rows) - 1]]  # the largest probe <= rows
    return rows >= (_small_rows or SMALL_MIN_ROWS)


def calibrate_by_forward(run: Callable[[int], None], timer: Callable[[Callable[[], None]], float] | None = None,
                         max_tokens: int = ROW_PROBES[-1]) -> dict[int, bool] | None:
    """Decide, once per process, at each token count of ROW_PROBES, whether GEMMs over small weights run packed, by
    timing ``run(tokens)`` (one forward of the model over that many new tokens, rolled back) with every such GEMM
    packed and with none, alternating FORWARD_REPS times (fewer, at least 3, where that would take the model's
    forwards over FORWARD_BUDGET_S); packed where its median is under SMALL_WIN of MKL's. A
    probe stands for the counts up to the next; probes past ``max_tokens`` (the room the caller's sequence has) take
    the last measured one's decision. Returns the table, or None where there is nothing to decide (no small weights
    packed in this process, HELIX_PACKED_SMALL_ROWS set, or decided already).

    A loop over the weights alone (``calibrate_small_rows``) does not always tell: on a 2-core Intel Xeon (AVX-512,
    AMX) it timed packed and MKL within 5% at 5-17 rows, while the demo target's forward of 4-8 tokens took 5.7-6.3 ms
    packed against 4.4-5.0 ms on MKL."""
    global _small_table, _small_note, _force_small
    if not _have_small or os.environ.get("HELIX_PACKED_SMALL_ROWS") or _small_table is not None:
        return None
    timer = timer or _wall_time
    table, notes = {}, []
    try:
        for tokens in ROW_PROBES:
            if tokens > max_tokens:
                table[tokens] = table.get(max(table, default=0), False)
                continue
            def way(packed: bool, tokens: int = tokens) -> Callable[[], None]:
                def forward() -> None:
                    global _force_small
                    _force_small = packed
                    run(tokens)
                return forward

            t_mkl, t_packed = _race(way(False), way(True), FORWARD_REPS, timer, FORWARD_BUDGET_S / len(ROW_PROBES))
            table[tokens] = t_packed < SMALL_WIN * t_mkl
            notes.append(f"{tokens} MKL {1e3 * t_mkl:.2f} / packed {1e3 * t_packed:.2f}")
    finally:
        _force_small = None
    _small_table = table
    at = [p for p in ROW_PROBES if table[p]]
    _small_note = (f"small weights packed at {', '.join(f'{p}+' for p in at) if at else 'no'} tokens (forwards, ms: "
                   f"{'; '.join(notes)})")
    return table


def packing_note() -> str:
    """What decides the small weights' GEMMs in this process (for the log and the doctor)."""
    return _small_note


def linear(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None,
           residual: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T (+ b) (+ residual)`` over a packed weight."""
    _, plain, binary = _ops()
    if residual is None:
        return plain(x, packed, b, "none", [], "")
    return binary(x, residual, packed, b, "add")
