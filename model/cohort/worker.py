"""The worker side: `SegmenterPlugin` loads the model once per Dask worker and keeps it for every
scan it is given; `segment_scan` (a task) reads one scan, segments it as `boltzformer segment`
would and writes its mask atomically as `<case_id>_mask.unrecorded.nii.gz`, returning only a small
report row; the client renames the mask to `<case_id>_mask.nii.gz` when it records the row, so a
mask under its final name is always one that report.csv lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from distributed import WorkerPlugin

from ..errors import BoltzformerError, InputError
from ..postprocess import CSV_COLUMNS, flat_lesion_row
from .scans import Scan, ScanOptions


MASK_SUFFIX = "_mask.nii.gz"
# A mask written by a worker and not yet recorded by the client (an interrupted run leaves some;
# the next --resume or --overwrite run removes them).
STAGED_SUFFIX = "_mask.unrecorded.nii.gz"
PLUGIN_PREFIX = "boltzformer-segmenter"


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
                from ..runtime import tune_allocator
                from ..segmenter import Segmenter
                from ..weights import sha256

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


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _peak_rss_mb() -> float:
    from ..runtime import peak_rss_mb

    return round(peak_rss_mb(), 1)


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
        return {"error": one_line(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the user in one line by the client
        where = plugin.worker.address if plugin.worker is not None else "?"
        return {"error": one_line(f"the model could not be loaded on worker {where}: {type(exc).__name__}: {exc}")}
    errors = {}
    for p in prompts:
        try:
            seg.check_prompt(p, force=force_prompt)
        except BoltzformerError as exc:
            errors[p] = one_line(exc)
    return {"sha256": digest, "device": str(seg.device), "load_seconds": plugin.load_seconds, "prompt_errors": errors}


def segment_scan(plugin_name: str, scan: Scan, options: ScanOptions, out_dir: str) -> dict:
    """Task: read, segment and write one scan on a worker -> {"report": row, "lesions": rows,
    "staged": the mask's path until the client records it (ok rows only)}.

    Does what `boltzformer segment SCAN -p PROMPT -o OUT_DIR/<case_id>_mask.nii.gz` does with
    the same options, the mask written under STAGED_SUFFIX (row["mask"] is its final name);
    never raises for a bad scan: the row says failed, with the reason.
    """
    from ..errors import SliceSpacingError
    from ..io import read_volume, write_volume

    t0 = time.perf_counter()
    mask = Path(out_dir) / f"{scan.case_id}{MASK_SUFFIX}"
    staged = Path(out_dir) / f"{scan.case_id}{STAGED_SUFFIX}"
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
            nodule_detector=options.nodule_detector, mirror=options.mirror, planes=options.planes,
        )
        warnings += result.warnings
        write_volume(result.mask_volume(), staged, overwrite=True)  # atomic: temporary, checked, renamed
        lesions = _lesion_rows(scan.case_id, result)
        row.update(status="ok", lesions=len(lesions), mask=str(mask), warnings=" | ".join(one_line(w) for w in warnings))
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
    if row["status"] != "ok":  # failed after its mask was written: no file of a failed scan stays
        with contextlib.suppress(OSError):
            staged.unlink(missing_ok=True)
    row["reason"] = one_line(row["reason"])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["worker_peak_rss_mb"] = _peak_rss_mb()
    return {"report": row, "lesions": lesions, "staged": str(staged) if row["status"] == "ok" else ""}


def _lesion_rows(case_id: str, result) -> list[dict]:
    """lesions.csv rows of one scan: its lesion table as `segment --lesions` writes it, plus the case."""
    rows = []
    for r in result.lesions:
        flat = flat_lesion_row(r)
        rows.append({"case_id": case_id, **{k: flat.get(k, "") for k in CSV_COLUMNS}, "score": flat.get("mean_probability", "")})
    return rows
