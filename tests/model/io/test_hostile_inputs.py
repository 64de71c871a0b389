"""Hostile, corrupt and absurd inputs (a review of what PACS exports, shared drives and downloads
bring): each is refused with one message naming the file, without hanging, crashing the process,
filling the memory or reading garbage as a scan. Readers that could hang or crash run under an
alarm or in a child process, so a regression fails the test instead of stopping the suite."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from boltzformer.errors import InputError
from boltzformer.io import Volume, read_volume, write_volume


@pytest.fixture
def alarm():
    """Fail a test that blocks for more than 20 s (a FIFO read) instead of hanging the suite."""
    def stop(signum, frame):
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _ct(tmp_path, name="ct.nii.gz", shape=(4, 16, 16)) -> Path:
    hu = (np.arange(np.prod(shape)) % 1000).astype(np.int16).reshape(shape)
    return write_volume(Volume(hu, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT"), tmp_path / name)


def _mhd(folder: Path, data_line: str, extra: str = "") -> Path:
    header = folder / "scan.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementType = MET_SHORT\n"
                      f"ElementSpacing = 1 1 1\n{extra}ElementDataFile = {data_line}\n")
    return header


def test_a_detached_header_whose_data_is_a_fifo_or_a_device_is_refused(tmp_path, alarm):
    """A FIFO as ElementDataFile blocked the reader for ever; /dev/zero filled the memory."""
    os.mkfifo(tmp_path / "fifo.raw")
    with pytest.raises(InputError, match=r"scan.mhd: its data file fifo.raw is a FIFO"):
        read_volume(_mhd(tmp_path, "fifo.raw"))
    with pytest.raises(InputError, match=r"its data file /dev/zero is a device"):
        read_volume(_mhd(tmp_path, "/dev/zero"))
    (tmp_path / "s0.raw").write_bytes(b"\0" * 32)
    with pytest.raises(InputError, match=r"its data file fifo.raw is a FIFO"):
        read_volume(_mhd(tmp_path, "LIST\ns0.raw\nfifo.raw"))
    with pytest.raises(InputError, match=r"its data file s1.raw is missing"):
        read_volume(_mhd(tmp_path, "s%d.raw 0 1 1"))
    nhdr = tmp_path / "scan.nhdr"
    for key in ("data file", "datafile"):
        nhdr.write_text(f"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 2\nencoding: raw\nendian: little\n"
                        f"{key}: fifo.raw\n")
        with pytest.raises(InputError, match=r"scan.nhdr: its data file fifo.raw is a FIFO"):
            read_volume(nhdr)


def test_an_nrrd_of_many_dimensions_is_refused_before_simpleitk_crashes(tmp_path):
    """dimension: 12 made SimpleITK segfault: the whole process (napari with it) went, silently."""
    nrrd = tmp_path / "dim12.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 12\nsizes: " + b"1 " * 12 + b"\nencoding: raw\n"
                     b"endian: little\n\n\0\0")
    code = f"from boltzformer.io import read_volume\nread_volume({str(nrrd)!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is an NRRD of dimension 12; a 2D or 3D volume is needed" in proc.stderr


def _as_nifti2(path: Path) -> Path:
    """`path` (NIfTI-1) rewritten as NIfTI-2 (read by nibabel, not ITK: its own path to check)."""
    import nibabel as nib

    one = nib.load(str(path))
    nib.save(nib.Nifti2Image(np.asanyarray(one.dataobj), one.affine), str(path))
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_a_nii_gz_with_a_damaged_stream_or_checksum_is_refused(tmp_path, version):
    """ITK read a wrong CRC or corrupted deflate bytes as data (zeros or garbage), without a word;
    so did nibabel, which reads NIfTI-2."""
    good = _ct(tmp_path, shape=(40, 128, 128))
    good = _as_nifti2(good) if version == 2 else good
    data = good.read_bytes()
    crc = bytearray(data)
    crc[-5] ^= 0xFF  # the CRC-32 in the trailer (the size after it still matches)
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0x55  # a damaged byte in the deflate stream
    for name, damaged in (("crc.nii.gz", crc), ("middle.nii.gz", middle)):
        (tmp_path / name).write_bytes(bytes(damaged))
        with pytest.raises(InputError, match=f"{name}: (is corrupt: its gzip data fail their checksum|cannot be read)"):
            read_volume(tmp_path / name)
    assert read_volume(good).array.max() == 999


@pytest.mark.parametrize("name, data", [("ct.mha", "ct.mha"), ("ct.mhd", "ct.zraw")])
def test_a_compressed_metaimage_with_damaged_data_is_refused(tmp_path, name, data, capfd):
    """MetaIO printed 'Uncompress failed' and ITK returned what it had inflated: garbage, read
    as a scan without an error."""
    import SimpleITK as sitk

    hu = (np.arange(40 * 128 * 128) % 1000).astype(np.int16).reshape(40, 128, 128)
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(tmp_path / name), useCompression=True)
    assert np.array_equal(read_volume(tmp_path / name).array, hu)
    damaged = bytearray((tmp_path / data).read_bytes())
    damaged[len(damaged) // 2] ^= 0x55  # one byte of the deflate stream
    (tmp_path / data).write_bytes(bytes(damaged))
    capfd.readouterr()
    with pytest.raises(InputError, match=f"{name}: is corrupt: its compressed data cannot be inflated"):
        read_volume(tmp_path / name)
    assert "Uncompress failed" not in capfd.readouterr().err  # our one line says it, not MetaIO's as well


@pytest.mark.parametrize("name", ["ext.nii", "ext.nii.gz"])
def test_a_nifti_with_a_damaged_header_extension_is_still_checked_and_placed_by_its_sform(tmp_path, name):
    """ITK passes over a damaged extension size; nibabel refused the header, and with it the NaN
    check (ITK read NaN as 0) and the sform (ITK placed the scan by its qform), without a word."""
    import gzip

    import nibabel as nib

    def write(xyz):
        image = nib.Nifti1Image(xyz, np.diag([1.0, 1.0, 2.0, 1.0]))
        image.set_qform(np.diag([1.0, 1.0, 2.0, 1.0]), code=1)
        sform = np.diag([1.0, 1.0, 2.0, 1.0])
        sform[:3, 3] = [50.0, 60.0, 70.0]  # where the sform puts it: 50-70 mm from the qform
        image.set_sform(sform, code=2)
        image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"hello world 1234" * 2))
        nib.save(image, str(tmp_path / name))
        opener = gzip.open if name.endswith(".gz") else open
        with opener(tmp_path / name, "rb") as f:
            raw = bytearray(f.read())
        struct.pack_into("<i", raw, 352, 20)  # the extension's size: 20, not a multiple of 16
        with opener(tmp_path / name, "wb") as f:
            f.write(bytes(raw))

    xyz = np.random.default_rng(0).normal(100, 10, size=(16, 16, 8)).astype(np.float32)
    write(xyz)
    with pytest.raises(nib.spatialimages.HeaderDataError), pytest.warns(UserWarning, match="not a multiple of 16"):
        nib.load(str(tmp_path / name))  # the damage nibabel refuses
    volume = read_volume(tmp_path / name)
    assert np.allclose(volume.origin_mm, (-50.0, -60.0, 70.0)) and np.allclose(volume.array, xyz.T)
    xyz[3, 3, 3] = np.nan
    write(xyz)
    with pytest.raises(InputError, match=f"{name}: has 1 NaN or infinite voxels"):
        read_volume(tmp_path / name)


def test_a_gzip_bomb_is_inflated_in_bounded_memory(tmp_path):
    import tracemalloc

    from boltzformer.io.nifti import _gzip_payload_size

    bomb = tmp_path / "zeros.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(bomb, "wb") as f:
        for _ in range(256):
            f.write(packer.compress(bytes(1 << 20)))
        f.write(packer.flush())
    tracemalloc.start()
    assert _gzip_payload_size(bomb) == 256 << 20
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MB held to inflate 256 MB"


def test_a_nifti_header_nibabel_cannot_parse_is_still_checked_for_its_data(tmp_path):
    """vox_offset past the end and a damaged extension: nibabel failed, the size check was skipped
    and ITK read zeros."""
    raw = bytearray(_ct(tmp_path, "ct.nii").read_bytes())
    raw[108:112] = struct.pack("<f", 1e6)  # vox_offset
    raw[348:352] = bytes([1, 0, 0, 0])  # an extension follows
    raw[352:360] = struct.pack("<ii", 0x7FFFFFF0, 4)  # of an absurd size
    (tmp_path / "bad.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"bad.nii: (is truncated|cannot be read)"):
        read_volume(tmp_path / "bad.nii")


def test_dicom_pixel_data_shorter_than_the_image_is_refused(tmp_path):
    """A declared PixelData length shorter than Rows x Columns passed: zeros or garbage came back."""
    from .test_io import write_ct_series

    write_ct_series(tmp_path / "s", np.zeros((3, 16, 16), np.int16))
    import pydicom

    first = sorted((tmp_path / "s").iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(first)
    with pytest.raises(InputError, match=r"is truncated: its pixel data need 512 bytes, the file holds 256"):
        read_volume(first)


def test_the_usual_slice_step_is_found_without_an_n_by_n_table():
    """20 000 slices needed a 3 GB table; the result is the same as that table's."""
    import time

    from boltzformer.io.dicom import _usual_step

    def by_table(steps):
        tol = np.maximum(1e-3, 0.02 * steps)
        close = np.abs(steps[:, None] - steps[None, :]) <= tol[:, None]
        counts = close.sum(axis=1)
        best = np.flatnonzero(counts == counts.max())
        seed = best[np.argmin(steps[best])]
        return float(np.median(steps[close[seed]]))

    rng = np.random.default_rng(0)
    for _ in range(50):
        steps = rng.choice([1.0, 1.25, 2.0, 2.5, 5.0], size=rng.integers(2, 60)) * rng.uniform(0.99, 1.01, 1)
        assert _usual_step(steps) == by_table(steps)
    t = time.perf_counter()
    assert _usual_step(np.full(20_000, 0.5)) == 0.5
    assert time.perf_counter() - t < 1.0


def test_a_link_loop_in_a_dicom_folder_is_left_out(tmp_path):
    from .test_io import write_ct_series

    write_ct_series(tmp_path / "s", np.zeros((3, 16, 16), np.int16))
    os.symlink("loop.dcm", tmp_path / "s" / "loop.dcm")
    assert read_volume(tmp_path / "s").shape == (3, 16, 16)


def test_a_dicom_file_of_deeply_nested_sequences_beside_a_series_is_refused_not_a_crash(tmp_path):
    """GDCM's folder scan segfaulted on a file of 30 000 nested sequences among valid slices: the
    process (napari with it) went. The folder is now scanned by pydicom, which refuses the file."""
    import pydicom

    from .test_io import write_ct_series

    folder = tmp_path / "s"
    write_ct_series(folder, np.zeros((3, 16, 16), np.int16))
    ds = pydicom.dcmread(sorted(folder.iterdir())[0])
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "nested.dcm", enforce_file_format=True)
    depth = 30_000  # (0040,A730) SQ of undefined length holding one item, nested; then their ends
    opening = (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
               + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    with open(folder / "nested.dcm", "ab") as f:
        f.write(opening * depth + closing * depth)
    code = f"from boltzformer.io import read_volume\nread_volume({str(folder)!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.returncode  # -11: the segfault
    assert "nested.dcm in the folder cannot be read as DICOM" in proc.stderr
    (folder / "nested.dcm").unlink()
    assert read_volume(folder).shape == (3, 16, 16)


@pytest.mark.parametrize("name, header, said", [
    ("nan_matrix.mhd", "TransformMatrix = nan 0 0 0 1 0 0 0 1\n", "(its geometry is invalid|cannot be read)"),
    ("sheared.mhd", "TransformMatrix = 1 0 0 1 1 0 0 0 1\n", "its orientation matrix is sheared"),
    ("tiny.mhd", "ElementSpacing = 1e-7 1e-7 1e-7\n", "its voxel size along x is 1e-07 mm"),
])
def test_headers_with_impossible_geometry_are_refused(tmp_path, name, header, said):
    (tmp_path / "d.raw").write_bytes(b"\0" * 64)
    path = tmp_path / name
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementType = MET_SHORT\n"
                    + (header if "ElementSpacing" in header else "ElementSpacing = 1 1 1\n" + header)
                    + "ElementDataFile = d.raw\n")
    with pytest.raises(InputError, match=said):
        read_volume(path)


@pytest.mark.parametrize("version", [1, 2])
def test_an_image_larger_than_the_free_memory_is_refused_before_it_is_read(tmp_path, monkeypatch, version):
    from boltzformer.io import read

    ct = _ct(tmp_path)
    ct = _as_nifti2(ct) if version == 2 else ct
    monkeypatch.setattr(read, "available_memory_bytes", lambda: 1000)
    with pytest.raises(InputError, match=r"its header gives 16 x 16 x 4 voxels: reading it needs about"):
        read_volume(ct)


def test_tables_that_are_fifos_devices_or_unreadable_csv_are_refused(tmp_path, alarm):
    from boltzformer.cohort.scans import list_scans
    from boltzformer.evaluate import read_cases, read_split

    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(InputError, match=r"fifo.csv: is a FIFO \(named pipe\), not a regular file"):
        list_scans(tmp_path / "fifo.csv", "lung nodule")
    os.symlink("/dev/zero", tmp_path / "zero.csv")
    with pytest.raises(InputError, match="zero.csv: is a device, not a regular file"):
        list_scans(tmp_path / "zero.csv", "lung nodule")
    (tmp_path / "nul.csv").write_text("case_id,path\na,x\x00y.nii.gz\n")
    with pytest.raises(InputError, match="line 2: the path holds a NUL byte"):
        list_scans(tmp_path / "nul.csv", "lung nodule")
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "cases.csv").write_text("case_id,prompt\na,\"" + "x" * 200_000 + "\"\n")
    with pytest.raises(InputError, match=r"cases.csv: line \d+: not a readable CSV table \(field larger"):
        read_cases(folder)
    (tmp_path / "split.csv").write_text("case_id,split\na,\"" + "x" * 200_000 + "\"\n")
    with pytest.raises(InputError, match=r"split.csv: is not a readable CSV table"):
        read_split(tmp_path / "split.csv")


def test_evaluate_finds_a_missing_case_file_before_segmenting_any(tmp_path):
    from boltzformer.evaluate import evaluate_dir

    folder = tmp_path / "cases"
    folder.mkdir()
    for cid in ("a", "b"):
        _ct(folder, f"{cid}_image.nii.gz")
    _ct(folder, "a_mask.nii.gz")
    (folder / "cases.csv").write_text("case_id,prompt\na,lung nodule\nb,lung nodule\n")

    class NeverCalled:
        def segment_volume(self, *args, **kwargs):
            raise AssertionError("segmented before the files were checked")

    with pytest.raises(InputError, match=r"b_mask.nii.gz: does not exist or is not a file \(case 'b'"):
        evaluate_dir(folder, NeverCalled(), progress=False)
