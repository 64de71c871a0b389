"""The segmentation job: the model loaded once per (weights, device), and one run of it.

No Qt here: `segmentation_job` is a plain generator over `Segmenter.iter_segment` that yields
progress and returns a `JobOutcome`; the panel runs it in napari's `thread_worker` (so the viewer
never freezes and Cancel stops it between two batches of slices), tests and scripts run it
directly. The job never raises: every failure comes back as a message for a notification.
torch is imported only by the core, when a model loads.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class SegmenterCache:
    """One Segmenter per (weights source, device), loaded on first use; safe across threads."""

    def __init__(self):
        self._items: dict = {}
        self._lock = threading.Lock()

    def get(self, source, device: str):
        from boltzformer.devices import resolve_device
        from boltzformer.segmenter import Segmenter

        dev = str(resolve_device(device))
        key = (None if source is None else str(source), dev)
        with self._lock:
            segmenter = self._items.get(key)
            if segmenter is None:
                segmenter = Segmenter.from_pretrained(source, device=dev)
                self._items[key] = segmenter
        return segmenter

    def clear(self):
        with self._lock:
            self._items.clear()


SEGMENTERS = SegmenterCache()


@dataclass
class RunRequest:
    volume: object  # boltzformer.io.Volume
    prompt: str
    device: str  # auto | cuda | mps | cpu
    image_name: str
    geometry: dict
    options: dict  # keyword arguments of Segmenter.iter_segment
    want_probability: bool = True
    want_attention: bool = True
    keep_partial: bool = False
    # the napari layer run on: at the end the result goes to it only if it is still that scan
    image_layer: object = field(default=None, compare=False, repr=False)
    image_data: object = field(default=None, compare=False, repr=False)  # its data then: other voxels are another scan
    # what ran it (set by the job; with the seed they replay the sampling noise, which "auto" cannot)
    ran_on: str | None = None  # the device
    ran_batch_size: int | None = None  # slices per network batch (the Segmenter's default when none was asked)


@dataclass
class JobStatus:
    text: str
    level: str = "info"  # info | warning
    model: str | None = None  # set once the model is loaded: what the footer shows


@dataclass
class JobOutcome:
    result: object | None = None  # SegmentationResult
    error: str | None = None
    device: str | None = None
    num_queries: int | None = None  # of the network: the largest possible attention count
    notes: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)  # the result's warnings already shown as the run began
    target: str | None = None  # the vocabulary target the prompt names (boltzformer.synth.prompts)
    kind: str = "lesion"  # 'organ' (one structure) or 'lesion' (a candidate list): the default view


# the share of the sampling mass the heatmap's "hottest cells" hold (its default view, _heatmap)
TOP_FRACTION = 0.5


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 05 s'; '…' while unknown (an ETA before the first batch)."""
    if not math.isfinite(seconds):
        return "…"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _failure(exc: BaseException) -> str:
    """The one line a run's unforeseen failure is reported with."""
    from boltzformer.errors import MEMORY_NEEDED, out_of_memory

    if out_of_memory(exc) == "machine":  # MemoryError says nothing; torch's CPU allocator, too much
        return (f"BoltzFormer ran out of memory ({MEMORY_NEEDED}): segment part of the scan (Scope: slice "
                "range), close other layers, or use a machine with more memory")
    return f"BoltzFormer failed: {type(exc).__name__}: {exc}".splitlines()[0]


def segmentation_job(request: RunRequest, load_segmenter, should_stop):
    """Generator: yields JobStatus and boltzformer Progress; returns a JobOutcome (never raises).

    load_segmenter(device) -> Segmenter. Out of accelerator memory: runs again on the CPU.
    """
    from boltzformer.errors import BoltzformerError

    outcome = JobOutcome()
    try:
        yield JobStatus(f"loading the model ({request.device})")
        segmenter = load_segmenter(request.device)
        outcome.device = _ran_on(request, segmenter)
        outcome.num_queries = int(segmenter.config.num_queries)
        yield JobStatus(f"segmenting on {outcome.device}", model=model_description(segmenter))
        try:
            outcome.result = yield from _warning_early(segmenter.iter_segment(
                request.volume, request.prompt, should_stop=should_stop, **request.options
            ), outcome)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory on an accelerator is retried
            if not is_out_of_memory(exc) or segmenter.device.type == "cpu":
                raise
            segmenter.release_memory()
            note = f"{outcome.device.upper()} ran out of memory; running again on the CPU (slower)"
            outcome.notes.append(note)
            yield JobStatus(note, level="warning")
            segmenter = load_segmenter("cpu")
            outcome.device = _ran_on(request, segmenter)
            yield JobStatus(f"segmenting on {outcome.device}", model=model_description(segmenter))
            outcome.result = yield from _warning_early(segmenter.iter_segment(
                request.volume, request.prompt, should_stop=should_stop, **request.options
            ), outcome)
        if outcome.result is not None:
            outcome.target, outcome.kind = prompt_kind(outcome.result.prompt)
            # the heatmap's first view is made here, not on napari's main thread (0.5-1.3 s, 224 x 512² CT)
            if outcome.result.attention is not None:
                outcome.result.attention.top_mass(TOP_FRACTION)
    except BoltzformerError as exc:
        outcome.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is reported, never raised into Qt
        log.exception("BoltzFormer run failed")
        outcome.error = _failure(exc)
    return outcome


def _ran_on(request: RunRequest, segmenter) -> str:
    """Note on `request` the device and batch size `segmenter` runs it with; returns the device."""
    request.ran_on = str(segmenter.device)
    request.ran_batch_size = request.options.get("batch_size") or segmenter.default_batch_size()
    return request.ran_on


def _warning_early(progress, outcome: JobOutcome):
    """`progress` (Segmenter.iter_segment) passed on, with the warnings its first Progress carries
    yielded as warning JobStatus items as the run begins (and noted in outcome.warned); returns
    what it returns."""
    try:
        while True:
            try:
                item = next(progress)
            except StopIteration as stop:
                return stop.value
            for text in item.warnings:
                if text not in outcome.warned:
                    outcome.warned.append(text)
                    yield JobStatus(text, level="warning")
            yield item
    finally:
        progress.close()


def prompt_kind(prompt: str) -> tuple[str | None, str]:
    """(vocabulary target or None, 'organ' | 'lesion') of a normalised prompt."""
    from boltzformer.synth import prompts as vocab

    target = vocab.target_of_prompt(prompt)
    return target, (vocab.target_kind(target) if target is not None else vocab.kind_of_prompt(prompt))


def model_description(segmenter) -> str:
    """'model: <weights file stem>[ (bundled)] on <device>': the panel's footer."""
    info = getattr(segmenter, "info", None) or {}
    source = info.get("weights_path")
    name = Path(source).stem if source else "injected"
    where = " (bundled)" if info.get("weights_source") == "bundled" else ""
    return f"model: {name}{where} on {segmenter.device}"
