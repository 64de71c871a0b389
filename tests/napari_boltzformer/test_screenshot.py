"""A picture of the viewer with the panel after a run, saved for people to look at."""

from __future__ import annotations

import numpy as np

from .conftest import ARTIFACTS, add_volume, canvas_to_world_yx, ct_volume, panel_on, pixels_changed_by_hiding
from .conftest import run_and_wait, shown_viewer


def test_screenshot_of_the_viewer_with_the_panel_after_a_run(make_napari_viewer, qtbot, tiny_segmenter):
    from napari.utils.io import imsave

    viewer = shown_viewer(make_napari_viewer, (1400, 900))
    add_volume(viewer, ct_volume(shape=(12, 96, 80)), name="synthetic CT")
    panel = panel_on(viewer, tiny_segmenter)
    panel.probability_check.setChecked(False)
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

    viewer = shown_viewer(make_napari_viewer, (1000, 800))
    add_volume(viewer, ct_volume(shape=(12, 96, 80)), name="synthetic CT")
    panel = panel_on(viewer, tiny_segmenter, dock=False)
    panel.probability_check.setChecked(False)
    panel.attention_check.setChecked(False)
    run_and_wait(panel, qtbot)
    mask_layer = next(layer for layer in viewer.layers if layer.metadata.get("boltzformer_role") == "mask")
    z = int(np.argmax(mask_layer.data.reshape(mask_layer.data.shape[0], -1).sum(1)))
    assert mask_layer.data[z].any()
    viewer.dims.set_current_step(0, z)
    viewer.reset_view()
    changed = pixels_changed_by_hiding(viewer, qtbot, mask_layer, min_change=30, wait_ms=200)
    assert changed.sum() > 20
    rows, cols = np.nonzero(changed)
    world_y, world_x = canvas_to_world_yx(viewer, rows, cols, changed.shape)
    world = np.stack([np.full(rows.shape, viewer.dims.point[0]), world_y, world_x], axis=1)
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
