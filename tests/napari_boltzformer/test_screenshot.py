"""A picture of the viewer with the panel after a run, saved for people to look at."""

from __future__ import annotations

import numpy as np

from napari_boltzformer._widget import BoltzFormerWidget

from .conftest import ARTIFACTS, PROMPT, add_volume, ct_volume, run_and_wait


def test_screenshot_of_the_viewer_with_the_panel_after_a_run(make_napari_viewer, qtbot, tiny_segmenter):
    from napari.utils.io import imsave

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 900)
    add_volume(viewer, ct_volume(shape=(12, 96, 80)), name="synthetic CT")
    panel = BoltzFormerWidget(viewer, segmenter=tiny_segmenter)
    viewer.window.add_dock_widget(panel, name="BoltzFormer", area="right")
    panel.prompt_edit.setText(PROMPT)
    panel.probability_check.setChecked(False)
    panel.min_lesion_spin.setValue(0.0)
    run_and_wait(panel, qtbot)
    viewer.dims.set_current_step(1, 4)  # the slice of the first nodule (axis 0 is "decoder layer")
    # opens on the decoder layer whose sampling is least spread
    assert viewer.dims.current_step[0] == panel.active_result().attention.sharpest_layer()
    qtbot.wait(200)

    shot = viewer.screenshot(canvas_only=False, flash=False)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "napari_panel_after_run.png"
    imsave(str(path), shot)
    assert path.stat().st_size > 10_000
    rgb = shot[..., :3].astype(np.int16)
    assert rgb.std() > 20  # not a blank window
    assert len(np.unique(rgb.reshape(-1, 3)[::7], axis=0)) > 200  # canvas, heatmap and text, not flat fills
    canvas = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    assert canvas.std() > 10  # the canvas itself shows the image and overlays


def test_mask_pixels_on_screen_lie_where_the_mask_is(make_napari_viewer, qtbot, tiny_segmenter):
    """Hide and show the mask layer: the canvas pixels that change must map, through the *image*
    layer's placement, onto the voxels the mask marks (a misplaced mask layer fails this)."""
    from scipy import ndimage

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1000, 800)
    add_volume(viewer, ct_volume(shape=(12, 96, 80)), name="synthetic CT")
    panel = BoltzFormerWidget(viewer, segmenter=tiny_segmenter)
    panel.prompt_edit.setText(PROMPT)
    panel.probability_check.setChecked(False)
    panel.attention_check.setChecked(False)
    panel.min_lesion_spin.setValue(0.0)
    run_and_wait(panel, qtbot)
    mask_layer = next(layer for layer in viewer.layers if layer.metadata.get("boltzformer_role") == "mask")
    z = int(np.argmax(mask_layer.data.reshape(mask_layer.data.shape[0], -1).sum(1)))
    assert mask_layer.data[z].any()
    viewer.dims.set_current_step(0, z)
    viewer.reset_view()
    qtbot.wait(200)
    with_mask = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(np.int16)
    mask_layer.visible = False
    qtbot.wait(200)
    without = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(np.int16)
    changed = np.abs(with_mask - without).sum(-1) > 30
    assert changed.sum() > 20
    # canvas pixel -> world (napari's 2D camera: centre and zoom in screen pixels per world unit)
    h, w = changed.shape
    rows, cols = np.nonzero(changed)
    cy, cx = viewer.camera.center[-2:]
    zoom = viewer.camera.zoom
    world = np.stack([np.full(rows.shape, viewer.dims.point[0]), cy + (rows + 0.5 - h / 2) / zoom,
                      cx + (cols + 0.5 - w / 2) / zoom], axis=1)
    image_layer = viewer.layers["synthetic CT"]
    index = np.array([image_layer.world_to_data(p) for p in world[:: max(1, len(world) // 500)]])
    index = np.round(index).astype(int)
    inside = ((index >= 0) & (index < mask_layer.data.shape)).all(1)
    near_mask = ndimage.binary_dilation(mask_layer.data[z] > 0, iterations=1)
    on_mask = near_mask[index[inside, 1], index[inside, 2]]
    assert inside.all() and on_mask.mean() > 0.95
    # and the check can fail: the same pixels judged against a mask shifted by 4 voxels miss
    shifted = np.roll(near_mask, 4, axis=1)
    assert shifted[index[inside, 1], index[inside, 2]].mean() < 0.8
