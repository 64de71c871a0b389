"""The background anatomy (body wall, fat, muscle, bones, lungs, heart, mediastinum), rendered slice
by slice from the implicit shapes of `anatomy`.
"""

from __future__ import annotations

import numpy as np

from ..ct import AIR
from .anatomy import Anatomy, apex_ok, cavity_axes, dome_z, heart_u, mediastinum_strip, spine_region, squircle, sstep


def render_slice(a: Anatomy, X, Y, z: float, zthick: float, h: float):
    """HU image and masks of the large anatomy at anatomical height z (X: (1, nx), Y: (ny, 1))."""
    hu = a.hu
    img = np.full(np.broadcast_shapes(X.shape, Y.shape), AIR, np.float32)
    # table: a curved carbon-fibre shell (two thin walls around foam) under the body
    table_y = a.ayb + 6 + 0.0015 * X ** 2
    tab = np.abs(X) < 230
    img = np.where(tab & (Y > table_y) & (Y < table_y + 2.5), np.float32(150), img)
    img = np.where(tab & (Y >= table_y + 2.5) & (Y < table_y + 22), np.float32(-930), img)
    img = np.where(tab & (Y >= table_y + 22) & (Y < table_y + 24.5), np.float32(150), img)
    shoulder = 1 + 0.1 * float(sstep(a.z_car + 40, a.z_apex + 40, z))
    bax = a.axb * shoulder
    body_u = squircle(X, Y, 0, 0, bax, a.ayb, np.where(Y > 0, 0.55, 0.2))
    body = body_u <= 1
    img[body] = hu["fat"]
    inner = squircle(X, Y, 0, 0, bax - 3, a.ayb - 3, np.where(Y > 0, 0.55, 0.2)) <= 1  # under the skin
    axc, ayc, cyc = (float(v) for v in cavity_axes(a, z))
    cav_u = squircle(X, Y, 0, cyc, axc, ayc, 0.12)
    cavity = cav_u <= 1
    # chest wall: intercostal layer with the ribs, a thin fat plane, then the outer muscles
    # (pectoralis in front, serratus / latissimus at the side, scapular muscles behind, upper chest)
    rad = np.sqrt(X ** 2 + (Y - cyc) ** 2)
    rho = rad * (1 - 1 / np.sqrt(np.maximum(cav_u, 1e-6)))  # mm outside the cavity along the ray
    phi = np.arctan2(np.abs(X), (Y - cyc) / ayc * axc)  # 0 posterior, pi anterior
    upper = float(sstep(a.z_car - 80, a.z_car + 10, z))

    def band(lo, hi):
        return sstep(lo - 0.25, lo + 0.25, phi) * (1 - sstep(hi - 0.25, hi + 0.25, phi))

    t_out = (a.m_pect * (0.35 + 0.65 * upper) * band(0.62 * np.pi, 0.97 * np.pi) + a.m_lat * band(0.25 * np.pi, 0.62 * np.pi)
             + 14 * upper * band(0.12 * np.pi, 0.4 * np.pi))
    wall = (rho < 11) | ((rho > 12.5) & (rho < 12.5 + t_out))
    r_ps = a.rvb + 12
    depth = a.ayb - 0.6 * a.tf - (a.ys + a.rvb)
    paraspinal = ((np.abs(X) - r_ps) / (r_ps + 4)) ** 2 + ((Y - a.ys - a.rvb - depth / 2) / (depth / 2 + 2)) ** 2 <= 1
    img[(wall | paraspinal) & inner & ~cavity] = hu["muscle"]
    dome = dome_z(a, X, Y)
    below = np.clip((dome - z) / zthick + 0.5, 0, 1)  # partial volume across the diaphragm
    img[cavity] = hu["fat"] + 15
    masks = {}
    # lungs
    lung = (cavity & ~mediastinum_strip(a, X, Y, z) & ~spine_region(a, X, Y) & (heart_u(a, X, Y, z, 4.0) > 1)
            & apex_ok(a, X, Y, z))
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
    hu_u = heart_u(a, X, Y, z)
    peri = (heart_u(a, X, Y, z, 4.0) <= 1) & cavity & (below < 0.5)
    img[peri] = hu["fat"]
    heart = (hu_u <= 1) & cavity & (below < 0.5)
    img[heart] = hu["myo"]
    pool = heart_u(a, X, Y, z, -9.0) <= 1
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
