"""Independent pieces of post-processing on a thread pool.

The lesion table, the false-positive filter and the 3D classifier measure each candidate in its
own box (a dilation, a distance transform, Gaussian derivatives, an interpolation); the 3D nodule
detector filters each scale and closes each slice of a lung. The pieces write nothing shared and
spend their time inside numpy and scipy.ndimage, which release the GIL for most of it. A 3D
phantom chest gives over a hundred candidates, so threads shorten post-processing on any
machine with more than one core (the GPU machines have 16) and change no result: each piece's
work is the same, and the results come back in input order.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 8  # past this the boxes' Python overhead (it holds the GIL) dominates


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def thread_map(fn: Callable[[T], R], items: Iterable[T], max_threads: int = MAX_THREADS) -> list[R]:
    """``[fn(x) for x in items]`` on up to min(cores, max_threads) threads, in input order.
    An exception in any call is raised here, as the plain loop would raise it."""
    items = list(items)
    workers = min(len(items), cores(), max_threads)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="boltzformer-worker") as pool:
        return list(pool.map(fn, items))
