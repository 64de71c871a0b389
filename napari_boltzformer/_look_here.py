"""Look here, the panel's review part that re-runs a few slices around a spot: armed by its button
(a crosshair, then a click), an Alt-click or H; the slices are segmented again on a worker thread
with the Boltzmann sampling pulled toward the spot (boltzformer.look_here), and what it finds is
added to the review as a candidate to accept or reject.

`LookHere` is a part of ReviewPanel (_review), which holds what it uses: `panel`, `look_button`,
`looking`, `session()`, `view()`, `find_row()` and `select()`.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import QTimer

from ._view import shown_voxel

log = logging.getLogger(__name__)


class LookHere:
    """The look-here methods of ReviewPanel."""

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

    def _looked(self, session, outcome):
        """A look-here run of `session` (the ReviewSession it ran for) ended with `outcome`."""
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


def _hold_the_brush(layer) -> None:
    """A look-here click on a labels layer in a drawing mode must not also draw: napari hands the
    press to the viewer's callbacks (this one) and then to the active layer's, so the layer
    goes to pan/zoom for this press and back to its mode right after."""
    from napari.layers import Labels

    if isinstance(layer, Labels) and str(layer.mode) in ("paint", "erase", "fill", "polygon"):
        mode = layer.mode
        layer.mode = "pan_zoom"
        QTimer.singleShot(0, lambda: setattr(layer, "mode", mode))


def _look_here_job(load_segmenter, session, point_zyx, z_range):
    """Worker thread, for `session` (a ReviewSession): (LookHereResult, None) or (None, message); never
    raises."""
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
