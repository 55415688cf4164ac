"""`pickcell fleet ...`: the fleet service and what people do with it.

pickcell fleet init --dir FLEET --cell cell-1 --cell cell-2   keys, fleet.toml, one folder per cell
pickcell fleet serve --dir FLEET                              the fleet service (runs until Ctrl-C)
pickcell fleet publish FILE|VERSION [--stage shadow|canary] [--cells a,b] [--force]
pickcell fleet promote [--force] [--cells a,b]                advance the candidate one stage
pickcell fleet rollback [--reason TEXT]                       end the candidate / restore the last live
pickcell fleet status [--json]                                cells, versions, stage, verdict
pickcell fleet intake --out DIR                               the learner's inbox for ledger rows
pickcell fleet ship --ledger FILE --cell ID --keys DIR        send a cell's ledger rows to the intake
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "fleet",
        help="the fleet: signed models to every cell (shadow, canary, everyone), status, ledger shipping",
        description="The fleet service and its operations. See docs/fleet.md.",
    )
    fs = f.add_subparsers(dest="fleet_command", metavar="ACTION")

    p = fs.add_parser("init", help="create the fleet's keys, fleet.toml and a keys folder per cell")
    p.add_argument("--dir", type=Path, default=Path("fleet-data"), help="the fleet folder")
    p.add_argument("--cell", action="append", default=[], help="a cell name (repeat)")
    p.set_defaults(func=cmd_init)

    p = fs.add_parser("serve", help="run the fleet service (Ctrl-C / SIGTERM stops it)")
    p.add_argument("--dir", type=Path, default=Path("fleet-data"), help="the fleet folder")
    p.add_argument("--router", default="tcp://127.0.0.1:5570", help="snapshot/chunk/status endpoint")
    p.add_argument("--pub", default="tcp://127.0.0.1:5571", help="update/heartbeat endpoint")
    p.add_argument("--config", type=Path, default=None, help="rollout rules (default: FLEET/fleet.toml)")
    p.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="the model registry (default FLEET/registry; give the learner's to publish its gated versions)",
    )
    p.add_argument("--insecure", action="store_true", help="no CURVE (loopback testing only)")
    p.set_defaults(func=cmd_serve)

    p = fs.add_parser("publish", help="add a model file (or a registered version) and start its rollout")
    p.add_argument("model", help="a model file, or a version already in the fleet's registry")
    p.add_argument("--dir", type=Path, default=Path("fleet-data"), help="the fleet folder")
    p.add_argument(
        "--stage",
        choices=("shadow", "canary"),
        default=None,
        help="first stage (default: shadow if --cells is given, else canary on fleet.toml's share of cells)",
    )
    p.add_argument("--cells", default="", help="comma-separated cells for the stage")
    p.add_argument("--force", action="store_true", help="publish a version that did not pass its gate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_publish)

    p = fs.add_parser("promote", help="advance the candidate: shadow -> canary -> everyone")
    p.add_argument("--dir", type=Path, default=Path("fleet-data"))
    p.add_argument("--cells", default="", help="canary cells (default: fleet.toml's share)")
    p.add_argument("--force", action="store_true", help="advance although the stage's rule has not passed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_promote)

    p = fs.add_parser("rollback", help="end the candidate's rollout, or put the previous live version back")
    p.add_argument("--dir", type=Path, default=Path("fleet-data"))
    p.add_argument("--reason", default="manual rollback", help="recorded with the verdict")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollback)

    p = fs.add_parser("status", help="every cell's state, model version, stage, picks/hour, assists waiting")
    p.add_argument("--dir", type=Path, default=Path("fleet-data"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = fs.add_parser("intake", help="receive cells' ledger rows into one replica ledger per cell")
    p.add_argument("--out", type=Path, required=True, help="replicas go to OUT/<site>/<cell>.sqlite")
    p.add_argument("--bind", default="tcp://127.0.0.1:5575")
    p.add_argument(
        "--keys", type=Path, default=None, help="the fleet's keys folder (fleet.key_secret, allowed/)"
    )
    p.add_argument("--insecure", action="store_true", help="no CURVE (loopback testing only)")
    p.set_defaults(func=cmd_intake)

    p = fs.add_parser("ship", help="send a cell's new ledger rows to the intake (runs until stopped)")
    p.add_argument("--ledger", type=Path, required=True)
    p.add_argument("--cell", required=True, help="the cell's name (its key file's name)")
    p.add_argument("--site", default="site-1")
    p.add_argument("--to", default="tcp://127.0.0.1:5575", help="the intake's endpoint")
    p.add_argument("--keys", type=Path, default=None, help="the cell's fleet keys folder")
    p.add_argument("--insecure", action="store_true", help="no CURVE (loopback testing only)")
    p.add_argument("--batch-rows", type=int, default=200, help="rows per table per batch")
    p.set_defaults(func=cmd_ship)

    f.set_defaults(func=lambda a: (f.print_help(), 2)[1])


def _cells(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _control(args: argparse.Namespace, cmd: str, **fields) -> int:
    from fleet.service import send_control

    try:
        reply = send_control(args.dir, cmd, **fields)
    except TimeoutError as exc:
        print(f"pickcell fleet: {exc} (is `pickcell fleet serve --dir {args.dir}` running?)", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(reply, indent=2, default=str))
    elif not reply.get("ok"):
        print(f"pickcell fleet: {reply.get('error')}", file=sys.stderr)
    elif cmd == "status":
        print_status(reply)
    else:
        print(json.dumps({k: v for k, v in reply.items() if k != "ok"}, default=str))
    return 0 if reply.get("ok") else 1


def cmd_init(args: argparse.Namespace) -> int:
    from fleet.keys import init_fleet

    made = init_fleet(args.dir, args.cell)
    print(f"fleet folder {args.dir}: keys/, fleet.toml")
    for d in made:
        print(f"  copy {d} to the cell (its fleet keys folder)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fleet.rollout import RolloutConfig
    from fleet.service import FleetService, ServiceConfig

    rules = RolloutConfig.load(args.config or args.dir / "fleet.toml")
    svc = FleetService(ServiceConfig(args.dir, args.router, args.pub, args.insecure, rules, args.registry))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    svc.start()
    print(
        f"fleet service: router {svc.router_endpoint}, pub {svc.pub_endpoint}, folder {args.dir}", flush=True
    )
    stop.wait()
    svc.stop()
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    return _control(args, "publish", path=model, force=args.force, stage=args.stage, cells=_cells(args.cells))


def cmd_promote(args: argparse.Namespace) -> int:
    return _control(args, "promote", force=args.force, cells=_cells(args.cells))


def cmd_rollback(args: argparse.Namespace) -> int:
    return _control(args, "rollback", reason=args.reason)


def cmd_status(args: argparse.Namespace) -> int:
    return _control(args, "status")


def print_status(s: dict) -> None:
    r = s["rollout"]
    cand = f", {r['candidate']} in {r['stage']} on {', '.join(r['cells'])}" if r["candidate"] else ""
    print(f"live {r['live']}{cand}")
    v = s.get("verdict")
    if v:
        print(f"  stage rule: {v['verdict']} ({v['reason']})")
    last = s.get("last_verdict")
    if last:
        print(
            f"  last: {last.get('action')} {last.get('version')} ({last.get('stage')})",
            last.get("reason", ""),
        )
    print(f"{'cell':<12} {'site':<10} {'state':<20} {'model':<24} {'stage':<8} {'picks/h':>8} {'waiting':>8}")
    for name, c in sorted(s["cells"].items()):
        pph = c.get("picks_per_hour")
        print(
            f"{name:<12} {str(c.get('site') or ''):<10} {str(c.get('state')):<20} "
            f"{str(c.get('model_version') or '-'):<24} {str(c.get('stage') or '-'):<8} "
            f"{'-' if pph is None else f'{pph:.0f}':>8} {str(c.get('assists_waiting', '-')):>8}"
        )


def _run_until_signal(obj) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    obj.start()
    stop.wait()
    obj.stop()
    return 0


def cmd_intake(args: argparse.Namespace) -> int:
    from fleet.shipping import IntakeConfig, LedgerIntake

    intake = LedgerIntake(IntakeConfig(args.out, args.bind, args.keys, args.insecure))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    intake.start()
    print(f"ledger intake on {intake.endpoint}, replicas in {args.out}", flush=True)
    stop.wait()
    intake.stop()
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from fleet.shipping import LedgerShipper, ShipConfig

    if not args.ledger.is_file():
        print(f"pickcell fleet ship: no ledger at {args.ledger}", file=sys.stderr)
        return 1
    cfg = ShipConfig(args.ledger, args.cell, args.to, args.keys, args.site, args.insecure, args.batch_rows)
    print(f"shipping {args.ledger} as {args.site}/{args.cell} to {args.to}", flush=True)
    return _run_until_signal(LedgerShipper(cfg))


# --- `pickcell cell run` options (the cell's side of the fleet) --------------------------------------


def add_cell_run_options(run: argparse.ArgumentParser) -> None:
    """The options `pickcell cell run` takes to join a fleet (all off by default)."""
    g = run.add_argument_group(
        "fleet (models from the fleet service, status to it, ledger rows to the learner)"
    )
    g.add_argument("--fleet", default=None, help="the fleet service's router endpoint, e.g. tcp://fleet:5570")
    g.add_argument("--fleet-pub", default=None, help="its update endpoint (default: the router's port + 1)")
    g.add_argument(
        "--fleet-keys",
        type=Path,
        default=None,
        help="this cell's fleet keys folder: CELL_ID.key_secret, fleet.key, signing.pub "
        "(default DATA/fleet-keys)",
    )
    g.add_argument(
        "--site", default="site-1", help="the site this cell belongs to (kept with its ledger rows)"
    )
    g.add_argument("--learner", default=None, help="the learner's ledger intake endpoint (ships ledger rows)")
    g.add_argument(
        "--fleet-insecure", action="store_true", help="no CURVE to the fleet (loopback testing only)"
    )


def cell_fleet_from_args(args: argparse.Namespace, data: Path):
    """A fleet.celllink.CellFleet for `cell run`, or None when no --fleet / --learner was given."""
    if not getattr(args, "fleet", None) and not getattr(args, "learner", None):
        return None
    from fleet.cell import LinkConfig
    from fleet.celllink import CellFleet
    from fleet.shipping import ShipConfig

    keys = args.fleet_keys or data / "fleet-keys"
    pub = args.fleet_pub
    if args.fleet and pub is None:
        host, _, port = args.fleet.rpartition(":")
        pub = f"{host}:{int(port) + 1}"
    link = LinkConfig(args.cell_id, args.fleet or "", pub or "", data, keys, args.site, args.fleet_insecure)
    ship = None
    if args.learner:
        ship = ShipConfig(
            data / "ledger.sqlite", args.cell_id, args.learner, keys, args.site, args.fleet_insecure
        )
    return CellFleet(link, ship, connect=bool(args.fleet))
