"""Fixtures of the napari plugin tests: a tiny untrained model, small volumes, a panel.

The napari tests run a real viewer under Xvfb (pytest-xvfb starts it; never the `offscreen`
platform, which has no OpenGL).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PROMPT = "lung nodule"
OTHER_PROMPT = "brain lesion"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def save_test_weights(folder: Path, prompts, seed: int = 0) -> Path:
    """An untrained 'boltzformer-test' network in `folder` that knows `prompts` (random prompt
    embeddings drawn with `seed`: no sentence encoder needed)."""
    from boltzformer.checkpoint import save_model
    from boltzformer.network.boltzformer import build_model
    from boltzformer.network.config import get_config
    from boltzformer.network.text import PromptEmbedding

    rng = np.random.default_rng(seed)
    bank = {}
    for prompt in prompts:
        pooled = rng.standard_normal(384).astype(np.float32)
        bank[prompt] = PromptEmbedding(rng.standard_normal((2, 384)).astype(np.float32), pooled / np.linalg.norm(pooled))
    path = folder / "w.safetensors"
    save_model(build_model(get_config("boltzformer-test"), seed=0), path, prompt_bank=bank)
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """The untrained test network knowing two prompts."""
    return save_test_weights(tmp_path_factory.mktemp("weights"), (PROMPT, OTHER_PROMPT))


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_weights):
    from boltzformer.segmenter import Segmenter

    return Segmenter.from_pretrained(tiny_weights, device="cpu")


def ct_volume(shape=(12, 48, 40), spacing=(0.8, 0.7, 2.5), origin=(-20.0, 35.0, 100.0), direction=None):
    """A small CT-like volume in HU: air, a body ellipse, two dense nodules; (z, y, x) array."""
    from boltzformer.io import Volume

    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000, np.int16)
    body = ((y - shape[1] / 2) / (0.45 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.45 * shape[2])) ** 2 < 1
    hu[body] = -800  # lung
    for cz, cy, cx, r in ((shape[0] // 3, shape[1] // 3, shape[2] // 3, 4), (2 * shape[0] // 3, 2 * shape[1] // 3, shape[2] // 2, 3)):
        hu[((y - cy) ** 2 + (x - cx) ** 2 < r * r) & (np.abs(z - cz) <= 1)] = 40
    return Volume(hu, spacing, origin, np.eye(3) if direction is None else direction, modality="CT")


def oblique_direction():
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [12, -25, 40], degrees=True).as_matrix()


@pytest.fixture
def notifications():
    """Messages of the napari notifications dispatched during the test: [(severity, message)]."""
    from napari.utils.notifications import notification_manager

    got = []

    def record(notification):
        got.append((str(notification.severity), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield got
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def add_volume(viewer, volume, name="ct"):
    from napari_boltzformer._layers import image_layer_data

    data, kwargs, _ = image_layer_data(volume, name=name)
    return viewer.add_image(data, **kwargs)


@pytest.fixture
def panel(viewer, tiny_segmenter, qtbot):
    """The panel on a viewer holding a small CT volume, with the tiny model injected."""
    from napari_boltzformer._widget import BoltzFormerWidget

    add_volume(viewer, ct_volume())
    widget = BoltzFormerWidget(viewer, segmenter=tiny_segmenter)
    viewer.window.add_dock_widget(widget, name="BoltzFormer", area="right")
    widget.prompt_edit.setText(PROMPT)
    yield widget
    stop(widget)


def run_and_wait(widget, qtbot, timeout_ms=60_000):
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout_ms)


def stop(widget):
    """Cancel a run still going when a test ends (a closed panel has nothing to stop)."""
    try:
        if widget.running:
            widget.cancel()
            widget.wait(30)
    except RuntimeError:  # the test closed it
        pass


def shown_viewer(make_napari_viewer, size=(1300, 850)):
    """A viewer on screen (Xvfb), for screenshots and clicks on the canvas."""
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(*size)
    return viewer


def panel_on(viewer, segmenter, dock: bool = True):
    """The panel on `viewer` with `segmenter` injected (docked on the right unless not `dock`),
    asked for PROMPT and keeping lesions of any size."""
    from napari_boltzformer._widget import BoltzFormerWidget

    panel = BoltzFormerWidget(viewer, segmenter=segmenter)
    if dock:
        viewer.window.add_dock_widget(panel, name="BoltzFormer", area="right")
    panel.prompt_edit.setText(PROMPT)
    panel.min_lesion_spin.setValue(0.0)
    return panel


def threshold_until(panel, enough, thresholds=range(5, 100, 5)) -> bool:
    """Re-threshold (no inference) until `enough(result)` holds; False if no threshold gives it."""
    result = panel.active_result()
    for t in thresholds:
        panel.threshold_slider.setValue(t)
        panel.apply_threshold()
        if enough(result):
            return True
    return False


def out_of_memory_gpu(segmenter, released: list):
    """A segmenter on a 'cuda' device (with `segmenter`'s config) whose every run runs out of
    memory; each release_memory() call appends True to `released`."""
    import torch

    class FakeGpu:
        device = torch.device("cuda")
        config = segmenter.config

        def iter_segment(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield  # a generator

        def release_memory(self):
            released.append(True)

        def default_batch_size(self):
            from boltzformer.options import DEFAULT_BATCH_ACCELERATOR

            return DEFAULT_BATCH_ACCELERATOR

    return FakeGpu()


def pixels_changed_by_hiding(viewer, qtbot, layer, min_change: int, wait_ms: int) -> np.ndarray:
    """bool (h, w): the canvas pixels whose RGB changes by more than `min_change` (summed) when
    `layer` is hidden."""
    qtbot.wait(wait_ms)
    shown = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(np.int16)
    layer.visible = False
    qtbot.wait(wait_ms)
    hidden = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(np.int16)
    return np.abs(shown - hidden).sum(-1) > min_change


def canvas_to_world_yx(viewer, rows, cols, canvas_shape) -> tuple[np.ndarray, np.ndarray]:
    """World (y, x) of the centres of canvas pixels (rows, cols): napari's 2D camera has a centre
    and a zoom in screen pixels per world unit."""
    from napari_boltzformer._view import _camera

    h, w = canvas_shape
    cy, cx = _camera(viewer).center[-2:]
    zoom = _camera(viewer).zoom
    return cy + (np.asarray(rows) + 0.5 - h / 2) / zoom, cx + (np.asarray(cols) + 0.5 - w / 2) / zoom


@pytest.fixture
def reviewing(make_napari_viewer, tiny_segmenter, qtbot):
    """The chest CT sample after "lung nodule" at a threshold that leaves at least five lesions."""
    viewer = shown_viewer(make_napari_viewer)
    viewer.open_sample("napari-boltzformer", "chest_ct")
    panel = panel_on(viewer, tiny_segmenter)
    run_and_wait(panel, qtbot)
    assert threshold_until(panel, lambda result: len(result.lesions) >= 5, range(50, 100, 2)), \
        "no threshold gave five lesions"
    yield viewer, panel
    stop(panel)
