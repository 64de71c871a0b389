"""Make the README's pictures from the real napari viewer with the BoltzFormer panel, the bundled
model, the bundled chest CT sample and (when given) a real contrast chest CT.

    xvfb-run -a python docs/make_figures.py [--weights W] [--real CT.nii.gz] [--only sample|real|review]

docs/images/napari_panel.png        the sample after "lung nodule": lesion mode, heatmap, truth outline
docs/images/napari_lesion_zoom.png  the same after a click on a lesion row: jumped and zoomed
docs/images/decoder_layers.gif      the canvas at one slice, stepping through the decoder layers
docs/images/decoder_layers.png      the same six frames side by side
docs/images/napari_real_ct_organ.png    a real chest CT, "heart": organ mode (one structure, mL)
docs/images/napari_real_ct_lesions.png  the same CT, "lung nodule": candidates, 4 mm size filter
docs/images/napari_review.png       the sample's candidates under review (keys A / R / N, as a reader types them)
docs/images/napari_nodule_detector.png  the sample's result with the opt-in "3D nodule detector" switched on

The real CT is read where it lies and never copied; only the screenshots are written. Every
picture is what the panel shows a user: nothing is drawn on top but a frame title in the GIF.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "images"
DEFAULT_REAL_CT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real" / "ts_chest01_heart_image.nii.gz"
WINDOW_SIZE = (1500, 950)


class Session:
    """A shown viewer with the panel docked; runs wait for the worker while Qt keeps painting."""

    def __init__(self, weights):
        import napari

        from napari_boltzformer._widget import BoltzFormerWidget

        self.viewer = napari.Viewer(show=True)
        self.viewer.window.resize(*WINDOW_SIZE)
        self.panel = BoltzFormerWidget(self.viewer, weights=weights)
        self.viewer.window.add_dock_widget(self.panel, name="BoltzFormer", area="right")

    def pump(self, seconds: float = 1.0):
        from qtpy.QtWidgets import QApplication

        end = time.time() + seconds
        while time.time() < end:
            QApplication.instance().processEvents()
            time.sleep(0.02)

    def run(self, prompt: str, timeout_s: float = 600.0) -> float:
        panel = self.panel
        panel.prompt_edit.setText(prompt)
        t0 = time.time()
        panel.run()
        while panel.running and time.time() - t0 < timeout_s:
            self.pump(0.05)
        if panel.running:
            raise TimeoutError(f"'{prompt}' still running after {timeout_s} s")
        self.pump(0.5)
        return time.time() - t0

    def go_to_slice(self, z: int):
        self.viewer.dims.set_current_step(self.viewer.dims.ndim - 3, int(z))
        self.pump(1.0)

    def decoder_axis(self) -> int:
        return self.panel.heatmap.decoder_axis()

    def save(self, name: str, canvas_only: bool = False) -> Path:
        from napari.utils.io import imsave

        self.pump(0.8)
        self.panel.window().repaint()  # Xvfb keeps stale pixels of a slider's number otherwise
        self.pump(0.3)
        path = OUT / name
        imsave(str(path), self.viewer.screenshot(canvas_only=canvas_only, flash=False))
        print(f"wrote {path}")
        return path

    def close(self):
        self.viewer.close()


def sample_figures(weights):
    """The sample chest CT: the panel after a run, a jump to a lesion, the decoder layers."""
    s = Session(weights)
    image, truth = s.viewer.open_sample("napari-boltzformer", "chest_ct")
    seconds = s.run("lung nodule")
    panel = s.panel
    print(f"sample: {seconds:.0f} s, {panel.result_label.text()} | {panel.result_detail.text()}")
    z = int(np.argmax(truth.data.reshape(truth.data.shape[0], -1).sum(1)))
    s.go_to_slice(z)
    print("heatmap:", panel.heatmap.info_label.text().replace("\n", " | "))
    s.save("napari_panel.png")

    # the lesion row that overlaps the truth on this slice: click it, as a user would
    result = panel.active_result()
    hit = next((lesion for lesion in result.lesions
                if (result.labels[z][truth.data[z] > 0] == lesion["lesion_id"]).any()), result.lesions[0])
    for row in range(panel.table.rowCount()):
        if result.lesions[int(panel.table.item(row, 0).data(0x0101))] is hit:
            panel.table.selectRow(row)
            panel.table.cellClicked.emit(row, 0)
            break
    s.save("napari_lesion_zoom.png")
    decoder_frames(s)
    # the same result with the opt-in 3D nodule detector: the switch re-thresholds, no new run
    panel.restore_view_button.click()  # back from the zoom on one lesion
    panel.detector_check.setChecked(True)
    panel.wait(300)  # its candidate pass runs on a worker thread
    s.pump(1.5)
    s.go_to_slice(z)
    print(f"nodule detector: {panel.result_label.text()} | {panel.result_detail.text()}")
    s.save("napari_nodule_detector.png")
    s.close()


def decoder_frames(s: Session):
    """The zoomed canvas at the lesion's slice for every decoder layer (GIF and a strip)."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 15)  # PIL's own font has no τ
    att = s.panel.active_result().attention
    axis = s.decoder_axis()
    frames = []
    for layer in range(att.num_layers):
        s.viewer.dims.set_current_step(axis, layer)
        s.pump(0.8)
        shot = s.viewer.screenshot(canvas_only=True, flash=False)[..., :3]
        canvas = Image.fromarray(np.ascontiguousarray(shot))
        # the whole canvas, scaled to 420 px wide, and the title in a band below it: a square crop
        # cut the colour bar and its caption, and the band drawn over the image hid their foot
        canvas = canvas.resize((420, round(canvas.height * 420 / canvas.width)))
        frame = Image.new("RGB", (420, canvas.height + 26), (0, 0, 0))
        frame.paste(canvas, (0, 0))
        draw = ImageDraw.Draw(frame)
        title = (f"decoder layer {layer + 1}/{att.num_layers}  τ {att.temperatures[layer]:.2f}  "
                 f"stride {att.strides[layer]}")
        draw.text((8, canvas.height + 4), title, fill=(255, 255, 255), font=font)
        frames.append(frame)
    frames[0].save(OUT / "decoder_layers.gif", save_all=True, append_images=frames[1:], duration=900, loop=0)
    strip = Image.new("RGB", (420 * len(frames), frames[0].height))
    for i, frame in enumerate(frames):
        strip.paste(frame, (420 * i, 0))
    strip.save(OUT / "decoder_layers.png")
    print(f"wrote {OUT / 'decoder_layers.gif'} and {OUT / 'decoder_layers.png'}")


def real_ct_figures(weights, path: Path):
    """A real contrast chest CT: "heart" in organ mode, "lung nodule" with the 4 mm filter."""
    s = Session(weights)
    s.viewer.open(str(path), plugin="napari-boltzformer")
    panel = s.panel
    seconds = s.run("heart")
    summary = panel.organ_summary()
    print(f"real CT heart: {seconds:.0f} s, {panel.result_label.text()} | {panel.result_detail.text()}")
    if summary is not None:
        s.go_to_slice(round(summary["centroid_voxel_zyx"][0]))
    print("heatmap:", panel.heatmap.info_label.text().replace("\n", " | "))
    s.save("napari_real_ct_organ.png")
    for layer in s.viewer.layers:  # the next prompt alone on the image (hidden, not removed:
        if layer.metadata.get("boltzformer_prompt") == "heart":  # removing the heatmap's axis
            layer.visible = False  # leaves a stale slice number in napari's slider under Xvfb)
    seconds = s.run("lung nodule")
    panel.min_diameter_combo.setCurrentIndex(panel.min_diameter_combo.findData(4.0))
    print(f"real CT lung nodule: {seconds:.0f} s, {panel.result_label.text()} | {panel.result_detail.text()}")
    for layer in s.viewer.layers:  # the candidate itself, not the heatmap (flat where the model sees nothing)
        if layer.metadata.get("boltzformer_prompt") == "lung nodule" and "attention" in layer.name:
            layer.visible = False
    if panel.table.rowCount():  # click the first row, as a user would: jump and zoom to it
        panel.table.selectRow(0)
        panel.table.cellClicked.emit(0, 0)
    s.save("napari_real_ct_lesions.png")
    s.close()


def review_figure(weights):
    """The sample's candidates being reviewed with the keyboard: the most confident first, the
    true nodule accepted, two false candidates rejected (gone from the mask, greyed in the table),
    the view on the next one."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QScrollArea

    s = Session(weights)
    s.viewer.window.resize(WINDOW_SIZE[0], WINDOW_SIZE[1] + 150)  # room for the whole table
    _, truth = s.viewer.open_sample("napari-boltzformer", "chest_ct")
    s.panel.attention_check.setChecked(False)  # the mask and the truth outline, not the heatmap, this time
    seconds = s.run("lung nodule")
    panel, reviewer = s.panel, s.panel.reviewer
    reviewer.sort_combo.setCurrentIndex(reviewer.sort_combo.findData("mean_probability"))
    canvas = s.viewer.window._qt_viewer.canvas.native
    result = panel.active_result()
    on_truth = {i for i, lesion in enumerate(result.lesions)
                if (result.labels[truth.data > 0] == lesion["lesion_id"]).any()}

    def press(key):  # keys typed on the canvas, as a reader does
        QTest.keyClick(canvas, key)
        s.pump(0.4)

    press(Qt.Key.Key_N)
    rejected = 0
    for _ in range(panel.table.rowCount()):
        lesion = panel.table.lesion_at(panel.table.currentRow())
        true = panel.table.item(panel.table.currentRow(), 0).data(0x0101) in on_truth
        if true:
            press(Qt.Key.Key_A)
        elif rejected < 2:
            press(Qt.Key.Key_R)
            rejected += 1
        else:
            break
        if lesion is None or rejected == 2 and not any(
                panel.table.item(r, 0).data(0x0101) in on_truth and panel.table.lesion_at(r)["status"] == "unreviewed"
                for r in range(panel.table.rowCount())):
            break
    next_open = next((r for r in range(panel.table.rowCount()) if panel.table.lesion_at(r)["status"] == "unreviewed"), None)
    if next_open is not None:  # where the reader is now: the next candidate to decide on
        reviewer.select(next_open)
    scroll = panel.findChild(QScrollArea)  # the panel scrolled to its lesion table
    scroll.verticalScrollBar().setValue(scroll.verticalScrollBar().maximum())
    print(f"review: {seconds:.0f} s, {reviewer.counter_label.text()} | {panel.result_detail.text()}")
    s.save("napari_review.png")
    s.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None)
    p.add_argument("--real", type=Path, default=DEFAULT_REAL_CT,
                   help="a real chest CT (read only); its figures are skipped when it is missing")
    p.add_argument("--only", choices=("sample", "real", "review"), default=None, help="make only these figures")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "sample"):
        sample_figures(args.weights)
    if args.only in (None, "real"):
        if args.real and args.real.exists():
            real_ct_figures(args.weights, args.real)
        else:
            print(f"no real CT at {args.real}: its figures are not made")
    if args.only in (None, "review"):
        review_figure(args.weights)


if __name__ == "__main__":
    main()
