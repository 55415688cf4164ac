"""Learning-round settings tried offline on a continual run's ledger, in seconds instead of an hour.

What it is
    `pickcell bench continual --work-dir DIR` leaves the cell's ledger (`DIR/cell.db`) and each
    round's dataset manifest. This replays round 1 offline for several learner settings: each
    variant fine-tunes the starting model on the rows recorded in round 0 plus the replay exports
    (`learn.learner.train_round`, exactly what the experiment runs), is judged by the gate's held-out
    checks (`learn.learner.gate_model`, without the simulation suite), and is scored on the rows the
    cell recorded after round 0 (totes no variant trained on): how many of the new kind's and of the
    familiar items' executed rows it would have executed alone, and how many of those failed. The
    default variant reproduces the experiment's own round-1 verdict number for number.

    python experiments/continual_offline.py --work-dir DIR \
        --variant default \
        --variant all-1e-4:freeze=none,lr=1e-4 \
        --variant replay-0.7:replay_share=0.7 \
        --variant replay-alone:distill=0 \
        --variant joint:mode=scratch,epochs=30 --seeds 21,22,23

    `mode=scratch` trains a new model on every row (replay plus the cell's), the joint-retraining
    upper bound the continual-learning literature compares fine-tuning against.

    `--start-model` fine-tunes (and gates against) another model than the run's, and `--replay`
    replaces the replay exports: e.g. a rebuilt model and the collections its recipe trained on.
    Careful: the gate's held-out totes then include rows that model trained on (its recipe holds
    out other totes), which favours it (docs/benchmarks.md, continual, stop 23).

What is randomised
    The learner's seed (`--seeds`: splits, sampling, initialisation of the heads). Settings that
    pass the gate at one seed and not at the next are noise, not a lever: the study runs each
    variant at every seed given.

What counts as success
    A setting the gate passes at every seed, with more of the new kind executed alone and no more
    failures among what it executes. Use a development seed's ledger only: a setting chosen here
    must then be measured on a fresh seed with the full experiment.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

_TRAIN_KEYS = {
    "freeze": str,
    "lr": float,
    "batch_size": int,
    "epochs": int,
    "patience": int,
    "risk": str,
    "alpha": float,
    "distill": float,  # weight of matching the start model's logits on old rows (0: replay alone)
    "mode": str,  # "finetune" the start model, or "scratch": joint retraining on all rows (the upper bound)
    # Shares of the non-held-out totes per split (train gets the rest): e.g. more conformal rows to
    # certify the ask thresholds on, fewer test rows (the gate's held-out totes test the model too).
    "val_fraction": float,
    "calib_fraction": float,
    "conformal_fraction": float,
    "test_fraction": float,
}
_WEIGHT_KEYS = {"replay_share": float, "human_boost": float, "loss_gain": float, "novelty_gain": float}


def _variant(text: str) -> tuple[str, dict[str, object]]:
    name, _, spec = text.partition(":")
    out: dict[str, object] = {}
    for item in filter(None, spec.split(",")):
        k, _, v = item.partition("=")
        kinds = {**_TRAIN_KEYS, **_WEIGHT_KEYS}
        if k not in kinds:
            raise SystemExit(f"--variant {text!r}: unknown setting {k!r} (known: {sorted(kinds)})")
        out[k] = kinds[k](v)
    return name, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", required=True, help="a `pickcell bench continual --work-dir` folder")
    ap.add_argument("--out", default=None, help="where variants are written (default WORK/offline)")
    ap.add_argument("--variant", action="append", default=[], help="NAME[:key=value,...]")
    ap.add_argument("--seeds", default="0", help="learner seeds, comma separated")
    ap.add_argument(
        "--weak-negative-weight", type=float, default=0.3, help="export weight of passed-over rows"
    )
    ap.add_argument(
        "--start-model",
        default=None,
        help="the model each variant fine-tunes and is gated against (default: the run's start model)",
    )
    ap.add_argument(
        "--replay",
        action="append",
        default=None,
        help="replay exports instead of the experiment's default ones (repeatable), e.g. the "
        "collections the start model was trained on",
    )
    args = ap.parse_args(argv)

    from grasping.learned_scorer import LearnedScorer
    from grasping.learning import _scores, outcome_rows
    from learn.dataset import BuiltDataset, build_dataset, load_manifest
    from learn.learner import gate_model, train_round
    from sim.benchmark.continual import ContinualConfig, learn_config

    work = Path(args.work_dir)
    out = Path(args.out or work / "offline")
    out.mkdir(parents=True, exist_ok=True)
    cc = ContinualConfig()
    if args.replay:
        cc = replace(cc, start_data=args.replay[0], extra_replay=tuple(args.replay[1:]))
    if args.start_model:
        cc = replace(cc, start_model=args.start_model)
    replay = (cc.start_data, *cc.extra_replay)
    start = cc.start_model
    r1 = load_manifest(next((work / "learn").glob("round-001-*/data/manifest.json")))
    cutoff = float(np.nanmax(r1.dataset.timestamp[~r1.is_replay]))  # the end of round 0
    built = build_dataset(
        [work / "cell.db"], replay, out / "data", weak_negative_weight=args.weak_negative_weight
    )
    ds = built.dataset
    later = (~built.is_replay) & (np.nan_to_num(ds.timestamp, nan=0.0) > cutoff)
    train = BuiltDataset(
        ds.subset(np.flatnonzero(~later)), built.is_replay[~later], built.manifest, built.manifest_path
    )
    ev = ds.subset(np.flatnonzero(later & outcome_rows(ds)))
    new = ev.family == ContinualConfig().new_family
    print(
        f"train rows {len(train.dataset)}; scored on {len(ev)} later rows ({int(new.sum())} of the new kind)"
    )

    def scored(path: str) -> str:
        sc = LearnedScorer.from_file(path)
        _, p = _scores(sc, ev)
        alone, ok = p >= sc.candidate_thresholds(ev.gripper), ev.label == 1
        return (
            f"new kind alone ok/failed {int((alone & ok & new).sum())}/{int((alone & ~ok & new).sum())}, "
            f"familiar {int((alone & ok & ~new).sum())}/{int((alone & ~ok & ~new).sum())}"
        )

    print(f"starting model: {scored(start)}")
    # The experiment's own settings (no simulation suite offline), with variants applied below.
    base = learn_config(replace(cc, sim_episodes=0), work / "cell.db", out)
    for text in args.variant or ["default"]:
        name, settings = _variant(text)
        t = {k: v for k, v in settings.items() if k in _TRAIN_KEYS}
        w = {k: v for k, v in settings.items() if k in _WEIGHT_KEYS}
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = replace(base, seed=seed, train=replace(base.train, **t), weights=replace(base.weights, **w))
            path = out / f"{name}-s{seed}.safetensors"
            _, holdout, trig = train_round(
                cfg,
                train,
                path,
                incumbent=start,
                cutoff=0.0,
                version=f"offline-{name}-s{seed}",
                progress=False,
            )
            verdict = gate_model(cfg, path, start, holdout, trig, None)
            fails = [r[6:90] for r in verdict.reasons if r.startswith("FAIL")]
            # How far from the bars, passed or not: the AUROC change and the pooled old kinds' change.
            margins = [
                r.split(": ", 1)[1].split(" (")[0] + " " + r[r.find("change") :].split(",")[0].split(";")[0]
                for r in verdict.reasons
                if ("AUROC" in r and "vs incumbent" in r) or "old kinds pooled" in r
            ]
            thr = LearnedScorer.from_file(str(path)).model.thresholds
            print(
                f"{name} seed {seed}: gate {'passed' if verdict.passed else 'refused'}; "
                f"thresholds suction/jaw {thr[0]:.3f}/{thr[1]:.3f}; {scored(str(path))}"
                + (f"; {'; '.join(margins)}" if margins else "")
                + (f"; {'; '.join(fails)}" if fails else ""),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    raise SystemExit(main())
