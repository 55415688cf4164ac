"""The item-level watchdog: shape descriptors of segmented items, kNN density, model-file round trip."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from synthetic import TOTE, Box, box_on_floor, lying_cylinder, render, sphere_on_floor
from test_modelfile import write_model

from grasping.learned_scorer import LearnedScorer
from grasping.modelfile import ModelFileError, load_model, save_model, sidecar_path
from grasping.planner import PlannerConfig, plan_detailed
from grasping.pointcloud import segment_scene
from grasping.watchdog import (
    ITEM_FEATURES,
    ItemWatchdog,
    boundary_steps,
    fit_item_watchdog,
    item_descriptor,
    item_watchdog_of,
    scene_item_descriptors,
    split_halves,
)

# Per-feature tolerance for "the same item seen elsewhere in the tote": log sizes within ~12%,
# fractions and ratios within 0.15, dimensionless curvature within 0.5, log roughness within 0.7
# (with 2 mm depth noise, as in the simulated camera, its floor is the noise). The camera sees a
# little more of an item's side away from the image centre, which is what these tolerances absorb.
_TOL = {
    "log_length": 0.12,
    "log_width": 0.12,
    "log_height": 0.12,
    "width_over_length": 0.12,
    "height_over_width": 0.2,
    "curvature_across": 0.5,
    "log_roughness": 0.7,
    "log_sphere_residual": 0.7,
    "log_sphere_relative_residual": 0.7,
}


def descriptors_of(shapes) -> np.ndarray:
    cloud = segment_scene(render(shapes, noise_sigma_m=0.002, seed=1), TOTE)
    return scene_item_descriptors(cloud)


# A flat top is a sphere of infinite radius: the sphere fit is degenerate there and follows whichever
# smoothed edge cells the camera sees, so on a box the sphere features move by up to ~2.5 in log as
# the box moves (on curved items they stay within 0.35). The watchdog's bank holds boxes seen all over
# the tote, so this spread is part of "in distribution"; what matters is that a box never looks like
# a ball (test_descriptor_tells_shapes_apart).
_FLAT_TOP_TOL = {"log_sphere_residual": 2.6, "log_sphere_relative_residual": 2.6}


def assert_same_item(d0: np.ndarray, d1: np.ndarray, flat_top: bool = False) -> None:
    for i, name in enumerate(ITEM_FEATURES):
        tol = (_FLAT_TOP_TOL.get(name) if flat_top else None) or _TOL.get(name, 0.15)
        assert abs(d0[i] - d1[i]) <= tol, f"{name}: {d0[i]:.3f} vs {d1[i]:.3f} (tolerance {tol})"


@pytest.mark.parametrize(
    ("make", "flat_top"),
    [
        (lambda x, y, yaw: box_on_floor(x, y, 0.12, 0.07, 0.05, yaw), True),
        (lambda x, y, yaw: lying_cylinder(x, y, 0.025, 0.2, yaw), False),
        (lambda x, y, yaw: sphere_on_floor(x, y, 0.035), False),
    ],
    ids=["box", "lying_cylinder", "ball"],
)
def test_descriptor_does_not_depend_on_where_the_item_lies_or_its_yaw(make, flat_top) -> None:
    ref = descriptors_of([make(0.0, 0.0, 0.0)])
    assert ref.shape == (1, len(ITEM_FEATURES))
    for x, y, yaw in ((0.12, 0.05, 0.7), (-0.1, -0.06, 2.0), (0.05, -0.08, np.pi / 2)):
        moved = descriptors_of([make(x, y, yaw)])
        assert moved.shape == (1, len(ITEM_FEATURES))
        assert_same_item(ref[0], moved[0], flat_top)


def test_descriptor_tells_shapes_apart() -> None:
    """What the features mean: a box top is flat, a lying cylinder curves across, a ball is a sphere."""
    f = {n: i for i, n in enumerate(ITEM_FEATURES)}
    box, cyl, ball = descriptors_of(
        [
            box_on_floor(-0.17, 0.0, 0.1, 0.08, 0.05),
            lying_cylinder(0.0, 0.0, 0.025, 0.2),
            sphere_on_floor(0.2, 0.0, 0.035),
        ]
    )
    assert abs(box[f["curvature_across"]]) < 0.5
    assert cyl[f["curvature_across"]] > 1.0 and ball[f["curvature_across"]] > 1.0
    # The ball's cap fits a sphere to about the sensor noise (2 mm, smoothed): well under the others.
    rel = f["log_sphere_relative_residual"]
    assert ball[rel] < min(box[rel], cyl[rel]) - 0.5
    assert np.exp(ball[f["log_sphere_residual"]]) < 0.0015
    assert cyl[f["width_over_length"]] < 0.4 < box[f["width_over_length"]] < ball[f["width_over_length"]]
    assert np.exp(cyl[f["log_length"]]) == pytest.approx(0.2, abs=0.02)
    assert np.exp(ball[f["log_height"]]) == pytest.approx(0.07, abs=0.01)


def by_height(desc: np.ndarray) -> np.ndarray:
    """Descriptors sorted by the items' height above the floor (cluster order is not input order)."""
    return desc[np.argsort(desc[:, ITEM_FEATURES.index("log_height")])]


def test_boundary_features_see_a_thin_mailer_and_an_item_lying_on_another() -> None:
    f = {n: i for i, n in enumerate(ITEM_FEATURES)}
    # A 2 cm mailer and an 8 cm carton side by side on the floor: only the mailer's edge is thin.
    mailer, carton = by_height(
        descriptors_of([box_on_floor(-0.1, 0.0, 0.25, 0.18, 0.02), box_on_floor(0.17, 0.0, 0.12, 0.1, 0.08)])
    )
    assert mailer[f["thin_edge"]] > 0.8 and carton[f["thin_edge"]] < 0.3
    assert mailer[f["occluded"]] < 0.05 and carton[f["occluded"]] < 0.05
    # A box lying across part of another: the lower one's edge runs into a higher surface there.
    lower, upper = by_height(
        descriptors_of(
            [
                box_on_floor(0.0, 0.0, 0.2, 0.15, 0.05),
                Box(np.array([0.08, 0.0, 0.08]), np.array([0.1, 0.1, 0.06]), np.eye(3)),
            ]
        )
    )
    assert lower[f["occluded"]] > 0.15 and upper[f["occluded"]] < 0.05


def test_boundary_steps_pairs_each_item_edge_with_the_cell_outside() -> None:
    labels = np.full((9, 9), -1)
    labels[3:6, 3:6] = 0  # a 3x3 item
    z = np.zeros((9, 9))
    z[3:6, 3:6] = 0.02  # 2 cm above the floor around it
    z[:, 7:] = 0.1  # a taller neighbour two cells to the right of the item's right edge
    nz = np.ones((9, 9))
    nz[5, 3:6] = 0.2  # the item's bottom row is a steep side wall
    lab, pairs = boundary_steps(labels, z, nz)
    assert (lab == 0).all() and pairs.shape == (len(lab), 3) and len(lab) > 0
    step = pairs[:, 0]
    assert np.isclose(step, 0.02).sum() > 0 and np.isclose(step, -0.08).sum() > 0
    assert set(np.round(step, 3)) <= {0.02, -0.08}
    assert set(np.round(pairs[:, 1], 3)) == {1.0, 0.2}  # the edge cell's normal z rides along
    assert set(np.round(pairs[:, 2], 3)) == {1.0}
    z[4, 7] = np.nan  # unknown depth outside: that pair is skipped, not counted as a step
    assert len(boundary_steps(labels, z, nz)[0]) < len(lab)
    # Without boundary information the boundary features are 0, not NaN.
    rng = np.random.default_rng(0)
    pts = np.c_[rng.uniform(0, 0.1, (200, 2)), np.full(200, 0.03)]
    nrm = np.tile([0.0, 0.0, 1.0], (200, 1))
    d = item_descriptor(pts, nrm, 0.0)
    assert d is not None and d[f_index("occluded")] == 0.0 and d[f_index("thin_edge")] == 0.0
    assert np.isfinite(d).all()


def test_calibration_halves_are_disjoint_cover_every_scene_and_mix_alternating_catalogs() -> None:
    ref, thr = split_halves(60)
    assert len(ref) == len(thr) == 30
    assert set(ref).isdisjoint(thr) and set(ref) | set(thr) == set(range(60))
    # Calibration totes alternate train / procedural-train: each half must hold both (even/odd did not).
    for half in (ref, thr):
        assert 10 <= np.count_nonzero(half % 2 == 0) <= 20
    np.testing.assert_array_equal(split_halves(60)[0], ref)  # seeded: the same split every time
    odd_ref, odd_thr = split_halves(7)
    assert len(odd_ref) == 4 and len(odd_thr) == 3


def f_index(name: str) -> int:
    return ITEM_FEATURES.index(name)


def test_too_few_points_give_no_descriptor() -> None:
    p = np.zeros((5, 3))
    assert item_descriptor(p, np.full((5, 3), np.nan), 0.0) is None


def box_scene(seed: int, n: int = 5) -> list:
    """n boxes of random size and yaw on a jittered 3x2 grid (no overlaps)."""
    rng = np.random.default_rng(seed)
    slots = [(x, y) for x in (-0.18, 0.0, 0.18) for y in (-0.09, 0.09)]
    out = []
    for k in rng.permutation(len(slots))[:n]:
        x, y = slots[k]
        out.append(
            box_on_floor(
                x + rng.uniform(-0.01, 0.01),
                y + rng.uniform(-0.01, 0.01),
                rng.uniform(0.06, 0.12),
                rng.uniform(0.05, 0.08),
                rng.uniform(0.03, 0.08),
                rng.uniform(0, np.pi),
            )
        )
    return out


@pytest.fixture(scope="module")
def box_watchdog() -> ItemWatchdog:
    scenes = [descriptors_of(box_scene(s)) for s in range(8)]
    wd, info = fit_item_watchdog(scenes, k=5, scene_quantile=0.75, quantile=0.9)
    assert info["item_watchdog_scenes"] == 8 and info["item_watchdog_items"] >= 35
    return wd


def test_a_watchdog_fitted_on_boxes_flags_thin_cylinders_and_spheres_not_fresh_boxes(box_watchdog) -> None:
    wd = box_watchdog
    fresh = [wd.score(descriptors_of(box_scene(100 + s)))[1] for s in range(3)]
    tubes = [lying_cylinder(-0.1, y, 0.015, 0.25, 0.1) for y in (-0.12, -0.04, 0.04, 0.12)]
    balls = [sphere_on_floor(x, y, 0.035) for x in (-0.15, 0.0, 0.15) for y in (-0.08, 0.08)]
    _, tube_sigma, tube_in = wd.score(descriptors_of(tubes))
    items, ball_sigma, ball_in = wd.score(descriptors_of(balls))
    assert items.shape == (6,)
    assert not tube_in and not ball_in
    assert all(s <= wd.threshold_sigma for s in fresh), fresh
    assert min(tube_sigma, ball_sigma) > max(fresh) + 2.0


def test_fit_refuses_too_little_data() -> None:
    d = np.zeros((1, len(ITEM_FEATURES)))
    with pytest.raises(ValueError, match="at least 4 scenes"):
        fit_item_watchdog([d, d, d])
    with pytest.raises(ValueError, match="NaN"):
        fit_item_watchdog([np.full((3, len(ITEM_FEATURES)), np.nan)] * 4)


def save_with_item_watchdog(src, dst, wd: ItemWatchdog) -> str:
    m = load_model(src)
    return save_model(dst, m.net, m.calibrators, m.thresholds, m.watchdog, m.meta, item_watchdog=wd)


def test_model_file_round_trips_the_item_watchdog_and_the_planner_uses_it(tmp_path, box_watchdog) -> None:
    write_model(tmp_path / "old.safetensors")
    path = tmp_path / "m.safetensors"
    save_with_item_watchdog(tmp_path / "old.safetensors", path, box_watchdog)
    got = load_model(path).item_watchdog
    assert got is not None
    for name in ("center", "scale", "bank", "radius"):
        np.testing.assert_array_equal(getattr(got, name), getattr(box_watchdog, name))
    for name in ("k", "scene_quantile", "scene_mu", "scene_sd", "threshold_sigma", "quantile", "version"):
        assert getattr(got, name) == getattr(box_watchdog, name)
    # The planner's scene verdict comes from the item watchdog: a scene of spheres is flagged.
    scorer = LearnedScorer.from_file(path)
    assert item_watchdog_of(scorer) is not None
    # The small test model takes 4 analytic features; the planner computes more.
    frame = render([sphere_on_floor(x, y, 0.035) for x in (-0.15, 0.0, 0.15) for y in (-0.08, 0.08)])
    detail = plan_detailed(frame, PlannerConfig(tote=TOTE, scorer=_FirstFeatures(scorer)))
    _, sigma, in_dist = got.score_cloud(detail.cloud)
    assert detail.plan.scene_ood_sigma == pytest.approx(sigma)
    assert detail.plan.in_distribution is in_dist is False
    assert any("out of distribution" in r for r in detail.plan.reasons)


class _FirstFeatures:
    """Wraps the small test model (4 analytic features) so it accepts the planner's feature rows."""

    def __init__(self, inner: LearnedScorer) -> None:
        self.inner = inner
        self.version = inner.version
        self.model = inner.model

    def score(self, patches, features, gripper):
        return self.inner.score(patches, features[:, :4], gripper)


def test_a_model_file_without_an_item_watchdog_still_loads_with_a_log_line(tmp_path, caplog) -> None:
    path = tmp_path / "old.safetensors"
    write_model(path)  # the format as written before item watchdogs existed
    with caplog.at_level(logging.INFO, logger="grasping.modelfile"):
        m = load_model(path)
    assert m.item_watchdog is None and m.watchdog.dim == 64
    assert "no item watchdog" in caplog.text
    assert item_watchdog_of(LearnedScorer(m)) is None


def test_an_item_watchdog_of_another_descriptor_version_is_ignored(tmp_path, box_watchdog, caplog) -> None:
    from dataclasses import replace

    write_model(tmp_path / "old.safetensors")
    path = tmp_path / "m.safetensors"
    newer = replace(box_watchdog)
    object.__setattr__(newer, "version", 999)  # as a newer pickcell's file would say (no check here)
    save_with_item_watchdog(tmp_path / "old.safetensors", path, newer)
    with caplog.at_level(logging.WARNING, logger="grasping.modelfile"):
        assert load_model(path).item_watchdog is None
    assert "descriptor version 999" in caplog.text


def test_an_incomplete_item_watchdog_is_a_corrupt_file(tmp_path, box_watchdog) -> None:
    write_model(tmp_path / "old.safetensors")
    path = tmp_path / "m.safetensors"
    save_with_item_watchdog(tmp_path / "old.safetensors", path, box_watchdog)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    del tensors["item_watchdog.radius"]
    save_file(tensors, path, metadata=meta)
    sidecar_path(path).unlink()
    with pytest.raises(ModelFileError, match="item_watchdog.radius"):
        load_model(path)


def test_an_opening_is_measured_only_where_the_item_encloses_something_lower() -> None:
    """A frame's window shows what lies below it; something lying on an item, or a dropout in its
    depth, is not an opening."""
    from grasping.watchdog import item_openings

    labels = np.full((30, 30), -1)
    z = np.zeros((30, 30))
    labels[5:25, 5:25] = 0  # item 0: a 20x20-cell frame, 2 cm thick, with a 10x10 window
    z[5:25, 5:25] = 0.02
    labels[10:20, 10:20] = -1
    z[10:20, 10:20] = 0.0  # the floor seen through the window
    share = item_openings(labels, z, 1)
    assert share[0] == pytest.approx(100 / 400)
    z[10:20, 10:20] = 0.05  # something lying on the item instead: higher, not an opening
    labels[10:20, 10:20] = 1
    assert item_openings(labels, z, 2)[0] == 0.0
    labels[10:20, 10:20] = -1
    z[10:20, 10:20] = np.nan  # unknown depth: a dropout, not an opening
    assert item_openings(labels, z, 1)[0] == 0.0
    z[10:20, 10:20] = 0.0
    labels[10:20, 10:20] = 0
    labels[14:16, 14:16] = -1  # a 2x2-cell gap (4 cells) is below the minimum: noise
    assert item_openings(labels, z, 1)[0] == 0.0
    assert item_openings(np.full((4, 4), -1), np.zeros((4, 4)), 3).tolist() == [0.0, 0.0, 0.0]


def test_an_item_watchdog_of_an_older_descriptor_version_reads_its_prefix(box_watchdog) -> None:
    """Descriptor versions only append features: a version-2 watchdog scores a version-3 descriptor
    exactly as it scores the descriptor's first 18 features, and ignores the opening."""
    from grasping.watchdog import ITEM_FEATURE_COUNT

    f2 = ITEM_FEATURE_COUNT[2]
    raw = box_watchdog.bank * box_watchdog.scale + box_watchdog.center
    scenes = [raw[i : i + 6] for i in range(6, len(raw), 6)]  # the first 6 boxes are held out
    old, _ = fit_item_watchdog([s[:, :f2] for s in scenes], version=2)
    assert old.version == 2 and old.center.shape == (f2,)
    d = raw[:6]
    d_open = d.copy()
    d_open[:, ITEM_FEATURES.index("opening")] = 0.4
    np.testing.assert_allclose(old.item_scores(d_open), old.item_scores(d[:, :f2]))
    new, _ = fit_item_watchdog(scenes)
    assert (new.item_scores(d_open) > 2 * new.item_scores(d)).all()  # the current one sees the window
    with pytest.raises(ValueError, match="features"):
        new.item_scores(d[:, :f2])  # too short for a version-3 watchdog


def picture_frame(x: float, y: float, length: float = 0.18, width: float = 0.14, bar: float = 0.035) -> list:
    """A frame lying flat: four 2 cm thick bars around a window (one item to the segmentation)."""
    t = 0.02
    return [
        box_on_floor(x, y + (width - bar) / 2, length, bar, t),
        box_on_floor(x, y - (width - bar) / 2, length, bar, t),
        box_on_floor(x + (length - bar) / 2, y, bar, width - 2 * bar, t),
        box_on_floor(x - (length - bar) / 2, y, bar, width - 2 * bar, t),
    ]


def test_a_picture_frame_among_boxes_is_set_apart_by_its_window(box_watchdog) -> None:
    """A frame's window is measured through the whole chain (render, segment, describe, score): the
    frame is the most unusual item of the tote, its boxes are not, and its opening is what makes
    most of the difference."""
    boxes = [box_on_floor(0.17, y, 0.09, 0.06, 0.05, 0.3) for y in (-0.09, 0.09)]
    cloud = segment_scene(render(picture_frame(-0.08, 0.0) + boxes, noise_sigma_m=0.002, seed=1), TOTE)
    assert cloud.n_clusters == 3
    desc = scene_item_descriptors(cloud)
    col = ITEM_FEATURES.index("opening")
    frame = int(np.argmax(desc[:, col]))
    # Window 11 x 7 cm in an 18 x 14 cm outline: 0.31 of it.
    assert 0.2 < desc[frame, col] < 0.4 and np.delete(desc[:, col], frame).max() == 0.0
    scores = box_watchdog.item_scores(desc)
    assert scores[frame] > 2.0 * np.delete(scores, frame).max()
    shut = desc.copy()
    shut[frame, col] = 0.0  # the same frame without its window
    assert box_watchdog.item_scores(shut)[frame] < 0.75 * scores[frame]
