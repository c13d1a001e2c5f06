"""Reading and writing EAGLE-3 head folders (config.json + model.safetensors or pytorch_model.bin), and
checking a head against the target it drafts for."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.eagle.config import EagleConfig
from engine.eagle.head import EagleHead
from engine.errors import ModelLoadError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_eagle_folder(path: str | Path) -> bool:
    """Whether ``path`` holds an EAGLE-3 head (by its config.json)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
        EagleConfig.from_dict(raw)
        return True
    except (ValueError, OSError, TypeError, KeyError):
        return False


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    shards = sorted(folder.glob("model-*.safetensors"))
    files = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()] or shards
    if not files:
        raise ModelLoadError(f"EAGLE head '{folder.name}' has no weights ({' or '.join(WEIGHT_FILES)})")
    out: dict[str, torch.Tensor] = {}
    for f in (shards or files[:1]):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            out.update(load_file(str(f)))
        else:
            out.update(torch.load(str(f), map_location="cpu", weights_only=True))
    # speculators name the layer layers.0.*; EAGLE's own checkpoints midlayer.*
    return {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v for k, v in out.items()}


def load_head(path: str | Path, target_model, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> EagleHead:
    """Load the head in ``path`` for ``target_model`` (a transformers causal LM), on the target's device and
    dtype unless given. Raises ModelLoadError saying what does not match."""
    folder = Path(path).expanduser()
    name = folder.name
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"EAGLE head '{path}' has no config.json; give a folder in the EAGLE-3 format "
                             "(config.json with architectures LlamaForCausalLMEagle3, model.safetensors)")
    try:
        cfg = EagleConfig.from_dict(json.loads((folder / "config.json").read_text()))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"EAGLE head '{name}': {exc}") from exc
    weights = _read_weights(folder)
    head = EagleHead(cfg, own_embeddings="embed_tokens.weight" in weights)
    check_compatible(head, target_model, name)
    missing, unexpected = head.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in ("t2d", "d2t")]  # implied by d2t / needless for a full vocabulary
    if missing or unexpected:
        raise ModelLoadError(f"EAGLE head '{name}': weights do not fit the config (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
    if "d2t" in weights and "t2d" not in weights:  # t2d is implied by d2t
        head.t2d.zero_()
        head.t2d[head.draft_to_target] = True
    ids = head.draft_to_target
    if cfg.draft_vocab_size < cfg.vocab_size and "d2t" not in weights:
        raise ModelLoadError(f"EAGLE head '{name}' drafts over {cfg.draft_vocab_size} tokens but has no d2t map")
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise ModelLoadError(f"EAGLE head '{name}': d2t maps outside the target's {cfg.vocab_size} tokens")
    param = next(target_model.parameters())
    head.to(device=device or param.device, dtype=dtype or param.dtype)
    head.d2t = head.d2t.long()
    head.attach_embeddings(target_model.get_input_embeddings())
    head.eval().requires_grad_(False)
    return head


def check_compatible(head: EagleHead, target_model, name: str = "head") -> None:
    """A clear ModelLoadError when the head was not made for this target (hidden size, vocabulary, layers)."""
    cfg = head.cfg
    tc = target_model.config
    tc = tc.get_text_config() if hasattr(tc, "get_text_config") else tc
    problems = []
    if cfg.target_hidden_size != tc.hidden_size:
        problems.append(f"it fuses {cfg.target_hidden_size}-wide target states, the target's hidden size is "
                        f"{tc.hidden_size}")
    if head.embed_tokens is None and cfg.hidden_size != tc.hidden_size:
        problems.append(f"its hidden size {cfg.hidden_size} differs from the target's {tc.hidden_size} and it has no "
                        "embeddings of its own")
    if cfg.vocab_size != tc.vocab_size:
        problems.append(f"its vocabulary is {cfg.vocab_size} tokens, the target's {tc.vocab_size}")
    try:
        cfg.layer_ids_for(tc.num_hidden_layers)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ModelLoadError(f"EAGLE head '{name}' does not match the target: " + "; ".join(problems)
                             + ". Use a head trained for this target model.")


def save_head(head: EagleHead, path: str | Path, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write ``head`` as an EAGLE-3 folder (config.json, model.safetensors; embeddings never stored)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items() if not k.startswith("embed_tokens")}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**head.cfg.to_dict(), "torch_dtype": str(
        dtype or head.fc.weight.dtype).removeprefix("torch.")}, indent=2) + "\n")
    return folder
