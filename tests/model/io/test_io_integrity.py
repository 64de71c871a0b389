"""Issue 18 at the io level: nothing lost, nothing misplaced.

Checked writes (full disk, short writes), outputs committed together (OutputSet), DICOM slice
positions (gaps, uneven steps, duplicates, odd or unreadable files, --allow-gaps), the NIfTI
qform/sform rule checked against nibabel, and inputs refused at once (FIFO, gzip named .nii).
"""

from __future__ import annotations

import errno
import gzip
import os
import signal
import threading

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from boltzformer.errors import InputError, OutputError, SliceSpacingError
from boltzformer.io import OutputSet, Volume, atomic_output, read_volume, write_volume

from .._full_disk import fill, tiny_disk  # noqa: F401 - fixture
from .test_io import write_ct_series

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


@pytest.fixture
def small() -> Volume:
    rng = np.random.default_rng(3)
    return Volume(rng.normal(size=(6, 20, 24)).astype(np.float32), (0.7, 0.8, 2.5), (-12.5, 30.0, -82.5))


def leftovers(folder) -> list[str]:
    """Hidden temporary or backup files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))


def one_line(message: str) -> bool:
    return "\n" not in message and "sitk::" not in message and "Traceback" not in message


# ----------------------------------------------------------------------------------------------
# 1. Every write is checked
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", EXTENSIONS)
def test_full_disk_is_an_error_and_keeps_the_previous_file(tiny_disk, small, ext):
    """A real full file system (64 KiB tmpfs): ITK writes 0 bytes without a word; we say so."""
    target = tiny_disk / f"mask{ext}"
    with pytest.raises(OutputError, match="no space left on device") as err:
        fill(tiny_disk)
        write_volume(small, target)
    assert str(target) in str(err.value) and one_line(str(err.value))
    assert not target.exists() and leftovers(tiny_disk) == []
    # a good existing file survives an --overwrite that does not fit
    for p in tiny_disk.iterdir():
        p.unlink()
    good = write_volume(small.with_array(np.zeros(small.shape, np.uint8)), target)
    before = good.read_bytes()
    fill(tiny_disk)
    with pytest.raises(OutputError, match="no space left on device"):
        write_volume(small, target, overwrite=True)
    assert target.read_bytes() == before and leftovers(tiny_disk) == []


def test_full_disk_for_tables_and_other_files(tiny_disk):
    from boltzformer.postprocess import write_lesion_table

    fill(tiny_disk)
    with pytest.raises(OutputError, match="no space left on device") as err:
        write_lesion_table([{"lesion_id": 1, "voxels": 3, "volume_mm3": 4.5}] * 400, tiny_disk / "l.csv")
    assert str(tiny_disk / "l.csv") in str(err.value)
    with pytest.raises(OutputError, match="no space left on device"):
        with atomic_output(tiny_disk / "a.npz") as tmp:
            np.savez_compressed(tmp, x=np.random.default_rng(0).normal(size=50_000))
    assert sorted(p.name for p in tiny_disk.iterdir()) == [".fill-0"]


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_enospc_from_the_writer_names_the_file_and_keeps_the_old_one(tmp_path, small, ext, monkeypatch):
    """The same without a tmpfs: the write raises OSError(ENOSPC) half-way."""
    target = tmp_path / f"mask{ext}"
    target.write_bytes(b"the previous, good mask")

    def full(image, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sitk, "WriteImage", full)
    with pytest.raises(OutputError) as err:
        write_volume(small, target, overwrite=True)
    assert str(err.value) == f"{target}: could not be written: no space left on device"
    assert target.read_bytes() == b"the previous, good mask" and leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_a_silently_short_write_is_caught(tmp_path, small, ext, monkeypatch):
    """ITK returns normally after a short write: the size / header read-back check catches it."""
    good = write_volume(small, tmp_path / f"good{ext}")
    data = good.read_bytes()
    real = sitk.WriteImage

    def short(image, filename, *args, **kwargs):
        real(image, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(len(data) * 2 // 3)

    monkeypatch.setattr(sitk, "WriteImage", short)
    target = tmp_path / f"out{ext}"
    with pytest.raises(OutputError, match="could not be written") as err:
        write_volume(small, target)
    assert str(target) in str(err.value) and one_line(str(err.value))
    assert not target.exists() and leftovers(tmp_path) == []


def test_enospc_in_text_writes_and_fsync(tmp_path, monkeypatch):
    with pytest.raises(OutputError, match="no space left on device"):
        with atomic_output(tmp_path / "t.csv") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device")
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(OutputError, match="disk quota exceeded"):
        with OutputSet() as outputs:
            outputs.add(tmp_path / "r.json", "--json")
            outputs.write_bytes("--json", b"{}")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# 2. The outputs of one run: all of them or none
# ----------------------------------------------------------------------------------------------
def three_outputs(folder, small, overwrite=False) -> OutputSet:
    outputs = OutputSet(overwrite=overwrite)
    outputs.add(folder / "m.nii.gz", "-o", kind="volume")
    outputs.add(folder / "p.nii.gz", "--probabilities", kind="volume")
    outputs.add(folder / "l.csv", "--lesions", kind="table")
    outputs.write_volume("-o", small.with_array(small.array > 0))
    outputs.write_volume("--probabilities", small)
    outputs.write_bytes("--lesions", b"lesion_id\n1\n")
    return outputs


def test_output_set_commits_all(tmp_path, small):
    outputs = three_outputs(tmp_path, small)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # nothing before commit
    outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "m.nii.gz", "p.nii.gz"]
    assert read_volume(tmp_path / "p.nii.gz").same_geometry(small)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_between_renames_takes_back_the_renamed(tmp_path, small, monkeypatch, existing):
    if existing:  # --overwrite over a previous run: the previous files come back
        for name in ("m.nii.gz", "p.nii.gz", "l.csv"):
            (tmp_path / name).write_bytes(b"previous " + name.encode())
    outputs = three_outputs(tmp_path, small, overwrite=existing)
    real_replace, calls = os.replace, []

    def failing_second(src, dst):
        calls.append(dst)
        if len([c for c in calls if ".tmp-" in os.fspath(src)]) == 2 and ".tmp-" in os.fspath(src):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(OutputError, match="p.nii.gz: could not be written: input/output error.*no output of this run"):
        outputs.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    if existing:
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
            n: b"previous " + n.encode() for n in ("m.nii.gz", "p.nii.gz", "l.csv")}
    else:
        assert list(tmp_path.iterdir()) == []


def test_a_signal_between_renames_takes_back_the_renamed(tmp_path, small, monkeypatch):
    (tmp_path / "l.csv").write_bytes(b"previous table")
    outputs = three_outputs(tmp_path, small, overwrite=True)
    real_replace = os.replace

    def interrupted_after_first(src, dst):
        real_replace(src, dst)
        if os.fspath(dst).endswith("m.nii.gz"):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the first rename

    monkeypatch.setattr(os, "replace", interrupted_after_first)
    with pytest.raises(KeyboardInterrupt):
        outputs.commit()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"l.csv": b"previous table"}


def test_an_exception_before_commit_removes_every_temporary(tmp_path, small):
    with pytest.raises(KeyboardInterrupt):
        with OutputSet() as outputs:
            outputs.add(tmp_path / "m.nii.gz", "-o", kind="volume")
            outputs.add(tmp_path / "p.nii.gz", "--probabilities", kind="volume")
            outputs.write_volume("-o", small)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_output_names_are_checked_when_added(tmp_path):
    (tmp_path / "sub").mkdir()
    outputs = OutputSet(overwrite=True)
    outputs.add(tmp_path / "m.nii.gz", "-o", kind="volume")
    with pytest.raises(OutputError, match=r"m.nii.gz: named by both -o and --probabilities; give each output its own"):
        outputs.add(tmp_path / "sub" / ".." / "m.nii.gz", "--probabilities", kind="volume")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "m.nii.gz")  # a link to another output is the same file
    with pytest.raises(OutputError, match=r"named by both -o and --uncertainty"):
        outputs.add(tmp_path / "link.nii.gz", "--uncertainty", kind="volume")
    for name, option, kind, expected in (
        ("mask", "-o", "volume", r"mask: unsupported output format \(no extension\); -o is an image: use one of .nii.gz"),
        ("m.png", "-o", "volume", r"\('.png'\)"),
        ("p.csv", "--probabilities", "volume", r"--probabilities is an image"),
        ("l.txt", "--lesions", "table", r"--lesions is a lesion table: use .csv or .json"),
        ("a.png", "--attention", "npz", r"use .npz"),
    ):
        with pytest.raises(OutputError, match=expected):
            OutputSet().add(tmp_path / name, option, kind=kind)


def test_dangling_symlink_and_fifo_outputs(tmp_path, small):
    link = tmp_path / "m.nii.gz"
    link.symlink_to(tmp_path / "missing" / "target.nii.gz")
    with pytest.raises(OutputError, match="symbolic link to .*missing.*--overwrite"):
        write_volume(small, link)
    assert link.is_symlink()
    write_volume(small, link, overwrite=True)  # --overwrite replaces the link itself
    assert not link.is_symlink() and read_volume(link).same_geometry(small)
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="FIFO"):
            write_volume(small, fifo, overwrite=overwrite)
    assert fifo.exists() and not fifo.is_file()


# ----------------------------------------------------------------------------------------------
# 3. DICOM slice positions
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def ramp():
    """Slices whose HU value is 10 per mm along the normal at thickness 2.5: slice k = 25 k."""
    return np.stack([np.full((12, 14), 25 * k, np.int16) for k in range(8)])


def dicom_error(folder, match, cls=InputError, **kwargs) -> str:
    with pytest.raises(cls, match=match) as err:
        read_volume(folder, **kwargs)
    assert str(folder) in str(err.value) and one_line(str(err.value))
    return str(err.value)


def test_a_missing_slice_is_an_error_naming_the_positions(tmp_path, ramp):
    offsets = [2.5 * k for k in range(8) if k != 3]
    write_ct_series(tmp_path / "gap", ramp[[k for k in range(8) if k != 3]], thickness=2.5, offsets_mm=offsets,
                    origin=(0.0, 0.0, -90.0), angle_deg=0.0)
    msg = dicom_error(tmp_path / "gap", "not evenly spaced", SliceSpacingError)
    assert "gap from -85.00 to -80.00 mm (1 slice missing)" in msg and "'Axial CT'" in msg
    assert "--allow-gaps" not in msg  # the option is the command line's; it adds the hint


def test_allow_gaps_resamples_onto_a_uniform_grid(tmp_path, ramp):
    keep = [k for k in range(8) if k not in (3, 5, 6)]
    write_ct_series(tmp_path / "gap", ramp[keep], thickness=2.5, offsets_mm=[2.5 * k for k in keep],
                    origin=(10.0, -20.0, -90.0), angle_deg=30.0)
    vol = read_volume(tmp_path / "gap", allow_gaps=True)
    assert vol.shape == (8, 12, 14)
    np.testing.assert_allclose(vol.spacing_mm[2], 2.5, atol=1e-6)
    np.testing.assert_allclose(vol.origin_mm, (10.0, -20.0, -90.0), atol=1e-4)
    # kept slices are untouched, the missing ones interpolated along the normal: 25 per slice
    np.testing.assert_array_equal(vol.array[:, 0, 0], 25 * np.arange(8))
    assert vol.array.dtype.kind == "i"  # integers stay integers (rounded), as ITK read them
    (warning,) = vol.metadata["warnings"]
    assert "resampled onto a uniform grid of 8 slices 2.5 mm apart" in warning and "3 interpolated" in warning
    # world position of slice k is origin + 2.5 k along the normal, as in the files
    normal = vol.direction[:, 2]
    for k in range(8):
        np.testing.assert_allclose(vol.index_to_world((k, 0, 0)), np.array([10.0, -20.0, -90.0]) + 2.5 * k * normal, atol=1e-4)


def test_uneven_spacing(tmp_path, ramp):
    offsets = [0.0, 2.5, 5.0, 8.3, 10.0, 12.5, 15.0, 17.5]
    write_ct_series(tmp_path / "uneven", ramp, thickness=2.5, offsets_mm=offsets, origin=(0.0, 0.0, 0.0), angle_deg=0.0)
    msg = dicom_error(tmp_path / "uneven", "not evenly spaced", SliceSpacingError)
    assert "step of 3.3 mm from 5.00 to 8.30 mm" in msg
    vol = read_volume(tmp_path / "uneven", allow_gaps=True)
    assert vol.shape[0] == 8 and vol.spacing_mm[2] == pytest.approx(2.5)
    assert vol.array[3, 0, 0] == pytest.approx(75 * (7.5 - 5.0) / 3.3 + 50 * (8.3 - 7.5) / 3.3, abs=0.5)


def test_duplicate_slice_is_an_error_even_with_allow_gaps(tmp_path, ramp):
    offsets = [0.0, 2.5, 5.0, 5.0, 7.5, 10.0, 12.5, 15.0]
    write_ct_series(tmp_path / "dup", ramp, thickness=2.5, offsets_mm=offsets, origin=(0.0, 0.0, 0.0), angle_deg=0.0)
    for allow in (False, True):
        msg = dicom_error(tmp_path / "dup", "duplicate slice position", allow_gaps=allow)
        assert "5.00 mm (s005.dcm, s006.dcm)" in msg or "5.00 mm (s006.dcm, s005.dcm)" in msg


def test_odd_sized_truncated_and_unreadable_files_are_named(tmp_path, ramp):
    write_ct_series(tmp_path / "odd", ramp, thickness=2.5)
    odd = np.zeros((1, 6, 6), np.int16)  # the same series, one slice of another size
    import pydicom

    ds = pydicom.dcmread(tmp_path / "odd" / "s004.dcm")
    ds.Rows, ds.Columns, ds.PixelData = 6, 6, (odd[0].astype(np.uint16) + 1024).tobytes()
    ds.save_as(tmp_path / "odd" / "s004.dcm")
    msg = dicom_error(tmp_path / "odd", "s004.dcm is 6x6 pixels, the other slices 14x12")

    write_ct_series(tmp_path / "cut", ramp, thickness=2.5)
    data = (tmp_path / "cut" / "s003.dcm").read_bytes()
    (tmp_path / "cut" / "s003.dcm").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="s003.dcm") as err:
        read_volume(tmp_path / "cut")
    assert "truncated" in str(err.value) and one_line(str(err.value))

    write_ct_series(tmp_path / "junk", ramp, thickness=2.5)
    (tmp_path / "junk" / "zz.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    msg = dicom_error(tmp_path / "junk", r"zz.dcm in the folder cannot be read as DICOM")
    assert "fix or remove it" in msg
    (tmp_path / "junk" / "notes.txt").write_text("not DICOM and not named so: ignored")
    (tmp_path / "junk" / "zz.dcm").unlink()
    assert read_volume(tmp_path / "junk").shape == (8, 12, 14)


def test_a_fifo_in_a_dicom_folder_is_refused_at_once(tmp_path, ramp):
    write_ct_series(tmp_path / "ct", ramp[:3], thickness=2.5)
    os.mkfifo(tmp_path / "ct" / "pipe")
    done = []
    worker = threading.Thread(target=lambda: done.append(_error_of(read_volume, tmp_path / "ct")), daemon=True)
    worker.start()
    worker.join(20)
    assert done, "read_volume blocked on the FIFO"
    assert "pipe" in done[0] and "FIFO" in done[0]


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except InputError as exc:
        return str(exc)
    return "no error"


# ----------------------------------------------------------------------------------------------
# 4. NIfTI qform / sform, checked against nibabel
# ----------------------------------------------------------------------------------------------
def _affine(shift_x=0.0, angle_deg=0.0):
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.4, 1.2, 2.5])
    affine[:3, 3] = [178.5 + shift_x, -60.0, -82.5]
    return affine


@pytest.mark.parametrize("case", ["sform only", "qform only", "both agree", "both disagree"])
def test_nifti_follows_sform_then_qform(tmp_path, case):
    q, s = _affine(angle_deg=10), _affine(angle_deg=10)
    if case == "both disagree":
        s = _affine(shift_x=62.0, angle_deg=10)
    img = nib.Nifti1Image(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7), None)
    img.set_qform(q if case != "sform only" else None, code=0 if case == "sform only" else 1)
    img.set_sform(s if case != "qform only" else None, code=0 if case == "qform only" else 2)
    path = tmp_path / "in.nii.gz"
    nib.save(img, str(path))
    expected = nib.load(str(path)).affine  # nibabel: sform when sform_code > 0, else qform
    np.testing.assert_allclose(expected, q if case == "qform only" else s, atol=1e-4)

    vol = read_volume(path)
    np.testing.assert_allclose(vol.affine_ras(), expected, atol=1e-4)
    warnings = vol.metadata.get("warnings", [])
    if case == "both disagree":
        (w,) = warnings
        assert "qform and sform disagree (by up to 62.0 mm); the sform is used" in w and str(path) in w
    else:
        assert warnings == []
    out = write_volume(vol.with_array(vol.array > 50), tmp_path / "mask.nii.gz")
    header = nib.load(str(out)).header
    assert header["sform_code"] > 0 and header["qform_code"] > 0  # both written, and the same
    np.testing.assert_allclose(header.get_sform(), expected, atol=1e-4)
    np.testing.assert_allclose(header.get_qform(), expected, atol=1e-4)


def test_pixdim_zero_warns(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    img.header["pixdim"][1:4] = [0.8, 0.0, 0.0]
    nib.save(img, str(tmp_path / "p0.nii"))
    vol = read_volume(tmp_path / "p0.nii")
    assert vol.spacing_mm == (pytest.approx(0.8), 1.0, 1.0)
    assert vol.metadata["warnings"][0] == f"{tmp_path / 'p0.nii'}: voxel size (pixdim) along y, z is 0; 1 mm is assumed"
    img.header["pixdim"][1:4] = [np.nan, 0.0, 0.8]
    nib.save(img, str(tmp_path / "pnan.nii"))
    assert read_volume(tmp_path / "pnan.nii").metadata["warnings"][:2] == [
        f"{tmp_path / 'pnan.nii'}: voxel size (pixdim) along y is 0; 1 mm is assumed",
        f"{tmp_path / 'pnan.nii'}: voxel size (pixdim) along x is not a number; 1 mm is assumed"]


def test_a_file_without_orientation_says_what_is_assumed(tmp_path):
    """A NIfTI with qform_code = sform_code = 0, or an NRRD without 'space', gives no orientation:
    the reader used to take ITK's default silently, and left and right are then a guess."""
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "m1.nii.gz"))
    nrrd = tmp_path / "nospace.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 3 2\nencoding: raw\nendian: little\n\n"
                     + bytes(48))
    for path in (tmp_path / "m1.nii.gz", nrrd):
        vol = read_volume(path)
        (w,) = vol.metadata["warnings"]
        assert w.startswith(f"{path}: says nothing of how it lies in the patient")
        assert "taken as LPS (x towards left, y towards posterior, z towards superior)" in w
        assert vol.geometry_dict()["orientation_unknown"] is True
        back = Volume.from_geometry_dict(vol.array, vol.geometry_dict())
        assert back.metadata["orientation_unknown"] is True
    for path in (write_volume(vol, tmp_path / "ours.nrrd"), tmp_path / "ours.nii.gz"):
        if not path.exists():
            write_volume(vol, path)
        plain = read_volume(path)  # what we write always says where it lies
        assert "orientation_unknown" not in plain.metadata and not plain.metadata.get("warnings")


# ----------------------------------------------------------------------------------------------
# 10. Inputs refused at once, with the right name for the problem
# ----------------------------------------------------------------------------------------------
def test_gzip_file_named_nii(tmp_path, small):
    good = write_volume(small, tmp_path / "a.nii.gz")
    (tmp_path / "b.nii").write_bytes(good.read_bytes())
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "b.nii")
    assert str(err.value) == f"{tmp_path / 'b.nii'}: is gzip-compressed but named .nii; rename it to .nii.gz"
    (tmp_path / "c.nii").write_bytes(gzip.decompress(good.read_bytes()))  # the same, uncompressed: fine
    assert read_volume(tmp_path / "c.nii").same_geometry(small)


def test_fifo_input_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.nii.gz")
    done = []
    worker = threading.Thread(target=lambda: done.append(_error_of(read_volume, tmp_path / "pipe.nii.gz")), daemon=True)
    worker.start()
    worker.join(20)
    assert done, "read_volume blocked on the FIFO"
    assert done[0] == f"{tmp_path / 'pipe.nii.gz'}: is a FIFO (named pipe), not a regular file; give an image file or a DICOM folder"


def test_dangling_symlink_input(tmp_path):
    (tmp_path / "in.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(InputError, match="symbolic link to .*gone.nii.gz, which does not exist"):
        read_volume(tmp_path / "in.nii.gz")


def test_itks_own_printing_stays_off_the_terminal_and_goes_into_the_message(tmp_path, small, capfd):
    """MetaIO prints its reasons to the process's stderr before ITK raises: the user saw that
    text, then our line. Now only our line, carrying the reason."""
    good = write_volume(small, tmp_path / "ok.mha")
    data = good.read_bytes()
    (tmp_path / "short.mha").write_bytes(data[:-300])
    (tmp_path / "header.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    capfd.readouterr()
    with pytest.raises(InputError) as short:
        read_volume(tmp_path / "short.mha")
    with pytest.raises(InputError) as header:
        read_volume(tmp_path / "header.mha")
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""
    assert "truncated MetaImage file (data not read completely)" in str(short.value)
    assert "not a valid MetaImage file or corrupt (DimSize required and not defined)" in str(header.value)
    assert one_line(str(short.value)) and one_line(str(header.value))


def test_itk_quiet_gives_back_what_was_printed_when_the_call_succeeds(capfd):
    from boltzformer.io.itk import itk_quiet

    with itk_quiet() as printed:
        os.write(2, b"another thread's line\n")
    assert printed.text == "another thread's line\n"
    assert capfd.readouterr().err == "another thread's line\n"
    with pytest.raises(RuntimeError), itk_quiet() as printed:
        os.write(2, b"MetaImage: M_Read: Error parsing file\n")
        raise RuntimeError
    assert printed.summary() == "Error parsing file" and capfd.readouterr().err == ""


def test_outputs_get_the_usual_permissions_whatever_their_writer_chose(tmp_path):
    """safetensors creates its files owner-only (0o600): the weights a run wrote could not be
    read by a colleague. Every output ends with the mode of a plain new file (0o666 - umask)."""
    previous = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "w.safetensors") as tmp:
            tmp.write_bytes(b"weights")
            os.chmod(tmp, 0o600)
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_previous_file_that_cannot_be_put_back_is_kept_and_named(tmp_path, monkeypatch):
    """A rollback whose own rename failed (EIO on a network share) removed the backup, the only
    copy of the user's previous mask, and said no output of the run was kept."""
    from boltzformer.io import OutputSet, output

    (tmp_path / "mask.nii.gz").write_text("previous mask")
    (tmp_path / "lesions.csv").write_text("previous table")
    real_replace, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) >= 2:  # the second output's rename fails, and so does putting the first back
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(OutputError) as err:
        with OutputSet(overwrite=True) as outputs:
            for name in ("mask.nii.gz", "lesions.csv"):
                outputs.add(tmp_path / name)
                outputs.write_bytes(str(tmp_path / name), b"new")
    monkeypatch.setattr(output.os, "replace", real_replace)
    [kept] = [p for p in tmp_path.iterdir() if p.name.startswith(".mask.nii.gz.old-")]
    assert kept.read_text() == "previous mask" and (tmp_path / "lesions.csv").read_text() == "previous table"
    assert f"mask.nii.gz could not be set back and holds this run's file; the previous one is kept as {kept}" in str(
        err.value)


def test_a_previous_file_moved_aside_is_put_back_when_the_new_one_cannot_be_renamed(tmp_path, monkeypatch):
    """Without hard links (exFAT, some SMB shares) the previous file is moved aside; when the new
    file's rename then failed (a virus scanner holding it on Windows), the undo removed the moved
    copy, the only one, and said no output of the run was kept."""
    from boltzformer.io import OutputSet, output

    (tmp_path / "lesions.csv").write_text("previous results")
    real_replace = os.replace

    def no_link(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    def replace(src, dst, *args, **kwargs):
        if ".tmp-" in os.fspath(src):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(output.os, "link", no_link)
    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(OutputError, match="no output of this run was kept"):
        with OutputSet(overwrite=True) as outputs:
            outputs.add(tmp_path / "lesions.csv")
            outputs.write_bytes(str(tmp_path / "lesions.csv"), b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["lesions.csv"]
    assert (tmp_path / "lesions.csv").read_text() == "previous results"
