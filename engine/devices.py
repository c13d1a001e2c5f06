"""Device and dtype selection: DirectML, then CUDA or ROCm (AMD GPUs through torch.cuda), then MPS, then CPU."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.errors import DeviceUnavailable, InvalidRequest

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "directml", "mps")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # cpu | cuda (NVIDIA, or AMD through ROCm: torch.cuda either way) | directml | mps
    device: torch.device
    name: str
    reason: str


def to_device(data, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host list (indices, keys, settings) as a tensor on ``device``, copied without a stream sync: a blocking
    copy to a GPU waits for every kernel queued before it, and a sampled speculative step made ~10 of them between its
    launches (on an H200, 18 stream syncs a step at T = 0.8 against 8 greedy). Safe from pageable memory: the CUDA (and
    HIP) driver stages the data before the call returns. Other devices (DirectML, MPS) copy as they always did."""
    t = torch.tensor(data, dtype=dtype)
    return t if device is None else t.to(device, non_blocking=torch.device(device).type == "cuda")


def _directml() -> DeviceInfo | None:
    try:
        import torch_directml  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a DLL load failure on Windows
        logger.debug("torch_directml not usable: %s", exc)
        return None
    try:
        if torch_directml.device_count() < 1:
            return None
        dev = torch_directml.device()
        return DeviceInfo("directml", dev, torch_directml.device_name(0), "torch_directml reports a device")
    except Exception as exc:
        logger.warning("torch_directml imported but has no usable device: %s", exc)
        return None


def gpu_runtime() -> str | None:
    """The GPU runtime this torch was built for: ``"ROCm 6.4"`` (AMD, HIP), ``"CUDA 12.8"`` or None."""
    hip = getattr(torch.version, "hip", None)
    if hip:  # ROCm builds answer through torch.cuda, so torch.version.hip is the only way to tell them apart
        return f"ROCm {'.'.join(str(hip).split('.')[:2])}"
    return f"CUDA {torch.version.cuda}" if torch.version.cuda else None


def _cuda() -> DeviceInfo | None:
    """NVIDIA through CUDA, or AMD through ROCm/HIP (its GPUs appear as ``cuda`` devices); the name says which."""
    if not torch.cuda.is_available():
        return None
    runtime = gpu_runtime() or "CUDA"
    name = f"{torch.cuda.get_device_name(0)} ({runtime})"
    return DeviceInfo("cuda", torch.device("cuda"), name, f"torch.cuda.is_available() on {runtime}")


def _mps() -> DeviceInfo | None:
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return DeviceInfo("mps", torch.device("mps"), "Apple GPU", "torch.backends.mps.is_available()")
    return None


def _cpu() -> DeviceInfo:
    import platform

    return DeviceInfo("cpu", torch.device("cpu"), platform.processor() or platform.machine(), "no GPU backend found")


_PROBES = {"directml": _directml, "cuda": _cuda, "mps": _mps}


def resolve_device(name: str = "auto") -> DeviceInfo:
    """Pick a device. ``auto`` tries DirectML, CUDA, MPS, then CPU and logs the choice."""
    name = (name or "auto").lower()
    if name not in DEVICE_CHOICES:
        raise InvalidRequest(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "cpu":
        info = DeviceInfo("cpu", torch.device("cpu"), _cpu().name, "asked for")
    elif name == "auto":
        info = _cpu()
        for probe in (_directml, _cuda, _mps):
            found = probe()
            if found is not None:
                info = found
                break
    else:
        info = _PROBES[name]()
        if info is None:
            hint = {
                "directml": "install the directml extra on Windows: pip install helix-desktop[directml]",
                "cuda": "install a CUDA build of torch and an NVIDIA driver, or for AMD RDNA3/RDNA4 a ROCm build "
                        "of torch (README: Install on Windows)",
                "mps": "MPS needs Apple silicon with macOS 12.3+",
            }[name]
            raise DeviceUnavailable(f"device {name!r} is not available on this machine ({hint}); use --device auto or cpu")
    logger.info("device: %s (%s) - %s", info.kind, info.name, info.reason)
    return info


def resolve_dtype(dtype: str | None, device: DeviceInfo) -> torch.dtype:
    """float16 on GPUs and DirectML, float32 on CPU, unless overridden."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.kind == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise InvalidRequest(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
