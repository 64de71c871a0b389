"""`run_cohort`: every scan a Dask task, results recorded as they arrive, a lost worker's scan run
once more, `--resume` redoing exactly what is not recorded; returns a `CohortSummary`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import BoltzformerError, OutputError, os_problem
from ..options import check_prompt_text
from ..postprocess import CSV_COLUMNS
from .cluster import check_memory, default_workers, LocalClusterClient, machine_cpus
from .scans import input_stamp, list_scans, Scan, ScanOptions
from .tables import Table
from .worker import check_worker, MASK_SUFFIX, ModelSpec, one_line, segment_scan, SegmenterPlugin, STAGED_SUFFIX


log = logging.getLogger(__name__)
EXIT_SOME_FAILED = 3  # the cohort ran to its end but at least one scan failed (see report.csv)
REPORT_NAME, LESIONS_NAME = "report.csv", "lesions.csv"
# seconds: read -> write of the scan on its worker; worker_peak_rss_mb: the worker process's peak
# resident memory so far (MB); warnings: the reader's and segmenter's notes, ' | '-separated.
# input_stamp: the scan's file size and time (scans.input_stamp), so that --resume redoes a replaced file.
REPORT_COLUMNS = ("case_id", "status", "reason", "seconds", "lesions", "path", "input_stamp", "prompt", "mask",
                  "weights_sha256", "options", "device", "worker", "worker_peak_rss_mb", "warnings")
SCANS_IN_FLIGHT = 256  # scans submitted to the cluster at a time (each finished one sends the next)
LOCK_NAME = ".cohort.lock"  # held while a cohort writes to OUT_DIR: a second one is refused
DISK_FULL = "no space left on device"  # os_problem's words for ENOSPC
# Lesion rows: the case, then the columns of `segment --lesions` (postprocess.CSV_COLUMNS), then
# score = the lesion's mean model probability (its confidence; the same as mean_probability).
LESION_COLUMNS = ("case_id", *CSV_COLUMNS, "score")


@dataclass
class CohortSummary:
    out_dir: Path
    total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # done by an earlier run (--resume)
    retried: int = 0  # scans whose worker died and that ran again
    seconds: float = 0.0
    workers: int = 0
    weights_sha256: str = ""
    device: str = ""
    failures: list[str] = field(default_factory=list)  # "case_id: reason"

    @property
    def exit_status(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0

    @property
    def scans_per_minute(self) -> float:
        ran = self.ok + self.failed
        return 60.0 * ran / self.seconds if self.seconds > 0 else 0.0


def run_cohort(
    source,
    out_dir,
    prompt: str | None,
    options: ScanOptions = ScanOptions(),
    *,
    weights: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    client=None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> CohortSummary:
    """Segment every scan of ``source`` (see :func:`list_scans`) into ``out_dir``.

    The cluster: ``client`` (a distributed.Client, kept open), else ``scheduler`` (an address
    such as tcp://host:8786), else a LocalCluster of ``workers`` processes (default: sized to
    the machine, see :func:`default_workers`) with ``threads_per_worker`` scans each, closed at
    the end. ``on_result`` is called with each finished scan's report row (tests, GUIs);
    ``warn`` with one-line notes for the user (default: logged).

    Raises BoltzformerError (exit 2) before any scan for unusable arguments: a missing input,
    an unreadable CSV, an OUT_DIR that holds a cohort without --resume/--overwrite, weights
    that cannot be loaded, a prompt that names nothing, a --workers that does not fit.
    Ctrl-C/SIGTERM: the KeyboardInterrupt goes on with a ``note`` attribute saying what was
    recorded (it stays; --resume does the rest).
    """
    if resume and overwrite:
        raise BoltzformerError("--resume and --overwrite: choose one (--resume keeps the scans done, --overwrite "
                               "starts again)")
    if prompt is not None:
        check_prompt_text(prompt)
    if options.window:
        from ..intensity import check_window

        check_window(options.window)
    if client is not None or scheduler:
        if workers is not None or threads_per_worker is not None:
            raise BoltzformerError("--workers and --threads-per-worker size the local cluster; a cluster given with "
                                   "--scheduler has the workers it was started with")
    threads_per_worker = threads_per_worker or 1
    out = Path(os.path.abspath(os.fspath(out_dir)))  # workers may run elsewhere: no relative paths
    if weights is not None and not str(weights).startswith("hf:") and os.path.exists(weights):
        weights = os.path.abspath(weights)
    warn = warn or log.warning
    if os.path.isdir(source) and os.path.realpath(source) == os.path.realpath(out):
        raise OutputError(out, "is the input folder: the masks written there would be read as scans by the next "
                               "run; give another folder for the masks and tables")
    scans = list_scans(source, prompt, exclude=[out], warn=warn)
    _check_out_dir(out)
    with contextlib.ExitStack() as locks:  # OUT_DIR stays locked to this run until it returns
        if out.is_dir():
            locks.enter_context(_lock_out_dir(out))
        return _run_checked(scans, out, locks, options, weights, workers, threads_per_worker, scheduler, client,
                            resume, overwrite, progress, on_result, warn)


def _run_checked(scans, out, locks: contextlib.ExitStack, options, weights, workers, threads_per_worker, scheduler,
                 client, resume, overwrite, progress, on_result, warn) -> CohortSummary:
    """run_cohort once its arguments are checked; a new OUT_DIR is locked (in ``locks``) as it is made."""
    report, lesions = Table(out / REPORT_NAME, REPORT_COLUMNS), Table(out / LESIONS_NAME, LESION_COLUMNS)
    if not resume and not overwrite:
        existing = [p for p in (report.path, lesions.path) if p.exists()]
        existing += [out / f"{s.case_id}{MASK_SUFFIX}" for s in scans if (out / f"{s.case_id}{MASK_SUFFIX}").exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputError(existing[0], f"exists{more}; pass --resume to finish that cohort or --overwrite to start again")
    if resume:  # unreadable tables are refused before the cluster starts
        old_report, old_lesions = report.read_rows(), lesions.read_rows()
    elif overwrite:
        earlier_masks = _earlier_masks(out, report, scans, warn)

    own = None
    local_workers = None
    if client is None:
        if scheduler:
            from distributed import Client

            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise BoltzformerError(f"--scheduler {scheduler}: cannot connect ({one_line(exc)})") from None
            own = client
        else:
            local_workers = workers or default_workers(threads_per_worker, options.device)
            check_memory(local_workers, threads_per_worker)
            own = LocalClusterClient(local_workers, threads_per_worker)
            client = own.client
    try:
        torch_threads = None
        if local_workers:  # the local machine's cores shared among the scans running at once
            torch_threads = max(1, machine_cpus() // (local_workers * threads_per_worker))
        spec = ModelSpec(weights, options.device, torch_threads)
        client.register_plugin(SegmenterPlugin(spec), name=spec.plugin_name)
        check = _first_worker_check(client, spec, sorted({s.prompt for s in scans}), options.force_prompt, warn)
        if "error" in check:
            raise BoltzformerError(check["error"])
        for s in scans:
            if s.prompt in check["prompt_errors"]:
                raise BoltzformerError((f"{s.where}: " if s.where else "") + check["prompt_errors"][s.prompt])
        digest = check["sha256"]
        if not out.exists():
            _make_out_dir(out)
            locks.enter_context(_lock_out_dir(out))
        _remove(sorted(out.glob(f"*{STAGED_SUFFIX}")), "unrecorded mask")  # an interrupted run's
        _remove(sorted(out.glob(f".*{STAGED_SUFFIX}.tmp-*")), "partial mask")  # ... killed mid-write
        if overwrite:
            _remove(earlier_masks, "mask of the earlier cohort")
        stamps = {s.case_id: input_stamp(s.path) for s in scans}
        done: set[str] = set()
        if resume:
            done = _resumable(scans, old_report, options, digest, out, stamps)
            # a scan redone loses its old mask first: if it fails now, no mask of another file or
            # other options may stay beside its failed row
            _remove([p for p in (out / f"{s.case_id}{MASK_SUFFIX}" for s in scans if s.case_id not in done)
                     if p.is_file()], "mask of a scan to redo")
            ours = {s.case_id for s in scans}  # rows of other case ids are kept as they are
            kept_report = [r for r in _last_rows(old_report) if r["case_id"] in done or r["case_id"] not in ours]
            kept_ids = {r["case_id"] for r in kept_report if r["status"] == "ok"}
            report.start(kept_report)
            lesions.start([r for r in old_lesions if r["case_id"] in kept_ids])
        else:
            report.start([])
            lesions.start([])
        todo = [s for s in scans if s.case_id not in done]
        n_workers = len(client.scheduler_info().get("workers", {})) or (local_workers or 0)
        summary = CohortSummary(out, len(scans), skipped=len(scans) - len(todo), workers=n_workers, weights_sha256=digest,
                                device=check["device"])
        try:
            _run_scans(client, spec, todo, options, out, report, lesions, summary, progress, on_result, stamps)
        except KeyboardInterrupt as exc:
            exc.note = (f"{summary.ok + summary.failed + summary.skipped} of {len(scans)} scans are recorded in "
                        f"{report.path}; run the same command with --resume to finish the rest (it removes the "
                        f"masks of scans not recorded, *{STAGED_SUFFIX})")
            raise
        finally:
            closing = [t.close() for t in (report, lesions)]  # both, even when one fails
        failed = [error for error in closing if error]
        if failed:
            raise failed[0]
        return summary
    finally:
        if own is not None:
            own.close()


def _first_worker_check(client, spec: ModelSpec, prompts: list[str], force_prompt: bool, warn) -> dict:
    """check_worker on the first worker free; says so once if the cluster has no worker yet (a
    batch queue may take minutes to start one)."""
    future = client.submit(check_worker, spec.plugin_name, prompts, force_prompt, pure=False)
    said = False
    while True:
        try:
            return future.result(timeout=30)
        except TimeoutError:
            if not said and not client.scheduler_info().get("workers"):
                warn(f"the scheduler {client.scheduler.address} has no worker yet; waiting for one")
                said = True


def _check_out_dir(out: Path) -> None:
    from ..io.formats import named_like_a_file

    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder; give a folder for the masks and tables")
    if not out.exists() and named_like_a_file(out):
        raise OutputError(out, "is named like a file, but a cohort writes a folder of masks and tables: give a folder")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(out, "is not writable")


def _lock_out_dir(out: Path):
    """An open file holding an exclusive lock on OUT_DIR/.cohort.lock (released when closed or
    when the process ends); OutputError when another cohort holds it. Two cohorts writing one
    folder would replace each other's report.csv. (fcntl's lock on POSIX, msvcrt's on Windows.)"""
    import platform

    path = out / LOCK_NAME
    try:
        f = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise OutputError(path, f"cannot be opened to lock the folder ({os_problem(exc)})") from None
    try:
        _lock_file(f)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OutputError(out, f"another cohort is writing to it ({holder}); wait for it to end, or give another "
                               "folder") from None
    except OSError:  # a file system without locks (some network mounts): go on unlocked
        return f
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {platform.node()}")  # os.uname: POSIX only
    f.flush()
    return f


def _lock_file(f) -> None:
    """An exclusive lock on the open file `f`, without waiting: BlockingIOError when another
    process holds it; another OSError when the file system has no locks."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        f.seek(0)
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)  # the first byte, held while the file is open
        except PermissionError:  # msvcrt's "locked by another process"
            raise BlockingIOError from None
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, f"cannot be created ({os_problem(exc)})") from None


def _earlier_masks(out: Path, report: Table, scans: list[Scan], warn) -> list[Path]:
    """--overwrite: the masks a cohort in ``out`` wrote, to go before it starts again: those its
    report.csv lists and those named for this run's scans (a scan that fails this time must not
    keep an old mask beside its failed row)."""
    try:
        rows = report.read_rows()
    except BoltzformerError as exc:
        warn(f"{exc}; only the masks named for this run's scans are replaced")
        rows = []
    names = {f"{r.get('case_id')}{MASK_SUFFIX}" for r in rows if r.get("mask")}
    names |= {f"{s.case_id}{MASK_SUFFIX}" for s in scans}
    return sorted(p for p in (out / n for n in names) if p.parent == out and p.is_file())


def _remove(paths: list[Path], what: str) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(p, f"cannot be removed ({os_problem(exc)})") from None
    if paths:
        log.info("removed %d %s file(s) from %s", len(paths), what, paths[0].parent)


def _last_rows(rows: list[dict]) -> list[dict]:
    """One row per case id, the last one written (a case redone after a failure, say)."""
    last = {}
    for r in rows:
        last.pop(r.get("case_id"), None)
        last[r.get("case_id")] = r
    return list(last.values())


def _resumable(scans: list[Scan], rows: list[dict], options: ScanOptions, digest: str, out: Path,
               stamps: dict[str, str]) -> set[str]:
    """Case ids already done: an ok report row with the same input (path, size and time), prompt,
    options and weights, and its mask on disk."""
    last = {r["case_id"]: r for r in _last_rows(rows)}
    done = set()
    for s in scans:
        r = last.get(s.case_id)
        if (r is not None and r["status"] == "ok" and r["path"] == s.path and r["prompt"] == s.prompt
                and stamps.get(s.case_id) and r["input_stamp"] == stamps[s.case_id]
                and r["options"] == options.key() and r["weights_sha256"] == digest
                and (out / f"{s.case_id}{MASK_SUFFIX}").is_file()):
            done.add(s.case_id)
    return done


def _publish(staged: Path, mask: Path) -> None:
    try:
        os.replace(staged, mask)
    except OSError as exc:
        raise OutputError(mask, f"could not be written: {os_problem(exc)} (renaming {staged.name}); rerun with "
                                "--resume (the scans recorded so far are kept)") from None


def _run_scans(client, spec: ModelSpec, todo: list[Scan], options: ScanOptions, out: Path, report: Table,
               lesions: Table, summary: CohortSummary, progress: bool, on_result, stamps: dict[str, str]) -> None:
    from distributed import as_completed

    t0 = time.perf_counter()
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="scan", desc="cohort", file=sys.stderr, dynamic_ncols=True)
    token = os.urandom(4).hex()  # task keys unique across cohorts on one cluster
    pending = {}  # key -> (future, scan, attempt)

    def submit(scan: Scan, attempt: int):
        fut = client.submit(segment_scan, spec.plugin_name, scan, options, str(out), pure=False,
                            key=f"scan-{scan.case_id}-{token}-{attempt}")
        pending[fut.key] = (fut, scan, attempt)
        return fut

    # a bounded number in flight: 100 000 scans submitted at once lost the scheduler after 42 s
    waiting = iter(todo)
    queue = as_completed([submit(s, 0) for s in itertools.islice(waiting, SCANS_IN_FLIGHT)])
    try:
        for fut in queue:
            _, scan, attempt = pending.pop(fut.key)
            if fut.status == "finished":
                result = fut.result()
            else:  # the worker died under it (KilledWorker), or the task itself broke
                if client.status not in ("running", "connecting"):
                    raise BoltzformerError("lost the connection to the Dask scheduler; run the same command with "
                                           "--resume once it is back")
                exc = fut.exception() if fut.status == "error" else None
                why = one_line(f"{type(exc).__name__}: {exc}") if exc is not None else fut.status
                fut.release()
                if attempt == 0:
                    summary.retried += 1
                    log.info("%s: worker lost (%s); running it again", scan.case_id, why)
                    queue.add(submit(scan, 1))
                    continue
                result = {"report": {"case_id": scan.case_id, "status": "failed", "path": scan.path, "prompt": scan.prompt,
                                     "options": options.key(), "reason": f"{scan.path}: its worker was lost twice ({why})"},
                          "lesions": []}
            fut.release()  # nothing of a finished scan stays on the cluster
            row = dict(result["report"], input_stamp=stamps.get(scan.case_id, ""))
            if result.get("staged"):  # the mask takes its final name as its scan is recorded
                _publish(Path(result["staged"]), Path(row["mask"]))
            lesions.append(result["lesions"])  # first the lesions, then the row that records the scan as done
            report.append([row])
            if row["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append(f"{row['case_id']}: {row['reason']}")
            summary.seconds = time.perf_counter() - t0
            if on_result is not None:
                on_result(row)
            if row["status"] != "ok" and DISK_FULL in row.get("reason", ""):  # every scan after it would fail too
                raise OutputError(out, f"the disk is full ({row['case_id']}'s mask could not be written); rerun with "
                                       "--resume once there is room (the scans recorded so far are kept)")
            if bar is not None:
                left = len(todo) - summary.ok - summary.failed
                bar.set_postfix_str(f"ok {summary.ok}, failed {summary.failed}, left {left}, "
                                    f"{summary.scans_per_minute:.1f} scans/min", refresh=False)
                bar.update(1)
            following = next(waiting, None)  # one recorded, one more sent
            if following is not None:
                queue.add(submit(following, 0))
    finally:
        if bar is not None:
            bar.close()
        if pending:  # interrupted: stop what is still queued or running
            try:
                client.cancel([f for f, _, _ in pending.values()])
            except Exception:  # noqa: BLE001 - a closing cluster: its tasks go with it
                pass
    summary.seconds = time.perf_counter() - t0
