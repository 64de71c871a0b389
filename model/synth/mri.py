"""Procedural MRI-like axial brain slices and volumes (FLAIR, T1, T2, T1 with contrast).

Head outline, scalp fat, skull, CSF, grey matter with gyral folding, white matter, ventricles;
multiple-sclerosis-like lesions (small ovoids, periventricular and juxtacortical) and tumours
(irregular mass with oedema, ring enhancement on T1c). A smooth multiplicative bias field and
Rician noise finish the image. Intensities are arbitrary positive MR signal (0..~1000).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .ct import SyntheticSlice, SyntheticVolume, _check_square, _ellipse, _grid, _lobes

# tissue signal per contrast: background, fat, skull, csf, grey, white, lesion, tumour, oedema
_SIGNAL = {
    "flair": dict(bg=0.0, fat=0.55, skull=0.05, csf=0.06, gm=0.62, wm=0.45, ms=0.95, tumor=0.85, edema=0.8),
    "t1": dict(bg=0.0, fat=0.95, skull=0.05, csf=0.12, gm=0.5, wm=0.72, ms=0.35, tumor=0.4, edema=0.45),
    "t2": dict(bg=0.0, fat=0.6, skull=0.05, csf=0.95, gm=0.62, wm=0.42, ms=0.85, tumor=0.8, edema=0.8),
    "t1c": dict(bg=0.0, fat=0.95, skull=0.05, csf=0.12, gm=0.5, wm=0.72, ms=0.4, tumor=1.0, edema=0.45),
}


def _head(rng):
    return dict(ax=rng.uniform(68, 80), ay=rng.uniform(85, 98), cx=rng.normal(0, 4), cy=rng.normal(0, 4),
                wob=_lobes(rng, 0.02), gyri=(rng.uniform(0, 2 * np.pi, 3), rng.integers(14, 24)),
                vent=rng.uniform(0.7, 1.4), seed=int(rng.integers(1 << 30)))


def _lesions(rng, h, z_extent_mm=0.0, lesion_free_prob=0.2):
    out = []
    if rng.random() < lesion_free_prob:
        return out
    if rng.random() < 0.75:  # multiple sclerosis
        for _ in range(int(rng.integers(1, 12))):
            d = rng.uniform(2, 7) if rng.random() < 0.6 else rng.uniform(7, 15)
            if rng.random() < 0.65:  # periventricular
                t = rng.uniform(0, 2 * np.pi)
                x, y = h["cx"] + 14 * h["vent"] * np.cos(t) * 1.1, h["cy"] + 26 * np.sin(t)
            else:  # juxtacortical / deep white matter
                t, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.75)
                x, y = h["cx"] + r * h["ax"] * np.cos(t), h["cy"] + r * h["ay"] * np.sin(t)
            z = rng.uniform(-z_extent_mm, z_extent_mm) if z_extent_mm else 0.0
            out.append(("ms_lesion", x, y, z, d / 2, rng.uniform(1.0, 1.8), _lobes(rng, 0.1)))
    else:
        d = rng.uniform(15, 50)
        t, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.55)
        z = rng.uniform(-z_extent_mm, z_extent_mm) / 2 if z_extent_mm else 0.0
        out.append(("brain_tumor", h["cx"] + r * h["ax"] * np.cos(t), h["cy"] + r * h["ay"] * np.sin(t), z, d / 2, 1.0,
                    _lobes(rng, 0.25)))
    return out


def _render(h, lesions, rng, size, pixel_mm, contrast, z_mm=0.0, z_frac=0.0, bias=None, noise=None):
    sig = _SIGNAL[contrast]
    x, y = _grid(size, pixel_mm)
    s = 1.0 - 0.35 * z_frac ** 2
    ax, ay, cx, cy = h["ax"] * s, h["ay"] * s, h["cx"], h["cy"]
    head = _ellipse(x, y, cx, cy, ax, ay, h["wob"])
    skull_out = _ellipse(x, y, cx, cy, ax - 5, ay - 5, h["wob"])
    skull_in = _ellipse(x, y, cx, cy, ax - 11, ay - 11, h["wob"])
    brain = _ellipse(x, y, cx, cy, ax - 14, ay - 14, h["wob"])
    img = np.full((size, size), sig["bg"], np.float32)
    img[head] = sig["fat"]
    img[skull_out] = sig["skull"]
    img[skull_in] = sig["csf"]
    # grey matter ribbon with gyral folds: white matter boundary modulated in angle
    theta = np.arctan2(y - cy, x - cx)
    phases, freq = h["gyri"]
    fold = 0.07 * np.sin(freq * theta + phases[0]) + 0.04 * np.sin(2.3 * freq * theta + phases[1])
    rn = np.sqrt(((x - cx) / (ax - 14)) ** 2 + ((y - cy) / (ay - 14)) ** 2)
    img[brain] = sig["gm"]
    wm = brain & (rn < 0.82 + fold)
    img[wm] = sig["wm"]
    # sulci: thin CSF clefts in the cortex
    sulci = brain & (rn > 0.86 + 0.8 * fold) & (np.cos(freq * theta + phases[2]) > 0.85)
    img[sulci] = sig["csf"]
    # ventricles: two crescents + a thin septum between them
    v = h["vent"] * (1 - 0.6 * abs(z_frac))
    vent = np.zeros_like(head)
    for side in (-1, 1):
        vent |= _ellipse(x, y, cx + side * 8 * v, cy - 4, 5.5 * v, 22 * v) & ~_ellipse(x, y, cx + side * 15 * v, cy - 4, 5 * v, 14 * v)
    img[vent & brain] = sig["csf"]
    masks: dict[str, np.ndarray] = {}
    for target, lx, ly, lz, r0, elong, lobes in lesions:
        dz = z_mm - lz
        if abs(dz) >= r0:
            continue
        r = np.sqrt(r0 ** 2 - dz ** 2)
        if r < 0.6 * pixel_mm:
            continue
        m = _ellipse(x, y, lx, ly, r, r * elong, lobes) & brain & ~vent
        if not m.any():
            continue
        if target == "brain_tumor":
            edema = _ellipse(x, y, lx, ly, 1.6 * r, 1.6 * r, lobes) & brain & ~m
            img[edema] = sig["edema"]
            img[m] = sig["tumor"]
            if contrast == "t1c":
                img[_ellipse(x, y, lx, ly, 0.65 * r, 0.65 * r) & m] = 0.3
        else:
            soft = ndi.gaussian_filter(m.astype(np.float32), 0.6)
            img = img * (1 - soft) + soft * sig["ms"]
        masks[target] = masks.get(target, np.zeros_like(m)) | m
    img = ndi.gaussian_filter(img, 0.6)
    if bias is None:
        g = rng.normal(0, 1, (6, 6))
        bias = 1 + 0.12 * ndi.zoom(g, size / 6, order=3)[:size, :size] / max(g.std(), 1e-6)
    img = img * bias.astype(np.float32)
    sigma = noise if noise is not None else rng.uniform(0.01, 0.04)
    n1, n2 = rng.normal(0, sigma, (2, size, size)).astype(np.float32)
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician magnitude noise
    return SyntheticSlice((img * 1000).astype(np.float32), masks, pixel_mm, "MR")


def _check_contrast(contrast: str | None) -> None:
    if contrast is not None and contrast not in _SIGNAL:
        raise ValueError(f"contrast must be one of {', '.join(sorted(_SIGNAL))} (or None: drawn), got {contrast!r}")


def brain_slice(rng: np.random.Generator, size: int = 256, contrast: str | None = None) -> SyntheticSlice:
    """One random axial brain slice (about 20 % lesion-free)."""
    _check_contrast(contrast)
    contrast = contrast or ("flair", "flair", "t1", "t2", "t1c")[rng.integers(5)]
    h = _head(rng)
    pixel_mm = rng.uniform(0.8, 1.2) * 256 / size
    return _render(h, _lesions(rng, h), rng, size, pixel_mm, contrast, z_frac=rng.uniform(-0.6, 0.6))


def brain_volume(seed: int, shape_zyx=(24, 256, 256), spacing_mm=(0.9, 0.9, 3.0), contrast: str = "flair") -> SyntheticVolume:
    """A brain volume with 3D lesions (spacing_mm (x, y, z); square slices, square pixels)."""
    _check_square(shape_zyx, spacing_mm)
    _check_contrast(contrast)
    rng = np.random.default_rng(seed)
    z, size = shape_zyx[0], shape_zyx[1]
    h = _head(rng)
    lesions = _lesions(rng, h, z_extent_mm=0.3 * z * spacing_mm[2], lesion_free_prob=0.0)
    g = rng.normal(0, 1, (6, 6))
    bias = 1 + 0.1 * ndi.zoom(g, size / 6, order=3)[:size, :size] / max(g.std(), 1e-6)
    image = np.zeros((z, size, shape_zyx[2]), np.float32)
    masks: dict[str, np.ndarray] = {}
    for k in range(z):
        z_mm = (k - (z - 1) / 2) * spacing_mm[2]
        sl = _render(h, lesions, rng, size, spacing_mm[0], contrast, z_mm, z_mm / (0.55 * z * spacing_mm[2]), bias, 0.02)
        image[k] = sl.image
        for key, m in sl.masks.items():
            masks.setdefault(key, np.zeros((z, size, shape_zyx[2]), np.uint8))[k] = m
    return SyntheticVolume(image, masks, tuple(spacing_mm), "MR")
