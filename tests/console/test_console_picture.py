"""The picture a person sees and the candidates they can answer with come from one list.

Before, the controller offered the best 20 candidates that had not failed while the picture drew the
best 20 distinct ones: a number could be drawn but not answerable (a failed spot), or answerable but
not drawn (a near-duplicate). Now both come from `grasping.draw.offered_indices`.
"""

from __future__ import annotations

import numpy as np
import pytest

from grasping.draw import offered_indices, render_plan
from grasping.types import Candidate, Frame, Grasp, Plan

W, H = 320, 240


def _frame() -> Frame:
    K = np.array([[300.0, 0, W / 2], [0, 300.0, H / 2], [0, 0, 1]])
    T = np.eye(4)
    T[:3, :3] = np.diag([1.0, -1.0, -1.0])  # looking straight down from 1 m
    T[2, 3] = 1.0
    return Frame(
        depth=np.full((H, W), 1.0, np.float32), rgb=np.zeros((H, W, 3), np.uint8), K=K, T_base_camera=T
    )


def _cand(u: int, v: int, p: float) -> Candidate:
    g = Grasp("suction", np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))
    return Candidate(g, analytic_score=p, p_success=p, pixel=(u, v))


def _plan() -> Plan:
    # best first: #1 is a near-duplicate of #0 (5 px away), #3 will be "already failed"
    cands = (
        _cand(60, 60, 0.9),
        _cand(64, 63, 0.8),
        _cand(160, 120, 0.7),
        _cand(250, 60, 0.6),
        _cand(60, 190, 0.5),
    )
    return Plan(candidates=cands, decision="ask", reasons=("unsure",), frame_id="f")


def _marked(img: np.ndarray, base: np.ndarray, u: int, v: int) -> bool:
    win = (slice(max(0, v - 9), v + 10), slice(max(0, u - 9), u + 10))
    return bool((img[win] != base[win]).any())


def test_offered_indices_skip_excluded_and_near_duplicates():
    plan = _plan()
    assert offered_indices(plan, 20) == [0, 2, 3, 4]
    assert offered_indices(plan, 20, exclude=lambda k: k == 3) == [0, 2, 4]
    assert offered_indices(plan, 2, exclude=lambda k: k == 0) == [1, 2]  # #1 is distinct once #0 is out
    with pytest.raises(ValueError):
        offered_indices(plan, -1)


def test_the_picture_draws_exactly_the_offered_candidates():
    frame, plan = _frame(), _plan()
    offered = offered_indices(plan, 20, exclude=lambda k: k == 3)
    img = np.asarray(render_plan(frame, plan, indices=offered))
    base = np.asarray(frame.rgb)
    for k, c in enumerate(plan.candidates):
        if k == 1:
            continue  # drawn over by #0's marker, 5 px away
        assert _marked(img, base, *c.pixel) == (k in offered), f"candidate {k}"
    with pytest.raises(ValueError):
        render_plan(frame, plan, indices=[0, 9])
