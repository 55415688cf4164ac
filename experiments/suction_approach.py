"""How far is the planner's suction approach from the true surface normal, and does the cup seal there?

What it is
    Each tote is filled the way `pickcell bench continual` fills its totes (2 `novel-train` picture
    frames, 6 `procedural-train` items), settled, and seen once by the simulated depth camera. The
    planner's suction candidates are generated twice on that same frame: with the approach fitted on
    the cup's own 25 samples (`approach_support_m=0`) and on the wider 3 cm patch of the same
    surface (`grasping.candidates.refine_normals`, the default). For every candidate whose cup lip
    the camera sees wholly on its item, the simulator's ground truth gives the true normal under the
    cup centre (a ray at the item) and runs the cup's own seal test (`sim.grippers.seal_check`, the
    one the arm runs when it grips) at the planned pose, and again along the true normal. Nothing
    moves: this isolates the approach estimate from motion, lifting and scoring.

What is randomised
    Tote contents and drop poses from (`--seed` + tote index); the camera's depth noise from the
    same seed. Candidate sampling from the same seed, identical for both fits.

What counts as success
    The planned approach seals about as often as the true normal would (the estimate costs no
    seals), per item family; the report gives the median and 90th percentile angle error and the
    seal share at the planned approach and along the true normal. Curved families (ball, bottle,
    tube) never seal under this 30 mm rigid-lip cup model whatever the approach; they are listed
    for completeness.

    python experiments/suction_approach.py --totes 20 --seed 9900100 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np


def measure(totes: int, seed: int) -> list[dict]:
    import pybullet as p

    from grasping.candidates import suction_candidates
    from grasping.planner import PlannerConfig
    from grasping.pointcloud import segment_scene
    from sim.catalogs import load_catalog
    from sim.config_sim_arm import SuctionConfig
    from sim.grippers import seal_check
    from sim.scene import SimCell

    scfg = SuctionConfig()
    rows: list[dict] = []
    for t in range(totes):
        s = seed + t
        rng = np.random.default_rng([s, 0])
        with SimCell(seed=s) as cell:
            pc = PlannerConfig(tote=cell.tote_bounds)
            cell.fill(load_catalog("novel-train"), 2, rng)
            cell.fill(load_catalog("procedural-train"), 6, rng)
            cell.settle(0.5)
            cloud = segment_scene(cell.camera.capture(), cell.tote_bounds, pc.cloud_config())
            for fit, cfg in (
                ("wide", pc.candidate_config()),
                ("disk", replace(pc.candidate_config(), approach_support_m=0.0)),
            ):
                cs = suction_candidates(cloud, cfg, np.random.default_rng(s))
                approach = cs.rotations[:, :, 2]
                full_lip = cs.features[:, 4] >= 1.0  # seal_coverage: the camera sees the lip on the item
                for i in np.flatnonzero(full_lip):
                    top, bottom = cs.positions[i] + [0, 0, 0.03], cs.positions[i] - [0, 0, 0.03]
                    hit = p.rayTest(top.tolist(), bottom.tolist(), physicsClientId=cell.client_id)[0]
                    if hit[0] not in cell.items:
                        continue  # the point lies on the tote or floor in truth: not an item's surface
                    n_true = np.asarray(hit[4])
                    err = float(np.degrees(np.arccos(np.clip(-(approach[i] @ n_true), -1.0, 1.0))))
                    rows.append(
                        {
                            "tote": s,
                            "fit": fit,
                            "family": cell.items[hit[0]].family,
                            "error_deg": err,
                            "sealed_planned": bool(
                                seal_check(cell.client_id, cs.positions[i], approach[i], scfg).sealed
                            ),
                            "sealed_true_normal": bool(
                                seal_check(cell.client_id, cs.positions[i], -n_true, scfg).sealed
                            ),
                        }
                    )
        print(f"tote {t + 1}/{totes}: {len(rows)} candidates", file=sys.stderr, flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for fam in sorted({r["family"] for r in rows}):
        for fit in ("disk", "wide"):
            r = [x for x in rows if x["family"] == fam and x["fit"] == fit]
            if not r:
                continue
            e = np.array([x["error_deg"] for x in r])
            out.setdefault(fam, {})[fit] = {
                "candidates": len(r),
                "error_deg_median": round(float(np.median(e)), 2),
                "error_deg_p90": round(float(np.percentile(e, 90)), 2),
                "sealed_planned": round(float(np.mean([x["sealed_planned"] for x in r])), 3),
                "sealed_true_normal": round(float(np.mean([x["sealed_true_normal"] for x in r])), 3),
            }
    return out


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0, 15, 31)
    for fit, colour in (("disk", "tab:red"), ("wide", "tab:blue")):
        e = [x["error_deg"] for x in rows if x["fit"] == fit]
        label = "cup disk (25 samples)" if fit == "disk" else "3 cm patch (refine_normals)"
        a0.hist(e, bins=bins, alpha=0.55, color=colour, label=label)
    a0.axvline(9.5, color="k", ls="--", lw=1)
    a0.text(9.7, a0.get_ylim()[1] * 0.9, "2.5 mm rim gap", fontsize=8)
    a0.set_xlabel("angle between planned approach and true normal (deg)")
    a0.set_ylabel("suction candidates")
    a0.legend(fontsize=8)
    fams = [f for f in summary if summary[f].get("wide", {}).get("sealed_true_normal", 0) > 0]
    x = np.arange(len(fams))
    for k, (fit, colour) in enumerate((("disk", "tab:red"), ("wide", "tab:blue"))):
        a1.bar(
            x + (k - 1) * 0.27,
            [summary[f][fit]["sealed_planned"] for f in fams],
            0.27,
            color=colour,
            label=f"planned ({fit})",
        )
    a1.bar(
        x + 0.27,
        [summary[f]["wide"]["sealed_true_normal"] for f in fams],
        0.27,
        color="tab:gray",
        label="true normal",
    )
    a1.set_xticks(x, fams)
    a1.set_ylim(0, 1)
    a1.set_ylabel("share of candidates that seal (ground truth)")
    a1.legend(fontsize=8, loc="lower right")
    fig.suptitle("Suction approach: cup disk vs wider surface patch (same frames, same candidates)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--totes", type=int, default=20, help="totes to fill and look at")
    ap.add_argument("--seed", type=int, default=9_900_100, help="first tote's seed")
    ap.add_argument("--json", type=Path, help="write rows and summary here")
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    args = ap.parse_args(argv)
    rows = measure(args.totes, args.seed)
    summary = summarise(rows)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}))
    if args.plot:
        plot(rows, summary, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
