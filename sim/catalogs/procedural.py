"""The `procedural` and `procedural-train` catalogs: warehouse items built from primitives, from a seed.

What it is
    Six families of each-picking goods, each a single-link URDF made of boxes, cylinders and spheres
    (exact collision shapes, unlike the convex hulls of random_urdfs), written once into the cache dir:
      carton      corrugated box, sides 5-30 cm (longest 8-30, middle 5-25, shortest 5-18), 0.1-2 kg
      mailer      flat poly/paper mailer, 15-35 cm x 12-25 cm x 1-3 cm, 0.05-0.8 kg
      bottle      cylinder body 5-8 cm diameter, 12-25 cm tall, plus a neck and a cap, 0.1-1.5 kg
      ball        sphere 4-7.5 cm (capped below 8 cm so the parallel jaw can close on it with margin:
                  a larger sphere has no flat face for the ~3 cm suction cup either), 0.02-0.5 kg
      tube        cylinder 2.5-6 cm diameter, 15-35 cm long (poster tubes, caulk, sweets), 0.03-1 kg
      small_part  box or cylinder, every side 1-4 cm (fittings, batteries, SD cards in a case), 5-300 g
    All fit the tote (about 0.5 x 0.35 x 0.2 m inside). Every item is pickable by at least one real
    gripper: cartons and mailers have flat faces for suction; bottles, balls, tubes and small parts
    have a dimension under 8 cm for the jaw (bottles, tubes and flat-ended parts also take suction).

What is randomised
    Per item, from one generator seeded by (split seed base + index): its dimensions inside the
    family's range, its density (so its mass), and its RGB colour (so an RGB camera sees distinct
    items). The family is index % 6, so every split holds the families in equal shares and family
    filters keep a predictable count. `procedural` (held out, for benchmarks) uses seeds from
    1,000,000 up; `procedural-train` from 0 up: the two splits can never share an item.

What counts as success
    pybullet turns URDF cylinders into convex meshes; extents are the primitive sizes, which match
    how the item rests (within 1 mm).

    Same split + index -> byte-identical URDF and identical spec on every machine; each item rests
    stably on a flat floor at its stated extents and mass; the two splits are disjoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sim.catalogs.core import Catalog, ItemSpec, cache_dir, write_atomic

log = logging.getLogger(__name__)

FAMILIES = ("carton", "mailer", "bottle", "ball", "tube", "small_part")
SPLITS = {
    # name: (number of items, first seed). Seed ranges are disjoint by construction.
    "procedural-train": (960, 0),
    "procedural": (240, 1_000_000),
}
_GENERATOR_VERSION = 2  # bump when the geometry rules change: new files go to a new folder

# Friction per family (Coulomb, against rubber gripper pads / plastic tote): cardboard, poly film,
# PET, rubber, coated card tube, mixed plastic/metal.
FRICTION = {"carton": 0.55, "mailer": 0.45, "bottle": 0.4, "ball": 0.8, "tube": 0.45, "small_part": 0.5}


def _f(x: float) -> str:
    return f"{x:.5f}"


def _visual_collision(geom: str, xyz: tuple[float, float, float], rgba: str) -> str:
    origin = f'<origin xyz="{_f(xyz[0])} {_f(xyz[1])} {_f(xyz[2])}" rpy="0 0 0"/>'
    return (
        f'    <visual>{origin}<geometry>{geom}</geometry><material name="c"><color rgba="{rgba}"/></material>'
        f"</visual>\n    <collision>{origin}<geometry>{geom}</geometry></collision>\n"
    )


def _box(size: tuple[float, float, float]) -> str:
    return f'<box size="{_f(size[0])} {_f(size[1])} {_f(size[2])}"/>'


def _cyl(radius: float, length: float) -> str:
    return f'<cylinder radius="{_f(radius)}" length="{_f(length)}"/>'


def _urdf(name: str, mass: float, extents: tuple[float, float, float], shapes: str) -> str:
    # Inertia of the bounding box: pybullet recomputes it from the collision shapes anyway (we do
    # not pass URDF_USE_INERTIA_FROM_FILE), this keeps the file valid for other simulators.
    a, b, c = extents
    ixx, iyy, izz = (mass / 12 * (b * b + c * c), mass / 12 * (a * a + c * c), mass / 12 * (a * a + b * b))
    return (
        f'<?xml version="1.0"?>\n<robot name="{name}">\n  <link name="base">\n'
        f'    <inertial><origin xyz="0 0 0" rpy="0 0 0"/><mass value="{_f(mass)}"/>'
        f'<inertia ixx="{ixx:.3e}" ixy="0" ixz="0" iyy="{iyy:.3e}" iyz="0" izz="{izz:.3e}"/></inertial>\n'
        f"{shapes}  </link>\n</robot>\n"
    )


def _design(family: str, rng: np.random.Generator) -> tuple[float, tuple[float, float, float], str]:
    """(mass kg, extents m, URDF shape elements) of one item. The base frame is the bounding-box centre."""
    rgba = " ".join(f"{c:.3f}" for c in rng.uniform(0.1, 0.95, size=3)) + " 1"
    if family == "carton":
        long_ = rng.uniform(0.08, 0.30)
        mid = rng.uniform(0.05, min(long_, 0.25))
        short = rng.uniform(0.05, min(mid, 0.18))
        ext = (long_, mid, short)
        mass = np.clip(rng.uniform(60, 250) * np.prod(ext), 0.1, 2.0)  # packed goods, kg/m^3
        return float(mass), ext, _visual_collision(_box(ext), (0, 0, 0), rgba)
    if family == "mailer":
        long_ = rng.uniform(0.15, 0.35)
        ext = (long_, rng.uniform(0.12, min(0.25, long_)), rng.uniform(0.01, 0.03))
        mass = np.clip(rng.uniform(150, 500) * np.prod(ext), 0.05, 0.8)  # clothing, books
        return float(mass), ext, _visual_collision(_box(ext), (0, 0, 0), rgba)
    if family == "bottle":
        r = rng.uniform(0.025, 0.04)
        body_h = rng.uniform(0.12, 0.25)
        neck_r = rng.uniform(0.012, min(0.018, 0.6 * r))
        neck_h = rng.uniform(0.02, 0.05)
        cap_r, cap_h = neck_r + 0.002, 0.015
        total = body_h + neck_h + cap_h
        z0 = -total / 2
        shapes = (
            _visual_collision(_cyl(r, body_h), (0, 0, z0 + body_h / 2), rgba)
            + _visual_collision(_cyl(neck_r, neck_h), (0, 0, z0 + body_h + neck_h / 2), rgba)
            + _visual_collision(_cyl(cap_r, cap_h), (0, 0, z0 + body_h + neck_h + cap_h / 2), "0.9 0.9 0.9 1")
        )
        # Liquid-filled, 60-100% full.
        mass = np.clip(rng.uniform(600, 1000) * np.pi * r * r * body_h, 0.1, 1.5)
        return float(mass), (2 * r, 2 * r, total), shapes
    if family == "ball":
        d = rng.uniform(0.04, 0.075)
        mass = np.clip(rng.uniform(100, 700) * np.pi / 6 * d**3, 0.02, 0.5)  # foam to solid rubber
        return float(mass), (d, d, d), _visual_collision(f'<sphere radius="{_f(d / 2)}"/>', (0, 0, 0), rgba)
    if family == "tube":
        d = rng.uniform(0.025, 0.06)
        length = rng.uniform(0.15, 0.35)
        mass = np.clip(rng.uniform(150, 600) * np.pi / 4 * d * d * length, 0.03, 1.0)
        return float(mass), (d, d, length), _visual_collision(_cyl(d / 2, length), (0, 0, 0), rgba)
    if family == "small_part":
        if rng.random() < 0.5:
            ext = tuple(float(s) for s in rng.uniform(0.01, 0.04, size=3))
            geom = _box(ext)
        else:
            d, h = rng.uniform(0.01, 0.04), rng.uniform(0.01, 0.04)
            ext, geom = (d, d, h), _cyl(d / 2, h)
        mass = np.clip(rng.uniform(800, 5000) * np.prod(ext), 0.005, 0.3)  # plastic to steel
        return float(mass), ext, _visual_collision(geom, (0, 0, 0), rgba)
    raise ValueError(f"unknown procedural family {family!r}; expected one of {FAMILIES}")


def generate(split: str, index: int) -> tuple[ItemSpec, str]:
    """The spec and URDF text of item `index` of `split` (pure: writes nothing)."""
    n, seed0 = SPLITS[split]
    if not 0 <= index < n:
        raise ValueError(f"{split} has items 0..{n - 1}, not {index}")
    family = FAMILIES[index % len(FAMILIES)]
    rng = np.random.default_rng(seed0 + index)
    mass, ext, shapes = _design(family, rng)
    name = f"{family}-{index:04d}"
    path = cache_dir() / f"procedural-v{_GENERATOR_VERSION}" / split / f"{name}.urdf"
    spec = ItemSpec(
        name=f"{split}/{name}",
        family=family,
        urdf_path=str(path),
        scale=1.0,
        mass_kg=mass,
        extents=tuple(float(e) for e in ext),
        friction=FRICTION[family],
    )
    return spec, _urdf(name.replace("-", "_"), mass, ext, shapes)


def load(split: str) -> Catalog:
    """`procedural` (240 held-out items) or `procedural-train` (960 items); URDFs written on first use."""
    if split not in SPLITS:
        raise ValueError(f"procedural split must be one of {sorted(SPLITS)}, got {split!r}")
    items = []
    for i in range(SPLITS[split][0]):
        spec, text = generate(split, i)
        path = Path(spec.urdf_path)
        # Files are deterministic, so an existing one is correct unless someone edited the cache;
        # compare sizes as a cheap tamper/truncation check instead of re-reading every file.
        if not path.exists() or path.stat().st_size != len(text.encode()):
            write_atomic(path, text)
        items.append(spec)
    return Catalog(split, tuple(items))
