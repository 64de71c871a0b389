"""The machine and the local cluster: memory and CPUs, how many workers fit
(WORKER_PEAK_MB_512x512x300 per scan in flight), and a LocalCluster client started on demand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from ..errors import BoltzformerError


# Peak resident memory of one worker process (Python, Dask, torch, the bundled model and one scan
# in flight) segmenting a synthetic 512 x 512 x 300 int16 CT for "lung nodule" (3D filter on):
# 2816 MB with 1 worker, 2718 MB each with 2 (benchmarks/cohort.py on 2 CPU cores, README
# "Cohorts"). Used to refuse a --workers that cannot fit the machine.
WORKER_PEAK_MB_512x512x300 = 2816


def machine_memory_mb() -> float:
    """Memory this machine gives the cluster (the cgroup limit where one is set), MB."""
    from distributed.system import MEMORY_LIMIT

    return MEMORY_LIMIT / 2**20


def machine_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_memory(workers: int, threads_per_worker: int, memory_mb: float | None = None) -> None:
    """Refuse a local cluster whose scans in flight cannot fit in memory (BoltzformerError, exit 2).

    Each running scan is budgeted WORKER_PEAK_MB_512x512x300 (measured; model and Python
    included), so ``workers * threads_per_worker`` of them must fit ``memory_mb``.
    """
    memory_mb = machine_memory_mb() if memory_mb is None else memory_mb
    need = workers * threads_per_worker * WORKER_PEAK_MB_512x512x300
    if need > memory_mb:
        fit = int(memory_mb // WORKER_PEAK_MB_512x512x300)
        scans = f"{workers} workers x {threads_per_worker} threads" if threads_per_worker > 1 else f"{workers} workers"
        raise BoltzformerError(
            f"--workers {workers}: {scans} need about {need / 1024:.1f} GB ({WORKER_PEAK_MB_512x512x300 / 1024:.1f} GB per "
            f"scan in flight, the measured peak of a worker on a 512x512x300 CT) but this machine has "
            f"{memory_mb / 1024:.1f} GB; use at most {max(1, fit // max(1, threads_per_worker))} workers")


def default_workers(threads_per_worker: int = 1, device: str = "auto", memory_mb: float | None = None,
                    cpus: int | None = None) -> int:
    """A local cluster sized to the machine: one worker per CPU core (each scan on one torch
    thread: faster than fewer workers with more threads, README "Cohorts"), one per GPU for
    --device cuda, never more than the memory holds."""
    cpus = machine_cpus() if cpus is None else cpus
    memory_mb = machine_memory_mb() if memory_mb is None else memory_mb
    n = max(1, cpus // max(1, threads_per_worker))
    if device.startswith("cuda"):
        import torch

        n = max(1, torch.cuda.device_count())
    fit = max(1, int(memory_mb // (WORKER_PEAK_MB_512x512x300 * max(1, threads_per_worker))))
    return max(1, min(n, fit))


class LocalClusterClient:
    """A LocalCluster (worker processes) and its client, closed together."""

    def __init__(self, workers: int, threads_per_worker: int):
        import dask
        from distributed import Client, LocalCluster

        # allowed-failures 0: a task whose worker dies comes back at once as KilledWorker and
        # the client runs it once more itself (the same rule with a remote scheduler);
        # saturation 1.0: a worker holds only the scans it is running, so a lost worker loses no
        # queued scans and results stream in submission order.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                              "distributed.scheduler.worker-saturation": 1.0}), _children_ignore_ctrl_c():
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                                        # any free port: None still takes 8787, and a second cohort
                                        # on the machine warned that it was in use; the worker
                                        # processes' own log lines silenced up to ERROR: a worker
                                        # whose scheduler closed after a Ctrl-C printed "Failed to
                                        # communicate with scheduler during heartbeat" with a
                                        # traceback (a scan's failure reaches the cohort's report)
                                        dashboard_address=":0", silence_logs=logging.CRITICAL)
        self.client = Client(self.cluster)
        # A lost worker's scan is said once, by the cohort ("worker lost; running it again"), not
        # also as the scheduler's ERROR line about the task it marks as failed.
        self._quiet = [(name, logging.getLogger(name).level) for name in ("distributed.scheduler", "distributed.nanny")]
        for name, _ in self._quiet:
            logging.getLogger(name).setLevel(logging.CRITICAL)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.cluster.close()
            for name, level in self._quiet:
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _children_ignore_ctrl_c():
    """Start the worker processes with SIGINT ignored: they inherit that (a signal mask would not
    reach them: Dask starts them from its event-loop thread), and Python and asyncio leave an
    inherited SIG_IGN alone. Ctrl-C, which a terminal sends to the whole process group, then no
    longer makes each Dask process print its own KeyboardInterrupt traceback; the cohort process
    takes it and closes the cluster. The price: a Ctrl-C in the few seconds the workers take to
    start is lost (press it again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
