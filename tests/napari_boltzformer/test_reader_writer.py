"""Reader and writer: geometry survives file -> napari layer -> file, oblique and anisotropic."""

from __future__ import annotations

import numpy as np
import pytest

from napari_boltzformer._layers import GEOMETRY_KEY
from napari_boltzformer._reader import napari_get_reader
from napari_boltzformer._writer import NotWritten

from .conftest import ct_volume, oblique_direction

PLUGIN = "napari-boltzformer"


def _world_of_index(layer, index_zyx):
    """napari world (z, y, x) of a voxel index, reversed to ITK (x, y, z) order."""
    return np.asarray(layer.data_to_world(np.asarray(index_zyx, float)))[::-1]


def test_a_volume_tilted_out_of_the_axial_plane_is_said_to_be_drawn_approximately(viewer, tmp_path, notifications):
    """napari draws a grid turned out of the axial plane without that turn: the reader says the
    status bar's mm are approximate there (an axial one opens without a word)."""
    from boltzformer.io import write_volume

    write_volume(ct_volume(direction=oblique_direction()), tmp_path / "oblique.nii.gz")
    write_volume(ct_volume(), tmp_path / "axial.nii.gz")
    viewer.open(tmp_path / "axial.nii.gz", plugin=PLUGIN)
    assert not any("tilted" in m for _, m in notifications)
    viewer.open(tmp_path / "oblique.nii.gz", plugin=PLUGIN)
    assert any("oblique.nii.gz: its slices are tilted" in m and "approximate" in m for _, m in notifications)


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
def test_writer_restores_the_source_geometry(viewer, tmp_path, direction, with_metadata, notifications):
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
    # placed by the scan's scale, translate and affine: no "at the origin, lines up with no scan"
    assert not [m for m in _messages(notifications, "warning") if "no physical voxel size" in m]


def test_reader_ignores_what_it_does_not_handle(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "plain")) is None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii")]) is None
    assert napari_get_reader(str(tmp_path / "x.NII.GZ")) is not None


def test_reader_reads_every_extension_the_core_reads(viewer, tmp_path):
    """NRRD with a detached header (.nhdr) too: the reader takes the core's list."""
    import SimpleITK as sitk

    from boltzformer.io import INPUT_EXTENSIONS

    volume = ct_volume(direction=oblique_direction())
    path = tmp_path / "detached.nhdr"
    sitk.WriteImage(volume.to_sitk(), str(path))
    assert all(napari_get_reader(str(tmp_path / f"x{ext}")) is not None for ext in INPUT_EXTENSIONS)
    (layer,) = viewer.open(path, plugin="napari-boltzformer")
    assert layer.name == "detached"
    assert np.array_equal(layer.data, volume.array)
    assert np.allclose(_world_of_index(layer, (3, 4, 5)), volume.index_to_world((3, 4, 5)), atol=1e-3)


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


# -- issue 18: the reader goes through the same checks as the command line ---------------------------
def _messages(notifications, severity):
    return [m for s, m in notifications if s == severity]


@pytest.mark.parametrize("source", ["2D NIfTI", "one DICOM file"])
def test_reader_keeps_a_single_slice_in_place(viewer, tmp_path, source):
    import nibabel as nib

    from ..model.io.test_io import write_ct_series

    if source == "2D NIfTI":
        affine = np.diag([-1.4, -1.4, 2.5, 1.0])
        affine[:3, 3] = [178.5, 178.5, -67.5]
        path = tmp_path / "slice.nii.gz"
        nib.save(nib.Nifti1Image(np.full((20, 30), -700, np.int16), affine), str(path))
        z = -67.5
    else:
        write_ct_series(tmp_path / "one", np.full((1, 30, 20), -700, np.int16), thickness=2.5, origin=(0.0, 0.0, -82.5),
                        angle_deg=0.0)
        path, z = tmp_path / "one", -82.5
    [layer] = viewer.open(path, plugin=PLUGIN)
    assert layer.ndim == 3 and layer.data.shape[0] == 1
    assert layer.scale[0] == pytest.approx(2.5) and layer.translate[0] == pytest.approx(z)
    assert _world_of_index(layer, [0, 0, 0])[2] == pytest.approx(z)


def test_reader_follows_the_sform_and_warns(viewer, tmp_path, notifications):
    import nibabel as nib

    q = np.diag([-0.8, -0.7, 2.5, 1.0])
    q[:3, 3] = [20.0, 35.0, 100.0]
    s = q.copy()
    s[0, 3] += 62.0
    img = nib.Nifti1Image(np.full((40, 48, 6), -700, np.int16), None)
    img.set_qform(q, code=1)
    img.set_sform(s, code=2)
    path = tmp_path / "qs.nii.gz"
    nib.save(img, str(path))
    [layer] = viewer.open(path, plugin=PLUGIN)
    ras = np.diag([-1, -1, 1]) @ _world_of_index(layer, [0, 0, 0])  # napari world is LPS (z, y, x)
    assert np.allclose(ras, s[:3, 3], atol=1e-3)  # where nibabel/FSL put voxel 0, not the qform's 62 mm off
    (warning,) = _messages(notifications, "warning")
    assert str(path) in warning and "qform and sform disagree (by up to 62.0 mm)" in warning


def test_reader_refuses_a_series_with_a_gap_without_cli_hints(viewer, tmp_path, notifications):
    from ..model.io.test_io import write_ct_series

    keep = [0, 1, 3, 4]
    write_ct_series(tmp_path / "gap", np.full((4, 30, 20), -700, np.int16), thickness=2.5,
                    offsets_mm=[2.5 * k for k in keep], origin=(0.0, 0.0, 0.0), angle_deg=0.0)
    assert viewer.open(tmp_path / "gap", plugin=PLUGIN) == []
    (error,) = _messages(notifications, "error")
    assert str(tmp_path / "gap") in error and "gap from 2.50 to 7.50 mm (1 slice missing)" in error
    assert "--" not in error  # no command-line option offered to a GUI user


def test_reader_two_series_note_says_how_to_pick_another(viewer, tmp_path, notifications):
    from ..model.io.test_io import write_ct_series

    hu = np.full((3, 30, 20), -700, np.int16)
    write_ct_series(tmp_path / "two", hu, description="Axial", prefix="a")
    write_ct_series(tmp_path / "two", hu[:2], description="Scout", series_number=1, prefix="b")
    [layer] = viewer.open(tmp_path / "two", plugin=PLUGIN)
    assert layer.data.shape[0] == 3
    (info,) = _messages(notifications, "info")
    assert "'Scout' (2 files, CT)" in info and "folder of their own" in info and "--series" not in info


def test_reader_refuses_a_fifo_at_once(viewer, tmp_path, notifications):
    import os

    os.mkfifo(tmp_path / "pipe.nii.gz")
    assert viewer.open(tmp_path / "pipe.nii.gz", plugin=PLUGIN) == []  # returns: does not block on the FIFO
    (error,) = _messages(notifications, "error")
    assert "pipe.nii.gz: is a FIFO (named pipe), not a regular file" in error


def test_reader_names_a_gzip_file_named_nii(viewer, tmp_path, notifications):
    from boltzformer.io import write_volume

    good = write_volume(ct_volume(), tmp_path / "ct.nii.gz")
    (tmp_path / "ct.nii").write_bytes(good.read_bytes())
    assert viewer.open(tmp_path / "ct.nii", plugin=PLUGIN) == []
    (error,) = _messages(notifications, "error")
    assert error == f"{tmp_path / 'ct.nii'}: is gzip-compressed but named .nii; rename it to .nii.gz"


def test_writer_on_a_full_disk_keeps_the_old_file(viewer, tmp_path, notifications, monkeypatch):
    import errno

    import SimpleITK

    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"the previous mask")

    def full(image, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SimpleITK, "WriteImage", full)
    labels = viewer.add_labels(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(NotWritten) as refused:  # napari shows it as one error notification
        labels.save(str(out), plugin=PLUGIN)
    assert str(refused.value) == f"{out}: could not be written: no space left on device"
    assert out.read_bytes() == b"the previous mask" and sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_a_sagittal_or_coronal_volume_is_shown_axially_and_masks_go_back_on_its_grid(viewer, tmp_path, plane,
                                                                                    notifications):
    """napari cannot slice a grid whose slices are not axial (vispy failed on a singular
    transform and left a broken layer): such a volume is shown on its canonical axial grid, and
    a mask drawn on it is written on the file's own grid."""
    from boltzformer.io import Volume, read_volume, write_volume
    from boltzformer.orientation import to_canonical

    # image axes (x, y, z) in LPS world: sagittal slices stack along x, coronal along y
    direction = (np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float) if plane == "sagittal"
                 else np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float))
    rng = np.random.default_rng(0)
    volume = Volume(rng.integers(-1000, 400, (10, 24, 20)).astype(np.int16), (0.9, 1.1, 2.0), (5.0, -7.0, 30.0),
                    direction, "CT")
    write_volume(volume, tmp_path / "scan.nii.gz")
    [image] = viewer.open(tmp_path / "scan.nii.gz", plugin=PLUGIN)
    canonical, reo, _ = to_canonical(read_volume(tmp_path / "scan.nii.gz"))
    assert np.array_equal(image.data, canonical.array) and not reo.keeps_slices
    for index in ([0, 0, 0], [3, 5, 7], [canonical.shape[0] - 1, canonical.shape[1] - 1, canonical.shape[2] - 1]):
        assert np.allclose(_world_of_index(image, index), canonical.index_to_world(index), atol=1e-3)
    assert any("shown in axial slices" in m for s, m in notifications if s == "info")
    mask = (image.data > 0).astype(np.uint8)
    labels = viewer.add_labels(mask, scale=image.scale, translate=image.translate, affine=image.affine,
                               metadata=dict(image.metadata))
    out = tmp_path / "mask.nii.gz"
    assert labels.save(str(out), plugin=PLUGIN) == [str(out)]
    back = read_volume(out)
    assert back.shape == volume.shape and back.same_geometry(read_volume(tmp_path / "scan.nii.gz"), atol=1e-4)
    assert np.array_equal(back.array, (volume.array > 0).astype(np.uint8))  # the same voxels, the file's order


def test_writer_writes_a_multiscale_labels_layer_at_full_resolution_and_refuses_a_shear(viewer, tmp_path,
                                                                                        notifications):
    from boltzformer.io import read_volume

    full = np.zeros((8, 32, 32), np.uint8)
    full[2:5, 10:20, 8:14] = 1
    layer = viewer.add_labels([full, full[::2, ::2, ::2]], multiscale=True, scale=(2.5, 0.8, 0.7))
    out = tmp_path / "ms.nii.gz"
    assert layer.save(str(out), plugin=PLUGIN) == [str(out)]
    back = read_volume(out)
    assert back.shape == full.shape and np.array_equal(back.array, full)
    assert np.allclose(back.spacing_mm, (0.7, 0.8, 2.5))
    sheared = viewer.add_labels(full, scale=(2, 1, 1), shear=(0.3, 0, 0))
    with pytest.raises(NotWritten, match="sheared"):
        sheared.save(str(tmp_path / "sh.nii.gz"), plugin=PLUGIN)
    assert not (tmp_path / "sh.nii.gz").exists()


def test_a_refused_save_from_the_dialog_is_one_error_with_our_reason(viewer, tmp_path, monkeypatch):
    """napari's Save dialog raises its own 'File ... save failed' when a writer returns []
    (after the writer's own notification: two errors). The writer's exception, with its
    reason, is what leaves the dialog now: napari shows it as the one error."""
    from qtpy.QtWidgets import QFileDialog

    out = tmp_path / "sh.nii.gz"

    def choose(*args, **kwargs):
        filters = kwargs.get("filter") or next(a for a in args if isinstance(a, str) and ";;" in a)
        return str(out), next(f for f in filters.split(";;") if "oltz" in f)  # this plugin's NIfTI filter

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(choose))
    viewer.add_labels(np.zeros((4, 8, 8), np.uint8), scale=(2, 1, 1), shear=(0.3, 0, 0))
    with pytest.raises(NotWritten, match=f"^{out}: not written .*sheared"):
        viewer.window._qt_viewer._save_layers_dialog(selected=True)
    assert not out.exists()


def test_the_panel_on_a_sagittal_volume_exports_its_mask_on_the_files_grid(viewer, tmp_path, tiny_segmenter, qtbot):
    from boltzformer.io import Volume, read_volume, write_volume

    from .conftest import panel_on, run_and_wait, stop

    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # slices stack along x
    volume = Volume(ct_volume().array, (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), direction, "CT")
    write_volume(volume, tmp_path / "sag.nii.gz")
    [image] = viewer.open(tmp_path / "sag.nii.gz", plugin=PLUGIN)
    panel = panel_on(viewer, tiny_segmenter)
    panel.threshold_slider.setValue(1)  # the untrained net: some voxels for sure
    panel.fp_check.setChecked(False)
    run_and_wait(panel, qtbot)
    shown = viewer.layers["lung nodule"].data
    written = panel.exports.mask(tmp_path / "m.nii.gz")
    back = read_volume(written)
    assert back.shape == volume.shape and back.same_geometry(read_volume(tmp_path / "sag.nii.gz"), atol=1e-4)
    assert back.array.sum() == (shown > 0).sum() > 0
    stop(panel)


def test_a_single_dicom_file_is_read_in_hu_and_in_place(viewer, tmp_path):
    """napari's own reader took .dcm files as raw pixels (no rescale to HU, no geometry)."""
    from boltzformer.io import read_volume

    from ..model.io.test_io import write_ct_series

    hu = np.full((3, 16, 12), -800, np.int16)
    hu[:, 5:9, 4:8] = 40
    write_ct_series(tmp_path / "series", hu)
    one = sorted((tmp_path / "series").glob("*.dcm"))[0]
    assert napari_get_reader(str(one)) is not None
    [layer] = viewer.open(one, plugin=PLUGIN)
    volume = read_volume(one)
    assert layer.data.min() == -800 and layer.data.max() == 40  # HU, the intercept applied
    assert np.allclose(_world_of_index(layer, (0, 3, 2)), volume.index_to_world((0, 3, 2)), atol=1e-3)


def test_a_folder_of_series_folders_says_which_to_open(viewer, tmp_path, notifications):
    from ..model.io.test_io import write_ct_series

    write_ct_series(tmp_path / "study" / "series1", np.full((2, 8, 8), -800, np.int16))
    assert napari_get_reader(str(tmp_path / "study")) is not None
    viewer.open(tmp_path / "study", plugin=PLUGIN)
    errors = [m for s, m in notifications if s == "error"]
    assert errors and "series1" in errors[-1]


def test_a_labels_layer_moved_after_it_was_made_is_written_where_it_is_shown(viewer, tmp_path, notifications):
    from boltzformer.io import read_volume, write_volume

    volume = ct_volume()
    write_volume(volume, tmp_path / "ct.nii.gz")
    [image] = viewer.open(tmp_path / "ct.nii.gz", plugin=PLUGIN)
    labels = viewer.add_labels((image.data > 0).astype(np.uint8), scale=image.scale, translate=image.translate,
                               affine=image.affine, metadata=dict(image.metadata))
    labels.translate = np.asarray(labels.translate) + np.array([10.0, 0.0, 0.0])  # moved 10 mm by hand
    out = tmp_path / "moved.nii.gz"
    assert labels.save(str(out), plugin=PLUGIN) == [str(out)]
    back = read_volume(out)
    assert np.allclose(back.index_to_world((3, 4, 5)), _world_of_index(labels, (3, 4, 5)), atol=1e-3)
    assert any("moved or rescaled" in m for s, m in notifications if s == "warning")
    from napari_boltzformer._layers import geometry_from_layer, mask_volume  # the panel's export path too

    exported = mask_volume(np.asarray(labels.data), geometry_from_layer(labels))
    assert np.allclose(exported.index_to_world((3, 4, 5)), _world_of_index(labels, (3, 4, 5)), atol=1e-3)


# -- first use through napari itself (review of 2026-11-27) -----------------------------------------
def test_a_folder_of_nifti_files_or_an_empty_one_says_what_to_open(viewer, tmp_path, notifications):
    """napari offers this plugin for every folder (it reads DICOM folders); a folder of NIfTI
    files (`boltzformer sample` makes one) got napari's bare "refused the file" error."""
    from boltzformer.io import write_volume

    (tmp_path / "demo").mkdir()
    write_volume(ct_volume(), tmp_path / "demo" / "chest_ct.nii.gz")
    write_volume(ct_volume(), tmp_path / "demo" / "chest_ct_mask.nii.gz")
    (tmp_path / "empty").mkdir()
    assert viewer.open(tmp_path / "demo", plugin=PLUGIN) == [] and len(viewer.layers) == 0
    said = _messages(notifications, "error")[-1]
    assert said.startswith(f"{tmp_path / 'demo'}: the folder holds no DICOM series")
    assert "2 volume files (chest_ct.nii.gz, chest_ct_mask.nii.gz)" in said and "File > Open File(s)" in said
    viewer.open(tmp_path / "empty", plugin=PLUGIN)
    assert _messages(notifications, "error")[-1] == (f"{tmp_path / 'empty'}: the folder is empty; open a NIfTI, NRRD "
                                                     "or MetaImage file, or a folder of DICOM files")
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "store.zarr" / ".zgroup").write_text("{}")
    (tmp_path / "store.zarr" / "0").mkdir()
    assert napari_get_reader(str(tmp_path / "store.zarr")) is None  # another reader's folder


def test_dicom_files_opened_as_a_stack_are_read_as_their_series(viewer, tmp_path, notifications):
    """Open Files as Stack passed them as a list, which the reader refused ("refused the file")."""
    from boltzformer.io import read_volume

    from ..model.io.test_io import write_ct_series

    hu = np.stack([np.full((16, 12), 10 * k, np.int16) for k in range(5)])
    write_ct_series(tmp_path / "series", hu)
    files = sorted(str(f) for f in (tmp_path / "series").glob("*.dcm"))
    [layer] = viewer.open(files, stack=True, plugin=PLUGIN)
    assert np.array_equal(layer.data, read_volume(tmp_path / "series").array)
    assert not _messages(notifications, "info")
    viewer.layers.clear()
    [layer] = viewer.open(files[1:4], stack=True, plugin=PLUGIN)
    assert layer.data.shape[0] == 5  # the whole series: a subset would hide its gaps
    assert any("3 of the 5 files of series 'Axial CT' were chosen; the whole series is read" in m
               for m in _messages(notifications, "info"))
    write_ct_series(tmp_path / "other", hu[:2], description="Other")
    assert viewer.open([files[0], str(next((tmp_path / "other").glob("*.dcm")))], stack=True, plugin=PLUGIN) == []
    assert "lie in 2 folders" in _messages(notifications, "error")[-1]


def test_one_dicom_slice_of_a_series_says_once_how_to_read_the_series(viewer, tmp_path, notifications):
    from ..model.io.test_io import write_ct_series

    write_ct_series(tmp_path / "series", np.full((4, 16, 12), -800, np.int16))
    files = sorted((tmp_path / "series").glob("*.dcm"))
    for f in files[:3]:
        viewer.open(f, plugin=PLUGIN)
    told = [m for m in _messages(notifications, "info") if "opened as a single slice" in m]
    assert len(told) == 1 and "its folder holds 4 DICOM files" in told[0] and "Open Files as Stack" in told[0]
    assert len(viewer.layers) == 3 and all(layer.data.shape[0] == 1 for layer in viewer.layers)


def test_the_writer_adds_nii_gz_to_a_bare_name_and_refuses_other_extensions(viewer, tmp_path, notifications):
    """A name typed without an extension failed with 'unsupported output format (no extension)',
    listing .nrrd and .mha, which this writer does not claim."""
    import nibabel as nib

    from napari_boltzformer._writer import write_labels

    viewer.add_labels(np.ones((3, 6, 5), np.uint8), scale=(2.0, 0.5, 0.5), units="mm")
    meta = viewer.layers[-1]._get_state()
    assert write_labels(str(tmp_path / "hand"), viewer.layers[-1].data, meta) == [str(tmp_path / "hand.nii.gz")]
    assert nib.load(str(tmp_path / "hand.nii.gz")).header.get_zooms() == pytest.approx((0.5, 0.5, 2.0))
    assert not _messages(notifications, "warning")  # it has a physical size
    with pytest.raises(NotWritten, match=r"hand\.nrrd: not written: this writer writes NIfTI; name the file .nii.gz"):
        write_labels(str(tmp_path / "hand.nrrd"), viewer.layers[-1].data, meta)
    assert not (tmp_path / "hand.nrrd").exists()
    # macOS's native dialog: "hand2" under the *.nii.gz filter comes back as "hand2.gz"
    assert write_labels(str(tmp_path / "hand2.gz"), viewer.layers[-1].data, meta) == [str(tmp_path / "hand2.nii.gz")]


def test_saving_a_labels_layer_with_no_physical_size_warns(viewer, tmp_path, notifications):
    viewer.add_labels(np.ones((3, 6, 5), np.uint8))  # napari's default: pixel units, scale 1
    viewer.layers.save(str(tmp_path / "drawn.nii.gz"), plugin=PLUGIN)
    assert (tmp_path / "drawn.nii.gz").exists()
    [said] = [m for m in _messages(notifications, "warning") if "no physical voxel size" in m]
    assert said.startswith(f"{tmp_path / 'drawn.nii.gz'}: the layer has no physical voxel size") and "1 x 1 x 1 mm" in said


def test_a_single_sagittal_slice_is_shown_and_written_back_on_its_own_grid(viewer, tmp_path, notifications):
    """The core segments one sagittal slice as stored; the layer and its exported mask kept
    a reorientation for it that was never applied, and the mask came out transposed."""
    from boltzformer.io import Volume, read_volume, write_volume

    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # rows S->I, columns A->P
    hu = np.random.default_rng(0).integers(-1000, 400, (1, 40, 30)).astype(np.int16)
    write_volume(Volume(hu, (0.8, 0.9, 3.0), (10.0, 20.0, 30.0), direction, modality="CT"), tmp_path / "sag.nii.gz")
    [image] = viewer.open(tmp_path / "sag.nii.gz", plugin=PLUGIN)
    assert image.data.shape == (1, 40, 30) and np.array_equal(image.data, hu)
    assert [m for m in _messages(notifications, "info") if "a single sagittal or coronal slice, shown flat" in m]
    viewer.layers.selection.active = image
    viewer.screenshot(canvas_only=True)  # drawn: vispy failed on its plane turned out of the screen
    mask = np.zeros((1, 40, 30), np.uint8)
    mask[0, 5:8, 10:12] = 1
    labels = viewer.add_labels(mask, scale=image.scale, translate=image.translate, affine=image.affine,
                               metadata=dict(image.metadata))
    labels.save(str(tmp_path / "m.nii.gz"), plugin=PLUGIN)
    back, scan = read_volume(tmp_path / "m.nii.gz"), read_volume(tmp_path / "sag.nii.gz")
    assert back.same_geometry(scan, atol=1e-4) and np.array_equal(back.array, mask)
    from napari_boltzformer._layers import volume_from_layer

    assert volume_from_layer(image).same_geometry(scan, atol=1e-4)  # what the panel segments: lesions in true mm
    from napari_boltzformer._export import _shown_reoriented

    # the review record's voxel indices are on the file's own grid here, not on an axial one
    assert not _shown_reoriented(image.metadata[GEOMETRY_KEY])
    stack = Volume(np.zeros((3, 40, 30), np.int16), (0.8, 0.9, 3.0), (10.0, 20.0, 30.0), direction, modality="CT")
    write_volume(stack, tmp_path / "sag3.nii.gz")
    [several] = viewer.open(tmp_path / "sag3.nii.gz", plugin=PLUGIN)
    assert _shown_reoriented(several.metadata[GEOMETRY_KEY])
