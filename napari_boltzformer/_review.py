"""The review loop of the panel: keys, buttons and clicks wired to boltzformer.review.

A reader goes through the lesion table with the keyboard (on the canvas, or with the table
focused): N / Shift-N next and previous lesion (the view jumps and zooms to it), A accept,
R reject, U undo. Painting or erasing in the mask layer with napari's own tools updates the
table (the layer's paint and data events, debounced). Alt-click, "Look here" then a click, or
H re-runs the slices there with the sampling pulled toward the spot (boltzformer.look_here) and
adds what it finds as a candidate to accept or reject.

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
from ._review_keys import KEYS, LOOK_KEY, TableKeys, keys_taken_by
from ._view import pointed_position, shown_voxel

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


class ReviewPanel:
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
        self._edit_timer.timeout.connect(lambda: self.flush_edits())

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

        def edited(_event=None):
            me = ref()
            if me is not None and me.alive:
                me._edit_timer.start()

        layer.events.paint.connect(edited)
        layer.events.data.connect(edited)
        layer.events.set_data.connect(edited)  # napari's own undo (Ctrl-Z) emits only this one
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
        """The panel put `mask_zyx` ((z, y, x), or None in organ mode) in the active mask layer."""
        session = self.session()
        if session is not None:
            session.displayed = None if mask_zyx is None else np.asarray(mask_zyx) != 0

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
        if self._edit_timer.isActive():  # a stroke still waiting to be taken in: first, or it would undo this
            self.flush_edits()
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
    def flush_edits(self, session: ReviewSession | None = None) -> bool:
        """Take a painted or erased mask layer into the review (and the table); True if it changed."""
        from napari.utils.notifications import show_error

        self._edit_timer.stop()
        session = session or self.session()
        if session is None or session.displayed is None or not self.alive:
            return False
        layer = self.panel._mask_layer_of(session.run_id)
        if layer is None:
            return False
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

    # ---- look here ---------------------------------------------------------------------------------
    def _on_look_toggled(self, checked: bool) -> None:
        """Armed: a crosshair and a status line say that the next click looks there."""
        viewer = self.panel.viewer
        if checked:
            viewer.cursor.style = "crosshair"
            self.panel.status_label.setText("look here: click the spot on the canvas, or press H for the centre "
                                            "of the view (the button again: cancel)")
            return
        active = viewer.layers.selection.active  # back to what the active layer's mode shows
        viewer.cursor.style = getattr(active, "cursor", "standard") if active is not None else "standard"
        if self.panel.status_label.text().startswith("look here: click the spot"):
            self.panel.status_label.setText("")

    def _on_mouse(self, event):
        if event.type != "mouse_press" or event.button != 1:
            return
        alt = any(m == "Alt" for m in event.modifiers)
        if not (alt or self.look_button.isChecked()):
            return
        self.look_button.setChecked(False)
        _hold_the_brush(self.panel.viewer.layers.selection.active)
        try:
            self.look_here_at(event.position)
        except Exception as exc:  # noqa: BLE001 - a mouse callback must not raise into napari
            from napari.utils.notifications import show_error

            log.exception("look here failed")
            show_error(f"look here failed: {type(exc).__name__}: {exc}".splitlines()[0])

    def look_here_at(self, world_position):
        """Start a look-here run at a canvas position (world coordinates of the viewer)."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error, show_info

        session = self.session()
        layer = self.panel._mask_layer_of(self.panel._active_run)
        if session is None or layer is None or self.panel.current_mode() != "lesion":
            show_error("look here: run a lesion prompt first")
            return
        if self.looking or self.panel.running:
            show_info("look here: a run is in progress; try again when it ends")
            return
        if self.panel.viewer.dims.ndisplay != 2:  # a 3D click falls on the camera's plane, not a voxel
            show_info("look here: switch the viewer to 2D (the square button at the bottom left) and click the spot")
            return
        point = [float(v) for v in shown_voxel(self.panel.viewer, layer, world_position)]
        if layer.ndim == 2:
            point = [0.0, *point]
        shape = session.review.shape
        index = tuple(int(round(v)) for v in point)
        if not all(0 <= i < n for i, n in zip(index, shape)):
            show_error("look here: the click is outside the volume")
            return
        z_range = None
        view = self.view()
        flat = int(np.ravel_multi_index(index, shape))
        for row in view.rows:  # a click on an unreviewed lesion re-runs its slices
            if row["slice_start"] <= index[0] <= row["slice_end"] and flat in set(view.voxels(row).tolist()):
                if row["status"] != "unreviewed":  # what it finds would grow or split a decided lesion
                    show_info(f"look here: this spot is on a lesion already {row['status']}; undo (U) that "
                              "decision to look here again")
                    return
                z_range = (row["slice_start"], row["slice_end"])
                break
        self.looking = True
        self.panel.status_label.setText(f"looking here for '{session.result.prompt}' (slice {index[0]})…")
        worker = thread_worker(_look_here_job, start_thread=False, ignore_errors=True)(
            self.panel.load_segmenter, session, tuple(point), z_range)
        worker.returned.connect(lambda out, s=session: self._looked(s, out))
        worker.finished.connect(lambda: setattr(self, "looking", False))
        self._look_worker = worker  # kept: a worker nobody holds may be collected mid-run
        worker.start()

    def _looked(self, session: ReviewSession, outcome):
        from napari.utils.notifications import show_error, show_info

        found, error = outcome
        if error is not None:
            self.panel.status_label.setText("look here failed")
            show_error(error)
            return
        if self.panel._mask_layer_of(session.run_id) is None:  # deleted meanwhile: the review went with it
            self.panel.status_label.setText("")
            show_info(f"look here: the '{session.result.prompt}' mask layer was closed meanwhile; nothing added")
            return
        start, stop = found.slices
        where = f"slice {start}" if stop - start == 1 else f"slices {start}–{stop - 1}"
        if found.candidate is None:
            self.panel.status_label.setText(f"look here: nothing found ({where}, {found.seconds:.1f} s)")
            show_info(f"look here: nothing added ({where} re-run): {found.source}")
            return
        indices = found.candidate_indices(session.review.shape)
        z, y, x = np.unravel_index(indices, session.review.shape)
        values = found.probabilities[z - start, y, x]
        added = session.review.add_candidate(indices, values, point_zyx=found.point_zyx, row=found.row,
                                             threshold=session.result.threshold)
        if added is None:  # all of it lies on, or against, lesions already decided (or already there)
            self.panel.status_label.setText(f"look here: nothing new ({where}, {found.seconds:.1f} s)")
            show_info("look here: nothing added: what it found lies on or against lesions already accepted, "
                      "rejected, edited or found by look here; undo (U) a decision to look there again")
            return
        if session.run_id != self.panel._active_run:  # the reader moved to another result meanwhile
            self.panel.status_label.setText("")
            show_info(f"look here: a candidate was added to the '{session.result.prompt}' result, not the one shown; "
                      "select its mask layer to review it")
            return
        self.panel.refresh_view()
        size = found.row["mean_axial_diameter_mm"]
        self.panel.status_label.setText(f"look here: a {size:.1f} mm candidate, {found.source} "
                                        f"({where}, {found.seconds:.1f} s)")
        click = tuple(int(round(v)) for v in found.point_zyx)
        row = self._row_holding(int(np.ravel_multi_index(click, session.review.shape)))
        if row is None:
            row = self.find_row(found.row["centroid_voxel_zyx"], tolerance=2.0)
        if row is not None:
            self.select(row)
        show_info(f"look here: a candidate of {size:.1f} mm mean diameter was added (A: accept, R: reject, U: undo)")

    def _row_holding(self, flat_index: int) -> int | None:
        view = self.view()
        for row in range(self.panel.table.rowCount()):
            lesion = self.panel.table.lesion_at(row)
            if lesion is not None and flat_index in set(view.voxels(lesion).tolist()):
                return row
        return None

    # ---- which layer is under review (the exports ask) ------------------------------------------------
    def handles(self, layer) -> bool:
        """True when `layer` is the active result's mask under review in lesion mode."""
        return (layer is not None and self.panel.current_mode() == "lesion" and self.view() is not None
                and layer is self.panel._mask_layer_of(self.panel._active_run))


def _hold_the_brush(layer) -> None:
    """A look-here click on a labels layer in a drawing mode must not also draw: napari hands the
    press to the viewer's callbacks (this one) and then to the active layer's, so the layer
    goes to pan/zoom for this press and back to its mode right after."""
    from napari.layers import Labels

    if isinstance(layer, Labels) and str(layer.mode) in ("paint", "erase", "fill", "polygon"):
        mode = layer.mode
        layer.mode = "pan_zoom"
        QTimer.singleShot(0, lambda: setattr(layer, "mode", mode))


def _same_image(a, b) -> bool:
    """The same scan: same geometry and the same voxels (a re-run of a prompt keeps its review;
    another scan loaded under the same layer name must not)."""
    return a is b or (a.same_geometry(b) and np.array_equal(a.array, b.array))


def _look_here_job(load_segmenter, session: ReviewSession, point_zyx, z_range):
    """Worker thread: (LookHereResult, None) or (None, message); never raises."""
    from boltzformer.errors import BoltzformerError
    from boltzformer.look_here import look_here

    result, request = session.result, session.request
    try:
        segmenter = load_segmenter(request.device)
        found = look_here(segmenter, request.volume, result.prompt, point_zyx, z_range=z_range,
                          threshold=result.threshold, min_lesion_mm3=result.min_lesion_mm3,
                          seed=request.options.get("seed", 0), window=result.window, modality=result.modality,
                          force_prompt=bool(request.options.get("force_prompt")), mirror=result.mirror)
        return found, None
    except BoltzformerError as exc:
        return None, f"look here: {exc}"
    except Exception as exc:  # noqa: BLE001 - reported, never raised into Qt
        log.exception("look here failed")
        return None, f"look here failed: {type(exc).__name__}: {exc}".splitlines()[0]
