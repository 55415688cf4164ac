"""Fit the auto-execute thresholds of a model on held-out simulated totes (`python -m sim.threshold_fit`).

What it is
    The guarantee an operator needs is about the picks the cell makes *without asking*:
    P(fail | executed without asking) <= alpha, per gripper. The rows that can certify it are the
    picks the cell itself would execute, not every candidate of a plan (the cell executes the best
    candidate of an item, which is a biased sample of the candidates). So this runs the real
    `CellController` on fresh totes with every threshold at 0 ("execute whatever ranks first, never
    ask"): each attempt is the candidate the cell would execute if its calibrated p reached the
    threshold, with its outcome. `grasping.calibration.selective_threshold` (Learn-then-Test,
    fixed-sequence binomial tests over descending thresholds) then picks, per gripper, the lowest
    threshold whose failure rate among executed picks is <= alpha with confidence 1 - delta.

What is randomised
    The totes: seeds from `np.random.SeedSequence(seed)` (as the benchmark's `episode_seeds`), on
    the training catalogs only (`train`, `procedural-train`, round robin). The benchmark's reporting
    catalogs and seeds are never used to fit. Every fit records its tote seeds.

What counts as success
    As in the benchmark: the pick held the item and the place put it in the box. A failed pick, a
    drop in transit, a collision all count as failures.

Split by tote, never by plan: the rows of one tote are near-duplicates (re-plans of one scene), so a
fit's totes and an evaluation's totes are disjoint seeds; the rows inside the fit are treated as
exchangeable, which is the assumption the guarantee rests on (stated in the model card).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FIT_CATALOGS = ("train", "procedural-train")


@dataclass(frozen=True)
class ExecSpec:
    """One always-execute tote (picklable: crosses process boundaries)."""

    index: int  # tote number within the run
    seed: int  # the tote's own seed
    catalog: str  # item catalog
    objects_per_tote: int  # items dropped into the tote, count
    model_path: str | None  # model file (None: the shipped default)


def tote_seeds(seed: int, n: int) -> list[int]:
    """n 32-bit tote seeds from one run seed (the benchmark's derivation)."""
    return [int(c.generate_state(1)[0]) for c in np.random.SeedSequence(seed).spawn(n)]


def _always_execute(planner):
    """Wrap a planner: every candidate's threshold 0 and the scene in distribution (never ask)."""

    def run(frame):
        plan = planner(frame)
        cands = tuple(replace(c, threshold=0.0) for c in plan.candidates)
        return replace(plan, candidates=cands, threshold=0.0, in_distribution=True)

    return run


def run_exec_tote(spec: ExecSpec) -> list[dict[str, Any]]:
    """Run one tote with the always-execute policy; one row per executed attempt."""
    from arm.controller import ControllerConfig
    from sim.benchmark.episode import _Instrumented
    from sim.stack import build_sim_stack

    cfg = ControllerConfig(cell_id="fit", wall_poll_s=0.0, max_attempts_per_tote=3 * spec.objects_per_tote)
    stack = build_sim_stack(
        catalog=spec.catalog,
        objects_per_tote=spec.objects_per_tote,
        seed=spec.seed,
        planner="learned",
        model_path=spec.model_path,
        controller_config=cfg,
    )
    rows: list[dict[str, Any]] = []
    try:
        arm = _Instrumented(stack.cell)
        ctl = stack.controller
        ctl.arm = arm
        ctl.planner = _always_execute(ctl.planner)
        tote = stack.feed.next_tote()
        families = {s.body_id: s.spec.family for s in stack.feed.spawned}

        def on_attempt(att, plan) -> None:
            if att.p_success is None:
                return
            rows.append(
                {
                    "tote": spec.index,
                    "seed": spec.seed,
                    "catalog": spec.catalog,
                    "p": float(att.p_success),
                    "gripper": att.grasp.gripper,
                    "success": bool(att.placed is not None and att.placed.success),
                    "reason": (att.outcome.reason if not att.outcome.success else att.placed.reason).value,
                    "family": families.get(arm.target, "none"),
                }
            )

        ctl.on_attempt = on_attempt
        ctl.run_tote(tote)
    finally:
        stack.close()
    return rows


def collect_rows(
    n_totes: int,
    seed: int,
    *,
    catalogs: tuple[str, ...] = FIT_CATALOGS,
    objects_per_tote: int = 8,
    model_path: str | None = None,
    workers: int = 1,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of n_totes always-execute totes (catalogs round robin) and the tote seeds used."""
    seeds = tote_seeds(seed, n_totes)
    specs = [
        ExecSpec(i, s, catalogs[i % len(catalogs)], objects_per_tote, model_path) for i, s in enumerate(seeds)
    ]
    rows: list[dict[str, Any]] = []
    if workers <= 1:
        for s in specs:
            rows.extend(run_exec_tote(s))
            log.info("tote %d/%d: %d rows so far", s.index + 1, n_totes, len(rows))
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            for part in pool.imap(run_exec_tote, specs):
                rows.extend(part)
    return rows, seeds


def fit_thresholds(
    rows: list[dict[str, Any]], alpha: float, delta: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-gripper thresholds (index scoring.SUCTION / PARALLEL_JAW) and what the fit saw."""
    from grasping.calibration import selective_threshold
    from grasping.types import GRIPPER_KINDS

    thr = np.full(len(GRIPPER_KINDS), np.inf)
    info: dict[str, Any] = {}
    for g, name in enumerate(GRIPPER_KINDS):
        sel = [r for r in rows if r["gripper"] == name]
        p = np.array([r["p"] for r in sel], dtype=np.float64)
        y = np.array([1.0 if r["success"] else 0.0 for r in sel])
        res = selective_threshold(p, y, alpha=alpha, delta=delta)
        thr[g] = res.threshold
        info[name] = asdict(res)
    return thr, info


def refit_model(
    model_in: str | Path,
    model_out: str | Path,
    rows: list[dict[str, Any]],
    seeds: list[int],
    *,
    alpha: float,
    delta: float,
    run_seed: int,
) -> dict[str, Any]:
    """Write `model_out`: `model_in` with thresholds refitted on `rows`, the fit in its metadata."""
    from grasping.modelfile import load_model, save_model

    m = load_model(model_in)
    thr, info = fit_thresholds(rows, alpha, delta)
    meta = {k: v for k, v in m.meta.items() if k not in ("arch", "thresholds")}
    meta["alpha"] = alpha
    meta["risk"] = "executed"
    meta["threshold_fit"] = {
        "method": "Learn-then-Test, fixed-sequence binomial tests over descending thresholds",
        "guarantee": "P(fail | executed without asking) <= alpha per gripper, with probability >= 1 - delta",
        "alpha": alpha,
        "delta": delta,
        "n": len(rows),
        "per_gripper": info,
        "thresholds": thr.tolist(),
        "policy": "CellController, every threshold 0 (the executed candidate of each decision)",
        "catalogs": sorted({r["catalog"] for r in rows}),
        "run_seed": run_seed,
        "tote_seeds": seeds,
        "previous_thresholds": m.thresholds.tolist(),
        "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_model(model_out, m.net, m.calibrators, thr, m.watchdog, meta, item_watchdog=m.item_watchdog)
    return meta["threshold_fit"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m sim.threshold_fit", description=__doc__.split("\n\n")[0].split("\n")[0]
    )
    ap.add_argument("--totes", type=int, default=60, help="held-out totes to run (default 60)")
    ap.add_argument("--seed", type=int, default=4242, help="run seed; tote seeds derive from it")
    ap.add_argument("--objects-per-tote", type=int, default=8, help="items per tote (default 8)")
    ap.add_argument("--model", default=None, help="model file (default: the shipped one)")
    ap.add_argument("--rows", type=Path, help="rows JSON: read it if it exists, else write it after running")
    ap.add_argument("--out", type=Path, help="write the refitted model here (with its .sha256)")
    ap.add_argument("--alpha", type=float, default=0.05, help="bound on P(fail | executed), default 0.05")
    ap.add_argument("--delta", type=float, default=0.1, help="1 - confidence of the bound, default 0.1")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--json", action="store_true", help="print the fit as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rows is not None and args.rows.exists():
        saved = json.loads(args.rows.read_text())
        rows, seeds, run_seed = saved["rows"], saved["tote_seeds"], saved["run_seed"]
    else:
        rows, seeds = collect_rows(
            args.totes,
            args.seed,
            objects_per_tote=args.objects_per_tote,
            model_path=args.model,
            workers=args.workers,
        )
        run_seed = args.seed
        if args.rows is not None:
            args.rows.parent.mkdir(parents=True, exist_ok=True)
            args.rows.write_text(json.dumps({"run_seed": run_seed, "tote_seeds": seeds, "rows": rows}))
    if args.out is not None:
        from sim.stack import DEFAULT_MODEL

        fit = refit_model(
            args.model or DEFAULT_MODEL,
            args.out,
            rows,
            seeds,
            alpha=args.alpha,
            delta=args.delta,
            run_seed=run_seed,
        )
    else:
        thr, info = fit_thresholds(rows, args.alpha, args.delta)
        fit = {"thresholds": thr.tolist(), "per_gripper": info, "n": len(rows)}
    if args.json:
        print(json.dumps({k: v for k, v in fit.items() if k != "tote_seeds"}, indent=2, default=str))
    else:
        for name, res in fit["per_gripper"].items():
            print(
                f"{name}: threshold {res['threshold']:.3f}, executed {res['n_exec']}/{res['n']}, "
                f"failed {res['n_fail']}, upper bound {res['upper_bound']:.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
