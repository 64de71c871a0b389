"""CLI: prompts that name nothing are refused (or forced), the 3D filter switch, `info` exit codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from boltzformer import cli
from boltzformer.checkpoint import save_model
from boltzformer.io import Volume, read_volume, write_volume
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.network.text import SentenceEncoder


@pytest.fixture(scope="module")
def weights_with_prompts(tmp_path_factory):
    prompts = ["lung nodule", "pulmonary nodule", "liver lesion", "heart"]
    bank = dict(zip(prompts, SentenceEncoder(4).encode(prompts)))
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    return str(save_model(build_model(get_config("boltzformer-test"), seed=0), path, bank))


@pytest.fixture
def ct_path(tmp_path):
    rng = np.random.default_rng(1)
    hu = rng.normal(-700, 60, size=(6, 40, 48)).astype(np.int16)
    hu[2:4, 15:22, 20:27] = 30
    return write_volume(Volume(hu, (0.7, 0.8, 2.5), modality="CT"), tmp_path / "ct.nii.gz")


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_prompt_that_names_nothing_is_refused_before_any_output(ct_path, tmp_path, weights_with_prompts, capsys):
    out = tmp_path / "m.nii.gz"
    code, _, err = run(["segment", ct_path, "-p", "banana", "-o", out, "--weights", weights_with_prompts,
                        "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1
    assert "names nothing this model was trained to find" in err and "'lung nodule'" in err and "--force-prompt" in err
    code, _, err = run(["segment", ct_path, "-p", "banana", "-o", out, "--weights", weights_with_prompts,
                        "--device", "cpu", "--quiet", "--force-prompt"], capsys)
    assert code == 0 and out.exists() and "forced" in err


def test_fp_filter_switch_keeps_every_candidate(ct_path, tmp_path, weights_with_prompts, capsys):
    masks = {}
    for name, extra in (("on", []), ("off", ["--no-fp-filter"])):
        out = tmp_path / f"{name}.nii.gz"
        code, _, err = run(["segment", ct_path, "-p", "lung nodule", "-o", out, "--weights", weights_with_prompts,
                            "--device", "cpu", "--quiet", "--threshold", "0.3", "--min-lesion-mm3", "0", *extra], capsys)
        assert code == 0, err
        masks[name] = read_volume(out).array
    assert masks["off"].sum() >= masks["on"].sum()
    assert not (masks["on"] & ~masks["off"]).any()  # the filter only removes


def test_info_fails_when_the_weights_it_names_cannot_be_loaded(tmp_path, weights_with_prompts, capsys):
    code, out, _ = run(["info", "--weights", weights_with_prompts], capsys)
    assert code == 0 and "sha256" in out
    code, _, err = run(["info", "--weights", tmp_path / "missing.safetensors"], capsys)
    assert code == 2 and "missing.safetensors" in err  # on stderr, as every error
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    (tmp_path / "broken.json").write_text(Path(weights_with_prompts).with_suffix(".json").read_text())
    code, _, err = run(["info", "--weights", broken], capsys)
    assert code == 2 and "broken.safetensors" in err


def test_nodule_detector_switch_finds_the_nodule_the_network_missed(tmp_path, weights_with_prompts, capsys):
    """--nodule-detector: lesions from the 3D detector (an untrained network marks nothing useful)."""
    import json

    from .test_nodule_detector import _chest

    vol, nodule, _, _ = _chest()
    src = write_volume(vol, tmp_path / "chest.nii.gz")
    found = {}
    for name, extra in (("default", []), ("detector", ["--nodule-detector"])):
        out, table = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}.json"
        code, _, err = run(["segment", src, "-p", "lung nodule", "-o", out, "--lesions", table, "--weights",
                            weights_with_prompts, "--device", "cpu", "--quiet", *extra], capsys)
        assert code == 0, err
        found[name] = (read_volume(out).array > 0, json.loads(table.read_text()))
    mask, rows = found["detector"]
    assert mask[nodule].mean() > 0.5
    assert rows and all(r["outline"] in ("slice model", "3D region") and r["nodule_score"] >= 0.8 for r in rows)
    assert all("outline" not in r for r in found["default"][1])


def test_nodule_detector_says_when_it_cannot_run(ct_path, tmp_path, weights_with_prompts, capsys):
    """A prompt it does not serve, and a scan thinner than its classifier's patch (15 mm here)."""
    for prompt, reason in (("liver lesion", "serves lung nodule prompts"), ("lung nodule", "spans 15 mm along z")):
        out = tmp_path / "m.nii.gz"
        code, _, err = run(["segment", ct_path, "-p", prompt, "-o", out, "--weights", weights_with_prompts,
                            "--device", "cpu", "--quiet", "--overwrite", "--nodule-detector"], capsys)
        assert code == 0 and out.exists()
        assert "3D nodule detector was not applied" in err and reason in err, err
