"""Learned vs analytic scoring on unseen items: the same benchmark episodes through the real controller.

Runs `pickcell bench`'s episode function (sim.benchmark) for each catalog in `--catalogs` (default the
two held-out test catalogs, `test` = random_urdfs 800-999 and `procedural`, never trained on) with
`--planner analytic` and `--planner learned --model FILE`, on the same seed, so both planners see the
same totes (items, drop poses, camera noise). Prints one table, writes the metrics JSON per run,
and with `--update-docs` replaces the `## learned vs analytic` section of docs/benchmarks.md.

Equivalent single runs:
    pickcell bench --catalog test --episodes 20 --seed 0 --workers 2 --planner analytic --json OUT
    pickcell bench --catalog test --episodes 20 --seed 0 --workers 2 --planner learned --model FILE --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "## learned vs analytic"


def run_one(catalog: str, planner: str, model: str | None, args: argparse.Namespace) -> list[dict]:
    """Episode records of one planner on one catalog (crashed episodes come back as {"crashed": ...})."""
    from sim.benchmark.runner import make_specs, run_episodes
    from sim.training import guarded_episode

    specs = make_specs(
        args.episodes,
        args.seed,
        catalog=catalog,
        objects_per_tote=args.objects,
        planner=planner,
        associate=args.associate,
        model_path=model,
    )
    eps, wall = run_episodes(specs, guarded_episode, workers=args.workers, progress=not args.no_progress)
    for e in eps:
        e["_wall"] = wall
    return eps


def summarise(eps: list[dict], crashed: list[int]) -> dict:
    """Benchmark metrics over the episodes that ran for both planners (paired comparison)."""
    from sim.benchmark.metrics import aggregate

    ok = [e for e in eps if e["episode"] not in crashed]
    m = aggregate(ok)
    m["wall_seconds"] = eps[0]["_wall"] if eps else 0.0
    m["model_version"] = next((e["model_version"] for e in ok), None)
    m["episodes_crashed_excluded"] = crashed
    m["crash_errors"] = sorted({e["crashed"] for e in eps if "crashed" in e})
    return m


def _pct(v, ci=None) -> str:
    if v is None:
        return "-"
    s = f"{100 * v:.1f}%"
    return s + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def _num(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| catalog | planner | first-attempt success [95% CI] | clearance | MPPH | assists/100 picks "
        "| damage | plan p50 / p99 ms | items | attempts | episodes left out (crashed) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, m in results.items():
        cat, planner = key.split("/")
        lines.append(
            f"| {cat} | {planner} | {_pct(m['first_attempt_success'], m['first_attempt_success_ci95'])} "
            f"| {_pct(m['clearance_rate'])} | {_num(m['mpph'], '{:.0f}')} "
            f"| {_num(m['assists_per_100_picks'])} | {_pct(m['damage_rate'])} "
            f"| {_num(m['plan_latency_ms_p50'], '{:.0f}')} / {_num(m['plan_latency_ms_p99'], '{:.0f}')} "
            f"| {m['items']} | {m['attempts']} | {len(m['episodes_crashed_excluded'])} |"
        )
    return lines


def update_docs(text: str, path: Path) -> None:
    """Replace (or append) this script's own section of docs/benchmarks.md, re-reading the file first."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    start = doc.find(SECTION + "\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text.rstrip("\n") + "\n" + (doc[end:] if end >= 0 else "")
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "grasping" / "models" / "default.safetensors"))
    ap.add_argument("--catalogs", nargs="+", default=["test", "procedural"], help="default: test procedural")
    ap.add_argument("--episodes", type=int, default=20, help="episodes (totes) per run (default 20)")
    ap.add_argument("--objects", type=int, default=8, help="items per tote (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="benchmark seed, the same for both planners")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--associate", choices=("sim", "none"), default="sim", help="who answers assists")
    ap.add_argument("--json", help="write every run's metrics here")
    ap.add_argument("--update-docs", action="store_true", help="rewrite this section of docs/benchmarks.md")
    ap.add_argument("--note", default="", help="extra text for the docs section (conditions, caveats)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    t0 = time.time()
    results: dict[str, dict] = {}
    for cat in args.catalogs:
        runs = {
            p: run_one(cat, p, args.model if p == "learned" else None, args) for p in ("analytic", "learned")
        }
        # An episode that crashed for either planner is left out of both (and reported).
        crashed = sorted({e["episode"] for eps in runs.values() for e in eps if "crashed" in e})
        for planner, eps in runs.items():
            m = summarise(eps, crashed)
            results[f"{cat}/{planner}"] = m
            print(
                f"{cat:>12} {planner:>8}: first-attempt {m['first_attempt_success']:.3f} "
                f"{m['first_attempt_success_ci95']}, clearance {m['clearance_rate']:.3f}, "
                f"MPPH {m['mpph']:.0f}, assists/100 {m['assists_per_100_picks']}, "
                f"damage {m['damage_rate']:.3f}, wall {m['wall_seconds']:.0f} s, "
                f"crashed episodes left out {crashed}",
                flush=True,
            )
    lines = table(results)
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.update_docs:
        version = next((m["model_version"] for k, m in results.items() if k.endswith("/learned")), "?")
        load = os.getloadavg()[0]
        model_arg = os.path.relpath(args.model, ROOT) if Path(args.model).is_absolute() else args.model
        cmd = " ".join(
            [
                f"python benchmarks/learned_vs_analytic.py --model {model_arg}",
                f"--catalogs {' '.join(args.catalogs)} --episodes {args.episodes} --objects {args.objects}",
                f"--seed {args.seed} --workers {args.workers} --associate {args.associate} --update-docs",
            ]
        )
        busy = " (contended: other engineers shared the cores)" if load > 1.5 else ""
        text = "\n".join(
            [
                SECTION,
                "",
                f"Both planners on the same totes (seed {args.seed}, {args.episodes} episodes x "
                f"{args.objects} items per catalog), through the real controller with the "
                f"`{args.associate}` associate. "
                f"Learned: `{model_arg}` (version `{version}`); analytic: the same geometric planner ranking "
                "by analytic score. Catalogs `test` (random_urdfs 800-999) and `procedural` (seeds from "
                "1,000,000) are never collected or trained on.",
                "",
                f"Command: `{cmd}`",
                "",
                f"Machine: 2-core x86_64, no GPU ({platform.python_version()}); 1-minute load average "
                f"{load:.1f} at the end{busy}. "
                "Success, MPPH and assists are simulated (robot time), so the load does not change them; "
                "plan latency is wall time and does. Total wall time "
                f"{(time.time() - t0) / 60:.0f} min.",
                "",
                *lines,
                "",
                *[
                    f"Crashed episodes ({k}): {m['crash_errors']}; they are left out of both planners' rows."
                    for k, m in results.items()
                    if m["crash_errors"]
                ],
                "",
                *([args.note, ""] if args.note else []),
            ]
        )
        update_docs(text, ROOT / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
