"""The simulated associate's judgement on a real simulated scene (PyBullet, the planner's own pixel
candidate): when no offered candidate is right it clicks the oracle's grasp and names its gripper,
and the click it sends is one the cell can execute."""

from __future__ import annotations

import numpy as np

from hitl.messages import AssistRequest, CandidateView
from sim.associate import GroundTruthJudge, RecordingCamera, SimAssociateConfig
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
