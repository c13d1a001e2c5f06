"""An EAGLE-3 head's configuration, read from and written to the published HF folder format.

Two layouts exist (both read here):
- EAGLE's own (SafeAILab/EAGLE, the heads under yuhuili/*, AngelSlim, SpecForge): a Llama config at the top
  level with ``architectures: ["LlamaForCausalLMEagle3"]``, ``num_hidden_layers: 1``, ``draft_vocab_size`` and
  optionally ``target_hidden_size`` and ``eagle_config.eagle_aux_hidden_state_layer_ids``.
- vLLM speculators' (RedHatAI/*): ``speculators_model_type: "eagle3"``, the layer's Llama config nested under
  ``transformer_layer_config`` and ``eagle_aux_hidden_state_layer_ids`` / ``norm_before_residual`` at the top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, mid and high target layers: the inputs of layers 2, L // 2 and L - 3 (vLLM and EAGLE
    index an aux state by the layer it enters; 0 is the embedding output). Clamped into 0..L-1 for the tiny
    targets of tests (fewer than 5 layers), keeping the order low <= mid <= high."""
    if num_layers < 1:
        raise ValueError("the target has no layers")
    low, mid, high = 2, num_layers // 2, num_layers - 3
    top = num_layers - 1
    low, high = min(max(low, 0), top), min(max(high, 0), top)
    ids = sorted((low, min(mid, top), high))
    return ids[0], ids[1], ids[2]


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (t2d's length)
    draft_vocab_size: int  # the head's own output vocabulary (lm_head rows, d2t's length)
    target_hidden_size: int  # fc reads 3 * target_hidden_size
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    aux_layer_ids: tuple[int, ...] | None = None  # None: default_aux_layers(target layers)
    norm_before_residual: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}, hash=False)
    extra: dict = field(default_factory=dict, hash=False, compare=False)  # other config.json keys, kept on save

    @classmethod
    def from_dict(cls, raw: dict) -> EagleConfig:
        """From a config.json dict; raises ValueError naming what is missing or unsupported."""
        nested = raw.get("transformer_layer_config")
        layer = nested if isinstance(nested, dict) else raw
        archs = raw.get("architectures") or []
        if nested is None and EAGLE3_ARCHITECTURE not in archs and raw.get("speculators_model_type") != "eagle3":
            raise ValueError(f"not an EAGLE-3 head: architectures {archs or 'missing'} (expected "
                             f"{EAGLE3_ARCHITECTURE!r} or a speculators 'eagle3' config)")
        if nested is not None and raw.get("speculators_model_type", "eagle3") != "eagle3":
            raise ValueError(f"speculators model type {raw.get('speculators_model_type')!r} is not eagle3")
        if layer.get("model_type", "llama") != "llama" or layer.get("hidden_act", "silu") != "silu":
            raise ValueError("the head's layer must be a Llama layer with silu (got model_type "
                             f"{layer.get('model_type')!r}, hidden_act {layer.get('hidden_act')!r})")
        if int(layer.get("num_hidden_layers", 1)) != 1:
            raise ValueError(f"EAGLE-3 heads have one decoder layer; this config has {layer['num_hidden_layers']}")
        for flag in ("norm_before_fc", "fc_norm"):
            if raw.get(flag):
                raise ValueError(f"{flag}: true is a variant Helix does not implement")
        eagle = raw.get("eagle_config") or {}
        if eagle.get("use_aux_hidden_state") is False:
            raise ValueError("eagle_config.use_aux_hidden_state is false (an EAGLE-1/2 style head); "
                             "Helix needs EAGLE-3")
        required = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        missing = [k for k in required if k not in layer]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        hidden, heads = int(layer["hidden_size"]), int(layer["num_attention_heads"])
        aux = raw.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
        rope = dict(layer.get("rope_parameters") or layer.get("rope_scaling") or {})
        if "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type", "default")
        rope.setdefault("rope_theta", float(layer.get("rope_theta", 10000.0)))
        known = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "vocab_size", "draft_vocab_size", "target_hidden_size", "rms_norm_eps", "max_position_embeddings",
                 "eagle_aux_hidden_state_layer_ids", "norm_before_residual", "attention_bias", "mlp_bias",
                 "rope_parameters", "rope_scaling", "rope_theta"}
        return cls(
            hidden_size=hidden,
            intermediate_size=int(layer["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(layer.get("num_key_value_heads") or heads),
            head_dim=int(layer.get("head_dim") or hidden // heads),
            vocab_size=int(layer["vocab_size"]),
            draft_vocab_size=int(raw.get("draft_vocab_size") or layer.get("draft_vocab_size") or layer["vocab_size"]),
            target_hidden_size=int(raw.get("target_hidden_size") or layer.get("target_hidden_size") or hidden),
            rms_norm_eps=float(layer.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(layer.get("max_position_embeddings", 2048)),
            aux_layer_ids=tuple(int(i) for i in aux) if aux else None,
            # EAGLE's own heads normalise after taking the residual; speculators' default is before
            norm_before_residual=bool(raw.get("norm_before_residual", nested is not None)),
            attention_bias=bool(layer.get("attention_bias", False)),
            mlp_bias=bool(layer.get("mlp_bias", False)),
            rope=rope,
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_dict(self) -> dict:
        """config.json in EAGLE's own layout (what vLLM, SGLang and EAGLE load)."""
        out = {k: v for k, v in self.extra.items() if k not in ("transformer_layer_config", "speculators_config",
                                                                 "speculators_model_type", "eagle_config")}
        out.update({
            "architectures": [EAGLE3_ARCHITECTURE],
            "model_type": "llama",
            "hidden_act": "silu",
            "num_hidden_layers": 1,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "norm_before_residual": self.norm_before_residual,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "rope_theta": self.rope.get("rope_theta", 10000.0),
            "rope_scaling": None if self.rope.get("rope_type", "default") == "default" else dict(self.rope),
            "tie_word_embeddings": False,
        })
        if self.aux_layer_ids is not None:
            out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                                   "use_aux_hidden_state": True}
        return out

    @classmethod
    def for_target(cls, target_config, draft_vocab_size: int | None = None, intermediate_size: int | None = None,
                   aux_layer_ids: tuple[int, ...] | None = None) -> EagleConfig:
        """A head shaped for ``target_config`` (a transformers config): its hidden size, heads, rope and
        vocabulary; the layer's width defaults to the target's."""
        cfg = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        heads = cfg.num_attention_heads
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", float(getattr(cfg, "rope_theta", 10000.0)))
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=intermediate_size or cfg.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab_size=cfg.vocab_size,
            draft_vocab_size=draft_vocab_size or cfg.vocab_size,
            target_hidden_size=cfg.hidden_size,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            aux_layer_ids=tuple(aux_layer_ids or default_aux_layers(cfg.num_hidden_layers)),
            rope=rope,
        )

    def layer_ids_for(self, num_target_layers: int) -> tuple[int, ...]:
        """The target layers whose inputs this head fuses; ValueError when they do not exist."""
        ids = self.aux_layer_ids or default_aux_layers(num_target_layers)
        if len(ids) != 3 or any(not 0 <= i < num_target_layers for i in ids):
            raise ValueError(f"the head reads target layers {list(ids)}, but the target has {num_target_layers} "
                             "layers (three ids in 0..layers-1 expected)")
        return tuple(ids)
