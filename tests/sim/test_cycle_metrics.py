"""Cycle-time metrics on hand-built episode records whose right answers are known."""

from __future__ import annotations

import pytest

from sim.benchmark.cycle import cycle_metrics
from sim.benchmark.metrics import aggregate


def _episode(**over):
    ep = {
        "episode": 0,
        "items": 2,
        "items_cleared": 2,
        "attempts": [
            {
                "item": "b1",
                "family": "box",
                "first": True,
                "success": True,
                "reason": "ok",
                "decided_by": "model",
            },
            {
                "item": "b2",
                "family": "box",
                "first": True,
                "success": False,
                "reason": "dropped",
                "decided_by": "model",
            },
            {
                "item": "b2",
                "family": "box",
                "first": False,
                "success": True,
                "reason": "ok",
                "decided_by": "model",
            },
        ],
        "robot_seconds": 20.0,  # 12 s of motion below + 6 s waiting for a person + 2 s other idle
        "sensing_seconds": 0.4,
        "planning_seconds": 0.6,
        "planning_exposed_seconds": 0.2,
        "human_seconds": 6.0,
        "wait_seconds": 6.0,
        "phase_seconds": {
            "move_to_pick": 2.0,
            "approach": 1.0,
            "grasp": 0.5,
            "lift": 2.0,
            "transit": 2.0,
            "place": 1.0,
            "release": 0.5,
            "retreat": 1.0,
            "recover": 1.5,
            "home": 0.5,
        },
        "assists_requested": 1,
        "assists_answered": 1,
        "assists_expired": 0,
        "plan_latency_ms": [200.0, 200.0, 200.0],
    }
    ep.update(over)
    return ep


def test_mpph_keys_and_breakdown_on_a_known_episode():
    m = cycle_metrics([_episode()])
    # 2 picks; busy = 20 + 0.4 + 0.2 (hidden planning, 0.4 s, is not charged).
    assert m["mpph_with_planning"] == pytest.approx(2 / 20.6 * 3600)
    # without the 6 s waiting for a person: 2 / (20 - 6 + 0.4 + 0.2)
    assert m["mpph_excluding_waits"] == pytest.approx(2 / 14.6 * 3600)
    assert m["planning_hidden_seconds"] == pytest.approx(0.4)
    b = m["cycle_breakdown_s_per_pick"]
    assert b["move_to_pick"] == pytest.approx(1.5) and b["place"] == pytest.approx(1.25)
    assert b["recover"] == pytest.approx(1.0) and b["wait_for_person"] == pytest.approx(3.0)
    assert b["other"] == pytest.approx(1.0)  # 20 - 12 - 6 = 2 s over 2 picks
    # The breakdown adds up to the time per pick that mpph_with_planning counts.
    assert sum(b.values()) == pytest.approx(3600 / m["mpph_with_planning"])


def test_records_without_the_new_fields_charge_all_planning_and_no_waits():
    ep = _episode()
    for k in ("planning_exposed_seconds", "wait_seconds", "phase_seconds"):
        del ep[k]
    m = cycle_metrics([ep])
    assert m["mpph_with_planning"] == pytest.approx(2 / 21.0 * 3600)
    assert m["mpph_excluding_waits"] == m["mpph_with_planning"]
    assert m["cycle_breakdown_s_per_pick"]["other"] == pytest.approx(10.0)


def test_only_captures_the_cell_spent_time_on_are_charged():
    # 4 captures: 1 the arm waited for, 1 behind the place's motion, 2 inside the wait for a person.
    ep = _episode(
        sensing_exposed_seconds=0.1,
        captures={"exposed": 1, "behind_motion": 1, "while_waiting": 2},
    )
    m = aggregate([ep])
    assert m["sensing_seconds"] == pytest.approx(0.4)  # the kept key counts every capture
    assert m["sensing_exposed_seconds"] == pytest.approx(0.1)
    assert m["mpph"] == pytest.approx(2 / 20.1 * 3600)
    assert m["mpph_with_planning"] == pytest.approx(2 / 20.3 * 3600)
    assert m["mpph_excluding_waits"] == pytest.approx(2 / 14.3 * 3600)
    # The definition before captures were sorted, for comparison with older runs.
    assert m["mpph_excluding_waits_all_sensing"] == pytest.approx(2 / 14.6 * 3600)
    assert m["captures_per_pick"] == {"exposed": 0.5, "behind_motion": 0.5, "while_waiting": 1.0}
    assert m["cycle_breakdown_s_per_pick"]["sense"] == pytest.approx(0.05)
    assert sum(m["cycle_breakdown_s_per_pick"].values()) == pytest.approx(3600 / m["mpph_with_planning"])


def test_aggregate_reports_the_cycle_keys_and_no_picks_gives_no_division_by_zero():
    ep = _episode()
    m = aggregate([ep])
    assert m["mpph"] == pytest.approx(2 / 20.4 * 3600)
    assert m["mpph_with_planning"] == pytest.approx(2 / 20.6 * 3600)
    assert "cycle_breakdown_s_per_pick" in m and "mpph_excluding_waits" in m
    assert m["mpph_limit"] is None  # records without a layout limit
    limited = cycle_metrics([_episode(cycle_limit_s=3.0)])
    assert limited["mpph_limit"] == pytest.approx(1200.0)
    assert limited["mpph_share_of_limit"] == pytest.approx(limited["mpph_excluding_waits"] / 1200.0)
    none = cycle_metrics([_episode(attempts=[])])
    assert all(v is None for v in none["cycle_breakdown_s_per_pick"].values())


def test_the_layout_limit_is_a_few_seconds_and_no_motion_of_the_arm_beats_it(sim_cell):
    from sim.benchmark.cycle import minimum_cycle_s

    lim = minimum_cycle_s(sim_cell.arm, sim_cell.tote_bounds, sim_cell.box_bounds)
    assert 2.0 < lim["cycle_s"] < 5.0
    assert lim["cycle_s"] == pytest.approx(sum(lim["legs_s"].values()) + lim["actuation_s"])
