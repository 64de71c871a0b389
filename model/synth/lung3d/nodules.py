"""3D lobulated nodules of five kinds (solid, part solid, ground glass, juxta-vascular,
juxta-pleural), placed in the lungs with partial-volume occupancy and optional spicules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import Grid


NODULE_KINDS = ("solid", "part_solid", "ground_glass", "juxta_vascular", "juxta_pleural")


@dataclass
class Nodule:
    """One lesion, in world mm relative to the volume centre."""

    center_mm: tuple  # (x, y, z)
    diameter_mm: float
    kind: str  # solid | part_solid | ground_glass | juxta_vascular | juxta_pleural
    label: int  # its value in ChestPhantom.nodule_labels


def nodule_occ(rng, grid: Grid, c, R, box, spicules: int):
    """Lobulated, bumpy sphere (plus optional spicules) in a box; occupancy averaged over slices."""
    z0, z1, y0, y1, x0, x1 = box
    dx = (grid.X[x0:x1] - c[0])[None, None, None, :]
    dy = (grid.Y[y0:y1] - c[1])[None, None, :, None]
    dz = (grid.Zsub[z0:z1] - c[2])[:, :, None, None]
    h = grid.h
    comps = [(np.zeros(3), R * 0.97)]
    for _ in range(int(rng.integers(1, 5))):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        comps.append((v * R * rng.uniform(0.3, 0.55), R * rng.uniform(0.4, 0.65)))
    bumps = []
    for _ in range(3):
        v = rng.normal(size=3)
        bumps.append((v / np.linalg.norm(v), rng.uniform(0, 0.1), rng.integers(2, 5), rng.uniform(0, 2 * np.pi)))
    occ = None
    for off, r in comps:
        ex, ey, ez = dx - off[0], dy - off[1], dz - off[2]
        d = np.sqrt(ex * ex + ey * ey + ez * ez) + 1e-6
        mod = 1.0
        for v, amp, m, ph in bumps:
            mod = mod + amp * np.cos(m * np.pi * (ex * v[0] + ey * v[1] + ez * v[2]) / d + ph)
        o = np.clip((r * mod - d) / h + 0.5, 0, 1)
        occ = o if occ is None else np.maximum(occ, o)
    for _ in range(spicules):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        L = R * rng.uniform(1.3, 1.9)
        t = np.clip(dx * v[0] + dy * v[1] + dz * v[2], 0, L)
        d = np.sqrt((dx - t * v[0]) ** 2 + (dy - t * v[1]) ** 2 + (dz - t * v[2]) ** 2)
        rs = rng.uniform(0.35, 0.7) * (1 - t / L)
        o = np.clip((np.maximum(rs, 0.5 * h) - d) / h + 0.5, 0, 1) * np.minimum(1, (rs / (0.5 * h)) ** 2)
        occ = np.maximum(occ, o)
    return occ.mean(axis=1)


def _diameters(rng, n, lo, hi):
    u = rng.random(n)
    return lo * (hi / lo) ** (u ** 1.6)  # many small ones: P(d < 10 mm) ~ 2/3 for (3, 30)


def place_nodules(rng, a, grid, lung_region, vessel_segs, n, dlo, dhi):
    """Centres (anatomical mm), radii and kinds of n nodules inside the lungs of this volume."""
    nz, ny, nx = lung_region.shape
    flat = np.flatnonzero(lung_region)
    if len(flat) == 0 or n == 0:
        return []
    zhalf = (grid.Z[-1] - grid.Z[0]) / 2 + grid.spacing[2] / 2
    zmid = (grid.Z[-1] + grid.Z[0]) / 2
    dirs = rng.normal(size=(26, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    sx, sy, sz = grid.spacing

    def to_idx(P):
        i = np.round((P[:, 0] - grid.X[0]) / sx).astype(int)
        j = np.round((P[:, 1] - grid.Y[0]) / sy).astype(int)
        k = np.round((P[:, 2] - grid.Z[0]) / sz).astype(int)
        ok = (i >= 0) & (i < nx) & (j >= 0) & (j < ny) & (k >= 0) & (k < nz)
        return k, j, i, ok

    def frac_in_lung(c, r):
        P = c[None, :] + r * dirs
        k, j, i, ok = to_idx(P)
        ins = np.zeros(len(P), bool)
        ins[ok] = lung_region[k[ok], j[ok], i[ok]]
        return ins.mean(), ok.all()

    # vessels usable for juxta-vascular nodules: 1-4 mm radius, midpoint in the volume's lung
    cand = []
    for s in vessel_segs:
        if 1.0 <= s[2] <= 4.0:
            m = (np.asarray(s[0]) + np.asarray(s[1])) / 2
            k, j, i, ok = to_idx(m[None])
            if ok[0] and lung_region[k[0], j[0], i[0]]:
                cand.append(s)
    placed = []
    kinds_p = np.array([0.36, 0.14, 0.14, 0.18, 0.18])
    for dia in _diameters(rng, n, dlo, dhi):
        dia = float(min(dia, max(dlo, 1.6 * zhalf)))
        R = dia / 2
        kind = str(rng.choice(NODULE_KINDS, p=kinds_p))
        for _attempt in range(60):
            if kind == "juxta_vascular" and cand:
                s = cand[rng.integers(len(cand))]
                p0, p1 = np.asarray(s[0]), np.asarray(s[1])
                v = (p1 - p0) / (np.linalg.norm(p1 - p0) + 1e-9)
                w = np.cross(v, rng.normal(size=3))
                w /= np.linalg.norm(w) + 1e-9
                c = p0 + rng.uniform(0.2, 0.8) * (p1 - p0) + w * (s[2] + 0.75 * R)
                need = 0.85
            else:
                f = flat[rng.integers(len(flat))]
                k, rem = divmod(f, ny * nx)
                j, i = divmod(rem, nx)
                c = np.array([grid.X[i], grid.Y[j], grid.Z[k]], float) + rng.uniform(-0.5, 0.5, 3) * grid.spacing
                need = 0.95
                if kind == "juxta_pleural":
                    # walk outward until the sphere touches the chest wall
                    out = np.array([c[0], c[1] - a.cyc, 0.0])
                    out /= np.linalg.norm(out) + 1e-9
                    for _ in range(250):
                        fr, _ok = frac_in_lung(c + out * 1.0, R)
                        if fr < 0.8:
                            break
                        c = c + out * 1.0
                    if frac_in_lung(c, R + max(1.5, grid.h))[0] > 0.9:
                        continue
                    need = 0.55
            if abs(c[2] - zmid) > zhalf - R * 0.9:
                continue
            fr, inside_vol = frac_in_lung(c, R)
            if not inside_vol or fr < need:
                continue
            fr0, _ = frac_in_lung(c, 0.3 * R)
            k, j, i, ok = to_idx(c[None])
            if not (ok[0] and lung_region[k[0], j[0], i[0]]) or fr0 < 0.9:
                continue
            if any(np.linalg.norm(c - q) < 1.25 * (R + rq) + 2 for q, rq, _ in placed):
                continue
            placed.append((c, R, kind))
            break
    return placed
