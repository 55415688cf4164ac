"""The whole tool, not just the cup or the fingertips, must clear the tote (grasping.candidates).

Scenes are ray-cast (tests/grasping/synthetic.py) into a tote shaped like the simulated cell's
(35 x 50 cm inside, 10 cm deep). Each case puts the same item once where the tool is free and once
where the hand, the open fingers or the stem would hit a tall neighbour or a tote wall, and checks
that the candidates there are gone; each also switches the body check off (no tool boxes) to show
that it is that check, and not some other one, that removes them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from synthetic import box_on_floor, render

from grasping.candidates import (
    CandidateConfig,
    HeightMap,
    jaw_candidates,
    suction_candidates,
    suction_tool_clearance,
    tool_points,
)
from grasping.pointcloud import NO_CLUSTER, segment_scene
from grasping.types import Bounds

TOTE_LO = np.array([-0.175, -0.25, 0.0])  # metres: the simulated cell's tote, floor at z = 0
TOTE_HI = np.array([0.175, 0.25, 0.10])
TOTE = Bounds(TOTE_LO, TOTE_HI)
CFG = CandidateConfig()
NO_BODY = replace(CFG, jaw_body_boxes=(), suction_body_boxes=())  # fingertips / cup checks only


def _cloud(shapes, seed=0):
    frame = render(shapes, noise_sigma_m=0.001, seed=seed, tote_lo=TOTE_LO, tote_hi=TOTE_HI)
    return segment_scene(frame, TOTE)


def _suction_near(shapes, xy, cfg=CFG, seed=0, r=0.012):
    """Suction candidates whose cup lies within r of xy (horizontal)."""
    s = suction_candidates(_cloud(shapes, seed), cfg, np.random.default_rng(seed))
    return s.take(np.flatnonzero(np.linalg.norm(s.positions[:, :2] - np.asarray(xy), axis=1) < r))


def test_suction_beside_tall_neighbours_is_rejected_and_kept_when_isolated():
    # A low box (2 cm) with its top's centre at the origin. Two tall boxes (13 cm) stand 1 cm from its
    # sides, one towards +x and one towards +y: whichever way the hand is turned about the cup, one
    # opened finger (8.5 cm above the lip, 3.6-7 cm out from the axis) comes down onto a neighbour.
    target = box_on_floor(0.0, 0.0, 0.06, 0.06, 0.02)
    east = box_on_floor(0.065, 0.0, 0.05, 0.12, 0.13)
    north = box_on_floor(-0.03, 0.065, 0.09, 0.05, 0.13)
    alone = _suction_near([target], (0.0, 0.0))
    assert len(alone) >= 3, "the isolated box top is a good suction spot"
    assert alone.analytic.max() > 0.7
    crowded = _suction_near([target, east, north], (0.0, 0.0))
    assert len(crowded) == 0, "the open fingers would land on a neighbour in both hand orientations"
    # The cup's own checks see nothing wrong there: the neighbours are beyond the cup's lip.
    unchecked = _suction_near([target, east, north], (0.0, 0.0), cfg=NO_BODY)
    assert len(unchecked) >= 3
    # One neighbour only: the hand can turn so that the fingers straddle it, and the spot is kept.
    one_side = _suction_near([target, east], (0.0, 0.0))
    assert len(one_side) >= 3


def test_suction_in_a_tote_corner_is_rejected_and_kept_in_the_middle():
    # A flat box (1 cm), 2 cm from two walls of the 10 cm deep tote: with the cup on its top the
    # opened fingers (9.5 cm above the floor, 7 cm out) cross one wall below its rim whichever
    # way the hand is turned.
    x, y = TOTE_HI[0] - 0.05, TOTE_HI[1] - 0.05
    corner = box_on_floor(x, y, 0.06, 0.06, 0.01)
    assert len(_suction_near([corner], (x, y))) == 0
    assert len(_suction_near([corner], (x, y), cfg=NO_BODY)) >= 3
    middle = box_on_floor(0.0, 0.0, 0.06, 0.06, 0.01)
    assert len(_suction_near([middle], (0.0, 0.0))) >= 3


def test_jaw_whose_hand_would_hit_a_tall_neighbour_is_rejected():
    # A narrow box (3 cm across x, 4 cm tall) is gripped across x. A tall neighbour (10 cm) stands
    # 3 cm beyond its +x side: clear of the fingers (at most 2.5 + 1.2 cm from the grasp axis) but
    # under the 20 cm long hand, whose palm is only 3.8 cm above the fingertips' grasp point.
    target = box_on_floor(0.0, 0.0, 0.03, 0.10, 0.04)
    wall_item = box_on_floor(0.06, 0.0, 0.03, 0.16, 0.10)
    cloud = _cloud([target])
    alone = jaw_candidates(cloud, CFG, np.random.default_rng(0), 0.004)
    assert len(alone) > 5
    assert (np.abs(alone.rotations[:, 0, 0]) > 0.8).all(), "closing across the narrow side (x)"

    cloud2 = _cloud([target, wall_item])
    on_target = lambda c: c.take(np.flatnonzero(np.abs(c.positions[:, 0]) < 0.02))  # noqa: E731
    crowded = on_target(jaw_candidates(cloud2, CFG, np.random.default_rng(0), 0.004))
    assert len(crowded) == 0
    # The fingertips alone fit: without the hand's boxes the same grasps come back.
    fingers_only = on_target(jaw_candidates(cloud2, NO_BODY, np.random.default_rng(0), 0.004))
    assert len(fingers_only) > 5
    # Those grasps really are finger-free and hand-blocked: fingers end before the neighbour's
    # face (x = 0.045) and the palm's bottom is below its top.
    outer = fingers_only.positions[:, 0] + fingers_only.widths / 2 + CFG.finger_thickness_m
    assert (outer < 0.045).all()
    assert (fingers_only.positions[:, 2] + CFG.jaw_body_boxes[0][3] < 0.10).all()


def test_jaw_closing_towards_a_wall_is_rejected_and_kept_away_from_it():
    # The narrow box 5 cm from the +x wall, closing along x: the hand reaches 10 cm each way.
    x = TOTE_HI[0] - 0.05
    near_wall = box_on_floor(x, 0.0, 0.03, 0.10, 0.04)
    j = jaw_candidates(_cloud([near_wall]), CFG, np.random.default_rng(0), 0.004)
    assert len(j) == 0
    j0 = jaw_candidates(_cloud([near_wall]), NO_BODY, np.random.default_rng(0), 0.004)
    assert len(j0) > 5
    middle = box_on_floor(0.0, 0.0, 0.03, 0.10, 0.04)
    assert len(jaw_candidates(_cloud([middle]), CFG, np.random.default_rng(0), 0.004)) > 5


def test_fingertips_stay_above_the_floor():
    flat = box_on_floor(0.0, 0.0, 0.03, 0.08, 0.012)  # 1.2 cm tall: fingertips would reach the floor
    cloud = _cloud([flat])
    j = jaw_candidates(cloud, CFG, np.random.default_rng(0), 0.004)
    assert len(j) > 0
    tips = j.positions[:, 2] - CFG.finger_pad_half_m
    assert (tips >= cloud.floor_z + CFG.floor_clearance_m - 1e-9).all()


def _flat_map(floor_z=0.0):
    res = 0.004
    lo = TOTE_LO[:2]
    n = np.ceil((TOTE_HI[:2] - lo) / res).astype(int)
    return HeightMap(
        height=np.full(n, floor_z), label=np.full(n, NO_CLUSTER, np.int32), lo=lo.copy(), res=res
    )


def _frame_for(approach: np.ndarray) -> np.ndarray:
    z = approach / np.linalg.norm(approach)
    x = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = x - z * (x @ z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


def test_tilted_suction_sweep_meets_the_wall_behind_it():
    # A cup 8 cm in from the +x wall, 3 cm above an empty floor. Straight down: the tool clears the
    # 10 cm wall (the fingers come no lower than 11.5 cm). Tilted 55 degrees with the approach
    # pointing away from the wall, the stem and hand lean back over the wall, below its rim.
    # Tilted towards the wall, the tool leans away from it and is free.
    hmap = _flat_map()
    p = np.array([[TOTE_HI[0] - 0.08, 0.0, 0.03]])
    t = np.deg2rad(55.0)
    cases = {
        "down": np.array([0.0, 0.0, -1.0]),
        "away": np.array([-np.sin(t), 0.0, -np.cos(t)]),
        "towards": np.array([np.sin(t), 0.0, -np.cos(t)]),
    }
    body = {}
    for name, a in cases.items():
        b, cup = suction_tool_clearance(
            hmap, float(TOTE_HI[2]), CFG, p, _frame_for(a)[None], np.array([NO_CLUSTER])
        )
        body[name] = float(b[0])
        if name != "away":
            assert cup[0] > 0.02  # nothing but floor under the cup and along its way down
    assert body["down"] > 0.0
    assert body["towards"] > 0.0
    assert body["away"] < -CFG.collision_tol_m


def test_tool_points_cover_the_boxes_and_the_sweep():
    boxes = ((0.02, 0.0, 0.10, 0.04, 0.14),)
    bottom, sides, normals = tool_points(boxes, 0.012, 0.10)
    assert np.allclose(bottom[:, 2], 0.04)
    assert np.isclose(np.abs(bottom[:, 0]).max(), 0.02) and np.isclose(np.abs(bottom[:, 1]).max(), 0.10)
    assert np.diff(np.unique(bottom[:, 1])).max() <= 0.012 + 1e-12
    assert np.isclose(sides[:, 2].max(), 0.14 + 0.10)  # top of the box plus the sweep
    on_outline = (np.abs(np.abs(sides[:, 0]) - 0.02) < 1e-9) | (np.abs(np.abs(sides[:, 1]) - 0.10) < 1e-9)
    assert on_outline.all()
    # Each side point carries its face's outward normal (corners belong to both faces).
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0)
    on_u_face = np.abs(np.abs(sides[:, 0]) - 0.02) < 1e-9
    assert np.allclose(normals[normals[:, 0] != 0, 0], np.sign(sides[normals[:, 0] != 0, 0]))
    assert on_u_face[normals[:, 0] != 0].all()
