"""Display windows: the contrast limits an image layer is shown with.

CT in Hounsfield units is shown in a named window of boltzformer.intensity.WINDOWS; MR, and CT
whose values are not HU, with percentiles of its voxels. Only the display changes: the layer's
data stay as read. The window the plugin set is kept in the layer's metadata (WINDOW_KEY), so
the panel can tell a contrast the user chose (left alone) from its own (follows the window the
network saw). No Qt, no tensor math.
"""

from __future__ import annotations

import numpy as np

WINDOW_KEY = "boltzformer_window"  # (name, lower, upper) of the display window the plugin set


def display_window(volume, window: str | None = None) -> tuple[str | None, tuple[float, float]]:
    """(window name, contrast limits) to show `volume` with; the data themselves stay as read.

    CT in Hounsfield units: a named window of boltzformer.intensity.WINDOWS (`window`, else the
    module's default, soft tissue). MR, and CT whose values are not HU: the 0.5-99.5
    percentiles of a strided sample of the voxels (display only).
    """
    from boltzformer import intensity

    modality = intensity.detect_modality(volume)  # the file's own modality wins
    if modality == "CT" and intensity.classify_units(np.asarray(volume.array)) == "HU":
        name = resolve_window_name(window or intensity.DEFAULT_WINDOW)
        w = intensity.WINDOWS[name]
        return name, (float(w.lower_hu), float(w.upper_hu))
    return None, intensity.display_range(np.asarray(volume.array), foreground=modality == "MR")


def resolve_window_name(name: str) -> str:
    """The key of boltzformer.intensity.WINDOWS matching `name` ('soft tissue' ~ 'soft_tissue')."""
    from boltzformer import intensity

    if name in intensity.WINDOWS:
        return name
    key = _window_key(name)
    for k in intensity.WINDOWS:
        if _window_key(k) == key:
            return k
    raise KeyError(f"unknown window {name!r}; known: {', '.join(intensity.WINDOWS)}")


def _window_key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def apply_window(layer, name: str):
    """Show an image layer in window preset `name` (its contrast range widened to hold it)."""
    from boltzformer import intensity

    key = resolve_window_name(name)
    w = intensity.WINDOWS[key]
    limits = (float(w.lower_hu), float(w.upper_hu))
    lo, hi = layer.contrast_limits_range
    layer.contrast_limits_range = (min(lo, limits[0]), max(hi, limits[1]))
    layer.contrast_limits = limits
    layer.metadata[WINDOW_KEY] = [key, *limits]


def follow_window(layer, window: str | None):
    """Show `layer` in the window a run used, unless the user changed the contrast the plugin set."""
    if not window:
        return
    stored = (layer.metadata or {}).get(WINDOW_KEY)
    if not stored or stored[0] is None:
        return  # shown with percentiles (MR, or CT not in HU): a HU window would be wrong
    if not np.allclose(layer.contrast_limits, stored[1:3]):
        return  # the user chose another contrast; leave it
    try:
        apply_window(layer, window)
    except KeyError:
        pass  # a custom window (not a preset)
