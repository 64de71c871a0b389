"""Writing: `write_volume`, `atomic_output` and `OutputSet` (several files committed together).
Each file goes to a hidden temporary file in its folder, is flushed, fsynced and checked (size,
header read back), and only then renamed over the target; a failure (a full disk included) or
SIGINT/SIGTERM during the renames restores what was there before.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from ..errors import (ITK_ASCII_ONLY, InputError, itk_cannot_name, not_utf8, os_problem, OutputError, why_unnamed,
                      windows_path_too_long)
from .formats import extension_of, file_kind, OUTPUT_EXTENSIONS
from .itk import detail, itk_quiet
from .nifti import check_nifti_complete
from .volume import Volume


def write_volume(volume: Volume, path, *, overwrite: bool = False) -> Path:
    """Write ``volume`` atomically; the format follows the extension (.nii.gz, .nii, .nrrd, .mha).

    Geometry (shape, spacing, origin, direction) is preserved exactly (NIfTI: qform and sform
    both hold it); a volume read from a 2D file is written as a 2D image when that loses no
    geometry. NRRD and MetaImage are zlib-compressed. The file is checked before it replaces
    anything (see :class:`OutputSet`); to write several files all-or-nothing, use an OutputSet.

    Raises:
        OutputError: unsupported extension, existing file without ``overwrite``, missing or
            read-only folder, or a write failure such as a full disk (no partial file is left
            behind and an existing file is untouched).
    """
    p = Path(os.fspath(path))
    with OutputSet(overwrite=overwrite) as outputs:
        outputs.add(p, kind="volume")
        outputs.write_volume(p, volume)
    return p


MAX_NAME_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems
TEMPORARY_NAME_BYTES = 24  # what ".<name>.tmp-<8 hex>" adds to a name (plus its extension again)


def check_output_path(path, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written; returns it as a Path.

    Raises OutputError when it exists (and ``overwrite`` is False) — a symbolic link counts,
    even one whose target is missing —, is a folder, a FIFO, device or other non-regular file
    (never replaced), or its folder is missing or not writable.
    """
    p = Path(os.fspath(path))
    if not_utf8(p):
        raise OutputError(p, f"its name is {why_unnamed([p])}, which the image writers cannot write; give another name")
    if itk_cannot_name(p.absolute()) and extension_of(p.name) in OUTPUT_EXTENSIONS:
        raise OutputError(p, f"its path {ITK_ASCII_ONLY}")
    if (too_long := windows_path_too_long(p.absolute(), spare=TEMPORARY_NAME_BYTES)):
        raise OutputError(p, too_long)
    name_bytes = len(os.fsencode(p.name))
    if name_bytes > MAX_NAME_BYTES - TEMPORARY_NAME_BYTES:  # checked now, not after the whole run
        raise OutputError(p, f"its name is {name_bytes} bytes long; file systems allow {MAX_NAME_BYTES}, less "
                             f"{TEMPORARY_NAME_BYTES} for the temporary file written first: shorten it")
    if p.is_dir():
        raise OutputError(p, "is a folder; give a file name")
    parent = p.parent
    if not parent.exists():
        raise OutputError(p, f"folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(p, f"{parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(p, f"folder {parent} is not writable")
    if p.exists() and not p.is_file():
        raise OutputError(p, f"is {file_kind(p)}, not a regular file; give another output name")
    if p.is_symlink() and not p.exists() and not overwrite:
        raise OutputError(p, f"exists as a symbolic link to {os.readlink(p)}, which is missing; "
                             "pass --overwrite to replace the link")
    if p.exists() and not overwrite:
        raise OutputError(p, "exists; pass --overwrite (overwrite=True in Python) to replace it")
    return p


_KINDS = {  # kind -> (allowed extensions, what the file is)
    "volume": (OUTPUT_EXTENSIONS, "an image"),
    "table": ((".csv", ".json"), "a lesion table"),
    "npz": ((".npz",), "attention maps"),
    "json": ((".json",), "JSON"),
    "csv": ((".csv",), "a CSV table"),
}


@dataclass
class _Output:
    path: Path
    option: str  # how the user named it ("-o", "--probabilities"); the path itself for library calls
    kind: str | None
    tmp: Path | None = None
    backup: Path | None = None  # the replaced file, kept until the whole set is committed
    placed: bool = False  # renamed into place during commit


class OutputSet:
    """The output files of one run, committed together: afterwards all of them exist, or none.

    1. :meth:`add` every output before the work starts. It checks the extension (``kind``), the
       folder, an existing file (refused without ``overwrite``; a dangling symbolic link counts),
       a FIFO/device (never replaced) and two outputs naming the same file (the message names
       both options).
    2. :meth:`write_volume`, :meth:`write_bytes` or :meth:`temporary` write each output to a
       hidden temporary file in its folder, ``.<name>.tmp-<random><extension>``. Every file is
       flushed and fsynced and then checked: not empty, image headers read back with the right
       size, the data complete (NIfTI/NRRD gzip trailers, MetaImage compressed size). A failed
       write (a full disk: "no space left on device") is an OutputError naming the file.
    3. :meth:`commit` renames them all over their targets. A replaced file is kept (hard link)
       until every rename succeeded; if one fails, or SIGINT/SIGTERM arrives meanwhile, the
       outputs already renamed are taken back and the previous files restored.

    As a context manager, leaving the block normally commits and an exception (KeyboardInterrupt
    included) removes every temporary file::

        with OutputSet(overwrite=args.overwrite) as outputs:
            outputs.add(args.output, "-o", kind="volume")
            outputs.add(args.lesions, "--lesions", kind="table")
            ...  # the long work
            outputs.write_volume("-o", mask)
            outputs.write_bytes("--lesions", text.encode())
    """

    def __init__(self, overwrite: bool = False):
        self.overwrite = bool(overwrite)
        self._outputs: dict[str, _Output] = {}
        self.state = "open"  # open | committed | discarded

    # -- 1. naming -----------------------------------------------------------------------------
    def add(self, path, option: str | None = None, kind: str | None = None) -> Path:
        """Check ``path`` now and reserve it; returns it as a Path. ``option`` names it in
        messages and is the key for the write methods (default: the path itself)."""
        p = Path(os.fspath(path))
        key = option or str(p)
        if key in self._outputs:
            raise ValueError(f"{key} added twice")
        if kind is not None:
            extensions, what = _KINDS[kind]
            ext = extension_of(p.name)
            if ext not in extensions:
                named = f"{option} is {what}" if option else f"{what} is written"
                has = f"'{ext}'" if ext else "no extension"
                if kind == "volume":
                    raise OutputError(p, f"unsupported output format ({has}); {named}: use one of {', '.join(extensions)}")
                raise OutputError(p, f"unsupported output format ({has}); {named}: use {' or '.join(extensions)}")
        check_output_path(p, self.overwrite)
        for other in self._outputs.values():
            if same_file(other.path, p):
                raise OutputError(p, f"named by both {other.option} and {key}; give each output its own file")
        self._outputs[key] = _Output(p, key, kind)
        return p

    def path(self, option: str) -> Path:
        return self._output(option).path

    def __contains__(self, option: str) -> bool:
        return option in self._outputs

    def _output(self, option) -> _Output:
        key = option if isinstance(option, str) and option in self._outputs else str(os.fspath(option))
        if key not in self._outputs:
            raise KeyError(f"{option} was not added to this OutputSet")
        if self.state != "open":
            raise RuntimeError(f"this OutputSet is already {self.state}")
        return self._outputs[key]

    # -- 2. writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def temporary(self, option) -> Iterator[Path]:
        """Yields the temporary path for any writer; the file is then fsynced and checked.

        OSErrors (a full disk...) become OutputError naming the output; any exception removes
        the temporary file.
        """
        out = self._output(option)
        tmp = self._new_temporary(out)
        try:
            try:
                yield tmp
                if not tmp.exists():
                    raise OutputError(out.path, "nothing was written")
                _fsync_file(tmp)
                if tmp.stat().st_size == 0:
                    raise OutputError(out.path, f"could not be written: {_why_short(tmp, 'the file is empty')}")
            except OSError as exc:
                raise OutputError(out.path, f"could not be written: {os_problem(exc)}") from None
        except BaseException:
            _remove(tmp)
            out.tmp = None
            raise

    def write_bytes(self, option, data: bytes) -> None:
        """Write ``data`` (a table, JSON) to the output's temporary file, checked."""
        with self.temporary(option) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if tmp.stat().st_size != len(data):
                raise OutputError(self._output(option).path, "could not be written: " + _why_short(
                    tmp, f"{tmp.stat().st_size} of {len(data)} bytes reached the disk"))

    def write_volume(self, option, volume: Volume) -> None:
        """Write ``volume`` in the output's format (by extension) to its temporary file, checked."""
        out = self._output(option)
        ext = extension_of(out.path.name)
        if ext not in OUTPUT_EXTENSIONS:
            raise OutputError(out.path, f"unsupported output format; use one of {', '.join(OUTPUT_EXTENSIONS)}")
        image = volume.to_sitk()
        with self.temporary(option) as tmp:
            try:
                with _c_stderr_hidden():  # the NIfTI library prints "** ERROR: NWAD ..." itself
                    sitk.WriteImage(image, str(tmp), useCompression=ext in (".nrrd", ".mha"))
            except RuntimeError as exc:
                problem = _why_short(tmp, "") if tmp.exists() else ""
                raise OutputError(out.path, f"could not be written{': ' + problem if problem else detail(exc)}") from None
            _fsync_file(tmp)
            problem = _check_image_file(tmp, ext, image)
            if problem:
                raise OutputError(out.path, f"could not be written: {_why_short(tmp, problem)}")

    def _new_temporary(self, out: _Output) -> Path:
        if out.tmp is not None:
            raise RuntimeError(f"{out.option} was already written")
        out.tmp = out.path.parent / f".{out.path.name}.tmp-{secrets.token_hex(4)}{extension_of(out.path.name)}"
        return out.tmp

    # -- 3. committing -------------------------------------------------------------------------
    def commit(self) -> None:
        """Rename every temporary file over its target, all or none (see the class docstring)."""
        if self.state != "open":
            return
        for out in self._outputs.values():
            if out.tmp is None:
                self.discard()
                raise OutputError(out.path, "nothing was written")
        current = None
        with _signals_deferred() as signalled:
            try:
                for current in self._outputs.values():
                    self._place(current)
                if signalled():
                    raise KeyboardInterrupt
            except BaseException as exc:
                kept = self._undo()
                if isinstance(exc, OSError):
                    raise OutputError(current.path, f"could not be written: {os_problem(exc)}{_held_open(exc, current)}; "
                                                    f"no {'other ' if kept else ''}output of this run was kept"
                                                    + "".join(f"; but {note}" for note in kept)) from None
                if not signalled():
                    raise
                # else: the held signal goes to its handler as the block ends (KeyboardInterrupt)
            else:
                self.state = "committed"
        if self.state != "committed":
            raise KeyboardInterrupt  # the signal's handler did not raise: still say it was not committed
        for out in self._outputs.values():
            if out.backup is not None:
                _remove(out.backup)
                out.backup = None
        for folder in {out.path.parent for out in self._outputs.values()}:
            _fsync_folder(folder)

    def _place(self, out: _Output) -> None:
        if os.path.lexists(out.path):
            if not self.overwrite:  # appeared while this run was working
                raise OutputError(out.path, "appeared while this run was working; pass --overwrite to replace it")
            backup = out.path.parent / f".{out.path.name}.old-{secrets.token_hex(4)}"
            try:
                os.link(out.path, backup, follow_symlinks=False)
            except OSError:  # no hard links here: move it aside instead
                os.replace(out.path, backup)
            out.backup = backup
        _usual_mode(out.tmp)
        os.replace(out.tmp, out.path)
        out.placed, out.tmp = True, None

    def discard(self) -> None:
        """Remove every temporary file (nothing was renamed yet)."""
        if self.state != "open":
            return
        with _signals_deferred():
            self._undo()

    def _undo(self) -> list[str]:
        """Put the previous files back and remove the new ones; returns a note for each previous
        file that could not be put back, which is then kept under its backup name, not removed."""
        kept = []
        for out in reversed(list(self._outputs.values())):
            # placed, or moved aside (no hard links) with the new file's rename failing after
            if out.backup is not None and (out.placed or not os.path.lexists(out.path)):
                try:
                    os.replace(out.backup, out.path)
                    out.backup = None
                except OSError:  # the only copy of the previous file: never removed
                    kept.append(f"{out.path.name} could not be set back"
                                + (" and holds this run's file" if out.placed else "")
                                + f"; the previous one is kept as {out.backup}")
                    out.backup = None
            elif out.placed:
                _remove(out.path)
            out.placed = False
            if out.tmp is not None:
                _remove(out.tmp)
                out.tmp = None
            if out.backup is not None:
                _remove(out.backup)
                out.backup = None
        self.state = "discarded"
        return kept

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = False) -> Iterator[Path]:
    """Context manager for writing one file ``path`` atomically (an OutputSet of one).

    Yields a temporary path in the same folder, ``.<name>.tmp-<random><extension>`` (same
    extension, so writers that choose the format by extension still work). When the block ends
    normally the temporary file is fsynced, checked (not empty) and replaces ``path``; on any
    exception (KeyboardInterrupt included) it is deleted and the exception propagates. OSErrors
    (a full disk: "no space left on device") become OutputError. Example::

        with atomic_output("lesions.csv") as tmp:
            tmp.write_text(text)
    """
    with OutputSet(overwrite=overwrite) as outputs:
        p = outputs.add(path)
        with outputs.temporary(str(p)) as tmp:
            yield tmp




def write_text(path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically: an interrupted write leaves the old file
    (a benchmark's result, a training run's config); OSErrors become OutputError naming it."""
    with atomic_output(path, overwrite=True) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def same_file(a, b) -> bool:
    """Whether two paths name one file: the same file on disk when both exist; otherwise the same
    real path (links followed, dangling ones too), compared case-folded on macOS and Windows,
    whose usual file systems ignore case ('Mask.nii.gz' is 'mask.nii.gz' there)."""
    with contextlib.suppress(OSError):
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)

    def key(path) -> str:
        real = os.path.realpath(path)
        return os.path.normcase(real).casefold() if sys.platform in ("darwin", "win32") else real

    return key(a) == key(b)


def _held_open(exc: OSError, out: _Output) -> str:
    """The likely cause of a refused rename over an existing file on Windows, as a hint."""
    if sys.platform == "win32" and isinstance(exc, PermissionError) and os.path.lexists(out.path):
        return (" (Windows cannot replace a file that another program holds open, e.g. a viewer showing it: "
                "close it there and run again)")
    return ""


def _umask_now() -> int:
    """The umask, read by setting it and setting it back: not thread-safe, so done once, when this
    module is imported (its import runs before any thread of ours writes)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_now()


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: not thread-safe); where
    /proc does not say (macOS, Windows), the umask when this module was imported (a strict 077
    became 022 there: masks of patient data readable by every user of a shared Mac)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def _usual_mode(tmp: Path) -> None:
    """The permissions a plain new file gets (0o666 less the umask): some writers create theirs
    owner-only (safetensors: 0o600), so a colleague could not read the weights or a mask."""
    wanted = 0o666 & ~_umask()
    try:
        if os.stat(tmp).st_mode & 0o777 != wanted:
            os.chmod(tmp, wanted)
    except OSError:  # a file system without modes: nothing to set
        pass


def _why_short(tmp: Path, fallback: str) -> str:
    """Why a written file came out short: the error the disk gives now for more data (a full
    disk: 'no space left on device'), else ``fallback``."""
    try:
        with open(tmp, "ab") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return os_problem(exc)
    return fallback or "the file came out incomplete"


def _fsync_file(path: Path) -> None:
    # Windows' fsync (_commit, FlushFileBuffers) needs a handle open for writing: a read-only one
    # failed every output there with "bad file descriptor"
    fd = os.open(path, os.O_RDWR if sys.platform == "win32" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable; not every file system can fsync a folder, which is fine."""
    with contextlib.suppress(OSError):
        _fsync_file(folder)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _check_image_file(tmp: Path, ext: str, image: sitk.Image) -> str | None:
    """What is wrong with a freshly written image file, or None: the header must read back
    with the right size and the data must be complete (ITK does not report short writes)."""
    size = tmp.stat().st_size
    if size == 0:
        return "the file is empty"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    try:
        with itk_quiet():
            reader.ReadImageInformation()
    except RuntimeError:
        return f"its header cannot be read back ({size} bytes written)"
    if tuple(reader.GetSize()) != tuple(image.GetSize()):
        return f"its header reads back as size {tuple(reader.GetSize())}, not {tuple(image.GetSize())}"
    data_bytes = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel() \
        * sitk.GetArrayViewFromImage(image).dtype.itemsize
    if ext in (".nii", ".nii.gz"):
        try:
            check_nifti_complete(tmp)
        except InputError as exc:
            return exc.problem
        return None
    with open(tmp, "rb") as f:
        head = f.read(1 << 16)
    if ext == ".nrrd":
        end = head.find(b"\n\n")
        if end < 0:
            return "its header is incomplete"
        fields = dict(ln.split(b":", 1) for ln in head[:end].splitlines() if b":" in ln and not ln.startswith(b"#"))
        encoding = fields.get(b"encoding", b"raw").strip().lower()
        if encoding in (b"gzip", b"gz"):
            with open(tmp, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if size - end - 2 < 18 or struct.unpack("<I", f.read(4))[0] != data_bytes % 2**32:
                    return "its compressed data are cut short"
        elif encoding == b"raw" and size - end - 2 < data_bytes:
            return f"it holds {size - end - 2} bytes of data, {data_bytes} were written"
        return None
    if ext == ".mha":
        marker = head.find(b"ElementDataFile = LOCAL")
        if marker < 0:
            return "its header is incomplete"
        header_len = head.index(b"\n", marker) + 1
        fields = dict(ln.split(b" = ", 1) for ln in head[:header_len].splitlines() if b" = " in ln)
        compressed = fields.get(b"CompressedData", b"False").strip() == b"True"
        expected = header_len + (int(fields.get(b"CompressedDataSize", b"0")) if compressed else data_bytes)
        if size < expected:
            return f"it holds {size} bytes, its header promises {expected}"
    return None


@contextlib.contextmanager
def _c_stderr_hidden() -> Iterator[None]:
    """Hide what C libraries print on file descriptor 2 meanwhile (the NIfTI library's own
    '** ERROR: NWAD: wrote only 0 of ... bytes' on a full disk): the write is checked and reported
    in one line by the caller. Left alone where fd 2 cannot be redirected."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[Callable[[], bool]]:
    """Hold SIGINT and SIGTERM while a group of renames (or their undo) runs, so that it is not
    cut in half. Yields ``signalled()``; the held signals go to their previous handlers when the
    block ends (a Python handler is called then and there: Ctrl-C raises KeyboardInterrupt out
    of the block; the default SIGTERM action ends the process after the block). Only in the
    main thread (elsewhere Python handles no signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    held: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler in (signal.SIG_IGN, None):
            continue
        previous[sig] = handler
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield lambda: bool(held)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)  # KeyboardInterrupt for Ctrl-C under Python's default handler
            else:  # SIG_DFL: the default action (ends the process)
                signal.raise_signal(sig)
