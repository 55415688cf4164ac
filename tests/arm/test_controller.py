"""Every branch of the cell's decision loop, with a real simulated cell and a real CURVE broker.

The planner is the real geometric planner; only its *confidence* is scripted (ScriptedPlanner), so
each test can put the controller in the branch it is about. People are scripted associates connected
to the broker over real sockets.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pybullet as pb
from cellrig import ScriptedAssociate, ScriptedPlanner, add_carton, count_captures, grasp_above, project

from arm.controller import CellController
from arm.interfaces import CameraError, Grasp, Reason
from hitl.ledger import Ledger


def _in_box(stack, body: int) -> bool:
    return body in stack.cell.items_in_box()


def test_confident_item_is_picked_packed_and_recorded(stack_factory, tmp_path):
    st = stack_factory()
    body = add_carton(st)
    ledger = Ledger(tmp_path / "ledger.sqlite", cell_id="cell-1")
    st.controller.ledger = ledger
    st.controller.planner = ScriptedPlanner(st.controller.planner)
    rep = st.controller.run_tote("t0")
    assert rep.status == "cleared"
    assert [a.decided_by for a in rep.attempts] == ["model"]
    assert rep.attempts[0].outcome.success and rep.attempts[0].placed.success
    assert _in_box(st, body)
    rows = ledger.attempts()
    assert len(rows) == 1 and rows[0].decided_by == "model" and rows[0].outcome.success
    assert rep.assists_requested == 0
    ledger.close()


def test_unsure_looks_again_then_asks_and_executes_the_approved_candidate(stack_factory, assist_rig):
    st = stack_factory()
    body = add_carton(st)
    planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
    st.controller.planner = planner
    st.controller.assist = assist_rig.cell_client()
    person = ScriptedAssociate(assist_rig.associate("alice"), lambda req: ("approve", 0, None))
    try:
        rep = st.controller.run_tote("t0")
    finally:
        person.close()
        st.controller.assist.close()
    assert rep.assists_requested == 1 and rep.assists_answered == 1
    assert len(person.seen) == 1
    req = person.seen[0]
    assert req.image_png.startswith(b"\x89PNG") and req.candidates and req.reasons
    assert req.context["cause"] == "low_score"  # a familiar item whose best score is under the threshold
    # it looked again before asking: two plans for the first decision
    assert planner.plans >= 3
    assert rep.attempts[0].decided_by == "associate:alice"
    assert rep.attempts[0].outcome.success
    assert _in_box(st, body)


def _events_until_second_question(looks_before_asking: int, stack_factory, assist_rig) -> list[str]:
    """Two cartons the model is unsure about and nobody answering: the cell's captures and questions
    in order, up to its second question."""
    st = stack_factory(looks_before_asking=looks_before_asking, assist_deadline_s=1.0)
    add_carton(st, dx=-0.09)
    add_carton(st, dx=0.09)
    st.controller.planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
    st.controller.assist = assist_rig.cell_client()
    events: list[str] = []
    capture, ask = st.camera.capture, st.controller._ask
    st.camera.capture = lambda: events.append("capture") or capture()
    st.controller._ask = lambda *a, **k: events.append("ask") or ask(*a, **k)
    try:
        st.controller.run_tote("t0")
    finally:
        st.controller.assist.close()
    second = [i for i, e in enumerate(events) if e == "ask"][1]
    return events[: second + 1]


def test_an_item_already_seen_unsure_twice_is_asked_about_without_another_look(stack_factory, assist_rig):
    # Both items are unsure on the first look; the cell looks again (a second capture) and asks about
    # one. The capture after that question is the third look at the other item: it asks about it at
    # once instead of capturing a fourth time (a look costs ~0.1 s of sensing and a plan).
    assert _events_until_second_question(2, stack_factory, assist_rig) == [
        "capture", "capture", "ask", "capture", "ask"
    ]  # fmt: skip
    # looks_before_asking=0: a look-again before every question, as before.
    assert _events_until_second_question(0, stack_factory, assist_rig) == [
        "capture", "capture", "ask", "capture", "capture", "ask"
    ]  # fmt: skip


def test_no_safe_pick_sends_the_tote_to_exception_handling(stack_factory, assist_rig):
    """...and the question carried the asked item's provenance (`item_family`, looked up at the item's
    centre), so the rows the answer labels keep the item's kind."""

    st = stack_factory()
    body = add_carton(st)
    pos = np.array(pb.getBasePositionAndOrientation(body, physicsClientId=st.cell.client_id)[0])
    st.controller.planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
    st.controller.assist = assist_rig.cell_client()
    looked_up: list[np.ndarray] = []
    st.controller.item_family = lambda centre: looked_up.append(centre) or "carton"
    seen: list[dict] = []

    def answer(req):
        seen.append(dict(req.context))
        return ("no_safe_pick", None, None)

    person = ScriptedAssociate(assist_rig.associate("alice"), answer)
    try:
        rep = st.controller.run_tote("t0")
    finally:
        person.close()
        st.controller.assist.close()
    assert rep.status == "diverted"
    assert rep.attempts == []
    assert st.feed.diverted and "no safe pick" in st.feed.diverted[0][1]
    assert seen and all(c["family"] == "carton" for c in seen)
    assert np.linalg.norm(looked_up[0][:2] - pos[:2]) < 0.03  # looked up where the carton lies


def test_a_clicked_pixel_becomes_a_grasp_from_depth_and_normal(stack_factory, assist_rig):
    st = stack_factory()
    body = add_carton(st)
    lo, hi = (np.array(x) for x in pb.getAABB(body, physicsClientId=st.cell.client_id))
    top_centre = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2]])
    u, v = project(st, top_centre)
    st.controller.planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
    st.controller.assist = assist_rig.cell_client()
    person = ScriptedAssociate(assist_rig.associate("alice"), lambda req: ("point", None, (u, v)))
    try:
        rep = st.controller.run_tote("t0")
    finally:
        person.close()
        st.controller.assist.close()
    first = rep.attempts[0]
    assert first.decided_by == "associate:alice"
    assert first.grasp.gripper == "suction"
    assert np.linalg.norm(first.grasp.position[:2] - top_centre[:2]) < 0.01
    assert first.outcome.success and _in_box(st, body)


def test_passed_deadline_skips_the_item_and_the_cell_moves_on(stack_factory, assist_rig):
    st = stack_factory(assist_deadline_s=3.0)
    add_carton(st)
    st.controller.planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
    st.controller.assist = assist_rig.cell_client()  # nobody is answering
    try:
        rep = st.controller.run_tote("t0")
    finally:
        st.controller.assist.close()
    assert rep.assists_requested == 1 and rep.assists_expired == 1 and rep.assists_answered == 0
    assert rep.status == "diverted" and rep.attempts == []
    # The robot idled while it waited, then gave up. Which deadline passed first, the cell's (3 s of
    # robot time) or the broker's (3 s of wall time), depends on how long this host takes to plan
    # between idle steps, so the wait is not pinned to 3 s: on a loaded host the broker's comes first.
    assert 0.0 < rep.human_wait_s <= 3.0 + st.controller.config.idle_step_s


def test_keeps_picking_confident_items_while_a_person_thinks(stack_factory, assist_rig, tmp_path):
    st = stack_factory(wall_poll_s=0.02, idle_step_s=0.1)
    left = add_carton(st, dy=-0.12)
    right = add_carton(st, dy=+0.12)
    y_left = st.cell.item_pose(left)[0][1]
    st.controller.planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: abs(c[1] - y_left) < 0.05)
    st.controller.assist = assist_rig.cell_client()
    ledger = Ledger(tmp_path / "ledger.sqlite", cell_id="cell-1")
    st.controller.ledger = ledger
    answered_after_right_picked = []

    def decide(req):
        # The person answers only once the cell has packed the other item: if the cell blocked on
        # the question, this would never happen and the question would expire.
        ok = _wait(lambda: _in_box(st, right), 20.0)
        answered_after_right_picked.append(ok)
        return ("approve", 0, None)

    person = ScriptedAssociate(assist_rig.associate("alice"), decide)
    try:
        rep = st.controller.run_tote("t0")
    finally:
        person.close()
        st.controller.assist.close()
    assert answered_after_right_picked == [True]
    assert [a.decided_by for a in rep.attempts] == ["model", "associate:alice"]
    assert _in_box(st, left) and _in_box(st, right)
    asked = ledger.request(person.seen[0].request_id)
    assert asked is not None
    ledger.close()


def _wait(pred, timeout_s: float) -> bool:
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_failed_spot_is_not_retried_and_the_next_candidate_is(stack_factory):
    st = stack_factory()
    body = add_carton(st)
    bad = grasp_above(st, body, 0.10)  # 10 cm above the carton: touches nothing
    st.controller.planner = ScriptedPlanner(st.controller.planner, prepend=lambda frame: [bad])
    rep = st.controller.run_tote("t0")
    reasons = [a.outcome.reason for a in rep.attempts]
    assert reasons[0] is Reason.NO_CONTACT
    assert reasons[1] is Reason.OK  # the fabricated spot came first again, and was skipped
    assert np.linalg.norm(rep.attempts[1].grasp.position - bad.position) > 0.015
    assert _in_box(st, body)


def test_a_person_is_not_offered_a_spot_that_already_failed(stack_factory, assist_rig):
    """The cell fails at a spot, then asks about the item: the failed spot is not among the offered
    candidates, so a person who approves the first one offered gets a grasp that can work."""
    st = stack_factory()
    body = add_carton(st)
    bad = grasp_above(st, body, 0.10)  # sure (p 0.99) but touches nothing; every real candidate is unsure
    st.controller.planner = ScriptedPlanner(
        st.controller.planner, unsure=lambda c: True, prepend=lambda frame: [bad]
    )
    st.controller.assist = assist_rig.cell_client()
    person = ScriptedAssociate(
        assist_rig.associate("alice"), lambda req: ("approve", req.candidates[0].index, None)
    )
    try:
        rep = st.controller.run_tote("t0")
    finally:
        person.close()
        st.controller.assist.close()
    assert rep.attempts[0].outcome.reason is Reason.NO_CONTACT and rep.attempts[0].decided_by == "model"
    assert person.seen and all(v.index != 0 for req in person.seen for v in req.candidates)  # 0: the bad one
    approved = rep.attempts[1]
    assert approved.decided_by == "associate:alice" and approved.outcome.success
    assert np.linalg.norm(approved.grasp.position - bad.position) > st.controller.config.failed_spot_radius_m
    assert _in_box(st, body)


def test_camera_that_keeps_failing_aborts_the_tote_without_crashing(stack_factory):
    st = stack_factory()
    add_carton(st)

    class DeadCamera:
        def capture(self):
            raise CameraError("no frame from the sensor (USB reset)")

    ctl = CellController(
        st.cell.arm, DeadCamera(), st.controller.planner, packer=st.packer, config=st.controller.config
    )
    rep = ctl.run_tote("t0")
    assert rep.status == "camera_failed" and rep.attempts == []


def test_protective_stop_halts_holds_and_the_cell_finishes_after_the_person_leaves(stack_factory):
    from sim.safety import SafetyZone

    st = stack_factory()
    body = add_carton(st)
    zone = SafetyZone()
    st.cell.arm.set_safety_zone(zone)
    t_in = st.cell.arm.robot_time + 0.5  # while the arm moves to the first pick
    zone.enter(t_in, t_in + 4.0)
    st.controller.planner = ScriptedPlanner(st.controller.planner)
    rep = st.controller.run_tote("t0")
    ev = st.cell.arm.stop_events[0]
    assert ev.cause == "zone" and ev.reaction_s <= 0.1
    assert rep.estop_s >= 3.0  # it held (robot time) instead of planning or moving
    assert rep.status == "cleared" and _in_box(st, body)
    assert [a.outcome.reason for a in rep.attempts] == [Reason.OK]  # the halted pick is not a failure


def test_with_nobody_to_ask_an_unsure_item_is_skipped_not_guessed(stack_factory):
    st = stack_factory()
    add_carton(st)
    st.controller.planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
    assert st.controller.assist is None
    rep = st.controller.run_tote("t0")
    assert rep.attempts == [] and rep.status == "diverted"


def test_configured_to_guess_it_picks_the_best_unsure_candidate(stack_factory):
    st = stack_factory(guess_when_alone=True)
    body = add_carton(st)
    st.controller.planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
    rep = st.controller.run_tote("t0")
    assert [a.decided_by for a in rep.attempts] == ["model-unsure"] and _in_box(st, body)


def test_a_candidate_is_held_to_its_own_grippers_threshold(stack_factory):
    """p = 0.95 clears the plan's 0.6 but not the candidate's own 0.99: nothing is auto-executed."""
    from dataclasses import replace

    st = stack_factory()
    add_carton(st)
    scripted = ScriptedPlanner(st.controller.planner)

    def strict(frame):
        plan = scripted(frame)
        return replace(plan, candidates=tuple(replace(c, threshold=0.99) for c in plan.candidates))

    st.controller.planner = strict
    rep = st.controller.run_tote("t0")
    assert rep.attempts == [] and rep.status == "diverted"


def _covered_scene(st) -> tuple[int, int]:
    """A flat 24 x 16 x 2 cm board on the floor with a 10 x 8 x 6 cm carton lying across one end."""
    b = st.cell.tote_bounds
    c = (b.lo + b.hi) / 2
    board = st.cell.add_primitive(
        "box", (0.12, 0.08, 0.01), (c[0], c[1], b.lo[2] + 0.011), mass=0.3, name="board"
    )
    st.cell.settle(0.3)
    top = st.cell.add_primitive(
        "box", (0.05, 0.04, 0.03), (c[0] + 0.06, c[1], b.lo[2] + 0.02 + 0.031), mass=0.2, name="top"
    )
    st.cell.settle(0.5)
    return board, top


def _prefer_covered(inner):
    """The real planner, with the covered item's candidates scripted as the most confident."""
    seen = []

    def plan_fn(frame):
        plan = inner(frame)
        occ = [cl.occluded for cl in plan.clusters]
        worst = int(np.argmax(occ)) if occ else -1
        cands = [
            replace(c, p_success=0.99 if c.cluster == worst else 0.9, threshold=0.6) for c in plan.candidates
        ]
        cands.sort(key=lambda c: -c.score)
        seen.append(plan)
        return replace(plan, candidates=tuple(cands), decision="pick", patches=None, features=None)

    return plan_fn, seen


def test_an_item_lying_on_another_is_picked_before_the_one_it_covers(stack_factory):
    """The board's visible part is not the whole board (its centroid is off its centre of mass):
    the carton on top goes first even though the board's candidates score higher, and then the
    board, uncovered, follows. With the rule off, the higher score wins."""
    st = stack_factory()
    board, top = _covered_scene(st)
    st.controller.planner, seen = _prefer_covered(st.controller.planner)
    rep = st.controller.run_tote("t0")
    first = seen[0]
    shares = sorted(cl.occluded for cl in first.clusters)
    assert len(first.clusters) == 2 and shares[0] == 0.0 and shares[1] > 0.15, shares
    assert rep.attempts[0].outcome.item_id == top and rep.attempts[0].outcome.success
    assert _in_box(st, top) and _in_box(st, board)

    off = stack_factory(max_covered_share=None)
    board2, top2 = _covered_scene(off)
    off.controller.planner, _ = _prefer_covered(off.controller.planner)
    rep2 = off.controller.run_tote("t0")
    assert rep2.attempts[0].grasp.position[2] < off.cell.item_pose(top2)[0][2] - 0.01  # aimed at the board


def test_a_candidate_the_arm_cannot_reach_is_skipped_before_moving(stack_factory):
    """The most confident candidate lies 1.2 m out, beyond the Panda's reach: the controller asks
    the arm (ReachCheck), skips it without an attempt, and picks the carton with the next one. With
    the check off, the unreachable candidate is tried first and fails."""
    st = stack_factory()
    body = add_carton(st)
    far = grasp_above(st, body, 0.0)
    far = Grasp("suction", far.position + np.array([1.2, 0.0, 0.0]), far.orientation)
    assert st.cell.arm.check_grasp(far) is not Reason.OK  # the premise
    st.controller.planner = ScriptedPlanner(st.controller.planner, prepend=lambda frame: [far])
    t0 = st.cell.arm.robot_time
    rep = st.controller.run_tote("t0")
    assert rep.attempts and rep.attempts[0].outcome.success
    assert all(np.linalg.norm(a.grasp.position - far.position) > 0.5 for a in rep.attempts)
    assert _in_box(st, body)
    assert st.cell.arm.robot_time > t0

    off = stack_factory(reach_checks=0)
    body2 = add_carton(off)
    far2 = grasp_above(off, body2, 0.0)
    far2 = Grasp("suction", far2.position + np.array([1.2, 0.0, 0.0]), far2.orientation)
    off.controller.planner = ScriptedPlanner(off.controller.planner, prepend=lambda frame: [far2])
    rep2 = off.controller.run_tote("t0")
    assert rep2.attempts[0].outcome.reason in (Reason.UNREACHABLE, Reason.IK_FAILED)


def test_waiting_on_a_robot_clock_associate_decides_again_on_the_same_look(stack_factory):
    """With `reuse_unchanged_view` (off by default): nothing moves while the cell waits for an
    answer that comes on the robot clock, so it decides
    again on its last frame and plan instead of capturing and planning every idle step (each would
    be charged as sensing and planning). It still looks anew once before giving the tote up, and
    an associate answering in wall time still gets a new look every idle step (the pacing)."""
    from sim.associate import SimAssistChannel

    plans = {}
    for clock in ("robot", "wall"):
        st = stack_factory(assist_deadline_s=3.0, reuse_unchanged_view=True)
        add_carton(st)
        planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
        st.controller.planner = planner
        channel = SimAssistChannel(None, lambda st=st: st.cell.arm.robot_time, answer=False)  # nobody answers
        if clock == "wall":
            channel.answers_on_robot_clock = False
        st.controller.assist = channel
        captures = {"n": 0}
        capture = st.camera.capture

        def counting(capture=capture, captures=captures):
            captures["n"] += 1
            return capture()

        st.camera.capture = counting
        rep = st.controller.run_tote("t0")
        assert rep.assists_requested == 1 and rep.assists_expired == 1 and rep.attempts == []
        assert rep.status == "diverted"
        assert rep.human_wait_s >= 3.0  # it waited out the deadline (12 idle steps of 0.25 s)
        assert captures["n"] == planner.plans == rep.plans  # every plan had its own new capture
        plans[clock] = planner.plans
    # first look, the look-again, one more before giving up
    assert plans["robot"] == 3
    assert plans["wall"] >= 12


def test_captures_and_plans_made_while_waiting_for_a_person_are_inside_the_wait(stack_factory):
    """Each capture is sorted by whether it costs the cell time (issue 17's cycle accounting): the
    first look and the look-again are ones the arm waits for; while the cell idles for an answer
    with nothing else to do, every capture (and the plan on it) happens inside that wait, and so
    does the look right after asking when all it finds is that wait."""
    from sim.associate import SimAssistChannel

    st = stack_factory(assist_deadline_s=2.0)  # reuse_unchanged_view off: a new look every idle step
    add_carton(st)
    planner = ScriptedPlanner(st.controller.planner, unsure=lambda c: True)
    st.controller.planner = planner
    st.controller.assist = SimAssistChannel(None, lambda: st.cell.arm.robot_time, answer=False)
    captures = count_captures(st)
    rep = st.controller.run_tote("t0")
    assert rep.assists_requested == 1 and rep.assists_expired == 1 and rep.status == "diverted"
    # Every capture is sorted exactly once; nothing moved, so none was behind motion.
    assert rep.captures_exposed + rep.captures_while_waiting + rep.captures_behind_motion == captures["n"]
    assert rep.captures_behind_motion == 0
    # The first look, the look-again and the one after the question expired (the wait is over).
    # The look right after asking found nothing to do but wait: the person was already thinking.
    assert rep.captures_exposed == 3
    assert rep.plan_exposed_ms[0] > 0 and rep.plan_exposed_ms[1] > 0 and rep.plan_exposed_ms[2] == 0.0
    assert rep.captures_while_waiting >= 6  # 2 s of 0.25 s idle steps, one look after each
    waiting = [i for i, e in enumerate(rep.plan_exposed_ms) if e == 0.0]
    assert len(waiting) == rep.captures_while_waiting
    assert rep.planning_while_waiting_ms == sum(rep.plan_latency_ms[i] for i in waiting)


def test_the_look_after_asking_that_finds_a_pick_is_charged_to_the_arm(stack_factory):
    """The other side of the rule above: when the look taken while a person thinks finds an item
    to pick, the arm waited for that look and its plan, so they stay charged."""
    from sim.associate import SimAssistChannel

    st = stack_factory(assist_deadline_s=2.0)
    cartons = [add_carton(st, dx=-0.1), add_carton(st, dx=0.1)]
    asked: list[np.ndarray] = []
    st.controller.on_ask = lambda req, centre: asked.append(np.asarray(centre))

    def unsure(centre) -> bool:
        # Unsure about both for the first look and the look-again; then only about the one asked.
        return planner.plans <= 2 or bool(asked and np.linalg.norm(centre[:2] - asked[0][:2]) < 0.05)

    planner = ScriptedPlanner(st.controller.planner, unsure=unsure)
    st.controller.planner = planner
    st.controller.assist = SimAssistChannel(None, lambda: st.cell.arm.robot_time, answer=False)
    start = {
        b: pb.getBasePositionAndOrientation(b, physicsClientId=st.cell.client_id)[0][:2] for b in cartons
    }
    rep = st.controller.run_tote("t0")
    assert rep.assists_requested >= 1 and rep.attempts[0].decided_by == "model"
    # The carton not asked about (whichever of the two the cell asked about) was picked meanwhile.
    at_start = {b: np.asarray(xy, dtype=np.float64) for b, xy in start.items()}
    asked_body = min(cartons, key=lambda b: float(np.linalg.norm(at_start[b] - asked[0][:2])))
    other = next(b for b in cartons if b != asked_body)
    assert _in_box(st, other)
    # Plans 1-2 (look, look again) and 3 (right after asking, which found the other carton).
    assert all(e > 0 for e in rep.plan_exposed_ms[:3])


def test_a_tote_with_something_left_that_cannot_be_picked_is_not_reported_cleared(stack_factory):
    """Two looks that make out no item but see points above the floor (a 1-2 cm part lying flat), or
    that see an item without a single candidate: the tote goes to exception handling, not onwards as
    empty. A tote whose looks see nothing at all is cleared."""
    from grasping.types import ItemCluster, Plan

    seen = ItemCluster(centroid=np.array([0.5, 0.0, 0.02]), lo=np.array([0.49, -0.01, 0.01]),
                       hi=np.array([0.51, 0.01, 0.03]))  # fmt: skip
    for plan, status in (
        (Plan(candidates=(), decision="empty", stray_voxels=5), "diverted"),
        (Plan(candidates=(), decision="ask", clusters=(seen,)), "diverted"),
        (Plan(candidates=(), decision="empty", stray_voxels=1), "cleared"),  # under left_voxels_min
        (Plan(candidates=(), decision="empty"), "cleared"),
    ):
        st = stack_factory()
        diverted: list[str] = []
        st.feed.divert_tote = diverted.append
        st.controller.planner = lambda frame, plan=plan: plan
        rep = st.controller.run_tote("t0")
        assert rep.status == status, plan
        assert (diverted != []) == (status == "diverted") and rep.attempts == []
        if diverted:
            assert "something is left" in diverted[0]
    # Something seen in one of the two empty looks only (passing through the view): cleared.
    st = stack_factory()
    looks = iter(
        [Plan(candidates=(), decision="empty", stray_voxels=5), Plan(candidates=(), decision="empty")] * 3
    )
    st.controller.planner = lambda frame: next(looks)
    assert st.controller.run_tote("t0").status == "cleared"
    # Off: the old behaviour.
    st = stack_factory(left_voxels_min=0)
    st.controller.planner = lambda frame: Plan(candidates=(), decision="empty", stray_voxels=5)
    assert st.controller.run_tote("t0").status == "cleared"
