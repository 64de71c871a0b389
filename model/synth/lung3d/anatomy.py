"""The anatomy of one phantom in millimetres (X, Y from the body centre, Z = 0 at the top of the right
diaphragm dome): random body, organ and mediastinal tube parameters, and the implicit shapes
(lung cavities, heart, mediastinum, spine, diaphragm domes) the renderers evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ct import BONE_CORTEX, MARROW


def sstep(a, b, x):
    t = np.clip((np.asarray(x, np.float32) - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass
class Anatomy:
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


def random_anatomy(rng: np.random.Generator) -> Anatomy:
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
    a = Anatomy(
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


def bezier(p0, c, p1, n):
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t ** 2 * p1


def polyline(pts, r0, r1):
    pts = np.asarray(pts, float)
    rs = np.linspace(r0, r1, len(pts))
    return [(pts[i], pts[i + 1], rs[i], rs[i + 1]) for i in range(len(pts) - 1)]


def _add_tubes(a: Anatomy, rng):
    """Great vessels, trachea, main bronchi and oesophagus as chains of capsules (anatomical mm)."""
    top = a.z_apex + 80
    hc = a.heart_c
    y_front_spine = a.ys - a.rvb
    # trachea and oesophagus in front of the spine
    ye = y_front_spine - rng.uniform(5, 8)
    yt = ye - rng.uniform(18, 22)
    rt = rng.uniform(8, 10)
    carina = np.array([a.xm * 0.3, yt + 4, a.z_car])
    a.tubes["trachea"] = polyline([[-2, yt - 4, top], [-2, yt, a.z_car + 60], carina], rt, rt * 0.95)
    a.tubes["oesophagus"] = polyline([[4, ye, top], [8, ye, a.z_car], [14, ye - 6, 40], [30, ye - 25, -30]], 7, 8)
    a.carina = carina
    a.r_trachea = rt
    # aorta: root in the heart's base, ascending, arch, descending beside the spine
    av = hc + np.array([-22, 8, 30])
    at = np.array([-12 + rng.normal(0, 3), a.cyc - rng.uniform(0.25, 0.4) * a.ayc, a.z_car + rng.uniform(5, 15)])
    ad = np.array([a.rvb + rng.uniform(6, 10), y_front_spine + rng.uniform(0, 6), a.z_car + rng.uniform(0, 8)])
    z_arch = a.z_car + rng.uniform(30, 45)
    arch = bezier(at, np.array([(at[0] + ad[0]) / 2, (at[1] + ad[1]) / 2, 2 * z_arch - (at[2] + ad[2]) / 2]), ad, 10)
    r_asc, r_arch, r_desc = rng.uniform(14, 17), rng.uniform(12, 14), rng.uniform(10.5, 12.5)
    desc = [ad, [a.rvb + rng.uniform(7, 11), a.ys - 0.35 * a.rvb, 60], [a.rvb + rng.uniform(2, 6), a.ys - 0.6 * a.rvb, -30],
            [rng.uniform(4, 10), y_front_spine - 10, -120]]
    a.tubes["aorta"] = (polyline([av, (av + at) / 2, at], r_asc, r_asc) + polyline(arch, r_asc, r_arch)
                        + polyline(desc, r_arch * 0.95, r_desc))
    # arch branches
    br = []
    for f, dx, dy, r in ((0.25, -22, -10, 6.5), (0.45, 2, -4, 4.5), (0.62, 22, 10, 5)):
        p = arch[int(f * (len(arch) - 1))]
        br += polyline([p, p + np.array([dx * 0.5, dy, 30]), p + np.array([dx, dy, top - p[2]])], r, r * 0.9)
    a.tubes["arch_branches"] = br
    # superior vena cava into the right atrium, left brachiocephalic vein across
    ra = hc + np.array([-35, 0, 25])
    svc_top = np.array([-30 + rng.normal(0, 3), at[1] + 8, a.z_car + 45])
    a.tubes["svc"] = (polyline([[-32, svc_top[1] + 5, top], svc_top, (svc_top + ra) / 2 + [0, 0, 5], ra], 9, 10.5)
                      + polyline([[45, a.cyc - 0.55 * a.ayc, a.z_car + 60], [0, a.cyc - 0.6 * a.ayc, a.z_car + 55],
                                   svc_top + [0, 0, 8]], 6, 8))
    # inferior vena cava below the heart (right, anterior to the spine)
    a.tubes["ivc"] = polyline([[-22, y_front_spine - 10, -150], [-24, y_front_spine - 14, -10], hc + [-30, 10, -25]],
                               12, 13)
    # pulmonary trunk from the right ventricle outflow to its bifurcation under the arch
    rvot = hc + np.array([-5, -30, 28])
    bif = np.array([rng.uniform(4, 12), a.cyc - rng.uniform(0.0, 0.1) * a.ayc, a.z_car - rng.uniform(5, 12)])
    a.tubes["pa_trunk"] = polyline(bezier(rvot, (rvot + bif) / 2 + [6, -10, 8], bif, 5), rng.uniform(13, 15), 13)
    a.pa_bif = bif
    a.la = hc + np.array([-5, 32, 18])  # left atrium, posterior base of the heart


def squircle(X, Y, cx, cy, ax, ay, k):
    u = ((X - cx) / ax) ** 2
    v = ((Y - cy) / ay) ** 2
    return u + v - k * u * v


def cavity_axes(a: Anatomy, Z):
    # the thorax narrows from the diaphragm to the apex (a rounded cone in coronal view)
    up = np.clip((np.asarray(Z, np.float32) - a.z_dome_r + 30) / (a.z_apex + 40 - a.z_dome_r), 0, 1) ** 1.6
    return a.axc * (1.05 - 0.3 * up), a.ayc * (1.02 - 0.15 * up), a.cyc - 0.1 * a.ayc * up


def dome_z(a: Anatomy, X, Y):
    """Z of the diaphragm under (X, Y): two domes, deepest laterally and posteriorly (the recesses)."""
    out = None
    for side, ztop in ((-1, a.z_dome_r), (1, a.z_dome_l)):
        cx, cy = side * 0.48 * a.axc, a.cyc + 0.05 * a.ayc
        r2 = ((X - cx) / (0.75 * a.axc)) ** 2 + ((Y - cy) / (1.05 * a.ayc)) ** 2
        z = ztop - 38 * r2 - 22 * np.clip((Y - cy) / a.ayc, 0, None) ** 2
        out = z if out is None else np.maximum(out, z)
    return out


def heart_u(a: Anatomy, X, Y, Z, grow=0.0):
    d = [X - a.heart_c[0], Y - a.heart_c[1], Z - a.heart_c[2]]
    u = 0.0
    for i in range(3):
        c = a.heart_rot[:, i]
        q = d[0] * c[0] + d[1] * c[1] + d[2] * c[2]
        u = u + (q / (a.heart_ax[i] + grow)) ** 2
    return u


def mediastinum_strip(a: Anatomy, X, Y, Z):
    _, ayc, cyc = cavity_axes(a, Z)
    yn = (Y - cyc) / ayc
    w = np.where(yn < 0, a.w_ant + (a.w_mid - a.w_ant) * np.clip(yn + 1, 0, 1),
                 a.w_mid + (a.w_post - a.w_mid) * np.clip(yn, 0, 1))
    # the upper mediastinum (great vessels, trachea) is wider than the anterior junction below it
    w = w + 14 * sstep(a.z_car - 30, a.z_car + 10, Z) * np.clip(1 - np.abs(yn + 0.1) * 1.5, 0, 1)
    return np.abs(X - a.xm) < w / 2


def spine_region(a: Anatomy, X, Y):
    r = a.rvb
    return (((X / (r + 9)) ** 2 + ((Y - a.ys) / (r + 8)) ** 2) <= 1) | ((np.abs(X) < r + 6) & (Y > a.ys))


def apex_ok(a: Anatomy, X, Y, Z):
    s = np.sqrt(np.clip((a.z_apex - Z) / 70.0, 0, 1)) + 1e-3
    ok = None
    for side in (-1, 1):
        cx, cy = side * 0.5 * a.axc, a.cyc + 0.2 * a.ayc
        inside = ((X - cx) / (0.75 * a.axc * s)) ** 2 + ((Y - cy) / (0.95 * a.ayc * s)) ** 2 <= 1
        ok = inside if ok is None else ok | inside
    return ok & (Z < a.z_apex)


def in_lungs(a: Anatomy, X, Y, Z):
    """Inside either lung (analytic part: no tube exclusion). Works for slices and point clouds."""
    axc, ayc, cyc = cavity_axes(a, Z)
    cav = squircle(X, Y, 0.0, cyc, axc, ayc, 0.12) <= 1
    return (cav & ~mediastinum_strip(a, X, Y, Z) & ~spine_region(a, X, Y) & (Z > dome_z(a, X, Y))
            & (heart_u(a, X, Y, Z, grow=4.0) > 1) & apex_ok(a, X, Y, Z))


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


def mediastinal_tubes(a: Anatomy):
    return [s for k in ("aorta", "svc", "pa_trunk", "trachea", "oesophagus", "arch_branches", "ivc") for s in a.tubes[k]]


def lung_points(a: Anatomy, X, Y, Z):
    P = np.stack([X, Y, Z], axis=1)
    return in_lungs(a, X, Y, Z) & (_capsule_dist(P, mediastinal_tubes(a)) > 3.0)
