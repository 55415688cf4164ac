"""Cycle time of the benchmark: where each pick's seconds go, and picks per hour without people.

Episode side (`cycle_record`): the simulated arm charges every robot second of a motion to one phase
(sim/sim_arm.py: `move_to_pick`, `approach`, `grasp`, `lift`, `transit`, `place`, `release`,
`retreat`, `recover`, `home`, `move`, `stopped`); the controller's report says how long the cell
idled waiting for a person (`human_wait_s`) and how much of the planner's wall time the arm waited
for (`plan_exposed_ms`; planning done while the arm moves is hidden and not charged).

The controller also sorts its camera captures (`ToteReport.captures_*`): ones the arm waits for
(exposed), ones taken while the arm places (behind motion, arm/lookahead.py) and ones taken while the
cell idles waiting for a person with nothing else to do (inside that wait, as is the plan made on
them). A look taken while a question is pending that finds nothing to do but wait for the answer is
inside the wait too (the person was already thinking; `CellController._charge_look_to_wait`); one
that finds something to pick stays exposed. Sensing that costs the cell time is the exposed
captures only, `sensing_exposed_seconds`; `sensing_seconds` keeps counting every capture.

Aggregate side (`cycle_metrics`), merged into the bench's metrics ("sensing" below is exposed
sensing; `mpph` in sim/benchmark/metrics.py uses it too):

- `mpph_with_planning` = picks / (robot + sensing + exposed planning seconds) * 3600 (replaces the
  older definition that charged all planning time);
- `mpph_excluding_waits` = picks / (robot - idle waiting for a person + sensing + exposed planning)
  * 3600: the cell's own speed, which issue 17 moves (waiting for people is cut elsewhere);
  `mpph_excluding_waits_all_sensing` charges every capture instead (the definition before captures
  were sorted), for comparison with older runs;
- `cycle_breakdown_s_per_pick`: seconds per successful pick of sensing, exposed planning, the arm's
  phases grouped as the issue names them (move to pick = move_to_pick + approach; place = place +
  release + retreat; recover = failed-pick back-outs and moves home), protective stops, waiting for
  a person, and `other` idle (camera retries, empty looks), adding up to 3600 / `mpph_with_planning`;
- `mpph_limit` = 3600 / the minimum cycle of the layout (`minimum_cycle_s`, also printed by
  benchmarks/cycle_limit.py) and `mpph_share_of_limit` = `mpph_excluding_waits` / `mpph_limit`.
"""

from __future__ import annotations

from typing import Any

from sim.config_sim_camera import SimCameraConfig

CAPTURE_KINDS = ("exposed", "behind_motion", "while_waiting")
# Exposure + transfer of one RGB-D capture on a real cell, seconds (the bench charges this per capture).
SENSING_S_PER_CAPTURE = SimCameraConfig().capture_s  # s per capture, the simulated camera's

GROUPS = {  # breakdown key -> the arm's phases it sums
    "move_to_pick": ("move_to_pick", "approach"),
    "grasp": ("grasp",),
    "lift": ("lift",),
    "transit": ("transit",),
    "place": ("place", "release", "retreat"),
    "recover": ("recover", "home", "move"),
    "protective_stop": ("stopped",),
}


def cycle_record(arm: Any, rep: Any, cell: Any = None) -> dict[str, Any]:
    """The episode's cycle-time fields, from the simulated arm (fresh per episode) and the tote report;
    with the cell, also the minimum cycle of its layout (`minimum_cycle_s`)."""
    planning = sum(rep.plan_latency_ms) / 1000.0
    exposed = getattr(rep, "plan_exposed_ms", None)
    limit: dict[str, Any] = {}
    captures = {
        "exposed": int(getattr(rep, "captures_exposed", 0)),
        "behind_motion": int(getattr(rep, "captures_behind_motion", 0)),
        "while_waiting": int(getattr(rep, "captures_while_waiting", 0)),
    }
    if cell is not None:
        limit["cycle_limit_s"] = round(minimum_cycle_s(arm, cell.tote_bounds, cell.box_bounds)["cycle_s"], 4)
    return {
        **limit,
        "phase_seconds": {k: round(v, 4) for k, v in sorted(getattr(arm, "phase_time", {}).items())},
        "wait_seconds": round(float(rep.human_wait_s), 4),
        "planning_exposed_seconds": planning if exposed is None else sum(exposed) / 1000.0,
        "planning_while_waiting_seconds": float(getattr(rep, "planning_while_waiting_ms", 0.0)) / 1000.0,
        "captures": captures,
        "sensing_exposed_seconds": captures["exposed"] * SENSING_S_PER_CAPTURE,
    }


def exposed_sensing(episode: dict[str, Any]) -> float:
    """Seconds of sensing that cost the cell time in one episode record (every capture, in records
    made before captures were sorted)."""
    return float(episode.get("sensing_exposed_seconds", episode["sensing_seconds"]))


def cycle_metrics(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Picks per hour with exposed planning only, without waits for people, and the per-pick breakdown."""
    picks = sum(1 for e in episodes for a in e["attempts"] if a["success"])
    robot = sum(e["robot_seconds"] for e in episodes)
    sensing = sum(exposed_sensing(e) for e in episodes)
    sensing_all = sum(e["sensing_seconds"] for e in episodes)
    planning = sum(e["planning_seconds"] for e in episodes)
    exposed = sum(e.get("planning_exposed_seconds", e["planning_seconds"]) for e in episodes)
    wait = sum(e.get("wait_seconds", 0.0) for e in episodes)
    phases: dict[str, float] = {}
    for e in episodes:
        for k, v in e.get("phase_seconds", {}).items():
            phases[k] = phases.get(k, 0.0) + v
    busy = robot + sensing + exposed
    alone = robot - wait + sensing + exposed
    alone_all = alone - sensing + sensing_all
    captures = {k: sum(e.get("captures", {}).get(k, 0) for e in episodes) for k in CAPTURE_KINDS}
    breakdown: dict[str, float | None] = {"sense": sensing, "plan_exposed": exposed}
    for key, names in GROUPS.items():
        breakdown[key] = sum(phases.get(n, 0.0) for n in names)
    breakdown["wait_for_person"] = wait
    grouped = {n for names in GROUPS.values() for n in names}
    other_phases = sum(v for k, v in phases.items() if k not in grouped)
    breakdown["other"] = robot - sum(phases.values()) - wait + other_phases
    limits = [e["cycle_limit_s"] for e in episodes if e.get("cycle_limit_s")]
    mpph_limit = 3600.0 / (sum(limits) / len(limits)) if limits else None
    mpph_alone = (picks / alone * 3600.0) if alone > 0 else 0.0
    return {
        "mpph_limit": mpph_limit,
        "mpph_share_of_limit": (mpph_alone / mpph_limit) if mpph_limit else None,
        "mpph_with_planning": (picks / busy * 3600.0) if busy > 0 else 0.0,
        "mpph_excluding_waits": mpph_alone,
        "mpph_excluding_waits_all_sensing": (picks / alone_all * 3600.0) if alone_all > 0 else 0.0,
        "sensing_exposed_seconds": sensing,
        "captures_per_pick": {k: (v / picks if picks else None) for k, v in captures.items()},
        "planning_exposed_seconds": exposed,
        "planning_hidden_seconds": planning - exposed,
        "wait_seconds": wait,
        "cycle_breakdown_s_per_pick": {k: (v / picks if picks else None) for k, v in breakdown.items()},
    }


def minimum_cycle_s(
    arm: Any, tote_bounds: Any, box_bounds: Any, item_height_m: float = 0.05
) -> dict[str, Any]:
    """The shortest pick-and-place cycle this layout allows, from the same arm model and limits.

    A top-down suction pick at the tote centre of an item `item_height_m` tall and a release over
    the box centre, with the simulated arm's own poses (`pregrasp_offset`, the transit height over
    the rims, the box drop height) solved by its IK: from the last release (rest: the cup let go)
    back up over the box, over the tote, down past the pre-grasp to the grasp (rest: the cup grips),
    up past the lift top and over the box, down to the release. Each leg is one time-optimal
    jerk-limited joint move through its via points (sim.motion, the Panda's
    velocity, acceleration and jerk limits), straight in no Cartesian sense: joint moves bound the
    straight lines from below. Plus the cup's grip and release actuation. Nothing is slowed for a
    payload, nothing touches, no sensing or planning: a bound no real cycle beats.
    """
    import numpy as np

    from grasping.types import grasp_frame
    from sim.motion import plan_via_move
    from sim.sim_arm import M_GRASP_HAND

    cfg = arm.cfg
    link = arm.tcp_link("suction")
    R_hand = grasp_frame(np.array([0.0, 0.0, -1.0])) @ M_GRASP_HAND
    tote_c = (np.asarray(tote_bounds.lo) + np.asarray(tote_bounds.hi)) / 2
    box_c = (np.asarray(box_bounds.lo) + np.asarray(box_bounds.hi)) / 2
    rim = max(float(tote_bounds.hi[2]), float(box_bounds.hi[2]))
    safe = rim + cfg.transit_clearance  # the arm's transit height over the rims (empty cell)
    grasp = np.array([tote_c[0], tote_c[1], float(tote_bounds.lo[2]) + item_height_m])
    pre = grasp + np.array([0.0, 0.0, cfg.pregrasp_offset])
    over_tote = np.array([grasp[0], grasp[1], max(pre[2], safe + item_height_m)])
    release = np.array([box_c[0], box_c[1], float(box_bounds.lo[2]) + item_height_m + cfg.place_drop_height])
    over_box = np.array([box_c[0], box_c[1], over_tote[2]])
    seed = cfg.home
    q = {}
    for name, pos in (
        ("over_box", over_box),
        ("over_tote", over_tote),
        ("pre", pre),
        ("grasp", grasp),
        ("release", release),
    ):
        q[name] = arm._solve(pos, R_hand, link, arm._seed_over(pos) if name != "grasp" else seed)
        seed = q[name]
    legs = {
        # The arm backs out of the box as the first leg of its move to the next pick, as it does
        # (SimArmConfig.blended_exit).
        "to_grasp": plan_via_move(
            [q["release"], q["over_box"], q["over_tote"], q["pre"], q["grasp"]]
        ).duration,
        "to_release": plan_via_move([q["grasp"], q["over_tote"], q["over_box"], q["release"]]).duration,
    }
    actuation = 2 * cfg.suction.actuation_s
    cycle = sum(legs.values()) + actuation
    return {
        "cycle_s": cycle,
        "legs_s": legs,
        "actuation_s": actuation,
        "mpph": 3600.0 / cycle,
    }
