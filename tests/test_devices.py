"""Device detection: an AMD GPU on a ROCm torch (HIP) is found through torch.cuda and named with its runtime."""

from __future__ import annotations

import pytest
import torch

from engine import devices
from engine.errors import DeviceUnavailable


def _fake_gpu(monkeypatch, name: str, hip: str | None, cuda: str | None) -> None:
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(devices, "_directml", lambda: None)


def test_rocm_build_names_the_amd_gpu_and_its_runtime(monkeypatch):
    _fake_gpu(monkeypatch, "AMD Radeon RX 7900 XTX", hip="6.4.43483-a187df25c", cuda=None)
    info = devices.resolve_device("auto")
    assert info.kind == "cuda" and info.device == torch.device("cuda")  # ROCm answers through torch.cuda
    assert info.name == "AMD Radeon RX 7900 XTX (ROCm 6.4)" and "ROCm 6.4" in info.reason
    assert devices.gpu_runtime() == "ROCm 6.4"


def test_cuda_build_names_the_nvidia_gpu_and_its_runtime(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", hip=None, cuda="12.8")
    assert devices.resolve_device("cuda").name == "NVIDIA GeForce RTX 4090 (CUDA 12.8)"


def test_no_gpu_says_which_torch_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="ROCm build"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert devices.gpu_runtime() is None  # a CPU-only torch


def test_app_says_rocm_for_an_amd_gpu():
    from helix_desktop.status_bar import device_words

    amd = {"device": "cuda", "device_name": "AMD Radeon RX 7900 XTX (ROCm 6.4)"}
    assert device_words(amd) == "ROCm"
    assert device_words({"device": "cuda", "device_name": "NVIDIA GeForce RTX 4090 (CUDA 12.8)"}) == "CUDA"
    assert device_words({"device": "directml", "device_name": "AMD Radeon RX 6800"}) == "DirectML"
