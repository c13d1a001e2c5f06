"""The aten ops torch-directml runs on the CPU instead of the GPU, each with the report that shows it.

One list, read by tests/test_directml_path.py (the engine's decode step must use none of them) and by anyone
changing the fast path. torch-directml is frozen at 0.2.5 (torch 2.4.1), so the list will not shrink.
"""

from __future__ import annotations

# op (the aten overload torch-directml names in its warning) -> where it is reported. Every entry is a
# "The operator 'aten::X' is not currently supported on the DML backend and will fall back to run on the CPU"
# warning from torch_directml/csrc/dml/dml_cpu_fallback.cpp, quoted in the issue named.
CPU_FALLBACK_OPS: dict[str, str] = {
    "aten::multinomial": "microsoft/DirectML#372 (torch.multinomial in sampling; still open on the roadmap)",
    "aten::repeat_interleave.Tensor": "microsoft/DirectML#449 (GQA key/value expansion in HF attention, RX 7900 XT)",
    "aten::normal.Tensor_Tensor": "microsoft/DirectML#405 (torch.normal / torch.distributions.Normal)",
    "aten::cumprod.out": "microsoft/DirectML#437",
    "aten::eye.m_out": "microsoft/DirectML#431 (also returns an empty tensor instead of falling back)",
    "aten::_linalg_solve_ex.result": "microsoft/DirectML#431 (comment)",
    "aten::binary_cross_entropy": "microsoft/DirectML#411",
    "aten::_embedding_bag": "microsoft/DirectML#724 (torch-directml 0.2.5, 2026)",
    "aten::upsample_nearest1d.out": "microsoft/DirectML#718",
}
# Not listed: aten::native_dropout (#592) and aten::scatter_add.out (#251) fell back once and were implemented
# in torch-directml 0.2.2 / 0.1.13.1. The fp16 results that differ from the CPU's (#370) are no fallback; the
# engine's fp16 overflow check (engine/dtypes.py) covers that.


def packet(op: str) -> str:
    """``aten::repeat_interleave.Tensor`` -> ``repeat_interleave``: the op without its overload.

    Matching by packet is deliberately stricter than the warning: an overload that decomposes into the
    listed one on the DML backend (``repeat_interleave.self_int`` on torch 2.4.1) is caught as well.
    """
    return op.removeprefix("aten::").split(".", 1)[0]


FALLBACK_PACKETS: frozenset[str] = frozenset(packet(op) for op in CPU_FALLBACK_OPS)


def fallback_ops_in(ops: set[str] | list[str]) -> list[str]:
    """The names in ``ops`` (aten overloads like ``aten.multinomial.default`` or torch functions like
    ``multinomial``) that are DirectML CPU-fallback ops, sorted."""
    found = set()
    for op in ops:
        name = op.replace("aten.", "aten::", 1) if op.startswith("aten.") else op
        if packet(name) in FALLBACK_PACKETS:
            found.add(op)
    return sorted(found)
