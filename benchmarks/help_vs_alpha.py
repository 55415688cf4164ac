"""Help rate vs alpha: what the guaranteed precision of unasked picks costs in questions to people.

What it measures
    For alpha in 1, 2, 5, 10 %: the per-gripper auto-execute thresholds that certify
    P(fail | executed without asking) <= alpha at confidence 1 - delta (Learn-then-Test,
    `grasping.calibration.selective_threshold`), then, on other totes, the share of the cell's
    decisions that would go to a person (help rate: calibrated p below its gripper's threshold) and
    the realised precision of the ones it would take alone (success rate, with a Clopper-Pearson
    interval), against the 1 - alpha the fit promises.

Where the rows come from
    `python -m sim.threshold_fit --rows FILE`: the real cell controller on simulated totes with every
    threshold at 0, one row per executed pick (calibrated p, gripper, outcome, tote). Rows of the
    same tote are never split: with `--eval-rows` the thresholds are fitted on `--rows` and measured
    on `--eval-rows` (other totes, e.g. the `procedural` and `test` catalogs); without it, a two-fold
    cross-fit by tote (fit on half the totes, measure on the other half, both ways, pooled).

Limits, stated
    It is a replay of the always-execute run, not a closed loop: with a threshold the cell would ask
    about the rows below it and the later decisions of that tote would differ. The benchmark
    (`pickcell bench --associate none`) measures `auto_precision` in the closed loop.

Run:
    python benchmarks/help_vs_alpha.py --rows runs/fit_rows.json [--eval-rows runs/eval_rows.json] \
        --png docs/images/help_vs_alpha.png --json runs/help_vs_alpha.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALPHAS = (0.01, 0.02, 0.05, 0.10)


def clopper_pearson(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a success rate k / n."""
    from scipy.stats import beta

    if n == 0:
        return (0.0, 1.0)
    a = (1.0 - conf) / 2.0
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def evaluate(rows: list[dict], thresholds: np.ndarray) -> dict:
    """Help rate and realised precision of `thresholds` (per gripper) on `rows`."""
    from grasping.types import GRIPPER_KINDS

    thr = {g: float(thresholds[i]) for i, g in enumerate(GRIPPER_KINDS)}
    alone = [r for r in rows if r["p"] >= thr[r["gripper"]]]
    ok = sum(r["success"] for r in alone)
    lo, hi = clopper_pearson(ok, len(alone))
    out = {
        "decisions": len(rows),
        "executed_alone": len(alone),
        "help_rate": 1.0 - len(alone) / len(rows) if rows else float("nan"),
        "precision": ok / len(alone) if alone else float("nan"),
        "precision_ci95": [lo, hi],
    }
    for g in GRIPPER_KINDS:
        a = [r for r in alone if r["gripper"] == g]
        k = sum(r["success"] for r in a)
        out[g] = {"executed_alone": len(a), "precision": k / len(a) if a else float("nan")}
    return out


def _pool(parts: list[dict]) -> dict:
    from grasping.types import GRIPPER_KINDS

    dec = sum(p["decisions"] for p in parts)
    ex = sum(p["executed_alone"] for p in parts)
    ok = sum(round(p["precision"] * p["executed_alone"]) for p in parts if p["executed_alone"])
    lo, hi = clopper_pearson(ok, ex)
    out = {
        "decisions": dec,
        "executed_alone": ex,
        "help_rate": 1.0 - ex / dec if dec else float("nan"),
        "precision": ok / ex if ex else float("nan"),
        "precision_ci95": [lo, hi],
    }
    for g in GRIPPER_KINDS:
        n = sum(p[g]["executed_alone"] for p in parts)
        k = sum(round(p[g]["precision"] * p[g]["executed_alone"]) for p in parts if p[g]["executed_alone"])
        out[g] = {"executed_alone": n, "precision": k / n if n else float("nan")}
    return out


def run(rows: list[dict], eval_rows: list[dict] | None, delta: float, min_exec: int, seed: int) -> dict:
    from sim.threshold_fit import fit_thresholds

    results = {}
    if eval_rows is None:
        totes = sorted({r["tote"] for r in rows})
        perm = np.random.default_rng(seed).permutation(len(totes))
        half = {totes[i] for i in perm[: len(totes) // 2]}
        folds = [[r for r in rows if r["tote"] in half], [r for r in rows if r["tote"] not in half]]
    for a in ALPHAS:
        if eval_rows is not None:
            thr, info = fit_thresholds(rows, a, delta, min_exec)
            res = evaluate(eval_rows, thr)
            res["thresholds"] = thr.tolist()
        else:
            parts, thrs = [], []
            for fit, test in ((folds[0], folds[1]), (folds[1], folds[0])):
                thr, _ = fit_thresholds(fit, a, delta, min_exec)
                parts.append(evaluate(test, thr))
                thrs.append(thr.tolist())
            res = _pool(parts)
            res["thresholds"] = thrs
        res["alpha"] = a
        res["promised_precision"] = 1.0 - a
        results[f"{a:.2f}"] = res
    return results


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [results[k]["alpha"] for k in results]
    help_rate = [results[k]["help_rate"] for k in results]
    prec = [results[k]["precision"] for k in results]
    lo = [results[k]["precision_ci95"][0] for k in results]
    hi = [results[k]["precision_ci95"][1] for k in results]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    x = [100 * a for a in alphas]
    ax[0].plot(x, [100 * h for h in help_rate], marker="o")
    ax[0].set_xlabel("alpha (%)")
    ax[0].set_ylabel("decisions sent to a person (%)")
    ax[0].set_title("help rate")
    ax[0].set_ylim(0, 100)
    p = np.array(prec) * 100
    err = np.maximum(0.0, np.array([p - np.array(lo) * 100, np.array(hi) * 100 - p]))
    ax[1].errorbar(x, p, yerr=err, marker="o", capsize=3, label="realised (95% CI)")
    ax[1].plot(x, [100 * (1 - a) for a in alphas], linestyle="--", color="0.5", label="1 - alpha")
    ax[1].set_xlabel("alpha (%)")
    ax[1].set_ylabel("success of unasked picks (%)")
    ax[1].set_title("precision of what the cell does alone")
    ax[1].set_ylim(min([80.0] + [100 * v for v in lo if np.isfinite(v)]) - 1, 100.5)
    ax[1].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=Path, required=True, help="fit rows (python -m sim.threshold_fit --rows)")
    ap.add_argument("--eval-rows", type=Path, help="rows of other totes to measure on (default: cross-fit)")
    ap.add_argument("--delta", type=float, default=0.1, help="1 - confidence of the bound (default 0.1)")
    ap.add_argument("--min-exec", type=int, default=100, help="executed picks where the walk starts")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cross-fit's tote split")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "images" / "help_vs_alpha.png")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    rows = json.loads(args.rows.read_text())["rows"]
    ev = json.loads(args.eval_rows.read_text())["rows"] if args.eval_rows else None
    res = run(rows, ev, args.delta, args.min_exec, args.seed)
    n_fit = len({r["tote"] for r in rows})
    where = (
        f"fit on {n_fit} totes, measured on {len({r['tote'] for r in ev})} other totes"
        if ev
        else f"2-fold cross-fit by tote over {n_fit} totes"
    )
    plot(res, args.png, f"help rate vs alpha (delta {args.delta}; {where})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"where": where, "delta": args.delta, "results": res}, indent=2))
    print(f"{where}; delta {args.delta}")
    print("| alpha | help rate | unasked picks | realised precision (95% CI) | suction / jaw precision |")
    print("| --- | --- | --- | --- | --- |")
    for r in res.values():
        lo, hi = r["precision_ci95"]
        print(
            f"| {r['alpha']:.0%} | {r['help_rate']:.1%} | {r['executed_alone']} / {r['decisions']} | "
            f"{r['precision']:.1%} ({lo:.1%}-{hi:.1%}) | {r['suction']['precision']:.1%} "
            f"({r['suction']['executed_alone']}) / {r['parallel_jaw']['precision']:.1%} "
            f"({r['parallel_jaw']['executed_alone']}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
