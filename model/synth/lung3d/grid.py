"""The voxel grid of a phantom volume and rendering into it: capsule segments (vessels, airways,
aorta) drawn into local bounding boxes with partial-volume occupancy averaged over the slice
thickness, and smooth random fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy


@dataclass
class Grid:
    X: np.ndarray  # (nx,) anatomical X of each column
    Y: np.ndarray
    Z: np.ndarray  # (nz,) anatomical Z of each slice
    Zsub: np.ndarray  # (nz, nsub) sample positions over each slice's thickness
    h: float  # in-plane pixel size
    spacing: tuple

    @property
    def shape(self):
        return len(self.Z), len(self.Y), len(self.X)


def make_grid(shape, spacing, a: Anatomy, zc: float) -> Grid:
    nz, ny, nx = shape
    sx, sy, sz = spacing
    X = (np.arange(nx) - (nx - 1) / 2) * sx - a.bx
    Y = (np.arange(ny) - (ny - 1) / 2) * sy - a.by
    Z = (np.arange(nz) - (nz - 1) / 2) * sz + zc
    nsub = int(max(1, round(sz / max(1.2, 0.9 * min(sx, sy)))))
    Zsub = Z[:, None] + ((np.arange(nsub) + 0.5) / nsub - 0.5) * sz
    return Grid(X.astype(np.float32), Y.astype(np.float32), Z.astype(np.float32), Zsub.astype(np.float32),
                 float(min(sx, sy)), tuple(spacing))


def seg_boxes(grid: Grid, segs, pad):
    """Index boxes [lo, hi) per segment, or None when it misses the volume."""
    if not segs:
        return []
    P0 = np.array([s[0] for s in segs], float)
    P1 = np.array([s[1] for s in segs], float)
    R = np.maximum(np.array([s[2] for s in segs]), np.array([s[3] for s in segs])) + pad
    lo = np.minimum(P0, P1) - R[:, None]
    hi = np.maximum(P0, P1) + R[:, None]
    sx, sy, sz = grid.spacing
    out = []
    for k, (ax, s, half) in enumerate(((grid.X, sx, 0), (grid.Y, sy, 0), (grid.Z, sz, sz / 2))):
        i0 = np.ceil((lo[:, k] - half - ax[0]) / s).astype(int)
        i1 = np.floor((hi[:, k] + half - ax[0]) / s).astype(int) + 1
        out.append((np.clip(i0, 0, len(ax)), np.clip(i1, 0, len(ax))))
    boxes = []
    for j in range(len(segs)):
        (x0, x1), (y0, y1), (z0, z1) = [(o[0][j], o[1][j]) for o in out]
        boxes.append(None if (x1 <= x0 or y1 <= y0 or z1 <= z0) else (z0, z1, y0, y1, x0, x1))
    return boxes


def _occupancy(d, r, h):
    """Partial-volume occupancy at distance d from the axis of a tube of radius r (pixel size h).
    Thin tubes keep their cross-sectional integral: a radius below half a pixel is drawn at half a
    pixel with a proportionally lower peak."""
    half = 0.5 * h
    re = np.maximum(r, half)
    return np.clip((re - d) * (1.0 / h) + 0.5, 0.0, 1.0) * np.minimum(1.0, (r / re) ** 2)


def render_tubes(vol: np.ndarray, grid: Grid, segs, grow: float = 0.0, min_r: float = 0.0):
    """Max-composite the partial-volume occupancy of tapered capsules into vol (float32, z y x),
    averaged over each slice's thickness. Small boxes are rendered in vectorised batches."""
    if not segs:
        return vol
    h = grid.h
    P0 = np.array([s[0] for s in segs], np.float32)
    V = np.array([s[1] for s in segs], np.float32) - P0
    R0 = np.maximum(np.array([s[2] for s in segs], np.float32) + grow, min_r)
    R1 = np.maximum(np.array([s[3] for s in segs], np.float32) + grow, min_r)
    boxes = seg_boxes(grid, [(P0[i], P0[i] + V[i], R0[i], R1[i]) for i in range(len(segs))], h)
    keep = np.array([b is not None for b in boxes])
    if not keep.any():
        return vol
    B = np.array([b for b in boxes if b is not None])
    P0, V, R0, R1 = P0[keep], V[keep], R0[keep], R1[keep]
    dims = B[:, 1::2] - B[:, 0::2]  # (bz, by, bx)
    small = (dims[:, 0] <= 10) & (dims[:, 1] <= 20) & (dims[:, 2] <= 20)
    for i in np.flatnonzero(~small):
        z0, z1, y0, y1, x0, x1 = B[i]
        p0, v = P0[i], V[i]
        L2 = float(v @ v) + 1e-6
        dx = (grid.X[x0:x1] - p0[0])[None, None, None, :]
        dy = (grid.Y[y0:y1] - p0[1])[None, None, :, None]
        dz = (grid.Zsub[z0:z1] - p0[2])[:, :, None, None]
        t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) * (1.0 / L2), 0.0, 1.0)
        ex, ey, ez = dx - t * v[0], dy - t * v[1], dz - t * v[2]
        d = np.sqrt(ex * ex + ey * ey + ez * ez)
        occ = _occupancy(d, R0[i] + t * (R1[i] - R0[i]), h).mean(axis=1)
        sub = vol[z0:z1, y0:y1, x0:x1]
        np.maximum(sub, occ, out=sub)
    idx = np.flatnonzero(small)
    if len(idx):
        _render_batch(vol, grid, B[idx], P0[idx], V[idx], R0[idx], R1[idx])
    return vol


def _render_batch(vol, grid, B, P0, V, R0, R1, chunk=192):
    nz, ny, nx = vol.shape
    flat = vol.reshape(-1)
    h = grid.h
    dz, dyx = B[:, 1] - B[:, 0], np.maximum(B[:, 3] - B[:, 2], B[:, 5] - B[:, 4])
    order = np.lexsort((dyx, dz))  # similar boxes share a chunk: little padding
    for c0 in range(0, len(order), chunk):
        sel = order[c0:c0 + chunk]
        b = B[sel]
        bz, by, bx = (int((b[:, 2 * k + 1] - b[:, 2 * k]).max()) for k in range(3))
        kz = b[:, 0, None] + np.arange(bz)
        ky = b[:, 2, None] + np.arange(by)
        kx = b[:, 4, None] + np.arange(bx)
        vz, vy, vx = kz < b[:, 1, None], ky < b[:, 3, None], kx < b[:, 5, None]
        kz, ky, kx = np.minimum(kz, nz - 1), np.minimum(ky, ny - 1), np.minimum(kx, nx - 1)
        p0, v = P0[sel], V[sel]
        L2 = (v * v).sum(1) + 1e-6
        dx = (grid.X[kx] - p0[:, 0, None])[:, None, None, None, :]
        dy = (grid.Y[ky] - p0[:, 1, None])[:, None, None, :, None]
        dz = (grid.Zsub[kz] - p0[:, 2, None, None])[:, :, :, None, None]
        vx_, vy_, vz_ = (v[:, k, None, None, None, None] for k in range(3))
        t = np.clip((dx * vx_ + dy * vy_ + dz * vz_) / L2[:, None, None, None, None], 0.0, 1.0)
        ex, ey, ez = dx - t * vx_, dy - t * vy_, dz - t * vz_
        d = np.sqrt(ex * ex + ey * ey + ez * ez)
        r = R0[sel, None, None, None, None] + t * (R1 - R0)[sel, None, None, None, None]
        occ = _occupancy(d, r, h).mean(axis=2)  # (n, bz, by, bx)
        occ *= vz[:, :, None, None] & vy[:, None, :, None] & vx[:, None, None, :]
        lin = (kz[:, :, None, None] * ny + ky[:, None, :, None]) * nx + kx[:, None, None, :]
        m = occ > 0
        np.maximum.at(flat, lin[m], occ[m])


def blend(img: np.ndarray, idx: np.ndarray, occ: np.ndarray, value):
    """img.flat[idx] <- img * (1 - occ) + occ * value (in place; img must be contiguous)."""
    f = img.reshape(-1)
    f[idx] = f[idx] * (1 - occ) + occ * value


def composite_tubes(img, scratch, grid, segs, value):
    scratch[:] = 0
    render_tubes(scratch, grid, segs)
    idx = np.flatnonzero(scratch)
    o = scratch.ravel()[idx]
    blend(img, idx, o, value)
    return idx, o


def fine_field(rng, shape, spacing, scale_mm=1.2):
    """Unit-std random texture correlated over about scale_mm, made at half resolution in-plane."""
    nz, ny, nx = shape
    sx, sy, sz = spacing
    small = rng.standard_normal((nz, (ny + 1) // 2, (nx + 1) // 2), dtype=np.float32)
    small = ndi.gaussian_filter(small, (scale_mm / sz, scale_mm / (2 * sy), scale_mm / (2 * sx)), truncate=2.5)
    small /= small.std() + 1e-6
    out = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)[:, :ny, :nx]
    return out


def smooth_field(rng, grid: Grid, scale_mm: float, dtype=np.float32):
    """Zero-mean, unit-std smooth random field: a sum of Gaussian bumps on a coarse lattice,
    evaluated separably (three small matrix products)."""
    mats = []
    for ax in (grid.Z, grid.Y, grid.X):
        lo, hi = float(ax.min()) - 2 * scale_mm, float(ax.max()) + 2 * scale_mm
        c = np.arange(lo, hi + scale_mm, scale_mm)
        m = np.exp(-0.5 * ((ax[:, None] - c[None, :]) / (0.8 * scale_mm)) ** 2).astype(dtype)
        mats.append(m)
    coarse = rng.standard_normal((mats[0].shape[1], mats[1].shape[1], mats[2].shape[1])).astype(dtype)
    f = np.tensordot(coarse, mats[2], axes=([2], [1]))  # (cz, cy, nx)
    f = np.einsum("zyx,Yy->zYx", f, mats[1], optimize=True)  # (cz, ny, nx)
    f = np.tensordot(mats[0], f, axes=([1], [0]))  # (nz, ny, nx)
    f -= f.mean()
    f /= f.std() + 1e-6
    return f.astype(dtype, copy=False)
