"""The `novel-train` and `novel-test` catalogs: families with an opening, which no shipped model
trained on, for learning and doubt-per-item experiments.

What it is
    `frame`: picture frames lying flat, a rectangular ring of four bars (one single-link URDF of
    four boxes, exact collision shapes) around one opening: outside 16-28 cm x 11-20 cm, bar width
    3.5-5 cm, thickness 1.2-2.5 cm, 0.05-0.5 kg (balsa to pine). The shipped models
    (`graspnet-sim-v4` and before, docs/training.md) were trained on `train` (random_urdfs) and the
    six `procedural-train` families, none of which has a hole: a frame's footprint is only partly
    filled and its centre of mass lies over the opening, not on the item. `pickcell bench
    continual` mixes it with familiar `procedural-train` items (sim/benchmark/continual.py). It is
    pickable: every bar is at least 3.5 cm wide with a flat top (the ~3 cm suction cup seals on
    it) and the frames are light, so a cup on a bar holds one despite the offset centre of mass.

    `novel-test` holds `ring`: flat rings lying down (embroidery hoops, gaskets, tape rolls on
    their side), a band of 16 straight segments around a round opening: outside diameter
    14-26 cm, band 3-4.5 cm, thickness 1-3 cm, 0.03-0.5 kg. It is held out from everything: the
    item descriptor's `opening` feature (grasping/watchdog.py) was designed looking at frames, and
    rings measure whether it catches another item with an opening it was not designed on
    (`experiments/item_watchdog_mixed.py --leave-out ring`).

What is randomised
    Per ring, from (3,000,000 + index): outside diameter, band width, thickness, density, colour.
    Per item, from one generator seeded by (2,000,000 + index): outside length and width, bar width,
    thickness, density (so mass) and RGB colour. Seeds are disjoint from `procedural` (1,000,000 up)
    and `procedural-train` (0 up).

What counts as success
    Same index -> byte-identical URDF and identical spec on every machine; each frame rests flat and
    stably at its stated extents and mass; the opening is at least 3 cm across (a real hole); a
    ring's is at least 5 cm across.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sim.catalogs.core import Catalog, ItemSpec, cache_dir, write_atomic
from sim.catalogs.procedural import _box, _urdf, _visual_collision

FAMILY = "frame"
NAME = "novel-train"
N_ITEMS = 240
SEED0 = 2_000_000
FRICTION = 0.5  # Coulomb, lacquered wood against rubber pads and the tote
_GENERATOR_VERSION = 1  # bump when the geometry rules change: new files go to a new folder


def _design(rng: np.random.Generator) -> tuple[float, tuple[float, float, float], str]:
    """(mass kg, extents m, URDF shape elements) of one frame; the base frame is its centre."""
    rgba = " ".join(f"{c:.3f}" for c in rng.uniform(0.1, 0.95, size=3)) + " 1"
    length = rng.uniform(0.16, 0.28)
    width = rng.uniform(0.11, min(0.20, length))
    bar = rng.uniform(0.035, min(0.05, (width - 0.03) / 2))
    thick = rng.uniform(0.012, 0.025)
    shapes = (
        _visual_collision(_box((length, bar, thick)), (0.0, (width - bar) / 2, 0.0), rgba)
        + _visual_collision(_box((length, bar, thick)), (0.0, -(width - bar) / 2, 0.0), rgba)
        + _visual_collision(_box((bar, width - 2 * bar, thick)), ((length - bar) / 2, 0.0, 0.0), rgba)
        + _visual_collision(_box((bar, width - 2 * bar, thick)), (-(length - bar) / 2, 0.0, 0.0), rgba)
    )
    volume = thick * (length * width - (length - 2 * bar) * (width - 2 * bar))
    mass = np.clip(rng.uniform(200, 600) * volume, 0.05, 0.5)  # balsa to pine, kg/m^3
    return float(mass), (float(length), float(width), float(thick)), shapes


def generate(index: int) -> tuple[ItemSpec, str]:
    """The spec and URDF text of frame `index` (pure: writes nothing)."""
    return _generate(NAME, FAMILY, SEED0, _design, index)


RING_FAMILY = "ring"
RING_NAME = "novel-test"
RING_SEED0 = 3_000_000
_RING_SEGMENTS = 16


def _ring_design(rng: np.random.Generator) -> tuple[float, tuple[float, float, float], str]:
    """(mass kg, extents m, URDF shape elements) of one ring: 16 boxes around its centre."""
    rgba = " ".join(f"{c:.3f}" for c in rng.uniform(0.1, 0.95, size=3)) + " 1"
    d_out = rng.uniform(0.14, 0.26)
    band = rng.uniform(0.03, 0.045)
    thick = rng.uniform(0.01, 0.03)
    r_mid = d_out / 2 - band / 2
    # Each segment spans its sector's outer chord, so neighbours overlap a little on the inside and
    # the outline has no gaps.
    chord = d_out * math.tan(math.pi / _RING_SEGMENTS)
    shapes = ""
    for i in range(_RING_SEGMENTS):
        a = 2 * math.pi * i / _RING_SEGMENTS
        origin = (
            f'<origin xyz="{r_mid * math.cos(a):.6f} {r_mid * math.sin(a):.6f} 0" '
            f'rpy="0 0 {a + math.pi / 2:.6f}"/>'
        )
        geom = _box((chord, band, thick))
        shapes += (
            f'    <visual>{origin}<geometry>{geom}</geometry><material name="c"><color rgba="{rgba}"/>'
            f"</material></visual>\n    <collision>{origin}<geometry>{geom}</geometry></collision>\n"
        )
    volume = math.pi * thick * ((d_out / 2) ** 2 - (d_out / 2 - band) ** 2)
    mass = np.clip(rng.uniform(300, 900) * volume, 0.03, 0.5)  # wood to rubber, kg/m^3
    return float(mass), (float(d_out), float(d_out), float(thick)), shapes


def generate_ring(index: int) -> tuple[ItemSpec, str]:
    """The spec and URDF text of ring `index` of `novel-test` (pure: writes nothing)."""
    return _generate(RING_NAME, RING_FAMILY, RING_SEED0, _ring_design, index)


def _generate(catalog: str, family: str, seed0: int, design, index: int) -> tuple[ItemSpec, str]:
    if not 0 <= index < N_ITEMS:
        raise ValueError(f"{catalog} has items 0..{N_ITEMS - 1}, not {index}")
    mass, ext, shapes = design(np.random.default_rng(seed0 + index))
    name = f"{family}-{index:04d}"
    path = cache_dir() / f"novel-v{_GENERATOR_VERSION}" / catalog / f"{name}.urdf"
    spec = ItemSpec(
        name=f"{catalog}/{name}",
        family=family,
        urdf_path=str(path),
        scale=1.0,
        mass_kg=mass,
        extents=ext,
        friction=FRICTION,
    )
    return spec, _urdf(name.replace("-", "_"), mass, ext, shapes)


def load_test() -> Catalog:
    """The 240 rings of `novel-test`; URDFs written on first use."""
    return _load(RING_NAME, generate_ring)


def load() -> Catalog:
    """The 240 frames of `novel-train`; URDFs written on first use."""
    return _load(NAME, generate)


def _load(name: str, make) -> Catalog:
    items = []
    for i in range(N_ITEMS):
        spec, text = make(i)
        path = Path(spec.urdf_path)
        if not path.exists() or path.stat().st_size != len(text.encode()):
            write_atomic(path, text)
        items.append(spec)
    return Catalog(name, tuple(items))
