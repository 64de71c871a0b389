"""The BoltzFormer dock panel: prompt -> segmentation layers, lesion table, exports.

The panel gathers its settings into a `RunRequest` (_request), runs `segmentation_job` (_job) in
napari's `thread_worker`, so the viewer never freezes and Cancel stops it between two batches of
slices, and shows what comes back as layers (_result_layers), a table (_lesion_table) and
notifications; it keeps the runs of its viewer and which one is active. Its layout is
_panel_ui's; its parts have modules of their own: the prompt field (_prompt), the heatmap
controls (_heatmap), the review loop (_review), the exports (_export), display windows
(_windowing) and the canvas text and camera (_view). The parts read the active run through the
panel they are given; none imports this module.

No tensor math here: the model, thresholds, components and the lesion table all come from
`boltzformer`. torch is imported only when the panel is created (to list devices) and when it
runs.
"""

from __future__ import annotations

import threading
import time
import uuid

from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import QFormLayout, QWidget

from ._job import SEGMENTERS, JobOutcome, JobStatus, RunRequest, format_seconds, segmentation_job
from ._layers import GEOMETRY_KEY, layer_array, to_layer_shape
from ._lesion_table import intensity_header, lesion_totals, organ_totals
from ._panel_ui import THRESHOLD_STEPS, build_ui
from ._prompt import known_prompts
from ._qt import scroll_to
from ._request import NOT_STARTED, build_request, scan_changed_during, usable_image
from ._result_layers import (RUN_KEY, follow_renamed_images, keep_ground_truth_on_top, layer_of, outline_ground_truth,
                             put_layers, result_layers, wanted_layers)
from ._view import CanvasLabels, SavedView, zoom_to
from ._windowing import apply_window, follow_window


# -- the panel -----------------------------------------------------------------------------------
class BoltzFormerWidget(QWidget):
    """Dock panel. napari passes `napari_viewer`; tests may inject `segmenter` or `weights`.

    weights: a weights source for Segmenter.from_pretrained (None: the bundled weights).
    segmenter: a ready Segmenter, used for its own device (and 'auto').
    """

    def __init__(self, napari_viewer, weights=None, segmenter=None, parent=None):
        super().__init__(parent)
        # napari's Plugins menu hands a PublicOnlyProxy whose layers are new proxies at each access
        # (`is` and weak references never hold: the exports lost the review): use the viewer itself
        self.viewer = napari_viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self._weights = weights
        self._segmenter = segmenter
        self._worker = None
        self._stop = threading.Event()
        self._request: RunRequest | None = None
        self._results: dict[str, tuple] = {}  # run id -> (SegmentationResult, RunRequest)
        self._run_info: dict[str, dict] = {}  # run id -> {"target", "kind"} of its prompt
        self._active_run: str | None = None
        self._saved_view = SavedView(napari_viewer)  # the view before the first jump to a lesion
        self._organ_cache: tuple | None = None  # (key, summary): organ_summary of the active view
        self._chosen_image = None  # the layer picked in the Image box (it follows a rename)
        self._images_seen = follow_renamed_images(napari_viewer, {}, [])  # id -> (image layer, name when seen)
        self._finder = None  # the worker finding the 3D detector's candidates, while it runs
        self._run_started = 0.0
        self._closed_mid_run = False  # the dock was closed while a run went on: it stops, shows nothing
        self.model_calls = 0  # runs started (tests check that re-thresholding starts none)
        self.batch_size: int | None = None  # slices per batch; None: the Segmenter's default

        build_ui(self)
        self._on_threshold_moved(self.threshold_slider.value(), schedule=False)
        self.exports.update()
        self._load_prompt_list()
        self._on_scope_changed()
        self.canvas_labels = CanvasLabels(napari_viewer)
        self._connect_viewer()
        outline_ground_truth(napari_viewer)
        self.prompt_edit.suggest_from(napari_viewer)  # a sample opened before the panel: its prompt
        self._refresh_images()
        self._gone = threading.Event()  # set once Qt has deleted the panel (a closed viewer)
        self.destroyed.connect(self._gone.set)
        self.destroyed.connect(self._stop.set)  # a closed viewer stops a running job
        self.reviewer.connect()
        self.reviewer.adopt()  # a reopened panel takes over the reviewed results of its viewer

    # ---- construction -------------------------------------------------------------------------
    def _connect_viewer(self):
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layers_changed)
        layers.events.moved.connect(self._on_layers_changed)
        layers.events.renamed.connect(self._on_layers_changed)  # the Image box lists layers by name
        layers.selection.events.active.connect(self._on_active_layer)
        self.viewer.dims.events.current_step.connect(self.heatmap.on_step)
        self.viewer.dims.events.axis_labels.connect(self.heatmap.apply_tau_label)

    def _load_prompt_list(self):
        """Completion list: prompts the model knows (read from its config, no torch) + recent."""
        known, label, tip = known_prompts(self._segmenter, self._weights)
        self.model_label.setText(label)
        self.model_label.setToolTip(tip)
        self.prompt_edit.set_known(known)

    # ---- viewer bookkeeping -------------------------------------------------------------------
    def _image_layers(self):
        return [layer for layer in self.viewer.layers if usable_image(layer)]

    def _on_layers_changed(self, event=None):
        outline_ground_truth(self.viewer)
        self.prompt_edit.suggest_from(self.viewer)  # a sample opened: its prompt, ready to run
        self._refresh_images()
        follow_renamed_images(self.viewer, self._images_seen, [request for _, request in self._results.values()])
        self._forget_runs_without_layers()
        if self._active_run not in self._results:
            self._set_active_run(None)

    def _forget_runs_without_layers(self):
        """Drop the arrays of runs no layer shows any more: all their layers deleted, or taken
        over by a re-run of the same prompt (its layers are updated in place, with no layer event:
        each re-run kept its predecessor's arrays, about 9 bytes a voxel)."""
        live = {(layer.metadata or {}).get(RUN_KEY) for layer in self.viewer.layers}
        for run_id in [r for r in self._results if r not in live]:
            del self._results[run_id]
            self._run_info.pop(run_id, None)

    def _refresh_images(self):
        images = self._image_layers()
        names = [layer.name for layer in images]
        chosen = next((layer for layer in images if layer is self._chosen_image), None)
        current = chosen.name if chosen is not None else self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        else:
            active = self.viewer.layers.selection.active
            if active is not None and active.name in names:
                self.image_combo.setCurrentText(active.name)
        self.image_combo.blockSignals(False)
        self._on_image_changed()

    def image_layer(self):
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def _on_image_changed(self, *_):
        layer = self.image_layer()
        self._chosen_image = layer
        if layer is not None and self.status_label.text() == NOT_STARTED:  # said of a missing image
            self.status_label.setText("")
        nz = int(layer_array(layer).shape[0]) if layer is not None and layer.ndim == 3 else 1
        for spin in (self.range_start, self.range_stop):
            spin.setRange(0, max(0, nz - 1))
        if self.range_stop.value() == 0:
            self.range_stop.setValue(nz - 1)
        if layer is not None:
            modality = ((layer.metadata or {}).get(GEOMETRY_KEY) or {}).get("modality")
            self.window_combo.setEnabled(modality != "MR")

    def _on_scope_changed(self, *_):
        is_range = self.scope_combo.currentText() == "slice range"
        self.range_start.setEnabled(is_range)
        self.range_stop.setEnabled(is_range)
        form = self.range_start.parentWidget().layout()
        if isinstance(form, QFormLayout) and hasattr(form, "setRowVisible"):  # Qt >= 6.4
            form.setRowVisible(self._range_row, is_range)

    def _on_window_changed(self, *_):
        """An explicit window preset is also applied to the image layer's display."""
        name = self.window_combo.currentData()
        layer = self.image_layer()
        if name is None or layer is None:
            return
        if ((layer.metadata or {}).get(GEOMETRY_KEY) or {}).get("modality") == "MR":
            return
        apply_window(layer, name)

    def _on_active_layer(self, event=None):
        layer = self.viewer.layers.selection.active
        if layer is None:
            return
        self.reviewer.note_keys_taken(layer)
        run_id = (layer.metadata or {}).get(RUN_KEY)
        if run_id in self._results and run_id != self._active_run:
            self._set_active_run(run_id)

    # ---- running ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def load_segmenter(self, device: str):
        """The Segmenter for `device` (called in the worker thread)."""
        injected = self._segmenter
        if injected is not None:
            if device in ("auto", injected.device.type):
                return injected
            return SEGMENTERS.get(injected.info.get("weights_path"), device)
        return SEGMENTERS.get(self._weights, device)

    def run(self):
        """Start a run in a worker thread (no-op while one is running)."""
        from napari.qt.threading import thread_worker

        if self.running:
            return
        request = build_request(self)
        if request is None:
            self.status_label.setText(NOT_STARTED)
            return
        self.prompt_edit.remember(request.prompt)
        self._request = request
        self._stop.clear()
        self._closed_mid_run = False
        self.model_calls += 1
        self._run_started = time.perf_counter()
        worker = thread_worker(segmentation_job, start_thread=False, ignore_errors=True)(
            request, self.load_segmenter, self._stop.is_set
        )
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_running(True)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("starting…")
        self.status_label.setText("starting…")
        worker.start()

    def cancel(self):
        """Stop the running job after the batch in progress."""
        if self.running:
            self._stop.set()
            self.status_label.setText("cancelling after the current batch…")
            if self.cancel_button.hasFocus():  # not on to the heatmap's colour box (see _set_running)
                self.prompt_edit.setFocus()
            self.cancel_button.setEnabled(False)

    def event(self, event):
        # napari's close button takes the panel out of its dock (parent None) without deleting it
        if event.type() == QEvent.Type.ParentChange and self.parent() is None and self.running:
            self._closed_mid_run = True
            self._stop.set()
        return super().event(event)

    def _set_running(self, running: bool):
        # the enabled button first and the focus handed over: a disabled Run passed the focus on to
        # the heatmap's colour box, where the next arrow key changed the heatmap
        now, then = (self.cancel_button, self.run_button) if running else (self.run_button, self.cancel_button)
        now.setEnabled(True)
        if then.hasFocus():
            now.setFocus()
        then.setEnabled(False)

    def _on_yielded(self, item):
        from napari.utils.notifications import show_warning

        if isinstance(item, JobStatus):
            self.status_label.setText(item.text)
            if item.model:
                self.model_label.setText(item.model)
            if item.level == "warning":
                show_warning(item.text)
            return
        total = max(1, int(item.slices_total))
        self.progress_bar.setFormat("%v / %m slices")
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(int(item.slices_done))
        self.status_label.setText(
            f"{item.slices_done} / {item.slices_total} slices · {format_seconds(item.eta_s)} left"
        )

    def _on_returned(self, outcome: JobOutcome):
        from napari.utils.notifications import show_error, show_info, show_warning

        request = self._request
        if self._closed_mid_run:  # layers from a panel no longer shown would come out of nowhere
            show_info("BoltzFormer: the panel was closed during the run; it was stopped and no layer was changed")
            return
        if outcome.error is not None:
            self.status_label.setText("failed")
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)
            self.progress_bar.setFormat("failed")
            show_error(outcome.error)
            return
        result = outcome.result
        if result is None:
            return
        changed = scan_changed_during(self.viewer, request)
        if changed:
            self.status_label.setText("the image changed during the run; no layer was changed")
            show_warning(f"BoltzFormer: {changed}")
            return
        for text in (w for w in result.warnings if w not in outcome.warned):
            show_warning(text)
        elapsed = time.perf_counter() - self._run_started
        if not result.complete:
            finished, kept = result.slices_done, result.finished_slices
            if not request.keep_partial or finished == 0:
                self.status_label.setText("cancelled; no layer was changed")
                show_info(f"BoltzFormer: cancelled after {finished} slices; no layer was changed")
                return
            self.status_label.setText(f"cancelled; kept {finished} finished slices")
            where = f"slices {kept[0]}..{kept[1] - 1}" if kept else "axial slices, counted from the canonical first"
            show_info(f"BoltzFormer: cancelled; showing the {finished} finished {where}")
        else:
            # No count here: the threshold and filters change it; the Lesions box shows the current one
            passes = (", each slice also mirrored" if result.mirror else "") + (", in three planes" if result.planes == "three" else "")
            self.status_label.setText(f"done in {format_seconds(elapsed)} on {outcome.device}{passes}")
        if self._post_settings() != (result.threshold, result.min_lesion_mm3, result.fp_reduction,
                                     result.nodule_detector):  # changed while it ran: the panel's settings win
            threshold, min_mm3, fp_on, detector_on = self._post_settings()
            result.rethreshold(threshold, min_mm3, fp_reduction=fp_on, nodule_detector=detector_on)
            show_info("BoltzFormer: applied the threshold and filter settings changed during the run")
        self.show_result(result, request, num_queries=outcome.num_queries, target=outcome.target, kind=outcome.kind)
        if outcome.kind == "lesion":
            scroll_to(self.table)  # the reader's next step: the table, below the fold on a small screen

    def _on_finished(self):
        self._worker = None
        self._set_running(False)

    def wait(self, timeout_s: float = 60.0):
        """Block (processing Qt events) until the run and the 3D detector's pass end (scripts, tests)."""
        from qtpy.QtWidgets import QApplication

        deadline = time.perf_counter() + timeout_s
        while (self.running or self._finder is not None) and time.perf_counter() < deadline:
            QApplication.processEvents()
            time.sleep(0.005)
        if self.running or self._finder is not None:
            raise TimeoutError(f"BoltzFormer run still going after {timeout_s} s")

    # ---- results -> layers --------------------------------------------------------------------
    def show_result(self, result, request: RunRequest, num_queries: int | None = None,
                    target: str | None = None, kind: str = "lesion"):
        """Create or update the layers of `result` (mask, probability, uncertainty, attention)
        and make it the active result.

        The heatmap is drawn above the mask (its hottest cells would hide under the mask fill)
        and ground-truth outlines above both; a new heatmap opens on the decoder layer where the
        search is sharpest (see _result_layers.put_layers).
        """
        run_id = uuid.uuid4().hex
        self._run_info[run_id] = {"target": target, "kind": kind, "num_queries": num_queries}
        existing = result_layers(self.viewer, result.prompt, request.image_name)
        wanted = wanted_layers(self.viewer, result, request, existing, num_queries,
                               self.heatmap.options(result.attention))
        for role, layer in existing.items():
            if role not in wanted:  # e.g. an uncertainty layer from an earlier run with runs > 1
                self.viewer.layers.remove(layer)
        if "mask" in existing:  # its review goes on with the new run (decisions are voxels, see _review)
            self.reviewer.remember_replaced(existing["mask"])
        self._results[run_id] = (result, request)
        self._organ_cache = None
        put_layers(self.viewer, run_id, result, wanted, existing, self.heatmap.update_legend)
        self._forget_runs_without_layers()
        self.reviewer.attach(run_id, result, request, self._run_info[run_id])
        keep_ground_truth_on_top(self.viewer)
        if request.image_name in self.viewer.layers:  # in the window the network saw
            follow_window(self.viewer.layers[request.image_name], result.window)
        if self._saved_view.kept:  # a lesion jump zoomed in: the new run starts from the overview
            self._saved_view.restore(forget=True)
            self.restore_view_button.setEnabled(False)
        self._set_active_run(run_id)
        # the panel shows the result whose layer is selected, and exports take the selected mask: a
        # re-run updates its layers in place and left another run's layer selected
        selected = self.viewer.layers.selection.active
        if selected is not None and (selected.metadata or {}).get(RUN_KEY) not in (None, run_id):
            self.viewer.layers.selection.active = self._mask_layer_of(run_id)

    def _layer_of(self, run_id: str | None, role: str):
        return layer_of(self.viewer, run_id, role)

    def _mask_layer_of(self, run_id: str | None):
        return self._layer_of(run_id, "mask")

    def active_result(self):
        entry = self._results.get(self._active_run)
        return None if entry is None else entry[0]

    def _set_active_run(self, run_id: str | None):
        self._active_run = run_id
        entry = self._results.get(run_id)
        if entry is not None:
            result = entry[0]
            self.threshold_slider.blockSignals(True)
            self.threshold_slider.setValue(int(round(result.threshold * THRESHOLD_STEPS)))
            self.threshold_slider.blockSignals(False)
            self._on_threshold_moved(self.threshold_slider.value(), schedule=False)
            self.min_lesion_spin.blockSignals(True)
            self.min_lesion_spin.setValue(result.min_lesion_mm3)
            self.min_lesion_spin.blockSignals(False)
            for check, on in ((self.fp_check, result.fp_reduction), (self.detector_check, result.nodule_detector)):
                check.blockSignals(True)
                check.setChecked(bool(on))
                check.blockSignals(False)
        self.heatmap.sync()
        self.refresh_view()
        self.exports.update()

    # ---- threshold ----------------------------------------------------------------------------
    def threshold(self) -> float:
        return self.threshold_slider.value() / THRESHOLD_STEPS

    def _on_threshold_moved(self, value: int, schedule: bool = True):
        self.threshold_label.setText(f"{value / THRESHOLD_STEPS:.2f}")
        if schedule:
            self._rethreshold_timer.start()

    def _post_settings(self) -> tuple[float, float, bool, bool]:
        """(threshold, min. lesion mm³, FP filter on, nodule detector on) as the panel shows them."""
        return self.threshold(), self.min_lesion_spin.value(), self.fp_check.isChecked(), self.detector_check.isChecked()

    def apply_threshold(self, force: bool = False):
        """Re-threshold the active result's stored probabilities (no inference) and redraw.

        It runs here, on the main thread (the layers change with it; 1-4 s on a 224 x 512² CT on
        2 cores, under a busy cursor), but for the 3D nodule detector's first pass (seconds more):
        that runs on a worker thread, and its end applies the settings shown then."""
        from qtpy.QtWidgets import QApplication

        self._rethreshold_timer.stop()
        entry = self._results.get(self._active_run)
        if entry is None or self._finder is not None:  # a finder's end applies the settings
            return
        result, request = entry
        threshold, min_mm3, fp_on, detector_on = self._post_settings()
        if (not force and threshold == result.threshold and min_mm3 == result.min_lesion_mm3
                and fp_on == result.fp_reduction and detector_on == result.nodule_detector):
            return
        if (detector_on and fp_on and not result.detector_candidates_found
                and result.detector_skip_reason() is None):
            self._find_detector_candidates(result)
            return
        known = set(result.warnings)
        status = self.status_label.text()
        self.status_label.setText("re-thresholding…")
        self.status_label.repaint()  # painted now: the event loop waits for this call
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        try:
            result.rethreshold(threshold, min_mm3, fp_reduction=fp_on, nodule_detector=detector_on)
        finally:
            QApplication.restoreOverrideCursor()
            self.status_label.setText(status)
        if new := [w for w in result.warnings if w not in known]:  # e.g. the detector cannot run here
            from napari.utils.notifications import show_warning

            for text in new:
                show_warning(text)
        self._organ_cache = None
        self.refresh_view()

    def _find_detector_candidates(self, result):
        """The 3D nodule detector's candidate pass on a worker thread; then apply_threshold."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        status = self.status_label.text()
        self.status_label.setText("finding 3D nodule candidates…")

        def done(*_):
            if self._gone.is_set():  # the viewer closed meanwhile: no label or layer left to update
                return
            self._finder = None
            self.status_label.setText(status)
            self.apply_threshold(force=True)

        def failed(exc):
            if self._gone.is_set():
                return
            self.detector_check.setChecked(False)  # off again: the result stays as it was shown
            show_error(f"BoltzFormer: the 3D nodule detector failed: {type(exc).__name__}: {exc}".splitlines()[0])

        worker = thread_worker(result.find_detector_candidates, start_thread=False, ignore_errors=True)()
        worker.errored.connect(failed)
        worker.finished.connect(done)
        self._finder = worker
        worker.start()

    # ---- what is shown: mode, size filter, table ------------------------------------------------
    def current_mode(self) -> str:
        """'organ' or 'lesion': the mode chosen, else the one the active prompt's target calls for."""
        chosen = self.mode_combo.currentData()
        if chosen:
            return chosen
        return self._run_info.get(self._active_run, {}).get("kind", "lesion")

    def min_diameter_mm(self) -> float:
        return float(self.min_diameter_combo.currentData() or 0.0)

    def organ_summary(self) -> dict | None:
        """The active result as one structure (boltzformer.postprocess.organ_summary_of), cached
        until the result or its threshold changes."""
        from boltzformer import postprocess

        result = self.active_result()
        if result is None:
            return None
        target = self._run_info.get(self._active_run, {}).get("target")
        key = (self._active_run, id(result.labels), target)
        if self._organ_cache is None or self._organ_cache[0] != key:
            self._organ_cache = (key, postprocess.organ_summary_of(result, target))
        return self._organ_cache[1]

    def shown_lesions(self) -> tuple[list[dict], list[dict]]:
        """(rows shown, rows hidden by the size filter) in lesion mode."""
        result = self.active_result()
        if result is None:
            return [], []
        limit = self.min_diameter_mm()
        if self.current_mode() == "lesion" and self.reviewer.view() is not None:
            return self.reviewer.split_rows(limit)  # with their review status
        shown = [r for r in result.lesions if r.get("mean_axial_diameter_mm", r["longest_axial_diameter_mm"]) >= limit]
        hidden = [r for r in result.lesions if r not in shown]
        return shown, hidden

    def refresh_view(self):
        """Mask layer and table of the active result as the mode and the size filter say."""
        from boltzformer import postprocess

        result = self.active_result()
        mode = self.current_mode()
        self.result_box.setTitle("Organ" if mode == "organ" and result is not None else "Lesions")
        self.min_diameter_combo.setEnabled(mode == "lesion")
        layer = self._mask_layer_of(self._active_run)
        if result is not None and layer is not None and result.labels is not None:
            request = self._results[self._active_run][1]
            reviewed = mode == "lesion" and self.reviewer.view() is not None
            if reviewed:
                self.reviewer.flush_edits(pending_only=True)  # paint not yet taken in must not be drawn over
            if mode == "organ":
                summary = self.organ_summary()
                ids = [] if summary is None else summary["lesion_ids"]
                mask = postprocess.select_labels(result.labels, ids)
            elif reviewed:
                mask = self.reviewer.mask_of(self.shown_lesions()[0])
            else:
                shown, hidden = self.shown_lesions()
                mask = result.mask if not hidden else postprocess.select_labels(result.labels,
                                                                                [r["lesion_id"] for r in shown])
            layer.data = to_layer_shape(mask, request.geometry)
            self.reviewer.displayed(mask if reviewed else None)
        self.fill_table()

    def fill_table(self):
        """The table and the total above it: the active result as the mode and the size filter say."""
        result = self.active_result()
        if result is None:
            self.table.clear_rows()
            self.result_label.setText("no result yet")
            self.result_label.setToolTip("")
            self.result_detail.setText("")
            return
        from boltzformer.intensity import normalise_modality

        is_ct = normalise_modality(result.modality) == "CT"
        header = intensity_header(is_ct, self._results[self._active_run][1].geometry.get("sequence"), result)
        if self.current_mode() == "organ":
            summary = self.organ_summary()
            self.table.show_organ(summary, header, is_ct)
            self._set_summary(*organ_totals(result, summary, self._run_info.get(self._active_run, {}).get("target")))
            self.reviewer.update([])
            return
        shown, hidden = self.shown_lesions()
        self.table.show_lesions(result, self.reviewer.table_rows(shown) if self.reviewer.view() is not None else shown,
                                header, is_ct)
        self._set_summary(*lesion_totals(result, shown, hidden, self.min_diameter_mm()))
        self.reviewer.update(shown)

    def _set_summary(self, total: str, details: str):
        """The total on one line (cut with … if the panel is narrow; whole in the tooltip)."""
        metrics = self.result_label.fontMetrics()
        width = max(80, self.result_label.width() if self.result_label.isVisible() else 400)
        self.result_label.setText(metrics.elidedText(total, Qt.TextElideMode.ElideRight, width))
        self.result_label.setToolTip(total)
        self.result_detail.setText(details)

    def go_to_lesion(self, lesion: dict):
        """Jump and zoom to a lesion (or the organ) of the active result (_view.zoom_to); the view
        before the first jump is kept for restore_view, and never zoomed out of."""
        layer = self._mask_layer_of(self._active_run)
        if self._active_run not in self._results or layer is None:
            return
        zoom_to(self.viewer, layer, lesion, min_zoom=self._saved_view.keep())
        self.restore_view_button.setEnabled(True)

    def restore_view(self):
        """Back to the view of before the first jump to a lesion (_view.SavedView)."""
        from napari.utils.notifications import show_info

        if self._saved_view.kept and (why := self._saved_view.restore()):
            return show_info(f"Restore view: {why}")
        self.restore_view_button.setEnabled(False)

