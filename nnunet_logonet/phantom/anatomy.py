"""Synthetic contrast-enhanced abdominal CT: one volume and its organ labels.

Why a phantom: the plugin must run end to end on a machine that cannot download data, and the
problem should look like the paper's (BTCV / MSD abdominal CT), not like blobs. Each case is a
portal-venous-phase abdomen drawn from a random patient: a body with skin, subcutaneous fat and
a muscle wall, lower ribs, spine (vertebral bodies, discs, posterior elements), lung bases and
heart above the diaphragm, liver, gallbladder, crescent-shaped lobulated spleen, both kidneys,
aorta with its bifurcation, IVC, stomach, pancreas, bowel loops with gas, psoas muscles and, in
longer scans, the iliac wings and bladder. Hounsfield values follow the tissue and the per-case
contrast timing; partial-volume blur and correlated noise come last.

Geometry. Anatomy is laid out in an adult-sized frame in millimetres (x to the patient's left,
y posterior, z superior, origin at the first lumbar vertebra), i.e. LPS as in ITK with an
identity direction. The volume holds ``size`` x ``size`` voxels in-plane over a field of view
that just contains the body, and a case-dependent number of slices. Spacings are those of a
512-matrix CT (in-plane ~0.65-0.9 mm, slices 1.25-3 mm) and the anatomy is drawn at scale
``size / 512``: at ``size=512`` it is a life-size adult, at the default 64 it is a 1:8 scale
model with the same voxel grid shape and anisotropy as a CT downsampled to 64 x 64.

Randomness. Every random choice is drawn from the case's generator in an order that does not
depend on ``size``; only the acquisition noise (drawn last) does. So the same seed gives the
same patient at every size, and the same bytes at the same size.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits

__all__ = ["LABELS", "MIN_SIZE", "MAX_SIZE", "REFERENCE_MATRIX", "PhantomCase", "generate_case"]

# BTCV / MSD organ names, renumbered consecutively (nnU-Net requires consecutive labels).
LABELS: dict[str, int] = {
    "background": 0,
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "gallbladder": 4,
    "liver": 5,
    "aorta": 6,
}
MIN_SIZE = 32  # aorta and gallbladder are then about two voxels wide; below, they vanish
MAX_SIZE = 512  # a life-size CT matrix; memory grows with size**3
REFERENCE_MATRIX = 512  # spacings are those of a CT with this in-plane matrix


class PhantomCase(NamedTuple):
    """One generated case: arrays in (z, y, x) order, spacing and origin in (x, y, z) mm."""

    image: np.ndarray  # int16 Hounsfield units
    label: np.ndarray  # uint8, values of LABELS
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


class _Grid:
    """Voxel-centre coordinates (mm, adult frame) and the HU / label volumes being painted."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        self.x, self.y, self.z = (np.asarray(v, dtype=np.float32) for v in (x, y, z))
        shape = (len(self.z), len(self.y), len(self.x))
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)

    def box(self, lo, hi):
        """Slices and broadcastable coordinates of the voxels inside an (x, y, z) mm box."""
        slices = []
        for coords, a, b in zip((self.z, self.y, self.x), lo[::-1], hi[::-1]):
            i0, i1 = np.searchsorted(coords, a), np.searchsorted(coords, b, side="right")
            if i1 <= i0:
                return None
            slices.append(slice(int(i0), int(i1)))
        sz, sy, sx = slices
        return (
            (sz, sy, sx),
            self.z[sz][:, None, None],
            self.y[sy][None, :, None],
            self.x[sx][None, None, :],
        )

    def everything(self):
        return self.box((-np.inf,) * 3, (np.inf,) * 3)

    def paint(self, sl, mask: np.ndarray, hu, label: int | None = 0) -> None:
        """Set HU (scalar or array over the box) and label (None keeps labels) where mask."""
        hu_view, label_view = self.hu[sl], self.label[sl]
        mask = np.broadcast_to(mask, hu_view.shape)
        if np.ndim(hu) == 0:
            hu_view[mask] = hu
        else:
            hu_view[mask] = np.broadcast_to(hu, hu_view.shape)[mask]
        if label is not None:
            label_view[mask] = label


def _bspline_weights(coords: np.ndarray, start: float, step: float, n: int) -> np.ndarray:
    """Cubic B-spline weights (len(coords), n) of lattice nodes start + k * step."""
    t = (np.asarray(coords, dtype=np.float64) - start) / step
    base = np.floor(t).astype(int) - 1
    weights = np.zeros((len(t), n))
    rows = np.arange(len(t))
    for k in range(4):
        idx = base + k
        d = np.abs(t - idx)
        w = np.where(d < 1, (4 - 6 * d**2 + 3 * d**3) / 6, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
        np.add.at(weights, (rows, np.clip(idx, 0, n - 1)), w)
    weights[weights < 1e-6] = 0.0  # no float32 subnormals: they make BLAS crawl
    return weights


class _Field:
    """Smooth unit-variance random field on a lattice fixed in mm (independent of the grid)."""

    def __init__(self, rng: np.random.Generator, step: float, lo, hi) -> None:
        self.step = float(step)
        self.start = [float(v) - 2 * step for v in lo]
        self.n = [int(np.ceil((b - a) / step)) + 5 for a, b in zip(lo, hi)]
        self.values = rng.standard_normal(self.n[::-1]).astype(np.float32)  # (z, y, x)

    def __call__(self, z, y, x) -> np.ndarray:
        """Field at the tensor grid of 1D (or broadcastable 3D) coordinates, shape (z, y, x)."""
        wz, wy, wx = (
            _bspline_weights(np.ravel(c), s, self.step, n).astype(np.float32)
            for c, s, n in zip((z, y, x), self.start[::-1], self.n[::-1])
        )
        lz, ly, lx = self.values.shape
        out = (wz @ self.values.reshape(lz, ly * lx)).reshape(len(wz), ly, lx)
        out = np.tensordot(np.matmul(wy, out), wx, axes=([2], [1]))  # (z, y, x)
        norm = np.sqrt((wz * wz).sum(1)[:, None, None] * (wy * wy).sum(1)[None, :, None]
                       * (wx * wx).sum(1)[None, None, :])
        return out / norm


def _rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix: yaw about z, then pitch about x, then roll about y (radians)."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def _ellipsoid(Z, Y, X, center, semi, rot=None) -> np.ndarray:
    """Normalised squared radius of a (rotated) ellipsoid: < 1 inside."""
    d = (X - center[0], Y - center[1], Z - center[2])
    if rot is not None:  # coordinates in the ellipsoid's own axes: R^T d
        d = tuple(rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3))
    return sum((di / si) ** 2 for di, si in zip(d, semi))


def _ellipsoid_box(center, semi, grow: float = 1.4):
    """Bounding box of the ellipsoid grown by ``grow`` (room for surface perturbations)."""
    r = max(semi) * grow
    return [c - r for c in center], [c + r for c in center]


def _tube(Z, Y, X, points, radii) -> np.ndarray:
    """Signed distance (mm) to a tube of varying radius around a polyline: < 0 inside."""
    points = np.asarray(points, dtype=np.float32)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float32), (len(points),))
    best = None
    for (p0, p1), (r0, r1) in zip(zip(points[:-1], points[1:]), zip(radii[:-1], radii[1:])):
        seg = p1 - p0
        length2 = float(seg @ seg) or 1e-6
        dx, dy, dz = X - p0[0], Y - p0[1], Z - p0[2]
        t = np.clip((dx * seg[0] + dy * seg[1] + dz * seg[2]) / length2, 0.0, 1.0)
        dist = np.sqrt((dx - t * seg[0]) ** 2 + (dy - t * seg[1]) ** 2 + (dz - t * seg[2]) ** 2)
        sd = dist - (r0 + t * (r1 - r0))
        best = sd if best is None else np.minimum(best, sd)
    return best


def _tube_box(points, radii):
    points = np.asarray(points, dtype=np.float64)
    r = float(np.max(radii))
    return points.min(axis=0) - r, points.max(axis=0) + r


# ----------------------------------------------------------------------------------------------
# The patient
# ----------------------------------------------------------------------------------------------


class _Body:
    """Body outline and its layers as superellipses whose half-axes vary along z."""

    def __init__(self, rng: np.random.Generator, lo, hi) -> None:
        self.a = rng.uniform(145, 185)  # lateral half-width at L1
        self.b_ant = self.a * rng.uniform(0.62, 0.85)  # belly
        self.b_post = self.a * rng.uniform(0.55, 0.66)
        self.p_ant, self.p_post = rng.uniform(2.0, 2.5), rng.uniform(2.7, 3.5)
        self.waist = rng.uniform(-0.04, 0.04), rng.uniform(0.0, 0.10)  # linear, quadratic in z
        fat = rng.uniform(8, 38)
        self.fat = {"ant": fat * rng.uniform(1.0, 1.6), "lat": fat * rng.uniform(0.8, 1.3),
                    "post": fat * rng.uniform(0.5, 1.0)}
        self.muscle = {"ant": rng.uniform(8, 14), "lat": rng.uniform(10, 18),
                       "post": rng.uniform(10, 16)}
        self.back_to_spine = rng.uniform(70, 90)  # back skin to vertebral-body centre
        self.paraspinal_width = rng.uniform(50, 65)
        self.wobble = _Field(rng, 70.0, lo, hi)
        self.wobble_amp = rng.uniform(0.015, 0.035)

    def profile(self, Z) -> np.ndarray:
        s = Z / 200.0
        return 1.0 + self.waist[0] * s + self.waist[1] * s**2

    @property
    def y_spine(self) -> float:
        return self.b_post - self.back_to_spine

    def attach(self, Z, Y, X) -> None:
        """Fix the voxel grid (full-volume broadcastable coordinates) that rho() is called on."""
        self._wobble = 1.0 + self.wobble_amp * self.wobble(Z, Y, X)

    def rho(self, Z, Y, X, depth: str = "skin", grow: float = 0.0) -> np.ndarray:
        """Normalised superellipse radius of a layer boundary on the attached grid (< 1 inside).

        depth: "skin", "fat" (inner edge of subcutaneous fat), "cavity" (inner edge of the
        muscle wall, i.e. the abdominal/thoracic cavity). grow: mm added to the half-axes.
        """
        d_lat = d_ant = d_post = 0.0
        if depth in ("fat", "cavity"):
            d_lat, d_ant, d_post = self.fat["lat"], self.fat["ant"], self.fat["post"]
        if depth == "cavity":
            d_lat += self.muscle["lat"]
            d_ant += self.muscle["ant"]
            d_post += self.muscle["post"]
        k = self.profile(Z)
        ax = np.abs(X / (self.a * k - d_lat + grow))
        b_ant = self.b_ant * k - d_ant + grow
        b_post = self.b_post * k - d_post + grow
        if depth == "cavity":
            # paraspinal muscles: the cavity's back wall reaches forward to the spine
            bump = np.maximum(self.b_post * k - d_post - self.y_spine - 6.0, 0.0)
            b_post = b_post - bump * np.exp(-((X / self.paraspinal_width) ** 4))
        out = np.empty(np.broadcast_shapes(Z.shape, Y.shape, X.shape), dtype=np.float32)
        front = Y[0, :, 0] <= 0
        for sel, b, p in ((front, b_ant, self.p_ant), (~front, b_post, self.p_post)):
            out[:, sel] = (ax**p + np.abs(Y[:, sel] / b) ** p) ** (1.0 / p)
        return out * self._wobble


def _diaphragm(body: _Body, z_dome_r: float, z_dome_l: float, depth: float):
    """Height of the diaphragm z(x, y): two domes, deepest at the back (costophrenic recess)."""

    def height(Y, X):
        side = 1.0 / (1.0 + np.exp(-X / 35.0))  # 0 right, 1 left
        dome = z_dome_r + (z_dome_l - z_dome_r) * side
        rr = (X / (body.a * 0.85)) ** 2 + (Y / (body.b_ant * 0.9)) ** 2
        recess = np.where(Y > 0, 1.35, 1.0)
        tendon = 25.0 * np.exp(-((X - 10) / 45.0) ** 2 - ((Y + 30) / 50.0) ** 2)
        return dome - depth * rr * recess - tendon

    return height


def _hu_texture(field: _Field, amp: float, Z, Y, X, base: float) -> np.ndarray:
    return base + amp * field(Z, Y, X)


def generate_case(seed: int | np.random.Generator | np.random.SeedSequence, *, size: int = 64,
                  ) -> PhantomCase:
    """Draw one patient and image it on a ``size`` x ``size`` x nz grid.

    Args:
        seed: an int, SeedSequence or Generator; the same seed gives the same case.
        size: in-plane voxels per axis (MIN_SIZE..MAX_SIZE); slices follow from the scan
            length and slice spacing (about 0.3-0.6 x size).

    Returns:
        PhantomCase(image int16 HU (z, y, x), label uint8 (z, y, x), spacing (x, y, z) mm,
        origin (x, y, z) mm).
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
        raise ValueError(f"size must be an int, got {type(size).__name__}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    # the lattice products are tiny: threaded BLAS only adds overhead (5x on a busy CPU)
    with threadpool_limits(limits=1, user_api="blas"):
        return _draw_case(rng, int(size))


def _draw_case(rng: np.random.Generator, size: int) -> PhantomCase:
    """The patient, the scan and the image; see generate_case."""

    # ---- levels along z (mm, 0 = L1) and field of view --------------------------------------
    z_dome_r = rng.uniform(140, 180)
    z_dome_l = z_dome_r - rng.uniform(10, 30)
    z_bif = -rng.uniform(85, 120)  # aortic bifurcation (L4)
    z_top = z_dome_r + rng.uniform(15, 45)
    z_bot = z_bif - rng.uniform(35, 150)  # abdomen only ... down into the pelvis
    lo, hi = (-260.0, -260.0, z_bot - 40), (260.0, 260.0, z_top + 40)
    body = _Body(rng, lo, hi)
    enhance = rng.uniform(0.45, 1.0)  # contrast timing: HU gained by enhancing tissue

    widest = float(np.max(body.profile(np.linspace(z_bot, z_top, 32))))
    fov = 2 * body.a * widest * rng.uniform(1.06, 1.16)
    y_center = (body.b_post - body.b_ant) / 2 + rng.uniform(-8, 8)
    # slice spacing of the 512-matrix scan: thin and thick reconstructions both occur
    slice_mm = float(rng.choice([1.25, 1.5, 2.0, 2.5, 3.0], p=[0.2, 0.3, 0.25, 0.15, 0.1]))
    scale = size / REFERENCE_MATRIX
    dxy = fov / size  # adult-frame spacing of this grid
    dz = slice_mm / scale
    nz = max(int(round((z_top - z_bot) / dz)), 8)
    x = (np.arange(size) - (size - 1) / 2) * dxy
    y = (np.arange(size) - (size - 1) / 2) * dxy + y_center
    z = z_bot + np.arange(nz) * dz
    grid = _Grid(x, y, z)

    # ~15 % of patients lack one organ: splenectomy 4 %, nephrectomy 2 + 2 %, cholecystectomy 7 %
    missing = rng.random()
    no_spleen = missing < 0.04
    no_kidney = "right" if 0.04 <= missing < 0.06 else "left" if 0.06 <= missing < 0.08 else None
    no_gallbladder = 0.08 <= missing < 0.15

    # texture and shape fields on lattices fixed in mm over the field of view
    fov_lo = (-fov / 2, y_center - fov / 2, z_bot)
    fov_hi = (fov / 2, y_center + fov / 2, z_top)
    fields = {name: _Field(rng, step, fov_lo, fov_hi) for name, step in (
        ("fat", 16.0), ("muscle", 16.0), ("organ", 12.0), ("bowel", 16.0), ("gas", 20.0),
        ("lung", 10.0), ("shape", 30.0), ("lobes", 16.0))}

    sl, Z, Y, X = grid.everything()
    body.attach(Z, Y, X)

    # ---- table, body wall ------------------------------------------------------------------
    table_y = body.b_post * float(body.profile(np.float32(0.0))) + rng.uniform(4, 12)
    table = (Y > table_y) & (Y < table_y + 8) & (np.abs(X) < body.a * 1.1)
    grid.paint(sl, table & np.ones_like(Z, dtype=bool), 150.0)
    rho_skin = body.rho(Z, Y, X, "skin")
    grid.paint(sl, rho_skin < 1, rng.uniform(30, 50))
    fat_texture = fields["fat"](Z, Y, X)
    grid.paint(sl, body.rho(Z, Y, X, "skin", grow=-2.5) < 1,
               rng.uniform(-110, -90) + 12 * fat_texture)
    rho_fat = body.rho(Z, Y, X, "fat")
    muscle_hu = rng.uniform(40, 55) + 10 * enhance
    grid.paint(sl, rho_fat < 1, _hu_texture(fields["muscle"], 6, Z, Y, X, muscle_hu))
    rho_cav = body.rho(Z, Y, X, "cavity")
    cavity = rho_cav < 1
    visceral_fat = rng.uniform(-105, -85) + 10 * fat_texture
    grid.paint(sl, cavity, visceral_fat)

    diaphragm = _diaphragm(body, z_dome_r, z_dome_l, rng.uniform(70, 100))
    z_dia = diaphragm(Y, X)
    thorax = cavity & (Z > z_dia + 5)  # the diaphragm muscle is ~5 mm thick
    grid.paint(sl, cavity & (Z > z_dia - 1), muscle_hu)
    abdomen = cavity & (Z < z_dia - 4) & (rho_cav < 0.97)

    # ---- thorax: lung bases and heart ---------------------------------------------------------
    lung = _hu_texture(fields["lung"], 25, Z, Y, X, rng.uniform(-870, -820))
    vessels = fields["lung"](Z, Y, X) > 1.9
    grid.paint(sl, thorax, np.where(vessels, -150.0, lung))
    heart_c = (rng.uniform(5, 30), -body.b_ant * 0.35, z_dome_l + rng.uniform(35, 60))
    heart_s = (rng.uniform(55, 70), rng.uniform(45, 55), rng.uniform(55, 70))
    q = _ellipsoid(Z, Y, X, heart_c, heart_s, _rotation(yaw=rng.uniform(0.3, 0.7)))
    heart = (q < 1) & cavity & (Z > z_dia - 2)
    grid.paint(sl, heart & (q > 0.75), rng.uniform(-90, -70))  # pericardial fat
    grid.paint(sl, heart & (q < 0.8), 45 + 60 * enhance)  # myocardium
    grid.paint(sl, heart & (q < 0.45), 45 + 130 * enhance)  # blood pool

    # ---- key positions ------------------------------------------------------------------------
    y_spine = body.y_spine
    r_vb = rng.uniform(16, 20)
    y_front_spine = y_spine - r_vb
    cav_a = body.a - body.fat["lat"] - body.muscle["lat"]  # cavity half-width at L1
    cav_ant = body.b_ant - body.fat["ant"] - body.muscle["ant"]

    # ---- bowel loops (unlabelled; gas, fluid and sometimes oral contrast) ---------------------
    oral_contrast = rng.random() < 0.3
    z_bowel_top = z_dome_r - rng.uniform(100, 130)
    # loops fill the front and, lower down, the flanks (colon) around the psoas and spine
    bowel_sel = abdomen & (Z < z_bowel_top + 40 * np.tanh(-X / 60.0)) \
        & (Y < y_spine + 5 + 40 * (X / cav_a) ** 2)
    bf = fields["bowel"](Z, Y, X)
    gas = fields["gas"](Z, Y, X)
    threshold = rng.uniform(-0.3, 0.2)
    loops = bowel_sel & (bf > threshold)
    lumen = loops & (bf > threshold + 0.35)
    grid.paint(sl, loops, 35 + 30 * enhance)  # bowel wall
    content = np.where(gas > 1.3, -950.0, np.where(
        oral_contrast & (gas < -0.6), rng.uniform(180, 300), rng.uniform(0, 25)))
    grid.paint(sl, lumen, content + 8 * fields["organ"](Z, Y, X))

    # ---- pelvis: iliac wings, bladder (longer scans only) ----------------------------------
    z_crest = z_bif - rng.uniform(0, 20)
    bone_hu = rng.uniform(650, 950)
    marrow_hu = rng.uniform(180, 280)
    if z_bot < z_crest:
        wing_r = rng.uniform(0.8, 0.9)
        for side in (-1, 1):
            # a curved plate: an arc of an ellipse around the pelvis, widening downward
            t = np.clip((z_crest - Z) / 120.0, 0, 1)
            cx, cy = side * cav_a * (0.45 - 0.15 * t), y_spine - 10
            u = (X - cx) / (cav_a * 0.55 * wing_r * (1 - 0.35 * t))
            v = (Y - cy) / (55.0 + 20 * t)
            r = np.sqrt(u**2 + v**2)
            front = cy - 15 - 25 * t  # the wing's anterior edge moves forward lower down
            arc = (np.abs(r - 1) < 0.05) & (side * X > side * cx) & (Z < z_crest) & (Y > front)
            iliacus = (r < 0.93) & (r > 0.6) & (side * X > side * cx) & (Z < z_crest) & (Y > front)
            grid.paint(sl, iliacus & cavity, muscle_hu)
            grid.paint(sl, arc, marrow_hu)
            grid.paint(sl, arc & (np.abs(r - 1) > 0.035), bone_hu)
        if z_bot < z_bif - 110:
            q = _ellipsoid(Z, Y, X, (0, -cav_ant * 0.45, z_bif - rng.uniform(150, 175)),
                           (rng.uniform(35, 50), rng.uniform(30, 40), rng.uniform(30, 45)))
            grid.paint(sl, (q < 1) & cavity, rng.uniform(0, 15))

    # ---- stomach -------------------------------------------------------------------------------
    st_c = (cav_a * rng.uniform(0.25, 0.4), -cav_ant * rng.uniform(0.2, 0.4),
            z_dome_l - rng.uniform(55, 75))
    st_s = (rng.uniform(35, 50), rng.uniform(30, 42), rng.uniform(45, 65))
    st_rot = _rotation(yaw=rng.uniform(-0.6, -0.2), pitch=rng.uniform(-0.3, 0.1))
    lo_b, hi_b = _ellipsoid_box(st_c, st_s)
    b = grid.box(lo_b, hi_b)
    st_gas_level = st_c[1] - st_s[1] * rng.uniform(0.1, 0.6)
    st_fill = rng.uniform(-30, 40)
    if b is not None:
        bsl, bZ, bY, bX = b
        q = _ellipsoid(bZ, bY, bX, st_c, st_s, st_rot)
        inside = abdomen[bsl]
        grid.paint(bsl, (q < 1) & inside, 40 + 40 * enhance)
        grid.paint(bsl, (q < 0.8) & inside, np.where(bY < st_gas_level, -950.0, st_fill))

    # ---- pancreas and splenic / portal veins (unlabelled) ---------------------------------
    z_panc = rng.uniform(5, 35)
    spleen_hilum = (cav_a * 0.6, y_spine - 5, z_panc + 15)
    panc_pts = [spleen_hilum, (cav_a * 0.25, y_front_spine - 25, z_panc + 5),
                (-10, y_front_spine - 35, z_panc), (-45, y_front_spine - 30, z_panc - 20)]
    panc_r = [rng.uniform(8, 12), rng.uniform(10, 14), rng.uniform(11, 15), rng.uniform(15, 22)]
    b = grid.box(*_tube_box(panc_pts, panc_r))
    if b is not None:
        bsl, bZ, bY, bX = b
        sd = _tube(bZ, bY, bX, panc_pts, panc_r) + 4 * fields["lobes"](bZ, bY, bX)
        grid.paint(bsl, (sd < 0) & abdomen[bsl], 45 + 60 * enhance + 6 * fields["organ"](bZ, bY, bX))
        sd_v = _tube(bZ, bY, bX, [p[:1] + (p[1] + 8,) + p[2:] for p in panc_pts[:3]], 4.5)
        grid.paint(bsl, (sd_v < 0) & abdomen[bsl], 50 + 140 * enhance)

    # ---- kidneys (labelled), renal sinus, renal veins ------------------------------------------
    kidney_hu = 40 + 150 * enhance
    z_kl = rng.uniform(-10, 20)
    z_kr = z_kl - rng.uniform(10, 30)
    kidneys = {}
    for name, side, zc in (("right_kidney", -1, z_kr), ("left_kidney", 1, z_kl)):
        c = (side * (r_vb + rng.uniform(40, 55)), y_spine + rng.uniform(-5, 12), zc)
        s = (rng.uniform(25, 32), rng.uniform(26, 33), rng.uniform(48, 62))
        rot = _rotation(yaw=side * rng.uniform(0.4, 0.8), roll=side * rng.uniform(0.1, 0.3))
        kidneys[name] = (c, s, rot)
        if (name == "right_kidney" and no_kidney == "right") or \
                (name == "left_kidney" and no_kidney == "left"):
            continue
        b = grid.box(*_ellipsoid_box(c, s, 1.5))
        if b is None:
            continue
        bsl, bZ, bY, bX = b
        q = _ellipsoid(bZ, bY, bX, c, s, rot) + 0.08 * fields["shape"](bZ, bY, bX)
        inside = cavity[bsl]
        grid.paint(bsl, (q < 1.35) & inside, rng.uniform(-100, -85))  # perirenal fat
        # hilum: medial notch with sinus fat and the renal pelvis
        hilum_c = (c[0] - side * s[0] * 0.75, c[1] - 6, c[2])
        qh = _ellipsoid(bZ, bY, bX, hilum_c, (s[0] * 0.6, s[1] * 0.45, s[2] * 0.45), rot)
        parenchyma = (q < 1) & (qh > 1) & inside
        cortex = q > 0.55
        hu = np.where(cortex, kidney_hu, 40 + 110 * enhance) + 6 * fields["organ"](bZ, bY, bX)
        grid.paint(bsl, parenchyma, hu, LABELS[name])
        grid.paint(bsl, (q < 1) & (qh <= 1) & inside, np.where(qh < 0.35, 10.0, -60.0))
        vein_end = (side * 22, y_front_spine - (12 if side > 0 else 0), zc + 5)
        vb = grid.box(*_tube_box([hilum_c, vein_end], 5))
        if vb is not None:
            vsl, vZ, vY, vX = vb
            vein = (_tube(vZ, vY, vX, [hilum_c, vein_end], 5) < 0) & cavity[vsl] \
                & (grid.label[vsl] == 0)
            grid.paint(vsl, vein, 45 + 130 * enhance)

    # ---- liver (labelled) with vessels and the occasional cyst --------------------------------
    liver_scale = rng.uniform(0.85, 1.15)
    right_c = (-cav_a * rng.uniform(0.35, 0.5), rng.uniform(-20, 10), z_dome_r - 80 * liver_scale)
    right_s = np.array([rng.uniform(85, 105), rng.uniform(85, 105), rng.uniform(80, 100)]) * liver_scale
    left_c = (rng.uniform(10, 40), -cav_ant * rng.uniform(0.3, 0.5), z_dome_r - rng.uniform(40, 60))
    left_s = np.array([rng.uniform(55, 80), rng.uniform(30, 40), rng.uniform(35, 50)]) * liver_scale
    liver_rot = _rotation(yaw=rng.uniform(-0.3, 0.1), pitch=rng.uniform(-0.2, 0.2))
    lo_l = np.minimum(_ellipsoid_box(right_c, right_s)[0], _ellipsoid_box(left_c, left_s)[0])
    hi_l = np.maximum(_ellipsoid_box(right_c, right_s)[1], _ellipsoid_box(left_c, left_s)[1])
    b = grid.box(lo_l, hi_l)
    liver_hu = rng.uniform(52, 65) + 45 * enhance
    gb_c = (right_c[0] + rng.uniform(20, 40), -cav_ant * rng.uniform(0.3, 0.5),
            right_c[2] - right_s[2] * rng.uniform(0.45, 0.65))
    gb_s = (rng.uniform(14, 20), rng.uniform(14, 20), rng.uniform(30, 45))
    gb_rot = _rotation(pitch=rng.uniform(0.3, 0.7), yaw=rng.uniform(-0.3, 0.3))
    n_cysts = int(rng.poisson(0.6))
    cysts = [(rng.uniform(-1, 1, 3), rng.uniform(5, 15)) for _ in range(n_cysts)]
    if b is not None:
        bsl, bZ, bY, bX = b
        shape = 0.12 * fields["shape"](bZ, bY, bX)
        q_right = _ellipsoid(bZ, bY, bX, right_c, right_s, liver_rot) + shape
        q_left = _ellipsoid(bZ, bY, bX, left_c, left_s, liver_rot) + shape
        # smooth union of the two lobes; the left lobe thins toward the left
        q = np.minimum(q_right, q_left) - 0.15 * np.exp(-((q_right - q_left) / 0.3) ** 2)
        # no liver behind the IVC, around the aorta and the crura (retrocrural space)
        retrocrural = (bX > -(r_vb + 6)) & (bY > y_front_spine - 18)
        liver = (q < 1) & abdomen[bsl] & (grid.label[bsl] == 0) & ~retrocrural
        grid.paint(bsl, liver, liver_hu + 5 * fields["organ"](bZ, bY, bX), LABELS["liver"])
        # portal and hepatic vein branches: bright tubes radiating from the hilum
        porta = np.array(right_c) + np.array([right_s[0] * 0.35, -right_s[1] * 0.2, -right_s[2] * 0.3])
        for _ in range(6):
            direction = rng.normal(size=3) * np.array([1.0, 0.7, 1.0]) + np.array([-0.3, 0, 0.8])
            end = porta + direction / np.linalg.norm(direction) * rng.uniform(50, 90) * liver_scale
            vessel = (_tube(bZ, bY, bX, [porta, end], [rng.uniform(4, 7), 1.5]) < 0) & liver
            grid.paint(bsl, vessel, 50 + 120 * enhance, LABELS["liver"])
        for offset, radius in cysts:  # hypodense lesions stay part of the liver (as in BTCV)
            cc = np.array(right_c) + offset * right_s * 0.5
            cyst = (_ellipsoid(bZ, bY, bX, cc, (radius,) * 3) < 1) & liver
            grid.paint(bsl, cyst, rng.uniform(0, 25), LABELS["liver"])
        if not no_gallbladder:
            qg = _ellipsoid(bZ, bY, bX, gb_c, gb_s, gb_rot) + 0.1 * fields["lobes"](bZ, bY, bX)
            gb = (qg < 1) & abdomen[bsl]
            grid.paint(bsl, gb, rng.uniform(0, 20), LABELS["gallbladder"])

    # ---- spleen (labelled): lobulated crescent against the left posterolateral ribs ----------
    if not no_spleen:
        spleen_scale = rng.uniform(0.85, 1.2) * (rng.uniform(1.2, 1.5) if rng.random() < 0.1 else 1.0)
        phi = rng.uniform(0.5, 0.9)  # polar angle from +x toward posterior
        radial = np.array([np.cos(phi), np.sin(phi), 0.0])
        s = np.array([rng.uniform(28, 36), rng.uniform(50, 65), rng.uniform(45, 60)]) * spleen_scale
        wall = np.array([cav_a * np.cos(phi), (body.b_post - body.back_to_spine + 40) * np.sin(phi), 0])
        c = wall - radial * s[0] * 0.7
        # the upper pole sits just under the (here already sloping) left hemidiaphragm
        c[2] = float(diaphragm(np.float32(c[1]), np.float32(c[0]))) - s[2] * rng.uniform(0.75, 0.95)
        rot = _rotation(yaw=phi, pitch=rng.uniform(-0.3, 0.3))
        offset = rng.uniform(1.2, 1.5)  # the concave visceral surface: carve from the medial side
        inner_c = c - radial * s[0] * offset
        inner_s = s * np.array([offset + rng.uniform(0.15, 0.4), 0.7, 0.8])
        b = grid.box(*_ellipsoid_box(c, s, 1.6))
        if b is not None:
            bsl, bZ, bY, bX = b
            q = _ellipsoid(bZ, bY, bX, c, s, rot) + 0.25 * fields["lobes"](bZ, bY, bX)
            q_in = _ellipsoid(bZ, bY, bX, inner_c, inner_s, rot)
            spleen = (q < 1) & (q_in > 1) & abdomen[bsl] & (grid.label[bsl] == 0)
            grid.paint(bsl, spleen, rng.uniform(45, 55) + 65 * enhance
                       + 5 * fields["organ"](bZ, bY, bX), LABELS["spleen"])

    # ---- aorta (labelled above the bifurcation), iliac arteries, IVC -----------------------
    r_ao = rng.uniform(9, 12.5)
    x_ao = rng.uniform(4, 14)
    y_ao = y_front_spine - r_ao - rng.uniform(1, 5)
    aorta_pts = [(x_ao + 15, y_spine - 5, z_top + 20), (x_ao + 8, y_ao + 2, z_dome_l - 40),
                 (x_ao, y_ao, 0.0), (x_ao - 3, y_ao - 3, z_bif)]
    aorta_r = [r_ao + 2, r_ao + 1, r_ao, r_ao - 2]
    ivc_pts = [(-r_vb - rng.uniform(4, 10), y_front_spine - 12, z_bif - 15),
               (-r_vb - 8, y_front_spine - 15, 0.0), (-r_vb - 12, y_front_spine - 10, z_dome_r - 30),
               (-15, y_front_spine - 30, z_top + 20)]
    sl, Z, Y, X = grid.everything()
    ivc = (_tube(Z, Y, X, ivc_pts, rng.uniform(9, 12)) < 0) & cavity
    grid.paint(sl, ivc, 45 + 100 * enhance)
    sd_aorta = _tube(Z, Y, X, aorta_pts, aorta_r)
    crura = (sd_aorta < rng.uniform(5, 8)) & (Z > -30) & (Z < z_dome_l - 15) & (grid.label[sl] == 0)
    grid.paint(sl, crura, muscle_hu)
    aorta = (sd_aorta < 0) & (Z >= z_bif)
    grid.paint(sl, aorta, 45 + 200 * enhance, LABELS["aorta"])
    for side in (-1, 1):
        iliac = [(x_ao - 3, y_ao - 3, z_bif), (x_ao + side * 30, y_ao - 5, z_bif - 60),
                 (side * cav_a * 0.55, y_ao + 10, z_bif - 160)]
        art = (_tube(Z, Y, X, iliac, r_ao * 0.6) < 0) & (Z < z_bif) & cavity
        grid.paint(sl, art, 45 + 200 * enhance)
    if rng.random() < 0.4:  # calcified plaque in the aortic wall
        for _ in range(int(rng.integers(1, 4))):
            zc = rng.uniform(z_bif, 0)
            ang = rng.uniform(0, 2 * np.pi)
            cc = (x_ao + r_ao * np.cos(ang), y_ao + r_ao * np.sin(ang), zc)
            plaque = _ellipsoid(Z, Y, X, cc, (3, 3, 6)) < 1
            grid.paint(sl, plaque, rng.uniform(400, 900), LABELS["aorta"])

    # ---- psoas muscles, spine, ribs ------------------------------------------------------------
    for side in (-1, 1):
        t = np.clip((20 - Z) / 140.0, 0, 1)
        c = (side * (r_vb + 4 + 22 * t), y_spine + 2 - 20 * t)
        rr = 6 + 18 * t
        psoas = (((X - c[0]) / rr) ** 2 + ((Y - c[1]) / (rr * 0.85)) ** 2 < 1) & (Z < 25) & cavity
        grid.paint(sl, psoas, muscle_hu + 4 * fields["muscle"](Z, Y, X))

    period = rng.uniform(30, 36)
    phase = ((Z - rng.uniform(0, period)) % period) / period
    disc = phase < 0.2
    rz = r_vb * (1 - 0.1 * Z / 150.0)
    q_vb = (X / (rz * 1.15)) ** 2 + ((Y - y_spine) / rz) ** 2
    grid.paint(sl, q_vb < 1, np.where(disc, rng.uniform(70, 100), np.where(q_vb > 0.7, bone_hu, marrow_hu)))
    y_canal = y_spine + rz + 9
    canal = (X / 9) ** 2 + ((Y - y_canal) / 8) ** 2
    arch = (canal > 1) & (canal < 2.6) & (Y > y_spine + rz * 0.5) & ~disc
    # the spinous process stops 12-20 mm under the back skin
    spinous_end = max(body.b_post - body.fat["post"] - rng.uniform(12, 20), float(y_canal.max()) + 15)
    spinous = (np.abs(X) < 4) & (Y > y_canal) & (Y < spinous_end) & (phase > 0.3)
    transverse = (np.abs(X) < r_vb + rng.uniform(10, 20)) & (np.abs(Y - y_canal + 4) < 4) \
        & (phase > 0.35) & (phase < 0.6)
    grid.paint(sl, canal < 1, 20.0)
    grid.paint(sl, arch | spinous | transverse, bone_hu * 0.8)

    rib_band = (rho_cav >= 1) & (body.rho(Z, Y, X, "cavity", grow=9.0) < 1)
    yn = np.clip(Y / body.b_post, -1, 1)
    drop = rng.uniform(60, 90)
    # ribs run down and forward from the spine: highest at the back, near the midline
    rib_z = Z + drop * (1 - yn) / 2 + rng.uniform(25, 40) * np.abs(X) / cav_a
    rib_low = rng.uniform(-25, 5)
    rib_period = rng.uniform(26, 32)
    ribs = rib_band & (rib_z > rib_low) & (((rib_z - rib_low) % rib_period) < 11) \
        & ~((np.abs(X) < 50) & (Y < 0) & (Z < z_dome_r - 30)) & (np.abs(X) > r_vb + 8)
    grid.paint(sl, ribs, rng.uniform(350, 550))

    # ---- acquisition: partial-volume blur, correlated noise ---------------------------------
    sigma = (rng.uniform(0.35, 0.6), rng.uniform(0.45, 0.7), 0.0)
    sigma = (sigma[0], sigma[1], sigma[1])
    noise_sd = rng.uniform(6, 18)
    hu = ndimage.gaussian_filter(grid.hu, sigma=sigma, mode="nearest")
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), 0.6)
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    image = np.clip(np.rint(hu + noise), -1024, 3071).astype(np.int16)

    spacing = (round(dxy * scale, 5), round(dxy * scale, 5), round(dz * scale, 5))
    origin = tuple(round(float(v[0]) * scale, 4) for v in (x, y, z))
    return PhantomCase(image=image, label=grid.label, spacing=spacing, origin=origin)
