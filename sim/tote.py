"""Filling a tote: drop catalog items one by one with seeded random poses and let physics settle them.

The tote itself (floor and walls) belongs to the scene that calls `fill_tote`; this module only adds
items. Determinism: pybullet DIRECT is deterministic for the same sequence of calls, and every random
choice here comes from the caller's `rng`, so the same scene + seed gives the same settled poses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from grasping.types import Bounds
from sim.catalogs.core import Catalog, ItemSpec, spawn_item

log = logging.getLogger(__name__)

DROP_CLEARANCE_M = 0.02  # gap between the pile top and the lowest point an item can have when released
MAX_ATTEMPTS_PER_ITEM = 4  # replacements allowed per requested item before giving up on filling


@dataclass(frozen=True)
class SpawnedItem:
    body_id: int  # pybullet body id in the caller's client
    spec: ItemSpec


def random_quaternion(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed rotation, quaternion xyzw (normalised 4-D Gaussian)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    return q if q[3] >= 0 else -q


def _inside_footprint(client_id: int, body: int, region: Bounds) -> bool:
    """Whether the item's bounding-box centre lies over the region's xy footprint, not below its floor."""
    import pybullet as p

    lo, hi = (np.asarray(v) for v in p.getAABB(body, physicsClientId=client_id))
    c = (lo + hi) / 2
    in_xy = bool(region.lo[0] <= c[0] <= region.hi[0] and region.lo[1] <= c[1] <= region.hi[1])
    # Fell through the floor (a tunnelling thin item) counts as outside too.
    return in_xy and bool(hi[2] >= region.lo[2])


def _pile_top(client_id: int, bodies: list[int], floor_z: float) -> float:
    import pybullet as p

    tops = [p.getAABB(b, physicsClientId=client_id)[1][2] for b in bodies]
    return max([floor_z, *tops])


def fill_tote(
    client_id: int,
    catalog: Catalog,
    n: int,
    rng: np.random.Generator,
    drop_region: Bounds,
    settle_steps: int = 240,
) -> list[SpawnedItem]:
    """Drop `n` items into `drop_region` (base-frame box: its footprint is the tote's inside, lo z its floor).

    Each item gets a random orientation and a random xy over the footprint (kept a bounding radius
    away from the walls where the footprint allows), is released just above the current pile (a
    gentle pour, not a throw: high drops bounce items out of real totes too) and the simulation is
    stepped `settle_steps` times. After every drop, any item whose centre ended outside the footprint
    (bounced out, resting on a rim) is removed and replaced by a fresh draw, so the tote gets `n`
    items whenever they fit; after MAX_ATTEMPTS_PER_ITEM * n drops it stops and returns what is in.
    The caller's client must have gravity pointing down (-z).
    """
    import pybullet as p

    if n < 0:
        raise ValueError(f"fill_tote: n must be >= 0, got {n}")
    if settle_steps < 1:
        raise ValueError(f"fill_tote: settle_steps must be >= 1, got {settle_steps}")
    gz = p.getPhysicsEngineParameters(physicsClientId=client_id).get("gravityAccelerationZ", -9.81)
    if gz >= 0:
        raise ValueError(
            f"fill_tote: gravity z is {gz} m/s^2; items would not fall (setGravity(0, 0, -9.81))"
        )
    spawned: list[SpawnedItem] = []
    attempts = 0
    floor_z = float(drop_region.lo[2])
    while len(spawned) < n and attempts < MAX_ATTEMPTS_PER_ITEM * n:
        attempts += 1
        spec = catalog.sample(rng, 1)[0]
        quat = random_quaternion(rng)
        r = spec.bounding_radius
        xy = np.empty(2)
        for k in range(2):
            lo, hi = drop_region.lo[k] + r, drop_region.hi[k] - r
            if lo > hi:  # item wider than the footprint along this axis: aim for the middle
                lo = hi = (drop_region.lo[k] + drop_region.hi[k]) / 2
            xy[k] = rng.uniform(lo, hi)
        z = _pile_top(client_id, [s.body_id for s in spawned], floor_z) + r + DROP_CLEARANCE_M
        body = spawn_item(client_id, spec, (xy[0], xy[1], z), quat)
        spawned.append(SpawnedItem(body, spec))
        for _ in range(settle_steps):
            p.stepSimulation(physicsClientId=client_id)
        kept = []
        for s in spawned:
            if _inside_footprint(client_id, s.body_id, drop_region):
                kept.append(s)
            else:
                log.debug("removing %s: settled outside the tote footprint", s.spec.name)
                p.removeBody(s.body_id, physicsClientId=client_id)
        spawned = kept
    if len(spawned) < n:
        log.warning(
            "fill_tote: only %d of %d items stayed in the tote after %d drops", len(spawned), n, attempts
        )
    return spawned
