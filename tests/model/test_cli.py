"""The `boltzformer` command line: happy paths keep geometry; every bad input is one line + exit 2.

A tiny untrained network (saved to a temporary folder and passed with --weights) keeps these
tests fast and independent of the bundled weights.
"""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from boltzformer import cli, weights
from boltzformer.checkpoint import save_model
from boltzformer.io import Volume, read_volume, write_volume
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.network.text import PromptEmbedding
from boltzformer.options import DEFAULT_MIRROR, DEFAULT_PLANES

PROMPT = "lung nodule"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    model = build_model(get_config("boltzformer-test"), seed=0)
    rng = np.random.default_rng(0)
    bank = {PROMPT: PromptEmbedding(rng.normal(size=(3, 384)).astype(np.float32), rng.normal(size=384).astype(np.float32))}
    return str(save_model(model, folder / "tiny.safetensors", bank, {"note": "untrained, for CLI tests"}))


@pytest.fixture
def ct_path(tmp_path):
    """A small oblique CT (HU) with an anisotropic grid and a non-zero origin."""
    rng = np.random.default_rng(1)
    hu = rng.normal(-700, 60, size=(6, 40, 48)).astype(np.int16)
    hu[2:4, 15:22, 20:27] = 30  # a 'nodule'
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    vol = Volume(hu, (0.7, 0.8, 2.5), (-12.5, 30.0, 101.0), direction, "CT")
    return write_volume(vol, tmp_path / "ct.nii.gz")


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def segment_args(inp, out, weights_path, *extra):
    return ["segment", inp, "-p", PROMPT, "-o", out, "--weights", weights_path, "--device", "cpu", "--quiet", *extra]


# -- happy paths ------------------------------------------------------------------------------------
def test_segment_writes_mask_with_the_input_geometry(ct_path, tmp_path, tiny_weights, capsys):
    out, prob, att, les = (tmp_path / n for n in ("m.nii.gz", "p.nii.gz", "a.npz", "l.csv"))
    code, stdout, err = run(segment_args(ct_path, out, tiny_weights, "--probabilities", prob, "--attention", att,
                                         "--lesions", les, "--threshold", "0.0", "--min-nodule-score", "0"), capsys)
    assert code == 0, err
    assert "lesion(s) for 'lung nodule'" in stdout
    image, mask = read_volume(ct_path), read_volume(out)
    assert mask.shape == image.shape and mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) <= {0, 1}
    assert mask.same_geometry(image, atol=1e-5)
    affine = nib.load(str(out)).affine
    np.testing.assert_allclose(affine, nib.load(str(ct_path)).affine, atol=1e-5)
    np.testing.assert_allclose(affine, image.affine_ras(), atol=1e-5)
    p = read_volume(prob)
    assert p.same_geometry(image) and 0.0 <= p.array.min() and p.array.max() <= 1.0
    with np.load(att) as a:
        cfg = get_config("boltzformer-test")
        assert a["counts"].shape[:2] == (cfg.num_layers, image.shape[0])
        assert int(a["num_queries"]) == cfg.num_queries
    rows = list(csv.DictReader(open(les)))
    assert rows and {"volume_mm3", "longest_axial_diameter_mm"} <= set(rows[0])


@pytest.mark.parametrize("stored", ["oblique axial", "sagittal"])
def test_the_attention_file_places_its_cells_over_the_input_in_the_world(stored, tmp_path, tiny_weights, capsys):
    """affine_ras puts each cell of a layer's map where its voxels are, for an axial input and
    for a sagittal one (whose maps lie on axial slices of the same voxels): the cells' centres
    span the scan's extent in world space."""
    rng = np.random.default_rng(0)
    if stored == "sagittal":
        direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # slices along world x
        vol = Volume(rng.normal(-700, 50, (40, 8, 48)).astype(np.int16), (0.8, 2.5, 0.7), (5.0, -3.0, 20.0), direction, "CT")
    else:
        c, s_ = np.cos(0.3), np.sin(0.3)
        vol = Volume(rng.normal(-700, 50, (8, 40, 48)).astype(np.int16), (0.7, 0.8, 2.5), (-12.5, 30.0, 101.0),
                     np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1.0]]), "CT")
    path = write_volume(vol, tmp_path / "in.nii.gz")
    att = tmp_path / "a.npz"
    code, _, err = run(segment_args(path, tmp_path / "m.nii.gz", tiny_weights, "--attention", att), capsys)
    assert code == 0, err
    with np.load(att) as a:
        affine, shape = a["affine_ras"], a["counts"].shape[1:]  # (Z, G, G)
    corners_xyz = np.array([[i, j, k, 1.0] for i in (0, shape[2] - 1) for j in (0, shape[1] - 1) for k in (0, shape[0] - 1)])
    cells = (affine @ corners_xyz.T).T[:, :3]
    voxels = np.array([[i, j, k, 1.0] for i in (0, vol.shape[2] - 1) for j in (0, vol.shape[1] - 1) for k in (0, vol.shape[0] - 1)])
    scan = (vol.affine_ras() @ voxels.T).T[:, :3]
    cell_mm = np.abs(affine[:3, :3]).sum(axis=1)  # one cell along each world axis
    assert np.all(cells.min(0) >= scan.min(0) - 1e-3) and np.all(cells.max(0) <= scan.max(0) + 1e-3)
    assert np.all(cells.min(0) - scan.min(0) <= cell_mm) and np.all(scan.max(0) - cells.max(0) <= cell_mm)


def test_same_seed_gives_the_same_mask_and_slices_limit_the_work(ct_path, tmp_path, tiny_weights, capsys):
    a, b, c = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c.nii.gz"
    for out in (a, b):
        assert run(segment_args(ct_path, out, tiny_weights, "--seed", "3", "--threshold", "0.3"), capsys)[0] == 0
    np.testing.assert_array_equal(read_volume(a).array, read_volume(b).array)
    assert run(segment_args(ct_path, c, tiny_weights, "--slices", "1:3", "--threshold", "0.0"), capsys)[0] == 0
    m = read_volume(c).array
    assert m[[0, 3, 4, 5]].sum() == 0 and m.shape == read_volume(ct_path).shape


def test_sample_then_evaluate_writes_a_json_summary(tmp_path, tiny_weights, capsys):
    code, out, err = run(["sample", tmp_path / "demo", "--name", "brain_mri"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "demo" / "cases.csv")))
    assert [r["case_id"] for r in rows] == ["brain_mri"]
    with open(tmp_path / "demo" / "cases.csv", "w", newline="") as f:  # the tiny bank only knows PROMPT
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**rows[0], "prompt": PROMPT}])
    js = tmp_path / "eval.json"
    code, out, err = run(["evaluate", tmp_path / "demo", "--json", js, "--weights", tiny_weights, "--device", "cpu",
                          "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(js.read_text())
    assert summary["n_cases"] == 1 and 0.0 <= summary["mean_dice"] <= 1.0
    assert summary["cases"][0]["case_id"] == "brain_mri" and summary["weights_sha256"] == weights.sha256(tiny_weights)
    assert "mean Dice" in out
    # An existing --json file is kept unless --overwrite (checked before the evaluation runs).
    before = js.read_bytes()
    again = ["evaluate", tmp_path / "demo", "--json", js, "--weights", tiny_weights, "--device", "cpu", "--quiet",
             "--runs", "2", "--threshold", "1"]
    code, out, err = run(again, capsys)
    assert code == 2 and str(js) in err and "--overwrite" in err and "mean Dice" not in out
    assert js.read_bytes() == before
    # Threshold and runs reach the segmenter: at threshold 1 nothing is marked, so Dice is 0.
    code, out, err = run([*again, "--overwrite"], capsys)
    assert code == 0, err
    summary = json.loads(js.read_text())
    assert summary["mean_dice"] == 0.0 and "--runs 2 --threshold 1" in summary["command"]
    assert summary["mirror"] is DEFAULT_MIRROR


def test_info_names_the_weights_and_their_prompts(tiny_weights, capsys):
    code, out, _ = run(["info", "--weights", tiny_weights], capsys)
    assert code == 0
    assert weights.sha256(tiny_weights) in out and "lung nodule" in out and "torch" in out


def test_info_says_the_bundled_weights_steps_are_their_last_legs():
    """'trained 1600 steps' read as the whole training; it was the last leg, warm-started."""
    from boltzformer.cli import _trained_words

    bundled = weights.read_config(weights.resolve(None).config_path)
    said = _trained_words(bundled)
    assert said.startswith(f"its last training leg: {bundled['trained_steps']} steps, warm-started from ")
    assert _trained_words({"trained_steps": 40, "training": {"config": {"init_weights": None}}}) == "trained 40 steps"


# -- bad input: one line naming the problem, exit 2, nothing written ----------------------------------
def _corrupt(tmp_path):
    p = tmp_path / "corrupt.nii.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00" + b"not really gzip" * 10)
    return p


def _four_d(tmp_path):
    p = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), str(p))
    return p


def _rgb(tmp_path):
    p = tmp_path / "rgb.nii.gz"
    img = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(img, str(p))
    return p


def _nan(tmp_path):
    p = tmp_path / "nan.nii.gz"
    a = np.zeros((4, 8, 8), np.float32)
    a[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(p))
    return p


def _nifti_with_header(tmp_path, name, edit, data=None):
    """A small NIfTI whose header `edit(header)` then corrupts (nibabel writes what it is given)."""
    p = tmp_path / name
    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.float32) if data is None else data, np.eye(4))
    edit(img.header)
    nib.save(img, str(p))
    return p


def _zero_dim(tmp_path):  # ITK read dim[3] = 0 as one slice, silently
    p = _nifti_with_header(tmp_path, "dim0.nii", lambda h: None)
    raw = bytearray(p.read_bytes())
    raw[46:48] = (0).to_bytes(2, "little")  # dim[3]: the header's shorts dim[0..7] start at byte 40
    p.write_bytes(bytes(raw))
    return p


def _huge_voxels(tmp_path):
    p = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.diag([1e30, 1.0, 1.0, 1.0])), str(p))
    return p


def _complex(tmp_path):
    p = tmp_path / "kspace.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.complex64)), str(p))
    return p


def _vector_5d(tmp_path):
    return _nifti_with_header(tmp_path, "vec.nii.gz", lambda h: None, np.zeros((8, 8, 4, 1, 3), np.float32))


def _sheared(tmp_path):
    p = tmp_path / "sheared.nii.gz"
    affine = np.array([[1.0, 0.4, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), affine), str(p))
    return p


@pytest.mark.parametrize("make, expected", [
    (lambda t: t / "missing.nii.gz", "does not exist"),
    (_sheared, "sheared.nii.gz: its sform is sheared within the slice plane"),
    (_zero_dim, "dim0.nii: its header gives 8 x 8 x 0 voxels, none along z"),
    (_huge_voxels, "huge.nii.gz: its voxel size along x is 1e+30 mm"),
    (_complex, "kspace.nii.gz: has complex-valued voxels"),
    (_vector_5d, "vec.nii.gz: is 5D (1 x 3 beyond x, y, z: a vector image?)"),
    (_corrupt, "corrupt.nii.gz"),
    (_four_d, "fmri.nii.gz"),
    (_rgb, "rgb.nii.gz"),
    (_nan, "nan.nii.gz"),
    (lambda t: (t / "notes.txt").write_text("hello") and t / "notes.txt", "not a supported format"),
])
def test_unreadable_inputs_are_one_line_errors(make, expected, tmp_path, tiny_weights, capsys):
    out = tmp_path / "out.nii.gz"
    code, _, err = run(segment_args(make(tmp_path), out, tiny_weights), capsys)
    assert code == 2
    assert err.startswith("boltzformer: error:") and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("extra, expected", [
    (["--slices", "9:3"], "--slices"),
    (["--slices", "a:b"], "--slices"),
    (["--slices", "50:60"], "ct.nii.gz: slice range 50:60 selects no slice of its 6 slices"),
    (["--window", "disco"], "unknown CT window 'disco'; choose one of lung,"),  # the library's message (intensity.check_window)
    (["--threshold", "1.5"], "--threshold"),
    (["--min-nodule-score", "2"], "--min-nodule-score"),
    (["--runs", "0"], "--runs"),
    (["--lesions", "x.txt"], ".csv or .json"),
    (["--attention", "x.png"], ".npz"),
])
def test_bad_options_are_refused_before_any_output(extra, expected, ct_path, tmp_path, tiny_weights, capsys):
    out = tmp_path / "out.nii.gz"
    code, _, err = run(segment_args(ct_path, out, tiny_weights, *extra), capsys)
    assert code == 2 and expected in err and "Traceback" not in err
    assert not out.exists()


def test_a_slice_range_past_the_end_is_segmented_up_to_the_end_with_a_warning(ct_path, tmp_path, tiny_weights, capsys):
    code, _, err = run(segment_args(ct_path, tmp_path / "o.nii.gz", tiny_weights, "--slices", "2:100"), capsys)
    assert code == 0 and "slice range 2:100 reaches past the volume's 6 slices; slices 2:6 were segmented" in err


def test_the_inputs_warnings_come_before_the_run_and_once(ct_path, tmp_path, tiny_weights, capsys, monkeypatch):
    """A run of 10 000 slices said that its 1 x 1 pixel slices were too small only after its
    282 s: the warnings known before the network runs were kept to the end."""
    from boltzformer.segmenter import Segmenter

    said, predict = [], Segmenter.predict_batch
    monkeypatch.setattr(cli, "_warn", said.append)
    monkeypatch.setattr(Segmenter, "predict_batch", lambda *a, **k: said.append("<batch>") or predict(*a, **k))
    code, _, _ = run(segment_args(ct_path, tmp_path / "o.nii.gz", tiny_weights, "--slices", "2:100"), capsys)
    past = [w for w in said if "reaches past the volume's 6 slices" in w]
    assert code == 0 and len(past) == 1 and said.index(past[0]) < said.index("<batch>")


def test_empty_prompt(ct_path, tmp_path, tiny_weights, capsys):
    code, _, err = run(["segment", ct_path, "-p", "  ", "-o", tmp_path / "o.nii.gz", "--weights", tiny_weights], capsys)
    # the library's message (options.check_prompt_text), checked before the volume is read
    assert code == 2 and 'boltzformer: error: the prompt is empty; type what to segment, e.g. "lung nodule"' in err


def test_existing_output_is_kept_without_overwrite(ct_path, tmp_path, tiny_weights, capsys):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    code, _, err = run(segment_args(ct_path, out, tiny_weights), capsys)
    assert code == 2 and "out.nii.gz" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"
    assert run(segment_args(ct_path, out, tiny_weights, "--overwrite"), capsys)[0] == 0
    assert read_volume(out).shape == read_volume(ct_path).shape


def test_output_in_a_missing_folder_or_on_the_input(ct_path, tmp_path, tiny_weights, capsys):
    code, _, err = run(segment_args(ct_path, tmp_path / "nope" / "o.nii.gz", tiny_weights), capsys)
    assert code == 2 and "nope" in err
    code, _, err = run(segment_args(ct_path, ct_path, tiny_weights, "--overwrite"), capsys)
    assert code == 2 and "input" in err
    code, _, err = run(segment_args(ct_path, tmp_path / "o.txt", tiny_weights), capsys)
    assert code == 2 and "o.txt" in err


def test_no_bundled_weights_is_a_clear_error(ct_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "bundled_weights", lambda: None)
    code, _, err = run(["segment", ct_path, "-p", PROMPT, "-o", tmp_path / "o.nii.gz", "--device", "cpu"], capsys)
    assert code == 2 and "weights" in err and "Traceback" not in err


def test_missing_weights_file(ct_path, tmp_path, capsys):
    code, _, err = run(segment_args(ct_path, tmp_path / "o.nii.gz", tmp_path / "none.safetensors"), capsys)
    assert code == 2 and "none.safetensors" in err


def test_interrupt_leaves_no_output(ct_path, tmp_path, tiny_weights, monkeypatch, capsys):
    from boltzformer import segmenter

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(segmenter.Segmenter, "iter_segment", interrupted)
    outs = [tmp_path / "m.nii.gz", tmp_path / "l.csv"]
    code, _, err = run(segment_args(ct_path, outs[0], tiny_weights, "--lesions", outs[1]), capsys)
    assert code == 130 and "interrupted" in err  # as a shell reports Ctrl-C: a loop over scans stops
    assert list(tmp_path.iterdir()) == [ct_path]  # no outputs, no temporary files


def test_running_out_of_cpu_memory_is_one_line_that_names_the_batch_size_when_raised(ct_path, tmp_path, tiny_weights,
                                                                                   monkeypatch, capsys):
    """torch's CPU allocator raises RuntimeError, not MemoryError: it was 'unexpected RuntimeError', exit 1."""
    from boltzformer import segmenter

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1073741824 bytes")
        yield

    monkeypatch.setattr(segmenter.Segmenter, "iter_segment", no_memory)
    code, _, err = run(segment_args(ct_path, tmp_path / "m.nii.gz", tiny_weights, "--batch-size", "512"), capsys)
    assert code == 2 and "out of memory" in err and "a smaller --batch-size (it is 512" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.nii.gz").exists()


def test_debug_shows_the_traceback(tmp_path, tiny_weights):
    from boltzformer.errors import InputError

    with pytest.raises(InputError):
        cli.main(["--debug", "segment", str(tmp_path / "missing.nii.gz"), "-p", PROMPT, "-o", str(tmp_path / "o.nii.gz"),
                  "--weights", tiny_weights])


def test_unexpected_failure_is_reported_without_a_traceback(ct_path, tmp_path, tiny_weights, monkeypatch, capsys):
    from boltzformer import segmenter

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")
        yield

    monkeypatch.setattr(segmenter.Segmenter, "iter_segment", broken)
    code, _, err = run(segment_args(ct_path, tmp_path / "o.nii.gz", tiny_weights), capsys)
    assert code == 1 and "boom" in err and "--debug" in err and "Traceback" not in err
    assert f"{ct_path}: unexpected RuntimeError: boom" in err  # the scan it met: a report can name it
    assert not (tmp_path / "o.nii.gz").exists()


def test_evaluate_bad_folders(tmp_path, tiny_weights, capsys):
    code, _, err = run(["evaluate", tmp_path / "nope", "--weights", tiny_weights], capsys)
    assert code == 2 and "nope" in err
    (tmp_path / "d").mkdir()
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights], capsys)
    assert code == 2 and "cases.csv" in err
    (tmp_path / "d" / "cases.csv").write_text("case_id,prompt\nc1,lung nodule\n")
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights, "--quiet"], capsys)
    assert code == 2 and "c1_image.nii.gz" in err and "does not exist" in err
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights, "--cases", "zz", "--quiet"], capsys)
    assert code == 2 and "has no case 'zz' (--cases)" in err
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights, "--runs", "0"], capsys)
    assert code == 2 and "--runs 0" in err
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights, "--threshold", "1.5"], capsys)
    assert code == 2 and "--threshold 1.5" in err
    # A split is data passed in: --split names a split of --split-file, never ids in the code.
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights, "--split", "heldout"], capsys)
    assert code == 2 and "--split heldout needs --split-file" in err
    (tmp_path / "split.csv").write_text("case_id,split\nc1,train\n")
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights, "--split", "heldout", "--split-file",
                        tmp_path / "split.csv", "--quiet"], capsys)
    assert code == 2 and "no cases selected" in err and "split=heldout" in err
    (tmp_path / "bad.csv").write_text("case,part\nc1,train\n")
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights, "--split", "train", "--split-file",
                        tmp_path / "bad.csv", "--quiet"], capsys)
    assert code == 2 and "bad.csv: needs the columns case_id,split" in err
    code, _, err = run(["evaluate", tmp_path / "d", "--weights", tiny_weights, "--split", "train", "--split-file",
                        tmp_path / "split.csv", "--quiet"], capsys)
    assert code == 2 and "c1_image.nii.gz" in err  # c1 selected by the split file


def test_evaluate_never_writes_over_its_inputs_and_names_the_bad_row(tmp_path, tiny_weights, capsys):
    folder = tmp_path / "d"
    assert run(["sample", folder, "--name", "chest_ct"], capsys)[0] == 0
    cases = (folder / "cases.csv").read_bytes()
    mask = (folder / "chest_ct_mask.nii.gz").read_bytes()
    for target in ("cases.csv", "chest_ct_mask.nii.gz"):  # --json on an input: data loss, even with --overwrite
        code, _, err = run(["evaluate", folder, "--weights", tiny_weights, "--json", folder / target, "--overwrite",
                            "--quiet"], capsys)
        assert code == 2 and "--json is JSON: use .json" in err
    assert (folder / "cases.csv").read_bytes() == cases and (folder / "chest_ct_mask.nii.gz").read_bytes() == mask
    code, _, err = run(["evaluate", folder, "--weights", tiny_weights, "--cases", ","], capsys)
    assert code == 2 and "names no case" in err
    code, _, err = run(["evaluate", folder, "--weights", tiny_weights, "--split-file", folder / "cases.csv"], capsys)
    assert code == 2 and "needs --split NAME" in err
    for rows, expected in (
            ("chest_ct,lung nodule,CT\nchest_ct,aorta,CT\n", "cases.csv: line 3: case_id 'chest_ct' again (first on line 2)"),
            ("chest_ct,lung nodule,XRAY\n", "cases.csv: line 2: modality 'XRAY' of 'chest_ct' is neither CT nor MR"),
            ("chest_ct, ,CT\n", "cases.csv: line 2: case 'chest_ct': the prompt is empty"),
            ("chest_ct\n", "cases.csv: line 2: case 'chest_ct': the prompt is empty")):
        (folder / "cases.csv").write_text("case_id,prompt,modality\n" + rows)
        code, _, err = run(["evaluate", folder, "--weights", tiny_weights, "--quiet"], capsys)
        assert code == 2 and expected in err, err


def test_a_prompt_that_is_not_utf8_is_a_one_line_error(ct_path, tmp_path, tiny_weights, capsys):
    """Bytes that are not UTF-8 reach argv as lone surrogates; the tokenizer failed on them."""
    out = tmp_path / "o.nii.gz"
    code, _, err = run(["segment", ct_path, "-p", "lung \udcff nodule", "-o", out, "--weights", tiny_weights], capsys)
    assert code == 2 and "is not valid UTF-8 text" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("typed, read_as", [("l\u00e9sion pulmonaire".encode("utf-8"), "l\u00e9sion pulmonaire"),
                                             (b"l\xe9sion", "l\udce9sion")])
def test_a_prompt_typed_under_the_c_locale_is_read_as_utf8(typed, read_as):
    """With LC_ALL=C and UTF-8 mode off, Python decodes argv as ASCII: a typed 'lésion' reached the
    prompt check as surrogates and was refused as 'not valid UTF-8'. Its bytes are UTF-8 and are
    read so; bytes that are not UTF-8 (Latin-1 0xE9 here) stay surrogates, which the check refuses."""
    import os as _os
    import subprocess
    import sys as _sys

    code = ("import sys; from boltzformer import cli\n"
            "args = cli.build_parser().parse_args(sys.argv[1:])\n"
            "print(ascii(args.prompt))\n")
    env = {**_os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run([_sys.executable, "-c", code, "segment", "x.nii.gz", "-p", typed, "-o", "y.nii.gz"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ascii(read_as)


@pytest.mark.parametrize("argv, said", [
    (["bench", "volume", "--slices", ""], "give slice counts of at least 1"),
    (["bench", "volume", "--slices", "8", "--weights", "/nowhere/w.safetensors"], "/nowhere/w.safetensors"),
    (["bench", "volume", "--slices", "8", "--json", "v.md"], "give a .json path"),
    (["bench", "decoder", "--json", "/nowhere/x.json"], "its folder /nowhere does not exist"),
    (["bench", "decoder", "--device", "foo"], "invalid choice: 'foo'"),
    (["bench", "decoder", "--slices", "8"], "bench decoder: --slices does not apply to it"),  # was ignored
    (["bench", "volume", "--repeats", "3"], "bench volume: --repeats does not apply to it"),
    (["bench", "volume", "--batch", "8"], "bench volume: --batch does not apply to it"),
])
def test_bench_arguments_are_checked_before_any_timing(argv, said, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and said in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_bench_slices_must_be_counts(capsys):
    code, _, err = run(["bench", "volume", "--slices", "abc"], capsys)
    assert code == 2 and "--slices 'abc'" in err


def test_sample_refuses_to_overwrite(tmp_path, capsys):
    assert run(["sample", tmp_path, "--name", "brain_mri"], capsys)[0] == 0
    before = (tmp_path / "brain_mri_image.nii.gz").read_bytes()
    code, _, err = run(["sample", tmp_path, "--name", "brain_mri"], capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "brain_mri_image.nii.gz").read_bytes() == before


def test_a_closed_output_pipe_is_one_line_and_exit_141(tmp_path):
    """`boltzformer evaluate DIR | head -1`: the reader leaves early; no traceback, no "unexpected"."""
    import subprocess
    import sys as _sys

    code = ("import sys; from boltzformer import cli\n"
            "def chatty(args):\n"
            "    for i in range(100000):\n"
            "        print('line', i)\n"
            "cli_args = cli.build_parser().parse_args(['info'])\n"
            "cli_args.func, cli_args.argv, cli_args.committed = chatty, None, False\n"
            "sys.exit(cli._run(cli_args))\n")
    proc = subprocess.run(f"set -o pipefail; {_sys.executable} -c \"{code}\" | head -1", shell=True,
                          capture_output=True, text=True,
                          cwd=tmp_path, executable="/bin/bash")
    assert proc.stdout == "line 0\n" and proc.returncode == 141
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("boltzformer: error: standard output was closed"), proc.stderr
    assert "no output file was written" in lines[0] and "Traceback" not in proc.stderr


def test_a_run_that_finds_lesions_says_they_are_an_estimate_unless_quiet(ct_path, tmp_path, tiny_weights, capsys):
    args = segment_args(ct_path, tmp_path / "m.nii.gz", tiny_weights, "--threshold", "0.0", "--min-nodule-score", "0")
    code, stdout, err = run(args, capsys)  # --quiet
    assert code == 0 and "not a medical device" not in err
    code, stdout, err = run([a for a in args if a != "--quiet"] + ["--overwrite"], capsys)
    assert code == 0 and not stdout.startswith("0 lesion(s)")
    assert "boltzformer: note: a research model's estimate, not a medical device: review every lesion" in err


def test_the_summary_line_says_what_the_filters_dropped_and_which_passes_ran():
    from types import SimpleNamespace

    result = SimpleNamespace(lesions=[{"volume_mm3": 1500.0}, {"volume_mm3": 500.0}], rejected=[{}] * 9,
                             prompt="multiple sclerosis lesion", slices=(0, 182), mirror=False, planes="axial")
    line = cli.summary_line(result, 4.7, "cpu", "out.nii.gz")
    assert line == ("2 lesion(s) for 'multiple sclerosis lesion', total 2.00 mL (9 more dropped by the false-positive "
                    "filter; --no-fp-filter keeps them); 182 slices in 4.7 s on cpu; mask -> out.nii.gz")
    result.rejected, result.mirror = [], True
    line = cli.summary_line(result, 9.1, "cpu", "out.nii.gz")
    assert "dropped" not in line and "182 slices (each also mirrored) in 9.1 s on cpu" in line
    result.planes = "three"
    line = cli.summary_line(result, 27.0, "cpu", "out.nii.gz")
    assert ("182 slices (each also mirrored; three planes: the coronal and sagittal slices too) in 27.0 s" in line)
    result.mirror = False
    assert "182 slices (three planes: the coronal and sagittal slices too) in" in cli.summary_line(result, 1, "cpu", "o")
    result.slices, result.planes = (4, 5), "axial"
    assert "; 1 slice in 1.0 s on cpu" in cli.summary_line(result, 1, "cpu", "o")  # a single 2D image
    # a sagittal scan of 256 slices is segmented in the 64 axial slices of its canonical frame
    result.slices = (0, 256)
    result.reorientation, result.frame = SimpleNamespace(keeps_slices=False), SimpleNamespace(shape=(64, 256, 256))
    assert "; 64 axial slices in 1.0 s" in cli.summary_line(result, 1, "cpu", "o")


@pytest.mark.parametrize("flag, expected", [("three", "three"), ("auto", "auto"), (None, DEFAULT_PLANES)])
def test_planes_option_reaches_the_segmenter(ct_path, tmp_path, tiny_weights, capsys, keyword_spy, flag, expected):
    """segment --planes (default: options.DEFAULT_PLANES) reaches iter_segment; the run's last line
    says when three planes ran."""
    from boltzformer.segmenter import Segmenter

    seen = keyword_spy(Segmenter, "iter_segment", "planes")
    extra = ["--planes", flag] if flag else []
    code, out, err = run(segment_args(ct_path, tmp_path / "m.nii.gz", tiny_weights, *extra), capsys)
    assert code == 0, err
    assert seen == [expected]
    # the small CT (auto: CT stays axial; three: too thin along one axis, said as a warning)
    assert "three planes" not in out
    assert ("three planes were not run" in err) == (flag == "three")


@pytest.mark.parametrize("flag, expected", [("--mirror", True), ("--no-mirror", False), (None, DEFAULT_MIRROR)])
def test_mirror_switch_reaches_every_network_pass(ct_path, tmp_path, tiny_weights, capsys, keyword_spy, flag, expected):
    """segment --mirror / --no-mirror (default: options.DEFAULT_MIRROR) sets predict_batch's mirror."""
    from boltzformer.segmenter import Segmenter

    seen = keyword_spy(Segmenter, "predict_batch", "mirror")
    extra = [flag] if flag else []
    code, _, err = run(segment_args(ct_path, tmp_path / "m.nii.gz", tiny_weights, *extra), capsys)
    assert code == 0, err
    assert seen and set(seen) == {expected}
