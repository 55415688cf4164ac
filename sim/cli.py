"""`pickcell sim ...`: exercise the simulated cell.

    pickcell sim pick --catalog test|train|procedural|DIR --objects-per-tote N --seed S --grasp oracle
                      [--json OUT] [--record DIR] [--gui] [--max-attempts K]
    pickcell sim refit-watchdog MODEL [--out FILE] [--scenes N] [--seed S] [--workers W] [--json]

Heavy imports (pybullet) happen inside the handler so `pickcell --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "sim",
        help="run the PyBullet cell: arm, grippers, camera, physics",
        description="Commands that exercise the simulated cell (PyBullet DIRECT).",
    )
    sub = sim.add_subparsers(dest="sim_command", metavar="ACTION")
    pk = sub.add_parser(
        "pick",
        help="clear one tote with the ground-truth oracle and print each pick's outcome",
        description=(
            "Fill a tote with N items from a catalog (seeded), then loop: capture a frame, ask the oracle "
            "(it reads the simulator's ground truth, so this tests the arm, the grippers and the physics, "
            "not the planner) for a grasp, pick, place into the outbound box; until the tote is empty, "
            "nothing graspable is left, or the attempts run out. Robot seconds come from the Panda's "
            "joint limits, not from the host's speed. Same seed, same episode."
        ),
    )
    pk.add_argument(
        "--catalog",
        default="procedural",
        help="item catalog: train, test (pybullet random_urdfs splits), procedural, or a folder of URDFs",
    )
    pk.add_argument(
        "--objects-per-tote", type=int, default=10, metavar="N", help="items dropped into the tote"
    )
    pk.add_argument(
        "--seed", type=int, default=0, metavar="S", help="episode seed (tote contents, camera noise)"
    )
    pk.add_argument(
        "--grasp", default="oracle", choices=["oracle"], help="grasp source (only the oracle runs in sim)"
    )
    pk.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        metavar="K",
        help="stop after K attempts (default 2 x items)",
    )
    pk.add_argument(
        "--json", default=None, metavar="OUT", help="write the episode summary and per-pick list here"
    )
    pk.add_argument(
        "--record",
        default=None,
        metavar="DIR",
        help="save every captured RGB and depth (16-bit mm) frame as PNG",
    )
    pk.add_argument("--gui", action="store_true", help="open the PyBullet window (needs a display)")
    pk.set_defaults(func=cmd_pick)
    rw = sub.add_parser(
        "refit-watchdog",
        help="refit a model file's watchdogs on fresh simulated totes of the training catalogs",
        description=(
            "Plan N fresh totes of the training catalogs (train, procedural-train; never test or "
            "procedural) with the model, then refit the embedding watchdog's scene statistics and fit the "
            "item watchdog from scratch on those totes' items and its per-item threshold on further fresh "
            "totes, and write the model file again (new "
            "sha256 and sidecar; the network, calibrators and threshold are unchanged). Use it after an "
            "upgrade that changes the item descriptor: a file fitted on another descriptor version loads "
            "with its item watchdog ignored (a log line says so) until it is refit."
        ),
    )
    rw.add_argument("model", help="model file (.safetensors) to refit")
    rw.add_argument("--out", default=None, metavar="FILE", help="write here instead of over MODEL")
    rw.add_argument("--scenes", type=int, default=60, metavar="N", help="live totes (default 60, at least 4)")
    rw.add_argument(
        "--seed", type=int, default=None, metavar="S", help="tote seed (default: the training one)"
    )
    rw.add_argument(
        "--item-threshold-scenes",
        type=int,
        default=None,
        metavar="N",
        help="further fresh totes whose items set the per-item threshold (doubt per item; default half "
        "of --scenes; 0: scene verdicts only)",
    )
    rw.add_argument("--workers", type=int, default=2, metavar="W", help="processes (default 2)")
    rw.add_argument("--json", action="store_true", help="print the measurements as JSON")
    rw.set_defaults(func=cmd_refit_watchdog)
    sim.set_defaults(func=lambda args: (sim.print_help(), 2)[1])


def cmd_refit_watchdog(args: argparse.Namespace) -> int:
    import shutil

    from grasping.modelfile import ModelFileError, load_model, sidecar_path
    from sim.training import WATCHDOG_SCENE_SEED, LiveSceneConfig, recalibrate_watchdog

    if args.item_threshold_scenes is not None and args.item_threshold_scenes < 0:
        print(
            f"error: --item-threshold-scenes must be >= 0, got {args.item_threshold_scenes}", file=sys.stderr
        )
        return 2
    if args.scenes < 4 or args.workers < 1:
        print(
            f"error: --scenes must be >= 4 and --workers >= 1, got {args.scenes}, {args.workers}",
            file=sys.stderr,
        )
        return 2
    src = Path(args.model)
    try:
        load_model(src)  # verify (hash, format) before anything is copied or simulated
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dst = Path(args.out) if args.out else src
    if dst != src:
        if not dst.parent.is_dir():
            print(f"error: folder of --out {dst} does not exist", file=sys.stderr)
            return 2
        shutil.copyfile(src, dst)
        if sidecar_path(src).exists():
            shutil.copyfile(sidecar_path(src), sidecar_path(dst))
    cfg = LiveSceneConfig(
        scenes=args.scenes,
        seed=WATCHDOG_SCENE_SEED if args.seed is None else args.seed,
        workers=args.workers,
        item_threshold_scenes=args.item_threshold_scenes,
    )
    info = recalibrate_watchdog(dst, cfg, progress=not args.json)
    if args.json:
        print(json.dumps(info, indent=2, default=_jsonable))
        return 0
    iw = info.get("item_watchdog", {})
    item = (
        f"item watchdog: {int(iw['item_watchdog_items'])} items, "
        f"threshold {iw['item_watchdog_threshold_sigma']:.2f} sigma"
        + (
            f", per item {iw['item_threshold']['item_threshold']:.2f}"
            if "item_threshold" in iw.get("item_threshold", {})
            else ", no per-item threshold"
        )
        if "item_watchdog_items" in iw
        else f"item watchdog not fitted ({iw.get('skipped')})"
    )
    print(
        f"{dst}: refit on {info['scenes_ref'] + info['scenes_threshold']} live totes; embedding watchdog "
        f"threshold {info['watchdog_threshold_sigma']:.2f} sigma; {item}; sha256 {info['sha256']}"
    )
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    if args.objects_per_tote < 1:
        print(f"error: --objects-per-tote must be >= 1, got {args.objects_per_tote}", file=sys.stderr)
        return 2
    if args.max_attempts is not None and args.max_attempts < 1:
        print(f"error: --max-attempts must be >= 1, got {args.max_attempts}", file=sys.stderr)
        return 2
    if args.json:
        out = Path(args.json)
        if out.parent and not out.parent.exists():
            print(f"error: folder of --json {out} does not exist", file=sys.stderr)
            return 2
    from sim.catalogs import load_catalog
    from sim.episode import run_episode

    try:
        catalog = load_catalog(args.catalog)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def show(rec) -> None:
        mark = "ok  " if rec.success else "FAIL"
        print(
            f"{rec.index:3d} {mark} {rec.reason:<12s} {rec.gripper:<12s} {rec.family:<12s} {rec.item:<34s} "
            f"robot {rec.robot_seconds:5.2f} s  wall {rec.wall_seconds:5.2f} s",
            flush=True,
        )

    try:
        result = run_episode(
            catalog,
            args.objects_per_tote,
            args.seed,
            grasp_source=args.grasp,
            record_dir=args.record,
            gui=args.gui,
            max_attempts=args.max_attempts,
            on_pick=show,
        )
    except RuntimeError as exc:  # e.g. no display for --gui
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cleared = result.objects - result.items_left
    print(
        f"catalog {result.catalog} seed {result.seed}: {result.picks_succeeded}/{result.attempts} attempts "
        f"succeeded ({100 * result.success_rate:.0f}%), {cleared}/{result.objects} "
        f"items cleared, robot {result.robot_seconds:.1f} s, wall {result.wall_seconds:.1f} s "
        f"(capture {result.capture_wall_seconds:.1f} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, default=_jsonable))
    return 0


def _jsonable(x):
    """numpy scalars and arrays in the per-pick details."""
    try:
        return x.tolist()
    except AttributeError:
        return str(x)
