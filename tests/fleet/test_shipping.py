"""Ledger rows reach the learner exactly once, over real sockets, through SIGKILLs of either side."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
from fleetrig import wait_for

from grasping.types import Candidate, Frame, Grasp, Outcome, Plan, Reason
from hitl.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]
C, S, F = 2, 32, 8


def fill(ledger: Ledger, rng: np.random.Generator, start: int, n: int) -> None:
    """n plans of 3 candidates (every 10th with its frame), each followed by an attempt."""
    for i in range(start, start + n):
        cands = tuple(
            Candidate(
                Grasp("suction", rng.uniform(-0.3, 0.3, 3), np.array([0, 0, 0, 1.0])),
                float(rng.uniform()),
                p_success=float(rng.uniform()),
            )
            for _ in range(3)
        )
        plan = Plan(
            cands,
            "pick",
            frame_id=f"f{i}",
            model_version="v1",
            patches=rng.normal(size=(3, C, S, S)).astype(np.float32),
            features=rng.normal(size=(3, F)).astype(np.float32),
        )
        frame = Frame(
            rng.uniform(0.5, 1, (24, 32)).astype(np.float32),
            np.zeros((24, 32, 3), np.uint8),
            np.array([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]]),
            np.eye(4),
            float(i),
            f"f{i}",
        )
        pid = ledger.record_plan(plan, tote_id=f"t{i // 10}", frame=frame, store_frame=i % 10 == 0)
        ok = bool(rng.uniform() < 0.8)
        g = cands[0].grasp
        ledger.record_attempt(
            attempt_id=f"a{i}",
            plan_id=pid,
            candidate_index=0,
            grasp=g,
            outcome=Outcome(ok, Reason.OK if ok else Reason.SEAL_FAILED, g, 3.0),
            decided_by="model",
            model_version="v1",
            robot_time=float(i),
        )


def table_rows(path: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = {}
        for t in ("plans", "candidates", "frames", "attempts"):
            out[t] = sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
        return out
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pickcell(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pickcell", "fleet", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def replica_rows(path: Path) -> int:
    """Rows the replica holds in the four tables (0 before it exists)."""
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return sum(
                conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("plans", "candidates", "frames", "attempts")
            )
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_shipping_survives_sigkill_of_either_side_with_no_row_lost_or_duplicated(fleet_dir, tmp_path) -> None:
    rng = np.random.default_rng(7)
    ledger_path = tmp_path / "cell" / "ledger.sqlite"
    ledger_path.parent.mkdir()
    ledger = Ledger(ledger_path, cell_id="cell-1")
    fill(ledger, rng, 0, 150)
    out = tmp_path / "intake"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    replica = out / "site-7" / "cell-1.sqlite"
    intake_args = ("intake", "--out", str(out), "--bind", endpoint, "--keys", str(fleet_dir / "keys"))
    ship_args = (
        "ship",
        "--ledger",
        str(ledger_path),
        "--cell",
        "cell-1",
        "--site",
        "site-7",
        "--to",
        endpoint,
        "--keys",
        str(fleet_dir / "cells" / "cell-1"),
        "--batch-rows",
        "4",
    )
    procs: list[subprocess.Popen] = []
    try:
        intake = pickcell(*intake_args)
        ship = pickcell(*ship_args)
        procs += [intake, ship]
        wait_for(lambda: replica_rows(replica) > 0, 60, "first rows at the learner")
        ship.send_signal(signal.SIGKILL)  # the cell's shipper dies mid-stream
        ship.wait()
        fill(ledger, rng, 150, 30)  # the cell keeps working meanwhile
        ship = pickcell(*ship_args)
        procs.append(ship)
        wait_for(lambda: replica_rows(replica) > 200, 60, "shipping resumed")
        intake.send_signal(signal.SIGKILL)  # the learner's side dies mid-stream
        intake.wait()
        fill(ledger, rng, 180, 30)  # the cell keeps working while the learner is down
        intake = pickcell(*intake_args)
        procs.append(intake)
        total = 210 * 5 + 21  # plans, 3 candidates and an attempt each, 21 frames
        wait_for(lambda: replica_rows(replica) == total, 90, "every row at the learner")
        ledger.close()
        src, dst = table_rows(ledger_path), table_rows(replica)
        for t in src:
            assert len(dst[t]) == len(src[t]), t  # none lost, none twice
            assert dst[t] == src[t], t  # and byte for byte the same
        assert len(src["frames"]) == 21
        conn = sqlite3.connect(replica)
        assert conn.execute("SELECT value FROM meta WHERE key='site'").fetchone()[0] == "site-7"
        assert {r[0] for r in conn.execute("SELECT DISTINCT cell_id FROM attempts")} == {"cell-1"}
        conn.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)


def test_a_key_cannot_ship_rows_as_another_cell(fleet_dir, tmp_path) -> None:
    from fleet.shipping import IntakeConfig, LedgerIntake

    intake = LedgerIntake(IntakeConfig(tmp_path / "in", "tcp://127.0.0.1:0", fleet_dir / "keys")).start()
    try:
        reply = intake.handle("cell-2", {"t": "hello", "cell": "cell-1", "site": "s"})
        assert reply["t"] == "error" and "cell-2" in reply["error"]
        gap = intake.handle(
            "cell-2",
            {
                "t": "batch",
                "cell": "cell-2",
                "site": "s",
                "from": {"plans": 10},
                "to": {"plans": 12},
                "rows": {"plans": []},
            },
        )
        assert gap["t"] == "cursor" and gap["cursor"] == {}  # a batch past the cursor is refused
    finally:
        intake.stop()


def test_a_clean_stop_ships_what_is_left_first(fleet_dir, tmp_path) -> None:
    from fleet.shipping import IntakeConfig, LedgerIntake, LedgerShipper, ShipConfig

    ledger_path = tmp_path / "ledger.sqlite"
    ledger = Ledger(ledger_path, cell_id="cell-1")
    fill(ledger, np.random.default_rng(3), 0, 40)
    ledger.close()
    intake = LedgerIntake(IntakeConfig(tmp_path / "in", "tcp://127.0.0.1:0", fleet_dir / "keys")).start()
    try:
        shipper = LedgerShipper(
            ShipConfig(ledger_path, "cell-1", intake.endpoint, fleet_dir / "cells" / "cell-1", batch_rows=3)
        ).start()
        shipper.stop(drain_s=60.0)
        assert shipper.pending_rows() == 0
        assert replica_rows(tmp_path / "in" / "site-1" / "cell-1.sqlite") == 40 * 5 + 4
    finally:
        intake.stop()
