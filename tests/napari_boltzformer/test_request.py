"""What a Run asks for (_request) and how the panel keeps its controls true to the result shown:
unusable layers named, NaN refused, a layer without physical size warned about, renamed layers
followed, switches synced, settings changed during a run applied, the status after a refusal."""

from __future__ import annotations

import time

import numpy as np
from qtpy.QtWidgets import QApplication

from napari_boltzformer._layers import ROLE_KEY

from .conftest import OTHER_PROMPT, PROMPT, add_volume, ct_volume, run_and_wait


def _errors(notifications) -> list[str]:
    return [m for s, m in notifications if s == "error"]


def _result_roles(viewer) -> set:
    return {layer.metadata.get(ROLE_KEY) for layer in viewer.layers} - {None, "image"}


def test_rgb_and_4d_layers_are_named_with_the_reason_they_cannot_run(panel, viewer, notifications):
    viewer.layers.clear()
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), rgb=True, name="photo")
    viewer.add_image(np.zeros((3, 4, 16, 16), np.float32), name="t4d")
    panel.run()
    assert not panel.running
    error = _errors(notifications)[-1]
    assert "'photo' is RGB" in error and "'t4d' has 4 dimensions" in error
    assert panel.status_label.text().startswith("not started")
    viewer.add_image(np.zeros((3, 16, 16), np.float32), name="usable")
    assert panel.status_label.text() == ""  # it spoke of the image that was missing


def test_a_nan_voxel_is_refused_like_the_reader_refuses_the_file(panel, viewer, notifications):
    """One NaN made every probability NaN and the result silently empty."""
    data = np.asarray(viewer.layers["ct"].data, np.float32).copy()
    data[0, 0, 0] = np.nan
    viewer.layers["ct"].data = data
    panel.run()
    assert not panel.running and not _result_roles(viewer)
    assert "ct: has 1 NaN or infinite voxels" in _errors(notifications)[-1]


def test_a_layer_without_physical_size_is_warned_about_and_its_results_keep_pixel_units(
        panel, viewer, qtbot, notifications):
    viewer.layers.clear()
    viewer.add_image(np.asarray(ct_volume().array), name="plain")  # napari's defaults: scale 1, units pixel
    panel.image_combo.setCurrentText("plain")
    run_and_wait(panel, qtbot)
    warnings = [m for s, m in notifications if s == "warning"]
    assert any("'plain' has no physical voxel size" in m and "1 x 1 x 1 mm" in m for m in warnings)
    mask = viewer.layers[PROMPT]
    assert all(str(u) == "pixel" for u in mask.units)  # as the image's: napari warns on mixed units


def test_a_renamed_image_layer_stays_chosen_and_runs(panel, viewer, qtbot, notifications):
    viewer.layers["ct"].name = "renamed"
    assert panel.image_combo.currentText() == "renamed"
    run_and_wait(panel, qtbot)
    assert not _errors(notifications) and PROMPT in viewer.layers


def test_the_filter_switches_follow_the_result_shown(panel, viewer, qtbot):
    """The switch acts on the result shown; showing another result shows that one's setting."""
    run_and_wait(panel, qtbot)
    first = panel._active_run
    panel.fp_check.setChecked(False)  # the first result: filter off
    panel.prompt_edit.setText(OTHER_PROMPT)
    run_and_wait(panel, qtbot)
    panel.fp_check.setChecked(True)  # the second: filter on
    second = panel._active_run
    viewer.layers.selection.active = panel._mask_layer_of(first)
    assert panel._active_run == first and not panel.fp_check.isChecked() and not panel.active_result().fp_reduction
    viewer.layers.selection.active = panel._mask_layer_of(second)
    assert panel._active_run == second and panel.fp_check.isChecked() and panel.active_result().fp_reduction


def test_settings_changed_during_a_run_apply_to_its_result(panel, viewer, qtbot, tiny_segmenter, monkeypatch,
                                                           notifications):
    original = tiny_segmenter.predict_batch

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_segmenter, "predict_batch", slow)
    panel.batch_size = 2
    panel.run()
    panel.threshold_slider.setValue(27)
    panel.fp_check.setChecked(False)
    qtbot.waitUntil(lambda: not panel.running, timeout=60_000)
    result = panel.active_result()
    assert result.threshold == 0.27 and not result.fp_reduction
    assert panel.threshold_slider.value() == 27 and not panel.fp_check.isChecked()
    assert any("changed during the run" in m for _, m in notifications)


def test_rethresholding_shows_a_busy_cursor(panel, qtbot, monkeypatch):
    run_and_wait(panel, qtbot)
    result = panel.active_result()
    seen = []
    original = result.rethreshold

    def spy(*args, **kwargs):
        seen.append((QApplication.overrideCursor() is not None, panel.status_label.text()))
        return original(*args, **kwargs)

    monkeypatch.setattr(result, "rethreshold", spy)
    status = panel.status_label.text()
    panel.threshold_slider.setValue(40)
    panel.apply_threshold()
    assert seen == [(True, "re-thresholding…")] and QApplication.overrideCursor() is None
    assert panel.status_label.text() == status


def test_the_detectors_first_pass_runs_off_the_main_thread(viewer, tiny_segmenter, qtbot):
    """Its candidate pass takes seconds on a CT: a worker finds them, then the switch applies."""
    from .conftest import panel_on

    add_volume(viewer, ct_volume(shape=(16, 48, 40)))  # 40 mm deep: the detector's classifier fits
    panel = panel_on(viewer, tiny_segmenter)
    run_and_wait(panel, qtbot)
    result = panel.active_result()
    assert result.detector_skip_reason() is None and not result.detector_candidates_found
    status = panel.status_label.text()
    panel.detector_check.setChecked(True)
    assert panel._finder is not None and panel.status_label.text() == "finding 3D nodule candidates…"
    panel.threshold_slider.setValue(30)  # moved meanwhile: applied when the pass ends
    panel.apply_threshold()
    assert not result.nodule_detector
    panel.wait(120)
    assert panel._finder is None and result.detector_candidates_found and result.nodule_detector
    assert result.threshold == 0.30 and panel.status_label.text() == status


def test_a_failed_run_says_so_in_the_progress_bar(panel, qtbot, tmp_path, notifications):
    from napari_boltzformer._widget import BoltzFormerWidget

    broken = BoltzFormerWidget(panel.viewer, weights=tmp_path / "missing.safetensors")
    broken.prompt_edit.setText(PROMPT)
    run_and_wait(broken, qtbot)
    assert broken.status_label.text() == "failed" and broken.progress_bar.format() == "failed"


def test_the_core_refuses_non_finite_voxels_too(tiny_segmenter):
    import pytest

    from boltzformer.errors import InputError

    volume = ct_volume()
    bad = volume.with_array(volume.array.astype(np.float32))
    bad.array[3, 10, 10] = np.inf
    with pytest.raises(InputError, match="the image: has 1 NaN or infinite voxels"):
        tiny_segmenter.segment_volume(bad, PROMPT)


def test_add_volume_helper_still_gives_a_usable_layer(panel, viewer):
    add_volume(viewer, ct_volume(), name="second")
    assert "second" in [panel.image_combo.itemText(i) for i in range(panel.image_combo.count())]
