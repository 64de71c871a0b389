"""Reader and writer: geometry survives file -> napari layer -> file, oblique and anisotropic."""

from __future__ import annotations

import numpy as np
import pytest

from napari_boltzformer._layers import GEOMETRY_KEY
from napari_boltzformer._reader import napari_get_reader

from .conftest import ct_volume, oblique_direction

PLUGIN = "napari-boltzformer"


def _world_of_index(layer, index_zyx):
    """napari world (z, y, x) of a voxel index, reversed to ITK (x, y, z) order."""
    return np.asarray(layer.data_to_world(np.asarray(index_zyx, float)))[::-1]


@pytest.mark.parametrize("direction", ["axis-aligned", "oblique"])
def test_reader_places_the_volume_at_its_physical_position(viewer, tmp_path, direction):
    from boltzformer.io import write_volume

    volume = ct_volume(direction=oblique_direction() if direction == "oblique" else None)
    path = tmp_path / "ct.nii.gz"
    write_volume(volume, path)
    [layer] = viewer.open(path, plugin=PLUGIN)
    assert layer.data.dtype == volume.array.dtype and np.array_equal(layer.data, volume.array)  # HU kept
    assert np.allclose(layer.scale, volume.spacing_mm[::-1])  # (z, y, x) voxel size in mm
    for index in ([0, 0, 0], [11, 47, 39], [3.5, 10, 20]):
        assert np.allclose(_world_of_index(layer, index), volume.index_to_world(index), atol=1e-3)
    if direction == "axis-aligned":
        assert np.allclose(layer.translate, volume.origin_mm[::-1], atol=1e-4)
        assert np.allclose(layer.affine.affine_matrix, np.eye(4))
    geom = layer.metadata[GEOMETRY_KEY]
    assert geom["path"] == str(path) and geom["modality"] == "CT"
    assert np.allclose(geom["direction"], volume.direction, atol=1e-6)
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)  # the soft-tissue window, not the data range


@pytest.mark.parametrize("direction", ["axis-aligned", "oblique"])
@pytest.mark.parametrize("with_metadata", [True, False])
def test_writer_restores_the_source_geometry(viewer, tmp_path, direction, with_metadata):
    from boltzformer.io import read_volume, write_volume

    volume = ct_volume(direction=oblique_direction() if direction == "oblique" else None)
    write_volume(volume, tmp_path / "ct.nrrd")
    [image] = viewer.open(tmp_path / "ct.nrrd", plugin=PLUGIN)
    mask = (volume.array > -500).astype(np.uint8)
    labels = viewer.add_labels(mask, scale=image.scale, translate=image.translate, affine=image.affine,
                               metadata=dict(image.metadata) if with_metadata else {})
    out = tmp_path / "mask.nii.gz"
    written = labels.save(str(out), plugin=PLUGIN)
    assert written == [str(out)]
    back = read_volume(out)
    assert np.array_equal(back.array, mask)
    assert back.same_geometry(volume, atol=1e-4)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file


def test_reader_ignores_what_it_does_not_handle(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "plain")) is None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii")]) is None
    assert napari_get_reader(str(tmp_path / "x.NII.GZ")) is not None


def test_reader_accepts_a_dicom_folder(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # preamble, no extension
    assert napari_get_reader(str(folder)) is not None


def test_a_bad_file_is_a_notification_naming_it(viewer, tmp_path, notifications):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    layers = viewer.open(bad, plugin=PLUGIN)
    assert layers == [] and len(viewer.layers) == 0
    errors = [m for s, m in notifications if s == "error"]
    assert len(errors) == 1 and str(bad) in errors[0]


def test_a_dicom_folder_that_cannot_be_read_is_a_notification(viewer, tmp_path, notifications):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    assert viewer.open(folder, plugin=PLUGIN) == []
    errors = [m for s, m in notifications if s == "error"]
    assert len(errors) == 1 and str(folder) in errors[0]
