"""Weights lookup and checkpoint round trip."""

import json
import re

import numpy as np
import pytest
import torch

from boltzformer import weights
from boltzformer.checkpoint import load_model, save_model
from boltzformer.errors import WeightsError
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.network.text import PromptEmbedding


@pytest.fixture
def saved(tmp_path):
    model = build_model(get_config("boltzformer-test"), seed=0)
    bank = {"lung nodule": PromptEmbedding(np.ones((2, 384), np.float32), np.full(384, 0.05, np.float32))}
    path = save_model(model, tmp_path / "w.safetensors", bank, {"note": "test"})
    return model, bank, path


def test_checkpoint_round_trip_restores_weights_config_and_prompt_cache(saved):
    model, bank, path = saved
    loaded, bank2, meta, src = load_model(path)
    assert meta["note"] == "test" and meta["prompts"] == ["lung nodule"]
    assert loaded.cfg == model.cfg
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    np.testing.assert_array_equal(bank2["lung nodule"].tokens, bank["lung nodule"].tokens)


def test_folder_source_and_sha256(saved):
    _, _, path = saved
    src = weights.resolve(path.parent)
    assert src.weights_path == path
    assert len(weights.sha256(path)) == 64


def test_missing_or_wrong_sources_are_clear_errors(tmp_path, saved):
    with pytest.raises(WeightsError, match="no such weights"):
        weights.resolve(tmp_path / "nope.safetensors")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(WeightsError, match="not a .safetensors"):
        weights.resolve(tmp_path / "x.txt")
    _, _, path = saved
    path.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="config"):
        weights.resolve(path)


def test_mismatched_config_is_reported(saved):
    _, _, path = saved
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"]["hidden_dim"] = 48
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="do not match"):
        load_model(path)


def test_hub_source_is_read_from_the_cache_only(monkeypatch, tmp_path):
    """Nothing is downloaded at run time: without HF_HUB_OFFLINE it used to retry the network
    five times (about 23 s) before failing."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t = time.perf_counter()
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache .nothing is downloaded"):
        weights.resolve("hf:someone/boltzformer-weights")
    assert time.perf_counter() - t < 2.0


def test_a_cached_hub_repository_is_read_as_a_local_folder_is(monkeypatch, tmp_path):
    """A cached repository holding model.safetensors and config.json was 'not in the local Hugging
    Face cache': only boltzformer-s.* was looked for."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read once at import: patched
    repo = tmp_path / "hf" / "hub" / "models--someone--weights"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"not read here")
    (snapshot / "config.json").write_text("{}")
    found = weights.resolve("hf:someone/weights")
    assert found.weights_path == snapshot / "model.safetensors" and found.config_path == snapshot / "config.json"
    assert found.description == "hf:someone/weights"


def test_a_mistyped_local_folder_fails_at_once_without_a_network_lookup(monkeypatch, tmp_path):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    t = time.perf_counter()
    with pytest.raises(WeightsError, match=r"runs/v4: no such weights file or folder \(for a Hugging Face repo write hf:runs/v4\)"):
        weights.resolve("runs/v4")
    assert time.perf_counter() - t < 1.0
    with pytest.raises(WeightsError, match="hf:owner/name"):
        weights.resolve("hf:not-a-repo")


def test_bundled_weights_ship_inside_the_package():
    src = weights.bundled_weights()
    if src is None:
        pytest.skip("no trained weights bundled in this checkout")
    assert "boltzformer" in str(src.weights_path) and src.weights_path.stat().st_size < 40 * 2**20


@pytest.mark.parametrize("edit, said", [
    (lambda d: d["config"].update(sampling="boltzman"), "invalid network config (sampling must be one of"),
    (lambda d: d["config"].update(hidden_dim="128"), "invalid network config (hidden_dim is '128', where int"),
    (lambda d: d.update(config=[1, 2]), "invalid network config ('config' is not a mapping"),
    (lambda d: d.update(prompts=d["prompts"] + ["a prompt the weights do not cache"]), "lists 60 prompts, the weights cache 59"),
])
def test_an_edited_weights_config_is_one_line_naming_it(tmp_path, edit, said):
    """Each was 'unexpected ValueError/TypeError/AttributeError/KeyError', exit 1, naming no file."""
    import shutil

    from boltzformer.weights import bundled_weights

    bundled = bundled_weights()
    if bundled is None:
        pytest.skip("no bundled weights")
    shutil.copy(bundled.weights_path, tmp_path / "w.safetensors")
    config = json.loads(bundled.config_path.read_text())
    edit(config)
    (tmp_path / "w.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=re.escape(said)):
        load_model(tmp_path / "w.safetensors")
