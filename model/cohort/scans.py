"""What a cohort segments: `list_scans` finds the scans of a folder (image files and DICOM series
folders, searched recursively) or of a CSV (a `path` column; optional case_id, prompt), each a
`Scan` with its case id; `ScanOptions` are the segment options every scan gets.
"""

from __future__ import annotations

import csv
import io as _stdio
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import BoltzformerError, InputError, not_utf8, os_problem, shown_path, why_unnamed
from ..io import DICOM_EXTENSIONS, extension_of, has_dicom_preamble, INPUT_EXTENSIONS
from ..io.formats import read_table_bytes
from ..options import DEFAULT_MIN_LESION_MM3, DEFAULT_MIRROR, DEFAULT_PLANES


log = logging.getLogger(__name__)
# characters no file name may hold on Windows (a cohort's folder is often read there)
_CASE_ID_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


@dataclass(frozen=True)
class Scan:
    """One scan of the cohort. path: absolute; where: how the user listed it (for messages)."""

    case_id: str
    path: str
    prompt: str
    where: str = ""  # a CSV's "cases.csv: line 3"; empty for a folder's scans


@dataclass(frozen=True)
class ScanOptions:
    """The `segment` options applied to every scan; they decide the mask, so --resume compares them."""

    threshold: float = 0.5
    window: str | None = None
    modality: str | None = None  # None: detected per scan
    runs: int = 1
    seed: int = 0
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3
    fp_reduction: bool = True
    nodule_detector: bool = False  # lung nodule prompts on HU CT: the opt-in 3D nodule detector
    mirror: bool = DEFAULT_MIRROR  # each slice averaged with its left-right mirror image
    planes: str = DEFAULT_PLANES  # "axial", "three" or "auto" (boltzformer.planes)
    force_prompt: bool = False
    batch_size: int | None = None  # slices per batch (default: 8 CPU, 32 GPU); the draws follow it
    allow_gaps: bool = False
    device: str = "auto"

    def key(self) -> str:
        """A readable, stable description: the `options` column of report.csv. With the 3D
        filter on, it names the false-positive classifier's weights too (their sha256, first 12
        digits), the smallest nodule it keeps for nodule prompts and the MS lesion polarity rule
        (boltzformer.polarity_filter), and with the 3D nodule detector its weights: other weights
        or rules give other masks, so --resume must not skip."""
        from ..fp_classifier import bundled_sha256
        from ..fp_filter import MIN_NODULE_VOLUME_MM3
        from ..nodule_detector import DETECTOR_WEIGHTS_NAME

        fp = "off"
        if self.fp_reduction:
            digest = bundled_sha256()
            fp = (f"on:{digest[:12]}" if digest else "on") + f":nodule>={MIN_NODULE_VOLUME_MM3:.1f}mm3:ms_polarity"
            if self.nodule_detector:
                digest = bundled_sha256(DETECTOR_WEIGHTS_NAME)
                fp += f" nodule_detector={'on:' + digest[:12] if digest else 'on'}"
        return (f"threshold={self.threshold:g} window={self.window or 'auto'} modality={self.modality or 'auto'} "
                f"runs={self.runs} seed={self.seed} mirror={'on' if self.mirror else 'off'} planes={self.planes} "
                f"min_lesion_mm3={self.min_lesion_mm3:g} "
                f"fp_filter={fp} force_prompt={'yes' if self.force_prompt else 'no'} "
                f"batch_size={self.batch_size or 'auto'} allow_gaps={'yes' if self.allow_gaps else 'no'} "
                f"device={self.device}")


def list_scans(source, prompt: str | None, exclude: Iterable[str | os.PathLike] = (),
               warn: Callable[[str], None] | None = None) -> list[Scan]:
    """The scans named by ``source``: a folder (searched recursively) or a CSV file.

    Folder: every NIfTI/NRRD/MetaImage file and every folder holding DICOM files (one scan per
    folder: its largest series, as `segment` takes it); hidden entries and the folders in
    ``exclude`` (OUT_DIR) are skipped. The case id is the path below ``source`` without the
    extension, folders joined by '_' (``p01/ct.nii.gz`` -> ``p01_ct``).
    CSV: a ``path`` column (relative paths are relative to the CSV's folder), optional
    ``case_id`` (default: the file or folder name without extension) and ``prompt`` (default:
    ``prompt``). Raises InputError (exit 2) for anything that makes the list itself unusable;
    sub-folders that cannot be listed are skipped and passed to ``warn`` (default: logged).
    """
    src = Path(os.fspath(source))
    if not src.exists():
        raise InputError(src, "does not exist; give a folder of scans or a CSV file with a 'path' column")
    if src.is_dir():
        scans = _scans_in_folder(src, prompt, exclude, warn or log.warning)
    elif extension_of(src.name) == ".csv":
        scans = _scans_in_csv(src, prompt)
    else:
        raise InputError(src, "is neither a folder nor a .csv file; give a folder of scans or a CSV with a 'path' column")
    if not scans:
        raise InputError(src, "holds no scan (NIfTI, NRRD or MetaImage file, or a folder of DICOM files)" if src.is_dir()
                         else "lists no scan")
    return scans


def _image_stem(name: str) -> str:
    ext = extension_of(name)
    return name[: -len(ext)] if ext else name


def _scans_in_folder(root: Path, prompt: str | None, exclude, warn: Callable[[str], None]) -> list[Scan]:
    if not prompt:
        raise BoltzformerError("a folder of scans needs a prompt: -p \"lung nodule\"")
    excluded = {os.path.realpath(e) for e in exclude}
    found: list[tuple[Path, Path]] = []  # (scan path, path below root that names it)
    problems: list[str] = []

    def onerror(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot be listed ({os_problem(exc)})")

    visited: set[str] = set()  # real paths: a linked folder is followed once (archives link them; no loops)
    earlier: list[Path] = []
    for folder, dirs, files in os.walk(root, onerror=onerror, followlinks=True):
        here = Path(folder)
        visited.add(os.path.realpath(here))
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(here / d)
            if real in excluded or real in visited:
                continue
            if _holds_a_cohort(here / d):
                earlier.append(here / d)
                continue
            visited.add(real)
            kept.append(d)
        dirs[:] = kept
        files = sorted(f for f in files if not f.startswith("."))
        if any(_is_dicom_file(here / f) for f in files):
            found.append((here, here.relative_to(root) if here != root else Path(root.resolve().name)))
        for f in files:
            if extension_of(f) in INPUT_EXTENSIONS:
                found.append((here / f, (here / f).relative_to(root)))
    for line in problems:
        warn(f"{line}; its scans are left out")
    for folder in earlier:
        warn(f"{folder}: holds an earlier cohort's masks ({REPORT_FILE}); left out")
    unnamed = [path for path, _ in found if not_utf8(path)]  # no reader opens them; the report cannot hold them
    if unnamed:
        shown = ", ".join(shown_path(p) for p in unnamed[:4]) + (f" and {len(unnamed) - 4} more" if len(unnamed) > 4 else "")
        warn(f"{shown}: {'its name is' if len(unnamed) == 1 else 'their names are'} {why_unnamed(unnamed)}; left "
             f"out: rename {'it' if len(unnamed) == 1 else 'them'}")
    scans, seen = [], {}
    for path, rel in found:
        if not_utf8(path):
            continue
        parts = list(rel.parts)
        parts[-1] = _image_stem(parts[-1])
        case_id = "_".join(parts)
        if case_id.casefold() in seen:  # one mask file where names ignore case (macOS, Windows)
            raise InputError(root, f"{seen[case_id.casefold()]} and {path} both give case id '{case_id}'; list the "
                                   "scans in a CSV with a case_id column instead")
        seen[case_id.casefold()] = path
        scans.append(Scan(case_id, str(path.resolve()), prompt))
    return scans


REPORT_FILE = "report.csv"  # a cohort's report (cohort.run.REPORT_NAME)
_REPORT_HEADER = b"case_id,status,reason,"


def _holds_a_cohort(folder: Path) -> bool:
    """True for a folder a cohort wrote (its report.csv): its masks are outputs, not scans."""
    try:
        with open(folder / REPORT_FILE, "rb") as f:
            return f.read(len(_REPORT_HEADER)) == _REPORT_HEADER
    except OSError:
        return False


def input_stamp(path: str) -> str:
    """Size and modification time of a scan's file, or of a DICOM folder's files (count, total
    size, latest change): --resume redoes a scan whose file was replaced since it was recorded."""
    try:
        st = os.stat(path)
        if not os.path.isdir(path):
            return f"{st.st_size}:{st.st_mtime_ns}"
        count = size = latest = 0
        with os.scandir(path) as entries:
            for e in entries:
                if e.is_file() and not e.name.startswith("."):
                    est = e.stat()
                    count, size, latest = count + 1, size + est.st_size, max(latest, est.st_mtime_ns)
        return f"{count} files:{size}:{latest}"
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return ""  # unreadable now: the scan is redone and its reader says why


def _is_dicom_file(p: Path) -> bool:
    if p.name.upper() == "DICOMDIR":  # a media index beside the series folders, not an image
        return False
    ext = extension_of(p.name)
    if ext in DICOM_EXTENSIONS:
        return True
    if ext in INPUT_EXTENSIONS or ext in (".raw", ".zraw", ".csv", ".txt", ".json", ".md"):
        return False
    try:
        return p.is_file() and has_dicom_preamble(p)
    except OSError:
        return False


def _scans_in_csv(path: Path, prompt: str | None) -> list[Scan]:
    data = read_table_bytes(path)
    try:
        text = data.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(path, f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    try:
        reader = csv.DictReader(_stdio.StringIO(text, newline=""))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [(reader.line_num, r) for r in reader]  # line_num: right after blank lines and quoted line breaks
    except csv.Error as exc:
        raise InputError(path, f"is not a readable CSV table ({exc})") from None
    if "path" not in columns:
        raise InputError(path, f"needs a 'path' column (optional: case_id, prompt); columns found: {','.join(columns) or 'none'}")
    scans, seen = [], {}
    for n, raw in rows:
        row = {str(k).strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{path}: line {n}"
        if not any(row.values()):
            continue  # a blank line
        if not row.get("path"):
            raise InputError(path, f"line {n}: the path is empty")
        if "\x00" in row["path"]:
            raise InputError(path, f"line {n}: the path holds a NUL byte; no file can be named so")
        scan_path = Path(row["path"]).expanduser()
        if not scan_path.is_absolute():
            scan_path = path.parent / scan_path
        case_id = row.get("case_id") or _image_stem(scan_path.name.rstrip("/"))
        if _CASE_ID_FORBIDDEN.search(case_id) or case_id.startswith(".") or case_id.endswith((".", " ")) or not case_id:
            raise InputError(path, f"line {n}: case_id {case_id!r} cannot name a file (none of / \\ : * ? \" < > | "
                                   "or control characters, no leading '.', no trailing '.' or space)")
        if case_id.casefold() in seen:  # 'CT1' and 'ct1' are one file where names ignore case (macOS, Windows)
            first, line = seen[case_id.casefold()]
            raise InputError(path, f"line {n}: case_id '{case_id}' is also on line {line}"
                                   f"{f' (as {first!r}: file names may ignore case)' if first != case_id else ''}; "
                                   "each scan needs its own case_id")
        seen[case_id.casefold()] = (case_id, n)
        row_prompt = row.get("prompt") or prompt
        if not row_prompt:
            raise InputError(path, f"line {n}: no prompt in the row and no -p for the rows without one")
        scans.append(Scan(case_id, os.path.abspath(scan_path), row_prompt, where))
    return scans
