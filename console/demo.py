"""`pickcell console demo` (= `pickcell demo --console`): broker, a simulated cell and the web console on
this machine, so that a person answers the cell's questions in a browser.

Keys: fresh CURVE pairs for the broker, the cell and the console; the cell's and the console's public
keys are admitted in the broker's allowlist. A sign-in is created and printed.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path


def admit(keys: Path, name: str, role: str) -> None:
    """Admit NAME.key at the broker whose keys folder is `keys`: into allowed/ROLE/ (the broker binds
    roles to keys by folder, hitl/keys.py)."""
    folder = keys / "allowed" / role
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())


def new_key(keys: Path, name: str, role: str | None) -> None:
    """NAME.key / NAME.key_secret in `keys` (with its role) unless there already."""
    from hitl.keys import new_keypair

    if not (keys / f"{name}.key_secret").exists():
        new_keypair(name, keys, role=role)


def run_demo(args: argparse.Namespace) -> int:
    from console.app import ConsoleConfig
    from console.server import BrokerAccess, ConsoleServer, parse_bind
    from console.users import UserStore
    from hitl.broker import Broker, BrokerConfig
    from hitl.client import AssistClient
    from hitl.keys import ClientKeys, load_public
    from hitl.ledger import Ledger
    from pickcell.commands import _live_sim_stack, print_summary, summarise
    from sim.benchmark.record import ToteRecorder

    host, port = parse_bind(args.bind)
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="pickcell-console-demo-")
        data = Path(tmp.name)
    else:
        data = Path(args.data)
        data.mkdir(parents=True, exist_ok=True)
    keys = data / "keys"
    for name, role in (("broker", None), ("cell-1", "cell"), ("console", "console")):
        new_key(keys, name, role)
    admit(keys, "cell-1", "cell")
    admit(keys, "console", "console")
    server_key = load_public(keys / "broker.key")

    users = UserStore(data / "users.sqlite")
    password = args.password or secrets.token_urlsafe(9)
    if users.exists(args.user):
        users.remove(args.user)
    users.add(args.user, password)

    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:0", data_dir=data / "broker", keys_dir=keys))
    endpoint = broker.start()
    console = ConsoleServer(
        BrokerAccess.from_keys_dir(endpoint, keys, "console"), users, ConsoleConfig(), host=host, port=port
    )
    url = console.start()
    assist = AssistClient(endpoint, "cell-1", ClientKeys.from_file(keys / "cell-1.key_secret"), server_key)
    assist.start()
    ledger = Ledger(data / "ledger.sqlite", cell_id="cell-1")
    stack = None
    reports = []
    records: list[dict] = []
    t0 = time.perf_counter()
    try:
        stack = _live_sim_stack(args, "cell-1", args.assist_deadline, assist, ledger, None)
        print(f"broker on {endpoint} (CURVE on); cell-1 running model {stack.model_version}")
        print(f"console: open {url}/ and sign in as {args.user!r} with password {password!r}")
        print(
            f"the cell asks when unsure and waits up to {args.assist_deadline:.0f} s for an answer; "
            "Ctrl-C stops"
        )
        # What became of each item and who decided each attempt (simulation ground truth), for the
        # summary's operator metrics, as `pickcell demo` does.
        recorder = ToteRecorder(stack)
        for k in range(args.totes):
            tote = stack.feed.next_tote()
            recorder.begin()
            rep = stack.controller.run_tote(tote)
            reports.append(rep)
            records.append({"episode": len(records), **recorder.finish(rep)})
            print(
                f"tote {k + 1}/{args.totes}: {rep.picks} picks, {rep.assists_requested} questions, "
                f"{rep.assists_answered} answered, {rep.assists_expired} expired",
                flush=True,
            )
    except KeyboardInterrupt:
        print("stopping")
    finally:
        assist.close()
        console.stop()
        broker.stop()
        ledger.close()
        users.close()
        if stack is not None:
            stack.close()
    if reports and stack is not None and len(records) == len(reports):
        wall = time.perf_counter() - t0
        print_summary(summarise(reports, stack.packer, wall, stack.model_version, records))
    print(
        f"ledger: {data / 'ledger.sqlite'}"
        if tmp is None
        else "data was in a temp folder (use --data to keep it)"
    )
    if tmp is not None:
        tmp.cleanup()
    return 0
