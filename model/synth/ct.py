"""Procedural CT-like chest and abdomen slices and volumes, in Hounsfield units.

A slice is rendered from an `Anatomy` (body, organs, bones, lesions in millimetres) so that a
volume can render the same anatomy at every z with smoothly varying organ sizes and 3D lesions
cut at their true cross-section. Scanner effects (reconstruction blur, correlated noise, HU
offset) are applied per slice. Everything is vectorised numpy at the output size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

AIR, FAT, MUSCLE, LUNG, BLOOD, LIVER, BONE_CORTEX, MARROW = -1000.0, -100.0, 50.0, -860.0, 40.0, 60.0, 900.0, 250.0


@dataclass
class SyntheticSlice:
    """image: S x S float32 (HU for CT, raw signal for MR); masks: target -> S x S bool."""

    image: np.ndarray
    masks: dict
    pixel_mm: float
    modality: str
    lesion_kinds: dict = field(default_factory=dict)


@dataclass
class SyntheticVolume:
    """image: Z x S x S (int16 HU for CT, float32 for MR); masks: target -> Z x S x S uint8."""

    image: np.ndarray
    masks: dict
    spacing_mm: tuple  # (x, y, z)
    modality: str


@dataclass
class Blob:
    """A lesion: centre (x, y, z) mm from the image centre, radius mm, intensity HU, kind."""

    center_mm: tuple
    radius_mm: float
    hu: float
    target: str
    kind: str = "solid"
    lobes: tuple = ()  # (amplitude, frequency, phase) triples deforming the outline
    core_hu: float | None = None  # part-solid nodules: a solid core inside a ground-glass halo


def _grid(size: int, pixel_mm: float):
    c = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * pixel_mm
    return np.meshgrid(c, c, indexing="xy")  # x (columns), y (rows; positive = posterior)


def _ellipse(x, y, cx, cy, ax, ay, wobble=None):
    r = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
    if wobble is not None:
        theta = np.arctan2(y - cy, x - cx)
        # at most 2x the radius: five large lobes can sum below -1, which made the outline unbounded
        r = r * np.maximum(1 + sum(a * np.cos(f * theta + p) for a, f, p in wobble), 0.25)
    return r <= 1.0


def _lobes(rng, irregular: float):
    n = rng.integers(2, 6)
    return tuple((rng.uniform(0, irregular), int(rng.integers(2, 9)), rng.uniform(0, 2 * np.pi)) for _ in range(n))


@dataclass
class Anatomy:
    region: str
    body_ax: float
    body_ay: float
    body_cx: float
    body_cy: float
    fat_mm: float
    contrast: str  # none | arterial | venous
    lung_scale: float
    heart_scale: float
    liver_scale: float
    wobble: tuple
    blobs: list
    rib_angles: np.ndarray
    vessel_seed: int


def random_anatomy(rng: np.random.Generator, region: str | None = None) -> Anatomy:
    if region not in (None, "chest", "abdomen"):
        raise ValueError(f"region must be 'chest' or 'abdomen' (or None: either), got {region!r}")
    region = region or ("chest" if rng.random() < 0.62 else "abdomen")
    return Anatomy(
        region=region,
        body_ax=rng.uniform(150, 190), body_ay=rng.uniform(100, 135),
        body_cx=rng.normal(0, 8), body_cy=rng.normal(-5, 8),
        fat_mm=rng.uniform(5, 30),
        contrast=("none", "arterial", "venous")[rng.integers(3)],
        lung_scale=rng.uniform(0.85, 1.1), heart_scale=rng.uniform(0.8, 1.15), liver_scale=rng.uniform(0.85, 1.15),
        wobble=_lobes(rng, 0.04),
        blobs=[],
        rib_angles=np.sort(rng.uniform(0.15, np.pi - 0.15, size=rng.integers(6, 10))),
        vessel_seed=int(rng.integers(1 << 30)),
    )


def _lung_geometry(a: Anatomy, z_frac: float = 0.0):
    """Left/right lung ellipses (cx, cy, ax, ay) in mm; image left = patient right."""
    s = a.lung_scale * (1.0 - 0.25 * z_frac ** 2)
    ax, ay = 0.36 * a.body_ax * s, 0.75 * a.body_ay * s
    dx = 0.47 * a.body_ax
    return [(a.body_cx - dx, a.body_cy - 0.02 * a.body_ay, ax, ay), (a.body_cx + dx, a.body_cy - 0.02 * a.body_ay, ax, ay)]


def add_random_lesions(rng: np.random.Generator, a: Anatomy, lesion_free_prob: float = 0.2, z_extent_mm: float = 0.0):
    """Populate a.blobs with lesions in plausible places (z spread over +-z_extent_mm)."""
    if rng.random() < lesion_free_prob:
        return a
    lungs = _lung_geometry(a)

    def point_in(ell, margin=1.0, edge=False):
        cx, cy, ax, ay = ell
        t = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(0.85, 0.97) if edge else np.sqrt(rng.uniform(0, 1)) * 0.85
        return cx + margin * r * ax * np.cos(t), cy + margin * r * ay * np.sin(t)

    def z():
        return rng.uniform(-z_extent_mm, z_extent_mm) if z_extent_mm else 0.0

    if a.region == "chest":
        for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3, 4]))):
            u = rng.random()
            d_mm = rng.uniform(3, 10) if u < 0.55 else rng.uniform(10, 20) if u < 0.85 else rng.uniform(20, 30)
            kind = rng.choice(["solid", "solid", "solid", "part_solid", "ground_glass"])
            hu = rng.uniform(0, 60) if kind == "solid" else rng.uniform(-650, -350)
            x, y = point_in(lungs[rng.integers(2)], edge=rng.random() < 0.3)  # some juxta-pleural
            core = rng.uniform(0, 50) if kind == "part_solid" else None
            a.blobs.append(Blob((x, y, z()), d_mm / 2, hu, "lung_nodule", kind, _lobes(rng, 0.18), core))
        if rng.random() < 0.18:
            d_mm = rng.uniform(30, 70)
            x, y = point_in(lungs[rng.integers(2)], margin=0.6)
            a.blobs.append(Blob((x, y, z()), d_mm / 2, rng.uniform(20, 50), "lung_tumor", "mass", _lobes(rng, 0.3)))
    else:
        liver_cx, liver_cy = a.body_cx - 0.42 * a.body_ax, a.body_cy - 0.1 * a.body_ay
        for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
            d_mm = rng.uniform(4, 20) if rng.random() < 0.7 else rng.uniform(20, 45)
            x, y = point_in((liver_cx, liver_cy, 0.38 * a.body_ax * a.liver_scale, 0.6 * a.body_ay), margin=0.8)
            hypo = rng.random() < 0.8
            a.blobs.append(Blob((x, y, z()), d_mm / 2, rng.uniform(-40, 40) if hypo else rng.uniform(120, 170),
                                "liver_lesion", "hypodense" if hypo else "hyperdense", _lobes(rng, 0.12)))
        if rng.random() < 0.45:
            side = rng.choice([-1, 1])
            kx, ky = a.body_cx + side * 0.33 * a.body_ax, a.body_cy + 0.45 * a.body_ay
            d_mm = rng.uniform(6, 35)
            cyst = rng.random() < 0.5
            x, y = kx + rng.normal(0, 10), ky + rng.normal(0, 12)
            a.blobs.append(Blob((x, y, z()), d_mm / 2, rng.uniform(0, 20) if cyst else rng.uniform(30, 70),
                                "kidney_lesion", "cyst" if cyst else "solid", _lobes(rng, 0.08)))
    return a


def render(a: Anatomy, rng: np.random.Generator, size: int, pixel_mm: float, z_mm: float = 0.0,
           z_frac: float = 0.0, scanner: dict | None = None) -> SyntheticSlice:
    """Render the anatomy's cross-section at height z_mm (z_frac in [-1, 1] scales organs)."""
    x, y = _grid(size, pixel_mm)
    img = np.full((size, size), AIR, np.float32)
    masks: dict[str, np.ndarray] = {}
    body = _ellipse(x, y, a.body_cx, a.body_cy, a.body_ax, a.body_ay, a.wobble)
    inner = _ellipse(x, y, a.body_cx, a.body_cy, a.body_ax - a.fat_mm, a.body_ay - a.fat_mm, a.wobble)
    cavity = _ellipse(x, y, a.body_cx, a.body_cy, a.body_ax - a.fat_mm - 14, a.body_ay - a.fat_mm - 12, a.wobble)
    img[body] = FAT
    img[inner] = MUSCLE
    img[cavity] = FAT + 20 if a.region == "abdomen" else MUSCLE
    enh = {"none": 0.0, "arterial": 1.0, "venous": 0.6}[a.contrast]
    # spine (vertebral body + posterior elements) and ribs
    sx, sy = a.body_cx, a.body_cy + a.body_ay - a.fat_mm - 40
    vb_r = 17.0
    vert = _ellipse(x, y, sx, sy, vb_r, vb_r * 0.9)
    post = _ellipse(x, y, sx, sy + 25, 7, 18)
    img[vert | post] = BONE_CORTEX
    img[_ellipse(x, y, sx, sy, vb_r - 3, vb_r * 0.9 - 3)] = MARROW
    masks["vertebra"] = vert
    cavity_r = cavity & ~vert & ~post
    # ribs: bony ovals in the chest wall
    for t in np.concatenate([a.rib_angles, -a.rib_angles]) if a.region == "chest" else a.rib_angles[:3]:
        rx = a.body_cx + (a.body_ax - a.fat_mm - 8) * np.cos(t + np.pi / 2)
        ry = a.body_cy + (a.body_ay - a.fat_mm - 7) * np.sin(t + np.pi / 2) * (1 if a.region == "chest" else 0.9)
        rib = _ellipse(x, y, rx, ry, 6.0, 4.0)
        img[rib] = BONE_CORTEX
        img[_ellipse(x, y, rx, ry, 3.5, 2.0)] = MARROW
    if a.region == "chest":
        hx, hy = a.body_cx + 0.1 * a.body_ax, a.body_cy - 0.05 * a.body_ay
        heart_ell = _ellipse(x, y, hx, hy, 0.3 * a.body_ax * a.heart_scale, 0.42 * a.body_ay * a.heart_scale)
        mediastinum = ndi.binary_dilation(heart_ell, iterations=max(1, int(6 / pixel_mm))) | _ellipse(
            x, y, sx, sy - 15, 32, 40)
        lung_masks = []
        for (cx, cy, ax, ay) in _lung_geometry(a, z_frac):
            m = _ellipse(x, y, cx, cy, ax, ay, a.wobble) & cavity_r & ~mediastinum
            lung_masks.append(m)
        lungs = lung_masks[0] | lung_masks[1]
        img[lungs] = LUNG
        # vessels as bright dots, placed uniformly in the lungs and re-drawn on every slice (no
        # airways here: the 3D chest phantom, synth.lung3d, has vessel trees and airways)
        vrng = np.random.default_rng([a.vessel_seed, int(round(z_mm)) + 100_000])
        n = int(vrng.integers(60, 140) * (size / 256) ** 2)
        pts = np.zeros((size, size), np.float32)
        ii, jj = vrng.integers(0, size, n), vrng.integers(0, size, n)
        pts[ii, jj] = vrng.uniform(0.5, 1.5, n) * (3.0 / pixel_mm) ** 2
        vessels = ndi.gaussian_filter(pts, sigma=max(0.6, 1.2 / pixel_mm)) * lungs
        img += np.clip(vessels, 0, 1) * (BLOOD + 200 * enh - LUNG) * lungs
        # heart / mediastinum between the lungs, aorta beside the spine
        heart = heart_ell & cavity_r & ~lungs
        img[heart] = BLOOD + 30 + 150 * enh
        masks["heart"] = heart
        ao = _ellipse(x, y, sx + 25, sy - 10, 13, 13)
        img[ao] = BLOOD + 250 * enh
        masks["aorta"] = ao
        masks["heart"] = heart & ~ao  # the aorta is painted over these: its pixels are aorta only
        masks["vertebra"] = vert & ~ao
        masks["lung"] = lungs & ~ao
        masks["right_lung"], masks["left_lung"] = (m & ~ao for m in lung_masks)  # image left = patient right
    else:
        liver = _ellipse(x, y, a.body_cx - 0.42 * a.body_ax, a.body_cy - 0.1 * a.body_ay,
                         0.42 * a.body_ax * a.liver_scale, 0.7 * a.body_ay, a.wobble) & cavity_r
        img[liver] = LIVER + 50 * enh
        spleen = _ellipse(x, y, a.body_cx + 0.55 * a.body_ax, a.body_cy + 0.2 * a.body_ay, 0.15 * a.body_ax,
                          0.3 * a.body_ay) & cavity_r & ~liver
        img[spleen] = 50 + 60 * enh
        kidneys = np.zeros_like(body)
        for side in (-1, 1):
            k = _ellipse(x, y, a.body_cx + side * 0.33 * a.body_ax, a.body_cy + 0.45 * a.body_ay, 24, 32) & cavity_r
            kidneys |= k
            img[k] = 35 + 130 * enh
            img[_ellipse(x, y, a.body_cx + side * 0.30 * a.body_ax, a.body_cy + 0.45 * a.body_ay, 9, 14) & k] = 10
        ao = _ellipse(x, y, sx + 18, sy - 30, 10, 10)
        ivc = _ellipse(x, y, sx - 22, sy - 30, 11, 9) & ~liver
        img[ao] = BLOOD + 250 * enh
        img[ivc] = BLOOD + 100 * enh
        # bowel gas pockets anteriorly
        brng = np.random.default_rng([a.vessel_seed, int(round(z_mm / 5)) + 100_000])
        gas_all = np.zeros_like(body)
        for _ in range(brng.integers(2, 8)):
            gx, gy = a.body_cx + brng.uniform(-0.4, 0.5) * a.body_ax, a.body_cy - brng.uniform(0.2, 0.6) * a.body_ay
            gas = _ellipse(x, y, gx, gy, brng.uniform(5, 18), brng.uniform(4, 12)) & cavity_r & ~liver & ~spleen
            img[gas] = AIR + 100
            gas_all |= gas
        # each organ's mask leaves out what was painted over it (kidneys over liver and spleen, then
        # the vessels, then gas): a pixel is one organ's
        over = ao | ivc | gas_all
        masks.update(liver=liver & ~kidneys & ~over, spleen=spleen & ~kidneys & ~over, kidney=kidneys & ~over,
                     aorta=ao & ~gas_all, inferior_vena_cava=ivc & ~ao & ~gas_all)
    # lesions: the blob's cross-section at z_mm
    kinds: dict[str, list[str]] = {}
    for b in a.blobs:
        dz = z_mm - b.center_mm[2]
        if abs(dz) >= b.radius_mm:
            continue
        r = np.sqrt(b.radius_mm ** 2 - dz ** 2)
        if r < 0.6 * pixel_mm:
            continue
        m = _ellipse(x, y, b.center_mm[0], b.center_mm[1], r, r, b.lobes)
        host = {"lung_nodule": masks.get("lung"), "lung_tumor": masks.get("lung"), "liver_lesion": masks.get("liver"),
                "kidney_lesion": masks.get("kidney")}.get(b.target)
        if host is not None:
            m &= ndi.binary_dilation(host, iterations=2) if b.target.startswith("lung") else host
        if not m.any():
            continue
        soft = ndi.gaussian_filter(m.astype(np.float32), 0.7)
        img = img * (1 - soft) + soft * b.hu
        if b.core_hu is not None:
            core = _ellipse(x, y, b.center_mm[0], b.center_mm[1], 0.5 * r, 0.5 * r) & m
            img[core] = b.core_hu
        masks[b.target] = masks.get(b.target, np.zeros_like(m)) | m
        kinds.setdefault(b.target, []).append(b.kind)
    if a.region == "chest" and "lung_tumor" in masks:
        masks["lung_tumor"] &= ~masks.get("lung_nodule", np.zeros_like(body))
    # table under the patient
    table_y = a.body_cy + a.body_ay + 12
    img[(np.abs(y - table_y) < 2.5) & (np.abs(x) < 0.9 * size * pixel_mm / 2)] = 200
    img = _scanner(img, rng, pixel_mm, scanner)
    return SyntheticSlice(img.astype(np.float32), masks, pixel_mm, "CT", kinds)


def _scanner(img: np.ndarray, rng: np.random.Generator, pixel_mm: float, scanner: dict | None) -> np.ndarray:
    s = scanner or random_scanner(rng)
    img = ndi.gaussian_filter(img, s["blur_px"])
    noise = rng.normal(0, 1, img.shape).astype(np.float32)
    noise = ndi.gaussian_filter(noise, s["noise_corr_px"])
    noise *= s["noise_hu"] / max(noise.std(), 1e-6)
    return img + noise + s["offset_hu"]


def _check_square(shape_zyx, spacing_mm) -> None:
    """The slice renderers draw square slices with square pixels (one size, one pixel_mm)."""
    if len(shape_zyx) != 3 or shape_zyx[1] != shape_zyx[2] or len(spacing_mm) != 3 or spacing_mm[0] != spacing_mm[1]:
        raise ValueError(f"square slices with square pixels are rendered: shape_zyx {tuple(shape_zyx)} needs y == x "
                         f"and spacing_mm {tuple(spacing_mm)} (x, y, z) needs x == y")


def random_scanner(rng: np.random.Generator) -> dict:
    return {"blur_px": rng.uniform(0.3, 1.3), "noise_hu": rng.uniform(5, 40), "noise_corr_px": rng.uniform(0.4, 1.0),
            "offset_hu": rng.normal(0, 10)}


def ct_slice(rng: np.random.Generator, size: int = 256, region: str | None = None) -> SyntheticSlice:
    """One random chest or abdomen slice with lesions: 20 % are drawn without any, and a lesion
    placed where its organ's cross-section is not vanishes, so about 27 % end up lesion-free
    (measured over 300 seeds)."""
    a = add_random_lesions(rng, random_anatomy(rng, region))
    pixel_mm = rng.uniform(1.0, 2.0) * 256 / size  # field of view 256-512 mm
    return render(a, rng, size, pixel_mm, z_frac=rng.uniform(-0.6, 0.6))


def ct_volume(seed: int, shape_zyx=(40, 256, 256), spacing_mm=(0.7, 0.7, 2.5), region: str = "chest",
              n_nodules=(3, 6)) -> SyntheticVolume:
    """A volume with continuous anatomy and 3D lesions; image int16 HU, masks uint8.
    spacing_mm is (x, y, z); the slices are square with square pixels."""
    _check_square(shape_zyx, spacing_mm)
    rng = np.random.default_rng(seed)
    z, size = shape_zyx[0], shape_zyx[1]
    a = random_anatomy(rng, region)
    extent = 0.4 * z * spacing_mm[2]
    lo, hi = n_nodules
    for _ in range(int(rng.integers(lo, hi + 1))):
        sub = random_anatomy(rng, region)
        sub.__dict__.update({k: getattr(a, k) for k in ("body_ax", "body_ay", "body_cx", "body_cy", "lung_scale", "liver_scale")})
        add_random_lesions(rng, sub, lesion_free_prob=0.0, z_extent_mm=extent)
        a.blobs.extend(sub.blobs[:1])
    scanner = random_scanner(rng)
    image = np.zeros((z, size, shape_zyx[2]), np.int16)
    masks: dict[str, np.ndarray] = {}
    for k in range(z):
        z_mm = (k - (z - 1) / 2) * spacing_mm[2]
        sl = render(a, rng, size, spacing_mm[0], z_mm=z_mm, z_frac=z_mm / (0.6 * z * spacing_mm[2] + 1e-6), scanner=scanner)
        image[k] = np.clip(np.round(sl.image), -1024, 3071)
        for key, m in sl.masks.items():
            masks.setdefault(key, np.zeros((z, size, shape_zyx[2]), np.uint8))[k] = m
    return SyntheticVolume(image, masks, tuple(spacing_mm), "CT")
