"""`pickcell console ...`: the associates' web console and its accounts.

pickcell console [--connect BROKER] [--keys DIR] [--bind 127.0.0.1:8080]   serve the console
pickcell console users add|remove|list [NAME]                             manage sign-ins
pickcell console demo                                                     broker + cell + console
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path

DEFAULT_USERS = "console-data/users.sqlite"


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "console",
        help="the associates' web console: answer cells' questions in a browser or on a tablet",
        description=(
            "Serve the associates' web console: one `console` client of the assist broker (its own CURVE "
            "key) and a web page where signed-in associates answer the cells' questions (tap a candidate "
            "to approve, tap elsewhere to pick that spot, no safe pick, skip) and see the fleet. Every "
            "answer names the signed-in person. Accounts: `pickcell console users add NAME`."
        ),
    )
    c.add_argument("--connect", default="tcp://127.0.0.1:5555", help="broker endpoint (default: %(default)s)")
    c.add_argument(
        "--keys",
        type=Path,
        default=Path("keys"),
        help="folder with the console's NAME.key_secret and the broker's broker.key (default: %(default)s)",
    )
    c.add_argument("--key-name", default="console", help="the console's key NAME (default: %(default)s)")
    c.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT to serve on (default: %(default)s)")
    c.add_argument(
        "--users", type=Path, default=Path(DEFAULT_USERS), help="accounts file (default: %(default)s)"
    )
    c.add_argument("--session-hours", type=float, default=8.0, help="how long a sign-in lasts (default: 8)")
    c.add_argument(
        "--secure-cookies",
        action="store_true",
        help="mark cookies Secure (when a TLS proxy serves the console)",
    )
    c.add_argument("--insecure", action="store_true", help="no CURVE (only for a loopback --insecure broker)")
    c.add_argument(
        "--fleet",
        type=Path,
        default=None,
        help="the fleet service's folder (`pickcell fleet serve --dir`): the fleet view adds its status",
    )
    c.set_defaults(func=cmd_console)
    csub = c.add_subparsers(dest="console_command", metavar="ACTION")

    u = csub.add_parser("users", help="add, remove or list the people who may sign in")
    usub = u.add_subparsers(dest="users_command", metavar="ACTION")
    for action, helptext in (
        ("add", "add a person (asks for the password twice, or reads one line with --password-stdin)"),
        ("remove", "remove a person (their open sessions end at their next request)"),
        ("list", "list the people who may sign in"),
    ):
        p = usub.add_parser(action, help=helptext, description=helptext)
        if action != "list":
            p.add_argument("name", help="the person's name, as the ledger will record it")
        if action == "add":
            p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if action == "list":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument(
            "--users", type=Path, default=Path(DEFAULT_USERS), help="accounts file (default: %(default)s)"
        )
        p.set_defaults(func=cmd_users, action=action)
    u.set_defaults(func=lambda a: (u.print_help(), 2)[1])

    d = csub.add_parser(
        "demo",
        help="broker, a simulated cell and the console together, to answer in your browser",
        description=(
            "Starts an assist broker (CURVE on, fresh keys), one simulated cell running the shipped model, "
            "and the web console, all on loopback, and creates a sign-in. Open the printed address, sign "
            "in, and answer the cell's questions. Same as `pickcell demo --console`."
        ),
    )
    add_demo_options(d)
    d.set_defaults(func=lambda a: __import__("console.demo", fromlist=["run_demo"]).run_demo(a))


def add_demo_options(d: argparse.ArgumentParser) -> None:
    d.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT of the console (default: %(default)s)")
    d.add_argument("--user", default="associate", help="sign-in name to create (default: %(default)s)")
    d.add_argument("--password", default=None, help="its password (default: a random one, printed)")
    d.add_argument("--totes", type=int, default=5, help="totes the cell clears before stopping (default: 5)")
    d.add_argument("--assist-deadline", type=float, default=30.0, help="seconds a person has to answer")
    d.add_argument("--data", type=Path, help="keep keys, journal, ledger and accounts here (default: temp)")
    d.add_argument("--catalog", default="procedural", help="items: train | test | procedural | a folder")
    d.add_argument("--objects-per-tote", type=int, default=6, help="items per tote (default 6)")
    d.add_argument("--seed", type=int, default=0, help="seed of the simulated totes (default 0)")
    d.add_argument("--planner", default="learned", help="learned (default) | analytic | MODULE:CLASS")
    d.add_argument("--model", default=None, help="model file for the learned planner (default: shipped)")


def cmd_console(args: argparse.Namespace) -> int:
    from console.app import ConsoleConfig
    from console.server import BrokerAccess, parse_bind, serve_forever
    from console.users import UserStore
    from hitl.keys import KeyFileError

    try:
        parse_bind(args.bind)
        if args.session_hours <= 0:
            raise ValueError("--session-hours must be positive")
        if args.insecure:
            access = BrokerAccess(args.connect, None, None)
        else:
            access = BrokerAccess.from_keys_dir(args.connect, args.keys, args.key_name)
    except (KeyFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, KeyFileError):
            print(
                f"make the console's key with `pickcell keys new {args.key_name} --role console --dir "
                f"{args.keys}` and admit it at the broker",
                file=sys.stderr,
            )
        return 2
    users = UserStore(args.users)
    if not users.list():
        print(
            f"warning: no accounts in {args.users}: add one with `pickcell console users add NAME`",
            file=sys.stderr,
        )
    cfg = ConsoleConfig(session_ttl_s=args.session_hours * 3600.0, cookie_secure=args.secure_cookies)
    try:
        return serve_forever(access, users, args.bind, cfg, fleet_dir=args.fleet)
    finally:
        users.close()


def cmd_users(args: argparse.Namespace) -> int:
    from console.users import UserError, UserStore

    store = UserStore(args.users)
    try:
        if args.action == "list":
            users = store.list()
            if args.json:
                print(json.dumps([{"name": u.name, "created": u.created} for u in users]))
            else:
                for u in users:
                    print(f"{u.name}\t(added {time.strftime('%Y-%m-%d %H:%M', time.localtime(u.created))})")
                if not users:
                    print(f"no accounts in {args.users}")
            return 0
        if args.action == "remove":
            store.remove(args.name)
            print(f"removed {args.name}")
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                print("error: the passwords differ; nothing changed", file=sys.stderr)
                return 2
        store.add(args.name, password)
        print(f"added {args.name} to {args.users}")
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
