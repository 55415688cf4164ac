"""GraspNet: one batched pass, per-row head selection, size; and what training on it achieves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_grasps import fresh_data, trained_model, training_data

from grasping.calibration import Calibrator, auroc
from grasping.learned_scorer import LearnedScorer
from grasping.learning import _feature_baseline_auroc, evaluate
from grasping.model import GraspNet, count_parameters
from grasping.modelfile import save_model
from grasping.watchdog import Watchdog


def inputs(m: int, seed: int = 0, c: int = 2, s: int = 32, f: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(m, c, s, s, generator=g),
        torch.randn(m, f, generator=g),
        torch.randint(0, 2, (m,), generator=g),
    )


def test_forward_gathers_each_rows_own_head_in_one_pass() -> None:
    torch.manual_seed(0)
    net = GraspNet(2, 32, 5).eval()
    p, f, g = inputs(64)
    with torch.no_grad():
        logits, emb = net(p, f, g)
        both = net.heads(net.embed(p, f))
    assert logits.shape == (64,) and emb.shape == (64, 64)
    assert torch.allclose(logits, both[torch.arange(64), g])
    # The heads really differ, so the gather matters: flipping the gripper changes the logit.
    with torch.no_grad():
        flipped, _ = net(p, f, 1 - g)
    assert not torch.allclose(logits, flipped)


def test_a_row_scores_the_same_alone_and_in_a_batch() -> None:
    torch.manual_seed(1)
    net = GraspNet(2, 32, 5).eval()
    p, f, g = inputs(50, seed=2)
    with torch.no_grad():
        batch, _ = net(p, f, g)
        single = torch.cat([net(p[i : i + 1], f[i : i + 1], g[i : i + 1])[0] for i in range(50)])
    assert torch.allclose(batch, single, atol=1e-5)


def test_channels_patch_size_and_feature_count_are_constructor_arguments() -> None:
    net = GraspNet(3, 16, 0, embed_dim=32).eval()
    logits, emb = net(torch.rand(4, 3, 16, 16), torch.zeros(4, 0), torch.tensor([0, 1, 0, 1]))
    assert logits.shape == (4,) and emb.shape == (4, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        GraspNet(2, 30, 5)
    with pytest.raises(ValueError):
        GraspNet(0, 32, 5)


def test_model_is_small_and_its_file_under_2_mb(tmp_path) -> None:
    net = GraspNet(2, 32, 12)
    assert count_parameters(net) < 300_000
    wd = Watchdog(np.zeros(64), np.eye(64), 1.0, 1.0, 3.0)
    cal = Calibrator("temperature")
    save_model(tmp_path / "m.safetensors", net, (cal, cal), np.array([0.8, 0.8]), wd, {"model_version": "x"})
    assert (tmp_path / "m.safetensors").stat().st_size < 2 * 1024 * 1024


def test_training_beats_chance_and_the_analytic_feature_baseline() -> None:
    res = trained_model()
    ds, p_true = fresh_data()
    scorer = LearnedScorer.from_file(res.path, num_threads=None)
    m = evaluate(scorer, ds)
    baseline = _feature_baseline_auroc(training_data(), ds, seed=0)
    oracle = auroc(p_true, ds.label)  # the best any scorer can do on these labels
    assert 0.8 < m["auroc"] <= oracle  # chance is 0.5
    assert m["suction.auroc"] > 0.75 and m["parallel_jaw.auroc"] > 0.75
    # The features cannot see which way a surface curves relative to the jaw; the patch can.
    assert m["auroc"] > baseline + 0.01
