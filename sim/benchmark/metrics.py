"""Operator metrics from benchmark episode records, with 95% confidence intervals.

An episode record is a plain dict (JSON-able, so it can come back from a worker process or a Ray
task), written by `sim.benchmark.record.ToteRecorder`. Its `attempts` list holds one dict per
executed pick:

    item        str   which item was targeted (simulation ground truth), e.g. "b7"
    family      str   its catalog family
    first       bool  the first attempt on this item in the episode
    success     bool  picked *and* placed in the box
    reason      str   Outcome reason of the pick (or of the place, when the pick succeeded)
    decided_by  str   "model" | "model-unsure" | "associate:<id>"
    decider     str   "model" (executed without asking) | "person" (a person approved or pointed)
    damaged     bool  any of `damage`
    damage      list  "drop" (fell > 0.3 m once let go), "impact" (pressed > 150 N), "held_collision"
                      (the held item hit something), "stop_drop" (let go because of a stop)

`item_log` holds one dict per item presented: `item`, `family`, `fate` (placed | lost | given_up |
no_safe_pick | expired | diverted | skipped, see `sim.benchmark.record.FATES`), `attempts`,
`questions`, `answers` (one per question: the answer kind, or expired / cancelled), `asked_because`
(the controller's cause of each question), `not_alone_because`, `person`
(a person decided an attempt on it or answered a question about it), `damaged`. `halted` lists
the picks and places a protective stop ended (no attempt is recorded for them) with their damage.
The episode also carries `items`, `items_cleared`, `questions`, `questions_answered`,
`robot_seconds` (motion + idle, simulated), `sensing_seconds` (every capture), `sensing_exposed_seconds`
(captures the cell spent time on, which `mpph` charges: sim/benchmark/cycle.py), `captures` (by kind),
`planning_seconds`, `human_seconds`,
`assists_requested`, `assists_answered`, `assists_expired`, `plan_latency_ms` (list),
`wall_seconds`.

Operator metrics (honest by construction: what the model did alone is never mixed with what a
person decided, and nothing is left out of a denominator):

- `autonomous_pick_rate`: items that ended in a box with no person involved in that item / items
  presented (every item, including those never attempted);
- `auto_precision`: attempts the model executed without asking that succeeded / those attempts;
  `person_precision` is the same for attempts a person chose, reported apart;
- `first_attempt_success_by_decider`: first attempts on items, split by who decided them;
- `items_left_rate`: items not in a box at the end / items presented, by fate;
- `interventions_per_100_items`: questions asked of a person (answered or not) per 100 items;
  `questions_by_cause` splits them by why the cell asked (novel item, low score, the model failed
  on it), and `items_not_alone_by_cause` counts the items not placed by the model alone by what
  happened to them first (`sim.benchmark.record`): where autonomy is lost;
- `max_attempts_on_one_item`;
- `damage_rate`: damaging motions / (attempts + motions a stop halted).

Picks per hour (Mahler et al.): `mpph` = picks / (robot + sensing seconds) * 3600, where robot seconds
come from simulated motion under the arm's velocity and acceleration limits plus the time the cell
idled waiting for a person, and sensing seconds are a fixed time per capture. Failed attempts count
in the denominator. Both parts are simulated, so `mpph` is the same on any host and with any number
of workers. `mpph_with_planning` also adds the planner's measured wall time on this host that the
arm waited for (exposed planning; planning hidden behind motion is not charged), so it depends on
the machine; `mpph_excluding_waits` leaves out the time idle waiting for a person. Both, and the
per-pick cycle breakdown, come from `sim.benchmark.cycle`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from sim.benchmark.cycle import cycle_metrics, exposed_sensing


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (95% by default) for k successes in n trials ((0, 1) when n == 0), from scipy.

    The bounds are clamped to [0, 1] and to bracket k/n: floating point can put a bound a hair on
    the wrong side of the rate at 0% and 100%, which made the report's error bars negative.
    """
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    p = k / n
    return (float(min(max(0.0, ci.low), p)), float(max(min(1.0, ci.high), p)))


def newcombe(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval (95% by default) for the difference of two independent proportions k1/n1 - k2/n2: Newcombe's
    hybrid score interval (method 10 of Newcombe 1998, from the two Wilson intervals). It keeps
    its coverage at the 10-40 items a round of the continual experiment has, where the Wald
    interval does not. (-1, 1) when either n is 0."""
    if n1 == 0 or n2 == 0:
        return (-1.0, 1.0)
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson(k1, n1, confidence), wilson(k2, n2, confidence)
    d = p1 - p2
    return (
        float(d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)),
        float(d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)),
    )


def newcombe_paired(a_ok: Any, b_ok: Any, confidence: float = 0.95) -> tuple[float, float]:
    """Interval (95% by default) for the difference of two proportions measured on the same units,
    mean(a_ok) - mean(b_ok): Newcombe's paired hybrid score interval with the continuity-corrected
    phi (method 10 of Newcombe 1998, "Improved confidence intervals for the difference between
    binomial proportions based on paired data"). Pairing removes what the units share (here: which
    items were hard), so the interval is much narrower than the independent one when the two arms
    agree on most units. (-1, 1) when there are no units.
    """
    a, b = np.asarray(a_ok, dtype=bool), np.asarray(b_ok, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two (N,) arrays, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        return (-1.0, 1.0)
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = wilson(both + only_a, n, confidence), wilson(both + only_b, n, confidence)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    if denom == 0:
        phi = 0.0
    else:
        num = both * neither - only_a * only_b
        phi = (max(num - n / 2, 0.0) if num > 0 else num) / math.sqrt(denom)
    d = p1 - p2
    lo = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = d + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return (float(max(lo, -1.0)), float(min(hi, 1.0)))


def clustered_difference(
    a: Any, b: Any, confidence: float = 0.95, resamples: int = 9999, seed: int = 0
) -> tuple[float, float]:
    """Interval for rate(a) - rate(b) where each rate is pooled over clusters (totes) given as
    (failures, items) pairs, a: (Ka, 2), b: (Kb, 2): a percentile bootstrap that resamples whole
    totes in each arm independently (scipy.stats.bootstrap). The items of one tote are not
    independent (a tote whose frames lie stacked loses several at once: cell B on continual seed 5,
    stop 39, lost 12 of its 18 new-kind items in 4 of 24 totes), so an interval that counts items
    as independent (`newcombe`) is too narrow. (-1, 1) when either arm has no items."""
    from scipy.stats import bootstrap

    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 2), np.asarray(b, dtype=np.float64).reshape(-1, 2)
    if a[:, 1].sum() == 0 or b[:, 1].sum() == 0:
        return (-1.0, 1.0)

    def stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        ia, ib = ia.astype(np.intp), ib.astype(np.intp)
        ka, na = a[ia, 0].sum(axis=axis), a[ia, 1].sum(axis=axis)
        kb, nb = b[ib, 0].sum(axis=axis), b[ib, 1].sum(axis=axis)
        # A resample with no items on one side has no rate: count it as no difference.
        with np.errstate(invalid="ignore", divide="ignore"):
            d = ka / na - kb / nb
        return np.where(np.isfinite(d), d, 0.0)

    res = bootstrap(
        (np.arange(len(a)), np.arange(len(b))),
        stat,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(seed),
    )
    lo, hi = res.confidence_interval
    return (float(lo), float(hi))


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
    robot = sum(e["robot_seconds"] for e in eps)
    sensing = sum(exposed_sensing(e) for e in eps)  # captures that cost the cell time (cycle.py)
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
    fam_items: dict[str, list[bool]] = defaultdict(list)  # per item: placed with nobody involved
    for i in _items(eps):
        fam_items[i["family"]].append(i["fate"] == "placed" and not i["person"])
    families = {
        f: {
            "first_attempt_success": _rate(sum(fam_first[f]), len(fam_first[f])),
            "attempt_success": _rate(sum(fam_all[f]), len(fam_all[f])),
            "autonomous_pick_rate": _rate(sum(fam_items[f]), len(fam_items[f])),
        }
        for f in sorted(set(fam_all) | set(fam_items))
    }
    reasons: dict[str, int] = defaultdict(int)
    for a in attempts:
        if not a["success"]:
            reasons[a["reason"]] += 1

    fas = _rate(sum(a["success"] for a in firsts), len(firsts))
    clr = _rate(cleared, items)
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
        "plan_latency_ms_p50": float(np.percentile(lat, 50)) if lat.size else None,
        "plan_latency_ms_p99": float(np.percentile(lat, 99)) if lat.size else None,
        "robot_seconds": robot,
        "sensing_seconds": sum(e["sensing_seconds"] for e in eps),
        "planning_seconds": planning,
        "human_seconds": human,
        "assists_requested": requested,
        "assists_answered": sum(e["assists_answered"] for e in eps),
        "assists_expired": sum(e["assists_expired"] for e in eps),
        "failures_by_reason": dict(sorted(reasons.items())),
        "families": families,
        **operator_metrics(eps),
        # Cycle time (issue 17): mpph_with_planning counts only exposed planning; mpph_excluding_waits;
        # the per-pick breakdown by phase. Defined in sim/benchmark/cycle.py.
        **cycle_metrics(eps),
    }


def _items(eps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(i, episode=e["episode"]) for e in eps for i in e.get("item_log", [])]


def operator_metrics(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """What an operator asks: how many items move without anyone, and how often the model's own
    decisions fail. See the module docstring for each key."""
    eps = sorted(episodes, key=lambda e: e["episode"])
    attempts = [a for e in eps for a in e["attempts"]]
    items = _items(eps)
    n_items = len(items)
    by = {d: [a for a in attempts if _decider(a) == d] for d in ("model", "person")}
    alone = sum(1 for i in items if i["fate"] == "placed" and not i["person"])
    with_person = sum(1 for i in items if i["fate"] == "placed" and i["person"])
    left = [i for i in items if i["fate"] != "placed"]
    fates: dict[str, int] = defaultdict(int)
    for i in left:
        fates[i["fate"]] += 1
    # What kept items from the model alone, and why questions were asked (records before these
    # keys existed have neither: empty counts)
    not_alone: dict[str, int] = defaultdict(int)
    asked_because: dict[str, int] = defaultdict(int)
    for i in items:
        if i.get("not_alone_because"):
            not_alone[i["not_alone_because"]] += 1
        for c in i.get("asked_because", []):
            asked_because[c] += 1
    halted = [h for e in eps for h in e.get("halted", [])]
    dmg_kinds: dict[str, int] = defaultdict(int)
    for a in [*attempts, *halted]:
        for k in a.get("damage", ["unknown"] if a.get("damaged") else []):
            dmg_kinds[k] += 1
    damaging = sum(1 for a in attempts if a.get("damaged")) + sum(1 for h in halted if h.get("damage"))
    questions = sum(e.get("questions", e.get("assists_requested", 0)) for e in eps)
    answered = sum(e.get("questions_answered", e.get("assists_answered", 0)) for e in eps)
    worst = max(items, key=lambda i: i["attempts"], default=None)
    apr = _rate(alone, n_items)
    auto = _rate(sum(a["success"] for a in by["model"]), len(by["model"]))
    person = _rate(sum(a["success"] for a in by["person"]), len(by["person"]))
    lft = _rate(len(left), n_items)
    dmg = _rate(damaging, len(attempts) + len(halted))
    return {
        "autonomous_pick_rate": apr["value"],
        "autonomous_pick_rate_ci95": apr["ci95"],
        "items_placed_alone": alone,
        "items_placed_with_person": with_person,
        "auto_precision": auto["value"],
        "auto_precision_ci95": auto["ci95"],
        "auto_attempts": auto["n"],
        "person_precision": person["value"],
        "person_precision_ci95": person["ci95"],
        "person_attempts": person["n"],
        "first_attempt_success_by_decider": {
            d: _rate(sum(a["success"] for a in v if a["first"]), sum(1 for a in v if a["first"]))
            for d, v in by.items()
        },
        "items_left_rate": lft["value"],
        "items_left_rate_ci95": lft["ci95"],
        "items_left_by_fate": dict(sorted(fates.items())),
        "items_not_alone_by_cause": dict(sorted(not_alone.items())),
        "questions_by_cause": dict(sorted(asked_because.items())),
        "interventions_per_100_items": (100.0 * questions / n_items) if n_items else None,
        "answers_per_100_items": (100.0 * answered / n_items) if n_items else None,
        "questions": questions,
        "questions_answered": answered,
        "max_attempts_on_one_item": worst["attempts"] if worst is not None else 0,
        "max_attempts_item": (
            {k: worst[k] for k in ("episode", "item", "family", "fate")} if worst is not None else None
        ),
        "damage_events": damaging,
        "damage_by_kind": dict(sorted(dmg_kinds.items())),
        "halted_motions": len(halted),
        "damage_rate": dmg["value"],
        "damage_rate_ci95": dmg["ci95"],
    }


def _decider(a: dict[str, Any]) -> str:
    d = a.get("decider")
    return d if d is not None else ("person" if str(a["decided_by"]).startswith("associate") else "model")
