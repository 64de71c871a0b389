"""Small Qt pieces the panel's parts share: a scroll area as wide as its panel, compact combos,
a 64-bit seed box, names for screen readers."""

from __future__ import annotations

from qtpy.QtCore import QRegularExpression
from qtpy.QtGui import QRegularExpressionValidator
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QLineEdit, QScrollArea, QWidget


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


def scroll_to(widget: QWidget) -> None:
    """Scroll the PanelScroll holding `widget` so that it shows (on a 1280 x 720 screen the lesion
    table lies below the fold); nothing when it already shows or is in no PanelScroll."""
    holder = widget.parentWidget()
    while holder is not None and not isinstance(holder, PanelScroll):
        holder = holder.parentWidget()
    if holder is not None:
        holder.ensureWidgetVisible(widget, 0, 0)


class SeedBox(QLineEdit):
    """A whole number from 0 to `maximum`, with a spin box's value() and setValue(): the command
    line takes 64-bit seeds, and a QSpinBox stops at 2**31 - 1, so a seed from a review record or
    a script could not be typed in to replay a run."""

    def __init__(self, maximum: int):
        super().__init__("0")
        self.maximum = int(maximum)
        # digits only; empty is acceptable too, or Qt would never finish the edit of a cleared box
        self.setValidator(QRegularExpressionValidator(QRegularExpression(r"[0-9]{0,%d}" % len(str(self.maximum)))))
        self.editingFinished.connect(lambda: self.setValue(self.value()))  # an empty or too large entry, shown as used

    def value(self) -> int:
        text = self.text().strip()
        return min(int(text), self.maximum) if text else 0

    def setValue(self, value: int) -> None:
        self.setText(str(min(max(int(value), 0), self.maximum)))


def compact(combo: QComboBox, chars: int = 8) -> None:
    """A combo box that asks for the width of `chars` characters, not of its longest item."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)


def name_controls(root: QWidget) -> None:
    """Accessible names for the controls of `root`'s form rows that have none: the row's label,
    or the label just before the control in the row ("Modality [auto] Device [cpu]": the second
    box is "Device"); each control's tooltip becomes its accessible description. Without them a
    screen reader announced the slice-range boxes, the threshold slider or the seed as nothing."""
    for form in root.findChildren(QFormLayout):
        for row in range(form.rowCount()):
            label = form.itemAt(row, QFormLayout.ItemRole.LabelRole)
            field = form.itemAt(row, QFormLayout.ItemRole.FieldRole)
            if field is None:
                continue
            name = label.widget().text() if label is not None and isinstance(label.widget(), QLabel) else ""
            items = [field] if field.widget() is not None else [field.layout().itemAt(i)
                                                                 for i in range(field.layout().count())]
            for item in items:
                widget = item.widget() if item is not None else None
                if isinstance(widget, QLabel):
                    name = widget.text() if widget.text().strip("–- ") else name
                elif widget is not None and name and not widget.accessibleName():
                    widget.setAccessibleName(name)
    for widget in root.findChildren(QWidget):
        if widget.toolTip() and not widget.accessibleDescription():
            widget.setAccessibleDescription(widget.toolTip())
