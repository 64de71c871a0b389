"""Process-level tuning that measurably speeds up CPU inference, and gives the memory back after.

glibc returns every freed block larger than 128 KiB to the kernel (mmap/munmap), so each
batch's large temporaries are page-faulted in again. Raising the mmap and trim thresholds keeps
them in the heap: on 2 CPU cores the sparse decoder's token gathers became 2.4x faster
(20.7 -> 8.7 ms for 8 slices at 64x64 tokens). Kept after the network, that heap held every
array post-processing freed: 300-1000 MB of a 300 x 512² CT's 2.0 GB peak were freed memory
never returned. So the tuning covers the network sweep and the 3D nodule detector's candidate
pass only (`network_heap`), in a process that asked for it (`tune_allocator`: a CLI command, a
cohort worker; never the napari process, whose heap is napari's).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT_BYTES = 128 * 1024  # both thresholds' glibc defaults
_TUNED_BYTES = 1 << 30

# the thresholds this process asked for (a CLI command, a cohort worker: it owns its heap); None: none
_tuned_bytes: int | None = None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _set_thresholds(libc, mmap_bytes: int, trim_bytes: int) -> bool:
    try:
        return libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1
    except AttributeError:  # a libc.so.6 that is not glibc
        return False


def _raise_thresholds(libc, threshold_bytes: int) -> bool:
    return _set_thresholds(libc, threshold_bytes, 2 * threshold_bytes - 1)


def tune_allocator(threshold_bytes: int = _TUNED_BYTES) -> bool:
    """Raise glibc's mmap/trim thresholds now, and let `network_heap` raise them to the same
    again for each network sweep of this process; no-op off Linux/glibc. Returns success."""
    global _tuned_bytes
    libc = _libc()
    ok = libc is not None and _raise_thresholds(libc, threshold_bytes)
    if ok:
        _tuned_bytes = threshold_bytes
    return ok


@contextlib.contextmanager
def network_heap() -> Iterator[None]:
    """Within: the tuned heap, if this process asked for it (tune_allocator). After: glibc's
    default thresholds and the heap trimmed, so what post-processing frees goes back to the
    system (the outputs are the same either way)."""
    tuned = _tuned_bytes
    libc = _libc() if tuned is not None else None
    if libc is not None:
        _raise_thresholds(libc, tuned)
    try:
        yield
    finally:
        if libc is not None and _set_thresholds(libc, _GLIBC_DEFAULT_BYTES, _GLIBC_DEFAULT_BYTES):
            try:
                libc.malloc_trim(0)
            except AttributeError:
                pass


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (2**20 bytes); NaN where the platform
    does not say. getrusage's ru_maxrss is in KiB on Linux and in bytes on macOS; Windows has no
    `resource` module (psutil's peak working set serves there, when installed)."""
    try:
        import resource
    except ImportError:
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 2**20
        except (ImportError, AttributeError):
            return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
