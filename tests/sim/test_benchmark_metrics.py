"""Operator metrics on hand-built episode records whose right answers are known, and a report that
never crashes a finished run (0%, 100%, one item, a family with no attempts, no episodes at all)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from sim.benchmark.metrics import aggregate, wilson
from sim.benchmark.record import decider
from sim.benchmark.report import _bars, _err, write_report


def _attempt(item, family, first, success, decided_by="model", damage=(), reason=None):
    return {
        "item": item,
        "family": family,
        "first": first,
        "success": success,
        "reason": reason or ("ok" if success else "seal_failed"),
        "decided_by": decided_by,
        "decider": decider(decided_by),
        "gripper": "suction",
        "damaged": bool(damage),
        "damage": list(damage),
        "drop_m": 0.0,
        "impact_n": 40.0,
        "t": 1.0,
    }


def _item(item, family, fate, attempts=0, answers=(), person=False):
    return {
        "item": item,
        "family": family,
        "fate": fate,
        "attempts": attempts,
        "questions": len(answers),
        "answers": list(answers),
        "person": person,
        "damaged": False,
    }


def _episode(index, attempts, items, halted=(), questions=0, answered=0):
    return {
        "episode": index,
        "status": "cleared",
        "items": len(items),
        "items_cleared": sum(1 for i in items if i["fate"] == "placed"),
        "picks": sum(1 for a in attempts if a["success"]),
        "attempts": attempts,
        "item_log": items,
        "halted": list(halted),
        "questions": questions,
        "questions_answered": answered,
        "robot_seconds": 60.0,
        "sensing_seconds": 1.0,
        "planning_seconds": 0.5,
        "human_seconds": 4.0 * answered,
        "assists_requested": questions,
        "assists_answered": answered,
        "assists_expired": questions - answered,
        "plan_latency_ms": [50.0, 70.0],
        "wall_seconds": 3.0,
    }


def _two_episodes():
    """Episode 0 (a person answers): b1 placed by the model at once; b2 failed by the model, then
    placed on a person's approval; b3 marked "no safe pick" by the person; b4 tried three times by
    the model, the held item hitting the wall once, then given up. Episode 1 (nobody answers): b1
    placed by the model; b2's question expired; a protective stop made the arm let go of b1 once."""
    e0 = _episode(
        0,
        [
            _attempt("b1", "carton", True, True),
            _attempt("b2", "bottle", True, False),
            _attempt("b2", "bottle", False, True, decided_by="associate:sim-1"),
            _attempt("b4", "ball", True, False),
            _attempt("b4", "ball", False, False, damage=["held_collision"], reason="collision"),
            _attempt("b4", "ball", False, False, decided_by="model-unsure"),
        ],
        [
            _item("b1", "carton", "placed", 1),
            _item("b2", "bottle", "placed", 2, answers=["approve"], person=True),
            _item("b3", "mailer", "no_safe_pick", 0, answers=["no_safe_pick"], person=True),
            _item("b4", "ball", "given_up", 3),
        ],
        questions=2,
        answered=2,
    )
    e1 = _episode(
        1,
        [_attempt("b1", "carton", True, True)],
        [_item("b1", "carton", "placed", 1), _item("b2", "tube", "expired", 0, answers=["expired"])],
        halted=[{"item": "b1", "during": "place", "reason": "estop", "damage": ["stop_drop"], "drop_m": 0.4}],
        questions=1,
        answered=0,
    )
    return [e0, e1]


def test_each_operator_metric_has_its_known_value_on_a_hand_built_record():
    m = aggregate(_two_episodes())
    assert m["items"] == 6
    # placed with nobody involved: episode 0's b1 and episode 1's b1, of all six items presented
    assert m["autonomous_pick_rate"] == pytest.approx(2 / 6)
    assert m["items_placed_alone"] == 2 and m["items_placed_with_person"] == 1
    lo, hi = m["autonomous_pick_rate_ci95"]
    assert lo < 2 / 6 < hi and (lo, hi) == pytest.approx(wilson(2, 6))
    # the model's unasked attempts: b1, b2, b4 x3 ("model-unsure" is the model's too), b1 -> 2 of 6
    assert m["auto_attempts"] == 6 and m["auto_precision"] == pytest.approx(2 / 6)
    # the person's one approval, reported apart
    assert m["person_attempts"] == 1 and m["person_precision"] == 1.0
    by = m["first_attempt_success_by_decider"]
    assert (by["model"]["k"], by["model"]["n"]) == (2, 4)
    assert by["person"]["n"] == 0 and by["person"]["value"] is None
    assert m["first_attempt_success"] == pytest.approx(2 / 4)
    assert m["items_left_rate"] == pytest.approx(3 / 6)
    assert m["items_left_by_fate"] == {"expired": 1, "given_up": 1, "no_safe_pick": 1}
    assert m["interventions_per_100_items"] == pytest.approx(100 * 3 / 6)
    assert m["answers_per_100_items"] == pytest.approx(100 * 2 / 6)
    assert m["max_attempts_on_one_item"] == 3
    assert m["max_attempts_item"] == {"episode": 0, "item": "b4", "family": "ball", "fate": "given_up"}
    # 7 attempts + 1 halted motion; the held item's collision and the stop's drop are damage
    assert m["halted_motions"] == 1 and m["damage_events"] == 2
    assert m["damage_rate"] == pytest.approx(2 / 8)
    assert m["damage_by_kind"] == {"held_collision": 1, "stop_drop": 1}
    assert m["families"]["carton"]["autonomous_pick_rate"]["value"] == 1.0
    assert m["families"]["mailer"]["autonomous_pick_rate"] == {
        "value": 0.0,
        "k": 0,
        "n": 1,
        "ci95": [0.0, wilson(0, 1)[1]],
    }
    # every key the bench had before is still there
    for k in (
        "first_attempt_success_ci95",
        "clearance_rate",
        "mpph",
        "assists_per_100_picks",
        "damage_rate_ci95",
    ):
        assert k in m
    json.dumps(m)  # JSON-able


def test_what_a_person_decides_never_moves_the_models_numbers():
    eps = _two_episodes()
    worse = copy.deepcopy(eps)
    approved = worse[0]["attempts"][2]
    assert approved["decider"] == "person"
    approved["success"] = False  # the person's approval now fails
    worse[0]["item_log"][1]["fate"] = "given_up"
    a, b = aggregate(eps), aggregate(worse)
    for k in ("auto_precision", "auto_attempts", "autonomous_pick_rate", "first_attempt_success_by_decider"):
        if k == "first_attempt_success_by_decider":
            assert a[k]["model"] == b[k]["model"]
        else:
            assert a[k] == b[k], k
    assert b["person_precision"] == 0.0 and a["person_precision"] == 1.0


def test_an_item_placed_after_a_person_answered_is_not_the_models_even_if_the_model_picked_it():
    """A person said "skip" (or anything): the model's later pick of that item is not autonomous."""
    e = _episode(
        0,
        [_attempt("b1", "carton", True, True)],
        [_item("b1", "carton", "placed", 1, answers=["skip"], person=True)],
        questions=1,
        answered=1,
    )
    m = aggregate([e])
    assert m["autonomous_pick_rate"] == 0.0 and m["auto_precision"] == 1.0


def test_who_decided_an_attempt():
    assert decider("model") == "model" and decider("model-unsure") == "model"
    assert decider("associate:sim-1") == "person" and decider("associate:unknown") == "person"


def test_no_episodes_gives_empty_metrics_not_an_error():
    m = aggregate([])
    assert m["items"] == 0 and m["autonomous_pick_rate"] is None and m["max_attempts_on_one_item"] == 0
    assert m["families"] == {} and m["items_left_by_fate"] == {}


def test_wilson_bounds_bracket_the_rate_at_0_and_100_percent():
    for n in (1, 3, 7, 10, 31, 160):
        lo, hi = wilson(n, n)
        assert lo <= 1.0 == hi
        lo, hi = wilson(0, n)
        assert lo == 0.0 <= hi


def test_error_bars_are_never_negative():
    # the crash of issue 12: a family at 100% whose upper bound landed a hair below the value
    assert _err(1.0, [0.8, 0.9999999999999999]) == (pytest.approx(0.2), 0.0)
    assert _err(0.0, [1e-17, 0.3]) == (0.0, 0.3)
    assert _err(None, [0.0, 1.0]) == (0.0, 0.0)
    vals, err = _bars([{"value": None, "ci95": [0.0, 1.0]}, {"value": 1.0, "ci95": [0.5, 0.99999]}])
    assert vals == [0.0, 1.0] and min(err[0] + err[1]) >= 0.0


def _report(tmp_path, episodes, name, tweak=None):
    m = aggregate(episodes)
    if tweak is not None:
        tweak(m)
    m["wall_seconds"] = 1.0
    path = write_report(tmp_path / name, m, episodes, {"catalog": "procedural", "seed": 1000})
    text = path.read_text()
    for png in ("success_by_family.png", "operator.png", "latency_hist.png", "cycle_breakdown.png"):
        assert (tmp_path / name / png).read_bytes().startswith(b"\x89PNG"), png
    return text


def test_the_report_is_written_for_every_edge_case(tmp_path):
    one_ok = [_episode(0, [_attempt("b1", "carton", True, True)], [_item("b1", "carton", "placed", 1)])]
    one_failed = [
        _episode(0, [_attempt("b1", "carton", True, False)], [_item("b1", "carton", "given_up", 1)])
    ]
    never_tried = [_episode(0, [], [_item("b1", "ball", "skipped", 0)])]
    text = _report(tmp_path, one_ok, "hundred")
    assert "| items placed, model alone | 100.0% (n=1)" in text
    assert "0.0%" in _report(tmp_path, one_failed, "zero")
    assert "Items left, by fate: skipped 1" in _report(tmp_path, never_tried, "untried")
    assert "Items left, by fate: none" in _report(tmp_path, [], "nothing")
    _report(tmp_path, _two_episodes(), "mixed")

    def hair(m):  # an interval bound a hair on the wrong side of the value, as scipy can give
        m["families"]["carton"]["first_attempt_success"]["ci95"] = [0.2, 0.9999999999999999]
        m["autonomous_pick_rate_ci95"] = [1.0000000000000002, 1.0]

    assert "100.0%" in _report(tmp_path, one_ok, "hair", tweak=hair)


def test_newcombe_interval_matches_the_published_example_and_brackets_the_difference() -> None:
    """Newcombe (1998), Table II, example (a): 56/70 - 48/80 = 0.175, hybrid score interval
    0.0524 to 0.3339."""
    from sim.benchmark.metrics import newcombe

    lo, hi = newcombe(56, 70, 48, 80)
    assert abs(lo - 0.0524) < 5e-4 and abs(hi - 0.3339) < 5e-4
    lo, hi = newcombe(0, 10, 0, 10)  # both at 0%: an interval around 0, not a point
    assert lo < 0.0 < hi
    assert newcombe(3, 0, 1, 5) == (-1.0, 1.0)


def test_the_gate_suite_refuses_a_rate_only_on_evidence_of_a_change_beyond_its_tolerance() -> None:
    """sim.training.rate_change_check: one damaged item in 25 attempts (the suite's size) is not
    evidence of a damage regression; five are. Two fewer successful first attempts in 25 are not
    evidence of a 5-point loss; twelve are. Level 0 keeps the bare point comparison."""
    from sim.training import rate_change_check

    # Damage (lower is better), tolerance 0.01.
    assert rate_change_check("damage_rate", 1, 25, 0, 24, 0.01, 0.05, False) is None
    msg = rate_change_check("damage_rate", 6, 25, 0, 24, 0.01, 0.05, False)
    assert msg and msg.startswith("damage_rate 0.240 vs baseline 0.000 (6/25 vs 0/24)") and "over by" in msg
    assert "damage_rate 0.040" in rate_change_check("damage_rate", 1, 25, 0, 24, 0.01, 0.0, False)
    # Success (higher is better), tolerance 0.05.
    assert rate_change_check("first_attempt_success", 18, 25, 20, 25, 0.05, 0.05, True) is None
    msg = rate_change_check("first_attempt_success", 8, 25, 20, 25, 0.05, 0.05, True)
    assert msg and "95% upper bound" in msg and "short by" in msg
    assert rate_change_check("first_attempt_success", 18, 25, 20, 25, 0.05, 0.0, True) is not None
    # With a large suite the same 1-point rise in damage is evidence enough.
    assert rate_change_check("damage_rate", 60, 1000, 10, 1000, 0.01, 0.05, False) is not None
    # Better than the baseline never fails, with or without evidence.
    assert rate_change_check("first_attempt_success", 25, 25, 10, 25, 0.05, 0.05, True) is None
    assert rate_change_check("damage_rate", 0, 25, 3, 25, 0.01, 0.0, False) is None


def _ep(i: int, robot_s: float, picks: int, wait_s: float = 0.0, misses: int = 0) -> dict:
    """A bench episode record with the fields the suite's cycle check reads."""
    attempts = [{"success": True}] * picks + [{"success": False}] * misses
    return {
        "episode": i,
        "robot_seconds": robot_s,
        "sensing_seconds": 0.0,
        "wait_seconds": wait_s,
        "attempts": attempts,
    }


def test_the_gate_suite_times_the_cells_own_seconds_per_pick_and_refuses_only_on_evidence() -> None:
    """sim.training.cycle_change_check: simulated robot + sensing seconds per pick (no host load moves
    them) without the waits for a person (asking more is the autonomy check's to judge). A candidate
    slower on every tote by 30% is refused; one whose point ratio is 16% over but whose totes
    disagree (one slow tote) is not; level 0 or fewer than 3 totes keeps the bare point rule."""
    from sim.training import cycle_change_check, cycle_check, robot_seconds_per_pick

    assert robot_seconds_per_pick(450.0) == 8.0 and robot_seconds_per_pick(0.0) is None
    assert cycle_check(8.4, 8.0, 0.10) is None
    assert cycle_check(9.0, 8.0, 0.10).startswith("own_seconds_per_pick 9.00 > 8.80")

    base = [_ep(i, 40.0 + 4 * i, 8) for i in range(6)]
    slow = [_ep(i, 1.3 * (40.0 + 4 * i), 8) for i in range(6)]
    msg, d = cycle_change_check(slow, base, 0.10, 0.05, seed=1)
    assert msg and msg.startswith("own_seconds_per_pick 8.13 vs baseline 6.25 (6 totes)")
    assert d["ratio_lower"] > 1.1
    # Same total as 16% slower, all of it on one tote: no evidence of a change beyond 10%.
    extra = 0.16 * sum(40.0 + 4 * i for i in range(6))
    lumpy = [_ep(i, 40.0 + 4 * i + (extra if i == 2 else 0.0), 8) for i in range(6)]
    msg, d = cycle_change_check(lumpy, base, 0.10, 0.05, seed=1)
    assert msg is None and abs(d["ratio"] - 1.16) < 1e-9 and d["ratio_lower"] < 1.1
    assert cycle_change_check(lumpy, base, 0.10, 0.05, seed=1)[1] == d  # seeded: the same verdict
    # The point rule: level 0, or too few totes to resample.
    assert cycle_change_check(lumpy, base, 0.10, 0.0)[0] is not None
    assert cycle_change_check(lumpy[2:4], base[2:4], 0.10, 0.05)[1]["test"] == "point"
    # Waiting for a person is not the cell's own time: 30% more robot time, all of it waiting, passes.
    waiting = [_ep(i, 1.3 * (40.0 + 4 * i), 8, wait_s=0.3 * (40.0 + 4 * i)) for i in range(6)]
    msg, d = cycle_change_check(waiting, base, 0.10, 0.05, seed=1)
    assert msg is None and abs(d["ratio"] - 1.0) < 1e-9
    # Failed attempts still cost: the same seconds for half the picks is twice as slow.
    halved = [_ep(i, 40.0 + 4 * i, 4, misses=4) for i in range(6)]
    assert cycle_change_check(halved, base, 0.10, 0.05, seed=1)[0] is not None
    # Only totes both planners ran are compared; a side that placed nothing leaves it to the rate checks.
    assert cycle_change_check(slow[:5], base, 0.10, 0.05, seed=1)[1]["totes"] == 5
    assert cycle_change_check([_ep(i, 50.0, 0) for i in range(6)], base, 0.10, 0.05)[0] is None


def _paired(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    return a, b


def test_paired_newcombe_interval_matches_the_published_examples() -> None:
    from sim.benchmark.metrics import newcombe_paired

    # Newcombe (1998), Stat. Med. 17:2635, example (a): 36 / 12 / 2 / 0 -> 0.0569 to 0.3404 (method 10).
    lo, hi = newcombe_paired(*_paired(36, 12, 2, 0))
    assert round(lo, 4) == 0.0569 and round(hi, 4) == 0.3404
    # Altman et al. (2000), Statistics with Confidence, Table 6.2: 14 / 5 / 0 / 22 -> 0.011 to 0.226.
    lo, hi = newcombe_paired(*_paired(14, 5, 0, 22))
    assert round(lo, 3) == 0.011 and round(hi, 3) == 0.226
    # Arms that agree on every unit: the interval brackets 0; swapping the arms mirrors it.
    lo, hi = newcombe_paired(*_paired(5, 0, 0, 5))
    assert lo < 0.0 < hi
    a, b = _paired(20, 3, 9, 8)
    lo, hi = newcombe_paired(a, b)
    lo2, hi2 = newcombe_paired(b, a)
    assert lo < (a.mean() - b.mean()) < hi and abs(lo + hi2) < 1e-12 and abs(hi + lo2) < 1e-12
    # Pairing narrows the interval against the independent one when the arms agree on most units.
    from sim.benchmark.metrics import newcombe

    ind = newcombe(int(a.sum()), len(a), int(b.sum()), len(b))
    assert hi - lo < ind[1] - ind[0]
    assert newcombe_paired(np.zeros(0, bool), np.zeros(0, bool)) == (-1.0, 1.0)
    with pytest.raises(ValueError, match="paired"):
        newcombe_paired(np.ones(3, bool), np.ones(4, bool))


def test_a_gap_between_tote_streams_is_bracketed_with_whole_totes_resampled() -> None:
    from sim.benchmark.metrics import clustered_difference, newcombe

    # 24 totes of 4 items: the same 6 failures either spread one per tote or lost 3 at a time. Items
    # of one tote failing together carry less information: the interval is wider, not the same.
    spread = [(1, 4)] * 6 + [(0, 4)] * 18
    clumped = [(3, 4)] * 2 + [(0, 4)] * 22
    base = [(0, 4)] * 23 + [(1, 4)]
    lo_s, hi_s = clustered_difference(spread, base)
    lo_c, hi_c = clustered_difference(clumped, base)
    d = 6 / 96 - 1 / 96
    assert lo_s <= d <= hi_s and lo_c <= d <= hi_c
    assert hi_c - lo_c > hi_s - lo_s
    ind = newcombe(6, 96, 1, 96)
    assert lo_c < ind[0]  # the item-level interval claims more than the clumped totes show
    # Seeded: the same numbers every time; arms that agree bracket 0; an empty arm says nothing.
    assert clustered_difference(clumped, base) == (lo_c, hi_c)
    lo, hi = clustered_difference(spread, spread)
    assert lo < 0.0 < hi
    assert clustered_difference([(0, 0)], base) == (-1.0, 1.0)


def test_what_kept_each_item_from_the_model_alone_is_what_happened_to_it_first():
    from sim.benchmark.record import _not_alone_because

    def at(t, **kw):
        return dict(_attempt("b1", "bottle", t == 1.0, kw.pop("success", False), **kw), t=t)

    # The model's own first try failed, whatever came after (a person's pick, a question).
    assert _not_alone_because(
        [at(1.0), at(3.0, success=True, decided_by="associate:a")], [(2.0, "model_failed")]
    ) == ("model_failed")
    # Asked before any try: the question's cause (the watchdog's doubt, or a score under threshold).
    assert _not_alone_because([at(5.0, success=True, decided_by="associate:a")], [(2.0, "novel")]) == "novel"
    assert _not_alone_because([], [(2.0, "low_score"), (4.0, "novel")]) == "low_score"
    # Never tried, never asked about: the tote ended first.
    assert _not_alone_because([], []) == "not_reached"
    # The counts: b2 asked about (low score) and approved; b3 novel, no safe pick; b4 failed by the
    # model; b5 never reached; b1 placed alone has no cause. Questions are counted by cause.
    items = [
        dict(_item("b1", "carton", "placed", 1), asked_because=[], not_alone_because=None),
        dict(_item("b2", "bottle", "placed", 1, ["approve"], True), asked_because=["low_score"],
             not_alone_because="low_score"),
        dict(_item("b3", "mailer", "no_safe_pick", 0, ["no_safe_pick"], True),
             asked_because=["novel", "novel"], not_alone_because="novel"),
        dict(_item("b4", "ball", "given_up", 2), asked_because=["model_failed"],
             not_alone_because="model_failed"),
        dict(_item("b5", "tube", "diverted"), asked_because=[], not_alone_because="not_reached"),
    ]  # fmt: skip
    m = aggregate([_episode(0, [_attempt("b1", "carton", True, True)], items, questions=4, answered=3)])
    assert m["items_not_alone_by_cause"] == {"low_score": 1, "model_failed": 1, "not_reached": 1, "novel": 1}
    assert m["questions_by_cause"] == {"low_score": 1, "model_failed": 1, "novel": 2}
    assert sum(m["items_not_alone_by_cause"].values()) == 5 - m["items_placed_alone"]
