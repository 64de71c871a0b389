"""Tests for the geometry a Volume owns: (z, y, x) affines, napari placement, plain-data geometry,
and the single places for file extensions, the DICOM preamble and modality names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from boltzformer.intensity import normalise_modality
from boltzformer.io import (
    DICOM_EXTENSIONS, INPUT_EXTENSIONS, OUTPUT_EXTENSIONS, Volume, extension_of, has_dicom_preamble,
)

from .test_io import rotation


@pytest.fixture
def oblique() -> Volume:
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    return Volume(array, (0.7, 0.8, 2.5), (-12.5, 30.25, 7.0), rotation(10, -20, 30), modality="CT",
                  path="/data/a.nii.gz", metadata={"ndim": 3, "SeriesDescription": "FLAIR"})


@pytest.fixture
def aligned() -> Volume:
    return Volume(np.zeros((4, 5, 6), np.float32), (0.5, 0.6, 3.0), (10.0, -20.0, 30.0))


def napari_world(kwargs: dict, index_zyx) -> np.ndarray:
    """Where napari puts a data index: affine_R @ (scale * index + translate) + affine_origin."""
    physical = np.asarray(kwargs["scale"]) * np.asarray(index_zyx, float) + np.asarray(kwargs["translate"])
    affine = kwargs.get("affine")
    if affine is None:
        return physical
    n = affine.shape[0] - 1
    return affine[:n, :n] @ physical + affine[:n, n]


INDICES = [(0, 0, 0), (4, 5, 6), (1.5, 2.25, 3.0)]


def test_affine_zyx_places_voxels_like_index_to_world(oblique):
    affine = oblique.affine_zyx()
    for index in INDICES:
        world_zyx = affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(world_zyx[:3][::-1], oblique.index_to_world(index), atol=1e-9)


def test_from_affine_zyx_inverts_affine_zyx(oblique):
    back = Volume.from_affine_zyx(oblique.array, oblique.affine_zyx(), modality="CT")
    assert back.same_geometry(oblique, atol=1e-9)
    assert back.modality == "CT" and back.metadata == {"ndim": 3}


def test_from_affine_zyx_embeds_a_slice_in_3d():
    matrix = np.array([[0.0, 2.0, 5.0], [-1.5, 0.0, 7.0], [0.0, 0.0, 1.0]])  # (y, x) -> world (y, x)
    v = Volume.from_affine_zyx(np.zeros((3, 4)), matrix)
    assert v.shape == (1, 3, 4) and v.metadata["ndim"] == 2
    assert v.spacing_mm == (2.0, 1.5, 1.0) and v.origin_mm == (7.0, 5.0, 0.0)
    np.testing.assert_allclose(v.direction, [[0, -1, 0], [1, 0, 0], [0, 0, 1]])


def test_napari_transform_axis_aligned_has_no_affine(aligned):
    kw = aligned.napari_transform()
    assert kw == {"scale": (3.0, 0.6, 0.5), "translate": (30.0, -20.0, 10.0)}
    coarse = aligned.napari_transform(cell_voxels=(1, 4, 4), offset_voxels=(0, 1.5, 1.5), leading_axes=1)
    assert coarse["scale"] == (1.0, 3.0, 2.4, 2.0)
    np.testing.assert_allclose(coarse["translate"], (0.0, 30.0, -20.0 + 0.9, 10.0 + 0.75))


def test_napari_transform_oblique_places_voxels_like_index_to_world(oblique):
    kw = oblique.napari_transform()
    assert kw["scale"] == (2.5, 0.8, 0.7) and kw["affine"].shape == (4, 4)
    for index in INDICES:
        np.testing.assert_allclose(napari_world(kw, index)[::-1], oblique.index_to_world(index), atol=1e-9)
    # a coarser grid: element (k, j, i) is centred at voxel offset + cell * (k, j, i)
    cell, offset = np.array([1.0, 2.0, 2.0]), np.array([0.0, 0.5, 0.5])
    coarse = oblique.napari_transform(cell_voxels=cell, offset_voxels=offset, leading_axes=1)
    assert coarse["affine"].shape == (5, 5) and coarse["scale"][0] == 1.0
    for index in INDICES:
        world = napari_world(coarse, (0, *index))[1:]
        np.testing.assert_allclose(world[::-1], oblique.index_to_world(offset + cell * index), atol=1e-9)


def test_napari_transform_of_a_2d_layer_drops_z(oblique, aligned):
    kw = aligned.napari_transform(layer_ndim=2)
    assert kw == {"scale": (0.6, 0.5), "translate": (-20.0, 10.0)}
    kw = oblique.napari_transform(layer_ndim=2)
    assert len(kw["scale"]) == 2 and kw["affine"].shape == (3, 3)


def test_geometry_dict_round_trip(oblique):
    geometry = oblique.geometry_dict()
    json.dumps(geometry)  # plain data
    assert geometry["shape"] == [5, 6, 7] and geometry["ndim"] == 3 and geometry["file_ndim"] == 3
    assert geometry["sequence"] == "FLAIR" and geometry["path"] == "/data/a.nii.gz"
    assert oblique.geometry_dict(layer_ndim=2)["ndim"] == 2
    back = Volume.from_geometry_dict(oblique.array, geometry)
    assert back.same_geometry(oblique, atol=0) and back.modality == "CT" and back.path == oblique.path
    assert back.metadata == {"ndim": 3, "SeriesDescription": "FLAIR"} and back.sequence() == "FLAIR"
    assert Volume.from_geometry_dict(oblique.array, geometry, modality="MR").modality == "MR"


def test_is_axis_aligned(oblique, aligned):
    assert aligned.is_axis_aligned() and not oblique.is_axis_aligned()


def test_extensions_have_one_home():
    assert set(INPUT_EXTENSIONS) == {".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"}
    assert set(OUTPUT_EXTENSIONS) <= set(INPUT_EXTENSIONS)
    assert DICOM_EXTENSIONS == (".dcm", ".dicom", ".ima")
    assert extension_of("A.NII.GZ") == ".nii.gz" and extension_of("b.nhdr") == ".nhdr" and extension_of("c") == ""


def test_has_dicom_preamble(tmp_path):
    dicom = tmp_path / "noext"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    other = tmp_path / "short"
    other.write_bytes(b"DICM")
    assert has_dicom_preamble(dicom) and not has_dicom_preamble(other)
    assert not has_dicom_preamble(tmp_path / "missing") and not has_dicom_preamble(tmp_path)


@pytest.mark.parametrize("name, expected", [("MRI", "MR"), ("mr", "MR"), ("ct", "CT"), (None, ""), ("PT", "PT")])
def test_normalise_modality(name, expected):
    assert normalise_modality(name) == expected


def test_same_geometry_tells_every_kind_of_difference():
    """Twenty round-trip tests rest on same_geometry: it must say False for each difference."""
    a = np.radians(20.0)
    turned = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    base = Volume(np.zeros((4, 5, 6), np.int16), (0.7, 0.8, 2.5), (-10.0, 20.0, 30.0), turned)
    assert base.same_geometry(Volume(np.ones((4, 5, 6), np.uint8), base.spacing_mm, base.origin_mm, turned))
    flipped = turned.copy()
    flipped[:, 0] *= -1
    others = {
        "shape": Volume(np.zeros((4, 6, 5), np.int16), base.spacing_mm, base.origin_mm, turned),
        "origin": Volume(base.array, base.spacing_mm, (-10.0, 20.0, 30.1), turned),
        "spacing": Volume(base.array, (0.7, 0.8, 2.4), base.origin_mm, turned),
        "flipped axis": Volume(base.array, base.spacing_mm, base.origin_mm, flipped),
        "axis-aligned": Volume(base.array, base.spacing_mm, base.origin_mm, np.eye(3)),
        "just over atol": Volume(base.array, base.spacing_mm, (-10.0, 20.0, 30.0 + 2e-5), turned),
    }
    assert [name for name, other in others.items() if base.same_geometry(other)] == []
    assert base.same_geometry(others["just over atol"], atol=1e-4)
