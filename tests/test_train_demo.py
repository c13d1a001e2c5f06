"""Smoke test of resources/models/train_demo.py: the whole pipeline on a tiny config, on CPU.

Trains the tokenizer, a tiny target and draft for a few steps on a slice of the corpus, saves
both Hugging Face folders, runs the built-in evaluation, and checks that the folders load with
AutoModelForCausalLM / AutoTokenizer and generate. Skips when the corpus is absent.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "resources" / "models" / "train_demo.py"
CORPUS = REPO.parent / "shared" / "data" / "corpus"

pytestmark = [
    pytest.mark.slow,  # trains a tiny pair (~10 s on 2 cores)
    pytest.mark.skipif(not (CORPUS / "tinystories_valid.txt").exists(), reason=f"demo corpus not found at {CORPUS}"),
]


def _load_script():
    spec = importlib.util.spec_from_file_location("helix_train_demo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    mod = _load_script()
    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    summary = mod.main(["--preset", "tiny", "--corpus", str(CORPUS), "--out", str(out), "--device", "cpu"])
    return mod, out, summary, time.time() - t0


def test_pipeline_writes_complete_hf_folders(tiny_run):
    mod, out, summary, seconds = tiny_run
    for name in ("demo-target", "demo-draft"):
        d = out / name
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{name}/{f} missing"
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == mod.EOS_ID
    tcfg = json.loads((out / "demo-target" / "config.json").read_text())
    dcfg = json.loads((out / "demo-draft" / "config.json").read_text())
    assert tcfg["num_hidden_layers"] > dcfg["num_hidden_layers"]
    assert tcfg["vocab_size"] == dcfg["vocab_size"]
    assert tcfg["tie_word_embeddings"] and dcfg["tie_word_embeddings"]
    res = json.loads((out / "demo_results.json").read_text())
    acc = res["eval"]["greedy_speculative"]
    assert 0.0 <= acc["acceptance_rate"] <= 1.0
    assert len(acc["per_position"]) == acc["k"] == 4
    assert 1.0 <= acc["mean_acceptance_length"] <= 5.0
    assert res["eval"]["target"]["heldout_loss"] > 0


def test_saved_folders_load_and_generate(tiny_run):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mod, out, _, _ = tiny_run
    for name in ("demo-target", "demo-draft"):
        d = out / name
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.eos_token == "<|endoftext|>" and tok.bos_token and tok.unk_token and tok.pad_token
        assert tok.model_max_length == json.loads((d / "config.json").read_text())["max_position_embeddings"]
        text = 'Once upon a time, there was a cat.\n"Hi!" said Tom.'
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level round trip
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        enc = tok(["Once upon a time", "Tom had a red ball. He"], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
        prompt_len = enc["input_ids"].shape[1]
        assert gen.shape[0] == 2 and prompt_len < gen.shape[1] <= prompt_len + 8  # shorter only if both hit EOS
        assert torch.equal(gen[:, :prompt_len], enc["input_ids"])
        continuation = tok.decode(gen[0, prompt_len:], skip_special_tokens=True)
        assert continuation.strip(), f"{name} generated nothing visible after 'Once upon a time'"


def test_eval_only_mode_reuses_saved_folders(tiny_run, tmp_path):
    mod, out, _, _ = tiny_run
    res_path = tmp_path / "eval.json"
    summary = mod.main(
        ["--preset", "tiny", "--corpus", str(CORPUS), "--out", str(out), "--device", "cpu",
         "--eval-only", "--results", str(res_path)]
    )
    assert res_path.is_file()
    assert summary["eval"]["greedy_speculative"]["prompts"] == 3


def test_opening_and_draft_init():
    mod = _load_script()
    story = "Once upon a time, there was a dog. He liked to run. One day he ran far.\nThe end."
    assert mod.opening(story) == "Once upon a time, there was a dog."
    assert mod.opening("Tom ran. He fell. Then he cried.") == "Tom ran. He fell."
    assert mod.eval_story_indices(800, 50)[:2] == [8, 24]


def test_cpu_step_timer_runs(tiny_run):
    mod, out, _, _ = tiny_run
    import torch

    _, target, draft = mod.load_pair(out / "demo-target", out / "demo-draft", torch.device("cpu"))
    t = mod.cpu_step_times(target, draft, ctx_len=8, reps=3)
    assert t["target_1_ms"] > 0 and t["draft_1_ms"] > 0 and t["ratio_draft_over_target"] > 0
    assert set(t["draft_depth_variants_1_ms"]) == {"1", "2", "3"}
