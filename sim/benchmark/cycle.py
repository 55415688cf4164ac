"""Cycle time of the benchmark: where each pick's seconds go, and picks per hour without people.

Episode side (`cycle_record`): the simulated arm charges every robot second of a motion to one phase
(sim/sim_arm.py: `move_to_pick`, `approach`, `grasp`, `lift`, `transit`, `place`, `release`,
`retreat`, `recover`, `home`, `move`, `stopped`); the controller's report says how long the cell
idled waiting for a person (`human_wait_s`) and how much of the planner's wall time the arm waited
for (`plan_exposed_ms`; planning done while the arm moves is hidden and not charged).

Aggregate side (`cycle_metrics`), merged into the bench's metrics:

- `mpph_with_planning` = picks / (robot + sensing + exposed planning seconds) * 3600 (replaces the
  older definition that charged all planning time);
- `mpph_excluding_waits` = picks / (robot - idle waiting for a person + sensing + exposed planning)
  * 3600: the cell's own speed, which issue 17 moves (waiting for people is cut elsewhere);
- `cycle_breakdown_s_per_pick`: seconds per successful pick of sensing, exposed planning, the arm's
  phases grouped as the issue names them (move to pick = move_to_pick + approach; place = place +
  release + retreat; recover = failed-pick back-outs and moves home), protective stops, waiting for
  a person, and `other` idle (camera retries, empty looks), adding up to 3600 / `mpph_with_planning`.
"""

from __future__ import annotations

from typing import Any

GROUPS = {  # breakdown key -> the arm's phases it sums
    "move_to_pick": ("move_to_pick", "approach"),
    "grasp": ("grasp",),
    "lift": ("lift",),
    "transit": ("transit",),
    "place": ("place", "release", "retreat"),
    "recover": ("recover", "home", "move"),
    "protective_stop": ("stopped",),
}


def cycle_record(arm: Any, rep: Any) -> dict[str, Any]:
    """The episode's cycle-time fields, from the simulated arm (fresh per episode) and the tote report."""
    planning = sum(rep.plan_latency_ms) / 1000.0
    exposed = getattr(rep, "plan_exposed_ms", None)
    return {
        "phase_seconds": {k: round(v, 4) for k, v in sorted(getattr(arm, "phase_time", {}).items())},
        "wait_seconds": round(float(rep.human_wait_s), 4),
        "planning_exposed_seconds": planning if exposed is None else sum(exposed) / 1000.0,
    }


def cycle_metrics(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Picks per hour with exposed planning only, without waits for people, and the per-pick breakdown."""
    picks = sum(1 for e in episodes for a in e["attempts"] if a["success"])
    robot = sum(e["robot_seconds"] for e in episodes)
    sensing = sum(e["sensing_seconds"] for e in episodes)
    planning = sum(e["planning_seconds"] for e in episodes)
    exposed = sum(e.get("planning_exposed_seconds", e["planning_seconds"]) for e in episodes)
    wait = sum(e.get("wait_seconds", 0.0) for e in episodes)
    phases: dict[str, float] = {}
    for e in episodes:
        for k, v in e.get("phase_seconds", {}).items():
            phases[k] = phases.get(k, 0.0) + v
    busy = robot + sensing + exposed
    alone = robot - wait + sensing + exposed
    breakdown: dict[str, float | None] = {"sense": sensing, "plan_exposed": exposed}
    for key, names in GROUPS.items():
        breakdown[key] = sum(phases.get(n, 0.0) for n in names)
    breakdown["wait_for_person"] = wait
    grouped = {n for names in GROUPS.values() for n in names}
    other_phases = sum(v for k, v in phases.items() if k not in grouped)
    breakdown["other"] = robot - sum(phases.values()) - wait + other_phases
    return {
        "mpph_with_planning": (picks / busy * 3600.0) if busy > 0 else 0.0,
        "mpph_excluding_waits": (picks / alone * 3600.0) if alone > 0 else 0.0,
        "planning_exposed_seconds": exposed,
        "planning_hidden_seconds": planning - exposed,
        "wait_seconds": wait,
        "cycle_breakdown_s_per_pick": {k: (v / picks if picks else None) for k, v in breakdown.items()},
    }
