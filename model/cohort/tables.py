"""The output tables (report.csv, lesions.csv): one durable append per scan, repaired and
de-duplicated on --resume.
"""

from __future__ import annotations

import csv
import io as _stdio
import os
from pathlib import Path

from ..errors import InputError, OutputError, os_problem
from ..io import atomic_output


def _csv_bytes(rows: list[dict], columns, header: bool = False) -> bytes:
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


class Table:
    """A CSV table that grows one flushed, fsynced append per scan (a kill mid-append leaves at
    most a partial last line, which `read_rows` drops)."""

    def __init__(self, path: Path, columns):
        self.path, self.columns = path, tuple(columns)
        self._f = None

    def start(self, rows: list[dict]) -> None:
        """Replace the file (atomically) by the header and ``rows``, then open it for appending."""
        with atomic_output(self.path, overwrite=True) as tmp:
            tmp.write_bytes(_csv_bytes(rows, self.columns, header=True))
        try:
            self._f = open(self.path, "ab")
        except OSError as exc:
            raise OutputError(self.path, f"cannot be opened for writing ({os_problem(exc)})") from None

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        data = _csv_bytes(rows, self.columns)
        try:
            self._f.write(data)  # one write per scan: the rows of a scan arrive together
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise OutputError(self.path, f"could not be written: {os_problem(exc)}; rerun with --resume once "
                                         "there is room (the scans recorded so far are kept)") from None

    def close(self) -> OutputError | None:
        """Close the file; the error of its last flush is returned, not raised (closing runs in a
        `finally`, where raising would hide the error that got there first)."""
        f, self._f = self._f, None
        if f is None:
            return None
        try:
            f.close()
        except OSError as exc:
            return OutputError(self.path, f"could not be written: {os_problem(exc)}; rerun with --resume once there "
                                          "is room (the scans recorded so far are kept)")
        return None

    def read_rows(self) -> list[dict]:
        """Existing rows; a partial last line (a kill mid-append) is dropped. Raises InputError
        when the file is not a table of these columns."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise InputError(self.path, f"cannot be read ({os_problem(exc)})") from None
        if not data:
            return []
        if not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
        try:
            reader = csv.DictReader(_stdio.StringIO(data.decode("utf-8"), newline=""))
            rows = list(reader)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(self.path, f"is not a table written by boltzformer cohort ({exc}); start again with "
                                        "--overwrite") from None
        if tuple(reader.fieldnames or ()) != self.columns:
            raise InputError(self.path, f"has the columns {','.join(reader.fieldnames or []) or 'none'}, not those of "
                                        "this version's cohort table; start again with --overwrite or another OUT_DIR")
        return rows
