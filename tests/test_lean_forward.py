"""The lean Llama-family forward gives transformers' logits (fp32, within 1e-4) on the paged cache:
every supported family, GQA, rope scalings (LongRoPE on both sides of its switch), a partial rotary factor, ragged
batches, shared prefixes and rollback."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from engine.block_manager import BlockManager
from engine.kv_pool import KVPool, KVShape
from engine.model_runner import ModelRunner, RowInput
from engine.models import lean_model_for, packed

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
TOL = 1e-4
PHI_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi3Config's defaults lie past VOCAB

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama-mha-tied": lambda: LlamaConfig(**{**COMMON, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "llama-bias": lambda: LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
    "llama3-rope": lambda: LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear-rope": lambda: LlamaConfig(**COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                  "factor": 2.0}),
    "yarn-rope": lambda: Qwen2Config(**COMMON, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                "factor": 4.0, "original_max_position_embeddings": 128}),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=4096),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32),
    "phi3": lambda: Phi3Config(**COMMON, **PHI_IDS),
    # Phi-3.5 / Phi-4-mini: LongRoPE (short table below the pretraining context) and Phi-4-mini's partial rotary
    "phi3-longrope-partial": lambda: _phi3_longrope(256),
    "smollm3": lambda: SmolLM3Config(**COMMON, no_rope_layer_interval=2, **PHI_IDS),  # layer 1 without rope
    # sliding windows shorter than the rows below (up to ~100 tokens): every layer (Mistral 7B v0.1), some (Qwen2
    # past max_window_layers)
    "mistral-window": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen2-window": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "gemma-exact-gelu": lambda: GemmaConfig(**COMMON, head_dim=16, hidden_act="gelu"),  # early Gemma configs
    # Gemma 2: scores and logits soft-capped (tanh; caps low enough here to bite), a window on every other layer
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=8, attn_logit_softcapping=2.0,
                                   final_logit_softcapping=3.0),
    # Gemma 3: sliding and full layers with a rope each (4B+: linear scaling on the full layers), q/k norms, the
    # norms around attention and MLP, tied embeddings scaled by sqrt(hidden)
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                       layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "gemma3-4b-rope": lambda: Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


def _phi3_longrope(original_max: int) -> Phi3Config:
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,  # 12 of 16 head dims
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]}
    # transformers 5.13 reads the partial factor from the config itself, later ones from the rope parameters
    return Phi3Config(**COMMON, **PHI_IDS, original_max_position_embeddings=original_max, rope_parameters=rope,
                      partial_rotary_factor=0.75)


def _make_model(name: str):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    attn = "eager" if cfg.model_type == "gemma2" else "sdpa"  # transformers has no SDPA for Gemma 2's soft-capping
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float().eval()
    with torch.no_grad():  # random init is nearly uniform; make the logits (and greedy choices) decisive
        for p in model.parameters():
            if p.dim() == 1 and (p.shape[0] != cfg.hidden_size or "gemma" in cfg.model_type):  # Gemma's norms: 1 + w
                p.normal_(0, 0.5)
        model.lm_head.weight.mul_(4.0)
        if cfg.model_type == "gemma2":  # scores large enough for the soft-cap to bite
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8.0)
                layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def _runner(model, lean: bool, blocks: int = 96, block_size: int = 16) -> ModelRunner:
    shape = KVShape.from_config(model.config)
    pool = KVPool(blocks, block_size, shape, torch.float32, torch.device("cpu"))
    return ModelRunner(model, pool, BlockManager(blocks, block_size), VOCAB, lean=lean)


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"{what} row {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{what} row {i}: max abs diff {diff:.2e} > {TOL}"


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_lean_logits_match_transformers_on_ragged_batches(arch):
    _check_ragged(arch)


@pytest.mark.parametrize("arch", ["llama", "llama-mha-tied", "llama-bias", "qwen3", "phi3-longrope-partial"])
def test_packed_cpu_gemms_match_transformers(arch, monkeypatch):
    """Every weight packed for oneDNN (the tiny models are below the size threshold otherwise): the
    multi-row GEMMs of prefill, verification rows and the head run packed and still match."""
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    monkeypatch.delenv("HELIX_PACKED_GEMM", raising=False)
    monkeypatch.setenv("HELIX_PACKED_SMALL_ROWS", "2")  # whatever this CPU prefers: the packed GEMMs are under test
    monkeypatch.setattr(packed, "_small_rows", None)
    monkeypatch.setattr(packed, "_small_table", None)
    used = []
    real = packed.linear
    monkeypatch.setattr(packed, "linear", lambda *a: used.append(a[0].shape[0]) or real(*a))
    lean = _check_ragged(arch)
    assert lean.lean.packing.startswith("packed"), lean.lean.packing
    assert lean.lean.lm_head_p is not None and all(layer.gate_up_p is not None for layer in lean.lean.layers)
    assert used and min(used) >= packed.small_min_rows()  # fewer rows over small weights stay on MKL


def test_small_weights_run_packed_from_the_row_count_measured_faster(monkeypatch):
    """Whether GEMMs of 2-3 rows over small weights run packed is measured once per process (MKL wins on some CPUs,
    oneDNN on others): from the first row count where packed takes under SMALL_WIN of MKL's time, else from
    SMALL_MIN_ROWS; the measurement is kept, and HELIX_PACKED_SMALL_ROWS sets it instead."""
    monkeypatch.delenv("HELIX_PACKED_SMALL_ROWS", raising=False)
    monkeypatch.setattr(packed, "_small_table", None)  # an engine's warm-up earlier in this process decides otherwise
    w = torch.randn(64, 96)  # [in, out], as the CPU keeps weights
    pairs = [(w, packed.pack(w, True))]
    calls = []

    def timer_where(packed_wins_from: int, tie: bool = False):
        def timer(fn) -> float:
            rows = fn.__defaults__[0][0].shape[0]
            calls.append((fn.__name__, rows))
            fn()  # the real GEMMs run: the closures must work on these weights
            if fn.__name__ == "mkl":
                return 1.0
            return 0.97 if tie else (0.5 if rows >= packed_wins_from else 1.5)
        return timer

    for wins_from, want in ((2, 2), (3, 3), (4, packed.SMALL_MIN_ROWS)):
        monkeypatch.setattr(packed, "_small_rows", None)
        assert packed.calibrate_small_rows(pairs, True, timer_where(wins_from)) == want
        assert packed.small_min_rows() == want and packed.use_packed(want, w) and not packed.use_packed(want - 1, w)
    monkeypatch.setattr(packed, "_small_rows", None)
    assert packed.calibrate_small_rows(pairs, True, timer_where(2, tie=True)) == packed.SMALL_MIN_ROWS  # a tie: MKL
    assert {name for name, _ in calls} == {"mkl", "onednn"} and {rows for _, rows in calls} == {2, 3}
    calls.clear()
    assert packed.calibrate_small_rows(pairs, True, timer_where(2)) == packed.SMALL_MIN_ROWS and not calls  # kept
    monkeypatch.setenv("HELIX_PACKED_SMALL_ROWS", "3")
    assert packed.calibrate_small_rows(pairs, True) == 3 and packed.use_packed(3, w) and not packed.use_packed(2, w)
    monkeypatch.setenv("HELIX_PACKED_SMALL_ROWS", "three")
    with pytest.raises(ValueError, match="HELIX_PACKED_SMALL_ROWS"):
        packed.calibrate_small_rows(pairs, True)
    monkeypatch.delenv("HELIX_PACKED_SMALL_ROWS")
    monkeypatch.setattr(packed, "_small_rows", None)
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    why = _runner(_make_model("llama"), True).lean.packing  # a real measurement, on this machine
    assert "small weights packed from" in why and "MKL" in why and "packed" in why, why


def test_small_weights_run_packed_at_the_token_counts_whose_forwards_ran_faster(monkeypatch):
    """The warm-up times the target's own forwards at each token count of ROW_PROBES with every small weight's GEMM
    packed and with none (a loop over the weights alone timed them within 5% on an Intel Xeon where the forward of
    4-8 tokens ran 30% slower packed): packed where it took under SMALL_WIN of MKL's time, a probe standing for the
    counts up to the next, once per process; big weights stay packed from MIN_ROWS."""
    monkeypatch.delenv("HELIX_PACKED_SMALL_ROWS", raising=False)
    monkeypatch.setattr(packed, "_have_small", True)
    monkeypatch.setattr(packed, "_small_table", None)
    small, big = torch.zeros(64, 96), torch.zeros(1 << 11, 1 << 11)  # 16 KiB and 16 MiB of fp32
    ran = []

    def timer_where(wins_from: int, tie: bool = False):
        def timer(fn) -> float:
            fn()
            tokens = ran[-1]
            if not packed._force_small:
                return 1.0
            return 0.97 if tie else (0.5 if tokens >= wins_from else 1.5)
        return timer

    table = packed.calibrate_by_forward(ran.append, timer_where(9))
    assert table == {p: p >= 9 for p in packed.ROW_PROBES} and set(ran) == set(packed.ROW_PROBES)
    assert packed._force_small is None and "9+" in packed.packing_note()
    assert [packed.use_packed(n, small) for n in (1, 2, 5, 8, 9, 16, 40)] == [False] * 4 + [True] * 3
    assert packed.use_packed(2, big) and not packed.use_packed(1, big)
    assert packed.calibrate_by_forward(ran.append, timer_where(2)) is None  # decided once per process
    monkeypatch.setattr(packed, "_small_table", None)
    assert not any(packed.calibrate_by_forward(ran.append, timer_where(2, tie=True)).values())  # a tie: MKL
    monkeypatch.setattr(packed, "_small_table", None)
    ran.clear()
    table = packed.calibrate_by_forward(ran.append, timer_where(5), max_tokens=10)  # a sequence with room for 10
    assert max(ran) == 9 and table[17] and table[33] and not table[3]
    monkeypatch.setattr(packed, "_small_table", None)
    monkeypatch.setenv("HELIX_PACKED_SMALL_ROWS", "3")
    assert packed.calibrate_by_forward(ran.append, timer_where(2)) is None  # the environment decides
    monkeypatch.delenv("HELIX_PACKED_SMALL_ROWS")
    monkeypatch.setattr(packed, "_have_small", False)
    assert packed.calibrate_by_forward(ran.append, timer_where(2)) is None  # nothing packed small in this process


def test_the_warm_up_decides_packing_from_the_models_own_forwards(monkeypatch):
    """A real measurement, on this machine: the warm-up's forwards over its own sequence, rolled back after each."""
    from engine.warmup import _calibrate_cpu_gemms

    monkeypatch.delenv("HELIX_PACKED_SMALL_ROWS", raising=False)
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(packed, "_small_table", None)
    runner = _runner(_make_model("llama"), True)
    assert packed._have_small
    ids = list(range(1, 21))
    runner.forward([RowInput(-1, ids)])
    _calibrate_cpu_gemms(runner, -1, ids)
    assert set(packed._small_table) == set(packed.ROW_PROBES) and "forwards" in packed.packing_note()
    assert runner.cached_len(-1) == len(ids)


def test_packing_is_skipped_with_a_reason(monkeypatch):
    model = _make_model("llama")
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    monkeypatch.setenv("HELIX_PACKED_GEMM", "0")
    assert _runner(model, True).lean.packing == "HELIX_PACKED_GEMM=0"
    monkeypatch.delenv("HELIX_PACKED_GEMM")
    monkeypatch.setattr(packed, "MAX_RAM_FRACTION", 1e-12)
    why = _runner(model, True).lean.packing
    assert "of RAM" in why and "HELIX_PACKED_GEMM=1" in why
    monkeypatch.setenv("HELIX_PACKED_GEMM", "1")  # forced: the RAM limit does not apply
    assert _runner(model, True).lean.packing.startswith("packed")

    def missing():
        raise AttributeError("no such op")

    monkeypatch.setattr(packed, "_ops", missing)  # e.g. a torch build without oneDNN's linear
    runner = _runner(model, True)
    assert "unavailable" in runner.lean.packing and runner.lean.lm_head_p is None
    rows = [RowInput(0, list(range(3, 20)), 3)]
    _assert_close(runner.forward(rows), _runner(model, False).forward(rows), "unpacked fallback")


def _check_ragged(arch: str) -> ModelRunner:
    model = _make_model(arch)
    lean, ref = _runner(model, True), _runner(model, False)
    assert lean.forward_path == "lean" and ref.forward_path == "transformers"
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (37, 3, 18)]
    rows = [RowInput(i, p, 2) for i, p in enumerate(prompts)]
    _assert_close(lean.forward(rows), ref.forward(rows), f"{arch} prefill")
    for step in range(40):  # ragged decode / verification rows, with a rollback half-way
        rows = [RowInput(i, torch.randint(3, VOCAB, (1 + (i + step) % 4,), generator=gen).tolist(), 1 + (i + step) % 4)
                for i in range(3)]
        _assert_close(lean.forward(rows), ref.forward(rows), f"{arch} step {step}")
        if step == 20:
            for r in (lean, ref):
                r.truncate(1, r.cached_len(1) - 6)
                r.truncate(2, r.cached_len(2) - 17)  # crosses a block boundary
    for r in (lean, ref):
        for i in range(3):
            r.free(i)
        r.blocks.check_invariants()
        assert r.blocks.num_free == r.blocks.num_blocks
    return lean


def test_lean_single_row_decode_matches_transformers_over_long_context():
    """Batch-1 decode takes the maskless path; it must agree past several blocks."""
    model = _make_model("qwen3")
    lean, ref = _runner(model, True), _runner(model, False)
    seq = list(range(5, 45))
    out_l, out_r = lean.forward([RowInput(0, seq, 1)]), ref.forward([RowInput(0, seq, 1)])
    for _ in range(120):
        _assert_close(out_l, out_r, "decode")
        tok = int(out_r[0][-1].argmax())
        out_l, out_r = lean.forward([RowInput(0, [tok], 1)]), ref.forward([RowInput(0, [tok], 1)])


def test_longrope_switches_tables_per_position_as_token_at_a_time_decoding_does():
    """A LongRoPE model (Phi-3.5, Phi-4-mini) rotates positions past its pretraining context with its long table:
    forwards of 1-3 tokens across that switch (verifications) give the logits transformers gives decoding the same
    tokens one at a time, so how tokens are split into forwards, or batched, never changes the keys written; the
    long table is really used (a forward of several tokens past the switch in transformers' own path, which picks
    one table per forward, differs at the positions before it)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_phi3_longrope(24), attn_implementation="sdpa").float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    lean, ref = _runner(model, True), _runner(model, False)
    assert lean.forward_path == "lean" and lean.lean.rot_dim == 12 and lean.lean.original_max == 24
    gen = torch.Generator().manual_seed(5)
    seq = torch.randint(3, VOCAB, (20,), generator=gen).tolist()
    _assert_close(lean.forward([RowInput(0, seq, 1)]), ref.forward([RowInput(0, seq, 1)]), "prompt")
    for step in range(12):  # positions 20 .. ~45
        n = 1 + step % 3
        toks = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        got = lean.forward([RowInput(0, toks, n)])[0]
        want = torch.cat([ref.forward([RowInput(0, [t], 1)])[0] for t in toks])
        _assert_close([got], [want], f"longrope step {step} ({n} tokens from position {lean.cached_len(0) - n})")
    assert lean.cached_len(0) > 24 + 8
    # a short row beside the long one keeps the short table: its logits alone
    short = torch.randint(3, VOCAB, (6,), generator=gen).tolist()
    alone = ref.forward([RowInput(1, short, 1)])
    both = lean.forward([RowInput(0, [7], 1), RowInput(1, short, 1)])
    _assert_close(both[1:], alone, "short row beside a long one")
    # transformers' one-table-per-forward: a forward of 4 tokens from position 22 rotates 22-23 long there
    across = torch.randint(3, VOCAB, (4,), generator=gen).tolist()
    for r in (lean, ref):
        r.free(0)
        r.free(1)
        r.forward([RowInput(0, seq + seq[:2], 1)])  # 22 tokens: positions 0-21
    got, theirs = lean.forward([RowInput(0, across, 4)])[0], ref.forward([RowInput(0, across, 4)])[0]
    assert (got - theirs).abs().max() > 1e-3
    for r in (lean, ref):
        r.free(0)


def test_shared_prefix_copy_on_write_matches_transformers():
    """Two sequences share prompt blocks (prefix cache); the second diverges mid-block (copy-on-write)."""
    model = _make_model("llama")
    prompt = list(range(3, 43))  # 2.5 blocks
    results = {}
    for lean in (True, False):
        r = _runner(model, lean)
        r.blocks.allocate(0)
        r.forward([RowInput(0, prompt, 1)])
        r.blocks.register_prefix(0, prompt)
        r.blocks.allocate(1)
        cached = r.blocks.match_prefix(1, prompt + [9, 9])
        assert cached == 32  # two full blocks shared
        a = r.forward([RowInput(1, (prompt + [9, 9])[cached:], 3)])
        r.blocks.fork(0, 2)  # the partial third block is shared too: the next write copies it
        b = r.forward([RowInput(2, [7, 8], 2), RowInput(0, [6], 1)])
        results[lean] = a + b
        assert r.blocks.stats().shared >= 2
    _assert_close(results[True], results[False], "shared prefix")


def test_unsupported_families_fall_back_with_a_reason():
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    built, reason = lean_model_for(model)
    assert built is None and "gpt2" in reason
    assert _runner(model, None).forward_path == "transformers"
    with pytest.raises(ValueError, match="lean forward cannot run"):
        _runner(model, True)


def test_demo_pair_runs_lean_and_matches_transformers():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "resources" / "models" / "demo-target"
    if not (path / "model.safetensors").exists():
        pytest.skip("demo models not present")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lean, ref = _runner(model, True), _runner(model, False)
    rows = [RowInput(0, list(range(10, 70)), 4), RowInput(1, list(range(100, 105)), 1)]
    _assert_close(lean.forward(rows), ref.forward(rows), "demo prefill")
    rows = [RowInput(0, [11, 12, 13, 14, 15], 5), RowInput(1, [17], 1)]
    _assert_close(lean.forward(rows), ref.forward(rows), "demo verify")


def test_a_lone_row_in_consecutive_blocks_is_read_in_place():
    """A batch-1 row whose blocks are consecutive in the pool attends over a view of it (no gather); one whose blocks
    are not (two sequences grown in turn) gathers. Both give transformers' logits, also after a rollback."""
    model = _make_model("llama")
    lean, ref = _runner(model, True), _runner(model, False)
    bs = lean.blocks.block_size
    gen = torch.Generator().manual_seed(3)
    chunks = [torch.randint(3, VOCAB, (bs,), generator=gen).tolist() for _ in range(6)]
    for r in (lean, ref):  # interleave: 0 and 1 take turns at the free list, so neither is consecutive
        for i, chunk in enumerate(chunks):
            r.forward([RowInput(i % 2, chunk, 1)])
        r.free(0)
    assert lean.blocks.tables[1].blocks[:2] != list(range(lean.blocks.tables[1].blocks[0], 2))
    for sid in (1, 2):  # 1: gathered; 2: a new sequence grows as one run of blocks
        out = [r.forward([RowInput(sid, list(range(5, 25)), 1)]) for r in (lean, ref)]
        for step in range(40):
            _assert_close(out[0], out[1], f"seq {sid} step {step}")
            tok = int(out[1][0][-1].argmax())
            out = [r.forward([RowInput(sid, [tok] * (1 + step % 3), 1 + step % 3)]) for r in (lean, ref)]
            if step % 7 == 6:
                for r in (lean, ref):
                    r.truncate(sid, r.cached_len(sid) - 5)
        n = lean.cached_len(sid)
        assert (lean.tables.run_slot(sid, n, bs) is None) == (sid == 1), (sid, lean.blocks.tables[sid].blocks)


def test_rotate_is_hf_rotary_embedding():
    """``rotate`` with the signed sine table is HF's apply_rotary_pos_emb (half-split layout), to fp32 rounding."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from engine.models.llama import rotate, signed_sin

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 64, generator=gen), torch.randn(2, 2, 5, 64, generator=gen)  # [B, H, N, D]
    ang = torch.rand(2, 5, 64, generator=gen) * 6.0
    cos, sin = ang.cos(), ang.sin()
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)  # cos/sin [B, N, D], unsqueezed at dim 1
    got_q = rotate(q, cos[:, None], signed_sin(sin)[:, None])
    got_k = rotate(k, cos[:, None], signed_sin(sin)[:, None])
    assert (got_q - want_q).abs().max() < 1e-5 and (got_k - want_k).abs().max() < 1e-5
    assert (rotate(q, cos[:, None], sin[:, None]) - want_q).abs().max() > 0.1  # the unsigned table is wrong


def test_cudnn_attention_switch_sets_and_restores_the_process_setting():
    """Eager CUDA forwards run without cuDNN's SDPA and graphs of long key buckets with it (engine.attention); the
    switch restores what it found, also on an error, and leaves CPU forwards alone."""
    from engine import attention

    if not attention._HAS_CUDNN_SWITCH:
        pytest.skip("this torch has no cuDNN SDPA switch")
    be = torch.backends.cuda
    start = be.cudnn_sdp_enabled()
    with attention.eager_attention(torch.device("cpu")):
        assert be.cudnn_sdp_enabled() == start
    with attention.cudnn_attention(False):
        assert not be.cudnn_sdp_enabled()
        with attention.cudnn_attention(True):  # a capture inside an eager forward (lazy graphs)
            assert be.cudnn_sdp_enabled() == attention._CUDNN_ALLOWED
        assert not be.cudnn_sdp_enabled()
    assert be.cudnn_sdp_enabled() == start
    with pytest.raises(RuntimeError):
        with attention.eager_attention(torch.device("cuda")):
            assert not be.cudnn_sdp_enabled()
            raise RuntimeError("boom")
    assert be.cudnn_sdp_enabled() == start


def test_weights_changed_in_place_reach_the_packed_copies(monkeypatch):
    """The shape bench's acceptance knob scales weights in place; on the CPU the multi-row GEMMs read oneDNN-packed
    copies, which kept the old values: verification rows ran another model than one-row decode steps (a TinyLlama
    shape measured acceptance 0 at every ε, and greedy speculation left plain's output). ``refresh_packed``
    packs them again, and the knob calls it."""
    from engine.bench import shapes as sh

    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(packed, "_force_small", True)  # whatever this CPU prefers: the packed copies are under test
    model = _make_model("llama")
    want_runner, got_runner = _runner(model, False), _runner(model, True)
    assert got_runner.lean.packing.startswith("packed")
    knob = sh.AcceptanceKnob(model, 1)
    rows = [RowInput(0, list(range(1, 9)), 8)]  # 8 rows per GEMM: the packed path

    def check(what: str) -> None:
        for r in (want_runner, got_runner):
            r.free(0)
        _assert_close(got_runner.forward(rows), want_runner.forward(rows), what)

    check("before")
    knob.set(0.1)
    with pytest.raises(AssertionError):  # the stale copies: the bug this guards against
        check("stale packed copies")
    knob.on_change.append(got_runner.lean.refresh_packed)
    knob.set(0.05)
    check("after the knob, packed again")
    assert got_runner.lean.refresh_packed() == len(got_runner.lean._packed_slots) > 0


def test_a_forward_that_fails_after_syncing_its_tables_leaves_the_next_ones_right(monkeypatch):
    """A forward whose rows' block tables were synced (their changed entries queued for the device table) and that then
    fails rolls its rows back, and the next forwards, row 0 growing into the block the failed forward had taken (its
    table entry no later sync writes again) and both rows going back, give transformers' logits. Two failures: before
    the queued entries are written (the scatter raises, as a device OOM in the metadata copy would:
    ``DeviceBlockTables.pending`` keeps them until ``read`` has written them), and in the model's forward after."""
    model = _make_model("llama")
    lean, ref = _runner(model, True), _runner(model, False)
    for r in (lean, ref):
        r.forward([RowInput(0, list(range(3, 33)), 1), RowInput(1, list(range(50, 64)), 1)])
    grow = [RowInput(0, list(range(70, 80)), 1), RowInput(1, [80], 1)]  # row 0 into a new block, row 1 within its own
    for obj, name in ((lean.tables, "read"), (lean.lean, "forward")):
        real, calls = getattr(obj, name), []

        def fail_once(*a, real=real, calls=calls, **kw):
            if not calls:
                calls.append(1)
                raise RuntimeError("injected: out of memory")
            return real(*a, **kw)

        monkeypatch.setattr(obj, name, fail_once)
        with pytest.raises(RuntimeError, match="injected"):
            lean.forward(grow)
        assert lean.blocks.tables[0].num_tokens == 30 and lean.blocks.tables[1].num_tokens == 14, name  # rolled back
        # each step grows the rows again (row 0 takes back the block the failed forward had: its table entry is queued
        # or written, never synced again), then both go back
        for step in range(3):
            rows = [RowInput(0, [70 + step + i for i in range(10)], 1), RowInput(1, [40 + step], 1)]
            want = ref.forward(rows)
            _assert_close(lean.forward(rows), want, f"after a failed {name}, step {step}")
            for r in (lean, ref):
                r.truncate(0, 30)
                r.truncate(1, 14)


def test_sliding_layers_read_the_keys_of_their_window_only():
    """Past its window a sliding layer gathers window + N - 1 keys a row (every key any of the row's N queries can
    see), not the whole context: key ``lo + j`` of a row is visible to a query at ``q`` iff ``q - window < lo + j <= q``,
    and a padding query (before ``lo``) sees one key. The logits are checked against transformers above."""
    from engine.attention import AttnBatch

    lean = _runner(_make_model("gemma3"), True).lean  # a window of 8
    pos = torch.tensor([[100, 101, 102], [0, 40, 41]])  # the second row left-padded
    table = torch.arange(16).view(2, 8)  # row 0: blocks 0..7, row 1: blocks 8..15
    batch = lean.window_batch(AttnBatch(None, None, None, 103), table, pos, 16)
    assert batch.window_gather.tolist() == list(range(93, 103)) + [8 * 16 + p for p in range(32, 42)]
    m = batch.window_mask[:, 0]  # [B, N, 10]
    assert m[0, 0].tolist() == [True] * 8 + [False] * 2  # q = 100 sees 93..100
    assert m[0, 2].tolist() == [False] * 2 + [True] * 8  # q = 102 sees 95..102
    assert m[1, 0].tolist() == [True] + [False] * 9  # the padding query: one key
    assert m[1, 1].tolist() == [False] + [True] * 8 + [False]  # q = 40 sees 33..40 (32 is 8 back: hidden)
    short = lean.window_batch(AttnBatch(None, None, None, 8), table, pos[:, -1:].clamp(max=7), 16)
    assert short.window_gather is None and short.window_mask is None  # no key outside the window
