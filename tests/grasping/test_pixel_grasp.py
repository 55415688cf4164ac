"""A clicked pixel becomes a suction grasp along the local surface normal, or a clear error."""

import numpy as np
import pytest

from grasping.pixel_grasp import PixelGraspError, grasp_from_pixel
from grasping.types import Frame

H, W = 120, 160
K = np.array([[150.0, 0, W / 2], [0, 150.0, H / 2], [0, 0, 1]])
# Camera 1 m above the base origin looking straight down (OpenCV axes: x right, y down, z forward).
T_base_camera = np.eye(4)
T_base_camera[:3, :3] = np.diag([1.0, -1.0, -1.0])
T_base_camera[2, 3] = 1.0


def _frame(depth: np.ndarray) -> Frame:
    return Frame(depth=depth, rgb=np.zeros((H, W, 3), np.uint8), K=K, T_base_camera=T_base_camera)


def test_flat_floor_gives_top_down_grasp_at_the_clicked_point():
    depth = np.full((H, W), 0.8, np.float32)  # a floor 0.2 m above the base
    g = grasp_from_pixel(_frame(depth), 100, 40)
    assert g.gripper == "suction"
    np.testing.assert_allclose(g.approach, [0, 0, -1], atol=1e-6)
    # pixel (100, 40): x = (100-80)*0.8/150, y = -(40-60)*0.8/150 in the base frame
    np.testing.assert_allclose(g.position, [20 * 0.8 / 150, 20 * 0.8 / 150, 0.2], atol=1e-6)


def test_tilted_plane_gives_approach_along_its_normal():
    vv, uu = np.mgrid[0:H, 0:W]
    # plane z_cam = 0.8 + 0.2 * x_cam  ->  tilted about the camera y axis
    x_over_z = (uu - W / 2) / 150.0
    depth = (0.8 / (1 - 0.2 * x_over_z)).astype(np.float32)
    g = grasp_from_pixel(_frame(depth), 80, 60)
    # The plane z - 0.2 x = 0.8 has normal (-0.2, 0, 1); flipped to face the camera: (0.2, 0, -1).
    n_expected = np.array([0.2, 0.0, -1.0]) / np.linalg.norm([0.2, 0.0, -1.0])
    n_base = T_base_camera[:3, :3] @ n_expected
    np.testing.assert_allclose(g.approach, -n_base, atol=1e-3)


def test_no_depth_at_the_click_is_a_clear_error():
    depth = np.full((H, W), np.nan, np.float32)
    with pytest.raises(PixelGraspError, match="valid depth"):
        grasp_from_pixel(_frame(depth), 50, 50)


def test_outside_the_image_is_a_clear_error():
    with pytest.raises(PixelGraspError, match="outside"):
        grasp_from_pixel(_frame(np.full((H, W), 0.8, np.float32)), W + 3, 5)


def test_rough_surface_is_refused():
    rng = np.random.default_rng(0)
    depth = (0.8 + rng.uniform(-0.02, 0.02, (H, W))).astype(np.float32)
    with pytest.raises(PixelGraspError, match="not flat enough"):
        grasp_from_pixel(_frame(depth), 80, 60)


def test_a_click_far_outside_the_tote_is_a_clear_error_not_a_crash():
    """A point answer whose pixel lies left of or above the tote's grid once raised numpy's
    "negative dimensions" ValueError inside the controller (a reversed search window) and stopped the
    cell mid-tote. It is a PixelGraspError, which the controller logs and re-asks on."""
    from types import SimpleNamespace

    from grasping.pixel_candidate import _click_cell
    from grasping.pointcloud import NO_CLUSTER

    labels = np.full((40, 60), NO_CLUSTER, dtype=np.int32)
    labels[10:20, 10:30] = 0  # one item
    cloud = SimpleNamespace(labels=labels, valid=np.ones((40, 60), bool), u0=200, v0=100, stride=2)
    assert _click_cell(cloud, 200 + 2 * 15, 100 + 2 * 12, search_px=6) == (12, 15)
    for u, v in ((0, 0), (5, 300), (600, 10), (400, 479)):  # left, above, right, below the grid
        with pytest.raises(PixelGraspError, match="outside the tote"):
            _click_cell(cloud, u, v, search_px=6)
    with pytest.raises(PixelGraspError, match="no item"):
        _click_cell(cloud, 200 + 2 * 50, 100 + 2 * 35, search_px=6)  # inside, on the floor
