"""The contract between the geometric planner and a learned scorer.

The planner (`grasping.planner`) extracts, for each candidate, a local height-map patch
(`grasping.patches`) and a vector of analytic features, then asks a `Scorer` for probabilities.
Any object with this shape can score: the shipped torch model, or an external one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

# Index of each gripper kind in the `gripper` arrays below (order of grasping.types.GRIPPER_KINDS).
SUCTION = 0
PARALLEL_JAW = 1


@dataclass(frozen=True)
class ScoreResult:
    """Scores for M candidates of one scene."""

    learned: np.ndarray  # (M,) raw model probability of success, before calibration
    calibrated: np.ndarray  # (M,) calibrated probability of success
    ood: np.ndarray  # (M,) per-candidate watchdog score (higher = further from training data)
    scene_ood_sigma: float  # scene-level watchdog score, in sigmas of the training-scene distribution
    in_distribution: bool  # scene_ood_sigma below the calibrated watchdog threshold
    threshold: float  # calibrated p(success) needed to auto-execute (conformal risk control)


@runtime_checkable
class Scorer(Protocol):
    version: str  # model version string (recorded in the ledger with every decision)

    def score(self, patches: np.ndarray, features: np.ndarray, gripper: np.ndarray) -> ScoreResult:
        """patches (M, C, S, S) float32, features (M, F) float32, gripper (M,) int64 (SUCTION=0, JAW=1)."""
        ...
