"""`pickcell bench continual --cells 2`: cell B gets cell A's gated model through a real fleet service.

Learning itself is the single-cell experiment's business (tests/sim/test_continual.py); here cell A's
result is given (a gated model in the learner's registry, as `run_continual` leaves it), and what is
checked is the sharing: the fleet signs and serves it, cell B verifies and swaps it in before its first
tote with the new kind, the control arm keeps the starting model, and both arms work the same totes.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

from grasping.learning import GateReport
from grasping.modelfile import load_model, save_model
from grasping.registry import ModelRegistry
from sim.benchmark.continual import quick_config
from sim.benchmark.fleet_continual import run_cell_b
from sim.stack import DEFAULT_MODEL


def _resaved(version: str, out: Path) -> Path:
    """The shipped model under another version: a distinct, valid file standing in for A's model."""
    m = load_model(DEFAULT_MODEL)
    meta = {k: v for k, v in m.meta.items() if k not in ("format", "format_version", "created")}
    path = out / f"{version}.safetensors"
    save_model(path, m.net, m.calibrators, m.thresholds, m.watchdog, {**meta, "model_version": version},
               m.item_watchdog)  # fmt: skip
    return path


def test_cell_b_receives_cell_as_gated_model_through_the_fleet_and_the_control_does_not(tmp_path):
    cfg = replace(quick_config(rounds=1, seed=4), cell_b_totes=2)  # B's arms work more totes than A's rounds
    work = tmp_path / "work"
    reg = ModelRegistry(work / "registry")
    start = reg.add(DEFAULT_MODEL)
    learned = _resaved("graspnet-sim-v4-cell-a-r1", tmp_path)
    sha = load_model(learned).sha256
    reg.add(
        learned,
        GateReport(True, ("ok: fixture",), "graspnet-sim-v4-cell-a-r1", sha, {}, None, None, "fixture"),
    )
    cell_a = {
        "start_model_path": str(DEFAULT_MODEL),
        "final_model_path": str(learned),
        "new_family_failure": [0.6, 0.3],
        "rounds": [
            {"round": 0, "new_items": 10, "model": "default.safetensors"},
            {
                "round": 1,
                "new_items": 10,
                "model": learned.name,
                "totes": [{"new_items": 5, "new_alone": 2}, {"new_items": 5, "new_alone": 5}],
            },
        ],
    }
    res = run_cell_b(cfg, work, cell_a)

    assert res["shared_model"] == "graspnet-sim-v4-cell-a-r1" and res["note"] is None
    with_fleet, without = res["cell_b"]["with_fleet"], res["cell_b"]["without_fleet"]
    # B got the model the fleet's way: signed, downloaded, verified, swapped in; nothing refused
    assert with_fleet["model"] == "graspnet-sim-v4-cell-a-r1" and without["model"] == start.version
    assert "graspnet-sim-v4-cell-a-r1" in with_fleet["loaded_by_cell_b"] and with_fleet["refused"] == []
    got = (
        Path(with_fleet["fleet_dir"]).parent
        / "cell-b"
        / "fleet"
        / "models"
        / "graspnet-sim-v4-cell-a-r1.safetensors"
    )
    assert load_model(got).sha256 == sha
    verdicts = [
        json.loads(x) for x in (Path(with_fleet["fleet_dir"]) / "verdicts.jsonl").read_text().splitlines()
    ]
    assert [(v["action"], v["stage"]) for v in verdicts] == [("first-live", "everyone"), ("start", "canary")]
    assert verdicts[1]["cells"] == ["cell-b"]
    # the same totes in both arms, as many as asked: only the model differs
    assert len(with_fleet["totes"]) == 2
    assert [t["tote"] for t in with_fleet["totes"]] == [t["tote"] for t in without["totes"]]
    assert with_fleet["new_items"] == without["new_items"] and with_fleet["old_items"] == without["old_items"]
    assert res["cell_a_new_family_failure_after"] == 0.3
    assert res["cell_b_first_contact_failure"] == with_fleet["new_family_failure"]
    assert res["cell_b_without_fleet"] == without["new_family_failure"]
    # The comparisons carry their 95% intervals (Newcombe), from the failures and items behind them.
    counts = res["new_kind_failures_and_items"]
    assert counts["a"] == [3, 10] and counts["with_fleet"][1] == with_fleet["new_items"]
    lo, hi = res["cell_b_gap_to_a_ci95_pp"]
    assert lo <= res["cell_b_gap_to_a_pp"] <= hi and hi - lo > 20  # 10 items in A: a wide interval
    lo, hi = res["cell_b_fleet_benefit_ci95_pp"]
    assert lo <= res["cell_b_fleet_benefit_pp"] <= hi
    # The same items in both arms: the paired interval, and the items only one arm failed.
    plo, phi = res["cell_b_fleet_benefit_paired_ci95_pp"]
    assert plo <= res["cell_b_fleet_benefit_pp"] <= phi
    only_without, only_with = res["cell_b_fleet_benefit_discordant"]
    n = with_fleet["new_items"]
    assert abs(100.0 * (only_without - only_with) / n - res["cell_b_fleet_benefit_pp"]) < 1e-9
    # Each arm keeps its own ledger, as a cell of the fleet does: every try is there, by the model
    # each arm ran, with the item's family, so why B's items were left can be read from it.
    for arm, x in (("with-fleet", with_fleet), ("without-fleet", without)):
        assert x["ledger"] == str(work / f"cell-b-{arm}.db")
        with sqlite3.connect(x["ledger"]) as db:
            rows = db.execute("select cell_id, model_version, family from attempts").fetchall()
            plans = db.execute("select count(*) from plans").fetchone()[0]
        assert rows and plans > 0
        assert {r[0] for r in rows} == {"cell-b"} and {r[1] for r in rows} == {x["model"]}
        assert {r[2] for r in rows} <= {it["family"] for t in x["totes"] for it in t["items"]}
        # ... and what it says about the new kind is in the result: the model's tries by gripper.
        tries = x["new_kind_tries"]
        with sqlite3.connect(x["ledger"]) as db:
            n, ok = db.execute(
                "select count(*), coalesce(sum(success), 0) from attempts"
                " where family = ? and decided_by like 'model%'",
                (cfg.new_family,),
            ).fetchone()
        assert sum(v[1] for v in tries["model"].values()) == n
        assert sum(v[0] for v in tries["model"].values()) == ok
        assert sum(tries["model_failures_by_reason"].values()) == n - ok
    # The gap to A with whole totes resampled (A's last round's totes given above): it brackets the gap.
    lo, hi = res["cell_b_gap_to_a_ci95_pp_by_tote"]
    assert lo <= res["cell_b_gap_to_a_pp"] <= hi
    assert res["cell_a_new_kind_tries"] is None  # cell A kept no ledger here
    # Cell A pooled over the rounds it ran the shared model (here the last one only): 3 of 10.
    pooled = res["cell_a_with_shared_model"]
    assert pooled["rounds"] == [1] and pooled["failures_and_items"] == [3, 10]
    assert abs(pooled["cell_b_gap_pp"] - res["cell_b_gap_to_a_pp"]) < 1e-9
    # The report shows the comparison and the tries.
    from sim.benchmark.fleet_continual import append_report

    (tmp_path / "report.md").write_text("")
    append_report({"fleet": res, "new_family": cfg.new_family}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "whole totes resampled" in md and "| cell B, fleet's model |" in md
    assert "Cell A over every round it ran the shared model (rounds 1): 3 of 10" in md
    assert "The new kind in each cell's ledger" in md and (tmp_path / "fleet.png").exists()


def test_nothing_is_shared_when_no_model_of_cell_a_passed_its_gate(tmp_path):
    cfg = quick_config(rounds=1, seed=4)
    ModelRegistry(tmp_path / "registry").add(DEFAULT_MODEL)
    cell_a = {"start_model_path": str(DEFAULT_MODEL), "final_model_path": str(DEFAULT_MODEL),
              "new_family_failure": [0.5, 0.5], "rounds": [{"new_items": 4}, {"new_items": 4}]}  # fmt: skip
    res = run_cell_b(cfg, tmp_path, cell_a)
    assert res["shared_model"] is None and "nothing was shared" in res["note"]
    assert res["cell_a_with_shared_model"] is None
    assert res["cell_b"]["with_fleet"]["model"] == res["cell_b"]["without_fleet"]["model"]
    assert not (tmp_path / "fleet").exists()  # no fleet was started for nothing
