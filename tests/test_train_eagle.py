"""resources/models/train_eagle.py: the EAGLE-3 head trainer.

Fast checks of its pieces (the loss's alignment with the head's unroll, the acceptance it reports, the data
mix), and one tiny training run on the committed demo target (a few steps on CPU: the held-out agreement
rises, the folder it writes loads in the engine and drafts, greedy output equals plain)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "resources" / "models" / "train_eagle.py"
TARGET = REPO / "resources" / "models" / "demo-target"
CORPUS = REPO.parent / "shared" / "data" / "corpus"


def _load_script():
    spec = importlib.util.spec_from_file_location("helix_train_eagle", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def te():
    return _load_script()


def _tiny_head(vocab: int = 16, draft_vocab: int | None = None):
    import torch

    from engine.eagle import EagleConfig, EagleHead

    cfg = EagleConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                      vocab_size=vocab, draft_vocab_size=draft_vocab or vocab, target_hidden_size=8,
                      aux_layer_ids=(0, 0, 0))
    head = EagleHead(cfg)
    if draft_vocab:
        head.set_vocab_map(torch.arange(draft_vocab) * 2)  # the even target ids
    return head


def test_loss_pairs_step_s_position_t_with_the_target_at_t_plus_s_plus_1(te):
    """A head whose step-s logits at t are the target's logits at t+s+1 agrees everywhere and its soft
    cross-entropy is the target's entropy; shifted by one position it does not agree."""
    import torch

    torch.manual_seed(0)
    head = _tiny_head()
    b, t, v, steps = 2, 9, 16, 3
    t_logits = torch.randn(b, t, v) * 3
    m = torch.ones(b, t)
    outs = [torch.cat([t_logits[:, s + 1:], torch.zeros(b, s + 1, v)], 1) for s in range(steps)]
    _, stats = te.ttt_loss(head, outs, t_logits, m, 0.8)
    for s, (loss, hit, cnt) in enumerate(stats):
        assert int(cnt) == b * (t - s - 1) and int(hit) == int(cnt)
        p = t_logits[:, s + 1:].softmax(-1)
        assert torch.isclose(loss, -(p * p.log()).sum(-1).mean(), atol=1e-5)
    shifted = [torch.cat([t_logits[:, s:], torch.zeros(b, s, v)], 1) for s in range(steps)]
    _, stats = te.ttt_loss(head, shifted, t_logits, m, 0.8)
    assert all(int(hit) < int(cnt) for _, hit, cnt in stats)


def test_loss_skips_masked_tokens_and_targets_outside_the_draft_vocabulary(te):
    import torch

    head = _tiny_head(vocab=16, draft_vocab=8)
    t_logits = torch.full((1, 5, 16), -10.0)
    t_logits[0, :, 3] = 10.0  # the target's argmax is the odd id 3, which the draft vocabulary lacks
    t_logits[0, 2, 3], t_logits[0, 2, 4] = -10.0, 10.0  # except at position 2: id 4 (draft id 2)
    m = torch.tensor([[1.0, 1, 1, 0, 1]])
    outs = [torch.zeros(1, 5, 8)]
    outs[0][0, 1, 2] = 5.0  # step 0 at position 1 is taught by the target at position 2
    _, ((_, hit, cnt),) = te.ttt_loss(head, outs, t_logits, m, 1.0)
    assert int(cnt) == 1 and int(hit) == 1
    m[0, 2] = 0  # the token there is not trained on (a prompt token of a conversation)
    _, ((_, hit, cnt),) = te.ttt_loss(head, outs, t_logits, m, 1.0)
    assert int(cnt) == 0


def test_acceptance_per_position_is_the_running_product(te):
    per_pos, expected = te.acceptance_from_steps([0.9, 0.8, 0.5, 0.5, 0.1], 4)
    assert per_pos == pytest.approx([0.9, 0.72, 0.36, 0.18])
    assert expected == pytest.approx(2.16)


def test_mix_is_checked(te):
    assert te.parse_mix("gen=0.7, stories=0.3") == {"gen": 0.7, "stories": 0.3}
    for bad in ("poems=1", "gen", "gen=-1", "gen=0"):
        with pytest.raises(ValueError):
            te.parse_mix(bad)


@pytest.mark.skipif(not (CORPUS / "tinystories_valid.txt").exists(), reason=f"corpus not found at {CORPUS}")
def test_tiny_run_learns_and_writes_a_head_the_engine_drafts_with(te, tmp_path):
    import torch
    from safetensors import safe_open

    from engine import EngineConfig, SamplingParams
    from engine.factory import build_engine

    out = tmp_path / "eagle"
    summary = te.main(["--preset", "tiny", "--device", "cpu", "--threads", "1", "--corpus", str(CORPUS),
                       "--target", str(TARGET), "--out", str(out), "--skip-eval"])
    hist = summary["training"]["history"]
    assert hist[-1]["step"] == 12 and hist[-1]["expected_accepted"] > hist[0]["expected_accepted"] + 0.1
    assert summary["training"]["heldout_agreement_per_step"][0] > 0.2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == cfg["vocab_size"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys if f.get_tensor(k).is_floating_point())
    assert "fc.weight" in keys and "lm_head.weight" in keys and not any(k.startswith("embed_tokens") for k in keys)
    assert summary["head_bytes"] == sum(p.stat().st_size for p in out.iterdir())

    engine = build_engine(EngineConfig(target=str(TARGET), draft=None, eagle=str(out), device="cpu",
                                       dtype="float32", num_threads=1, kv_cache_tokens=2048), warmup=False)
    prompt = "Once upon a time, there was a little cat named Tom."
    spec = engine.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0.0, num_draft_tokens=4,
                                                  draft_method="eagle"))
    plain = engine.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0.0, speculative=False))
    assert spec.token_ids == plain.token_ids
    assert spec.stats.num_drafts > 0


def test_bad_target_is_a_clear_error(te, tmp_path):
    with pytest.raises(SystemExit, match="no target model"):
        te.main(["--target", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])


@pytest.mark.skipif(not (CORPUS / "tinystories_valid.txt").exists(), reason=f"corpus not found at {CORPUS}")
def test_init_continues_a_head_on_a_mix_with_copy_data(te, tmp_path):
    from safetensors import safe_open

    init = TARGET.parent / "demo-eagle"
    if not (init / "config.json").is_file():
        pytest.skip("no demo-eagle head to continue")
    out = tmp_path / "eagle"
    summary = te.main(["--preset", "tiny", "--device", "cpu", "--threads", "1", "--corpus", str(CORPUS),
                       "--target", str(TARGET), "--out", str(out), "--skip-eval", "--init", str(init),
                       "--mix", "gen=0.5,copy=0.5", "--copy-docs", "50"])
    assert summary["data"]["tokens"]["copy"] > 0 and summary["data"]["weights"]["copy"] == 0.5
    with safe_open(str(init / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert a.get_tensor("d2t").equal(b.get_tensor("d2t"))  # the draft vocabulary is the init head's
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == 2048
