"""The arm says it has left the camera's view of the tote as soon as it has (arm/lookahead.py's cue):
during the transit, and the frame captured then shows no part of the arm or its item over the tote.
"""

from __future__ import annotations

import numpy as np
import pybullet as p

from grasping.types import Grasp, grasp_frame, matrix_to_quat
from sim.oracle import OracleGraspSource

DOWN = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0])))


def _tote_pixels(cell) -> np.ndarray:
    """(H, W) mask of the pixels that look into the tote (from a capture with the arm away)."""
    cell.camera.capture()
    return np.asarray(cell.camera.last_segmentation) == cell.tote_id  # body ids (no link index)


def test_the_look_comes_during_the_transit_with_nothing_of_the_arm_over_the_tote(sim_cell):
    cell = sim_cell
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    carton = cell.add_primitive("box", (0.06, 0.04, 0.03), (c[0], c[1], b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    top = np.array([c[0], c[1], p.getAABB(carton, physicsClientId=cell.client_id)[1][2]])
    # The tote's footprint in the image, with the arm at home (out of the way) and the carton in it.
    tote_or_items = _tote_pixels(cell) | (np.asarray(cell.camera.last_segmentation) == carton)
    looks: list[tuple[str, np.ndarray]] = []

    def look():
        cell.camera.capture()
        looks.append((cell.arm.phase, np.asarray(cell.camera.last_segmentation).copy()))

    def placement_for(out):
        cell.arm.notify_when_clear(look)
        return OracleGraspSource(cell).placement()

    out, placed = cell.arm.pick_and_place(Grasp("suction", top, DOWN), placement_for)
    assert out.success and placed is not None and placed.success
    assert len(looks) == 1
    phase, seg = looks[0]
    assert phase == "transit"  # before the arm got over the box, not when it goes down into it
    assert not (tote_or_items & ((seg == cell.arm.body) | (seg == carton))).any()


def test_without_a_view_of_the_tote_the_arm_says_so_when_it_goes_down_into_the_box(sim_cell):
    cell = sim_cell
    cell.arm.tote_view = None
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    carton = cell.add_primitive("box", (0.06, 0.04, 0.03), (c[0], c[1], b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    top = np.array([c[0], c[1], p.getAABB(carton, physicsClientId=cell.client_id)[1][2]])
    phases: list[str] = []
    assert cell.arm.pick(Grasp("suction", top, DOWN)).success
    cell.arm.notify_when_clear(lambda: phases.append(cell.arm.phase))
    assert cell.arm.place(OracleGraspSource(cell).placement()).success
    assert phases == ["place"]
