"""`boltzformer cohort`: segment every scan of a cohort on Dask, from a laptop to a cluster.

    run_cohort("scans/", "out/", "lung nodule")                                  # a LocalCluster here
    run_cohort("cases.csv", "out/", None, ScanOptions(seed=1), scheduler="tcp://host:8786")

Scans are Dask tasks. Each worker loads the model once, through a :class:`SegmenterPlugin`, and
keeps it for every scan it is given; the task reads the scan, segments it as ``boltzformer
segment`` would (same options, same seed: the same mask) and writes ``<case_id>_mask.nii.gz``
(uint8 (z, y, x), 1 = lesion, the scan's exact geometry) atomically (``io.write_volume``). Only a small row (status, seconds, lesions) travels back; the
client writes ``lesions.csv`` and ``report.csv`` as the results arrive, one durable append per
scan (lesions first, then the report row that records the scan as done), so a cohort that is
killed half-way loses nothing that was recorded and ``--resume`` redoes exactly the rest.

Workers and OUT_DIR: the workers write the masks themselves, so OUT_DIR and the scans must be
reachable from every worker under the same paths (a shared file system on a cluster).

A scan that cannot be read or segmented is a ``failed`` row with a one-line reason, never a
stopped cohort. A task whose worker dies (killed for memory, a lost node) is run once more,
then reported failed.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io as _stdio
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from distributed import WorkerPlugin

from .errors import BoltzformerError, InputError, OutputError
from .io import DICOM_EXTENSIONS, INPUT_EXTENSIONS, _os_problem, atomic_output, extension_of, has_dicom_preamble
from .options import DEFAULT_MIN_LESION_MM3, check_prompt_text
from .postprocess import CSV_COLUMNS, flat_lesion_row

log = logging.getLogger(__name__)

EXIT_SOME_FAILED = 3  # the cohort ran to its end but at least one scan failed (see report.csv)

REPORT_NAME, LESIONS_NAME = "report.csv", "lesions.csv"
MASK_SUFFIX = "_mask.nii.gz"
# seconds: read -> write of the scan on its worker; worker_peak_rss_mb: the worker process's peak
# resident memory so far (MB); warnings: the reader's and segmenter's notes, ' | '-separated.
REPORT_COLUMNS = ("case_id", "status", "reason", "seconds", "lesions", "path", "prompt", "mask", "weights_sha256",
                  "options", "device", "worker", "worker_peak_rss_mb", "warnings")
# Lesion rows: the case, then the columns of `segment --lesions` (postprocess.CSV_COLUMNS), then
# score = the lesion's mean model probability (its confidence; the same as mean_probability).
LESION_COLUMNS = ("case_id", *CSV_COLUMNS, "score")

# Peak resident memory of one worker process (Python, Dask, torch, the bundled model and one scan
# in flight) segmenting a synthetic 512 x 512 x 300 int16 CT for "lung nodule" (3D filter on):
# 2816 MB with 1 worker, 2718 MB each with 2 (benchmarks/cohort.py on 2 CPU cores, README
# "Cohorts"). Used to refuse a --workers that cannot fit the machine.
WORKER_PEAK_MB_512x512x300 = 2816

PLUGIN_PREFIX = "boltzformer-segmenter"
_CASE_ID_FORBIDDEN = re.compile(r"[/\\\x00-\x1f]")


# ----------------------------------------------------------------------------------------------
# What to segment
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scan:
    """One scan of the cohort. path: absolute; where: how the user listed it (for messages)."""

    case_id: str
    path: str
    prompt: str
    where: str = ""  # a CSV's "cases.csv: line 3"; empty for a folder's scans


@dataclass(frozen=True)
class ScanOptions:
    """The `segment` options applied to every scan; they decide the mask, so --resume compares them."""

    threshold: float = 0.5
    window: str | None = None
    modality: str | None = None  # None: detected per scan
    runs: int = 1
    seed: int = 0
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3
    fp_reduction: bool = True
    force_prompt: bool = False
    batch_size: int | None = None  # slices per batch (default: 8 CPU, 32 GPU); the draws follow it
    allow_gaps: bool = False
    device: str = "auto"

    def key(self) -> str:
        """A readable, stable description: the `options` column of report.csv. With the 3D
        filter on, it names the false-positive classifier's weights too (their sha256, first 12
        digits): new classifier weights give other masks, so --resume must not skip."""
        from .fp_classifier import bundled_sha256

        fp = "off"
        if self.fp_reduction:
            digest = bundled_sha256()
            fp = f"on:{digest[:12]}" if digest else "on"
        return (f"threshold={self.threshold:g} window={self.window or 'auto'} modality={self.modality or 'auto'} "
                f"runs={self.runs} seed={self.seed} min_lesion_mm3={self.min_lesion_mm3:g} "
                f"fp_filter={fp} force_prompt={'yes' if self.force_prompt else 'no'} "
                f"batch_size={self.batch_size or 'auto'} allow_gaps={'yes' if self.allow_gaps else 'no'} "
                f"device={self.device}")


def list_scans(source, prompt: str | None, exclude: Iterable[str | os.PathLike] = (),
               warn: Callable[[str], None] | None = None) -> list[Scan]:
    """The scans named by ``source``: a folder (searched recursively) or a CSV file.

    Folder: every NIfTI/NRRD/MetaImage file and every folder holding DICOM files (one scan per
    folder: its largest series, as `segment` takes it); hidden entries and the folders in
    ``exclude`` (OUT_DIR) are skipped. The case id is the path below ``source`` without the
    extension, folders joined by '_' (``p01/ct.nii.gz`` -> ``p01_ct``).
    CSV: a ``path`` column (relative paths are relative to the CSV's folder), optional
    ``case_id`` (default: the file or folder name without extension) and ``prompt`` (default:
    ``prompt``). Raises InputError (exit 2) for anything that makes the list itself unusable;
    sub-folders that cannot be listed are skipped and passed to ``warn`` (default: logged).
    """
    src = Path(os.fspath(source))
    if not src.exists():
        raise InputError(src, "does not exist; give a folder of scans or a CSV file with a 'path' column")
    if src.is_dir():
        scans = _scans_in_folder(src, prompt, exclude, warn or log.warning)
    elif extension_of(src.name) == ".csv":
        scans = _scans_in_csv(src, prompt)
    else:
        raise InputError(src, "is neither a folder nor a .csv file; give a folder of scans or a CSV with a 'path' column")
    if not scans:
        raise InputError(src, "holds no scan (NIfTI, NRRD or MetaImage file, or a folder of DICOM files)" if src.is_dir()
                         else "lists no scan")
    return scans


def _image_stem(name: str) -> str:
    ext = extension_of(name)
    return name[: -len(ext)] if ext else name


def _scans_in_folder(root: Path, prompt: str | None, exclude, warn: Callable[[str], None]) -> list[Scan]:
    if not prompt:
        raise BoltzformerError("a folder of scans needs a prompt: -p \"lung nodule\"")
    excluded = {os.path.realpath(e) for e in exclude}
    found: list[tuple[Path, Path]] = []  # (scan path, path below root that names it)
    problems: list[str] = []

    def onerror(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot be listed ({_os_problem(exc)})")

    for folder, dirs, files in os.walk(root, onerror=onerror):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(here / d) not in excluded)
        files = sorted(f for f in files if not f.startswith("."))
        if any(_is_dicom_file(here / f) for f in files):
            found.append((here, here.relative_to(root) if here != root else Path(root.resolve().name)))
        for f in files:
            if extension_of(f) in INPUT_EXTENSIONS:
                found.append((here / f, (here / f).relative_to(root)))
    for line in problems:
        warn(f"{line}; its scans are left out")
    scans, seen = [], {}
    for path, rel in found:
        parts = list(rel.parts)
        parts[-1] = _image_stem(parts[-1])
        case_id = "_".join(parts)
        if case_id in seen:
            raise InputError(root, f"{seen[case_id]} and {path} both give case id '{case_id}'; list the scans in a "
                                   "CSV with a case_id column instead")
        seen[case_id] = path
        scans.append(Scan(case_id, str(path.resolve()), prompt))
    return scans


def _is_dicom_file(p: Path) -> bool:
    ext = extension_of(p.name)
    if ext in DICOM_EXTENSIONS:
        return True
    if ext in INPUT_EXTENSIONS or ext in (".raw", ".zraw", ".csv", ".txt", ".json", ".md"):
        return False
    try:
        return p.is_file() and has_dicom_preamble(p)
    except OSError:
        return False


def _scans_in_csv(path: Path, prompt: str | None) -> list[Scan]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot be read ({_os_problem(exc)})") from None
    try:
        text = data.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(path, f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    try:
        reader = csv.DictReader(_stdio.StringIO(text, newline=""))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [(reader.line_num, r) for r in reader]  # line_num: right after blank lines and quoted line breaks
    except csv.Error as exc:
        raise InputError(path, f"is not a readable CSV table ({exc})") from None
    if "path" not in columns:
        raise InputError(path, f"needs a 'path' column (optional: case_id, prompt); columns found: {','.join(columns) or 'none'}")
    scans, seen = [], {}
    for n, raw in rows:
        row = {str(k).strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{path}: line {n}"
        if not any(row.values()):
            continue  # a blank line
        if not row.get("path"):
            raise InputError(path, f"line {n}: the path is empty")
        scan_path = Path(row["path"]).expanduser()
        if not scan_path.is_absolute():
            scan_path = path.parent / scan_path
        case_id = row.get("case_id") or _image_stem(scan_path.name.rstrip("/"))
        if _CASE_ID_FORBIDDEN.search(case_id) or case_id.startswith(".") or not case_id:
            raise InputError(path, f"line {n}: case_id {case_id!r} cannot name a file (no '/', '\\', control characters "
                                   "or leading '.')")
        if case_id in seen:
            raise InputError(path, f"line {n}: case_id '{case_id}' is also on line {seen[case_id]}; each scan needs "
                                   "its own case_id")
        seen[case_id] = n
        row_prompt = row.get("prompt") or prompt
        if not row_prompt:
            raise InputError(path, f"line {n}: no prompt in the row and no -p for the rows without one")
        scans.append(Scan(case_id, os.path.abspath(scan_path), row_prompt, where))
    return scans


# ----------------------------------------------------------------------------------------------
# Workers: the model, loaded once per worker
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What every worker loads. torch_threads: per running scan (None: the worker's CPUs
    divided by its task threads)."""

    weights: str | None = None
    device: str = "auto"
    torch_threads: int | None = None

    @property
    def plugin_name(self) -> str:
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"{PLUGIN_PREFIX}-{digest}"


class SegmenterPlugin(WorkerPlugin):
    """Holds one Segmenter per worker, loaded at the worker's first scan and kept.

    Registered with the name ``spec.plugin_name`` and idempotent: a second cohort with the same
    weights and device on a long-running cluster reuses the loaded model.
    """

    idempotent = True

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.plugin_name
        self._lock = threading.Lock()
        self._segmenter = None
        self._sha256 = None
        self.worker = None
        self.load_seconds = None

    def __getstate__(self):  # shipped to the workers without the lock or a loaded model
        return {"spec": self.spec, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["spec"])

    def setup(self, worker) -> None:
        self.worker = worker

    def torch_threads(self) -> int:
        if self.spec.torch_threads:
            return self.spec.torch_threads
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        nthreads = getattr(getattr(self.worker, "state", None), "nthreads", None) or getattr(self.worker, "nthreads", 1)
        return max(1, cpus // max(1, int(nthreads)))

    def segmenter(self):
        """The worker's Segmenter (loaded on first use) and the sha256 of its weights."""
        import torch

        # Dask starts workers with OMP_NUM_THREADS=1; each scan thread sets its own count
        torch.set_num_threads(self.torch_threads())
        with self._lock:
            if self._segmenter is None:
                from .runtime import tune_allocator
                from .segmenter import Segmenter
                from .weights import sha256

                t0 = time.perf_counter()
                tune_allocator()  # a worker owns its heap, as a CLI process does (see runtime.py)
                seg = Segmenter.from_pretrained(self.spec.weights, device=self._device())
                self._sha256 = sha256(seg.info["weights_path"])
                self._segmenter = seg
                self.load_seconds = time.perf_counter() - t0
        return self._segmenter, self._sha256

    def _device(self) -> str:
        """Several GPUs on one machine: local workers (named 0, 1, ...) take one each."""
        device = self.spec.device
        if device in ("auto", "cuda"):
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            name = getattr(self.worker, "name", None)
            if count > 1 and isinstance(name, int):
                return f"cuda:{name % count}"
        return device


def _plugin(name: str) -> SegmenterPlugin:
    from distributed import get_worker

    return get_worker().plugins[name]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def check_worker(plugin_name: str, prompts: list[str], force_prompt: bool) -> dict:
    """Task: load the model on one worker and check the prompts before any scan is sent.

    Returns {"error": one line} when the weights or the device cannot be used, else
    {"sha256", "device", "load_seconds", "prompt_errors": {prompt: one line}}. Errors travel as
    text: BoltzformerError subclasses do not survive pickling (their __init__ takes two arguments).
    """
    plugin = _plugin(plugin_name)
    try:
        seg, digest = plugin.segmenter()
    except BoltzformerError as exc:
        return {"error": _one_line(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the user in one line by the client
        where = plugin.worker.address if plugin.worker is not None else "?"
        return {"error": _one_line(f"the model could not be loaded on worker {where}: {type(exc).__name__}: {exc}")}
    errors = {}
    for p in prompts:
        try:
            seg.check_prompt(p, force=force_prompt)
        except BoltzformerError as exc:
            errors[p] = _one_line(exc)
    return {"sha256": digest, "device": str(seg.device), "load_seconds": plugin.load_seconds, "prompt_errors": errors}


def segment_scan(plugin_name: str, scan: Scan, options: ScanOptions, out_dir: str) -> dict:
    """Task: read, segment and write one scan on a worker -> {"report": row, "lesions": rows}.

    Does what `boltzformer segment SCAN -p PROMPT -o OUT_DIR/<case_id>_mask.nii.gz` does with
    the same options; never raises for a bad scan: the row says failed, with the reason.
    """
    from .errors import SliceSpacingError
    from .io import read_volume, write_volume

    t0 = time.perf_counter()
    mask = Path(out_dir) / f"{scan.case_id}{MASK_SUFFIX}"
    row = {"case_id": scan.case_id, "status": "failed", "reason": "", "lesions": "", "path": scan.path,
           "prompt": scan.prompt, "mask": "", "weights_sha256": "", "options": options.key(), "device": "", "worker": "",
           "warnings": ""}
    lesions: list[dict] = []
    seg = None
    try:
        plugin = _plugin(plugin_name)
        row["worker"] = plugin.worker.address if plugin.worker is not None else ""
        seg, digest = plugin.segmenter()
        row["weights_sha256"], row["device"] = digest, str(seg.device)
        try:
            volume = read_volume(scan.path, allow_gaps=options.allow_gaps)
        except SliceSpacingError as exc:  # as `segment` says it
            raise InputError(exc.path, f"{exc.problem}; --allow-gaps resamples it onto a uniform grid") from None
        warnings = list(volume.metadata.get("warnings", []))
        if volume.metadata.get("series_note"):
            warnings.append(volume.metadata["series_note"])
        result = seg.segment_volume(
            volume, scan.prompt, window=options.window, modality=options.modality, runs=options.runs, seed=options.seed,
            threshold=options.threshold, min_lesion_mm3=options.min_lesion_mm3, batch_size=options.batch_size,
            fp_reduction=options.fp_reduction, force_prompt=options.force_prompt,
        )
        warnings += result.warnings
        write_volume(result.mask_volume(), mask, overwrite=True)  # atomic: temporary, checked, renamed
        lesions = _lesion_rows(scan.case_id, result)
        row.update(status="ok", lesions=len(lesions), mask=str(mask), warnings=" | ".join(_one_line(w) for w in warnings))
    except BoltzformerError as exc:
        message = str(exc)
        row["reason"] = message if scan.path in message else f"{scan.path}: {message}"
    except MemoryError:
        row["reason"] = f"{scan.path}: out of memory on worker {row['worker']} (fewer --workers or --threads-per-worker)"
    except Exception as exc:  # noqa: BLE001 - one scan's bug or odd file must not stop the cohort
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError on an accelerator
            row["reason"] = f"{scan.path}: {row['device']} ran out of memory (try --batch-size 4 or --device cpu)"
            if seg is not None:
                seg.release_memory()  # the worker's next scans start from an empty cache
        else:
            row["reason"] = f"{scan.path}: unexpected {type(exc).__name__}: {exc}"
    row["reason"] = _one_line(row["reason"])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["worker_peak_rss_mb"] = _peak_rss_mb()
    return {"report": row, "lesions": lesions}


def _lesion_rows(case_id: str, result) -> list[dict]:
    """lesions.csv rows of one scan: its lesion table as `segment --lesions` writes it, plus the case."""
    rows = []
    for r in result.lesions:
        flat = flat_lesion_row(r)
        rows.append({"case_id": case_id, **{k: flat.get(k, "") for k in CSV_COLUMNS}, "score": flat.get("mean_probability", "")})
    return rows


# ----------------------------------------------------------------------------------------------
# The output tables: durable appends, repaired and de-duplicated on --resume
# ----------------------------------------------------------------------------------------------
def _csv_bytes(rows: list[dict], columns, header: bool = False) -> bytes:
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


class _Table:
    """A CSV table that grows one flushed, fsynced append per scan (a kill mid-append leaves at
    most a partial last line, which `read_rows` drops)."""

    def __init__(self, path: Path, columns):
        self.path, self.columns = path, tuple(columns)
        self._f = None

    def start(self, rows: list[dict]) -> None:
        """Replace the file (atomically) by the header and ``rows``, then open it for appending."""
        with atomic_output(self.path, overwrite=True) as tmp:
            tmp.write_bytes(_csv_bytes(rows, self.columns, header=True))
        try:
            self._f = open(self.path, "ab")
        except OSError as exc:
            raise OutputError(self.path, f"cannot be opened for writing ({_os_problem(exc)})") from None

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        data = _csv_bytes(rows, self.columns)
        try:
            self._f.write(data)  # one write per scan: the rows of a scan arrive together
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise OutputError(self.path, f"could not be written: {_os_problem(exc)}; rerun with --resume once "
                                         "there is room (the scans recorded so far are kept)") from None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def read_rows(self) -> list[dict]:
        """Existing rows; a partial last line (a kill mid-append) is dropped. Raises InputError
        when the file is not a table of these columns."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise InputError(self.path, f"cannot be read ({_os_problem(exc)})") from None
        if not data:
            return []
        if not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
        try:
            reader = csv.DictReader(_stdio.StringIO(data.decode("utf-8"), newline=""))
            rows = list(reader)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(self.path, f"is not a table written by boltzformer cohort ({exc}); start again with "
                                        "--overwrite") from None
        if tuple(reader.fieldnames or ()) != self.columns:
            raise InputError(self.path, f"has the columns {','.join(reader.fieldnames or []) or 'none'}, not those of "
                                        "this version's cohort table; start again with --overwrite or another OUT_DIR")
        return rows


# ----------------------------------------------------------------------------------------------
# The cluster
# ----------------------------------------------------------------------------------------------
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


class _LocalClusterClient:
    """A LocalCluster (worker processes) and its client, closed together."""

    def __init__(self, workers: int, threads_per_worker: int):
        import dask
        from distributed import Client, LocalCluster

        # allowed-failures 0: a task whose worker dies comes back at once as KilledWorker and
        # the client runs it once more itself (the same rule with a remote scheduler);
        # saturation 1.0: a worker holds only the scans it is running, so a lost worker loses no
        # queued scans and results stream in submission order.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                              "distributed.scheduler.worker-saturation": 1.0}):
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.cluster.close()


# ----------------------------------------------------------------------------------------------
# The cohort
# ----------------------------------------------------------------------------------------------
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
        from .intensity import check_window

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
    scans = list_scans(source, prompt, exclude=[out], warn=warn)
    _check_out_dir(out)
    report, lesions = _Table(out / REPORT_NAME, REPORT_COLUMNS), _Table(out / LESIONS_NAME, LESION_COLUMNS)
    if not resume and not overwrite:
        existing = [p for p in (report.path, lesions.path) if p.exists()]
        existing += [out / f"{s.case_id}{MASK_SUFFIX}" for s in scans if (out / f"{s.case_id}{MASK_SUFFIX}").exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputError(existing[0], f"exists{more}; pass --resume to finish that cohort or --overwrite to start again")
    if resume:  # unreadable tables are refused before the cluster starts
        old_report, old_lesions = report.read_rows(), lesions.read_rows()

    own = None
    local_workers = None
    if client is None:
        if scheduler:
            from distributed import Client

            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise BoltzformerError(f"--scheduler {scheduler}: cannot connect ({_one_line(exc)})") from None
            own = client
        else:
            local_workers = workers or default_workers(threads_per_worker, options.device)
            check_memory(local_workers, threads_per_worker)
            own = _LocalClusterClient(local_workers, threads_per_worker)
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
        _make_out_dir(out)
        done: set[str] = set()
        if resume:
            done = _resumable(scans, old_report, options, digest, out)
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
            _run_scans(client, spec, todo, options, out, report, lesions, summary, progress, on_result)
        except KeyboardInterrupt as exc:
            exc.note = (f"{summary.ok + summary.failed + summary.skipped} of {len(scans)} scans are recorded in "
                        f"{report.path}; run the same command with --resume to finish the rest")
            raise
        finally:
            report.close()
            lesions.close()
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
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder; give a folder for the masks and tables")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(out, "is not writable")


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, f"cannot be created ({_os_problem(exc)})") from None


def _last_rows(rows: list[dict]) -> list[dict]:
    """One row per case id, the last one written (a case redone after a failure, say)."""
    last = {}
    for r in rows:
        last.pop(r.get("case_id"), None)
        last[r.get("case_id")] = r
    return list(last.values())


def _resumable(scans: list[Scan], rows: list[dict], options: ScanOptions, digest: str, out: Path) -> set[str]:
    """Case ids already done: an ok report row with the same input, prompt, options and weights,
    and its mask on disk."""
    last = {r["case_id"]: r for r in _last_rows(rows)}
    done = set()
    for s in scans:
        r = last.get(s.case_id)
        if (r is not None and r["status"] == "ok" and r["path"] == s.path and r["prompt"] == s.prompt
                and r["options"] == options.key() and r["weights_sha256"] == digest
                and (out / f"{s.case_id}{MASK_SUFFIX}").is_file()):
            done.add(s.case_id)
    return done


def _run_scans(client, spec: ModelSpec, todo: list[Scan], options: ScanOptions, out: Path, report: _Table,
               lesions: _Table, summary: CohortSummary, progress: bool, on_result) -> None:
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

    queue = as_completed([submit(s, 0) for s in todo])
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
                why = _one_line(f"{type(exc).__name__}: {exc}") if exc is not None else fut.status
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
            row = result["report"]
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
            if bar is not None:
                left = len(todo) - summary.ok - summary.failed
                bar.set_postfix_str(f"ok {summary.ok}, failed {summary.failed}, left {left}, "
                                    f"{summary.scans_per_minute:.1f} scans/min", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if pending:  # interrupted: stop what is still queued or running
            try:
                client.cancel([f for f, _, _ in pending.values()])
            except Exception:  # noqa: BLE001 - a closing cluster: its tasks go with it
                pass
    summary.seconds = time.perf_counter() - t0
