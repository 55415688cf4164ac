"""Self-supervised collection in the simulated cell, and train_from_sim end to end.

Real parts: PyBullet cells, the real planner, a real SQLite ledger in tmp_path, real torch training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grasping.types import Candidate, Grasp, Outcome, Plan, Reason
from hitl.ledger import Ledger
from sim.collect import (
    CollectConfig,
    CollectError,
    ExplorationConfig,
    check_training_catalogs,
    choose_candidate,
    collect,
    export_merged,
)
from sim.training import SimRegressionSuite, collection_summary, tote_of

DATA = Path(__file__).parent / "data" / "sim_grasps"  # real collected rows (see its README.md)

# A tiny collection: one tote of 3 procedural-train items, at most 4 attempts.
TINY = CollectConfig(catalogs=("procedural-train",), objects_per_tote=3, max_attempts_per_tote=4, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    a = collect(root / "a.db", TINY, [0], progress=False)
    b = collect(root / "b.db", TINY, [0], progress=False)
    return root, a, b


def _rows(path: Path) -> list:
    with Ledger(path, None, create=False) as ledger:
        return ledger.attempts()


def test_tiny_collection_records_labelled_attempts_with_patches_and_families(tiny, tmp_path):
    root, stats, _ = tiny
    rows = _rows(root / "a.db")
    assert stats.totes == 1 and stats.attempts == len(rows) >= 1
    from sim.catalogs import load_catalog

    families = set(load_catalog("procedural-train").families)
    for r in rows:
        assert r.source == "sim"
        assert r.patch.shape == (2, 32, 32) and r.features.shape == (12,)
        assert r.outcome.details["catalog"] == "procedural-train"
        assert r.decided_by.startswith("explore:")
        if r.outcome.reason is not Reason.NO_CONTACT:  # a grasp that touched nothing aimed at no item
            assert r.family in families
    # The export labels exactly the executed attempts, with their families.
    man = export_merged([root / "a.db"], tmp_path / "data")
    executed = [r for r in rows if r.outcome.reason not in (Reason.IK_FAILED, Reason.UNREACHABLE)]
    assert man["rows"] == len(executed) == stats.labeled
    assert man["positives"] == sum(r.outcome.success for r in executed)
    from grasping.learning import load_dataset

    ds = load_dataset(tmp_path / "data")  # every shard's sha256 checked against the merged manifest
    assert len(ds) == len(executed) and set(ds.source) == {"sim"}
    assert {tote_of(s) for s in ds.scene} == {"sim-collect-s3-tote-000000"}


def test_same_seed_gives_the_same_attempts_and_a_rerun_adds_nothing(tiny):
    root, a, b = tiny
    ra, rb = _rows(root / "a.db"), _rows(root / "b.db")
    key = lambda r: (  # noqa: E731
        r.attempt_id,
        r.grasp.gripper,
        r.outcome.reason,
        r.family,
        tuple(np.round(r.grasp.position, 6)),
        r.patch.tobytes(),
    )
    assert [key(r) for r in ra] == [key(r) for r in rb]
    assert a.by_reason == b.by_reason
    # Restart: the tote is redone, its attempt ids already stored, nothing is counted twice.
    again = collect(root / "a.db", TINY, [0], progress=False)
    assert again.attempts == 0
    assert len(_rows(root / "a.db")) == len(ra)


def test_test_catalogs_are_refused_before_anything_is_written(tmp_path):
    for bad in (("test",), ("procedural",), ("train", "test"), ("procedural-train", "procedural")):
        with pytest.raises(CollectError, match="held-out test catalog"):
            CollectConfig(catalogs=bad)
    with pytest.raises(CollectError, match="not a training catalog"):
        check_training_catalogs(("/some/folder",))
    with pytest.raises(CollectError):
        check_training_catalogs(())
    with pytest.raises(CollectError, match="test catalog"):
        SimRegressionSuite(catalog="procedural")
    assert not list(tmp_path.iterdir())
    # Data that claims to come from a test catalog is refused at training time too.
    with Ledger(tmp_path / "x.db", "x") as ledger:
        g = Grasp("suction", np.array([0.5, 0.0, 0.05]), np.array([1.0, 0.0, 0.0, 0.0]))
        ledger.record_attempt(
            attempt_id="x-tote-000001-a000",
            plan_id=None,
            candidate_index=None,
            grasp=g,
            outcome=Outcome(True, Reason.OK, executed=g, details={"catalog": "test"}),
            decided_by="explore:top",
            model_version="analytic",
            robot_time=1.0,
            patch=np.zeros((2, 32, 32), np.float32),
            features=np.zeros(12, np.float32),
            family="random_urdf",
            source="sim",
        )
    with pytest.raises(CollectError, match="test catalog 'test'"):
        collection_summary([tmp_path / "x.db"])


def _plan(scores: list[float], grippers: list[str]) -> Plan:
    q = np.array([1.0, 0.0, 0.0, 0.0])
    cands = tuple(
        Candidate(Grasp(g, np.array([0.3 + 0.03 * k, 0.0, 0.05]), q, 0.04 if g == "parallel_jaw" else 0), s)
        for k, (s, g) in enumerate(zip(scores, grippers, strict=True))
    )
    return Plan(candidates=cands, decision="pick")


def test_exploration_mixes_the_top_candidate_with_every_gripper_and_score_bin():
    scores = [0.95, 0.9, 0.7, 0.5, 0.3, 0.1, 0.85, 0.45, 0.05]
    grippers = ["suction"] * 6 + ["parallel_jaw"] * 3
    plan = _plan(scores, grippers)
    rng = np.random.default_rng(0)
    picks = [choose_candidate(plan, rng, ExplorationConfig()) for _ in range(600)]
    modes = {m for _, m in picks}
    assert {"top", "top_gripper"} <= modes and any(m.startswith("bin") for m in modes)
    assert {i for i, m in picks if m == "top"} == {0}
    assert {i for i, m in picks if m == "top_gripper"} == {0, 6}  # best suction, best jaw
    assert {i for i, _ in picks} == set(range(len(scores)))  # every bin of every gripper is explored
    # Top choices skip a spot that already failed; the stratified ones do not.
    top_only = ExplorationConfig(p_top=1.0, p_top_gripper=0.0)
    failed = [plan.candidates[0].grasp.position]
    tops = {choose_candidate(plan, rng, top_only, failed)[0] for _ in range(5)}
    assert tops == {1}
    with pytest.raises(ValueError):
        choose_candidate(_plan([], []), rng, ExplorationConfig())
    with pytest.raises(ValueError):
        ExplorationConfig(p_top=0.8, p_top_gripper=0.5)


def test_model_top_exploration_executes_the_models_best_fresh_candidate(tmp_path):
    from dataclasses import replace

    # The model ranks differently from the analytic score: its favourite is candidate 2.
    plan = _plan([0.9, 0.8, 0.2, 0.1], ["suction", "suction", "parallel_jaw", "suction"])
    plan = replace(
        plan,
        candidates=tuple(
            replace(c, p_success=p) for c, p in zip(plan.candidates, [0.3, 0.5, 0.9, 0.6], strict=True)
        ),
    )
    rng = np.random.default_rng(1)
    model_only = ExplorationConfig(p_model_top=1.0, p_top=0.0, p_top_gripper=0.0)
    assert choose_candidate(plan, rng, model_only) == (2, "model_top")
    # A spot that already failed is skipped: the model's next best is taken.
    assert choose_candidate(plan, rng, model_only, [plan.candidates[2].grasp.position]) == (3, "model_top")
    # Mixed: the model's share is its probability, the analytic top keeps its own.
    mixed = ExplorationConfig(p_model_top=0.5, p_top=0.3, p_top_gripper=0.0)
    modes = [choose_candidate(plan, rng, mixed)[1] for _ in range(2000)]
    assert abs(modes.count("model_top") / 2000 - 0.5) < 0.04
    assert abs(modes.count("top") / 2000 - 0.3) < 0.04
    # An analytic-only plan cannot serve a model_top choice; a config without a model is refused.
    with pytest.raises(ValueError, match="learned model"):
        choose_candidate(_plan([0.5], ["suction"]), rng, model_only)
    with pytest.raises(ValueError, match="sum to at most 1"):
        ExplorationConfig(p_model_top=0.6, p_top=0.5)
    with pytest.raises(ValueError, match="needs a model file"):
        CollectConfig(catalogs=("train",), exploration=model_only)
    with pytest.raises(CollectError, match="no such file"):
        missing = str(tmp_path / "missing.safetensors")
        CollectConfig(catalogs=("train",), model=missing, exploration=model_only)


def test_collection_guided_by_the_shipped_model_records_model_top_attempts(tmp_path):
    model = Path(__file__).resolve().parents[2] / "grasping" / "models" / "default.safetensors"
    cfg = CollectConfig(
        catalogs=("procedural-train",),
        objects_per_tote=3,
        max_attempts_per_tote=3,
        seed=5,
        model=str(model),
        exploration=ExplorationConfig(p_model_top=1.0, p_top=0.0, p_top_gripper=0.0),
    )
    stats = collect(tmp_path / "m.db", cfg, [0], progress=False)
    rows = _rows(tmp_path / "m.db")
    assert stats.attempts == len(rows) >= 1
    assert {r.decided_by for r in rows} == {"explore:model_top"}
    assert {r.outcome.details["mode"] for r in rows} == {"model_top"}
    # The ledger names the model that chose, so the data says which policy collected it.
    from grasping.modelfile import load_model

    assert {r.model_version for r in rows} == {load_model(model).version}


def test_train_from_sim_writes_a_verified_model_registers_and_gates_it(tmp_path):
    from grasping.learned_scorer import LearnedScorer
    from grasping.learning import TrainConfig
    from grasping.modelfile import file_sha256, read_sidecar
    from grasping.registry import ModelRegistry
    from sim.training import TrainFromSimConfig, train_from_sim

    cfg = TrainFromSimConfig(
        workers=1,
        objects_per_tote=3,
        catalogs=("procedural-train",),
        registry=str(tmp_path / "registry"),
        sim_suite_episodes=0,  # the regression suite is exercised by the benchmark, not here
        watchdog_scenes=4,
        extra_data=(str(DATA),),
        train=TrainConfig(epochs=3, seed=0, progress=False, threads=1, model_version="tiny-sim-v1"),
        progress=False,
    )
    out = tmp_path / "m.safetensors"
    res = train_from_sim(1, out, seed=5, work_dir=tmp_path / "work", config=cfg, command="pytest tiny")
    assert res.model_path == out and out.exists()
    assert read_sidecar(out) == file_sha256(out) == res.sha256
    scorer = LearnedScorer.from_file(out, expected_sha256=res.sha256, num_threads=None)
    assert scorer.version == "tiny-sim-v1"
    card = res.card_path.read_text()
    assert "## Simulation collection" in card and "pytest tiny" in card and "## Test metrics" in card
    assert res.collection["attempts_by_catalog"].keys() == {"procedural-train"}
    assert res.gate is not None and res.holdout is not None
    reg = ModelRegistry(tmp_path / "registry")
    entry = reg.get("tiny-sim-v1")
    assert entry.sha256 == res.sha256 and entry.gate_passed == res.gate.passed
    assert (reg.current_version() == "tiny-sim-v1") == res.gate.passed == res.promoted
    meta = json.loads(json.dumps(scorer.model.meta["data"]))
    assert meta["rows"] > 200
    # The watchdog's scene statistics were refit on live scenes and are what the file now holds.
    wd, info = scorer.model.watchdog, res.watchdog
    assert info["scenes_ref"] == 2 and info["scenes_threshold"] == 2 and info["sha256"] == res.sha256
    assert wd.scene_mu == pytest.approx(info["scene_mu"]) and wd.scene_sd > 0
    assert wd.threshold_sigma == pytest.approx(info["watchdog_threshold_sigma"])
    assert scorer.model.meta["watchdog"]["calibrated_on"].startswith("live scenes")
    assert "## Watchdog scene statistics" in card
    # The item watchdog was fitted on the same live scenes' items, or (too few items in a tiny run)
    # left out with the reason in the card; either way the file and the measurements agree.
    iw = info["item_watchdog"]
    if "skipped" in iw:
        assert scorer.model.item_watchdog is None and "item watchdog not fitted" in card
    else:
        assert scorer.model.item_watchdog.bank.shape[0] == iw["item_watchdog_items"]
        assert "item watchdog (decides the scene verdict)" in card


def test_a_crashing_benchmark_episode_becomes_a_record_not_a_lost_run():
    from sim.benchmark.runner import EpisodeSpec
    from sim.training import guarded_episode

    spec = EpisodeSpec(
        index=3, seed=11, catalog="no-such-catalog", objects_per_tote=2, planner="analytic", associate="sim"
    )
    rec = guarded_episode(spec)
    assert rec["episode"] == 3 and rec["seed"] == 11
    assert rec["crashed"].startswith("ValueError") and "no-such-catalog" in rec["crashed"]
