"""The review's keys: N / Shift-N next / previous, A accept, R reject, U undo, on the canvas (viewer
key bindings) and on the focused lesion table (an event filter, before the table's type-to-search),
H (look here) on the canvas, and which of them an active layer takes for itself.

napari gives a layer's own key bindings precedence over the viewer's: with a Points layer active,
A selects all its points in the slice; with a Shapes layer active, A selects shapes and R draws
rectangles. The review cannot take those keys back, so the panel says so (`keys_taken_by`).
"""

from __future__ import annotations

import weakref

from qtpy.QtCore import QEvent, QObject, Qt

# action -> (key on the canvas, as napari names it; Qt key on the focused table)
KEYS = {"next": ("n", Qt.Key.Key_N), "previous": ("Shift-N", Qt.Key.Key_N), "accept": ("a", Qt.Key.Key_A),
        "reject": ("r", Qt.Key.Key_R), "undo": ("u", Qt.Key.Key_U)}
# look here on the canvas, under the pointer or at the view's centre (L is napari's label picker)
LOOK_KEY = "h"


def keys_taken_by(layer) -> list[str]:
    """The review keys ("A", "R", ...) that `layer`'s type binds itself in napari's default
    shortcuts, so that they reach the layer and not the review while it is active; [] when none
    (or when this napari does not say: its action manager is not public API)."""
    try:
        from napari.utils.action_manager import action_manager
        from napari.utils.shortcuts import default_shortcuts

        actions = action_manager._actions
    except (ImportError, AttributeError):
        return []
    ours = {key.replace("-", "+").upper(): key for key in [k for k, _ in KEYS.values()] + [LOOK_KEY]}
    taken = set()
    for name, shortcuts in default_shortcuts.items():
        action = actions.get(name)
        provider = getattr(action, "keymapprovider", None)
        if isinstance(provider, type) and isinstance(layer, provider):
            taken |= {str(k).upper() for k in shortcuts} & set(ours)
    return sorted(taken)


class TableKeys(QObject):
    """Event filter on the lesion table: the review keys act instead of the table's search.
    `reviewer`: a ReviewPanel (its `act(action)` and `alive`), held weakly."""

    def __init__(self, reviewer):
        super().__init__(reviewer.panel.table)
        self._reviewer = weakref.ref(reviewer)

    def eventFilter(self, obj, event):
        if event.type() != QEvent.Type.KeyPress:
            return False
        shift = bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        others = event.modifiers() & ~(Qt.KeyboardModifier.ShiftModifier | Qt.KeyboardModifier.KeypadModifier)
        if others:
            return False
        for action, (name, qt_key) in KEYS.items():
            if event.key() == qt_key and shift == name.startswith("Shift"):
                reviewer = self._reviewer()
                if reviewer is not None and reviewer.alive:
                    reviewer.act(action)
                return True
        return False
