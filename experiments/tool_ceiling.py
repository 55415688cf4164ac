"""How much of a tote could this tool move at all? A ceiling on autonomy from a ground-truth oracle.

What it is
    The bench episode as `pickcell bench --associate none` runs it (the learned planner, the real
    `CellController`, nobody answering), with one addition: when the cell gives up on its tote
    (diverts it, or stops with items left), the ground-truth oracle (`sim/oracle.py`) takes over
    the leftovers before the tote leaves. The oracle sees what no camera sees (every item's pose,
    mass, surface and contacts) and searches what this tool can do: the 30 mm cup at every
    sealing point whose load stays within the cup's rating, least load first; the Panda hand's
    jaw at closing directions every 10 degrees and every height, through the centre of mass,
    straight down and tilted 20 degrees either way, each grasp checked for reach and collision
    by the arm. Up to 3 tries per leftover item, placing what it picks (an item taken out can
    free another). What the cell placed alone plus what the oracle moved, over the items
    presented, is a ceiling on `autonomous_pick_rate` for this tool and the cell's actions:
    what no planner choosing among top-down and 20-degree grasps could beat on these totes,
    except by picking the earlier items differently.

    python experiments/tool_ceiling.py --run procedural:1032 --run test:1032 \
        --episodes 20 --workers 2 --json out/ceiling.json --png docs/images/tool_ceiling.png

What is randomised
    Exactly what the bench randomises, from the same seeds (`sim.benchmark.runner.make_specs`):
    the same seed gives the cell the same totes as `pickcell bench --seed S --associate none`.
    The oracle is deterministic.

What counts as success
    Nothing is scored against a target: the experiment measures. Per run it reports the items
    presented, those the cell placed alone, those left in the tote when it gave up (by family),
    those the oracle then moved (by family, gripper and whether the hand was tilted), and the
    ceiling. A ceiling under a target says the target needs another tool or other actions
    (pushing an item off a wall, a smaller cup, a hand that leans further), not a better planner.
    The oracle's search is not exhaustive (no pushes, no tilts past 20 degrees unless
    `--jaw-tilts` asks, no regrasp in hand), so the ceiling is that of these actions, measured,
    not a proof about every tool.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ORACLE_TRIES_PER_ITEM = 3  # the oracle's own limit (OracleConfig.max_failures), count
DEFAULT_TILTS = (0.0, 20.0, -20.0)  # degrees, the oracle's jaw tilts (OracleConfig.jaw_tilts_deg)


def _oracle_takes_over(
    cell, families: dict[int, str], packed_by_cell: set[int], jaw_tilts_deg: tuple[float, ...]
) -> dict[str, Any]:
    """The oracle on whatever is left in the tote: what was left, what it moved, how it tried."""
    from sim.oracle import OracleConfig, OracleGraspSource

    left = list(cell.items_in_tote())
    if cell.arm.held_item is not None:
        cell.arm.home()
    oracle = OracleGraspSource(cell, OracleConfig(jaw_tilts_deg=jaw_tilts_deg))
    moved: list[str] = []
    tries: list[dict[str, Any]] = []
    for _ in range(ORACLE_TRIES_PER_ITEM * len(left)):
        proposal = oracle.propose()
        if proposal is None:
            break  # no feasible grasp on anything left
        body, grasp = proposal
        out = cell.arm.pick(grasp)
        ok = False
        if out.success:
            placement = oracle.placement()
            if placement is not None:
                ok = cell.arm.place(placement).success and body in cell.items_in_box()
        if cell.arm.held_item is not None:
            cell.arm.home()
        tilt = float(np.degrees(np.arccos(min(1.0, abs(float(grasp.approach[2]))))))
        tries.append(
            {
                "family": families.get(body, "?"),
                "gripper": grasp.gripper,
                "tilt_deg": round(tilt, 1),
                "reason": out.reason.value,
                "placed": bool(ok),
            }
        )
        if ok:
            moved.append(families.get(body, "?"))
        else:
            oracle.record_failure(body, grasp.gripper, grasp)
    return {
        "placed_alone": len(packed_by_cell),
        "left": [families.get(b, "?") for b in left],
        "oracle_moved": moved,
        "oracle_tries": tries,
        "still_left": [families.get(b, "?") for b in cell.items_in_tote()],
    }


def run_ceiling_episode(spec, jaw_tilts_deg: tuple[float, ...] = DEFAULT_TILTS) -> dict[str, Any]:
    """One bench episode (nobody answering), then the oracle on what the cell left."""
    from sim.associate import SimAssistChannel
    from sim.benchmark.episode import build_bench_stack
    from sim.benchmark.record import ToteRecorder

    stack = build_bench_stack(spec)
    try:
        cell = stack.cell
        stack.controller.assist = SimAssistChannel(None, lambda: cell.arm.robot_time, answer=False)
        tote = stack.feed.next_tote()
        recorder = ToteRecorder(stack)
        families = dict(recorder.families)
        result: dict[str, Any] = {}
        divert = stack.feed.divert_tote

        def oracle_then_divert(*args, **kwargs):
            if not result:  # before the tote's items are cleared away
                result.update(_oracle_takes_over(cell, families, set(recorder.packed), jaw_tilts_deg))
            return divert(*args, **kwargs)

        stack.feed.divert_tote = oracle_then_divert  # type: ignore[method-assign]
        rep = stack.controller.run_tote(tote)
        if not result:  # the tote ended without a divert (cleared, or a stop with items left)
            result.update(_oracle_takes_over(cell, families, set(recorder.packed), jaw_tilts_deg))
        return {
            "episode": spec.index,
            "seed": spec.seed,
            "status": rep.status,
            "items": len(families),
            **result,
        }
    finally:
        stack.close()


def summarise(catalog: str, seed: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over a run's episodes; the ceiling with a Wilson 95% interval."""
    from sim.benchmark.metrics import wilson

    items = sum(r["items"] for r in records)
    alone = sum(r["placed_alone"] for r in records)
    moved = sum(len(r["oracle_moved"]) for r in records)
    tries = [t for r in records for t in r["oracle_tries"]]
    by = collections.Counter(
        f"{t['family']}/{t['gripper']}/{'tilted' if t['tilt_deg'] > 1.0 else 'straight'}/"
        f"{'placed' if t['placed'] else t['reason']}"
        for t in tries
    )
    return {
        "catalog": catalog,
        "seed": seed,
        "episodes": len(records),
        "items": items,
        "placed_alone": alone,
        "autonomous_pick_rate": alone / items if items else None,
        "left_when_given_up": sum(len(r["left"]) for r in records),
        "left_by_family": dict(collections.Counter(f for r in records for f in r["left"])),
        "oracle_moved": moved,
        "oracle_moved_by_family": dict(collections.Counter(f for r in records for f in r["oracle_moved"])),
        "oracle_tries": dict(sorted(by.items())),
        "still_left_by_family": dict(collections.Counter(f for r in records for f in r["still_left"])),
        "ceiling": (alone + moved) / items if items else None,
        "ceiling_ci95": list(wilson(alone + moved, items)) if items else None,
    }


def draw(summaries: list[dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Wide enough that each bar's two-line label stays clear of its neighbours' (about 1.3 in a run).
    fig, ax = plt.subplots(figsize=(max(7.5, 1.3 * len(summaries) + 1.0), 4.2))
    xs = np.arange(len(summaries))
    alone = np.array([s["autonomous_pick_rate"] for s in summaries])
    ceil = np.array([s["ceiling"] for s in summaries])
    lo = np.array([s["ceiling_ci95"][0] for s in summaries])
    hi = np.array([s["ceiling_ci95"][1] for s in summaries])
    ax.bar(xs, alone, 0.55, color="#4c72b0", label="placed by the cell alone")
    oracle_label = "then moved by the ground-truth oracle"
    ax.bar(xs, ceil - alone, 0.55, bottom=alone, color="#dd8452", label=oracle_label)
    ax.errorbar(
        xs,
        ceil,
        yerr=[np.clip(ceil - lo, 0, None), np.clip(hi - ceil, 0, None)],
        fmt="none",
        ecolor="k",
        capsize=4,
        lw=1,
    )
    ax.axhline(target, color="#c44e52", ls="--", lw=1.2, label=f"issue 12 target {target:.2f}")
    for x, s in zip(xs, summaries, strict=True):
        left = s["items"] - s["placed_alone"] - s["oracle_moved"]
        ax.text(
            x,
            s["ceiling_ci95"][1] + 0.012,
            f"{s['ceiling']:.1%}\n{left} of {s['items']} left by both",
            ha="center",
            va="bottom",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0},
        )
    ax.set_xticks(xs, [f"{s['catalog']}\nseed {s['seed']}" for s in summaries])
    ax.set_ylim(0.5, 1.12)
    ax.set_ylabel("items placed / items presented")
    ax.set_title("Autonomy and this tool's ceiling (Panda hand + 30 mm cup, nobody answering)", fontsize=10)
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="CATALOG:SEED",
        help="a catalog and a bench seed, e.g. procedural:1032 (repeatable)",
    )
    ap.add_argument("--episodes", type=int, default=20, help="totes per run (default 20)")
    ap.add_argument("--objects-per-tote", type=int, default=8, help="items per tote (default 8)")
    ap.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    ap.add_argument("--target", type=float, default=0.90, help="the autonomy target drawn (default 0.90)")
    ap.add_argument(
        "--jaw-tilts",
        default="0,20,-20",
        help="the oracle's jaw tilts in degrees, about both horizontal axes (default 0,20,-20; the\n"
        "cell's own planner grasps straight down)",
    )
    ap.add_argument("--json", type=Path, help="write the summaries and the episode records here")
    ap.add_argument("--png", type=Path, help="draw the ceiling per run here")
    args = ap.parse_args(argv)

    from sim.benchmark.runner import make_specs, run_episodes

    tilts = tuple(float(t) for t in args.jaw_tilts.split(","))

    out: dict[str, Any] = {"command": " ".join(sys.argv), "runs": []}
    for run in args.run:
        catalog, _, seed_s = run.rpartition(":")
        if not catalog:
            ap.error(f"--run wants CATALOG:SEED, got {run!r}")
        seed = int(seed_s)
        specs = make_specs(
            args.episodes,
            seed,
            catalog=catalog,
            objects_per_tote=args.objects_per_tote,
            planner="learned",
            associate="none",
        )
        t0 = time.perf_counter()
        records, _ = run_episodes(
            specs, partial(run_ceiling_episode, jaw_tilts_deg=tilts), workers=args.workers
        )
        s = summarise(catalog, seed, records)
        s["wall_seconds"] = round(time.perf_counter() - t0, 1)
        s["jaw_tilts_deg"] = list(tilts)
        out["runs"].append({**s, "episodes_detail": records})
        print(
            f"{catalog} seed {seed}: {s['items']} items, placed alone {s['placed_alone']} "
            f"({s['autonomous_pick_rate']:.1%}), left {s['left_when_given_up']}, "
            f"oracle moved {s['oracle_moved']}, "
            f"ceiling {s['ceiling']:.1%} ({s['ceiling_ci95'][0]:.1%}-{s['ceiling_ci95'][1]:.1%}); "
            f"still left {s['still_left_by_family']}; oracle tries {s['oracle_tries']}",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
    if args.png:
        summaries = [{k: v for k, v in r.items() if k != "episodes_detail"} for r in out["runs"]]
        draw(summaries, args.target, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
