"""Save and load a trained network with its config and its cached prompt embeddings.

`<name>.safetensors` holds the network tensors plus `text_cache.tokens.<i>` (T_i x 384) and
`text_cache.pooled` (P x 384); `<name>.json` holds {"config": ..., "prompts": [...], ...}.
Training checkpoints (optimizer state, step) are separate torch files written by train.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import weights as weights_mod
from .errors import WeightsError
from .io import OutputSet
from .network.boltzformer import BoltzFormer
from .network.config import BoltzFormerConfig
from .network.text import PromptEmbedding


def save_model(
    model: BoltzFormer,
    path: str | os.PathLike,
    prompt_bank: dict[str, PromptEmbedding],
    info: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `path` (.safetensors) and its `.json` twin atomically, as a pair."""
    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    prompts = sorted(prompt_bank)
    for i, p in enumerate(prompts):
        tensors[f"text_cache.tokens.{i}"] = torch.from_numpy(np.ascontiguousarray(prompt_bank[p].tokens))
    if prompts:
        tensors["text_cache.pooled"] = torch.from_numpy(np.stack([prompt_bank[p].pooled for p in prompts]))
    meta = {"format": "boltzformer/1", "config": model.cfg.to_dict(), "prompts": prompts, **(info or {})}
    # one OutputSet: both are written to temporary files, then committed together, so a kill
    # while writing never leaves new weights beside the previous config
    with OutputSet(overwrite=overwrite) as outputs:
        outputs.add(path)
        outputs.add(path.with_suffix(".json"))
        with outputs.temporary(str(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "boltzformer/1"})
        outputs.write_bytes(str(path.with_suffix(".json")), json.dumps(meta, indent=2, default=str).encode())
    return path


def load_model(source=None, map_location="cpu"):
    """Returns (model in eval mode, prompt_bank, meta, WeightsSource)."""
    src = weights_mod.resolve(source)
    meta = weights_mod.read_config(src.config_path)
    if "config" not in meta:
        raise WeightsError(f"{src.config_path}: not a boltzformer weights config (no 'config' entry)")
    try:  # a hand-edited or foreign config: one line naming it, not "unexpected ValueError"
        if not isinstance(meta["config"], dict):
            raise TypeError("'config' is not a mapping of options")
        cfg = BoltzFormerConfig.from_dict(meta["config"])
        model = BoltzFormer(cfg)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise WeightsError(f"{src.config_path}: invalid network config ({exc})".splitlines()[0]) from None
    if not os.access(src.weights_path, os.R_OK) and Path(src.weights_path).exists():
        raise WeightsError(f"{src.weights_path}: permission denied (not readable by this user)")
    try:
        tensors = load_file(str(src.weights_path), device=str(map_location))
    except Exception as exc:
        raise WeightsError(f"{src.weights_path}: unreadable safetensors file ({exc})".splitlines()[0]) from exc
    prompts = meta.get("prompts", [])
    bank = {}
    if prompts and "text_cache.pooled" in tensors:
        pooled = tensors.pop("text_cache.pooled").numpy()
        missing = [i for i in range(len(prompts)) if f"text_cache.tokens.{i}" not in tensors]
        if missing or len(pooled) != len(prompts):
            raise WeightsError(f"{src.weights_path}: weights do not match their config ({src.config_path.name} lists "
                               f"{len(prompts)} prompts, the weights cache {len(pooled)})")
        for i, p in enumerate(prompts):
            bank[p] = PromptEmbedding(tensors.pop(f"text_cache.tokens.{i}").numpy(), pooled[i])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3] if line.strip())  # line 1 says nothing
        raise WeightsError(f"{src.weights_path}: weights do not match their config ({detail or exc})"[:400]) from exc
    model.eval()
    return model, bank, meta, src


def load_matching(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Warm start: copy every tensor whose name and shape match `model`, keep the rest as built.

    For fine-tuning a changed architecture (e.g. mask_stride 4 -> 2) from trained weights.
    Convolution kernels that gained input channels (2.5D context: 1 -> 5 image channels) are
    "widened": the trained kernel fills the leading channels and the new ones start at zero, so
    the widened network computes exactly what the trained one did until training moves them.
    Prompt-cache entries are ignored. Returns {"loaded", "widened", "reinitialised" (name
    matches, shape differs otherwise), "new" (only in the model), "unused" (only in the file)}.
    """
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "widened": [], "reinitialised": [], "new": [], "unused": []}
    keep = {}
    for name, value in tensors.items():
        if name.startswith("text_cache."):
            continue
        if name not in own:
            report["unused"].append(name)
        elif _widens(own[name].shape, value.shape):
            wide = torch.zeros(own[name].shape, dtype=value.dtype)
            wide[tuple(slice(0, n) for n in value.shape)] = value
            keep[name] = wide
            report["widened"].append(name)
        elif own[name].shape != value.shape:
            report["reinitialised"].append(name)
        else:
            keep[name] = value
            report["loaded"].append(name)
    report["new"] = [n for n in own if n not in tensors]
    model.load_state_dict(keep, strict=False)
    return report


def _widens(new_shape, old_shape) -> bool:
    """A conv kernel (4D) that grew along exactly one channel axis (in: 1, or 0 for transposed)."""
    if len(new_shape) != 4 or len(old_shape) != 4 or tuple(new_shape) == tuple(old_shape):
        return False
    grown = [i for i in range(4) if new_shape[i] != old_shape[i]]
    return len(grown) == 1 and grown[0] in (0, 1) and new_shape[grown[0]] > old_shape[grown[0]]
