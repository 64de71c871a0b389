"""Intensities for the network: CT windows, window choice from a prompt, MRI normalisation.

The network sees float32 slices in [0, 1]. For CT in Hounsfield units (HU) that is a display
window (clip to [center - width/2, center + width/2], scale to [0, 1]) chosen from the prompt;
for MRI, whose intensities have no absolute scale, it is a percentile normalisation.
Pure numpy; written to handle a 300×512×512 volume in well under a second per step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import BoltzformerError

__all__ = [
    "AERATED_HU", "Window", "WINDOWS", "DEFAULT_WINDOW", "window_for_prompt", "check_window", "apply_window", "normalise_modality", "detect_modality", "classify_units",
    "prepare_slices",
]


@dataclass(frozen=True)
class Window:
    """A CT display window in Hounsfield units."""

    center_hu: float
    width_hu: float

    @property
    def lower_hu(self) -> float:
        return self.center_hu - self.width_hu / 2

    @property
    def upper_hu(self) -> float:
        return self.center_hu + self.width_hu / 2


WINDOWS: dict[str, Window] = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "soft_tissue": Window(40, 400),
    "liver": Window(60, 160),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
}
DEFAULT_WINDOW = "soft_tissue"

# Prompt keyword → window, first match wins. Organ words come before the generic "nodule" so that
# "liver nodule" gets a soft-tissue window while "nodule" alone means a lung nodule. Liver lesions
# use the soft-tissue window (wider than "liver", so lesions with a different density stay visible).
_PROMPT_RULES: list[tuple[str, str]] = [
    (r"lung|pulmon|airway|bronch", "lung"),
    (r"liver|hepat", "soft_tissue"),
    (r"kidney|renal|spleen|splenic|pancrea|abdom|adrenal", "soft_tissue"),
    (r"bone|\bosse|vertebra|\bribs?\b|spine|spinal|skelet", "bone"),
    (r"heart|cardi|aort|vena\s*cava|mediastin|lymph", "mediastinum"),
    (r"brain|cerebr|intracranial|ha?emorrh", "brain"),
    (r"nodul", "lung"),
]
_PROMPT_PATTERNS = [(re.compile(pattern, re.IGNORECASE), name) for pattern, name in _PROMPT_RULES]

_SAMPLE_VOXELS = 1_000_000  # statistics are computed on a strided subsample of about this size


def window_for_prompt(prompt: str) -> str:
    """Name of the CT window suited to a text prompt (a key of WINDOWS; default soft_tissue).

    Rules, first match wins: lung/pulmonary/airway/bronch → lung; liver/hepatic and
    kidney/renal/spleen/pancreas/abdomen/adrenal → soft_tissue; bone/vertebra/rib/spine/skeleton
    → bone; heart/aorta/vena cava/mediastinum/lymph → mediastinum; brain/cerebral/intracranial/
    hemorrhage → brain; nodule (no organ named) → lung.
    """
    for pattern, name in _PROMPT_PATTERNS:
        if pattern.search(prompt or ""):
            return name
    return DEFAULT_WINDOW


def check_window(name: str) -> None:
    """Raise BoltzformerError unless ``name`` is a key of WINDOWS."""
    if name not in WINDOWS:
        raise BoltzformerError(f"unknown CT window {name!r}; choose one of {', '.join(WINDOWS)}")


def apply_window(hu: np.ndarray, window: Window) -> np.ndarray:
    """float32 in [0, 1], same shape: Hounsfield units clipped to the window and scaled."""
    return _rescale(hu, window.lower_hu, window.upper_hu)


def normalise_modality(name) -> str:
    """A modality name in upper case with "MRI" spelt "MR" (DICOM's term); "" for None."""
    name = str(name or "").upper()
    return "MR" if name == "MRI" else name


def stated_modality(volume) -> str | None:
    """"CT" or "MR" when the file says so (``volume.modality`` or a DICOM ``Modality``), else None."""
    for value in (volume.modality, volume.metadata.get("Modality")):
        value = normalise_modality(value)
        if value in ("CT", "MR"):
            return value
    return None


# A label map (a mask or a segmentation's labels) holds few small non-negative integers, mostly 0
MAX_LABEL_VALUE = 255
MAX_LABELS = 64


def looks_like_label_map(array: np.ndarray) -> bool:
    """True for a mask or label map, not a scan: integers in [0, MAX_LABEL_VALUE], at most
    MAX_LABELS distinct non-zero values and at least half the voxels 0 (an empty mask included).
    A CT in HU has negative values; an 8-bit image has hundreds of grey levels."""
    if array.size == 0 or array.dtype.kind not in "iub":
        return False
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > MAX_LABEL_VALUE:
        return False
    counts = np.bincount(array.ravel().astype(np.uint8, copy=False), minlength=1)
    return int(np.count_nonzero(counts[1:])) <= MAX_LABELS and counts[0] >= 0.5 * array.size


def detect_modality(volume) -> str:
    """"CT" or "MR" for a :class:`~boltzformer.io.Volume`.

    The DICOM modality (``volume.modality`` or ``metadata["Modality"]``) wins when known.
    Otherwise a heuristic on a subsample of the values: CT in HU has air at about -1000, so the
    volume is called CT when at least 5 % of voxels lie in [-1100, -900], or when its minimum
    is ≤ -500 and the values are integers (CT is stored as integers; MRI is never that
    negative), or when it looks like CT stored as HU + 1024 (see `shifted_hu_offset`).
    Everything else is MR.
    """
    stated = stated_modality(volume)
    if stated:
        return stated
    sample = _subsample(volume.array).astype(np.float32, copy=False)
    if sample.size == 0:
        return "MR"
    near_air = np.count_nonzero((sample >= -1100) & (sample <= -900)) / sample.size
    if near_air >= 0.05 or shifted_hu_offset(sample):
        return "CT"
    if float(sample.min()) <= -500 and _integer_valued(sample):
        return "CT"
    return "MR"


# MR weighting from a series description or a BIDS file-name suffix (sub-01_FLAIR.nii.gz,
# sub-01_T1w.nii.gz). FLAIR before T2 ("t2_tirm_tra_dark-fluid" is a FLAIR), T1 before FLAIR
# ("T1 FLAIR" is T1-weighted), T2* apart from T2.
_SEQUENCE_PATTERNS = (
    ("T1", re.compile(r"t1(?!\d)|mp-?2?rage|spgr|bravo", re.I)),
    ("FLAIR", re.compile(r"flair|tirm|dark.?fluid", re.I)),
    ("T2*", re.compile(r"t2\*|t2star|(?<![a-z])(swi|gre)(?![a-z])", re.I)),
    ("T2", re.compile(r"t2(?!\d)", re.I)),
    ("PD", re.compile(r"(?<![a-z])pdw?(?![a-z])|proton.?density", re.I)),
)
_BIDS_SUFFIX = re.compile(r"_(T1w|T2w|FLAIR|PDw|T2starw)\.(nii(\.gz)?|nrrd|mha)$", re.I)


def mr_sequence(volume) -> str | None:
    """"T1", "FLAIR", "T2*", "T2" or "PD" when the file says which weighting an MR series has
    (its DICOM series description or sequence name, else a BIDS suffix of its file name), else
    None: a NIfTI file that does not say it."""
    return stated_mr_sequence(volume)[0]


def stated_mr_sequence(volume) -> tuple[str | None, str | None]:
    """(weighting as `mr_sequence` gives it, the words of the file that say it), or (None, None)."""
    description = volume.sequence()
    name = str(volume.path or "").replace("\\", "/").rsplit("/", 1)[-1]
    suffix = _BIDS_SUFFIX.search(name)
    # (the words matched, the words shown to the user)
    sources = ([(description, description)] if description else []) + ([(suffix.group(1), name)] if suffix else [])
    for text, said in sources:
        for weighting, pattern in _SEQUENCE_PATTERNS:
            if pattern.search(text):
                return weighting, said
    return None, None


AERATED_HU = -400.0  # lung parenchyma (about -850) and air are below; soft tissue is above
SHIFTED_HU_OFFSET = 1024


def shifted_hu_offset(array: np.ndarray) -> int:
    """1024 when a CT looks stored as HU + 1024 (unsigned, no rescale intercept), else 0.

    The signature: non-negative integers; air at 0..~100 (HU -1024..-924) on at least 5 % of
    the voxels; and a soft-tissue peak (fat or muscle) whose mode lies at 874..1100 (HU -150..76),
    with most (60 %) of the values between 800 and 1300 within HU -150..100. MR has no air peak at
    zero with its tissue packed right below and above 1024. (Fat can outweigh muscle: the mode of
    the 3D phantom chest is fat, HU -79; the rule before 2026-11-27 wanted it at HU -24..76.)
    """
    sample = _subsample(np.asarray(array))
    if sample.size == 0 or not _integer_valued(sample) or float(sample.min()) < 0:
        return 0
    sample = sample.astype(np.float32, copy=False)
    if np.count_nonzero(sample < 100) / sample.size < 0.05:
        return 0
    tissue = sample[(sample >= 800) & (sample < 1300)]
    if tissue.size < 0.1 * sample.size:
        return 0
    counts, edges = np.histogram(tissue, bins=50, range=(800, 1300))
    mode = edges[int(np.argmax(counts))] + 5
    soft = np.count_nonzero((tissue >= 874) & (tissue < 1124)) / tissue.size  # HU -150..100
    return SHIFTED_HU_OFFSET if 874 <= mode <= 1100 and soft >= 0.6 else 0


def classify_units(array: np.ndarray) -> str:
    """What the values of a CT array look like.

    - "HU": Hounsfield units: minimum below -200 (only HU go that negative), or maximum above
      1500 with integer values (dense bone / metal in a stored CT).
    - "normalized": all values in [0, 1] (± 1e-3).
    - "8bit": integer values within 0..255 (an exported screenshot or PNG stack).
    - "raw": anything else.

    Min and max use every voxel; the integer test uses a subsample.
    """
    if array.size == 0:
        return "raw"
    lo, hi = float(np.min(array)), float(np.max(array))
    integer = _integer_valued(_subsample(array))
    if lo < -200 or (hi > 1500 and integer):
        return "HU"
    if lo >= -1e-3 and hi <= 1 + 1e-3:
        return "normalized"
    if integer and lo >= 0 and hi <= 255:
        return "8bit"
    return "raw"


def prepare_slices(
    array: np.ndarray, *, modality: str, window: "str | Window | None" = None, prompt: str | None = None,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Network input: float32 in [0, 1], same shape as ``array`` ((z, y, x) or (y, x)).

    Args:
        array: voxel values, any numeric dtype.
        modality: "CT" or "MR" ("MRI" accepted).
        window: CT window name (key of WINDOWS) or a Window; default: from ``prompt``, else
            soft_tissue.
        prompt: the text prompt, used to pick the CT window when ``window`` is None.
        reference: the whole volume when ``array`` is some of its slices: the units and the
            percentiles are read from it, so a slice gets the values it gets in the whole
            volume (MR is normalised per volume, as in training). Default: ``array``.

    Returns:
        (prepared, info) with info ``{"window": name or None, "units": classify_units result,
        "warnings": [str, ...]}``.

    CT in HU is windowed. CT whose values are not HU is rescaled instead, with a warning:
    8-bit values / 255, normalised values as they are, anything else by percentiles 0.5–99.5.

    MR is normalised per volume (not per slice): 0.5th percentile → 0, 99.5th → 1, clipped,
    percentiles taken over voxels above the 1st percentile (i.e. without the background).
    MRI has no absolute intensity scale (it depends on scanner, coil, sequence and gain), so
    a fixed window cannot work; one normalisation for the whole volume keeps the contrast
    between slices consistent, so a lesion looks the same on every slice and slices with
    little tissue are not stretched into noise.
    """
    modality = normalise_modality(modality)
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    array = np.asarray(array)
    reference = array if reference is None else np.asarray(reference)
    units = classify_units(reference)
    info: dict = {"window": None, "units": units, "warnings": []}

    if modality == "MR":
        if window is not None:  # checked all the same: a misspelt name is a mistake on any scan
            if not isinstance(window, Window):
                check_window(window)
            info["warnings"].append(f"the CT window {_window_words(window)} is not applied: MR has no "
                                    "Hounsfield units and is normalised per volume")
        lo, hi = _percentile_range(reference, foreground=True)
        return _rescale(array, lo, hi), info

    if units == "HU":
        if window is None:
            window = window_for_prompt(prompt) if prompt else DEFAULT_WINDOW
        if isinstance(window, Window):
            win, info["window"] = window, _window_words(window)
        else:
            check_window(window)
            win, info["window"] = WINDOWS[window], window
        return apply_window(array, win), info

    described = {
        "8bit": "8-bit grey levels (0-255)",
        "normalized": "normalised intensities (0-1)",
        "raw": f"raw intensities ({float(np.min(reference)):g} to {float(np.max(reference)):g})",
    }[units]
    ignored = f"; the requested window {_window_words(window)} is not applied" if window is not None else ""
    info["warnings"].append(
        f"values look like {described}, not Hounsfield units; windowing is skipped and intensities are rescaled{ignored}"
    )
    if units == "8bit":
        return _rescale(array, 0.0, 255.0), info
    if units == "normalized":
        return _rescale(array, 0.0, 1.0), info
    lo, hi = _percentile_range(reference, foreground=False)
    return _rescale(array, lo, hi), info


def _window_words(window: "str | Window") -> str:
    """'lung' -> "'lung'"; Window(40, 400) -> 'custom (center 40 HU, width 400 HU)'."""
    if isinstance(window, Window):
        return f"custom (center {window.center_hu:g} HU, width {window.width_hu:g} HU)"
    return repr(window)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def display_range(array: np.ndarray, *, foreground: bool = True) -> tuple[float, float]:
    """Contrast limits for showing MR (or non-HU CT): the same percentiles the network's
    normalisation uses, so what a viewer shows matches what the model sees."""
    lo, hi = _percentile_range(np.asarray(array), foreground=foreground)
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def _subsample(array: np.ndarray, n: int = _SAMPLE_VOXELS) -> np.ndarray:
    """About ``n`` voxels of ``array`` taken at a regular (odd) stride; a view when possible."""
    flat = array.reshape(-1)
    step = max(1, flat.size // n)
    if step > 1:
        step |= 1  # an odd stride does not keep hitting the same image columns
    return flat[::step]


def _integer_valued(sample: np.ndarray) -> bool:
    if sample.dtype.kind in "iub":
        return True
    return bool(np.all(sample == np.round(sample)))


def _percentile_range(array: np.ndarray, *, foreground: bool) -> tuple[float, float]:
    """(0.5th, 99.5th) percentiles of a subsample; with ``foreground``, of voxels above the 1st."""
    sample = _subsample(array).astype(np.float32)
    if foreground:
        above = sample[sample > np.percentile(sample, 1.0)]
        if above.size:
            sample = above
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(hi)


def _rescale(array: np.ndarray, lo: float, hi: float, chunk_voxels: int = 1 << 20) -> np.ndarray:
    """float32 (array - lo) / (hi - lo) clipped to [0, 1]; all zeros when hi <= lo.

    Works in chunks of slices so the temporaries stay in cache and no float64 copy is made.
    """
    out = np.empty(array.shape, dtype=np.float32)
    if hi <= lo:
        out.fill(0.0)
        return out
    scale = np.float32(1.0 / (hi - lo))
    offset = np.float32(lo)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, chunk_voxels):
        part = flat_out[start:start + chunk_voxels]
        np.subtract(flat_in[start:start + chunk_voxels], offset, out=part, dtype=np.float32, casting="unsafe")
        np.multiply(part, scale, out=part)
        np.clip(part, 0.0, 1.0, out=part)
    return out
