"""Doubt per item: the item watchdog's per-item threshold marks the one new item of a scene, not the scene."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import TOTE, box_on_floor, render, sphere_on_floor
from test_item_watchdog import _FirstFeatures, box_scene, descriptors_of, save_with_item_watchdog
from test_modelfile import write_model

from grasping.learned_scorer import LearnedScorer
from grasping.modelfile import load_model
from grasping.planner import PlannerConfig, plan_detailed
from grasping.pointcloud import segment_scene
from grasping.watchdog import ItemWatchdog, fit_item_threshold, fit_item_watchdog

MIXED = [
    box_on_floor(-0.18, -0.09, 0.10, 0.07, 0.05, 0.3),
    box_on_floor(0.0, -0.09, 0.08, 0.06, 0.06, 1.1),
    box_on_floor(-0.18, 0.09, 0.11, 0.06, 0.04, 2.0),
    box_on_floor(0.18, -0.09, 0.09, 0.07, 0.07, 0.7),
    sphere_on_floor(0.12, 0.1, 0.035),  # the new kind of item
]


@pytest.fixture(scope="module")
def watchdog() -> ItemWatchdog:
    """Fitted on boxes only; per-item threshold from other, fresh box scenes."""
    wd, _ = fit_item_watchdog([descriptors_of(box_scene(s)) for s in range(8)], k=5, quantile=0.9)
    wd, info = fit_item_threshold(wd, [descriptors_of(box_scene(50 + s)) for s in range(6)], quantile=0.95)
    assert info["items"] >= 20 and wd.item_threshold is not None
    return wd


def test_only_the_new_item_is_out_of_distribution(watchdog):
    cloud = segment_scene(render(MIXED, noise_sigma_m=0.002, seed=1), TOTE)
    scores, verdicts, _, _ = watchdog.score_clusters(cloud)
    assert verdicts is not None and len(verdicts) == cloud.n_clusters == 5
    ball = int(np.argmin([np.linalg.norm(c.centroid[:2] - [0.12, 0.1]) for c in cloud.clusters]))
    assert not verdicts[ball]
    assert all(verdicts[k] for k in range(5) if k != ball)
    assert scores[ball] > max(scores[k] for k in range(5) if k != ball)


def test_a_watchdog_without_a_per_item_threshold_gives_no_item_verdicts(watchdog):
    from dataclasses import replace

    cloud = segment_scene(render(MIXED, noise_sigma_m=0.002, seed=1), TOTE)
    scores, verdicts, _, _ = replace(watchdog, item_threshold=None).score_clusters(cloud)
    assert verdicts is None and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="item_threshold"):
        replace(watchdog, item_threshold=float("nan"))
    with pytest.raises(ValueError, match="at least 20 items"):
        fit_item_threshold(watchdog, [descriptors_of(MIXED[:2])])


def test_the_model_file_keeps_the_per_item_threshold_and_the_plan_marks_the_item(tmp_path, watchdog):
    write_model(tmp_path / "old.safetensors")
    path = tmp_path / "m.safetensors"
    save_with_item_watchdog(tmp_path / "old.safetensors", path, watchdog)
    got = load_model(path).item_watchdog
    assert got.item_threshold == pytest.approx(watchdog.item_threshold)
    assert got.item_quantile == pytest.approx(watchdog.item_quantile)
    scorer = _FirstFeatures(LearnedScorer.from_file(path))
    plan = plan_detailed(
        render(MIXED, noise_sigma_m=0.002, seed=1), PlannerConfig(tote=TOTE, scorer=scorer)
    ).plan
    ball = int(np.argmin([np.linalg.norm(c.centroid[:2] - [0.12, 0.1]) for c in plan.clusters]))
    assert [c.in_distribution for c in plan.clusters].count(False) == 1
    assert plan.clusters[ball].in_distribution is False and plan.clusters[ball].ood_score is not None
    assert any(r.startswith("out of distribution: item") for r in plan.reasons)
    # A file written before per-item thresholds judges scenes only: no item verdicts.
    old = load_model(tmp_path / "old.safetensors")
    assert old.item_watchdog is None or old.item_watchdog.item_threshold is None
