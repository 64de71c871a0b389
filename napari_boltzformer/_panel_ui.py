"""The panel's layout: its group boxes and controls, with their labels, tooltips and wiring.

`build_ui(panel)` makes every control an attribute of the panel and connects its signal to the
panel's method, as Qt Designer's `setupUi` does; what the controls do is the panel's (_widget).
Everything sits in a scroll area, so a short window scrolls the panel instead of squeezing it.
"""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ._export import Exports
from ._heatmap import HeatmapControls
from ._lesion_table import LesionTable
from ._prompt import PromptEdit
from ._qt import PanelScroll, SeedBox, compact, name_controls
from ._review import ReviewPanel

SCOPES = ("all slices", "current slice", "slice range")
DEVICES = (("auto", "auto"), ("CUDA", "cuda"), ("MPS", "mps"), ("CPU", "cpu"))
MODALITIES = (("auto", None), ("CT", "CT"), ("MR", "MR"))
THRESHOLD_STEPS = 100  # slider resolution: thresholds 0.01 .. 0.99
RETHRESHOLD_DELAY_MS = 120  # slider moves closer together than this are merged
MODES = (("auto", None), ("lesions", "lesion"), ("organ", "organ"))
# Minimum mean diameter shown: all, 3 mm (below this a "nodule" is a micronodule), and the
# Fleischner / Lung-RADS steps at 4, 6 and 8 mm.
MIN_DIAMETERS_MM = (0.0, 3.0, 4.0, 6.0, 8.0)


def _check_devices_in_the_background(panel) -> None:
    """Grey out the devices torch cannot use here, once a worker thread has asked it: importing
    torch to ask held the first opening of the panel for 1.8 s (the GPUs stay offered until then,
    and a run on one that is missing says so)."""
    from napari.qt.threading import thread_worker

    def ask():
        from boltzformer.devices import available_devices

        return available_devices()

    def grey_out(available: dict):
        if getattr(panel, "_gone", None) is not None and panel._gone.is_set():
            return  # the panel was closed meanwhile
        model = panel.device_combo.model()
        for row in range(panel.device_combo.count()):
            value = panel.device_combo.itemData(row)
            if value != "auto" and not available.get(value, False):
                model.item(row).setEnabled(False)
                model.item(row).setToolTip(f"{panel.device_combo.itemText(row)} is not available on this machine")

    worker = thread_worker(ask, start_thread=False, ignore_errors=True)()
    worker.returned.connect(grey_out)
    panel._device_check = worker  # kept: a worker nobody holds may be collected mid-run
    worker.start()


def build_ui(panel) -> None:
    """The controls of a BoltzFormerWidget, laid out in `panel` and wired to its methods."""
    from boltzformer import intensity
    from boltzformer.options import DEFAULT_MIN_LESION_MM3, DEFAULT_MIRROR, DEFAULT_PLANES, MAX_SEED

    # Everything in a scroll area: a short window scrolls the panel instead of squeezing its
    # rows into each other.
    outer = QVBoxLayout(panel)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = PanelScroll()
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
    panel.image_combo = QComboBox()
    panel.image_combo.setToolTip("Image layer to segment (CT in HU or MRI)")
    panel.image_combo.currentIndexChanged.connect(panel._on_image_changed)
    form.addRow("Image", panel.image_combo)
    panel.prompt_edit = PromptEdit()
    panel.prompt_edit.returnPressed.connect(panel.run)
    panel.prompt_edit.setToolTip("What to segment, in words (e.g. 'lung nodule', 'liver', 'multiple sclerosis "
                                 "lesion'); the list offers the prompts the model was trained on. Enter runs")
    form.addRow("Prompt", panel.prompt_edit)
    panel.modality_combo = QComboBox()
    for text, value in MODALITIES:
        panel.modality_combo.addItem(text, value)
    panel.modality_combo.setToolTip("auto: from the file's header, else from its values (Hounsfield units: CT). "
                                    "Choose CT or MR when the file does not say and the guess is wrong")
    modality_row = QHBoxLayout()  # modality and device share a row: the table below gets the height
    modality_row.addWidget(panel.modality_combo, 1)
    panel.window_combo = QComboBox()
    panel.window_combo.addItem("auto (from prompt)", None)
    for name, w in intensity.WINDOWS.items():
        panel.window_combo.addItem(f"{name.replace('_', ' ')}  (C {w.center_hu:g} / W {w.width_hu:g})", name)
    panel.window_combo.setToolTip("CT window the network sees; choosing one also applies it to the image layer")
    panel.window_combo.currentIndexChanged.connect(panel._on_window_changed)
    form.addRow("CT window", panel.window_combo)
    panel.device_combo = QComboBox()
    for text, value in DEVICES:
        panel.device_combo.addItem(text, value)
    _check_devices_in_the_background(panel)
    panel.device_combo.setToolTip("Where the model runs: auto takes a GPU when there is one, else the CPU")
    compact(panel.modality_combo, 4)
    compact(panel.device_combo, 4)
    modality_row.addWidget(QLabel("Device"))
    modality_row.addWidget(panel.device_combo, 1)
    form.addRow("Modality", modality_row)
    layout.addWidget(inputs)

    run_box = QGroupBox("Run")
    rform = QFormLayout(run_box)
    rform.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    scope_row = QHBoxLayout()
    panel.scope_combo = QComboBox()
    panel.scope_combo.addItems(SCOPES)
    panel.scope_combo.setToolTip("Which slices to segment: all, the axial slice on screen, or a range")
    panel.scope_combo.currentIndexChanged.connect(panel._on_scope_changed)
    panel.range_start = QSpinBox()
    panel.range_stop = QSpinBox()
    for spin, tip in ((panel.range_start, "first slice (z index)"), (panel.range_stop, "last slice (z index, included)")):
        spin.setToolTip(tip)
        spin.setEnabled(False)
    scope_row.addWidget(panel.scope_combo, 1)
    rform.addRow("Scope", scope_row)
    range_row = QHBoxLayout()  # its own row: napari's spin boxes are 130 px wide at least
    range_row.addWidget(panel.range_start, 1)
    range_row.addWidget(QLabel("–"))
    range_row.addWidget(panel.range_stop, 1)
    rform.addRow("Slices", range_row)
    panel._range_row = range_row
    thr_row = QHBoxLayout()
    panel.threshold_slider = QSlider(Qt.Orientation.Horizontal)
    panel.threshold_slider.setRange(1, THRESHOLD_STEPS - 1)
    panel.threshold_slider.setValue(THRESHOLD_STEPS // 2)
    panel.threshold_slider.setToolTip("Probability threshold; changing it re-thresholds the last result without re-running")
    panel.threshold_label = QLabel()
    panel.threshold_label.setMinimumWidth(32)
    thr_row.addWidget(panel.threshold_slider, 1)
    thr_row.addWidget(panel.threshold_label)
    rform.addRow("Threshold", thr_row)
    panel.min_lesion_spin = QDoubleSpinBox()
    panel.min_lesion_spin.setRange(0.0, 1e6)
    panel.min_lesion_spin.setDecimals(1)
    panel.min_lesion_spin.setSuffix(" mm³")
    panel.min_lesion_spin.setValue(DEFAULT_MIN_LESION_MM3)
    panel.min_lesion_spin.setToolTip("Connected components smaller than this are dropped")
    rform.addRow("Min. lesion", panel.min_lesion_spin)
    seed_row = QHBoxLayout()
    panel.seed_spin = SeedBox(MAX_SEED)
    panel.seed_spin.setToolTip("Seed of the Boltzmann sampling, 0 to 2**63-1 as on the command line (the same "
                               "seed, device and batch size give the same result)")
    panel.runs_spin = QSpinBox()
    panel.runs_spin.setRange(1, 32)
    panel.runs_spin.setToolTip("Sampling runs with seeds seed, seed+1, ...; more than one gives an uncertainty layer")
    seed_row.addWidget(panel.seed_spin, 1)
    seed_row.addWidget(QLabel("Runs"))
    seed_row.addWidget(panel.runs_spin, 1)
    # seed, runs and the output switches fold away (a reader seldom changes them), so that the
    # lesion table keeps rows on a laptop screen (at 1400 x 900 it showed one)
    options = QWidget()
    oform = QFormLayout(options)
    oform.setContentsMargins(0, 0, 0, 0)
    oform.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    oform.addRow("Seed", seed_row)
    panel.probability_check = QCheckBox("probability layer")
    panel.probability_check.setChecked(True)
    panel.attention_check = QCheckBox("attention heatmaps")
    panel.attention_check.setChecked(True)
    panel.attention_check.setToolTip("Where each decoder layer sampled its tokens (one layer, a 'decoder layer' slider)")
    panel.keep_partial_check = QCheckBox("keep finished slices on cancel")
    panel.fp_check = _post_processing_switch(
        panel, "3D false-positive filter", True,
        "Lung prompts on CT in HU: drop candidates outside the lungs, then those the 3D classifier scores below its "
        "threshold, mostly vessels (nodule_score in the lesion table). MS lesion prompts on MR: where most candidates "
        "are brighter than their surroundings (FLAIR, T2), drop the darker ones (contrast in the lesion table)")
    panel.detector_check = _post_processing_switch(
        panel, "3D nodule detector", False,
        "Lung nodules on CT in HU, with the FP filter: a 3D blob detector decides which lesions there are, outlined "
        "by the network where it found them too. Off by default: more nodules and fewer false positives on phantom "
        "chests, but more false positives on a real chest CT (model card)")
    panel.mirror_check = QCheckBox("mirror")
    panel.mirror_check.setChecked(DEFAULT_MIRROR)
    panel.mirror_check.setToolTip("Average each slice with its left-right mirror image (test-time augmentation): a "
                                  "second network pass per slice, about twice the inference time; applies to the "
                                  "next run")
    panel.planes_combo = QComboBox()
    for label, value in (("axial", "axial"), ("3 planes", "three"), ("planes: auto", "auto")):
        panel.planes_combo.addItem(label, value)
    panel.planes_combo.setCurrentIndex(panel.planes_combo.findData(DEFAULT_PLANES))
    panel.planes_combo.setToolTip("axial: segment the axial slices. 3 planes: also the coronal and sagittal slices, "
                                  "the median of the three per voxel (about three times the inference time). auto: "
                                  "3 planes on nearly isotropic 3D MR, axial otherwise; applies to the next run")
    panel.force_prompt_check = QCheckBox("force prompt")
    panel.force_prompt_check.setToolTip("Run a prompt even when it names nothing the model was trained to find")
    panel.probability_check.setText("probability")
    panel.probability_check.setToolTip("Also add the per-voxel probability (0-1) as an image layer, hidden; the "
                                       "threshold slider re-thresholds it either way")
    panel.attention_check.setText("attention")
    panel.keep_partial_check.setText("keep slices on cancel")
    panel.keep_partial_check.setToolTip("Cancel keeps the slices finished so far (the others stay empty)")
    panel.fp_check.setText("3D FP filter")
    checks = QGridLayout()
    checks.setSpacing(2)
    checks.addWidget(panel.probability_check, 0, 0)
    checks.addWidget(panel.attention_check, 0, 1)
    checks.addWidget(panel.fp_check, 1, 0)
    checks.addWidget(panel.force_prompt_check, 1, 1)
    checks.addWidget(panel.detector_check, 2, 0)
    checks.addWidget(panel.keep_partial_check, 2, 1)
    checks.addWidget(panel.mirror_check, 3, 0)
    checks.addWidget(panel.planes_combo, 3, 1)
    oform.addRow("Outputs", checks)
    panel.options_button = QToolButton()
    panel.options_button.setCheckable(True)
    panel.options_button.setAutoRaise(True)
    panel.options_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
    panel.options_button.setToolTip("Seed and sampling runs; outputs (probability, attention); the 3D false-positive "
                                    "filter, the 3D nodule detector, mirror averaging, planes; force prompt")

    def show_options(shown: bool) -> None:
        options.setVisible(shown)
        panel.options_button.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)
        panel.options_button.setText("fewer options" if shown else "options: seed, runs, outputs, 3D filters")

    panel.options_button.toggled.connect(show_options)
    show_options(False)
    rform.addRow(panel.options_button)
    rform.addRow(options)
    buttons = QHBoxLayout()
    panel.run_button = QPushButton("Run")
    panel.run_button.setToolTip("Segment the image for the prompt (Enter in the prompt field does the same)")
    panel.run_button.setDefault(True)
    panel.run_button.clicked.connect(lambda: panel.run())
    panel.cancel_button = QPushButton("Cancel")
    panel.cancel_button.setToolTip("Stop the run after the batch of slices in progress (Escape in the panel)")
    panel.cancel_button.setEnabled(False)
    panel.cancel_button.clicked.connect(lambda: panel.cancel())
    buttons.addWidget(panel.run_button, 2)
    buttons.addWidget(panel.cancel_button, 2)
    panel.progress_bar = QProgressBar()
    panel.progress_bar.setRange(0, 1)
    panel.progress_bar.setValue(0)
    panel.progress_bar.setFormat("no run yet")  # "0 / 1 slices" before any run would be a made-up count
    buttons.addWidget(panel.progress_bar, 3)
    rform.addRow(buttons)
    panel.status_label = QLabel("")
    panel.status_label.setWordWrap(True)
    rform.addRow(panel.status_label)
    layout.addWidget(run_box)

    panel.heatmap = HeatmapControls(panel)
    layout.addWidget(panel.heatmap)

    result_box = QGroupBox("Lesions")
    panel.result_box = result_box
    rlay = QVBoxLayout(result_box)
    view_row = QHBoxLayout()
    panel.mode_combo = QComboBox()
    for text, value in MODES:
        panel.mode_combo.addItem(text, value)
    panel.mode_combo.setToolTip("lesions: every candidate, one row each; organ: one structure (its largest "
                               "component), volume in mL; auto: from the prompt's target")
    panel.mode_combo.currentIndexChanged.connect(lambda _=None: panel.refresh_view())
    panel.min_diameter_combo = QComboBox()
    for mm in MIN_DIAMETERS_MM:
        panel.min_diameter_combo.addItem("all sizes" if mm == 0 else f"≥ {mm:g} mm", mm)
    panel.min_diameter_combo.setToolTip("Show only lesions with at least this mean diameter ((longest + short "
                                       "axis) / 2); the others are hidden from the table and the mask, and "
                                       "counted. Exports follow what is shown.")
    panel.min_diameter_combo.currentIndexChanged.connect(lambda _=None: panel.refresh_view())
    panel.restore_view_button = QPushButton("Restore view")
    panel.restore_view_button.setToolTip("Back to the view before the first jump to a lesion")
    panel.restore_view_button.setEnabled(False)
    panel.restore_view_button.clicked.connect(lambda: panel.restore_view())
    compact(panel.mode_combo, 5)
    compact(panel.min_diameter_combo, 5)
    view_row.addWidget(panel.mode_combo, 2)
    view_row.addWidget(panel.min_diameter_combo, 2)
    view_row.addWidget(panel.restore_view_button, 2)
    rlay.addLayout(view_row)
    panel.result_label = QLabel("no result yet")  # the total, one line
    panel.result_label.setWordWrap(False)
    panel.result_label.setStyleSheet("font-weight: bold;")
    # its width never widens the panel: a long total is cut with … (whole in the tooltip)
    panel.result_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    rlay.addWidget(panel.result_label)
    panel.result_detail = QLabel("")  # threshold, what is hidden or dropped (may wrap)
    panel.result_detail.setWordWrap(True)
    panel.result_detail.setStyleSheet("color: gray;")
    rlay.addWidget(panel.result_detail)
    panel.table = LesionTable()
    panel.table.lesion_clicked.connect(panel.go_to_lesion)
    panel.reviewer = ReviewPanel(panel)
    rlay.addWidget(panel.reviewer.box)
    rlay.addWidget(panel.table, 1)
    panel.exports = Exports(panel)
    rlay.addWidget(panel.reviewer.export_unreviewed_check)
    rlay.addLayout(panel.exports.row)
    layout.addWidget(result_box, 1)
    panel.model_label = QLabel()
    panel.model_label.setWordWrap(True)
    panel.model_label.setStyleSheet("color: gray;")
    layout.addWidget(panel.model_label)

    panel._rethreshold_timer = QTimer(panel)
    panel._rethreshold_timer.setSingleShot(True)
    panel._rethreshold_timer.setInterval(RETHRESHOLD_DELAY_MS)
    panel._rethreshold_timer.timeout.connect(panel.apply_threshold)
    panel.threshold_slider.valueChanged.connect(panel._on_threshold_moved)
    panel.table.setAccessibleName("lesions")
    name_controls(content)
    escape = QShortcut(QKeySequence(Qt.Key.Key_Escape), panel)  # in the panel: stop what is under way
    escape.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
    escape.activated.connect(lambda: _escape(panel))
    panel.min_lesion_spin.valueChanged.connect(lambda _: panel._rethreshold_timer.start())


def _escape(panel) -> None:
    """Escape in the panel: cancel a run, else disarm look here."""
    if panel.running:
        panel.cancel()
    elif panel.reviewer.look_button.isChecked():
        panel.reviewer.look_button.setChecked(False)


def _post_processing_switch(panel, text: str, checked: bool, tip: str) -> QCheckBox:
    """A checkbox for a step after inference: toggling it re-thresholds the stored result (no new run)."""
    check = QCheckBox(text)
    check.setChecked(checked)
    check.setToolTip(tip)
    check.toggled.connect(lambda _=None: panel.apply_threshold(force=True))
    return check
