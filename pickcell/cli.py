"""`pickcell`: one command with subcommands.

Each package owns its subcommands in its own `<package>/cli.py`, which exposes
`register(subparsers)`; handlers import their heavy dependencies (pybullet, torch, open3d) lazily
so that `pickcell --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pickcell import __version__

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "pickcell.commands",
    "sim.cli",
    "grasping.cli",
    "grasping.models_cli",
    "hitl.cli",
    "hitl.ledger_cli",
    "fleet.cli",
    "console.cli",
    "learn.cli",
    "sim.benchmark.continual",  # adds `pickcell bench continual` to pickcell.commands' `bench`
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pickcell",
        description=(
            "pickcell: controller for warehouse pick-and-pack robot cells. "
            "Plans grasps on unknown items, asks a person over ZeroMQ when unsure, learns from "
            "every outcome. PyBullet stands in for the arm and camera."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pickcell {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not an absent command module
                raise
            continue
        module.register(sub)
    # Commands that need the simulator on top of another package's command are added last.
    from pickcell.commands import extend_train

    extend_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
