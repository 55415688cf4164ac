"""Operator metrics from benchmark episode records, with 95% confidence intervals.

An episode record is a plain dict (JSON-able, so it can come back from a worker process or a Ray
task). Its `attempts` list holds one dict per executed pick:

    item        str   which item was targeted (simulation ground truth), e.g. "b7"
    family      str   its catalog family
    first       bool  the first attempt on this item in the episode
    success     bool  picked *and* placed in the box
    reason      str   Outcome reason of the pick (or of the place, when the pick succeeded)
    decided_by  str   "model" | "model-unsure" | "associate:<id>"
    damaged     bool  dropped from over the damage height, or hit harder than the impact limit

and the episode carries `items`, `items_cleared`, `robot_seconds` (motion + idle, simulated),
`sensing_seconds`, `planning_seconds`, `human_seconds`, `assists_requested`, `assists_answered`,
`assists_expired`, `plan_latency_ms` (list), `wall_seconds`.

Picks per hour (Mahler et al.): `mpph` = picks / (robot + sensing seconds) * 3600, where robot seconds
come from simulated motion under the arm's velocity and acceleration limits plus the time the cell
idled waiting for a person, and sensing seconds are a fixed time per capture. Failed attempts count
in the denominator. Both parts are simulated, so `mpph` is the same on any host and with any number
of workers. `mpph_with_planning` also adds the planner's measured wall time on this host (this
controller does not overlap planning with motion), so it depends on the machine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials ((0, 1) when n == 0)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + Z95**2 / n
    c = (p + Z95**2 / (2 * n)) / d
    h = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(k, n)
    return {"value": (k / n) if n else None, "k": k, "n": n, "ci95": [lo, hi]}


def aggregate(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's JSON metrics from a list of episode records (order does not matter)."""
    eps = sorted(episodes, key=lambda e: e["episode"])
    attempts = [a for e in eps for a in e["attempts"]]
    firsts = [a for a in attempts if a["first"]]
    picks = sum(1 for a in attempts if a["success"])
    items = sum(e["items"] for e in eps)
    cleared = sum(e["items_cleared"] for e in eps)
    damaged = sum(1 for a in attempts if a["damaged"])
    robot = sum(e["robot_seconds"] for e in eps)
    sensing = sum(e["sensing_seconds"] for e in eps)
    planning = sum(e["planning_seconds"] for e in eps)
    cycle = robot + sensing + planning
    human = sum(e["human_seconds"] for e in eps)
    requested = sum(e["assists_requested"] for e in eps)
    lat = np.array([x for e in eps for x in e["plan_latency_ms"]], dtype=float)

    fam_first: dict[str, list[bool]] = defaultdict(list)
    fam_all: dict[str, list[bool]] = defaultdict(list)
    for a in attempts:
        fam_all[a["family"]].append(a["success"])
        if a["first"]:
            fam_first[a["family"]].append(a["success"])
    families = {
        f: {
            "first_attempt_success": _rate(sum(fam_first[f]), len(fam_first[f])),
            "attempt_success": _rate(sum(v), len(v)),
        }
        for f, v in sorted(fam_all.items())
    }
    reasons: dict[str, int] = defaultdict(int)
    for a in attempts:
        if not a["success"]:
            reasons[a["reason"]] += 1

    fas = _rate(sum(a["success"] for a in firsts), len(firsts))
    clr = _rate(cleared, items)
    dmg = _rate(damaged, len(attempts))
    return {
        "episodes": len(eps),
        "items": items,
        "picks": picks,
        "attempts": len(attempts),
        "first_attempt_success": fas["value"],
        "first_attempt_success_ci95": fas["ci95"],
        "clearance_rate": clr["value"],
        "clearance_rate_ci95": clr["ci95"],
        "mpph": (picks / (robot + sensing) * 3600.0) if robot + sensing > 0 else 0.0,
        "mpph_with_planning": (picks / cycle * 3600.0) if cycle > 0 else 0.0,
        "cycle_seconds_per_pick": (cycle / picks) if picks else None,
        "assists_per_100_picks": (100.0 * requested / picks) if picks else None,
        "human_seconds_per_100_picks": (100.0 * human / picks) if picks else None,
        "damage_rate": dmg["value"],
        "damage_rate_ci95": dmg["ci95"],
        "plan_latency_ms_p50": float(np.percentile(lat, 50)) if lat.size else None,
        "plan_latency_ms_p99": float(np.percentile(lat, 99)) if lat.size else None,
        "robot_seconds": robot,
        "sensing_seconds": sensing,
        "planning_seconds": planning,
        "human_seconds": human,
        "assists_requested": requested,
        "assists_answered": sum(e["assists_answered"] for e in eps),
        "assists_expired": sum(e["assists_expired"] for e in eps),
        "failures_by_reason": dict(sorted(reasons.items())),
        "families": families,
    }
