"""`pickcell plan FRAME.npz [--png OUT] [--json] [--model FILE]`: run the grasp planner on a saved frame."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan grasps on a saved frame (.npz): ranked candidates, decision, reasons, picture",
        description=(
            "Run the grasp planner on one frame file (npz with depth, rgb, K, T_base_camera and optionally "
            "tote_lo/tote_hi; see grasping.framefile). Prints the decision, the reasons and the best "
            "candidates; --png draws the numbered candidates over the RGB image, --json prints the whole "
            "plan."
        ),
    )
    p.add_argument("frame", metavar="FRAME.npz", help="frame file written by grasping.framefile.save_frame")
    p.add_argument("--png", metavar="OUT.png", help="write the annotated picture (the one associates see)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    p.add_argument(
        "--model", metavar="FILE", help="score with this learned model file (default: analytic only)"
    )
    p.add_argument(
        "--tote",
        nargs=6,
        type=float,
        metavar=("LO_X", "LO_Y", "LO_Z", "HI_X", "HI_Y", "HI_Z"),
        help="tote inner volume in the base frame, metres (overrides the file's tote_lo/tote_hi)",
    )
    p.add_argument("--top", type=int, default=10, help="candidates listed in the text output (default 10)")
    p.add_argument("--draw", type=int, default=20, help="candidates drawn on the picture (default 20)")
    p.add_argument("--seed", type=int, default=0, help="candidate sampling seed (default 0)")
    p.set_defaults(func=cmd_plan)


def plan_to_dict(plan: Any) -> dict[str, Any]:
    """A JSON-friendly summary of a Plan (no patches)."""
    return {
        "frame_id": plan.frame_id,
        "decision": plan.decision,
        "reasons": list(plan.reasons),
        "threshold": plan.threshold,
        "scene_ood_sigma": plan.scene_ood_sigma,
        "in_distribution": plan.in_distribution,
        "model_version": plan.model_version,
        "latency_ms": round(plan.latency_ms, 2),
        "n_items": len(plan.clusters),
        "candidates": [
            {
                "index": i,
                "gripper": c.grasp.gripper,
                "position": [round(float(x), 5) for x in c.grasp.position],
                "orientation": [round(float(x), 6) for x in c.grasp.orientation],
                "width": round(c.grasp.width, 5),
                "score": round(c.score, 4),
                "analytic_score": round(c.analytic_score, 4),
                "learned_score": None if c.learned_score is None else round(c.learned_score, 4),
                "p_success": None if c.p_success is None else round(c.p_success, 4),
                "ood_score": None if c.ood_score is None else round(c.ood_score, 4),
                "pixel": list(c.pixel),
                "cluster": c.cluster,
            }
            for i, c in enumerate(plan.candidates)
        ],
    }


def cmd_plan(args: argparse.Namespace) -> int:
    from grasping.framefile import FrameFileError, load_frame
    from grasping.planner import PlannerConfig, plan
    from grasping.types import Bounds

    try:
        frame, tote = load_frame(args.frame)
    except FrameFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.tote is not None:
        try:
            tote = Bounds(args.tote[:3], args.tote[3:])
        except ValueError as exc:
            print(f"error: --tote: {exc}", file=sys.stderr)
            return 2
    if tote is None:
        print(
            f"error: {args.frame} has no tote_lo/tote_hi; give the tote's volume with --tote", file=sys.stderr
        )
        return 2
    scorer = None
    if args.model:
        from grasping.learned_scorer import load_scorer
        from grasping.modelfile import ModelFileError

        try:
            scorer = load_scorer(args.model, fallback_to_analytic=False)
        except ModelFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        result = plan(frame, PlannerConfig(tote=tote, scorer=scorer, seed=args.seed))
    except ValueError as exc:  # e.g. a model file made for other patch / feature shapes
        print(f"error: planning {args.frame}: {exc}", file=sys.stderr)
        return 2
    if args.png:
        from grasping.draw import draw_plan

        draw_plan(frame, result, args.png, max_candidates=args.draw)
    if args.json:
        print(json.dumps(plan_to_dict(result), indent=1))
        return 0
    print(
        f"{result.frame_id}: {result.decision} ({len(result.candidates)} candidates on "
        f"{len(result.clusters)} items, {result.latency_ms:.0f} ms, model {result.model_version})"
    )
    for r in result.reasons:
        print(f"  {r}")
    for i, c in enumerate(result.candidates[: args.top]):
        p = c.grasp.position
        extra = f" width {c.grasp.width * 100:.1f} cm" if c.grasp.gripper == "parallel_jaw" else ""
        print(
            f"  #{i:<3d} {c.grasp.gripper:<12s} score {c.score:.3f} at "
            f"({p[0]:+.3f}, {p[1]:+.3f}, {p[2]:+.3f}) m pixel {c.pixel} item {c.cluster}{extra}"
        )
    if args.png:
        print(f"picture: {args.png}")
    return 0
