"""What every catalog shares: the item description, the catalog itself, spawning, URDF probing, caching.

An `ItemSpec` says everything the simulator needs to put one warehouse item into a scene: which URDF,
at what scale, how heavy, how grippy, and how big (so tote filling and the box packer can reason
about it without loading it). A `Catalog` is an immutable, named tuple of specs with seeded sampling.

pybullet is imported inside the functions that need it, so that importing a catalog (and with it
`pickcell --help`) stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemSpec:
    """One item a tote can hold. Sizes are after scaling; the item frame is the URDF base frame."""

    name: str  # unique within a catalog, e.g. "random_urdfs/812", "procedural/carton-0007"
    family: str  # carton|mailer|bottle|ball|tube|small_part|random_urdf|<user folder name>
    urdf_path: str  # absolute path
    scale: float  # globalScaling passed to loadURDF (dimensionless)
    mass_kg: float  # total mass after scaling, kg (set with changeDynamics on spawn)
    extents: tuple[float, float, float]  # axis-aligned size in the item's own frame after scaling, m
    # Centre of that axis-aligned box in the item's base frame, m: the base frame is not always the
    # geometric centre (random_urdfs meshes are off-centre by up to a few mm, user URDFs by anything).
    center_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    friction: float = 0.6  # Coulomb lateral friction coefficient against the gripper and the tote

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ItemSpec.name must not be empty")
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise ValueError(f"{self.name}: scale must be positive, got {self.scale}")
        if not (self.mass_kg > 0 and np.isfinite(self.mass_kg)):
            raise ValueError(f"{self.name}: mass_kg must be positive, got {self.mass_kg}")
        ext = tuple(float(e) for e in self.extents)
        if len(ext) != 3 or not all(e > 0 and np.isfinite(e) for e in ext):
            raise ValueError(f"{self.name}: extents must be three positive sizes, got {self.extents}")
        off = tuple(float(c) for c in self.center_offset)
        if len(off) != 3:
            raise ValueError(f"{self.name}: center_offset must have 3 entries, got {self.center_offset}")
        if not (self.friction >= 0 and np.isfinite(self.friction)):
            raise ValueError(f"{self.name}: friction must be >= 0, got {self.friction}")
        object.__setattr__(self, "extents", ext)
        object.__setattr__(self, "center_offset", off)
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "mass_kg", float(self.mass_kg))
        object.__setattr__(self, "friction", float(self.friction))

    @property
    def bounding_radius(self) -> float:
        """Radius (m) of a sphere about the base origin that contains the item in any orientation."""
        return float(np.linalg.norm(np.asarray(self.extents) / 2) + np.linalg.norm(self.center_offset))


@dataclass(frozen=True)
class Catalog:
    """A named, immutable set of items. `sample` is the only source of randomness, and it is seeded."""

    name: str
    items: tuple[ItemSpec, ...]

    def __post_init__(self) -> None:
        items = tuple(self.items)
        if not items:
            raise ValueError(f"catalog {self.name!r} has no items")
        names = [it.name for it in items]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"catalog {self.name!r} has duplicate item names: {dup[:5]}")
        object.__setattr__(self, "items", items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def families(self) -> tuple[str, ...]:
        """The families present, sorted."""
        return tuple(sorted({it.family for it in self.items}))

    def sample(self, rng: np.random.Generator, n: int) -> list[ItemSpec]:
        """n items drawn with `rng`: distinct items while the catalog has enough, with repeats beyond.

        Repeats are allowed past the catalog size because a real tote often holds several units of
        one SKU.
        """
        if n < 0:
            raise ValueError(f"cannot sample {n} items")
        idx = rng.choice(len(self.items), size=n, replace=n > len(self.items))
        return [self.items[int(i)] for i in idx]

    def filter(self, families: Sequence[str] | None) -> Catalog:
        """Only the items of the given families. Unknown family names are an error, not an empty set."""
        if families is None:
            return self
        if isinstance(families, str):
            raise ValueError(f"families must be a sequence of names, got the string {families!r}")
        wanted = set(families)
        unknown = wanted - set(self.families)
        if unknown:
            raise ValueError(
                f"catalog {self.name!r} has no family {sorted(unknown)}; "
                f"its families are {list(self.families)}"
            )
        return Catalog(self.name, tuple(it for it in self.items if it.family in wanted))

    def get(self, name: str) -> ItemSpec:
        for it in self.items:
            if it.name == name:
                return it
        raise KeyError(f"catalog {self.name!r} has no item {name!r}")


def spawn_item(
    client_id: int,
    spec: ItemSpec,
    position: Sequence[float] | np.ndarray,
    orientation_xyzw: Sequence[float] | np.ndarray = (0.0, 0.0, 0.0, 1.0),
) -> int:
    """Load `spec` into simulation `client_id` at a base pose; set mass and friction. Returns the body id.

    The mass is spread over the body's links in proportion to their URDF masses, so a multi-link
    user item keeps its balance; pybullet recomputes each link's inertia from its collision shape.
    Raises ValueError naming the file when pybullet cannot load it.
    """
    import pybullet as p

    pos = np.asarray(position, dtype=np.float64)
    quat = np.asarray(orientation_xyzw, dtype=np.float64)
    if pos.shape != (3,) or not np.isfinite(pos).all():
        raise ValueError(f"spawn_item: position must be a finite (3,) vector, got {position}")
    if quat.shape != (4,) or not np.isfinite(quat).all() or np.linalg.norm(quat) < 1e-9:
        raise ValueError(
            f"spawn_item: orientation must be a non-zero xyzw quaternion, got {orientation_xyzw}"
        )
    quat = quat / np.linalg.norm(quat)
    try:
        body = p.loadURDF(
            spec.urdf_path,
            basePosition=pos.tolist(),
            baseOrientation=quat.tolist(),
            globalScaling=spec.scale,
            physicsClientId=client_id,
        )
    except p.error as exc:
        raise ValueError(f"pybullet could not load {spec.urdf_path} ({spec.name}): {exc}") from exc
    links = [-1, *range(p.getNumJoints(body, physicsClientId=client_id))]
    masses = np.array([p.getDynamicsInfo(body, li, physicsClientId=client_id)[0] for li in links])
    share = masses / masses.sum() if masses.sum() > 0 else np.eye(len(links))[0]
    for li, frac in zip(links, share, strict=True):
        p.changeDynamics(
            body,
            li,
            mass=float(spec.mass_kg * frac) if frac > 0 else 0.0,
            lateralFriction=spec.friction,
            # Small rolling/spinning resistance: real balls and bottles stop rolling in a tote;
            # with zero they roll forever and a settled scene never settles.
            rollingFriction=1e-4,
            spinningFriction=1e-3,
            physicsClientId=client_id,
        )
    return body


# --- probing URDFs in a private simulator ----------------------------------------------------------


# pybullet 3.2.7 reports getAABB of a URDF convex-mesh shape 3 mm beyond its vertices on each side,
# while contacts happen 1 mm beyond them (a cube mesh of 0.1 m rests with its centre 0.051 m up).
# So a mesh link's physical size is its AABB minus 2 mm per side. URDF cylinders become convex
# meshes in pybullet too; boxes and spheres are exact. Measured on this machine; see tests.
MESH_AABB_EXCESS_M = 0.002
CONVEX_MARGIN_M = 0.001  # contacts of a URDF convex mesh happen this far outside its vertices
_GEOM_MESH = 5  # pybullet.GEOM_MESH


class UrdfProbe:
    """A private DIRECT pybullet client that loads URDFs to measure them. Use as a context manager."""

    def __enter__(self) -> UrdfProbe:
        import pybullet as p

        self._p = p
        self.client = p.connect(p.DIRECT)
        return self

    def __exit__(self, *exc: object) -> None:
        self._p.disconnect(physicsClientId=self.client)

    def measure(self, urdf_path: str | Path, scale: float = 1.0) -> tuple[tuple, tuple, float]:
        """(extents, center_offset, total URDF mass) of the URDF at identity pose and `scale`.

        Raises ValueError naming the file when it cannot be loaded.
        """
        p = self._p
        try:
            body = p.loadURDF(str(urdf_path), globalScaling=scale, physicsClientId=self.client)
        except p.error as exc:
            raise ValueError(f"pybullet could not load URDF {urdf_path}: {exc}") from exc
        try:
            links = [-1, *range(p.getNumJoints(body, physicsClientId=self.client))]
            boxes = np.array([p.getAABB(body, li, physicsClientId=self.client) for li in links])
            for k, li in enumerate(links):
                shapes = p.getCollisionShapeData(body, li, physicsClientId=self.client)
                if shapes and all(sh[2] == _GEOM_MESH for sh in shapes):
                    boxes[k, 0] += MESH_AABB_EXCESS_M
                    boxes[k, 1] -= MESH_AABB_EXCESS_M
            lo, hi = boxes[:, 0, :].min(axis=0), boxes[:, 1, :].max(axis=0)
            mass = float(sum(p.getDynamicsInfo(body, li, physicsClientId=self.client)[0] for li in links))
        finally:
            p.removeBody(body, physicsClientId=self.client)
        ext = hi - lo
        if not (ext > 1e-6).all():
            raise ValueError(
                f"URDF {urdf_path} has no collision geometry (size {ext.round(4).tolist()} m); "
                "an item needs a <collision> element so it can be grasped"
            )
        return tuple(ext.tolist()), tuple(((lo + hi) / 2).tolist()), mass


# --- cache ------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where generated URDFs and measured metadata live: $PICKCELL_CACHE_DIR, else the user cache dir."""
    env = os.environ.get("PICKCELL_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pickcell"
    out = base / "catalogs"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a concurrent reader sees the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    """The JSON in `path`, or None when it is missing or unreadable (a cache is rebuilt, never trusted)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pybullet_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pybullet")
    except PackageNotFoundError:
        return "unknown"


def families_of(items: Iterable[ItemSpec]) -> list[str]:
    return sorted({it.family for it in items})
