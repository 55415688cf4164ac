"""A simulated cell daemon on the fleet: the fleet's version swapped in between picks, the challenger
shadow-scoring every plan, status reported, and a tampered file refused while the cell keeps picking."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from fleetrig import make_version, wait_for

from arm.controller import ControllerConfig
from arm.daemon import CellDaemon
from fleet.cell import LinkConfig
from fleet.celllink import CellFleet
from fleet.service import send_control
from grasping.registry import ModelRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "arm"))
from cellrig import add_carton  # noqa: E402


def test_a_daemon_runs_the_fleets_version_shadows_the_challenger_and_refuses_a_tampered_file(
    fleet_dir, service, tmp_path
) -> None:
    from sim.stack import build_sim_stack, model_planner_factory

    models = tmp_path / "models"
    models.mkdir()
    assert send_control(fleet_dir, "publish", path=str(make_version("fleet-v1", models)), force=True)["ok"]
    reply = send_control(
        fleet_dir,
        "publish",
        path=str(make_version("fleet-v2", models)),
        force=True,
        stage="shadow",
        cells=["cell-1"],
    )
    assert reply["ok"], reply
    st = build_sim_stack(
        catalog="procedural",
        objects_per_tote=1,
        seed=0,
        planner="learned",
        controller_config=ControllerConfig(
            cell_id="cell-1", max_attempts_per_tote=6, wall_poll_s=0.0, idle_step_s=0.25
        ),
    )
    try:
        add_carton(st, dy=-0.1)
        add_carton(st, dy=0.1)
        data = tmp_path / "cell"
        fleet = CellFleet(
            LinkConfig(
                "cell-1",
                service.router_endpoint,
                service.pub_endpoint,
                data,
                fleet_dir / "cells" / "cell-1",
                heartbeat_s=0.2,
                status_interval_s=0.2,
            )
        )
        daemon = CellDaemon(
            st.controller,
            st.feed,
            data_dir=data,
            planner_factory=model_planner_factory(st.cell.tote_bounds),
            totes=1,
            fleet=fleet,
        )
        st.feed.next_tote = lambda: "t0"  # keep the hand-built tote
        versions: list[str] = []
        st.controller.on_attempt = lambda att, plan: versions.append(plan.model_version)
        tampered = threading.Event()

        def tamper_after_first_pick() -> None:
            wait_for(lambda: versions, 120, "the first pick")
            assert send_control(fleet_dir, "rollback", reason="end shadow")["ok"]
            reg = ModelRegistry(fleet_dir / "registry")
            entry = reg.add(make_version("fleet-v3", models))
            f = reg.root / entry.file
            raw = bytearray(f.read_bytes())
            raw[100] ^= 0x01
            f.write_bytes(bytes(raw))
            assert send_control(
                fleet_dir, "publish", path="fleet-v3", force=True, stage="canary", cells=["cell-1"]
            )["ok"]
            wait_for(lambda: fleet.link.refused, 30, "the refusal")
            tampered.set()

        inner = st.controller.planner

        def gated(frame):
            # The first plan waits for the fleet's model and the shadow; the second for the refusal.
            if not versions:
                wait_for(
                    lambda: daemon.stats.model_version == "fleet-v1" and fleet.challenger is not None,
                    60,
                    "fleet-v1 and its shadow",
                )
            else:
                tampered.wait(60)
            planner = st.controller.planner
            return (inner if planner is gated else planner)(frame)

        st.controller.planner = gated
        t = threading.Thread(target=tamper_after_first_pick)
        t.start()
        daemon.run(install_signal_handlers=False)
        t.join(timeout=60)
    finally:
        st.close()
    assert versions == [
        "fleet-v1",
        "fleet-v1",
    ]  # both picks by the fleet's version, the second after the refusal
    assert daemon.stats.picks == 2
    assert "sha256" in fleet.link.refused[-1]["reason"] and fleet.link.refused[-1]["version"] == "fleet-v3"
    assert not (data / "fleet" / "models" / "fleet-v3.safetensors").exists()
    log = [json.loads(s) for s in (data / "fleet" / "shadow.jsonl").read_text().splitlines()]
    outcome = [e for e in log if e["kind"] == "outcome"]
    assert outcome and outcome[0]["challenger"] == "fleet-v2" and 0.0 <= outcome[0]["challenger_p"] <= 1.0
    s = fleet.status()
    assert s["counts"]["fleet-v1"]["picks"] == 2 and s["picks_per_hour"] > 0
    cells = send_control(fleet_dir, "status")["cells"]
    assert cells["cell-1"]["model_version"] == "fleet-v1"
    # The daemon's last word to the fleet: it stopped (sent as it shut down).
    wait_for(
        lambda: send_control(fleet_dir, "status")["cells"]["cell-1"]["state"] == "stopped", 10, "stopped"
    )
