"""Commands that wire every package together: `pickcell cell ...` and `pickcell demo`.

They live in the composition root because they need the simulator (sim), the controller (arm), the
assist queue (hitl) and the planner (grasping) at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("pickcell")

# Keys of a cell.toml, by section, and the command-line option each one sets.
TOML_KEYS = {
    ("cell", "id"): "cell_id",
    ("cell", "totes"): "totes",
    ("cell", "data"): "data",
    ("sim", "catalog"): "catalog",
    ("sim", "objects_per_tote"): "objects_per_tote",
    ("sim", "seed"): "seed",
    ("planner", "kind"): "planner",
    ("planner", "model"): "model",
    ("planner", "alpha"): "alpha",
    ("assist", "broker"): "broker",
    ("assist", "keys"): "keys",
    ("assist", "insecure"): "insecure",
    ("assist", "deadline_s"): "assist_deadline",
    ("metrics", "port"): "metrics_port",
}


def load_cell_toml(path: Path) -> dict[str, Any]:
    """Read cell.toml into {option: value}; unknown keys are an error naming them."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"pickcell: cannot read config {path}: {exc}") from exc
    out: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise SystemExit(f"pickcell: {path}: top-level key {section!r} must be a [section]")
        for key, value in table.items():
            opt = TOML_KEYS.get((section, key))
            if opt is None:
                known = ", ".join(f"{s}.{k}" for s, k in TOML_KEYS)
                raise SystemExit(f"pickcell: {path}: unknown key {section}.{key} (known: {known})")
            out[opt] = value
    return out


def _add_sim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--catalog",
        default="procedural",
        help="items: procedural (default: the warehouse mix of cartons, mailers, bottles, tubes, balls, "
        "small parts) | train | test | a folder",
    )
    p.add_argument("--objects-per-tote", type=int, default=8, help="items per tote (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated totes (default 0)")
    p.add_argument(
        "--planner", default="learned", help="learned (default, shipped model) | analytic | MODULE:CLASS"
    )
    p.add_argument("--model", default=None, help="model file for the learned planner (default: shipped)")
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="bound on P(fail | executed without asking), per gripper: use the model's thresholds "
        "certified for it (0.01, 0.02, 0.05, 0.1 in the shipped model; default: the file's, 0.05)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    cell = sub.add_parser(
        "cell",
        help="run and control the cell controller daemon",
        description="The cell controller daemon and the commands that talk to a running one.",
    )
    csub = cell.add_subparsers(dest="cell_command", metavar="ACTION")
    run = csub.add_parser(
        "run",
        help="run the cell: observe, plan, pick, pack, ask a person when unsure",
        description=(
            "Run the cell controller. Defaults work out of the box: a simulated cell, the shipped "
            "model, and the assist broker at tcp://127.0.0.1:5555 (the cell keeps picking confident "
            "items while the broker is unreachable). SIGTERM finishes the current motion, flushes the "
            "ledger and exits 0. Prometheus metrics on http://127.0.0.1:PORT/metrics."
        ),
    )
    run.add_argument("--config", type=Path, help="cell.toml (command-line options override it)")
    run.add_argument(
        "--totes", type=int, default=None, help="stop after N totes (default: run until stopped)"
    )
    run.add_argument(
        "--data", type=Path, default=Path("cell-data"), help="ledger, models/ and control socket"
    )
    run.add_argument("--cell-id", default="cell-1", help="this cell's name (default cell-1)")
    run.add_argument(
        "--broker", default="tcp://127.0.0.1:5555", help="assist broker endpoint; 'none' = no one"
    )
    run.add_argument(
        "--keys", type=Path, help="folder with CELL_ID.key_secret and broker.key (CURVE; default DATA/keys)"
    )
    run.add_argument("--insecure", action="store_true", help="no CURVE (loopback experiments only)")
    run.add_argument("--assist-deadline", type=float, default=30.0, help="seconds a person has to answer")
    run.add_argument("--metrics-port", type=int, default=9108, help="/metrics port; -1 = off (default 9108)")
    run.add_argument("--log-json", action="store_true", help="structured JSON log lines on stderr")
    _add_sim_options(run)
    from fleet.cli import add_cell_run_options  # the fleet's own block of options

    add_cell_run_options(run)
    run.set_defaults(func=cmd_cell_run)

    for name, helptext in (
        ("reload-model", "verify a model file and hot-swap it into the running cell between picks"),
        ("estop", "protective stop: halt arm motion now and hold until clear-stop"),
        ("clear-stop", "clear a protective stop"),
        ("status", "print the running cell's counters"),
        ("stop", "finish the current motion, then stop the daemon"),
    ):
        c = csub.add_parser(name, help=helptext, description=helptext)
        if name == "reload-model":
            c.add_argument("path", type=Path, help="model file (.safetensors)")
        c.add_argument(
            "--data", type=Path, default=Path("cell-data"), help="the running cell's --data folder"
        )
        c.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
        c.set_defaults(func=cmd_cell_control, control=name)
    cell.set_defaults(func=lambda a: (cell.print_help(), 2)[1])

    demo = sub.add_parser(
        "demo",
        help="the whole system on one machine: broker, a simulated cell and a simulated associate",
        description=(
            "Starts an assist broker (CURVE on, fresh keys), one simulated cell running the shipped "
            "model, and one simulated associate who answers after a few seconds and is sometimes "
            "wrong, all on loopback. Shows progress and ends with a summary table."
        ),
    )
    demo.add_argument("--totes", type=int, default=2, help="totes to clear (default 2)")
    demo.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    demo.add_argument("--data", type=Path, help="keep ledger, keys and journal here (default: a temp dir)")
    demo.add_argument("--answer-speed", type=float, default=0.5, help="scale associate answer times (0.5)")
    _add_sim_options(demo)
    _add_console_demo_options(demo)
    demo.set_defaults(func=cmd_demo, objects_per_tote=6)
    register_bench(sub)


def _add_console_demo_options(demo: argparse.ArgumentParser) -> None:
    """`pickcell demo --console`: a person answers in the web console (console/demo.py)."""
    g = demo.add_argument_group("web console (--console)")
    g.add_argument(
        "--console",
        action="store_true",
        help="a person answers in the web console instead of the simulated associate (prints the address)",
    )
    g.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT of the console (default %(default)s)")
    g.add_argument("--user", default="associate", help="sign-in name to create (default: associate)")
    g.add_argument("--password", default=None, help="its password (default: a random one, printed)")
    g.add_argument("--assist-deadline", type=float, default=30.0, help="seconds a person has to answer (30)")


def register_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="simulation benchmark: success on unseen items, picks per hour, assists, damage, latency",
        description=(
            "Runs N episodes (one tote each) through the real cell controller in simulation and "
            "reports first-attempt success, clearance, mean picks per hour, assists and human seconds "
            "per 100 picks, damage and planning latency, with 95%% confidence intervals, a per-family "
            "breakdown, a Markdown report and plots. The same --seed gives the same numbers whatever "
            "--workers is."
        ),
    )
    b.add_argument("--catalog", default="test", help="test (default) | train | procedural | a URDF folder")
    b.add_argument("--episodes", type=int, default=10, help="episodes (totes), default 10")
    b.add_argument("--objects-per-tote", type=int, default=8, help="items per tote (default 8)")
    b.add_argument(
        "--seed",
        type=int,
        default=None,
        help="benchmark seed: tuning seeds 0-99 (default 0) are for deciding whether to keep a change; "
        "reporting seeds 1000-1099 are for published numbers only (docs/benchmark.md)",
    )
    b.add_argument(
        "--reporting",
        action="store_true",
        help="a published measurement: --seed defaults to 1000 and must be a reporting seed (1000-1099)",
    )
    b.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    b.add_argument("--backend", choices=("local", "ray"), default="local", help="local processes or Ray")
    b.add_argument("--planner", default="learned", help="learned | analytic | MODULE:CLASS")
    b.add_argument("--model", default=None, help="model file for the learned planner (default: shipped)")
    b.add_argument(
        "--alpha", type=float, default=None, help="use the model's thresholds certified for this alpha"
    )
    b.add_argument("--associate", choices=("sim", "none"), default="sim", help="who answers assist requests")
    b.add_argument("--json", type=Path, help="write the metrics JSON here")
    b.add_argument("--report", type=Path, help="write report.md, plots and failed-pick images here")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from sim.benchmark.episode import run_bench_episode
    from sim.benchmark.metrics import aggregate
    from sim.benchmark.report import write_report
    from sim.benchmark.runner import (
        DEFAULT_REPORTING_SEED,
        DEFAULT_TUNING_SEED,
        REPORTING_SEEDS,
        make_specs,
        run_episodes,
        seed_range,
    )

    if args.seed is None:
        args.seed = DEFAULT_REPORTING_SEED if args.reporting else DEFAULT_TUNING_SEED
    if args.reporting and args.seed not in REPORTING_SEEDS:
        print(
            f"pickcell bench: --reporting needs a reporting seed (1000-1099), got --seed {args.seed}",
            file=sys.stderr,
        )
        return 2
    specs = make_specs(
        args.episodes,
        args.seed,
        catalog=args.catalog,
        objects_per_tote=args.objects_per_tote,
        planner=args.planner,
        associate=args.associate,
        model_path=args.model,
        record_dir=str(args.report) if args.report else None,
        alpha=args.alpha,
    )
    episodes, wall = run_episodes(
        specs, run_bench_episode, workers=args.workers, backend=args.backend, progress=not args.no_progress
    )
    metrics = aggregate(episodes)
    metrics["wall_seconds"] = wall
    metrics["picks_per_wall_hour"] = metrics["picks"] / wall * 3600.0 if wall > 0 else 0.0
    metrics["config"] = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("func", "verbose", "no_progress", "reporting")
    }
    metrics["seed_range"] = seed_range(args.seed)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics, indent=2))
    if args.report:
        # The subcommand's own name ("command") is not an option of it.
        skip = ("json", "report", "command")
        cmd = {k: v for k, v in metrics["config"].items() if k not in skip and v is not None}
        path = write_report(args.report, metrics, episodes, cmd)
        print(f"report: {path}")
    keys = (
        "autonomous_pick_rate",
        "auto_precision",
        "items_left_rate",
        "interventions_per_100_items",
        "max_attempts_on_one_item",
        "first_attempt_success",
        "clearance_rate",
        "mpph",
        "assists_per_100_picks",
        "human_seconds_per_100_picks",
        "damage_rate",
        "plan_latency_ms_p50",
        "plan_latency_ms_p99",
        "picks",
        "attempts",
        "wall_seconds",
    )
    for k in keys:
        v = metrics[k]
        print(f"{k:<30} {v:.3f}" if isinstance(v, float) else f"{k:<30} {v}")
    print(f"{'seeds':<30} {metrics['seed_range']} (--seed {args.seed})")
    return 0


def extend_train(sub: argparse._SubParsersAction) -> None:
    """Add `--from-sim` to `pickcell train` (grasping's command; collecting needs the simulator)."""
    t = sub.choices.get("train")
    if t is None:
        return
    t.add_argument(
        "--from-sim",
        action="store_true",
        help="collect labeled picks in the simulated cell first (train + procedural-train catalogs only, "
        "never test), then train, gate and write FILE (--out) with its model card",
    )
    t.add_argument("--episodes", type=int, default=50, help="with --from-sim: totes to collect (default 50)")
    t.add_argument("--work-dir", help="with --from-sim: collection ledgers and export (resumable)")
    t.add_argument("--workers", type=int, default=2, help="with --from-sim: collection processes (default 2)")
    t.add_argument(
        "--registry", help="with --from-sim: model registry to add to (promoted if the gate passes)"
    )
    t.add_argument("--gate-episodes", type=int, default=6, help="with --from-sim: simulation gate episodes")
    t.add_argument(
        "--watchdog-scenes",
        type=int,
        default=60,
        help="with --from-sim: live scenes for the watchdog (default 60)",
    )
    t.add_argument(
        "--explore-model",
        help="with --from-sim: model whose best candidate is executed in a share --p-model-top of the "
        "attempts (on-policy rounds: label what an earlier model was wrongly sure of)",
    )
    t.add_argument(
        "--p-model-top", type=float, default=0.0, help="with --from-sim: share chosen by --explore-model"
    )
    t.add_argument(
        "--extra-data",
        action="append",
        default=[],
        help="with --from-sim: an earlier export trained on with the new data (replay; repeatable)",
    )
    t.add_argument(
        "--recipe",
        help="rebuild a model from a recipe file (rounds of seeded collection + training, e.g. "
        "grasping/models/default.recipe.toml; see sim/recipe.py) to --out",
    )
    t.add_argument(
        "--reduced", action="store_true", help="with --recipe: the same steps at the recipe's toy size"
    )
    from_data = t.get_default("func")

    def run(args: argparse.Namespace) -> int:
        if args.recipe:
            return _train_from_recipe(args)
        if not args.from_sim:
            if not args.data:
                print("pickcell train: give --data DIR (a ledger export) or --from-sim", file=sys.stderr)
                return 2
            return from_data(args)
        from sim.training import main as train_from_sim_main

        argv = ["--episodes", str(args.episodes), "--seed", str(args.seed), "--epochs", str(args.epochs)]
        argv += ["--out", args.out or "runs/models/sim.safetensors", "--workers", str(args.workers)]
        argv += [
            "--sim-suite-episodes",
            str(args.gate_episodes),
            "--watchdog-scenes",
            str(args.watchdog_scenes),
        ]
        for flag, value in (
            ("--work-dir", args.work_dir),
            ("--registry", args.registry),
            ("--incumbent", args.incumbent),
            ("--version", args.version),
            ("--explore-model", args.explore_model),
        ):
            if value:
                argv += [flag, str(value)]
        argv += ["--p-model-top", str(args.p_model_top)]
        for d in args.extra_data:
            argv += ["--extra-data", d]
        if args.no_progress:
            argv.append("--no-progress")
        return train_from_sim_main(argv)

    t.set_defaults(func=run)


def _train_from_recipe(args: argparse.Namespace) -> int:
    from grasping.learning import DatasetError
    from sim.collect import CollectError
    from sim.recipe import RecipeError, load_recipe, rebuild, reduce

    if not args.out:
        print("pickcell train --recipe: give --out FILE (the rebuilt model)", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe)
        if args.reduced:
            recipe = reduce(recipe)
        work = args.work_dir or str(Path(args.out).with_suffix("")) + ".work"
        res = rebuild(recipe, args.out, work, workers=args.workers, registry=args.registry,
                      progress=not args.no_progress)  # fmt: skip
    except (RecipeError, CollectError, DatasetError) as exc:
        print(f"pickcell train --recipe: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {res.model_path} (version {res.version}, sha256 {res.sha256[:16]}...), card {res.card_path}"
    )
    if res.gate is not None:
        print(f"gate {'PASSED' if res.gate.passed else 'FAILED'}: " + "; ".join(res.gate.reasons))
    return 0


# --- pickcell cell run ---------------------------------------------------------------------------


def _assist_client(endpoint: str, cell_id: str, keys_dir: Path | None, insecure: bool):
    from hitl.client import AssistClient
    from hitl.keys import BROKER_KEY_NAME, ClientKeys, load_public

    if endpoint == "none":
        return None
    if insecure:
        client = AssistClient(endpoint, cell_id, None)
    else:
        if keys_dir is None or not (Path(keys_dir) / f"{cell_id}.key_secret").exists():
            log.warning(
                "no CURVE keys for %s in %s (%s.key_secret and %s.key): running WITHOUT the assist queue; "
                "items the planner is unsure about are skipped. `pickcell keys new %s` makes a key pair.",
                cell_id,
                keys_dir,
                cell_id,
                BROKER_KEY_NAME,
                cell_id,
            )
            print(f"warning: no assist keys in {keys_dir}: unsure items will be skipped", flush=True)
            return None
        keys = ClientKeys.from_file(Path(keys_dir) / f"{cell_id}.key_secret")
        server = load_public(Path(keys_dir) / f"{BROKER_KEY_NAME}.key")
        client = AssistClient(endpoint, cell_id, keys, server_public_key=server)
    client.start()
    return client


def _live_sim_stack(args, cell_id: str, deadline_s: float, assist, ledger, metrics, first_tote: int = 0):
    """A simulated cell that talks to people in wall-clock time (`cell run`, `demo`)."""
    from arm.controller import ControllerConfig
    from sim.stack import build_sim_stack

    cfg = ControllerConfig(
        cell_id=cell_id,
        assist_deadline_s=deadline_s,
        idle_step_s=0.1,
        wall_poll_s=0.1,  # a real person answers in wall time: idle at wall speed
        ledger_source="sim",
    )
    return build_sim_stack(
        catalog=args.catalog,
        objects_per_tote=args.objects_per_tote,
        seed=args.seed,
        planner=args.planner,
        model_path=args.model,
        controller_config=cfg,
        assist=assist,
        ledger=ledger,
        metrics=metrics,
        first_tote=first_tote,
        alpha=getattr(args, "alpha", None),
    )


def cmd_cell_run(args: argparse.Namespace) -> int:
    from arm.daemon import CellDaemon
    from arm.metrics import CellMetrics
    from fleet.cli import cell_fleet_from_args
    from hitl.ledger import Ledger
    from pickcell.logs import use_json_logs
    from sim.stack import model_planner_factory

    if args.config is not None:
        parser_defaults = argparse.Namespace(**vars(args))
        for k, v in load_cell_toml(args.config).items():
            # command-line values that differ from the defaults win over the file
            if getattr(parser_defaults, k, None) == _DEFAULTS_CELL_RUN.get(k):
                setattr(args, k, Path(v) if k in ("data", "keys") else v)
    if args.log_json:
        use_json_logs(logging.INFO)
    if args.planner == "learned":  # refuse to start on a missing or corrupt model (never fall back)
        from arm.daemon import StartupError, check_model_file
        from sim.stack import DEFAULT_MODEL

        try:
            check_model_file(args.model or DEFAULT_MODEL, args.alpha)
        except StartupError as exc:
            print(f"pickcell cell run: {exc}", file=sys.stderr, flush=True)
            return 2
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(data / "ledger.sqlite", cell_id=args.cell_id)
    first_tote = len(ledger.tote_ids())  # resume after the totes already in the ledger
    metrics = CellMetrics(args.cell_id)
    if args.metrics_port >= 0:
        port = metrics.serve(args.metrics_port)
        print(f"metrics on http://127.0.0.1:{port}/metrics", flush=True)
    assist = _assist_client(args.broker, args.cell_id, args.keys or data / "keys", args.insecure)
    stack = _live_sim_stack(args, args.cell_id, args.assist_deadline, assist, ledger, metrics, first_tote)
    daemon = CellDaemon(
        stack.controller,
        stack.feed,
        data_dir=data,
        planner_factory=model_planner_factory(stack.cell.tote_bounds, args.seed, args.alpha),
        model_version=stack.model_version,
        totes=args.totes,
        fleet=cell_fleet_from_args(args, data),
    )
    print(
        f"pickcell cell {args.cell_id}: model {stack.model_version}, data {data}, from tote {first_tote}",
        flush=True,
    )
    try:
        rc = daemon.run()
    finally:
        if assist is not None:
            assist.close()
        metrics.close()
        stack.close()
    s = daemon.stats
    print(
        f"stopped: {s.totes} totes, {s.picks} picks in {s.attempts} attempts, {s.assists_requested} assists"
    )
    return rc


_DEFAULTS_CELL_RUN = {
    "totes": None,
    "data": Path("cell-data"),
    "cell_id": "cell-1",
    "broker": "tcp://127.0.0.1:5555",
    "keys": None,
    "insecure": False,
    "assist_deadline": 30.0,
    "metrics_port": 9108,
    "catalog": "procedural",
    "objects_per_tote": 8,
    "seed": 0,
    "planner": "learned",
    "model": None,
    "alpha": None,
}


def cmd_cell_control(args: argparse.Namespace) -> int:
    from arm.daemon import send_control

    fields = {"path": str(Path(args.path).resolve())} if args.control == "reload-model" else {}
    try:
        reply = send_control(args.data, args.control, **fields)
    except TimeoutError as exc:
        print(f"pickcell: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(reply.get("message") or reply.get("error") or json.dumps(reply))
    return 0 if reply.get("ok") else 1


# --- pickcell demo -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    if getattr(args, "console", False):
        from console.demo import run_demo

        return run_demo(args)
    from tqdm import tqdm

    from arm.daemon import CellDaemon
    from arm.metrics import CellMetrics
    from fleet.cell import LinkConfig
    from fleet.celllink import CellFleet
    from hitl.associate import AssociateClient
    from hitl.broker import Broker, BrokerConfig
    from hitl.keys import ClientKeys, allow, load_public, new_keypair
    from hitl.ledger import Ledger
    from sim.associate import GroundTruthJudge, SimAssociateConfig, SimAssociateWorker
    from sim.benchmark.record import ToteRecorder
    from sim.stack import model_planner_factory

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="pickcell-demo-")
        data = Path(tmp.name)
    else:
        data = Path(args.data)
        data.mkdir(parents=True, exist_ok=True)
    keys = data / "keys"
    if not (keys / "broker.key_secret").exists():
        new_keypair("broker", keys)
    for name, role in (("cell-1", "cell"), ("associate-sim", "associate")):  # each key bound to its role
        if not (keys / f"{name}.key_secret").exists():
            new_keypair(name, keys, role=role)
        allow(keys / f"{name}.key", keys, role=role)
    server_key = load_public(keys / "broker.key")

    t_wall = time.perf_counter()
    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:0", data_dir=data / "broker", keys_dir=keys))
    endpoint = broker.start()
    print(f"broker on {endpoint} (CURVE on, journal {data / 'broker'})")
    from hitl.client import AssistClient

    fleet_svc = _demo_fleet_service(data / "fleet", args.model)
    assist = AssistClient(endpoint, "cell-1", ClientKeys.from_file(keys / "cell-1.key_secret"), server_key)
    assist.start()
    ledger = Ledger(data / "ledger.sqlite", cell_id="cell-1")
    metrics = CellMetrics("cell-1")
    stack = _live_sim_stack(args, "cell-1", 20.0, assist, ledger, metrics)
    judge = GroundTruthJudge(stack.cell, stack.camera, SimAssociateConfig(seed=args.seed))
    worker_client = AssociateClient(
        endpoint, ClientKeys.from_file(keys / "associate-sim.key_secret"), server_public_key=server_key
    )
    worker = SimAssociateWorker(worker_client, judge, time_scale=args.answer_speed)
    stack.controller.assist = worker.judge_at_ask(assist)  # judged on this (the simulation's) thread
    worker.start()
    # Ground truth of who decided each attempt and what became of each item, for the summary's
    # operator metrics (the same bookkeeping as `pickcell bench`).
    recorder = ToteRecorder(stack)
    print(
        f"cell-1 running model {stack.model_version} on totes of {args.objects_per_tote} "
        f"{args.catalog} items; simulated associate connected"
    )

    reports = []
    records: list[dict[str, Any]] = []
    bar = tqdm(total=args.totes, desc="totes", unit="tote")

    def on_tote(rep) -> None:
        reports.append(rep)
        records.append({"episode": len(records), **recorder.finish(rep)})
        bar.update(1)
        bar.set_postfix(
            picks=sum(r.picks for r in reports), assists=sum(r.assists_requested for r in reports)
        )

    # The cell runs as `pickcell cell run` does: a daemon (control socket, model hot-swap) that follows
    # the fleet service (the live model, verified by hash and signature) and reports its status to it.
    daemon = CellDaemon(
        stack.controller,
        _RecordedFeed(stack.feed, recorder),
        data_dir=data / "cell-1",
        planner_factory=model_planner_factory(
            stack.cell.tote_bounds, args.seed, getattr(args, "alpha", None)
        ),
        model_version=stack.model_version,
        totes=args.totes,
        on_tote=on_tote,
        fleet=CellFleet(
            LinkConfig(
                "cell-1",
                fleet_svc.router_endpoint,
                fleet_svc.pub_endpoint,
                data / "cell-1",
                data / "fleet" / "cells" / "cell-1",
                status_interval_s=0.5,
            )
        ),
    )
    fleet_status: dict[str, Any] = {}
    try:
        daemon.run(install_signal_handlers=False)
        fleet_status = _demo_fleet_status(fleet_svc, daemon)
    finally:
        bar.close()
        worker.stop()
        worker_client.close()
        assist.close()
        broker.stop()
        fleet_svc.stop()
        stack.close()
    summary = summarise(
        reports, stack.packer, time.perf_counter() - t_wall, daemon.stats.model_version, records
    )
    summary["fleet"] = fleet_status
    print_summary(summary)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


class _RecordedFeed:
    """The stack's tote feed, telling the recorder each time a new tote is in (what it spawned)."""

    def __init__(self, feed: Any, recorder: Any) -> None:
        self.feed, self.recorder = feed, recorder

    def next_tote(self) -> Any:
        tote = self.feed.next_tote()
        if tote is not None:
            self.recorder.begin()
        return tote

    def __getattr__(self, name: str) -> Any:
        return getattr(self.feed, name)


def _demo_fleet_service(fleet_dir: Path, model: Path | None):
    """`pickcell demo`'s fleet: keys, fleet.toml and cell-1's folder, the service on loopback ports with
    CURVE, and the cell's starting model as the fleet's first live version (the cell then receives it over
    the Clone protocol and verifies its hash and signature before loading it)."""
    from fleet.keys import init_fleet
    from fleet.rollout import RolloutConfig
    from fleet.service import FleetService, ServiceConfig
    from sim.stack import DEFAULT_MODEL

    init_fleet(fleet_dir, ["cell-1"])
    rules = RolloutConfig.load(fleet_dir / "fleet.toml")
    svc = FleetService(ServiceConfig(fleet_dir, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", False, rules))
    if svc.state["live"] is None:
        # The shipped model was trained before the gate existed and fails its joint-risk bar (issue 13):
        # it goes live as the fleet's first version by force, and the verdict log says so.
        svc.op_publish(str(Path(model or DEFAULT_MODEL).resolve()), force=True, stage=None, cells=[])
    svc.start()
    print(f"fleet service on {svc.router_endpoint} (CURVE on, folder {fleet_dir}), live {svc.state['live']}")
    return svc


def _demo_fleet_status(svc: Any, daemon: Any, wait_s: float = 5.0) -> dict[str, Any]:
    """The fleet's view at the end: live version and cell-1's last report (after the model arrived)."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:  # the report that follows the last tote, for an up-to-date view
        cell = svc.status()["cells"].get("cell-1") or {}
        if cell.get("model_version") == svc.state["live"] and daemon.stats.model_reloads >= 1:
            break
        time.sleep(0.1)
    st = svc.status()
    cell = st["cells"].get("cell-1") or {}
    return {
        "live": st["rollout"]["live"],
        "cell_model_version": cell.get("model_version"),
        "cell_state": cell.get("state"),
        "model_loads_from_fleet": daemon.stats.model_reloads,
    }


def summarise(
    reports, packer, wall_seconds: float, model_version: str, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """The demo's summary: the operator metrics of `pickcell bench` (sim.benchmark.metrics) over the
    totes just cleared, plus the cell's own counters and the packing."""
    from sim.benchmark.metrics import operator_metrics

    attempts = [a for r in reports for a in r.attempts]
    picks = sum(r.picks for r in reports)
    firsts = [a["success"] for rec in records for a in rec["attempts"] if a["first"]]
    ops = operator_metrics(records)
    robot = sum(r.robot_seconds for r in reports)
    pack = packer.report()
    return {
        "model_version": model_version,
        "totes": len(reports),
        "tote_status": [r.status for r in reports],
        "items": sum(rec["items"] for rec in records),
        "picks": picks,
        "attempts": len(attempts),
        "autonomous_pick_rate": ops["autonomous_pick_rate"],
        "autonomous_pick_rate_ci95": ops["autonomous_pick_rate_ci95"],
        "auto_precision": ops["auto_precision"],
        "auto_precision_ci95": ops["auto_precision_ci95"],
        "auto_attempts": ops["auto_attempts"],
        "person_precision": ops["person_precision"],
        "person_attempts": ops["person_attempts"],
        "first_attempt_success_by_decider": {
            d: r["value"] for d, r in ops["first_attempt_success_by_decider"].items()
        },
        "items_left_rate": ops["items_left_rate"],
        "items_left_by_fate": ops["items_left_by_fate"],
        "interventions_per_100_items": ops["interventions_per_100_items"],
        "max_attempts_on_one_item": ops["max_attempts_on_one_item"],
        "damage_rate": ops["damage_rate"],
        "first_attempt_success": (sum(firsts) / len(firsts)) if firsts else None,
        "assists_requested": sum(r.assists_requested for r in reports),
        "assists_answered": sum(r.assists_answered for r in reports),
        "assists_expired": sum(r.assists_expired for r in reports),
        "robot_seconds": robot,
        "picks_per_hour": (picks / robot * 3600.0) if robot > 0 else 0.0,
        "boxes_closed": pack["boxes_closed"],
        "items_in_open_box": len(packer.box.items),
        "utilisation_closed": pack["utilisation_closed"],
        "wall_seconds": wall_seconds,
    }


def print_summary(s: dict[str, Any]) -> None:
    def f(x: Any, pct: bool = False) -> str:
        if x is None:
            return "n/a"
        return f"{100 * x:.0f}%" if pct else (f"{x:.0f}" if isinstance(x, float) else str(x))

    def ci(key: str) -> str:
        lo, hi = s[f"{key}_ci95"]
        return f"  (95% CI {f(lo, True)}-{f(hi, True)})" if s[key] is not None else ""

    left = ", ".join(f"{k} {v}" for k, v in s["items_left_by_fate"].items()) or "none"
    by = s["first_attempt_success_by_decider"]
    rows = [
        ("totes", f(s["totes"]) + f"  ({', '.join(s['tote_status'])})"),
        ("items placed by the model alone", f(s["autonomous_pick_rate"], True) + ci("autonomous_pick_rate")),
        (
            "model's unasked attempts that worked",
            f(s["auto_precision"], True) + ci("auto_precision") + f"  of {s['auto_attempts']}",
        ),
        (
            "person-chosen attempts that worked",
            f(s["person_precision"], True) + f"  of {s['person_attempts']}",
        ),
        ("first-attempt success, model / person", f"{f(by['model'], True)} / {f(by['person'], True)}"),
        ("items left (not in a box)", f(s["items_left_rate"], True) + f"  ({left})"),
        ("interventions per 100 items", f(s["interventions_per_100_items"])),
        ("most attempts on one item", f(s["max_attempts_on_one_item"])),
        ("damage (of motions)", f(s["damage_rate"], True)),
        ("items / picks / attempts", f"{s['items']} / {s['picks']} / {s['attempts']}"),
        ("first-attempt success", f(s["first_attempt_success"], True)),
        (
            "assists (answered / expired)",
            f"{s['assists_requested']} ({s['assists_answered']} / {s['assists_expired']})",
        ),
        ("picks per hour (robot time)", f(s["picks_per_hour"])),
        ("boxes packed (closed + open)", f"{s['boxes_closed']} + {1 if s['items_in_open_box'] else 0}"),
        ("model", s["model_version"]),
        (
            "fleet",
            (
                f"live {s['fleet'].get('live')}; cell-1 runs {s['fleet'].get('cell_model_version')}"
                f" ({s['fleet'].get('model_loads_from_fleet')} verified load(s) from the fleet)"
            )
            if s.get("fleet")
            else "n/a",
        ),
        ("wall seconds", f(s["wall_seconds"])),
    ]
    w = max(len(k) for k, _ in rows)
    print()
    print("pickcell demo summary")
    print("-" * (w + 24))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
