"""The panel from the keyboard and in other views (Xvfb, the tiny untrained model): the lesion
table's arrow keys jump, Tab leaves the table, the slices keep the arrow keys after a run, Enter
in an open completion list picks and does not run, Escape stops, the focus stays on the panel's
buttons, "current slice" in a sagittal view, Restore view across 2D and 3D, the layers that take
review keys, names for screen readers, and rolling the axes (Ctrl-E)."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication

from napari_boltzformer._request import build_request
from napari_boltzformer._review_keys import keys_taken_by

from .conftest import panel_on, shown_viewer, stop


def _shown_slice(viewer) -> int:
    return int(viewer.dims.current_step[-3])


def test_arrow_keys_in_the_table_jump_to_the_lesion_they_reach(reviewing, qtbot):
    """Down moved the selection without the view, so A then accepted a lesion the reader had not
    seen; Enter did nothing."""
    viewer, panel = reviewing
    table = panel.table
    table.setFocus()
    qtbot.keyClick(table, Qt.Key.Key_N)
    for key, row in ((Qt.Key.Key_Down, 1), (Qt.Key.Key_Down, 2), (Qt.Key.Key_Up, 1), (Qt.Key.Key_End, None),
                     (Qt.Key.Key_Home, 0)):
        qtbot.keyClick(table, key)
        row = table.rowCount() - 1 if row is None else row
        lesion = table.lesion_at(row)
        assert table.currentRow() == row
        assert _shown_slice(viewer) == int(round(lesion["centroid_voxel_zyx"][0])), key
    qtbot.keyClick(table, Qt.Key.Key_Down)
    viewer.dims.set_current_step(viewer.dims.ndim - 3, 0)  # the reader scrolls away
    qtbot.keyClick(table, Qt.Key.Key_Return)  # and back to the row's lesion
    assert _shown_slice(viewer) == int(round(table.lesion_at(1)["centroid_voxel_zyx"][0]))
    qtbot.keyClick(table, Qt.Key.Key_A)
    assert table.lesion_at(1)["status"] == "accepted"


def test_tab_leaves_the_table(reviewing, qtbot):
    viewer, panel = reviewing
    assert not panel.table.tabKeyNavigation()


def test_arrow_keys_step_slices_not_decoder_layers_after_a_run(reviewing, qtbot):
    """The heatmap's decoder-layer axis came first and napari's last_used axis (the one the arrow
    keys step) pointed at it."""
    viewer, panel = reviewing
    assert viewer.dims.ndim == 4  # decoder layer, z, y, x
    assert viewer.dims.last_used == 1  # z


def test_enter_in_an_open_completion_list_picks_the_first_entry_and_does_not_run(reviewing, qtbot):
    viewer, panel = reviewing
    runs = []
    panel.run = lambda: runs.append(panel.prompt_edit.text())
    panel.prompt_edit.returnPressed.disconnect()
    panel.prompt_edit.returnPressed.connect(panel.run)
    edit = panel.prompt_edit
    edit.setFocus()
    edit.clear()
    qtbot.keyClicks(edit, "lung nod")
    qtbot.waitUntil(lambda: edit.completer().popup().isVisible(), timeout=3000)
    qtbot.keyClick(edit.completer().popup(), Qt.Key.Key_Return)
    assert runs == [] and edit.text() == "lung nodule"
    qtbot.keyClick(edit, Qt.Key.Key_Return)  # the list is closed: Enter runs
    assert runs == ["lung nodule"]


def test_escape_cancels_a_run_and_the_focus_stays_on_the_panels_own_controls(make_napari_viewer, tiny_segmenter,
                                                                              qtbot):
    """Run, disabled before Cancel was enabled, passed the focus on to the heatmap's colour box,
    where the next arrow key changed the heatmap."""
    viewer = shown_viewer(make_napari_viewer)
    viewer.open_sample("napari-boltzformer", "chest_ct")
    panel = panel_on(viewer, tiny_segmenter)
    window = viewer.window._qt_window
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=5000)
    panel.run_button.setFocus()
    qtbot.waitUntil(panel.run_button.hasFocus, timeout=5000)
    qtbot.keyClick(panel.run_button, Qt.Key.Key_Space)
    assert panel.running
    assert QApplication.focusWidget() is panel.cancel_button
    qtbot.keyClick(panel.cancel_button, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: not panel.running, timeout=60_000)
    assert "cancel" in panel.status_label.text().lower()
    assert QApplication.focusWidget() is panel.prompt_edit  # Cancel is disabled once pressed: the prompt next
    stop(panel)


def test_current_slice_in_a_sagittal_view_is_refused(reviewing, qtbot, notifications):
    """It segmented the axial slice at the hidden position and replaced the whole result."""
    viewer, panel = reviewing
    panel.scope_combo.setCurrentText("current slice")
    order = list(viewer.dims.order)
    viewer.dims.order = order[:-3] + [order[-1], order[-3], order[-2]]  # x hidden: a sagittal view
    assert build_request(panel) is None
    assert any("the view shows another plane" in text for _, text in notifications)
    viewer.dims.order = order
    viewer.dims.set_current_step(viewer.dims.ndim - 3, 7)
    assert build_request(panel).options["slices"] == (7, 8)


def test_restore_view_only_in_the_display_it_was_kept_in(reviewing, qtbot):
    """Kept in 2D, restored in 3D: the 3D camera went to (0, 0, 0), and back in 2D an edge slice."""
    viewer, panel = reviewing
    from napari_boltzformer._view import _camera

    before = tuple(_camera(viewer).center)
    panel.go_to_lesion(panel.table.lesion_at(0))
    viewer.dims.ndisplay = 3
    panel.restore_view()
    assert panel.restore_view_button.isEnabled()  # kept for 2D
    viewer.dims.ndisplay = 2
    panel.restore_view()
    assert not panel.restore_view_button.isEnabled()
    assert np.allclose(_camera(viewer).center[-2:], before[-2:])


def test_layers_that_take_review_keys_are_named(reviewing, qtbot):
    viewer, panel = reviewing
    assert keys_taken_by(viewer.add_labels(np.zeros((2, 4, 4), np.uint8))) == []
    points = viewer.add_points(ndim=3, name="marks")
    assert keys_taken_by(points) == ["A"]
    viewer.layers.selection.active = points
    assert "keys A now act on the points layer 'marks', not the review" in panel.status_label.text()
    assert keys_taken_by(viewer.add_shapes(ndim=3)) == ["A", "R"]


def test_controls_have_names_for_screen_readers(reviewing):
    viewer, panel = reviewing
    assert panel.range_start.accessibleName() == panel.range_stop.accessibleName() == "Slices"
    assert panel.threshold_slider.accessibleName() == "Threshold"
    assert panel.device_combo.accessibleName() == "Device" and panel.modality_combo.accessibleName() == "Modality"
    assert panel.runs_spin.accessibleName() == "Runs"
    assert panel.reviewer.buttons["previous"].accessibleName() == "previous lesion"
    assert panel.table.accessibleName() == "lesions"
    assert panel.run_button.accessibleDescription().startswith("Segment the image")


def test_the_heatmap_line_names_the_axial_slice_in_other_views(reviewing, qtbot):
    """'this slice: spread over ...' described the axial slice at the hidden z in a sagittal view."""
    viewer, panel = reviewing
    panel.heatmap.update_info()
    assert "this slice" in panel.heatmap.info_label.text()
    order = list(viewer.dims.order)
    viewer.dims.order = order[:-3] + [order[-1], order[-3], order[-2]]
    panel.heatmap.update_info()
    z = int(viewer.dims.current_step[-3])
    assert f"axial slice {z} (not the plane on screen)" in panel.heatmap.info_label.text()


def test_rolling_the_axes_never_puts_the_decoder_layer_on_screen(reviewing, qtbot):
    """Ctrl-E (roll axes) twice showed decoder layer against slice: the heatmap's leading axis
    rolled along with the image's. It stays first; the image's axes roll among themselves."""
    viewer, panel = reviewing
    seen = []
    for _ in range(4):
        viewer.dims.roll()
        assert 0 not in viewer.dims.displayed, viewer.dims.order
        seen.append(tuple(viewer.dims.displayed))
    assert len(set(seen)) == 3  # axial, and the two other planes of the image
    viewer.dims.ndisplay = 3
    viewer.dims.roll()
    assert sorted(viewer.dims.displayed) == [1, 2, 3]
    viewer.dims.ndisplay = 2
    viewer.dims.transpose()
    assert 0 not in viewer.dims.displayed


def test_h_looks_here_under_the_pointer_or_at_the_centre_of_the_view(reviewing, qtbot, monkeypatch):
    """Look here needed a mouse click. H on the canvas looks under the pointer, or, with the
    pointer off the canvas, at the centre of the view, where a jump to a lesion puts it."""
    from napari_boltzformer._view import shown_voxel

    viewer, panel = reviewing
    asked = []
    monkeypatch.setattr(panel.reviewer, "look_here_at", asked.append)
    panel.reviewer.select(1)  # jumps: the camera is centred on row 1's lesion
    lesion = panel.table.lesion_at(1)
    canvas = viewer.window._qt_viewer.canvas.native
    viewer.mouse_over_canvas = False
    qtbot.keyClick(canvas, Qt.Key.Key_H)
    mask = panel._mask_layer_of(panel._active_run)
    voxel = np.asarray(shown_voxel(viewer, mask, asked[-1]), float)
    np.testing.assert_allclose(voxel, lesion["centroid_voxel_zyx"], atol=1.0)
    viewer.mouse_over_canvas = True
    viewer.cursor.position = tuple(viewer.dims.point[:-2]) + (1.5, 2.5)
    panel.reviewer.look_button.setChecked(True)  # armed, then H: H decides, and disarms
    qtbot.keyClick(canvas, Qt.Key.Key_H)
    assert asked[-1] == viewer.cursor.position and not panel.reviewer.look_button.isChecked()
