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
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
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
    attention_contrast,
    attention_layer_data,
    attention_legend,
    geometry_from_layer,
    labels_layer_data,
    layer_array,
    mask_volume,
    next_mask_color,
    probability_layer_data,
    resolve_window_name,
    result_layer_name,
    to_layer_shape,
    uncertainty_layer_data,
    volume_from_layer,
)
from ._review import ReviewPanel, status_text
from ._view import CanvasLabels, _camera

log = logging.getLogger(__name__)

RUN_KEY = "boltzformer_run"  # metadata: id of the run whose result a layer shows
OUTLINED_KEY = "boltzformer_outlined"  # metadata: the panel has drawn this ground truth as an outline
RESULT_ROLES = ("mask", "probability", "uncertainty", "attention")
SCOPES = ("all slices", "current slice", "slice range")
DEVICES = (("auto", "auto"), ("CUDA", "cuda"), ("MPS", "mps"), ("CPU", "cpu"))
MODALITIES = (("auto", None), ("CT", "CT"), ("MR", "MR"))
MAX_RECENT_PROMPTS = 12
THRESHOLD_STEPS = 100  # slider resolution: thresholds 0.01 .. 0.99
RETHRESHOLD_DELAY_MS = 120  # slider moves closer together than this are merged
EMPTY_PROMPT = 'the prompt is empty; type what to segment, e.g. "lung nodule"'
NO_IMAGE = "no image layer: open a CT or MRI volume first (File > Open, or File > Open Sample > napari-boltzformer)"
# Lesion mode: one row per candidate. (header, tooltip, row key); the intensity header follows
# the modality, and columns no row has a value for (the 3D filter's scores off lung CT) hide.
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
    ("nodule", "3D false-positive filter: probability from its 3D network that the candidate is a nodule, "
     "not a vessel or a wall", "nodule_score"),
    ("round", "3D false-positive filter: blobness from the Hessian (1 = round like a nodule, 0 = a tube like "
     "a vessel)", "blobness"),
    ("mm³", "volume in mm³", "volume_mm3"),
    ("slices", "first–last slice (z index)", "slice_start"),
    ("HU", "mean intensity", "mean_intensity"),
)
TABLE_COLUMNS = tuple(c[0] for c in LESION_COLUMNS)
ORGAN_COLUMNS = (
    ("structure", "the structure: its largest connected component (the two largest for paired organs)"),
    ("mL", "volume in mL"),
    ("size mm", "a size that means something for this structure (see the tooltip of the cell)"),
    ("Ø mm", "longest axial diameter (mm)"),
    ("slices", "first–last slice (z index)"),
    ("HU", "mean intensity"),
    ("p̄", "model confidence: mean probability over the structure"),
)
MODES = (("auto", None), ("lesions", "lesion"), ("organ", "organ"))
# Minimum mean diameter shown: all, 3 mm (below this a "nodule" is a micronodule), and the
# Fleischner / Lung-RADS steps at 4, 6 and 8 mm.
MIN_DIAMETERS_MM = (0.0, 3.0, 4.0, 6.0, 8.0)
HEAT_VALUES = (("queries per cell", "counts"), ("sampling probability", "probabilities"))
TOP_FRACTION = 0.5
# Jump to a lesion: a field of view this many times its longest diameter, never less than this.
ZOOM_FOV_FACTOR = 5.0
MIN_FOV_MM = 30.0


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
    model: str | None = None  # set once the model is loaded: what the footer shows


@dataclass
class JobOutcome:
    result: object | None = None  # SegmentationResult
    error: str | None = None
    device: str | None = None
    num_queries: int | None = None  # of the network: the largest possible attention count
    notes: list[str] = field(default_factory=list)
    target: str | None = None  # the vocabulary target the prompt names (boltzformer.synth.prompts)
    kind: str = "lesion"  # 'organ' (one structure) or 'lesion' (a candidate list): the default view


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
        yield JobStatus(f"segmenting on {outcome.device}", model=_model_description(segmenter))
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
            yield JobStatus(f"segmenting on {outcome.device}", model=_model_description(segmenter))
            outcome.result = yield from segmenter.iter_segment(
                request.volume, request.prompt, should_stop=should_stop, **request.options
            )
        if outcome.result is not None:
            outcome.target, outcome.kind = prompt_kind(outcome.result.prompt)
    except BoltzformerError as exc:
        outcome.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is reported, never raised into Qt
        log.exception("BoltzFormer run failed")
        outcome.error = f"BoltzFormer failed: {type(exc).__name__}: {exc}".splitlines()[0]
    return outcome


def prompt_kind(prompt: str) -> tuple[str | None, str]:
    """(vocabulary target or None, 'organ' | 'lesion') of a normalised prompt."""
    from boltzformer.synth import prompts as vocab

    target = vocab.target_of_prompt(prompt)
    return target, (vocab.target_kind(target) if target is not None else vocab.kind_of_prompt(prompt))


def _model_description(segmenter) -> str:
    info = getattr(segmenter, "info", None) or {}
    source = info.get("weights_path")
    name = Path(source).stem if source else "injected"
    where = " (bundled)" if info.get("weights_source") == "bundled" else ""
    return f"model: {name}{where} on {segmenter.device}"


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


class _PanelScroll(QScrollArea):
    """A vertical scroll area as wide as its panel needs (a plain one asks napari's dock for
    very little width and squeezes the panel)."""

    def minimumSizeHint(self):
        hint = super().minimumSizeHint()
        inner = self.widget()
        if inner is not None:
            hint.setWidth(inner.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width() + 2)
        return hint

    def sizeHint(self):
        hint = super().sizeHint()
        hint.setWidth(self.minimumSizeHint().width())
        return hint

    def showEvent(self, event):
        # measured once napari's stylesheet is applied (it widens spin boxes and combos)
        self.setMinimumWidth(self.minimumSizeHint().width())
        super().showEvent(event)


def _compact(combo: QComboBox, chars: int = 8) -> None:
    """A combo box that asks for the width of `chars` characters, not of its longest item."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)


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
        self._run_info: dict[str, dict] = {}  # run id -> {"target", "kind"} of its prompt
        self._active_run: str | None = None
        self._saved_view: tuple | None = None  # camera (center, zoom) before the first jump to a lesion
        self._organ_cache: tuple | None = None  # (key, summary): organ_summary of the active view
        self._run_started = 0.0
        self.model_calls = 0  # runs started (tests check that re-thresholding starts none)
        self.batch_size: int | None = None  # slices per batch; None: the Segmenter's default

        self._build()
        self.canvas_labels = CanvasLabels(napari_viewer)
        self._connect_viewer()
        self._outline_ground_truth()
        self._refresh_images()
        self.destroyed.connect(self._stop.set)  # a closed viewer stops a running job
        self.reviewer.connect()
        self.reviewer.adopt()  # a reopened panel takes over the reviewed results of its viewer

    # ---- construction -------------------------------------------------------------------------
    def _build(self):
        from boltzformer import intensity
        from boltzformer.segmenter import DEFAULT_MIN_LESION_MM3, available_devices

        # Everything in a scroll area: a short window scrolls the panel instead of squeezing its
        # rows into each other.
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = _PanelScroll()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll)
        layout = QVBoxLayout(content)
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
        modality_row = QHBoxLayout()  # modality and device share a row: the table below gets the height
        modality_row.addWidget(self.modality_combo, 1)
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
        _compact(self.modality_combo, 4)
        _compact(self.device_combo, 4)
        modality_row.addWidget(QLabel("Device"))
        modality_row.addWidget(self.device_combo, 1)
        form.addRow("Modality", modality_row)
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
        scope_row.addWidget(self.scope_combo, 1)
        rform.addRow("Scope", scope_row)
        range_row = QHBoxLayout()  # its own row: napari's spin boxes are 130 px wide at least
        range_row.addWidget(self.range_start, 1)
        range_row.addWidget(QLabel("–"))
        range_row.addWidget(self.range_stop, 1)
        rform.addRow("Slices", range_row)
        self._range_row = range_row
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
        self.probability_check.setText("probability")
        self.attention_check.setText("attention")
        self.keep_partial_check.setText("keep slices on cancel")
        self.keep_partial_check.setToolTip("Cancel keeps the slices finished so far (the others stay empty)")
        self.fp_check.setText("3D FP filter")
        checks = QGridLayout()
        checks.setSpacing(2)
        checks.addWidget(self.probability_check, 0, 0)
        checks.addWidget(self.attention_check, 0, 1)
        checks.addWidget(self.fp_check, 1, 0)
        checks.addWidget(self.force_prompt_check, 1, 1)
        checks.addWidget(self.keep_partial_check, 2, 0, 1, 2)
        rform.addRow("Outputs", checks)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(lambda: self.cancel())
        buttons.addWidget(self.run_button, 2)
        buttons.addWidget(self.cancel_button, 2)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("no run yet")  # "0 / 1 slices" before any run would be a made-up count
        buttons.addWidget(self.progress_bar, 3)
        rform.addRow(buttons)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        rform.addRow(self.status_label)
        layout.addWidget(run_box)

        heat_box = QGroupBox("Attention heatmap")
        hform = QFormLayout(heat_box)
        hform.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.heat_values_combo = QComboBox()
        for text, value in HEAT_VALUES:
            self.heat_values_combo.addItem(text, value)
        self.heat_values_combo.setToolTip("Colour = how many of the decoder's queries sampled each token, or the "
                                          "Boltzmann probability of sampling it (1 = what a uniform draw gives)")
        self.heat_query_combo = QComboBox()
        self.heat_query_combo.setToolTip("One query's samples, or all queries together")
        heat_row = QHBoxLayout()
        heat_row.addWidget(self.heat_values_combo, 3)
        heat_row.addWidget(self.heat_query_combo, 2)
        hform.addRow("Colour", heat_row)
        self.heat_top_check = QCheckBox(f"only the top {TOP_FRACTION * 100:.0f} % of the sampling mass")
        self.heat_top_check.setChecked(True)
        _compact(self.heat_values_combo, 15)
        _compact(self.heat_query_combo, 8)
        self.heat_top_check.setToolTip("Show only the fewest cells that hold this share of the Boltzmann sampling "
                                       "probability (where it sits on a flat floor, only the cells above the floor): "
                                       "where the search concentrates")
        hform.addRow(self.heat_top_check)
        self.heat_info_label = QLabel("")
        self.heat_info_label.setWordWrap(True)
        self.heat_info_label.setStyleSheet("color: gray;")
        hform.addRow(self.heat_info_label)
        for combo in (self.heat_values_combo, self.heat_query_combo):
            combo.currentIndexChanged.connect(lambda _=None: self.update_heatmap())
        self.heat_top_check.toggled.connect(lambda _=None: self.update_heatmap())
        heat_box.setEnabled(False)
        self.heat_box = heat_box
        layout.addWidget(heat_box)

        result_box = QGroupBox("Lesions")
        self.result_box = result_box
        rlay = QVBoxLayout(result_box)
        view_row = QHBoxLayout()
        self.mode_combo = QComboBox()
        for text, value in MODES:
            self.mode_combo.addItem(text, value)
        self.mode_combo.setToolTip("lesions: every candidate, one row each; organ: one structure (its largest "
                                   "component), volume in mL; auto: from the prompt's target")
        self.mode_combo.currentIndexChanged.connect(lambda _=None: self.refresh_view())
        self.min_diameter_combo = QComboBox()
        for mm in MIN_DIAMETERS_MM:
            self.min_diameter_combo.addItem("all sizes" if mm == 0 else f"≥ {mm:g} mm", mm)
        self.min_diameter_combo.setToolTip("Show only lesions with at least this mean diameter ((longest + short "
                                           "axis) / 2); the others are hidden from the table and the mask, and "
                                           "counted. Exports follow what is shown.")
        self.min_diameter_combo.currentIndexChanged.connect(lambda _=None: self.refresh_view())
        self.restore_view_button = QPushButton("Restore view")
        self.restore_view_button.setToolTip("Back to the view before the first jump to a lesion")
        self.restore_view_button.setEnabled(False)
        self.restore_view_button.clicked.connect(lambda: self.restore_view())
        _compact(self.mode_combo, 5)
        _compact(self.min_diameter_combo, 5)
        view_row.addWidget(self.mode_combo, 2)
        view_row.addWidget(self.min_diameter_combo, 2)
        view_row.addWidget(self.restore_view_button, 2)
        rlay.addLayout(view_row)
        self.result_label = QLabel("no result yet")  # the total, one line
        self.result_label.setWordWrap(False)
        self.result_label.setStyleSheet("font-weight: bold;")
        # its width never widens the panel: a long total is cut with … (whole in the tooltip)
        self.result_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        rlay.addWidget(self.result_label)
        self.result_detail = QLabel("")  # threshold, what is hidden or dropped (may wrap)
        self.result_detail.setWordWrap(True)
        self.result_detail.setStyleSheet("color: gray;")
        rlay.addWidget(self.result_detail)
        self.table = QTableWidget(0, len(LESION_COLUMNS))
        self._set_table_columns([(c[0], c[1]) for c in LESION_COLUMNS])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)  # ids: largest lesion first
        # columns as narrow as their contents (numbers are short); the panel scrolls sideways only
        # when it is narrower than all of them
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setMinimumSectionSize(28)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(170)  # five rows before the panel has to scroll
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.table.cellClicked.connect(self._on_table_clicked)
        self.table.setToolTip("Click a row: jump to it and zoom in (Restore view goes back). Review: N / Shift-N "
                              "next / previous, A accept, R reject, U undo; Alt-click the canvas: look here")
        self._table_rows: list[dict] = []  # the lesion rows behind the table (UserRole + 2 indexes them)
        self.reviewer = ReviewPanel(self)
        rlay.addWidget(self.reviewer.box)
        rlay.addWidget(self.table, 1)
        export = QHBoxLayout()
        self.export_mask_button = QPushButton("Mask → NIfTI…")
        self.export_mask_button.setToolTip("The selected labels layer, or the result's mask as shown")
        self.export_mask_button.clicked.connect(lambda: self.export_mask())
        self.export_table_button = QPushButton("Table → CSV…")
        self.export_table_button.clicked.connect(lambda: self.export_table())
        self.export_png_button = QPushButton("View → PNG…")
        self.export_png_button.clicked.connect(lambda: self.export_png())
        for b in (self.export_mask_button, self.export_table_button, self.export_png_button):
            export.addWidget(b)
        rlay.addWidget(self.reviewer.export_unreviewed_check)
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
        self._on_scope_changed()

    def _connect_viewer(self):
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layers_changed)
        layers.events.moved.connect(self._on_layers_changed)
        layers.selection.events.active.connect(self._on_active_layer)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self.viewer.dims.events.axis_labels.connect(self._apply_tau_label)

    def _on_step(self, event=None):
        if self._decoder_axis() is not None:
            self._update_heat_info()

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
        self._outline_ground_truth()
        self._refresh_images()
        live = {(layer.metadata or {}).get(RUN_KEY) for layer in self.viewer.layers}
        for run_id in list(self._results):
            if run_id not in live:  # all its layers were deleted: forget its arrays
                del self._results[run_id]
                self._run_info.pop(run_id, None)
        if self._active_run not in self._results:
            self._set_active_run(None)

    def _outline_ground_truth(self):
        """Ground truth (of the samples) as an outline, once: a filled truth hides under the
        mask a run draws, or hides it. The user may fill it again (layer controls, contour 0)."""
        for layer in self.viewer.layers:
            md = layer.metadata or {}
            if md.get(ROLE_KEY) == "ground truth" and not md.get(OUTLINED_KEY) and hasattr(layer, "contour"):
                layer.contour = 1
                layer.metadata[OUTLINED_KEY] = True

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
        self.progress_bar.setFormat("starting…")
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
        self.show_result(result, request, num_queries=outcome.num_queries, target=outcome.target, kind=outcome.kind)

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

    def show_result(self, result, request: RunRequest, num_queries: int | None = None,
                    target: str | None = None, kind: str = "lesion"):
        """Create or update the layers of `result`: mask, probability, uncertainty, attention.

        The heatmap is drawn above the mask (its hottest cells would hide under the mask fill)
        and ground-truth outlines above both. A new heatmap layer opens on the decoder layer
        where the search is sharpest: the one whose sampling is spread over the smallest
        effective share of the frame (AttentionMaps.sharpest_layer); with the bundled weights
        on the chest sample, the last one.
        """
        run_id = uuid.uuid4().hex
        prompt, source, geom = result.prompt, request.image_name, request.geometry
        self._run_info[run_id] = {"target": target, "kind": kind, "num_queries": num_queries}
        wanted = {}
        if request.want_probability:
            wanted["probability"] = probability_layer_data(result.probabilities, geom, result_layer_name(prompt, "probability"),
                                                           prompt, source)
        if result.uncertainty is not None:
            wanted["uncertainty"] = uncertainty_layer_data(result.uncertainty, geom, result_layer_name(prompt, "uncertainty"),
                                                           prompt, source)
        existing = self.result_layers(prompt, source)
        if "mask" in existing:
            color = existing["mask"].metadata.get(COLOR_KEY, MASK_COLORS[0])
        else:
            color = next_mask_color(layer.metadata.get(COLOR_KEY) for layer in self.viewer.layers)
        wanted["mask"] = labels_layer_data(result.mask, geom, name=result_layer_name(prompt), prompt=prompt,
                                           source=source, color=color)
        if request.want_attention and result.attention is not None:
            wanted["attention"] = attention_layer_data(
                result.attention, geom, result_layer_name(prompt, "attention"), prompt, source,
                num_queries=num_queries, **self._heat_options(result.attention),
            )
        for role, layer in existing.items():
            if role not in wanted:  # e.g. an uncertainty layer from an earlier run with runs > 1
                self.viewer.layers.remove(layer)
        if "mask" in existing:  # its review goes on with the new run (decisions are voxels, see _review)
            self.reviewer.remember_replaced(existing["mask"])
        self._results[run_id] = (result, request)
        self._organ_cache = None
        for role, (data, kwargs, kind_) in wanted.items():
            kwargs["metadata"][RUN_KEY] = run_id
            layer = existing.get(role)
            if layer is None:
                layer = getattr(self.viewer, f"add_{kind_}")(data, **kwargs)
                if role == "attention":
                    layer.colorbar.visible = True
                    layer.colorbar.position = "bottom_right"
                    layer.events.visible.connect(lambda _=None: self._update_heat_legend())
                    axis = self.viewer.dims.ndim - layer.ndim  # the "decoder layer" axis
                    self.viewer.dims.set_current_step(axis, result.attention.sharpest_layer())
            else:
                _update_layer(layer, data, kwargs)
        self.reviewer.attach(run_id, result, request, self._run_info[run_id])
        self._keep_ground_truth_on_top()
        self._apply_result_window(result, request)
        if self._saved_view is not None:  # a lesion jump zoomed in: the new run starts from the overview
            self.restore_view()
        self._set_active_run(run_id)

    def _keep_ground_truth_on_top(self):
        layers = self.viewer.layers
        for layer in [la for la in layers if (la.metadata or {}).get(ROLE_KEY) == "ground truth"]:
            index = layers.index(layer)
            if index != len(layers) - 1:
                layers.move(index, len(layers))

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

    def _layer_of(self, run_id: str | None, role: str):
        for layer in self.viewer.layers:
            md = layer.metadata or {}
            if md.get(RUN_KEY) == run_id and md.get(ROLE_KEY) == role:
                return layer
        return None

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
        self._sync_heat_controls()
        self.refresh_view()
        self._update_export_buttons()

    # ---- attention heatmap --------------------------------------------------------------------
    def _heat_options(self, attention) -> dict:
        """values / query / top_fraction the heatmap controls ask for (query only if recorded)."""
        values = self.heat_values_combo.currentData() or "counts"
        query = self.heat_query_combo.currentData()
        if values != "counts" or attention is None or attention.query_bits is None:
            query = None
        elif query is not None and query >= attention.num_queries:
            query = None
        return {"values": values, "query": query,
                "top_fraction": TOP_FRACTION if self.heat_top_check.isChecked() else None}

    def _sync_heat_controls(self):
        """Query choices of the active result's network; controls off without a heatmap."""
        result = self.active_result()
        att = None if result is None else result.attention
        layer = self._layer_of(self._active_run, "attention")
        self.heat_box.setEnabled(att is not None and layer is not None)
        wanted = [("all queries", None)]
        if att is not None and att.query_bits is not None:
            wanted += [(f"query {q + 1}", q) for q in range(att.num_queries)]
        have = [(self.heat_query_combo.itemText(i), self.heat_query_combo.itemData(i))
                for i in range(self.heat_query_combo.count())]
        if have != wanted:
            current = self.heat_query_combo.currentData()
            self.heat_query_combo.blockSignals(True)
            self.heat_query_combo.clear()
            for text, value in wanted:
                self.heat_query_combo.addItem(text, value)
            index = self.heat_query_combo.findData(current)
            self.heat_query_combo.setCurrentIndex(max(0, index))
            self.heat_query_combo.blockSignals(False)
        self.heat_query_combo.setEnabled(len(wanted) > 1 and self.heat_values_combo.currentData() == "counts")
        if layer is not None and att is not None and not self._heat_matches(layer, att):
            self.update_heatmap()  # another run's settings: show this one as the controls say
        self._update_heat_info()
        self._update_heat_legend()

    def _heat_matches(self, layer, att) -> bool:
        md = layer.metadata
        wanted = self._heat_options(att)
        return all(md.get(k) == v for k, v in wanted.items())

    def update_heatmap(self):
        """Redraw the active result's heatmap layer as the controls say (no inference)."""
        result = self.active_result()
        layer = self._layer_of(self._active_run, "attention")
        self.heat_query_combo.setEnabled(self.heat_query_combo.count() > 1
                                         and self.heat_values_combo.currentData() == "counts")
        if result is None or result.attention is None or layer is None:
            return
        att = result.attention
        options = self._heat_options(att)
        num_queries = self._run_info.get(self._active_run, {}).get("num_queries") or att.num_queries
        data = att.view(options["values"], query=options["query"], top_fraction=options["top_fraction"])
        if layer.ndim == 3:  # a 2D source: (L, G, G)
            data = data[:, 0]
        layer.data = data
        layer.contrast_limits = attention_contrast(options["values"], num_queries, options["query"], data)
        layer.metadata.update(options)
        layer.metadata["legend"] = attention_legend(options["values"], num_queries, options["query"],
                                                    options["top_fraction"])
        self._update_heat_info()
        self._update_heat_legend()

    def _decoder_axis(self) -> int | None:
        layer = self._layer_of(self._active_run, "attention")
        if layer is None:
            return None
        return self.viewer.dims.ndim - layer.ndim

    def _current_decoder_layer(self) -> int | None:
        axis = self._decoder_axis()
        return None if axis is None else int(self.viewer.dims.current_step[axis])

    def _heat_stats(self, att) -> dict:
        """spread and top-mass shares per (decoder layer, slice), computed once per run."""
        info = self._run_info.setdefault(self._active_run, {})
        if info.get("heat_stats") is None:
            area, mass = att.top_mass_stats(TOP_FRACTION)
            info["heat_stats"] = {"spread": att.spread(), "area": area, "mass": mass,
                                  "sharpest": att.sharpest_layer()}
        return info["heat_stats"]

    def _apply_tau_label(self, event=None):
        """The decoder-layer slider reads 'layer · τ 0.17' for the layer shown. napari puts the
        layers' own axis labels back whenever a layer changes, so this runs again then."""
        result = self.active_result()
        axis, layer_index = self._decoder_axis(), self._current_decoder_layer()
        if result is None or result.attention is None or axis is None:
            return
        att = result.attention
        tau = att.temperatures[min(max(layer_index, 0), att.num_layers - 1)]
        label = f"layer · τ {tau:.2f}"  # napari cuts slider labels wider than a fifth of the slider
        labels = list(self.viewer.dims.axis_labels)
        if axis < len(labels) and labels[axis] != label:
            labels[axis] = label
            self.viewer.dims.axis_labels = labels

    def _update_heat_info(self):
        """The layer slider's label says τ of the layer shown; the panel says how concentrated
        the sampling is on the slice shown."""
        result = self.active_result()
        axis, layer_index = self._decoder_axis(), self._current_decoder_layer()
        heat = self._layer_of(self._active_run, "attention")
        if result is None or result.attention is None or axis is None or heat is None:
            self.heat_info_label.setText("")
            return
        att = result.attention
        layer_index = min(max(layer_index, 0), att.num_layers - 1)
        tau = att.temperatures[layer_index]
        self._apply_tau_label()
        stats = self._heat_stats(att)
        text = (f"layer {layer_index + 1}/{att.num_layers} · τ {tau:.2f} · stride {att.strides[layer_index]} · "
                f"{att.tokens_per_query[layer_index]} tokens/query · opened on layer {stats['sharpest'] + 1}, "
                "the least spread\n")
        z = None
        if heat.ndim == 4:
            z = int(round(float(heat.world_to_data(self.viewer.dims.point[axis:])[1])))
        else:
            z = 0
        spread = stats["spread"][layer_index, z] if 0 <= z < stats["spread"].shape[1] else np.nan
        if np.isfinite(spread):
            area, mass = stats["area"][layer_index, z], stats["mass"][layer_index, z]
            text += (f"this slice: spread over {_percent(spread)} of the frame (effective); "
                     f"the hottest {_percent(area)} of cells hold {_percent(mass)} of the mass")
        else:
            text += "this slice was not processed"
        self.heat_info_label.setText(text)

    def _update_heat_legend(self):
        """Colour bar and legend for the active heatmap only (several prompts: one legend)."""
        active = self._layer_of(self._active_run, "attention")
        for layer in self.viewer.layers:
            if (layer.metadata or {}).get(ROLE_KEY) == "attention":
                layer.colorbar.visible = layer is active and layer.visible
        shown = active is not None and active.visible
        self.canvas_labels.show_legend(active.metadata.get("legend") if shown else None)

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
        self._organ_cache = None
        self.refresh_view()

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
                self.reviewer.flush_edits()  # paint not yet taken in must not be drawn over
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

    def _set_table_columns(self, columns):
        self.table.setColumnCount(len(columns))
        self.table.setHorizontalHeaderLabels([c[0] for c in columns])
        for col, (_, tip) in enumerate(columns):
            self.table.horizontalHeaderItem(col).setToolTip(tip)
            self.table.setColumnHidden(col, False)

    def fill_table(self):
        result = self.active_result()
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        if result is None:
            self.result_label.setText("no result yet")
            self.result_label.setToolTip("")
            self.result_detail.setText("")
            self.table.setSortingEnabled(True)
            return
        if self.current_mode() == "organ":
            self._fill_organ_table(result)
        else:
            self._fill_lesion_table(result)
        self.table.setSortingEnabled(True)
        self.reviewer.update(self.shown_lesions()[0] if self.current_mode() == "lesion" else [])

    def _intensity_header(self, result) -> tuple[str, str]:
        """('HU', tip) for CT, ('a.u.', tip naming the MR sequence if the file does) otherwise."""
        if (result.modality or "").upper() == "CT":
            return "HU", "mean intensity in Hounsfield units"
        entry = self._results.get(self._active_run)
        sequence = (entry[1].geometry.get("sequence") if entry else None) or "sequence not stated by the file"
        return "a.u.", f"mean intensity in arbitrary units (MR: {sequence}); not comparable between scans"

    def _fill_lesion_table(self, result):
        is_ct = (result.modality or "").upper() == "CT"
        columns = [(c[0], c[1]) for c in LESION_COLUMNS]
        intensity = LESION_COLUMNS.index(next(c for c in LESION_COLUMNS if c[2] == "mean_intensity"))
        columns[intensity] = self._intensity_header(result)
        self._set_table_columns(columns)
        shown, hidden = self.shown_lesions()
        listed = self.reviewer.table_rows(shown) if self.reviewer.view() is not None else shown
        self._table_rows = listed
        self.table.setRowCount(len(listed))
        # UserRole + 1: the row's index in result.lesions (a model candidate), else None
        index_of = {r["lesion_id"]: i for i, r in enumerate(result.lesions)}
        for row, lesion in enumerate(listed):
            for col, (_, _, key) in enumerate(LESION_COLUMNS):
                value = lesion.get(key)
                if key == "status":
                    text, tip = status_text(lesion if "status" in lesion else {**lesion, "status": "unreviewed"})
                    item = QTableWidgetItem(text)
                    item.setToolTip(tip)
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignCenter))
                elif key == "slice_start":
                    start, end = lesion["slice_start"], lesion["slice_end"]
                    item = _NumericItem(f"{start}–{end}" if end > start else f"{start}", start)
                elif value is None or (isinstance(value, float) and not np.isfinite(value)):
                    item = _NumericItem("–", -1.0)
                elif key == "lesion_id":
                    item = _NumericItem(str(value), value)
                elif key == "mean_intensity":
                    item = _NumericItem(f"{value:.0f}" if is_ct else f"{value:.3g}", value)
                elif key == "volume_mm3":
                    item = _NumericItem(f"{value:.0f}" if value >= 100 else f"{value:.1f}", value)
                elif key in ("mean_probability", "max_probability", "nodule_score", "blobness"):
                    item = _NumericItem(f"{value:.2f}", value)
                else:
                    item = _NumericItem(f"{value:.1f}", value)
                self.table.setItem(row, col, item)
            ref = lesion.get("_ref", ("auto", lesion["lesion_id"]))
            self.table.item(row, 0).setData(Qt.ItemDataRole.UserRole + 1,
                                            index_of.get(ref[1]) if ref[0] == "auto" else None)
            self.table.item(row, 0).setData(Qt.ItemDataRole.UserRole + 2, row)
            _tint_row(self.table, row, lesion.get("status", "unreviewed"))
        scored = [*result.lesions, *result.rejected]  # the 3D filter's scores exist only where it ran
        for col, (_, _, key) in enumerate(LESION_COLUMNS):
            if key in ("nodule_score", "blobness"):
                self.table.setColumnHidden(col, not any(_finite(r.get(key)) for r in scored))
        total_ml = sum(r["volume_mm3"] for r in shown) / 1000.0
        noun = "lesion" if len(shown) == 1 else "lesions"
        self._set_summary(f"{len(shown)} {noun} · {total_ml:.2f} mL", self._lesion_details(result, hidden))

    def _lesion_details(self, result, hidden) -> str:
        parts = [f"'{result.prompt}', threshold {result.threshold:.2f}"]
        if hidden:
            parts.append(f"{len(hidden)} hidden (mean Ø < {self.min_diameter_mm():g} mm)")
        if result.rejected:
            parts.append(f"{len(result.rejected)} dropped by the 3D filter")
        if not result.complete:
            parts.append("cancelled: finished slices only")
        return " · ".join(parts)

    def _fill_organ_table(self, result):
        columns = list(ORGAN_COLUMNS)
        columns[5] = self._intensity_header(result)
        self._set_table_columns(columns)
        summary = self.organ_summary()
        target = self._run_info.get(self._active_run, {}).get("target")
        name = (target or result.prompt).replace("_", " ")
        if summary is None:
            self._set_summary(f"{name}: not found", f"'{result.prompt}', threshold {result.threshold:.2f}")
            return
        is_ct = (result.modality or "").upper() == "CT"
        self.table.setRowCount(1)
        start, end = summary["slice_start"], summary["slice_end"]
        measure = summary["measure_mm"]
        cells = (
            QTableWidgetItem(summary["structure"]),
            _NumericItem(f"{summary['volume_ml']:.1f}", summary["volume_ml"]),
            _NumericItem("–" if measure is None else f"{measure:.1f}", -1.0 if measure is None else measure),
            _NumericItem(f"{summary['longest_axial_diameter_mm']:.1f}", summary["longest_axial_diameter_mm"]),
            _NumericItem(f"{start}–{end}" if end > start else f"{start}", start),
            _NumericItem(f"{summary['mean_intensity']:.0f}" if is_ct else f"{summary['mean_intensity']:.3g}",
                         summary["mean_intensity"]),
            _NumericItem(f"{summary['mean_probability']:.2f}", summary["mean_probability"])
            if "mean_probability" in summary else _NumericItem("–", -1.0),
        )
        cells[2].setToolTip(summary["measure"] or "no single diameter means much for this structure")
        cells[0].setData(Qt.ItemDataRole.UserRole + 1, -1)  # the organ row, not a lesion index
        for col, item in enumerate(cells):
            self.table.setItem(0, col, item)
        self.table.horizontalHeaderItem(2).setText(
            {"max axial calibre": "calibre mm", "craniocaudal length": "length mm"}.get(summary["measure"], "size mm"))
        left_out = summary["components_found"] - len(summary["lesion_ids"])
        details = [f"'{result.prompt}', threshold {result.threshold:.2f}"]
        if left_out:
            details.append(f"{left_out} stray component(s) left out")
        if summary["measure"]:
            details.append(f"{summary['measure']} {measure:.1f} mm")
        self._set_summary(f"{summary['structure']} · {summary['volume_ml']:.1f} mL", " · ".join(details))

    def _set_summary(self, total: str, details: str):
        """The total on one line (cut with … if the panel is narrow; whole in the tooltip)."""
        metrics = self.result_label.fontMetrics()
        width = max(80, self.result_label.width() if self.result_label.isVisible() else 400)
        self.result_label.setText(metrics.elidedText(total, Qt.TextElideMode.ElideRight, width))
        self.result_label.setToolTip(total)
        self.result_detail.setText(details)

    def table_row(self, row: int) -> dict | None:
        """The lesion dict behind table row `row` (as sorted on screen); None for the organ row."""
        item = self.table.item(row, 0)
        index = None if item is None else item.data(Qt.ItemDataRole.UserRole + 2)
        return None if index is None or int(index) >= len(self._table_rows) else self._table_rows[int(index)]

    def _on_table_clicked(self, row: int, _col: int):
        item = self.table.item(row, 0)
        result = self.active_result()
        if item is None or result is None:
            return
        if item.data(Qt.ItemDataRole.UserRole + 1) == -1:  # the organ row
            summary = self.organ_summary()
            if summary is not None:
                self.go_to_lesion(summary)
            return
        lesion = self.table_row(row)
        if lesion is not None:
            self.go_to_lesion(lesion)

    def go_to_lesion(self, lesion: dict):
        """Move the viewer to a lesion and zoom in: its centroid slice, camera centred on it, a
        field of view ZOOM_FOV_FACTOR times its longest diameter (at least MIN_FOV_MM, and never
        wider than the view before the first jump, which restore_view brings back)."""
        entry = self._results.get(self._active_run)
        layer = self._mask_layer_of(self._active_run)
        if entry is None or layer is None:
            return
        centroid = np.asarray(lesion["centroid_voxel_zyx"], float)
        if layer.ndim == 2:
            centroid = centroid[1:]
        world = np.asarray(layer.data_to_world(centroid), float)
        dims = self.viewer.dims
        camera = _camera(self.viewer)
        if self._saved_view is None:
            self._saved_view = (tuple(camera.center), float(camera.zoom))
            self.restore_view_button.setEnabled(True)
        offset = dims.ndim - layer.ndim
        point = list(dims.point)
        for i, value in enumerate(world):
            point[offset + i] = float(value)
        displayed = list(dims.displayed)
        for axis in range(offset, dims.ndim):
            if axis not in displayed:
                dims.set_point(axis, point[axis])
        camera.center = tuple(point[axis] for axis in displayed)
        diameter = float(lesion.get("longest_axial_diameter_mm") or 0.0)
        fov_mm = max(ZOOM_FOV_FACTOR * diameter, MIN_FOV_MM)
        # a structure too big for that: no zooming out beyond the view the jumps started from
        camera.zoom = max(min(_canvas_size_px(self.viewer)) / fov_mm, self._saved_view[1])

    def restore_view(self):
        """Back to the camera (centre, zoom) from before the first jump to a lesion."""
        if self._saved_view is None:
            return
        center, zoom = self._saved_view
        camera = _camera(self.viewer)
        camera.center = center
        camera.zoom = zoom
        self._saved_view = None
        self.restore_view_button.setEnabled(False)

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
        if self.reviewer.handles(layer):  # the review decides what the mask holds; a sidecar records it
            try:
                written = self.reviewer.export("mask", Path(path))
            except (BoltzformerError, ValueError) as exc:
                show_error(str(exc))
                return None
            show_info(f"saved the reviewed {layer.name} to {written} (and {written.name.split('.')[0]}.review.json)")
            return written
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
        if self.current_mode() == "organ":
            summary = self.organ_summary()
            rows = [] if summary is None else [{k: v for k, v in summary.items() if k != "lesion_ids"}]
        else:
            rows = self.shown_lesions()[0]
        if path is None:
            path = self.ask_save_path("Save lesion table", self._default_folder() / f"{self._default_stem()}_lesions.csv",
                                      "CSV (*.csv);;JSON (*.json)", (".csv", ".json"))
            if path is None:
                return None
        if self.reviewer.handles(self._mask_layer_of(self._active_run)):  # with a status column and a sidecar
            try:
                written = self.reviewer.export("table", Path(path))
            except (BoltzformerError, ValueError) as exc:
                show_error(str(exc))
                return None
            show_info(f"saved {len(rows)} row(s) with their review status to {written}")
            return written
        try:
            written = postprocess.write_lesion_table(rows, path, overwrite=True)
        except BoltzformerError as exc:
            show_error(str(exc))
            return None
        show_info(f"saved {len(rows)} row(s) to {written}")
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


def _canvas_size_px(viewer) -> tuple[int, int]:
    """(height, width) of the canvas in screen pixels."""
    canvas = getattr(viewer, "canvas", None)
    size = getattr(canvas, "size", None) if canvas is not None and not callable(getattr(canvas, "size", None)) else None
    if size is None:
        size = getattr(viewer, "_canvas_size", (600, 800))
    return int(size[0]), int(size[1])


def _percent(share: float) -> str:
    """0.0012 -> '0.1 %', 0.25 -> '25 %': small shares keep a decimal."""
    return f"{share * 100:.1f} %" if share < 0.1 else f"{share * 100:.0f} %"


def _tint_row(table, row: int, status: str) -> None:
    """Accepted rows tinted green, rejected ones greyed: the review state at a glance."""
    from qtpy.QtGui import QBrush, QColor

    if status == "unreviewed":
        return
    for col in range(table.columnCount()):
        item = table.item(row, col)
        if item is None:
            continue
        if status == "accepted":
            item.setBackground(QBrush(QColor(52, 199, 89, 70)))
        else:
            item.setForeground(QBrush(QColor(140, 140, 140)))
            font = item.font()
            font.setStrikeOut(col > 1)
            item.setFont(font)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.floating)) and bool(np.isfinite(value))


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
