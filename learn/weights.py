"""What to learn most from: per-row *sampling* weights, and a fixed share of replay.

Each row's weight is
    recency x (1 + novelty_gain * novelty) x (1 + loss_gain * loss) x (human_boost if a person decided)
  * recency: 0.5 ** (age / half-life), age from the newest row;
  * novelty: how unlike the incumbent's training items the row's item is: the item watchdog's score
    of its shape descriptor minus 1 (1 = as close as training items are to each other), clipped to
    [0, novelty_cap]; rows without a descriptor use the plan's recorded scene sigma instead;
  * loss: the incumbent's binary cross-entropy on the row (calibrated p), clipped to loss_cap: what
    the current model gets wrong is worth more;
  * human: outcomes of a person's decision (`decided_by` "associate:..."): an approved or clicked
    grasp that was executed. Not a person's judgments (weak negatives; "no safe pick" rows, source
    "associate"): a passed-over candidate is an inference from the person's choice, and a "no safe
    pick" is what they thought, not what happened when a grasp ran; on frames the simulated
    associate says it about items the jaw picks 88% of the time (cell B, stop 39).
The export weight (weak negatives 0.3) multiplies this inside `grasping.learning.train`.

Weak negatives of one item share one row's weight: when a person approves one of five candidates,
that is one decision, and the four passed over must not count as four labels (the number shown is
an interface setting). Without this, on the continual experiment's development seed the frames'
164 weak negatives outweighed their 39 outcome rows (74% successes) about 2.5 to 1, the fine-tuned
heads learned "frames fail", and the cell asked about more frames after each round.

A "no safe pick" answer is one judgment too: it labels every candidate shown on the item 0 (up to
20 rows at weight 1), and those rows share one row's weight in the same way. Counted row by row (and
boosted as a person's labels), on the issue's seed at 4dc4962 round 1 learned from 118 such frame
rows (13 answers; the oracle the simulated associate judges with declines thin frames that the jaw
picks) against 19 executed frame rows, every learning round was refused, and the cell learned
nothing (stop 40, docs/learning.md).

Replay: rows recorded before the cutoff (the last round) and rows of replay exports are "old"; their
weights are rescaled to sum to `replay_share` of the total, the new rows' to the rest, so every epoch
draws about that share of old data however little or much new data there is (old kinds are not
forgotten; FIELD-NOTES: replay beats EWC for this shift). The trainer draws rows with replacement in
proportion to these weights (`TrainConfig.sampling = "sample"`) and stops early on validation loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grasping.learning import Dataset, outcome_rows
from learn.config import WeightsConfig


def incumbent_loss(scorer: Any, ds: Dataset) -> np.ndarray:
    """(N,) the incumbent's per-row cross-entropy (nats) with its calibrated probabilities."""
    logits, _ = scorer.logits_and_embeddings(ds.patches, ds.features, ds.gripper)
    p = np.clip(scorer.calibrate(logits, ds.gripper), 1e-6, 1 - 1e-6)
    y = ds.label.astype(np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def item_novelty(item_watchdog: Any, ds: Dataset) -> np.ndarray:
    """(N,) item novelty >= 0 (see the module docstring); 0 where nothing is known."""
    nov = np.clip(np.nan_to_num(ds.ood_sigma, nan=0.0), 0.0, None) / 3.0  # 3 sigma ~ one unit
    d = ds.descriptor
    if item_watchdog is not None and d.shape[1] >= len(item_watchdog.center):
        d = d[:, : len(item_watchdog.center)]  # an older watchdog reads its prefix of the descriptor
        ok = np.isfinite(d).all(axis=1)
        if ok.any():
            nov[ok] = np.clip(item_watchdog.item_scores(d[ok]) - 1.0, 0.0, None)
    return nov


def sampling_weights(
    ds: Dataset,
    cfg: WeightsConfig,
    *,
    old: np.ndarray,
    scorer: Any | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(N,) sampling weights with mean 1, and what went into them (for the model card)."""
    n = len(ds)
    t = np.where(np.isfinite(ds.timestamp), ds.timestamp, np.nan)
    now = float(np.nanmax(t)) if np.isfinite(t).any() else 0.0
    age = np.clip(now - np.nan_to_num(t, nan=now), 0.0, None)
    recency = 0.5 ** (age / cfg.recency_half_life_s)
    wd = None
    loss = np.zeros(n)
    if scorer is not None:
        from grasping.watchdog import item_watchdog_of

        wd = item_watchdog_of(scorer)
        loss = np.clip(incumbent_loss(scorer, ds), 0.0, cfg.loss_cap)
    novelty = np.clip(item_novelty(wd, ds), 0.0, cfg.novelty_cap)
    weak = ds.weight < 1.0
    judged = (ds.source == "associate") & ~weak  # the candidates of a "no safe pick" answer
    # A person's decision whose outcome was seen (judgments are not: grasping.learning.outcome_rows).
    human = np.char.startswith(ds.decided_by.astype(str), "associate:") & outcome_rows(ds)
    w = recency * (1.0 + cfg.novelty_gain * novelty) * (1.0 + cfg.loss_gain * loss)
    w = w * np.where(human, cfg.human_boost, 1.0)
    # One item's weak negatives share one row's weight, and so do one answer's "no safe pick" rows
    # (module docstring); rows without an item key keep their own weight.
    for group in (weak, judged):
        shared = group & (ds.item.astype(str) != "")
        if shared.any():
            _, inverse, counts = np.unique(
                ds.item[shared].astype(str), return_inverse=True, return_counts=True
            )
            w[shared] /= counts[inverse]
    old = np.asarray(old, dtype=bool)
    new = ~old
    if old.any() and new.any():
        w[old] *= cfg.replay_share / w[old].sum()
        w[new] *= (1.0 - cfg.replay_share) / w[new].sum()
    w = w / max(w.mean(), 1e-12)
    info = {
        "rows_new": int(new.sum()),
        "rows_old": int(old.sum()),
        "replay_share": float(w[old].sum() / w.sum()) if n else 0.0,
        "mean_novelty_new": float(novelty[new].mean()) if new.any() else 0.0,
        "mean_novelty_old": float(novelty[old].mean()) if old.any() else 0.0,
        "mean_loss_new": float(loss[new].mean()) if new.any() else 0.0,
        "human_rows": int(human.sum()),
        "weak_negative_rows": int(weak.sum()),
        "item_watchdog": wd is not None,
    }
    return w, info
