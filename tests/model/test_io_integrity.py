"""Issue 18 at the io level: nothing lost.

Checked writes (full disk, short writes) and outputs committed together (OutputSet).
"""

from __future__ import annotations

import errno
import os
import signal

import numpy as np
import pytest

from boltzformer import io
from boltzformer.errors import OutputError
from boltzformer.io import OutputSet, Volume, atomic_output, read_volume, write_volume

from ._full_disk import fill, tiny_disk  # noqa: F401 - fixture

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

    monkeypatch.setattr(io.sitk, "WriteImage", full)
    with pytest.raises(OutputError) as err:
        write_volume(small, target, overwrite=True)
    assert str(err.value) == f"{target}: could not be written: no space left on device"
    assert target.read_bytes() == b"the previous, good mask" and leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_a_silently_short_write_is_caught(tmp_path, small, ext, monkeypatch):
    """ITK returns normally after a short write: the size / header read-back check catches it."""
    good = write_volume(small, tmp_path / f"good{ext}")
    data = good.read_bytes()
    real = io.sitk.WriteImage

    def short(image, filename, *args, **kwargs):
        real(image, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(len(data) * 2 // 3)

    monkeypatch.setattr(io.sitk, "WriteImage", short)
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
    monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(OutputError, match="disk quota exceeded"):
        with OutputSet() as outputs:
            outputs.add(tmp_path / "r.json", "--json")
            outputs.write_bytes("--json", b"{}")
    monkeypatch.setattr(io.os, "fsync", real_fsync)
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

    monkeypatch.setattr(io.os, "replace", failing_second)
    with pytest.raises(OutputError, match="p.nii.gz: could not be written: input/output error.*no output of this run"):
        outputs.commit()
    monkeypatch.setattr(io.os, "replace", real_replace)
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

    monkeypatch.setattr(io.os, "replace", interrupted_after_first)
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
