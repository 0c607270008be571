"""The phantom's generator: HipMRI-layout look-alike cases (LPS volumes, six label classes, anatomy
placed in millimetres so any array shape shows the same body), their NIfTI and DICOM writers and
the preview. ``phantom.py`` at the root is its command line and says what the phantom holds."""
import gzip
from enum import IntEnum
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pelvicseg.atomic import atomic_path, write_bytes
from pelvicseg.progress import progress

CLASS_NAMES = ("background", "body", "bone", "bladder", "rectum", "prostate")
BASE_SHAPE = (256, 256, 128)
BASE_SPACING = (1.68, 1.68, 1.56)  # mm, HipMRI median


# tissue, label class, T2 intensity relative to urine, texture amplitude
TISSUE_TABLE = [
    ("AIR", 0, 0.00, 0.00),
    ("FAT", 1, 0.85, 0.04),
    ("PELVIC_FAT", 1, 0.72, 0.10),
    ("MUSCLE", 1, 0.30, 0.12),
    ("CARTILAGE", 1, 0.45, 0.05),
    ("VESSEL", 1, 0.08, 0.10),  # flow void
    ("FLUID", 1, 0.90, 0.03),  # CSF, fluid-filled bowel
    ("BOWEL", 1, 0.55, 0.35),
    ("CORTEX", 2, 0.06, 0.10),
    ("MARROW", 2, 0.60, 0.15),  # fatty marrow
    ("BLADDER_WALL", 3, 0.25, 0.05),
    ("URINE", 3, 1.00, 0.02),
    ("RECTAL_WALL", 4, 0.33, 0.10),
    ("RECTAL_GAS", 4, 0.02, 0.00),
    ("STOOL", 4, 0.50, 0.40),
    ("PROSTATE_PERIPHERAL", 5, 0.42, 0.12),  # only a little brighter than muscle, as on real T2
    ("PROSTATE_CENTRAL", 5, 0.34, 0.10),
]
Tissue = IntEnum("Tissue", [row[0] for row in TISSUE_TABLE], start=0)
CLASS_OF_TISSUE = np.array([row[1] for row in TISSUE_TABLE], dtype=np.uint8)
INTENSITY_OF_TISSUE = np.array([row[2] for row in TISSUE_TABLE], dtype=np.float32)
TEXTURE_OF_TISSUE = np.array([row[3] for row in TISSUE_TABLE], dtype=np.float32)
SOFT_TISSUE = (Tissue.FAT, Tissue.PELVIC_FAT, Tissue.MUSCLE)


def sample_patient(rng):
    """Anatomy shared by all weeks of one patient, in mm (x to patient left, y posterior, z superior)."""
    pelvis = rng.uniform(0.9, 1.1)  # scales all bones
    anatomy = {
        "pelvis": pelvis,
        "inplane_spacing": rng.uniform(0.96, 1.04),
        "slice_spacing": rng.uniform(0.96, 1.04),
        "hip_z": -15 + rng.uniform(-10, 10),  # where the femoral heads sit in the field of view
        "fat": rng.uniform(12, 38),  # subcutaneous fat thickness, the main difference in habitus
        "body_half_width": 130 * pelvis + rng.uniform(12, 22),
        "body_half_depth": 90 * pelvis + rng.uniform(4, 14),
        "body_centre_y": rng.uniform(-8, 8),
        "sacral_curve": rng.uniform(20, 30),
        "fat_planes": rng.uniform(size=(12, 6)),
        "prostate_volume": rng.uniform(25, 50),  # cc
        "prostate_shape": rng.uniform(0.85, 1.15, size=3),
        "prostate_offset": rng.normal(0, [2, 3, 4]),
        "bladder_volume": rng.uniform(170, 260),  # cc at the usual drinking protocol
        "bladder_shape": rng.uniform(0.85, 1.15, size=3),
        "bladder_tilt": rng.uniform(-5, 15),  # degrees; positive leans the dome forwards
        "rectum_size": rng.uniform(0.95, 1.2),
        "tissue_contrast": np.exp(rng.normal(0, 0.03, size=len(Tissue))).astype(np.float32),
    }
    # skin = bony pelvis + muscle + fat, so thin and heavy patients keep the same skeleton
    anatomy["body_half_width"] += anatomy["fat"]
    anatomy["body_half_depth"] += anatomy["fat"]
    return anatomy


BLADDER_FILLING = (0.8, 1.25)  # this week's volume over the patient's usual one
RECTUM_FILLING = (0.8, 1.3)


def sample_week(rng, bladder_filling=BLADDER_FILLING, rectum_filling=RECTUM_FILLING):
    """What changes between weekly scans of one patient. The fillings are drawn uniformly from
    their ranges (the same draw whatever the range, so other weeks' values do not move)."""
    return {
        "setup_shift": rng.normal(0, 2, size=3),
        "prostate_shift": rng.normal(0, 1.5, size=3),
        "bladder_filling": rng.uniform(*bladder_filling),
        "rectum_filling": rng.uniform(*rectum_filling),
        "rectal_gas": rng.uniform(0, 0.6) * (rng.random() < 0.6),  # share of the lumen's depth; often none
        "bowel_loops": rng.uniform(size=(14, 7)),
        "intensity_scale": np.exp(rng.uniform(np.log(400), np.log(1600))),
        "noise": rng.uniform(0.022, 0.035),  # sigma relative to urine
        "bias": rng.normal(0, 1, size=(3, 3)),  # per axis: tilt, curvature, wave of the coil shading
    }


def box_slices(axes, low, high):
    """Index slices of the voxels whose coordinates lie within [low, high] mm on every axis."""
    return tuple(slice(np.searchsorted(c, lo), np.searchsorted(c, hi, side="right"))
                 for c, lo, hi in zip(axes, low, high))


def paint(tissue, box, mask, value, over=None):
    """Set `value` where `mask` holds, and with `over` only on those tissues. Later paint wins."""
    region = tissue[box]  # a view, so writing into it writes into tissue
    if over is not None:
        mask = mask & np.isin(region, over)
    region[mask] = value


def paint_ellipsoid(tissue, axes, centre, radii, value, over=None, rotation=None):
    """Ellipsoid with semi-axes `radii`; `rotation` columns give its axes in patient coordinates."""
    centre, radii = np.asarray(centre, float), np.asarray(radii, float)
    reach = radii.max() if rotation is not None else radii
    box = box_slices(axes, centre - reach, centre + reach)
    x, y, z = (c[s] - m for c, s, m in zip(axes, box, centre))
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    if rotation is None:
        inside = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 <= 1
    else:
        along_axes = (x * rotation[0, k] + y * rotation[1, k] + z * rotation[2, k] for k in range(3))
        inside = sum((d / r) ** 2 for d, r in zip(along_axes, radii)) <= 1
    paint(tissue, box, inside, value, over)


def paint_rod(tissue, axes, start, end, start_radius, end_radius, value, over=None):
    """Rounded cone from `start` to `end` (mm): long bones, rami, femoral necks."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    reach = max(start_radius, end_radius)
    box = box_slices(axes, np.minimum(start, end) - reach, np.maximum(start, end) + reach)
    x, y, z = (c[s] - m for c, s, m in zip(axes, box, start))
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    d = end - start
    t = np.clip((x * d[0] + y * d[1] + z * d[2]) / (d @ d), 0, 1)
    radius = start_radius + t * (end_radius - start_radius)
    inside = (x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2 <= radius**2
    paint(tissue, box, inside, value, over)


def paint_tube(tissue, axes, z_knots, cx, cy, rx, ry, value, over=None, power=2.0, y_max=None, angle=0.0):
    """Stack of axial ellipses whose centre and radii follow the knots along z (body, sacrum, rectum).

    `angle` (degrees) turns the ellipses' x radius away from the x axis.
    """
    xs, ys, zs = axes
    z_box = slice(np.searchsorted(zs, z_knots[0]), np.searchsorted(zs, z_knots[-1], side="right"))
    z = zs[z_box]
    if z.size == 0:
        return
    cx, cy, rx, ry = (np.interp(z, z_knots, k) for k in (cx, cy, rx, ry))
    rx, ry = np.maximum(rx, 1e-3), np.maximum(ry, 1e-3)
    reach_x, reach_y = (rx, ry) if angle == 0 else (np.maximum(rx, ry),) * 2
    x_box = slice(np.searchsorted(xs, (cx - reach_x).min()), np.searchsorted(xs, (cx + reach_x).max(), side="right"))
    y_box = slice(np.searchsorted(ys, (cy - reach_y).min()), np.searchsorted(ys, (cy + reach_y).max(), side="right"))
    dx, dy = xs[x_box, None] - cx, ys[y_box, None] - cy
    if angle == 0:  # separable: only 2D terms, summed into the 3D box
        inside = (np.abs(dx) / rx)[:, None, :] ** power + (np.abs(dy) / ry)[None, :, :] ** power <= 1
    else:
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        dx, dy = dx[:, None, :], dy[None, :, :]
        inside = np.abs((c * dx + s * dy) / rx) ** power + np.abs((c * dy - s * dx) / ry) ** power <= 1
    if y_max is not None:
        inside &= (ys[y_box, None] <= np.interp(z, z_knots, y_max))[None]
    paint(tissue, (x_box, y_box, z_box), inside, value, over)


def rotation_about(axis, degrees):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation


def draw_body(tissue, axes, anatomy):
    """Skin outline with subcutaneous fat; below the pelvic floor a notch starts to split the thighs."""
    a, b, yc = anatomy["body_half_width"], anatomy["body_half_depth"], anatomy["body_centre_y"]
    fat, hip = anatomy["fat"], anatomy["hip_z"]
    z = np.array([-300, hip - 60, hip, hip + 60, 300.0])
    half_width = a * np.array([0.93, 0.96, 1.0, 0.97, 0.95])  # widest at the trochanters
    half_depth = b * np.array([0.95, 0.97, 1.0, 1.03, 1.06])  # deeper towards the abdomen
    centre_x, centre_y = np.zeros(5), np.full(5, yc)
    paint_tube(tissue, axes, z, centre_x, centre_y, half_width, half_depth, Tissue.FAT, power=2.6)
    # the belly carries more fat than the back, which rests on the table
    paint_tube(tissue, axes, z, centre_x, centre_y + 0.15 * fat, half_width - fat, half_depth - 1.15 * fat,
               Tissue.MUSCLE, power=2.6)
    floor = hip - 60
    notch_z = np.array([-300, floor - 60, floor])
    notch_x, notch_y = np.array([70, 50, 0.0]), np.array([150, 120, 0.0])
    front = np.full(3, yc - b)
    paint_tube(tissue, axes, notch_z, np.zeros(3), front, notch_x + fat, notch_y + fat, Tissue.FAT, over=SOFT_TISSUE)
    paint_tube(tissue, axes, notch_z, np.zeros(3), front, notch_x, notch_y, Tissue.AIR)


def draw_fat_planes(tissue, axes, anatomy):
    """Thin fat septa between muscle groups, so the muscle is not one uniform grey mass."""
    a, b, yc = anatomy["body_half_width"], anatomy["body_half_depth"], anatomy["body_centre_y"]
    for angle, depth, size, drift, middle, extent in anatomy["fat_planes"]:
        angle, depth = 2 * np.pi * angle, 0.65 + 0.27 * depth
        z = -60 + 120 * middle + (40 + 60 * extent) * np.array([-1, 0, 1])
        cx = depth * (a - anatomy["fat"]) * np.cos(angle) + np.array([-1, 0, 1]) * 40 * (drift - 0.5)
        cy = yc + depth * (b - anatomy["fat"]) * np.sin(angle) + np.array([1, 0, -1]) * 20 * (drift - 0.5)
        width, thickness = (12 + 25 * size) * np.array([0.2, 1, 0.2]), np.full(3, 1.5 + size)
        # septa run along the skin, so their long axis is perpendicular to the direction from the centre
        paint_tube(tissue, axes, z, cx, cy, width, thickness, Tissue.FAT, over=(Tissue.MUSCLE,),
                   angle=np.degrees(angle) + 90)


def draw_pelvic_floor_and_vessels(tissue, axes, anatomy, prostate_centre):
    s, hip = anatomy["pelvis"], anatomy["hip_z"]
    # fat of the true pelvis around bladder and rectum: a funnel closed below by the levator ani,
    # widening into the false pelvis above
    z = np.array([prostate_centre[2] - 30, prostate_centre[2] - 5, hip, hip + 50, 300])
    paint_tube(tissue, axes, z, np.zeros(5), np.array([15, 5, 0, -5, -10]), s * np.array([10, 38, 48, 75, 85]),
               s * np.array([15, 52, 62, 68, 68]), Tissue.PELVIC_FAT, over=(Tissue.MUSCLE,))
    for side in (-1, 1):  # ischioanal fossae: fat either side of the anal canal
        paint_ellipsoid(tissue, axes, (side * 38 * s, 35, hip - 75), (22, 32, 30), Tissue.PELVIC_FAT,
                        over=(Tissue.MUSCLE,))
        # external iliac / femoral artery and vein: flow voids running down in front of the hip
        vessel_z = np.array([-300, hip, hip + 120])
        for offset, radius in ((0, 4.0), (-12, 6.0)):
            paint_tube(tissue, axes, vessel_z, side * s * (np.array([82, 72, 45]) + offset), np.array([-70, -62, 10]),
                       np.full(3, radius), np.full(3, radius), Tissue.VESSEL, over=SOFT_TISSUE)


def sacral_front(anatomy):
    """Knots (z, y) of the sacrum's anterior surface: concave forwards, from coccyx tip to promontory."""
    tip, length = anatomy["hip_z"] - 28, 170.0
    u = np.linspace(0, 1, 9)
    return tip + u * length, 32 + anatomy["sacral_curve"] * np.sin(np.pi * u**0.9) - 8 * u


def draw_bones(tissue, axes, anatomy):
    """Sacrum and coccyx, hip bones and proximal femurs, all as marrow; cortex is added at the end."""
    s, hip = anatomy["pelvis"], anatomy["hip_z"]
    z, front = sacral_front(anatomy)
    u = np.linspace(0, 1, z.size)
    depth, half_width = s * (6 + 16 * u), s * (9 + 48 * u**1.3)  # from the slim coccyx to the broad S1
    paint_tube(tissue, axes, z, np.zeros_like(z), front + depth, half_width, depth, Tissue.MARROW)
    canal = u > 0.25  # sacral canal holds CSF and nerve roots
    paint_tube(tissue, axes, z[canal], np.zeros(canal.sum()), (front + 1.4 * depth)[canal],
               0.22 * half_width[canal], 0.3 * depth[canal], Tissue.FLUID)
    sacroiliac_z = hip + 70
    for side in (-1, 1):
        head = np.array([side * 85 * s, -18, hip])
        head_radius = 24 * s
        trochanter = np.array([side * 118 * s, -5, hip - 20])
        ischial_tuberosity = np.array([side * 58 * s, 35, hip - 58])
        pubic_body = np.array([side * 11 * s, -66 * s, hip - 30])
        sacroiliac = np.array([side * 0.85 * np.interp(sacroiliac_z, z, half_width),
                               np.interp(sacroiliac_z, z, front + depth), sacroiliac_z])
        wing = rotation_about(2, side * 50) @ rotation_about(1, -side * 15)  # opens forwards and outwards

        # hip bone: acetabulum, ilium running back to the sacroiliac joint, iliac wing, ischium, pubis and rami
        paint_ellipsoid(tissue, axes, head + [-side * 12 * s, 0, 3], [head_radius + 6 * s] * 3, Tissue.MARROW)
        paint_rod(tissue, axes, head + [-side * 8, 10, 15], sacroiliac, 18 * s, 15 * s, Tissue.MARROW)
        paint_ellipsoid(tissue, axes, (side * 88 * s, 5, hip + 95), (9 * s, 75 * s, 50 * s), Tissue.MARROW,
                        rotation=wing)
        paint_rod(tissue, axes, head + [-side * 10, 20, -10], ischial_tuberosity, 14 * s, 17 * s, Tissue.MARROW)
        paint_ellipsoid(tissue, axes, pubic_body, (9 * s, 13 * s, 22 * s), Tissue.MARROW)
        superior_ramus_end, inferior_ramus_end = pubic_body + [side * 3, 0, 8], pubic_body + [0, 0, -16]
        paint_rod(tissue, axes, head + [-side * 15, -18, -3], superior_ramus_end, 10 * s, 9 * s, Tissue.MARROW)
        paint_rod(tissue, axes, ischial_tuberosity, inferior_ramus_end, 10 * s, 7 * s, Tissue.MARROW)

        # femur: a cartilage gap between acetabulum and head, then head, neck, greater trochanter and shaft
        paint_ellipsoid(tissue, axes, head, [head_radius + 2.5] * 3, Tissue.CARTILAGE, over=(Tissue.MARROW,))
        paint_ellipsoid(tissue, axes, head, [head_radius] * 3, Tissue.MARROW)
        paint_rod(tissue, axes, head, trochanter, 15 * s, 16 * s, Tissue.MARROW)
        paint_ellipsoid(tissue, axes, trochanter, (15 * s, 22 * s, 24 * s), Tissue.MARROW)
        shaft_end = (side * 98 * s, 5, hip - 300)
        paint_rod(tissue, axes, trochanter + [-side * 8, 2, -10], shaft_end, 14 * s, 12 * s, Tissue.MARROW)


def draw_organs(tissue, axes, anatomy, week, prostate_centre):
    hip, s = anatomy["hip_z"], anatomy["pelvis"]
    prostate_radii = np.array([25.0, 18.0, 20.0]) * anatomy["prostate_shape"]
    prostate_radii *= (anatomy["prostate_volume"] * 1000 / (4 / 3 * np.pi * prostate_radii.prod())) ** (1 / 3)
    # levator ani and prostatic fascia: the prostate sits in muscle, which keeps its contrast low
    paint_ellipsoid(tissue, axes, prostate_centre, prostate_radii + 11, Tissue.MUSCLE,
                    over=(Tissue.PELVIC_FAT, Tissue.FAT))

    for loop in week["bowel_loops"]:  # small bowel and sigmoid loops in the upper pelvis
        centre = (loop[0] - 0.5) * 130 * s, -50 + loop[1] * 70, hip + 50 + loop[2] * 70
        content = Tissue.BOWEL if loop[6] < 0.7 else Tissue.FLUID
        paint_ellipsoid(tissue, axes, centre, 8 + 14 * loop[3:6], content, over=(Tissue.PELVIC_FAT,))

    bladder_radii = np.array([48.0, 38.0, 33.0]) * anatomy["bladder_shape"]
    volume = anatomy["bladder_volume"] * week["bladder_filling"]
    bladder_radii *= (volume * 1000 / (4 / 3 * np.pi * bladder_radii.prod())) ** (1 / 3)
    # the bladder base rests on the prostate, so filling moves the dome up
    bladder_centre = prostate_centre + [0, -8, prostate_radii[2] + bladder_radii[2] - 8]
    tilt = rotation_about(0, anatomy["bladder_tilt"])
    paint_ellipsoid(tissue, axes, bladder_centre, bladder_radii, Tissue.BLADDER_WALL, rotation=tilt)
    paint_ellipsoid(tissue, axes, bladder_centre, bladder_radii - 3, Tissue.URINE, rotation=tilt)

    # rectum: anal canal runs down and back from the anorectal junction, the ampulla follows the sacrum
    sacrum_z, sacrum_y = sacral_front(anatomy)
    size = anatomy["rectum_size"] * np.sqrt(week["rectum_filling"])
    pz = prostate_centre[2]
    z = pz + np.array([-55, -25, 0, 30, 60, 80, 88])
    rx = np.array([7, 8, 13 * size, 15 * size, 12 * size, 10 * size, 1])
    ry = np.array([5, 6, 9 * size, 11 * size, 9 * size, 8 * size, 1])
    behind_prostate = prostate_centre[1] + prostate_radii[1] + 5
    along_sacrum = np.interp(z, sacrum_z, sacrum_y) - 10 - ry
    cy = np.minimum(along_sacrum, behind_prostate + ry + 0.6 * np.maximum(z - pz, 0))
    cy[:2] = behind_prostate + ry[:2] + [20, 2]
    cx = np.array([0, 0, 0, 0, 4, 10, 14.0])
    paint_tube(tissue, axes, z, cx, cy, rx, ry, Tissue.RECTAL_WALL)
    lumen_x, lumen_y = np.maximum(rx - 3.5, 0), np.maximum(ry - 3.5, 0)
    paint_tube(tissue, axes, z, cx, cy, lumen_x, lumen_y, Tissue.STOOL)
    # the patient lies supine, so gas rises to the anterior side of the lumen
    gas_level = cy - lumen_y + 2 * lumen_y * week["rectal_gas"]
    paint_tube(tissue, axes, z, cx, cy, lumen_x, lumen_y, Tissue.RECTAL_GAS, over=(Tissue.STOOL,), y_max=gas_level)

    paint_ellipsoid(tissue, axes, prostate_centre, prostate_radii, Tissue.PROSTATE_PERIPHERAL)
    paint_ellipsoid(tissue, axes, prostate_centre + [0, -4, 3], prostate_radii * 0.65, Tissue.PROSTATE_CENTRAL)


def mark_cortex(tissue, thickness_voxels):
    """Turn the outer layer of every bone into dark cortex, leaving marrow inside."""
    marrow = tissue == Tissue.MARROW
    inner = marrow
    for _ in range(thickness_voxels):  # erode by one voxel along each axis, with in-place slices for speed
        shrunk = inner.copy()
        for axis in range(3):
            ahead = (slice(None),) * axis + (slice(1, None),)
            behind = (slice(None),) * axis + (slice(None, -1),)
            shrunk[ahead] &= inner[behind]
            shrunk[behind] &= inner[ahead]
        inner = shrunk
    tissue[marrow & ~inner] = Tissue.CORTEX


def upsample_linear(low, shape):
    """Separable linear interpolation of a coarse field to `shape` (cheaper than a 3D zoom)."""
    out = low
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        position = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        below = np.floor(position).astype(int)
        above = np.minimum(below + 1, n_in - 1)
        weight = (position - below).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, below, axis=axis) * (1 - weight) + np.take(out, above, axis=axis) * weight
    return out


def smooth_bias(axes, coefficients):
    """Receive-coil shading: brighter near the anterior and posterior coils, plus gentle random tilts."""
    terms = []
    for c, (tilt, curve, wave) in zip(axes, coefficients):
        u = c / 220.0
        log_bias = 0.08 * tilt * u + 0.06 * curve * u**2 + 0.04 * wave * np.cos(np.pi * u)
        terms.append(np.exp(log_bias).astype(np.float32))
    coil = np.exp(0.25 * (axes[1] / 150.0) ** 2).astype(np.float32)
    return (terms[0][:, None] * (terms[1] * coil)[None, :])[:, :, None] * terms[2][None, None, :]


def render_image(tissue, axes, anatomy, week, rng):
    """T2 intensities with texture, partial-volume blur, coil bias and Rician noise, as scanner integers."""
    intensity = INTENSITY_OF_TISSUE * anatomy["tissue_contrast"] * week["intensity_scale"]
    coarse = tuple(max(2, n // 4) for n in tissue.shape)
    texture = upsample_linear(rng.standard_normal(coarse, dtype=np.float32), tissue.shape)
    texture /= texture[::4, ::4, ::4].std()  # interpolation shrinks the spread; restore unit variance
    texture *= TEXTURE_OF_TISSUE[tissue]
    texture += 1
    image = intensity[tissue] * texture
    for axis in range(3):  # partial volume at edges
        image = ndimage.correlate1d(image, np.array([0.25, 0.5, 0.25], np.float32), axis=axis, mode="nearest")
    image *= smooth_bias(axes, week["bias"])
    sigma = week["noise"] * week["intensity_scale"]
    real = rng.standard_normal(tissue.shape, dtype=np.float32)
    real *= sigma
    real += image
    imaginary = rng.standard_normal(tissue.shape, dtype=np.float32)
    imaginary *= sigma
    image = np.hypot(real, imaginary, out=real)  # magnitude image: Rician noise
    return np.rint(image, out=image)


def make_case(patient_id: int, week: int, shape=BASE_SHAPE, seed: int = 0, bladder_filling=BLADDER_FILLING,
              rectum_filling=RECTUM_FILLING):
    """One scan: (image float32 of `shape`, label uint8 of `shape`, 4x4 LPS affine float64).

    Deterministic in (patient_id, week, shape, seed, filling ranges); the anatomy depends on
    (seed, patient_id) only. ``bladder_filling`` and ``rectum_filling`` are (low, high) ranges of
    this week's filling (a range of one value sets it).
    """
    shape = tuple(int(n) for n in shape)
    anatomy = sample_patient(np.random.default_rng([seed, patient_id]))
    week_rng = np.random.default_rng([seed, patient_id, week])
    scan = sample_week(week_rng, bladder_filling, rectum_filling)
    spacing = np.array(BASE_SPACING) * np.array(BASE_SHAPE) / np.array(shape)
    spacing *= [anatomy["inplane_spacing"], anatomy["inplane_spacing"], anatomy["slice_spacing"]]
    # patient coordinates in mm: x to the patient's left, y posterior, z superior; origin near the FOV centre
    axes = tuple((np.arange(n) - (n - 1) / 2) * d - shift for n, d, shift in zip(shape, spacing, scan["setup_shift"]))

    hip = anatomy["hip_z"]
    prostate_centre = np.array([0, -22, hip - 32]) + anatomy["prostate_offset"] + scan["prostate_shift"]
    # drawing order sets label priority: organs drawn last overwrite body and bone, one class per voxel
    tissue = np.zeros(shape, dtype=np.uint8)
    draw_body(tissue, axes, anatomy)
    draw_fat_planes(tissue, axes, anatomy)
    draw_pelvic_floor_and_vessels(tissue, axes, anatomy, prostate_centre)
    draw_bones(tissue, axes, anatomy)
    draw_organs(tissue, axes, anatomy, scan, prostate_centre)
    mark_cortex(tissue, thickness_voxels=max(1, round(2.5 / spacing[0])))

    image = render_image(tissue, axes, anatomy, scan, week_rng)
    label = CLASS_OF_TISSUE[tissue]
    # NIfTI world is RAS; an LPS array steps towards -R and -A, hence the negative x and y spacing
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return image, label, affine


def crop_field_of_view(image, label, affine, fractions):
    """Keep the central ``fractions`` of the field of view on each axis; the affine's origin moves
    with the crop, so every kept voxel stays at its position in mm."""
    shape = np.array(image.shape)
    kept = np.maximum(1, np.round(shape * np.clip(np.asarray(fractions, dtype=float), 0, 1)).astype(int))
    start = (shape - kept) // 2
    window = tuple(slice(int(a), int(a + n)) for a, n in zip(start, kept))
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return image[window], label[window], cropped_affine


def save_nifti(array, affine, path, units=None):
    """Write .nii.gz with a zeroed gzip timestamp so equal inputs give equal bytes."""
    nifti = nib.Nifti1Image(array, affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    if units:
        nifti.header.set_xyzt_units(units)
    write_bytes(path, gzip.compress(nifti.to_bytes(), compresslevel=1, mtime=0))


def write_phantom(out_dir, patients=10, weeks=3, shape=BASE_SHAPE, seed=0, first_patient_id=4, fov=(1.0, 1.0, 1.0),
                  bladder_filling=BLADDER_FILLING, rectum_filling=RECTUM_FILLING):
    """Write a HipMRI-style release into out_dir; returns the (image, label) path pairs. ``fov``
    keeps a central fraction of the field of view (``crop_field_of_view``); the filling ranges
    are ``make_case``'s (wider ones: larger week-to-week changes)."""
    image_dir, label_dir = Path(out_dir) / "semantic_MRs_anon", Path(out_dir) / "semantic_labels_anon"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    cases = [(patient_id, week) for patient_id in range(first_patient_id, first_patient_id + patients)
             for week in range(weeks)]
    for patient_id, week in progress(cases, "phantom"):
        image, label, affine = make_case(patient_id, week, shape, seed, bladder_filling, rectum_filling)
        if tuple(fov) != (1.0, 1.0, 1.0):
            image, label, affine = crop_field_of_view(image, label, affine, fov)
        image_path = image_dir / f"Case_{patient_id:03d}_Week{week}_LFOV.nii.gz"
        label_path = label_dir / f"Case_{patient_id:03d}_Week{week}_SEMANTIC_LFOV.nii.gz"
        save_nifti(image, affine, image_path, units="mm")
        save_nifti(label, affine, label_path)  # HipMRI labels leave the units 'unknown' too
        pairs.append((image_path, label_path))
    return pairs


PREVIEW_ALPHA = 0.45


def save_preview(image, label, path, spacing=BASE_SPACING):
    """Axial, coronal and sagittal slices through the prostate centre, plain and with labels."""
    import matplotlib.pyplot as plt

    from pelvicseg.figures import class_colours, legend_handles, overlay_cmap  # the results' palette; sets the Agg backend

    centre = label == 5 if (label == 5).any() else label > 0
    cx, cy, cz = (int(round(c)) for c in ndimage.center_of_mass(centre))
    sx, sy, sz = spacing
    views = [  # title, image and label slices with rows running top-down, row and column spacing
        ("axial: anterior up, patient's left on the right", image[:, :, cz].T, label[:, :, cz].T, sy, sx),
        ("coronal: superior up", image[:, cy, ::-1].T, label[:, cy, ::-1].T, sz, sx),
        ("sagittal: anterior left, superior up", image[cx, :, ::-1].T, label[cx, :, ::-1].T, sz, sy),
    ]
    heights = [picture.shape[0] * dy / (picture.shape[1] * dx) for _, picture, _, dy, dx in views]
    figure, grid = plt.subplots(3, 2, figsize=(10, 10.5), gridspec_kw={"height_ratios": heights})
    colours = class_colours(len(CLASS_NAMES))
    high = np.percentile(image, 99.5)
    for row, (title, picture, labels, dy, dx) in enumerate(views):
        for column in range(2):
            ax = grid[row, column]
            ax.imshow(picture, cmap="gray", vmin=0, vmax=high, aspect=dy / dx, interpolation="nearest")
            if column == 1:
                shown = np.ma.masked_where(labels < 2, labels)  # body would hide everything: outline it instead
                ax.imshow(shown, cmap=overlay_cmap(len(CLASS_NAMES)), vmin=0, vmax=len(CLASS_NAMES) - 1,
                          alpha=PREVIEW_ALPHA, aspect=dy / dx, interpolation="nearest")
                ax.contour(labels > 0, levels=[0.5], colors=colours[1], linewidths=0.8)
            ax.set_title(title if column == 0 else "labels", fontsize=10)
            ax.axis("off")
    handles = legend_handles([f"{value} {name}" for value, name in enumerate(CLASS_NAMES)])
    handles[0].set_facecolor("none")  # body: outlined, not filled
    handles[0].set_edgecolor(colours[1])
    figure.legend(handles=handles, loc="lower center", ncol=5, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=90)
    plt.close(figure)


def write_dicom_series(image, affine, folder, patient_id, series_description, uid_entropy=None,
                       study_date="20240101", series_number=1):
    """Write ``image`` (axes i, j, k) as a single-frame MR series, one file per slice k, into ``folder``.

    ``affine`` is the image's NIfTI affine (RAS, as nibabel gives it); DICOM is LPS, so
    world_LPS = diag(-1, -1, 1) @ world_RAS, and every pixel lands at its voxel's position.
    Integer images from 0 to 65535 are stored as they are, others through RescaleSlope and
    RescaleIntercept. UIDs derive from ``uid_entropy`` (e.g. seed and case id), so equal inputs
    give equal files; without it they are random. Returns the written paths in slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    from pydicom.valuerep import format_number_as_ds

    def new_uid(role):
        return generate_uid(entropy_srcs=None if uid_entropy is None else [*map(str, uid_entropy), role])

    def decimals(values):  # DICOM's decimal strings hold 16 characters
        return [format_number_as_ds(float(v)) for v in values]

    image = np.asarray(image)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    column_spacing, row_spacing, slice_spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cosine, column_cosine = lps[:3, 0] / column_spacing, lps[:3, 1] / row_spacing
    normal = np.cross(row_cosine, column_cosine)
    if abs(row_cosine @ column_cosine) > 1e-6 or abs(abs(normal @ lps[:3, 2]) - slice_spacing) > 1e-6 * slice_spacing:
        raise ValueError("DICOM slices need an affine whose three axes are perpendicular")
    if np.all(image == np.rint(image)) and image.min() >= 0 and image.max() <= 65535:
        slope, intercept = 1.0, 0.0
    else:
        intercept = float(image.min())
        slope = max(float(image.max()) - intercept, 1e-12) / 65535
    stored = np.rint((image - intercept) / slope).astype("<u2")

    study_uid, series_uid, frame_uid = new_uid("study"), new_uid("series"), new_uid("frame of reference")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(image.shape[2]):
        position = lps[:3, 3] + k * lps[:3, 2]
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, new_uid(f"slice {k}")
        ds.PatientName, ds.PatientID = f"{patient_id}^", patient_id  # the caret: a family name alone
        ds.PatientBirthDate, ds.PatientSex = "", "M"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, study_date, "080000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series_uid, series_number
        ds.SeriesDescription, ds.PatientPosition = series_description, "HFS"
        ds.BodyPartExamined = "PELVIS"  # an unpaired part, so no Laterality
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "phantom.py"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]  # synthetic, not acquired
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "4000", "100", 16  # a T2-weighted turbo spin echo
        ds.ImagePositionPatient = decimals(position)
        ds.ImageOrientationPatient = decimals([*row_cosine, *column_cosine])
        ds.PixelSpacing = decimals([row_spacing, column_spacing])  # between rows, then between columns
        ds.SliceThickness = ds.SpacingBetweenSlices = format_number_as_ds(float(slice_spacing))
        ds.SliceLocation = format_number_as_ds(float(position @ normal))
        if (slope, intercept) != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(slope), format_number_as_ds(intercept)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows are j, columns are i
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"MR{k + 1:04d}.dcm"
        with atomic_path(path) as temporary:
            ds.save_as(temporary, enforce_file_format=True)
        paths.append(path)
    return paths
