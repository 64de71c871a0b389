"""Pulmonary artery and vein trees and the bronchi beside the arteries, grown from the hilum by a
volume-filling branching rule (each branch heads for the centre of mass of the lung region it
supplies and stops 40 % of the way there; radii follow Murray's law r^3 = r1^3 + r2^3), as
capsule segments in mm.
"""

from __future__ import annotations

import numpy as np

from .anatomy import Anatomy, bezier, in_lungs, lung_points, polyline


def _sample_lung(a: Anatomy, rng, side: int, n: int, margin=0.0):
    out = []
    zlo = min(a.z_dome_r, a.z_dome_l) - 60
    while sum(len(o) for o in out) < n:
        m = 4 * n
        X = side * rng.uniform(0, a.axc, m)
        Y = rng.uniform(a.cyc - a.ayc, a.cyc + a.ayc, m)
        Z = rng.uniform(zlo, a.z_apex, m)
        ok = lung_points(a, X, Y, Z)
        if margin:
            for d in ((margin, 0, 0), (-margin, 0, 0), (0, margin, 0), (0, -margin, 0), (0, 0, margin), (0, 0, -margin)):
                ok &= in_lungs(a, X + d[0], Y + d[1], Z + d[2])
        out.append(np.stack([X[ok], Y[ok], Z[ok]], axis=1))
    return np.concatenate(out)[:n]


def _hilum_root(a: Anatomy, side: int, y: float, z: float):
    xs = side * np.arange(0, a.axc, 2.0)
    ok = lung_points(a, xs, np.full_like(xs, y), np.full_like(xs, z))
    i = int(np.argmax(ok)) if ok.any() else len(xs) // 3
    return np.array([xs[i] + side * 4.0, y, z])


def _grow_tree(a: Anatomy, root, direction, pts, r_root, r_leaf_min=0.55, max_angle=np.deg2rad(65)):
    """Volume-filling bifurcating tree after Tawhai et al. (2000), grown one generation at a time
    with all branches of a generation vectorised. Each branch heads for the centre of mass of the
    points (lung volume) it supplies and stops 40 % of the way there (a leaf, with one or two
    points, goes all the way); its points are then split by a plane through their centre of mass
    that contains the branch, across their widest spread. Radii follow Murray's law with flow
    proportional to the points supplied: r = r_root (n / N)^(1/3).

    Returns segments (p0, p1, r0, r1, generation, start node, end node) and node positions."""
    N = len(pts)
    order = np.arange(N)
    nodes = [np.asarray(root, float)[None]]
    n_nodes = 1
    segs = []
    # active branches: start node id, start point, parent direction, point range [lo, hi), generation
    ni = np.array([0])
    P = np.asarray(root, float)[None]
    D = (np.asarray(direction, float) / np.linalg.norm(direction))[None]
    lo, hi = np.array([0]), np.array([N])
    gen = 0
    cos_max, sin_max = np.cos(max_angle), np.sin(max_angle)
    ts = np.linspace(0.25, 1.0, 4)
    while len(ni):
        po = pts[order]
        cs = np.concatenate([np.zeros((1, 3)), np.cumsum(po, axis=0)])
        n = hi - lo
        C = (cs[hi] - cs[lo]) / n[:, None]
        r = np.maximum(r_root * (n / N) ** (1 / 3), r_leaf_min)
        V = C - P
        dist = np.linalg.norm(V, axis=1)
        U = V / np.maximum(dist, 1e-9)[:, None]
        cosang = (U * D).sum(1)
        bend = cosang < cos_max  # keep branching angles plausible
        if bend.any():
            W = U[bend] - cosang[bend, None] * D[bend]
            W /= np.linalg.norm(W, axis=1, keepdims=True) + 1e-9
            U[bend] = cos_max * D[bend] + sin_max * W
        leaf = n <= 2
        L = np.where(leaf, dist, np.maximum(0.4 * dist, 2.0 * r))
        E = P + U * L[:, None]
        alive = dist >= 1.0
        if gen > 0:  # stay inside the lung: shorten to the last inside sample, drop if none
            S = P[:, None, :] + ts[None, :, None] * (E - P)[:, None, :]
            ok = in_lungs(a, S[..., 0], S[..., 1], S[..., 2]) | leaf[:, None]
            first_bad = np.where(ok.all(1), len(ts), np.argmin(ok, axis=1))
            alive &= first_bad > 0
            cut = alive & (first_bad < len(ts))
            E[cut] = P[cut] + ts[first_bad[cut] - 1, None] * (E - P)[cut]
        idx = np.flatnonzero(alive)
        ei = n_nodes + np.arange(len(idx))
        n_nodes += len(idx)
        nodes.append(E[idx])
        r_end = np.where(leaf, np.maximum(0.8 * r, r_leaf_min), 0.95 * r)
        segs += [(P[i], E[i], r[i], r_end[i], gen, ni[i], e) for i, e in zip(idx, ei)]
        # split the points of the surviving non-leaf branches
        split = alive & ~leaf
        sidx = np.flatnonzero(split)
        if not len(sidx):
            break
        end_id = np.full(len(ni), -1)
        end_id[idx] = ei
        ns = n[sidx]
        owner = np.repeat(np.arange(len(sidx)), ns)
        pos = np.repeat(lo[sidx] - np.cumsum(np.concatenate([[0], ns[:-1]])), ns) + np.arange(ns.sum())
        Q = po[pos] - C[sidx][owner]
        Uo = U[sidx][owner]
        Qp = Q - (Q * Uo).sum(1, keepdims=True) * Uo
        cov = np.zeros((len(sidx), 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.bincount(owner, Qp[:, i] * Qp[:, j], len(sidx))
        ev = np.linalg.eigh(cov)[1][:, :, -1]
        right = (Qp * ev[owner]).sum(1) >= 0
        perm = np.lexsort((right, owner))
        order[pos] = order[pos][perm]
        nl = ns - np.bincount(owner, right, len(sidx)).astype(int)
        ok = (nl > 0) & (nl < ns)
        s2 = sidx[ok]
        mid = lo[s2] + nl[ok]
        ni = np.concatenate([end_id[s2], end_id[s2]])
        P = np.concatenate([E[s2], E[s2]])
        D = np.concatenate([U[s2], U[s2]])
        lo = np.concatenate([lo[s2], mid])
        hi = np.concatenate([mid, hi[s2]])
        gen += 1
    return segs, np.concatenate(nodes)


def _random_perp(rng, U):
    """Random unit vectors perpendicular to the rows of U (unit vectors)."""
    w = rng.normal(size=U.shape)
    w -= (w * U).sum(1, keepdims=True) * U
    return w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-9)


def _twigs(a: Anatomy, rng, segs):
    """Small vessels a tree of a thousand leaves lacks: side branches along the larger vessels
    (like supernumerary arteries) and a fork at the tip of every leaf."""
    if not segs:
        return []
    P0 = np.array([s[0] for s in segs])
    P1 = np.array([s[1] for s in segs])
    R = np.array([s[3] for s in segs])
    starts = {s[5] for s in segs}
    leaf = np.array([s[6] not in starts for s in segs])
    V = P1 - P0
    L = np.linalg.norm(V, axis=1) + 1e-9
    U = V / L[:, None]
    # side branches
    k = rng.poisson(L / 6.0) * ((R >= 0.8) & (L > 5))
    j = np.repeat(np.arange(len(segs)), k)
    base = P0[j] + rng.uniform(0.15, 0.9, len(j))[:, None] * V[j]
    th = np.deg2rad(rng.uniform(45, 85, len(j)))[:, None]
    d1 = np.cos(th) * U[j] + np.sin(th) * _random_perp(rng, U[j])
    l1 = rng.uniform(5, 14, len(j))
    r1 = np.minimum(rng.uniform(0.45, 0.8, len(j)), 0.45 * R[j])
    # forks at leaf tips
    jl = np.repeat(np.flatnonzero(leaf), 3)
    th = np.deg2rad(rng.uniform(15, 50, len(jl)))[:, None]
    d2 = np.cos(th) * U[jl] + np.sin(th) * _random_perp(rng, U[jl])
    l2 = rng.uniform(4, 12, len(jl))
    r2 = np.maximum(0.85 * R[jl], 0.45)
    B = np.concatenate([base, P1[jl]])
    D = np.concatenate([d1, d2])
    Ln = np.concatenate([l1, l2])
    Rt = np.maximum(np.concatenate([r1, r2]), 0.4)
    E = B + D * Ln[:, None]
    M = B + D * (0.5 * Ln)[:, None]
    ok = lung_points(a, E[:, 0], E[:, 1], E[:, 2]) & in_lungs(a, M[:, 0], M[:, 1], M[:, 2])
    return [(B[i], E[i], Rt[i], Rt[i] * 0.8) for i in np.flatnonzero(ok)]


def build_trees(a: Anatomy, rng, detail: float = 1.0):
    """Pulmonary arteries, veins and bronchi for both lungs; lists of (p0, p1, r0, r1)."""
    arteries, veins, airways = [], [], []
    z_hil = {-1: a.z_car - rng.uniform(12, 20), 1: a.z_car - rng.uniform(2, 10)}
    y_hil = a.cyc + rng.uniform(-0.05, 0.15) * a.ayc
    rt = a.r_trachea
    airways.append(("trachea", a.tubes["trachea"]))
    for side in (-1, 1):
        n_art = int(detail * rng.integers(2000, 2600))
        n_vein = int(detail * rng.integers(1600, 2200))
        pts = _sample_lung(a, rng, side, n_art)
        root = _hilum_root(a, side, y_hil, z_hil[side])
        # pulmonary artery from the bifurcation to the hilum
        r_pa = rng.uniform(9.5, 11.5)
        mid = (a.pa_bif + root) / 2 + np.array([0, 8 if side < 0 else 4, 6 if side > 0 else 0])
        arteries += polyline(bezier(a.pa_bif, mid, root, 5), r_pa, r_pa * 0.85)
        segs, nodes = _grow_tree(a, root, root - mid, pts, r_root=r_pa * 0.8)
        arteries += [s[:4] for s in segs] + _twigs(a, rng, segs)
        # bronchi beside the arteries (bronchovascular bundles) down to ~1.3 mm outer radius
        w = np.array([0.0, 1.0, 0.3 * side])
        off = {}
        dirs = {0: (root - mid) / np.linalg.norm(root - mid)}
        for s in segs:
            d = s[1] - s[0]
            dirs[s[6]] = d / (np.linalg.norm(d) + 1e-9)
        for k, dv in dirs.items():
            o = w - (w @ dv) * dv
            off[k] = o / (np.linalg.norm(o) + 1e-9)
        aw = []
        for p0, p1, r0, r1, g, i0, i1 in segs:
            ro = r0 * rng.uniform(0.75, 0.95)
            if ro < 1.6 or g > 7:
                continue
            gap = r0 + ro + 0.6
            aw.append((p0 + gap * off[i0], p1 + gap * off[i1], ro, ro))
        # main bronchus from the carina to the first bronchus
        start = root + (r_pa * 0.8 + rt * 0.7 + 1) * off[0]
        cb = a.carina + np.array([side * rt * 0.5, 0, -rt * 0.5])
        airways.append(("bronchi", polyline([cb, (cb + start) / 2 + [0, 0, 4], start], rt * 0.72, rt * 0.65) + aw))
        # pulmonary veins into the left atrium
        vpts = _sample_lung(a, rng, side, n_vein)
        vroot = _hilum_root(a, side, y_hil + rng.uniform(5, 15), z_hil[side] - rng.uniform(22, 32))
        r_pv = rng.uniform(7, 8.5)
        la = a.la + np.array([side * 15, 0, 0])
        veins += polyline([la, (la + vroot) / 2, vroot], r_pv, r_pv)
        vsegs, _ = _grow_tree(a, vroot, vroot - la, vpts, r_root=r_pv * 0.9)
        veins += [s[:4] for s in vsegs] + _twigs(a, rng, vsegs)
    return arteries, veins, airways
