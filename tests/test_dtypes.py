"""The automatic dtype (checkpoint dtype where the device runs it, fp16 overflow check) and short model ids."""

from __future__ import annotations

import torch

from engine.devices import DeviceInfo
from engine.dtypes import auto_dtype, checkpoint_dtype, fp16_overflow
from engine.loader import load_model, model_id
from tests.tiny import tiny_llama, tiny_tokenizer

CPU = DeviceInfo("cpu", torch.device("cpu"), "test cpu", "test")
GPU = DeviceInfo("cuda", torch.device("cpu"), "test gpu", "test")  # kind drives the choice; no GPU needed


def _config(dtype):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, dtype=dtype)


def test_auto_dtype_follows_the_checkpoint_where_the_device_can():
    assert checkpoint_dtype(_config("bfloat16")) == torch.bfloat16
    assert auto_dtype(_config("bfloat16"), CPU) == (torch.float32, False)  # CPU: always float32
    assert auto_dtype(_config("bfloat16"), GPU, bf16_ok=True) == (torch.bfloat16, False)
    assert auto_dtype(_config("bfloat16"), GPU, bf16_ok=False) == (torch.float16, True)  # fp16, checked
    assert auto_dtype(_config("float16"), GPU, bf16_ok=False) == (torch.float16, False)  # trained in fp16
    assert auto_dtype(_config("float32"), GPU, bf16_ok=True) == (torch.bfloat16, False)


def test_fp16_overflow_check_finds_overflowing_weights_and_activations():
    tok = tiny_tokenizer()
    healthy = tiny_llama(len(tok), layers=1).to(torch.float16)
    assert fp16_overflow(healthy, len(tok)) is None
    saturated = tiny_llama(len(tok), layers=1).to(torch.bfloat16)
    with torch.no_grad():  # a bf16 weight beyond fp16's range becomes inf on conversion
        saturated.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6
    assert "weight" in fp16_overflow(saturated.to(torch.float16), len(tok))
    loud = tiny_llama(len(tok), layers=1).to(torch.float16)
    with torch.no_grad():  # finite weights whose product leaves fp16's range
        loud.model.layers[0].mlp.down_proj.weight.fill_(600.0)
        loud.model.layers[0].mlp.up_proj.weight.fill_(600.0)
    assert "activations" in fp16_overflow(loud, len(tok))


def test_model_id_is_the_hub_id_or_folder_name_never_a_path(tmp_path):
    assert model_id("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    folder = tmp_path / "home" / "alice" / "models" / "my-model"
    folder.mkdir(parents=True)
    assert model_id(str(folder)) == "my-model"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert model_id(str(snapshot)) == "Qwen/Qwen2.5-0.5B"


def test_loaded_model_carries_its_short_id_and_dtype(tmp_path):
    tok = tiny_tokenizer()
    tiny_llama(len(tok), layers=1).save_pretrained(tmp_path / "tiny-saved")
    tok.save_pretrained(tmp_path / "tiny-saved")
    loaded = load_model(str(tmp_path / "tiny-saved"), CPU)
    assert loaded.name == "tiny-saved" and loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_auto_fp16_that_overflows_is_reloaded_in_float32(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=1).to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6
    model.save_pretrained(tmp_path / "bf16-model")
    tok.save_pretrained(tmp_path / "bf16-model")
    # a "GPU" without bf16 (no CUDA here): auto picks fp16, the check sees the overflow, float32 it is
    loaded = load_model(str(tmp_path / "bf16-model"), GPU)
    assert loaded.dtype == torch.float32 and next(loaded.model.parameters()).dtype == torch.float32
