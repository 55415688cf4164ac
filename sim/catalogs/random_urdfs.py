"""The `train` and `test` catalogs: pybullet_data's 1,000 `random_urdfs` objects, split by index.

What it is
    `pybullet_data.getDataPath()/random_urdfs/NNN/NNN.urdf`, NNN = 000..999: irregular blobs made of
    fused primitives, the objects of PyBullet's KukaDiverseObjectEnv. Indices 000-799 are `train`,
    800-999 are `test` (KukaDiverseObjectEnv holds out indices ending in 0 instead; pickcell splits
    by range so the two sets share no object and the test set is a contiguous block).

    Collision shapes: each URDF names its OBJ mesh as collision geometry. pybullet builds one
    convex hull per object (`o` group) in an OBJ file, and these blobs are unions of 4-11 convex
    primitive parts, so the collision compound follows the visual shape closely: top-down ray tests
    on objects 000, 010 and 500 hit 1,336 / 1,143 / 1,115 cells of a 60x60 grid where the union of
    the parts' hulls covers 1,173 / 1,134 / 1,638 and a single hull of all vertices would cover
    1,917 / 2,115 / 2,450. The notches a gripper sees are real notches for physics too.

What is randomised (deterministically, from the item index)
    - Scale: at native size about 65% of the objects are wider than 8 cm both ways (FIELD-NOTES),
      too big for the parallel jaw and larger than typical each-picking SKUs. Each item is scaled so
      that its largest extent is a target drawn uniformly from 4-15 cm with a generator seeded by
      (SCALE_SEED, index): the same item is always the same size, sizes span small parts to
      mid-size goods, and a good share of every family fits the 8 cm jaw.
    - Mass: density drawn uniformly from 200-600 kg/m^3 (foam and packaged goods to solid plastic),
      times the scaled bounding-box volume, times 0.5 (the blobs fill roughly half their box),
      clipped to 0.02-1.5 kg.
    - Friction: 0.7 for every item (hard plastic on a plastic tote / rubber pad).

What counts as success
    Object 168 has NaN vertices in its mesh and is left out of `train` (799 items); any object whose
    mesh has a non-finite vertex is left out the same way, and `broken_indices()` lists them.

    The catalog loads in well under a second after the first run (extents measured once in a private
    pybullet client and cached as JSON under the user cache dir, keyed by pybullet version), every
    item spawns at its size and mass, and train/test never share an index.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from sim.catalogs.core import (
    CONVEX_MARGIN_M,
    Catalog,
    ItemSpec,
    UrdfProbe,
    cache_dir,
    pybullet_version,
    read_json,
    write_atomic,
)

log = logging.getLogger(__name__)

N_OBJECTS = 1000
SPLITS = {"train": range(0, 800), "test": range(800, 1000)}
SCALE_SEED = 20_240_501  # fixed: changing it changes every item's size
TARGET_MAX_EXTENT_M = (0.04, 0.15)  # largest side after scaling, m
DENSITY_KG_M3 = (200.0, 600.0)
FILL_FRACTION = 0.5  # share of the bounding box the blob occupies
MASS_RANGE_KG = (0.02, 1.5)
FRICTION = 0.7
_META_VERSION = 3


def data_dir() -> Path:
    import pybullet_data

    return Path(pybullet_data.getDataPath()) / "random_urdfs"


def urdf_path(index: int) -> Path:
    return data_dir() / f"{index:03d}" / f"{index:03d}.urdf"


def _mesh_is_finite(index: int) -> bool:
    """Whether every vertex of the object's OBJ mesh is a finite number.

    Object 168 ships with all vertices NaN; pybullet loads it anyway and reports a different garbage
    bounding box from run to run, so it must be caught before it is measured.
    """
    obj = urdf_path(index).with_suffix(".obj")
    rows = [line.split()[1:4] for line in obj.read_text().splitlines() if line.startswith("v ")]
    return bool(rows) and bool(np.isfinite(np.array(rows, dtype=np.float64)).all())


def _native_metadata() -> dict[int, tuple[list[float], list[float]] | None]:
    """index -> (extents, center) at globalScaling 1, or None for a broken object; cached (about 2 s)."""
    path = cache_dir() / f"random_urdfs-native-pb{pybullet_version()}-v{_META_VERSION}.json"
    cached = read_json(path)
    if cached and cached.get("data_dir") == str(data_dir()) and len(cached.get("items", {})) == N_OBJECTS:
        return {int(k): (v[0], v[1]) if v else None for k, v in cached["items"].items()}
    log.info("measuring %d random_urdfs objects once; caching in %s", N_OBJECTS, path)
    meta: dict[int, tuple[list[float], list[float]] | None] = {}
    with UrdfProbe() as probe:
        for i in range(N_OBJECTS):
            if not _mesh_is_finite(i):
                log.warning("random_urdfs/%03d has non-finite mesh vertices; left out of its split", i)
                meta[i] = None
                continue
            ext, center, _ = probe.measure(urdf_path(i))
            meta[i] = (list(ext), list(center))
    write_atomic(path, json.dumps({"data_dir": str(data_dir()), "items": meta}))
    return meta


def item_spec(index: int, native_extents: list[float], native_center: list[float]) -> ItemSpec:
    """The scaled, weighed spec of object `index` (deterministic in the index)."""
    rng = np.random.default_rng([SCALE_SEED, index])
    target = rng.uniform(*TARGET_MAX_EXTENT_M)
    density = rng.uniform(*DENSITY_KG_M3)
    # Contacts happen CONVEX_MARGIN_M outside the mesh vertices at any scale, so scale the vertex
    # box and add the margin back instead of scaling the margin too.
    vertex_extents = np.asarray(native_extents) - 2 * CONVEX_MARGIN_M
    scale = (target - 2 * CONVEX_MARGIN_M) / vertex_extents.max()
    extents = tuple(float(e * scale + 2 * CONVEX_MARGIN_M) for e in vertex_extents)
    mass = float(np.clip(density * np.prod(extents) * FILL_FRACTION, *MASS_RANGE_KG))
    return ItemSpec(
        name=f"random_urdfs/{index:03d}",
        family="random_urdf",
        urdf_path=str(urdf_path(index)),
        scale=float(scale),
        mass_kg=mass,
        extents=extents,
        center_offset=tuple(float(c * scale) for c in native_center),
        friction=FRICTION,
    )


def load(split: str) -> Catalog:
    """`train` (indices 000-799) or `test` (800-999), without the broken objects (see BROKEN)."""
    if split not in SPLITS:
        raise ValueError(f"random_urdfs split must be one of {sorted(SPLITS)}, got {split!r}")
    if not urdf_path(0).exists():
        raise ValueError(f"pybullet_data has no random_urdfs folder at {data_dir()}")
    meta = _native_metadata()
    return Catalog(split, tuple(item_spec(i, *meta[i]) for i in SPLITS[split] if meta[i] is not None))


def broken_indices() -> list[int]:
    """Indices left out of every split because their meshes are unusable (on pybullet 3.2.7: [168])."""
    return sorted(i for i, m in _native_metadata().items() if m is None)
