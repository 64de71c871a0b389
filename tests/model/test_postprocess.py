"""Tests for boltzformer.postprocess: components, sizes, lesion table, its files, overlap measures."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
from scipy import ndimage

from boltzformer.errors import OutputError
from boltzformer.io import Volume
from boltzformer.postprocess import (
    CSV_COLUMNS, dice, dilate_ellipsoid, label_components, lesion_detection, lesion_table, remove_small_lesions,
    write_lesion_table,
)


def disc(shape_yx, center_yx, radius_px) -> np.ndarray:
    yy, xx = np.mgrid[: shape_yx[0], : shape_yx[1]]
    return (yy - center_yx[0]) ** 2 + (xx - center_yx[1]) ** 2 <= radius_px**2


def test_components_connect_across_slices():
    mask = np.zeros((3, 5, 5), bool)
    mask[0, 1, 1] = mask[1, 2, 2] = mask[2, 3, 3] = True  # a diagonal chain through 3 slices
    labels, n = label_components(mask, (1, 1, 1))
    assert n == 1 and labels.dtype == np.uint16 and set(np.unique(labels)) == {0, 1}
    assert label_components(mask, (1, 1, 1), connectivity=6)[1] == 3


def test_labels_in_descending_volume_order():
    mask = np.zeros((4, 20, 20), bool)
    mask[0, 0, 0] = True  # 1 voxel, found first in scan order
    mask[1:3, 5:8, 5:8] = True  # 18 voxels
    mask[2, 15:17, 15:17] = True  # 4 voxels
    labels, n = label_components(mask, (1, 1, 1))
    assert n == 3
    assert [np.count_nonzero(labels == k) for k in (1, 2, 3)] == [18, 4, 1]
    np.testing.assert_array_equal(labels > 0, mask)


def test_min_size_in_mm3_with_anisotropic_spacing():
    mask = np.zeros((5, 10, 10), bool)
    mask[0, 0, :3] = True  # 3 voxels
    mask[2:4, 5:7, 5:8] = True  # 12 voxels
    spacing = (0.5, 0.5, 4.0)  # (x, y, z): one voxel = 1 mm³
    labels, n = label_components(mask, spacing, min_lesion_mm3=5.0)
    assert n == 1 and np.count_nonzero(labels) == 12
    assert label_components(mask, spacing, min_lesion_mm3=3.0)[1] == 2  # exactly at the limit is kept
    assert label_components(mask, (1, 1, 1), min_lesion_mm3=5.0)[1] == 1
    assert label_components(mask, (2, 2, 2), min_lesion_mm3=5.0)[1] == 2  # 3 voxels = 24 mm³ here
    cleaned = remove_small_lesions(mask, spacing, 5.0)
    assert cleaned.dtype == np.uint8 and cleaned.sum() == 12 and cleaned[0].sum() == 0
    labels, n = label_components(np.zeros((2, 3, 3), bool), spacing)
    assert n == 0 and not labels.any()


@pytest.mark.parametrize("radius_px", [10, 60])  # 60: many boundary pixels, convex hull path
def test_diameter_of_a_disc(radius_px):
    size = 2 * radius_px + 11
    mask = np.zeros((3, size, size), bool)
    mask[1] = disc((size, size), (size // 2, size // 2), radius_px)
    vol = Volume(np.zeros(mask.shape, np.int16), (0.5, 0.5, 3.0))
    (row,) = lesion_table(label_components(mask, vol.spacing_mm)[0], vol)
    expected = 2 * radius_px * 0.5  # 10 mm for radius 10 px
    assert abs(row["longest_axial_diameter_mm"] - expected) <= 0.5 + 1e-9  # within one pixel
    assert row["slice_start"] == row["slice_end"] == 1


def test_diameter_small_shapes_and_anisotropic_pixels():
    mask = np.zeros((4, 12, 12), np.uint8)
    mask[0, 2, 2] = 1  # single voxel
    mask[2, 8, 2:7] = 1  # 5 pixels along x
    mask[3, 0:4, 10] = 1  # 4 pixels along y (joins nothing: far from the others)
    vol = Volume(np.zeros(mask.shape), (0.7, 0.9, 5.0))
    labels, n = label_components(mask, vol.spacing_mm, connectivity=6)
    rows = {r["voxels"]: r for r in lesion_table(labels, vol)}
    assert rows[1]["longest_axial_diameter_mm"] == pytest.approx(0.9)  # the larger pixel side
    assert rows[5]["longest_axial_diameter_mm"] == pytest.approx(5 * 0.7)
    assert rows[4]["longest_axial_diameter_mm"] == pytest.approx(4 * 0.9)
    # a lesion over several slices: the widest slice counts
    mask = np.zeros((3, 30, 30), bool)
    mask[0] = disc((30, 30), (15, 15), 3)
    mask[1] = disc((30, 30), (15, 15), 8)
    mask[2] = disc((30, 30), (15, 15), 5)
    (row,) = lesion_table(label_components(mask, (1, 1, 1))[0], Volume(np.zeros(mask.shape), (1, 1, 1)))
    assert 16 <= row["longest_axial_diameter_mm"] <= 17.5
    assert (row["slice_start"], row["slice_end"]) == (0, 2)


def test_centroid_world_and_intensities():
    c, s = math.cos(0.4), math.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    image = np.arange(6 * 10 * 12, dtype=np.int16).reshape(6, 10, 12)
    vol = Volume(image, (0.8, 0.6, 2.5), (-30.0, 12.0, 50.0), direction)
    mask = np.zeros(vol.shape, bool)
    mask[2:5, 3:6, 4:9] = True  # centre index (z, y, x) = (3, 4, 6)
    labels, _ = label_components(mask, vol.spacing_mm)
    (row,) = lesion_table(labels, vol)
    assert row["lesion_id"] == 1 and row["voxels"] == 45
    assert row["volume_mm3"] == pytest.approx(45 * 0.8 * 0.6 * 2.5)
    assert row["centroid_voxel_zyx"] == pytest.approx((3, 4, 6))
    # by hand: origin + direction @ (spacing * (x, y, z))
    expected = np.array([-30.0, 12.0, 50.0]) + direction @ np.array([6 * 0.8, 4 * 0.6, 3 * 2.5])
    assert row["centroid_world_mm"] == pytest.approx(tuple(expected))
    assert (row["slice_start"], row["slice_end"]) == (2, 4)
    assert row["mean_intensity"] == pytest.approx(image[mask].mean())
    probabilities = np.full(vol.shape, 0.25, np.float32)
    assert lesion_table(labels, vol, intensity=probabilities)[0]["mean_intensity"] == pytest.approx(0.25)
    assert lesion_table(np.zeros(vol.shape, np.int32), vol) == []


@pytest.fixture
def rows():
    mask = np.zeros((4, 16, 16), bool)
    mask[1:3, 2:6, 2:6] = True
    mask[3, 10:12, 10:14] = True
    vol = Volume(np.ones(mask.shape, np.int16), (0.5, 0.5, 2.0), (1.0, 2.0, 3.0))
    return lesion_table(label_components(mask, vol.spacing_mm)[0], vol)


def test_write_csv(tmp_path, rows):
    path = write_lesion_table(rows, tmp_path / "lesions.csv")
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == CSV_COLUMNS
    assert [int(r["lesion_id"]) for r in read] == [1, 2]
    # lesion 2 is mask[3, 10:12, 10:14] on 0.5 x 0.5 x 2 mm voxels from (1, 2, 3) mm: every centroid
    # column differs, so a swapped or misnamed one fails (worked out by hand, not by the code)
    centroid = {k: float(read[1][k]) for k in ("centroid_z", "centroid_y", "centroid_x",
                                               "centroid_lps_x_mm", "centroid_lps_y_mm", "centroid_lps_z_mm")}
    assert centroid == pytest.approx({"centroid_z": 3.0, "centroid_y": 10.5, "centroid_x": 11.5,
                                      "centroid_lps_x_mm": 6.75, "centroid_lps_y_mm": 7.25, "centroid_lps_z_mm": 9.0})
    assert [float(read[0][k]) for k in ("centroid_z", "centroid_y", "centroid_x")] == [1.5, 3.5, 3.5]
    assert float(read[0]["volume_mm3"]) == pytest.approx(32 * 0.5)
    assert [p.name for p in tmp_path.iterdir()] == ["lesions.csv"]
    # an empty table is a header only
    write_lesion_table([], tmp_path / "none.csv")
    assert (tmp_path / "none.csv").read_text().strip() == ",".join(CSV_COLUMNS)


def test_write_json(tmp_path, rows):
    path = write_lesion_table(rows, tmp_path / "lesions.json")
    loaded = json.loads(path.read_text())
    assert len(loaded) == 2 and loaded[0]["lesion_id"] == 1
    assert loaded[0]["centroid_world_mm"] == pytest.approx(list(rows[0]["centroid_world_mm"]))
    assert loaded[1]["voxels"] == rows[1]["voxels"]


def test_table_refuses_overwrite_and_bad_extension(tmp_path, rows):
    path = tmp_path / "lesions.csv"
    path.write_text("keep me")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        write_lesion_table(rows, path)
    assert path.read_text() == "keep me"
    write_lesion_table(rows, path, overwrite=True)
    assert path.read_text().startswith("lesion_id,")
    with pytest.raises(OutputError, match=r"\.csv or \.json"):
        write_lesion_table(rows, tmp_path / "lesions.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["lesions.csv"]


def test_table_write_failure_leaves_nothing(tmp_path, rows, monkeypatch):
    def full(fd):  # the data were handed over; the disk refuses them when they are flushed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="lesions.json: could not be written: no space left on device"):
        write_lesion_table(rows, tmp_path / "lesions.json")
    assert list(tmp_path.iterdir()) == []


def test_dice():
    empty = np.zeros((2, 4, 4), bool)
    assert dice(empty, empty) == 1.0
    a, b = empty.copy(), empty.copy()
    a[0, 0, :4] = True
    b[0, 0, 2:4] = b[0, 1, 0:2] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, empty) == 0.0
    assert dice(a, a.astype(np.uint8)) == 1.0
    with pytest.raises(ValueError, match=r"mask shapes differ: \(2, 4, 4\) vs \(1, 4, 4\)"):
        dice(a, np.zeros((1, 4, 4)))


def test_lesion_detection():
    truth = np.zeros((6, 20, 20), bool)
    truth[0:2, 1:4, 1:4] = True  # lesion A
    truth[3, 10:13, 10:13] = True  # lesion B
    truth[5, 17:19, 1:3] = True  # lesion C (missed)
    pred = np.zeros_like(truth)
    pred[1, 3, 3] = True  # one voxel of A is enough
    pred[3:5, 11:15, 11:15] = True  # overlaps B and spills over
    pred[0, 15:18, 15:18] = True  # false positive, 9 voxels
    pred[5, 0, 19] = True  # false positive, 1 voxel
    result = lesion_detection(pred, truth, (1, 1, 1))
    assert result == {"true_lesions": 3, "detected": 2, "sensitivity": pytest.approx(2 / 3), "false_positive_components": 2,
                      "true_lesion_detected": [True, True, False],  # A, B (9 voxels each, A first in z), C
                      "true_lesion_diameters_mm": [3.828, 3.828, 2.414]}  # 3x3 and 2x2 px: both diagonals + 1 px
    assert lesion_detection(pred, truth, (1, 1, 1), min_lesion_mm3=2)["false_positive_components"] == 1
    none = lesion_detection(pred, np.zeros_like(truth), (1, 1, 1))
    assert none["true_lesions"] == 0 and math.isnan(none["sensitivity"]) and none["false_positive_components"] == 4


# -- sparse volumes: the box-restricted helpers give exactly what the whole-volume calls give -------
def _scattered_labels(seed: int, shape=(24, 40, 52), fraction=0.004):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    labels, _ = ndimage.label(rng.random(shape) < fraction)
    return labels.astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_find_objects_and_relabel_match_whole_volume(seed):
    from scipy import ndimage

    from boltzformer.postprocess import find_objects, foreground_box, relabel

    labels = _scattered_labels(seed)
    labels[:, :5] = 0  # foreground away from the edges: the box is a strict sub-volume
    box = foreground_box(labels)
    assert box is not None and labels[box].sum() == labels.sum()
    assert find_objects(labels) == ndimage.find_objects(labels)
    lut = np.random.default_rng(seed).permutation(int(labels.max()) + 1).astype(np.int32)
    lut[0] = 0
    np.testing.assert_array_equal(relabel(labels, lut), lut[labels])


def test_sparse_helpers_on_an_empty_volume():
    from boltzformer.postprocess import find_objects, foreground_box, relabel

    empty = np.zeros((3, 4, 5), np.int32)
    assert foreground_box(empty) is None and find_objects(empty) == []
    assert not relabel(empty, np.zeros(1, np.int32)).any()


@pytest.mark.parametrize("min_mm3", [0.0, 3.0])
def test_label_components_in_the_box_equals_whole_volume_labelling(min_mm3):
    """The box-restricted labelling keeps the documented order (size, then z-y-x scan order)."""
    from scipy import ndimage

    mask = _scattered_labels(5, fraction=0.05) > 0
    mask[:2] = mask[-3:] = False
    spacing = (1.0, 1.0, 1.0)
    labels, n = label_components(mask, spacing, min_lesion_mm3=min_mm3)
    ref, m = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    counts = np.bincount(ref.ravel())[1:]
    order = [i for i in np.argsort(-counts, kind="stable") if counts[i] >= min_mm3]
    lut = np.zeros(m + 1, np.int32)
    lut[np.array(order) + 1] = np.arange(1, len(order) + 1)
    assert n == len(order) and labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, lut[ref])


def test_labels_fall_back_to_int32_beyond_uint16():
    """More components than uint16 can number: int32 labels, still complete and ordered."""
    mask = np.zeros((82, 82, 82), bool)
    mask[::2, ::2, ::2] = True  # 41**3 = 68 921 isolated voxels
    labels, n = label_components(mask, (1, 1, 1))
    assert n == 41**3 and labels.dtype == np.int32
    assert labels[0, 0, 0] == 1 and labels[-2, -2, -2] == n and labels.max() == n
    small, m = label_components(mask[:40], (1, 1, 1))
    assert m == 20 * 41 * 41 and small.dtype == np.uint16


@pytest.mark.parametrize("radius_vox", [(1, 1, 1), (3, 4, 4), (2, 5, 3), (5, 3, 4), (1, 7, 10), (4, 4, 1), (0, 3, 2)])
def test_ellipsoid_dilation_by_distance_transform_is_the_binary_dilation(radius_vox):
    """The distance-transform dilation gives exactly the binary dilation by the ellipsoid of those
    radii (integer arithmetic: boundary offsets such as (3, 4) on a radius-5 circle are inside)."""
    rz, ry, rx = radius_vox
    z, y, x = np.ogrid[-rz : rz + 1, -ry : ry + 1, -rx : rx + 1]
    if rz == 0:  # an axis of radius 0 is not dilated: the in-plane ellipse
        ball = (y * rx) ** 2 + (x * ry) ** 2 <= (ry * rx) ** 2
    else:
        ball = (z * ry * rx) ** 2 + (y * rz * rx) ** 2 + (x * rz * ry) ** 2 <= (rz * ry * rx) ** 2
    rng = np.random.default_rng(sum(radius_vox))
    region = rng.random((75, 25, 23)) < 0.01  # 75 slices: three slabs of the distance transform
    region[0, 0, 0] = region[-1, 12, -1] = True  # at the faces: the dilation is clipped there, not wrapped
    region[31, 5, 5] = region[32, 20, 20] = True  # either side of a slab boundary
    np.testing.assert_array_equal(dilate_ellipsoid(region, radius_vox),
                                  ndimage.binary_dilation(region, structure=ball))
    assert not dilate_ellipsoid(np.zeros((3, 4, 5), bool), radius_vox).any()


def test_ellipsoid_dilation_beyond_the_distance_transform_radius():
    """Radii past ELLIPSOID_EDT_MAX_RADIUS take the binary dilation: the same ellipsoid."""
    from boltzformer.postprocess import ELLIPSOID_EDT_MAX_RADIUS

    ry = ELLIPSOID_EDT_MAX_RADIUS + 5
    region = np.zeros((3, 2 * ry + 9, 7), bool)
    region[1, ry + 4, 3] = True
    grown = dilate_ellipsoid(region, (0, ry, 2))
    y, x = np.ogrid[-ry : ry + 1, -2:3]
    np.testing.assert_array_equal(grown[1, 4 : 2 * ry + 5, 1:6], (y * 2) ** 2 + (x * ry) ** 2 <= (2 * ry) ** 2)
    assert not grown[0].any() and not grown[2].any() and grown.sum() == ((y * 2) ** 2 + (x * ry) ** 2 <= (2 * ry) ** 2).sum()


def test_candidate_shell_is_the_ellipsoid_ring_around_the_candidate_in_its_grown_box():
    from boltzformer.postprocess import candidate_shell, dilate_ellipsoid, find_objects

    labels = np.zeros((9, 20, 20), np.uint16)
    labels[4, 8:11, 8:11] = 1
    labels[0:2, 0:3, 17:20] = 2  # at the scan's corner: the grown box is clipped there
    boxes = find_objects(labels)
    big, region, shell = candidate_shell(labels, 1, boxes[0], (1, 2, 2))
    assert big == (slice(2, 7), slice(5, 14), slice(5, 14))
    assert region.sum() == 9 and not (shell & region).any()
    np.testing.assert_array_equal(shell, dilate_ellipsoid(region, (1, 2, 2)) & ~region)
    big, region, shell = candidate_shell(labels, 2, boxes[1], (1, 1, 1), min_pad=2)
    assert big == (slice(0, 5), slice(0, 6), slice(14, 20)) and region.sum() == 18 and shell.any()
