"""Segmentation recall: which items the point-cloud stage never turns into an item, and which it cuts up.

What it measures
    `grasping.pointcloud.segment_scene` against the simulator's ground-truth segmentation, per item
    family. An item is *visible* when at least `--min-cells` cells of the tote's grid (every
    `pixel_stride`-th pixel) show it; it is *found* when some cluster has it as its majority item,
    *fragmented* when two or more clusters do (the planner and the item watchdog then see parts of
    it as separate items), and a cluster is *merged* when a second item holds at least a quarter of
    its cells (two items taken for one). An item the segmenter does not find gets no candidate at
    all: the bench counts it `not_reached` (issue 12's "why an item was not placed alone").

What is randomised
    The totes: the bench's own tote feed (`sim.feed.SimToteFeed`, seeded from `--seed`), so tote k
    holds what tote k of `pickcell bench --seed S` starts with. Each tote is seen several times as
    it empties, without an arm: after each look one item (seeded choice, topmost first half of the
    time) is taken out and the rest settle for 0.5 s, until `--keep` items are left. That is how
    a tote looks to the cell between picks, not how the cell would have emptied it.

What counts
    Per family and in all: visible, found (recall = found / visible), fragmented (share of found),
    and merged clusters. Several cluster-size rules are compared on the same frames: `N` keeps
    clusters of at least N voxels (`CloudConfig.min_cluster_voxels`), `NiM` also keeps clusters of
    M to N-1 voxels that lie apart from every bigger one (`min_isolated_cluster_voxels`).

Run:
    python benchmarks/segmentation_recall.py --catalog procedural --seed 20 --totes 15 \
        --variants 12,4,12i4 --json runs/seg_recall.json --png docs/images/segmentation-recall.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MERGE_SHARE = 0.25  # a cluster is "merged" when its second item holds at least this share of its cells


def grid_truth(cloud, seg: np.ndarray) -> np.ndarray:
    """The ground-truth body id of each cell of the segmenter's grid (-1: none)."""
    h, w = cloud.labels.shape
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    v = np.clip(cloud.v0 + cloud.stride * ii, 0, seg.shape[0] - 1)
    u = np.clip(cloud.u0 + cloud.stride * jj, 0, seg.shape[1] - 1)
    return seg[v, u]


def score_frame(cloud, truth: np.ndarray, families: dict[int, str], min_cells: int) -> dict:
    """Per family counts (visible, found, fragmented) and the merged clusters of one segmented frame."""
    lab = cloud.labels
    majority: dict[int, int] = {}
    merged = 0
    for k in range(cloud.n_clusters):
        vals, cnt = np.unique(truth[lab == k], return_counts=True)
        if len(vals) == 0:
            continue
        order = np.argsort(-cnt)
        majority[k] = int(vals[order[0]])
        items = [(int(v), int(c)) for v, c in zip(vals[order], cnt[order], strict=True) if v in families]
        if len(items) >= 2 and items[1][1] >= MERGE_SHARE * cnt.sum():
            merged += 1
    clusters_of = Counter(majority.values())
    out: dict[str, Counter] = defaultdict(Counter)
    for body, fam in families.items():
        if int(((truth == body) & cloud.valid).sum()) < min_cells:
            continue
        out[fam]["visible"] += 1
        if clusters_of[body] >= 1:
            out[fam]["found"] += 1
        if clusters_of[body] >= 2:
            out[fam]["fragmented"] += 1
    return {"families": out, "merged": merged, "clusters": cloud.n_clusters}


def run(args: argparse.Namespace) -> dict:
    import pybullet as p
    from tqdm import tqdm

    from grasping.planner import PlannerConfig
    from grasping.pointcloud import segment_scene
    from sim.stack import build_sim_stack

    variants = [v.strip() for v in args.variants.split(",")]
    rules = {v: _rule(v) for v in variants}
    stack = build_sim_stack(
        catalog=args.catalog, objects_per_tote=args.objects_per_tote, seed=args.seed, planner="analytic"
    )
    rng = np.random.default_rng([args.seed, 777])
    per: dict[str, dict[str, Counter]] = {v: defaultdict(Counter) for v in variants}
    merged = dict.fromkeys(variants, 0)
    clusters = dict.fromkeys(variants, 0)
    frames = 0
    try:
        cell, cam, feed = stack.cell, stack.camera, stack.feed
        pc = PlannerConfig(tote=cell.tote_bounds, seed=args.seed)
        for _ in tqdm(range(args.totes), desc="totes", disable=not args.progress):
            feed.next_tote()
            while True:
                frame = cam.capture()
                seg = cam.camera.last_segmentation
                families = {int(b): str(getattr(cell.items[b], "family", "?")) for b in cell.items_in_tote()}
                frames += 1
                for v in variants:
                    cloud = segment_scene(frame, pc.tote, replace(pc.cloud_config(), **rules[v]))
                    res = score_frame(cloud, grid_truth(cloud, seg), families, args.min_cells)
                    for fam, c in res["families"].items():
                        per[v][fam].update(c)
                    merged[v] += res["merged"]
                    clusters[v] += res["clusters"]
                left = cell.items_in_tote()
                if len(left) <= args.keep:
                    break
                tops = sorted(left, key=lambda b: -p.getAABB(b, physicsClientId=cell.client_id)[1][2])
                pick = tops[0] if rng.random() < 0.5 else tops[int(rng.integers(len(tops)))]
                cell.remove_item(pick)
                cell.settle(0.5)
    finally:
        stack.close()
    result: dict = {
        "catalog": args.catalog,
        "seed": args.seed,
        "totes": args.totes,
        "frames": frames,
        "variants": {},
    }
    for v in variants:
        fams = {}
        tot = Counter()
        for fam, c in sorted(per[v].items()):
            tot.update(c)
            fams[fam] = _rates(c)
        result["variants"][v] = {
            "all": _rates(tot),
            "families": fams,
            "merged_clusters": merged[v],
            "clusters": clusters[v],
        }
    return result


def _rule(v: str) -> dict:
    """`N` or `NiM` -> CloudConfig fields (module docstring)."""
    big, _, small = v.partition("i")
    n = int(big)
    return {"min_cluster_voxels": n, "min_isolated_cluster_voxels": int(small) if small else n}


def _rates(c: Counter) -> dict:
    vis, found, frag = c["visible"], c["found"], c["fragmented"]
    return {
        "visible": vis,
        "found": found,
        "fragmented": frag,
        "recall": found / vis if vis else float("nan"),
        "fragmented_share": frag / found if found else float("nan"),
    }


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["variants"])
    fams = sorted({f for v in variants for f in result["variants"][v]["families"]})
    x = np.arange(len(fams))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    wbar = 0.8 / len(variants)
    for i, v in enumerate(variants):
        r = result["variants"][v]["families"]
        ax[0].bar(x + i * wbar, [r[f]["recall"] for f in fams], wbar, label=f"clusters {v}")
        ax[1].bar(x + i * wbar, [r[f]["fragmented_share"] for f in fams], wbar, label=f"clusters {v}")
    for a, title in zip(ax, ("recall: visible items found", "found items cut into 2+ clusters"), strict=True):
        a.set_xticks(x + wbar * (len(variants) - 1) / 2, fams, rotation=30)
        a.set_ylim(0, 1)
        a.set_title(title)
        a.legend(fontsize=8)
    fig.suptitle(
        f"segment_scene vs ground truth: {result['catalog']}, seed {result['seed']}, "
        f"{result['totes']} totes, {result['frames']} frames"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", default="procedural", help="catalog name (default procedural)")
    ap.add_argument("--seed", type=int, default=20, help="tote seed (a tuning seed, 0-99; default 20)")
    ap.add_argument("--totes", type=int, default=15, help="totes (default 15)")
    ap.add_argument("--objects-per-tote", type=int, default=8, help="items per tote (default 8)")
    ap.add_argument("--keep", type=int, default=2, help="stop looking at a tote with this many items left")
    ap.add_argument("--min-cells", type=int, default=4, help="grid cells an item must show to be visible")
    ap.add_argument(
        "--variants",
        default="12",
        help="comma-separated cluster-size rules to compare: N (at least N voxels) or NiM (also M to "
        "N-1 voxels when apart from bigger clusters); default 12",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--png", type=Path, default=None, help="write the bar chart here")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = ap.parse_args(argv)
    if args.totes < 1 or args.keep < 0:
        ap.error("--totes must be >= 1 and --keep >= 0")
    result = run(args)
    for v, r in result["variants"].items():
        a = r["all"]
        print(
            f"clusters {v}: recall {a['found']}/{a['visible']} ({100 * a['recall']:.1f}%), "
            f"fragmented {a['fragmented']} ({100 * a['fragmented_share']:.1f}% of found), "
            f"merged clusters {r['merged_clusters']} of {r['clusters']}"
        )
        for fam, f in r["families"].items():
            print(
                f"  {fam:<12s} recall {f['found']:>3d}/{f['visible']:<3d} ({100 * f['recall']:5.1f}%)  "
                f"fragmented {f['fragmented']:>3d} ({100 * f['fragmented_share']:5.1f}%)"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.png:
        plot(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
