"""The cell daemon as an operator runs it: signals, restarts, metrics, model hot-swap, broker outages."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cellrig import ScriptedAssociate, ScriptedPlanner, add_carton, wait_for

from arm.daemon import CellDaemon, send_control
from hitl.broker import Broker, BrokerConfig
from hitl.client import AssistClient
from hitl.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]


def _start_cell(data: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pickcell", "cell", "run", "--data", str(data), "--broker", "none"]
    cmd += ["--planner", "analytic", "--objects-per-tote", "3", "--metrics-port", "0", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _attempts(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT count(*) FROM attempts").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _read_until(proc: subprocess.Popen, pattern: str, timeout_s: float) -> re.Match:
    end = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r}; output was:\n{''.join(seen)}")


def test_sigterm_finishes_the_motion_flushes_the_ledger_and_exits_0(tmp_path):
    data = tmp_path / "cell"
    proc = _start_cell(data, "--log-json")
    try:
        m = _read_until(proc, r"metrics on (http://\S+)", 60)
        wait_for(lambda: _attempts(data / "ledger.sqlite") >= 1, 120, "a first attempt in the ledger")
        # /metrics is live while the cell works
        body = urllib.request.urlopen(m.group(1), timeout=5).read().decode()
        assert "pickcell_pick_attempts_total" in body and "pickcell_plan_latency_seconds_bucket" in body
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopped:" in out
    # structured logs: one JSON object per line, the SIGTERM among them
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("signal 15" in r["msg"] and r["level"] == "warning" for r in logs)
    led = Ledger(data / "ledger.sqlite")
    assert led.integrity_check() == ["ok"]
    n = led.counts()["attempts"]
    assert n >= 1
    led.close()


def test_restart_after_sigkill_resumes_without_duplicates(tmp_path):
    data = tmp_path / "cell"
    proc = _start_cell(data)
    try:
        wait_for(lambda: _attempts(data / "ledger.sqlite") >= 1, 120, "a first attempt")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = Ledger(data / "ledger.sqlite")
    totes_before = before.tote_ids()
    n_before = before.counts()["attempts"]
    assert before.integrity_check() == ["ok"]
    before.close()

    proc = _start_cell(data, "--totes", "1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"from tote {len(totes_before)}" in out
    after = Ledger(data / "ledger.sqlite")
    totes_after = after.tote_ids()
    assert totes_after[: len(totes_before)] == totes_before
    assert len(totes_after) == len(totes_before) + 1  # a new tote, not a replay of the old one
    assert after.counts()["attempts"] > n_before
    with sqlite3.connect(data / "ledger.sqlite") as c:
        dup = c.execute("SELECT count(*) - count(DISTINCT attempt_id) FROM attempts").fetchone()[0]
    assert dup == 0
    after.close()


def test_bad_model_file_is_refused_and_the_running_planner_keeps_working(stack_factory, tmp_path):
    from sim.stack import model_planner_factory

    st = stack_factory()
    add_carton(st)
    original = st.controller.planner
    daemon = CellDaemon(
        st.controller,
        st.feed,
        data_dir=tmp_path / "cell",
        planner_factory=model_planner_factory(st.cell.tote_bounds),
        totes=1,
    )
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x80\x04not a model at all" * 10)
    ok, message = daemon.reload_model(bad)
    assert not ok and "broken.safetensors" in message
    assert st.controller.planner is original and daemon.stats.model_refusals == 1
    # over the control socket too, while the daemon runs
    t = __import__("threading").Thread(target=daemon.run, kwargs={"install_signal_handlers": False})
    st.feed.next_tote = lambda: "t0"  # keep the hand-built tote (one carton)
    t.start()
    try:
        reply = wait_for(lambda: _try_control(tmp_path / "cell", bad), 30, "the control socket")
        assert reply["ok"] is False and "broken.safetensors" in reply["message"]
    finally:
        t.join(timeout=120)
    assert daemon.stats.picks == 1  # the cell kept picking with the model it had


def _try_control(data: Path, path: Path):
    try:
        return send_control(data, "reload-model", timeout_s=1.0, path=str(path))
    except TimeoutError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_broker_does_not_stop_the_cell(stack_factory, tmp_path):
    """No broker: the cell picks what it is sure of, lets its questions expire, and later reconnects."""
    from hitl.keys import ClientKeys, allow, load_public, new_keypair

    keys = tmp_path / "keys"
    new_keypair("broker", keys)
    for n, role in (("cell-1", "cell"), ("alice", "associate")):
        new_keypair(n, keys, role=role)
        allow(keys / f"{n}.key", keys)  # into keys/allowed/ROLE/
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    server = load_public(keys / "broker.key")
    client = AssistClient(endpoint, "cell-1", ClientKeys.from_file(keys / "cell-1.key_secret"), server)
    client.start()
    st = stack_factory(assist_deadline_s=5.0)
    left = add_carton(st, dy=-0.12)
    add_carton(st, dy=+0.12)
    y_left = st.cell.item_pose(left)[0][1]
    st.controller.planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: abs(c[1] - y_left) < 0.05)
    st.controller.assist = client
    try:
        rep = st.controller.run_tote("t0")
        assert not client.connected
        assert [a.decided_by for a in rep.attempts] == ["model"]  # the sure item was still picked
        assert rep.assists_requested == 1 and rep.assists_expired == 1
        assert rep.status == "diverted" and st.feed.diverted  # the unsure item went to exception handling

        # The broker comes up on that address: the same client reconnects and the next question is answered.
        broker = Broker(BrokerConfig(bind=endpoint, data_dir=tmp_path / "broker", keys_dir=keys))
        broker.start()
        from hitl.associate import AssociateClient

        person = ScriptedAssociate(
            AssociateClient(
                endpoint, ClientKeys.from_file(keys / "alice.key_secret"), server_public_key=server
            ),
            lambda req: ("approve", 0, None),
        )
        try:
            wait_for(lambda: client.connected, 40, "the cell to reconnect after the broker came up")
            # 120 s of robot time = at least 24 s of wall time at 0.25 s robot per 0.05 s wall poll:
            # with 30 s (6 s of wall time) the answer arrived after the deadline once on a loaded
            # 2-core machine (broker, associate and cell threads share the GIL with the physics).
            st.controller.config = type(st.controller.config)(
                **{**st.controller.config.__dict__, "assist_deadline_s": 120.0, "wall_poll_s": 0.05}
            )
            add_carton(st, dy=-0.12)  # the first tote went to exception handling; a new one arrives
            rep2 = st.controller.run_tote("t1")
        finally:
            person.close()
            broker.stop()
        assert rep2.assists_answered == 1
        # A late answer the broker refused (the first tote's question, submitted again on reconnect
        # and cancelled) is the only kind the person may have met; they went on to the next one.
        assert all("already" in why for _, why in person.refused), person.refused
        assert [a.decided_by for a in rep2.attempts] == ["associate:alice"]
    finally:
        client.close()


def test_a_verified_model_dropped_into_the_models_folder_is_swapped_in_between_picks(stack_factory, tmp_path):
    import dataclasses
    import shutil
    import threading

    from sim.stack import DEFAULT_MODEL, model_planner_factory

    st = stack_factory()
    # The test holds the planner until the swap: plan after each place, not during it (a plan made
    # while placing by a swapped-out model is discarded: tests/arm/test_lookahead.py).
    st.controller.config = dataclasses.replace(st.controller.config, plan_while_placing=False)
    add_carton(st, dy=-0.1)
    add_carton(st, dy=0.1)
    data = tmp_path / "cell"
    daemon = CellDaemon(
        st.controller,
        st.feed,
        data_dir=data,
        planner_factory=model_planner_factory(st.cell.tote_bounds),
        totes=1,
        watch_interval_s=0.05,
    )
    versions = []
    st.controller.on_attempt = lambda att, plan: versions.append(plan.model_version)
    st.feed.next_tote = lambda: "t0"  # keep the hand-built tote
    original_planner = st.controller.planner

    def drop_model_after_first_pick():
        wait_for(lambda: versions, 60, "the first pick")
        shutil.copy(DEFAULT_MODEL, data / "models" / "new.safetensors")
        shutil.copy(str(DEFAULT_MODEL) + ".sha256", data / "models" / "new.safetensors.sha256")

    # Hold the cell after its first pick until the new model is in, so the swap lands between picks.
    inner = st.controller.planner

    def gated(frame):
        if versions and daemon.stats.model_reloads == 0:
            wait_for(lambda: daemon.stats.model_reloads, 30, "the swap")
        return (st.controller.planner if st.controller.planner is not gated else inner)(frame)

    st.controller.planner = gated
    t = threading.Thread(target=drop_model_after_first_pick)
    t.start()
    daemon.run(install_signal_handlers=False)
    t.join(timeout=5)
    from grasping.modelfile import load_model

    shipped = load_model(DEFAULT_MODEL).version
    assert daemon.stats.model_reloads == 1 and daemon.stats.model_refusals == 0
    assert daemon.stats.model_version == shipped
    assert st.controller.planner is not gated and st.controller.planner is not original_planner
    assert versions[0] == "analytic" and versions[-1] == shipped  # later picks used the new model
