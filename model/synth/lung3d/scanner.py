"""Scanner effects, applied last: reconstruction blur, optional sharp kernel, correlated noise, HU
offset, breathing blur over the diaphragm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy
from .grid import Grid


def scanner_effects(img: np.ndarray, rng, grid: Grid, a: Anatomy, info: dict, lung_region: np.ndarray):
    sx, sy, sz = grid.spacing
    blur_mm = rng.uniform(0.5, 1.1)
    # slice sensitivity profile: thick slices are already averaged over their thickness; a small
    # extra z blur models the reconstruction filter along z
    sig = (rng.uniform(0.25, 0.45) * max(1.0, 1.2 / sz), blur_mm / sy, blur_mm / sx)
    img = ndi.gaussian_filter(img, sig, truncate=3.0)
    sharp = rng.random() < 0.35
    if sharp:  # lung / bone kernel: edge enhancement
        amount = rng.uniform(0.3, 0.8)
        img = img + amount * (img - ndi.gaussian_filter(img, (0, 1.2 / sy, 1.2 / sx), truncate=3.0))
    # breathing: blur along z and y over the lower lungs and the diaphragm
    if rng.random() < 0.2:
        zlo, zhi = min(a.z_dome_l, a.z_dome_r) - 30, a.z_dome_r + 50
        wz = np.clip(1 - np.abs(grid.Z - (zlo + zhi) / 2) / ((zhi - zlo) / 2), 0, 1).astype(np.float32)
        if wz.any():
            k = np.flatnonzero(wz)
            sl = slice(k[0], k[-1] + 1)
            s = rng.uniform(0.6, 1.6)
            blurred = ndi.gaussian_filter(img[sl], (s * 1.5 / sz, s / sy, 0.3), truncate=2.5)
            # only the lungs and the diaphragm under them move
            near = ndi.gaussian_filter(lung_region[sl].astype(np.float32), (0, 6 / sy, 6 / sx))
            w = wz[sl, None, None] * np.clip(2 * near, 0, 1)
            img[sl] = img[sl] * (1 - w) + blurred * w
            info["motion_blur_mm"] = round(s, 2)
    noise_hu = rng.uniform(8, 30) * (1.6 if sharp else 1.0) * np.sqrt(max(0.5, 2.5 / sz)) ** 0.5
    corr = rng.uniform(0.5, 1.0)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise = ndi.gaussian_filter(noise, (0, corr, corr), truncate=3.0)
    noise *= np.float32(noise_hu / (noise.std() + 1e-6))
    img += noise
    off = rng.normal(0, 6)
    img += np.float32(off)
    info.update(blur_mm=round(blur_mm, 2), sharp_kernel=sharp, noise_hu=round(float(noise_hu), 1),
                offset_hu=round(float(off), 1))
    return img
