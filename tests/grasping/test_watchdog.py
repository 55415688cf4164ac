"""The covariate-shift watchdog: Mahalanobis on embeddings, scene sigmas, calibrated threshold."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_grasps import fresh_data, make_dataset_synth, trained_model

from grasping.calibration import auroc
from grasping.learned_scorer import LearnedScorer
from grasping.watchdog import conformal_quantile, fit_watchdog, ledoit_wolf


def gaussian_scenes(n_scenes: int, rows: int, rng: np.random.Generator, shift: float = 0.0, d: int = 16):
    """Correlated Gaussian embeddings; a shifted family moves along a low-variance direction."""
    a = np.linspace(0.2, 2.0, d)
    emb = rng.standard_normal((n_scenes * rows, d)) * a
    emb[:, 0] += shift  # the least-variance axis: Euclidean distance would hardly notice
    return emb, np.repeat(np.arange(n_scenes), rows)


def test_scene_sigmas_separate_a_shifted_family_and_rarely_flag_in_distribution() -> None:
    rng = np.random.default_rng(0)
    train, _ = gaussian_scenes(200, 20, rng)
    ref, ref_s = gaussian_scenes(100, 20, rng)
    thr, thr_s = gaussian_scenes(200, 20, rng)
    wd, info = fit_watchdog(train, ref, ref_s, thr, thr_s, quantile=0.99)
    assert info["watchdog_quantile_exact"] == 1.0
    ind, ind_s = gaussian_scenes(500, 20, rng)
    ood, ood_s = gaussian_scenes(100, 20, rng, shift=0.6)
    sig_in = np.array([wd.score(ind[ind_s == k])[1] for k in range(500)])
    sig_out = np.array([wd.score(ood[ood_s == k])[1] for k in range(100)])
    assert abs(np.mean(sig_in)) < 0.3 and 0.7 < np.std(sig_in) < 1.3  # sigmas mean what they say
    labels = np.r_[np.zeros(500), np.ones(100)]
    assert auroc(np.r_[sig_in, sig_out], labels) >= 0.9
    assert np.mean(sig_in > wd.threshold_sigma) <= 0.03  # quantile 0.99, finite-sample slack
    cand, sigma, in_dist = wd.score(ood[ood_s == 0])
    assert cand.shape == (20,) and sigma > wd.threshold_sigma and not in_dist


def test_ledoit_wolf_is_positive_definite_with_fewer_rows_than_dimensions() -> None:
    x = np.random.default_rng(1).standard_normal((10, 30))
    cov, shrink = ledoit_wolf(x)
    assert 0 < shrink <= 1
    assert np.linalg.eigvalsh(cov).min() > 0


def test_single_row_scenes_are_pooled_into_pseudo_scenes() -> None:
    """A ledger stores about one labelled row per frame: scene stats come from pseudo-scenes."""
    rng = np.random.default_rng(2)
    train, _ = gaussian_scenes(100, 20, rng)
    ref, _ = gaussian_scenes(1, 3000, rng)
    thr, _ = gaussian_scenes(1, 3000, rng)
    ids = np.arange(3000)  # every row its own scene
    wd, info = fit_watchdog(train, ref, ids, thr, ids, pseudo_scene_size=30)
    assert info["watchdog_ref_scenes"] == 100 and info["watchdog_thr_scenes"] == 100
    assert info["watchdog_pseudo_scene_size"] == 30
    live, _ = gaussian_scenes(1, 30, rng)
    assert abs(wd.score(live)[1]) < 3  # a live 30-candidate scene is judged on the same scale


def test_conformal_quantile_and_bad_input() -> None:
    assert conformal_quantile(np.arange(1.0, 100.0), 0.9) == 90.0  # ceil(100 * 0.9) = 90th smallest
    assert conformal_quantile(np.arange(5.0), 0.99) == 4.0  # too few values: the largest
    rng = np.random.default_rng(3)
    e = rng.standard_normal((200, 4))
    wd, _ = fit_watchdog(e, e, np.arange(200) // 10, e, np.arange(200) // 10)
    with pytest.raises(ValueError, match=r"\(M, 4\)"):
        wd.candidate_scores(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        fit_watchdog(e[:1], e, np.zeros(200), e, np.zeros(200))
    # A small held-out set of single-row scenes still works: the pseudo-scenes shrink.
    wd, info = fit_watchdog(e, e[:60], np.arange(60), e[60:120], np.arange(60))
    assert info["watchdog_pseudo_scene_size"] == 3 and info["watchdog_ref_scenes"] == 20


def test_trained_model_flags_an_unseen_family_with_auroc_over_0_9() -> None:
    """Done criterion: scenes of a family never trained on vs training-family scenes, AUROC >= 0.90."""
    scorer = LearnedScorer.from_file(trained_model().path, num_threads=None)
    ind, _ = fresh_data()
    holey, _ = make_dataset_synth(60, seed=21, families=("holey",), scene_prefix="holey")

    def sigmas(ds):
        out = []
        for k in np.unique(ds.scene):
            r = ds.scene == k
            out.append(scorer.score(ds.patches[r], ds.features[r], ds.gripper[r]).scene_ood_sigma)
        return np.array(out)

    s_in, s_out = sigmas(ind), sigmas(holey)
    assert auroc(np.r_[s_in, s_out], np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]) >= 0.9
    thr = scorer.model.watchdog.threshold_sigma
    assert np.mean(s_in > thr) <= 0.03
    assert np.mean(s_out > thr) >= 0.9
    r = scorer.score(holey.patches[:24], holey.features[:24], holey.gripper[:24])
    assert not r.in_distribution and r.ood.shape == (24,)
