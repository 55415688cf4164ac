"""The daemon's protective stop over its real control socket: `estop` holds the arm and the item
mid-transit; nothing but `clear-stop` releases it; the place then finishes."""

from __future__ import annotations

import threading

import numpy as np
import pybullet as p
from cellrig import ScriptedPlanner, add_carton, wait_for

from arm.daemon import CellDaemon, send_control


def test_estop_over_the_control_socket_holds_mid_transit_until_clear_stop(stack_factory, tmp_path):
    st = stack_factory()
    body = add_carton(st)
    st.controller.planner = ScriptedPlanner(st.controller.planner)
    data = tmp_path / "cell"
    daemon = CellDaemon(st.controller, st.feed, data_dir=data, totes=1, watch_models=False)
    st.feed.next_tote = lambda: "t0"  # the hand-built tote (one carton)
    arm = st.cell.arm
    sent = threading.Event()
    hold: list[tuple[np.ndarray, np.ndarray, int | None]] = []

    def observer(a, event):  # runs on the daemon's motion thread
        if event == "sample" and a.phase == "transit" and not sent.is_set():
            sent.set()
            assert send_control(data, "estop")["ok"]  # through the real socket and control thread
        elif event == "hold":
            pos, _ = p.getBasePositionAndOrientation(body, physicsClientId=a.client_id)
            hold.append((a.q(), np.array(pos), a.held_item))

    arm.observers.append(observer)
    t = threading.Thread(target=daemon.run, kwargs={"install_signal_handlers": False})
    t.start()
    try:
        wait_for(lambda: len(hold) >= 10, 60, "the arm holding in the protective stop")
        assert t.is_alive() and arm.stopped  # waiting for a person, however long it takes
        n = len(hold)
        wait_for(lambda: len(hold) >= n + 5, 10, "more hold ticks")
        assert arm.stopped
        assert send_control(data, "clear-stop")["ok"]
    finally:
        t.join(timeout=120)
    assert not t.is_alive()
    assert daemon.stats.picks == 1 and body in st.cell.items_in_box()
    assert all(np.array_equal(q, hold[0][0]) for q, _, _ in hold)  # the arm did not move
    assert all(np.allclose(pos, hold[0][1]) for _, pos, _ in hold)  # nor did the item
    assert all(held == body for _, _, held in hold)  # the cup kept it
    ev = arm.stop_events[0]
    assert ev.cause == "command" and ev.phase == "transit" and ev.cleared_at is not None
    rep = daemon.stats.reports[0]
    assert rep.estop_s > 0.5 and rep.attempts[0].placed.details["stops"][0]["held_s"] > 0.5
