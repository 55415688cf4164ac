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
REST_SPEED_M_S = 0.01  # an item moving slower than this counts as settled
MAX_FINAL_SETTLE_ROUNDS = 8  # extra rounds of settle_steps waiting for the pile to come to rest


@dataclass(frozen=True)
class SpawnedItem:
    body_id: int  # pybullet body id in the caller's client
    spec: ItemSpec


def random_quaternion(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed rotation, quaternion xyzw (normalised 4-D Gaussian)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    return q if q[3] >= 0 else -q


def _inside(client_id: int, body: int, region: Bounds) -> bool:
    """Whether the item's bounding-box centre lies inside the region: over its footprint, below its top.

    An item resting on a rim or sticking up out of an overfull tote (centre above the top) is out;
    so is one that tunnelled through the floor.
    """
    import pybullet as p

    lo, hi = (np.asarray(v) for v in p.getAABB(body, physicsClientId=client_id))
    c = (lo + hi) / 2
    in_xy = bool(region.lo[0] <= c[0] <= region.hi[0] and region.lo[1] <= c[1] <= region.hi[1])
    return in_xy and bool(hi[2] >= region.lo[2]) and bool(c[2] <= region.hi[2])


def _prune(client_id: int, spawned: list[SpawnedItem], region: Bounds) -> list[SpawnedItem]:
    import pybullet as p

    kept = []
    for s in spawned:
        if _inside(client_id, s.body_id, region):
            kept.append(s)
        else:
            log.debug("removing %s: settled outside the tote", s.spec.name)
            p.removeBody(s.body_id, physicsClientId=client_id)
    return kept


def _max_speed(client_id: int, spawned: list[SpawnedItem]) -> float:
    import pybullet as p

    speeds = [np.linalg.norm(p.getBaseVelocity(s.body_id, physicsClientId=client_id)[0]) for s in spawned]
    return float(max(speeds, default=0.0))


def _pile_top(client_id: int, bodies: list[int], floor_z: float) -> float:
    import pybullet as p

    tops = [p.getAABB(b, physicsClientId=client_id)[1][2] for b in bodies]
    return max([floor_z, *tops])


def _drop_one(
    client_id: int,
    catalog: Catalog,
    rng: np.random.Generator,
    region: Bounds,
    spawned: list[SpawnedItem],
    floor_z: float,
) -> SpawnedItem:
    spec = catalog.sample(rng, 1)[0]
    quat = random_quaternion(rng)
    r = spec.bounding_radius
    xy = np.empty(2)
    for k in range(2):
        lo, hi = region.lo[k] + r, region.hi[k] - r
        if lo > hi:  # item wider than the footprint along this axis: aim for the middle
            lo = hi = (region.lo[k] + region.hi[k]) / 2
        xy[k] = rng.uniform(lo, hi)
    z = _pile_top(client_id, [s.body_id for s in spawned], floor_z) + r + DROP_CLEARANCE_M
    return SpawnedItem(spawn_item(client_id, spec, (xy[0], xy[1], z), quat), spec)


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
    stepped `settle_steps` times. After every drop, any item whose centre ended outside the region
    (bounced out, resting on a rim, piled above the top of an overfull tote) is removed and replaced
    by a fresh draw, so the tote gets `n` items whenever they fit; after MAX_ATTEMPTS_PER_ITEM * n
    drops it stops and returns what is in (with a warning). At the end the pile is stepped until every
    item moves slower than REST_SPEED_M_S (at most MAX_FINAL_SETTLE_ROUNDS more rounds).
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
    while True:
        while len(spawned) < n and attempts < MAX_ATTEMPTS_PER_ITEM * n:
            attempts += 1
            spawned.append(_drop_one(client_id, catalog, rng, drop_region, spawned, floor_z))
            for _ in range(settle_steps):
                p.stepSimulation(physicsClientId=client_id)
            spawned = _prune(client_id, spawned, drop_region)
        # Let the whole pile come to rest, so callers get a scene that stays put while they look at it.
        for _ in range(MAX_FINAL_SETTLE_ROUNDS):
            if _max_speed(client_id, spawned) < REST_SPEED_M_S:
                break
            for _ in range(settle_steps):
                p.stepSimulation(physicsClientId=client_id)
        spawned = _prune(client_id, spawned, drop_region)
        if len(spawned) >= n or attempts >= MAX_ATTEMPTS_PER_ITEM * n:
            break
    if len(spawned) < n:
        log.warning(
            "fill_tote: only %d of %d items stayed in the tote after %d drops", len(spawned), n, attempts
        )
    return spawned
