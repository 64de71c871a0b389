"""Small Qt pieces the panel's parts share: a scroll area as wide as its panel, compact combos."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QScrollArea


class PanelScroll(QScrollArea):
    """A vertical scroll area as wide as its panel needs (a plain one asks napari's dock for
    very little width and squeezes the panel)."""

    def minimumSizeHint(self):
        hint = super().minimumSizeHint()
        inner = self.widget()
        if inner is not None:
            hint.setWidth(inner.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width() + 2)
        return hint

    def sizeHint(self):
        hint = super().sizeHint()
        hint.setWidth(self.minimumSizeHint().width())
        return hint

    def showEvent(self, event):
        # measured once napari's stylesheet is applied (it widens spin boxes and combos)
        self.setMinimumWidth(self.minimumSizeHint().width())
        super().showEvent(event)


def compact(combo: QComboBox, chars: int = 8) -> None:
    """A combo box that asks for the width of `chars` characters, not of its longest item."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
