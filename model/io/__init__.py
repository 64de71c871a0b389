"""Reading and writing image volumes with their geometry.

A :class:`Volume` is a numpy array in **(z, y, x)** order plus the ITK/DICOM geometry that places
it in the patient: ``spacing_mm`` and ``origin_mm`` in **(x, y, z)** order, LPS world coordinates,
and the 3×3 ITK ``direction`` matrix whose columns are the image axes x, y, z in world
coordinates. A voxel with index (i=x, j=y, k=z) sits at::

    world_lps_mm = origin_mm + direction @ (spacing_mm * (i, j, k))

Readers: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) through SimpleITK,
DICOM series folders (SimpleITK/GDCM; Rescale Slope/Intercept are applied so CT comes out in
Hounsfield units) and single DICOM files. NIfTI geometry follows the NIfTI rule (the sform when
its code is > 0, else the qform); the slice positions of a DICOM series are checked along the
slice normal (gaps, uneven steps, duplicates, odd or unreadable files are errors unless
``allow_gaps`` resamples gaps and uneven steps onto a uniform grid). A single slice keeps its
3D position and thickness. Problems that do not stop reading are one-line strings in
``Volume.metadata["warnings"]``.

Writers: .nii.gz, .nii, .nrrd, .mha, through :class:`OutputSet` (one or several files that are
committed together): each file goes to a hidden temporary file in its folder, is flushed,
fsynced and checked (size, header read back), and only then renamed over the target; a failure
(a full disk included) or SIGINT/SIGTERM during the renames restores what was there before.

Everything a user can get wrong raises :class:`~boltzformer.errors.InputError` or
:class:`~boltzformer.errors.OutputError` with a one-line ``"<path>: <problem>"`` message.

Modules: `volume` (Volume and its geometry), `formats` (extensions, the DICOM preamble), `read`
(read_volume), `nifti` and `dicom` (their readers' rules), `tilt` (a gantry-tilted stack
straightened, for both), `itk` (SimpleITK's warnings and errors), `output` (checked, atomic
writes).
"""

from .dicom import SeriesInfo, list_dicom_series
from .formats import (DICOM_EXTENSIONS, INPUT_EXTENSIONS, INPUT_FORMATS, OUTPUT_EXTENSIONS, extension_of,
                      has_dicom_preamble)
from .output import OutputSet, atomic_output, check_output_path, write_text, write_volume
from .read import read_volume
from .volume import Volume, require_finite

__all__ = [
    "Volume",
    "require_finite",
    "SeriesInfo",
    "OutputSet",
    "read_volume",
    "write_volume",
    "write_text",
    "list_dicom_series",
    "check_output_path",
    "atomic_output",
    "has_dicom_preamble",
    "extension_of",
    "INPUT_FORMATS",
    "INPUT_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "OUTPUT_EXTENSIONS",
]
