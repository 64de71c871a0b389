"""boltzformer.look_here: the click's place on the canonical slice, the slices re-run, the
candidate near the click, and a zero prior through the whole Segmenter being no change at all."""

from __future__ import annotations

import numpy as np
import pytest

from boltzformer.checkpoint import save_model
from boltzformer.errors import BoltzformerError
from boltzformer.io import Volume
from boltzformer import look_here as look_here_module
from boltzformer.look_here import ClickPrior, _half_maximum_region, look_here, slab_around
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.orientation import to_canonical
from boltzformer.segmenter import Segmenter

DIRECTIONS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    "swapped": np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float),
    "z-flipped": np.diag([1.0, -1.0, -1.0]),
}


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_model(build_model(get_config("boltzformer-test", image_size=128), seed=0), path, prompt_bank={})
    return Segmenter.from_pretrained(path, device="cpu")


def make_volume(direction=np.eye(3), shape=(9, 40, 48)):
    rng = np.random.default_rng(0)
    arr = rng.normal(-700, 100, size=shape).astype(np.int16)
    return Volume(arr, (0.7, 0.8, 2.5), (10.0, -5.0, 3.0), direction, "CT", None, {})


@pytest.mark.parametrize("name", DIRECTIONS)
def test_a_click_lands_on_the_same_voxel_of_the_canonical_slice(name):
    volume = make_volume(DIRECTIONS[name])
    frame, reo, _ = to_canonical(volume)
    point = (6, 11, 30)
    one_hot = np.zeros(volume.shape, np.uint8)
    one_hot[point] = 1
    where = np.unravel_index(int(np.argmax(reo.to_canonical(one_hot))), frame.shape)
    assert reo.index_to_canonical(point, volume.shape) == tuple(float(v) for v in where)
    assert reo.index_to_input(where, frame.shape) == tuple(float(v) for v in point)
    fy, fx = ClickPrior(point).yx_fraction(reo, volume.shape, frame.shape)
    assert (fy, fx) == ((where[1] + 0.5) / frame.shape[1], (where[2] + 0.5) / frame.shape[2])


def test_a_zero_prior_through_the_segmenter_changes_nothing_and_a_strong_one_does(segmenter):
    volume = make_volume(DIRECTIONS["swapped"])
    plain = segmenter.segment_volume(volume, "lung nodule", slices=(2, 6), seed=4, return_attention=True)
    zero = segmenter.segment_volume(volume, "lung nodule", slices=(2, 6), seed=4, return_attention=True,
                                    prior=ClickPrior((4, 20, 20), amplitude=0.0, layers=6))
    assert np.array_equal(plain.probabilities, zero.probabilities)
    assert np.array_equal(plain.attention.counts, zero.attention.counts)
    strong = segmenter.segment_volume(volume, "lung nodule", slices=(2, 6), seed=4, return_attention=True,
                                      prior=ClickPrior((4, 20, 20), amplitude=8.0, layers=3))
    assert not np.array_equal(plain.attention.counts[0], strong.attention.counts[0])


def test_slices_re_run_around_a_click():
    assert slab_around((5, 0, 0), 20, 2.5) == (3, 8)  # 5 mm = 2 slices of 2.5 mm each side
    assert slab_around((0, 0, 0), 20, 2.5) == (0, 3)
    assert slab_around((5, 0, 0), 20, 2.5, z_range=(4, 11)) == (4, 12)  # the lesion clicked on
    assert slab_around((5, 0, 0), 20, 10.0) == (5, 6)
    with pytest.raises(BoltzformerError, match="outside"):
        slab_around((25, 0, 0), 20, 2.5)


def test_look_here_proposes_the_component_at_the_click_or_nothing(segmenter, monkeypatch):
    volume = make_volume()
    point = (4, 20, 24)
    everything = look_here(segmenter, volume, "lung nodule", point, threshold=0.0)  # every voxel is above 0
    assert everything.slices == (2, 7)
    assert everything.candidate is not None and everything.candidate.shape == (5, 40, 48)
    assert everything.candidate[point[0] - 2, point[1], point[2]] and everything.distance_mm == 0.0
    assert everything.row["voxels"] == int(everything.candidate.sum())
    assert 0.0 <= everything.row["mean_probability"] <= 1.0
    flat = everything.candidate_indices(volume.shape)
    assert flat.size == everything.row["voxels"] and np.unravel_index(flat.min(), volume.shape)[0] >= 2
    assert everything.attention is None
    # nothing is above 1, and with the floor above 1 no half-maximum region is outlined either
    monkeypatch.setattr(look_here_module, "LOCAL_FLOOR", 1.01)
    nothing = look_here(segmenter, volume, "lung nodule", point, threshold=1.0, return_attention=True)
    assert nothing.candidate is None and nothing.row is None and np.isinf(nothing.distance_mm)
    assert nothing.source == "the model found nothing within 4 mm of the click"
    assert nothing.attention.counts.shape[:2] == (segmenter.config.num_layers, 5)  # where the re-run sampled
    assert nothing.candidate_indices(volume.shape).size == 0
    with pytest.raises(BoltzformerError, match="outside the volume"):
        look_here(segmenter, volume, "lung nodule", (4, 60, 10))


def test_half_maximum_region_outlines_a_faint_bump_near_the_click_only():
    zz, yy, xx = np.indices((5, 40, 40), dtype=np.float64)
    spacing_zyx = np.array([2.5, 0.8, 0.8])
    r2 = ((zz - 2) * 2.5) ** 2 + ((yy - 20) * 0.8) ** 2 + ((xx - 20) * 0.8) ** 2
    prob = (0.001 + 0.04 * np.exp(-r2 / (2 * 2.0**2))).astype(np.float32)  # a 0.04 bump, sigma 2 mm
    region = _half_maximum_region(prob, (2, 22, 21), 0, spacing_zyx, reach_mm=4.0)
    assert region is not None and region[2, 20, 20]
    np.testing.assert_array_equal(region, prob >= 0.5 * prob.max())  # the half-maximum contour
    # 16 mm away only the 0.001 floor of the map is within reach: below LOCAL_FLOOR, nothing
    assert _half_maximum_region(prob, (2, 20, 40), 0, spacing_zyx, reach_mm=4.0) is None


class _StubClassifier:
    threshold = 0.73

    def __init__(self, score):
        self._score = score

    def score(self, hu, labels, rows, spacing_xyz):
        return np.full(len(rows), self._score, np.float32)


@pytest.mark.parametrize("score", [0.2, 0.9])
def test_a_half_maximum_candidate_on_lung_ct_must_pass_the_3d_classifier(segmenter, monkeypatch, score):
    from boltzformer import fp_classifier

    monkeypatch.setattr(fp_classifier, "bundled", lambda: _StubClassifier(score))
    deep = make_volume(shape=(13, 40, 48))  # 32.5 mm of slices: deep enough for the classifier's patch
    found = look_here(segmenter, deep, "lung nodule", (6, 20, 24), threshold=1.0)  # no component
    if score < _StubClassifier.threshold:
        assert found.candidate is None and found.row is None
        assert found.source == "the 3D classifier scores it 0.20"
    else:
        assert found.candidate is not None and found.source == "half maximum"
        assert 0.0 <= found.distance_mm <= 4.0  # the region holds the highest probability within reach
        assert found.row["nodule_score"] == pytest.approx(0.9) and found.row["look_here_source"] == "half maximum"


def test_on_a_scan_thinner_than_its_patch_the_classifier_does_not_judge_a_click(segmenter, monkeypatch):
    from boltzformer import fp_classifier

    monkeypatch.setattr(fp_classifier, "bundled", lambda: _StubClassifier(0.2))  # would turn it down
    found = look_here(segmenter, make_volume(), "lung nodule", (4, 20, 24), threshold=1.0)  # 9 x 2.5 mm
    assert found.candidate is not None and found.source == "half maximum"
    assert "nodule_score" not in found.row
    assert any("3D nodule classifier was not applied" in w for w in found.warnings)


def test_the_candidate_row_reads_the_intensities_the_run_read(segmenter):
    """CT stored as HU + 1024 without its intercept is brought back to HU for the run; the
    clicked candidate's row reads those HU too (it read the stored values, 1024 higher, and
    the 3D classifier would have scored them)."""
    volume = make_volume(np.diag([-1.0, -1.0, 1.0]))  # RAS: the frame is flipped back too
    hu = np.clip(volume.array, -1024, None)  # stored unsigned: nothing below -1024
    hu[:, :8] = -1024  # air around the body, soft tissue beside the lung
    hu[:, 8:20] = np.random.default_rng(1).normal(30, 20, size=hu[:, 8:20].shape)
    volume = volume.with_array(hu)
    shifted = volume.with_array((hu.astype(np.int32) + 1024).astype(np.uint16))
    point = (4, 20, 24)
    plain = look_here(segmenter, volume, "lung nodule", point, threshold=0.0)
    stored = look_here(segmenter, shifted, "lung nodule", point, threshold=0.0)
    assert any("Hounsfield units + 1024" in w for w in stored.warnings)
    assert stored.row["mean_intensity"] == pytest.approx(plain.row["mean_intensity"], abs=1e-3)
