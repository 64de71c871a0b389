"""Lesion-table measures beyond the longest diameter (short axis, mean diameter, model
confidence), the organ summary and the lesion/organ kind of a prompt."""

import csv

import numpy as np
import pytest

from boltzformer.io import Volume
from boltzformer.orientation import to_canonical
from boltzformer.postprocess import (
    label_components, lesion_table, organ_summary, organ_summary_of, select_labels, write_lesion_table,
)
from boltzformer.synth.prompts import kind_of_prompt


def ellipse(shape_yx, center, semi_axes_px, angle_deg=0.0):
    yy, xx = np.mgrid[: shape_yx[0], : shape_yx[1]].astype(float)
    t = np.deg2rad(angle_deg)
    u = (yy - center[0]) * np.cos(t) + (xx - center[1]) * np.sin(t)
    v = -(yy - center[0]) * np.sin(t) + (xx - center[1]) * np.cos(t)
    return (u / semi_axes_px[0]) ** 2 + (v / semi_axes_px[1]) ** 2 <= 1


@pytest.mark.parametrize("angle", [0.0, 35.0, 90.0])
def test_short_axis_and_mean_diameter_of_an_ellipse(angle):
    mask = np.zeros((3, 90, 90), bool)
    mask[1] = ellipse((90, 90), (45, 45), (30, 10), angle)  # 30 x 10 mm diameters at 0.5 mm
    vol = Volume(np.zeros(mask.shape, np.int16), (0.5, 0.5, 2.0))
    (row,) = lesion_table(label_components(mask, vol.spacing_mm)[0], vol)
    assert abs(row["longest_axial_diameter_mm"] - 30.0) <= 0.75
    assert abs(row["short_axis_diameter_mm"] - 10.0) <= 0.75
    assert row["mean_axial_diameter_mm"] == pytest.approx(
        (row["longest_axial_diameter_mm"] + row["short_axis_diameter_mm"]) / 2)


def test_short_axis_is_measured_in_the_slice_of_the_longest_diameter():
    mask = np.zeros((3, 60, 60), bool)
    mask[0] = ellipse((60, 60), (30, 30), (20, 19))  # nearly round, but shorter
    mask[1] = ellipse((60, 60), (30, 30), (25, 5))  # the longest: a thin one
    mask[2] = ellipse((60, 60), (30, 30), (10, 10))
    vol = Volume(np.zeros(mask.shape), (1.0, 1.0, 1.0))
    (row,) = lesion_table(label_components(mask, vol.spacing_mm)[0], vol)
    assert abs(row["longest_axial_diameter_mm"] - 51) <= 1
    assert abs(row["short_axis_diameter_mm"] - 11) <= 1  # not the 39 mm of slice 0


def test_small_shapes_short_axis_on_anisotropic_pixels():
    mask = np.zeros((3, 12, 12), np.uint8)
    mask[0, 2, 2] = 1  # a single voxel: long = the larger pixel side, short = the smaller
    mask[2, 8, 2:7] = 1  # a row of 5 pixels along x: one pixel (y) across
    vol = Volume(np.zeros(mask.shape), (0.7, 0.9, 5.0))
    rows = {r["voxels"]: r for r in lesion_table(label_components(mask, vol.spacing_mm)[0], vol)}
    assert (rows[1]["longest_axial_diameter_mm"], rows[1]["short_axis_diameter_mm"]) == pytest.approx((0.9, 0.7))
    assert (rows[5]["longest_axial_diameter_mm"], rows[5]["short_axis_diameter_mm"]) == pytest.approx((3.5, 0.9))


def test_confidence_columns_come_from_the_lesion_voxels_only(tmp_path):
    mask = np.zeros((2, 20, 20), bool)
    mask[0, 2:6, 2:6] = True
    mask[1, 12:15, 12:18] = True
    probabilities = np.where(mask, 0.6, 0.99).astype(np.float32)  # high outside: must not count
    probabilities[0, 3, 3] = 0.9
    vol = Volume(np.zeros(mask.shape, np.int16), (1.0, 1.0, 3.0))
    labels, _ = label_components(mask, vol.spacing_mm, connectivity=6)
    rows = lesion_table(labels, vol, probabilities=probabilities)
    by_size = {r["voxels"]: r for r in rows}
    assert by_size[16]["max_probability"] == pytest.approx(0.9)
    assert by_size[16]["mean_probability"] == pytest.approx((15 * 0.6 + 0.9) / 16)
    assert by_size[18]["max_probability"] == pytest.approx(0.6)
    assert "mean_probability" not in lesion_table(labels, vol)[0]  # only when given
    with pytest.raises(ValueError, match="probabilities shape"):
        lesion_table(labels, vol, probabilities=probabilities[0])
    path = write_lesion_table(rows, tmp_path / "t.csv")
    with open(path, newline="") as f:
        first = next(csv.DictReader(f))
    for column in ("short_axis_diameter_mm", "mean_axial_diameter_mm", "mean_probability", "max_probability"):
        assert first[column] != ""


def _tube(shape=(20, 40, 40), radius=6, spacing=(0.8, 0.8, 2.0)):
    mask = np.zeros(shape, bool)
    mask[2:18] = ellipse(shape[1:], (20, 20), (radius, radius))
    return mask, Volume(np.zeros(shape, np.int16), spacing)


def test_one_slice_has_no_craniocaudal_length():
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 10:30, 10:30] = True
    vol = Volume(np.zeros(mask.shape, np.int16), (0.8, 0.8, 2.5))
    labels, _ = label_components(mask, vol.spacing_mm)
    liver = organ_summary(labels, vol, "liver")
    assert liver["measure"] == "craniocaudal length" and liver["measure_mm"] is None  # it said 2.5 mm


def test_organ_summary_keeps_the_structure_and_measures_it():
    mask, vol = _tube()
    mask[5, 1:3, 1:3] = True  # a stray island
    labels, n = label_components(mask, vol.spacing_mm)
    assert n == 2
    aorta = organ_summary(labels, vol, "aorta")
    assert aorta["lesion_ids"] == [1] and aorta["components_found"] == 2
    tube_mm3 = np.count_nonzero(labels == 1) * 0.8 * 0.8 * 2.0
    assert aorta["volume_ml"] == pytest.approx(tube_mm3 / 1000)
    assert aorta["measure"] == "max axial calibre" and abs(aorta["measure_mm"] - 13 * 0.8) <= 0.8  # 2r + 1 pixels
    assert (aorta["slice_start"], aorta["slice_end"]) == (2, 17)
    spleen = organ_summary(labels, vol, "spleen")
    assert spleen["measure"] == "craniocaudal length" and spleen["measure_mm"] == pytest.approx(16 * 2.0)
    heart = organ_summary(labels, vol, "heart")
    assert heart["measure"] is None and heart["measure_mm"] is None
    kidneys = organ_summary(labels, vol, "kidney")  # paired: both components
    assert kidneys["lesion_ids"] == [1, 2]
    assert organ_summary(np.zeros_like(labels), vol, "aorta") is None
    shown = select_labels(labels, aorta["lesion_ids"])
    assert shown.dtype == np.uint8 and np.array_equal(shown, (labels == 1).astype(np.uint8))
    assert not select_labels(labels, []).any()


def test_two_kidneys_are_measured_each_on_its_own():
    """Kidney length is read per kidney: two kidneys of 115 mm, one 20 mm higher, measured as
    one region gave 135 mm (and an axial diameter across both)."""
    shape, spacing = (80, 60, 100), (1.0, 1.0, 2.5)  # x, y, z mm
    mask = np.zeros(shape, bool)
    z = np.arange(shape[0])[:, None, None]
    y, x = np.ogrid[:shape[1], :shape[2]]
    section = ((y - 30) / 14) ** 2 + ((x - 20) / 12) ** 2 <= 1
    mask[4:50] |= section  # 46 slices x 2.5 mm = 115 mm; at low x: the patient's right (LPS)
    mask[12:58] |= np.roll(section, 55, axis=1)  # the left one, 20 mm lower in z index, same length
    vol = Volume(np.zeros(shape, np.int16), spacing, (-50.0, -30.0, 0.0))
    labels, n = label_components(mask, spacing)
    kidneys = organ_summary(labels, vol, "kidney")
    assert n == 2 and kidneys["measure_mm"] is None
    right, left = kidneys["sides"]
    assert (right["side"], left["side"]) == ("right", "left")
    assert right["measure_mm"] == left["measure_mm"] == pytest.approx(115.0)
    assert right["longest_axial_diameter_mm"] == pytest.approx(29, abs=1.5)  # its own, not across both
    assert right["volume_ml"] + left["volume_ml"] == pytest.approx(kidneys["volume_ml"])
    assert "sides" not in organ_summary(labels, vol, "liver")  # one structure: the largest component


def test_organ_summary_of_a_reoriented_result_measures_axially_and_reports_input_indices():
    """A coronal acquisition: the calibre of a vertical tube is measured on axial cuts, and the
    slice range and centroid come back as input indices."""
    mask, _ = _tube(shape=(20, 30, 30), radius=5, spacing=(1.0, 1.0, 1.0))
    canonical = Volume(mask.astype(np.int16), (1.0, 1.0, 1.0))
    # the same grid stored coronally: input axes (x, y, z) = canonical (x, z, -y)
    coronal_dir = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float)
    stored = np.ascontiguousarray(np.flip(np.transpose(mask, (1, 0, 2)), axis=0))
    volume = Volume(stored.astype(np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), coronal_dir)
    frame, reo, _ = to_canonical(volume)
    assert not reo.keeps_slices
    labels_c, _ = label_components(reo.to_canonical(stored), frame.spacing_mm)

    class Result:  # what organ_summary_of reads of a SegmentationResult
        pass

    result = Result()
    result.frame, result.volume, result.reorientation = frame, volume, reo
    result.labels = np.ascontiguousarray(reo.from_canonical(labels_c))
    result.probabilities = (result.labels > 0).astype(np.float32)
    summary = organ_summary_of(result, "aorta")
    assert abs(summary["measure_mm"] - 11) <= 1  # the axial calibre, not the 16 mm length
    z_in = np.flatnonzero(result.labels.any(axis=(1, 2)))
    assert (summary["slice_start"], summary["slice_end"]) == (z_in[0], z_in[-1])
    expected = np.argwhere(result.labels == 1).mean(axis=0)
    assert summary["centroid_voxel_zyx"] == pytest.approx(tuple(expected))
    assert canonical.shape == frame.shape


@pytest.mark.parametrize("prompt, kind", [
    ("aorta", "organ"), ("kidneys", "organ"), ("the aortic root", "organ"), ("Heart", "organ"),
    ("lung nodule", "lesion"), ("liver lesion", "lesion"), ("renal cyst", "lesion"), ("cyst in the liver", "lesion"),
    ("multiple sclerosis lesion", "lesion"), ("banana", "lesion"),
])
def test_kind_of_prompt(prompt, kind):
    assert kind_of_prompt(prompt) == kind
