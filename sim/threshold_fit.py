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
ALPHAS = (0.01, 0.02, 0.05, 0.10)  # alphas a model file carries certified thresholds for


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
        clusters = tuple(replace(c, in_distribution=None) for c in plan.clusters)
        return replace(plan, candidates=cands, clusters=clusters, threshold=0.0, in_distribution=True)

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
    journal: Path | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of n_totes always-execute totes (catalogs round robin) and the tote seeds used.

    With `journal`, each finished tote is appended to it as one JSON line ({"tote", "seed", "rows"})
    and totes already there are not run again: a long run can be stopped and resumed, and what it
    has so far can be fitted on (`read_journal`)."""
    seeds = tote_seeds(seed, n_totes)
    done = {t["tote"]: t for t in read_journal(journal)} if journal is not None and journal.exists() else {}
    specs = [
        ExecSpec(i, s, catalogs[i % len(catalogs)], objects_per_tote, model_path)
        for i, s in enumerate(seeds)
        if i not in done
    ]

    def keep(spec_rows: tuple[int, int, list[dict[str, Any]]]) -> None:
        i, s, part = spec_rows
        done[i] = {"tote": i, "seed": s, "rows": part}
        if journal is not None:
            with open(journal, "a") as f:
                f.write(json.dumps(done[i]) + "\n")
        log.info("tote %d done (%d of %d)", i, len(done), n_totes)

    if workers <= 1:
        for s in specs:
            keep(_run_indexed(s))
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            for res in pool.imap_unordered(_run_indexed, specs):
                keep(res)
    rows = [r for i in sorted(done) for r in done[i]["rows"]]
    return rows, [done[i]["seed"] for i in sorted(done)]


def _run_indexed(spec: ExecSpec) -> tuple[int, int, list[dict[str, Any]]]:
    return spec.index, spec.seed, run_exec_tote(spec)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The totes a `collect_rows` journal holds (a line cut short by a kill is ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def live_item_descriptors(n_scenes: int, seed: int, objects_per_tote: int = 8) -> list[list[list[float]]]:
    """Item descriptors of n fresh totes of the training catalogs (round robin), one list per tote.

    Planning is not needed: the descriptors come from the segmented depth image alone.
    """
    from grasping.pointcloud import segment_scene
    from grasping.watchdog import scene_item_descriptors
    from sim.catalogs import load_catalog
    from sim.scene import SimCell

    out = []
    for i, s in enumerate(tote_seeds(seed, n_scenes)):
        with SimCell(seed=s) as cell:
            cell.fill(
                load_catalog(FIT_CATALOGS[i % len(FIT_CATALOGS)]),
                objects_per_tote,
                np.random.default_rng([s, 0]),
            )
            cloud = segment_scene(cell.camera.capture(), cell.tote_bounds)
        out.append(scene_item_descriptors(cloud).tolist())
    return out


def fit_thresholds(
    rows: list[dict[str, Any]], alpha: float, delta: float, min_exec: int = 100
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
        res = selective_threshold(p, y, alpha=alpha, delta=delta, min_exec=min_exec)
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
    min_exec: int = 100,
    item_scenes: list[list[list[float]]] | None = None,
    item_seed: int | None = None,
) -> dict[str, Any]:
    """Write `model_out`: `model_in` with thresholds refitted on `rows` (and, given `item_scenes`,
    the item watchdog's per-item threshold fitted on them), the fits in its metadata."""
    from grasping.modelfile import load_model, save_model
    from grasping.watchdog import fit_item_threshold

    m = load_model(model_in)
    thr, info = fit_thresholds(rows, alpha, delta, min_exec)
    # Thresholds for the other alphas a cell may be configured with (LearnedScorer(alpha=...)).
    by_alpha = {
        f"{a:g}": fit_thresholds(rows, a, delta, min_exec)[0].tolist() for a in sorted({*ALPHAS, alpha})
    }
    item_wd = m.item_watchdog
    item_info: dict[str, Any] | None = None
    if item_scenes is not None:
        if item_wd is None:
            raise ValueError(f"{model_in} has no item watchdog to give a per-item threshold")
        item_wd, item_info = fit_item_threshold(item_wd, [np.asarray(s) for s in item_scenes if s])
        item_info = {**item_info, "catalogs": list(FIT_CATALOGS), "seed": item_seed}
    meta = {k: v for k, v in m.meta.items() if k not in ("arch", "thresholds")}
    meta["alpha"] = alpha
    meta["risk"] = "executed"
    meta["threshold_fit"] = {
        "method": "Learn-then-Test, fixed-sequence binomial tests over descending thresholds",
        "guarantee": "P(fail | executed without asking) <= alpha per gripper, with probability >= 1 - delta",
        "alpha": alpha,
        "delta": delta,
        "min_exec": min_exec,
        "n": len(rows),
        "per_gripper": info,
        "thresholds": thr.tolist(),
        "by_alpha": by_alpha,
        "policy": "CellController, every threshold 0 (the executed candidate of each decision)",
        "catalogs": sorted({r["catalog"] for r in rows}),
        "run_seed": run_seed,
        "tote_seeds": seeds,
        "previous_thresholds": m.thresholds.tolist(),
        "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if item_info is not None:
        meta["item_threshold_fit"] = item_info
    save_model(model_out, m.net, m.calibrators, thr, m.watchdog, meta, item_watchdog=item_wd)
    return {**meta["threshold_fit"], "item_threshold_fit": item_info}


CARD_HEADING = "## Auto-execute thresholds: guaranteed precision of unasked picks"


def card_section(fit: dict[str, Any], command: str) -> str:
    """The model card's section on the threshold fit (Markdown), from `refit_model`'s return value."""
    lines = [
        CARD_HEADING,
        "",
        f"Refitted {fit['fitted']} by `sim.threshold_fit` (this section replaces the conformal "
        "thresholds above as what the cell uses; the network, calibrators and watchdogs are unchanged).",
        "",
        f"- guarantee: {fit['guarantee']}; alpha {fit['alpha']}, delta {fit['delta']} "
        f"(confidence {1 - fit['delta']:.0%}), for picks exchangeable with the fit's",
        f"- method: {fit['method']}; the walk starts where {fit['min_exec']} picks are executed",
        f"- rows: {fit['n']} executed picks of the real controller with every threshold at 0 "
        f"({fit['policy']}), on {len(fit['tote_seeds'])} held-out totes of {fit['catalogs']}, split by "
        "tote from everything the model was trained or calibrated on; tote seeds in the file's "
        "metadata (`threshold_fit.tote_seeds`)",
        f"- thresholds (calibrated p; suction, jaw): {[round(t, 3) for t in fit['thresholds']]} "
        f"(before: {[round(t, 3) for t in fit['previous_thresholds']]}, CRC on the joint rate)",
        "",
        "| gripper | picks | executed alone at the threshold | failed | failure rate | "
        f"{1 - fit['delta']:.0%} upper bound |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for g, r in fit["per_gripper"].items():
        rate = r["n_fail"] / r["n_exec"] if r["n_exec"] else float("nan")
        lines.append(
            f"| {g} | {r['n']} | {r['n_exec']} ({r['coverage']:.0%}) | {r['n_fail']} | {rate:.3f} | "
            f"{r['upper_bound']:.3f} |"
        )
    lines += ["", "Thresholds certified for the alphas a cell may be configured with (`--alpha`):", ""]
    lines += ["| alpha | suction | jaw |", "| --- | --- | --- |"]
    for a, thr in fit["by_alpha"].items():
        lines.append(f"| {a} | {float(thr[0]):.3f} | {float(thr[1]):.3f} |")
    item = fit.get("item_threshold_fit")
    if item:
        lines += [
            "",
            f"Per-item watchdog threshold (doubt per item): {item['item_threshold']:.3f} (LOF units), the "
            f"conformal {item['item_quantile']} quantile of {int(item['items'])} items of "
            f"{int(item['scenes'])} fresh totes of {item['catalogs']} (seed {item['seed']}), none of them "
            "in the item bank.",
        ]
    lines += ["", "Reproduce:", "```", command, "```", ""]
    return "\n".join(lines)


def write_card_section(card: Path, section: str) -> None:
    """Replace the card's threshold section (or append it)."""
    text = card.read_text() if card.exists() else ""
    if CARD_HEADING in text:
        head, rest = text.split(CARD_HEADING, 1)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text)


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
    ap.add_argument(
        "--journal",
        type=Path,
        help="JSON lines, one per finished tote: resume from it, or fit on it as it is",
    )
    ap.add_argument("--no-run", action="store_true", help="with --journal: fit on the totes it has, run none")
    ap.add_argument("--out", type=Path, help="write the refitted model here (with its .sha256)")
    ap.add_argument("--alpha", type=float, default=0.05, help="bound on P(fail | executed), default 0.05")
    ap.add_argument("--delta", type=float, default=0.1, help="1 - confidence of the bound, default 0.1")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument(
        "--catalog",
        action="append",
        default=None,
        help="catalog (repeatable; default train and procedural-train). Test catalogs give evaluation "
        "rows (--rows) only: a fit (--out) refuses them",
    )
    ap.add_argument("--min-exec", type=int, default=100, help="executed picks where the walk starts")
    ap.add_argument(
        "--item-scenes",
        type=int,
        default=0,
        help="with --out: fit the item watchdog's per-item threshold on this many fresh training totes",
    )
    ap.add_argument("--json", action="store_true", help="print the fit as JSON")
    ap.add_argument("--card", type=Path, help="with --out: write the fit's section into this model card")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rows is not None and args.rows.exists():
        saved = json.loads(args.rows.read_text())
        rows, seeds, run_seed = saved["rows"], saved["tote_seeds"], saved["run_seed"]
    elif args.no_run:
        if args.journal is None or not args.journal.exists():
            print("error: --no-run needs an existing --journal")
            return 2
        totes = sorted(read_journal(args.journal), key=lambda t: t["tote"])
        rows = [r for t in totes for r in t["rows"]]
        seeds, run_seed = [t["seed"] for t in totes], args.seed
        if args.rows is not None:
            args.rows.parent.mkdir(parents=True, exist_ok=True)
            args.rows.write_text(json.dumps({"run_seed": run_seed, "tote_seeds": seeds, "rows": rows}))
    else:
        rows, seeds = collect_rows(
            args.totes,
            args.seed,
            catalogs=tuple(args.catalog or FIT_CATALOGS),
            objects_per_tote=args.objects_per_tote,
            model_path=args.model,
            workers=args.workers,
            journal=args.journal,
        )
        run_seed = args.seed
        if args.rows is not None:
            args.rows.parent.mkdir(parents=True, exist_ok=True)
            args.rows.write_text(json.dumps({"run_seed": run_seed, "tote_seeds": seeds, "rows": rows}))
    if args.out is not None:
        from sim.stack import DEFAULT_MODEL

        bad = sorted({r["catalog"] for r in rows} - set(FIT_CATALOGS))
        if bad:
            print(f"error: refusing to fit thresholds on {bad}: only {list(FIT_CATALOGS)} are fit on")
            return 2
        item_scenes = None
        if args.item_scenes > 0:
            item_scenes = live_item_descriptors(args.item_scenes, run_seed + 1, args.objects_per_tote)
        fit = refit_model(
            args.model or DEFAULT_MODEL,
            args.out,
            rows,
            seeds,
            alpha=args.alpha,
            delta=args.delta,
            run_seed=run_seed,
            min_exec=args.min_exec,
            item_scenes=item_scenes,
            item_seed=run_seed + 1 if item_scenes is not None else None,
        )
    else:
        thr, info = fit_thresholds(rows, args.alpha, args.delta, args.min_exec)
        fit = {"thresholds": thr.tolist(), "per_gripper": info, "n": len(rows)}
    if args.out is not None and args.card is not None:
        import shlex
        import sys

        cmd = "python -m sim.threshold_fit " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        write_card_section(args.card, card_section(fit, cmd))
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
