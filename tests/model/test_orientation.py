"""Canonical axial orientation: LPS, RAS and permuted copies of a volume segment identically."""

import numpy as np
import pytest
import SimpleITK as sitk

from boltzformer.checkpoint import save_model
from boltzformer.io import Volume
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.orientation import find_reorientation, to_canonical
from boltzformer.segmenter import Segmenter


def _volume(direction=np.eye(3)):
    rng = np.random.default_rng(1)
    arr = rng.normal(-700, 150, size=(6, 30, 40)).astype(np.int16)
    arr[2:4, 10:14, 5:9] = 40  # an asymmetric bright block, so a wrong flip would show
    return Volume(arr, (0.7, 0.8, 2.5), (10.0, -5.0, 3.0), direction, "CT", None, {})


def _copies(volume):
    """The same voxels at the same world positions, stored LPS, RAS, and with permuted axes."""
    img = volume.to_sitk()
    ras = sitk.Flip(img, [True, True, False])
    permuted = sitk.PermuteAxes(img, [2, 0, 1])  # stored as if acquired along x (sagittal)
    return {"lps": volume, "ras": Volume.from_sitk(ras), "permuted": Volume.from_sitk(permuted)}


def _world_points(vol, mask):
    idx = np.argwhere(mask > 0)
    return {tuple(np.round(p, 3)) for p in vol.index_to_world(idx)}


def test_find_reorientation_cases():
    assert find_reorientation(np.eye(3)).is_identity
    ras = find_reorientation(np.diag([-1.0, -1.0, 1.0]))
    assert ras.source_axis == (0, 1, 2) and ras.flip == (True, True, False) and ras.keeps_slices
    sag = find_reorientation(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float))
    assert sorted(sag.source_axis) == [0, 1, 2] and not sag.keeps_slices
    t = np.deg2rad(30)  # an oblique volume goes to its nearest axis-aligned frame
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    assert find_reorientation(rot).is_identity


@pytest.mark.parametrize("name", ["ras", "permuted"])
def test_canonical_volume_has_the_same_voxels_in_world_space(name):
    vol = _copies(_volume())[name]
    canon, reo, _ = to_canonical(vol)
    assert not reo.is_identity
    np.testing.assert_allclose(canon.direction, np.eye(3), atol=1e-9)
    bright_in = _world_points(vol, vol.array == 40)
    bright_canon = _world_points(canon, canon.array == 40)
    assert bright_in == bright_canon and len(bright_in) == 2 * 4 * 4
    np.testing.assert_array_equal(reo.from_canonical(canon.array), vol.array)  # exact round trip


def test_non_axial_acquisition_is_warned_about():
    _, reo, warnings = to_canonical(_copies(_volume())["permuted"])
    assert not reo.keeps_slices and warnings and "axial slices" in warnings[0]


@pytest.mark.parametrize("slice_axis, named", [((1.0, 0.0, 0.0), "x (left-right)"), ((0.0, 1.0, 0.0), "y (anterior-posterior)")])
def test_the_warning_names_the_world_axis_the_slices_are_stacked_along(slice_axis, named):
    """A sagittal series (slices stacked along world x) is named so; it read 'along y'."""
    normal = np.array(slice_axis)
    in_plane = [np.array(v) for v in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)) if not np.allclose(v, normal)]
    direction = np.stack([in_plane[0], in_plane[1], normal], axis=1)
    if np.linalg.det(direction) < 0:
        direction[:, 0] *= -1
    _, _, warnings = to_canonical(_volume(direction))
    assert f"acquired along {named}" in warnings[0]


@pytest.mark.parametrize("normal, plane", [((1.0, 0.0, 0.0), "sagittal"), ((0.0, 1.0, 0.0), "coronal")])
def test_a_single_sagittal_or_coronal_slice_is_segmented_in_its_own_plane(normal, plane):
    """One sagittal slice was cut into axial "slices" one pixel wide: 256 rows of 256 x 1 pixels,
    and lesions were reported along them. A single slice is segmented as the image it is."""
    normal = np.array(normal)
    in_plane = [np.array(v) for v in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)) if not np.allclose(v, normal)]
    direction = np.stack([in_plane[0], in_plane[1], normal], axis=1)
    full = _volume(direction)
    volume = Volume(full.array[2:3].copy(), full.spacing_mm, full.origin_mm, direction, "CT", None, {})
    canon, reo, warnings = to_canonical(volume)
    assert reo.is_identity and canon is volume
    assert len(warnings) == 1 and f"a single {plane} slice: segmented in its own plane" in warnings[0]


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i] = m[j, j] = np.cos(t)
    m[i, j], m[j, i] = -np.sin(t), np.sin(t)
    return m


@pytest.mark.parametrize("axis, degrees, warned", [(0, 20, True), (1, -25, True), (0, 5, False), (2, 30, False)])
def test_tilted_slices_are_warned_about_and_in_plane_rotation_is_not(axis, degrees, warned):
    # rotation about x or y tilts the slice normal (gantry tilt); about z the slices stay axial
    canon, reo, warnings = to_canonical(_volume(_rotation(axis, degrees)))
    tilt = [w for w in warnings if "tilted" in w]
    assert bool(tilt) == warned
    if warned:
        assert f"{abs(degrees)}°" in tilt[0]
    np.testing.assert_array_equal(reo.from_canonical(canon.array), _volume().array)


def test_tilted_ras_volume_is_warned_once_and_reoriented():
    direction = np.diag([-1.0, -1.0, 1.0]) @ _rotation(0, 20)
    _, reo, warnings = to_canonical(_volume(direction))
    assert not reo.is_identity and sum("tilted" in w for w in warnings) == 1


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_model(build_model(get_config("boltzformer-test"), seed=0), path, prompt_bank={})
    return Segmenter.from_pretrained(path, device="cpu")


def test_lps_ras_and_permuted_copies_give_the_same_mask_in_world_space(segmenter):
    copies = _copies(_volume())
    # The 3D classifier would rightly drop the untrained model's candidates: the lung rule alone decides.
    results = {k: segmenter.segment_volume(v, "lung nodule", threshold=0.45, min_lesion_mm3=0, min_nodule_score=0.0)
               for k, v in copies.items()}
    ref = results["lps"]
    assert 0 < ref.mask.sum() < ref.mask.size
    for name, r in results.items():
        v = copies[name]
        assert r.mask.shape == v.shape and r.mask_volume().same_geometry(v)
        assert _world_points(v, r.mask) == _world_points(copies["lps"], ref.mask), name
        # the lesion table describes the same lesions, with centroids in the input's own voxels
        assert len(r.lesions) == len(ref.lesions)
        for a, b in zip(sorted(r.lesions, key=lambda x: x["voxels"]), sorted(ref.lesions, key=lambda x: x["voxels"])):
            np.testing.assert_allclose(a["centroid_world_mm"], b["centroid_world_mm"], atol=1e-6)
            np.testing.assert_allclose(v.index_to_world(a["centroid_voxel_zyx"]), a["centroid_world_mm"], atol=1e-6)
            assert a["volume_mm3"] == pytest.approx(b["volume_mm3"])


def test_ras_attention_maps_come_back_on_the_input_slices(segmenter):
    copies = _copies(_volume())
    a = segmenter.segment_volume(copies["lps"], "lung nodule", return_attention=True, slices=(1, 4)).attention
    r = segmenter.segment_volume(copies["ras"], "lung nodule", return_attention=True, slices=(1, 4))
    b = r.attention
    assert r.slices == (1, 4) and b.slice_start == 1 and b.frame is None
    np.testing.assert_array_equal(b.counts, a.counts[:, :, ::-1, ::-1])


def test_slice_range_on_a_z_flipped_volume_maps_to_the_same_slices(segmenter):
    vol = _volume()
    flipped = Volume.from_sitk(sitk.Flip(vol.to_sitk(), [False, False, True]))
    r = segmenter.segment_volume(flipped, "lung nodule", slices=(1, 3), threshold=0.0)
    assert r.slices == (1, 3)
    assert r.probabilities[[0, 3, 4, 5]].max() == 0 and r.probabilities[1:3].min() > 0
