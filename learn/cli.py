"""`pickcell learn ...`: the learner as a service, once, a trigger check, and a rebuild from a manifest."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "learn",
        help="retrain from the cells' ledgers when the world shifts: triggers, weighted fine-tuning, gate",
        description=(
            "The learner. Reads one or more cells' ledgers, and when a trigger in learn.toml fires "
            "(N new labelled rows, the watchdog's out-of-distribution rate over the last K plans, the "
            "autonomous failure rate over the last K picks) builds a dataset with a manifest (split by "
            "tote), fine-tunes the current model with new and shifted data sampled more often (item "
            "novelty, the current model's loss, recency, human labels) plus a fixed share of replay, "
            "recalibrates, refits the ask threshold and the item watchdog, gates the result (per item "
            "kind, calibration, conditional precision, a fixed-seed simulation suite) and promotes it "
            "if it passes. See docs/learning.md."
        ),
    )
    sub = p.add_subparsers(dest="learn_command", metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", required=True, help="learn.toml")
        q.add_argument("--json", action="store_true", help="print JSON")

    r = sub.add_parser("run", help="the service: check the triggers every poll_s, run a round when one fires")
    common(r)
    r.add_argument(
        "--no-sim", action="store_true", help="gate without the simulation suite (the verdict says so)"
    )
    r.set_defaults(func=_run)

    o = sub.add_parser("once", help="check the triggers and run one round if one fires (--force: regardless)")
    common(o)
    o.add_argument("--force", action="store_true", help="run a round even if no trigger fires")
    o.add_argument(
        "--no-sim", action="store_true", help="gate without the simulation suite (the verdict says so)"
    )
    o.set_defaults(func=_once)

    c = sub.add_parser("check", help="evaluate the triggers and print them (changes nothing)")
    common(c)
    c.set_defaults(func=_check)

    rp = sub.add_parser(
        "reproduce", help="retrain a round's model from its manifest (rows, hashes and settings verified)"
    )
    rp.add_argument("manifest", help="the round's data/manifest.json")
    rp.add_argument("--out", required=True, help="model file to write")
    rp.add_argument("--json", action="store_true", help="print JSON")
    rp.set_defaults(func=_reproduce)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _load(args: argparse.Namespace) -> Any:
    from learn.config import load_config

    return load_config(args.config)


def _suite_factory(cfg: Any, no_sim: bool) -> Any:
    if no_sim or cfg.gate.sim_episodes <= 0:
        return None
    # The CLI is the top layer: it may hand the learner the simulator's regression suite.
    from sim.training import sim_suite_factory

    return sim_suite_factory(cfg.gate.sim_episodes, workers=1)


def _print_round(res: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res.to_json(), indent=2, default=str))
        return
    if not res.triggered:
        print("no trigger fired: " + _trigger_line(res.triggers))
        return
    verdict = "PASSED" if res.gate_passed else "REFUSED"
    print(f"round trained {res.version} ({res.seconds:.0f} s) from {res.manifest}")
    print(f"  triggers: {'; '.join(res.triggers.reasons) or 'forced'}")
    print(f"  triggering kinds: {', '.join(res.triggering_kinds) or 'none'}")
    print(f"  gate {verdict} against {res.incumbent or 'no incumbent'}; promoted: {res.promoted}")
    for line in res.gate_reasons:
        print(f"    {line}")


def _trigger_line(t: Any) -> str:
    ood = "n/a" if t.ood_rate is None else f"{t.ood_rate:.0%}"
    fail = "n/a" if t.failure_rate is None else f"{t.failure_rate:.0%}"
    return (
        f"{t.new_labelled_rows} new labelled rows, OOD {ood} of {t.ood_plans} plans, "
        f"autonomous failures {fail} of {t.failure_items}"
    )


def _errors() -> tuple[type[BaseException], ...]:
    from grasping.learning import DatasetError
    from grasping.modelfile import ModelFileError
    from grasping.registry import RegistryError
    from hitl.ledger import LedgerError
    from learn.config import LearnConfigError

    return (
        LearnConfigError,
        DatasetError,
        LedgerError,
        ModelFileError,
        RegistryError,
        FileNotFoundError,
        ValueError,
    )


def _once(args: argparse.Namespace) -> int:
    from learn.learner import run_round

    try:
        cfg = _load(args)
        res = run_round(cfg, force=args.force, sim_suite_factory=_suite_factory(cfg, args.no_sim))
    except _errors() as exc:
        return _fail(str(exc))
    _print_round(res, args.json)
    return 0 if (not res.triggered or res.gate_passed) else 3


def _check(args: argparse.Namespace) -> int:
    from learn.learner import load_state
    from learn.triggers import check_triggers, expand_ledgers

    try:
        cfg = _load(args)
        st = check_triggers(expand_ledgers(cfg.ledgers), cfg.triggers, since=float(load_state(cfg)["cutoff"]))
    except _errors() as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(st.to_json(), indent=2))
    else:
        print(("FIRED: " + "; ".join(st.reasons)) if st.fired else "no trigger fired")
        print("  " + _trigger_line(st))
    return 0


def _run(args: argparse.Namespace) -> int:
    from learn.learner import run_service

    try:
        cfg = _load(args)
    except _errors() as exc:
        return _fail(str(exc))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"learner watching {len(cfg.ledgers)} ledger pattern(s); checking every {cfg.triggers.poll_s:g} s")
    run_service(
        cfg,
        stop,
        sim_suite_factory=_suite_factory(cfg, args.no_sim),
        on_round=lambda res: _print_round(res, args.json),
    )
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from learn.learner import reproduce

    try:
        res = reproduce(args.manifest, Path(args.out), progress=not args.json)
    except _errors() as exc:
        return _fail(str(exc))
    out = {"path": str(res.path), "version": res.version, "sha256": res.sha256, "metrics": res.metrics}
    print(json.dumps(out, indent=2, default=str) if args.json else f"rebuilt {res.version} -> {res.path}")
    return 0
