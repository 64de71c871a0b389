"""What differs on Windows and macOS, simulated on Linux (the project has no such machine): fsync
of a written file, the cohort's folder lock, peak memory units, file names that ignore case,
case ids Windows cannot name, the umask where /proc does not say, and non-ASCII paths that the
image libraries cannot open on Windows."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import types

import numpy as np
import pytest

from boltzformer.errors import InputError, OutputError
from boltzformer.io import Volume, write_volume


def _volume():
    return Volume(np.zeros((2, 4, 4), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT")


def test_outputs_are_synced_through_a_handle_windows_can_flush(tmp_path, monkeypatch):
    """Windows' fsync needs write access: a read-only handle failed every output with EBADF."""
    real_fsync = os.fsync

    def windows_fsync(fd):
        if os.path.isfile(f"/proc/self/fd/{fd}") and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    monkeypatch.setattr(sys, "platform", "win32")
    written = write_volume(_volume(), tmp_path / "mask.nii.gz")
    monkeypatch.undo()
    assert written.is_file()


def test_the_cohort_lock_works_without_fcntl(tmp_path, monkeypatch):
    """`import fcntl` stopped every cohort on Windows; msvcrt's lock serves there."""
    from boltzformer.cohort import run

    held = []

    def locking(fd, mode, nbytes):
        if held:
            raise PermissionError(errno.EACCES, "locked")
        held.append(fd)

    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl -> ImportError
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(locking=locking, LK_NBLCK=2))
    first = run._lock_out_dir(tmp_path)
    assert f"pid {os.getpid()} on " in (tmp_path / run.LOCK_NAME).read_text()
    with pytest.raises(OutputError, match="another cohort is writing to it"):
        run._lock_out_dir(tmp_path)
    first.close()


def test_peak_memory_is_in_mb_on_linux_and_macos(monkeypatch):
    import resource

    from boltzformer.runtime import peak_rss_mb

    usage = types.SimpleNamespace(ru_maxrss=300 * 1024)
    monkeypatch.setattr(resource, "getrusage", lambda who: usage)
    assert peak_rss_mb() == pytest.approx(300.0)  # KiB on Linux
    monkeypatch.setattr(sys, "platform", "darwin")
    usage.ru_maxrss = 300 * 2**20  # bytes on macOS: was read as 300 GB
    assert peak_rss_mb() == pytest.approx(300.0)


def test_names_that_differ_only_in_case_are_one_file_on_macos_and_windows(tmp_path, monkeypatch, capsys):
    """-o Mask.nii.gz --probabilities mask.nii.gz lost the first output there, and
    `segment scan.nii.gz -o SCAN.nii.gz --overwrite` replaced the scan."""
    from boltzformer import cli
    from boltzformer.io import OutputSet
    from boltzformer.io.output import same_file

    assert not same_file(tmp_path / "Mask.nii.gz", tmp_path / "mask.nii.gz")  # Linux: two files
    monkeypatch.setattr(sys, "platform", "darwin")
    assert same_file(tmp_path / "Mask.nii.gz", tmp_path / "mask.nii.gz")
    outputs = OutputSet()
    outputs.add(tmp_path / "Mask.nii.gz", "-o")
    with pytest.raises(OutputError, match="named by both -o and --probabilities"):
        outputs.add(tmp_path / "mask.nii.gz", "--probabilities")
    scan = write_volume(_volume(), tmp_path / "scan.nii.gz")
    before = scan.read_bytes()
    code = cli.main(["segment", str(scan), "-p", "lung nodule", "-o", str(tmp_path / "SCAN.nii.gz"), "--overwrite"])
    assert code == 2 and "-o would overwrite the input" in capsys.readouterr().err
    assert scan.read_bytes() == before


def test_cohort_case_ids_windows_cannot_name_or_that_differ_only_in_case_are_refused(tmp_path):
    from boltzformer.cohort.scans import list_scans

    scan = write_volume(_volume(), tmp_path / "a.nii.gz")
    for rows, said in ((f"LIDC:0001,{scan}\n", "case_id 'LIDC:0001' cannot name a file"),
                       (f"ct1.,{scan}\n", "case_id 'ct1.' cannot name a file"),
                       (f"CT1,{scan}\nct1,{scan}\n", "line 3: case_id 'ct1' is also on line 2 (as 'CT1': file names "
                                                      "may ignore case)")):
        (tmp_path / "list.csv").write_text("case_id,path\n" + rows)
        with pytest.raises(InputError, match=said.replace("(", r"\(").replace(")", r"\)")):
            list_scans(tmp_path / "list.csv", "lung nodule")


def test_the_umask_is_known_where_proc_does_not_say_it(monkeypatch):
    """macOS has no /proc: a strict umask 077 was taken as 022 (masks readable by every user)."""
    import builtins

    from boltzformer.io import output

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    now = os.umask(0o022)
    os.umask(now)
    assert output._umask() == output._UMASK_AT_IMPORT == now


def test_a_non_ascii_path_is_refused_on_windows_before_the_image_libraries_fail(tmp_path, monkeypatch):
    """SimpleITK opens paths through Windows' ANSI code page: 'C:\\Users\\Jürgen\\ct.nii.gz' was
    'not a valid NIfTI file or corrupt'."""
    from boltzformer.io import read_volume

    scan = write_volume(_volume(), tmp_path / "J\u00fcrgen.nii.gz")
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(InputError, match="its path holds characters outside ASCII, which the image libraries"):
        read_volume(scan)
    with pytest.raises(OutputError, match="its path holds characters outside ASCII"):
        write_volume(_volume(), tmp_path / "r\u00e9sultat.nii.gz")
    monkeypatch.undo()
    assert read_volume(scan).shape == (2, 4, 4)  # elsewhere such names are fine


def test_paths_past_windows_max_path_are_refused_before_any_work(tmp_path, monkeypatch):
    """Without long paths enabled, Windows' image libraries fail on a path of 260 characters or
    more with 'cannot be read' or 'could not be written', naming no cause (and the output's
    temporary file is longer still); now refused at once, saying why, unless long paths are on."""
    from boltzformer import errors
    from boltzformer.io import check_output_path, read_volume

    deep = tmp_path / ("d" * 60) / ("e" * 60) / ("f" * 60)
    scan, mask = deep / ("scan" * 10 + ".nii.gz"), deep / ("mask" * 6 + ".nii.gz")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(errors, "_windows_long_paths_enabled", lambda: False)
    with pytest.raises(InputError, match=r"its path is \d+ characters long; Windows allows 259"):
        read_volume(scan)
    with pytest.raises(OutputError, match="with the temporary name written first; Windows allows 259"):
        check_output_path(mask)
    monkeypatch.setattr(errors, "_windows_long_paths_enabled", lambda: True)
    with pytest.raises(InputError, match="does not exist"):  # long paths on: on to the usual checks
        read_volume(scan)


def test_a_windows_rename_over_a_file_held_open_says_so(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program holds open ('permission denied'): the
    message now names the likely cause; the old file stays and no temporary is left."""
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"open in a viewer")
    real_replace = os.replace

    def windows_replace(src, dst):
        if os.fspath(dst) == os.fspath(target):
            raise PermissionError(errno.EACCES, "Access is denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", windows_replace)
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(OutputError, match="holds open, e.g. a viewer showing it: close it there"):
        write_volume(_volume(), target, overwrite=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"open in a viewer" and [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
