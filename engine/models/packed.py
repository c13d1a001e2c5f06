"""oneDNN-packed copies of the lean forward's weights, for GEMMs of several rows on the CPU.

MKL (torch's CPU BLAS) streams a weight fast for one row (a GEMV) but runs a GEMM of 2-32 rows at a
small fraction of the core's peak. oneDNN with the weight reordered once into its blocked layout
does much better there. Measured on the 2-core EPYC here (one thread, fp32, µs per GEMM, mm = MKL
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
packed, except over weights of at most ``SMALL_BYTES``: there MKL keeps GEMMs of up to 3 rows. MKL
reads such a weight a second time from the caches, where oneDNN pays a fixed cost per call. Measured
in a loop over a model's weights (cold, as in a forward; one thread, ms per pass, packed -> this rule):

- demo target (48 weights of 0.25-1.5 MiB): 2 rows 9.8 -> 8.3, 3 rows 12.6 -> 10.2; its whole forward
  of 2 tokens 14.5 -> 11.8 ms and of 3 tokens 14.8 -> 13.5 (one token: 9.8);
- Qwen2.5-0.5B shapes (qkv and o, 3-4 MiB, under the limit): 2 rows 33.3 -> 32.0, 3 rows 38.9 -> 35.3.

Over weights past the caches (Qwen2.5-0.5B's MLP, 17-35 MiB) MKL at 2 rows took 1.8x its one-row time
(it streams the weight twice) and oneDNN 1.6x, so big weights keep oneDNN from 2 rows.

The packed copy doubles those weights' memory, so packing is skipped when the copy would
take more than ``MAX_RAM_FRACTION`` of the machine's RAM (``HELIX_PACKED_GEMM=1/0`` forces it).

Results differ from MKL's in the last bits (~4e-5 absolute on fp32 logits-scale values), as two
BLAS libraries do; a probe at load compares the two and disables packing when the op is missing
(an old torch, a CPU build without oneDNN) or disagrees.
"""

from __future__ import annotations

import os

import torch

MIN_ROWS = 2  # GEMMs with at least this many rows use the packed weight
SMALL_BYTES = 8 << 20  # ... except over a weight of at most this size: from SMALL_MIN_ROWS rows
SMALL_MIN_ROWS = 4
MIN_ELEMENTS = 1 << 17  # smaller weights (e.g. 256 x 256) are faster on MKL at every small row count
MAX_RAM_FRACTION = 0.25
_PACK_HINT = 8  # the row count the blocked layout is chosen for (8 and 32 measured the same)


_OPS: tuple | None = None


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
    return why


def pack(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The oneDNN blocked copy of ``w`` (``[in, out]`` when ``transposed``, else ``[out, in]``)."""
    reorder = _ops()[0]
    with torch.no_grad():
        return reorder((w.t() if transposed else w).contiguous(), _PACK_HINT)


def use_packed(rows: int, w: torch.Tensor) -> bool:
    """Whether a GEMM of ``rows`` rows over weight ``w`` (which has a packed copy) runs packed."""
    if rows < MIN_ROWS:
        return False
    return rows >= SMALL_MIN_ROWS or w.numel() * w.element_size() > SMALL_BYTES


def linear(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None,
           residual: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T (+ b) (+ residual)`` over a packed weight."""
    _, plain, binary = _ops()
    if residual is None:
        return plain(x, packed, b, "none", [], "")
    return binary(x, residual, packed, b, "add")
