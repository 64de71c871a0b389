"""`chest_phantom`: one whole phantom chest CT (the anatomy, its trees, organs, nodules and scanner
effects in that order), with its masks and nodule list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ..ct import AIR
from .anatomy import mediastinal_tubes, random_anatomy, sstep
from .grid import blend, composite_tubes, fine_field, make_grid, render_tubes, seg_boxes, smooth_field
from .nodules import Nodule, nodule_occ, place_nodules
from .organs import render_slice
from .scanner import scanner_effects
from .trees import build_trees


MASK_KEYS = ("lung_nodule", "lung", "left_lung", "right_lung", "heart", "aorta", "vertebra", "vessels", "airways")


@dataclass
class ChestPhantom:
    image: np.ndarray  # int16 HU (z, y, x)
    masks: dict  # uint8 (z, y, x): see MASK_KEYS
    nodule_labels: np.ndarray  # uint16 (z, y, x): 0 background, Nodule.label inside each nodule
    nodules: list
    spacing_mm: tuple  # (x, y, z)
    info: dict = field(default_factory=dict)  # contrast phase, scanner settings, anatomy landmarks


MIN_NODULE_DIAMETER_MM = 1.0  # smaller is below any CT's resolution (and of no clinical meaning)


def _check_arguments(seed, shape_zyx, spacing_mm, n_nodules, nodule_diameter_mm) -> None:
    """One clear message instead of numpy's or scipy's from deep inside the renderer."""
    problems = []
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if len(shape_zyx) != 3 or any(int(v) < 1 for v in shape_zyx):
        problems.append(f"shape_zyx must be 3 sizes of at least 1 voxel, got {tuple(shape_zyx)}")
    if len(spacing_mm) != 3 or not all(np.isfinite(float(v)) and float(v) > 0 for v in spacing_mm):
        problems.append(f"spacing_mm must be 3 positive finite sizes (x, y, z), got {tuple(spacing_mm)}")
    counts = (n_nodules, n_nodules) if np.isscalar(n_nodules) else tuple(n_nodules)
    if len(counts) != 2 or any(int(c) != c or c < 0 for c in counts) or counts[0] > counts[1]:
        problems.append(f"n_nodules must be a count or an inclusive (min, max) range of counts, got {n_nodules!r}")
    sizes = tuple(nodule_diameter_mm)
    if (len(sizes) != 2 or not all(np.isfinite(float(v)) for v in sizes) or sizes[0] > sizes[1]
            or sizes[0] < MIN_NODULE_DIAMETER_MM):
        problems.append(f"nodule_diameter_mm must be a (min, max) range from {MIN_NODULE_DIAMETER_MM:g} mm, got "
                        f"{nodule_diameter_mm!r}")
    if problems:
        raise ValueError("; ".join(problems))


def chest_phantom(seed: int, shape_zyx=(64, 256, 256), spacing_mm=(1.4, 1.4, 2.5), n_nodules=(0, 4),
                  nodule_diameter_mm=(3.0, 30.0)) -> ChestPhantom:
    """A chest CT volume (int16 HU, z y x, LPS) with continuous vessels and airways and 3D nodules.

    Deterministic in its arguments. n_nodules is an inclusive (min, max) range (or one number);
    fewer are placed when the lungs in view have no room. Diameters are drawn from
    nodule_diameter_mm with small ones most common (shortened to fit thin volumes).
    Raises ValueError for arguments outside these ranges."""
    _check_arguments(seed, shape_zyx, spacing_mm, n_nodules, nodule_diameter_mm)
    rng = np.random.default_rng(seed)
    a = random_anatomy(rng)
    nz, ny, nx = (int(s) for s in shape_zyx)
    sx, sy, sz = (float(s) for s in spacing_mm)
    zext = nz * sz
    lo, hi = -50 + 0.4 * zext, a.z_apex - 20 - 0.4 * zext
    zc = float(rng.uniform(lo, hi)) if hi > lo else float((a.z_apex - 40) / 2)
    grid = make_grid((nz, ny, nx), (sx, sy, sz), a, zc)
    info = {"contrast": a.contrast, "body_center_mm": (round(a.bx, 1), round(a.by, 1)),
            # world z (mm from the volume centre, + superior) of anatomical landmarks, in or out of the volume
            "landmarks_z_mm": {k: round(float(v) - zc, 1) for k, v in (
                ("right_dome", a.z_dome_r), ("left_dome", a.z_dome_l), ("heart_centre", a.heart_c[2]),
                ("carina", a.z_car), ("lung_apex", a.z_apex))}}
    arteries, veins, airway_groups = build_trees(a, rng, detail=1.0)
    trng = np.random.default_rng([seed, 1])  # texture and noise draws do not shift the anatomy
    hu = a.hu

    # 1. large anatomy, slice by slice
    img = np.empty((nz, ny, nx), np.float32)
    lung_region = np.zeros((nz, ny, nx), bool)
    heart = np.zeros((nz, ny, nx), bool)
    vert = np.zeros((nz, ny, nx), bool)
    Xr, Yc = grid.X[None, :], grid.Y[:, None]
    for k in range(nz):
        sl, m = render_slice(a, Xr, Yc, float(grid.Z[k]), sz, grid.h)
        img[k] = sl
        lung_region[k] = m["lung_region"]
        heart[k] = m["heart"]
        vert[k] = m["vertebra"]

    # 2. lung parenchyma: gravity gradient, smooth density variation, optional emphysema, ground glass
    li = np.flatnonzero(lung_region)
    kz, rem = np.divmod(li, ny * nx)
    jy, ix = np.divmod(rem, nx)
    yl = grid.Y[jy]
    yfrac = np.clip((yl - (a.cyc - a.ayc)) / (2 * a.ayc), 0, 1)
    paren = hu["lung"] + trng.uniform(15, 70) * yfrac ** 2
    paren += smooth_field(trng, grid, trng.uniform(18, 30)).ravel()[li] * trng.uniform(8, 20)
    # fine mottling from unresolved small vessels and lobules: faint, sparse specks ~1-2 mm
    fine = fine_field(trng, (nz, ny, nx), (sx, sy, sz)).ravel()[li]
    paren += trng.uniform(3, 8) * fine + trng.uniform(20, 50) * np.maximum(fine - 1.6, 0)
    if trng.random() < 0.25:  # centrilobular / paraseptal emphysema, upper zones
        f = smooth_field(trng, grid, trng.uniform(3.0, 5.0)).ravel()[li]
        upper = sstep(a.z_car - 60, a.z_apex - 20, grid.Z[kz])
        e = np.clip((f - trng.uniform(1.3, 2.1) + 0.9 * upper) * 2.0, 0, 1)
        paren = paren * (1 - e) + e * trng.uniform(-990, -950)
        info["emphysema"] = True
    if trng.random() < 0.2:  # patchy ground glass
        f = smooth_field(trng, grid, trng.uniform(12, 22)).ravel()[li]
        g = np.clip((f - trng.uniform(1.0, 1.8)) * 1.5, 0, 1)
        paren = paren * (1 - g) + g * trng.uniform(-700, -550)
        info["ground_glass_regions"] = True
    if trng.random() < 0.6:  # fissures: oblique on both sides, horizontal (minor) on the right
        zl, xl = grid.Z[kz], grid.X[ix]
        side_l = np.where(xl > a.xm, 1.0, -1.0)
        fis = np.zeros(len(li), np.float32)
        for side in (-1, 1):
            slope = trng.uniform(1.1, 1.6)  # rises toward the back
            lat = trng.uniform(0.4, 0.8)  # laterally the fissure lies further forward
            zf = a.z_car - trng.uniform(25, 45)
            curv = trng.uniform(-1, 1) / 400
            ax_ = np.abs(xl) - 0.5 * a.axc
            dist = (zl - zf - slope * (yl - a.cyc + lat * ax_) - curv * ax_ ** 2) / np.sqrt(1 + slope ** 2 * (1 + lat ** 2))
            nzc = 1 / np.sqrt(1 + slope ** 2 * (1 + lat ** 2))
            sig = np.sqrt(0.3 ** 2 + (sz * nzc) ** 2 / 12 + (grid.h * slope * nzc) ** 2 / 12)
            sheet = (0.1 / sig) * np.exp(-0.5 * (dist / sig) ** 2) * (side_l == side)
            fis = np.maximum(fis, sheet)
            if side < 0:  # minor fissure: a gently domed sheet in front of the oblique one
                zm = a.z_car - trng.uniform(20, 35)
                d2 = zl - zm - 0.004 * ((xl + 0.5 * a.axc) ** 2 + (yl - a.cyc) ** 2) * trng.uniform(0.5, 1.5)
                sig2 = np.sqrt(0.3 ** 2 + sz ** 2 / 12 + (grid.h * 0.4) ** 2)
                fis = np.maximum(fis, (0.1 / sig2) * np.exp(-0.5 * (d2 / sig2) ** 2) * (side_l < 0) * (dist > 0))
        fis = np.clip(fis, 0, 0.6)
        paren = paren * (1 - fis) + fis * 0.0
        info["fissures"] = True
    img.ravel()[li] = paren

    # 3. mediastinal vessels and tubes (with a fat sheath where they border the lung)
    occ = np.zeros((nz, ny, nx), np.float32)
    render_tubes(occ, grid, mediastinal_tubes(a), grow=2.0)
    med_idx = np.flatnonzero(occ)
    sheath = occ.ravel()[med_idx] * lung_region.ravel()[med_idx]
    blend(img, med_idx, sheath, hu["fat"])
    lung_region.ravel()[med_idx[occ.ravel()[med_idx] >= 0.5]] = False
    for name, v in (("arch_branches", hu["aorta"]), ("svc", hu["svc"]), ("ivc", hu["svc"] * 0.5 + 40),
                    ("oesophagus", 35.0), ("pa_trunk", hu["pa"])):
        composite_tubes(img, occ, grid, a.tubes[name], v)
    aorta_idx, aorta_occ = composite_tubes(img, occ, grid, a.tubes["aorta"], hu["aorta"])

    # 4. pulmonary vessels (arteries and veins, continuous from the hilum to the periphery)
    vessels = np.zeros((nz, ny, nx), np.float32)
    render_tubes(vessels, grid, veins)
    vi = np.flatnonzero(vessels)
    blend(img, vi, vessels.ravel()[vi], hu["pv"])
    occ[:] = 0
    render_tubes(occ, grid, arteries)
    ai = np.flatnonzero(occ)
    blend(img, ai, occ.ravel()[ai], hu["pa"])
    np.maximum(vessels, occ, out=vessels)

    # 5. airways: soft-tissue wall, air lumen
    airway = np.zeros((nz, ny, nx), np.float32)
    occ[:] = 0
    for _name, segs in airway_groups:
        render_tubes(airway, grid, segs)
        inner = [(p0, p1, r0 - (0.45 + 0.1 * r0), r1 - (0.45 + 0.1 * r1)) for p0, p1, r0, r1 in segs]
        render_tubes(occ, grid, [s for s in inner if s[2] > 0.3])
    wi = np.flatnonzero(airway)
    blend(img, wi, airway.ravel()[wi], trng.uniform(0, 60))
    blend(img, wi, occ.ravel()[wi], AIR + 10)

    # 6. nodules
    lo_n, hi_n = (n_nodules, n_nodules) if np.isscalar(n_nodules) else n_nodules
    n_nod = int(rng.integers(lo_n, hi_n + 1))
    placed = place_nodules(rng, a, grid, lung_region, arteries + veins, n_nod, *nodule_diameter_mm)
    labels = np.zeros((nz, ny, nx), np.uint16)
    nodules = []
    for lab, (c, R, kind) in enumerate(placed, start=1):
        boxes = seg_boxes(grid, [(c, c, R * 2.0, R * 2.0)], grid.h)
        box = boxes[0]
        z0, z1, y0, y1, x0, x1 = box
        spic = int(rng.integers(3, 9)) if kind == "solid" and R > 4 and rng.random() < 0.35 else 0
        occ = nodule_occ(rng, grid, c, R, box, spic)
        lr = lung_region[z0:z1, y0:y1, x0:x1]
        occ = occ * lr
        sub = img[z0:z1, y0:y1, x0:x1]
        if kind in ("solid", "juxta_vascular", "juxta_pleural"):
            v = rng.uniform(0, 60) + 12 * rng.standard_normal(occ.shape).astype(np.float32)
            sub[:] = sub * (1 - occ) + occ * np.maximum(sub, v) if kind == "juxta_vascular" else sub * (1 - occ) + occ * v
        else:
            gg = rng.uniform(-650, -350)
            tx = ndi.gaussian_filter(rng.standard_normal(occ.shape).astype(np.float32), 1.0)
            tx *= 60 / (tx.std() + 1e-6)
            sub[:] = sub * (1 - occ) + occ * np.maximum(sub, gg + tx)
            if kind == "part_solid":
                off = rng.normal(size=3)
                off = off / np.linalg.norm(off) * R * rng.uniform(0, 0.3)
                core = nodule_occ(rng, grid, c + off, R * rng.uniform(0.3, 0.6), box, 0) * lr
                core = np.minimum(core, occ)
                sub[:] = sub * (1 - core) + core * rng.uniform(0, 50)
        m = occ >= 0.5
        if kind == "juxta_vascular":
            m &= vessels[z0:z1, y0:y1, x0:x1] < 0.5
        if not m.any():  # tiny nodule at a coarse grid: keep the voxel at its centre
            k = int(np.clip(np.round((c[2] - grid.Z[0]) / sz), 0, nz - 1)) - z0
            j = int(np.clip(np.round((c[1] - grid.Y[0]) / sy), 0, ny - 1)) - y0
            i = int(np.clip(np.round((c[0] - grid.X[0]) / sx), 0, nx - 1)) - x0
            m[k, j, i] = True
        lb = labels[z0:z1, y0:y1, x0:x1]
        lb[m & (lb == 0)] = lab
        world = (float(c[0] + a.bx), float(c[1] + a.by), float(c[2] - zc))
        nodules.append(Nodule(tuple(round(v, 2) for v in world), round(2 * R, 2), kind, lab))

    # 7. scanner
    img = scanner_effects(img, trng, grid, a, info, lung_region)
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)

    nod = labels > 0
    lung = lung_region | nod
    aorta = np.zeros((nz, ny, nx), bool)
    aorta.ravel()[aorta_idx[aorta_occ >= 0.5]] = True
    Xg = grid.X[None, None, :]
    masks = {
        "lung_nodule": nod,
        "lung": lung,
        "left_lung": lung & (Xg > a.xm),
        "right_lung": lung & (Xg <= a.xm),
        "heart": heart,
        "aorta": aorta,
        "vertebra": vert,
        "vessels": (vessels >= 0.5) & ~nod,
        "airways": airway >= 0.5,
    }
    masks = {k: v.astype(np.uint8) for k, v in masks.items()}
    return ChestPhantom(image, masks, labels, nodules, (sx, sy, sz), info)
