"""The lesion table of the panel: one row per candidate (lesion mode) or one structure (organ
mode), and the total the panel shows above it.

A QTableWidget that knows its columns, formats its cells (sorted by number, not text), marks
each row's review status and tints reviewed rows. It keeps the lesion dict behind every row, so
the order on screen never matters, and a click emits `lesion_clicked` with that dict (the organ
row: its summary); what a click does (jump and zoom) is the panel's business. It imports nothing
of the panel or the review, so neither can loop back into it.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QSizePolicy, QTableWidget, QTableWidgetItem

# Lesion mode: one row per candidate. (header, tooltip, row key); the intensity header follows
# the modality, and columns no row has a value for (a filter's scores where it did not run) hide.
LESION_COLUMNS = (
    ("id", "lesion id (1 = largest)", "lesion_id"),
    ("status", "review: ✓ accepted, ✗ rejected, · unreviewed; ✎ edited by hand, ◎ found by look here "
     "(N / Shift-N next / previous, A accept, R reject, U undo)", "status"),
    ("Ø mm", "longest axial diameter (mm)", "longest_axial_diameter_mm"),
    ("short", "short axis (mm): the longest chord perpendicular to the longest diameter, in its slice",
     "short_axis_diameter_mm"),
    ("mean Ø", "mean diameter (mm) = (longest + short axis) / 2, as Fleischner and Lung-RADS size nodules; "
     "the size filter uses it", "mean_axial_diameter_mm"),
    ("p̄", "model confidence: mean probability over the lesion", "mean_probability"),
    ("p max", "model confidence: highest probability in the lesion", "max_probability"),
    ("nodule", "3D false-positive filter: probability from a 3D network that the candidate is a nodule, "
     "not a vessel or a wall (for lung nodules: the 3D nodule detector's network)", "nodule_score"),
    ("round", "3D false-positive filter: blobness from the Hessian (1 = round like a nodule, 0 = a tube like "
     "a vessel); blank for candidates the filter dropped, where no rule uses it", "blobness"),
    ("contrast", "MS lesion filter: mean intensity inside minus a 3 mm shell around it (image units). On a scan "
     "where most candidates are brighter than their surroundings (FLAIR, T2), the darker ones are dropped",
     "local_contrast"),
    ("mm³", "volume in mm³", "volume_mm3"),
    ("slices", "first–last slice (z index)", "slice_start"),
    ("HU", "mean intensity", "mean_intensity"),
)
ORGAN_COLUMNS = (
    ("structure", "the structure: its largest connected component (the two largest for paired organs)"),
    ("mL", "volume in mL"),
    ("size mm", "a size that means something for this structure (see the tooltip of the cell)"),
    ("Ø mm", "longest axial diameter (mm)"),
    ("slices", "first–last slice (z index)"),
    ("HU", "mean intensity"),
    ("p̄", "model confidence: mean probability over the structure"),
)
INTENSITY_COLUMN = next(i for i, c in enumerate(LESION_COLUMNS) if c[2] == "mean_intensity")
# The 3D nodule detector's lesions: whose outline the mask shows (boltzformer.nodule_detector.merge)
OUTLINE_TIPS = {"slice model": "3D nodule detector: a nodule-like blob the network found too; the outline is the network's",
                "3D region": "3D nodule detector: a nodule-like blob the network did not mark; the outline is a region "
                             "grown from it in the CT (review it)"}
FILTER_SCORES = ("nodule_score", "blobness", "local_contrast")  # the filters' columns: hidden where none ran
STATUS_MARKS = {"accepted": "✓", "rejected": "✗", "unreviewed": "·"}
ORIGIN_MARKS = {"edited": "✎", "look here": "◎", "drawn": "✎"}
# item data: UserRole + 1, the row's index in result.lesions (a model candidate; -1 the organ
# row; None a lesion the review added); UserRole + 2, its index in the rows behind the table
CANDIDATE_ROLE = Qt.ItemDataRole.UserRole + 1
ROW_ROLE = Qt.ItemDataRole.UserRole + 2


def status_text(row: dict) -> tuple[str, str]:
    """(cell text, tooltip) of a row's status and origin."""
    origin = row.get("origin", "model")
    marks = "".join(dict.fromkeys(m for name, m in ORIGIN_MARKS.items() if name in origin))
    tip = f"{row['status']}" + ("" if origin == "model" else f" · {origin}")
    return STATUS_MARKS[row["status"]] + marks, tip


_UNITS: dict = {}  # id(the intensities a result read) -> classify_units: one pass per result, not per redraw


def intensity_header(is_ct: bool, sequence: str | None, result=None) -> tuple[str, str]:
    """(header, tooltip) of the intensity column: HU for CT in Hounsfield units (a CT that is
    not, e.g. an 8-bit export, says so), arbitrary units naming the MR sequence (if the file
    does) otherwise. ``result``: the SegmentationResult whose values the column shows."""
    if is_ct:
        units = "HU"
        if result is not None:
            values = (result.frame if result.frame is not None else result.volume).array
            if id(values) not in _UNITS:
                from boltzformer.intensity import classify_units

                if len(_UNITS) > 8:
                    _UNITS.clear()
                _UNITS[id(values)] = classify_units(values)
            units = _UNITS[id(values)]
        if units != "HU":
            return "grey", f"mean grey level: this CT is not in Hounsfield units ({units} values)"
        return "HU", "mean intensity in Hounsfield units"
    sequence = sequence or "sequence not stated by the file"
    return "a.u.", f"mean intensity in arbitrary units (MR: {sequence}); not comparable between scans"


def lesion_totals(result, shown: list[dict], hidden: list[dict], min_diameter_mm: float) -> tuple[str, str]:
    """(total, details) above the lesion rows: what is shown, and what is hidden or dropped.
    Rows the reader rejected in review are not in the mask, nor in the total."""
    rejected = [r for r in shown if r.get("status") == "rejected"]
    shown = [r for r in shown if r.get("status") != "rejected"]
    total_ml = sum(r["volume_mm3"] for r in shown) / 1000.0
    noun = "lesion" if len(shown) == 1 else "lesions"
    details = [f"'{result.prompt}', threshold {result.threshold:.2f}"]
    if rejected:
        details.append(f"{len(rejected)} rejected in review")
    if hidden:
        details.append(f"{len(hidden)} hidden (mean Ø < {min_diameter_mm:g} mm)")
    if result.rejected:
        details.append(f"{len(result.rejected)} dropped by the false-positive filter")
    if not result.complete:
        details.append("cancelled: finished slices only")
    # the count and volume a reader takes away are a model's estimate (the CLI says it in full:
    # errors.ESTIMATE_NOTE); said on the total's own line, which a 720p screen has room for
    estimate = " (model estimate)" if shown else ""
    return f"{len(shown)} {noun} · {total_ml:.2f} mL{estimate}", " · ".join(details)


def organ_totals(result, summary: dict | None, target: str | None) -> tuple[str, str]:
    """(total, details) above the organ row (`target`: the vocabulary target of the prompt)."""
    threshold = f"'{result.prompt}', threshold {result.threshold:.2f}"
    if summary is None:
        return f"{(target or result.prompt).replace('_', ' ')}: not found", threshold
    details = [threshold]
    left_out = summary["components_found"] - len(summary["lesion_ids"])
    if left_out:
        details.append(f"{left_out} stray component(s) left out")
    sides = summary.get("sides") or []
    if summary["measure"] and sides and all(side["measure_mm"] is not None for side in sides):  # a pair: each its own
        details.append(summary["measure"] + " " + ", ".join(f"{side['side']} {side['measure_mm']:.1f} mm"
                                                            for side in sides))
    elif summary["measure"] and summary["measure_mm"] is not None:  # None: one slice has no length
        details.append(f"{summary['measure']} {summary['measure_mm']:.1f} mm")
    return f"{summary['structure']} · {summary['volume_ml']:.1f} mL", " · ".join(details)


def _per_side(summary: dict, key: str) -> tuple[str, float] | None:
    """('R 115.0 · L 113.2', the larger) for a pair measured side by side, else None."""
    sides = summary.get("sides")
    if not sides or any(side[key] is None for side in sides):
        return None
    return " · ".join(f"{side['side'][0].upper()} {side[key]:.1f}" for side in sides), max(side[key] for side in sides)


class LesionTable(QTableWidget):
    """The table; `lesion_clicked(dict)` when a row is clicked."""

    lesion_clicked = Signal(object)

    def __init__(self, parent=None):
        super().__init__(0, len(LESION_COLUMNS), parent)
        self._rows: list[dict] = []  # the lesion rows behind the table (ROW_ROLE indexes them)
        self._organ: dict | None = None  # the organ row's summary
        self.set_columns([(c[0], c[1]) for c in LESION_COLUMNS])
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setSortingEnabled(True)
        self.sortByColumn(0, Qt.SortOrder.AscendingOrder)  # ids: largest lesion first
        # columns as narrow as their contents (numbers are short); the panel scrolls sideways only
        # when it is narrower than all of them
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.horizontalHeader().setMinimumSectionSize(28)
        self.horizontalHeader().setStretchLastSection(True)
        self.setMinimumHeight(170)  # five rows before the panel has to scroll
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.cellClicked.connect(self._on_clicked)
        self.setTabKeyNavigation(False)  # Tab leaves the table for the export buttons below it
        self.setToolTip("Click a row (or move to it with the arrow keys; Enter): jump to it and zoom in (Restore "
                        "view goes back). Review: N / Shift-N next / previous, A accept, R reject, U undo; Alt-click "
                        "the canvas: look here")

    # keys that move the current row: each jumps to the row it reaches, as a click would (a row
    # that moved without the view let A and R decide a lesion the reader never saw)
    _MOVES = {Qt.Key.Key_Up: -1, Qt.Key.Key_Down: +1, Qt.Key.Key_PageUp: -5, Qt.Key.Key_PageDown: +5}

    def keyPressEvent(self, event):
        count, row = self.rowCount(), self.currentRow()
        plain = not (event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier)
        key = event.key()
        if plain and key in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and row >= 0:
            self._on_clicked(row, 0)
        elif plain and count and key in (Qt.Key.Key_Home, Qt.Key.Key_End, *self._MOVES):
            target = {Qt.Key.Key_Home: 0, Qt.Key.Key_End: count - 1}.get(
                key, 0 if row < 0 else row + self._MOVES.get(key, 0))
            target = min(max(target, 0), count - 1)
            self.setCurrentCell(target, 0)
            self.selectRow(target)
            self._on_clicked(target, 0)
        else:
            super().keyPressEvent(event)

    def set_columns(self, columns):
        """(header, tooltip) per column, all shown."""
        self.setColumnCount(len(columns))
        self.setHorizontalHeaderLabels([c[0] for c in columns])
        for col, (_, tip) in enumerate(columns):
            self.horizontalHeaderItem(col).setToolTip(tip)
            self.setColumnHidden(col, False)

    def lesion_at(self, row: int) -> dict | None:
        """The lesion dict behind row `row` (as sorted on screen); None for the organ row."""
        item = self.item(row, 0)
        index = None if item is None else item.data(ROW_ROLE)
        return None if index is None or int(index) >= len(self._rows) else self._rows[int(index)]

    def sort_by_key(self, key: str):
        """Largest first by the lesion column of row key `key` (e.g. 'volume_mm3')."""
        column = next((i for i, c in enumerate(LESION_COLUMNS) if c[2] == key), None)
        if column is not None:
            self.sortByColumn(column, Qt.SortOrder.DescendingOrder)

    def clear_rows(self):
        self.setSortingEnabled(False)
        self.setRowCount(0)
        self._rows, self._organ = [], None
        self.setSortingEnabled(True)

    def show_lesions(self, result, listed: list[dict], intensity_header: tuple[str, str], is_ct: bool):
        """One row per lesion of `listed` (rows of `result`, with their review status if any)."""
        columns = [(c[0], c[1]) for c in LESION_COLUMNS]
        columns[INTENSITY_COLUMN] = intensity_header
        self.setSortingEnabled(False)
        self.setRowCount(0)
        self.set_columns(columns)
        self._rows, self._organ = listed, None
        self.setRowCount(len(listed))
        index_of = {r["lesion_id"]: i for i, r in enumerate(result.lesions)}
        for row, lesion in enumerate(listed):
            for col, (_, _, key) in enumerate(LESION_COLUMNS):
                self.setItem(row, col, _lesion_cell(lesion, key, is_ct))
            ref = lesion.get("_ref", ("auto", lesion["lesion_id"]))
            self.item(row, 0).setData(CANDIDATE_ROLE, index_of.get(ref[1]) if ref[0] == "auto" else None)
            self.item(row, 0).setData(ROW_ROLE, row)
            self._tint_row(row, lesion.get("status", "unreviewed"))
        scored = [*result.lesions, *result.rejected]  # the 3D filter's scores exist only where it ran
        for col, (_, _, key) in enumerate(LESION_COLUMNS):
            if key in FILTER_SCORES:
                self.setColumnHidden(col, not any(_finite(r.get(key)) for r in scored))
        self.setSortingEnabled(True)

    def show_organ(self, summary: dict | None, intensity_header: tuple[str, str], is_ct: bool):
        """The organ columns, and one row for `summary` (postprocess.organ_summary_of) if any."""
        columns = list(ORGAN_COLUMNS)
        columns[5] = intensity_header
        self.setSortingEnabled(False)
        self.setRowCount(0)
        self.set_columns(columns)
        self._rows, self._organ = [], summary
        if summary is not None:
            self.setRowCount(1)
            start, end = summary["slice_start"], summary["slice_end"]
            measure = summary["measure_mm"]
            diameter = summary["longest_axial_diameter_mm"]
            cells = (
                QTableWidgetItem(summary["structure"]),
                _NumericItem(f"{summary['volume_ml']:.1f}", summary["volume_ml"]),
                _NumericItem(*(_per_side(summary, "measure_mm")
                               or (("–", -1.0) if measure is None else (f"{measure:.1f}", measure)))),
                _NumericItem(*(_per_side(summary, "longest_axial_diameter_mm") or (f"{diameter:.1f}", diameter))),
                _NumericItem(f"{start}–{end}" if end > start else f"{start}", start),
                _NumericItem(f"{summary['mean_intensity']:.0f}" if is_ct else f"{summary['mean_intensity']:.3g}",
                             summary["mean_intensity"]),
                _NumericItem(f"{summary['mean_probability']:.2f}", summary["mean_probability"])
                if "mean_probability" in summary else _NumericItem("–", -1.0),
            )
            cells[2].setToolTip(summary["measure"] or "no single diameter means much for this structure")
            cells[0].setData(CANDIDATE_ROLE, -1)  # the organ row, not a lesion index
            for col, item in enumerate(cells):
                self.setItem(0, col, item)
            self.horizontalHeaderItem(2).setText(
                {"max axial calibre": "calibre mm", "craniocaudal length": "length mm"}.get(summary["measure"],
                                                                                           "size mm"))
        self.setSortingEnabled(True)

    def _on_clicked(self, row: int, _col: int):
        item = self.item(row, 0)
        if item is None:
            return
        clicked = self._organ if item.data(CANDIDATE_ROLE) == -1 else self.lesion_at(row)
        if clicked is not None:
            self.lesion_clicked.emit(clicked)

    def _tint_row(self, row: int, status: str) -> None:
        """Accepted rows tinted green, rejected ones greyed: the review state at a glance."""
        from qtpy.QtGui import QBrush, QColor

        if status == "unreviewed":
            return
        for col in range(self.columnCount()):
            item = self.item(row, col)
            if item is None:
                continue
            if status == "accepted":
                item.setBackground(QBrush(QColor(52, 199, 89, 70)))
            else:
                item.setForeground(QBrush(QColor(140, 140, 140)))
                font = item.font()
                font.setStrikeOut(col > 1)
                item.setFont(font)


class _NumericItem(QTableWidgetItem):
    """A table cell that sorts by a number (Qt.UserRole) rather than by its text."""

    def __init__(self, text: str, value: float):
        super().__init__(text)
        self.setData(Qt.ItemDataRole.UserRole, float(value))
        self.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))

    def __lt__(self, other):
        mine, theirs = self.data(Qt.ItemDataRole.UserRole), other.data(Qt.ItemDataRole.UserRole)
        if mine is None or theirs is None:
            return super().__lt__(other)
        return mine < theirs


def _lesion_cell(lesion: dict, key: str, is_ct: bool) -> QTableWidgetItem:
    """The cell of column `key` for one lesion row."""
    value = lesion.get(key)
    if key == "status":
        text, tip = status_text(lesion if "status" in lesion else {**lesion, "status": "unreviewed"})
        item = QTableWidgetItem(text)
        item.setToolTip(tip)
        item.setTextAlignment(int(Qt.AlignmentFlag.AlignCenter))
        return item
    if key == "slice_start":
        start, end = lesion["slice_start"], lesion["slice_end"]
        return _NumericItem(f"{start}–{end}" if end > start else f"{start}", start)
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return _NumericItem("–", -1.0)
    if key == "lesion_id":
        return _NumericItem(str(value), value)
    if key == "mean_intensity":
        return _NumericItem(f"{value:.0f}" if is_ct else f"{value:.3g}", value)
    if key == "volume_mm3":
        return _NumericItem(f"{value:.0f}" if value >= 100 else f"{value:.1f}", value)
    if key == "local_contrast":
        return _NumericItem(f"{value:+.0f}" if is_ct else f"{value:+.3g}", value)
    if key in ("mean_probability", "max_probability", *FILTER_SCORES):
        item = _NumericItem(f"{value:.2f}", value)
        if key == "nodule_score" and lesion.get("outline") in OUTLINE_TIPS:
            item.setToolTip(OUTLINE_TIPS[lesion["outline"]])
        return item
    return _NumericItem(f"{value:.1f}", value)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.floating)) and bool(np.isfinite(value))
