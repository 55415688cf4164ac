"""`pickcell broker`, `pickcell keys new`, `pickcell assist`: the assist queue's commands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_KEYS_DIR = "keys"
ROLES = ("cell", "associate", "console")  # hitl.keys.ROLES (not imported: keep `--help` fast)


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

    k = subparsers.add_parser(
        "keys", help="make, admit, list and revoke CURVE keys (each bound to a role) for the assist broker"
    )
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION")
    kn = ksub.add_parser(
        "new",
        help="write NAME.key (public) and NAME.key_secret, bound to a role",
        description=(
            "Write a CURVE key pair whose metadata names its role: cell (submits requests), associate "
            "(a person who answers) or console (a web console answering on behalf of named people). The "
            "broker's own pair is `pickcell keys new broker --dir KEYS` (no role). To admit a client, put "
            "its NAME.key in the broker's KEYS/allowed/ROLE/ folder (`pickcell keys allow NAME.key --keys "
            "KEYS`). NAME is "
            "the identity the broker records with every request and answer."
        ),
    )
    kn.add_argument("name", help="key name, e.g. broker, cell-1, alice")
    kn.add_argument("--role", choices=ROLES, help="the key's role (required except for the broker's own key)")
    kn.add_argument(
        "--dir", default=DEFAULT_KEYS_DIR, help=f"folder to write into (default: {DEFAULT_KEYS_DIR})"
    )
    kn.add_argument(
        "--allow",
        metavar="KEYS",
        help="also admit it: copy NAME.key into KEYS/allowed/ROLE/ (KEYS = the broker's keys folder)",
    )
    kn.set_defaults(func=cmd_keys_new)
    ka = ksub.add_parser(
        "allow",
        help="admit a client: copy its NAME.key into KEYS/allowed/ROLE/",
        description=(
            "Copy a public key into the broker's allowlist folder for its role (read from the key's "
            "metadata, or --role). A running broker admits it at once; no restart."
        ),
    )
    ka.add_argument("public_key", help="the client's NAME.key")
    ka.add_argument(
        "--keys", default=DEFAULT_KEYS_DIR, help=f"broker keys folder (default: {DEFAULT_KEYS_DIR})"
    )
    ka.add_argument("--role", choices=ROLES, help="role, if the key file does not carry one")
    ka.set_defaults(func=cmd_keys_allow)
    kr = ksub.add_parser(
        "revoke",
        help="remove NAME from the allowlist; a running broker closes its open connections",
        description="Delete KEYS/allowed/*/NAME.key. Within one heartbeat the broker closes NAME's open "
        "connections, puts what it held back in the queue, and refuses it from then on.",
    )
    kr.add_argument("name")
    kr.add_argument(
        "--keys", default=DEFAULT_KEYS_DIR, help=f"broker keys folder (default: {DEFAULT_KEYS_DIR})"
    )
    kr.set_defaults(func=cmd_keys_revoke)
    kl = ksub.add_parser("list", help="the admitted keys and their roles, and what is refused and why")
    kl.add_argument(
        "--keys", default=DEFAULT_KEYS_DIR, help=f"broker keys folder (default: {DEFAULT_KEYS_DIR})"
    )
    kl.add_argument("--json", action="store_true", help="machine-readable output")
    kl.set_defaults(func=cmd_keys_list)
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
        help=f"folder with broker.key_secret and allowed/ROLE/*.key (default: {DEFAULT_KEYS_DIR})",
    )
    b.add_argument(
        "--max-deadline",
        type=float,
        default=3600.0,
        help="s; refuse new requests whose deadline is further ahead than this (default: 3600)",
    )
    b.add_argument(
        "--retention-days",
        type=float,
        default=7.0,
        help="days a final state is kept in the journal after its cell confirmed it (default: 7); "
        "unconfirmed ones are kept 30 days, open requests always",
    )
    b.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (127.0.0.1)")
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
        max_deadline_s=args.max_deadline,
        retention_s=args.retention_days * 86400.0,
        metrics_port=args.metrics_port,
    )
    try:
        return run_broker(cfg)
    except (KeyFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_keys_new(args: argparse.Namespace) -> int:
    from hitl.keys import BROKER_KEY_NAME, KeyFileError, allow, new_keypair

    if args.role is None and args.name != BROKER_KEY_NAME:
        print(
            f"error: --role is required ({' | '.join(ROLES)}); only the broker's own key has none",
            file=sys.stderr,
        )
        return 2
    if args.role is not None and args.name == BROKER_KEY_NAME:
        print(
            "error: 'broker' is the broker's own key and has no role; name the client otherwise",
            file=sys.stderr,
        )
        return 2
    try:
        public, secret = new_keypair(args.name, args.dir, role=args.role)
        admitted = allow(public, args.allow) if args.allow else None
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret}" + (f"\nrole: {args.role}" if args.role else ""))
    if admitted is not None:
        print(f"admitted as {args.role}: {admitted}")
    return 0


def cmd_keys_allow(args: argparse.Namespace) -> int:
    from hitl.keys import KeyFileError, allow

    try:
        dest = allow(args.public_key, args.keys, role=args.role)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"admitted as {dest.parent.name}: {dest}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from hitl.keys import KeyFileError, revoke

    try:
        removed = revoke(args.name, args.keys)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not removed:
        print(f"error: {args.name!r} is not in {Path(args.keys) / 'allowed'}", file=sys.stderr)
        return 2
    for p in removed:
        print(f"revoked: {p}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    import json

    from hitl.keys import ALLOWED_DIR, KeyFileError, load_role_allowlist

    try:
        allowlist = load_role_allowlist(Path(args.keys) / ALLOWED_DIR)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    admitted = sorted((k.role, k.name, str(k.path)) for k in allowlist.keys.values())
    refused = sorted(allowlist.refused.values())
    if args.json:
        rows = [{"role": r, "name": n, "path": p} for r, n, p in admitted]
        print(json.dumps({"admitted": rows, "refused": refused}, indent=2))
        return 0
    for role, name, path in admitted:
        print(f"{role:<10} {name:<24} {path}")
    for why in refused:
        print(f"REFUSED    {why}")
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
            if keys.role not in (None, "associate"):
                print(
                    f"error: {args.key} is a {keys.role} key; `pickcell assist` is for a person's "
                    "associate key "
                    "(make one with `pickcell keys new NAME --role associate`)",
                    file=sys.stderr,
                )
                return 2
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
