"""The panel's exports: the mask as NIfTI with the source geometry, the lesion table as CSV or
JSON, the view as PNG.

A mask or table under review goes with its .review.json sidecar (what the review decided,
boltzformer.review); everything is written atomically (boltzformer.io). A failed write is a notification, never an
exception into Qt, and an existing file is replaced only after the save dialog (or, for a name
typed without its extension, this module) asked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QMessageBox, QPushButton

from ._layers import FILE_GEOMETRY, geometry_from_layer, is_shown_flat, layer_array, mask_volume, to_layer_shape


class Exports:
    """The export buttons of a BoltzFormerWidget (`row`) and the files they write."""

    def __init__(self, panel):
        self.panel = panel
        self._weights_sha: dict = {}  # weights path -> sha256, hashed once per file for the sidecars
        self.mask_button = QPushButton("Mask → NIfTI…")
        self.mask_button.setToolTip("The selected labels layer, or the result's mask as shown")
        self.mask_button.clicked.connect(lambda: self.mask())
        self.table_button = QPushButton("Table → CSV…")
        self.table_button.setToolTip("The lesion table as shown (its filters and sort), as CSV or JSON")
        self.table_button.clicked.connect(lambda: self.table())
        self.png_button = QPushButton("View → PNG…")
        self.png_button.setToolTip("The canvas as shown, with its overlays (orientation, slice, colour bar)")
        self.png_button.clicked.connect(lambda: self.png())
        self.row = QHBoxLayout()
        for b in (self.mask_button, self.table_button, self.png_button):
            self.row.addWidget(b)

    def update(self):
        self.table_button.setEnabled(self.panel.active_result() is not None)

    def mask(self, path=None):
        """Selected (or active result's) labels layer -> NIfTI with the source geometry."""
        from napari.layers import Labels
        from napari.utils.notifications import show_error, show_info

        from boltzformer.io import write_volume
        from boltzformer.review import sidecar_path

        panel = self.panel
        layer = panel.viewer.layers.selection.active
        if not isinstance(layer, Labels):
            layer = panel._mask_layer_of(panel._active_run)
        if layer is None:
            show_error("no mask to export: run a prompt first or select a labels layer")
            return None
        if path is None:  # named after the layer written: a labels layer of no run is not the active result
            stem = self._default_stem() if layer is panel._mask_layer_of(panel._active_run) else _slug(layer.name)
            path = self.ask_save_path("Save mask as NIfTI", self._default_folder() / f"{stem}.nii.gz",
                                      "NIfTI (*.nii.gz *.nii)", (".nii.gz", ".nii"))
            if path is None:
                return None
        if panel.reviewer.handles(layer):  # the review decides what the mask holds; a sidecar records it
            written = _written(lambda: self.reviewed("mask", Path(path)))
            if written is not None:
                show_info(f"saved the reviewed {layer.name} to {written} (and {sidecar_path(written).name})")
            return written
        written = _written(lambda: write_volume(
            mask_volume(np.asarray(layer_array(layer)), geometry_from_layer(layer)), path, overwrite=True))
        if written is not None:
            show_info(f"saved {layer.name} to {written}")
        return written

    def table(self, path=None):
        """The table as shown (lesion rows, or the organ's one row) -> CSV or JSON."""
        from napari.utils.notifications import show_error, show_info

        from boltzformer import postprocess
        from boltzformer.errors import BoltzformerError

        panel = self.panel
        if panel.active_result() is None:
            show_error("no lesion table yet: run a prompt first")
            return None
        if panel.current_mode() == "organ":
            summary = panel.organ_summary()
            rows = [] if summary is None else organ_rows(summary)
        else:
            rows = panel.shown_lesions()[0]
        if path is None:
            path = self.ask_save_path("Save lesion table", self._default_folder() / f"{self._default_stem()}_lesions.csv",
                                      "CSV (*.csv);;JSON (*.json)", (".csv", ".json"))
            if path is None:
                return None
        if panel.reviewer.handles(panel._mask_layer_of(panel._active_run)):  # with a status column and a sidecar
            written = _written(lambda: self.reviewed("table", Path(path)))
            if written is not None:
                show_info(f"saved {len(rows)} row(s) with their review status to {written}")
            return written
        written = _written(lambda: postprocess.write_lesion_table(rows, path, overwrite=True), (BoltzformerError,))
        if written is not None:
            show_info(f"saved {len(rows)} row(s) to {written}")
        return written

    def png(self, path=None):
        """The current view (canvas) as PNG."""
        from napari.utils.io import imsave
        from napari.utils.notifications import show_info

        from boltzformer.errors import BoltzformerError
        from boltzformer.io import atomic_output

        if path is None:
            path = self.ask_save_path("Save view as PNG", self._default_folder() / f"{self._default_stem()}.png",
                                      "PNG (*.png)", (".png",))
            if path is None:
                return None

        caption = self._caption()

        def write():
            image = self.panel.viewer.screenshot(canvas_only=True, flash=False)
            with atomic_output(path, overwrite=True) as tmp:
                if caption:  # what the picture shows, under it and in the PNG's Description
                    _captioned(image, caption).save(str(tmp), format="PNG", pnginfo=_png_text(caption))
                else:
                    imsave(str(tmp), image)
            return path

        written = _written(write, (BoltzformerError,))
        if written is not None:
            show_info(f"saved the view to {path}")
        return written

    def reviewed(self, what: str, path: Path) -> Path:
        """The mask ('mask', NIfTI) or the table ('table', CSV/JSON) of the result under review,
        with its .review.json sidecar, both atomically and together (boltzformer.io.OutputSet).
        Raises BoltzformerError."""
        from boltzformer import postprocess
        from boltzformer.errors import OutputError
        from boltzformer.io import OutputSet
        from boltzformer.review import sidecar_bytes, sidecar_owner, sidecar_path

        owner = sidecar_owner(path)
        if owner is not None:
            raise OutputError(sidecar_path(path), f"already records the review of {owner}; save this {what} "
                                                  "under another name so that both records stay")
        reviewer = self.panel.reviewer
        reviewer.flush_edits()
        session = reviewer.session()
        view = reviewer.view()
        shown = self.panel.shown_lesions()[0]
        include = reviewer.export_unreviewed_check.isChecked()
        in_mask = [r for r in shown if r["status"] == "accepted" or (include and r["status"] == "unreviewed")]
        side_path = sidecar_path(path)
        files = {what: path, "sidecar": side_path}
        sidecar = session.review.sidecar(session.result, shown, settings=self._settings(session), files=files,
                                         include_unreviewed=include)
        sidecar["mask_lesion_ids"] = [r["lesion_id"] for r in in_mask]
        with OutputSet(overwrite=True) as outputs:
            outputs.add(path, kind="volume" if what == "mask" else "table")
            outputs.add(side_path, kind="json")
            if what == "mask":
                geom = session.request.geometry
                outputs.write_volume(str(path), mask_volume(to_layer_shape(view.mask(in_mask), geom), geom))
            else:
                rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in shown]
                outputs.write_bytes(str(path), postprocess.lesion_table_bytes(rows, path))
            outputs.write_bytes(str(side_path), sidecar_bytes(sidecar))
        return path

    def _weights(self) -> tuple[str | None, str | None]:
        """(path, sha256) of the weights this panel runs: injected, or resolved like its runs
        (hashed once per file)."""
        from boltzformer import weights as weights_mod
        from boltzformer.errors import BoltzformerError

        try:
            path = (self.panel._segmenter.info.get("weights_path") if self.panel._segmenter is not None
                    else str(weights_mod.resolve(self.panel._weights).weights_path))
        except BoltzformerError:
            return None, None
        if path is not None and path not in self._weights_sha and Path(path).is_file():
            self._weights_sha[path] = weights_mod.sha256(path)
        return path, self._weights_sha.get(path)

    def _caption(self) -> list[str]:
        """Lines saying what a view of the active result shows: image, prompt, threshold, weights,
        and the heatmap's decoder layer when one is shown ([] when there is no result)."""
        entry = self.panel._results.get(self.panel._active_run)
        if entry is None:
            return []
        result, request = entry
        path, sha = self._weights()
        weights = f"{Path(path).stem} (sha256 {sha[:12]})" if path and sha else "weights unknown"
        lines = [f"{request.image_name} · '{result.prompt}' · threshold {result.threshold:.2f} · {weights}"]
        heat = self.panel.heatmap
        layer = heat._layer()
        if layer is not None and layer.visible and result.attention is not None:
            index = min(max(heat._current_decoder_layer() or 0, 0), result.attention.num_layers - 1)
            tau = result.attention.temperatures[index]  # written "tau": Pillow's default font has no τ
            lines.append(f"heatmap: decoder layer {index + 1} of {result.attention.num_layers}, tau {tau:.2f}, "
                         f"{heat.values_combo.currentText()}")
        return lines

    def _settings(self, session) -> dict:
        request = session.request
        options = request.options
        path, sha = self._weights()
        return {
            "image": request.image_name, "image_path": request.geometry.get("path"),
            "weights_path": path, "weights_sha256": sha,
            # what replays the run: the sampling noise depends on the seed, the device and the batch size
            "seed": options.get("seed"), "device": request.ran_on or request.device,
            "batch_size": request.ran_batch_size or options.get("batch_size"), "force_prompt": options.get("force_prompt"),
            "size_filter_min_mean_diameter_mm": self.panel.min_diameter_mm(),
            # a sagittal or coronal file is shown (and reviewed) in axial slices; its mask is
            # written on its own grid, where these voxel indices do not point
            "voxel_grid": ("the axial grid the panel showed, not the file's own (stored sagittally or coronally): "
                           "place lesions by centroid_world_mm (LPS)" if _shown_reoriented(session.request.geometry)
                           else "the file's own grid (z, y, x)"),
        }

    def ask_save_path(self, title: str, default: Path, name_filter: str, extensions: tuple[str, ...]) -> Path | None:
        """A save dialog (it confirms replacing a file); adds the extension when missing."""
        path, _ = QFileDialog.getSaveFileName(self.panel, title, str(default), name_filter)
        if not path:
            return None
        p = Path(path)
        if not p.name.lower().endswith(extensions):
            name = p.name
            # macOS's native dialog, given a "*.nii.gz" filter, returns "mask.gz" for "mask"
            for ext in extensions:
                tail = "." + ext.rsplit(".", 1)[-1]
                if "." in ext.lstrip(".") and name.lower().endswith(tail):
                    name = name[: -len(tail)]
                    break
            p = p.with_name(name + extensions[0])
            if p.exists() and not self.confirm_overwrite(p):
                return None
        return p

    def confirm_overwrite(self, path: Path) -> bool:
        answer = QMessageBox.question(
            self.panel, "Replace file?", f"{path} exists. Replace it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _default_folder(self) -> Path:
        """Beside the active result's image file; for DICOM, beside its series folder (series
        folders are often read-only archives, and a derived file there joins the series);
        the home folder when there is no file or the folder cannot be written."""
        from boltzformer.io import INPUT_EXTENSIONS, extension_of

        entry = self.panel._results.get(self.panel._active_run)
        source = entry[1].geometry.get("path") if entry else None
        if source:
            p = Path(source)
            dicom = p.is_dir() or extension_of(p.name) not in INPUT_EXTENSIONS
            folder = p.parent if p.is_dir() else (p.parent.parent if dicom else p.parent)
            if folder.is_dir() and os.access(folder, os.W_OK):
                return folder
        return Path.home()

    def _default_stem(self) -> str:
        entry = self.panel._results.get(self.panel._active_run)
        if entry is None:
            return "boltzformer"
        return f"{_slug(entry[1].image_name)}_{_slug(entry[0].prompt)}"


def _written(write, errors: tuple | None = None) -> Path | None:
    """The path `write()` wrote; on one of `errors` (default: BoltzformerError, ValueError) a
    notification and None."""
    from napari.utils.notifications import show_error

    from boltzformer.errors import BoltzformerError

    try:
        return Path(write())
    except errors or (BoltzformerError, ValueError) as exc:
        show_error(str(exc))
        return None


def organ_rows(summary: dict) -> list[dict]:
    """Table rows of an organ summary: the structure, then for a pair measured side by side
    one row per side (its volume, measure and diameter; the pair's row keeps its volume, its
    measure and diameter are blank)."""
    row = {k: v for k, v in summary.items() if k not in ("lesion_ids", "sides")}
    if summary.get("sides"):
        row["longest_axial_diameter_mm"] = None  # across both organs: no organ's diameter
    sides = [{"structure": f"{summary['structure']} ({side['side']})", "measure": summary["measure"],
              **{k: v for k, v in side.items() if k != "side"}} for side in summary.get("sides", [])]
    return [row, *sides]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "mask"


def _captioned(image: np.ndarray, lines: list[str]):
    """A PIL image: the screenshot (h, w, 3 or 4 uint8) above a black band holding `lines`."""
    from PIL import Image, ImageDraw, ImageFont

    shot = Image.fromarray(np.ascontiguousarray(image))
    font = ImageFont.load_default(size=max(12, shot.width // 70))
    line_px = int(font.size * 1.4)
    out = Image.new(shot.mode, (shot.width, shot.height + line_px * len(lines) + 8), "black")
    out.paste(shot, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, shot.height + 4 + i * line_px), line, fill="white", font=font)
    return out


def _png_text(lines: list[str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Description", "\n".join(lines))
    info.add_text("Software", "napari-boltzformer")
    return info


def _shown_reoriented(geometry: dict) -> bool:
    """A file stored sagittally or coronally, shown (and reviewed) on its axial grid; not a single
    such slice, which is shown flat on its own grid (`_layers.shown_flat`)."""
    return FILE_GEOMETRY in geometry and not is_shown_flat(geometry)
