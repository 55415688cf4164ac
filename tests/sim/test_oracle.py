"""The ground-truth oracle's jaw grasps on shapes where the choice matters (real PyBullet, no mocks)."""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from sim.oracle import OracleGraspSource


def _wedge(cell, bottom=0.06, top=0.02, thick=0.055, height=0.06, mass=0.3, friction=0.4) -> int:
    """A prism tapered along x (trapezoid in x-z: `bottom` wide at the floor, `top` at the top, sides
    tilted 18.4 deg from vertical) with straight, vertical faces `thick` apart along y."""
    cid = cell.client_id
    h = height / 2
    verts = [
        [sx * (bottom if sz < 0 else top) / 2, sy * thick / 2, sz * h]
        for sx in (-1, 1)
        for sy in (-1, 1)
        for sz in (-1, 1)
    ]
    col = p.createCollisionShape(p.GEOM_MESH, vertices=verts, physicsClientId=cid)
    b = cell.tote_bounds
    centre = [(b.lo[0] + b.hi[0]) / 2, (b.lo[1] + b.hi[1]) / 2, b.lo[2] + h + 0.002]
    body = p.createMultiBody(mass, col, -1, basePosition=centre, physicsClientId=cid)
    p.changeDynamics(body, -1, lateralFriction=friction, physicsClientId=cid)
    cell.items[body] = "wedge"
    cell.settle(0.5)
    return body


def _pick_and_place_into_the_box(cell, oracle, grasp, body: int) -> None:
    """Execute the oracle's grasp in real physics: the pick holds and the item ends up in the box."""
    out = cell.arm.pick(grasp)
    assert out.success, out
    placed = cell.arm.place(oracle.placement())
    assert placed.success, placed
    assert body in cell.items_in_box()


def test_jaw_closes_across_the_straight_faces_of_a_tapered_item_below_its_top(sim_cell):
    cell = sim_cell
    body = _wedge(cell)
    oracle = OracleGraspSource(cell)
    top = p.getAABB(body, physicsClientId=cell.client_id)[1][2]
    pts, _ = oracle._surface(body)
    # Across the taper (x) the pads would meet faces tilted 18 deg up: the squeeze pushes the item
    # down and out, so the oracle refuses it; across y the faces are vertical.
    com = np.asarray(p.getBasePositionAndOrientation(body, physicsClientId=cell.client_id)[0])
    width_x, _, angle_x, wedge_x = oracle._pad_contacts(body, com, np.array([1.0, 0.0, 0.0]))
    width_y, _, angle_y, wedge_y = oracle._pad_contacts(body, com, np.array([0.0, 1.0, 0.0]))
    assert 16.0 < angle_x < 20.0 and 16.0 < wedge_x < 20.0 and width_x < width_y
    assert angle_y < 3.0 and abs(width_y - 0.055) < 0.003
    proposal = oracle.propose()
    assert proposal is not None
    picked, grasp = proposal
    assert picked == body and grasp.gripper == "parallel_jaw"
    assert abs(grasp.R[:, 0] @ np.array([0.0, 1.0, 0.0])) > 0.95  # closing across the straight faces
    assert grasp.position[2] < top - 0.01  # the whole pad on the item, not its top edge
    _pick_and_place_into_the_box(cell, oracle, grasp, body)


def test_a_finger_coming_down_on_another_part_of_the_item_is_detected(sim_cell):
    """A T-shaped item: a jaw closing along the stem's length, 1 cm from the bar across its end, would
    put a finger on the bar; the same jaw 4 cm further along the stem has nothing under its fingers."""
    cell = sim_cell
    cid = cell.client_id
    b = cell.tote_bounds
    c = np.array([(b.lo[0] + b.hi[0]) / 2, (b.lo[1] + b.hi[1]) / 2, b.lo[2]])
    col = p.createCollisionShapeArray(
        [p.GEOM_BOX, p.GEOM_BOX],
        halfExtents=[[0.01, 0.05, 0.02], [0.06, 0.01, 0.02]],
        collisionFramePositions=[[0.0, 0.0, 0.0], [0.0, 0.06, 0.0]],
        physicsClientId=cid,
    )
    body = p.createMultiBody(0.2, col, -1, basePosition=[c[0], c[1], c[2] + 0.021], physicsClientId=cid)
    cell.items[body] = "tee"
    cell.settle(0.5)
    oracle = OracleGraspSource(cell)
    pts, _ = oracle._surface(body)
    along_y = np.array([0.0, 1.0, 0.0])
    near_bar = np.array([c[0] + 0.03, c[1] + 0.04, c[2] + 0.03])  # beside the stem, 1 cm from the bar
    assert oracle._fingers_land_on(pts, near_bar, along_y, 0.02)
    assert not oracle._fingers_land_on(pts, near_bar - [0.0, 0.04, 0.0], along_y, 0.02)


def test_a_grasp_that_failed_is_not_proposed_again(sim_cell):
    cell = sim_cell
    body = _wedge(cell)
    oracle = OracleGraspSource(cell)
    _, first = oracle.propose()
    assert oracle.propose()[1].position == pytest.approx(first.position)  # deterministic
    oracle.record_failure(body, first.gripper, first)
    picked, second = oracle.propose()
    assert picked == body
    same_spot = np.linalg.norm(second.position - first.position) < 0.008
    same_axis = abs(second.R[:, 0] @ first.R[:, 0]) > np.cos(np.radians(15.0))
    assert second.gripper != first.gripper or not (same_spot and same_axis)
    # Without the grasp, only the count is kept and the same grasp may come back.
    other = OracleGraspSource(cell)
    other.record_failure(body, first.gripper)
    assert other.propose()[1].position == pytest.approx(first.position)


def _part_on_mailer(cell, part_half_extents) -> tuple[int, int, float]:
    """A 1 cm thick mailer flat on the tote floor and a small box part lying on it; (part, mailer,
    mailer top z). The 17 mm part is like procedural small_part-0173 (17 x 20 x 32 mm, 50 g)."""
    b = cell.tote_bounds
    c = np.array([(b.lo[0] + b.hi[0]) / 2, (b.lo[1] + b.hi[1]) / 2, b.lo[2]])
    mailer = cell.add_primitive(
        "box", (0.105, 0.06, 0.005), (c[0], c[1], c[2] + 0.0052), mass=0.05, friction=0.45, name="mailer"
    )
    hz = part_half_extents[2]
    part = cell.add_primitive(
        "box", part_half_extents, (c[0], c[1], c[2] + 0.0102 + hz), mass=0.05, friction=0.5, name="small_part"
    )
    cell.settle(0.5)
    mailer_top = p.getAABB(mailer, physicsClientId=cell.client_id)[1][2]
    return part, mailer, mailer_top


def test_a_small_part_on_a_mailer_is_held_with_the_fingertips_above_the_mailer(sim_cell):
    """The fingertips reach 12 mm below the TCP; grasped at its mid-height, a 17 mm part lying on
    a mailer had the tips pressed 4 mm into the mailer and slipped out during the lift."""
    cell = sim_cell
    part, mailer, mailer_top = _part_on_mailer(cell, (0.016, 0.0102, 0.0087))
    oracle = OracleGraspSource(cell)
    assert oracle._supports(part) == [mailer]  # the part rests on the mailer, not on the tote
    assert oracle._supports(mailer) == []
    centre = np.asarray(p.getBasePositionAndOrientation(part, physicsClientId=cell.client_id)[0])
    d = np.array([0.0, 1.0, 0.0])
    assert oracle._tip_clearance([mailer], centre, d, 0.0204) < -0.003  # at mid-height: tips in the mailer
    assert oracle._tip_clearance([mailer], centre + [0.0, 0.0, 0.01], d, 0.0204) > 0.0
    picked, grasp = oracle.propose(exclude={mailer})
    assert picked == part and grasp.gripper == "parallel_jaw"
    assert grasp.position[2] - 0.012 >= mailer_top + oracle.cfg.tip_clearance - 1e-6
    # ...and the pads reach below its centre of mass (gripped only above it, a part tips out).
    assert grasp.position[2] - 0.0072 <= centre[2] - oracle.cfg.pad_below_com + 1e-6
    _pick_and_place_into_the_box(cell, oracle, grasp, part)


def test_a_part_too_flat_for_the_fingers_on_a_mailer_is_declined_with_its_reason(sim_cell):
    """12 mm tall on a mailer: with the tips clear of the mailer the pads (which start 5 mm above
    the tips) cannot reach below the part's centre of mass; its 20 mm face is too narrow
    for the 30 mm cup. No grasp is proposed for it and the reason is kept; the mailer still is."""
    cell = sim_cell
    part, mailer, _ = _part_on_mailer(cell, (0.019, 0.01, 0.006))
    oracle = OracleGraspSource(cell)
    assert oracle.grasp_for(part) is None
    assert oracle.propose(exclude={mailer}) is None
    assert "keeps the fingertips above the item it rests on" in oracle.declined[part]
    picked, grasp = oracle.propose()
    assert picked == mailer and grasp.gripper == "suction"


def _frame_flat(cell, name: str) -> int:
    """A picture frame of the `novel-train` catalog lying flat in the middle of the tote floor."""
    from sim.catalogs import load_catalog

    return cell.add_item(next(s for s in load_catalog("novel-train").items if s.name == name))


@pytest.mark.parametrize(
    "name, gripper",
    [
        ("novel-train/frame-0014", "suction"),  # a cup on the middle of a bar holds it
        ("novel-train/frame-0184", "parallel_jaw"),  # 303 g: too heavy for a cup that far off centre
    ],
)
def test_a_frame_whose_centre_of_mass_lies_over_its_opening_is_picked(sim_cell, name, gripper):
    """The oracle found no grasp on two thirds of picture frames (its cup search tried only the
    points nearest the centre of mass, all on the opening's edges; its jaw closed only around the
    centre of mass, over the opening), so the simulated associate answered "no safe pick" on items
    a cup or a jaw on one bar holds. A cup is now placed only where its whole footprint lies on the
    item; a jaw closes across one bar on a line through the centre of mass. Real physics checks it."""
    cell = sim_cell
    body = _frame_flat(cell, name)
    oracle = OracleGraspSource(cell)
    g = oracle.grasp_for(body)
    assert g is not None and g.gripper == gripper
    com = np.asarray(p.getBasePositionAndOrientation(body, physicsClientId=cell.client_id)[0])
    off = g.position[:2] - com[:2]
    assert np.linalg.norm(off) > 0.03  # on a bar, not over the opening
    if gripper == "parallel_jaw":
        d = g.R[:, 0] / np.linalg.norm(g.R[:, 0])  # the closing direction
        assert abs(d[2]) < 1e-6
        # the closing line passes through the centre of mass: no torque about the closing axis
        assert abs(off[0] * d[1] - off[1] * d[0]) < 0.005
        assert g.width <= oracle.cfg.max_jaw_width
    _pick_and_place_into_the_box(cell, oracle, g, body)
