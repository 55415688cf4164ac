"""`pickcell broker`, `pickcell keys new`, `pickcell assist`: the assist queue's commands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_KEYS_DIR = "keys"


def register(subparsers: argparse._SubParsersAction) -> None:
    b = subparsers.add_parser(
        "broker",
        help="run the human-assist broker (ZeroMQ ROUTER, CURVE on by default)",
        description=(
            "Run the assist broker: cells submit requests, associates ask for work and answer. Every request "
            "and answer is journaled in DIR/journal.sqlite before it is acknowledged; after a crash, waiting "
            "requests are queued again and undelivered answers delivered. Protocol: docs/protocol.md."
        ),
    )
    _add_broker_args(b)
    b.set_defaults(func=cmd_broker)

    k = subparsers.add_parser("keys", help="make CURVE key pairs for the broker, cells and associates")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION")
    kn = ksub.add_parser(
        "new",
        help="write NAME.key (public) and NAME.key_secret",
        description=(
            "Write a CURVE key pair. For the broker use NAME=broker in its --keys folder; for a cell or "
            "associate, copy NAME.key into the broker's KEYS/allowed/ folder to admit it. NAME is the "
            "identity the broker records with every answer."
        ),
    )
    kn.add_argument("name", help="key name, e.g. broker, cell-1, alice")
    kn.add_argument(
        "--dir", default=DEFAULT_KEYS_DIR, help=f"folder to write into (default: {DEFAULT_KEYS_DIR})"
    )
    kn.set_defaults(func=cmd_keys_new)
    k.set_defaults(func=lambda args: (k.print_help(), 2)[1])

    a = subparsers.add_parser(
        "assist",
        help="answer assist requests in this terminal",
        description=(
            "Associate terminal: shows the next request (writes its annotated PNG and prints the path, the "
            "reasons and the time left) and reads one line: a NUMBER approves that candidate, 'p X Y' "
            "picks a pixel, 'n' says no safe pick, 's' skips, 'q' quits. Heartbeats continue while you think."
        ),
    )
    a.add_argument(
        "--connect", default=DEFAULT_ENDPOINT, help=f"broker endpoint (default: {DEFAULT_ENDPOINT})"
    )
    a.add_argument("--key", help="your NAME.key_secret (the broker must have NAME.key in allowed/)")
    a.add_argument("--server-key", help="the broker's public key file (default: broker.key next to --key)")
    a.add_argument(
        "--out", default="assist-images", help="folder for the request images (default: assist-images)"
    )
    a.add_argument("--name", default="associate", help="your name, only used with --insecure")
    a.add_argument("--insecure", action="store_true", help="no CURVE (only for a loopback --insecure broker)")
    a.set_defaults(func=cmd_assist)


def _add_broker_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--bind", default=DEFAULT_ENDPOINT, help=f"endpoint to bind (default: {DEFAULT_ENDPOINT})")
    b.add_argument("--data", default="broker-data", help="folder of the journal (default: broker-data)")
    b.add_argument(
        "--keys",
        default=DEFAULT_KEYS_DIR,
        help=f"folder with broker.key_secret and allowed/*.key (default: {DEFAULT_KEYS_DIR})",
    )
    b.add_argument(
        "--insecure",
        action="store_true",
        help="DANGER: no encryption, no authentication; refused unless --bind is a loopback address",
    )
    b.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in s (default: 1.0)")


def cmd_broker(args: argparse.Namespace) -> int:
    from hitl.broker import BrokerConfig, run_broker
    from hitl.keys import KeyFileError

    if args.insecure:
        print(
            "WARNING: --insecure: no CURVE encryption and no authentication. Loopback experiments only.",
            file=sys.stderr,
        )
    cfg = BrokerConfig(
        bind=args.bind,
        data_dir=Path(args.data),
        keys_dir=None if args.insecure else Path(args.keys),
        insecure=args.insecure,
        heartbeat_s=args.heartbeat,
    )
    try:
        return run_broker(cfg)
    except (KeyFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_keys_new(args: argparse.Namespace) -> int:
    from hitl.keys import KeyFileError, new_keypair

    try:
        public, secret = new_keypair(args.name, args.dir)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


def cmd_assist(args: argparse.Namespace) -> int:
    from hitl.associate import AssociateClient, run_terminal
    from hitl.keys import ClientKeys, KeyFileError, load_public

    try:
        if args.insecure:
            keys, server_key = None, None
        else:
            if not args.key:
                print(
                    "error: --key NAME.key_secret is required (or --insecure for a loopback test broker)",
                    file=sys.stderr,
                )
                return 2
            keys = ClientKeys.from_file(args.key)
            server_path = Path(args.server_key) if args.server_key else Path(args.key).parent / "broker.key"
            server_key = load_public(server_path)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = AssociateClient(args.connect, keys, server_key, name=args.name)
    print(f"connecting to {args.connect} as {client.name} ...")
    try:
        n = run_terminal(client, Path(args.out))
    except KeyboardInterrupt:
        n = None
    finally:
        client.close()
    if n is not None:
        print(f"answered {n} requests")
    return 0


def main_broker(argv: list[str] | None = None) -> int:
    """`python -m hitl.broker ...`: the broker without the pickcell CLI root."""
    parser = argparse.ArgumentParser(prog="python -m hitl.broker")
    _add_broker_args(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return cmd_broker(args)
