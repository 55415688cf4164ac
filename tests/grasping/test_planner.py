"""plan(frame, config) -> Plan end to end on ray-cast scenes; patches; the picture; frame files; the CLI."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from synthetic import TOTE, box_on_floor, lying_cylinder, random_scene, render, sphere_on_floor

from grasping.draw import draw_plan, render_plan_png
from grasping.framefile import FrameFileError, load_frame, save_frame
from grasping.patches import FEATURE_NAMES, HEIGHT_CLIP_M, PATCH_CHANNELS, PATCH_SIZE, extract_patches
from grasping.planner import PlannerConfig, matrices_to_quats, plan, plan_detailed
from grasping.pointcloud import segment_scene
from grasping.scoring import PARALLEL_JAW, SUCTION, ScoreResult
from grasping.types import Frame, matrix_to_quat, quat_to_matrix
from pickcell.cli import main as pickcell_main

F = {n: i for i, n in enumerate(FEATURE_NAMES)}


class FeatureScorer:
    """A real (if simple) Scorer for wiring tests: p = a fixed function of the analytic features.

    calibrated = 0.5 * analytic + 0.25 for jaws (so the order differs from the analytic one),
    0.9 * analytic ** 2 for suction; the threshold, scene sigma and verdict are constructor arguments.
    """

    def __init__(self, threshold: float, sigma: float, in_dist: bool, version: str = "test-scorer-1") -> None:
        self.version = version
        self.threshold = threshold
        self.sigma = sigma
        self.in_dist = in_dist
        self.seen: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []

    def score(self, patches: np.ndarray, features: np.ndarray, gripper: np.ndarray) -> ScoreResult:
        self.seen.append((patches.shape, features.shape, gripper.shape))
        a = features[:, F["analytic_score"]].astype(np.float64)
        cal = np.where(gripper == PARALLEL_JAW, 0.5 * a + 0.25, 0.9 * a**2)
        return ScoreResult(
            learned=np.clip(cal + 0.01, 0, 1),
            calibrated=cal,
            ood=np.full(len(a), self.sigma),
            scene_ood_sigma=self.sigma,
            in_distribution=self.in_dist,
            threshold=self.threshold,
        )


@pytest.fixture(scope="module")
def scene10() -> Frame:
    return render(random_scene(11, n_items=10), noise_sigma_m=0.0015, nan_fraction=0.005, seed=11)


def test_empty_tote_plan_says_empty_with_the_reason():
    p = plan(render([], noise_sigma_m=0.002), PlannerConfig(tote=TOTE))
    assert p.decision == "empty"
    assert p.candidates == ()
    assert any("tote empty" in r for r in p.reasons)
    assert p.best is None
    assert p.patches is not None and p.patches.shape == (0, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE)
    assert p.features.shape == (0, len(FEATURE_NAMES))


def test_an_item_too_small_to_make_out_leaves_an_empty_plan_that_says_something_is_left():
    # A 1 cm cube: a few points stand above the floor, too few for the segmentation to call an item.
    p = plan(
        render([box_on_floor(0.0, 0.0, 0.01, 0.01, 0.01)], noise_sigma_m=0.0015, seed=1),
        PlannerConfig(tote=TOTE),
    )
    assert p.decision == "empty" and p.clusters == () and p.stray_voxels >= 2
    assert "something small is left" in p.reasons[0]
    # A really empty tote, with the same noise: none.
    p = plan(render([], noise_sigma_m=0.0015, seed=1), PlannerConfig(tote=TOTE))
    assert p.decision == "empty" and p.stray_voxels == 0 and "tote empty" in p.reasons[0]


def test_items_without_any_feasible_grasp_make_the_planner_ask():
    # A cup far larger than the box and a jaw that opens 1 cm: nothing passes the geometric checks.
    frame = render([box_on_floor(0.0, 0.0, 0.05, 0.05, 0.05)])
    p = plan(frame, PlannerConfig(tote=TOTE, cup_diameter_m=0.2, max_opening_m=0.01))
    assert len(p.clusters) == 1 and p.candidates == ()
    assert p.decision == "ask"
    assert p.reasons == ("items seen but no candidate passed the geometric checks",)


def test_ten_item_scene_gives_hundreds_of_candidates_over_every_item(scene10):
    d = plan_detailed(scene10, PlannerConfig(tote=TOTE))
    p = d.plan
    assert len(p.clusters) == 10
    assert len(p.candidates) >= 300
    per_item = Counter(c.cluster for c in p.candidates)
    assert set(per_item) == set(range(10))
    kinds = Counter(c.grasp.gripper for c in p.candidates)
    assert kinds["suction"] >= 100 and kinds["parallel_jaw"] >= 50
    scores = [c.score for c in p.candidates]
    assert scores == sorted(scores, reverse=True)
    assert p.patches.shape == (len(p.candidates), PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE)
    assert p.features.shape == (len(p.candidates), len(FEATURE_NAMES))
    assert p.patches.dtype == np.float32 and p.features.dtype == np.float32
    assert np.isfinite(p.patches).all() and np.isfinite(p.features).all()
    # Features are aligned with the candidates.
    np.testing.assert_allclose(
        p.features[:, F["analytic_score"]], [c.analytic_score for c in p.candidates], atol=1e-6
    )
    assert p.model_version == "analytic" and p.latency_ms > 0
    # Each candidate's pixel is the projection of its grasp point, inside the image.
    for c in p.candidates[:50]:
        u, v = c.pixel
        assert 0 <= u < 640 and 0 <= v < 480
        p_cam = np.linalg.inv(scene10.T_base_camera) @ np.append(c.grasp.position, 1.0)
        uv = (scene10.K @ p_cam[:3])[:2] / p_cam[2]
        assert np.abs(uv - [u, v]).max() <= 0.5 + 1e-9
    assert p.decision in ("pick", "ask")


def test_same_frame_same_plan(scene10):
    cfg = PlannerConfig(tote=TOTE, seed=3)
    a, b = plan(scene10, cfg), plan(scene10, cfg)
    assert len(a.candidates) == len(b.candidates)
    for x, y in zip(a.candidates, b.candidates, strict=True):
        np.testing.assert_array_equal(x.grasp.position, y.grasp.position)
        np.testing.assert_array_equal(x.grasp.orientation, y.grasp.orientation)
        assert x.analytic_score == y.analytic_score and x.pixel == y.pixel
    np.testing.assert_array_equal(a.patches, b.patches)
    assert a.decision == b.decision and a.reasons == b.reasons


def test_nan_and_zero_pixels_give_the_same_best_pick():
    items = [box_on_floor(-0.1, 0.02, 0.09, 0.07, 0.06, 0.2), sphere_on_floor(0.12, -0.05, 0.03)]
    clean = plan(render(items, noise_sigma_m=0.001), PlannerConfig(tote=TOTE))
    holes = plan(
        render(items, noise_sigma_m=0.001, nan_fraction=0.03, zero_fraction=0.03, seed=5),
        PlannerConfig(tote=TOTE),
    )
    assert clean.decision == holes.decision == "pick"
    for kind in ("suction", "parallel_jaw"):
        bc = next(c for c in clean.candidates if c.grasp.gripper == kind)
        bh = next(c for c in holes.candidates if c.grasp.gripper == kind)
        assert bc.cluster == bh.cluster
        assert np.linalg.norm(bc.grasp.position - bh.grasp.position) < 0.02
        assert abs(bc.score - bh.score) < 0.1
    assert abs(clean.best.score - holes.best.score) < 0.1
    assert abs(len(clean.candidates) - len(holes.candidates)) < 0.2 * len(clean.candidates)


def test_box_is_picked_by_suction_at_its_top_when_it_is_too_wide_for_the_jaw():
    p = plan(
        render([box_on_floor(0.0, 0.0, 0.12, 0.10, 0.07, 0.3)], noise_sigma_m=0.0015),
        PlannerConfig(tote=TOTE),
    )
    assert p.decision == "pick"
    assert all(c.grasp.gripper == "suction" for c in p.candidates)
    assert any("no jaw candidate" in r for r in p.reasons)
    best = p.best.grasp
    assert np.linalg.norm(best.position[:2]) < 0.02 and abs(best.position[2] - 0.07) < 0.005
    np.testing.assert_allclose(best.approach, [0, 0, -1], atol=0.03)


def test_scorer_below_threshold_asks_and_explains(scene10):
    scorer = FeatureScorer(threshold=0.99, sigma=1.2, in_dist=True)
    p = plan(scene10, PlannerConfig(tote=TOTE, scorer=scorer))
    assert p.decision == "ask"
    assert p.threshold == 0.99 and p.model_version == "test-scorer-1"
    assert p.reasons[0].startswith("ask: best p(success)") and "< threshold 0.99" in p.reasons[0]
    assert any(r.startswith("best suction") and "< threshold 0.99" in r for r in p.reasons)
    assert any("scene 1.2 sigma from training data" in r for r in p.reasons)
    # The scorer saw every candidate once, with the planner's patch and feature shapes.
    assert scorer.seen == [
        ((len(p.candidates), 2, 32, 32), (len(p.candidates), len(FEATURE_NAMES)), (len(p.candidates),))
    ]
    # Ranked by the calibrated score, each candidate carrying all three scores.
    ps = [c.p_success for c in p.candidates]
    assert ps == sorted(ps, reverse=True)
    for c in p.candidates:
        expect = (
            0.5 * c.analytic_score + 0.25 if c.grasp.gripper == "parallel_jaw" else 0.9 * c.analytic_score**2
        )
        assert c.p_success == pytest.approx(expect, abs=1e-6)
        assert c.learned_score == pytest.approx(min(1.0, expect + 0.01), abs=1e-6)
        assert c.ood_score == 1.2


def test_out_of_distribution_scene_asks_even_when_confident(scene10):
    p = plan(scene10, PlannerConfig(tote=TOTE, scorer=FeatureScorer(threshold=0.1, sigma=3.1, in_dist=False)))
    assert p.decision == "ask"
    assert not p.in_distribution and p.scene_ood_sigma == 3.1
    assert "scene out of distribution" in p.reasons[0]
    assert any("scene 3.1 sigma from training data" in r for r in p.reasons)


def test_confident_in_distribution_scene_picks(scene10):
    p = plan(scene10, PlannerConfig(tote=TOTE, scorer=FeatureScorer(threshold=0.5, sigma=0.4, in_dist=True)))
    assert p.decision == "pick"
    assert p.best.p_success >= 0.5
    assert p.reasons[0].startswith("pick:")


def test_each_gripper_is_held_to_its_own_threshold(scene10):
    """A scorer with per-gripper thresholds: every candidate carries its gripper's, and the decision
    uses the best candidate's own threshold (not one shared number)."""

    class PerGripper(FeatureScorer):
        def candidate_thresholds(self, gripper: np.ndarray) -> np.ndarray:
            return np.where(np.asarray(gripper) == PARALLEL_JAW, 0.99, 0.05)

    p = plan(scene10, PlannerConfig(tote=TOTE, scorer=PerGripper(threshold=0.5, sigma=0.4, in_dist=True)))
    for c in p.candidates:
        assert c.threshold == (0.99 if c.grasp.gripper == "parallel_jaw" else 0.05)
    best = p.best
    assert (p.decision == "pick") == (best.score >= best.threshold)
    jaw = next(c for c in p.candidates if c.grasp.gripper == "parallel_jaw")
    assert any(r.startswith("best jaw") and "threshold 0.99" in r for r in p.reasons), (jaw, p.reasons)


def test_a_scorer_returning_the_wrong_shape_is_an_error(scene10):
    class Broken(FeatureScorer):
        def score(self, patches, features, gripper):
            r = super().score(patches, features, gripper)
            return ScoreResult(r.learned[:-1], r.calibrated[:-1], r.ood[:-1], 0.0, True, 0.5)

    with pytest.raises(ValueError, match="returned shapes"):
        plan(scene10, PlannerConfig(tote=TOTE, scorer=Broken(0.5, 0.0, True)))


def test_patch_of_a_top_down_grasp_on_a_box_sees_the_top_flat_and_the_floor_below():
    box = box_on_floor(0.0, 0.0, 0.06, 0.06, 0.05)
    cloud = segment_scene(render([box]), TOTE)
    R = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])  # approach down, x along base x
    patch = extract_patches(cloud, np.array([[0.0, 0.0, 0.05]]), R[None])[0]
    assert patch.shape == (2, 32, 32)
    c = PATCH_SIZE // 2
    # Centre: on the top, at the grasp point's height. Corners (6.2 cm away): the floor, 5 cm below,
    # i.e. -5 cm towards the gripper = clipped -1.
    assert np.abs(patch[0, c - 5 : c + 5, c - 5 : c + 5]).max() < 0.05
    assert patch[0, 0, 0] == pytest.approx(-1.0, abs=0.05) and patch[0, -1, -1] == pytest.approx(
        -1.0, abs=0.05
    )
    assert (patch[1] == 1.0).all()
    # Columns run along the grasp's x axis: shifting the grasp 2 cm along x moves the box's far
    # edge (where the height drops below -half the clip range) 5 columns (5 x 4 mm) towards column 0.
    shifted = extract_patches(cloud, np.array([[0.02, 0.0, 0.05]]), R[None])[0]
    edge_col = c + int(np.argmax(patch[0, c, c:] < -0.5))
    edge_col_shifted = c + int(np.argmax(shifted[0, c, c:] < -0.5))
    assert edge_col - edge_col_shifted == pytest.approx(5, abs=1)
    assert (edge_col - c) * 0.004 == pytest.approx(0.03, abs=0.006)  # the box's half width
    assert HEIGHT_CLIP_M == 0.05


def test_patch_outside_the_tote_is_unoccupied():
    cloud = segment_scene(render([box_on_floor(0.0, 0.0, 0.05, 0.05, 0.05)]), TOTE)
    R = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])
    patch = extract_patches(cloud, np.array([[0.29, 0.0, 0.0]]), R[None])[0]
    assert patch[1, :, -5:].max() == 0.0  # beyond the wall: nothing
    assert patch[1, :, :5].min() == 1.0  # the tote floor
    assert (patch[0][patch[1] == 0] == 0).all()


def test_picture_is_a_png_of_the_frame_size(scene10, tmp_path):
    p = plan(scene10, PlannerConfig(tote=TOTE))
    png = render_plan_png(scene10, p)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out = draw_plan(scene10, p, tmp_path / "plan.png", max_candidates=5)
    img = Image.open(out)
    assert img.size == (640, 480) and img.mode == "RGB"
    # Drawing changed pixels compared with the plain RGB image.
    assert (np.asarray(img) != scene10.rgb).any(axis=2).sum() > 500
    empty = plan(render([]), PlannerConfig(tote=TOTE))
    assert Image.open(draw_plan(render([]), empty, tmp_path / "empty.png")).size == (640, 480)
    with pytest.raises(ValueError):
        render_plan_png(scene10, p, max_candidates=-1)


def test_frame_file_round_trip_and_clear_errors(tmp_path, scene10):
    path = save_frame(tmp_path / "f.npz", scene10, TOTE)
    frame, tote = load_frame(path)
    np.testing.assert_array_equal(frame.depth, scene10.depth)  # NaN positions included
    np.testing.assert_array_equal(frame.rgb, scene10.rgb)
    np.testing.assert_array_equal(tote.lo, TOTE.lo)
    _, none = load_frame(save_frame(tmp_path / "g.npz", scene10))
    assert none is None
    with pytest.raises(FrameFileError, match="missing.npz: no such file"):
        load_frame(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FrameFileError, match="junk.npz"):
        load_frame(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", depth=np.zeros((4, 4), np.float32))
    with pytest.raises(FrameFileError, match="missing arrays"):
        load_frame(tmp_path / "partial.npz")
    np.savez(
        tmp_path / "pickle.npz",
        depth=np.array([object()], dtype=object),
        rgb=np.zeros(1),
        K=np.eye(3),
        T_base_camera=np.eye(4),
    )
    with pytest.raises(FrameFileError, match="pickle.npz"):
        load_frame(tmp_path / "pickle.npz")


def test_cli_plan_prints_json_and_draws(tmp_path, capsys):
    frame = render([lying_cylinder(0.0, 0.0, 0.025, 0.1, 0.4), box_on_floor(0.15, 0.05, 0.05, 0.05, 0.05)])
    f = save_frame(tmp_path / "frame.npz", frame, TOTE)
    png = tmp_path / "out.png"
    assert pickcell_main(["plan", str(f), "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] in ("pick", "ask") and out["n_items"] == 2
    assert len(out["candidates"]) > 20 and out["candidates"][0]["index"] == 0
    assert Image.open(png).size == (640, 480)
    assert pickcell_main(["plan", str(f)]) == 0
    assert "candidates on 2 items" in capsys.readouterr().out


def test_cli_plan_bad_input_is_a_clear_error(tmp_path, capsys):
    assert pickcell_main(["plan", str(tmp_path / "nope.npz")]) == 2
    assert "nope.npz: no such file" in capsys.readouterr().err
    f = save_frame(tmp_path / "notote.npz", render([]))
    assert pickcell_main(["plan", str(f)]) == 2
    assert "--tote" in capsys.readouterr().err
    assert pickcell_main(["plan", str(f), "--tote", "-0.3", "-0.2", "0", "0.3", "0.2", "0.2"]) == 0
    assert "empty" in capsys.readouterr().out
    assert pickcell_main(["plan", str(f), "--tote", "0.3", "-0.2", "0", "-0.3", "0.2", "0.2"]) == 2
    assert "--tote" in capsys.readouterr().err
    assert (
        pickcell_main(
            [
                "plan",
                str(f),
                "--tote",
                "-0.3",
                "-0.2",
                "0",
                "0.3",
                "0.2",
                "0.2",
                "--model",
                str(tmp_path / "m.safetensors"),
            ]
        )
        == 2
    )
    assert "m.safetensors" in capsys.readouterr().err


def test_batched_quaternions_match_the_shared_helper():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(200, 4))
    R = np.stack([quat_to_matrix(x) for x in q])
    # Include the awkward cases: 180 degree turns about each axis, and the identity.
    R = np.concatenate(
        [R, np.stack([np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1]), np.eye(3)])]
    )
    got = matrices_to_quats(R)
    want = np.stack([matrix_to_quat(r) for r in R])
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_gripper_indices_match_the_scorer_contract():
    assert (SUCTION, PARALLEL_JAW) == (0, 1)


def test_grasps_built_in_bulk_are_the_grasps_built_one_by_one():
    # The planner builds its several hundred grasps with Grasp.many (one check for the whole array
    # instead of one per grasp); the cell must see exactly what Grasp(...) would have made, down to
    # the last bit of each quaternion, or a plan would depend on how it was assembled.
    from grasping.types import Grasp

    rng = np.random.default_rng(7)
    n = 500
    g = rng.integers(0, 2, n)
    pos = rng.normal(size=(n, 3))
    q = rng.normal(size=(n, 4))
    q[:250] /= np.linalg.norm(q[:250], axis=1, keepdims=True)  # unit already, as the planner's are
    w = rng.uniform(0, 0.08, n)
    bulk = Grasp.many(g, pos, q, w)
    one = [Grasp(("suction", "parallel_jaw")[g[i]], pos[i], q[i], w[i]) for i in range(n)]
    for a, b in zip(bulk, one, strict=True):
        assert a.gripper == b.gripper and a.width == b.width
        assert a.position.tobytes() == b.position.tobytes()
        assert a.orientation.tobytes() == b.orientation.tobytes()
        assert not a.position.flags.writeable and not a.orientation.flags.writeable
    pos[0, 0] = 9.0  # the grasps own their numbers: changing the input changes nothing
    assert bulk[0].position[0] != 9.0
    bad = q.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        Grasp.many(g, pos, bad, w)
    with pytest.raises(ValueError, match="gripper index"):
        Grasp.many(g + 2, pos, q, w)
    with pytest.raises(ValueError, match="zero quaternion"):
        Grasp.many(g, pos, np.where(np.arange(n)[:, None] == 5, 0.0, q), w)
    with pytest.raises(ValueError, match="shapes"):
        Grasp.many(g, pos[:, :2], q, w)
