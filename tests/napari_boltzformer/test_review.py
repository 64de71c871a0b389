"""The review loop through the real panel on a shown viewer (Xvfb), with the tiny untrained model:
keys on the canvas and the table, painting with napari's own brush, the threshold slider,
closing and reopening the panel, look here (Alt-click), and exports read back."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt

from boltzformer.io import read_volume
from boltzformer.look_here import look_here
from boltzformer.weights import sha256
from napari_boltzformer._review import REVIEW_KEY
from napari_boltzformer._view import _camera
from napari_boltzformer._widget import BoltzFormerWidget

from .conftest import OTHER_PROMPT, PROMPT, run_and_wait


def key(viewer, qtbot, k, shift=False):
    """A key press on the canvas, as a reader types it."""
    native = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(native, k, Qt.KeyboardModifier.ShiftModifier if shift else Qt.KeyboardModifier.NoModifier)


def click(viewer, qtbot, layer, index_zyx, modifier=Qt.KeyboardModifier.NoModifier):
    """A left click on the canvas at voxel `index_zyx` of `layer` (the slice is shown first)."""
    world = np.asarray(layer.data_to_world(np.asarray(index_zyx, float)))
    viewer.dims.set_point(viewer.dims.ndim - 3, float(world[0]))
    camera = _camera(viewer)
    camera.center = (float(world[1]), float(world[2]))
    qtbot.wait(50)
    native = viewer.window._qt_viewer.canvas.native
    camera = _camera(viewer)
    x = (world[2] - camera.center[-1]) * camera.zoom + native.width() / 2
    y = (world[1] - camera.center[-2]) * camera.zoom + native.height() / 2
    qtbot.mouseClick(native, Qt.MouseButton.LeftButton, modifier, QPoint(int(round(x)), int(round(y))))


def statuses(panel) -> list[str]:
    return [panel.table.lesion_at(r)["status"] for r in range(panel.table.rowCount())]


def mask_layer(viewer):
    return viewer.layers[PROMPT]


def test_keys_accept_two_reject_one_and_undo(reviewing, qtbot):
    viewer, panel = reviewing
    n = panel.table.rowCount()
    assert panel.reviewer.counter_label.text() == f"0 of {n} reviewed"
    key(viewer, qtbot, Qt.Key.Key_N)  # the first lesion: jumped to and zoomed in
    first = panel.table.lesion_at(0)
    assert panel.table.currentRow() == 0
    assert viewer.dims.current_step[-3] == int(round(first["centroid_voxel_zyx"][0]))
    assert panel.restore_view_button.isEnabled()
    key(viewer, qtbot, Qt.Key.Key_A)
    key(viewer, qtbot, Qt.Key.Key_A)  # accepting goes on to the next lesion
    third = panel.table.lesion_at(2)
    third_voxels = panel.reviewer.view().voxels(third)
    key(viewer, qtbot, Qt.Key.Key_R)
    assert statuses(panel)[:3] == ["accepted", "accepted", "rejected"]
    assert panel.reviewer.counter_label.text() == f"3 of {n} reviewed"
    data = mask_layer(viewer).data
    assert not data.reshape(-1)[third_voxels].any()  # rejecting removed it from the labels layer
    assert panel.table.currentRow() == 3
    key(viewer, qtbot, Qt.Key.Key_N, shift=True)  # back to the rejected one
    assert panel.table.currentRow() == 2
    panel.table.setFocus()
    qtbot.keyClick(panel.table, Qt.Key.Key_U)  # the same keys work with the table focused
    assert statuses(panel)[:3] == ["accepted", "accepted", "unreviewed"]
    assert panel.reviewer.counter_label.text() == f"2 of {n} reviewed"
    assert mask_layer(viewer).data.reshape(-1)[third_voxels].all()
    assert panel.table.currentRow() == 2  # undo shows the lesion it restored
    # filters: unreviewed only, sorted by score
    panel.reviewer.unreviewed_check.setChecked(True)
    assert panel.table.rowCount() == n - 2 and set(statuses(panel)) == {"unreviewed"}
    panel.reviewer.sort_combo.setCurrentIndex(panel.reviewer.sort_combo.findData("mean_probability"))
    scores = [panel.table.lesion_at(r)["mean_probability"] for r in range(panel.table.rowCount())]
    assert scores == sorted(scores, reverse=True)
    assert [e["action"] for e in panel.reviewer.session().review.actions] == ["accept", "accept", "reject", "undo"]


def test_painting_a_lesion_adds_it_to_the_table_and_erasing_updates_it(reviewing, qtbot):
    from scipy import ndimage

    viewer, panel = reviewing
    layer = mask_layer(viewer)
    n = panel.table.rowCount()
    z = int(round(panel.table.lesion_at(0)["centroid_voxel_zyx"][0]))
    free = ndimage.distance_transform_edt(layer.data[z] == 0) > 12  # far from every lesion on this slice
    ys, xs = np.nonzero(free)
    spot = (z, int(ys[len(ys) // 2]), int(xs[len(xs) // 2]))
    before = layer.data.copy()
    viewer.layers.selection.active = layer
    layer.mode = "paint"
    layer.brush_size = 5
    layer.selected_label = 1
    click(viewer, qtbot, layer, spot)
    painted = int((layer.data != before).sum())
    assert painted > 0
    qtbot.waitUntil(lambda: panel.table.rowCount() == n + 1, timeout=5000)
    drawn = [panel.table.lesion_at(r) for r in range(n + 1) if "drawn" in panel.table.lesion_at(r)["origin"]]
    assert len(drawn) == 1 and drawn[0]["status"] == "accepted" and drawn[0]["voxels"] == painted
    assert np.allclose(drawn[0]["centroid_voxel_zyx"][0], z)
    assert panel.model_calls == 1  # the table changed without running the model
    # napari's own undo (Ctrl-Z on the canvas) takes the stroke back, and the table follows
    key_ctrl_z = (viewer.window._qt_viewer.canvas.native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(*key_ctrl_z)
    qtbot.waitUntil(lambda: panel.table.rowCount() == n, timeout=5000)
    assert np.array_equal(layer.data, before)
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, Qt.Key.Key_Z,
                   Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)  # and redo
    qtbot.waitUntil(lambda: panel.table.rowCount() == n + 1, timeout=5000)
    # erase it again with napari's eraser: the lesion leaves the table
    layer.mode = "erase"
    layer.brush_size = 9
    click(viewer, qtbot, layer, spot)
    qtbot.waitUntil(lambda: panel.table.rowCount() == n, timeout=5000)
    assert not any("drawn" in panel.table.lesion_at(r)["origin"] for r in range(n))
    assert [e["action"] for e in panel.reviewer.session().review.actions] == ["edit"] * 4


def test_rethresholding_keeps_the_review(reviewing, qtbot):
    viewer, panel = reviewing
    result = panel.active_result()
    panel.reviewer.select(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    key(viewer, qtbot, Qt.Key.Key_R)  # the second one
    view = panel.reviewer.view()
    accepted = next(r for r in view.rows if r["status"] == "accepted")
    rejected = next(r for r in view.rows if r["status"] == "rejected")
    accepted_voxels, rejected_voxels = view.voxels(accepted), view.voxels(rejected)
    calls = panel.model_calls
    for t in (int(result.threshold * 100) - 20, 97):
        panel.threshold_slider.setValue(t)
        qtbot.waitUntil(lambda t=t: result.threshold == pytest.approx(t / 100), timeout=3000)
        data = mask_layer(viewer).data.reshape(-1)
        assert data[accepted_voxels].all() and not data[rejected_voxels].any()
        view = panel.reviewer.view()
        kept = [r for r in view.rows if r["status"] != "unreviewed"]
        assert sorted(r["status"] for r in kept) == ["accepted", "rejected"]
        assert next(r for r in kept if r["status"] == "accepted")["voxels"] == accepted_voxels.size
        assert panel.reviewer.counter_label.text().startswith("2 of ")
    assert panel.model_calls == calls


def test_the_review_survives_closing_and_reopening_the_panel(reviewing, qtbot, tiny_segmenter):
    viewer, panel = reviewing
    panel.reviewer.select(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    key(viewer, qtbot, Qt.Key.Key_R)
    n = panel.table.rowCount()
    layer = mask_layer(viewer)
    assert layer.metadata[REVIEW_KEY].review.has_decisions
    viewer.window.remove_dock_widget(panel)
    panel.close()
    panel.deleteLater()
    qtbot.wait(100)
    key(viewer, qtbot, Qt.Key.Key_A)  # the closed panel's keys do nothing (and raise nothing)
    reopened = BoltzFormerWidget(viewer, segmenter=tiny_segmenter)
    viewer.window.add_dock_widget(reopened, name="BoltzFormer", area="right")
    assert reopened.table.rowCount() == n
    assert sorted(statuses(reopened))[:2] == ["accepted", "rejected"]
    assert reopened.reviewer.counter_label.text() == f"2 of {n} reviewed"
    key(viewer, qtbot, Qt.Key.Key_N)
    row = reopened.table.currentRow()
    while reopened.table.lesion_at(row)["status"] != "unreviewed":
        key(viewer, qtbot, Qt.Key.Key_N)
        row = reopened.table.currentRow()
    key(viewer, qtbot, Qt.Key.Key_A)  # the new panel's keys act on the same review
    assert reopened.reviewer.counter_label.text() == f"3 of {n} reviewed"


def test_exports_hold_the_review_and_read_back(reviewing, qtbot, tmp_path, tiny_weights):
    viewer, panel = reviewing
    panel.reviewer.select(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    key(viewer, qtbot, Qt.Key.Key_R)
    view = panel.reviewer.view()
    rows = view.rows
    accepted = [r for r in rows if r["status"] == "accepted"]
    unreviewed = [r for r in rows if r["status"] == "unreviewed"]
    panel.reviewer.export_unreviewed_check.setChecked(False)
    written = panel.exports.mask(tmp_path / "review.nii.gz")
    back = read_volume(written)
    assert np.array_equal(back.array, view.mask(accepted))  # accepted lesions only
    side = json.loads((tmp_path / "review.review.json").read_text())
    assert side["prompt"] == PROMPT and side["weights_sha256"] == sha256(tiny_weights)
    # what replays it: the device that ran (the panel asked for "auto") and the batch size (the noise's)
    assert (side["device"], side["batch_size"], side["seed"]) == ("cpu", 8, 0)
    assert side["threshold"] == pytest.approx(panel.active_result().threshold)
    assert side["mask_holds"] == "accepted lesions only" and side["counts"]["rejected"] == 1
    assert [a["action"] for a in side["actions"]] == ["accept", "reject"]
    panel.reviewer.export_unreviewed_check.setChecked(True)
    back = read_volume(panel.exports.mask(tmp_path / "all.nii.gz"))
    assert np.array_equal(back.array, view.mask(accepted + unreviewed))
    assert back.same_geometry(read_volume(written))
    panel.exports.table(tmp_path / "table.csv")
    with open(tmp_path / "table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and "status" in table[0] and "origin" in table[0]
    assert sorted(r["status"] for r in table).count("rejected") == 1
    assert not any(k.startswith("_") for k in table[0])
    assert json.loads((tmp_path / "table.review.json").read_text())["files"]["table"] == str(tmp_path / "table.csv")
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left
    # an unwritable place: a notification, no traceback, nothing half-written
    missing = tmp_path / "no_such_folder" / "m.nii.gz"
    assert panel.exports.mask(missing) is None and not missing.parent.exists()

def test_an_exported_mask_reopens_as_labels_over_its_scan_and_says_what_its_record_holds(
        reviewing, qtbot, tmp_path, notifications):
    """An exported mask opened in napari came back as a grey image layer over the scan (hiding
    it), and said nothing of the review recorded beside it."""
    from napari.layers import Labels

    viewer, panel = reviewing
    panel.reviewer.select(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    written = panel.exports.mask(tmp_path / "reviewed.nii.gz")
    image = next(la for la in viewer.layers if la.name == "synthetic chest CT")
    [opened] = viewer.open(written, plugin="napari-boltzformer")
    assert isinstance(opened, Labels)
    np.testing.assert_allclose(opened.data_to_world((3, 10, 20)), image.data_to_world((3, 10, 20)), atol=1e-4)
    assert any("opened as a labels layer" in m and "reviewed.review.json records its review of 'lung nodule'" in m
               and "1 accepted" in m for _, m in notifications)


def test_an_export_never_overwrites_another_files_review_record(reviewing, qtbot, tmp_path, notifications):
    """A mask 'x.nii.gz' and a table 'x.csv' would share 'x.review.json': the second export is
    refused with a message, the first one's record stays; the message names the real sidecar."""
    viewer, panel = reviewing
    panel.reviewer.select(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    mask = panel.exports.mask(tmp_path / "x.nii.gz")
    record = (tmp_path / "x.review.json").read_text()
    assert "mask_lesion_ids" in json.loads(record)
    assert panel.exports.table(tmp_path / "x.csv") is None
    assert not (tmp_path / "x.csv").exists() and (tmp_path / "x.review.json").read_text() == record
    errors = [m for s, m in notifications if s == "error"]
    assert "x.review.json" in errors[-1] and str(mask) in errors[-1]
    assert panel.exports.mask(tmp_path / "x.nii.gz") == mask  # the same file again: its own record, replaced
    assert panel.exports.table(tmp_path / "x_lesions.csv") is not None
    # a name with dots: the notification names the sidecar actually written
    dotted = panel.exports.mask(tmp_path / "scan.v2.nii.gz")
    infos = [m for s, m in notifications if s == "info"]
    assert dotted is not None and "scan.v2.review.json" in infos[-1] and (tmp_path / "scan.v2.review.json").is_file()



def test_alt_click_looks_here_and_adds_a_candidate_to_review(reviewing, qtbot, tiny_segmenter, notifications):
    viewer, panel = reviewing
    result, request = panel._results[panel._active_run]
    layer = mask_layer(viewer)
    z = int(round(panel.table.lesion_at(0)["centroid_voxel_zyx"][0]))
    # a spot on no lesion where the same core call (same seed, threshold, slices) finds a candidate:
    # probe the slices re-run around slice z, then click inside a component it finds away from the
    # shown lesions (the slices re-run and the seed depend on z only, so the click finds it again)
    from scipy import ndimage

    options = dict(threshold=result.threshold, min_lesion_mm3=result.min_lesion_mm3, seed=request.options["seed"],
                   window=result.window, modality=result.modality)
    probe = look_here(tiny_segmenter, request.volume, PROMPT, (z, 0, 0), reach_mm=1e9, **options)
    start, stop = probe.slices
    found, count = ndimage.label(probe.probabilities > result.threshold, structure=np.ones((3, 3, 3)))
    near_shown = ndimage.binary_dilation(layer.data[start:stop] != 0, iterations=2)
    spot = None
    for label in range(1, count + 1):
        component = found == label
        if component[z - start].any() and not (component & near_shown).any():
            ys, xs = np.nonzero(component[z - start])
            spot = (z, int(ys[0]), int(xs[0]))
            break
    assert spot is not None, "no component of the re-run away from the shown lesions"
    expected = look_here(tiny_segmenter, request.volume, PROMPT, spot, **options)
    assert expected.candidate is not None and expected.distance_mm == 0.0
    n = panel.table.rowCount()
    viewer.layers.selection.active = layer
    layer.mode = "pan_zoom"
    click(viewer, qtbot, layer, spot, Qt.KeyboardModifier.AltModifier)
    qtbot.waitUntil(lambda: not panel.reviewer.looking, timeout=60_000)
    found = [panel.table.lesion_at(r) for r in range(panel.table.rowCount()) if "look here" in panel.table.lesion_at(r)["origin"]]
    assert len(found) == 1 and found[0]["status"] == "unreviewed"
    assert found[0]["voxels"] >= int(expected.candidate.sum())  # at least the core's candidate (it may join a kept one)
    assert panel.table.lesion_at(panel.table.currentRow()) is not None
    assert "look here" in panel.table.lesion_at(panel.table.currentRow())["origin"]  # selected, ready for A or R
    assert any("look here: a candidate" in m for _, m in notifications)
    key(viewer, qtbot, Qt.Key.Key_A)
    assert any(r["status"] == "accepted" and "look here" in r["origin"] for r in panel.reviewer.view().rows)
    assert panel.table.rowCount() >= n


def test_look_here_on_nothing_adds_nothing_and_bad_clicks_are_notifications(reviewing, qtbot, notifications):
    viewer, panel = reviewing
    layer = mask_layer(viewer)
    panel.threshold_slider.setValue(99)  # nothing passes 0.99 with the tiny model: the re-run finds nothing
    qtbot.waitUntil(lambda: panel.active_result().threshold == pytest.approx(0.99), timeout=3000)
    n = panel.table.rowCount()
    panel.reviewer.look_button.setChecked(True)  # the dedicated mode: the next plain click
    click(viewer, qtbot, layer, (10, 40, 40))
    assert not panel.reviewer.look_button.isChecked()
    qtbot.waitUntil(lambda: not panel.reviewer.looking, timeout=60_000)
    assert panel.table.rowCount() == n
    assert any("nothing added" in m for _, m in notifications)
    panel.reviewer.look_here_at((1e4, 1e4, 1e4))  # far outside the volume
    assert any(s == "error" and "outside the volume" in m for s, m in notifications)
    panel.mode_combo.setCurrentIndex(panel.mode_combo.findData("organ"))
    key(viewer, qtbot, Qt.Key.Key_A)  # organ mode: nothing to review, said so
    assert any("organ mode shows one structure, nothing to accept or reject" in m for _, m in notifications)


def test_look_here_ending_after_its_mask_layer_was_deleted_adds_nothing_and_raises_nothing(reviewing, notifications):
    """The mask deleted while look here ran: its end raised AttributeError ('NoneType' object has
    no attribute 'voxels') into Qt. Whatever it found (any object here) is not used."""
    viewer, panel = reviewing
    session = panel.reviewer.session()
    viewer.layers.remove(mask_layer(viewer))
    panel.reviewer._looked(session, (object(), None))
    assert any("mask layer was closed meanwhile; nothing added" in m for _, m in notifications)


def test_deleting_a_reviewed_mask_layer_says_the_review_went_with_it(reviewing, qtbot, notifications):
    """The decisions live in the mask layer's metadata; deleting the layer dropped them without a
    word, and the review keys then said "nothing to review yet" beside a full table."""
    viewer, panel = reviewing
    panel.reviewer.select(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    viewer.layers.remove(mask_layer(viewer))
    assert any(s == "warning" and "was kept in the deleted mask layer" in m for s, m in notifications)
    key(viewer, qtbot, Qt.Key.Key_N)
    assert any("this result's mask layer was deleted, and its review with it" in m for _, m in notifications)


def test_stepping_through_slices_does_not_take_in_an_edit(reviewing, qtbot, monkeypatch):
    """Each slice step (napari's set_data, as an undo emits) started the edit take-in: a
    whole-volume compare 250 ms later, 85-130 ms on a 224 x 512² CT, with nothing painted."""
    viewer, panel = reviewing
    flushed = []
    flush = panel.reviewer.flush_edits
    monkeypatch.setattr(panel.reviewer, "flush_edits", lambda *a, **k: flushed.append(1) or flush(*a, **k))
    qtbot.wait(400)  # what the run's own layer updates started
    flushed.clear()
    for z in range(3, 9):
        viewer.dims.set_current_step(viewer.dims.ndim - 3, z)
        qtbot.wait(50)
    qtbot.wait(400)
    assert flushed == []


def test_a_decision_redraws_the_mask_without_taking_it_in_as_an_edit(reviewing, qtbot, monkeypatch):
    """Accept redrew the mask layer, and its own data event started the edit take-in: two
    whole-volume compares (about 0.3 s on a 224 x 512² CT) for nothing."""
    viewer, panel = reviewing
    compared = []
    layer_mask = panel.reviewer._layer_mask
    monkeypatch.setattr(panel.reviewer, "_layer_mask", lambda layer: compared.append(1) or layer_mask(layer))
    qtbot.wait(400)
    panel.reviewer.select(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    qtbot.wait(400)
    assert panel.reviewer.view().counts()["accepted"] == 1
    assert compared == []


def test_rejected_lesions_leave_the_total_and_a_key_right_after_a_stroke_is_kept(reviewing, qtbot):
    """The total above the table counts what the mask holds; R pressed within the edit delay of
    an erase stroke is kept (the stroke used to be taken in after it, and undid it)."""
    viewer, panel = reviewing
    n = panel.table.rowCount()
    layer = mask_layer(viewer)
    panel.reviewer.select(0)
    target = panel.table.lesion_at(0)
    voxel = np.unravel_index(int(panel.reviewer.view().voxels(target)[0]), layer.data.shape)
    data = layer.data.copy()
    data[voxel] = 0  # erase one voxel of the selected lesion, as a stroke would
    layer.data = data
    assert panel.reviewer._edit_timer.isActive()
    key(viewer, qtbot, Qt.Key.Key_R)  # at once
    qtbot.wait(600)  # past the edit delay
    rows = [panel.table.lesion_at(r) for r in range(panel.table.rowCount())]
    near = [r for r in rows if np.allclose(r["centroid_voxel_zyx"], target["centroid_voxel_zyx"], atol=2.0)]
    assert near and near[0]["status"] == "rejected"
    for _ in range(3 * n):  # reject every lesion left (rows move as statuses change)
        left = [r for r in range(panel.table.rowCount()) if panel.table.lesion_at(r)["status"] != "rejected"]
        if not left:
            break
        panel.reviewer.select(left[0])
        key(viewer, qtbot, Qt.Key.Key_R)
    assert not mask_layer(viewer).data.any()
    assert panel.result_label.toolTip().startswith("0 lesions · 0.00 mL")
    assert f"{panel.table.rowCount()} rejected in review" in panel.result_detail.text() and n > 0


def test_alt_click_in_paint_mode_looks_without_painting(reviewing, qtbot):
    viewer, panel = reviewing
    layer = mask_layer(viewer)
    z = int(round(panel.table.lesion_at(0)["centroid_voxel_zyx"][0]))
    before = layer.data.copy()
    viewer.layers.selection.active = layer
    layer.mode = "paint"
    layer.brush_size = 5
    layer.selected_label = 1
    click(viewer, qtbot, layer, (z, 3, 3), Qt.KeyboardModifier.AltModifier)  # a corner: nothing to find
    qtbot.waitUntil(lambda: not panel.reviewer.looking, timeout=60_000)
    qtbot.wait(400)
    assert np.array_equal(layer.data, before) and str(layer.mode) == "paint"
    assert not any("drawn" in r["origin"] for r in panel.reviewer.view().rows)


def test_a_review_is_not_carried_onto_another_scan(reviewing, qtbot, notifications):
    """Another scan under the same layer name, the same prompt run again: its review starts afresh
    (the decisions were about other voxels), and a notification says so."""
    viewer, panel = reviewing
    panel.reviewer.select(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    image = next(layer for layer in viewer.layers if layer.name not in (PROMPT,) and layer.data.ndim == 3
                 and "image" in str(type(layer)).lower())
    name, other = image.name, np.asarray(image.data)[::-1].copy()  # the same shape, other voxels
    image.data = other
    run_and_wait(panel, qtbot)
    assert panel.reviewer.counter_label.text().startswith("0 of ")
    assert all(r["status"] == "unreviewed" for r in panel.reviewer.view().rows)
    assert any("is not the one reviewed before" in m for _, m in notifications)
    assert viewer.layers[name] is image


def test_look_here_on_a_decided_lesion_is_refused_and_a_reopened_panel_shows_the_selected_result(
        reviewing, qtbot, tiny_segmenter, notifications):
    """Looking at an accepted lesion would grow it unreviewed (and a rejected one split into
    one-voxel rows): refused with a word. A panel reopened shows the result whose layer is
    selected, not the last one in the list."""
    viewer, panel = reviewing
    panel.reviewer.select(0)
    lesion = panel.table.lesion_at(0)
    key(viewer, qtbot, Qt.Key.Key_A)
    layer = mask_layer(viewer)
    voxel = np.unravel_index(int(panel.reviewer.view().voxels(lesion)[0]), layer.data.shape)
    n = panel.table.rowCount()
    viewer.layers.selection.active = layer
    layer.mode = "pan_zoom"
    click(viewer, qtbot, layer, voxel, Qt.KeyboardModifier.AltModifier)
    assert not panel.reviewer.looking and panel.table.rowCount() == n
    assert any("already accepted" in m for _, m in notifications)
    # a second result, then the first one's layer selected, the panel closed and reopened
    first_run = panel._active_run
    panel.prompt_edit.setText("brain lesion")
    run_and_wait(panel, qtbot)
    assert panel._active_run != first_run
    viewer.layers.selection.active = layer
    viewer.window.remove_dock_widget(panel)
    panel.close()
    panel.deleteLater()
    qtbot.wait(100)
    reopened = BoltzFormerWidget(viewer, segmenter=tiny_segmenter)
    viewer.window.add_dock_widget(reopened, name="BoltzFormer", area="right")
    assert reopened._active_run == first_run and reopened.table.rowCount() == n


def test_look_here_is_armed_visibly_and_refused_in_3d(reviewing, qtbot, notifications):
    """Armed, nothing said so (the cursor stayed an arrow); in 3D a click was run at the camera's
    plane, not at a voxel."""
    viewer, panel = reviewing
    panel.reviewer.look_button.setChecked(True)
    assert viewer.cursor.style == "crosshair" and panel.status_label.text().startswith("look here: click the spot")
    panel.reviewer.look_button.setChecked(False)
    assert viewer.cursor.style != "crosshair" and panel.status_label.text() == ""
    viewer.dims.ndisplay = 3
    panel.reviewer.look_here_at(viewer.dims.point)
    assert not panel.reviewer.looking and any("switch the viewer to 2D" in m for _, m in notifications)


def test_a_stroke_in_one_result_is_kept_when_another_becomes_active_at_once(panel, viewer, qtbot):
    """One edit timer served every result: a stroke in B, then A made active within 250 ms,
    stopped it, and B's mask was redrawn from its review without the stroke when B came back."""
    panel.min_lesion_spin.setValue(0.0)
    run_and_wait(panel, qtbot)
    run_a = panel._active_run
    panel.prompt_edit.setText(OTHER_PROMPT)
    run_and_wait(panel, qtbot)
    mask_a, mask_b = panel._mask_layer_of(run_a), panel._mask_layer_of(panel._active_run)
    viewer.layers.selection.active = mask_b
    qtbot.wait(50)
    mask_b.brush_size = 5
    mask_b.paint((viewer.dims.current_step[0], 24, 20), 1)  # napari's paint event, as a stroke gives
    painted = np.asarray(mask_b.data).copy()
    viewer.layers.selection.active = mask_a  # at once to the other result ...
    viewer.layers.selection.active = mask_b  # ... and back
    qtbot.wait(600)
    assert np.array_equal(np.asarray(mask_b.data), painted)
    assert [a for a in mask_b.metadata[REVIEW_KEY].review.actions if a["action"] == "edit"]


def test_run_is_refused_while_look_here_runs(reviewing, notifications):
    """A Run pressed during look here ran the model beside it and replaced the result it was
    adding to; look here then said the mask layer 'was closed meanwhile'."""
    viewer, panel = reviewing
    calls = panel.model_calls
    panel.reviewer.looking = True  # as look_here_at sets it until its worker ends
    panel.run()
    assert not panel.running and panel.model_calls == calls
    assert any("look here is still running; press Run when it ends" in m for _, m in notifications)
    panel.reviewer.looking = False
