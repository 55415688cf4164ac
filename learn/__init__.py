"""The learner: ledgers -> dataset (with a manifest) -> weighted fine-tuning -> gate -> registry.

`pickcell learn` runs it as a long-running service (retrain when a trigger fires) or once. The
pieces: `learn.config` (learn.toml), `learn.triggers` (when to retrain), `learn.dataset` (one
dataset from many cells' ledgers, split by tote, with a manifest that reproduces it), `learn.weights`
(what to learn most from: novelty, current-model loss, recency, human labels, a fixed replay share),
`learn.learner` (one round: train, recalibrate, refit the ask threshold and the item watchdog, gate,
register, promote) and `learn.cli`. Depends on `grasping` and `hitl`, never on `arm` or `sim`
(the simulation regression suite is handed in by the CLI).
"""
