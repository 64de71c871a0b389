"""The panel's job without a viewer or Qt: progress, the out-of-memory retry on the CPU, errors
as messages, and the model cache."""

from __future__ import annotations

import sys

import pytest

from napari_boltzformer._job import JobOutcome, JobStatus, RunRequest, SegmenterCache, segmentation_job

from .conftest import PROMPT, ct_volume, out_of_memory_gpu


def _request(device="auto") -> RunRequest:
    return RunRequest(volume=ct_volume(), prompt=PROMPT, device=device, image_name="ct", geometry={},
                      options={"min_lesion_mm3": 0.0})


def _drain(job) -> tuple[list, JobOutcome]:
    """(everything the job yielded, what it returned)."""
    items = []
    while True:
        try:
            items.append(next(job))
        except StopIteration as stop:
            return items, stop.value


def test_the_job_yields_status_then_progress_and_returns_the_result(tiny_segmenter):
    items, outcome = _drain(segmentation_job(_request(), lambda device: tiny_segmenter, lambda: False))
    assert outcome.error is None and outcome.result is not None and outcome.result.prompt == PROMPT
    assert outcome.device == "cpu" and outcome.num_queries == tiny_segmenter.config.num_queries
    assert (outcome.target, outcome.kind) == ("lung_nodule", "lesion")
    assert isinstance(items[0], JobStatus) and items[0].text == "loading the model (auto)"
    assert items[1].model and items[1].model.startswith("model: ")
    progress = items[2:]
    assert progress and all(not isinstance(p, JobStatus) for p in progress)
    assert progress[-1].slices_done == progress[-1].slices_total


def test_the_inputs_warnings_are_yielded_as_the_run_begins_and_noted(tiny_segmenter):
    """The panel showed the input's warnings (a range past the end, a tiny matrix...) only once
    the whole run had ended; now as it begins, and not again at its end."""
    request = _request()
    request.options["slices"] = (2, 100)
    items, outcome = _drain(segmentation_job(request, lambda device: tiny_segmenter, lambda: False))
    warned = [i for i in items if isinstance(i, JobStatus) and i.level == "warning"]
    first_batch = next(k for k, i in enumerate(items) if getattr(i, "slices_done", 0) > 0)
    assert warned and all(items.index(w) < first_batch for w in warned)
    assert any("reaches past the volume" in w.text for w in warned)
    assert outcome.warned == [w.text for w in warned] and set(outcome.warned) <= set(outcome.result.warnings)


def test_the_heatmaps_first_view_is_made_in_the_worker(tiny_segmenter):
    """The end of a run built the heatmap's hottest-cells view on napari's main thread (0.5-1.3 s on
    a 224 x 512² CT): the job makes it, and the panel finds it cached."""
    from napari_boltzformer._job import TOP_FRACTION

    request = _request()
    request.options["return_attention"] = True
    _, outcome = _drain(segmentation_job(request, lambda device: tiny_segmenter, lambda: False))
    attention = outcome.result.attention
    cached = dict(attention._top_mass_cache)
    assert [fraction for fraction, _ in cached] == [TOP_FRACTION]
    assert attention.top_mass(TOP_FRACTION) is next(iter(cached.values()))


def test_out_of_memory_on_an_accelerator_runs_again_on_the_cpu(tiny_segmenter):
    devices, released = [], []

    def load(device):
        devices.append(device)
        return out_of_memory_gpu(tiny_segmenter, released) if device == "cuda" else tiny_segmenter

    items, outcome = _drain(segmentation_job(_request("cuda"), load, lambda: False))
    assert devices == ["cuda", "cpu"] and released == [True]
    assert outcome.error is None and outcome.device == "cpu" and outcome.result is not None
    warnings = [i for i in items if isinstance(i, JobStatus) and i.level == "warning"]
    assert [w.text for w in warnings] == outcome.notes == ["CUDA ran out of memory; running again on the CPU (slower)"]


@pytest.mark.parametrize("error, message", [
    ("library", "no such weights"),
    ("other", "BoltzFormer failed: RuntimeError: boom"),
    # out of the computer's memory: MemoryError says nothing, torch's CPU allocator a line of C++
    ("memory", "BoltzFormer ran out of memory (a run's peak is about 0.35 GB plus six to seven times"),
    ("allocator", "BoltzFormer ran out of memory (a run's peak is about 0.35 GB plus six to seven times"),
])
def test_failures_come_back_as_one_line_messages(error, message):
    from boltzformer.errors import WeightsError

    def load(device):
        raise {"library": WeightsError("no such weights"), "other": RuntimeError("boom\nmore lines"),
               "memory": MemoryError(),
               "allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 4294967296 bytes")}[error]

    _, outcome = _drain(segmentation_job(_request(), load, lambda: False))
    assert outcome.result is None and outcome.error.startswith(message) and "\n" not in outcome.error


def test_the_cache_loads_a_model_once_per_weights_and_device(tiny_weights):
    cache = SegmenterCache()
    first = cache.get(tiny_weights, "cpu")
    assert cache.get(str(tiny_weights), "cpu") is first
    cache.clear()
    assert cache.get(tiny_weights, "cpu") is not first


def test_the_job_module_imports_neither_qt_nor_napari():
    import subprocess

    code = "import sys, napari_boltzformer._job; print(sorted(m for m in ('qtpy', 'napari', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
