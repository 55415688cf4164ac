"""Load on the fleet service: 50 lightweight cells under random disconnects, CURVE on, on loopback.

    PYTHONPATH=. python benchmarks/fleet_load.py --cells 50 --workers 5 --rounds 5 --seed 1000 --json OUT

The fleet service runs as its own process (`pickcell fleet serve`); the cells are FleetLink instances
(the real cell-side subscriber: Clone-pattern snapshot + numbered updates, chunked download with
resume, sha256 + ed25519 verification) spread over --workers processes. A cell's "loader" records the
version and the sha256 of the bytes it was handed; it does not build a network (that is the cell's
own cost, not the fleet's). Each cell drops off the network at random (each second, with probability
--p-drop, for U(0.5, --max-off) seconds) for the whole run.

Each round publishes a new version (a canary on one cell) and promotes it to everyone; the time from
the promotion's acknowledgement to each cell's loader call is the time to reach that cell. A cell
that has not loaded the round's version --deadline seconds after the promotion is a miss. One extra
round publishes a file whose bytes were changed after it was registered (the announced sha256 is the
registry's): every cell must refuse it and none may load it; it is then rolled back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> int:
    """One process holding several cells; prints one JSON line per event."""
    import logging

    logging.basicConfig(level=logging.CRITICAL)  # refusals are counted in the JSON, not printed 50 times
    from fleet.cell import FleetLink, LinkConfig
    from grasping.modelfile import file_sha256

    out_lock = threading.Lock()

    def emit(**kw) -> None:
        with out_lock:
            print(json.dumps(kw), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    links = []
    for name in args.names.split(","):

        def load(path: Path, version: str, name: str = name) -> tuple[bool, str]:
            emit(ev="load", cell=name, version=version, t=time.time(), sha256=file_sha256(path))
            return True, "ok"

        cfg = LinkConfig(
            cell_id=name,
            router=args.router,
            pub=args.pub,
            data_dir=Path(args.data) / name,
            keys_dir=Path(args.fleet_dir) / "cells" / name,
            heartbeat_s=1.0,
            status_interval_s=2.0,
        )
        links.append((name, FleetLink(cfg, load).start()))
    rng = random.Random(args.seed)
    off_until: dict[str, float] = {}
    while not stop.is_set():
        now = time.monotonic()
        for name, link in links:
            if name in off_until:
                if now >= off_until[name]:
                    del off_until[name]
                    link.reconnect()
                    emit(ev="up", cell=name, t=time.time())
            elif not args.calm.exists() and rng.random() < args.p_drop:
                off_until[name] = now + rng.uniform(0.5, args.max_off)
                link.disconnect()
                emit(ev="down", cell=name, t=time.time())
        stop.wait(1.0)
    for _name, link in links:
        link.reconnect()
    for name, link in links:
        link.stop()
        emit(
            ev="final",
            cell=name,
            version=link.live_version,
            refused=len(link.refused),
            snapshots=link.snapshots,
            reconnects=link.reconnects,
        )
    return 0


def percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=50)
    ap.add_argument("--workers", type=int, default=5, help="processes the cells are spread over")
    ap.add_argument("--rounds", type=int, default=5, help="versions published (plus one tampered round)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--p-drop", type=float, default=0.05, help="per cell and second: chance to go offline")
    ap.add_argument("--max-off", type=float, default=4.0, help="longest time offline, seconds")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds after a promotion before a miss")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--names", help=argparse.SUPPRESS)
    ap.add_argument("--router", help=argparse.SUPPRESS)
    ap.add_argument("--pub", help=argparse.SUPPRESS)
    ap.add_argument("--fleet-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--calm", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from fleet.keys import init_fleet
    from fleet.service import send_control
    from grasping.modelfile import load_model, save_model
    from grasping.registry import ModelRegistry

    tmp = Path(tempfile.mkdtemp(prefix="fleet-load-"))
    fleet_dir = tmp / "fleet"
    names = [f"cell-{k:02d}" for k in range(args.cells)]
    init_fleet(fleet_dir, names)
    (fleet_dir / "fleet.toml").write_text("canary_share = 0.02\nheartbeat_s = 1.0\nstatus_interval_s = 2.0\n")
    base = load_model(ROOT / "grasping" / "models" / "default.safetensors")
    meta = {k: v for k, v in base.meta.items() if k not in ("format", "format_version", "created")}

    def version_file(v: str) -> Path:
        p = tmp / "models" / f"{v}.safetensors"
        p.parent.mkdir(exist_ok=True)
        save_model(
            p,
            base.net,
            base.calibrators,
            base.thresholds,
            base.watchdog,
            {**meta, "model_version": v},
            base.item_watchdog,
        )
        return p

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load0 = os.getloadavg()
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pickcell",
            "fleet",
            "serve",
            "--dir",
            str(fleet_dir),
            "--router",
            "tcp://127.0.0.1:0",
            "--pub",
            "tcp://127.0.0.1:0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    m = re.search(r"router (\S+), pub (\S+),", serve.stdout.readline())
    assert m, "the fleet service did not start"
    router, pub = m.group(1), m.group(2)
    send_control(fleet_dir, "publish", path=str(version_file("load-v0")), force=True)
    calm = tmp / "calm"  # once it exists, workers stop dropping cells (the settling phase)
    events: list[dict] = []
    ev_lock = threading.Lock()
    procs = []
    per = (len(names) + args.workers - 1) // args.workers
    for w in range(args.workers):
        chunk = names[w * per : (w + 1) * per]
        if not chunk:
            continue
        p = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--names",
                ",".join(chunk),
                "--router",
                router,
                "--pub",
                pub,
                "--fleet-dir",
                str(fleet_dir),
                "--data",
                str(tmp / "cells"),
                "--seed",
                str(args.seed * 100 + w),
                "--p-drop",
                str(args.p_drop),
                "--max-off",
                str(args.max_off),
                "--calm",
                str(calm),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)

        def read(p: subprocess.Popen = p) -> None:
            for line in p.stdout:
                with ev_lock:
                    events.append(json.loads(line))

        threading.Thread(target=read, daemon=True).start()

    def loaded(version: str) -> dict[str, float]:
        with ev_lock:
            return {e["cell"]: e["t"] for e in events if e["ev"] == "load" and e["version"] == version}

    end = time.monotonic() + args.deadline
    while len(loaded("load-v0")) < len(names) and time.monotonic() < end:
        time.sleep(0.1)
    rounds = []
    reg = ModelRegistry(fleet_dir / "registry")
    tampered_round = args.rounds // 2
    t_start = time.time()
    for k in range(1, args.rounds + 1):
        if k == tampered_round + 1:
            # The tampered round: bytes changed on the fleet's disk after registration.
            entry = reg.add(version_file("load-tampered"))
            f = reg.root / entry.file
            raw = bytearray(f.read_bytes())
            raw[len(raw) // 3] ^= 0x5A
            f.write_bytes(bytes(raw))
            send_control(fleet_dir, "publish", path="load-tampered", force=True, stage="canary", cells=names)
            time.sleep(args.max_off + 8.0)  # every cell, including those that were offline, has had its try
            send_control(fleet_dir, "rollback", reason="tampered file (benchmark)")
        v = f"load-v{k}"
        send_control(
            fleet_dir, "publish", path=str(version_file(v)), force=True, stage="canary", cells=[names[0]]
        )
        t0 = time.time()
        assert send_control(fleet_dir, "promote", force=True)["ok"]
        end = time.monotonic() + args.deadline
        while len(loaded(v)) < len(names) and time.monotonic() < end:
            time.sleep(0.05)
        got = loaded(v)
        with ev_lock:
            down_at_promote = set()
            state: dict[str, bool] = {}
            for e in events:
                if e["ev"] in ("down", "up") and e["t"] <= t0:
                    state[e["cell"]] = e["ev"] == "down"
            down_at_promote = {c for c, d in state.items() if d}
        lat = {c: t - t0 for c, t in got.items() if c != names[0]}
        rounds.append(
            {
                "version": v,
                "reached": len(got),
                "misses": len(names) - len(got),
                "latency_s_all": sorted(lat.values()),
                "latency_s_online": sorted(x for c, x in lat.items() if c not in down_at_promote),
                "offline_at_promotion": len(down_at_promote),
            }
        )
        print(
            f"{v}: {len(got)}/{len(names)} cells, p50 {percentile(list(lat.values()), 50):.3f} s, "
            f"p99 {percentile(list(lat.values()), 99):.3f} s, {len(down_at_promote)} offline at promotion",
            flush=True,
        )
    duration = time.time() - t_start
    calm.touch()
    time.sleep(args.max_off + 5.0)  # every cell back online and settled
    load1 = os.getloadavg()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(60)
    serve.send_signal(signal.SIGTERM)
    serve.wait(30)
    time.sleep(0.5)
    with ev_lock:
        finals = {e["cell"]: e for e in events if e["ev"] == "final"}
        tampered_loads = [e for e in events if e["ev"] == "load" and e["version"] == "load-tampered"]
        bad_sha = [
            e
            for e in events
            if e["ev"] == "load" and e["sha256"] != reg.get(e["version"]).sha256
            if e["version"] != "load-tampered"
        ]
        downs = sum(1 for e in events if e["ev"] == "down")
    last = f"load-v{args.rounds}"
    all_lat = [x for r in rounds for x in r["latency_s_all"]]
    online_lat = [x for r in rounds for x in r["latency_s_online"]]
    result = {
        "cells": len(names),
        "workers": len(procs),
        "rounds": args.rounds,
        "seed": args.seed,
        "disconnects": downs,
        "p_drop_per_s": args.p_drop,
        "max_off_s": args.max_off,
        "reach_p50_s": percentile(all_lat, 50),
        "reach_p99_s": percentile(all_lat, 99),
        "reach_max_s": max(all_lat) if all_lat else float("nan"),
        "reach_online_p50_s": percentile(online_lat, 50),
        "reach_online_p99_s": percentile(online_lat, 99),
        "misses": sum(r["misses"] for r in rounds),
        "final_on_last_version": sum(1 for f in finals.values() if f["version"] == last),
        "tampered_loads": len(tampered_loads),
        "tampered_refusals": sum(1 for f in finals.values() if f["refused"] >= 1),
        "loads_with_wrong_sha256": len(bad_sha),
        "snapshots_total": sum(f["snapshots"] for f in finals.values()),
        "model_file_bytes": (reg.root / reg.get(last).file).stat().st_size,
        "wall_s": duration,
        "loadavg_before": load0,
        "loadavg_after": load1,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rounds_detail": [{k: v for k, v in r.items() if not k.startswith("latency")} for r in rounds],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds_detail"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["misses"] == 0 and result["tampered_loads"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
