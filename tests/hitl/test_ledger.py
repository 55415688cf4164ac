"""The ledger: real SQLite files in tmp_path, a real subprocess killed with SIGKILL, the real CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from grasping.types import Candidate, Frame, Grasp, Outcome, Plan, Reason
from hitl.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerCorruptError,
    LedgerError,
    LedgerVersionError,
    verify_export,
)
from hitl.ledger_cli import register
from hitl.messages import AssistAnswer, AssistRequest, CandidateView

REPO = Path(__file__).resolve().parents[2]
C, S, F = 2, 32, 8  # patch channels, patch size, feature count (the planner's shapes)


class Clock:
    """A settable clock for `recorded_at`, so `since` filters are deterministic."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_grasp(rng: np.random.Generator, gripper: str = "suction") -> Grasp:
    q = rng.normal(size=4)
    return Grasp(gripper, rng.uniform(-0.3, 0.3, 3), q, 0.05 if gripper == "parallel_jaw" else 0.0)


def make_plan(rng: np.random.Generator, m: int = 4, frame_id: str = "frame-1", decision: str = "ask") -> Plan:
    cands = tuple(
        Candidate(
            grasp=make_grasp(rng, "suction" if k % 2 == 0 else "parallel_jaw"),
            analytic_score=float(rng.uniform()),
            learned_score=float(rng.uniform()),
            p_success=float(rng.uniform()) if k != 1 else None,
            ood_score=float(rng.uniform()),
            pixel=(int(rng.integers(0, 64)), int(rng.integers(0, 48))),
            cluster=k // 2,
        )
        for k in range(m)
    )
    return Plan(
        candidates=cands,
        decision=decision,
        reasons=("p(success) 0.61 below threshold 0.80", "scene 2.1 sigma from training data"),
        threshold=0.8,
        scene_ood_sigma=2.1,
        in_distribution=False,
        model_version="model-abc123",
        latency_ms=41.5,
        frame_id=frame_id,
        patches=rng.normal(size=(m, C, S, S)).astype(np.float32),
        features=rng.normal(size=(m, F)).astype(np.float32),
    )


def make_frame(rng: np.random.Generator, frame_id: str = "frame-1") -> Frame:
    depth = rng.uniform(0.5, 1.0, (48, 64)).astype(np.float32)
    depth[3, 5] = np.nan  # an unmeasured pixel must survive the round trip
    return Frame(
        depth=depth,
        rgb=rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        K=np.array([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]]),
        T_base_camera=np.eye(4),
        stamp=12.5,
        frame_id=frame_id,
    )


def attempt_kwargs(rng: np.random.Generator, i: int, *, success: bool = True, **over) -> dict:
    g = make_grasp(rng)
    kw = dict(
        attempt_id=f"att-{i}",
        plan_id=None,
        candidate_index=None,
        grasp=g,
        outcome=Outcome(
            success=success,
            reason=Reason.OK if success else Reason.SEAL_FAILED,
            executed=g,
            robot_seconds=3.25,
            item_id=7,
            details={"seal_angle_deg": np.float32(4.5), "family": "box"},
        ),
        decided_by="model",
        model_version="model-abc123",
        robot_time=100.0 + i,
        patch=rng.normal(size=(C, S, S)).astype(np.float32),
        features=rng.normal(size=F).astype(np.float32),
        family="box",
        source="sim",
    )
    kw.update(over)
    return kw


def load_shards(out: Path) -> dict[str, np.ndarray]:
    """All shards of an export concatenated, keyed by array name (loaded without pickle)."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts: dict[str, list] = {}
    for shard in manifest["shards"]:
        with np.load(out / shard["file"], allow_pickle=False) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


# --- round trips -----------------------------------------------------------------------------------


def test_new_ledger_is_wal_full_sync_and_current_schema(tmp_path: Path) -> None:
    db = tmp_path / "cell.db"
    with Ledger(db, "cell-7") as ledger:
        assert ledger.schema_version == SCHEMA_VERSION
        assert ledger.cell_id == "cell-7"
        assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    # Reopening without a cell id finds the stored one; as another cell is refused.
    with Ledger(db) as ledger:
        assert ledger.cell_id == "cell-7"
    with pytest.raises(LedgerError, match="cell-7"):
        Ledger(db, "cell-8")


def test_plan_round_trip_with_frame_and_every_candidate(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    plan, frame = make_plan(rng), make_frame(rng)
    with Ledger(tmp_path / "cell.db", "cell-1") as ledger:
        pid = ledger.record_plan(plan, tote_id="tote-9", frame=frame, store_frame=True)
        assert pid.startswith("frame-1-")
        rec = ledger.plan(pid)
        assert rec is not None and rec.has_frame
        assert (rec.decision, rec.tote_id, rec.model_version) == ("ask", "tote-9", "model-abc123")
        assert rec.reasons == plan.reasons
        assert rec.threshold == 0.8 and rec.scene_ood_sigma == 2.1 and rec.in_distribution is False
        assert len(rec.candidates) == 4
        for k, (c, r) in enumerate(zip(plan.candidates, rec.candidates, strict=True)):
            assert r.index == k
            assert r.grasp.gripper == c.grasp.gripper
            np.testing.assert_array_equal(r.grasp.position, c.grasp.position)
            np.testing.assert_array_equal(r.grasp.orientation, c.grasp.orientation)
            assert r.grasp.width == c.grasp.width
            assert (r.analytic_score, r.learned_score, r.p_success, r.ood_score) == (
                c.analytic_score,
                c.learned_score,
                c.p_success,
                c.ood_score,
            )
            assert r.pixel == c.pixel and r.cluster == c.cluster
            np.testing.assert_array_equal(r.patch, plan.patches[k])
            np.testing.assert_array_equal(r.features, plan.features[k])
            assert r.patch.dtype == np.float32
        got = ledger.frame(pid)
        np.testing.assert_array_equal(got.depth, frame.depth)  # NaN == NaN for assert_array_equal
        np.testing.assert_array_equal(got.rgb, frame.rgb)
        np.testing.assert_array_equal(got.K, frame.K)
        assert got.stamp == 12.5 and got.frame_id == "frame-1"
        # Without store_frame nothing but the decision record is kept.
        pid2 = ledger.record_plan(plan, tote_id="tote-9", frame=frame)
        assert pid2 != pid and ledger.frame(pid2) is None
        assert ledger.counts()["frames"] == 1 and ledger.counts()["candidates"] == 8


def test_a_full_disk_raises_its_own_error_and_keeps_every_earlier_row(tmp_path: Path) -> None:
    # SQLite rolls a transaction back by itself on SQLITE_FULL; the ledger's own ROLLBACK then
    # raised "cannot rollback - no transaction is active" and hid the cause (stop 38: two continual
    # runs filled the disk and died with only that message). A page limit stands in for the disk.
    rng = np.random.default_rng(3)
    plan, frame = make_plan(rng), make_frame(rng)
    with Ledger(tmp_path / "cell.db", "cell-1") as ledger:
        ledger.record_plan(plan, tote_id="tote-1", frame=frame, store_frame=True)
        pages = ledger._conn.execute("PRAGMA page_count").fetchone()[0]
        ledger._conn.execute(f"PRAGMA max_page_count={pages + 2}")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            for _ in range(50):
                ledger.record_plan(plan, tote_id="tote-1", frame=frame, store_frame=True)
        kept = ledger.counts()
        assert kept["frames"] == kept["plans"] >= 1  # no plan without its frame: nothing of the failed write
        ledger._conn.execute("PRAGMA max_page_count=1073741823")  # room again: the ledger goes on
        ledger.record_plan(plan, tote_id="tote-1", frame=frame, store_frame=True)
        assert ledger.counts()["plans"] == kept["plans"] + 1


def test_attempt_round_trip_and_idempotency(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    with Ledger(tmp_path / "cell.db", "cell-1") as ledger:
        kw = attempt_kwargs(rng, 1)
        assert ledger.record_attempt(**kw) is True
        # The same attempt id again (a restart replaying its last attempt) writes nothing.
        assert ledger.record_attempt(**kw) is False
        assert ledger.record_attempt(**{**kw, "outcome": Outcome(False, Reason.DROPPED)}) is False
        (a,) = ledger.attempts()
        assert a.attempt_id == "att-1" and a.cell_id == "cell-1"
        assert a.outcome.success and a.outcome.reason is Reason.OK
        assert a.outcome.item_id == 7 and a.outcome.robot_seconds == 3.25
        assert a.outcome.details == {"seal_angle_deg": 4.5, "family": "box"}
        np.testing.assert_array_equal(a.outcome.executed.position, kw["grasp"].position)
        np.testing.assert_array_equal(a.grasp.orientation, kw["grasp"].orientation)
        np.testing.assert_array_equal(a.patch, kw["patch"])
        np.testing.assert_array_equal(a.features, kw["features"])
        assert (a.decided_by, a.model_version, a.robot_time, a.family, a.source) == (
            "model",
            "model-abc123",
            101.0,
            "box",
            "sim",
        )
        assert ledger.counts()["attempts"] == 1


def test_request_and_answer_round_trip_and_one_final_answer(tmp_path: Path) -> None:
    req = AssistRequest(
        cell_id="cell-1",
        deadline=2_000.0,
        image_png=b"\x89PNG\r\n\x1a\nfake-but-bytes",
        candidates=(CandidateView(0, 10, 20, "suction", 0.6), CandidateView(2, 30, 5, "parallel_jaw", 0.4)),
        reasons=("unsure",),
        priority=3,
        request_id="req-1",
        created=1_990.0,
        context={"plan_id": "p-x", "tote_id": "t-1"},
    )
    ans = AssistAnswer(
        "req-1", "answered", "point", pixel=(12, 34), associate_id="alice", answered_at=1_995.0
    )
    with Ledger(tmp_path / "cell.db", "cell-1") as ledger:
        assert ledger.record_request(req) is True
        assert ledger.record_request(req) is False
        assert ledger.request("req-1") == req
        assert ledger.record_answer(ans) is True
        # A different late answer for the same request does not replace the first one.
        assert ledger.record_answer(AssistAnswer("req-1", "expired")) is False
        assert ledger.answer("req-1") == ans
        c = ledger.counts()
        assert (c["requests"], c["answers"], c["answered"], c["expired"]) == (1, 1, 1, 0)


# --- bad input: a clear error and nothing lost or half-written ---------------------------------------


def test_bad_input_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    with Ledger(tmp_path / "cell.db", "cell-1") as ledger:
        assert ledger.record_attempt(**attempt_kwargs(rng, 0))
        with pytest.raises(ValueError, match="patch"):
            ledger.record_attempt(**attempt_kwargs(rng, 1, patch=np.zeros((S, S))))
        with pytest.raises(ValueError, match="features"):
            ledger.record_attempt(**attempt_kwargs(rng, 2, features=np.zeros((2, F))))
        with pytest.raises(ValueError, match="source"):
            ledger.record_attempt(**attempt_kwargs(rng, 3, source="simulation"))
        with pytest.raises(ValueError, match="decided_by"):
            ledger.record_attempt(**attempt_kwargs(rng, 4, decided_by="associate:"))
        with pytest.raises(ValueError, match="details"):
            bad = Outcome(True, Reason.OK, details={"x": object()})
            ledger.record_attempt(**attempt_kwargs(rng, 5, outcome=bad))
        plan = make_plan(rng)
        with pytest.raises(ValueError, match="patches"):
            ledger.record_plan(
                Plan(plan.candidates, "pick", patches=plan.patches[:2], features=plan.features), tote_id="t"
            )
        with pytest.raises(ValueError, match="store_frame"):
            ledger.record_plan(plan, tote_id="t", store_frame=True)
        c = ledger.counts()
        assert (c["attempts"], c["plans"], c["candidates"]) == (1, 0, 0)
        assert ledger.attempts()[0].attempt_id == "att-0"


# --- schema versions -------------------------------------------------------------------------------

# The version-1 layout written out by hand (not through hitl.ledger), as an old cell left it.
V1_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE plans (plan_id TEXT PRIMARY KEY, frame_id TEXT NOT NULL, tote_id TEXT NOT NULL,
  cell_id TEXT NOT NULL, recorded_at REAL NOT NULL, decision TEXT NOT NULL, reasons TEXT NOT NULL,
  threshold REAL, scene_ood_sigma REAL, in_distribution INTEGER NOT NULL, model_version TEXT NOT NULL,
  latency_ms REAL NOT NULL, n_candidates INTEGER NOT NULL);
CREATE TABLE candidates (plan_id TEXT NOT NULL REFERENCES plans(plan_id), idx INTEGER NOT NULL,
  gripper TEXT NOT NULL, grasp TEXT NOT NULL, analytic_score REAL NOT NULL, learned_score REAL,
  p_success REAL, ood_score REAL, u INTEGER NOT NULL, v INTEGER NOT NULL, cluster INTEGER NOT NULL,
  patch BLOB, features BLOB, PRIMARY KEY (plan_id, idx));
CREATE TABLE attempts (attempt_id TEXT PRIMARY KEY, plan_id TEXT, candidate_index INTEGER,
  cell_id TEXT NOT NULL, recorded_at REAL NOT NULL, robot_time REAL NOT NULL, gripper TEXT NOT NULL,
  grasp TEXT NOT NULL, success INTEGER NOT NULL, reason TEXT NOT NULL, executed TEXT,
  robot_seconds REAL NOT NULL, item_id INTEGER, details TEXT NOT NULL, decided_by TEXT NOT NULL,
  model_version TEXT NOT NULL, patch BLOB, features BLOB);
CREATE TABLE requests (request_id TEXT PRIMARY KEY, cell_id TEXT NOT NULL, plan_id TEXT,
  created REAL NOT NULL, deadline REAL NOT NULL, priority INTEGER NOT NULL, reasons TEXT NOT NULL,
  candidates TEXT NOT NULL, context TEXT NOT NULL, image_png BLOB NOT NULL, recorded_at REAL NOT NULL);
CREATE TABLE answers (request_id TEXT PRIMARY KEY, status TEXT NOT NULL, kind TEXT,
  candidate_index INTEGER, pixel_u INTEGER, pixel_v INTEGER, associate_id TEXT,
  answered_at REAL NOT NULL, note TEXT NOT NULL, recorded_at REAL NOT NULL);
PRAGMA application_id = 1347112007;
PRAGMA user_version = 1;
"""


def npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def build_v1(path: Path, extra_sql: str = "") -> tuple[np.ndarray, np.ndarray]:
    patch = np.arange(C * S * S, dtype=np.float32).reshape(C, S, S)
    feats = np.linspace(0, 1, F, dtype=np.float32)
    conn = sqlite3.connect(path)
    conn.executescript(V1_DDL + extra_sql)
    grasp = json.dumps(
        {"gripper": "suction", "position": [0.1, 0.2, 0.3], "orientation": [0, 0, 0, 1], "width": 0}
    )
    conn.execute("INSERT INTO meta VALUES ('cell_id', 'old-cell'), ('created_at', '5.0')")
    conn.execute(
        "INSERT INTO attempts VALUES ('old-1', NULL, NULL, 'old-cell', 10.0, 1.0, 'suction', ?, 0, "
        "'slipped', ?, 2.0, NULL, '{}', 'associate:bob', 'v0', ?, ?)",
        (grasp, grasp, npy_bytes(patch), npy_bytes(feats)),
    )
    conn.commit()
    conn.close()
    return patch, feats


def test_v1_file_is_migrated_in_place_keeping_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    patch, feats = build_v1(db)
    with Ledger(db, "old-cell") as ledger:
        assert ledger.schema_version == SCHEMA_VERSION == 3
        (a,) = ledger.attempts()
        assert a.attempt_id == "old-1" and a.outcome.reason is Reason.SLIPPED and not a.outcome.success
        assert a.decided_by == "associate:bob"
        assert a.source == "production" and a.family is None  # v2 columns, defaults for old rows
        assert a.request_id is None and a.item is None and a.item_descriptor is None  # v3 columns
        np.testing.assert_array_equal(a.patch, patch)
        np.testing.assert_array_equal(a.features, feats)
        # The new columns and tables work on the migrated file.
        rng = np.random.default_rng(4)
        assert ledger.record_attempt(**attempt_kwargs(rng, 9, family="mug", source="sim"))
        pid = ledger.record_plan(make_plan(rng), tote_id="t", frame=make_frame(rng), store_frame=True)
        assert ledger.frame(pid) is not None
        assert ledger.attempts(attempt_id="att-9")[0].family == "mug"
        assert ledger.record_attempt(
            **attempt_kwargs(rng, 10, request_id="r", item=2, item_descriptor=np.ones(18))
        )
        (b,) = ledger.attempts(attempt_id="att-10")
        assert (b.request_id, b.item) == ("r", 2) and b.item_descriptor.shape == (18,)
        assert ledger.integrity_check() == ["ok"]


def test_failed_migration_rolls_back_to_the_old_version(tmp_path: Path) -> None:
    # A v1 file that already holds a table the v2 step wants to create: the step fails midway
    # (after its ALTER TABLEs), and the whole migration must roll back.
    db = tmp_path / "odd.db"
    build_v1(db, "CREATE TABLE frames (x INTEGER);")
    with pytest.raises(LedgerError, match=r"from version 1 to 2.*left at version 1") as err:
        Ledger(db, "old-cell")
    assert str(db) in str(err.value)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    cols = [r[1] for r in conn.execute("PRAGMA table_info(attempts)")]
    assert "family" not in cols and "source" not in cols
    assert conn.execute("SELECT attempt_id FROM attempts").fetchall() == [("old-1",)]
    conn.close()


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    with Ledger(db, "cell-1"):
        pass
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(LedgerVersionError) as err:
        Ledger(db, "cell-1")
    msg = str(err.value)
    assert str(db) in msg and "99" in msg and str(SCHEMA_VERSION) in msg
    assert db.read_bytes() == before


def test_corrupt_or_foreign_file_gives_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(np.random.default_rng(5).bytes(8192))
    before = junk.read_bytes()
    with pytest.raises(LedgerCorruptError) as err:
        Ledger(junk, "cell-1")
    assert str(junk) in str(err.value)
    assert junk.read_bytes() == before  # nothing was written over it

    foreign = tmp_path / "other-app.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerCorruptError, match="not a pickcell ledger"):
        Ledger(foreign, "cell-1")

    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


# --- export ----------------------------------------------------------------------------------------


def test_export_labels_match_what_was_recorded(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    clock = Clock(1_000.0)
    with Ledger(tmp_path / "cell.db", "cell-1", clock=clock) as ledger:
        plan = make_plan(rng, m=4)
        pid = ledger.record_plan(plan, tote_id="t")
        # 1) executed by the model, observation taken from the plan's candidate 0 (none passed).
        clock.t = 1_001.0
        ledger.record_attempt(
            **attempt_kwargs(rng, 1, plan_id=pid, candidate_index=0, patch=None, features=None, family=None)
        )
        # 2) its own observation, a failure, from production.
        clock.t = 1_002.0
        kw2 = attempt_kwargs(rng, 2, success=False, source="production", family="bag")
        ledger.record_attempt(**kw2)
        # 3) IK failure: stored, never labeled.
        ledger.record_attempt(**attempt_kwargs(rng, 3, outcome=Outcome(False, Reason.IK_FAILED)))
        # 4) an attempt with no observation anywhere: stored, left out of the export.
        ledger.record_attempt(**attempt_kwargs(rng, 4, patch=None, features=None))
        # 5) associate says "no safe pick" on a request that showed candidates 1 and 3.
        clock.t = 1_003.0
        req = AssistRequest(
            cell_id="cell-1",
            deadline=0.0,
            image_png=b"png",
            candidates=(
                CandidateView(1, 0, 0, "parallel_jaw", 0.3),
                CandidateView(3, 0, 0, "parallel_jaw", 0.2),
            ),
            request_id="req-n",
            context={"plan_id": pid, "item": 1},  # the question was about item 1 (candidates 2, 3)
        )
        ledger.record_request(req)
        ledger.record_answer(AssistAnswer("req-n", "answered", "no_safe_pick", associate_id="carol"))

        m = ledger.export(tmp_path / "out")
        assert verify_export(tmp_path / "out") == []
        d = load_shards(tmp_path / "out")
        # Candidate 1 was shown but lies on item 0, which nobody judged: no label for it.
        assert list(d["row_id"]) == ["att-1", "att-2", "req-n:3"]
        assert (m.rows, m.positives, m.negatives) == (3, 1, 2)
        np.testing.assert_array_equal(d["label"], np.array([1, 0, 0], dtype=np.float32))
        np.testing.assert_array_equal(d["patches"][0], plan.patches[0])
        np.testing.assert_array_equal(d["features"][0], plan.features[0])
        np.testing.assert_array_equal(d["patches"][1], kw2["patch"])
        np.testing.assert_array_equal(d["features"][1], kw2["features"])
        np.testing.assert_array_equal(d["patches"][2:], plan.patches[[3]])
        np.testing.assert_array_equal(d["features"][2:], plan.features[[3]])
        assert d["patches"].dtype == np.float32 and d["patches"].shape == (3, C, S, S)
        assert d["gripper"].dtype == np.int64
        np.testing.assert_array_equal(d["gripper"], [0, 0, 1])  # candidate 0 suction; 3 jaw
        assert list(d["source"]) == ["sim", "production", "associate"]
        assert list(d["family"]) == ["", "bag", ""]
        assert list(d["decided_by"]) == ["model", "model", "associate:carol"]
        np.testing.assert_array_equal(d["timestamp"], [1_001.0, 1_002.0, 1_003.0])
        assert d["p_success"][0] == plan.candidates[0].p_success
        assert np.isnan(d["scene_ood_sigma"][1]) and d["scene_ood_sigma"][0] == 2.1
        assert list(d["tote_id"]) == ["t", "", "t"]
        np.testing.assert_array_equal(d["item"], [0, -1, 1])  # attempt 1 took candidate 0's item
        assert m.counts["left_out_reason_ik_failed"] == 1 and m.counts["left_out_no_observation"] == 1
        # Rejected candidate 2 was never executed nor shown as unsafe: it carries no label.
        assert not any(r.endswith(":2") for r in d["row_id"])

        # `since` keeps only rows committed at or after it.
        m2 = ledger.export(tmp_path / "out-since", since=1_002.5)
        assert list(load_shards(tmp_path / "out-since")["row_id"]) == ["req-n:3"]
        assert m2.rows == 1


# --- labels from every answer kind -------------------------------------------------------------------

D = 19  # item descriptor length (grasping.watchdog.ITEM_FEATURES, version 3)


def two_item_plan(rng: np.random.Generator, frame_id: str = "frame-2") -> Plan:
    """Six candidates: 0-2 on item 0, 3-5 on item 1; both items with a shape descriptor."""
    from grasping.types import ItemCluster

    plan = make_plan(rng, m=6, frame_id=frame_id)
    cands = tuple(replace(c, cluster=0 if k < 3 else 1) for k, c in enumerate(plan.candidates))
    clusters = tuple(
        ItemCluster(
            np.zeros(3), -np.ones(3) * 0.05, np.ones(3) * 0.05, 100, descriptor=np.full(D, float(i + 1))
        )
        for i in range(2)
    )
    return replace(plan, candidates=cands, clusters=clusters)


def views(plan: Plan, idx: tuple[int, ...]) -> tuple[CandidateView, ...]:
    return tuple(CandidateView(k, 0, 0, plan.candidates[k].grasp.gripper, 0.4) for k in idx)


def ask(ledger: Ledger, rid: str, pid: str, plan: Plan, item: int, family: str | None = None) -> None:
    """A question about `item` of the plan; `family`: the item's provenance (Controller.item_family)."""
    ledger.record_request(
        AssistRequest(
            cell_id="cell-1",
            deadline=0.0,
            image_png=b"png",
            candidates=views(plan, (0, 1, 3, 4)),  # two candidates of each item shown
            request_id=rid,
            context={"plan_id": pid, "item": item} | ({"family": family} if family else {}),
        )
    )


def test_each_answer_kind_gives_its_labels(tmp_path: Path) -> None:
    """approve k, a clicked pixel, no safe pick, skip, expired: the labels of docs/ledger.md."""
    rng = np.random.default_rng(21)
    clock = Clock(2_000.0)
    with Ledger(tmp_path / "cell.db", "cell-1", clock=clock) as ledger:
        plan = two_item_plan(rng)
        pid = ledger.record_plan(plan, tote_id="tote-9")
        # approve 0 (item 0): executed, succeeded; candidate 1 on the same item was passed over.
        ask(ledger, "r-approve", pid, plan, 0, family="mailer")
        ledger.record_answer(
            AssistAnswer("r-approve", "answered", "approve", candidate_index=0, associate_id="ann")
        )
        ledger.record_attempt(
            **attempt_kwargs(
                rng, 1, plan_id=pid, candidate_index=0, patch=None, features=None, family=None,
                decided_by="associate:ann", request_id="r-approve",
            )
        )  # fmt: skip
        # A clicked pixel on item 1: its own patch and features, failed; 3 and 4 were passed over.
        ask(ledger, "r-point", pid, plan, 1)
        ledger.record_answer(AssistAnswer("r-point", "answered", "point", pixel=(5, 6), associate_id="bob"))
        kw_px = attempt_kwargs(
            rng, 2, success=False, plan_id=pid, decided_by="associate:bob", request_id="r-point", item=1,
            item_descriptor=np.full(D, 7.0), family=None,
        )  # fmt: skip
        ledger.record_attempt(**kw_px)
        # no safe pick on item 1: its shown candidates 3, 4 are negatives; 0, 1 (item 0) are not.
        ask(ledger, "r-nsp", pid, plan, 1, family="frame")
        ledger.record_answer(AssistAnswer("r-nsp", "answered", "no_safe_pick", associate_id="carol"))
        # skip and expired: recorded, no label.
        ask(ledger, "r-skip", pid, plan, 0)
        ledger.record_answer(AssistAnswer("r-skip", "answered", "skip", associate_id="dan"))
        ask(ledger, "r-exp", pid, plan, 0)
        ledger.record_answer(AssistAnswer("r-exp", "expired"))

        m = ledger.export(tmp_path / "out")
        d = load_shards(tmp_path / "out")
        rows = {r: i for i, r in enumerate(d["row_id"])}
        assert set(rows) == {"att-1", "att-2", "r-nsp:3", "r-nsp:4", "r-approve:1", "r-point:3", "r-point:4"}

        def row(r: str) -> tuple:
            i = rows[r]
            return (
                float(d["label"][i]),
                round(float(d["weight"][i]), 3),
                str(d["label_kind"][i]),
                int(d["item"][i]),
            )

        assert row("att-1") == (1.0, 1.0, "outcome", 0)
        assert row("att-2") == (0.0, 1.0, "outcome", 1)
        assert row("r-nsp:3") == row("r-nsp:4") == (0.0, 1.0, "no_safe_pick", 1)
        assert row("r-approve:1") == (0.0, 0.3, "passed_over", 0)
        assert row("r-point:3") == row("r-point:4") == (0.0, 0.3, "passed_over", 1)
        # The approved attempt is the associate's, with the plan candidate's observation and item.
        i = rows["att-1"]
        assert d["decided_by"][i] == "associate:ann" and d["request_id"][i] == "r-approve"
        np.testing.assert_array_equal(d["patches"][i], plan.patches[0])
        np.testing.assert_array_equal(d["item_descriptor"][i], np.full(D, 1.0, np.float32))
        # The pixel answer's row carries its own patch, features and descriptor.
        i = rows["att-2"]
        np.testing.assert_array_equal(d["patches"][i], kw_px["patch"])
        np.testing.assert_array_equal(d["features"][i], kw_px["features"])
        np.testing.assert_array_equal(d["item_descriptor"][i], np.full(D, 7.0, np.float32))
        assert d["decided_by"][i] == "associate:bob"
        # Candidates on another item than the one answered about never get a label from it.
        assert "r-nsp:0" not in rows and "r-nsp:1" not in rows and "r-point:0" not in rows
        np.testing.assert_array_equal(d["item_descriptor"][rows["r-nsp:3"]], np.full(D, 2.0, np.float32))
        assert set(d["tote_id"]) == {"tote-9"}
        assert m.counts["answers_skip"] == 1 and m.counts["answers_expired"] == 1
        assert m.counts["by_label_kind"] == {"outcome": 2, "no_safe_pick": 2, "passed_over": 3}
        assert ledger.attempts(attempt_id="att-1")[0].item == 0  # filled from the plan candidate
        # Rows an answer labels keep the asked item's family when the question carried one (the
        # warehouse system's, or the simulator's): the learner groups them with the item's kind.
        fam = {r: str(d["family"][i]) for r, i in rows.items()}
        assert fam["r-nsp:3"] == fam["r-nsp:4"] == "frame" and fam["r-approve:1"] == "mailer"
        assert fam["r-point:3"] == fam["r-point:4"] == ""  # asked without provenance: unknown

        # The weak-negative weight is configurable; 0 leaves passed-over candidates out.
        d2 = (
            load_shards(tmp_path / "out2")
            if ledger.export(tmp_path / "out2", weak_negative_weight=0.5)
            else None
        )
        assert sorted(set(np.round(d2["weight"], 3))) == [0.5, 1.0]
        assert ledger.export(tmp_path / "out3", weak_negative_weight=0.0).rows == 4
        with pytest.raises(ValueError, match="weak_negative_weight"):
            ledger.export(tmp_path / "out4", weak_negative_weight=2.0)


def test_no_safe_pick_without_the_asked_item_labels_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(22)
    with Ledger(tmp_path / "cell.db", "cell-1") as ledger:
        plan = two_item_plan(rng)
        pid = ledger.record_plan(plan, tote_id="t")
        req = AssistRequest(
            "cell-1", 0.0, b"png", views(plan, (0, 3)), request_id="r", context={"plan_id": pid}
        )
        ledger.record_request(req)
        ledger.record_answer(AssistAnswer("r", "answered", "no_safe_pick", associate_id="carol"))
        m = ledger.export(tmp_path / "out")
        assert m.rows == 0 and m.counts["left_out_no_safe_pick_no_item"] == 1


def test_export_shards_split_by_size_and_shape_and_sha256_verifies(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    with Ledger(tmp_path / "cell.db", "cell-1") as ledger:
        for i in range(7):
            ledger.record_attempt(**attempt_kwargs(rng, i))
        for i in range(7, 10):  # another model generation with bigger patches
            kw = attempt_kwargs(rng, i, patch=rng.normal(size=(3, 16, 16)), features=rng.normal(size=5))
            ledger.record_attempt(**kw)
        m = ledger.export(tmp_path / "out", shard_rows=3)
        assert m.rows == 10
        shapes = [(tuple(s["patch_shape"]), s["feature_dim"], s["rows"]) for s in m.shards]
        assert shapes == [((C, S, S), F, 3), ((C, S, S), F, 3), ((3, 16, 16), 5, 3), ((C, S, S), F, 1)]
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert manifest["cell_id"] == "cell-1" and manifest["schema_version"] == SCHEMA_VERSION
        for s in manifest["shards"]:
            assert hashlib.sha256((tmp_path / "out" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        # A tampered shard is detected.
        shard0 = tmp_path / "out" / manifest["shards"][0]["file"]
        raw = bytearray(shard0.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # flip one byte in the middle of the array data
        shard0.write_bytes(bytes(raw))
        assert len(verify_export(tmp_path / "out")) == 1
        # Exporting over a non-empty directory is refused and leaves it alone.
        with pytest.raises(LedgerError, match="not an empty directory"):
            ledger.export(tmp_path / "out")


def test_plan_referenced_by_frame_id_links_attempts_and_requests(tmp_path: Path) -> None:
    # Callers that kept only the Plan may pass plan.frame_id; it resolves to that frame's latest plan.
    rng = np.random.default_rng(8)
    with Ledger(tmp_path / "cell.db", "cell-1") as ledger:
        plan = make_plan(rng, frame_id="frame-42")
        pid = ledger.record_plan(plan, tote_id="t")
        ledger.record_attempt(
            **attempt_kwargs(rng, 1, plan_id="frame-42", candidate_index=2, patch=None, features=None)
        )
        assert ledger.attempts()[0].plan_id == pid
        ledger.export(tmp_path / "out")
        np.testing.assert_array_equal(load_shards(tmp_path / "out")["patches"][0], plan.patches[2])


# --- concurrency and crashes -----------------------------------------------------------------------


def test_threads_recording_at_once_lose_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "cell.db", "cell-1")
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = np.random.default_rng(100 + t)
        try:
            for i in range(40):
                assert ledger.record_attempt(**attempt_kwargs(rng, t * 1000 + i))
                if i % 10 == 0:
                    ledger.record_plan(make_plan(rng), tote_id=f"t{t}")
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert ledger.counts()["attempts"] == 160 and ledger.counts()["plans"] == 16
    assert ledger.integrity_check() == ["ok"]
    ledger.close()


WRITER = r"""
import sys
import numpy as np
from grasping.types import Grasp, Outcome, Reason
from hitl.ledger import Ledger

ledger = Ledger(sys.argv[1], "cell-k")
g = Grasp("suction", [0.1, 0.2, 0.3], [0, 0, 0, 1])
i = 0
while True:
    rng = np.random.default_rng(i)  # the parent regenerates the same arrays from the id
    ok = i % 3 != 0
    ledger.record_attempt(
        attempt_id=f"k-{i}", plan_id=None, candidate_index=None, grasp=g,
        outcome=Outcome(ok, Reason.OK if ok else Reason.SLIPPED, g, 1.0),
        decided_by="model", model_version="v1", robot_time=float(i),
        patch=rng.normal(size=(2, 32, 32)).astype(np.float32),
        features=rng.normal(size=8).astype(np.float32), source="sim",
    )
    print(f"k-{i}", flush=True)  # only after the commit returned
    i += 1
"""


def test_sigkill_mid_stream_keeps_every_committed_attempt(tmp_path: Path) -> None:
    db = tmp_path / "cell.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    printed: list[str] = []
    try:
        assert proc.stdout is not None
        while len(printed) < 150:
            line = proc.stdout.readline()
            assert line, f"writer died early: {proc.stderr.read().decode()}"
            printed.append(line.decode().strip())
        os.kill(proc.pid, signal.SIGKILL)  # while it is still writing
        rest = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # A last line cut short by the kill was never acknowledged as a whole id: keep full lines only.
    printed += [s for s in rest.split("\n")[:-1] if s]
    with Ledger(db, "cell-k") as ledger:
        assert ledger.integrity_check() == ["ok"]
        stored = {a.attempt_id: a for a in ledger.attempts()}
        for aid in printed:
            a = stored[aid]  # every acknowledged id is there ...
            i = int(aid.split("-")[1])
            rng = np.random.default_rng(i)
            np.testing.assert_array_equal(a.patch, rng.normal(size=(2, 32, 32)).astype(np.float32))
            np.testing.assert_array_equal(a.features, rng.normal(size=8).astype(np.float32))
            assert a.outcome.success == (i % 3 != 0) and a.robot_time == float(i)  # ... and intact
        # At most the one attempt in flight at the kill may be stored without having been printed.
        assert len(stored) - len(printed) in (0, 1)
        # A restart replaying the last acknowledged attempt adds no duplicate row.
        g = Grasp("suction", [0.1, 0.2, 0.3], [0, 0, 0, 1])
        n = ledger.counts()["attempts"]
        replay = dict(
            attempt_id=printed[-1], plan_id=None, candidate_index=None, grasp=g,
            outcome=Outcome(True, Reason.OK, g), decided_by="model", model_version="v1", robot_time=0.0,
        )  # fmt: skip
        assert ledger.record_attempt(**replay) is False
        assert ledger.counts()["attempts"] == n


# --- CLI -------------------------------------------------------------------------------------------


def pickcell_main(argv: list[str]) -> int:
    """`pickcell <argv>` with only the ledger commands registered (as pickcell.cli registers them), so
    this test does not depend on the other packages' command modules."""
    parser = argparse.ArgumentParser(prog="pickcell")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_stats_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(9)
    db = tmp_path / "cell.db"
    with Ledger(db, "cell-cli") as ledger:
        for i in range(5):
            ledger.record_attempt(**attempt_kwargs(rng, i, success=i % 2 == 0))
    assert pickcell_main(["ledger", "stats", "--db", str(db), "--json", "--check"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["cell_id"] == "cell-cli" and stats["attempts"] == 5 and stats["successes"] == 3
    assert stats["integrity"] == ["ok"]

    assert pickcell_main(["ledger", "export", "--db", str(db), "--out", str(tmp_path / "ds"), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["rows"] == 5 and manifest["positives"] == 3
    assert verify_export(tmp_path / "ds") == []

    # A mistyped path is an error and creates nothing.
    assert pickcell_main(["ledger", "stats", "--db", str(tmp_path / "typo.db")]) == 1
    assert "no ledger" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()
    # Exporting into a directory that already holds a dataset is refused.
    assert pickcell_main(["ledger", "export", "--db", str(db), "--out", str(tmp_path / "ds")]) == 1
    assert "not an empty directory" in capsys.readouterr().err


def test_a_pickled_array_in_the_file_is_refused_not_unpickled(tmp_path: Path) -> None:
    import io

    db = tmp_path / "cell.db"
    with Ledger(db, "cell-1") as ledger:
        ledger.record_attempt(**attempt_kwargs(np.random.default_rng(10), 1))
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)  # what a tampered row holds
    conn = sqlite3.connect(db)
    conn.execute("UPDATE attempts SET patch=?", (buf.getvalue(),))
    conn.commit()
    conn.close()
    with Ledger(db, "cell-1") as ledger, pytest.raises(ValueError, match="unpickling"):
        ledger.attempts()
