"""Depth image -> tote crop, floor, normals, item clusters (grasping.pointcloud), on ray-cast scenes."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import (
    TOTE,
    Box,
    box_on_floor,
    lying_cylinder,
    render,
    rot_z,
    sphere_on_floor,
    standing_cylinder,
)

from grasping.pointcloud import NO_CLUSTER, CloudConfig, segment_scene, tote_roi
from grasping.types import Bounds, Frame

TEN_ITEMS = [
    box_on_floor(-0.22, -0.12, 0.06, 0.04, 0.05, 0.3),
    box_on_floor(-0.10, -0.12, 0.10, 0.05, 0.03, 1.2),
    standing_cylinder(0.02, -0.12, 0.03, 0.08),
    sphere_on_floor(0.14, -0.12, 0.035),
    lying_cylinder(0.22, -0.05, 0.02, 0.10, 1.6),
    box_on_floor(-0.22, 0.08, 0.05, 0.05, 0.09, 0.7),
    sphere_on_floor(-0.10, 0.10, 0.025),
    lying_cylinder(0.00, 0.06, 0.025, 0.12, 0.2),
    box_on_floor(0.12, 0.10, 0.07, 0.07, 0.04, 0.0),
    standing_cylinder(0.22, 0.12, 0.025, 0.12),
]


@pytest.fixture(scope="module")
def ten_item_frame() -> Frame:
    return render(TEN_ITEMS, noise_sigma_m=0.0015, seed=1)


def test_roi_covers_the_tote_and_stays_inside_the_image(ten_item_frame):
    u0, v0, u1, v1 = tote_roi(ten_item_frame, TOTE)
    assert 0 <= u0 < u1 <= 640 and 0 <= v0 < v1 <= 480
    # The tote floor's corners (z = 0) project inside the rectangle.
    K, T = ten_item_frame.K, ten_item_frame.T_base_camera
    for x in (TOTE.lo[0], TOTE.hi[0]):
        for y in (TOTE.lo[1], TOTE.hi[1]):
            p = np.linalg.inv(T) @ np.array([x, y, 0.0, 1.0])
            u, v = K[0, 0] * p[0] / p[2] + K[0, 2], K[1, 1] * p[1] / p[2] + K[1, 2]
            assert u0 <= u <= u1 and v0 <= v <= v1


def test_one_box_is_one_cluster_with_its_true_extent_and_upward_normals():
    frame = render([box_on_floor(0.05, -0.03, 0.08, 0.06, 0.05, 0.0)], noise_sigma_m=0.0015)
    cloud = segment_scene(frame, TOTE)
    assert cloud.n_clusters == 1
    c = cloud.clusters[0]
    np.testing.assert_allclose(c.centroid[:2], [0.05, -0.03], atol=0.006)
    assert abs(c.hi[2] - 0.05) < 0.006  # top of the box
    np.testing.assert_allclose(c.extents[:2], [0.08, 0.06], atol=0.012)
    assert abs(cloud.floor_z - 0.0) < 0.002
    top = cloud.voxel_points[:, 2] > 0.045
    n = cloud.voxel_normals[top]
    n = n[np.isfinite(n).all(axis=1)]
    assert len(n) > 100
    assert np.median(n[:, 2]) > 0.995


def test_ten_separated_items_give_ten_clusters(ten_item_frame):
    cloud = segment_scene(ten_item_frame, TOTE)
    assert cloud.n_clusters == 10
    # Each true item centre (x, y) has exactly one cluster centroid within 3 cm.
    cents = np.array([c.centroid[:2] for c in cloud.clusters])
    for s in TEN_ITEMS:
        d = np.linalg.norm(cents - np.asarray(s.centre)[:2], axis=1)
        assert (d < 0.03).sum() == 1, (s, d.min())


def test_floor_and_walls_are_not_items(ten_item_frame):
    cloud = segment_scene(ten_item_frame, TOTE)
    labelled = cloud.labels != NO_CLUSTER
    p = cloud.points_base[labelled]
    assert (p[:, 2] > cloud.floor_z + 0.005).all()
    margin = CloudConfig().wall_margin_m
    assert (p[:, 0] > TOTE.lo[0] + margin - 1e-9).all() and (p[:, 0] < TOTE.hi[0] - margin + 1e-9).all()
    assert (p[:, 1] > TOTE.lo[1] + margin - 1e-9).all() and (p[:, 1] < TOTE.hi[1] - margin + 1e-9).all()


def test_empty_tote_has_no_clusters():
    cloud = segment_scene(render([], noise_sigma_m=0.002), TOTE)
    assert cloud.n_clusters == 0
    assert (cloud.labels == NO_CLUSTER).all()
    assert len(cloud.voxel_points) == 0


def test_nan_and_zero_pixels_are_ignored():
    items = [box_on_floor(-0.1, 0.0, 0.06, 0.05, 0.04, 0.4), sphere_on_floor(0.1, 0.05, 0.03)]
    clean = segment_scene(render(items), TOTE)
    holes = segment_scene(render(items, nan_fraction=0.05, zero_fraction=0.05, seed=3), TOTE)
    assert clean.n_clusters == holes.n_clusters == 2
    assert np.isfinite(holes.voxel_points).all()
    for a, b in zip(clean.clusters, holes.clusters, strict=True):
        np.testing.assert_allclose(a.centroid, b.centroid, atol=0.003)
        np.testing.assert_allclose(a.hi, b.hi, atol=0.004)


def test_all_invalid_depth_gives_an_empty_scene_not_an_error():
    frame = render([box_on_floor(0, 0, 0.05, 0.05, 0.05)])
    for bad in (np.full(frame.shape, np.nan, np.float32), np.zeros(frame.shape, np.float32)):
        f = Frame(depth=bad, rgb=frame.rgb, K=frame.K, T_base_camera=frame.T_base_camera)
        assert segment_scene(f, TOTE).n_clusters == 0


def test_items_outside_the_tote_are_cropped_away():
    # The same box, but the tote's bounds are moved away from it: nothing left to cluster.
    frame = render([box_on_floor(0.0, 0.0, 0.05, 0.05, 0.05)])
    elsewhere = Bounds(np.array([0.1, 0.05, 0.0]), np.array([0.3, 0.2, 0.2]))
    assert segment_scene(frame, elsewhere).n_clusters == 0


def test_bad_config_is_refused():
    frame = render([])
    with pytest.raises(ValueError, match="pixel_stride"):
        segment_scene(frame, TOTE, CloudConfig(pixel_stride=0))


def test_a_thin_item_lying_on_another_is_a_separate_item():
    # A 2 cm book lying on a wide box: they touch, but the book's edges are depth steps.
    # (Thinner items, about 1 cm and less, merge with what they lie on: see the report.)
    base = box_on_floor(0.0, 0.0, 0.16, 0.12, 0.05)
    board = Box(np.array([0.03, 0.01, 0.06]), np.array([0.07, 0.05, 0.02]), rot_z(0.4))
    cloud = segment_scene(render([base, board], noise_sigma_m=0.0015), TOTE)
    assert cloud.n_clusters == 2
    tops = sorted(c.hi[2] for c in cloud.clusters)
    assert tops[0] == pytest.approx(0.05, abs=0.005) and tops[1] == pytest.approx(0.07, abs=0.005)


def test_items_sticking_out_above_the_rim_are_kept():
    tall = box_on_floor(0.0, 0.0, 0.06, 0.06, 0.26)  # the tote is 0.20 m deep
    cloud = segment_scene(render([tall]), TOTE)
    assert cloud.n_clusters == 1
    assert cloud.clusters[0].hi[2] == pytest.approx(0.26, abs=0.005)


def test_a_small_part_lying_alone_is_kept_by_the_isolated_cluster_rule_and_not_beside_a_big_item():
    """A 16 x 12 x 12 mm part shows fewer voxels than `min_cluster_voxels` (12): dropped as noise,
    the cell never sees it (procedural small parts: 47% of visible ones found, stop 34). With
    `min_isolated_cluster_voxels` it is kept when it lies apart from every bigger cluster; a small
    piece right beside a big item stays out (the fragments of one item are mostly like that)."""
    part = box_on_floor(0.05, 0.02, 0.016, 0.012, 0.012)
    alone = render([part], noise_sigma_m=0.0015, seed=3)
    isolated = CloudConfig(min_isolated_cluster_voxels=4, isolation_m=0.02)
    assert segment_scene(alone, TOTE, CloudConfig(min_isolated_cluster_voxels=12)).n_clusters == 0
    cloud = segment_scene(alone, TOTE, isolated)
    assert cloud.n_clusters == 1
    np.testing.assert_allclose(cloud.clusters[0].centroid[:2], [0.05, 0.02], atol=0.006)
    # The same part 1 cm from a big box: it is not taken as an item of its own.
    box = box_on_floor(0.05 + 0.008 + 0.01 + 0.04, 0.02, 0.08, 0.08, 0.014)
    beside = render([part, box], noise_sigma_m=0.0015, seed=3)
    assert segment_scene(beside, TOTE, isolated).n_clusters == 1
