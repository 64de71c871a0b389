"""DICOM as scanners and archives write it: gantry-tilted (sheared) stacks, localizers and
reports inside a series, missing or rounded geometry tags, two echoes, enhanced multi-frame
images whose frames are not a plain stack, and which series of a folder is read."""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from boltzformer.errors import InputError, SliceSpacingError
from boltzformer.io import read_volume

from .test_io import write_ct_series

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _flat(n=10, shape=(48, 56)) -> np.ndarray:
    return np.full((n, *shape), -1000, np.int16)


def test_a_gantry_tilted_stack_is_straightened_so_every_voxel_is_where_the_scanner_put_it(tmp_path):
    """Slices tilted 15 degrees while the table moves along z: each slice is offset within its
    plane by k * 2.5 mm * sin(15); read as a straight stack, the last one sat 5.8 mm away."""
    tilt, dz, sx, sy = np.radians(15.0), 2.5, 0.7, 0.8
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(tilt), np.sin(tilt)])
    origin = np.array([-20.0, -15.0, -100.0])
    hu = _flat()
    hu[:, 20:23, 30:33] = 300  # a marker, at the same pixels of every slice

    def tilted(ds, k):
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.ImagePositionPatient = [float(v) for v in origin + np.array([0.0, 0.0, k * dz])]
        ds.PixelSpacing = [sy, sx]

    write_ct_series(tmp_path / "tilt", hu, edit=tilted)
    vol = read_volume(tmp_path / "tilt")
    assert any("gantry tilt of 15.0 degrees" in w for w in vol.metadata["warnings"])
    np.testing.assert_allclose(vol.direction[:, :2], np.stack([row, col], 1), atol=1e-6)
    for k in range(hu.shape[0]):  # where the marker's centre is, against where the scanner put it
        weights = np.clip(vol.array[k].astype(float) + 1000, 0, None)
        r, c = (np.indices(weights.shape) * weights).reshape(2, -1).sum(1) / weights.sum()
        found = np.asarray(vol.index_to_world((k, r, c)))
        truth = origin + np.array([0.0, 0.0, k * dz]) + 31 * sx * row + 21 * sy * col
        np.testing.assert_allclose(found, truth, atol=0.05)


def test_localizers_and_reports_in_a_series_are_left_out_with_a_note(tmp_path):
    hu = _flat(6)
    folder = tmp_path / "ct"
    series_uid, _ = write_ct_series(folder, hu, angle_deg=0.0)

    def scout(ds, k):  # a coronal topogram that came with the series
        ds.SeriesInstanceUID = series_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]

    write_ct_series(tmp_path / "scout", _flat(1, (48, 56)), edit=scout)
    (tmp_path / "scout" / "s001.dcm").rename(folder / "scout.dcm")
    report = Dataset()
    report.file_meta = Dataset()
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    report.SOPClassUID, report.SOPInstanceUID = report.file_meta.MediaStorageSOPClassUID, generate_uid()
    report.SeriesInstanceUID, report.Modality = series_uid, "SR"
    report.save_as(str(folder / "dose_report.dcm"), enforce_file_format=True)
    (folder / "._s001.dcm").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    vol = read_volume(folder)
    assert vol.shape == (6, 48, 56)
    notes = " ".join(vol.metadata["warnings"])
    assert "left out the localizer (scout) image scout.dcm" in notes


def test_pixel_spacing_missing_or_from_the_detector_and_rounded_cosines(tmp_path):
    def no_spacing(ds, k):
        del ds.PixelSpacing

    write_ct_series(tmp_path / "none", _flat(4), edit=no_spacing)
    vol = read_volume(tmp_path / "none")
    assert vol.spacing_mm[:2] == pytest.approx((1.0, 1.0))
    assert any("has no PixelSpacing (0028,0030): 1 mm pixels assumed" in w for w in vol.metadata["warnings"])

    def imager(ds, k):
        del ds.PixelSpacing
        ds.ImagerPixelSpacing = [0.9, 0.6]

    write_ct_series(tmp_path / "imager", _flat(4), edit=imager)
    vol = read_volume(tmp_path / "imager")
    assert vol.spacing_mm[:2] == pytest.approx((0.6, 0.9)) and "ImagerPixelSpacing" in vol.metadata["warnings"][0]

    def rounded(ds, k):  # a 30-degree oblique series with its cosines written to 2 decimals
        ds.ImageOrientationPatient = [round(float(v), 2) for v in ds.ImageOrientationPatient]

    _, direction = write_ct_series(tmp_path / "rounded", _flat(4), edit=rounded)
    vol = read_volume(tmp_path / "rounded")
    np.testing.assert_allclose(vol.direction, direction, atol=5e-3)  # ITK read it as the identity
    assert np.allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-9)
    assert any("made orthonormal" in w for w in vol.metadata["warnings"])

    def skewed(ds, k):
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.173648, 0.984808, 0.0]

    write_ct_series(tmp_path / "skewed", _flat(4), edit=skewed)
    with pytest.raises(InputError, match="10.0 degrees off a right angle"):
        read_volume(tmp_path / "skewed")


def test_two_echoes_at_the_same_positions_are_named(tmp_path):
    def echo(ds, k):
        ds.EchoTime = 10.0 if k < 4 else 80.0

    write_ct_series(tmp_path / "mr", _flat(8), offsets_mm=[0, 2, 4, 6, 0, 2, 4, 6], edit=echo)
    with pytest.raises(InputError, match=r"holds 2 echoes \(EchoTime 10, 80 ms\)"):
        read_volume(tmp_path / "mr")


def _enhanced(path, z_mm, frames: np.ndarray, echo_ms=None):
    """An Enhanced CT file: one frame per position z_mm[k] (axial, 0.8 mm pixels)."""
    ds = Dataset()
    ds.file_meta = Dataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ENHANCED_CT, generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = frames.shape[1], frames.shape[2], len(z_mm)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (frames.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    shared = Dataset()
    measures, plane, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.8], 2.5
    plane.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k, z in enumerate(z_mm):
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = [-20.0, -20.0, float(z)]
        group.PlanePositionSequence = Sequence([position])
        if echo_ms is not None:
            echo = Dataset()
            echo.EffectiveEchoTime = echo_ms[k]
            group.MREchoSequence = Sequence([echo])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_enhanced_multiframe_frames_are_ordered_and_checked_by_their_positions(tmp_path):
    frames = np.stack([np.full((16, 20), 10 * k, np.int16) for k in range(6)])  # frame k: 10 k HU
    shuffled = _enhanced(tmp_path / "shuffled.dcm", [-100, -95, -97.5, -92.5, -90, -87.5], frames)
    vol = read_volume(shuffled)
    assert vol.spacing_mm == pytest.approx((0.8, 0.8, 2.5)) and vol.origin_mm == pytest.approx((-20, -20, -100))
    assert [int(vol.array[k, 0, 0]) for k in range(6)] == [0, 20, 10, 30, 40, 50]  # sorted by position
    with pytest.raises(SliceSpacingError, match="gap from -92.50 to -85.00 mm"):
        read_volume(_enhanced(tmp_path / "gap.dcm", [-100, -97.5, -95, -92.5, -85, -82.5], frames))
    assert read_volume(tmp_path / "gap.dcm", allow_gaps=True).shape[0] == 8
    with pytest.raises(InputError, match="holds 2 echoes"):
        read_volume(_enhanced(tmp_path / "echoes.dcm", [-100, -97.5, -95] * 2, frames, echo_ms=[10] * 3 + [80] * 3))


def test_the_default_series_counts_frames_and_passes_over_localizers(tmp_path):
    folder = tmp_path / "study"
    _enhanced(folder.mkdir() or folder / "ct.dcm", [-100 + 2.5 * k for k in range(6)],
              np.zeros((6, 16, 20), np.int16))

    def topogram(ds, k):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    write_ct_series(folder, _flat(2, (16, 20)), description="Topogram", prefix="t", edit=topogram)
    vol = read_volume(folder)
    assert vol.shape == (6, 16, 20)
    assert "(6 images in 1 file, CT)" in vol.metadata["series_note"] and "localizer" in vol.metadata["series_note"]


def test_a_folder_scanned_twice_is_scanned_once_until_its_files_change(tmp_path, monkeypatch):
    """napari's stack reader lists a folder's series, then reads the folder, which listed them
    again (0.1-0.7 s for 300 slices). The second listing reuses the first while no file in the
    folder was added, removed, replaced or touched."""
    import os

    from boltzformer.io import dicom, list_dicom_series

    write_ct_series(tmp_path / "s", np.full((4, 16, 16), 40, np.int16))
    scans = []
    scan = dicom._scan_series
    monkeypatch.setattr(dicom, "_scan_series", lambda folder: scans.append(folder) or scan(folder))
    first = list_dicom_series(tmp_path / "s")
    assert read_volume(tmp_path / "s").shape == (4, 16, 16) and len(scans) == 1
    assert list_dicom_series(tmp_path / "s") == first and len(scans) == 1
    files = sorted((tmp_path / "s").iterdir())
    os.remove(files[-1])  # a slice gone: scanned again, and the series has 3 files
    assert list_dicom_series(tmp_path / "s")[0].n_files == 3 and len(scans) == 2
    stat = files[0].stat()
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # rewritten in place
    list_dicom_series(tmp_path / "s")
    assert len(scans) == 3


def test_series_are_listed_by_pydicom_and_unplaced_slices_stacked_by_instance_number(tmp_path):
    """The folder scan is pydicom's (GDCM's crashed on a deeply nested file and re-read the
    folder once per series): series by number, other objects left out, and slices without
    positions in InstanceNumber order, though their file names run the other way."""
    from boltzformer.io import list_dicom_series

    folder = tmp_path / "mixed"
    first, _ = write_ct_series(folder, _flat(3, (16, 16)), series_number=7, prefix="a")
    hu = np.stack([np.full((16, 16), 10 * k, np.int16) for k in range(4)])

    def unplaced(ds, k):
        del ds.ImagePositionPatient

    second, _ = write_ct_series(folder, hu, series_number=3, prefix="b", edit=unplaced)
    index = Dataset()  # a DICOMDIR: a DICOM object of no series, holding no image
    index.file_meta = Dataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    index.FileSetID = "STUDY"
    index.save_as(str(folder / "DICOMDIR"), enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")
    infos = list_dicom_series(folder)
    assert [(s.uid, s.series_number, s.n_files) for s in infos] == [(second, 3, 4), (first, 7, 3)]
    assert [os.path.basename(f) for f in infos[0].files] == ["b004.dcm", "b003.dcm", "b002.dcm", "b001.dcm"]
    vol = read_volume(folder, series=0)
    assert [int(v) for v in vol.array[:, 0, 0]] == [0, 10, 20, 30]
    assert "stacked by InstanceNumber" in " ".join(vol.metadata["warnings"])


@pytest.mark.parametrize("which", [0, -1])
def test_an_end_slice_cut_short_before_its_series_uid_is_refused_not_dropped(tmp_path, which):
    """Cut inside its header, the first or last slice named no series and no size: it was passed
    over as 'another DICOM object', and the series read one slice short without a word."""
    folder = tmp_path / "ct"
    write_ct_series(folder, _flat(5, (16, 16)))
    victim = sorted(folder.iterdir())[which]
    victim.write_bytes(victim.read_bytes()[:300])  # the file meta and the first tags only
    with pytest.raises(InputError, match=f"{victim.name} in the folder cannot be read as DICOM"):
        read_volume(folder)


@pytest.mark.parametrize("sop", ["1.3.12.2.1107.5.9.1", "1.3.46.670589.11.0.0.12.2"])  # Siemens CSA, Philips
def test_a_vendor_private_object_without_pixels_beside_a_series_is_left_out(tmp_path, sop):
    """Flat Siemens and Philips MR exports hold private non-image objects in series of their
    own: taken for slices cut short, they made the whole folder 'cannot be read'."""
    folder = tmp_path / "ct"
    write_ct_series(folder, _flat(3, (16, 16)))
    private = Dataset()
    private.file_meta = Dataset()
    private.file_meta.MediaStorageSOPClassUID = sop
    private.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    private.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    private.SOPClassUID, private.SOPInstanceUID = sop, private.file_meta.MediaStorageSOPInstanceUID
    private.SeriesInstanceUID, private.Modality, private.SeriesNumber = generate_uid(), "MR", 99
    private.save_as(str(folder / "XX_0001"), enforce_file_format=True)
    assert read_volume(folder).shape == (3, 16, 16)


def test_a_folder_of_objects_without_images_says_what_they_are(tmp_path):
    """A segmentation or RT dose alone in a folder: 'contains no DICOM series' said nothing of
    what was there (GDCM's scan listed some such files and refused others with its own text)."""
    folder = tmp_path / "seg"
    folder.mkdir()
    seg = Dataset()
    seg.file_meta = Dataset()
    seg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    seg.SOPClassUID, seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPClassUID, seg.file_meta.MediaStorageSOPInstanceUID
    seg.SeriesInstanceUID, seg.Modality = generate_uid(), "SEG"
    seg.save_as(str(folder / "liver_seg.dcm"), enforce_file_format=True)
    with pytest.raises(InputError, match="contains no DICOM image: liver_seg.dcm is of class 'Segmentation Storage'"):
        read_volume(folder)


def test_an_rt_structure_set_without_the_preamble_beside_a_series_is_left_out(tmp_path):
    """Raw data sets (no preamble) of objects without images, exported beside the scan: pydicom
    read without force failed on them, and the whole folder was 'cannot be read'."""
    import shutil

    from pydicom.data import get_testdata_file

    folder = tmp_path / "ct"
    write_ct_series(folder, _flat(3, (16, 16)))
    rtstruct = get_testdata_file("rtstruct.dcm")  # pydicom's own test file: no preamble
    assert open(rtstruct, "rb").read(132)[128:132] != b"DICM"
    shutil.copy(rtstruct, folder / "rtstruct.dcm")
    assert read_volume(folder).shape == (3, 16, 16)


def test_a_series_without_the_preamble_keeps_its_tags_and_names_an_empty_file(tmp_path):
    """Files without the 128-byte preamble (raw data sets, no extension) lost every tag
    (Modality, SeriesDescription): an MR series was then guessed from its values. An empty file
    among them (a slice lost in a copy?) is named."""
    folder = tmp_path / "raw"

    def raw(ds, k):
        ds.Modality, ds.SeriesDescription = "MR", "T2 FLAIR axial"

    write_ct_series(folder, _flat(4, (16, 16)), edit=raw)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        path.unlink()
        del ds.file_meta  # a raw data set: no preamble, no file meta
        ds.preamble = None
        ds.save_as(str(path.with_suffix("")), implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert not any(p.read_bytes()[128:132] == b"DICM" for p in folder.iterdir())
    (folder / "s000").write_bytes(b"")
    vol = read_volume(folder)
    assert vol.shape == (4, 16, 16) and vol.modality == "MR"
    assert vol.metadata["SeriesDescription"] == "T2 FLAIR axial"
    assert any("s000 is empty (0 bytes) and left out" in w for w in vol.metadata["warnings"])


@pytest.mark.parametrize("shape", [(1, 56), (48, 1), (1, 1)])
def test_a_series_of_one_row_or_one_column_slices_keeps_its_slice_axis(tmp_path, shape):
    """GDCM drops an image axis of one pixel: a stack of 1-row slices came back as (1, slices,
    columns), the slices laid out as rows, with the identity for its direction. The same pixels
    stored with a second row must read the same, voxel for voxel and in the same place."""
    rows, columns = shape
    hu = (np.arange(10 * rows * columns).reshape(10, rows, columns) % 2000 - 1000).astype(np.int16)
    write_ct_series(tmp_path / "thin", hu)
    write_ct_series(tmp_path / "wide", np.concatenate([hu, hu], axis=1 if rows == 1 else 2))
    thin, wide = read_volume(tmp_path / "thin"), read_volume(tmp_path / "wide")
    assert thin.shape == (10, rows, columns)
    np.testing.assert_array_equal(thin.array, wide.array[:, :rows, :columns])
    np.testing.assert_allclose(thin.spacing_mm, wide.spacing_mm)
    np.testing.assert_allclose(thin.origin_mm, wide.origin_mm)
    np.testing.assert_allclose(thin.direction, wide.direction)
