"""The simulated associate's judgement on a real simulated scene (PyBullet, the planner's own pixel
candidate): when no offered candidate is right it clicks the oracle's grasp and names its gripper,
and the click it sends is one the cell can execute."""

from __future__ import annotations

import numpy as np

from hitl.messages import AssistRequest, CandidateView
from sim.associate import GroundTruthJudge, Judgement, RecordingCamera, SimAssociateConfig
from sim.stack import pixel_candidate_builder


def _frame_flat(cell, name: str) -> int:
    from sim.catalogs import load_catalog

    return cell.add_item(next(s for s in load_catalog("novel-train").items if s.name == name))


def test_a_jaw_grasp_nobody_offered_is_clicked_with_the_jaw_named_and_the_click_picks_it(sim_cell):
    """A 303 g picture frame: too heavy for a cup that far from its centre of mass, held by a jaw
    across one bar. The cell offered only a suction candidate on it (a wrong one): a person clicks
    the bar and names the jaw. The associate used to answer "no safe pick" here, which left a
    pickable item in the tote and labelled its candidates as failures."""
    cell = sim_cell
    body = _frame_flat(cell, "novel-train/frame-0184")
    camera = RecordingCamera(cell.camera)
    frame = camera.capture()
    seg = camera.segmentation(frame.frame_id)
    judge = GroundTruthJudge(cell, camera, SimAssociateConfig(seed=0, error_rate=0.0))
    g = judge.oracle.grasp_for(body)
    assert g is not None and g.gripper == "parallel_jaw"
    gu, gv = judge._project(g.position)
    # the offered candidate: a pixel on the frame far from the right spot
    vs, us = np.nonzero(seg == body)
    k = int(np.argmax((us - gu) ** 2 + (vs - gv) ** 2))
    offered = CandidateView(index=0, u=int(us[k]), v=int(vs[k]), gripper="suction", p_success=0.3)
    req = AssistRequest(
        cell_id="cell-1", deadline=1e12, image_png=b"", candidates=(offered,),
        context={"frame_id": frame.frame_id},
    )  # fmt: skip
    j = judge.judge(req)
    assert j.kind == "point" and j.gripper == "parallel_jaw" and j.pixel == (gu, gv)
    # The click goes through the planner's own candidate generator, as the controller applies it.
    pc = pixel_candidate_builder(cell.tote_bounds)(frame, j.pixel[0], j.pixel[1], j.gripper)
    assert pc.grasp.gripper == "parallel_jaw"
    assert np.linalg.norm(pc.grasp.position[:2] - g.position[:2]) < 0.02
    out = cell.arm.pick(pc.grasp)
    assert out.success, out
    assert out.item_id == body


def test_an_approval_names_the_candidates_own_number_not_its_place_in_the_offered_list(sim_cell):
    """The cell offers a subset of its plan (numbers 7 and 12 drawn on the image) and executes
    plan.candidates[candidate_index]. The judge approved by position in the offered list (1 here),
    so the cell executed another candidate than the one the person checked (and the broker refused
    the answer when that position was not an offered number)."""
    cell = sim_cell
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    body = cell.add_primitive("box", (0.06, 0.04, 0.03), (c[0], c[1], b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    camera = RecordingCamera(cell.camera)
    frame = camera.capture()
    seg = camera.segmentation(frame.frame_id)
    judge = GroundTruthJudge(cell, camera, SimAssociateConfig(seed=0, error_rate=0.0))
    g = judge.oracle.grasp_for(body)
    assert g is not None
    gu, gv = judge._project(g.position)
    vs, us = np.nonzero(seg == body)
    k = int(np.argmax((us - gu) ** 2 + (vs - gv) ** 2))
    wrong = CandidateView(index=7, u=int(us[k]), v=int(vs[k]), gripper="suction", p_success=0.4)
    right = CandidateView(index=12, u=gu, v=gv, gripper=g.gripper, p_success=0.5)
    req = AssistRequest(
        cell_id="cell-1", deadline=1e12, image_png=b"", candidates=(wrong, right),
        context={"frame_id": frame.frame_id},
    )  # fmt: skip
    j = judge.judge(req)
    assert j.kind == "approve" and j.candidate_index == 12
    # A careless approval (error_rate) also names an offered candidate's own number.
    careless = GroundTruthJudge(cell, camera, SimAssociateConfig(seed=0, error_rate=1.0))
    for _ in range(5):
        jc = careless.judge(req)
        assert jc.kind == "approve" and jc.candidate_index in (7, 12)


def test_a_question_about_a_boxed_item_is_answered_about_that_item_not_a_better_one_elsewhere(sim_cell):
    """The picture boxes the item asked about (`item_box_px`). A person answers about it: here no
    offered candidate on it is right, so they click its right spot, though a right candidate on the
    other item is offered first. Approving that one (the old behaviour, "best on any item") approved
    a pick the cell was making by itself meanwhile: on cell B's ledger (stop 39) 13 of 42 answers were
    discarded because the surface under them had moved, and the item asked about was asked again."""
    cell = sim_cell
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    asked = cell.add_primitive("box", (0.05, 0.035, 0.03), (c[0] - 0.08, c[1], b.lo[2] + 0.031), mass=0.3)
    other = cell.add_primitive("box", (0.05, 0.035, 0.03), (c[0] + 0.08, c[1], b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    camera = RecordingCamera(cell.camera)
    frame = camera.capture()
    seg = camera.segmentation(frame.frame_id)
    judge = GroundTruthJudge(cell, camera, SimAssociateConfig(seed=0, error_rate=0.0))
    g_other, g_asked = judge.oracle.grasp_for(other), judge.oracle.grasp_for(asked)
    assert g_other is not None and g_asked is not None
    ou, ov = judge._project(g_other.position)
    right_elsewhere = CandidateView(index=3, u=ou, v=ov, gripper=g_other.gripper, p_success=0.9)
    vs, us = np.nonzero(seg == asked)
    au, av = judge._project(g_asked.position)
    k = int(np.argmax((us - au) ** 2 + (vs - av) ** 2))
    wrong_here = CandidateView(index=9, u=int(us[k]), v=int(vs[k]), gripper="suction", p_success=0.2)
    box = [int(us.min()), int(vs.min()), int(us.max()), int(vs.max())]
    centre = [int(np.median(us)), int(np.median(vs))]
    ctx = {"frame_id": frame.frame_id, "item_box_px": box, "item_px": centre}

    def ask(context):
        return AssistRequest(
            cell_id="cell-1", deadline=1e12, image_png=b"", candidates=(right_elsewhere, wrong_here),
            context=context,
        )  # fmt: skip

    j = judge.judge(ask(ctx))
    assert j.kind == "point" and j.pixel == (au, av) and j.gripper == g_asked.gripper
    # A right candidate on the boxed item is approved, whatever is offered before it.
    right_here = CandidateView(index=11, u=au, v=av, gripper=g_asked.gripper, p_success=0.3)
    req = AssistRequest(
        cell_id="cell-1", deadline=1e12, image_png=b"", candidates=(right_elsewhere, wrong_here, right_here),
        context=ctx,
    )  # fmt: skip
    assert judge.judge(req) == Judgement("approve", candidate_index=11)
    # The box alone (no centre pixel) is enough: the item covering most of it.
    only_box = {k: v for k, v in ctx.items() if k != "item_px"}
    assert judge.judge(ask(only_box)).kind == "point"
    # Without a box (an older cell), the best right candidate on any item, as before.
    j = judge.judge(ask({"frame_id": frame.frame_id}))
    assert j.kind == "approve" and j.candidate_index == 3
