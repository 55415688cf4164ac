"""The shipped torch scorer behind the planner's `Scorer` protocol (`grasping.scoring`).

One batched forward pass per scene: backbone embedding -> per-gripper head logit -> per-gripper
calibrator -> calibrated p(success); the same embeddings feed the watchdog. The planner never
imports torch: it only sees `ScoreResult` numpy arrays.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from grasping.calibration import sigmoid
from grasping.modelfile import LoadedModel, ModelFileError, load_model
from grasping.scoring import PARALLEL_JAW, SUCTION, Scorer, ScoreResult

log = logging.getLogger(__name__)

# One intra-op thread. Measured on the 2-core machine (benchmarks/scorer_latency.py, docs/benchmarks.md):
# while other processes share the cores -- as the simulator, the controller and the broker do on a
# cell -- two torch threads spin against each other and p50 for 300 candidates went from about 4 ms
# (1 thread) to 50-130 ms. One thread scores 500 candidates in about 10 ms even then. A cell with
# cores to spare can pass num_threads=2.
INFERENCE_THREADS = 1


class LearnedScorer:
    """Scores candidates with a verified model file. Implements `grasping.scoring.Scorer`."""

    def __init__(
        self, model: LoadedModel, num_threads: int | None = INFERENCE_THREADS, alpha: float | None = None
    ) -> None:
        """`alpha`: the bound on P(fail | executed without asking) whose certified thresholds to use
        (the model file's `threshold_fit.by_alpha`); None: the file's own thresholds."""
        import torch

        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.model = model
        self.version = model.version
        self.sha256 = model.sha256
        self.path = model.path
        net = model.net
        self._c, self._s, self._f = net.in_channels, net.patch_size, net.n_features
        self.alpha, self._thresholds = thresholds_for_alpha(model, alpha)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        expected_sha256: str | None = None,
        num_threads: int | None = INFERENCE_THREADS,
        alpha: float | None = None,
    ) -> LearnedScorer:
        """Verify and load a model file. `num_threads` sets torch's (process-wide) thread count;
        None leaves it alone (for tools that load several models in one process)."""
        return cls(load_model(path, expected_sha256), num_threads=num_threads, alpha=alpha)

    @property
    def thresholds(self) -> np.ndarray:
        """(2,) per-gripper auto-execute thresholds on calibrated p (index SUCTION / PARALLEL_JAW)."""
        return self._thresholds.copy()

    def candidate_thresholds(self, gripper: np.ndarray) -> np.ndarray:
        """(M,) the threshold that applies to each candidate (its own gripper's)."""
        return self._thresholds[np.asarray(gripper, dtype=np.int64)]

    def _check(self, patches: np.ndarray, features: np.ndarray, gripper: np.ndarray) -> None:
        m = patches.shape[0] if patches.ndim >= 1 else -1
        if patches.ndim != 4 or patches.shape[1:] != (self._c, self._s, self._s):
            raise ValueError(f"patches must be (M, {self._c}, {self._s}, {self._s}), got {patches.shape}")
        if features.shape != (m, self._f):
            raise ValueError(f"features must be ({m}, {self._f}), got {features.shape}")
        if gripper.shape != (m,):
            raise ValueError(f"gripper must be ({m},), got {gripper.shape}")
        if m and not np.isin(gripper, (SUCTION, PARALLEL_JAW)).all():
            raise ValueError(f"gripper values must be {SUCTION} (suction) or {PARALLEL_JAW} (parallel jaw)")
        if not (np.isfinite(patches).all() and np.isfinite(features).all()):
            raise ValueError("patches/features contain NaN or inf")

    def logits_and_embeddings(
        self, patches: np.ndarray, features: np.ndarray, gripper: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw head logits (M,) and backbone embeddings (M, D), as numpy."""
        import torch

        patches = np.asarray(patches, dtype=np.float32)
        features = np.asarray(features, dtype=np.float32)
        gripper = np.asarray(gripper, dtype=np.int64)
        self._check(patches, features, gripper)
        with torch.inference_mode():
            logits, emb = self.model.net(
                torch.from_numpy(patches), torch.from_numpy(features), torch.from_numpy(gripper)
            )
        return logits.numpy().astype(np.float64), emb.numpy().astype(np.float64)

    def calibrate(self, logits: np.ndarray, gripper: np.ndarray) -> np.ndarray:
        out = np.empty(len(logits), dtype=np.float64)
        for g, cal in enumerate(self.model.calibrators):
            rows = gripper == g
            if rows.any():
                out[rows] = cal.apply(logits[rows])
        return out

    def score(self, patches: np.ndarray, features: np.ndarray, gripper: np.ndarray) -> ScoreResult:
        gripper = np.asarray(gripper, dtype=np.int64)
        logits, emb = self.logits_and_embeddings(patches, features, gripper)
        if logits.size == 0:
            empty = np.zeros(0)
            return ScoreResult(empty, empty, empty, 0.0, True, float(self._thresholds.max()))
        ood, sigma, in_dist = self.model.watchdog.score(emb)
        calibrated = self.calibrate(logits, gripper)
        # ScoreResult carries one threshold, but each gripper has its own (each bounds its own
        # gripper's risk). The planner ranks by calibrated p and auto-executes the top candidate
        # iff its p reaches the threshold, so the one that decides is the top candidate's gripper's
        # (the largest among tied tops). Reporting the max over all grippers would let a gripper
        # with thin data (threshold "never") veto every scene. `candidate_thresholds` gives all.
        top = calibrated == calibrated.max()
        threshold = float(self._thresholds[np.unique(gripper[top])].max())
        return ScoreResult(
            learned=sigmoid(logits),
            calibrated=calibrated,
            ood=ood,
            scene_ood_sigma=sigma,
            in_distribution=in_dist,
            threshold=threshold,
        )


def thresholds_for_alpha(model: LoadedModel, alpha: float | None) -> tuple[float | None, np.ndarray]:
    """(alpha, per-gripper thresholds) a cell configured with `alpha` uses with this model.

    None: the file's thresholds (certified at `meta["alpha"]`). Otherwise the thresholds the fit
    certified for that alpha (`meta["threshold_fit"]["by_alpha"]`); an alpha the file has no
    certified thresholds for is an error naming the file, never a silent substitute.
    """
    if alpha is None:
        a = model.meta.get("alpha")
        return (float(a) if a is not None else None), model.thresholds.copy()
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    by = (model.meta.get("threshold_fit") or {}).get("by_alpha") or {}
    for key, thr in by.items():
        if abs(float(key) - alpha) < 1e-9:
            return alpha, np.array([float(t) for t in thr], dtype=np.float64)
    if model.meta.get("threshold_fit") and abs(float(model.meta.get("alpha", -1)) - alpha) < 1e-9:
        return alpha, model.thresholds.copy()
    if not by:
        raise ModelFileError(
            model.path,
            f"has no auto-execute thresholds certified for alpha {alpha:g}: its thresholds bound the "
            f"joint rate P(executed and failed) (risk {model.meta.get('risk', 'joint')!r}), not "
            "P(fail | executed); fit them with `python -m sim.threshold_fit --out FILE`, "
            "or run without --alpha",
        )
    raise ModelFileError(
        model.path,
        f"has no auto-execute thresholds certified for alpha {alpha:g} "
        f"(it has: {sorted(float(k) for k in by)}); fit them with `python -m sim.threshold_fit --out FILE`",
    )


def load_scorer(
    path: str | Path | None, fallback_to_analytic: bool, alpha: float | None = None
) -> Scorer | None:
    """Load the learned scorer, or return None (= analytic scoring only) where allowed.

    With `fallback_to_analytic`, a missing/corrupt/wrong-version file logs a warning naming the file
    and returns None; without it, the ModelFileError propagates (the cell must not start silently
    with a different scorer than configured).
    """
    if path is None:
        if fallback_to_analytic:
            log.warning("no model file configured; scoring with the analytic planner only")
            return None
        raise ModelFileError("<none>", "no model file configured and analytic fallback is not allowed")
    try:
        return LearnedScorer.from_file(path, alpha=alpha)
    except ModelFileError as exc:
        if not fallback_to_analytic:
            raise
        log.warning("%s; falling back to analytic scoring only", exc)
        return None
