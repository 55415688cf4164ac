"""The ground-truth oracle's pick success per catalog and per item family, with Wilson 95% intervals.

    .venv/bin/python benchmarks/oracle_success.py --run procedural:200-215 --run test:200-207 \
        --run train:200-207 [--objects 10] [--episodes-dir DIR] [--json OUT] [--update-docs]

Each `--run CATALOG:FIRST-LAST` runs one episode per seed (`sim.episode.run_episode`, the same loop as
`pickcell sim pick --grasp oracle`): fill a tote with `--objects` items, then let the oracle pick
and place until the tote is empty, it declines what is left, or 2 x items attempts were made.
An attempt succeeds when the item was picked, released and came to rest inside the box; an item
is cleared when one of its attempts succeeded. Per family the denominator of "items cleared" is the
number of that family's items in the tote after the fill (the fill is replayed from the seed to
count them: PyBullet DIRECT is deterministic).

With `--episodes-dir`, each episode's JSON is kept there and reused by later runs (delete a file
to re-run it); measurements of different code must go to different folders.
`--update-docs` replaces the generated table between the `oracle_success` markers in the
`## oracle` section of docs/benchmarks.md (the prose around it is written by hand).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- oracle_success:begin -->", "<!-- oracle_success:end -->"

log = logging.getLogger("oracle_success")


def parse_run(text: str) -> tuple[str, list[int]]:
    """'procedural:200-215' -> ('procedural', [200, ..., 215]); 'test:3' -> ('test', [3])."""
    cat, sep, seeds = text.rpartition(":")
    if not sep or not cat:
        raise argparse.ArgumentTypeError(f"expected CATALOG:FIRST-LAST, got {text!r}")
    try:
        a, _, b = seeds.partition("-")
        first, last = int(a), int(b or a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be FIRST-LAST integers, got {seeds!r}") from None
    if last < first:
        raise argparse.ArgumentTypeError(f"last seed {last} is before first seed {first}")
    return cat, list(range(first, last + 1))


def families_in_tote(catalog, objects: int, seed: int) -> dict[str, int]:
    """Items per family in the tote after the fill of episode `seed` (the fill replayed)."""
    import numpy as np

    from sim.episode import _item_label
    from sim.scene import SimCell

    with SimCell(seed=seed) as cell:
        cell.fill(catalog, objects, np.random.default_rng(seed))
        return dict(Counter(_item_label(cell, b)[1] for b in cell.items_in_tote()))


def run_one(catalog, objects: int, seed: int) -> dict:
    from sim.episode import run_episode

    t = time.perf_counter()
    r = run_episode(catalog, objects, seed)
    d = r.to_dict()
    d.pop("final_poses", None)
    for pk in d["picks"]:
        pk.pop("details", None)  # bulky; the reason and family are what the table needs
    d["families"] = families_in_tote(catalog, objects, seed)
    d["host_seconds"] = round(time.perf_counter() - t, 2)
    return d


def summarise(episodes: list[dict]) -> dict:
    """Attempts and clearance per catalog, per family and per gripper, with Wilson intervals."""
    from sim.benchmark.metrics import wilson

    def rate(k: int, n: int) -> dict:
        lo, hi = wilson(k, n)
        return {"k": k, "n": n, "value": k / n if n else None, "ci95": [round(lo, 4), round(hi, 4)]}

    out: dict = {}
    for cat in sorted({e["catalog"] for e in episodes}):
        eps = [e for e in episodes if e["catalog"] == cat]
        picks = [pk for e in eps for pk in e["picks"]]
        fams: Counter = Counter()
        for e in eps:
            fams.update(e["families"])
        fam_out = {}
        for f in sorted(set(fams) | {pk["family"] for pk in picks}):
            fp = [pk for pk in picks if pk["family"] == f]
            ok = sum(pk["success"] for pk in fp)
            fam_out[f] = {"attempts": rate(ok, len(fp)), "cleared": rate(ok, fams.get(f, 0))}
        grip_out = {}
        for g in sorted({pk["gripper"] for pk in picks}):
            gp = [pk for pk in picks if pk["gripper"] == g]
            grip_out[g] = rate(sum(pk["success"] for pk in gp), len(gp))
        fails = Counter(f"{pk['family']}/{pk['gripper']}/{pk['reason']}" for pk in picks if not pk["success"])
        out[cat] = {
            "seeds": sorted(e["seed"] for e in eps),
            "attempts": rate(sum(pk["success"] for pk in picks), len(picks)),
            "cleared": rate(sum(e["objects"] - e["items_left"] for e in eps), sum(e["objects"] for e in eps)),
            "families": fam_out,
            "grippers": grip_out,
            "failures": dict(fails.most_common()),
            "robot_s_per_attempt": sum(pk["robot_seconds"] for pk in picks) / max(len(picks), 1),
            "wall_s_per_attempt": sum(e["wall_seconds"] for e in eps) / max(len(picks), 1),
        }
    return out


def _pct(r: dict) -> str:
    if not r["n"]:
        return "0/0"
    lo, hi = r["ci95"]
    return f"{r['k']}/{r['n']} ({100 * r['value']:.1f}%, {100 * lo:.0f}-{100 * hi:.0f})"


def table(summary: dict) -> str:
    """Markdown: one row per catalog, then one per family of each catalog that has several."""
    lines = [
        "| catalog | seeds | attempts succeeded (95% CI) | items cleared (95% CI) | wall s / attempt "
        "| robot s / attempt |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cat, s in summary.items():
        seeds = f"{s['seeds'][0]}-{s['seeds'][-1]}"
        lines.append(
            f"| {cat} | {seeds} | {_pct(s['attempts'])} | {_pct(s['cleared'])} | "
            f"{s['wall_s_per_attempt']:.2f} | {s['robot_s_per_attempt']:.1f} |"
        )
    for cat, s in summary.items():
        if len(s["families"]) < 2:
            continue
        lines += [
            "",
            f"{cat} by family:",
            "",
            "| family | attempts succeeded (95% CI) | items cleared (95% CI) |",
        ]
        lines.append("| --- | --- | --- |")
        for f, r in s["families"].items():
            lines.append(f"| {f} | {_pct(r['attempts'])} | {_pct(r['cleared'])} |")
    lines.append("")
    for cat, s in summary.items():
        grips = ", ".join(f"{g} {r['k']}/{r['n']}" for g, r in s["grippers"].items())
        fails = ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "none"
        lines.append(f"- {cat}: by gripper {grips}; failed attempts (family/gripper/reason): {fails}.")
    return "\n".join(lines)


def update_docs(text: str, doc: Path = DOC) -> None:
    """Replace the block between the markers; refuse (clear error) when they are missing."""
    body = doc.read_text()
    i, j = body.find(BEGIN), body.find(END)
    if i < 0 or j < i:
        raise SystemExit(
            f"error: markers {BEGIN} ... {END} not found in {doc}; add them to the ## oracle section"
        )
    doc.write_text(body[: i + len(BEGIN)] + "\n" + text + "\n" + body[j:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", action="append", type=parse_run, required=True, metavar="CATALOG:FIRST-LAST",
        help="a catalog and its episode seeds (repeatable)",
    )  # fmt: skip
    ap.add_argument("--objects", type=int, default=10, help="items per tote (default 10)")
    ap.add_argument("--episodes-dir", default=None, help="keep/reuse each episode's JSON here")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the summary and episodes here")
    ap.add_argument(
        "--update-docs", action="store_true", help="rewrite the generated table in docs/benchmarks.md"
    )
    args = ap.parse_args(argv)
    if args.objects < 1:
        ap.error(f"--objects must be >= 1, got {args.objects}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from sim.catalogs import load_catalog

    cache = Path(args.episodes_dir) if args.episodes_dir else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    episodes = []
    for cat_name, seeds in args.run:
        catalog = load_catalog(cat_name)
        for s in seeds:
            f = cache / f"{cat_name}-{s}.json" if cache is not None else None
            if f is not None and f.exists():
                episodes.append(json.loads(f.read_text()))
                continue
            e = run_one(catalog, args.objects, s)
            ok = sum(pk["success"] for pk in e["picks"])
            log.info("%s seed %d: %d/%d attempts, %.0f s", cat_name, s, ok, e["attempts"], e["host_seconds"])
            if f is not None:
                f.write_text(json.dumps(e, indent=1))
            episodes.append(e)
    summary = summarise(episodes)
    text = table(summary)
    print(text)
    if args.json:
        meta = {"machine": f"{platform.machine()}, {platform.python_version()}", "objects": args.objects}
        Path(args.json).write_text(
            json.dumps({"meta": meta, "summary": summary, "episodes": episodes}, indent=1)
        )
    if args.update_docs:
        update_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
