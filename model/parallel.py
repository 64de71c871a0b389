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
from contextlib import contextmanager
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


def start_tasks(pool: ThreadPoolExecutor | None, tasks: list[Callable[[], R]], costs: Iterable[float]) -> list:
    """Submit zero-argument `tasks` to `pool`, the costliest first (by `costs`, one per task), so
    the longest starts at once and the short ones fill the other threads around it: a scan's
    few large vessel trees, not the many small candidates, set how long its post-processing
    takes. -> one future per task, in task order (pool None: each task run here, in cost order)."""
    costs = [float(c) for c in costs]
    order = sorted(range(len(tasks)), key=lambda i: -costs[i])  # stable: equal costs keep task order
    futures: list = [None] * len(tasks)
    for i in order:
        if pool is None:
            futures[i] = _Done(tasks[i]())
        else:
            futures[i] = pool.submit(tasks[i])
    return futures


class _Done:
    """A finished result with the part of Future's interface start_tasks' callers use."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


@contextmanager
def task_pool(n_tasks: int, max_threads: int = MAX_THREADS):
    """with task_pool(n) as pool: a pool for `start_tasks` of up to min(cores, max_threads)
    threads, or None where one thread would do (the tasks then run in the caller's thread)."""
    workers = min(n_tasks, cores(), max_threads)
    if workers <= 1:
        yield None
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="boltzformer-worker") as pool:
        yield pool
