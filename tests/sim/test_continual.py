"""`pickcell bench continual --quick`: the whole loop on one simulated cell, end to end.

Real PyBullet cell, real controller and ledger, the simulated associate, a real learning round
(`learn.learner.run_round`), the gate, the registry and the hot swap. The quick variant is a smoke
test of the loop, not of the learning effect (one tote of three items a round, one epoch): the
measured experiment is in docs/benchmarks.md.
"""

from __future__ import annotations

import json

from pickcell.cli import main


def test_continual_quick_runs_rounds_of_collect_learn_gate_and_reports_each(tmp_path) -> None:
    out = tmp_path / "continual.json"
    code = main(
        ["bench", "continual", "--rounds", "1", "--seed", "3", "--quick", "--json", str(out),
         "--report", str(tmp_path / "report"), "--work-dir", str(tmp_path / "work"), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("new_family_failure", "old_family_success", "assists_per_100_items", "gate_passed"):
        assert len(res[key]) == 2, key  # round 0 and round 1
    assert res["gate_passed"][0] is None and isinstance(res["gate_passed"][1], bool)
    assert res["new_family"] == "tube" and "left out" in res["new_family_is"]
    r1 = res["rounds"][1]
    assert r1["version"] and r1["gate_reasons"]  # a round was trained and gated, the verdict says why
    # A refused model is not swapped in: the cell keeps the starting model.
    assert (r1["model"] == "start.safetensors") == (not r1["gate_passed"])
    for v in res["old_family_success"] + res["new_family_failure"]:
        assert v is None or 0.0 <= v <= 1.0
    assert (tmp_path / "report" / "report.md").exists() and (tmp_path / "report" / "continual.png").exists()
    index = json.loads((tmp_path / "work" / "registry" / "index.json").read_text())
    assert index["models"][r1["version"]]["gate_passed"] == r1["gate_passed"]
