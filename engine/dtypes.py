"""The automatic dtype: follow the checkpoint's dtype where the device can run it, check fp16 for overflow."""

from __future__ import annotations

import logging

import torch

from engine.devices import DeviceInfo

logger = logging.getLogger(__name__)

FP16_MAX = torch.finfo(torch.float16).max


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the model was saved in (``dtype``, or ``torch_dtype`` in older configs), if it says."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (cfg, config):
        value = getattr(source, "dtype", None) or getattr(source, "torch_dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value, None)
        if isinstance(value, torch.dtype):
            return value
    return None


def supports_bf16(device: DeviceInfo) -> bool:
    """Whether bfloat16 runs natively: CUDA compute capability 8+ (Ampere), MPS on macOS 14+; not DirectML."""
    if device.kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.kind == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device.device)
            return True
        except Exception:  # older macOS: "MPS BFloat16 is only supported on MacOS 14 or newer"
            return False
    return False


def auto_dtype(config, device: DeviceInfo, bf16_ok: bool | None = None) -> tuple[torch.dtype, bool]:
    """(dtype, whether fp16 must be checked for overflow) for ``config`` on ``device``.

    float32 on the CPU (fp16/bf16 matmuls are slow there). On a GPU an fp16 checkpoint runs in
    fp16; any other (bf16, fp32, unknown) runs in bf16 when the device supports it, else in fp16,
    whose range (±65504) bf16-trained activations can exceed, so the caller checks it.
    """
    if device.kind == "cpu":
        return torch.float32, False
    saved = checkpoint_dtype(config)
    if saved == torch.float16:
        return torch.float16, False
    if supports_bf16(device) if bf16_ok is None else bf16_ok:
        return torch.bfloat16, False
    return torch.float16, True


@torch.inference_mode()
def fp16_overflow(model: torch.nn.Module, vocab_size: int) -> str | None:
    """Why ``model`` (already in fp16) is unsafe in fp16, or None: non-finite or saturated weights,
    or a non-finite forward pass on a short probe sequence."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return f"weight {name} overflows float16"
    device = next(model.parameters()).device
    probe = torch.arange(1, 33, device=device).remainder(max(2, vocab_size - 1)).unsqueeze(0)  # [1, 32]
    out = model(input_ids=probe, output_hidden_states=True, use_cache=False)
    for i, hidden in enumerate(out.hidden_states):
        if not torch.isfinite(hidden).all():
            return f"activations overflow float16 at layer {i}"
    if not torch.isfinite(out.logits).all():
        return "logits overflow float16"
    return None
