"""The README's "Where it stands" operator metrics, measured on the reporting seeds, resumably.

Runs the episodes of several `pickcell bench` configurations (catalog x associate) through one
worker pool, interleaved, and appends every finished episode record to `OUT/CATALOG-ASSOCIATE.jsonl`
as soon as it comes back. A run that is stopped (a shared machine, a deadline) keeps every episode
it finished; the next run skips them. Episode i of a configuration is the same tote as episode i of
`pickcell bench --seed SEED --episodes N` (seeds derived by `SeedSequence`, whatever the worker
count), so a partial run is a prefix-free subset of the full one, and `--summary` says how many
episodes each row holds.

    python benchmarks/operator_metrics.py --episodes 20 --workers 2 --out runs/operator
    python benchmarks/operator_metrics.py --out runs/operator --summary   # Markdown table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sim.benchmark.episode import run_bench_episode
from sim.benchmark.metrics import aggregate
from sim.benchmark.runner import DEFAULT_REPORTING_SEED, _iterate, make_specs, seed_range


def _done(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[int(rec["episode"])] = rec
    return out


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    per_config = []
    for cat in args.catalogs:
        for who in args.associates:
            specs = make_specs(
                args.episodes,
                args.seed,
                catalog=cat,
                objects_per_tote=args.objects,
                planner="learned",
                associate=who,
            )
            path = args.out / f"{cat}-{who}.jsonl"
            done = _done(path)
            per_config.append([(s, path) for s in specs if s.index not in done])
    # interleave: episode 0 of every configuration, then episode 1, ... (a stopped run covers all rows)
    order = [x for i in range(args.episodes) for cfg in per_config for x in cfg if x[0].index == i]
    by_key = {(s.catalog, s.associate, s.index): p for s, p in order}
    t0 = time.perf_counter()
    for rec in _iterate([s for s, _ in order], run_bench_episode, args.workers, "local"):
        path = by_key[(rec["catalog"], rec["associate"], rec["episode"])]
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            f"{time.perf_counter() - t0:7.0f} s  {path.stem} episode {rec['episode']}: "
            f"{rec['items_cleared']}/{rec['items']} placed",
            flush=True,
        )


def summary(args: argparse.Namespace) -> None:
    rows = []
    for path in sorted(args.out.glob("*.jsonl")):
        eps = list(_done(path).values())
        if not eps:
            continue
        m = aggregate(eps)
        rows.append((path.stem, len(eps), m))
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    ci = lambda m, k: f"{pct(m[k])} ({pct(m[k + '_ci95'][0])}-{pct(m[k + '_ci95'][1])})"  # noqa: E731
    print(
        "| catalog-associate | totes, items | autonomous_pick_rate (95% CI) | auto_precision (95% CI) "
        "| person_precision | first_attempt_success model / person | items_left_rate | "
        "interventions_per_100_items | max_attempts_on_one_item | damage_rate | first_attempt_success |"
    )
    print("| --- " * 11 + "|")
    for name, n, m in rows:
        by = m["first_attempt_success_by_decider"]
        print(
            f"| {name} | {n} totes, {m['items']} items | {ci(m, 'autonomous_pick_rate')} | "
            f"{ci(m, 'auto_precision')} | {pct(m['person_precision'])} of {m['person_attempts']} | "
            f"{pct(by['model']['value'])} / {pct(by['person']['value'])} | {pct(m['items_left_rate'])} "
            f"{m['items_left_by_fate']} | {m['interventions_per_100_items']:.1f} | "
            f"{m['max_attempts_on_one_item']} | {pct(m['damage_rate'])} {m['damage_by_kind']} | "
            f"{pct(m['first_attempt_success'])} |"
        )
    if args.json:
        print(json.dumps({name: m for name, _, m in rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder of CATALOG-ASSOCIATE.jsonl files")
    ap.add_argument("--catalogs", nargs="+", default=["procedural", "test"], help="catalogs (default both)")
    ap.add_argument("--associates", nargs="+", default=["none", "sim"], choices=("none", "sim"))
    ap.add_argument("--episodes", type=int, default=20, help="totes per configuration (default 20)")
    ap.add_argument("--objects", type=int, default=8, help="items per tote (default 8)")
    ap.add_argument("--seed", type=int, default=DEFAULT_REPORTING_SEED, help="benchmark seed (default 1000)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--summary", action="store_true", help="print the Markdown table of what is done")
    ap.add_argument("--json", action="store_true", help="with --summary: also every metric as JSON")
    args = ap.parse_args(argv)
    if seed_range(args.seed) != "reporting":
        print(f"note: --seed {args.seed} is not a reporting seed (1000-1099)", file=sys.stderr)
    if args.summary:
        summary(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
