"""`boltzformer train` on a folder of the user's own cases, and resuming a run safely.

A small folder of real-like cases is written here (CT slices in HU with a round lesion), so the
checks run without ../shared: which cases a split file selects, bad cases refused before any
synthetic data is made, absent-target pairs that could be wrong labels, and a resumed run that
must read the same cases, with its options of then and its time so far.
"""

import csv
import json
import signal

import numpy as np
import pytest
import torch

from boltzformer.errors import BoltzformerError, InputError, Terminated
from boltzformer.io import Volume, write_volume
from boltzformer.training import data as data_mod
from boltzformer.training.train import TrainConfig, train


def _case(folder, cid, shape=(1, 32, 32), mask_shape=None, direction=None):
    hu = np.full(shape, -850, np.int16)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    lesion = (yy - 16) ** 2 + (xx - 12) ** 2 < 16
    hu[:, lesion] = 40
    write_volume(Volume(hu, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT"),
                 folder / f"{cid}_image.nii.gz", overwrite=True)
    mask = np.zeros(mask_shape or shape, np.uint8)
    mask[:, : shape[1], : shape[2]][:, lesion[: mask.shape[1], : mask.shape[2]]] = 1
    write_volume(Volume(mask, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), np.eye(3) if direction is None else direction),
                 folder / f"{cid}_mask.nii.gz", overwrite=True)


def _folder(tmp_path, prompts=None, splits=None, name="own"):
    """p1..p4, 'lung nodule' unless `prompts` says otherwise; split.csv: p1-p3 train, p4 heldout."""
    folder = tmp_path / name
    folder.mkdir()
    prompts = prompts or {}
    splits = splits or {"p1": "train", "p2": "train", "p3": "train", "p4": "heldout"}
    rows = []
    for cid in ("p1", "p2", "p3", "p4"):
        _case(folder, cid)
        rows.append(f"{cid},{prompts.get(cid, 'lung nodule')},CT")
    (folder / "cases.csv").write_text("case_id,prompt,modality\n" + "\n".join(rows) + "\n")
    (folder / "split.csv").write_text("case_id,split\n" + "".join(f"{c},{s}\n" for c, s in splits.items()))
    return folder


@pytest.fixture
def cfg(tmp_path):
    return TrainConfig(model="boltzformer-test", synth_train=24, synth_val=12, steps=4, steps_per_epoch=2,
                       batch_size=4, workers=1, cache_dir=str(tmp_path / "cache"), use_real=True,
                       warmup_steps=1, device="cpu", real_weight=0.5)


def _with(cfg, **changes):
    return TrainConfig(**{**cfg.__dict__, **changes})


def test_a_folder_the_split_file_does_not_list_is_refused_before_any_data_is_made(cfg, tmp_path):
    """A user's own folder with the bundled split (the default) trained on synthetic data only:
    '0 real train, 0 real held-out', exit 0."""
    folder = _folder(tmp_path)
    with pytest.raises(InputError, match=r"real_split.csv: puts none of the 4 cases of .*own/cases.csv in the "
                                         r"'train' split \(their splits: none of its cases\)"):
        train(_with(cfg, real_dir=str(folder)), tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # no synthetic data was made


def test_cases_left_out_by_the_split_file_are_named(tmp_path):
    folder = _folder(tmp_path, splits={"p1": "train", "p2": "val", "p9": "train"})
    said = []
    chosen = data_mod.real_split_rows(folder, folder / "split.csv", warn=said.append)
    assert [r["case_id"] for r in chosen["train"]] == ["p1"] and chosen["heldout"] == []
    text = "\n".join(said)
    assert "2 case(s) of" in text and "are in no split and are left out: p3, p4" in text
    assert "split(s) 'val' are not read by training" in text
    assert "1 case(s) are not in" in text and "p9" in text
    assert "no case of" in text and "'heldout' split" in text


def test_absent_target_pairs_leave_out_targets_an_unknown_prompt_might_name(tmp_path):
    """'pulmonary nodules' (not a known phrasing) was paired with 'lung nodule' -> empty mask on
    the very nodule slices; 'breast lesion' may still be paired with 'liver lesion'."""
    assert data_mod.could_name("pulmonary nodules", "lung_nodule")
    assert data_mod.could_name("kidney cyst", "kidney_lesion")
    assert not data_mod.could_name("breast lesion", "liver_lesion")
    folder = _folder(tmp_path, prompts={"p1": "pulmonary nodules", "p2": "pulmonary nodules", "p3": "pulmonary nodules"})
    said = []
    chosen = data_mod.real_split_rows(folder, folder / "split.csv", warn=said.append)
    assert any("'pulmonary nodules'" in s and "name no target" in s for s in said)
    examples = data_mod.real_examples(folder, "train", size=32, rows=chosen["train"], rng=np.random.default_rng(0))
    empty_pairs = {p for p, m in zip(examples.prompts, examples.masks) if not m.any()}
    assert empty_pairs and not any("nodule" in p or "lung" in p or "tumo" in p for p in empty_pairs), empty_pairs


@pytest.mark.parametrize("mask_shape, direction", [((1, 28, 32), None), ((1, 32, 32), np.diag([-1.0, 1.0, 1.0]))])
def test_a_mask_off_its_images_grid_is_refused_naming_it(tmp_path, mask_shape, direction):
    """A mask of another in-plane size was resized on its own (labels shifted); a mirrored one
    trained mirrored; fewer slices gave 'unexpected IndexError'. evaluate refused them already."""
    folder = _folder(tmp_path)
    _case(folder, "p2", mask_shape=mask_shape, direction=direction)
    with pytest.raises(InputError, match=r"p2_mask.nii.gz: does not lie on its image's voxel grid"):
        data_mod.real_examples(folder, "train", size=32, split_file=folder / "split.csv")


def test_fewer_mask_slices_are_refused_naming_the_mask(tmp_path):
    folder = _folder(tmp_path)
    _case(folder, "p3", shape=(4, 32, 32), mask_shape=(3, 32, 32))
    with pytest.raises(InputError, match=r"p3_mask.nii.gz: does not lie on its image's voxel grid"):
        data_mod.real_examples(folder, "train", size=32, split_file=folder / "split.csv")


def test_an_empty_prompt_or_a_short_row_is_refused_with_its_line(tmp_path):
    folder = _folder(tmp_path)
    for rows, line in (("p1,,CT\n", 2), ("p1,lung nodule,CT\np2\n", 3)):
        (folder / "cases.csv").write_text("case_id,prompt,modality\n" + rows)
        with pytest.raises(InputError, match=f"cases.csv: line {line}: case 'p[12]': the prompt is empty"):
            data_mod.real_split_rows(folder, folder / "split.csv")


def test_a_resumed_run_must_read_the_cases_it_started_with(cfg, tmp_path, monkeypatch):
    """Another split file on resume moved held-out cases into training without a word; a resume
    without BOLTZFORMER_REAL_DATA dropped the real data; both are refused. A folder that only
    moved is fine, and the config records the folder the variable named."""
    import shutil

    folder = _folder(tmp_path)
    split = folder / "split.csv"
    monkeypatch.setenv("BOLTZFORMER_REAL_DATA", str(folder))
    out = tmp_path / "run"
    train(_with(cfg, split_file=str(split), steps=2), out)
    assert json.loads((out / "train_config.json").read_text())["real_dir"] == str(folder)
    all_train = tmp_path / "all_train.csv"
    all_train.write_text("case_id,split\np1,train\np2,train\np3,train\np4,train\n")
    with pytest.raises(BoltzformerError, match=r"started with other real cases in its splits \(heldout: 0 added, "
                                               r"1 gone \(e.g. p4\); train: 1 added, 0 gone"):
        train(_with(cfg, split_file=str(all_train)), out)
    monkeypatch.delenv("BOLTZFORMER_REAL_DATA")
    with pytest.raises(BoltzformerError, match="trained on real cases .* but no folder of real cases is given now"):
        train(_with(cfg, split_file=str(split)), out)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    train(_with(cfg, real_dir=str(moved), split_file=str(moved / "split.csv")), out)
    assert [int(r["step"]) for r in csv.DictReader(open(out / "log.csv"))] == [2, 4]


def test_a_warm_started_run_resumes_after_its_init_weights_moved(cfg, tmp_path):
    """init_weights is read when a run starts; a resume refused 'init_weights does not exist'."""
    cfg = _with(cfg, use_real=False, real_weight=0.0)
    first = train(_with(cfg, steps=2), tmp_path / "a")
    init = tmp_path / "init.safetensors"
    init.write_bytes(first.read_bytes())
    out = tmp_path / "b"
    train(_with(cfg, steps=2, init_weights=str(init)), out)
    init.unlink()
    train(_with(cfg, init_weights=str(init)), out)
    train(_with(cfg, steps=6, init_weights=None), out)  # the option no longer matters once resumed
    assert [int(r["step"]) for r in csv.DictReader(open(out / "log.csv"))] == [2, 4, 6]


def test_sigterm_stops_between_steps_and_is_reported_as_sigterm(cfg, tmp_path, monkeypatch):
    """SIGTERM was reported as Ctrl-C (exit 130, 'Ctrl-C again stops at once'); it is Terminated
    (exit 143) with the checkpoint kept."""
    from boltzformer.training import train as train_mod

    cfg = _with(cfg, use_real=False, real_weight=0.0)
    sample, calls = train_mod.BatchSampler.sample, []

    def sigterm_on_third(self, n):
        calls.append(n)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return sample(self, n)

    monkeypatch.setattr(train_mod.BatchSampler, "sample", sigterm_on_third)
    with pytest.raises(Terminated) as stopped:
        train(cfg, tmp_path / "run")
    assert "holds step 3" in stopped.value.note
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3


def test_a_validation_set_without_a_lesion_is_refused(cfg, tmp_path):
    """No Dice on it, so no epoch was ever best: no best.safetensors, exit 0, not a word."""
    with pytest.raises(BoltzformerError, match=r"synthetic validation set \(synth_val=2\) holds no lesion"):
        train(_with(cfg, use_real=False, synth_val=2, negative_fraction=1.0), tmp_path / "run")


def test_a_corrupt_cache_is_named_with_its_cure(cfg, tmp_path):
    cfg = _with(cfg, use_real=False, real_weight=0.0, steps=2)
    train(cfg, tmp_path / "a")
    cache = sorted((tmp_path / "cache").glob("synth_*.npz"))[0]
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(BoltzformerError, match=f"{cache.name}: the cached examples cannot be read .*delete the file"):
        train(cfg, tmp_path / "b")


def test_a_leg_removes_what_a_killed_write_left_and_counts_minutes_on(cfg, tmp_path):
    """kill -9 mid-write left hidden temporaries for good; the minutes column restarted at 0."""
    cfg = _with(cfg, use_real=False, real_weight=0.0)
    out = tmp_path / "run"
    train(_with(cfg, steps=2), out)
    stale = [out / ".best.safetensors.tmp-ab12cd34.safetensors", out / "last.pt.tmp"]
    for f in stale:
        f.write_bytes(b"half")
    state = torch.load(out / "last.pt", weights_only=True)
    state["minutes"] = 90.0  # as if the first leg had taken an hour and a half
    torch.save(state, out / "last.pt")
    train(cfg, out)
    assert not any(f.exists() for f in stale)
    minutes = [float(r["minutes"]) for r in csv.DictReader(open(out / "log.csv"))]
    assert minutes[1] >= 90.0


def test_a_checkpoint_from_before_an_option_existed_resumes(cfg, tmp_path):
    """An option added since (e.g. small_lesion_fraction) compared None with its default and
    refused the resume ('small_lesion_fraction null -> 0.0')."""
    cfg = _with(cfg, use_real=False, real_weight=0.0)
    out = tmp_path / "run"
    train(_with(cfg, steps=2), out)
    state = torch.load(out / "last.pt", weights_only=True)
    old = json.loads(state["config"])
    del old["small_lesion_fraction"]
    state["config"] = json.dumps(old)
    torch.save(state, out / "last.pt")
    train(cfg, out)
    assert [int(r["step"]) for r in csv.DictReader(open(out / "log.csv"))] == [2, 4]
