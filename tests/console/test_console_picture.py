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


def test_the_item_a_question_is_about_is_boxed_where_the_camera_sees_it() -> None:
    from grasping.draw import ASKED_COLOUR, item_pixels
    from grasping.types import ItemCluster

    # An item 10 cm x 6 cm, 4 cm tall, centred 5 cm right of the camera's axis (1 m above the floor).
    item = ItemCluster(
        centroid=np.array([0.05, 0.0, 0.02]), lo=np.array([0.0, -0.03, 0.0]), hi=np.array([0.10, 0.03, 0.04])
    )
    (u, v), (u0, v0, u1, v1) = item_pixels(_frame(), item)
    # x is +u in the image: the centre 0.98 m below the camera, 300 px per metre at 1 m.
    assert (u, v) == (round(W / 2 + 300 * 0.05 / 0.98), H // 2)
    assert u0 <= W / 2 + 1 and u1 >= W / 2 + 30 and v0 <= H / 2 - 9 and v1 >= H / 2 + 9
    plan = Plan(candidates=(_cand(10, 10, 0.9),), decision="ask", clusters=(item,))
    img = np.asarray(render_plan(_frame(), plan, item=0)).astype(int)
    asked = np.all(np.abs(img - np.asarray(ASKED_COLOUR)) <= 2, axis=-1)
    # Drawn on all four sides of the item's box (4 px out), and not over the item itself.
    sides = [asked[v0 - 6 : v0 - 1, u0:u1], asked[v1 + 2 : v1 + 7, u0:u1], asked[v0:v1, u0 - 6 : u0 - 1],
             asked[v0:v1, u1 + 2 : u1 + 7]]  # fmt: skip
    assert all(side.any(axis=0 if k < 2 else 1).mean() > 0.9 for k, side in enumerate(sides))
    assert not asked[v0 + 3 : v1 - 2, u0 + 3 : u1 - 2].any()
    assert not np.all(
        np.abs(np.asarray(render_plan(_frame(), plan)).astype(int) - ASKED_COLOUR) <= 2, -1
    ).any()
    # An item index the plan does not have, or an item out of view, draws no box and raises nothing.
    assert not np.all(np.asarray(render_plan(_frame(), plan, item=5)) == ASKED_COLOUR, axis=-1).any()
    behind = ItemCluster(
        centroid=np.array([0.0, 0.0, 2.0]), lo=np.array([0, 0, 1.9]), hi=np.array([0.1, 0.1, 2.1])
    )
    assert item_pixels(_frame(), behind) is None
