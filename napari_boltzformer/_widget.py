"""The BoltzFormer dock panel: prompt -> segmentation layers, lesion table, exports.

The heavy work is `segmentation_job`, a plain generator over `Segmenter.iter_segment` that
yields progress and returns a `JobOutcome`; the panel runs it in napari's `thread_worker`, so the
viewer never freezes, and Cancel stops it between two batches of slices. The job never raises:
every failure comes back as a message the panel shows as a napari notification.

No tensor math here: the model, thresholds, components and the lesion table all come from
`boltzformer`. torch is imported only when the panel is created (to list devices) and when it
runs.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qtpy.QtCore import QStringListModel, Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QCompleter,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._layers import (
    COLOR_KEY,
    GEOMETRY_KEY,
    MASK_COLORS,
    PROMPT_KEY,
    ROLE_KEY,
    SOURCE_KEY,
    WINDOW_KEY,
    attention_layer_data,
    geometry_from_layer,
    labels_layer_data,
    layer_array,
    mask_volume,
    next_mask_color,
    probability_layer_data,
    resolve_window_name,
    to_layer_shape,
    uncertainty_layer_data,
    volume_from_layer,
)

log = logging.getLogger(__name__)

RUN_KEY = "boltzformer_run"  # metadata: id of the run whose result a layer shows
RESULT_ROLES = ("mask", "probability", "uncertainty", "attention")
SCOPES = ("all slices", "current slice", "slice range")
DEVICES = (("auto", "auto"), ("CUDA", "cuda"), ("MPS", "mps"), ("CPU", "cpu"))
MODALITIES = (("auto", None), ("CT", "CT"), ("MR", "MR"))
MAX_RECENT_PROMPTS = 12
THRESHOLD_STEPS = 100  # slider resolution: thresholds 0.01 .. 0.99
RETHRESHOLD_DELAY_MS = 120  # slider moves closer together than this are merged
EMPTY_PROMPT = 'the prompt is empty; type what to segment, e.g. "lung nodule"'
NO_IMAGE = "no image layer: open a CT or MRI volume first (File > Open, or File > Open Sample > napari-boltzformer)"
TABLE_COLUMNS = ("id", "mm³", "Ø mm", "slices", "mean HU", "round")
TABLE_TIPS = (
    "lesion id (1 = largest)", "volume in mm³", "longest axial diameter in mm",
    "first–last slice (z index)", "mean intensity (HU for CT)",
    "3D false-positive filter: blobness from the Hessian (1 = round like a nodule, 0 = a tube like a vessel); "
    "– where the filter does not apply (not a lung prompt on CT in HU)",
)


# -- the model, loaded once per (weights, device) ------------------------------------------------
class SegmenterCache:
    """One Segmenter per (weights source, device), loaded on first use; safe across threads."""

    def __init__(self):
        self._items: dict = {}
        self._lock = threading.Lock()

    def get(self, source, device: str):
        from boltzformer.segmenter import Segmenter, resolve_device

        dev = str(resolve_device(device))
        key = (None if source is None else str(source), dev)
        with self._lock:
            segmenter = self._items.get(key)
            if segmenter is None:
                segmenter = Segmenter.from_pretrained(source, device=dev)
                self._items[key] = segmenter
        return segmenter

    def clear(self):
        with self._lock:
            self._items.clear()


SEGMENTERS = SegmenterCache()


# -- the job (runs in a worker thread; also usable headless) -------------------------------------
@dataclass
class RunRequest:
    volume: object  # boltzformer.io.Volume
    prompt: str
    device: str  # auto | cuda | mps | cpu
    image_name: str
    geometry: dict
    options: dict  # keyword arguments of Segmenter.iter_segment
    want_probability: bool = True
    want_attention: bool = True
    keep_partial: bool = False


@dataclass
class JobStatus:
    text: str
    level: str = "info"  # info | warning


@dataclass
class JobOutcome:
    result: object | None = None  # SegmentationResult
    error: str | None = None
    device: str | None = None
    num_queries: int | None = None  # of the network: the largest possible attention count
    notes: list[str] = field(default_factory=list)


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def segmentation_job(request: RunRequest, load_segmenter, should_stop):
    """Generator: yields JobStatus and boltzformer Progress; returns a JobOutcome (never raises).

    load_segmenter(device) -> Segmenter. Out of accelerator memory: runs again on the CPU.
    """
    from boltzformer.errors import BoltzformerError

    outcome = JobOutcome()
    try:
        yield JobStatus(f"loading the model ({request.device})")
        segmenter = load_segmenter(request.device)
        outcome.device = str(segmenter.device)
        outcome.num_queries = int(segmenter.config.num_queries)
        yield JobStatus(f"segmenting on {outcome.device}")
        try:
            outcome.result = yield from segmenter.iter_segment(
                request.volume, request.prompt, should_stop=should_stop, **request.options
            )
        except Exception as exc:  # noqa: BLE001 - only out-of-memory on an accelerator is retried
            if not is_out_of_memory(exc) or segmenter.device.type == "cpu":
                raise
            segmenter.release_memory()
            note = f"{outcome.device.upper()} ran out of memory; running again on the CPU (slower)"
            outcome.notes.append(note)
            yield JobStatus(note, level="warning")
            segmenter = load_segmenter("cpu")
            outcome.device = "cpu"
            outcome.result = yield from segmenter.iter_segment(
                request.volume, request.prompt, should_stop=should_stop, **request.options
            )
    except BoltzformerError as exc:
        outcome.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is reported, never raised into Qt
        log.exception("BoltzFormer run failed")
        outcome.error = f"BoltzFormer failed: {type(exc).__name__}: {exc}".splitlines()[0]
    return outcome


# -- small Qt helpers ----------------------------------------------------------------------------
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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "mask"


def _format_seconds(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "…"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


# -- the panel -----------------------------------------------------------------------------------
class BoltzFormerWidget(QWidget):
    """Dock panel. napari passes `napari_viewer`; tests may inject `segmenter` or `weights`.

    weights: a weights source for Segmenter.from_pretrained (None: the bundled weights).
    segmenter: a ready Segmenter, used for its own device (and 'auto').
    """

    recent_prompts: list[str] = []  # shared by the panels of this session, newest first

    def __init__(self, napari_viewer, weights=None, segmenter=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._weights = weights
        self._segmenter = segmenter
        self._worker = None
        self._stop = threading.Event()
        self._request: RunRequest | None = None
        self._results: dict[str, tuple] = {}  # run id -> (SegmentationResult, RunRequest)
        self._active_run: str | None = None
        self._run_started = 0.0
        self.model_calls = 0  # runs started (tests check that re-thresholding starts none)
        self.batch_size: int | None = None  # slices per batch; None: the Segmenter's default

        self._build()
        self._connect_viewer()
        self._refresh_images()
        self.destroyed.connect(self._stop.set)  # a closed viewer stops a running job

    # ---- construction -------------------------------------------------------------------------
    def _build(self):
        from boltzformer import intensity
        from boltzformer.segmenter import DEFAULT_MIN_LESION_MM3, available_devices

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)

        inputs = QGroupBox("Input")
        form = QFormLayout(inputs)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to segment (CT in HU or MRI)")
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_combo)
        self.prompt_edit = QLineEdit()
        self.prompt_edit.setPlaceholderText("e.g. lung nodule")
        self.prompt_edit.setClearButtonEnabled(True)
        self.prompt_edit.returnPressed.connect(self.run)
        self._prompt_model = QStringListModel(self)
        completer = QCompleter(self._prompt_model, self)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        self.prompt_edit.setCompleter(completer)
        form.addRow("Prompt", self.prompt_edit)
        self.modality_combo = QComboBox()
        for text, value in MODALITIES:
            self.modality_combo.addItem(text, value)
        form.addRow("Modality", self.modality_combo)
        self.window_combo = QComboBox()
        self.window_combo.addItem("auto (from prompt)", None)
        for name, w in intensity.WINDOWS.items():
            self.window_combo.addItem(f"{name.replace('_', ' ')}  (C {w.center_hu:g} / W {w.width_hu:g})", name)
        self.window_combo.setToolTip("CT window the network sees; choosing one also applies it to the image layer")
        self.window_combo.currentIndexChanged.connect(self._on_window_changed)
        form.addRow("CT window", self.window_combo)
        self.device_combo = QComboBox()
        avail = available_devices()
        for text, value in DEVICES:
            self.device_combo.addItem(text, value)
            if value != "auto" and not avail.get(value, False):
                item = self.device_combo.model().item(self.device_combo.count() - 1)
                item.setEnabled(False)
                item.setToolTip(f"{text} is not available on this machine")
        form.addRow("Device", self.device_combo)
        layout.addWidget(inputs)

        run_box = QGroupBox("Run")
        rform = QFormLayout(run_box)
        rform.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        scope_row = QHBoxLayout()
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.scope_combo.currentIndexChanged.connect(self._on_scope_changed)
        self.range_start = QSpinBox()
        self.range_stop = QSpinBox()
        for spin, tip in ((self.range_start, "first slice (z index)"), (self.range_stop, "last slice (z index, included)")):
            spin.setToolTip(tip)
            spin.setEnabled(False)
        scope_row.addWidget(self.scope_combo, 2)
        scope_row.addWidget(self.range_start, 1)
        scope_row.addWidget(QLabel("–"))
        scope_row.addWidget(self.range_stop, 1)
        rform.addRow("Scope", scope_row)
        thr_row = QHBoxLayout()
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(1, THRESHOLD_STEPS - 1)
        self.threshold_slider.setValue(THRESHOLD_STEPS // 2)
        self.threshold_slider.setToolTip("Probability threshold; changing it re-thresholds the last result without re-running")
        self.threshold_label = QLabel()
        self.threshold_label.setMinimumWidth(32)
        thr_row.addWidget(self.threshold_slider, 1)
        thr_row.addWidget(self.threshold_label)
        rform.addRow("Threshold", thr_row)
        self.min_lesion_spin = QDoubleSpinBox()
        self.min_lesion_spin.setRange(0.0, 1e6)
        self.min_lesion_spin.setDecimals(1)
        self.min_lesion_spin.setSuffix(" mm³")
        self.min_lesion_spin.setValue(DEFAULT_MIN_LESION_MM3)
        self.min_lesion_spin.setToolTip("Connected components smaller than this are dropped")
        rform.addRow("Min. lesion", self.min_lesion_spin)
        seed_row = QHBoxLayout()
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("Seed of the Boltzmann sampling")
        self.runs_spin = QSpinBox()
        self.runs_spin.setRange(1, 32)
        self.runs_spin.setToolTip("Sampling runs with seeds seed, seed+1, ...; more than one gives an uncertainty layer")
        seed_row.addWidget(self.seed_spin, 1)
        seed_row.addWidget(QLabel("Runs"))
        seed_row.addWidget(self.runs_spin, 1)
        rform.addRow("Seed", seed_row)
        self.probability_check = QCheckBox("probability layer")
        self.probability_check.setChecked(True)
        self.attention_check = QCheckBox("attention heatmaps")
        self.attention_check.setChecked(True)
        self.attention_check.setToolTip("Where each decoder layer sampled its tokens (one layer, a 'decoder layer' slider)")
        self.keep_partial_check = QCheckBox("keep finished slices on cancel")
        self.fp_check = QCheckBox("3D false-positive filter")
        self.fp_check.setChecked(True)
        self.fp_check.setToolTip("Lung prompts on CT in HU: drop candidates outside the lungs and vessel-like "
                                 "tubes that continue across slices (scores in the lesion table)")
        self.fp_check.toggled.connect(lambda _=None: self.apply_threshold(force=True))
        self.force_prompt_check = QCheckBox("force prompt")
        self.force_prompt_check.setToolTip("Run a prompt even when it names nothing the model was trained to find")
        checks = QVBoxLayout()
        checks.setSpacing(2)
        checks.addWidget(self.probability_check)
        checks.addWidget(self.attention_check)
        checks.addWidget(self.keep_partial_check)
        checks.addWidget(self.fp_check)
        checks.addWidget(self.force_prompt_check)
        rform.addRow("Outputs", checks)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(lambda: self.cancel())
        buttons.addWidget(self.run_button, 2)
        buttons.addWidget(self.cancel_button, 1)
        rform.addRow(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%v / %m slices")
        rform.addRow(self.progress_bar)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        rform.addRow(self.status_label)
        layout.addWidget(run_box)

        result_box = QGroupBox("Lesions")
        rlay = QVBoxLayout(result_box)
        self.result_label = QLabel("no result yet")
        self.result_label.setWordWrap(True)
        rlay.addWidget(self.result_label)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        for col, tip in enumerate(TABLE_TIPS):
            self.table.horizontalHeaderItem(col).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)  # ids: largest lesion first
        # six columns share the panel width: no horizontal scrolling to reach the last one
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.horizontalHeader().setMinimumSectionSize(30)
        self.table.horizontalHeader().setDefaultSectionSize(56)  # a small natural width: the panel decides
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(120)
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.table.cellClicked.connect(self._on_table_clicked)
        rlay.addWidget(self.table, 1)
        export = QHBoxLayout()
        self.export_mask_button = QPushButton("Mask → NIfTI…")
        self.export_mask_button.clicked.connect(lambda: self.export_mask())
        self.export_table_button = QPushButton("Table → CSV…")
        self.export_table_button.clicked.connect(lambda: self.export_table())
        self.export_png_button = QPushButton("View → PNG…")
        self.export_png_button.clicked.connect(lambda: self.export_png())
        for b in (self.export_mask_button, self.export_table_button, self.export_png_button):
            export.addWidget(b)
        rlay.addLayout(export)
        layout.addWidget(result_box, 1)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.model_label.setStyleSheet("color: gray;")
        layout.addWidget(self.model_label)

        self._rethreshold_timer = QTimer(self)
        self._rethreshold_timer.setSingleShot(True)
        self._rethreshold_timer.setInterval(RETHRESHOLD_DELAY_MS)
        self._rethreshold_timer.timeout.connect(self.apply_threshold)
        self.threshold_slider.valueChanged.connect(self._on_threshold_moved)
        self.min_lesion_spin.valueChanged.connect(lambda _: self._rethreshold_timer.start())
        self._on_threshold_moved(self.threshold_slider.value(), schedule=False)
        self._update_export_buttons()
        self._load_prompt_list()

    def _connect_viewer(self):
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layers_changed)
        layers.events.moved.connect(self._on_layers_changed)
        layers.selection.events.active.connect(self._on_active_layer)

    def _load_prompt_list(self):
        """Completion list: prompts the model knows (read from its config, no torch) + recent."""
        known: list[str] = []
        if self._segmenter is not None:
            known = list(self._segmenter.known_prompts)
            source = self._segmenter.info.get("weights_path")
            name = Path(source).stem if source else "injected"
            self.model_label.setText(f"model: {name} on {self._segmenter.device}")
            self.model_label.setToolTip(str(source or ""))
        else:
            from boltzformer import weights as weights_mod
            from boltzformer.errors import BoltzformerError

            try:
                source = weights_mod.resolve(self._weights)
                known = list(weights_mod.read_config(source.config_path).get("prompts", []))
                where = "bundled" if source.description == "bundled" else str(Path(source.weights_path).parent)
                self.model_label.setText(f"model: {Path(source.weights_path).stem} ({where}); loads on first run")
                self.model_label.setToolTip(str(source.weights_path))
            except BoltzformerError as exc:
                self.model_label.setText(f"model: {exc}")
        if not known:  # no weights to ask: offer the training vocabulary
            try:
                from boltzformer.synth.prompts import all_prompts

                known = list(all_prompts())
            except ImportError:
                pass
        self._known_prompts = known
        self._update_completer()

    def _update_completer(self):
        prompts = list(dict.fromkeys([*self.recent_prompts, *self._known_prompts]))
        self._prompt_model.setStringList(prompts)

    # ---- viewer bookkeeping -------------------------------------------------------------------
    def _image_layers(self):
        from napari.layers import Image

        out = []
        for layer in self.viewer.layers:
            if not isinstance(layer, Image) or getattr(layer, "rgb", False):
                continue
            if (layer.metadata or {}).get(ROLE_KEY) in RESULT_ROLES or layer.ndim not in (2, 3):
                continue
            out.append(layer)
        return out

    def _on_layers_changed(self, event=None):
        self._refresh_images()
        live = {(layer.metadata or {}).get(RUN_KEY) for layer in self.viewer.layers}
        for run_id in list(self._results):
            if run_id not in live:  # all its layers were deleted: forget its arrays
                del self._results[run_id]
        if self._active_run not in self._results:
            self._set_active_run(None)

    def _refresh_images(self):
        current = self.image_combo.currentText()
        names = [layer.name for layer in self._image_layers()]
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
        nz = 1
        if layer is not None and layer.ndim == 3:
            nz = int(layer_array(layer).shape[0])
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

    def _on_window_changed(self, *_):
        """An explicit window preset is also applied to the image layer's display."""
        name = self.window_combo.currentData()
        layer = self.image_layer()
        if name is None or layer is None:
            return
        if ((layer.metadata or {}).get(GEOMETRY_KEY) or {}).get("modality") == "MR":
            return
        self._apply_display_window(layer, name)

    def _apply_display_window(self, layer, name: str):
        from boltzformer import intensity

        key = resolve_window_name(name)
        w = intensity.WINDOWS[key]
        limits = (float(w.lower_hu), float(w.upper_hu))
        lo, hi = layer.contrast_limits_range
        layer.contrast_limits_range = (min(lo, limits[0]), max(hi, limits[1]))
        layer.contrast_limits = limits
        layer.metadata[WINDOW_KEY] = [key, *limits]

    def _on_active_layer(self, event=None):
        layer = self.viewer.layers.selection.active
        if layer is None:
            return
        run_id = (layer.metadata or {}).get(RUN_KEY)
        if run_id in self._results and run_id != self._active_run:
            self._set_active_run(run_id)

    # ---- running ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def _scope_slices(self, layer) -> tuple[int, int] | None:
        scope = self.scope_combo.currentText()
        if layer.ndim == 2 or scope == "all slices":
            return None
        nz = int(layer_array(layer).shape[0])
        if scope == "current slice":
            z = int(round(float(layer.world_to_data(self.viewer.dims.point)[-3])))
            z = min(max(z, 0), nz - 1)
            return (z, z + 1)
        start, stop = sorted((self.range_start.value(), self.range_stop.value()))
        return (start, stop + 1)

    def build_request(self) -> RunRequest | None:
        """The run the panel's settings describe; None (after a notification) when impossible."""
        from napari.utils.notifications import show_error

        prompt = self.prompt_edit.text().strip()
        layer = self.image_layer()
        if layer is None:
            show_error(NO_IMAGE)
            return None
        if not prompt:
            show_error(EMPTY_PROMPT)
            return None
        modality = self.modality_combo.currentData()
        try:
            volume = volume_from_layer(layer, modality=modality)
        except ValueError as exc:
            show_error(f"{layer.name}: {exc}")
            return None
        options = {
            "window": self.window_combo.currentData() if self.window_combo.isEnabled() else None,
            "modality": modality,
            "slices": self._scope_slices(layer),
            "runs": self.runs_spin.value(),
            "seed": self.seed_spin.value(),
            "threshold": self.threshold(),
            "min_lesion_mm3": self.min_lesion_spin.value(),
            "return_attention": self.attention_check.isChecked(),
            "batch_size": self.batch_size,
            "fp_reduction": self.fp_check.isChecked(),
            "force_prompt": self.force_prompt_check.isChecked(),
        }
        return RunRequest(
            volume=volume,
            prompt=prompt,
            device=self.device_combo.currentData(),
            image_name=layer.name,
            geometry=geometry_from_layer(layer),
            options=options,
            want_probability=self.probability_check.isChecked(),
            want_attention=self.attention_check.isChecked(),
            keep_partial=self.keep_partial_check.isChecked(),
        )

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
        request = self.build_request()
        if request is None:
            return
        self._remember_prompt(request.prompt)
        self._request = request
        self._stop.clear()
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
        self.status_label.setText("starting…")
        worker.start()

    def cancel(self):
        """Stop the running job after the batch in progress."""
        if self.running:
            self._stop.set()
            self.status_label.setText("cancelling after the current batch…")
            self.cancel_button.setEnabled(False)

    def _set_running(self, running: bool):
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _remember_prompt(self, prompt: str):
        from boltzformer.network.text import normalise_prompt

        text = normalise_prompt(prompt)
        recent = [p for p in type(self).recent_prompts if p != text]
        type(self).recent_prompts[:] = [text, *recent][:MAX_RECENT_PROMPTS]
        self._update_completer()

    def _on_yielded(self, item):
        from napari.utils.notifications import show_warning

        if isinstance(item, JobStatus):
            self.status_label.setText(item.text)
            if item.level == "warning":
                show_warning(item.text)
            return
        total = max(1, int(item.slices_total))
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(int(item.slices_done))
        self.status_label.setText(
            f"{item.slices_done} / {item.slices_total} slices · {_format_seconds(item.eta_s)} left"
        )

    def _on_returned(self, outcome: JobOutcome):
        from napari.utils.notifications import show_error, show_info, show_warning

        request = self._request
        if outcome.error is not None:
            self.status_label.setText("failed")
            show_error(outcome.error)
            return
        result = outcome.result
        if result is None:
            return
        for text in result.warnings:
            show_warning(text)
        elapsed = time.perf_counter() - self._run_started
        if not result.complete:
            start = result.slices[0]
            finished = max(0, result.slices_done - start)
            if not request.keep_partial or finished == 0:
                self.status_label.setText("cancelled; no layer was changed")
                show_info(f"BoltzFormer: cancelled after {finished} slices; no layer was changed")
                return
            self.status_label.setText(f"cancelled; kept {finished} finished slices")
            show_info(f"BoltzFormer: cancelled; showing the {finished} finished slices ({start}..{start + finished - 1})")
        else:
            self.status_label.setText(
                f"done in {_format_seconds(elapsed)} on {outcome.device}: {len(result.lesions)} lesion(s)"
            )
        self.show_result(result, request, num_queries=outcome.num_queries)

    def _on_finished(self):
        self._worker = None
        self._set_running(False)

    def wait(self, timeout_s: float = 60.0):
        """Block (processing Qt events) until the running job ends; for scripts and tests."""
        from qtpy.QtWidgets import QApplication

        deadline = time.perf_counter() + timeout_s
        while self.running and time.perf_counter() < deadline:
            QApplication.processEvents()
            time.sleep(0.005)
        if self.running:
            raise TimeoutError(f"BoltzFormer run still going after {timeout_s} s")

    # ---- results -> layers --------------------------------------------------------------------
    def result_layers(self, prompt: str, source: str) -> dict:
        """The result layers (role -> layer) of `prompt` on image layer `source`."""
        out = {}
        for layer in self.viewer.layers:
            md = layer.metadata or {}
            if md.get(PROMPT_KEY) == prompt and md.get(SOURCE_KEY) == source and md.get(ROLE_KEY) in RESULT_ROLES:
                out.setdefault(md[ROLE_KEY], layer)
        return out

    def show_result(self, result, request: RunRequest, num_queries: int | None = None):
        """Create or update the layers of `result`: mask, probability, uncertainty, attention.

        A new heatmap layer opens on the last decoder layer (the one nearest the output).
        """
        run_id = uuid.uuid4().hex
        prompt, source, geom = result.prompt, request.image_name, request.geometry
        wanted = {}
        if request.want_probability:
            wanted["probability"] = probability_layer_data(result.probabilities, geom, f"{prompt} probability", prompt, source)
        if result.uncertainty is not None:
            wanted["uncertainty"] = uncertainty_layer_data(result.uncertainty, geom, f"{prompt} uncertainty", prompt, source)
        if request.want_attention and result.attention is not None:
            wanted["attention"] = attention_layer_data(
                result.attention, geom, f"{prompt} attention", prompt, source, num_queries=num_queries
            )
        existing = self.result_layers(prompt, source)
        if "mask" in existing:
            color = existing["mask"].metadata.get(COLOR_KEY, MASK_COLORS[0])
        else:
            color = next_mask_color(layer.metadata.get(COLOR_KEY) for layer in self.viewer.layers)
        wanted["mask"] = labels_layer_data(result.mask, geom, name=prompt, prompt=prompt, source=source, color=color)
        for role, layer in existing.items():
            if role not in wanted:  # e.g. an uncertainty layer from an earlier run with runs > 1
                self.viewer.layers.remove(layer)
        self._results[run_id] = (result, request)
        for role, (data, kwargs, kind) in wanted.items():
            kwargs["metadata"][RUN_KEY] = run_id
            layer = existing.get(role)
            if layer is None:
                layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
                if role == "attention":
                    axis = self.viewer.dims.ndim - layer.ndim  # the "decoder layer" axis
                    self.viewer.dims.set_current_step(axis, layer.data.shape[0] - 1)
            else:
                _update_layer(layer, data, kwargs)
        self._apply_result_window(result, request)
        self._set_active_run(run_id)

    def _apply_result_window(self, result, request):
        """Show the image in the window the network saw, unless the user changed the contrast."""
        if not result.window or request.image_name not in self.viewer.layers:
            return
        layer = self.viewer.layers[request.image_name]
        stored = (layer.metadata or {}).get(WINDOW_KEY)
        if not stored or stored[0] is None:
            return  # shown with percentiles (MR, or CT not in HU): a HU window would be wrong
        if not np.allclose(layer.contrast_limits, stored[1:3]):
            return  # the user chose another contrast; leave it
        try:
            self._apply_display_window(layer, result.window)
        except KeyError:
            pass  # a custom window (not a preset)

    def _mask_layer_of(self, run_id: str | None):
        for layer in self.viewer.layers:
            md = layer.metadata or {}
            if md.get(RUN_KEY) == run_id and md.get(ROLE_KEY) == "mask":
                return layer
        return None

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
        self.fill_table()
        self._update_export_buttons()

    # ---- threshold ----------------------------------------------------------------------------
    def threshold(self) -> float:
        return self.threshold_slider.value() / THRESHOLD_STEPS

    def _on_threshold_moved(self, value: int, schedule: bool = True):
        self.threshold_label.setText(f"{value / THRESHOLD_STEPS:.2f}")
        if schedule:
            self._rethreshold_timer.start()

    def apply_threshold(self, force: bool = False):
        """Re-threshold the active result's stored probabilities (no inference) and redraw."""
        self._rethreshold_timer.stop()
        entry = self._results.get(self._active_run)
        if entry is None:
            return
        result, request = entry
        threshold, min_mm3, fp_on = self.threshold(), self.min_lesion_spin.value(), self.fp_check.isChecked()
        if (not force and threshold == result.threshold and min_mm3 == result.min_lesion_mm3
                and fp_on == result.fp_reduction):
            return
        result.rethreshold(threshold, min_mm3, fp_reduction=fp_on)
        layer = self._mask_layer_of(self._active_run)
        if layer is not None:
            layer.data = to_layer_shape(result.mask, request.geometry)
        self.fill_table()

    # ---- lesion table -------------------------------------------------------------------------
    def fill_table(self):
        result = self.active_result()
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        if result is None:
            self.result_label.setText("no result yet")
            self.table.setSortingEnabled(True)
            return
        is_ct = (result.modality or "").upper() == "CT"
        header = list(TABLE_COLUMNS)
        header[4] = "mean HU" if is_ct else "mean intensity"
        self.table.setHorizontalHeaderLabels(header)
        lesions = result.lesions
        self.table.setRowCount(len(lesions))
        for row, lesion in enumerate(lesions):
            start, end = lesion["slice_start"], lesion["slice_end"]
            cells = (
                _NumericItem(str(lesion["lesion_id"]), lesion["lesion_id"]),
                _NumericItem(f"{lesion['volume_mm3']:.1f}", lesion["volume_mm3"]),
                _NumericItem(f"{lesion['longest_axial_diameter_mm']:.1f}", lesion["longest_axial_diameter_mm"]),
                _NumericItem(f"{start}–{end}" if end > start else f"{start}", start),
                _NumericItem(f"{lesion['mean_intensity']:.0f}" if is_ct else f"{lesion['mean_intensity']:.3g}", lesion["mean_intensity"]),
                _NumericItem(f"{lesion['blobness']:.2f}", lesion["blobness"]) if "blobness" in lesion
                else _NumericItem("–", -1.0),
            )
            cells[0].setData(Qt.ItemDataRole.UserRole + 1, row)  # index into result.lesions
            for col, item in enumerate(cells):
                self.table.setItem(row, col, item)
        self.table.setSortingEnabled(True)
        status = "" if result.complete else " (cancelled: finished slices only)"
        total = sum(lesion["volume_mm3"] for lesion in lesions)
        dropped = f" · {len(result.rejected)} dropped by the 3D filter" if result.rejected else ""
        self.result_label.setText(
            f"'{result.prompt}' · threshold {result.threshold:.2f} · {len(lesions)} lesion(s), {total:.0f} mm³"
            f"{dropped}{status}"
        )

    def _on_table_clicked(self, row: int, _col: int):
        item = self.table.item(row, 0)
        result = self.active_result()
        if item is None or result is None:
            return
        index = item.data(Qt.ItemDataRole.UserRole + 1)
        self.go_to_lesion(result.lesions[int(index)])

    def go_to_lesion(self, lesion: dict):
        """Move the viewer to a lesion: its centroid slice, camera centred on it."""
        entry = self._results.get(self._active_run)
        layer = self._mask_layer_of(self._active_run)
        if entry is None or layer is None:
            return
        centroid = np.asarray(lesion["centroid_voxel_zyx"], float)
        if layer.ndim == 2:
            centroid = centroid[1:]
        world = np.asarray(layer.data_to_world(centroid), float)
        dims = self.viewer.dims
        offset = dims.ndim - layer.ndim
        point = list(dims.point)
        for i, value in enumerate(world):
            point[offset + i] = float(value)
        displayed = list(dims.displayed)
        for axis in range(offset, dims.ndim):
            if axis not in displayed:
                dims.set_point(axis, point[axis])
        _camera(self.viewer).center = tuple(point[axis] for axis in displayed)

    # ---- exports ------------------------------------------------------------------------------
    def _update_export_buttons(self):
        has = self.active_result() is not None
        self.export_table_button.setEnabled(has)

    def _export_labels_layer(self):
        from napari.layers import Labels

        active = self.viewer.layers.selection.active
        if isinstance(active, Labels):
            return active
        return self._mask_layer_of(self._active_run)

    def ask_save_path(self, title: str, default: Path, name_filter: str, extensions: tuple[str, ...]) -> Path | None:
        """A save dialog (it confirms replacing a file); adds the extension when missing."""
        path, _ = QFileDialog.getSaveFileName(self, title, str(default), name_filter)
        if not path:
            return None
        p = Path(path)
        if not p.name.lower().endswith(extensions):
            p = p.with_name(p.name + extensions[0])
            if p.exists() and not self.confirm_overwrite(p):
                return None
        return p

    def confirm_overwrite(self, path: Path) -> bool:
        answer = QMessageBox.question(
            self, "Replace file?", f"{path} exists. Replace it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _default_folder(self) -> Path:
        entry = self._results.get(self._active_run)
        source = entry[1].geometry.get("path") if entry else None
        if source:
            p = Path(source)
            return p if p.is_dir() else p.parent
        return Path.home()

    def _default_stem(self) -> str:
        entry = self._results.get(self._active_run)
        if entry is None:
            return "boltzformer"
        return f"{_slug(entry[1].image_name)}_{_slug(entry[0].prompt)}"

    def export_mask(self, path=None):
        """Selected (or active result's) labels layer -> NIfTI with the source geometry."""
        from napari.utils.notifications import show_error, show_info

        from boltzformer.errors import BoltzformerError
        from boltzformer.io import write_volume

        layer = self._export_labels_layer()
        if layer is None:
            show_error("no mask to export: run a prompt first or select a labels layer")
            return None
        if path is None:
            path = self.ask_save_path("Save mask as NIfTI", self._default_folder() / f"{self._default_stem()}.nii.gz",
                                      "NIfTI (*.nii.gz *.nii)", (".nii.gz", ".nii"))
            if path is None:
                return None
        try:
            volume = mask_volume(np.asarray(layer_array(layer)), geometry_from_layer(layer))
            written = write_volume(volume, path, overwrite=True)
        except (BoltzformerError, ValueError) as exc:
            show_error(str(exc))
            return None
        show_info(f"saved {layer.name} to {written}")
        return Path(written)

    def export_table(self, path=None):
        from napari.utils.notifications import show_error, show_info

        from boltzformer import postprocess
        from boltzformer.errors import BoltzformerError

        result = self.active_result()
        if result is None:
            show_error("no lesion table yet: run a prompt first")
            return None
        if path is None:
            path = self.ask_save_path("Save lesion table", self._default_folder() / f"{self._default_stem()}_lesions.csv",
                                      "CSV (*.csv);;JSON (*.json)", (".csv", ".json"))
            if path is None:
                return None
        try:
            written = postprocess.write_lesion_table(result.lesions, path, overwrite=True)
        except BoltzformerError as exc:
            show_error(str(exc))
            return None
        show_info(f"saved {len(result.lesions)} lesion(s) to {written}")
        return Path(written)

    def export_png(self, path=None):
        """The current view (canvas) as PNG."""
        from napari.utils.io import imsave
        from napari.utils.notifications import show_error, show_info

        from boltzformer.errors import BoltzformerError
        from boltzformer.io import atomic_output

        if path is None:
            path = self.ask_save_path("Save view as PNG", self._default_folder() / f"{self._default_stem()}.png",
                                      "PNG (*.png)", (".png",))
            if path is None:
                return None
        try:
            image = self.viewer.screenshot(canvas_only=True, flash=False)
            with atomic_output(path, overwrite=True) as tmp:
                imsave(str(tmp), image)
        except BoltzformerError as exc:
            show_error(str(exc))
            return None
        show_info(f"saved the view to {path}")
        return Path(path)


def _camera(viewer):
    """viewer.scene.camera (napari >= 0.9), else the older viewer.camera."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _update_layer(layer, data, kwargs):
    """Give an existing result layer new data, placement and metadata (keeps user styling)."""
    layer.data = data
    layer.metadata.clear()
    layer.metadata.update(kwargs["metadata"])
    layer.scale = kwargs["scale"]
    layer.translate = kwargs["translate"]
    affine = kwargs.get("affine")
    layer.affine = np.eye(layer.ndim + 1) if affine is None else affine
    if "contrast_limits" in kwargs:
        layer.contrast_limits = kwargs["contrast_limits"]
    elif hasattr(layer, "reset_contrast_limits"):
        layer.reset_contrast_limits()
