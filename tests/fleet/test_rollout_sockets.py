"""The fleet service and its cells over real ZeroMQ sockets with CURVE on loopback."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetrig import RecordingCell, make_version, wait_for

from fleet import signing
from fleet.service import send_control
from grasping.registry import ModelRegistry


def start_cells(fleet_dir, service, tmp_path, names) -> dict[str, RecordingCell]:
    cells = {n: RecordingCell(fleet_dir, n, service, tmp_path / "cells") for n in names}
    for c in cells.values():
        c.link.start()
    return cells


def stop_cells(cells) -> None:
    for c in cells.values():
        c.link.stop()


def publish(fleet_dir, path_or_version, **kw) -> dict:
    reply = send_control(fleet_dir, "publish", path=str(path_or_version), force=True, **kw)
    assert reply["ok"], reply
    return reply


def test_an_offline_cell_catches_up_on_reconnect(fleet_dir, service, tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    publish(fleet_dir, make_version("v1", models))
    cells = start_cells(fleet_dir, service, tmp_path, ["cell-1", "cell-2", "cell-3"])
    try:
        wait_for(lambda: all(c.running == "v1" for c in cells.values()), what="v1 everywhere")
        cells["cell-3"].link.disconnect()
        wait_for(lambda: not cells["cell-3"].link.online.is_set(), what="cell-3 offline")
        publish(fleet_dir, make_version("v2", models), stage="canary", cells=["cell-1"])
        wait_for(lambda: cells["cell-1"].running == "v2", what="canary on cell-1")
        assert send_control(fleet_dir, "promote", force=True)["ok"]
        wait_for(lambda: cells["cell-2"].running == "v2", what="v2 on cell-2")
        assert cells["cell-3"].running == "v1"  # it was offline for both updates
        snapshots_before = cells["cell-3"].link.snapshots
        cells["cell-3"].link.reconnect()
        wait_for(lambda: cells["cell-3"].running == "v2", what="cell-3 caught up")
        assert cells["cell-3"].link.snapshots > snapshots_before  # caught up by a fresh snapshot
        assert cells["cell-3"].loaded == ["v1", "v2"]
        assert ModelRegistry(fleet_dir / "registry").current_version() == "v2"
    finally:
        stop_cells(cells)


def test_a_cell_resumes_a_download_cut_in_the_middle(fleet_dir, service, tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    publish(fleet_dir, make_version("v1", models))
    cell = RecordingCell(fleet_dir, "cell-1", service, tmp_path / "cells")
    # Half a file left over from an earlier, interrupted download of v1 (correct bytes).
    part = cell.link.models_dir / "v1.safetensors.part"
    src = (fleet_dir / "registry" / "models" / "v1.safetensors").read_bytes()
    part.write_bytes(src[: len(src) // 2])
    cell.link.start()
    try:
        wait_for(lambda: cell.running == "v1", what="v1")
        assert (cell.link.models_dir / "v1.safetensors").read_bytes() == src
    finally:
        cell.link.stop()


def test_bad_hash_and_bad_signature_are_refused_and_the_running_model_stays(
    fleet_dir, service, tmp_path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    publish(fleet_dir, make_version("v1", models))
    cells = start_cells(fleet_dir, service, tmp_path, ["cell-1", "cell-2"])
    reg = ModelRegistry(fleet_dir / "registry")
    try:
        wait_for(lambda: all(c.running == "v1" for c in cells.values()), what="v1 everywhere")
        # A file changed on the fleet's disk after it was registered: the announced sha256 is the
        # registry's, the bytes served are not.
        entry = reg.add(make_version("v2", models))
        f = reg.root / entry.file
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        publish(fleet_dir, "v2", stage="canary", cells=["cell-1", "cell-2"])
        wait_for(lambda: all(c.link.refused for c in cells.values()), what="refusals")
        # A cell that reconnects while the refused version is still assigned does not take it either.
        link = cells["cell-2"].link
        before = link.snapshots
        link.disconnect()
        wait_for(lambda: not link.online.is_set(), what="cell-2 offline")
        link.reconnect()
        wait_for(lambda: link.snapshots > before, what="cell-2's new snapshot")
        for c in cells.values():
            assert "sha256" in c.link.refused[-1]["reason"]
            assert (
                c.running == "v1" and c.loaded == ["v1"] and c.handed == ["v1"]
            )  # never offered to the loader
            assert not (c.link.models_dir / "v2.safetensors").exists()
        assert send_control(fleet_dir, "rollback", reason="bad file")["ok"]

        # Right bytes, signed by a key that is not the fleet's.
        entry = reg.add(make_version("v3", models))
        f = reg.root / entry.file
        rogue = Ed25519PrivateKey.generate()
        sig = signing.sign(rogue, "v3", entry.sha256, f.stat().st_size)
        Path(str(f) + ".sig").write_text(sig.hex())
        publish(fleet_dir, "v3", stage="canary", cells=["cell-1"])
        wait_for(lambda: len(cells["cell-1"].link.refused) >= 2, what="signature refusal")
        assert "signature" in cells["cell-1"].link.refused[-1]["reason"]
        assert cells["cell-1"].running == "v1" and cells["cell-1"].handed == ["v1"]
        wait_for(
            lambda: any(
                r["version"] == "v3" for r in send_control(fleet_dir, "status")["cells"]["cell-1"]["refused"]
            ),
            what="the refusal reported to the fleet",
        )
    finally:
        stop_cells(cells)


def test_a_regressing_canary_is_rolled_back_automatically(fleet_dir, service, tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    publish(fleet_dir, make_version("v1", models))
    cells = start_cells(fleet_dir, service, tmp_path, ["cell-1", "cell-2", "cell-3", "cell-4"])
    try:
        wait_for(lambda: all(c.running == "v1" for c in cells.values()), what="v1 everywhere")
        good = {"picks": 300, "auto_attempts": 300, "auto_success": 294, "auto_picks": 280, "items_done": 300}
        for name in ("cell-2", "cell-3", "cell-4"):
            cells[name].counts = {"v1": good}
        publish(fleet_dir, make_version("v2", models), stage="canary", cells=["cell-1"])
        wait_for(lambda: cells["cell-1"].running == "v2", what="canary running")
        # The canary picks worse: 80% precision against the live model's 98%.
        cells["cell-1"].counts = {
            "v2": {
                "picks": 150,
                "auto_attempts": 150,
                "auto_success": 120,
                "auto_picks": 110,
                "items_done": 160,
            }
        }
        wait_for(lambda: cells["cell-1"].running == "v1", what="automatic rollback on cell-1")
        verdicts = [json.loads(s) for s in (fleet_dir / "verdicts.jsonl").read_text().splitlines()]
        last = verdicts[-1]
        assert last["action"] == "rollback" and last["automatic"] and last["version"] == "v2"
        assert last["verdict"]["verdict"] == "fail" and "auto_precision" in last["reason"]
        status = send_control(fleet_dir, "status")
        assert status["rollout"]["candidate"] is None and status["rollout"]["live"] == "v1"
        assert cells["cell-1"].loaded == ["v1", "v2", "v1"]
    finally:
        stop_cells(cells)


def test_a_canary_that_holds_up_passes_and_is_promoted(fleet_dir, service, tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    publish(fleet_dir, make_version("v1", models))
    cells = start_cells(fleet_dir, service, tmp_path, ["cell-1", "cell-2"])
    try:
        wait_for(lambda: all(c.running == "v1" for c in cells.values()), what="v1")
        publish(fleet_dir, make_version("v2", models), stage="canary", cells=["cell-1"])
        refused = send_control(fleet_dir, "promote")
        assert not refused["ok"] and "collecting" in refused["error"]  # no picks seen yet
        same = {
            "picks": 2000,
            "auto_attempts": 2000,
            "auto_success": 1960,
            "auto_picks": 1900,
            "items_done": 2000,
        }
        cells["cell-2"].counts = {"v1": same}
        cells["cell-1"].counts = {"v2": same}
        wait_for(lambda: send_control(fleet_dir, "status")["verdict"]["verdict"] == "pass", what="pass")
        assert send_control(fleet_dir, "promote")["ok"]
        wait_for(lambda: all(c.running == "v2" for c in cells.values()), what="v2 everywhere")
    finally:
        stop_cells(cells)


def test_shadow_runs_the_challenger_beside_the_live_model_only_on_named_cells(
    fleet_dir, service, tmp_path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    publish(fleet_dir, make_version("v1", models))
    cells = start_cells(fleet_dir, service, tmp_path, ["cell-1", "cell-2"])
    try:
        wait_for(lambda: all(c.running == "v1" for c in cells.values()), what="v1")
        publish(fleet_dir, make_version("v2", models), stage="shadow", cells=["cell-1"])
        wait_for(lambda: cells["cell-1"].link.shadow_version == "v2", what="shadow on cell-1")
        assert cells["cell-1"].running == "v1"  # decisions still the live model's
        assert cells["cell-2"].link.shadow_version is None
        # The challenger would have done worse on the executed attempts: the shadow stage fails.
        cells["cell-1"].shadow_report = {
            "version": "v2",
            "live": {
                "picks": 200,
                "auto_attempts": 200,
                "auto_success": 196,
                "auto_picks": 190,
                "items_done": 200,
            },
            "challenger": {
                "picks": 200,
                "auto_attempts": 180,
                "auto_success": 140,
                "auto_picks": 140,
                "items_done": 200,
            },
        }
        wait_for(lambda: cells["cell-1"].link.shadow_version is None, what="shadow ended")
        assert send_control(fleet_dir, "status")["last_verdict"]["action"] == "rollback"
    finally:
        stop_cells(cells)


def test_a_manual_rollback_reaches_every_cell(fleet_dir, service, tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    publish(fleet_dir, make_version("v1", models))
    cells = start_cells(fleet_dir, service, tmp_path, ["cell-1", "cell-2", "cell-3", "cell-4"])
    try:
        wait_for(lambda: all(c.running == "v1" for c in cells.values()), what="v1")
        publish(fleet_dir, make_version("v2", models), stage="canary", cells=["cell-1"])
        assert send_control(fleet_dir, "promote", force=True)["ok"]
        wait_for(lambda: all(c.running == "v2" for c in cells.values()), what="v2 everywhere")
        reply = send_control(fleet_dir, "rollback", reason="operator: jams at site 2")
        assert reply["ok"] and reply["to"] == "v1"
        wait_for(lambda: all(c.running == "v1" for c in cells.values()), what="v1 back everywhere")
        assert set(service.kv) == {"rollout", "model/v1"}  # v2 left the store (a snapshot stays small)
        wait_for(
            lambda: all(set(c.link.kv) == {"rollout", "model/v1"} for c in cells.values()), what="deletes"
        )
        assert ModelRegistry(fleet_dir / "registry").current_version() == "v1"
        assert all(c.loaded == ["v1", "v2", "v1"] for c in cells.values())
    finally:
        stop_cells(cells)


def test_a_gated_version_from_the_learner_is_published_without_force(fleet_dir, service, tmp_path) -> None:
    from dataclasses import dataclass

    from grasping.modelfile import file_sha256

    @dataclass(frozen=True)
    class Report:  # what the registry stores of a gate report (grasping.learning.GateReport's shape)
        passed: bool
        candidate_sha256: str

        def to_json(self) -> dict:
            return {"passed": self.passed, "candidate_sha256": self.candidate_sha256}

    models = tmp_path / "models"
    models.mkdir()
    reg = ModelRegistry(fleet_dir / "registry")  # the registry the learner writes to
    for v, ok in (("g1", True), ("g2", False)):
        f = make_version(v, models)
        reg.add(f, gate_report=Report(ok, file_sha256(f)))
    assert send_control(fleet_dir, "publish", path="g1")["ok"]
    reply = send_control(fleet_dir, "publish", path="g2", cells=["cell-1"])
    assert not reply["ok"] and "failed its gate" in reply["error"]
    assert send_control(fleet_dir, "status")["rollout"] == {
        "live": "g1",
        "candidate": None,
        "stage": None,
        "cells": [],
        "generation": 1,
    }


def test_bad_input_gets_a_clear_error_and_the_service_keeps_serving(fleet_dir, service, tmp_path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x80\x04 a pickle, not a model" * 20)
    reply = send_control(fleet_dir, "publish", path=str(bad), force=True)
    assert not reply["ok"] and "broken.safetensors" in reply["error"]
    reply = send_control(fleet_dir, "publish", path="no-such-version", force=True)
    assert not reply["ok"] and "no-such-version" in reply["error"]
    assert not send_control(fleet_dir, "frobnicate")["ok"]
    publish(fleet_dir, make_version("v1", tmp_path))
    reply = send_control(
        fleet_dir, "publish", path=str(make_version("v2", tmp_path)), force=True, cells=["cel-1"]
    )
    assert not reply["ok"] and "unknown cells ['cel-1']" in reply["error"]  # a typo does not shadow on nobody
    # Garbage and unknown messages on the cells' socket get an error reply, not a dead service.
    import zmq

    from fleet.net import ClientSecurity, pack, unpack

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    ClientSecurity(fleet_dir / "cells" / "cell-1", "cell-1").apply(s)
    s.connect(service.router_endpoint)
    try:
        for raw in (
            b"\xc1 not msgpack",
            pack({"t": "launch"}),
            pack({"t": "fetch", "version": "nope"}),
            pack({"t": "fetch", "version": 3, "offset": "x"}),
        ):
            s.send(raw)
            assert s.poll(10000)
            assert unpack(s.recv())["t"] == "error"
    finally:
        s.close(0)
    assert send_control(fleet_dir, "status")["ok"]


def test_cells_follow_a_restarted_service(fleet_dir, tmp_path) -> None:
    import socket

    from fleetrig import fast_rules

    from fleet.service import FleetService, ServiceConfig

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    cfg = ServiceConfig(
        fleet_dir, router=f"tcp://127.0.0.1:{port()}", pub=f"tcp://127.0.0.1:{port()}", rollout=fast_rules()
    )
    models = tmp_path / "models"
    models.mkdir()
    svc = FleetService(cfg).start()
    cells = start_cells(fleet_dir, svc, tmp_path, ["cell-1", "cell-2"])
    try:
        publish(fleet_dir, make_version("v1", models))
        wait_for(lambda: all(c.running == "v1" for c in cells.values()), what="v1")
        svc.stop()  # the service goes away; the cells keep running v1
        svc = FleetService(cfg).start()  # same folder: the rollout state comes back from rollout.json
        assert svc.state["live"] == "v1"
        publish(fleet_dir, make_version("v2", models), stage="canary", cells=["cell-2"])
        assert send_control(fleet_dir, "promote", force=True)["ok"]
        # The new service numbers its updates from scratch under a new epoch: the cells take a snapshot.
        wait_for(lambda: all(c.running == "v2" for c in cells.values()), what="v2 from the restarted service")
        assert all(c.loaded == ["v1", "v2"] for c in cells.values())
    finally:
        stop_cells(cells)
        svc.stop()


def test_cell_state_comes_from_the_arm_the_controller_and_the_assist_client(tmp_path) -> None:
    from types import SimpleNamespace

    from fleet.cell import LinkConfig
    from fleet.celllink import CellFleet

    fleet = CellFleet(LinkConfig("cell-1", "", "", tmp_path, None), connect=False)
    assert fleet.state() == "starting"
    arm = SimpleNamespace(stopped=False)
    assist = SimpleNamespace(pending=0)
    ctl = SimpleNamespace(arm=arm, assist=assist, stopping=False, on_attempt=None)
    fleet.start(SimpleNamespace(controller=ctl, stats=SimpleNamespace(model_version="v1")))
    assert fleet.status()["state"] == "picking"
    assist.pending = 2
    assert fleet.status()["state"] == "waiting_for_person" and fleet.status()["assists_waiting"] == 2
    arm.stopped = True
    assert fleet.state() == "protective_stop"
    arm.stopped, ctl.stopping = False, True
    assert fleet.state() == "stopped"
