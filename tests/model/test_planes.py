"""Three-plane inference (boltzformer.planes): the cuts' geometry, when three planes run, and
the median that the segmenter returns."""

import numpy as np
import pytest

from boltzformer import planes
from boltzformer.errors import BoltzformerError
from boltzformer.io import Volume
from boltzformer.segmenter import Segmenter


@pytest.mark.parametrize("plane", planes.CUT_PLANES)
def test_a_cut_of_isotropic_voxels_maps_back_exactly(plane):
    rng = np.random.default_rng(1)
    vol = rng.random((12, 20, 16)).astype(np.float32)
    cut = planes.PlaneCut(plane, vol.shape, (1.0, 1.0, 1.0))
    images = cut.images(vol, 0, cut.n_slices)
    assert images.shape == (cut.n_slices, 20 if plane == "sagittal" else 16, cut.side)
    out = np.zeros_like(vol)
    for i0 in range(0, cut.n_slices, 3):  # in batches, as the segmenter writes them
        cut.to_axial(images[i0 : i0 + 3], out, i0)
    np.testing.assert_array_equal(out, vol)


def test_a_cut_shows_superior_at_the_top_in_proportion():
    vol = np.zeros((10, 8, 12), np.float32)  # z 2 mm, y 1 mm, x 1 mm
    vol[-1, 3, 5] = 1.0  # most superior slice
    cut = planes.PlaneCut("coronal", vol.shape, (1.0, 1.0, 2.0))
    assert (cut.rows, cut.columns, cut.side, cut.n_slices) == (20, 12, 20, 8)
    image = cut.images(vol, 3, 4)[0]
    ys, xs = np.nonzero(image > 0.2)
    assert ys.min() == 0 and ys.max() <= 2  # the top rows (2 rows per 2 mm slice, bilinear)
    assert set(xs) == {5 + (20 - 12) // 2}  # columns centred in the square
    sag = planes.PlaneCut("sagittal", vol.shape, (1.0, 1.0, 2.0))
    assert (sag.columns, sag.n_slices, sag.slice_spacing_mm) == (8, 12, 1.0)


def test_median_of_three_is_the_voxelwise_median():
    rng = np.random.default_rng(2)
    a, b, c = rng.random((3, 4, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(planes.median_of_three(a, b, c), np.median(np.stack([a, b, c]), 0), atol=1e-6)


def test_which_volumes_get_three_planes():
    warnings = []
    iso_mr = ((180, 200, 180), (1.0, 1.0, 1.0))
    assert not planes.choose("axial", "MR", *iso_mr, warnings)
    assert planes.choose("auto", "MR", *iso_mr, warnings)
    assert not planes.choose("auto", "CT", *iso_mr, warnings)  # CT stays axial unless asked
    assert planes.choose("three", "CT", *iso_mr, warnings) and not warnings
    assert not planes.choose("auto", "MR", (40, 256, 256), (0.9, 0.9, 3.0), warnings)  # thick slices
    assert not warnings  # auto says nothing when it keeps to axial
    assert planes.choose("three", "MR", (40, 256, 256), (0.9, 0.9, 3.0), warnings)
    assert "blurred along z" in warnings.pop()
    assert not planes.choose("three", "MR", (10, 256, 256), (1.0, 1.0, 1.0), warnings)  # 10 mm deep
    assert "axial only" in warnings.pop()
    with pytest.raises(BoltzformerError, match="planes must be one of"):
        planes.choose("coronal", "MR", *iso_mr, warnings)


@pytest.fixture
def mr_volume():
    rng = np.random.default_rng(3)
    arr = rng.normal(100, 20, size=(40, 36, 38)).astype(np.float32)
    arr[10:20, 8:16, 12:22] += 200  # a bright block
    return Volume(arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "MR", None, {})


def _network_echoes_its_input(self, slices01, embedding, generator, return_attention=False, stage_times=None,
                              out_hw=None, prior=None, mirror=False):
    """A stand-in network whose probability is its input image: every plane sees the same volume."""
    x = slices01 if slices01.ndim == 3 else slices01[:, 0]
    assert out_hw is None or tuple(out_hw) == x.shape[1:]
    return x.astype(np.float32), None


def test_three_planes_land_on_the_axial_grid(tiny_segmenter, mr_volume, monkeypatch):
    """With a network that returns its input, the coronal and sagittal passes give back the
    prepared volume itself only if every cut maps back to the right voxels (a flipped or
    transposed cut would move the bright block); the median is then the axial pass."""
    monkeypatch.setattr(Segmenter, "predict_batch", _network_echoes_its_input)
    views = []
    median = planes.median_of_three
    monkeypatch.setattr(planes, "median_of_three", lambda *v: views.extend(v) or median(*v))
    axial = tiny_segmenter.segment_volume(mr_volume, "multiple sclerosis lesion", planes="axial", batch_size=7)
    three = tiny_segmenter.segment_volume(mr_volume, "multiple sclerosis lesion", planes="three", batch_size=7)
    assert axial.planes == "axial" and three.planes == "three" and len(views) == 3
    for view in views:
        np.testing.assert_allclose(view, axial.probabilities, atol=1e-6)
    np.testing.assert_allclose(three.probabilities, axial.probabilities, atol=1e-6)


def test_three_planes_take_the_median_of_real_passes(tiny_segmenter, mr_volume):
    seen = []
    gen = tiny_segmenter.iter_segment(mr_volume, "multiple sclerosis lesion", planes="auto", batch_size=8)
    while True:
        try:
            seen.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert result.planes == "three" and result.complete
    assert seen[-1].slices_done == seen[-1].slices_total == 40 + 36 + 38  # axial, coronal, sagittal slices
    axial = tiny_segmenter.segment_volume(mr_volume, "multiple sclerosis lesion", planes="axial", batch_size=8)
    assert not np.allclose(axial.probabilities, result.probabilities, atol=1e-3)
    ct = mr_volume.with_array(np.full(mr_volume.shape, -800, np.int16))
    assert tiny_segmenter.segment_volume(ct, "lung nodule", modality="CT", planes="auto").planes == "axial"


def test_stopping_during_a_cut_keeps_the_axial_pass(tiny_segmenter, mr_volume):
    calls = []

    def stop_in_the_coronal_pass():
        calls.append(1)
        return len(calls) > 6  # 40 axial slices in batches of 8: 5 polls, then the coronal pass

    axial = tiny_segmenter.segment_volume(mr_volume, "multiple sclerosis lesion", planes="axial", batch_size=8)
    res = tiny_segmenter.segment_volume(mr_volume, "multiple sclerosis lesion", planes="three", batch_size=8,
                                   should_stop=stop_in_the_coronal_pass)
    assert not res.complete and res.planes == "axial"
    assert any("stopped before the coronal and sagittal passes" in w for w in res.warnings)
    np.testing.assert_array_equal(res.probabilities, axial.probabilities)
