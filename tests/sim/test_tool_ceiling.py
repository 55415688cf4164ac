"""experiments/tool_ceiling.py: the oracle on what a cell left, and the ceiling it gives (real PyBullet)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "experiments" / "tool_ceiling.py"
_spec = importlib.util.spec_from_file_location("tool_ceiling", _PATH)
tool_ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool_ceiling)


def test_the_ceiling_is_what_the_cell_placed_plus_what_the_oracle_moved_over_the_items():
    records = [
        {"items": 8, "placed_alone": 6, "left": ["bottle", "tube"], "oracle_moved": ["tube"],
         "still_left": ["bottle"],
         "oracle_tries": [{"family": "tube", "gripper": "parallel_jaw", "tilt_deg": 20.0, "reason": "ok",
                           "placed": True}]},
        {"items": 8, "placed_alone": 8, "left": [], "oracle_moved": [], "still_left": [], "oracle_tries": []},
        {"items": 4, "placed_alone": 1, "left": ["small_part"] * 3, "oracle_moved": [],
         "still_left": ["small_part"] * 3,
         "oracle_tries": [{"family": "small_part", "gripper": "parallel_jaw", "tilt_deg": 0.0,
                           "reason": "slipped", "placed": False}]},
    ]  # fmt: skip
    s = tool_ceiling.summarise("procedural", 3, records)
    assert (s["items"], s["placed_alone"], s["oracle_moved"], s["left_when_given_up"]) == (20, 15, 1, 5)
    assert s["autonomous_pick_rate"] == pytest.approx(15 / 20)
    assert s["ceiling"] == pytest.approx(16 / 20)
    lo, hi = s["ceiling_ci95"]
    assert lo < 16 / 20 < hi
    assert s["left_by_family"] == {"bottle": 1, "tube": 1, "small_part": 3}
    assert s["still_left_by_family"] == {"bottle": 1, "small_part": 3}
    assert s["oracle_tries"] == {
        "small_part/parallel_jaw/straight/slipped": 1,
        "tube/parallel_jaw/tilted/placed": 1,
    }
    # Nothing presented: no rate is made up.
    empty = tool_ceiling.summarise("test", 0, [])
    assert empty["ceiling"] is None and empty["autonomous_pick_rate"] is None


def test_the_oracle_moves_what_this_tool_holds_and_leaves_what_no_grasp_of_it_holds(sim_cell):
    cell = sim_cell
    b = cell.tote_bounds
    c = np.array([(b.lo[0] + b.hi[0]) / 2, (b.lo[1] + b.hi[1]) / 2, b.lo[2]])
    # A small carton: the cup seals on its top.
    carton = cell.add_primitive("box", (0.04, 0.03, 0.025), (c[0] - 0.08, c[1], c[2] + 0.026), mass=0.2)
    # A 9 cm ball: wider than the jaw takes (7 cm) and too curved for the 30 mm cup (at its rim the
    # surface leans 19.5 degrees from the cup's axis, over the 18 it seals at, and drops 2.6 mm).
    ball = cell.add_primitive("sphere", (0.045,), (c[0] + 0.1, c[1], c[2] + 0.046), mass=0.3, friction=0.8)
    cell.settle(0.5)
    families = {carton: "carton", ball: "ball"}
    out = tool_ceiling._oracle_takes_over(cell, families, set(), tool_ceiling.DEFAULT_TILTS)
    assert sorted(out["left"]) == ["ball", "carton"]
    assert out["oracle_moved"] == ["carton"]
    assert out["still_left"] == ["ball"]
    assert carton in cell.items_in_box() and ball in cell.items_in_tote()
    assert out["placed_alone"] == 0
    # The oracle tried only what it judged feasible: the carton, once, and it worked.
    assert [(t["family"], t["placed"]) for t in out["oracle_tries"]] == [("carton", True)]
