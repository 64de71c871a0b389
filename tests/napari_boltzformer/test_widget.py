"""The BoltzFormer panel on a real viewer (Xvfb), with a tiny untrained model injected."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from napari_boltzformer._layers import ROLE_KEY
from napari_boltzformer._view import _camera
from napari_boltzformer._widget import BoltzFormerWidget

from .conftest import PROMPT, add_volume, ct_volume, oblique_direction, out_of_memory_gpu, run_and_wait, threshold_until


def _count_batches(monkeypatch, segmenter, delay_s: float = 0.0) -> list:
    """Count (and optionally slow down) the network calls of `segmenter`."""
    calls = []
    original = segmenter.predict_batch

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        if delay_s:
            time.sleep(delay_s)
        return original(*args, **kwargs)

    monkeypatch.setattr(segmenter, "predict_batch", counted)
    return calls


def _roles(viewer) -> dict:
    return {layer.metadata.get(ROLE_KEY): layer for layer in viewer.layers if layer.metadata.get(ROLE_KEY)}


def test_a_run_makes_the_result_layers(panel, viewer, qtbot, notifications):
    panel.runs_spin.setValue(2)
    run_and_wait(panel, qtbot)
    assert not [m for s, m in notifications if s == "error"]
    roles = _roles(viewer)
    assert {"image", "mask", "probability", "uncertainty", "attention"} <= set(roles)
    image, mask = roles["image"], roles["mask"]
    assert mask.name == PROMPT and mask.data.shape == image.data.shape
    assert set(np.unique(mask.data)) <= {0, 1}
    for role in ("mask", "probability", "uncertainty"):  # same placement as the image
        assert np.allclose(roles[role].scale, image.scale) and np.allclose(roles[role].translate, image.translate)
    prob = roles["probability"].data
    assert prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    assert roles["uncertainty"].data.shape == image.data.shape
    # the heatmap is drawn over the mask (its hottest cells would hide under the fill), the mask over the rest
    assert viewer.layers[-1] is roles["attention"] and viewer.layers[-2] is mask
    assert panel.progress_bar.value() == panel.progress_bar.maximum() == 2 * image.data.shape[0]
    assert panel.table.rowCount() == len(panel.active_result().lesions)
    # beside the count and volume, what they are: said while lesions are shown, and only then
    assert panel.result_label.toolTip().endswith(" mL (model estimate)") == (panel.table.rowCount() > 0)


def test_rerunning_a_prompt_updates_its_layers_and_prompts_coexist(panel, viewer, qtbot):
    run_and_wait(panel, qtbot)
    n_layers = len(viewer.layers)
    first = viewer.layers[PROMPT]
    panel.seed_spin.setValue(5)
    run_and_wait(panel, qtbot)
    assert len(viewer.layers) == n_layers and viewer.layers[PROMPT] is first
    run_and_wait(panel, qtbot)
    assert len(panel._results) == 1  # each re-run kept its predecessor's arrays (9 bytes a voxel)
    panel.prompt_edit.setText("Brain  Lesion")
    run_and_wait(panel, qtbot)
    assert {PROMPT, "brain lesion"} <= {layer.name for layer in viewer.layers}
    assert len(panel._results) == 2
    heatmaps = [layer for layer in viewer.layers if layer.metadata.get(ROLE_KEY) == "attention"]
    assert [h.visible for h in heatmaps] == [False, True]  # the new prompt's shown, the other's hidden
    assert panel.prompt_edit.recent[:2] == ["brain lesion", PROMPT]
    assert "brain lesion" in panel.prompt_edit.completions()


def test_a_mask_deleted_and_made_again_by_a_re_run_lies_under_the_heatmap(panel, viewer, qtbot):
    """The re-run's new mask went on top, over the heatmap, whose hottest cells it then hid."""
    run_and_wait(panel, qtbot)
    viewer.layers.remove(_roles(viewer)["mask"])
    run_and_wait(panel, qtbot)
    roles = _roles(viewer)
    assert viewer.layers.index(roles["mask"]) == viewer.layers.index(roles["attention"]) - 1
    assert viewer.layers[-1] is roles["attention"]


def test_the_seed_box_takes_every_seed_the_command_line_takes(panel, qtbot):
    """A QSpinBox stopped at 2**31 - 1: a 64-bit seed from the command line or a review record
    could not be typed in to replay a run."""
    from qtpy.QtCore import Qt

    from boltzformer.options import MAX_SEED
    from napari_boltzformer._request import build_request

    box = panel.seed_spin
    box.clear()
    qtbot.keyClicks(box, str(2**40 + 3))
    qtbot.keyClick(box, Qt.Key.Key_Return)
    assert build_request(panel).options["seed"] == 2**40 + 3
    box.setText("99999999999999999999")  # over 2**63 - 1: the largest seed, shown as used
    box.editingFinished.emit()
    assert box.text() == str(MAX_SEED) and build_request(panel).options["seed"] == MAX_SEED
    box.clear()
    qtbot.keyClicks(box, "-1x")  # only digits are typed in
    assert box.text() == "1"
    box.clear()
    qtbot.keyClick(box, Qt.Key.Key_Return)  # a cleared box shows the seed a run uses
    assert box.text() == "0" and build_request(panel).options["seed"] == 0


@pytest.mark.parametrize("direction", ["axis-aligned", "oblique"])
def test_attention_heatmaps_one_per_decoder_layer_and_aligned_with_the_image(make_napari_viewer, qtbot, tiny_segmenter, direction):
    viewer = make_napari_viewer()
    volume = ct_volume(shape=(10, 48, 40), direction=oblique_direction() if direction == "oblique" else None)
    image = add_volume(viewer, volume)
    panel = BoltzFormerWidget(viewer, segmenter=tiny_segmenter)
    panel.prompt_edit.setText(PROMPT)
    panel.scope_combo.setCurrentText("slice range")
    panel.range_start.setValue(3)
    panel.range_stop.setValue(7)
    run_and_wait(panel, qtbot)
    heat = _roles(viewer)["attention"]
    num_layers = tiny_segmenter.config.num_layers
    grid = tiny_segmenter.config.image_size // tiny_segmenter.config.finest_stride
    assert heat.data.shape == (num_layers, 5, grid, grid)  # decoder layer, processed slices, grid
    assert heat.data.dtype == np.float16  # kept at grid resolution
    assert viewer.dims.axis_labels[0].startswith("layer · τ ") and viewer.dims.nsteps[0] == num_layers
    assert heat.blending == "translucent" and heat.colormap.name == "boltzformer heat"
    # Outer corners (voxel edges) of the heatmap grid land on those of the processed slab.
    for corner in ([0, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1]):
        c = np.asarray(corner, float)
        heat_index = np.concatenate([[0.0], c * ([5, grid, grid]) - 0.5])
        image_index = c * ([5, 48, 40]) - 0.5 + [3, 0, 0]
        heat_world = np.asarray(heat.data_to_world(heat_index))[1:]
        image_world = np.asarray(image.data_to_world(image_index))
        assert np.allclose(heat_world, image_world, atol=1e-6), corner
    # A cell centre sits on the centre of the source voxels it covers.
    gy, gx = 48 / grid, 40 / grid
    cell_centre = np.asarray(heat.data_to_world([2.0, 1.0, 4.0, 5.0]))[1:]
    voxel = np.asarray(image.data_to_world([4.0, 4 * gy + (gy - 1) / 2, 5 * gx + (gx - 1) / 2]))
    assert np.allclose(cell_centre, voxel, atol=1e-6)


def test_threshold_slider_rethresholds_without_running_the_model(panel, viewer, qtbot, tiny_segmenter, monkeypatch):
    calls = _count_batches(monkeypatch, tiny_segmenter)
    panel.min_lesion_spin.setValue(0.0)
    panel.fp_check.setChecked(False)  # the untrained test model's candidates are not nodules: keep them all
    run_and_wait(panel, qtbot)
    batches = len(calls)
    assert batches > 0 and panel.model_calls == 1
    mask = viewer.layers[PROMPT]
    result = panel.active_result()
    low, high = 0.05, 0.95
    panel.threshold_slider.setValue(int(low * 100))
    qtbot.waitUntil(lambda: result.threshold == pytest.approx(low), timeout=2000)
    n_low = int(mask.data.sum())
    assert np.array_equal(mask.data, (result.probabilities >= low).astype(np.uint8))
    panel.threshold_slider.setValue(int(high * 100))
    qtbot.waitUntil(lambda: result.threshold == pytest.approx(high), timeout=2000)
    assert np.array_equal(mask.data, (result.probabilities >= high).astype(np.uint8))
    assert int(mask.data.sum()) < n_low
    assert len(calls) == batches and panel.model_calls == 1  # no inference
    assert panel.table.rowCount() == len(result.lesions)


@pytest.mark.parametrize("keep", [False, True])
def test_cancel_stops_within_a_batch(panel, viewer, qtbot, tiny_segmenter, monkeypatch, notifications, keep):
    calls = _count_batches(monkeypatch, tiny_segmenter, delay_s=0.3)
    panel.batch_size = 2
    panel.keep_partial_check.setChecked(keep)
    n_slices = viewer.layers["ct"].data.shape[0]
    panel.run()
    qtbot.waitUntil(lambda: len(calls) >= 1, timeout=30_000)
    panel.cancel()
    qtbot.waitUntil(lambda: not panel.running, timeout=30_000)
    assert len(calls) <= 2 < n_slices // 2  # stopped after at most the batch in flight
    roles = _roles(viewer)
    if not keep:
        assert set(roles) == {"image"}  # no partial layer
        assert any("cancelled" in m for _, m in notifications)
    else:
        done = 2 * len(calls)
        prob = roles["probability"].data
        assert (prob[:done] > 0).all() and not prob[done:].any()
        assert "attention" in roles and roles["attention"].data.shape[1] == n_slices


def test_closing_the_dock_during_a_run_stops_it_and_changes_no_layer(panel, viewer, qtbot, tiny_segmenter,
                                                                     monkeypatch, notifications):
    """napari's close button takes the panel out of its dock without deleting it: the run must
    stop there, not add its layers to the viewer later, out of nowhere."""
    calls = _count_batches(monkeypatch, tiny_segmenter, delay_s=0.3)
    panel.batch_size = 2
    n_slices = viewer.layers["ct"].data.shape[0]
    panel.run()
    qtbot.waitUntil(lambda: len(calls) >= 1, timeout=30_000)
    viewer.window.remove_dock_widget(panel)
    qtbot.waitUntil(lambda: not panel.running, timeout=30_000)
    assert len(calls) <= 2 < n_slices // 2
    assert set(_roles(viewer)) == {"image"}
    assert any("panel was closed during the run" in m for _, m in notifications)


def test_a_scan_renamed_during_the_run_keeps_its_result_and_a_new_one_under_its_name_gets_none(
        panel, viewer, qtbot, tiny_segmenter, monkeypatch):
    """The result went to whichever layer held the image's name when the run ended: renamed to
    'ct A' with another scan opened as 'ct', A's mask was labelled as the other scan's."""
    from napari_boltzformer._layers import GEOMETRY_KEY, SOURCE_KEY

    calls = _count_batches(monkeypatch, tiny_segmenter, delay_s=0.3)
    panel.batch_size = 2
    first = viewer.layers["ct"]
    panel.run()
    qtbot.waitUntil(lambda: len(calls) >= 1, timeout=30_000)
    first.name = "ct A"
    add_volume(viewer, ct_volume(shape=(10, 30, 30)), name="ct")
    qtbot.waitUntil(lambda: not panel.running, timeout=60_000)
    mask = _roles(viewer)["mask"]
    assert mask.metadata[SOURCE_KEY] == "ct A" and mask.data.shape == first.data.shape
    assert mask.metadata[GEOMETRY_KEY] == first.metadata[GEOMETRY_KEY]


def test_a_scan_renamed_after_its_run_has_its_layers_updated_by_the_next_run(panel, viewer, qtbot):
    """Renamed after a run, the next run added a second set of layers ('lung nodule [1]', a second
    heatmap) beside the first, whose review it did not carry over."""
    from napari_boltzformer._layers import SOURCE_KEY

    run_and_wait(panel, qtbot)
    n_layers, mask = len(viewer.layers), _roles(viewer)["mask"]
    viewer.layers["ct"].name = "ct, arterial"
    assert mask.metadata[SOURCE_KEY] == "ct, arterial"
    run_and_wait(panel, qtbot)
    assert len(viewer.layers) == n_layers and _roles(viewer)["mask"] is mask


def test_a_scan_renamed_after_the_panel_was_reopened_keeps_its_result_layers(panel, viewer, qtbot, tiny_segmenter):
    """A reopened panel learnt the image names at its first layer event: a rename before that
    was missed, and the next run added a second set of result layers."""
    from napari_boltzformer._layers import SOURCE_KEY
    from napari_boltzformer._widget import BoltzFormerWidget

    run_and_wait(panel, qtbot)
    n_layers, mask = len(viewer.layers), _roles(viewer)["mask"]
    viewer.window.remove_dock_widget(panel)
    panel.deleteLater()
    qtbot.wait(50)
    again = BoltzFormerWidget(viewer, segmenter=tiny_segmenter)
    viewer.window.add_dock_widget(again, name="BoltzFormer again", area="right")
    viewer.layers["ct"].name = "patient 7"
    assert mask.metadata[SOURCE_KEY] == "patient 7"
    again.prompt_edit.setText(PROMPT)
    again.image_combo.setCurrentText("patient 7")
    run_and_wait(again, qtbot)
    assert len(viewer.layers) == n_layers and _roles(viewer)["mask"] is mask


def test_a_scan_closed_during_the_run_gets_no_result_layers(panel, viewer, qtbot, tiny_segmenter, monkeypatch,
                                                           notifications):
    calls = _count_batches(monkeypatch, tiny_segmenter, delay_s=0.3)
    panel.batch_size = 2
    panel.run()
    qtbot.waitUntil(lambda: len(calls) >= 1, timeout=30_000)
    viewer.layers.remove("ct")
    add_volume(viewer, ct_volume(shape=(10, 30, 30)), name="ct")  # another scan, the same name
    qtbot.waitUntil(lambda: not panel.running, timeout=60_000)
    assert set(_roles(viewer)) == {"image"}
    assert any("was closed during the run; its result was not shown" in m for _, m in notifications)


def test_a_scan_given_other_voxels_during_the_run_gets_no_result_layers(panel, viewer, qtbot, tiny_segmenter,
                                                                        monkeypatch, notifications):
    """Only the shape and placement were compared: other voxels of the same shape (another
    series pasted in by a script or plugin) were labelled with a result not computed on them."""
    calls = _count_batches(monkeypatch, tiny_segmenter, delay_s=0.3)
    panel.batch_size = 2
    panel.run()
    qtbot.waitUntil(lambda: len(calls) >= 1, timeout=30_000)
    viewer.layers["ct"].data = np.full_like(np.asarray(viewer.layers["ct"].data), -1000)
    qtbot.waitUntil(lambda: not panel.running, timeout=60_000)
    assert set(_roles(viewer)) == {"image"}
    assert any("was given other data or another placement during the run" in m for _, m in notifications)


def test_closing_the_viewer_during_the_detectors_pass_raises_nothing(panel, viewer, qtbot):
    """The 3D detector's candidate pass ended after the viewer had closed and its callback wrote
    to the deleted status label: 'wrapped C/C++ object of type QLabel has been deleted'."""
    add_volume(viewer, ct_volume(shape=(16, 48, 40)), name="ct16")  # 40 mm: the detector needs 32
    panel.image_combo.setCurrentText("ct16")
    run_and_wait(panel, qtbot)
    result = panel.active_result()
    find = result.find_detector_candidates
    result.find_detector_candidates = lambda: time.sleep(1.0) or find()
    panel.fp_check.setChecked(True)
    panel.detector_check.setChecked(True)
    panel.apply_threshold()
    assert panel._finder is not None
    viewer.close()
    qtbot.wait(2500)  # the pass ends; pytest-qt fails the test on an exception in its callback


def test_current_slice_scope_runs_one_slice(panel, viewer, qtbot, tiny_segmenter, monkeypatch):
    calls = _count_batches(monkeypatch, tiny_segmenter)
    panel.scope_combo.setCurrentText("current slice")
    viewer.dims.set_current_step(0, 7)
    run_and_wait(panel, qtbot)
    assert calls == [1]
    result = panel.active_result()
    assert result.slices == (7, 8)
    assert _roles(viewer)["attention"].data.shape[1] == 1


def test_errors_become_notifications(panel, viewer, qtbot, notifications, tmp_path):
    panel.prompt_edit.setText("   ")
    panel.run()
    assert not panel.running
    viewer.layers.clear()
    panel.prompt_edit.setText(PROMPT)
    panel.run()
    assert not panel.running
    errors = [m for s, m in notifications if s == "error"]
    assert len(errors) == 2 and "prompt is empty" in errors[0] and "no image layer" in errors[1]
    # Missing weights: a notification from the worker, the viewer still works.
    add_volume(viewer, ct_volume())
    broken = BoltzFormerWidget(viewer, weights=tmp_path / "missing.safetensors")
    broken.prompt_edit.setText(PROMPT)
    run_and_wait(broken, qtbot)
    errors = [m for s, m in notifications if s == "error"]
    assert len(errors) == 3 and "missing.safetensors" in errors[-1]
    assert {layer.name for layer in viewer.layers} == {"ct"}


def test_out_of_memory_on_the_accelerator_retries_on_the_cpu(panel, viewer, qtbot, tiny_segmenter, monkeypatch, notifications):
    devices, released = [], []

    def load(device):
        devices.append(device)
        return out_of_memory_gpu(tiny_segmenter, released) if device == "cuda" else tiny_segmenter

    monkeypatch.setattr(panel, "load_segmenter", load)
    panel.device_combo.model().item(1).setEnabled(True)
    panel.device_combo.setCurrentIndex(1)  # CUDA
    run_and_wait(panel, qtbot)
    assert devices == ["cuda", "cpu"]
    assert released == [True]
    assert any(s == "warning" and "out of memory" in m and "CPU" in m for s, m in notifications)
    assert PROMPT in viewer.layers


def test_lesion_table_click_moves_the_viewer_to_the_lesion(panel, viewer, qtbot):
    from qtpy.QtCore import Qt

    panel.min_lesion_spin.setValue(0.0)
    run_and_wait(panel, qtbot)
    result = panel.active_result()
    # A threshold that leaves at least two components of the untrained model's output.
    threshold_until(panel, lambda r: len(r.lesions) >= 2, range(50, 100, 5))
    assert panel.table.rowCount() == len(result.lesions) >= 1
    panel.table.sortItems(1)  # by volume, ascending
    row = 0
    index = panel.table.item(row, 0).data(Qt.ItemDataRole.UserRole + 1)
    lesion = result.lesions[int(index)]
    panel.table.cellClicked.emit(row, 1)
    mask = viewer.layers[PROMPT]
    z = int(round(lesion["centroid_voxel_zyx"][0]))
    assert viewer.dims.current_step[-3] == z
    world = np.asarray(mask.data_to_world(lesion["centroid_voxel_zyx"]))
    assert np.allclose(_camera(viewer).center[-2:], world[-2:], atol=1e-6)


def test_the_mask_export_writes_the_selected_layer_under_its_own_name(panel, viewer, qtbot, tmp_path, monkeypatch):
    """Run on ct, run on ct2, select ct's mask, run ct2 again: the table showed ct2 while ct's
    mask stayed selected, and Mask -> NIfTI offered ct2_lung_nodule.nii.gz holding ct's mask. A
    run now selects its own mask; a labels layer of no run is offered under its own name."""
    from qtpy.QtWidgets import QFileDialog

    add_volume(viewer, ct_volume(shape=(10, 30, 30)), name="ct2")
    panel.min_lesion_spin.setValue(0.0)
    panel.image_combo.setCurrentText("ct")
    run_and_wait(panel, qtbot)
    first_mask = viewer.layers.selection.active = panel._mask_layer_of(panel._active_run)
    panel.image_combo.setCurrentText("ct2")
    run_and_wait(panel, qtbot)
    viewer.layers.selection.active = first_mask  # back to ct's result
    assert panel.active_result().mask.shape == first_mask.data.shape
    run_and_wait(panel, qtbot)  # ct2 again: its layers are updated in place
    assert viewer.layers.selection.active is panel._mask_layer_of(panel._active_run)
    offered = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda parent, title, start, *a, **k: offered.append(start) or ("", ""))
    panel.exports.mask_button.click()
    assert Path(offered[-1]).name == "ct2_lung_nodule.nii.gz"
    viewer.add_labels(np.zeros((12, 48, 40), np.uint8), name="my roi")  # drawn by hand: selected
    panel.exports.mask_button.click()
    assert Path(offered[-1]).name == "my_roi.nii.gz"


def test_exports_round_trip(panel, viewer, qtbot, tmp_path, monkeypatch):
    import csv

    from qtpy.QtWidgets import QFileDialog, QMessageBox

    from boltzformer.io import read_volume, write_volume

    volume = ct_volume(direction=oblique_direction())
    write_volume(volume, tmp_path / "oblique.mha")
    viewer.layers.clear()
    viewer.open(tmp_path / "oblique.mha", plugin="napari-boltzformer")
    panel.image_combo.setCurrentText("oblique")
    panel.min_lesion_spin.setValue(0.0)
    run_and_wait(panel, qtbot)
    result = panel.active_result()

    answers = iter([str(tmp_path / "mask.nii.gz"), str(tmp_path / "table.csv"), str(tmp_path / "view.png")])
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (next(answers), ""))
    panel.exports.mask_button.click()
    back = read_volume(tmp_path / "mask.nii.gz")
    assert back.same_geometry(volume, atol=1e-4) and np.array_equal(back.array, result.mask)
    panel.exports.table_button.click()
    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.lesions)
    panel.exports.png_button.click()
    from PIL import Image

    with Image.open(tmp_path / "view.png") as png:  # it said nothing of what it showed (review)
        said = png.info["Description"]
        assert said.startswith(f"oblique · '{PROMPT}' · threshold {result.threshold:.2f} · ")
        assert png.height > viewer.screenshot(canvas_only=True, flash=False).shape[0]  # the caption band

    # A name without extension that exists with it: the panel asks, "No" keeps the file.
    before = (tmp_path / "mask.nii.gz").read_bytes()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "mask"), ""))
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.StandardButton.No)
    assert panel.exports.mask() is None
    assert asked and (tmp_path / "mask.nii.gz").read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))
    # macOS's native dialog turns "mask2" into "mask2.gz" under the "*.nii.gz" filter: not "mask2.gz.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "mask2.gz"), ""))
    assert panel.exports.ask_save_path("t", tmp_path / "x.nii.gz", "NIfTI (*.nii.gz *.nii)", (".nii.gz", ".nii")) \
        == tmp_path / "mask2.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "table9"), ""))
    assert panel.exports.ask_save_path("t", tmp_path / "x.csv", "CSV (*.csv)", (".csv",)) == tmp_path / "table9.csv"


def test_panel_opens_from_the_plugin_menu(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    add_volume(viewer, ct_volume())
    _, widget = viewer.window.add_plugin_dock_widget("napari-boltzformer", "BoltzFormer")
    assert isinstance(widget, BoltzFormerWidget)
    # napari hands plugin widgets a proxy whose layers are new proxies on every access: the
    # panel's `is` checks (which layer is under review, for the exports) all failed through it
    assert widget.viewer.layers[0] is widget.viewer.layers[0] and widget.viewer is viewer
    assert widget.image_combo.currentText() == "ct"
    devices = widget.device_combo.model()
    assert devices.item(3).isEnabled()  # CPU always
    # the GPUs torch cannot use are greyed out once a worker thread has asked (it held the first
    # opening of the panel for 1.8 s on the main thread)
    import torch

    if not torch.cuda.is_available():
        qtbot.waitUntil(lambda: not devices.item(1).isEnabled(), timeout=30_000)
        assert "not available on this machine" in devices.item(1).toolTip()


def test_prompt_warnings_become_notifications(panel, qtbot, tiny_segmenter, monkeypatch, notifications):
    original = tiny_segmenter.check_prompt

    def far(prompt, **kwargs):
        text, warnings = original(prompt, **kwargs)
        return text, [*warnings, f"prompt '{text}' is far from everything the model was trained on"]

    monkeypatch.setattr(tiny_segmenter, "check_prompt", far)
    run_and_wait(panel, qtbot)
    assert any(s == "warning" and "far from everything" in m for s, m in notifications)


def test_a_2d_image_layer_gives_2d_result_layers(make_napari_viewer, qtbot, tiny_segmenter):
    viewer = make_napari_viewer()
    image = viewer.add_image(ct_volume().array[4], name="slice", scale=(0.6, 0.9), translate=(10.0, -5.0))
    panel = BoltzFormerWidget(viewer, segmenter=tiny_segmenter)
    panel.prompt_edit.setText(PROMPT)
    panel.modality_combo.setCurrentText("CT")
    run_and_wait(panel, qtbot)
    roles = _roles(viewer)
    mask, heat = roles["mask"], roles["attention"]
    assert mask.data.shape == image.data.shape
    assert np.allclose(mask.scale, image.scale) and np.allclose(mask.translate, image.translate)
    assert heat.data.ndim == 3 and heat.data.shape[0] == tiny_segmenter.config.num_layers
    corner = np.asarray(heat.data_to_world([0.0, -0.5, -0.5]))[1:]
    assert np.allclose(corner, image.data_to_world([-0.5, -0.5]))


def test_false_positive_filter_switch_reapplies_without_inference(panel, qtbot, monkeypatch):
    """The 3D filter's verdicts (here: every candidate is a vessel) drop candidates; the switch
    brings them back and takes them away again without running the network."""
    from boltzformer import fp_filter

    monkeypatch.setattr(fp_filter, "verdict", lambda features, min_nodule_score=None: "vessel-like (test)")
    panel.min_lesion_spin.setValue(0.0)
    panel.threshold_slider.setValue(5)  # 0.05 (the slider counts hundredths): candidates for sure
    run_and_wait(panel, qtbot)
    result = panel.active_result()
    calls = _count_batches(monkeypatch, panel.load_segmenter("cpu"))
    filtered = len(result.lesions)
    rejected = len(result.rejected)
    assert result.fp_reduction and rejected > 0
    assert "dropped by the false-positive filter" in panel.result_detail.text()
    headers = [panel.table.horizontalHeaderItem(c).text() for c in range(panel.table.columnCount())]
    # blobness is measured for kept candidates only (no rule uses it for dropped ones): none kept, none shown
    assert all(r["blobness"] != r["blobness"] for r in result.rejected)
    assert panel.table.isColumnHidden(headers.index("round"))
    panel.fp_check.setChecked(False)
    assert not result.fp_reduction and not result.rejected and len(result.lesions) == filtered + rejected
    assert panel.table.rowCount() == filtered + rejected
    panel.fp_check.setChecked(True)
    assert len(result.lesions) == filtered and calls == []


def test_a_prompt_that_names_nothing_is_a_notification_and_no_layer_unless_forced(panel, viewer, qtbot, notifications):
    before = len(viewer.layers)
    panel.prompt_edit.setText("banana")
    run_and_wait(panel, qtbot)
    assert len(viewer.layers) == before
    assert any(s == "error" and "names nothing this model was trained to find" in m for s, m in notifications)
    panel.force_prompt_check.setChecked(True)
    run_and_wait(panel, qtbot)
    assert "mask" in _roles(viewer)
    assert any(s == "warning" and "forced" in m for s, m in notifications)


def test_nodule_detector_switch_says_why_it_cannot_run_here(panel, qtbot, monkeypatch, notifications):
    """The switch re-thresholds without inference; on this 30 mm deep CT the detector cannot
    run, and a notification says so (once), instead of nothing happening."""
    run_and_wait(panel, qtbot)
    result = panel.active_result()
    calls = _count_batches(monkeypatch, panel.load_segmenter("cpu"))
    assert not panel.detector_check.isChecked() and not result.nodule_detector
    panel.detector_check.setChecked(True)
    assert result.nodule_detector and calls == []
    said = [m for s, m in notifications if s == "warning" and "3D nodule detector was not applied" in m]
    assert len(said) == 1 and "spans 30 mm along z" in said[0]
    panel.threshold_slider.setValue(40)
    panel.apply_threshold(force=True)
    assert len([m for s, m in notifications if "3D nodule detector" in m]) == 1


def test_mirror_switch_runs_each_slice_mirrored_too(panel, qtbot, tiny_segmenter, keyword_spy):
    """The 'mirror' box (default: options.DEFAULT_MIRROR) reaches every network pass of the next run
    and is recorded on the result (the review sidecar writes it)."""
    from boltzformer.options import DEFAULT_MIRROR

    assert panel.mirror_check.isChecked() == DEFAULT_MIRROR
    seen = keyword_spy(tiny_segmenter, "predict_batch", "mirror")
    for checked in (not DEFAULT_MIRROR, DEFAULT_MIRROR):
        seen.clear()
        panel.mirror_check.setChecked(checked)
        run_and_wait(panel, qtbot)
        assert seen and set(seen) == {checked} and panel.active_result().mirror == checked
        assert ("each slice also mirrored" in panel.status_label.text()) == checked


def test_planes_choice_reaches_the_run_and_the_status_line(viewer, tiny_segmenter, qtbot, keyword_spy):
    """The planes box (default: options.DEFAULT_PLANES) reaches the next run; a three-plane run is
    said in the status line and recorded on the result."""
    from boltzformer.options import DEFAULT_PLANES

    from .conftest import panel_on, stop

    add_volume(viewer, ct_volume(shape=(14, 48, 42)))  # 35 x 34 x 34 mm: deep enough for coronal and sagittal cuts
    panel = panel_on(viewer, tiny_segmenter)
    assert panel.planes_combo.currentData() == DEFAULT_PLANES
    seen = keyword_spy(tiny_segmenter, "iter_segment", "planes")
    try:
        for value in ("three", "axial"):
            panel.planes_combo.setCurrentIndex(panel.planes_combo.findData(value))
            run_and_wait(panel, qtbot)
            assert seen[-1] == value and panel.active_result().planes == value
            assert ("in three planes" in panel.status_label.text()) == (value == "three")
    finally:
        stop(panel)


def test_exports_of_a_dicom_series_are_offered_beside_its_folder_not_in_it(panel, viewer, qtbot, tmp_path, monkeypatch):
    """A derived file dropped into a series folder joins the series (and archive folders are
    often read-only); a NIfTI scan's exports go beside the file."""
    from qtpy.QtWidgets import QFileDialog

    from ..model.io.test_io import write_ct_series

    write_ct_series(tmp_path / "study" / "series", np.full((3, 16, 12), -800, np.int16))
    viewer.layers.clear()
    viewer.open(tmp_path / "study" / "series", plugin="napari-boltzformer")
    panel.min_lesion_spin.setValue(0.0)
    run_and_wait(panel, qtbot)
    offered = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda _parent, _title, default, _filter: offered.append(default)
                        or ("", ""))
    panel.exports.mask_button.click()
    assert Path(offered[-1]).parent == tmp_path / "study"
    assert not list((tmp_path / "study" / "series").glob("*.nii.gz"))


def test_seldom_changed_options_fold_away_so_the_lesion_table_keeps_rows(panel, qtbot):
    """At 1400 x 900 the lesion table showed one row below seed, runs and eight output switches."""
    assert not panel.fp_check.isVisibleTo(panel) and not panel.seed_spin.isVisibleTo(panel)
    assert panel.fp_check.isChecked()  # folded, not off
    panel.options_button.setChecked(True)
    assert panel.fp_check.isVisibleTo(panel) and panel.seed_spin.isVisibleTo(panel)
    assert panel.options_button.text() == "fewer options"
