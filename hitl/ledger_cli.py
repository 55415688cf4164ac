"""`pickcell ledger ...`: inspect a cell's ledger and export it as a training dataset."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ledger",
        help="inspect a cell's ledger (SQLite) and export its labeled data for training",
        description=(
            "The ledger is the cell's durable record: every plan (with every candidate it weighed), every "
            "attempt and its outcome, every assist request and answer. See docs/ledger.md."
        ),
    )
    sub = p.add_subparsers(dest="ledger_command", metavar="ACTION")

    e = sub.add_parser(
        "export",
        help="write the labeled rows as npz shards plus manifest.json (sha256 of every shard)",
        description=(
            "Write a training dataset: executed attempts (the model's, approved candidates, clicked pixels) "
            "labeled by their outcome; the asked item's candidates an associate marked 'no safe pick' "
            "labeled 0; candidates on an answered item the person passed over labeled 0 with a small "
            "weight. Skips and expiries carry no label. Rejected candidates that were never executed carry "
            "no label and are not exported. Safe to run while the cell is writing (reads one snapshot)."
        ),
    )
    e.add_argument("--db", required=True, help="path of the ledger file (SQLite)")
    e.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    e.add_argument(
        "--since", type=float, default=None, help="only rows recorded at or after this unix time, seconds"
    )
    e.add_argument("--shard-rows", type=int, default=4096, help="rows per npz shard (default 4096)")
    e.add_argument(
        "--weak-negative-weight",
        type=float,
        default=0.3,
        help="weight of passed-over candidates (weak negatives), in [0, 1]; 0 leaves them out (default 0.3)",
    )
    e.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    e.set_defaults(func=_export)

    s = sub.add_parser(
        "stats",
        help="row counts: plans, candidates, attempts, successes, requests, answers",
        description="Print the ledger's schema version, cell id and row counts.",
    )
    s.add_argument("--db", required=True, help="path of the ledger file (SQLite)")
    s.add_argument("--check", action="store_true", help="also run SQLite's full integrity check")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_stats)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _open(path: str):  # -> Ledger; imported lazily so `pickcell --help` stays fast
    from hitl.ledger import Ledger

    # create=False: a mistyped path must not silently create an empty ledger.
    return Ledger(path, None, create=False)


def _export(args: argparse.Namespace) -> int:
    from hitl.ledger import LedgerError

    try:
        with _open(args.db) as ledger:
            manifest = ledger.export(
                args.out,
                since=args.since,
                shard_rows=args.shard_rows,
                weak_negative_weight=args.weak_negative_weight,
            )
    except (LedgerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
    else:
        print(
            f"exported {manifest.rows} rows ({manifest.positives} success, {manifest.negatives} failure) "
            f"in {len(manifest.shards)} shard(s) from cell {manifest.cell_id} to {manifest.out_dir}"
        )
        left_out = {k: v for k, v in manifest.counts.items() if k.startswith("left_out")}
        if left_out:
            parts = [f"{k[len('left_out_') :]}={v}" for k, v in sorted(left_out.items())]
            print("left out: " + ", ".join(parts))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from hitl.ledger import LedgerError

    try:
        with _open(args.db) as ledger:
            out = {"db": args.db, "cell_id": ledger.cell_id, "schema_version": ledger.schema_version}
            out.update(ledger.counts())
            if args.check:
                out["integrity"] = ledger.integrity_check()
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:>15}: {v}")
    ok = not args.check or out["integrity"] == ["ok"]
    return 0 if ok else 1
