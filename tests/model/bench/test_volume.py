"""`bench volume`'s measuring subprocess: its command line and what it reports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from boltzformer.checkpoint import save_model
from boltzformer.io import Volume, write_volume
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.network.text import PromptEmbedding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Untrained test weights that know "lung nodule", and a small HU CT."""
    folder = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    bank = {"lung nodule": PromptEmbedding(rng.normal(size=(3, 384)).astype(np.float32),
                                           rng.normal(size=384).astype(np.float32))}
    weights = save_model(build_model(get_config("boltzformer-test"), seed=0), folder / "w.safetensors", bank)
    hu = rng.normal(-700, 60, size=(4, 32, 32)).astype(np.int16)
    ct = write_volume(Volume(hu, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), np.eye(3), "CT"), folder / "ct.nii.gz")
    return str(weights), str(ct), folder


@pytest.mark.parametrize("mirror", ["mirror", "no-mirror"])
def test_the_measuring_process_runs_with_and_without_mirror_averaging(tiny, mirror):
    weights, ct, folder = tiny
    out = folder / f"mask_{mirror}.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "boltzformer.bench.volume", "--measure", ct, str(out), "cpu",
                           mirror, weights], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["mirror"] is (mirror == "mirror") and row["slices"] == 4 and out.is_file()
    assert row["seconds_end_to_end"] > 0 and {"encoder", "decoder", "postprocess"} <= set(row["stages_s"])


def test_lesion_counts_are_the_default_pipelines_not_the_detectors(tiny, monkeypatch):
    """`measure` times the opt-in 3D nodule detector after the default run; the counts it reports
    must be the default pipeline's (they were read after the detector's re-threshold once)."""
    from boltzformer.bench.volume import measure
    from boltzformer.io import read_volume
    from boltzformer.results import SegmentationResult
    from boltzformer.segmenter import Segmenter

    weights, ct, folder = tiny
    want = Segmenter.from_pretrained(weights, device="cpu").segment_volume(read_volume(ct), "lung nodule")
    assert len(want.lesions) and len(want.rejected)  # the counts below can tell the two apart
    original = SegmentationResult.rethreshold

    def rethreshold(self, threshold, *args, nodule_detector=None, **kwargs):
        out = original(self, threshold, *args, nodule_detector=nodule_detector, **kwargs)
        if nodule_detector:  # a stand-in detector that keeps nothing
            self.lesions, self.rejected = [], []
        return out

    monkeypatch.setattr(SegmentationResult, "rethreshold", rethreshold)
    row = measure(ct, str(folder / "mask_counts.nii.gz"), "cpu", weights=weights)
    assert row["lesions_found"] == len(want.lesions) and row["fp_filter_rejected"] == len(want.rejected)
    assert row["lesions_found_with_nodule_detector"] == 0


def test_stages_split_the_inference_with_or_without_network_stages():
    from boltzformer.bench.volume import split_stages

    timings = {"preprocess": 0.5, "inference": 4.0, "postprocess": 1.0}
    cpu = split_stages(timings, {"encoder": 2.0, "decoder": 1.0, "pigma": 0.5}, True)
    assert cpu == {"preprocess": 0.5, "postprocess": 1.0, "resize_and_copy": 0.5}
    cuda = split_stages(timings, {}, False)  # CUDA: the network runs as graphs, timed as a whole
    assert cuda == {"preprocess": 0.5, "postprocess": 1.0, "network": 4.0}


def test_the_peak_memory_and_time_reported_are_the_default_pipelines(tiny, monkeypatch):
    """The published peak RSS was read after the opt-in detector had run, and its time counted the
    default post-processing run again."""
    import time

    from boltzformer.bench.volume import measure
    from boltzformer.results import SegmentationResult

    weights, ct, folder = tiny
    original = SegmentationResult.rethreshold
    held, extra = [], []

    def rethreshold(self, threshold, *args, nodule_detector=None, **kwargs):
        out = original(self, threshold, *args, nodule_detector=False if nodule_detector else None, **kwargs)
        if nodule_detector:  # a stand-in detector that needs 400 MB and at least 0.3 s more than the default
            t = time.perf_counter()
            held.append(np.ones(400 * 2**20, np.uint8))
            time.sleep(0.3)
            extra.append(time.perf_counter() - t)
        return out

    monkeypatch.setattr(SegmentationResult, "rethreshold", rethreshold)
    row = measure(ct, str(folder / "mask_peak.nii.gz"), "cpu", weights=weights)
    assert row["peak_rss_mb_with_nodule_detector"] - row["peak_rss_mb"] > 350
    assert abs(row["nodule_detector_s"] - extra[0]) < 0.25  # the default post-processing is not counted twice
    assert row["cuda_first_volume_s"] is None
