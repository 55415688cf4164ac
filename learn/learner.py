"""One learning round, and the service that runs rounds when a trigger fires.

A round (`run_round`):
 1. triggers (`learn.triggers`) over every ledger, unless forced;
 2. dataset: every ledger exported and joined with the replay exports, manifest written
    (`learn.dataset`); rows of held-out totes (a fixed share chosen by hashing the tote id, so the
    same totes are held out in every round and no model ever trains on them) go to the gate;
 3. weights (`learn.weights`): novelty, the incumbent's loss, recency, human labels, replay share;
    "new" rows are those the incumbent never trained on: after a refused round they stay new (the
    incumbent still has not seen them), so a kind the incumbent never knew keeps triggering and
    keeps its weight until a model that learned it is promoted;
 4. training (`grasping.learning.train`): fine-tune the incumbent (or from scratch) with weighted
    sampling and early stopping, split by tote; it recalibrates per gripper and refits the ask
    threshold (risk "executed": P(fail | executed alone) <= alpha, Learn-then-Test);
 5. the item watchdog refitted on the shape descriptors of the recorded plans (plus the incumbent's
    own bank) and the item kinds (k-means of descriptors) stored in the file;
 6. the gate (`grasping.learning.gate`): per item kind, calibration, conditional precision and the
    simulation suite the caller hands in; the verdict is stored with the version in the registry;
    a passing model is promoted.
Everything derives from `LearnConfig.seed`; `reproduce` retrains from a round's manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from grasping.learning import (
    HOLDOUT_PERCENT,
    DatasetError,
    GateReport,
    GateTolerance,
    TrainConfig,
    TrainResult,
    fit_item_kinds,
    gate,
    held_out,
    incumbent_fitted_on,
    item_kinds,
    outcome_rows,
    train,
)
from learn.config import LearnConfig
from learn.dataset import BuiltDataset, build_dataset, load_manifest
from learn.triggers import TriggerStatus, check_triggers, expand_ledgers
from learn.weights import sampling_weights

log = logging.getLogger(__name__)

SimSuiteFactory = Callable[[Path | None], Callable[[Path], tuple[bool, dict[str, Any]]]]


@dataclass(frozen=True)
class RoundResult:
    triggered: bool
    triggers: TriggerStatus
    version: str | None = None  # the candidate's version (None: no round ran)
    model_path: str | None = None
    manifest: str | None = None
    gate_passed: bool | None = None
    gate_reasons: tuple[str, ...] = ()
    promoted: bool = False
    incumbent: str | None = None
    triggering_kinds: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["triggers"] = self.triggers.to_json()
        return d


# --- state -------------------------------------------------------------------------------------------


def _state_path(cfg: LearnConfig) -> Path:
    return Path(cfg.work_dir) / "state.json"


def load_state(cfg: LearnConfig) -> dict[str, Any]:
    p = _state_path(cfg)
    return json.loads(p.read_text()) if p.exists() else {"cutoff": 0.0, "rounds": []}


def incumbent_cutoff(state: dict[str, Any], incumbent_sha256: str | None) -> float:
    """The newest row time the incumbent could have trained on: the data cutoff of the round that
    promoted it. `state["cutoff"]` (the last round's data, for the triggers) moves on after a refused
    round too, but the incumbent did not learn those rows. A model the learner did not promote itself
    (promoted by hand, another learner) falls back to `state["cutoff"]`, as before."""
    seen = state.get("incumbent_cutoff")
    if seen is not None and incumbent_sha256 is not None and seen.get("sha256") == incumbent_sha256:
        return float(seen["cutoff"])
    return float(state["cutoff"])


def _save_state(cfg: LearnConfig, state: dict[str, Any]) -> None:
    p = _state_path(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(p)


# --- pieces ------------------------------------------------------------------------------------------


def plan_descriptors(ledgers: list[Path], limit: int = 3000) -> tuple[list[str], list[np.ndarray]]:
    """Per recorded plan (newest `limit` across the ledgers): its tote id and its items' shape
    descriptors (K, D), as two lists in the same order."""
    rows: list[tuple[float, str, str]] = []
    for path in ledgers:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows += conn.execute(
                "SELECT recorded_at, tote_id, clusters FROM plans WHERE decision != 'empty'"
                " ORDER BY recorded_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        finally:
            conn.close()
    totes: list[str] = []
    scenes: list[np.ndarray] = []
    for _, tote, clusters in sorted(rows, reverse=True)[:limit]:
        d = [c["descriptor"] for c in json.loads(clusters or "[]") if c.get("descriptor") is not None]
        if d:
            totes.append(str(tote))
            scenes.append(np.asarray(d, dtype=np.float64))
    return totes, scenes


def refit_item_watchdog(
    model_path: Path,
    scenes: list[np.ndarray],
    incumbent_wd: Any | None,
    seed: int,
    totes: list[str] | None = None,
) -> dict[str, Any]:
    """Refit the item watchdog of `model_path` on recorded plans' items plus the incumbent's bank,
    and its per-item threshold on the plans of held-out totes.

    The incumbent's bank (its training items, stored standardised, in scene order) is cut into
    pseudo-scenes of 8 items so its leave-one-scene-out statistics still hold. `totes` (one id per
    scene): the plans of the gate's held-out totes (`grasping.learning.held_out`, the same totes in
    every round) stay out of the bank and set the per-item threshold, as fresh in-distribution items
    (`grasping.watchdog.fit_item_threshold`). Without a per-item threshold the watchdog judges whole
    scenes: one new item makes the cell ask about the whole tote (issue 12's doubt per item). Rewrites
    the file (new sha256). Returns what was fitted, or why not.
    """
    from grasping.modelfile import load_model, save_model
    from grasping.watchdog import (
        ITEM_DESCRIPTOR_VERSION,
        fit_item_threshold,
        fit_item_watchdog,
        item_feature_count,
    )

    if totes is not None and len(totes) != len(scenes):
        raise ValueError(f"{len(totes)} tote ids for {len(scenes)} recorded plans")
    # The refit keeps the incumbent's descriptor version: its bank cannot be re-described, and a
    # newer descriptor starts with the older one's features (`sim refit-watchdog` moves a model on).
    version = incumbent_wd.version if incumbent_wd is not None else ITEM_DESCRIPTOR_VERSION
    f = item_feature_count(version)
    usable = [s.ndim == 2 and s.shape[1] >= f and np.isfinite(s[:, :f]).all() for s in scenes]
    fresh = held_out(np.asarray(totes, dtype=str)) if totes is not None else np.zeros(len(scenes), bool)
    parts = [s[:, :f] for s, ok, h in zip(scenes, usable, fresh, strict=True) if ok and not h]
    threshold_parts = [s[:, :f] for s, ok, h in zip(scenes, usable, fresh, strict=True) if ok and h]
    if incumbent_wd is not None:
        raw = incumbent_wd.bank * incumbent_wd.scale + incumbent_wd.center
        # Items of the recorded plans are read again every round, and the incumbent's bank already
        # holds those an earlier refit took: added twice, each has an exact twin in another scene,
        # its leave-one-scene-out distance is 0 and the fitted threshold shrinks. On continual seed 5
        # (stop 37) the banks grew 1,581 -> 3,048 -> 5,474 rows with 2,042 and 3,001 distinct, and
        # the share of plans called in distribution fell 0.89 -> 0.63 -> 0.62.
        seen = {tuple(r) for p in parts + threshold_parts for r in np.round(p, 5)}
        raw = raw[[tuple(r) not in seen for r in np.round(raw, 5)]] if seen else raw
        parts += [raw[i : i + 8] for i in range(0, len(raw), 8)]
    m = load_model(model_path)
    try:
        wd, info = fit_item_watchdog(
            parts,
            k=incumbent_wd.k if incumbent_wd is not None else 5,
            quantile=m.watchdog.quantile,
            version=version,
        )
    except ValueError as exc:
        log.warning("item watchdog not refitted (%s); keeping the incumbent's", exc)
        wd, info = incumbent_wd, {"skipped": str(exc)}
    else:
        quantile = incumbent_wd.item_quantile if incumbent_wd is not None else 0.99
        try:
            wd, thr_info = fit_item_threshold(wd, threshold_parts, quantile)
            info = {**info, "item_threshold": thr_info}
        except ValueError as exc:
            log.warning("no per-item threshold (%s): the item watchdog will judge scenes only", exc)
            info = {**info, "item_threshold": {"skipped": str(exc)}}
    meta = dict(m.meta)
    meta["item_watchdog_refit"] = {**info, "recorded_plans": len(scenes)}
    save_model(model_path, m.net, list(m.calibrators), m.thresholds, m.watchdog, meta, item_watchdog=wd)
    return info


def _triggering_kinds(
    ds: Any, kinds: np.ndarray, new: np.ndarray, incumbent_meta: dict, min_rows: int
) -> tuple:
    """Kinds the incumbent did not know: a family missing from its training data, or a shape kind
    whose rows are at least 80% new. Only kinds with `min_rows` new rows count."""
    known_fams = set(incumbent_meta.get("data", {}).get("by_family", {}))
    out = []
    for k in np.unique(kinds[new]):
        rows = kinds == k
        n_new = int((rows & new).sum())
        if n_new < min_rows or k == "unknown":
            continue
        fam_rows = rows & (ds.family != "")
        if fam_rows.any():
            if k not in known_fams:
                out.append(str(k))
        elif n_new / rows.sum() >= 0.8:
            out.append(str(k))
    return tuple(sorted(out))


# --- a round -----------------------------------------------------------------------------------------


def _train_config(cfg: LearnConfig, version: str, init: str | None, incumbent: str | None) -> TrainConfig:
    t = cfg.train
    return TrainConfig(
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        patience=t.patience,
        seed=cfg.seed,
        alpha=t.alpha,
        risk=t.risk,
        keep_incumbent_bar=t.keep_incumbent_bar and init is not None,
        val_fraction=t.val_fraction,
        calib_fraction=t.calib_fraction,
        conformal_fraction=t.conformal_fraction,
        test_fraction=t.test_fraction,
        incumbent=incumbent,
        model_version=version,
        min_rows=t.min_rows,
        progress=True,
        threads=t.threads,
        sampling="sample",
        init_model=init,
        freeze=t.freeze if init else "none",
        distill=t.distill if init else 0.0,
        stable_splits=True,  # a tote keeps its split across rounds (TrainConfig.stable_splits)
    )


def train_round(
    cfg: LearnConfig,
    built: BuiltDataset,
    out_path: Path,
    *,
    incumbent: str | None,
    cutoff: float,
    version: str,
    progress: bool = True,
) -> tuple[TrainResult, Any, tuple[str, ...]]:
    """Weights + training + item kinds on a built dataset (everything but the gate).

    Returns (train result, the gate's holdout Dataset, triggering kinds). Deterministic given
    (cfg, built, incumbent, cutoff): `reproduce` calls exactly this.
    """
    from grasping.learned_scorer import LearnedScorer

    ds = built.dataset
    hold = held_out(ds.tote)
    train_ds = ds.subset(np.flatnonzero(~hold))
    scorer = LearnedScorer.from_file(incumbent, num_threads=cfg.train.threads) if incumbent else None
    judge = hold & outcome_rows(ds)  # a person's judgments never judge (grasping.learning.outcome_rows)
    # Nor do rows the incumbent was fitted on (replayed data of a model from another split rule): on
    # them the incumbent looks better than it is. They still train the challenger where not held out.
    seen = incumbent_fitted_on(scorer.model.meta, ds.tote) if scorer is not None else None
    holdout_info: dict[str, Any] = {"incumbent_fitted_totes_known": seen is not None}
    if seen is not None:
        holdout_info["rows_left_out_incumbent_fitted_on"] = int((judge & seen).sum())
        if (judge & seen).any():
            log.info(
                "gate: %d held-out rows left out (the incumbent was fitted on their totes)",
                int((judge & seen).sum()),
            )
        judge &= ~seen
    holdout = ds.subset(np.flatnonzero(judge))
    old = built.is_replay[~hold] | (np.nan_to_num(train_ds.timestamp, nan=0.0) <= cutoff)
    weights, winfo = sampling_weights(train_ds, cfg.weights, old=old, scorer=scorer)
    kinds_model = fit_item_kinds(train_ds.descriptor[train_ds.family == ""], cfg.train.kinds, cfg.seed)
    kinds = item_kinds(train_ds, kinds_model)
    triggering = _triggering_kinds(
        train_ds, kinds, ~old, scorer.model.meta if scorer is not None else {}, cfg.gate.kind_min_rows
    )
    init = incumbent if (cfg.train.mode == "finetune" and incumbent) else None
    tcfg = replace(_train_config(cfg, version, init, incumbent), progress=progress)
    extra = {
        "learner": {
            "manifest": str(built.manifest_path),
            "manifest_sha256": hashlib.sha256(built.manifest_path.read_bytes()).hexdigest(),
            "dataset_fingerprint": built.manifest["fingerprint"],
            "code_version": built.manifest["code_version"],
            "incumbent": incumbent,
            "incumbent_sha256": scorer.sha256 if scorer is not None else None,
            "cutoff": cutoff,
            "mode": "finetune" if init else "scratch",
            "weights": {**asdict(cfg.weights), **winfo},
            "holdout_totes_percent": HOLDOUT_PERCENT,
            "holdout": holdout_info,
        },
        "item_kinds": kinds_model,
        "triggering_kinds": list(triggering),
    }
    # Old rows anchor the fine-tune to the incumbent's logits (train.distill); new rows are free.
    res = train(train_ds, tcfg, out_path, row_weights=weights, extra_meta=extra, anchor_rows=old)
    return res, holdout, triggering


def run_round(
    cfg: LearnConfig,
    *,
    force: bool = False,
    sim_suite_factory: SimSuiteFactory | None = None,
    progress: bool = True,
) -> RoundResult:
    """Check the triggers and, if one fires (or `force`), run one learning round (module docstring)."""
    from grasping.modelfile import load_model
    from grasping.registry import ModelRegistry

    t0 = time.time()
    state = load_state(cfg)
    ledgers = expand_ledgers(cfg.ledgers)
    status = check_triggers(ledgers, cfg.triggers, since=float(state["cutoff"]))
    if not (status.fired or force):
        return RoundResult(False, status, seconds=time.time() - t0)
    log.info("learning round: %s", "; ".join(status.reasons) or "forced")
    reg = ModelRegistry(cfg.registry)
    incumbent = cfg.incumbent or (str(reg.current()) if reg.current() else None)
    n = len(state["rounds"]) + 1
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    version = f"learn-r{n}-{stamp}-s{cfg.seed}"
    round_dir = Path(cfg.work_dir) / f"round-{n:03d}-{stamp}"
    from grasping.modelfile import file_sha256

    inc_sha = file_sha256(incumbent) if incumbent else None
    # Rows after `cutoff` are new to the incumbent (weights, triggering kinds); the triggers read
    # their own cutoff, the last round's, above.
    cutoff = incumbent_cutoff(state, inc_sha)
    extra = {
        "learn_config": asdict(cfg),
        "cutoff": cutoff,
        "incumbent": incumbent,
        "incumbent_sha256": inc_sha,
        "round": n,
        "version": version,
    }
    built = build_dataset(
        ledgers,
        cfg.replay,
        round_dir / "data",
        weak_negative_weight=cfg.weights.weak_negative_weight,
        extra=extra,
    )
    model_path = round_dir / f"{version}.safetensors"
    res, holdout, triggering = train_round(
        cfg, built, model_path, incumbent=incumbent, cutoff=cutoff, version=version, progress=progress
    )
    inc_wd = None
    if incumbent:
        from grasping.watchdog import item_watchdog_of

        inc_wd = item_watchdog_of(load_model(incumbent))
    totes, scenes = plan_descriptors(ledgers)
    refit_item_watchdog(model_path, scenes, inc_wd, cfg.seed, totes=totes)
    report = gate_model(cfg, model_path, incumbent, holdout, triggering, sim_suite_factory)
    reg.add(model_path, gate_report=report)
    promoted = False
    if report.passed and cfg.promote:
        reg.promote(
            report.candidate_version, reason=f"learn round {n}: " + "; ".join(status.reasons or ("forced",))
        )
        promoted = True
    # The cutoff is the newest *ledger* row: replay exports are old data by definition, and their
    # stamps say when they were exported, not when the cell worked. A replay export stamped after the
    # ledger's rows (continual experiment, stop 37: a collection stamped 2026-12-02, the simulated
    # cell's ledger from 2026-01-01) moved the cutoff past every ledger row, so after the first
    # promotion no row was new to the incumbent again: nothing weighted up, no triggering kind.
    stamps = built.dataset.timestamp[~built.is_replay]
    stamps = stamps[np.isfinite(stamps)]
    latest = float(stamps.max()) if stamps.size else cutoff
    state["cutoff"] = max(float(state["cutoff"]), latest)
    if promoted:
        state["incumbent_cutoff"] = {"sha256": report.candidate_sha256, "cutoff": state["cutoff"]}
    elif "incumbent_cutoff" not in state and inc_sha is not None:
        state["incumbent_cutoff"] = {"sha256": inc_sha, "cutoff": cutoff}
    state["rounds"].append(
        {"round": n, "version": version, "gate_passed": report.passed, "promoted": promoted,
         "triggers": list(status.reasons), "manifest": str(built.manifest_path)}
    )  # fmt: skip
    _save_state(cfg, state)
    return RoundResult(
        True,
        status,
        version=version,
        model_path=str(model_path),
        manifest=str(built.manifest_path),
        gate_passed=report.passed,
        gate_reasons=report.reasons,
        promoted=promoted,
        incumbent=incumbent,
        triggering_kinds=triggering,
        seconds=time.time() - t0,
    )


def gate_model(
    cfg: LearnConfig,
    model_path: Path,
    incumbent: str | None,
    holdout: Any,
    triggering: tuple[str, ...],
    sim_suite_factory: SimSuiteFactory | None,
) -> GateReport:
    g = cfg.gate
    tol = GateTolerance(
        kind_success_drop=g.kind_success_drop,
        new_kind_min_gain=g.new_kind_min_gain,
        kind_min_rows=g.kind_min_rows,
        kind_test_level=g.kind_test_level or None,
        metric_test_level=g.metric_test_level or None,
        ece_max=g.ece_max,
    )
    suite = sim_suite_factory(Path(incumbent) if incumbent else None) if sim_suite_factory else None
    if len(holdout) == 0 or holdout.label.min() == holdout.label.max():
        raise DatasetError(
            f"the gate's held-out totes hold {len(holdout)} rows with one class only: need more data"
        )
    return gate(model_path, incumbent, holdout, tol, sim_suite=suite, new_kinds=triggering)


def reproduce(manifest_path: str | Path, out_path: str | Path, progress: bool = False) -> TrainResult:
    """Retrain a round's model from its manifest: same rows (verified), same config, same incumbent."""
    from grasping.modelfile import file_sha256

    built = load_manifest(manifest_path)
    m = built.manifest
    lc = m["learn_config"]
    cfg = LearnConfig(
        **{
            k: v
            for k, v in lc.items()
            if k not in ("triggers", "weights", "train", "gate", "ledgers", "replay")
        },
        ledgers=tuple(lc["ledgers"]),
        replay=tuple(lc["replay"]),
    )
    from learn.config import GateSettings, TrainSettings, TriggerConfig, WeightsConfig

    cfg = replace(
        cfg,
        triggers=TriggerConfig(**lc["triggers"]),
        weights=WeightsConfig(**lc["weights"]),
        train=TrainSettings(**lc["train"]),
        gate=GateSettings(**lc["gate"]),
    )
    incumbent = m.get("incumbent")
    if incumbent:
        want = m.get("incumbent_sha256")
        if not Path(incumbent).is_file() or (want and file_sha256(incumbent) != want):
            raise DatasetError(f"incumbent {incumbent} is not the file the round started from")
    res, _, _ = train_round(
        cfg,
        built,
        Path(out_path),
        incumbent=incumbent,
        cutoff=float(m["cutoff"]),
        version=m["version"],
        progress=progress,
    )
    return res


# --- the service ---------------------------------------------------------------------------------------


def run_service(
    cfg: LearnConfig,
    stop: threading.Event,
    *,
    sim_suite_factory: SimSuiteFactory | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
) -> None:
    """Check the triggers every `poll_s`; run a round when one fires. A failed round is logged and
    retried at the next check (a broken dataset must not kill the service)."""
    while not stop.is_set():
        try:
            res = run_round(cfg, sim_suite_factory=sim_suite_factory, progress=False)
            if on_round is not None and res.triggered:
                on_round(res)
        except Exception:  # noqa: BLE001 - logged with its traceback; the service keeps running
            log.exception("learning round failed; retrying at the next check")
        stop.wait(cfg.triggers.poll_s)
