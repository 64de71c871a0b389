"""NIfTI specifics: the geometry rule (the sform when its code is > 0, else the qform, checked
against SimpleITK's reading, a voxel size of 0 repaired), and truncated or non-finite files
refused before SimpleITK reads them.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from .volume import LPS_TO_RAS, Volume, require_finite


_AXES = "xyz"


def apply_nifti_geometry(volume: Volume, p: Path) -> Volume:
    """``volume`` placed as the NIfTI standard says: sform if sform_code > 0, else qform.

    ITK prefers the qform when both are set (so a file whose sform differs from its qform came
    out where the qform put it) and drops the z position of a 2D file; nibabel, FSL and the
    standard use the sform. Also warns about voxel sizes of 0 (ITK silently uses 1 mm). An
    affine whose slice axis is tilted against the slice plane (gantry tilt) is straightened onto
    an orthogonal grid, as a tilted DICOM series is: the returned volume is then a new one.
    """
    try:
        header = load_nifti(p).header
    except Exception:  # noqa: BLE001 - nibabel cannot parse what ITK accepted: keep ITK's geometry
        return volume
    warnings: list[str] = []
    volume = _nifti_geometry(volume, p, header, warnings)
    if warnings:
        volume.metadata.setdefault("warnings", []).extend(warnings)
    return volume


def load_nifti(p: Path, keep_file_open: bool = False):
    """nibabel's image of NIfTI file `p`, its data not loaded. A header whose extensions nibabel
    cannot parse (a damaged extension size, which ITK passes over) is read without them, from
    its first 348 (NIfTI-2: 540) bytes: a failed load skipped the NaN check and the sform, and
    ITK read NaN as 0 and placed the scan by its qform, without a word."""
    import nibabel as nib

    try:
        with _nibabel_quiet():
            return nib.load(str(p), keep_file_open=keep_file_open)
    except Exception:  # noqa: BLE001 - retried without the extensions; raised again if that fails too
        raw = _raw_header(p)
        if raw is None:
            raise
    order, version, head = raw
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    with _nibabel_quiet():
        header = klass.header_class(binaryblock=head[:348 if version == 1 else 540], endianness=order, check=False)
        proxy = nib.arrayproxy.ArrayProxy(str(p), header, keep_file_open=keep_file_open)  # vox_offset, scaling, gzip
        return klass(proxy, None, header)


def nifti_version(p: Path) -> int | None:
    """1 or 2 (NIfTI-1 or NIfTI-2, by the header size the file starts with), None if neither."""
    raw = _raw_header(p)
    return None if raw is None else raw[1]


def read_nifti_by_nibabel(p: Path) -> Volume:
    """A NIfTI file ITK refuses to read, read by nibabel and placed by `apply_nifti_geometry`:
    a sheared sform and no qform ("orthonormal direction cosines"), or a NIfTI-2 file (ITK 5.4
    reads NIfTI-1 only; NIfTI-2 is what a volume over 32767 voxels along an axis, or some
    tools' defaults, give)."""
    try:
        with _nibabel_quiet():
            image = load_nifti(p)
            shape = tuple(int(v) for v in image.shape)
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            if len(shape) > 3:
                raise InputError(p, f"is {len(shape)}D ({' x '.join(map(str, shape[3:]))} beyond x, y, z); a single "
                                    "3D volume is needed")
            data = np.asanyarray(image.dataobj)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the one reader left: say it could not
        raise InputError(p, f"cannot be read as NIfTI ({type(exc).__name__})") from None
    if data.dtype.names or np.iscomplexobj(data):
        raise InputError(p, "has complex or multi-component voxels (RGB?); a real-valued greyscale volume is needed")
    data = data.reshape(shape + (1,) * (3 - len(shape)))
    if data.dtype == np.float64:  # a scaled integer file: float32, as ITK reads it
        data = data.astype(np.float32)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (z, y, x)
    return apply_nifti_geometry(Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), path=p), p)


def _nifti_geometry(volume: Volume, p: Path, header, warnings: list[str]) -> Volume:
    file_dims = int(header["dim"][0])
    spatial = min(max(file_dims, 1), 3)
    s_code, q_code = int(header["sform_code"]), int(header["qform_code"])
    if s_code > 0:
        affine, source = np.asarray(header.get_sform(), float), "sform"
    elif q_code > 0:
        affine, source = np.asarray(header.get_qform(), float), "qform"
    else:
        affine, source = None, "pixdim"
    if source != "sform":
        pixdim = _raw_pixdim(p)  # nibabel's header has already replaced zeros by 1
        pixdim = np.asarray(header["pixdim"][1:4] if pixdim is None else pixdim, float)
        zero = [_AXES[k] for k in range(spatial) if pixdim[k] == 0]
        nan = [_AXES[k] for k in range(spatial) if not np.isfinite(pixdim[k])]
        for axes, what in ((zero, "0"), (nan, "not a number")):
            if axes:
                warnings.append(f"{p}: voxel size (pixdim) along {', '.join(axes)} is {what}; 1 mm is assumed")
    if affine is None:  # neither transform is set (method 1): ITK's pixdim-only geometry, RAS by default
        volume.metadata["orientation_unknown"] = True
        warnings.append(f"{p}: says nothing of how it lies in the patient (qform_code and sform_code are 0); "
                        f"{volume.assumed_orientation()}")
        return volume
    if s_code > 0 and q_code > 0:
        qform = np.asarray(header.get_qform(), float)
        corners = np.array([[i, j, k, 1.0] for i in (0, max(volume.shape[2] - 1, 0)) for j in (0, max(volume.shape[1] - 1, 0))
                            for k in (0, max(volume.shape[0] - 1, 0))])
        apart = float(np.max(np.linalg.norm(((qform - affine) @ corners.T)[:3], axis=0)))
        if apart > 0.01:
            warnings.append(f"{p}: its qform and sform disagree (by up to {apart:.1f} mm); the sform is used "
                            f"(sform_code {s_code} > 0, as the NIfTI standard says)")
    matrix = LPS_TO_RAS @ affine[:3, :3]  # RAS -> LPS (the flip is its own inverse)
    origin = LPS_TO_RAS @ affine[:3, 3]
    spacing = np.linalg.norm(matrix, axis=0)
    itk_direction = volume.direction
    for k in range(3):
        if not (np.isfinite(spacing[k]) and spacing[k] > 0):  # pixdim 0 in a qform; already warned about
            matrix[:, k], spacing[k] = itk_direction[:, k], 1.0
    direction = matrix / spacing
    if not np.all(np.isfinite(direction)):
        raise InputError(p, f"its {source} is not a finite matrix; fix the header")
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        return _straightened(volume, p, source, matrix, origin, warnings)
    volume.spacing_mm = tuple(float(v) for v in spacing)
    volume.origin_mm = tuple(float(v) for v in origin)
    volume.direction = direction
    return volume


def _straightened(volume: Volume, p: Path, source: str, matrix_mm: np.ndarray, origin: np.ndarray,
                  warnings: list[str]) -> Volume:
    """A sheared affine (LPS, columns in mm per voxel step) whose slice axis leans out of the
    normal of orthogonal in-plane axes: a gantry tilt, straightened as a DICOM series is
    (tilt.straighten); any other shear is refused (ITK's nearest geometry put voxels elsewhere)."""
    from .tilt import straighten, straightened_note, tilt_of

    tilt = tilt_of(matrix_mm)
    if tilt is None:
        raise InputError(p, f"its {source} is sheared within the slice plane (not a rotation, voxel sizes and a "
                            "gantry tilt): its voxels cannot be placed on a grid without resampling it in 3D; "
                            "resample it onto an orthonormal grid first")
    direction, spacing, step_xy = tilt
    volume.spacing_mm = tuple(float(v) for v in spacing)
    volume.origin_mm = tuple(float(v) for v in origin)
    volume.direction = direction
    slices = volume.array.shape[0]
    drift = np.arange(slices)[:, None] * step_xy[None, :]  # (slices, 2) mm
    if float(np.hypot(*drift[-1])) < 0.05 * min(spacing[:2]):  # under a twentieth of a pixel: nothing to move
        return volume
    warnings.append(f"{p}: its {source} is sheared {straightened_note(drift, (slices - 1) * spacing[2])}")
    return straighten(volume, drift)


def _raw_header(p: Path) -> tuple[str, int, bytes] | None:
    """(byte order '<' or '>', 1 or 2 for NIfTI-1 or -2, the header's bytes) as stored, or None."""
    import gzip

    try:
        with (gzip.open if p.name.lower().endswith(".gz") else open)(p, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            return order, 1, head
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            return order, 2, head
    return None


def _raw_expected_size(p: Path) -> int | None:
    """vox_offset + the voxel bytes a NIfTI-1/-2 header promises, read from its raw fields; None
    when they do not make sense (ITK then decides)."""
    raw = _raw_header(p)
    if raw is None:
        return None
    order, version, head = raw
    if version == 1:
        dim = struct.unpack(order + "8h", head[40:56])
        bitpix, offset = struct.unpack(order + "h", head[72:74])[0], struct.unpack(order + "f", head[108:112])[0]
    else:
        bitpix = struct.unpack(order + "h", head[14:16])[0]
        dim, offset = struct.unpack(order + "8q", head[16:80]), struct.unpack(order + "q", head[168:176])[0]
    if not 1 <= dim[0] <= 7 or bitpix <= 0 or not np.isfinite(offset) or offset < 0:
        return None
    return int(offset) + int(np.prod([max(d, 1) for d in dim[1:dim[0] + 1]], dtype=np.float64)) * bitpix // 8


def _raw_pixdim(p: Path) -> np.ndarray | None:
    """pixdim[1:4] as stored in a NIfTI-1/-2 header (nibabel turns zeros into 1 as it loads)."""
    raw = _raw_header(p)
    if raw is None:
        return None
    order, version, head = raw
    if version == 1:
        return np.array(struct.unpack(order + "8f", head[76:108])[1:4], float)
    return np.array(struct.unpack(order + "8d", head[104:168])[1:4], float)


@contextlib.contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Keep nibabel from logging the header fixes it makes as it loads a file ('pixdim[1,2,3]
    should be non-zero; setting 0 dims to 1') to stderr: messages here are one line, our own."""
    import logging

    import nibabel.imageglobals as nib_globals

    level = nib_globals.logger.level
    nib_globals.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        nib_globals.logger.setLevel(level)


def check_nifti_complete(p: Path) -> None:
    """Raise InputError when a NIfTI file is cut short (ITK would silently read it as zeros).

    For .nii.gz the gzip trailer (uncompressed size mod 2**32) is compared with the size the
    header promises; only when they differ is the whole stream inflated to check it.
    """
    try:
        image = load_nifti(p)
        # the data offset of the file (the loaded header's own get_data_offset() is reset to 0)
        offset = int(getattr(image.dataobj, "offset", image.header["vox_offset"]))
        header = image.header
        shape = tuple(int(v) for v in header.get_data_shape())
        expected = offset + int(np.prod(shape)) * header.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 - nibabel cannot parse what ITK accepted (a damaged extension...):
        shape, expected = (), _raw_expected_size(p)  # the size its raw header promises
    if 0 in shape:  # ITK reads a 0 as 1: one slice of a volume, silently
        axis = "xyzt"[shape.index(0)] if shape.index(0) < 4 else f"dimension {shape.index(0) + 1}"
        raise InputError(p, f"its header gives {' x '.join(map(str, shape))} voxels, none along {axis} "
                            "(dim = 0); the header is corrupt")
    if p.name.lower().endswith(".gz"):
        if expected is not None:
            with open(p, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
                    return
        actual = _gzip_payload_size(p)
        if actual is None:
            raise InputError(p, "is truncated or corrupt: its gzip stream ends early or is damaged")
    else:
        actual = p.stat().st_size
    if expected is not None and actual < expected:
        raise InputError(p, f"is truncated: the header promises {expected} bytes, the file holds {actual}")


_FINITE_SLAB_BYTES = 64 << 20  # float voxels checked this many bytes at a time


def check_nifti_finite(p: Path) -> None:
    """Float NIfTI voxels must be finite (ITK's reader turns NaN into 0 without a word). Read in
    slabs of slices, one file handle going forward: the whole volume loaded here, then again by
    the reader, doubled the peak memory."""
    try:
        with _nibabel_quiet():
            img = load_nifti(p, keep_file_open=True)
            if np.dtype(img.get_data_dtype()).kind != "f":
                return
            proxy = img.dataobj
            shape = tuple(int(v) for v in proxy.shape)
            if len(shape) < 3:
                require_finite(np.asarray(proxy), p)
                return
            per_slice = int(np.prod(shape[:2] + shape[3:])) * np.dtype(img.get_data_dtype()).itemsize
            step = max(1, _FINITE_SLAB_BYTES // max(per_slice, 1))
            bad = 0
            for k in range(0, shape[2], step):
                slab = np.asarray(proxy[:, :, k:k + step])
                if not (np.isfinite(np.min(slab)) and np.isfinite(np.max(slab))):
                    bad += slab.size - int(np.count_nonzero(np.isfinite(slab)))
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - nibabel is stricter than ITK about some headers; ITK decides
        return
    if bad:
        raise InputError(p, f"has {bad} NaN or infinite voxels (of {int(np.prod(shape))}); fix or mask them first")


class GzipCheck:
    """A .nii.gz file's gzip stream inflated and its checksums (CRC-32 and size of each member)
    verified on a thread of its own while ITK reads the file: ITK took a damaged deflate stream
    or a wrong CRC as data (garbage or zeros) without a word. zlib lets go of the GIL, so on two
    cores the check costs little wall time (1.1 s of CPU for a 150 MB CT)."""

    def __init__(self, p: Path):
        self._size: int | None = None
        self._thread = threading.Thread(target=self._run, args=(p,), name="gzip-check", daemon=True)
        self._thread.start()

    def _run(self, p: Path) -> None:
        try:
            self._size = _gzip_payload_size(p)
        except OSError:
            self._size = None

    def intact(self) -> bool:
        """Wait for the check; whether every member inflated and matched its checksums."""
        self._thread.join()
        return self._size is not None


_INFLATE_STEP = 1 << 24  # bytes inflated per call: a gzip bomb's 1 MB of zeros is 1 GB inflated at once


def _gzip_payload_size(p: Path) -> int | None:
    """Uncompressed size of a (possibly multi-member) gzip file; None when it is cut short or corrupt
    (zlib checks each member's CRC-32 and size as it ends). Memory stays bounded (_INFLATE_STEP)."""
    size, inflater, in_member = 0, zlib.decompressobj(wbits=31), False
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                if not in_member and not chunk.strip(b"\0"):
                    break  # zero padding after the last member, as gzip tolerates
                in_member = True
                try:
                    size += len(inflater.decompress(chunk, _INFLATE_STEP))
                    while inflater.unconsumed_tail and not inflater.eof:
                        size += len(inflater.decompress(inflater.unconsumed_tail, _INFLATE_STEP))
                except zlib.error:
                    return None
                if inflater.eof:  # a member ended; what follows starts the next one
                    chunk = inflater.unused_data
                    inflater, in_member = zlib.decompressobj(wbits=31), False
                else:
                    chunk = b""
    return None if in_member else size
