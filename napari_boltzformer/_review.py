"""The review loop of the panel: keys, buttons and clicks wired to boltzformer.review.

A reader goes through the lesion table with the keyboard (on the canvas, or with the table
focused): N / Shift-N next and previous lesion (the view jumps and zooms to it), A accept,
R reject, U undo. Painting or erasing in the mask layer with napari's own tools updates the
table (the layer's paint and data events, debounced). Alt-click, "Look here" then a click, or
H re-runs the slices there with the sampling pulled toward the spot (_look_here) and adds what it
finds as a candidate to accept or reject.

Everything that decides (statuses, the undo stack, the threshold/edit merge rule, the sidecar)
is boltzformer.review, tested without a viewer; this module wires Qt and napari to it. The
review of a mask layer lives in its metadata (REVIEW_KEY): it survives re-thresholding and
closing and reopening the panel, not deleting the layer.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ._layers import layer_array
from ._look_here import LookHere
from ._review_keys import KEYS, LOOK_KEY, TableKeys, keys_taken_by
from ._view import pointed_position

log = logging.getLogger(__name__)

REVIEW_KEY = "boltzformer_review"  # metadata of a mask layer: its ReviewSession
EDIT_DELAY_MS = 250  # paint events closer together than this are one edit
SORTS = (("sort: size", "volume_mm3"), ("sort: score", "mean_probability"))


@dataclass
class ReviewSession:
    """What a mask layer carries in its metadata: the review and the run it reviews.

    displayed: bool (z, y, x), what the panel last put in the layer; an edit is the difference
    between it and the layer's data (None in organ mode, where edits are not reviewed)."""

    review: object  # boltzformer.review.Review
    result: object  # boltzformer SegmentationResult
    request: object  # the panel's RunRequest
    info: dict
    run_id: str
    displayed: np.ndarray | None = None


class ReviewPanel(LookHere):
    """The review controls of a BoltzFormerWidget (`box`, `export_unreviewed_check`) and their wiring."""

    def __init__(self, panel):
        self.panel = panel
        self.alive = True
        self.looking = False  # a look-here run in flight
        self._look_worker = None
        self._view_cache: tuple | None = None
        self._wired = weakref.WeakSet()  # mask layers whose edit events reach this panel
        self._replaced: dict = {}  # layer name -> the session a re-run replaces (see remember_replaced)
        self._build()
        self._edit_timer = QTimer(panel)
        self._edit_timer.setSingleShot(True)
        self._edit_timer.setInterval(EDIT_DELAY_MS)
        self._edit_timer.timeout.connect(self.flush_pending)
        self._pending = weakref.WeakSet()  # mask layers painted since their last take-in (one timer serves all)

    # ---- construction ---------------------------------------------------------------------------
    def _build(self):
        self.box = QWidget()
        lay = QVBoxLayout(self.box)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        top = QHBoxLayout()
        self.counter_label = QLabel("")
        self.counter_label.setToolTip("Lesions accepted or rejected, of those the size filter shows")
        self.unreviewed_check = QCheckBox("unreviewed only")
        self.unreviewed_check.setToolTip("List only the lesions not yet accepted or rejected (the mask keeps "
                                         "showing every lesion that is not rejected)")
        self.unreviewed_check.toggled.connect(lambda _=None: self.panel.fill_table())
        self.sort_combo = QComboBox()
        for text, key in SORTS:
            self.sort_combo.addItem(text, key)
        self.sort_combo.setToolTip("Order of the table, largest or most confident first; N and Shift-N follow it")
        self.sort_combo.currentIndexChanged.connect(lambda _=None: self.apply_sort())
        top.addWidget(self.counter_label, 3)
        top.addWidget(self.unreviewed_check, 2)
        top.addWidget(self.sort_combo, 2)
        lay.addLayout(top)
        buttons = QHBoxLayout()
        self.buttons = {}
        for action, text, tip in (
            ("previous", "◀", "previous lesion (Shift-N)"), ("next", "▶", "next lesion (N): jump and zoom to it"),
            ("accept", "Accept", "accept the selected lesion (A): kept at any threshold"),
            ("reject", "Reject", "reject the selected lesion (R): removed from the mask at any threshold"),
            ("undo", "Undo", "take the last review action or edit back (U)"),
        ):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.setAccessibleName(tip.split(" (")[0])  # "previous lesion", not the glyph
            button.clicked.connect(lambda _=False, a=action: self.act(a))
            buttons.addWidget(button, 1 if action in ("previous", "next") else 2)
            self.buttons[action] = button
        self.look_button = QPushButton("Look here")
        self.look_button.setCheckable(True)
        self.look_button.setToolTip("Then click the canvas (or Alt-click at any time, or press H: under the "
                                    "pointer, else at the centre of the view): the slices there are segmented "
                                    "again with the model's sampling pulled toward the spot; what it finds is "
                                    "added as a candidate to accept or reject")
        self.look_button.toggled.connect(self._on_look_toggled)
        buttons.addWidget(self.look_button, 3)
        lay.addLayout(buttons)
        self.export_unreviewed_check = QCheckBox("unreviewed lesions in the exported mask")
        self.export_unreviewed_check.setChecked(True)
        self.export_unreviewed_check.setToolTip("Unchecked: the NIfTI holds accepted lesions only. The CSV always "
                                                "lists every lesion with its status; a .review.json sidecar "
                                                "records the run and every review action")
        for w in (self.box, self.export_unreviewed_check):
            w.setEnabled(False)
        # the same keys when the table has the focus (before its type-to-search takes letters)
        self._table_keys = TableKeys(self)
        self.panel.table.installEventFilter(self._table_keys)

    def connect(self):
        """Keys on the canvas and the look-here click; both stay harmless once the panel is gone."""
        ref = weakref.ref(self)
        viewer = self.panel.viewer

        def on_key(action):
            def handler(_viewer):
                me = ref()
                if me is not None and me.alive:
                    me.act(action)
            return handler

        for action, (key, _) in KEYS.items():
            viewer.bind_key(key, on_key(action), overwrite=True)
        viewer.bind_key(LOOK_KEY, on_key("look"), overwrite=True)

        def on_mouse(_viewer, event):
            me = ref()
            if me is not None and me.alive:
                me._on_mouse(event)

        viewer.mouse_drag_callbacks.append(on_mouse)

        def removed(event):  # napari cannot undo a deletion: at least say what went with it
            session = (getattr(event.value, "metadata", None) or {}).get(REVIEW_KEY)
            if ref() is not None and isinstance(session, ReviewSession) and session.review.has_decisions:
                from napari.utils.notifications import show_warning

                show_warning(f"the review of '{session.result.prompt}' was kept in the deleted mask layer "
                             f"'{event.value.name}' and went with it; export reviewed masks before deleting them")

        viewer.layers.events.removed.connect(removed)

        def closed(*_):
            me = ref()
            if me is not None:
                me.alive = False
            if on_mouse in viewer.mouse_drag_callbacks:
                viewer.mouse_drag_callbacks.remove(on_mouse)
            viewer.layers.events.removed.disconnect(removed)

        self.panel.destroyed.connect(closed)

    # ---- sessions --------------------------------------------------------------------------------
    def session(self, run_id=None) -> ReviewSession | None:
        layer = self.panel._mask_layer_of(run_id or self.panel._active_run)
        return None if layer is None else layer.metadata.get(REVIEW_KEY)

    def attach(self, run_id: str, result, request, info: dict):
        """A new result in its mask layer: a review for it. A re-run of the same prompt on the same
        image keeps the decisions of the review it replaces (they are voxels on the same grid)."""
        from boltzformer.review import Review

        from napari.utils.notifications import show_warning

        layer = self.panel._mask_layer_of(run_id)
        if layer is None or result.labels is None:
            return
        old = self._replaced.pop(layer.name, None)
        review = Review(result.labels.shape)
        if old is not None and old.review.shape == tuple(result.labels.shape):
            if _same_image(old.result.volume, result.volume):
                review = old.review
            elif old.review.actions:  # decisions about other voxels: never carried onto another scan
                show_warning(f"{layer.name}: the image is not the one reviewed before (its voxels or geometry "
                             "differ); its review starts afresh")
        layer.metadata[REVIEW_KEY] = ReviewSession(review, result, request, info, run_id, self._layer_mask(layer))
        self._connect_layer(layer)
        self._view_cache = None

    def remember_replaced(self, layer):
        """show_result is about to give `layer` a new run: keep its review for attach."""
        session = layer.metadata.get(REVIEW_KEY)
        if session is not None:
            self.flush_edits(session)
            self._replaced[layer.name] = session

    def adopt(self):
        """A panel opened on a viewer that already holds reviewed results: take them over."""
        from napari.layers import Labels

        last = None
        for layer in self.panel.viewer.layers:
            session = (layer.metadata or {}).get(REVIEW_KEY) if isinstance(layer, Labels) else None
            if isinstance(session, ReviewSession) and session.run_id not in self.panel._results:
                self.panel._results[session.run_id] = (session.result, session.request)
                self.panel._run_info[session.run_id] = session.info
                self._connect_layer(layer)
                last = session.run_id
        selected = (getattr(self.panel.viewer.layers.selection.active, "metadata", None) or {}).get(REVIEW_KEY)
        if isinstance(selected, ReviewSession) and selected.run_id in self.panel._results:
            last = selected.run_id  # the result the reader had selected, not the last in the list
        if last is not None:
            self.panel._set_active_run(last)

    def _connect_layer(self, layer):
        if layer in self._wired:
            return  # one handler per layer and panel, or a stroke would count twice
        ref = weakref.ref(self)

        seen = [_edit_history(layer)]

        def edited(_event=None):
            me = ref()
            if me is not None and me.alive:
                seen[0] = _edit_history(layer)
                me._pending.add(layer)
                me._edit_timer.start()

        def redrawn(_event=None):
            # napari's own undo and redo (Ctrl-Z) emit only set_data, as every slice step and refresh
            # does: those, with the layer's history unchanged, edited nothing (the take-in compares
            # the whole volume: 85-130 ms after each slice step on a 224 x 512² CT)
            now = _edit_history(layer)
            if now is None or now != seen[0]:
                edited()

        layer.events.paint.connect(edited)
        layer.events.data.connect(edited)
        layer.events.set_data.connect(redrawn)
        self._wired.add(layer)

    @staticmethod
    def _layer_mask(layer) -> np.ndarray:
        data = np.asarray(layer_array(layer))
        return (data[None] if data.ndim == 2 else data) != 0

    # ---- what the table and the mask show -------------------------------------------------------------
    def view(self):
        """The boltzformer.review.ReviewView of the active result (cached until something changes)."""
        session = self.session()
        if session is None:
            return None
        key = (session.run_id, session.review.version, id(session.result.labels), session.result.threshold)
        if self._view_cache is None or self._view_cache[0] != key:
            self._view_cache = (key, session.review.view(session.result))
        return self._view_cache[1]

    def split_rows(self, min_diameter_mm: float) -> tuple[list[dict], list[dict]]:
        """(rows shown, rows hidden by the size filter); reviewed and hand-made lesions always shown."""
        view = self.view()
        if view is None:
            return [], []
        shown, hidden = [], []
        for row in view.rows:
            small = row.get("mean_axial_diameter_mm", row["longest_axial_diameter_mm"]) < min_diameter_mm
            (hidden if small and row["status"] == "unreviewed" and row["origin"] == "model" else shown).append(row)
        return shown, hidden

    def table_rows(self, shown: list[dict]) -> list[dict]:
        return [r for r in shown if r["status"] == "unreviewed"] if self.unreviewed_check.isChecked() else shown

    def mask_of(self, rows) -> np.ndarray:
        return self.view().mask(rows)

    def displayed(self, mask_zyx: np.ndarray | None):
        """The panel put `mask_zyx` ((z, y, x), or None in organ mode) in the active mask layer: the
        data event that started the edit take-in was its own (a whole-volume compare for nothing)."""
        session = self.session()
        if session is not None:
            session.displayed = None if mask_zyx is None else np.asarray(mask_zyx) != 0
            self._pending.discard(self.panel._mask_layer_of(session.run_id))
        if not self._pending:
            self._edit_timer.stop()

    def update(self, shown: list[dict]):
        """Counter and controls after the table was filled."""
        view = self.view()
        enabled = view is not None and self.panel.current_mode() == "lesion"
        self.box.setEnabled(enabled)
        self.export_unreviewed_check.setEnabled(enabled)
        if not enabled:
            self.counter_label.setText("")
            return
        counts = view.counts(shown)
        self.counter_label.setText(f"{counts['reviewed']} of {counts['total']} reviewed")
        self.counter_label.setToolTip(f"{counts['accepted']} accepted, {counts['rejected']} rejected, "
                                      f"{counts['unreviewed']} unreviewed (of the lesions the size filter shows)")
        self.buttons["undo"].setEnabled(self.session().review.can_undo)

    def apply_sort(self):
        if self.panel.current_mode() == "lesion":
            self.panel.table.sort_by_key(self.sort_combo.currentData())

    # ---- keys and buttons ---------------------------------------------------------------------------
    def note_keys_taken(self, layer) -> None:
        """Say so on the status line when the newly active layer takes review keys for itself."""
        taken = keys_taken_by(layer)
        if taken and self.view() is not None:
            self.panel.status_label.setText(
                f"keys {' and '.join(taken)} now act on the {type(layer).__name__.lower()} layer '{layer.name}', not "
                "the review: select the image or the mask layer to review with the keys (the buttons always work)")

    def act(self, action: str):
        """next | previous | accept | reject | undo | look (a key, a button or a table shortcut)."""
        from napari.utils.notifications import show_error, show_info

        if self.view() is None:
            deleted = self.panel.active_result() is not None  # the mask layer, and the review in it
            show_info("review: this result's mask layer was deleted, and its review with it; run the prompt "
                      "again" if deleted else "review: nothing to review yet; run a lesion prompt first")
            return
        if self.panel.current_mode() != "lesion":
            show_info("review: organ mode shows one structure, nothing to accept or reject; switch the mode to lesions")
            return
        self.flush_edits(pending_only=True)  # a stroke still waiting to be taken in: first, or it would undo this
        try:
            if action in ("next", "previous"):
                self.step(+1 if action == "next" else -1)
            elif action == "undo":
                self.undo()
            elif action == "look":  # H on the canvas: look here without the mouse click
                self.look_button.setChecked(False)
                self.look_here_at(pointed_position(self.panel.viewer))
            else:
                self.decide("accepted" if action == "accept" else "rejected")
        except ValueError as exc:  # a row that vanished under an edit, etc.: say so, never raise into Qt
            show_error(f"review: {exc}")
        except Exception as exc:  # noqa: BLE001 - a key handler must not raise into napari
            log.exception("review action %s failed", action)
            show_error(f"review: {action} failed: {type(exc).__name__}: {exc}".splitlines()[0])

    def current(self) -> tuple[int, dict | None]:
        table = self.panel.table
        row = table.currentRow()
        if row < 0 or not table.selectionModel().isRowSelected(row, table.rootIndex()):
            return -1, None
        return row, self.panel.table.lesion_at(row)

    def select(self, row: int) -> dict | None:
        table = self.panel.table
        if not 0 <= row < table.rowCount():
            return None
        table.setCurrentCell(row, 0)
        table.selectRow(row)
        lesion = self.panel.table.lesion_at(row)
        if lesion is not None:
            self.panel.go_to_lesion(lesion)
        return lesion

    def step(self, direction: int):
        row, _ = self.current()
        count = self.panel.table.rowCount()
        if count == 0:
            return
        target = (0 if direction > 0 else count - 1) if row < 0 else row + direction
        if 0 <= target < count:
            self.select(target)
        else:
            self.panel.status_label.setText("first lesion" if target < 0 else "last lesion")

    def decide(self, status: str):
        from napari.utils.notifications import show_info

        row, lesion = self.current()
        if lesion is None:
            show_info("review: select a lesion first (N: next, or click a row)")
            return
        session = self.session()
        entry = session.review.decide(self.view(), lesion, status)
        self.panel.refresh_view()
        # the decided lesion keeps its voxels (or footprint): find it again, then go on to the next one
        again = self.find_row(entry["lesion"]["centroid_voxel_zyx"])
        self.select(row if again is None else again + 1)
        if self.current()[1] is None and again is not None:
            self.select(again)

    def undo(self):
        from napari.utils.notifications import show_info

        entry = self.session().review.undo()
        if entry is None:
            show_info("review: nothing to undo")
            return
        self.panel.refresh_view()
        undone = self.session().review.actions[entry["undoes"]]
        lesion = undone.get("lesion")
        if lesion:
            found = self.find_row(lesion["centroid_voxel_zyx"])
            if found is not None:
                self.select(found)

    def find_row(self, centroid_zyx, tolerance: float = 1e-3) -> int | None:
        """The table row of the lesion with this centroid (a lesion keeps it when its status changes)."""
        for row in range(self.panel.table.rowCount()):
            lesion = self.panel.table.lesion_at(row)
            if lesion is not None and np.allclose(lesion["centroid_voxel_zyx"], centroid_zyx, atol=tolerance):
                return row
        return None

    # ---- hand edits --------------------------------------------------------------------------------
    def flush_edits(self, session: ReviewSession | None = None, pending_only: bool = False) -> bool:
        """Take a painted or erased mask layer into the review (and the table); True if it changed.
        pending_only: only when the session's layer was edited since its last take-in, sparing the
        whole-volume compare otherwise."""
        from napari.utils.notifications import show_error

        session = session or self.session()
        if session is None or session.displayed is None or not self.alive:
            return False
        layer = self.panel._mask_layer_of(session.run_id)
        if layer is None or (pending_only and layer not in self._pending):
            return False
        self._pending.discard(layer)
        if not self._pending:
            self._edit_timer.stop()
        after = self._layer_mask(layer)
        if after.shape != session.displayed.shape or np.array_equal(after, session.displayed):
            return False
        before, session.displayed = session.displayed, after
        try:
            session.review.apply_edit(before, after, threshold=session.result.threshold)
        except ValueError as exc:
            show_error(f"{layer.name}: edit not taken into the review ({exc})")
            return False
        if session.run_id == self.panel._active_run:
            _, selected = self.current()
            self.panel.refresh_view()
            if selected is not None:  # the row the reader was on stays selected (its centroid may move a little)
                row = self.find_row(selected["centroid_voxel_zyx"], tolerance=2.0)
                if row is not None:
                    self.panel.table.setCurrentCell(row, 0)
                    self.panel.table.selectRow(row)
        return True

    def flush_pending(self):
        """Take in every mask layer painted since its last take-in (the edit timer's end), the
        active result's or not: a stroke in one result is not lost when another becomes active."""
        for layer in list(self._pending):
            session = (layer.metadata or {}).get(REVIEW_KEY)
            if isinstance(session, ReviewSession) and self.panel._mask_layer_of(session.run_id) is layer:
                self.flush_edits(session)
            else:
                self._pending.discard(layer)

    # ---- which layer is under review (the exports ask) ------------------------------------------------
    def handles(self, layer) -> bool:
        """True when `layer` is the active result's mask under review in lesion mode."""
        return (layer is not None and self.panel.current_mode() == "lesion" and self.view() is not None
                and layer is self.panel._mask_layer_of(self.panel._active_run))


def _edit_history(layer) -> tuple | None:
    """The lengths of a Labels layer's undo and redo histories (an undo or redo changes them);
    None when this napari keeps them elsewhere (then every set_data counts as an edit)."""
    undo, redo = getattr(layer, "_undo_history", None), getattr(layer, "_redo_history", None)
    return None if undo is None or redo is None else (len(undo), len(redo))


def _same_image(a, b) -> bool:
    """The same scan: same geometry and the same voxels (a re-run of a prompt keeps its review;
    another scan loaded under the same layer name must not)."""
    return a is b or (a.same_geometry(b) and np.array_equal(a.array, b.array))
