"""Make the README's pictures from the bundled model and the bundled chest CT sample.

    xvfb-run -a python docs/make_figures.py [--weights W]

docs/images/decoder_layers.png  one slice, a panel per decoder layer: where the queries sampled
docs/images/decoder_layers.gif  the same, stepping through the layers
docs/images/napari_panel.png    the viewer with the BoltzFormer panel after a run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "images"


def decoder_figures(seg, case):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    vol = case.volume()
    truth = case.masks[case.target]
    z = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(1)))
    res = seg.segment_volume(vol, case.prompt, slices=(z, z + 1), return_attention=True)
    att = res.attention
    img = np.clip((vol.array[z].astype(np.float32) + 1350) / 1500, 0, 1)
    h, w = img.shape
    layers = att.num_layers
    fig, axes = plt.subplots(1, layers + 1, figsize=(3.1 * (layers + 1), 3.4))
    frames = []
    for i in range(layers):
        heat = att.counts[i, 0].astype(np.float32)
        ax = axes[i]
        ax.imshow(img, cmap="gray")
        ax.imshow(heat, cmap="inferno", alpha=0.55, extent=(-0.5, w - 0.5, h - 0.5, -0.5), vmin=0, vmax=att.num_queries)
        ax.contour(truth[z], colors="lime", linewidths=0.7)
        ax.set_title(f"layer {i}: stride {att.strides[i]}, τ={att.temperatures[i]:.2f}\nK={att.tokens_per_query[i]} tokens/query",
                     fontsize=8)
        ax.axis("off")
        f2, a2 = plt.subplots(figsize=(4, 4))
        a2.imshow(img, cmap="gray")
        a2.imshow(heat, cmap="inferno", alpha=0.55, extent=(-0.5, w - 0.5, h - 0.5, -0.5), vmin=0, vmax=att.num_queries)
        a2.contour(truth[z], colors="lime", linewidths=0.7)
        a2.set_title(f"decoder layer {i}  (τ = {att.temperatures[i]:.2f})", fontsize=10)
        a2.axis("off")
        f2.tight_layout()
        f2.canvas.draw()
        frames.append(Image.fromarray(np.asarray(f2.canvas.buffer_rgba())[..., :3]))
        plt.close(f2)
    axes[-1].imshow(img, cmap="gray")
    axes[-1].contour(res.mask[z], colors="red", linewidths=1.8)  # wider: visible under the truth line
    axes[-1].contour(truth[z], colors="lime", linewidths=0.7)
    axes[-1].set_title("output (red) vs truth (green)", fontsize=8)
    axes[-1].axis("off")
    fig.suptitle(f"'{case.prompt}': where the {att.num_queries} queries sampled, layer by layer "
                 "(colour = number of queries attending to a token)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(OUT / "decoder_layers.png", dpi=80)
    frames[0].save(OUT / "decoder_layers.gif", save_all=True, append_images=frames[1:], duration=700, loop=0)


def napari_screenshot(weights):
    import napari
    from napari.utils.io import imsave
    from qtpy.QtWidgets import QApplication

    from boltzformer.synth.sample import sample_chest_ct
    from napari_boltzformer._layers import image_layer_data
    from napari_boltzformer._widget import BoltzFormerWidget

    case = sample_chest_ct()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    data, kwargs, _ = image_layer_data(case.volume(), name="chest CT (synthetic)")
    viewer.add_image(data, **kwargs)
    panel = BoltzFormerWidget(viewer, weights=weights)
    viewer.window.add_dock_widget(panel, name="BoltzFormer", area="right")
    panel.prompt_edit.setText(case.prompt)
    panel.run()
    app = QApplication.instance()
    import time

    t = time.time()
    while panel.running and time.time() - t < 300:
        app.processEvents()
        time.sleep(0.05)
    truth = case.masks[case.target]
    z = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(1)))
    viewer.dims.set_current_step(viewer.dims.ndim - 3, z)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    imsave(str(OUT / "napari_panel.png"), viewer.screenshot(canvas_only=False, flash=False))
    viewer.close()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default=None)
    p.add_argument("--skip-napari", action="store_true")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    from boltzformer.segmenter import Segmenter
    from boltzformer.synth.sample import sample_chest_ct

    seg = Segmenter.from_pretrained(args.weights, device="cpu")
    decoder_figures(seg, sample_chest_ct())
    if not args.skip_napari:
        napari_screenshot(args.weights)


if __name__ == "__main__":
    main()
