"""Tests for boltzformer.io: geometry round trips, DICOM series, bad inputs, atomic writes."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from boltzformer.errors import InputError, OutputError
from boltzformer.io import Volume, atomic_output, list_dicom_series, read_volume, write_volume


def rotation(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    """A proper 3×3 rotation (Rz @ Ry @ Rx)."""
    ax, ay, az = np.radians([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique() -> Volume:
    """Oblique, anisotropic, off-origin CT-like volume, shape (z, y, x) = (5, 6, 7)."""
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=(5, 6, 7)).astype(np.int16)
    return Volume(array, (0.7, 0.8, 2.5), (-12.5, 30.25, 7.0), rotation(10, -20, 30))


def sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ d @ np.diag(image.GetSpacing())
    affine[:3, 3] = np.diag([-1, -1, 1]) @ np.asarray(image.GetOrigin())
    return affine


# ----------------------------------------------------------------------------------------------
# Volume basics
# ----------------------------------------------------------------------------------------------
def test_index_to_world_and_ras_signs():
    vol = Volume(np.zeros((3, 4, 5), np.int16), (0.5, 0.6, 2.0), (10.0, 20.0, 30.0))
    np.testing.assert_allclose(vol.index_to_world((0, 0, 0)), [10, 20, 30])
    # index (z=2, y=1, x=3) → x = 10 + 3*0.5, y = 20 + 1*0.6, z = 30 + 2*2
    np.testing.assert_allclose(vol.index_to_world((2, 1, 3)), [11.5, 20.6, 34.0])
    np.testing.assert_allclose(vol.index_to_world([[0, 0, 0], [2, 1, 3]]), [[10, 20, 30], [11.5, 20.6, 34.0]])
    affine = vol.affine_ras()
    # LPS (10, 20, 30) is RAS (-10, -20, 30); the x and y columns flip sign, z does not.
    np.testing.assert_allclose(affine[:3, 3], [-10, -20, 30])
    np.testing.assert_allclose(np.diag(affine)[:3], [-0.5, -0.6, 2.0])
    # affine and index_to_world agree (up to the LPS→RAS flip)
    ras = affine @ [3, 1, 2, 1]
    np.testing.assert_allclose(ras[:3] * [-1, -1, 1], vol.index_to_world((2, 1, 3)))


def test_with_array_keeps_geometry(oblique):
    mask = oblique.with_array(np.ones(oblique.shape, np.uint8))
    assert mask.same_geometry(oblique)
    assert mask.array.dtype == np.uint8
    mask.metadata["x"] = 1
    assert "x" not in oblique.metadata
    with pytest.raises(ValueError, match=r"array shape \(1, 2, 3\) differs from the volume's"):
        oblique.with_array(np.ones((1, 2, 3)))


# ----------------------------------------------------------------------------------------------
# Geometry round trips
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_oblique(tmp_path, oblique, ext):
    path = write_volume(oblique, tmp_path / f"vol{ext}")
    back = read_volume(path)
    assert back.same_geometry(oblique), (back.spacing_mm, back.origin_mm, back.direction)
    np.testing.assert_array_equal(back.array, oblique.array)
    assert back.array.dtype == np.int16
    assert back.metadata["ndim"] == 3
    assert back.modality is None and back.path == str(path)
    assert [p.name for p in tmp_path.iterdir()] == [f"vol{ext}"]  # no temporary file left


def test_chain_nifti_nrrd_mha(tmp_path, oblique):
    a = read_volume(write_volume(oblique, tmp_path / "a.nii.gz"))
    b = read_volume(write_volume(a, tmp_path / "b.nrrd"))
    c = read_volume(write_volume(b, tmp_path / "c.mha"))
    d = read_volume(write_volume(c, tmp_path / "d.nii"))
    assert d.same_geometry(oblique)
    np.testing.assert_array_equal(d.array, oblique.array)


def test_nifti_affine_matches_nibabel_and_sitk(tmp_path, oblique):
    mask = oblique.with_array((oblique.array > 0).astype(np.uint8))
    path = write_volume(mask, tmp_path / "mask.nii.gz")
    nib_affine = nib.load(str(path)).affine
    np.testing.assert_allclose(nib_affine, oblique.affine_ras(), atol=1e-5)
    np.testing.assert_allclose(sitk_affine_ras(sitk.ReadImage(str(path))), nib_affine, atol=1e-5)
    # nibabel's array is (x, y, z): transposed, same voxels
    np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0), mask.array)
    assert read_volume(path).same_geometry(oblique)


def test_nibabel_written_nifti_reads_with_matching_affine(tmp_path):
    """A NIfTI from another tool (RAS affine) lands at the same voxel positions."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(0, 0, 15) @ np.diag([0.9, 0.9, 3.0])
    affine[:3, 3] = [40.0, -60.0, 12.0]
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (x, y, z)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ext.nii.gz"))
    vol = read_volume(tmp_path / "ext.nii.gz")
    assert vol.shape == (6, 5, 4)
    np.testing.assert_allclose(vol.affine_ras(), affine, atol=1e-5)
    np.testing.assert_array_equal(vol.array, data.transpose(2, 1, 0))


@pytest.mark.parametrize("name", ["ext2.nii", "ext2.nii.gz"])
def test_a_nifti2_file_reads_as_its_nifti1_copy(tmp_path, name):
    """ITK 5.4 reads NIfTI-1 only: a NIfTI-2 file (nibabel, AFNI and some converters write them)
    was refused as "not a valid NIfTI file or corrupt"."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(0, 0, 15) @ np.diag([0.9, 0.8, 3.0])
    affine[:3, 3] = [40.0, -60.0, 12.0]
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (x, y, z)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ext1.nii.gz"))
    nib.save(nib.Nifti2Image(data, affine), str(tmp_path / name))
    one, two = read_volume(tmp_path / "ext1.nii.gz"), read_volume(tmp_path / name)
    np.testing.assert_array_equal(two.array, one.array)
    assert two.array.dtype == one.array.dtype
    np.testing.assert_allclose(two.affine_ras(), one.affine_ras(), atol=1e-5)


def test_2d_round_trip(tmp_path):
    image = sitk.GetImageFromArray(np.arange(20, dtype=np.uint8).reshape(4, 5))
    image.SetSpacing((0.5, 0.6))
    image.SetOrigin((3.0, -4.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, s, c))
    sitk.WriteImage(image, str(tmp_path / "slice.mha"))
    vol = read_volume(tmp_path / "slice.mha")
    assert vol.shape == (1, 4, 5) and vol.metadata["ndim"] == 2
    assert vol.spacing_mm == (0.5, 0.6, 1.0)
    np.testing.assert_allclose(vol.direction[:2, :2], [[c, -s], [s, c]])
    np.testing.assert_allclose(vol.direction[2], [0, 0, 1])
    for ext in (".nrrd", ".nii.gz"):
        out = write_volume(vol.with_array(vol.array > 10), tmp_path / f"mask{ext}")
        back = sitk.ReadImage(str(out))
        assert back.GetDimension() == 2
        np.testing.assert_allclose(back.GetSpacing(), (0.5, 0.6))
        np.testing.assert_allclose(back.GetOrigin(), (3.0, -4.0), atol=1e-5)
        np.testing.assert_allclose(back.GetDirection(), (c, -s, s, c), atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), (vol.array[0] > 10).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------
def write_ct_series(folder, hu, *, spacing_xy=(0.6, 0.7), thickness=2.0, origin=(-5.0, 8.0, 100.0),
                    angle_deg=30.0, description="Axial CT", series_number=2, study_uid=None, prefix="s",
                    offsets_mm=None, edit=None):
    """Write ``hu`` (z, y, x) as an oblique CT series, stored as uint16 with intercept -1024.

    Slice k lies ``offsets_mm[k]`` (default ``k * thickness``) along the slice normal from
    ``origin``. Files are named in reverse slice order so that the reader has to sort them by
    position. ``edit(ds, k)``, if given, changes slice k's dataset before it is saved. Returns
    (series uid, direction (3, 3) with columns row, column, normal).
    """
    folder.mkdir(parents=True, exist_ok=True)
    a = np.radians(angle_deg)
    row, col = np.array([np.cos(a), np.sin(a), 0.0]), np.array([-np.sin(a), np.cos(a), 0.0])
    normal = np.cross(row, col)
    series_uid, study_uid, frame_uid = generate_uid(), study_uid or generate_uid(), generate_uid()
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber = "CT", description, series_number
        ds.PatientName, ds.PatientID, ds.InstanceNumber = "Test^Phantom", "0", k + 1
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        offset = k * thickness if offsets_mm is None else offsets_mm[k]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + offset * normal]
        ds.PixelSpacing = [spacing_xy[1], spacing_xy[0]]  # (between rows = y, between columns = x)
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        if edit is not None:
            edit(ds, k)
        ds.save_as(str(folder / f"{prefix}{hu.shape[0] - k:03d}.dcm"), enforce_file_format=True)
    return series_uid, np.stack([row, col, normal], axis=1)


@pytest.fixture
def hu():
    rng = np.random.default_rng(1)
    return rng.integers(-1024, 2000, size=(4, 16, 16)).astype(np.int16)


def test_dicom_series_hu_and_geometry(tmp_path, hu):
    uid, direction = write_ct_series(tmp_path / "ct", hu)
    vol = read_volume(tmp_path / "ct")
    np.testing.assert_array_equal(vol.array, hu)
    np.testing.assert_allclose(vol.spacing_mm, (0.6, 0.7, 2.0), atol=1e-5)
    np.testing.assert_allclose(vol.origin_mm, (-5.0, 8.0, 100.0), atol=1e-5)
    np.testing.assert_allclose(vol.direction, direction, atol=1e-5)
    assert vol.modality == "CT"
    assert vol.metadata["SeriesInstanceUID"] == uid
    assert vol.metadata["SeriesDescription"] == "Axial CT"
    assert vol.metadata["RescaleIntercept"] == -1024
    assert vol.metadata["ndim"] == 3
    assert "series_note" not in vol.metadata
    assert "PatientName" not in vol.metadata
    # a NIfTI written from it is where nibabel says it is
    out = write_volume(vol.with_array((vol.array > 0).astype(np.uint8)), tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(nib.load(str(out)).affine, vol.affine_ras(), atol=1e-5)


def test_dicom_folder_with_two_series(tmp_path, hu):
    folder = tmp_path / "study"
    study = generate_uid()
    big_uid, _ = write_ct_series(folder, hu, description="Axial CT", series_number=2, study_uid=study, prefix="a")
    small_uid, _ = write_ct_series(folder, hu[:2] + 7, description="Scout", series_number=1, study_uid=study, prefix="b")

    infos = list_dicom_series(folder)
    assert [(s.description, s.n_files, s.modality) for s in infos] == [("Scout", 2, "CT"), ("Axial CT", 4, "CT")]

    default = read_volume(folder)
    assert default.metadata["SeriesInstanceUID"] == big_uid
    note = default.metadata["series_note"]
    assert "2 DICOM series" in note and "Axial CT" in note and "Scout" in note
    assert "--series" not in note  # the way to choose is the caller's (CLI option, napari panel)
    assert default.metadata["series_others"] == ["[0] #1 'Scout' (2 files, CT)"]  # index, then SeriesNumber
    np.testing.assert_array_equal(default.array, hu)

    for choice in ("scout", "SCO", 0, "0", small_uid):
        vol = read_volume(folder, series=choice)
        assert vol.metadata["SeriesInstanceUID"] == small_uid, choice
        np.testing.assert_array_equal(vol.array, hu[:2] + 7)
    assert read_volume(folder, series=1).metadata["SeriesInstanceUID"] == big_uid

    for bad in ("sagittal", 5):
        with pytest.raises(InputError) as err:
            read_volume(folder, series=bad)
        assert str(folder) in str(err.value) and "Scout" in str(err.value) and "Axial CT" in str(err.value)


def test_single_dicom_file_keeps_its_3d_position_and_thickness(tmp_path, hu):
    """One slice is still a slice in the patient: z position and thickness survive to the output."""
    _, direction = write_ct_series(tmp_path / "one", hu[:1], thickness=2.5, origin=(-5.0, 8.0, -82.5))
    (path,) = (tmp_path / "one").iterdir()
    for source in (path, tmp_path / "one"):  # the file, and the folder holding it
        vol = read_volume(source)
        assert vol.shape == (1, 16, 16) and vol.modality == "CT"
        np.testing.assert_array_equal(vol.array, hu[:1])
        np.testing.assert_allclose(vol.spacing_mm, (0.6, 0.7, 2.5), atol=1e-5)
        np.testing.assert_allclose(vol.origin_mm, (-5.0, 8.0, -82.5), atol=1e-5)
        np.testing.assert_allclose(vol.direction, direction, atol=1e-5)
        out = write_volume(vol.with_array((vol.array > 0).astype(np.uint8)), tmp_path / "slice.nii.gz", overwrite=True)
        np.testing.assert_allclose(nib.load(str(out)).affine, vol.affine_ras(), atol=1e-5)
        assert nib.load(str(out)).affine[2, 3] == pytest.approx(-82.5, abs=1e-4)
        assert read_volume(out).same_geometry(vol)


def test_a_single_dicom_file_without_a_position_is_said_to_be_placed_at_the_origin(tmp_path, hu):
    """It silently got origin 0: a mask written from it would not line up with the patient's study."""
    def unplaced(ds, k):
        del ds.ImagePositionPatient

    write_ct_series(tmp_path / "one", hu[:1], edit=unplaced)
    (path,) = (tmp_path / "one").iterdir()
    vol = read_volume(path)
    assert vol.origin_mm == pytest.approx((0, 0, 0))
    assert any("no ImagePositionPatient: placed at the origin" in w and str(path) in w
               for w in vol.metadata.get("warnings", []))
    placed = tmp_path / "two"
    write_ct_series(placed, hu[:1])
    assert not any("placed at the origin" in w for w in read_volume(next(placed.iterdir())).metadata.get("warnings", []))


def test_2d_nifti_keeps_the_z_of_its_affine(tmp_path):
    """A 2D NIfTI (dim[0] = 2) whose affine places the slice at z = -67.5, 2.5 mm thick."""
    affine = np.diag([-1.4, -1.4, 2.5, 1.0])
    affine[:3, 3] = [178.5, 178.5, -67.5]
    data = np.arange(20 * 30, dtype=np.int16).reshape(20, 30)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "slice.nii.gz"))
    vol = read_volume(tmp_path / "slice.nii.gz")
    assert vol.shape == (1, 30, 20)
    np.testing.assert_allclose(vol.affine_ras(), affine, atol=1e-5)
    out = write_volume(vol.with_array(vol.array > 100), tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(nib.load(str(out)).affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj).reshape(20, 30), data > 100)


def test_2d_file_without_3d_geometry_stays_2d(tmp_path):
    image = sitk.GetImageFromArray(np.arange(20, dtype=np.uint8).reshape(4, 5))
    image.SetSpacing((0.5, 0.6))
    sitk.WriteImage(image, str(tmp_path / "plain.mha"))
    vol = read_volume(tmp_path / "plain.mha")
    assert vol.metadata["ndim"] == 2
    assert sitk.ReadImage(str(write_volume(vol, tmp_path / "out.nrrd"))).GetDimension() == 2


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
def _input_error(path, match, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as err:
        read_volume(path, **kwargs)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value) and "sitk::" not in str(err.value) and ".cxx" not in str(err.value)
    return err.value


def test_missing_path(tmp_path):
    _input_error(tmp_path / "nope.nii.gz", "does not exist")


def test_unsupported_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    err = _input_error(tmp_path / "notes.txt", "not a supported format")
    assert "NIfTI" in str(err) and "DICOM" in str(err)


def test_text_file_named_nifti(tmp_path):
    (tmp_path / "fake.nii.gz").write_text("this is not an image")
    _input_error(tmp_path / "fake.nii.gz", "cannot be read")


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd"])
def test_truncated_file(tmp_path, oblique, ext):
    good = write_volume(oblique.with_array(np.random.default_rng(2).normal(size=oblique.shape).astype(np.float32)),
                        tmp_path / f"good{ext}")
    data = good.read_bytes()
    bad = tmp_path / f"bad{ext}"
    bad.write_bytes(data[: len(data) * 2 // 3])
    _input_error(bad, "truncated|corrupt")


def test_4d_input(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), str(tmp_path / "fmri.nii.gz"))
    _input_error(tmp_path / "fmri.nii.gz", "4D")


def test_4d_with_single_volume_is_3d(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), str(tmp_path / "one.nii.gz"))
    assert read_volume(tmp_path / "one.nii.gz").shape == (6, 5, 4)


def test_rgb_input(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))
    _input_error(tmp_path / "rgb.nrrd", "3 components per voxel")


def test_nan_voxels(tmp_path):
    array = np.zeros((3, 4, 5), np.float32)
    array[0, 0, :3] = np.nan
    array[2, 3, 4] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.mha"))
    _input_error(tmp_path / "nan.mha", "4 NaN or infinite")


@pytest.mark.parametrize("name", ["nan.nii", "nan.nii.gz"])
def test_nan_voxels_of_a_nifti_are_found_in_every_slab(tmp_path, monkeypatch, name):
    """A float NIfTI is checked for NaN slab by slab (it was loaded whole, on top of the reader's
    copy): voxels in the first and the last slab are all counted."""
    import nibabel as nib

    from boltzformer.io import nifti

    monkeypatch.setattr(nifti, "_FINITE_SLAB_BYTES", 4 * 5 * 4 * 2)  # two slices of 4 x 5 float32 a slab
    xyz = np.zeros((4, 5, 7), np.float32)
    xyz[0, 0, 0], xyz[1, 2, 6], xyz[3, 4, 6] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(xyz, np.eye(4)), str(tmp_path / name))
    _input_error(tmp_path / name, "3 NaN or infinite voxels \\(of 140\\)")
    xyz[:] = 1.0
    nib.save(nib.Nifti1Image(xyz, np.eye(4)), str(tmp_path / name))
    assert read_volume(tmp_path / name).shape == (7, 5, 4)


def test_empty_folder_and_folder_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    _input_error(tmp_path / "empty", "no DICOM series")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    (tmp_path / "other" / "sub").mkdir()
    err = _input_error(tmp_path / "other", "no DICOM series")
    assert "sub" in str(err)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def test_existing_output_refused_and_untouched(tmp_path, oblique):
    path = tmp_path / "out.nii.gz"
    path.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists; pass --overwrite") as err:
        write_volume(oblique, path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == b"precious"
    write_volume(oblique, path, overwrite=True)
    assert read_volume(path).same_geometry(oblique)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_missing_and_unwritable_folder(tmp_path, oblique, monkeypatch):
    with pytest.raises(OutputError, match="does not exist"):
        write_volume(oblique, tmp_path / "missing" / "out.nii.gz")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root may write anywhere: pretend the permission check says no
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    else:
        locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable") as err:
            write_volume(oblique, locked / "out.nii.gz")
        assert str(locked / "out.nii.gz") in str(err.value)
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_unsupported_output_extension(tmp_path, oblique):
    with pytest.raises(OutputError, match="unsupported output format"):
        write_volume(oblique, tmp_path / "out.png")


@pytest.mark.parametrize("exc", [RuntimeError("disk full\nITK ERROR: details"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, oblique, monkeypatch, exc):
    seen = []

    def broken_writer(image, filename, useCompression=False, *args, **kwargs):
        seen.append(filename)
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise exc

    monkeypatch.setattr(sitk, "WriteImage", broken_writer)
    with pytest.raises((OutputError, KeyboardInterrupt)) as err:
        write_volume(oblique, tmp_path / "out.nii.gz")
    assert isinstance(err.value, type(exc) if isinstance(exc, KeyboardInterrupt) else OutputError)
    assert list(tmp_path.iterdir()) == []
    # the temporary file was hidden, in the same folder, with the real extension
    name = os.path.basename(seen[0])
    assert os.path.dirname(seen[0]) == str(tmp_path)
    assert name.startswith(".out.nii.gz.tmp-") and name.endswith(".nii.gz")


def test_atomic_output_for_other_writers(tmp_path):
    with atomic_output(tmp_path / "table.csv") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".csv"
        tmp.write_text("a,b\n")
        assert not (tmp_path / "table.csv").exists()
    assert (tmp_path / "table.csv").read_text() == "a,b\n"
    with pytest.raises(OutputError, match="exists"):
        with atomic_output(tmp_path / "table.csv"):
            pass
    with pytest.raises(ValueError, match="boom"):  # the writer's own error, passed on
        with atomic_output(tmp_path / "other.json") as tmp:
            tmp.write_text("{")
            raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_detached_header_without_data(tmp_path, oblique):
    image = oblique.to_sitk()
    sitk.WriteImage(image, str(tmp_path / "vol.mhd"))
    assert read_volume(tmp_path / "vol.mhd").same_geometry(oblique)
    (tmp_path / "vol.raw").unlink()
    _input_error(tmp_path / "vol.mhd", "data file vol.raw is missing")


@pytest.mark.parametrize("qform", ["none", "rigid"])
def test_a_gantry_tilted_nifti_is_straightened_like_a_tilted_dicom_series(tmp_path, qform):
    """A NIfTI whose slice axis leans 15 degrees (an unstraightened gantry tilt): ITK refused it
    (no qform) or put every voxel where the qform says, up to 12.7 mm off, with only a warning."""
    data = np.zeros((40, 30, 20), np.int16)  # (x, y, z), as nibabel stores it
    data[10:20, 10:15, 5:8] = 100
    lean = 2.5 * np.tan(np.radians(15))
    affine = np.array([[-0.8, 0, 0, 50], [0, -0.8, lean, 60], [0, 0, 2.5, -100], [0, 0, 0, 1.0]])
    image = nib.Nifti1Image(data, None)
    image.set_sform(affine, 1)
    image.set_qform(np.diag([-0.8, -0.8, 2.5, 1.0]) if qform == "rigid" else None, 1 if qform == "rigid" else 0)
    nib.save(image, str(tmp_path / "tilted.nii.gz"))
    vol = read_volume(tmp_path / "tilted.nii.gz")
    assert vol.shape == (20, 30, 40) and vol.array.dtype == np.int16
    assert vol.spacing_mm == pytest.approx((0.8, 0.8, 2.5)) and np.allclose(vol.direction, np.eye(3))
    assert any("its sform is sheared (gantry tilt of 15.0 degrees" in w for w in vol.metadata["warnings"])
    # every voxel where the sform puts it: the block's centre, through the straightened grid
    centre_ras = affine @ np.r_[np.argwhere(data > 50).mean(0), 1.0]
    assert np.allclose(vol.index_to_world(np.argwhere(vol.array > 50).mean(0)),
                       (-centre_ras[0], -centre_ras[1], centre_ras[2]), atol=0.05)
    out = write_volume(vol.with_array((vol.array > 50).astype(np.uint8)), tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(nib.load(str(out)).affine, vol.affine_ras(), atol=1e-5)


def test_a_nifti_sheared_within_its_slices_is_refused(tmp_path):
    """No tilt explains it: its voxels cannot be put on a grid (ITK's nearest geometry was used)."""
    affine = np.array([[1.0, 0.4, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), affine), str(tmp_path / "sheared.nii.gz"))
    with pytest.raises(InputError, match="its sform is sheared within the slice plane"):
        read_volume(tmp_path / "sheared.nii.gz")
    # an oblique rotation whose cosines were rounded (axes 0.025 degrees off square) is a rotation
    rounded = np.array([[0.866, -0.5005, 0], [0.5, 0.866, 0], [0, 0, 1.0]]) @ np.diag([0.7, 0.7, 2.0])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.vstack([np.c_[rounded, np.zeros(3)], [0, 0, 0, 1]])),
             str(tmp_path / "rounded.nii.gz"))
    vol = read_volume(tmp_path / "rounded.nii.gz")
    assert vol.spacing_mm == pytest.approx((0.7, 0.7, 2.0), abs=1e-3)
    assert np.allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-6)


def test_names_that_are_not_utf8_are_refused_in_one_line_not_a_process_abort(tmp_path, hu):
    """SimpleITK aborted the whole process (exit 134, a napari session with it) on a Latin-1 name
    from an old archive; a DICOM folder with one such slice raised a TypeError."""
    from boltzformer.io import Volume

    volume = Volume(hu.copy(), (0.7, 0.7, 2.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT")
    good = write_volume(volume, tmp_path / "good.nii.gz")
    latin = tmp_path / os.fsdecode(b"r\xe9sum\xe9.nii.gz")
    os.link(good, latin)
    with pytest.raises(InputError, match=r"r\\xe9sum\\xe9\.nii\.gz: its name is not valid UTF-8"):
        read_volume(latin)
    with pytest.raises(OutputError, match=r"sal\\xe9\.nii\.gz: its name is not valid UTF-8"):
        write_volume(volume, tmp_path / os.fsdecode(b"sal\xe9.nii.gz"))
    write_ct_series(tmp_path / "series", hu[:3])
    first = sorted((tmp_path / "series").iterdir())[0]
    os.rename(first, first.with_name(os.fsdecode(b"slice\xe9.dcm")))
    with pytest.raises(InputError, match=r"slice\\xe9\.dcm has a name that is not valid UTF-8"):
        read_volume(tmp_path / "series")


def test_utf8_names_under_an_ascii_locale_are_refused_naming_the_locale_not_the_file(tmp_path, hu):
    """Under LC_ALL=C with UTF-8 mode off, Python reads 'résumé.nii.gz' as ASCII plus surrogates:
    the message said the name was 'not valid UTF-8 (another encoding, e.g. Latin-1)', which it is
    not; it now names the locale and the fix."""
    import subprocess
    import sys

    from boltzformer.io import Volume

    volume = Volume(hu.copy(), (0.7, 0.7, 2.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT")
    write_volume(volume, tmp_path / "r\u00e9sum\u00e9.nii.gz")
    code = ("import os, sys\n"
            "from boltzformer.io import read_volume\n"
            "from boltzformer.errors import InputError\n"
            "try:\n"
            "    read_volume(os.listdir('.')[0])\n"
            "except InputError as exc:\n"
            "    print(ascii(str(exc)))\n")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert "this Python reads file names as ASCII" in proc.stdout and "PYTHONUTF8=1" in proc.stdout, proc
    assert "Latin-1" not in proc.stdout


def test_an_output_name_too_long_for_its_temporary_file_is_refused_before_the_run(tmp_path):
    """A name of 235-255 bytes passed the check and failed after the whole run (the temporary
    '.<name>.tmp-xxxxxxxx.nii.gz' is longer); one over 255 was 'unexpected OSError'."""
    from boltzformer.io import check_output_path

    for n in (240, 300):
        with pytest.raises(OutputError, match=f"its name is {n + 7} bytes long"):
            check_output_path(tmp_path / ("c" * n + ".nii.gz"))
    assert check_output_path(tmp_path / ("c" * 200 + ".nii.gz"))
