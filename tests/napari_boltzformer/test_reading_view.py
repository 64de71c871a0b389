"""What a reader sees (issue 17), on a real viewer under Xvfb with a tiny untrained model: the
heatmap's colours, colour bar and controls, organ vs lesion mode, the size filter, jump and
zoom, orientation letters and slice position, and the small things around them."""

from __future__ import annotations

import numpy as np
import pytest

from boltzformer import postprocess
from napari_boltzformer._layers import MAX_LAYER_NAME, ROLE_KEY, result_layer_name
from napari_boltzformer._panel_ui import MIN_DIAMETERS_MM
from napari_boltzformer._view import MIN_FOV_MM, ZOOM_FOV_FACTOR, _camera
from napari_boltzformer._widget import BoltzFormerWidget

from .conftest import PROMPT, add_volume, canvas_to_world_yx, ct_volume, panel_on, pixels_changed_by_hiding
from .conftest import oblique_direction, run_and_wait, save_test_weights, shown_viewer, stop, threshold_until

ORGAN_PROMPT = "aorta"
MR_PROMPT = "multiple sclerosis lesion"


@pytest.fixture(scope="module")
def reading_weights(tmp_path_factory):
    """The untrained test network knowing a lesion, an organ and an MR prompt."""
    return save_test_weights(tmp_path_factory.mktemp("reading_weights"), (PROMPT, ORGAN_PROMPT, MR_PROMPT), seed=1)


@pytest.fixture(scope="module")
def reading_segmenter(reading_weights):
    from boltzformer.segmenter import Segmenter

    return Segmenter.from_pretrained(reading_weights, device="cpu")


@pytest.fixture
def reader(make_napari_viewer, reading_segmenter, qtbot):
    """A shown viewer (for screenshots) with a CT volume and the panel docked."""
    viewer = shown_viewer(make_napari_viewer)
    add_volume(viewer, ct_volume(shape=(12, 96, 80)))
    panel = panel_on(viewer, reading_segmenter)
    yield viewer, panel
    stop(panel)


def _roles(viewer) -> dict:
    return {layer.metadata.get(ROLE_KEY): layer for layer in viewer.layers if layer.metadata.get(ROLE_KEY)}


def _headers(panel) -> list[str]:
    return [panel.table.horizontalHeaderItem(c).text() for c in range(panel.table.columnCount())]


# -- the heatmap ---------------------------------------------------------------------------------
def test_heatmap_has_a_colour_bar_a_legend_and_opens_on_the_sharpest_layer(reader, qtbot, reading_segmenter):
    viewer, panel = reader
    run_and_wait(panel, qtbot)
    heat = _roles(viewer)["attention"]
    att = panel.active_result().attention
    assert heat.colorbar.visible
    q = reading_segmenter.config.num_queries
    assert tuple(heat.contrast_limits) == (0.0, float(q))
    legend = panel.canvas_labels.text("legend")
    assert f"queries (of {q})" in legend and "hottest cells only\n(≤ ~50 % of the mass)" in legend
    axis = viewer.dims.ndim - heat.ndim
    assert viewer.dims.current_step[axis] == att.sharpest_layer()
    # the slider's label names τ of the layer shown, and follows it
    for layer in range(att.num_layers):
        viewer.dims.set_current_step(axis, layer)
        assert viewer.dims.axis_labels[axis] == f"layer · τ {att.temperatures[layer]:.2f}"
        assert f"τ {att.temperatures[layer]:.2f}" in panel.heatmap.info_label.text()
    heat.visible = False  # a hidden heatmap has no legend
    assert panel.canvas_labels.text("legend") == "" and not heat.colorbar.visible


def test_only_the_active_results_heatmap_is_shown(reader, qtbot):
    """Two prompts: the colour bar and legend describe the active result's heatmap, so another
    run's drawn above it would be read as this one's."""
    viewer, panel = reader
    run_and_wait(panel, qtbot)
    first_run = panel._active_run
    panel.prompt_edit.setText(ORGAN_PROMPT)
    run_and_wait(panel, qtbot)
    heats = {layer.metadata.get("boltzformer_run"): layer for layer in viewer.layers
             if layer.metadata.get(ROLE_KEY) == "attention"}
    assert len(heats) == 2
    assert [layer.visible for run, layer in heats.items() if run != first_run] == [True]
    assert not heats[first_run].visible
    panel._set_active_run(first_run)
    assert heats[first_run].visible and not any(l.visible for r, l in heats.items() if r != first_run)


def test_the_intensity_column_says_hu_only_for_a_ct_in_hounsfield_units():
    from types import SimpleNamespace

    from boltzformer.io import Volume
    from napari_boltzformer._lesion_table import intensity_header

    hu = SimpleNamespace(frame=None, volume=Volume(np.array([[[-1000, 40]]], np.int16), (1, 1, 1)))
    grey = SimpleNamespace(frame=None, volume=Volume(np.array([[[0, 125, 255]]], np.uint8), (1, 1, 1)))
    assert intensity_header(True, None, hu)[0] == "HU"
    assert intensity_header(True, None, grey) == ("grey", "mean grey level: this CT is not in Hounsfield units (8bit values)")
    assert intensity_header(False, "FLAIR", grey)[0] == "a.u."


def test_heatmap_info_calls_a_flat_slice_flat(reader, qtbot):
    """A uniform sampling has no 'hottest cells' (they would be 100 % of them holding 100 %)."""
    viewer, panel = reader
    run_and_wait(panel, qtbot)
    stats = panel.heatmap._stats(panel.active_result().attention)
    stats["spread"] = np.full_like(stats["spread"], 1.0)  # the maps' own spread is read-only (cached)
    panel.heatmap.update_info()
    assert "the sampling is flat (spread over 100 % of the frame): no cell stands out" in panel.heatmap.info_label.text()
    stats["spread"] = np.full_like(stats["spread"], 0.4)
    stats["area"][:], stats["mass"][:] = 0.00024, 0.013
    panel.heatmap.update_info()
    assert "the hottest 0.024 % of cells hold 1.3 % of the mass" in panel.heatmap.info_label.text()


def test_zero_is_transparent_and_the_heat_shows_on_dark_and_white(reader, qtbot):
    """Canvas pixels change, heatmap shown vs hidden, exactly over the cells it colours: none
    over a zero cell, and the colours show over black air and over white tissue alike."""
    viewer, panel = reader
    panel.heatmap.top_check.setChecked(False)  # every sampled cell: zeros and non-zeros side by side
    run_and_wait(panel, qtbot)
    heat, image = _roles(viewer)["attention"], viewer.layers["ct"]
    colormap = heat.colormap
    assert colormap.map(np.array([0.0]))[0, 3] == 0  # zero: fully transparent
    assert (colormap.map(np.linspace(0.05, 1.0, 20))[:, 3] >= 0.5).all()  # every other value clearly there
    image.contrast_limits = (-1000, -900)  # air black, the body white
    axis = viewer.dims.ndim - heat.ndim
    viewer.dims.set_current_step(axis, heat.data.shape[0] - 1)
    viewer.dims.set_current_step(axis + 1, 4)
    viewer.reset_view()
    changed = pixels_changed_by_hiding(viewer, qtbot, heat, min_change=24, wait_ms=300)
    h, w = changed.shape
    rows, cols = np.mgrid[4:h - 4:3, 4:w - 4:3]
    world_y, world_x = canvas_to_world_yx(viewer, rows, cols, changed.shape)
    point = list(viewer.dims.point)
    cell_value, brightness = [], []
    for y, x in zip(world_y.ravel(), world_x.ravel()):
        point[-2:] = [y, x]
        fc, fv = np.asarray(heat.world_to_data(point)), np.asarray(image.world_to_data(point[-3:]))
        c, v = np.round(fc).astype(int), np.round(fv).astype(int)
        inside = (c >= 0).all() and (c < heat.data.shape).all() and (v >= 0).all() and (v < image.data.shape).all()
        # only pixels well inside a cell and a voxel: at an edge, rounding may pick the neighbour
        clear = (np.abs(fc - c)[-2:] < 0.35).all() and (np.abs(fv - v)[-2:] < 0.35).all()
        cell_value.append(float(heat.data[tuple(c)]) if inside and clear else np.nan)
        brightness.append(float(image.data[tuple(v)]) if inside and clear else np.nan)
    cell_value, brightness = np.array(cell_value), np.array(brightness)
    pixel_changed = changed[rows.ravel(), cols.ravel()]
    known = ~np.isnan(cell_value)
    zero, hot = known & (cell_value == 0), known & (cell_value > 0)
    assert zero.sum() > 50 and hot.sum() > 50
    assert pixel_changed[zero].mean() < 0.03  # transparent where nothing was sampled
    assert pixel_changed[hot].mean() > 0.95
    white, black = brightness > -900, brightness < -950
    assert pixel_changed[hot & white].mean() > 0.95 and pixel_changed[hot & black].mean() > 0.95
    assert (hot & white).sum() > 20 and (hot & black).sum() > 20


def test_query_selection_and_the_top_mass_switch_redraw_without_inference(reader, qtbot, reading_segmenter,
                                                                        monkeypatch):
    viewer, panel = reader
    run_and_wait(panel, qtbot)
    heat = _roles(viewer)["attention"]
    att = panel.active_result().attention
    calls = []
    monkeypatch.setattr(reading_segmenter, "predict_batch", lambda *a, **k: calls.append(a))
    np.testing.assert_array_equal(heat.data, att.view("counts", top_fraction=0.5))  # the default
    assert panel.heatmap.query_combo.count() == 1 + att.num_queries
    panel.heatmap.query_combo.setCurrentIndex(3)  # query 3 (0-based 2)
    np.testing.assert_array_equal(heat.data, att.view("counts", query=2, top_fraction=0.5))
    assert tuple(heat.contrast_limits) == (0.0, 1.0) and "query 3" in panel.canvas_labels.text("legend")
    panel.heatmap.top_check.setChecked(False)
    np.testing.assert_array_equal(heat.data, att.query_samples(2))
    assert heat.data.sum() > 0
    panel.heatmap.values_combo.setCurrentIndex(1)  # probabilities: one map for all queries
    assert not panel.heatmap.query_combo.isEnabled()
    np.testing.assert_array_equal(heat.data, att.probabilities)
    assert "probability" in panel.canvas_labels.text("legend")
    # the colour bar spans the decoder layer shown (one scale for all drew the first layers faintly)
    axis = panel.heatmap.decoder_axis()
    for index in range(att.num_layers):
        viewer.dims.set_current_step(axis, index)
        assert heat.contrast_limits[1] == pytest.approx(float(np.nanmax(att.probabilities[index])), rel=1e-3)
    assert "of this layer" in panel.canvas_labels.text("legend")
    assert calls == []


# -- organ vs lesions ----------------------------------------------------------------------------
def test_an_organ_prompt_opens_organ_mode_with_one_structure(reader, qtbot):
    viewer, panel = reader
    panel.prompt_edit.setText(ORGAN_PROMPT)
    run_and_wait(panel, qtbot)
    result = panel.active_result()
    assert threshold_until(panel, lambda r: len(r.lesions) >= 2), "no threshold gave two components"
    assert panel.current_mode() == "organ" and panel.result_box.title() == "Organ"
    assert panel.table.rowCount() == 1 and _headers(panel)[:3] == ["structure", "mL", "calibre mm"]
    summary = panel.organ_summary()
    assert summary["lesion_ids"] == [1] and summary["components_found"] == len(result.lesions)
    assert panel.table.item(0, 1).text() == f"{summary['volume_ml']:.1f}"
    assert "mL" in panel.result_label.text() and "Ø" not in "".join(_headers(panel)[:3])
    mask = viewer.layers[ORGAN_PROMPT]
    np.testing.assert_array_equal(mask.data, (result.labels == 1).astype(np.uint8))  # the largest only
    assert "stray component" in panel.result_detail.text()
    # the user switches to the candidate list, and back
    panel.mode_combo.setCurrentText("lesions")
    assert panel.result_box.title() == "Lesions" and panel.table.rowCount() == len(result.lesions)
    np.testing.assert_array_equal(mask.data, result.mask)
    panel.mode_combo.setCurrentText("auto")
    assert panel.table.rowCount() == 1
    # a lesion prompt opens lesion mode
    panel.prompt_edit.setText(PROMPT)
    run_and_wait(panel, qtbot)
    assert panel.current_mode() == "lesion" and panel.result_box.title() == "Lesions"


def test_a_pair_of_kidneys_is_shown_and_exported_side_by_side(qtbot, tmp_path):
    """Each kidney's own length and diameter in the organ row, the details line and the table
    export; never one length over both."""
    from types import SimpleNamespace

    from boltzformer.postprocess import write_lesion_table

    from napari_boltzformer._export import organ_rows
    from napari_boltzformer._lesion_table import LesionTable, organ_totals

    summary = {"structure": "kidney", "lesion_ids": [1, 2], "components_found": 2, "volume_mm3": 343000.0,
               "volume_ml": 343.0, "measure": "craniocaudal length", "measure_mm": None,
               "longest_axial_diameter_mm": 144.1, "slice_start": 4, "slice_end": 57, "centroid_voxel_zyx": (30, 30, 50),
               "centroid_world_mm": (0.0, 0.0, 75.0), "mean_intensity": 30.0,
               "sides": [{"side": "right", "volume_mm3": 171000.0, "volume_ml": 171.0, "measure_mm": 115.0,
                          "longest_axial_diameter_mm": 63.0},
                         {"side": "left", "volume_mm3": 172000.0, "volume_ml": 172.0, "measure_mm": 112.5,
                          "longest_axial_diameter_mm": 61.2}]}
    result = SimpleNamespace(prompt="kidneys", threshold=0.5)
    assert organ_totals(result, summary, "kidney")[1].endswith("craniocaudal length right 115.0 mm, left 112.5 mm")
    one_slice = {**summary, "sides": [{**side, "measure_mm": None} for side in summary["sides"]]}
    assert "length" not in organ_totals(result, one_slice, "kidney")[1]  # a single slice: no length to give
    assert "length" not in organ_totals(result, {**summary, "sides": [], "measure_mm": None}, "kidney")[1]
    table = LesionTable()
    qtbot.addWidget(table)
    table.show_organ(summary, ("HU", "mean HU"), True)
    assert table.item(0, 2).text() == "R 115.0 · L 112.5" and table.item(0, 3).text() == "R 63.0 · L 61.2"
    rows = organ_rows(summary)
    assert [r["structure"] for r in rows] == ["kidney", "kidney (right)", "kidney (left)"]
    assert rows[0]["measure_mm"] is None and rows[0]["longest_axial_diameter_mm"] is None
    written = write_lesion_table(rows, tmp_path / "kidneys.csv")
    text = written.read_text()
    assert "kidney (right)" in text and "115.0" in text and "144.1" not in text


def test_lesion_mode_has_confidence_and_both_axes_and_hu_only_for_ct(reader, qtbot):
    viewer, panel = reader
    run_and_wait(panel, qtbot)
    assert threshold_until(panel, lambda r: len(r.lesions) >= 1)
    result = panel.active_result()
    headers = _headers(panel)
    for header in ("Ø mm", "short", "mean Ø", "p̄", "p max", "HU"):
        assert header in headers
    lesion = result.lesions[int(panel.table.item(0, 0).data(0x0100 + 1))]
    row = {h: panel.table.item(0, c).text() for c, h in enumerate(headers)}
    assert row["short"] == f"{lesion['short_axis_diameter_mm']:.1f}"
    assert row["p max"] == f"{lesion['max_probability']:.2f}"
    assert float(row["p max"]) > result.threshold - 0.005  # every lesion passes the threshold somewhere
    # MR: no Hounsfield units; the intensity is arbitrary, with the sequence the sample names
    layers = viewer.open_sample("napari-boltzformer", "brain_mri")
    panel.image_combo.setCurrentText(layers[0].name)
    panel.prompt_edit.setText(MR_PROMPT)
    panel.scope_combo.setCurrentText("current slice")
    run_and_wait(panel, qtbot)
    headers = _headers(panel)
    assert "HU" not in headers and "a.u." in headers
    tip = panel.table.horizontalHeaderItem(headers.index("a.u.")).toolTip()
    assert "FLAIR" in tip and "arbitrary" in tip


def test_the_size_filter_hides_small_lesions_and_says_how_many(reader, qtbot, tmp_path):
    viewer, panel = reader
    run_and_wait(panel, qtbot)
    result = panel.active_result()

    def split(r):  # a step of the filter with lesions on both sides of it
        sizes = [row["mean_axial_diameter_mm"] for row in r.lesions]
        return next((mm for mm in MIN_DIAMETERS_MM[1:] if min(sizes, default=0) < mm <= max(sizes, default=0)), None)

    assert threshold_until(panel, lambda r: split(r) is not None), "no threshold gave lesions on both sides of a step"
    step = split(result)
    small = [r for r in result.lesions if r["mean_axial_diameter_mm"] < step]
    large = [r for r in result.lesions if r["mean_axial_diameter_mm"] >= step]
    panel.min_diameter_combo.setCurrentIndex(panel.min_diameter_combo.findData(step))
    assert panel.table.rowCount() == len(large)
    assert f"{len(small)} hidden (mean Ø < {step:g} mm)" in panel.result_detail.text()
    assert panel.result_label.text().startswith(f"{len(large)} lesion")
    mask = viewer.layers[PROMPT]
    np.testing.assert_array_equal(mask.data, postprocess.select_labels(result.labels, [r["lesion_id"] for r in large]))
    written = panel.exports.table(tmp_path / "shown.csv")  # exports follow what is shown
    assert len(written.read_text().strip().splitlines()) == 1 + len(large)
    panel.min_diameter_combo.setCurrentIndex(0)  # all sizes again
    assert panel.table.rowCount() == len(result.lesions) and "hidden" not in panel.result_detail.text()
    np.testing.assert_array_equal(mask.data, result.mask)


# -- navigation ------------------------------------------------------------------------------------
def test_a_row_click_jumps_and_zooms_restore_goes_back_and_the_next_run_starts_unzoomed(reader, qtbot):
    from qtpy.QtCore import Qt

    viewer, panel = reader
    run_and_wait(panel, qtbot)
    small = lambda r: [x for x in r.lesions if x["longest_axial_diameter_mm"] < 10]  # noqa: E731
    assert threshold_until(panel, lambda r: small(r) and len(small(r)) < len(r.lesions))
    result = panel.active_result()
    viewer.reset_view()
    camera = _camera(viewer)
    before = (tuple(camera.center), camera.zoom)
    assert not panel.restore_view_button.isEnabled()
    index_of = {panel.table.item(r, 0).data(Qt.ItemDataRole.UserRole + 1): r for r in range(panel.table.rowCount())}
    big = max(result.lesions, key=lambda x: x["longest_axial_diameter_mm"])
    panel.table.cellClicked.emit(index_of[result.lesions.index(big)], 1)  # a large one: no zooming out
    assert camera.zoom >= before[1] - 1e-9
    row = index_of[result.lesions.index(small(result)[0])]
    panel.table.cellClicked.emit(row, 1)
    lesion = result.lesions[int(panel.table.item(row, 0).data(Qt.ItemDataRole.UserRole + 1))]
    world = np.asarray(viewer.layers[PROMPT].data_to_world(lesion["centroid_voxel_zyx"]))
    assert viewer.dims.current_step[-3] == int(round(lesion["centroid_voxel_zyx"][0]))
    assert np.allclose(camera.center[-2:], world[-2:], atol=1e-6)
    fov = max(ZOOM_FOV_FACTOR * lesion["longest_axial_diameter_mm"], MIN_FOV_MM)
    h, w = viewer.canvas.size
    assert camera.zoom == pytest.approx(min(h, w) / fov)
    assert camera.zoom > before[1]  # zoomed in
    assert panel.restore_view_button.isEnabled()
    panel.restore_view_button.click()
    assert np.allclose(camera.center, before[0]) and camera.zoom == pytest.approx(before[1])
    assert not panel.restore_view_button.isEnabled()
    # jump again, then run again: the new result starts from the overview, not the zoomed pan
    panel.table.cellClicked.emit(row, 1)
    assert camera.zoom > before[1]
    run_and_wait(panel, qtbot)
    assert np.allclose(camera.center, before[0]) and camera.zoom == pytest.approx(before[1])


def test_orientation_letters_and_slice_position(reader, qtbot, tmp_path):
    viewer, panel = reader
    labels = panel.canvas_labels
    # an axial LPS volume: the patient's right on the viewer's left, anterior at the top
    assert [labels.text(e) for e in ("left", "right", "top", "bottom")] == ["R", "L", "A", "P"]
    image = viewer.layers["ct"]
    viewer.dims.set_current_step(0, 7)
    z_mm = float(image.data_to_world([7, 0, 0])[0])
    assert labels.text("slice") == f"axial 7 of 0–11\n{abs(z_mm):.1f} mm {'S' if z_mm >= 0 else 'I'}"
    camera = _camera(viewer)
    camera.orientation2d = ("up", "left")  # flipped both ways: the letters follow
    assert [labels.text(e) for e in ("left", "right", "top", "bottom")] == ["L", "R", "P", "A"]
    camera.orientation2d = ("down", "right")
    viewer.dims.order = (1, 0, 2)  # y through the slices: a coronal view, z and x on screen
    assert labels.text("slice").startswith("coronal")
    assert {labels.text("top"), labels.text("bottom")} == {"S", "I"}
    viewer.dims.order = (0, 1, 2)
    run_and_wait(panel, qtbot)  # the heatmap's extra axis does not confuse them
    assert [labels.text(e) for e in ("left", "right", "top", "bottom")] == ["R", "L", "A", "P"]
    assert labels.text("slice").startswith("axial ")
    # the image closed, its results still open: they carry the same geometry, the letters stay
    viewer.layers.remove(image)
    assert [labels.text(e) for e in ("left", "right", "top", "bottom")] == ["R", "L", "A", "P"]
    assert labels.text("slice").startswith("axial ")
    # a file that says nothing of its orientation: the letters are marked as assumed
    nrrd = tmp_path / "nospace.nrrd"
    scan = np.random.default_rng(0).integers(-1000, 400, 20 * 24 * 6).astype("<i2")  # (all zeros would read as a mask)
    nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 20 24 6\nencoding: raw\nendian: little\n\n"
                     + scan.tobytes())
    viewer.layers.clear()
    viewer.open(nrrd, plugin="napari-boltzformer")
    assert [labels.text(e) for e in ("left", "right", "top", "bottom")] == ["R?", "L?", "A?", "P?"]
    # a layer placed by someone else (no LPS promise): no letters
    viewer.layers.clear()
    viewer.add_image(np.zeros((5, 20, 20)), name="plain")
    assert labels.text("left") == "" and labels.text("slice") == ""
    # segmented, its results carry the layer's geometry: the letters come back, marked as assumed
    # (they were drawn as certain)
    run_and_wait(panel, qtbot)
    assert [labels.text(e) for e in ("left", "right", "top", "bottom")] == ["R?", "L?", "A?", "P?"]


# -- the small things ------------------------------------------------------------------------------
def test_progress_footer_names_and_the_one_line_total(make_napari_viewer, qtbot, reading_weights):
    viewer = make_napari_viewer()
    add_volume(viewer, ct_volume())
    panel = BoltzFormerWidget(viewer, weights=reading_weights)
    assert panel.progress_bar.text() == "no run yet"  # not "0 / 1 slices"
    assert "loads on first run" in panel.model_label.text()
    panel.prompt_edit.setText(MR_PROMPT)  # long enough to be cut in the layer list
    panel.min_lesion_spin.setValue(0.0)
    panel.threshold_slider.setValue(5)
    run_and_wait(panel, qtbot)
    assert "loads on first run" not in panel.model_label.text() and "on cpu" in panel.model_label.text()
    assert panel.progress_bar.text() == "12 / 12 slices"
    names = [layer.name for layer in viewer.layers if layer.metadata.get(ROLE_KEY) in ("mask", "attention", "probability")]
    assert names and all(len(n) <= MAX_LAYER_NAME for n in names)
    assert "ms lesion attention" in names  # the prompt's shortest synonym, not "multiple scler…sion attention"
    assert result_layer_name("a very long prompt about something unknown", "attention").endswith("… attention")
    assert not panel.result_label.wordWrap()  # the total stays on one line (cut with … if need be)
    assert panel.result_label.toolTip().endswith("mL (model estimate)") and "\n" not in panel.result_label.text()


def test_on_a_720p_screen_a_run_brings_the_lesion_table_into_view(make_napari_viewer, qtbot, reading_segmenter):
    """At 1280 x 720 the table lay below the fold of the panel after a run: the reader had to
    find it by scrolling. The panel now scrolls to it when a lesion run ends."""
    viewer = shown_viewer(make_napari_viewer, size=(1280, 720))
    add_volume(viewer, ct_volume(shape=(12, 96, 80)))
    panel = panel_on(viewer, reading_segmenter)
    run_and_wait(panel, qtbot)  # the heatmap's controls appear and push the table down
    shown = lambda: panel.table.visibleRegion().boundingRect().height()  # noqa: E731
    # the header and rows (was: 19 px of it); all of it when the panel's window has the room
    qtbot.waitUntil(lambda: shown() >= min(panel.table.height(), 120), timeout=2000)
    stop(panel)


def test_ground_truth_is_an_outline_above_the_result(make_napari_viewer, qtbot, reading_segmenter):
    viewer = make_napari_viewer()
    image, truth = viewer.open_sample("napari-boltzformer", "chest_ct")
    panel = BoltzFormerWidget(viewer, segmenter=reading_segmenter)
    assert truth.contour == 1  # an outline as soon as the panel is there
    panel.prompt_edit.setText(PROMPT)
    panel.scope_combo.setCurrentText("current slice")
    run_and_wait(panel, qtbot)
    assert viewer.layers[-1] is truth and truth.contour == 1
    truth.contour = 0  # the user fills it again: the panel leaves it so
    panel.seed_spin.setValue(1)
    run_and_wait(panel, qtbot)
    assert truth.contour == 0 and viewer.layers[-1] is truth


def test_orientation_letters_of_a_single_axial_slice_under_the_heatmap_axis():
    from napari_boltzformer._view import orientation_letters, slice_text

    # world axes (decoder layer, y, x): the leading axis is no patient axis
    assert orientation_letters((1, 2), 3, spatial=2) == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert orientation_letters((0, 2), 3, spatial=2) is None
    assert slice_text(0, 3, 5.0, 0, 1, spatial=2) == ""
    assert slice_text(1, 4, -12.34, 3, 40) == "axial 3 of 0–39\n12.3 mm I"  # (decoder, z, y, x)


def test_clicks_and_jumps_on_an_oblique_scan_use_the_voxel_napari_draws(make_napari_viewer):
    """napari draws an oblique layer without its out-of-plane rotation. Look here mapped a click
    through the full 3D transform (a nodule clicked on slice 20 of a 12-degree tilted scan was
    looked for on slices 14-18), and a jump to a lesion showed another slice."""
    from napari_boltzformer._view import shown_voxel, world_of_shown_voxel, zoom_to

    viewer = make_napari_viewer()
    add_volume(viewer, ct_volume(shape=(12, 48, 40), direction=oblique_direction()))
    layer = viewer.layers["ct"]
    voxel = np.array([9.0, 30.0, 12.0])
    world = world_of_shown_voxel(viewer, layer, voxel)
    assert np.allclose(shown_voxel(viewer, layer, world), voxel)
    assert np.abs(np.asarray(layer.world_to_data(world)) - voxel).max() > 2  # the full transform: elsewhere
    zoom_to(viewer, layer, {"centroid_voxel_zyx": voxel.tolist(), "longest_axial_diameter_mm": 5.0}, 1.0)
    assert round(float(layer._data_slice.point[0])) == 9  # the slice napari draws is the lesion's
    centre = shown_voxel(viewer, layer, [*viewer.dims.point[:-2], *_camera(viewer).center[-2:]])
    assert round(centre[0]) == 9 and np.allclose(centre[1:], voxel[1:])  # napari snaps the slider to its steps


def test_a_single_sagittal_slice_shown_flat_is_lettered_by_its_own_plane():
    """Shown flat (napari cannot draw a plane turned out of the screen), the letters and the
    slice caption come from the file's direction, not the screen's axial ones."""
    from boltzformer.io import Volume

    from napari_boltzformer._view import flat_axes, orientation_letters, slice_text

    direction = np.stack([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], axis=1).astype(float)  # rows A->P, columns S->I
    file_geom = Volume(np.zeros((1, 4, 5), np.int16), (1.0, 1.0, 3.0), (-12.5, 0.0, 0.0), direction).geometry_dict()
    ends, across, position_mm = flat_axes(file_geom)
    assert ends == (("L", "R"), ("S", "I"), ("A", "P")) and across == 2 and position_mm == -12.5
    assert orientation_letters((1, 2), 3, ends=ends) == {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    assert slice_text(0, 3, position_mm, 0, 1, across=across) == "sagittal 0 of 0–0\n12.5 mm R"
