"""2.5D context: a slice plus its neighbours at fixed physical offsets along z.

One axial slice cannot tell a vessel's cross-section from a nodule: both are round and bright.
Along z they differ: a vessel continues a few millimetres on, a small nodule ends. The network
therefore sees, for each slice, extra channels sampled at fixed offsets in millimetres
(config.context_offsets_mm, e.g. -5, -2.5, +2.5, +5), linearly interpolated between the stored
slices whatever their spacing, and edge-replicated past the ends of the volume. A 2D image (one
slice) gives every neighbour equal to the slice itself, which the network also sees in
training (context dropout), so 2D inputs keep working.
"""

from __future__ import annotations

import math

import numpy as np


def neighbour_weights(index: int, num_slices: int, z_spacing_mm: float, offset_mm: float) -> tuple[int, int, float]:
    """(lower slice, upper slice, weight of the upper one) for slice `index` shifted by offset_mm."""
    f = min(max(index + offset_mm / z_spacing_mm, 0.0), num_slices - 1.0)
    lo = int(math.floor(f))
    hi = min(lo + 1, num_slices - 1)
    return lo, hi, f - lo


def context_margin(z_spacing_mm: float, offsets_mm) -> int:
    """Slices needed beyond a slice range so that every neighbour can be interpolated."""
    if not offsets_mm:
        return 0
    return int(math.ceil(max(abs(o) for o in offsets_mm) / z_spacing_mm)) + 1


def context_stack(slices: np.ndarray, indices, z_spacing_mm: float, offsets_mm) -> np.ndarray:
    """Network input channels for the slices `indices` of a prepared stack.

    slices: Z x H x W float32 (prepared intensities, the whole stack the neighbours come from);
    indices: n slice indices into it. Returns n x (1 + len(offsets_mm)) x H x W float32:
    channel 0 is the slice, channel 1 + i the neighbour at offsets_mm[i].
    """
    indices = np.asarray(indices, dtype=int)
    z = slices.shape[0]
    out = np.empty((len(indices), 1 + len(offsets_mm), *slices.shape[1:]), np.float32)
    out[:, 0] = slices[indices]
    for c, offset in enumerate(offsets_mm, start=1):
        for i, k in enumerate(indices):
            lo, hi, w = neighbour_weights(int(k), z, z_spacing_mm, float(offset))
            if w == 0.0 or lo == hi:
                out[i, c] = slices[lo]
            else:
                np.multiply(slices[lo], 1.0 - w, out=out[i, c])
                out[i, c] += w * slices[hi]
    return out
