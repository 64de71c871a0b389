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
    assert viewer.dims.current_step[0] == tiny_segmenter.config.num_layers - 1  # opens on the last layer
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
