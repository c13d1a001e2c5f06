"""Loading models and tokenizers (local folder or hub id) with errors a user can act on."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.devices import DeviceInfo
from engine.dtypes import auto_dtype, fp16_overflow
from engine.errors import ModelLoadError, TokenizerMismatch

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


@dataclass
class LoadedModel:
    name: str  # the short id (hub id or folder name) that the API and the UI show; never a local path
    model: torch.nn.Module
    tokenizer: object
    max_context: int
    dtype: torch.dtype = torch.float32


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("0", "", "false")


def _resolve_source(name: str) -> tuple[str, bool]:
    """Return (path or hub id, is_local). A path that looks local but is missing is an error."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model path '{name}' is a file; give the folder that holds config.json")
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"model folder '{name}' has no config.json; give a Hugging Face model folder "
                "(config.json, tokenizer files and *.safetensors)"
            )
        return str(p), True
    is_hub_id = (
        name.count("/") <= 1
        and "\\" not in name
        and not name.startswith((".", "/", "~"))
        and not (len(name) > 1 and name[1] == ":")
    )
    if not is_hub_id:
        raise ModelLoadError(f"model folder '{name}' does not exist; check the path")
    return name, False


def model_id(name: str) -> str:
    """The name to show for a model: its hub id, or for a local folder its folder name.

    A folder inside the Hugging Face cache (``models--Qwen--Qwen2.5-0.5B/snapshots/<rev>``) is
    named by its hub id. Local paths never leave the machine this way (they include the user's home).
    """
    path = Path(name).expanduser()
    if not path.exists():
        return name.strip().rstrip("/")  # a hub id
    parts = path.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return path.resolve().name


def max_context_of(config) -> int:
    """Longest sequence the paged cache serves correctly for this model: its position limit. A sliding-window
    model serves all of it: both forwards keep each sliding layer to its window as transformers' own code does (the
    lean forward by reading its window's keys only, ``LeanCausalLM.window_batch``; transformers' path by its masks,
    ``ModelRunner._sliding``)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return int(limit)


def load_model(
    name: str, device: DeviceInfo, dtype: torch.dtype | None = None, role: str = "target",
    progress: Progress | None = None, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
) -> LoadedModel:
    """Load tokenizer + causal LM; raise :class:`ModelLoadError` with the fix on failure.

    ``dtype`` None picks it from the checkpoint and the device (:func:`engine.dtypes.auto_dtype`);
    an fp16 choice for a checkpoint saved otherwise is checked, and reloaded in float32 if it overflows.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, local = _resolve_source(name)
    report = progress or (lambda stage, frac: None)
    kw = {"trust_remote_code": trust_remote_code}
    if not local and _is_offline():
        kw["local_files_only"] = True
    report(f"{role}: reading config", 0.0)
    try:
        config = AutoConfig.from_pretrained(source, **kw)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        if local:
            raise ModelLoadError(f"{role} model '{name}': config.json is unreadable ({exc})") from exc
        raise ModelLoadError(
            f"{role} model '{name}' is not a local folder and could not be fetched from the Hugging Face hub "
            f"or found in its local cache. Download it while online on the Models tab's Download panel or "
            f"with `hf download {name}`, or give a local folder."
        ) from exc
    _check_causal(config, role, name)
    report(f"{role}: loading tokenizer", 0.2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except Exception as exc:
        raise ModelLoadError(f"{role} model '{name}': tokenizer could not be loaded ({exc})") from exc
    check_fp16 = False
    if dtype is None:
        dtype, check_fp16 = auto_dtype(config, device)
    report(f"{role}: loading weights", 0.4)
    model = _load_weights(AutoModelForCausalLM, source, dtype, attn_implementation, kw, role, name, config)
    report(f"{role}: moving to {device.kind}", 0.8)
    model.to(device.device)
    model.eval().requires_grad_(False)  # served, never trained: no forward records a backward's saved tensors
    if check_fp16:
        problem = fp16_overflow(model, len(tokenizer))
        if problem is not None:
            logger.warning("%s model %s: %s; loading it in float32 instead", role, name, problem)
            report(f"{role}: float16 overflows, reloading in float32", 0.85)
            del model
            dtype = torch.float32
            model = _load_weights(AutoModelForCausalLM, source, dtype, attn_implementation, kw, role, name, config)
            model.to(device.device)
            model.eval().requires_grad_(False)
    report(f"{role}: ready", 1.0)
    logger.info("loaded %s model %s (%s, %s) on %s", role, name, config.model_type, dtype, device.kind)
    return LoadedModel(model_id(name), model, tokenizer, max_context_of(config), dtype)


def _load_weights(auto_cls, source: str, dtype: torch.dtype, attn_implementation: str, kw: dict, role: str,
                  name: str, config):
    try:
        try:
            return auto_cls.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation, **kw)
        except ValueError as exc:  # Gemma 2 (attention soft-capping) has no SDPA path in transformers: eager it is
            if attn_implementation != "sdpa" or "does not support an attention implementation" not in str(exc):
                raise
            logger.info("%s model '%s' (%s): no SDPA attention in transformers, loading with eager attention",
                        role, name, config.model_type)
            return auto_cls.from_pretrained(source, dtype=dtype, attn_implementation="eager", **kw)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "not a causal" in str(exc).lower():
            raise ModelLoadError(
                f"{role} model '{name}' ({config.model_type}) is not a causal language model; "
                "Helix needs a text-generation model (AutoModelForCausalLM)"
            ) from exc
        raise ModelLoadError(f"{role} model '{name}' could not be loaded: {exc}") from exc
    except Exception as exc:  # corrupt safetensors, missing shards, out of memory...
        raise ModelLoadError(f"{role} model '{name}' could not be loaded: {type(exc).__name__}: {exc}") from exc


def _check_causal(config, role: str, name: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    # Gemma 3 from 4B on ships as Gemma3ForConditionalGeneration (text and images): AutoModelForCausalLM loads that
    # class for it, and Helix runs its text side
    causal_arch = any("CausalLM" in a or "LMHead" in a or a == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
                      for a in archs)
    if (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False)
            or (archs and not causal_arch)):
        raise ModelLoadError(
            f"{role} model '{name}' ({config.model_type}, {', '.join(archs) or 'no architecture listed'}) is not a "
            "causal language model; Helix needs a text-generation model (AutoModelForCausalLM)"
        )


def _specials(tok) -> dict[str, object]:
    return {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "unk": tok.unk_token_id,
        "pad": getattr(tok, "pad_token_id", None),
    }


def check_tokenizers_compatible(target_tok, draft_tok) -> None:
    """Speculative decoding compares token ids: both sides must mean the same thing by them."""
    problems: list[str] = []
    if len(target_tok) != len(draft_tok):
        problems.append(f"vocabulary size {len(target_tok)} (target) vs {len(draft_tok)} (draft)")
    else:
        tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
        if tv != dv:
            diff = sorted(set(tv.items()) ^ set(dv.items()))[:3]
            problems.append(f"{len(set(tv.items()) ^ set(dv.items()))} vocabulary entries differ (e.g. {diff})")
    ts, ds = _specials(target_tok), _specials(draft_tok)
    for key in ("bos", "eos", "unk"):
        if ts[key] != ds[key]:
            problems.append(f"{key} token id {ts[key]} (target) vs {ds[key]} (draft)")
    if problems:
        raise TokenizerMismatch(
            "draft and target tokenizers are incompatible: " + "; ".join(problems)
            + ". Pick a draft from the same model family (same tokenizer), or run without a draft."
        )
