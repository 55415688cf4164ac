"""`pickcell bench continual --quick`: the whole loop on one simulated cell, end to end.

Real PyBullet cell, real controller and ledger, the simulated associate, a real learning round
(`learn.learner.run_round`), the gate, the registry and the hot swap. The quick variant is a smoke
test of the loop, not of the learning effect (one tote of three items a round, one epoch): the
measured experiment is in docs/benchmarks.md.
"""

from __future__ import annotations

import json

import numpy as np

from pickcell.cli import main


def test_continual_quick_runs_rounds_of_collect_learn_gate_and_reports_each(tmp_path) -> None:
    from sim.benchmark.continual import DEFAULT_START_DATA, without_family

    out = tmp_path / "continual.json"
    # A second replay export (`--replay`): here the fixture without its tubes.
    extra = without_family(DEFAULT_START_DATA, "tube", tmp_path / "extra-replay")
    code = main(
        ["bench", "continual", "--rounds", "1", "--seed", "3", "--quick", "--json", str(out),
         "--report", str(tmp_path / "report"), "--work-dir", str(tmp_path / "work"), "--no-progress",
         "--replay", str(extra)]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    manifest = json.loads(next((tmp_path / "work" / "learn").glob("round-*/data/manifest.json")).read_text())
    replayed = [s["path"] for s in manifest["sources"] if s["kind"] == "replay"]
    assert replayed == [str(DEFAULT_START_DATA.resolve()), str(extra.resolve())]
    for key in ("new_family_failure", "old_family_success", "assists_per_100_items", "gate_passed"):
        assert len(res[key]) == 2, key  # round 0 and round 1
    assert res["gate_passed"][0] is None and isinstance(res["gate_passed"][1], bool)
    # The control arm: the starting model on the same totes (same tote ids, same items), per round.
    ctl = res["control"]
    assert len(ctl["new_family_failure"]) == len(ctl["rounds"]) == 2
    for x, c in zip(res["rounds"], ctl["rounds"], strict=True):
        # tote ids are "<cell>-tote-<n>"; the same n is the same (seed, n) contents and drops
        assert [t["tote"].split("-tote-")[1] for t in x["totes"]] == [
            t["tote"].split("-tote-")[1] for t in c["totes"]
        ]
        assert x["new_items"] + x["old_items"] == c["new_items"] + c["old_items"]
        assert c["model"] == "default.safetensors"
    # The default new kind is the `frame` family (novel-train), which the shipped model never saw.
    assert res["new_family"] == "frame" and "never trained on" in res["new_family_is"]
    assert res["catalog"] == "procedural-train+frame"
    r1 = res["rounds"][1]
    assert r1["version"] and r1["gate_reasons"]  # a round was trained and gated, the verdict says why
    # A refused model is not swapped in: the cell keeps the starting model.
    assert (r1["model"] == "default.safetensors") == (not r1["gate_passed"])
    for v in res["old_family_success"] + res["new_family_failure"]:
        assert v is None or 0.0 <= v <= 1.0
    assert (tmp_path / "report" / "report.md").exists() and (tmp_path / "report" / "continual.png").exists()
    # Round 0 runs the same model on the same items in both cells: item for item the same outcomes.
    vs = res["vs_control"]
    assert vs["unpaired"] == 0 and len(vs["rounds"]) == 2
    r0 = vs["rounds"][0]
    paired = r0["new_family_failure"]["items"] + r0["old_family_success"]["items"]
    assert paired == res["rounds"][0]["new_items"] + res["rounds"][0]["old_items"]
    assert r0["new_family_failure"]["only_learning"] == r0["new_family_failure"]["only_control"] == 0
    assert "same items" in (tmp_path / "report" / "report.md").read_text()
    index = json.loads((tmp_path / "work" / "registry" / "index.json").read_text())
    assert index["models"][r1["version"]]["gate_passed"] == r1["gate_passed"]
    # What a person's pick placed is reported apart from the model's own placements.
    for x in res["rounds"]:
        for t in x["totes"]:
            assert t["new_alone"] + t["new_by_person"] <= t["new_items"]
            assert t["old_alone"] + t["old_by_person"] <= t["old_items"]
    # Every executed attempt's ledger row names the family of the item it aimed at (or was holding),
    # so the gate judges the new kind as one kind: only catalog families, and at least one row.
    import sqlite3

    from sim.catalogs import load_catalog

    conn = sqlite3.connect(tmp_path / "work" / "cell.db")
    try:
        fams = [f for (f,) in conn.execute("SELECT family FROM attempts")]
        totes = {t for (t,) in conn.execute("SELECT DISTINCT tote_id FROM plans")}
    finally:
        conn.close()
    known = set(load_catalog("procedural-train").families) | {"frame"}
    assert fams and {f for f in fams if f} <= known and any(fams), fams
    # The held-out evaluation: every round's model on the same fixed totes, which no ledger records
    # (the learner never trains on them) and which the learning cell never works.
    ho = res["held_out"]
    assert len(ho["rounds"]) == len(ho["new_family_failure"]) == 2 and ho["totes"] == 1
    assert [x["model"] for x in ho["rounds"]] == [x["model"] for x in res["rounds"]]
    assert all(t["tote"].startswith("continual-eval-tote-") for x in ho["rounds"] for t in x["totes"])
    assert not any(t.startswith("continual-eval") for t in totes)
    h0, h1 = ho["rounds"]
    assert [it["name"] for t in h0["totes"] for it in t["items"]] == [
        it["name"] for t in h1["totes"] for it in t["items"]
    ]  # the same items in every round
    # A refused candidate leaves the cell on the same model: its measurement is reused, not re-run.
    assert h1["reused"] == (not r1["gate_passed"]) and not h0["reused"]
    v0, v1 = ho["vs_round_0"]["rounds"]
    assert ho["vs_round_0"]["unpaired"] == 0 and v0["new_family_failure"]["change"] in (0.0, None)
    if h1["reused"]:
        assert v1["new_family_failure"]["change"] in (0.0, None) and h1["totes"] == h0["totes"]
    assert "Held out" in (tmp_path / "report" / "report.md").read_text()


def test_the_held_out_measurement_is_the_same_in_a_fresh_cell(tmp_path) -> None:
    # Reusing a round's held-out measurement for a later round on the same model (a refused gate)
    # is only honest if measuring again would give the same numbers: a fresh cell, the same model,
    # the same totes and associate, item for item the same outcomes.
    from dataclasses import replace

    from sim.benchmark.continual import DEFAULT_START_MODEL, quick_config, run_held_out

    cfg = replace(quick_config(0, 4), eval_totes=2)
    a = run_held_out(cfg, [str(DEFAULT_START_MODEL)], progress=False)
    b = run_held_out(cfg, [str(DEFAULT_START_MODEL)], progress=False)
    assert a["rounds"][0]["totes"] == b["rounds"][0]["totes"]
    assert a["new_family_failure"] == b["new_family_failure"]
    assert a["seed"] == 4 + 104729 and not a["rounds"][0]["reused"]
    # Each tote in a cell of its own, numbered in the held-out stream: what one model did with tote
    # 0 cannot change which items tote 1 holds for the next model.
    assert [t["tote"] for t in a["rounds"][0]["totes"]] == [
        "continual-eval-tote-00000",
        "continual-eval-tote-00001",
    ]


def test_frame_family_is_deterministic_has_a_hole_and_rests_flat(tmp_path, monkeypatch) -> None:
    """The new kind (sim/catalogs/novel.py): same index -> same URDF; a frame lies flat at its
    thickness, a ray down through its opening reaches the floor and one down through a bar hits it."""
    import numpy as np
    import pybullet as p
    import pytest

    from sim.catalogs import load_catalog, novel, spawn_item

    monkeypatch.setenv("PICKCELL_CACHE_DIR", str(tmp_path / "cache"))
    assert novel.generate(7) == novel.generate(7)
    cat = load_catalog("novel-train")
    assert len(cat) == novel.N_ITEMS and cat.families == ("frame",)
    seeds = {it.name for it in cat.items}
    assert not seeds & {it.name for it in load_catalog("procedural-train").items}
    cid = p.connect(p.DIRECT)
    try:
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        floor = p.createCollisionShape(p.GEOM_BOX, halfExtents=(5, 5, 0.01), physicsClientId=cid)
        p.createMultiBody(0, floor, basePosition=(0, 0, -0.01), physicsClientId=cid)
        specs = cat.items[::40]
        bodies = [
            spawn_item(cid, s, (0.5 * i - 1.5, 0, s.extents[2] / 2 + 0.005), (0, 0, 0, 1))
            for i, s in enumerate(specs)
        ]
        for _ in range(240):
            p.stepSimulation(physicsClientId=cid)
        for i, (spec, body) in enumerate(zip(specs, bodies, strict=True)):
            assert p.getDynamicsInfo(body, -1, physicsClientId=cid)[0] == pytest.approx(spec.mass_kg)
            lo, hi = (np.array(v) for v in p.getAABB(body, physicsClientId=cid))
            assert abs(lo[2]) < 0.004 and hi[2] - lo[2] == pytest.approx(spec.extents[2], abs=0.007)
            x = 0.5 * i - 1.5
            for dx, on_frame in ((0.0, False), (spec.extents[0] / 8, False), (-spec.extents[0] / 8, False),
                                 (spec.extents[0] / 2 - 0.01, True)):  # fmt: skip
                hit = p.rayTest((x + dx, 0, 0.5), (x + dx, 0, -0.005), physicsClientId=cid)[0]
                # An end bar is there; rays through the opening reach the floor.
                assert (hit[0] == body) == on_frame, (spec.name, dx)
    finally:
        p.disconnect(physicsClientId=cid)


def test_mixed_catalog_holds_the_new_kind_at_its_share(tmp_path, monkeypatch) -> None:
    import pytest

    from sim.benchmark.continual import mixed_catalog

    monkeypatch.setenv("PICKCELL_CACHE_DIR", str(tmp_path / "cache"))
    cat = mixed_catalog("frame", 0.5, seed=1)
    fams = [it.family for it in cat.items]
    assert fams.count("frame") == 240 and len(fams) == 480
    assert set(fams) - {"frame"} == {"carton", "mailer", "bottle", "ball", "tube", "small_part"}
    left_out = mixed_catalog("tube", 0.25, seed=1)
    assert [it.family for it in left_out.items].count("tube") / len(left_out) == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="new_share"):
        mixed_catalog("frame", 1.0, seed=1)


def _tote(tote: str, items: list[tuple[str, str, bool]]) -> dict:
    rows = [{"name": n, "family": f, "alone": a, "by_person": False} for n, f, a in items]
    return {"tote": tote, "items": rows}


def test_vs_control_compares_the_same_items_and_pools_the_learning_rounds() -> None:
    """A hand-built record whose answer is known: per round and pooled over rounds 1..R, the
    learning cell minus the control on the same items, matched by tote and name (a duplicate name
    by its occurrence); an item present in one cell only is left out and counted."""
    from sim.benchmark.continual import vs_control

    r0 = [("f/1", "frame", False), ("c/1", "carton", True)]
    r1 = [("f/2", "frame", True), ("f/3", "frame", True), ("f/2", "frame", False), ("c/2", "carton", True),
          ("c/9", "carton", True)]  # fmt: skip
    c1 = [("f/2", "frame", False), ("f/3", "frame", True), ("f/2", "frame", False), ("c/2", "carton", False)]
    learning = [
        {"round": 0, "totes": [_tote("continual-tote-00000", r0)]},
        {"round": 1, "totes": [_tote("continual-tote-00001", r1)]},
    ]
    control = [
        {"round": 0, "totes": [_tote("continual-control-tote-00000", [])]},
        {"round": 1, "totes": [_tote("continual-control-tote-00001", c1)]},
    ]
    # Tote ids differ by the cell's name only; pairing uses the tote number.
    res = vs_control(learning, control, "frame")
    r1 = res["rounds"][1]
    nk, ok = r1["new_family_failure"], r1["old_family_success"]
    assert nk["items"] == 3 and ok["items"] == 1 and r1["unpaired"] == 1  # c/9 has no pair
    # new kind failure: learning fails 1 of 3 (the second f/2), the control 2 of 3 -> change -1/3
    assert abs(nk["change"] - (-1 / 3)) < 1e-12 and nk["only_control"] == 1 and nk["only_learning"] == 0
    assert nk["ci95"][0] < nk["change"] < nk["ci95"][1]
    assert ok["change"] == 1.0 and ok["only_learning"] == 1
    assert res["rounds"][0]["unpaired"] == 2  # round 0's control tote was empty
    assert res["learning_rounds_pooled"]["new_family_failure"] == nk  # round 0 is not pooled
    assert res["unpaired"] == 3


def test_the_cells_ledger_is_stamped_on_robot_time_so_a_run_repeats_exactly(tmp_path) -> None:
    # The learner weights rows by recency and splits old from new at a cutoff, both read from the
    # ledger's `recorded_at`. Stamped by the wall clock, two runs of one command trained on
    # different weights (docs/benchmarks.md, stop 28: models not bit-identical). On the robot clock
    # the same tote gives the same stamps, strictly increasing, in a fresh cell and a fresh ledger.
    import sqlite3

    from grasping.learning import load_dataset
    from sim.benchmark.continual import (
        DEFAULT_START_MODEL,
        SIM_LEDGER_EPOCH,
        ContinualConfig,
        _build_cell,
        _work_tote,
        ledger_epoch,
        mixed_catalog,
        quick_config,
    )

    cfg = quick_config(0, 4)
    catalog = mixed_catalog(cfg.new_family, cfg.new_share, cfg.seed)

    def stamps(name: str) -> tuple[list[float], float]:
        stack, channel, ledger = _build_cell(cfg, DEFAULT_START_MODEL, catalog, tmp_path / name, "c")
        try:
            _work_tote(stack, channel, cfg.new_family)
            robot_s = stack.cell.arm.robot_time
        finally:
            stack.close()
            ledger.close()
        conn = sqlite3.connect(tmp_path / name)
        try:
            rows = conn.execute(
                "SELECT recorded_at FROM plans UNION ALL SELECT recorded_at FROM attempts "
                "UNION ALL SELECT recorded_at FROM answers"
            ).fetchall()
            n_attempts = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
        finally:
            conn.close()
        assert n_attempts > 0
        return sorted(r for (r,) in rows), robot_s

    a, robot_s = stamps("a.db")
    b, _ = stamps("b.db")
    assert a == b  # the same run, the same stamps
    assert len(set(a)) == len(a)  # strictly increasing: no two rows share a stamp
    # robot time counted from the epoch, not the wall clock (months past 2026-01-01)
    epoch = ledger_epoch((cfg.start_data, *cfg.extra_replay))
    assert SIM_LEDGER_EPOCH <= epoch <= a[0] and a[-1] <= epoch + robot_s + 1.0
    # The cell works after its replay data was recorded (stop 37: the stored replay collection is
    # stamped 2026-12-02 and the cell's rows were stamped from 2026-01-01, ~1e-15 of its recency).
    full = ContinualConfig()
    replay_newest = max(
        float(np.nanmax(load_dataset(d).timestamp)) for d in (full.start_data, *full.extra_replay)
    )
    assert replay_newest > SIM_LEDGER_EPOCH  # the stored data that made the epoch constant wrong
    assert replay_newest < ledger_epoch((full.start_data, *full.extra_replay)) <= replay_newest + 3602
