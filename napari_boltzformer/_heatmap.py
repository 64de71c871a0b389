"""The attention heatmap's controls: what its colour means, for which query, how much of it.

A group box of the panel (`HeatmapControls`) that redraws the active result's heatmap layer from
the stored attention maps (boltzformer AttentionMaps.view; no inference), keeps the colour bar
and the canvas legend on the active heatmap only, labels the decoder-layer slider with its
temperature and says how concentrated the sampling is on the slice shown. It reads the panel's
active run through the same few attributes as the review (`active_result`, `_layer_of`,
`_run_info`, `_active_run`).
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel

from ._job import TOP_FRACTION
from ._layers import ROLE_KEY, attention_contrast, attention_legend
from ._qt import compact
from ._view import slicing_axes

HEAT_VALUES = (("queries per cell", "counts"), ("sampling probability", "probabilities"))


class HeatmapControls(QGroupBox):
    """The "Attention heatmap" box of a BoltzFormerWidget."""

    def __init__(self, panel):
        super().__init__("Attention heatmap")
        self.panel = panel
        self.viewer = panel.viewer
        form = QFormLayout(self)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.values_combo = QComboBox()
        for text, value in HEAT_VALUES:
            self.values_combo.addItem(text, value)
        self.values_combo.setToolTip("Colour = how many of the decoder's queries sampled each token, or the "
                                     "Boltzmann probability of drawing it in one draw, mean over queries (1 = what a "
                                     "uniform draw gives; a token at 50 is not sampled 50 times as often: each "
                                     "query draws ~10 % of the tokens, each once)")
        self.query_combo = QComboBox()
        self.query_combo.setToolTip("One query's samples, or all queries together")
        row = QHBoxLayout()
        row.addWidget(self.values_combo, 3)
        row.addWidget(self.query_combo, 2)
        form.addRow("Colour", row)
        self.top_check = QCheckBox(f"hottest cells only (≤ ~{TOP_FRACTION * 100:.0f} % of the mass)")
        self.top_check.setChecked(True)
        compact(self.values_combo, 15)
        compact(self.query_combo, 8)
        self.top_check.setToolTip("Show only the fewest cells that hold this share of the Boltzmann sampling "
                                  "probability, leaving out a flat floor (then they hold less: the line below "
                                  "gives the share on the slice shown), and nothing on a slice whose sampling is "
                                  "flat: where the search concentrates")
        form.addRow(self.top_check)
        self.info_label = QLabel("")
        self.info_label.setWordWrap(True)
        self.info_label.setStyleSheet("color: gray;")
        form.addRow(self.info_label)
        for combo in (self.values_combo, self.query_combo):
            combo.currentIndexChanged.connect(lambda _=None: self.redraw())
        self.top_check.toggled.connect(lambda _=None: self.redraw())
        self.setEnabled(False)

    def options(self, attention) -> dict:
        """values / query / top_fraction the heatmap controls ask for (query only if recorded)."""
        values = self.values_combo.currentData() or "counts"
        query = self.query_combo.currentData()
        if values != "counts" or attention is None or attention.query_bits is None:
            query = None
        elif query is not None and query >= attention.num_queries:
            query = None
        return {"values": values, "query": query,
                "top_fraction": TOP_FRACTION if self.top_check.isChecked() else None}

    def sync(self):
        """Query choices of the active result's network; controls off without a heatmap."""
        result = self.panel.active_result()
        att = None if result is None else result.attention
        layer = self._layer()
        self.setEnabled(att is not None and layer is not None)
        wanted = [("all queries", None)]
        if att is not None and att.query_bits is not None:
            wanted += [(f"query {q + 1}", q) for q in range(att.num_queries)]
        have = [(self.query_combo.itemText(i), self.query_combo.itemData(i))
                for i in range(self.query_combo.count())]
        if have != wanted:
            current = self.query_combo.currentData()
            self.query_combo.blockSignals(True)
            self.query_combo.clear()
            for text, value in wanted:
                self.query_combo.addItem(text, value)
            index = self.query_combo.findData(current)
            self.query_combo.setCurrentIndex(max(0, index))
            self.query_combo.blockSignals(False)
        self.query_combo.setEnabled(len(wanted) > 1 and self.values_combo.currentData() == "counts")
        if layer is not None and att is not None and not self._matches(layer, att):
            self.redraw()  # another run's settings: show this one as the controls say
        self._one_heatmap_shown(layer)
        self.fit_probability_bar()
        self.update_info()
        self.update_legend()

    def _one_heatmap_shown(self, active) -> None:
        """Only the active result's heatmap stays visible: the colour bar, legend and controls
        describe it, and another run's drawn above it would be read as this one. Shown when
        any heatmap was (the reader had heatmaps on), else left hidden."""
        others = [layer for layer in self.panel.viewer.layers
                  if (layer.metadata or {}).get(ROLE_KEY) == "attention" and layer is not active]
        shown = any(layer.visible for layer in others)
        for layer in others:
            layer.visible = False
        if active is not None and shown:
            active.visible = True

    def _matches(self, layer, att) -> bool:
        md = layer.metadata
        wanted = self.options(att)
        return all(md.get(k) == v for k, v in wanted.items())

    def redraw(self):
        """Redraw the active result's heatmap layer as the controls say (no inference)."""
        result = self.panel.active_result()
        layer = self._layer()
        self.query_combo.setEnabled(self.query_combo.count() > 1 and self.values_combo.currentData() == "counts")
        if result is None or result.attention is None or layer is None:
            return
        att = result.attention
        options = self.options(att)
        num_queries = self.panel._run_info.get(self.panel._active_run, {}).get("num_queries") or att.num_queries
        data = att.view(options["values"], query=options["query"], top_fraction=options["top_fraction"])
        if layer.ndim == 3:  # a 2D source: (L, G, G)
            data = data[:, 0]
        layer.data = data
        layer.metadata.update(options)
        if options["values"] == "probabilities":
            self.fit_probability_bar()  # the decoder layer shown sets the scale, in one step
        else:
            layer.contrast_limits = attention_contrast(options["values"], num_queries, options["query"], data)
        layer.metadata["legend"] = attention_legend(options["values"], num_queries, options["query"],
                                                    options["top_fraction"])
        self.update_info()
        self.update_legend()

    def decoder_axis(self) -> int | None:
        layer = self._layer()
        if layer is None:
            return None
        return self.viewer.dims.ndim - layer.ndim

    def _current_decoder_layer(self) -> int | None:
        axis = self.decoder_axis()
        return None if axis is None else int(self.viewer.dims.current_step[axis])

    def _stats(self, att) -> dict:
        """spread and top-mass shares per (decoder layer, slice), computed once per run."""
        info = self.panel._run_info.setdefault(self.panel._active_run, {})
        if info.get("heat_stats") is None:
            area, mass = att.top_mass_stats(TOP_FRACTION)
            info["heat_stats"] = {"spread": att.spread(), "area": area, "mass": mass,
                                  "sharpest": att.sharpest_layer()}
        return info["heat_stats"]

    def apply_tau_label(self, event=None):
        """The decoder-layer slider reads 'layer · τ 0.17' for the layer shown. napari puts the
        layers' own axis labels back whenever a layer changes, so this runs again then."""
        result = self.panel.active_result()
        axis, layer_index = self.decoder_axis(), self._current_decoder_layer()
        if result is None or result.attention is None or axis is None:
            return
        att = result.attention
        tau = att.temperatures[min(max(layer_index, 0), att.num_layers - 1)]
        label = f"layer · τ {tau:.2f}"  # napari cuts slider labels wider than a fifth of the slider
        labels = list(self.viewer.dims.axis_labels)
        if axis < len(labels) and labels[axis] != label:
            labels[axis] = label
            self.viewer.dims.axis_labels = labels

    def update_info(self):
        """The layer slider's label says τ of the layer shown; the panel says how concentrated
        the sampling is on the slice shown."""
        result = self.panel.active_result()
        axis, layer_index = self.decoder_axis(), self._current_decoder_layer()
        heat = self._layer()
        if result is None or result.attention is None or axis is None or heat is None:
            self.info_label.setText("")
            return
        att = result.attention
        layer_index = min(max(layer_index, 0), att.num_layers - 1)
        tau = att.temperatures[layer_index]
        self.apply_tau_label()
        stats = self._stats(att)
        text = (f"layer {layer_index + 1}/{att.num_layers} (slider {layer_index}) · τ {tau:.2f} · "
                f"stride {att.strides[layer_index]} · "
                f"{att.tokens_per_query[layer_index]} tokens/query · opened on layer {stats['sharpest'] + 1}, "
                "the least spread\n")
        z = None
        if heat.ndim == 4:
            z = int(round(float(heat.world_to_data(self.viewer.dims.point[axis:])[1])))
        else:
            z = 0
        from boltzformer.results import FLAT_SPREAD  # here: the plugin's modules load without torch

        spread = stats["spread"][layer_index, z] if 0 <= z < stats["spread"].shape[1] else np.nan
        here = "this slice"  # the sampling is per axial slice: in a sagittal, coronal or 3D view, say which
        if heat.ndim == 4 and (self.viewer.dims.ndisplay != 2 or slicing_axes(self.viewer, heat) != [0, 1]):
            here = f"axial slice {z} (not the plane on screen)"
        if np.isfinite(spread) and spread >= FLAT_SPREAD:
            text += (f"{here}: the sampling is flat (spread over {_percent(spread)} of the frame): no cell "
                     "stands out")
        elif np.isfinite(spread):
            area, mass = stats["area"][layer_index, z], stats["mass"][layer_index, z]
            text += (f"{here}: spread over {_percent(spread)} of the frame (effective); "
                     f"the hottest {_percent(area)} of cells hold {_percent(mass)} of the mass")
        else:
            text += f"{here}: not processed"
        self.info_label.setText(text)

    def update_legend(self):
        """Colour bar and legend for the active heatmap only (several prompts: one legend)."""
        active = self._layer()
        for layer in self.viewer.layers:
            if (layer.metadata or {}).get(ROLE_KEY) == "attention":
                layer.colorbar.visible = layer is active and layer.visible
        shown = active is not None and active.visible
        self.panel.canvas_labels.show_legend(active.metadata.get("legend") if shown else None)

    def on_step(self, event=None):
        """The viewer moved to another slice or decoder layer."""
        if self.decoder_axis() is not None:
            self.fit_probability_bar()
            self.update_info()

    def fit_probability_bar(self) -> None:
        """In the probability view the colour bar runs from 0 to the maximum of the decoder layer
        shown: the sharp last layers reach hundreds of times uniform, and on one scale for all
        the first layers' few times uniform were drawn nearly transparent. Counts keep their
        fixed 0..queries scale."""
        layer, index = self._layer(), self._current_decoder_layer()
        if layer is None or index is None or layer.metadata.get("values") != "probabilities":
            return
        shown = layer.data[min(max(index, 0), layer.data.shape[0] - 1)]
        limits = attention_contrast("probabilities", None, None, shown)
        if tuple(layer.contrast_limits) != limits:
            layer.contrast_limits = limits

    def _layer(self):
        """The active result's heatmap layer, or None."""
        return self.panel._layer_of(self.panel._active_run, "attention")


def _percent(share: float) -> str:
    """0.0012 -> '0.12 %', 0.25 -> '25 %', 0.00024 -> '0.024 %': small shares keep two significant
    digits (one cell of 4 096 is 0.024 %, not '0.0 %')."""
    if share >= 0.1:
        return f"{share * 100:.0f} %"
    return f"{share * 100:.2g} %" if share > 0 else "0 %"
