"""Issue 18 through the `boltzformer` command: every case is one line, exit 2, and leaves all of
a run's outputs or none (full disk, bad names, failures and signals while writing), DICOM gaps
and single slices keep their geometry, option values are checked as they are parsed."""

from __future__ import annotations

import errno
import os
import signal

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from boltzformer import io
from boltzformer.io import read_volume

from ._full_disk import fill, tiny_disk  # noqa: F401 - fixture
from .test_cli import PROMPT, ct_path, run, segment_args, tiny_weights  # noqa: F401 - fixtures
from .io.test_io import write_ct_series


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def no_inference(monkeypatch):
    """Fail the test if the network is loaded: the error must come before any inference."""
    from boltzformer import segmenter

    def refuse(*args, **kwargs):
        raise AssertionError("inference started before the bad option was reported")

    monkeypatch.setattr(segmenter.Segmenter, "from_pretrained", classmethod(refuse))


def one_line_error(code, err, *expected, status: int = 2) -> None:
    assert code == status, err
    lines = err.strip().splitlines()  # the error is one line; warnings about the run may come first
    assert lines and lines[-1].startswith("boltzformer: error:"), err
    assert all(line.startswith("boltzformer: warning:") for line in lines[:-1]), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[-1], (text, err)


# -- 1. full disk ---------------------------------------------------------------------------------
def test_full_disk_is_exit_2_and_leaves_nothing(ct_path, tiny_disk, tiny_weights, capsys):
    fill(tiny_disk)
    out = tiny_disk / "m.nii.gz"
    code, stdout, err = run(segment_args(ct_path, out, tiny_weights), capsys)
    one_line_error(code, err, str(out), "no space left on device")
    assert "lesion(s)" not in stdout and files_in(tiny_disk) == [".fill-0"]


def test_probabilities_that_do_not_fit_take_the_mask_with_them(ct_path, tiny_disk, tiny_weights, capsys):
    fill(tiny_disk, leave_bytes=12 * 1024)  # room for the mask, not for the float probabilities
    mask, prob = tiny_disk / "m.nii.gz", tiny_disk / "p.nii.gz"
    code, _, err = run(segment_args(ct_path, mask, tiny_weights, "--probabilities", prob), capsys)
    one_line_error(code, err, "no space left on device")
    assert files_in(tiny_disk) == [".fill-0"]


@pytest.mark.parametrize("failing", ["m.nii.gz", "p.nii.gz", "l.csv"])
def test_enospc_on_any_output_keeps_the_previous_outputs(ct_path, tmp_path, tiny_weights, capsys, monkeypatch, failing):
    outs = {n: tmp_path / n for n in ("m.nii.gz", "p.nii.gz", "l.csv")}
    for n, p in outs.items():
        p.write_bytes(b"previous " + n.encode())
    real_write_image, real_fsync = sitk.WriteImage, os.fsync

    def write_image(image, filename, *args, **kwargs):
        if f".{failing}.tmp-" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_image(image, filename, *args, **kwargs)

    def fsync(fd):
        if failing == "l.csv" and f".{failing}.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(sitk, "WriteImage", write_image)
    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = run(segment_args(ct_path, outs["m.nii.gz"], tiny_weights, "--probabilities", outs["p.nii.gz"],
                                    "--lesions", outs["l.csv"], "--overwrite"), capsys)
    one_line_error(code, err, f"{outs[failing]}: could not be written: no space left on device")
    assert {n: p.read_bytes() for n, p in outs.items()} == {n: b"previous " + n.encode() for n in outs}
    assert files_in(tmp_path) == ["ct.nii.gz", "l.csv", "m.nii.gz", "p.nii.gz"]


# -- 2. all outputs or none -------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["-o", "mask"], "mask: unsupported output format (no extension); -o is an image"),
    (["-o", "m.txt"], "m.txt: unsupported output format ('.txt')"),
    (["-o", "m.png"], "m.png: unsupported output format ('.png')"),
    (["--probabilities", "p.csv"], "p.csv: unsupported output format ('.csv'); --probabilities is an image"),
    (["--uncertainty", "u"], "--uncertainty is an image"),
    (["--attention", "a.png"], "--attention is attention maps: use .npz"),
    (["--lesions", "l.txt"], "--lesions is a lesion table: use .csv or .json"),
    (["--probabilities", "m.nii.gz"], "m.nii.gz: named by both -o and --probabilities"),
    (["--uncertainty", "sub/../m.nii.gz"], "sub/../m.nii.gz: named by both -o and --uncertainty"),
])
def test_output_names_are_refused_before_inference(extra, expected, ct_path, tmp_path, tiny_weights, capsys,
                                                   monkeypatch, no_inference):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    args = segment_args(ct_path, "m.nii.gz", tiny_weights)
    if extra[0] == "-o":
        args[args.index("-o") + 1] = extra[1]
    else:
        args += extra
    code, _, err = run(args, capsys)
    one_line_error(code, err, expected)
    assert files_in(tmp_path) == ["ct.nii.gz", "sub"]


def test_a_failed_rename_takes_back_the_outputs_already_renamed(ct_path, tmp_path, tiny_weights, capsys, monkeypatch):
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        if ".tmp-" in os.fspath(src):
            renamed.append(dst)
            if len(renamed) == 3:
                raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    outs = [tmp_path / n for n in ("m.nii.gz", "p.nii.gz", "a.npz", "l.json")]
    code, _, err = run(segment_args(ct_path, outs[0], tiny_weights, "--probabilities", outs[1], "--attention", outs[2],
                                    "--lesions", outs[3]), capsys)
    one_line_error(code, err, "a.npz: could not be written: input/output error", "no output of this run was kept")
    assert files_in(tmp_path) == ["ct.nii.gz"]


@pytest.mark.parametrize("sig, message", [(signal.SIGINT, "interrupted; no output file was written"),
                                          (signal.SIGTERM, "terminated (SIGTERM); no output file was written")])
@pytest.mark.parametrize("when", ["writing", "renaming"])
def test_a_signal_while_writing_leaves_nothing(ct_path, tmp_path, tiny_weights, capsys, monkeypatch, sig, message, when):
    previous = tmp_path / "p.nii.gz"
    previous.write_bytes(b"previous probabilities")
    if when == "writing":  # after the mask's temporary file is written, before the probabilities
        real = io.OutputSet.write_volume

        def write_volume(self, option, volume):
            real(self, option, volume)
            os.kill(os.getpid(), sig)

        monkeypatch.setattr(io.OutputSet, "write_volume", write_volume)
    else:  # between the renames of the commit
        real_replace = os.replace

        def replace(src, dst):
            real_replace(src, dst)
            if os.fspath(dst).endswith("m.nii.gz"):
                os.kill(os.getpid(), sig)

        monkeypatch.setattr(os, "replace", replace)
    before = signal.getsignal(signal.SIGTERM)
    code, stdout, err = run(segment_args(ct_path, tmp_path / "m.nii.gz", tiny_weights, "--probabilities", previous,
                                         "--lesions", tmp_path / "l.csv", "--overwrite"), capsys)
    one_line_error(code, err, message, status=128 + sig)  # as a shell reports a command the signal killed
    assert "lesion(s)" not in stdout
    assert files_in(tmp_path) == ["ct.nii.gz", "p.nii.gz"] and previous.read_bytes() == b"previous probabilities"
    assert signal.getsignal(signal.SIGTERM) == before  # main() puts the SIGTERM handler back


# -- 3. DICOM series, 5. single slices, 4. qform/sform -------------------------------------------------
@pytest.fixture
def gap_series(tmp_path):
    hu = np.full((6, 40, 48), -700, np.int16)
    keep = [0, 1, 2, 4, 5, 6]
    write_ct_series(tmp_path / "gap", hu, thickness=2.5, offsets_mm=[2.5 * k for k in keep], angle_deg=0.0)
    return tmp_path / "gap"


def test_dicom_gap_needs_allow_gaps(gap_series, tmp_path, tiny_weights, capsys):
    out = tmp_path / "m.nii.gz"
    code, _, err = run(segment_args(gap_series, out, tiny_weights), capsys)
    one_line_error(code, err, str(gap_series), "gap from 105.00 to 110.00 mm (1 slice missing)",
                   "--allow-gaps resamples it onto a uniform grid")
    assert not out.exists()
    code, _, err = run(segment_args(gap_series, out, tiny_weights, "--allow-gaps"), capsys)
    assert code == 0, err
    assert "boltzformer: warning:" in err and "resampled onto a uniform grid of 7 slices 2.5 mm apart" in err
    mask = nib.load(str(out))
    assert mask.shape == (48, 40, 7) and mask.header.get_zooms()[2] == pytest.approx(2.5)


def test_two_series_note_names_the_option(tmp_path, tiny_weights, capsys):
    hu = np.full((3, 40, 48), -700, np.int16)
    write_ct_series(tmp_path / "two", hu, description="Axial", prefix="a")
    write_ct_series(tmp_path / "two", hu[:2], description="Scout", series_number=1, prefix="b")
    code, _, err = run([a for a in segment_args(tmp_path / "two", tmp_path / "m.nii.gz", tiny_weights) if a != "--quiet"],
                       capsys)
    assert code == 0, err
    assert "Found 2 DICOM series; read the largest" in err and "Choose another with --series" in err


@pytest.mark.parametrize("source", ["2D NIfTI", "one DICOM file"])
def test_single_slice_keeps_its_z(source, tmp_path, tiny_weights, capsys):
    if source == "2D NIfTI":
        affine = np.diag([-0.7, -0.8, 2.5, 1.0])
        affine[:3, 3] = [20.0, 30.0, -67.5]
        inp = tmp_path / "slice.nii.gz"
        nib.save(nib.Nifti1Image(np.full((48, 40), -700, np.int16), affine), str(inp))
    else:
        write_ct_series(tmp_path / "one", np.full((1, 40, 48), -700, np.int16), thickness=2.5,
                        origin=(-5.0, 8.0, -82.5), angle_deg=0.0)
        inp = tmp_path / "one"
        affine = read_volume(inp).affine_ras()
        assert affine[2, 3] == pytest.approx(-82.5) and affine[2, 2] == pytest.approx(2.5)
    out = tmp_path / "m.nii.gz"
    code, _, err = run(segment_args(inp, out, tiny_weights, "--probabilities", tmp_path / "p.nii.gz"), capsys)
    assert code == 0, err
    for written in (out, tmp_path / "p.nii.gz"):
        np.testing.assert_allclose(nib.load(str(written)).affine, affine, atol=1e-4)


def test_sform_that_disagrees_with_the_qform_is_followed(tmp_path, tiny_weights, capsys):
    q = np.diag([-0.7, -0.8, 2.5, 1.0])
    q[:3, 3] = [20.0, 30.0, 100.0]
    s = q.copy()
    s[0, 3] += 62.0
    img = nib.Nifti1Image(np.full((48, 40, 4), -700, np.int16), None)
    img.set_qform(q, code=1)
    img.set_sform(s, code=2)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    out = tmp_path / "m.nii.gz"
    code, _, err = run(segment_args(tmp_path / "in.nii.gz", out, tiny_weights), capsys)
    assert code == 0, err
    assert "warning:" in err and "qform and sform disagree (by up to 62.0 mm); the sform is used" in err
    header = nib.load(str(out)).header
    np.testing.assert_allclose(header.get_sform(), s, atol=1e-4)
    np.testing.assert_allclose(header.get_qform(), s, atol=1e-4)


# -- 7. option values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--batch-size", "-4"], "--batch-size -4: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "two"], "--batch-size two: not a whole number"),
    (["--min-lesion-mm3", "nan"], "--min-lesion-mm3 nan: must be a finite number"),
    (["--min-lesion-mm3", "inf"], "--min-lesion-mm3 inf: must be a finite number"),
    (["--min-lesion-mm3", "-1"], "--min-lesion-mm3 -1: must be at least 0"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999: must be at most 9223372036854775807"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),
    (["--threshold", "nan"], "--threshold nan: must be a finite number"),
    (["--threshold", "1.5"], "--threshold 1.5: must be between 0 and 1"),
    (["--runs", "0"], "--runs 0: must be at least 1"),
    (["--runs", "1000"], "--runs 1000: must be at most 100"),
    (["--seed", str(2**63 - 1), "--runs", "2"], "run seeds go up to seed + runs - 1"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--planes", "coronal"], "--planes: invalid choice: 'coronal'"),
])
def test_option_values_are_checked_as_they_are_parsed(extra, expected, ct_path, tmp_path, tiny_weights, capsys,
                                                      no_inference):
    code, _, err = run(segment_args(ct_path, tmp_path / "o.nii.gz", tiny_weights, *extra), capsys)
    one_line_error(code, err, expected)
    assert files_in(tmp_path) == ["ct.nii.gz"]


def test_other_commands_check_their_numbers(tmp_path, capsys):
    for argv, expected in ((["evaluate", tmp_path, "--seed", "-3"], "--seed -3: must be at least 0"),
                           (["testset", tmp_path, "--count", "0"], "--count 0: must be at least 1"),
                           (["bench", "decoder", "--repeats", "0"], "--repeats 0: must be at least 1"),
                           (["train", "--config", "c.json", "--out", tmp_path, "--max-minutes", "nan"],
                            "--max-minutes nan: must be a finite number")):
        one_line_error(*run(argv, capsys)[::2], expected)


def test_a_very_long_prompt_is_refused(ct_path, tmp_path, tiny_weights, capsys, no_inference):
    args = segment_args(ct_path, tmp_path / "o.nii.gz", tiny_weights)
    args[args.index("-p") + 1] = "a" * 10_000
    one_line_error(*run(args, capsys)[::2], "the prompt is 10000 characters long; at most 500")


# -- 8, 9: evaluate and sample ---------------------------------------------------------------------------
def test_cases_csv_with_a_bom_and_in_latin_1(tmp_path, tiny_weights, capsys):
    assert run(["sample", tmp_path, "--name", "brain_mri"], capsys)[0] == 0
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text(f"case_id,prompt,modality\nbrain_mri,{PROMPT},MR\n", encoding="utf-8-sig")
    code, out, err = run(["evaluate", tmp_path, "--weights", tiny_weights, "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert "brain_mri" in out
    csv_path.write_text("case_id,prompt\nbrain_mri,lung nodule\nbrain_mri,lésion\n", encoding="latin-1")
    one_line_error(*run(["evaluate", tmp_path, "--weights", tiny_weights, "--quiet"], capsys)[::2],
                   f"{csv_path}: line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8")


def test_sample_into_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_line_error(*run(["sample", tmp_path / "f"], capsys)[::2], f"{tmp_path / 'f'}: exists and is not a folder")


def test_sample_and_testset_refuse_a_file_name(tmp_path, capsys):
    """`sample out/x.nii.gz` used to make a folder called x.nii.gz."""
    for cmd in (["sample", tmp_path / "out" / "x.nii.gz"], ["testset", tmp_path / "t.csv", "--count", "1"]):
        one_line_error(*run(cmd, capsys)[::2], "file, but the")
    (tmp_path / "f").write_text("x")
    one_line_error(*run(["testset", tmp_path / "f", "--count", "1"], capsys)[::2],
                   f"{tmp_path / 'f'}: exists and is not a folder")
    assert files_in(tmp_path) == ["f"]


def test_sample_leaves_nothing_when_it_fails(tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up at the last file, cases.csv
        if "cases.csv.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = run(["sample", tmp_path / "new" / "demo", "--name", "brain_mri"], capsys)
    one_line_error(code, err, f"{tmp_path / 'new' / 'demo' / 'cases.csv'}: could not be written: no space left on device")
    assert files_in(tmp_path) == []  # no image, no temporary file, not even the folders it made


# -- 10. odds and ends --------------------------------------------------------------------------------
def test_dangling_symlink_output(ct_path, tmp_path, tiny_weights, capsys):
    link = tmp_path / "m.nii.gz"
    link.symlink_to("nowhere/target.nii.gz")
    one_line_error(*run(segment_args(ct_path, link, tiny_weights), capsys)[::2],
                   "symbolic link to nowhere/target.nii.gz, which is missing; pass --overwrite")
    assert link.is_symlink()


def test_gzip_named_nii_and_fifo_inputs(ct_path, tmp_path, tiny_weights, capsys):
    (tmp_path / "in.nii").write_bytes(ct_path.read_bytes())
    one_line_error(*run(segment_args(tmp_path / "in.nii", tmp_path / "o.nii.gz", tiny_weights), capsys)[::2],
                   "is gzip-compressed but named .nii; rename it to .nii.gz")
    os.mkfifo(tmp_path / "pipe.nii.gz")
    one_line_error(*run(segment_args(tmp_path / "pipe.nii.gz", tmp_path / "o.nii.gz", tiny_weights), capsys)[::2],
                   "pipe.nii.gz: is a FIFO (named pipe), not a regular file")
