"""The engine's real step (LLMEngine.step on a tiny Llama, lean forward, CPU) records its aten ops; none may be
one that torch-directml runs on the CPU (engine/directml_ops.py). A failure names each op and where it ran."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from engine import SamplingParams
from engine.directml_ops import CPU_FALLBACK_OPS, FALLBACK_PACKETS, fallback_ops_in, packet
from tests.tiny import tiny_engine

ROOT = Path(__file__).resolve().parent.parent
# Fallback ops the current path still uses on purpose, with why; while non-empty, the cases that hit only these
# are xfail (never a pass). Empty since the exponential race replaced torch.multinomial (engine/sampler.py):
# every case is a hard assertion.
PENDING: dict[str, str] = {}


def _where() -> str:
    """The innermost engine/ frame that led to the op: the line to change."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if ROOT / "engine" in path.parents:
            return f"{path.relative_to(ROOT)}:{frame.lineno} ({frame.name})"
    return "outside engine/"


class OpRecorder(TorchDispatchMode):
    """Every aten overload dispatched (``aten::mm``, ...), and where each fallback op came from.

    The dispatch level sees what reaches a backend, which is what torch-directml implements or not; the
    function mode below adds the Python-level names (``torch.multinomial``), so an op that decomposes before
    dispatch on this torch but not on torch 2.4.1 is still seen.
    """

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()
        self.sites: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()  # "aten::multinomial", "aten::add.Tensor"
        self.ops.add(name)
        if packet(name) in FALLBACK_PACKETS:
            self.sites.setdefault(name, set()).add(_where())
        return func(*args, **(kwargs or {}))


class CallRecorder(TorchFunctionMode):
    def __init__(self, sites: dict[str, set[str]]):
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in FALLBACK_PACKETS:
            self.sites.setdefault(f"torch.{name}", set()).add(_where())
        return func(*args, **(kwargs or {}))


def record_steps(engine, prompts: list[str], params: SamplingParams, decode_steps: int) -> OpRecorder:
    """Admit and prefill ``prompts`` (not recorded), then record ``decode_steps`` engine steps."""
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()  # prefill
    recorder = OpRecorder()
    with recorder, CallRecorder(recorder.sites):
        for _ in range(decode_steps):
            engine.step()
    return recorder


def report(recorder: OpRecorder) -> str:
    lines = []
    for op in sorted(recorder.sites):
        name = packet(op.replace("torch.", ""))
        source = next(src for listed, src in CPU_FALLBACK_OPS.items() if packet(listed) == name)
        lines.append(f"{op} [{source}] at {', '.join(sorted(recorder.sites[op]))}")
    return "; ".join(lines)


def assert_no_fallback(recorder: OpRecorder) -> None:
    found = {packet(op.replace("torch.", "")) for op in recorder.sites}
    if not found:
        return
    if found <= set(PENDING):
        pytest.xfail(f"pending: {'; '.join(PENDING[p] for p in sorted(found))} -- seen: {report(recorder)}")
    raise AssertionError(f"DirectML CPU-fallback ops in the engine step: {report(recorder)}")


CASES = {
    # name: (engine kwargs, sampling params, prompts)
    "plain-sampled": (dict(draft=False), SamplingParams(max_new_tokens=8, temperature=0.8, seed=1), ["Once upon"]),
    "plain-top-k-top-p": (dict(draft=False), SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=2),
                          ["The cat", "One day the sun"]),
    "plain-greedy": (dict(draft=False), SamplingParams(max_new_tokens=8, temperature=0.0), ["Once upon"]),
    "speculative-sampled": (dict(draft=True), SamplingParams(max_new_tokens=12, temperature=0.8, seed=3,
                                                             num_draft_tokens=3), ["Once upon", "Tom found"]),
    "speculative-greedy": (dict(draft=True), SamplingParams(max_new_tokens=12, temperature=0.0, num_draft_tokens=3),
                           ["Once upon"]),
    "speculative-ngram": (dict(draft=True), SamplingParams(max_new_tokens=12, temperature=0.7, seed=5,
                                                           num_draft_tokens=3, draft_method="ngram"),
                          ["the cat the cat the cat", "Tom found a red ball. Tom found"]),
}


@pytest.fixture(scope="module")
def engines():
    return {draft: tiny_engine(draft=draft) for draft in (False, True)}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_step_uses_no_directml_cpu_fallback_op(engines, case):
    kwargs, params, prompts = CASES[case]
    engine = engines[kwargs["draft"]]
    assert engine.target.forward_path == "lean"  # the DirectML build runs the lean forward, not transformers'
    recorder = record_steps(engine, prompts, params, decode_steps=3)
    while engine.has_work():
        engine.step()
    assert "aten::mm" in recorder.ops or "aten::addmm" in recorder.ops  # the recorder saw the real forward
    assert_no_fallback(recorder)


def test_prefill_step_uses_no_directml_cpu_fallback_op(engines):
    """The first step (prompt prefill of target and draft, first token sampled) runs on DirectML too."""
    engine = engines[True]
    engine.add_request("Once upon a time", SamplingParams(max_new_tokens=4, temperature=0.8, seed=4))
    recorder = OpRecorder()
    with recorder, CallRecorder(recorder.sites):
        engine.step()
    while engine.has_work():
        engine.step()
    assert "aten::mm" in recorder.ops or "aten::addmm" in recorder.ops
    assert_no_fallback(recorder)


def test_recorder_catches_a_fallback_op_and_names_the_line():
    """The check can fail: a step that calls torch.multinomial and repeat_interleave is reported with its line."""
    recorder = OpRecorder()
    with recorder, CallRecorder(recorder.sites):
        probs = torch.softmax(torch.randn(2, 16), -1)
        torch.multinomial(probs, 1)
        torch.arange(4).repeat_interleave(torch.tensor([1, 2, 1, 2]))
    assert {"aten::multinomial", "aten::repeat_interleave.Tensor", "torch.multinomial"} <= set(recorder.sites)
    assert all("test_directml_path.py" not in s for s in report(recorder).split(";"))  # outside engine/: said so
    assert "outside engine/" in report(recorder) and "microsoft/DirectML#372" in report(recorder)
    with pytest.raises(AssertionError, match="aten::multinomial"):
        assert_no_fallback(recorder)


def test_fallback_list_is_one_source_with_its_reports():
    assert fallback_ops_in(["aten.multinomial.default", "aten.mm.default", "repeat_interleave", "exponential_"]) == [
        "aten.multinomial.default", "repeat_interleave"]
    for op, source in CPU_FALLBACK_OPS.items():
        assert op.startswith("aten::") and "microsoft/DirectML#" in source
    assert "exponential" not in FALLBACK_PACKETS  # the exponential race is the replacement for multinomial
