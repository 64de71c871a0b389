"""Where weights come from: the bundled file, a local file or folder, or a Hugging Face repo.

A checkpoint is two files side by side: `<name>.safetensors` (tensors; also the cached frozen
text embeddings of the prompts seen in training, under `text_cache.*`) and `<name>.json`
(network config, prompt list, training provenance). Nothing is ever downloaded: a Hugging Face
repo named as `hf:owner/name` is read from the local Hugging Face cache only (fetched beforehand
by the user, e.g. `hf download owner/name`). Anything else is a local path: a
mistyped folder such as `runs/v4` fails at once naming the path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import WeightsError

BUNDLED_NAME = "boltzformer-s"
HUB_PREFIX = "hf:"


@dataclass
class WeightsSource:
    weights_path: Path
    config_path: Path
    description: str  # "bundled", a path, or "hf:<repo>"


def bundled_dir() -> Path:
    return Path(str(resources.files("boltzformer.resources")))


def bundled_weights() -> WeightsSource | None:
    d = bundled_dir()
    w, c = d / f"{BUNDLED_NAME}.safetensors", d / f"{BUNDLED_NAME}.json"
    return WeightsSource(w, c, "bundled") if w.is_file() and c.is_file() else None


def _pair_in_folder(folder: Path) -> WeightsSource:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no .safetensors weights file in this folder")
    if len(files) > 1:
        preferred = [f for f in files if f.stem in (BUNDLED_NAME, "model", "best")]
        if not preferred:
            raise WeightsError(f"{folder}: several .safetensors files; name one of them")
        files = preferred
    return _pair_for_file(files[0])


def _pair_for_file(path: Path) -> WeightsSource:
    config = path.with_suffix(".json")
    if not config.is_file():
        config = path.parent / "config.json"
    if not config.is_file():
        raise WeightsError(f"{path}: its config {path.with_suffix('.json').name} is missing beside it")
    return WeightsSource(path, config, str(path))


def resolve(source: str | os.PathLike | None = None) -> WeightsSource:
    """Find weights: None = bundled; a file or folder; or a Hugging Face repo 'hf:owner/name'."""
    if source is None:
        found = bundled_weights()
        if found is None:
            raise WeightsError(
                "no trained weights are bundled with this installation; pass weights explicitly "
                "(--weights FILE.safetensors, a folder, or hf:owner/name for a Hugging Face repo)"
            )
        return found
    text = str(source)
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX):]
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise WeightsError(f"{text}: a Hugging Face source is hf:owner/name")
        return _from_hub(repo_id)
    path = Path(source).expanduser()
    if path.is_dir():
        return _pair_in_folder(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: not a .safetensors weights file")
        return _pair_for_file(path)
    hint = f" (for a Hugging Face repo write hf:{text})" if text.count("/") == 1 and not path.suffix else ""
    raise WeightsError(f"{source}: no such weights file or folder{hint}")


def _from_hub(repo_id: str) -> WeightsSource:
    """The cached snapshot of a Hub repository, read as a local folder is (`_pair_in_folder`:
    boltzformer-s.*, model.* or best.* with its .json or config.json): it only looked for
    boltzformer-s.* and called a cached repository of model.safetensors "not in the cache"."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise WeightsError("huggingface_hub is not installed; cannot load weights from the Hub") from exc
    try:  # the cache only: nothing is downloaded at run time
        folder = snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError as exc:
        raise WeightsError(
            f"hf:{repo_id}: not in the local Hugging Face cache (nothing is downloaded at run time); fetch it "
            f"first with `hf download {repo_id}` (`huggingface-cli download` before huggingface_hub 1.0), or pass a "
            "local file"
        ) from exc
    except Exception as exc:  # network errors, missing repo, auth: one clear line
        raise WeightsError(f"hf:{repo_id}: could not fetch weights ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    found = _pair_in_folder(Path(folder))
    return WeightsSource(found.weights_path, found.config_path, f"hf:{repo_id}")


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_config(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: unreadable weights config ({exc})") from exc
