"""A tiny, full tmpfs for the tests of writes on a full disk (issue 18).

Mounting needs root and a kernel that allows it here; elsewhere the tests that use it are skipped
with the reason (the monkeypatched ENOSPC tests cover the same code everywhere).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """An empty 64 KiB tmpfs (unmounted afterwards); fill it with ``fill(folder)``."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 64 KiB tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave_bytes: int = 0) -> None:
    """Fill the file system of ``folder`` up, leaving about ``leave_bytes`` free."""
    st = os.statvfs(folder)
    room = st.f_bavail * st.f_frsize - leave_bytes if leave_bytes else float("inf")  # 0: until it refuses
    fd = os.open(folder / f".fill-{len(list(folder.iterdir()))}", os.O_WRONLY | os.O_CREAT)
    try:
        while room > 0:
            try:
                room -= os.write(fd, b"\0" * int(min(4096, room)))
            except OSError:
                break
    finally:
        os.close(fd)
