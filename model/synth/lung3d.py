"""Whole 3D chest CT phantoms in Hounsfield units with continuous vessel and airway trees.

`chest_phantom(seed, ...)` renders a (z, y, x) volume in LPS order (x toward the patient's left,
y toward posterior, z toward superior; spacing_mm is (x, y, z)). Unlike `ct.ct_volume`, whose
lung vessels are random dots re-drawn on every slice, the lungs here hold 3D pulmonary artery and
vein trees grown from the hilum into the lung by a volume-filling branching rule (each branch
heads for the centre of mass of the lung region it supplies and stops 40 % of the way there; the
region is then split in two; radii follow Murray's law r^3 = r1^3 + r2^3), bronchi that run beside
the arteries, fissures, and 3D lobulated nodules of five kinds.

The anatomy is described in millimetres in an anatomical frame: X, Y relative to the body centre,
Z = 0 at the top of the right diaphragm dome. A volume is a window of that frame, so the same
anatomy renders at any spacing and size. Large organs are rendered slice by slice from implicit
shapes; tubes (vessels, airways, aorta) and nodules are rendered into local bounding boxes with
partial-volume occupancy averaged over the slice thickness. Scanner effects (reconstruction blur,
optional sharp kernel, correlated noise, HU offset, breathing blur over the diaphragm) come last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .ct import AIR, BONE_CORTEX, FAT, MARROW, MUSCLE

NODULE_KINDS = ("solid", "part_solid", "ground_glass", "juxta_vascular", "juxta_pleural")
MASK_KEYS = ("lung_nodule", "lung", "left_lung", "right_lung", "heart", "aorta", "vertebra", "vessels", "airways")


@dataclass
class Nodule:
    """One lesion, in world mm relative to the volume centre."""

    center_mm: tuple  # (x, y, z)
    diameter_mm: float
    kind: str  # solid | part_solid | ground_glass | juxta_vascular | juxta_pleural
    label: int  # its value in ChestPhantom.nodule_labels


@dataclass
class ChestPhantom:
    image: np.ndarray  # int16 HU (z, y, x)
    masks: dict  # uint8 (z, y, x): see MASK_KEYS
    nodule_labels: np.ndarray  # uint16 (z, y, x): 0 background, Nodule.label inside each nodule
    nodules: list
    spacing_mm: tuple  # (x, y, z)
    info: dict = field(default_factory=dict)  # contrast phase, scanner settings, anatomy landmarks


# ----------------------------------------------------------------------------------------------
# anatomy


def _sstep(a, b, x):
    t = np.clip((np.asarray(x, np.float32) - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass
class _Anatomy:
    axb: float  # body half-width, mm
    ayb: float  # body half-depth
    bx: float  # body centre in world mm
    by: float
    tf: float  # subcutaneous fat
    axc: float  # thoracic cavity half-width (inside the ribs)
    ayc: float
    cyc: float  # cavity centre Y
    ys: float  # vertebral body centre Y
    rvb: float  # vertebral body radius
    z_dome_r: float
    z_dome_l: float
    z_apex: float
    z_car: float  # carina
    heart_c: np.ndarray
    heart_ax: np.ndarray  # semi-axes along the heart's own axes
    heart_rot: np.ndarray  # columns = heart axes in anatomical coordinates
    w_ant: float
    w_mid: float
    w_post: float
    xm: float  # mediastinal midline X
    contrast: str
    hu: dict
    rib_p: float  # rib pitch mm
    rib_z0: float  # Z of the first rib head
    rib_drop: float
    sternum_w: float
    m_pect: float = 15.0
    m_lat: float = 8.0
    gas_level: float = 10.0
    tubes: dict = field(default_factory=dict)  # name -> list of (p0, p1, r0, r1)


def _rot_from_axis(a):
    a = np.asarray(a, float)
    a = a / np.linalg.norm(a)
    b = np.cross(a, [0.0, 0.0, 1.0])
    b /= np.linalg.norm(b)
    c = np.cross(a, b)
    return np.stack([a, b, c], axis=1)


def _random_anatomy(rng: np.random.Generator) -> _Anatomy:
    axb, ayb = rng.uniform(150, 185), rng.uniform(105, 130)
    tf = rng.uniform(5, 25)
    m_lat, m_ant, m_post = rng.uniform(3, 8), rng.uniform(2, 8), rng.uniform(20, 30)
    axc = axb - tf - m_lat - 9
    y_ant = -ayb + tf + m_ant + 9
    y_post = ayb - tf - m_post
    cyc, ayc = (y_ant + y_post) / 2, (y_post - y_ant) / 2
    rvb = rng.uniform(15, 18)
    ys = y_post - rvb - rng.uniform(10, 16)
    z_car = rng.uniform(135, 160)
    contrast = ("none", "arterial", "venous")[rng.integers(3)]
    if contrast == "none":
        b = rng.uniform(35, 50)
        hu = dict(aorta=b, pa=b, lheart=b, rheart=b, svc=b, pv=b, myo=b + 5, liver=rng.uniform(52, 66), spleen=rng.uniform(42, 52))
    elif contrast == "arterial":
        ao = rng.uniform(250, 480)
        pa = ao * rng.uniform(0.7, 1.15)
        hu = dict(aorta=ao, pa=pa, lheart=ao, rheart=pa * rng.uniform(0.8, 1.05), svc=rng.uniform(250, 900), pv=ao,
                  myo=rng.uniform(90, 130), liver=rng.uniform(65, 85), spleen=rng.uniform(90, 150))
    else:
        ao = rng.uniform(130, 190)
        hu = dict(aorta=ao, pa=ao * rng.uniform(0.9, 1.05), lheart=ao, rheart=ao * rng.uniform(0.9, 1.05), svc=ao,
                  pv=ao, myo=rng.uniform(90, 120), liver=rng.uniform(100, 135), spleen=rng.uniform(105, 130))
    hu["fat"] = rng.uniform(-115, -85)
    hu["muscle"] = rng.uniform(40, 60)
    hu["lung"] = rng.uniform(-885, -835)
    hu["bone"] = rng.uniform(650, BONE_CORTEX)
    hu["marrow"] = rng.uniform(MARROW - 70, MARROW + 60)
    heart_c = np.array([rng.uniform(22, 34), cyc - rng.uniform(0.15, 0.3) * ayc, rng.uniform(38, 52)])
    heart_ax = np.array([rng.uniform(68, 80), rng.uniform(50, 58), rng.uniform(40, 48)])
    long_axis = np.array([rng.uniform(0.6, 0.75), -rng.uniform(0.5, 0.65), -rng.uniform(0.35, 0.5)])
    a = _Anatomy(
        axb=axb, ayb=ayb, bx=rng.normal(0, 4), by=rng.normal(-6, 5), tf=tf, axc=axc, ayc=ayc, cyc=cyc, ys=ys,
        rvb=rvb, z_dome_r=0.0, z_dome_l=-rng.uniform(8, 20), z_apex=rng.uniform(225, 255), z_car=z_car,
        heart_c=heart_c, heart_ax=heart_ax, heart_rot=_rot_from_axis(long_axis),
        w_ant=rng.uniform(8, 22), w_mid=rng.uniform(40, 56), w_post=rng.uniform(34, 44), xm=rng.uniform(0, 6),
        contrast=contrast, hu=hu, rib_p=rng.uniform(23, 27), rib_z0=0.0, rib_drop=rng.uniform(85, 115),
        sternum_w=rng.uniform(14, 20), m_pect=rng.uniform(6, 22), m_lat=rng.uniform(4, 14),
        gas_level=rng.uniform(-15, 30),
    )
    a.rib_z0 = a.z_apex + rng.uniform(5, 15)  # the first rib's head sits just above the apex
    _add_tubes(a, rng)
    return a


def _bezier(p0, c, p1, n):
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t ** 2 * p1


def _polyline(pts, r0, r1):
    pts = np.asarray(pts, float)
    rs = np.linspace(r0, r1, len(pts))
    return [(pts[i], pts[i + 1], rs[i], rs[i + 1]) for i in range(len(pts) - 1)]


def _add_tubes(a: _Anatomy, rng):
    """Great vessels, trachea, main bronchi and oesophagus as chains of capsules (anatomical mm)."""
    top = a.z_apex + 80
    hc = a.heart_c
    y_front_spine = a.ys - a.rvb
    # trachea and oesophagus in front of the spine
    ye = y_front_spine - rng.uniform(5, 8)
    yt = ye - rng.uniform(18, 22)
    rt = rng.uniform(8, 10)
    carina = np.array([a.xm * 0.3, yt + 4, a.z_car])
    a.tubes["trachea"] = _polyline([[-2, yt - 4, top], [-2, yt, a.z_car + 60], carina], rt, rt * 0.95)
    a.tubes["oesophagus"] = _polyline([[4, ye, top], [8, ye, a.z_car], [14, ye - 6, 40], [30, ye - 25, -30]], 7, 8)
    a.carina = carina
    a.r_trachea = rt
    # aorta: root in the heart's base, ascending, arch, descending beside the spine
    av = hc + np.array([-22, 8, 30])
    at = np.array([-12 + rng.normal(0, 3), a.cyc - rng.uniform(0.25, 0.4) * a.ayc, a.z_car + rng.uniform(5, 15)])
    ad = np.array([a.rvb + rng.uniform(6, 10), y_front_spine + rng.uniform(0, 6), a.z_car + rng.uniform(0, 8)])
    z_arch = a.z_car + rng.uniform(30, 45)
    arch = _bezier(at, np.array([(at[0] + ad[0]) / 2, (at[1] + ad[1]) / 2, 2 * z_arch - (at[2] + ad[2]) / 2]), ad, 10)
    r_asc, r_arch, r_desc = rng.uniform(14, 17), rng.uniform(12, 14), rng.uniform(10.5, 12.5)
    desc = [ad, [a.rvb + rng.uniform(7, 11), a.ys - 0.35 * a.rvb, 60], [a.rvb + rng.uniform(2, 6), a.ys - 0.6 * a.rvb, -30],
            [rng.uniform(4, 10), y_front_spine - 10, -120]]
    a.tubes["aorta"] = (_polyline([av, (av + at) / 2, at], r_asc, r_asc) + _polyline(arch, r_asc, r_arch)
                        + _polyline(desc, r_arch * 0.95, r_desc))
    # arch branches
    br = []
    for f, dx, dy, r in ((0.25, -22, -10, 6.5), (0.45, 2, -4, 4.5), (0.62, 22, 10, 5)):
        p = arch[int(f * (len(arch) - 1))]
        br += _polyline([p, p + np.array([dx * 0.5, dy, 30]), p + np.array([dx, dy, top - p[2]])], r, r * 0.9)
    a.tubes["arch_branches"] = br
    # superior vena cava into the right atrium, left brachiocephalic vein across
    ra = hc + np.array([-35, 0, 25])
    svc_top = np.array([-30 + rng.normal(0, 3), at[1] + 8, a.z_car + 45])
    a.tubes["svc"] = (_polyline([[-32, svc_top[1] + 5, top], svc_top, (svc_top + ra) / 2 + [0, 0, 5], ra], 9, 10.5)
                      + _polyline([[45, a.cyc - 0.55 * a.ayc, a.z_car + 60], [0, a.cyc - 0.6 * a.ayc, a.z_car + 55],
                                   svc_top + [0, 0, 8]], 6, 8))
    # inferior vena cava below the heart (right, anterior to the spine)
    a.tubes["ivc"] = _polyline([[-22, y_front_spine - 10, -150], [-24, y_front_spine - 14, -10], hc + [-30, 10, -25]],
                               12, 13)
    # pulmonary trunk from the right ventricle outflow to its bifurcation under the arch
    rvot = hc + np.array([-5, -30, 28])
    bif = np.array([rng.uniform(4, 12), a.cyc - rng.uniform(0.0, 0.1) * a.ayc, a.z_car - rng.uniform(5, 12)])
    a.tubes["pa_trunk"] = _polyline(_bezier(rvot, (rvot + bif) / 2 + [6, -10, 8], bif, 5), rng.uniform(13, 15), 13)
    a.pa_bif = bif
    a.la = hc + np.array([-5, 32, 18])  # left atrium, posterior base of the heart


def _squircle(X, Y, cx, cy, ax, ay, k):
    u = ((X - cx) / ax) ** 2
    v = ((Y - cy) / ay) ** 2
    return u + v - k * u * v


def _cavity_axes(a: _Anatomy, Z):
    # the thorax narrows from the diaphragm to the apex (a rounded cone in coronal view)
    up = np.clip((np.asarray(Z, np.float32) - a.z_dome_r + 30) / (a.z_apex + 40 - a.z_dome_r), 0, 1) ** 1.6
    return a.axc * (1.05 - 0.3 * up), a.ayc * (1.02 - 0.15 * up), a.cyc - 0.1 * a.ayc * up


def _dome_z(a: _Anatomy, X, Y):
    """Z of the diaphragm under (X, Y): two domes, deepest laterally and posteriorly (the recesses)."""
    out = None
    for side, ztop in ((-1, a.z_dome_r), (1, a.z_dome_l)):
        cx, cy = side * 0.48 * a.axc, a.cyc + 0.05 * a.ayc
        r2 = ((X - cx) / (0.75 * a.axc)) ** 2 + ((Y - cy) / (1.05 * a.ayc)) ** 2
        z = ztop - 38 * r2 - 22 * np.clip((Y - cy) / a.ayc, 0, None) ** 2
        out = z if out is None else np.maximum(out, z)
    return out


def _heart_u(a: _Anatomy, X, Y, Z, grow=0.0):
    d = [X - a.heart_c[0], Y - a.heart_c[1], Z - a.heart_c[2]]
    u = 0.0
    for i in range(3):
        c = a.heart_rot[:, i]
        q = d[0] * c[0] + d[1] * c[1] + d[2] * c[2]
        u = u + (q / (a.heart_ax[i] + grow)) ** 2
    return u


def _mediastinum_strip(a: _Anatomy, X, Y, Z):
    _, ayc, cyc = _cavity_axes(a, Z)
    yn = (Y - cyc) / ayc
    w = np.where(yn < 0, a.w_ant + (a.w_mid - a.w_ant) * np.clip(yn + 1, 0, 1),
                 a.w_mid + (a.w_post - a.w_mid) * np.clip(yn, 0, 1))
    # the upper mediastinum (great vessels, trachea) is wider than the anterior junction below it
    w = w + 14 * _sstep(a.z_car - 30, a.z_car + 10, Z) * np.clip(1 - np.abs(yn + 0.1) * 1.5, 0, 1)
    return np.abs(X - a.xm) < w / 2


def _spine_region(a: _Anatomy, X, Y):
    r = a.rvb
    return (((X / (r + 9)) ** 2 + ((Y - a.ys) / (r + 8)) ** 2) <= 1) | ((np.abs(X) < r + 6) & (Y > a.ys))


def _apex_ok(a: _Anatomy, X, Y, Z):
    s = np.sqrt(np.clip((a.z_apex - Z) / 70.0, 0, 1)) + 1e-3
    ok = None
    for side in (-1, 1):
        cx, cy = side * 0.5 * a.axc, a.cyc + 0.2 * a.ayc
        inside = ((X - cx) / (0.75 * a.axc * s)) ** 2 + ((Y - cy) / (0.95 * a.ayc * s)) ** 2 <= 1
        ok = inside if ok is None else ok | inside
    return ok & (Z < a.z_apex)


def _lung_region(a: _Anatomy, X, Y, Z):
    """Inside either lung (analytic part: no tube exclusion). Works for slices and point clouds."""
    axc, ayc, cyc = _cavity_axes(a, Z)
    cav = _squircle(X, Y, 0.0, cyc, axc, ayc, 0.12) <= 1
    return (cav & ~_mediastinum_strip(a, X, Y, Z) & ~_spine_region(a, X, Y) & (Z > _dome_z(a, X, Y))
            & (_heart_u(a, X, Y, Z, grow=4.0) > 1) & _apex_ok(a, X, Y, Z))


def _capsule_dist(P, segs):
    """Distance from points P (n, 3) to the surface of a list of capsules (negative inside)."""
    best = np.full(len(P), np.inf)
    for p0, p1, r0, r1 in segs:
        v = p1 - p0
        L2 = float(v @ v) + 1e-9
        t = np.clip((P - p0) @ v / L2, 0, 1)
        d = np.linalg.norm(P - p0 - t[:, None] * v, axis=1) - (r0 + t * (r1 - r0))
        best = np.minimum(best, d)
    return best


def _mediastinal_tubes(a: _Anatomy):
    return [s for k in ("aorta", "svc", "pa_trunk", "trachea", "oesophagus", "arch_branches", "ivc") for s in a.tubes[k]]


def _lung_points(a: _Anatomy, X, Y, Z):
    P = np.stack([X, Y, Z], axis=1)
    return _lung_region(a, X, Y, Z) & (_capsule_dist(P, _mediastinal_tubes(a)) > 3.0)


# ----------------------------------------------------------------------------------------------
# vessel and airway trees


def _sample_lung(a: _Anatomy, rng, side: int, n: int, margin=0.0):
    out = []
    zlo = min(a.z_dome_r, a.z_dome_l) - 60
    while sum(len(o) for o in out) < n:
        m = 4 * n
        X = side * rng.uniform(0, a.axc, m)
        Y = rng.uniform(a.cyc - a.ayc, a.cyc + a.ayc, m)
        Z = rng.uniform(zlo, a.z_apex, m)
        ok = _lung_points(a, X, Y, Z)
        if margin:
            for d in ((margin, 0, 0), (-margin, 0, 0), (0, margin, 0), (0, -margin, 0), (0, 0, margin), (0, 0, -margin)):
                ok &= _lung_region(a, X + d[0], Y + d[1], Z + d[2])
        out.append(np.stack([X[ok], Y[ok], Z[ok]], axis=1))
    return np.concatenate(out)[:n]


def _hilum_root(a: _Anatomy, side: int, y: float, z: float):
    xs = side * np.arange(0, a.axc, 2.0)
    ok = _lung_points(a, xs, np.full_like(xs, y), np.full_like(xs, z))
    i = int(np.argmax(ok)) if ok.any() else len(xs) // 3
    return np.array([xs[i] + side * 4.0, y, z])


def _grow_tree(a: _Anatomy, root, direction, pts, r_root, r_leaf_min=0.55, max_angle=np.deg2rad(65)):
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
            ok = _lung_region(a, S[..., 0], S[..., 1], S[..., 2]) | leaf[:, None]
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


def _twigs(a: _Anatomy, rng, segs):
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
    ok = _lung_points(a, E[:, 0], E[:, 1], E[:, 2]) & _lung_region(a, M[:, 0], M[:, 1], M[:, 2])
    return [(B[i], E[i], Rt[i], Rt[i] * 0.8) for i in np.flatnonzero(ok)]


def _build_trees(a: _Anatomy, rng, detail: float = 1.0):
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
        arteries += _polyline(_bezier(a.pa_bif, mid, root, 5), r_pa, r_pa * 0.85)
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
        airways.append(("bronchi", _polyline([cb, (cb + start) / 2 + [0, 0, 4], start], rt * 0.72, rt * 0.65) + aw))
        # pulmonary veins into the left atrium
        vpts = _sample_lung(a, rng, side, n_vein)
        vroot = _hilum_root(a, side, y_hil + rng.uniform(5, 15), z_hil[side] - rng.uniform(22, 32))
        r_pv = rng.uniform(7, 8.5)
        la = a.la + np.array([side * 15, 0, 0])
        veins += _polyline([la, (la + vroot) / 2, vroot], r_pv, r_pv)
        vsegs, _ = _grow_tree(a, vroot, vroot - la, vpts, r_root=r_pv * 0.9)
        veins += [s[:4] for s in vsegs] + _twigs(a, rng, vsegs)
    return arteries, veins, airways


# ----------------------------------------------------------------------------------------------
# rendering helpers


@dataclass
class _Grid:
    X: np.ndarray  # (nx,) anatomical X of each column
    Y: np.ndarray
    Z: np.ndarray  # (nz,) anatomical Z of each slice
    Zsub: np.ndarray  # (nz, nsub) sample positions over each slice's thickness
    h: float  # in-plane pixel size
    spacing: tuple

    @property
    def shape(self):
        return len(self.Z), len(self.Y), len(self.X)


def _make_grid(shape, spacing, a: _Anatomy, zc: float) -> _Grid:
    nz, ny, nx = shape
    sx, sy, sz = spacing
    X = (np.arange(nx) - (nx - 1) / 2) * sx - a.bx
    Y = (np.arange(ny) - (ny - 1) / 2) * sy - a.by
    Z = (np.arange(nz) - (nz - 1) / 2) * sz + zc
    nsub = int(max(1, round(sz / max(1.2, 0.9 * min(sx, sy)))))
    Zsub = Z[:, None] + ((np.arange(nsub) + 0.5) / nsub - 0.5) * sz
    return _Grid(X.astype(np.float32), Y.astype(np.float32), Z.astype(np.float32), Zsub.astype(np.float32),
                 float(min(sx, sy)), tuple(spacing))


def _seg_boxes(grid: _Grid, segs, pad):
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


def _render_tubes(vol: np.ndarray, grid: _Grid, segs, grow: float = 0.0, min_r: float = 0.0):
    """Max-composite the partial-volume occupancy of tapered capsules into vol (float32, z y x),
    averaged over each slice's thickness. Small boxes are rendered in vectorised batches."""
    if not segs:
        return vol
    h = grid.h
    P0 = np.array([s[0] for s in segs], np.float32)
    V = np.array([s[1] for s in segs], np.float32) - P0
    R0 = np.maximum(np.array([s[2] for s in segs], np.float32) + grow, min_r)
    R1 = np.maximum(np.array([s[3] for s in segs], np.float32) + grow, min_r)
    boxes = _seg_boxes(grid, [(P0[i], P0[i] + V[i], R0[i], R1[i]) for i in range(len(segs))], h)
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


def _blend(img: np.ndarray, idx: np.ndarray, occ: np.ndarray, value):
    """img.flat[idx] <- img * (1 - occ) + occ * value (in place; img must be contiguous)."""
    f = img.reshape(-1)
    f[idx] = f[idx] * (1 - occ) + occ * value


def _composite_tubes(img, scratch, grid, segs, value):
    scratch[:] = 0
    _render_tubes(scratch, grid, segs)
    idx = np.flatnonzero(scratch)
    o = scratch.ravel()[idx]
    _blend(img, idx, o, value)
    return idx, o


def _fine_field(rng, shape, spacing, scale_mm=1.2):
    """Unit-std random texture correlated over about scale_mm, made at half resolution in-plane."""
    nz, ny, nx = shape
    sx, sy, sz = spacing
    small = rng.standard_normal((nz, (ny + 1) // 2, (nx + 1) // 2), dtype=np.float32)
    small = ndi.gaussian_filter(small, (scale_mm / sz, scale_mm / (2 * sy), scale_mm / (2 * sx)), truncate=2.5)
    small /= small.std() + 1e-6
    out = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)[:, :ny, :nx]
    return out


def _smooth_field(rng, grid: _Grid, scale_mm: float, dtype=np.float32):
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


# ----------------------------------------------------------------------------------------------
# the background anatomy, slice by slice


def _render_slice(a: _Anatomy, X, Y, z: float, zthick: float, h: float):
    """HU image and masks of the large anatomy at anatomical height z (X: (1, nx), Y: (ny, 1))."""
    hu = a.hu
    img = np.full(np.broadcast_shapes(X.shape, Y.shape), AIR, np.float32)
    # table: a curved carbon-fibre shell (two thin walls around foam) under the body
    table_y = a.ayb + 6 + 0.0015 * X ** 2
    tab = np.abs(X) < 230
    img = np.where(tab & (Y > table_y) & (Y < table_y + 2.5), np.float32(150), img)
    img = np.where(tab & (Y >= table_y + 2.5) & (Y < table_y + 22), np.float32(-930), img)
    img = np.where(tab & (Y >= table_y + 22) & (Y < table_y + 24.5), np.float32(150), img)
    shoulder = 1 + 0.1 * float(_sstep(a.z_car + 40, a.z_apex + 40, z))
    bax = a.axb * shoulder
    body_u = _squircle(X, Y, 0, 0, bax, a.ayb, np.where(Y > 0, 0.55, 0.2))
    body = body_u <= 1
    img[body] = hu["fat"]
    inner = _squircle(X, Y, 0, 0, bax - 3, a.ayb - 3, np.where(Y > 0, 0.55, 0.2)) <= 1  # under the skin
    axc, ayc, cyc = (float(v) for v in _cavity_axes(a, z))
    cav_u = _squircle(X, Y, 0, cyc, axc, ayc, 0.12)
    cavity = cav_u <= 1
    # chest wall: intercostal layer with the ribs, a thin fat plane, then the outer muscles
    # (pectoralis in front, serratus / latissimus at the side, scapular muscles behind, upper chest)
    rad = np.sqrt(X ** 2 + (Y - cyc) ** 2)
    rho = rad * (1 - 1 / np.sqrt(np.maximum(cav_u, 1e-6)))  # mm outside the cavity along the ray
    phi = np.arctan2(np.abs(X), (Y - cyc) / ayc * axc)  # 0 posterior, pi anterior
    upper = float(_sstep(a.z_car - 80, a.z_car + 10, z))

    def band(lo, hi):
        return _sstep(lo - 0.25, lo + 0.25, phi) * (1 - _sstep(hi - 0.25, hi + 0.25, phi))

    t_out = (a.m_pect * (0.35 + 0.65 * upper) * band(0.62 * np.pi, 0.97 * np.pi) + a.m_lat * band(0.25 * np.pi, 0.62 * np.pi)
             + 14 * upper * band(0.12 * np.pi, 0.4 * np.pi))
    wall = (rho < 11) | ((rho > 12.5) & (rho < 12.5 + t_out))
    r_ps = a.rvb + 12
    depth = a.ayb - 0.6 * a.tf - (a.ys + a.rvb)
    paraspinal = ((np.abs(X) - r_ps) / (r_ps + 4)) ** 2 + ((Y - a.ys - a.rvb - depth / 2) / (depth / 2 + 2)) ** 2 <= 1
    img[(wall | paraspinal) & inner & ~cavity] = hu["muscle"]
    dome = _dome_z(a, X, Y)
    below = np.clip((dome - z) / zthick + 0.5, 0, 1)  # partial volume across the diaphragm
    img[cavity] = hu["fat"] + 15
    masks = {}
    # lungs
    lung = (cavity & ~_mediastinum_strip(a, X, Y, z) & ~_spine_region(a, X, Y) & (_heart_u(a, X, Y, z, 4.0) > 1)
            & _apex_ok(a, X, Y, z))
    lung_f = lung * (1 - below)
    img = np.where(lung, img * (1 - lung_f) + lung_f * hu["lung"], img)
    # abdomen under the domes: liver on the right, stomach and spleen on the left
    abd = cavity & (below > 0)
    liver = abd & (X < 15 - 0.35 * (Y - cyc))
    spleen = abd & ~liver & (((X - 0.7 * axc) / 30) ** 2 + ((Y - cyc - 0.35 * ayc) / 45) ** 2 <= 1)
    st_c = np.array([0.4 * axc, cyc - 0.15 * ayc, a.z_dome_l - 35])
    st_u = ((X - st_c[0]) / 45) ** 2 + ((Y - st_c[1]) / 38) ** 2 + ((z - st_c[2]) / 40) ** 2
    stomach = abd & ~liver & (st_u <= 1)
    for m, v in ((liver, hu["liver"]), (spleen, hu["spleen"]), (stomach, 20.0)):
        f = below * m
        img = img * (1 - f) + f * v
    gas = stomach & (Y < st_c[1] - a.gas_level) & (below > 0.5)  # supine: gas rises to the front
    img[gas] = AIR + 30
    # heart: pericardial fat, myocardium, right and left blood pools split by the septum
    hu_u = _heart_u(a, X, Y, z)
    peri = (_heart_u(a, X, Y, z, 4.0) <= 1) & cavity & (below < 0.5)
    img[peri] = hu["fat"]
    heart = (hu_u <= 1) & cavity & (below < 0.5)
    img[heart] = hu["myo"]
    pool = _heart_u(a, X, Y, z, -9.0) <= 1
    sx, sy, szz = X - a.heart_c[0], Y - a.heart_c[1], z - a.heart_c[2]
    sept = sx * 0.75 + sy * 0.55 + szz * 0.1  # >0: left ventricle / atrium side
    img = np.where(heart & pool & (sept > 4), np.float32(hu["lheart"]), img)
    img = np.where(heart & pool & (sept < -4), np.float32(hu["rheart"]), img)
    masks["heart"] = heart
    # spine: vertebral bodies with discs, canal, posterior arch, transverse and spinous processes
    phase = ((a.rib_z0 + 12 - z) / a.rib_p) % 1.0
    disc = phase > 0.82
    vb = (X ** 2 + (Y - a.ys) ** 2) <= a.rvb ** 2
    vb_in = (X ** 2 + (Y - a.ys) ** 2) <= (a.rvb - 1.8) ** 2
    cy_canal = a.ys + a.rvb + 8
    canal = (X ** 2 + (Y - cy_canal) ** 2) <= 8 ** 2
    arch = ((X ** 2 + (Y - cy_canal) ** 2) <= 14 ** 2) & ~canal & (Y > a.ys + a.rvb - 3)
    spinous = (np.abs(X) < 4) & (Y > cy_canal) & (Y < cy_canal + 35 - 8 * phase)
    transverse = ((np.abs(Y - cy_canal - 0.45 * (np.abs(X) - 10)) < 4) & (np.abs(X) > 8) & (np.abs(X) < 30)
                  & (phase > 0.1) & (phase < 0.35))
    bone_post = (arch | spinous | transverse) & ~canal
    if disc:
        img[vb] = 90.0
    else:
        img[vb] = hu["bone"]
        img[vb_in] = hu["marrow"]
    img[bone_post] = hu["bone"] * 0.9
    img[canal] = 25.0
    masks["vertebra"] = vb | bone_post
    # ribs in the chest wall: each rib descends from its head at the spine toward the front
    ring = (rho > -1) & (rho < 16) & inner
    zr = a.rib_z0 - z - a.rib_drop * (1 - np.cos(phi)) / 2
    k = np.round(zr / a.rib_p)
    dz = zr - k * a.rib_p
    rib_len = np.where(k < 7, 0.93 * np.pi, np.where(k < 10, 0.8 * np.pi, 0.55 * np.pi))
    rib_u = (dz / 5.5) ** 2 + ((rho - 5.0) / 3.6) ** 2
    rib = ring & (rib_u <= 1) & (k >= 0) & (k < 12) & (phi > 0.12) & (phi < rib_len) & (np.abs(X) > a.rvb + 10)
    cart = rib & (phi > 0.72 * np.pi)
    img[rib] = hu["bone"]
    img[rib & (rib_u <= 0.45)] = hu["marrow"]
    img[cart] = 130.0
    # sternum in front of the mediastinum
    st_y = a.cyc - a.ayc - 6
    z_st_top, z_st_bot = a.z_car + 25, a.heart_c[2] - 25
    if z_st_bot < z < z_st_top:
        w = a.sternum_w * (1.4 if z > a.z_car else 1.0)
        st = (((X - a.xm) / w) ** 2 + ((Y - st_y) / 6.5) ** 2) <= 1
        img[st] = hu["bone"] * 0.9
        img[(((X - a.xm) / (w - 2)) ** 2 + ((Y - st_y) / 4.5) ** 2) <= 1] = hu["marrow"]
    # scapulae behind the upper ribs
    if z > a.z_car - 50:
        ring_s = (rho > 17) & (rho < 21) & (phi > 0.2 * np.pi) & (phi < 0.38 * np.pi) & inner
        img[ring_s] = hu["bone"] * 0.8
    masks["lung_region"] = lung & (lung_f > 0.5)
    masks["cavity"] = cavity
    return img, masks


# ----------------------------------------------------------------------------------------------
# nodules


def _nodule_occ(rng, grid: _Grid, c, R, box, spicules: int):
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


def _place_nodules(rng, a, grid, lung_region, vessel_segs, n, dlo, dhi):
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


# ----------------------------------------------------------------------------------------------
# scanner


def _scanner(img: np.ndarray, rng, grid: _Grid, a: _Anatomy, info: dict, lung_region: np.ndarray):
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


# ----------------------------------------------------------------------------------------------
# the phantom


def chest_phantom(seed: int, shape_zyx=(64, 256, 256), spacing_mm=(1.4, 1.4, 2.5), n_nodules=(0, 4),
                  nodule_diameter_mm=(3.0, 30.0)) -> ChestPhantom:
    """A chest CT volume (int16 HU, z y x, LPS) with continuous vessels and airways and 3D nodules.

    Deterministic in its arguments. n_nodules is an inclusive (min, max) range (or one number);
    fewer are placed when the lungs in view have no room. Diameters are drawn from
    nodule_diameter_mm with small ones most common (shortened to fit thin volumes)."""
    rng = np.random.default_rng(seed)
    a = _random_anatomy(rng)
    nz, ny, nx = (int(s) for s in shape_zyx)
    sx, sy, sz = (float(s) for s in spacing_mm)
    zext = nz * sz
    lo, hi = -50 + 0.4 * zext, a.z_apex - 20 - 0.4 * zext
    zc = float(rng.uniform(lo, hi)) if hi > lo else float((a.z_apex - 40) / 2)
    grid = _make_grid((nz, ny, nx), (sx, sy, sz), a, zc)
    info = {"contrast": a.contrast, "body_center_mm": (round(a.bx, 1), round(a.by, 1)),
            # world z (mm from the volume centre, + superior) of anatomical landmarks, in or out of the volume
            "landmarks_z_mm": {k: round(float(v) - zc, 1) for k, v in (
                ("right_dome", a.z_dome_r), ("left_dome", a.z_dome_l), ("heart_centre", a.heart_c[2]),
                ("carina", a.z_car), ("lung_apex", a.z_apex))}}
    arteries, veins, airway_groups = _build_trees(a, rng, detail=1.0)
    trng = np.random.default_rng([seed, 1])  # texture and noise draws do not shift the anatomy
    hu = a.hu

    # 1. large anatomy, slice by slice
    img = np.empty((nz, ny, nx), np.float32)
    lung_region = np.zeros((nz, ny, nx), bool)
    heart = np.zeros((nz, ny, nx), bool)
    vert = np.zeros((nz, ny, nx), bool)
    Xr, Yc = grid.X[None, :], grid.Y[:, None]
    for k in range(nz):
        sl, m = _render_slice(a, Xr, Yc, float(grid.Z[k]), sz, grid.h)
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
    paren += _smooth_field(trng, grid, trng.uniform(18, 30)).ravel()[li] * trng.uniform(8, 20)
    # fine mottling from unresolved small vessels and lobules: faint, sparse specks ~1-2 mm
    fine = _fine_field(trng, (nz, ny, nx), (sx, sy, sz)).ravel()[li]
    paren += trng.uniform(3, 8) * fine + trng.uniform(20, 50) * np.maximum(fine - 1.6, 0)
    if trng.random() < 0.25:  # centrilobular / paraseptal emphysema, upper zones
        f = _smooth_field(trng, grid, trng.uniform(3.0, 5.0)).ravel()[li]
        upper = _sstep(a.z_car - 60, a.z_apex - 20, grid.Z[kz])
        e = np.clip((f - trng.uniform(1.3, 2.1) + 0.9 * upper) * 2.0, 0, 1)
        paren = paren * (1 - e) + e * trng.uniform(-990, -950)
        info["emphysema"] = True
    if trng.random() < 0.2:  # patchy ground glass
        f = _smooth_field(trng, grid, trng.uniform(12, 22)).ravel()[li]
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
    _render_tubes(occ, grid, _mediastinal_tubes(a), grow=2.0)
    med_idx = np.flatnonzero(occ)
    sheath = occ.ravel()[med_idx] * lung_region.ravel()[med_idx]
    _blend(img, med_idx, sheath, hu["fat"])
    lung_region.ravel()[med_idx[occ.ravel()[med_idx] >= 0.5]] = False
    for name, v in (("arch_branches", hu["aorta"]), ("svc", hu["svc"]), ("ivc", hu["svc"] * 0.5 + 40),
                    ("oesophagus", 35.0), ("pa_trunk", hu["pa"])):
        _composite_tubes(img, occ, grid, a.tubes[name], v)
    aorta_idx, aorta_occ = _composite_tubes(img, occ, grid, a.tubes["aorta"], hu["aorta"])

    # 4. pulmonary vessels (arteries and veins, continuous from the hilum to the periphery)
    vessels = np.zeros((nz, ny, nx), np.float32)
    _render_tubes(vessels, grid, veins)
    vi = np.flatnonzero(vessels)
    _blend(img, vi, vessels.ravel()[vi], hu["pv"])
    occ[:] = 0
    _render_tubes(occ, grid, arteries)
    ai = np.flatnonzero(occ)
    _blend(img, ai, occ.ravel()[ai], hu["pa"])
    np.maximum(vessels, occ, out=vessels)

    # 5. airways: soft-tissue wall, air lumen
    airway = np.zeros((nz, ny, nx), np.float32)
    occ[:] = 0
    for _name, segs in airway_groups:
        _render_tubes(airway, grid, segs)
        inner = [(p0, p1, r0 - (0.45 + 0.1 * r0), r1 - (0.45 + 0.1 * r1)) for p0, p1, r0, r1 in segs]
        _render_tubes(occ, grid, [s for s in inner if s[2] > 0.3])
    wi = np.flatnonzero(airway)
    _blend(img, wi, airway.ravel()[wi], trng.uniform(0, 60))
    _blend(img, wi, occ.ravel()[wi], AIR + 10)

    # 6. nodules
    lo_n, hi_n = (n_nodules, n_nodules) if np.isscalar(n_nodules) else n_nodules
    n_nod = int(rng.integers(lo_n, hi_n + 1))
    placed = _place_nodules(rng, a, grid, lung_region, arteries + veins, n_nod, *nodule_diameter_mm)
    labels = np.zeros((nz, ny, nx), np.uint16)
    nodules = []
    for lab, (c, R, kind) in enumerate(placed, start=1):
        boxes = _seg_boxes(grid, [(c, c, R * 2.0, R * 2.0)], grid.h)
        box = boxes[0]
        z0, z1, y0, y1, x0, x1 = box
        spic = int(rng.integers(3, 9)) if kind == "solid" and R > 4 and rng.random() < 0.35 else 0
        occ = _nodule_occ(rng, grid, c, R, box, spic)
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
                core = _nodule_occ(rng, grid, c + off, R * rng.uniform(0.3, 0.6), box, 0) * lr
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
    img = _scanner(img, trng, grid, a, info, lung_region)
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
