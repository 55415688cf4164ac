"""The simulated RGB-D camera: geometry, noise model, ground truth kept out of the Frame."""

from __future__ import annotations

import dataclasses

import numpy as np
import pybullet as p

from grasping.types import Frame, quat_to_matrix
from sim.config_sim_camera import SimCameraConfig
from sim.scene import SceneConfig, SimCell
from sim.sim_camera import depth_to_points

HALF = np.array([0.06, 0.045, 0.035])  # m, half extents of the test box


def _box_scene(noise: bool, seed: int = 0) -> tuple[SimCell, int, np.ndarray, np.ndarray]:
    cfg = SceneConfig(camera=SimCameraConfig(noise=noise))
    cell = SimCell(seed=seed, config=cfg)
    b = cell.tote_bounds
    pos = np.array([(b.lo[0] + b.hi[0]) / 2 + 0.03, (b.lo[1] + b.hi[1]) / 2 - 0.05, b.lo[2] + HALF[2]])
    quat = np.array(p.getQuaternionFromEuler([0.0, 0.0, 0.4]))
    body = cell.add_primitive("box", tuple(HALF), tuple(pos), tuple(quat), mass=0.0, name="box")
    return cell, body, pos, quat


def _distance_to_box(points: np.ndarray, pos: np.ndarray, quat: np.ndarray) -> np.ndarray:
    """Unsigned distance of base-frame points to the surface of the box (pos, quat, HALF)."""
    local = (points - pos) @ quat_to_matrix(quat)
    q = np.abs(local) - HALF
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
    inside = np.minimum(q.max(axis=1), 0.0)
    return np.abs(outside + inside)


def test_frame_has_realistic_intrinsics_and_a_downward_pose():
    with SimCell(seed=0) as cell:
        frame = cell.camera.capture()
        assert isinstance(frame, Frame)
        assert frame.shape == (480, 640)
        assert frame.depth.dtype == np.float32 and frame.rgb.dtype == np.uint8
        fov_v = np.degrees(2 * np.arctan((480 / 2) / frame.K[1, 1]))
        assert 55.0 <= fov_v <= 61.0
        assert frame.K[0, 0] == frame.K[1, 1]
        # OpenCV axes: the optical axis (camera z) points down at the tote.
        assert np.allclose(frame.T_base_camera[:3, 2], [0, 0, -1], atol=1e-6)
        assert frame.T_base_camera[2, 3] > 0.9
        # Ground truth stays with the camera for metrics; the Frame has none.
        assert not any("seg" in f.name for f in dataclasses.fields(Frame))
        assert cell.camera.last_segmentation is not None
        assert cell.camera.last_segmentation.shape == (480, 640)


def test_point_cloud_of_a_box_of_known_pose_matches_within_5mm():
    for noise in (False, True):
        cell, body, pos, quat = _box_scene(noise)
        with cell:
            frame = cell.camera.capture()
            seg = cell.camera.last_segmentation
            depth = np.where(seg == body, frame.depth, np.nan)  # ground truth used only to select pixels
            pts = depth_to_points(depth, frame.K, frame.T_base_camera)
            assert len(pts) > 2000
            err = _distance_to_box(pts, pos, quat)
            if not noise:
                assert np.percentile(err, 99) < 0.005
            else:
                assert np.median(err) < 0.005
            # The top face sits where the box is: its centroid within 5 mm in xy, height within 5 mm.
            top = pts[pts[:, 2] > pos[2] + HALF[2] - 0.01]
            assert np.linalg.norm(top[:, :2].mean(axis=0) - pos[:2]) < 0.005
            assert abs(np.median(top[:, 2]) - (pos[2] + HALF[2])) < 0.005


def test_noise_grows_with_distance_and_edges_go_missing():
    with SimCell(seed=3) as cell:
        cam = cell.camera
        near = np.full((200, 200), 0.4, dtype=np.float32)
        far = np.full((200, 200), 1.2, dtype=np.float32)
        sd_near = np.nanstd(cam.add_noise(near) - near)
        sd_far = np.nanstd(cam.add_noise(far) - far)
        assert sd_far > 2.0 * sd_near
        step = np.full((100, 100), 0.8, dtype=np.float32)
        step[:, 50:] = 0.6  # a 20 cm depth edge down the middle
        noisy = cam.add_noise(step)
        edge_missing = np.isnan(noisy[:, 49:51]).mean()
        flat_missing = np.isnan(noisy[:, 5:40]).mean()
        assert edge_missing > 0.3
        assert flat_missing < 0.02


def test_same_seed_gives_the_same_frame_and_another_seed_does_not():
    frames = []
    for seed in (5, 5, 6):
        with SimCell(seed=seed) as cell:
            frames.append(cell.camera.capture().depth)
    same = np.array_equal(frames[0], frames[1], equal_nan=True)
    assert same
    assert not np.array_equal(frames[0], frames[2], equal_nan=True)
