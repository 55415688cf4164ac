"""Load on the assist broker: many cells submitting, associates answering at once, CURVE on, on loopback.

Roles are on as in production: every key sits in the allowlist folder of its role (allowed/cell/,
allowed/associate/), every request carries a real PNG (seeded noise, about --image-bytes) with candidates
inside it, and the broker checks each at the door (PNG structure and CRCs, candidates, deadline).

    .venv/bin/python benchmarks/broker_load.py --cells 50 --associates 10 --rate 500 --seconds 20 --json OUT

The broker runs as its own process (`python -m hitl.broker`, journal on disk with synchronous=FULL); this
process drives every cell and associate socket from one event loop (raw protocol, see docs/protocol.md).
Associates answer as soon as a request arrives (--think-ms 0), so the time between a cell's submit and an
associate's receipt, plus the time between the answer and the cell's receipt of the result, is what the
broker (journal fsync, queueing, CURVE, two hops through its loop) adds to a person's thinking time:

    added latency = (t_assign_received - t_submit_sent) + (t_result_received - t_answer_sent)

Before the run, the transport floor is measured: the same two hops (one carrying the image) to a bare
CURVE echo process with no logic. No broker can add less than that on the machine at hand.

A request is lost if the cell has no final state for it 10 s after the last submission. The journal is
read afterwards to check that every submitted id is there exactly once with a final state.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hitl import protocol as P  # noqa: E402
from hitl.keys import ClientKeys, load_public, new_keypair  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## broker_load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dealer(ctx: zmq.Context, endpoint: str, keys: ClientKeys, server_key: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_key, keys.public, keys.secret
    s.connect(endpoint)
    return s


def send(s: zmq.Socket, msg_type: bytes, body: dict) -> None:
    s.send_multipart(P.encode(msg_type, body))


def noise_png(rng: np.random.Generator, n_bytes: int) -> tuple[bytes, int]:
    """A square RGB PNG of seeded noise (incompressible, so about n_bytes long) and its side in px."""
    import io

    from PIL import Image

    side = max(8, int((n_bytes / 3) ** 0.5))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue(), side


def commit_probe(directory: Path, n: int = 200, row_bytes: int = 20_000) -> tuple[float, float]:
    """p50/p99 ms of one SQLite WAL synchronous=FULL commit of one row on this disk: the fsync floor."""
    db = sqlite3.connect(str(directory / "probe.sqlite"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (b BLOB)")
    row = os.urandom(row_bytes)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?)", (row,))
        db.execute("COMMIT")
        ts.append((time.perf_counter() - t) * 1000.0)
    db.close()
    return round(float(np.percentile(ts, 50)), 3), round(float(np.percentile(ts, 99)), 3)


def echo_server(public: str, secret: str) -> int:
    """A CURVE ROUTER that sends every message straight back (the transport floor's far end)."""
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.curve_server, r.curve_publickey, r.curve_secretkey = True, public.encode(), secret.encode()
    print(r.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    while True:
        frames = r.recv_multipart()
        if frames[1] == b"stop":
            return 0
        r.send_multipart(frames)


def transport_floor(image_bytes: int, rate: float, n: int = 2000) -> tuple[float, float]:
    """p50/p99 ms of what two CURVE round trips between two processes cost on this machine with no broker
    logic at all: one carrying an image (as submit -> assign does) plus one small (as answer -> result),
    paced at `rate` pairs/s. The added latency the broker can reach is bounded below by this."""
    spub, ssec = zmq.curve_keypair()
    cpub, csec = zmq.curve_keypair()
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server", spub.decode(), ssec.decode()],
                            stdout=subprocess.PIPE)  # fmt: skip
    ctx = zmq.Context()
    try:
        port = int(proc.stdout.readline())
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.curve_serverkey, d.curve_publickey, d.curve_secretkey = spub, cpub, csec
        d.connect(f"tcp://127.0.0.1:{port}")
        big, small = os.urandom(image_bytes), os.urandom(100)
        d.send(small)
        d.recv()  # handshake done before timing
        pairs = []
        for _ in range(n):
            t0 = time.perf_counter()
            d.send(big)
            d.recv()
            d.send(small)
            d.recv()
            pairs.append((time.perf_counter() - t0) * 1000.0)
            time.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t0)))
        d.send(b"stop")
        d.close(0)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        ctx.term()
    return round(float(np.percentile(pairs, 50)), 3), round(float(np.percentile(pairs, 99)), 3)


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="broker_load_"))
    probe = commit_probe(work)
    floor = transport_floor(args.image_bytes, args.rate)
    keys = work / "keys"
    new_keypair("broker", keys)
    cell_names = [f"cell-{i}" for i in range(args.cells)]
    assoc_names = [f"assoc-{j}" for j in range(args.associates)]
    for n in cell_names:
        new_keypair(n, keys / "allowed" / "cell", role="cell")
    for n in assoc_names:
        new_keypair(n, keys / "allowed" / "associate", role="associate")
    server_key = load_public(keys / "broker.key")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log_path = work / "broker.log"
    profile = ["-m", "cProfile", "-o", str(args.profile_broker)] if args.profile_broker else []
    with open(log_path, "wb") as log:
        broker = subprocess.Popen(
            [sys.executable, *profile,
             "-m", "hitl.broker", "--bind", endpoint, "--data", str(work / "data"),
             "--keys", str(keys)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    ctx = zmq.Context()
    try:
        end = time.monotonic() + 30
        while b"listening on" not in log_path.read_bytes():
            if broker.poll() is not None or time.monotonic() > end:
                raise RuntimeError("broker did not start:\n" + log_path.read_text())
            time.sleep(0.05)

        def connect(name: str) -> zmq.Socket:
            (path,) = (keys / "allowed").glob(f"*/{name}.key_secret")
            return dealer(ctx, endpoint, ClientKeys.from_file(path), server_key)

        cells = [connect(n) for n in cell_names]
        assocs = [connect(n) for n in assoc_names]
        cell_of = {s: n for s, n in zip(cells, cell_names, strict=True)}
        poller = zmq.Poller()
        for s in cells + assocs:
            poller.register(s, zmq.POLLIN)
        # Handshake: every socket gets a STATUS reply before the clock starts.
        for s in cells:
            send(s, P.HEARTBEAT, {"role": "cell", "name": cell_of[s]})
        for s in cells + assocs:
            send(s, P.STATUS, {})
        pending_hello = set(cells + assocs)
        end = time.monotonic() + 30
        while pending_hello and time.monotonic() < end:
            for s, _ in poller.poll(100):
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frames[1] == P.STATUS:
                        pending_hello.discard(s)
        if pending_hello:
            raise RuntimeError(f"{len(pending_hello)} sockets never connected (CURVE?)")
        for s in assocs:
            send(s, P.READY, {})

        rng = np.random.default_rng(args.seed)
        image, side = noise_png(rng, args.image_bytes)  # a real PNG, about image_bytes long
        total = int(args.rate * args.seconds)
        t_submit: dict[str, float] = {}
        t_ack: dict[str, float] = {}
        t_assign: dict[str, float] = {}
        t_answer: dict[str, float] = {}
        t_result: dict[str, float] = {}
        final: dict[str, str] = {}
        dup_results = 0
        errors = 0
        think: list[tuple[float, str, int]] = []  # (due, request id, associate index)
        cell_of_request: dict[str, str] = {}  # request ids are per cell: answers name the cell
        assoc_index = {s: j for j, s in enumerate(assocs)}

        def answer_due(until: float) -> None:
            """Each associate answers what it has held for its think time, then asks for more."""
            while think and think[0][0] <= until:
                _, rid, j = heapq.heappop(think)
                t_answer[rid] = time.perf_counter()
                body = {
                    "request_id": rid,
                    "cell_id": cell_of_request[rid],
                    "kind": "approve",
                    "candidate_index": 1,
                }
                send(assocs[j], P.ANSWER, body)
                send(assocs[j], P.READY, {})

        k = 0
        t0 = time.perf_counter()
        next_beat = t0 + 1.0
        last_submit = t0 + args.seconds
        drain_until = last_submit + 10.0
        while True:
            now = time.perf_counter()
            while k < total and t0 + k / args.rate <= now:
                cell = cells[k % len(cells)]
                rid = uuid.uuid4().hex
                req = {"cell_id": cell_of[cell], "deadline": time.time() + 60.0, "image_png": image,
                       "candidates": [{"index": i, "u": (10 * i) % side, "v": (10 * i) % side,
                                       "gripper": "suction", "p_success": 0.5} for i in range(3)],
                       "reasons": ["benchmark"], "priority": k % 3, "request_id": rid, "created": time.time(),
                       "context": {}}  # fmt: skip
                t_submit[rid] = time.perf_counter()
                send(cell, P.SUBMIT, {"request": req})
                k += 1
            answer_due(now)
            if now >= next_beat:
                for s in cells:
                    send(s, P.HEARTBEAT, {"role": "cell", "name": cell_of[s]})
                for s in assocs:
                    send(s, P.HEARTBEAT, {"role": "associate"})
                next_beat = now + 1.0
            if k >= total and len(final) >= total:
                break
            if now > drain_until:
                break
            wait = 0.005 if k >= total else max(0.0, min(0.005, t0 + k / args.rate - now))
            for s, _ in poller.poll(wait * 1000):
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    t = time.perf_counter()
                    msg_type, body = frames[1], P.decode(frames, P.BROKER_TYPES).body
                    if msg_type == P.ASSIGN:
                        rid = body["request"]["request_id"]
                        cell_of_request[rid] = body["request"]["cell_id"]
                        t_assign.setdefault(rid, t)
                        heapq.heappush(think, (t + args.think_ms / 1000.0, rid, assoc_index[s]))
                        if args.think_ms == 0:
                            continue
                    elif msg_type == P.ACK and body.get("ref") == "submit":
                        t_ack.setdefault(body["request_id"], t)
                    elif msg_type == P.RESULT:
                        rid = body["answer"]["request_id"]
                        if rid in final:
                            dup_results += 1
                        else:
                            final[rid] = body["answer"]["status"]
                            t_result[rid] = t
                        send(s, P.DELIVERED, {"cell_id": cell_of[s], "request_ids": [rid]})
                    elif msg_type == P.ERROR:
                        errors += 1
            # Zero think time: answer in the same pass, right after the receive.
            if args.think_ms == 0:
                answer_due(float("inf"))
        elapsed = time.perf_counter() - t0
        broker_cpu_s = _cpu_seconds(broker.pid)
        broker_user_s, broker_sys_s = _cpu_split(broker.pid)
        own_cpu_s = time.process_time()
        for s in cells + assocs:
            send(s, P.DISCONNECT, {})
            s.close(0)
    finally:
        broker.terminate()
        try:
            broker.wait(15)
        except subprocess.TimeoutExpired:
            broker.kill()
        ctx.term()

    db = sqlite3.connect(str(work / "data" / "journal.sqlite"))
    journal_states = dict(db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall())
    journal_ids = {r[0] for r in db.execute("SELECT request_id FROM requests")}
    db.close()
    shutil.rmtree(work, ignore_errors=True)

    done = [r for r in t_submit if r in t_result and r in t_assign and r in t_answer]
    added = np.array([(t_assign[r] - t_submit[r]) + (t_result[r] - t_answer[r]) for r in done]) * 1000.0
    ack = np.array([t_ack[r] - t_submit[r] for r in t_submit if r in t_ack]) * 1000.0
    e2e = np.array([t_result[r] - t_submit[r] for r in done]) * 1000.0
    hop_in = np.array([t_assign[r] - t_submit[r] for r in done]) * 1000.0
    hop_out = np.array([t_result[r] - t_answer[r] for r in done]) * 1000.0
    if args.dump:  # per request: submit time from start (s), added latency (ms), for finding stalls
        np.savetxt(
            args.dump,
            np.column_stack([[t_submit[r] - t0 for r in done], added]),
            fmt="%.6f",
            header="t_submit_s added_ms",
        )
    pct = lambda a, q: round(float(np.percentile(a, q)), 3) if len(a) else None  # noqa: E731
    lost = sum(1 for r in t_submit if r not in final)
    return {
        "cells": args.cells,
        "associates": args.associates,
        "rate": args.rate,
        "seconds": args.seconds,
        "image_bytes": args.image_bytes,
        "think_ms": args.think_ms,
        "curve": True,
        "roles": True,
        "submitted": len(t_submit),
        "answered": sum(1 for s in final.values() if s == "answered"),
        "final_other": sum(1 for s in final.values() if s != "answered"),
        "lost": lost,
        "duplicate_results": dup_results,
        "errors": errors,
        "journal_rows": len(journal_ids),
        "journal_missing": len(set(t_submit) - journal_ids),
        "journal_states": journal_states,
        "throughput_rps": round(len(final) / elapsed, 1),
        "elapsed_s": round(elapsed, 2),
        "added_latency_ms_p50": pct(added, 50),
        "added_latency_ms_p99": pct(added, 99),
        "added_latency_ms_max": round(float(added.max()), 3) if len(added) else None,
        "ack_latency_ms_p50": pct(ack, 50),
        "ack_latency_ms_p99": pct(ack, 99),
        "submit_to_assign_ms_p50": pct(hop_in, 50),
        "submit_to_assign_ms_p99": pct(hop_in, 99),
        "answer_to_result_ms_p50": pct(hop_out, 50),
        "answer_to_result_ms_p99": pct(hop_out, 99),
        "transport_floor_ms_p50": floor[0],
        "transport_floor_ms_p99": floor[1],
        "disk_commit_ms_p50": probe[0],
        "disk_commit_ms_p99": probe[1],
        "end_to_end_ms_p50": pct(e2e, 50),
        "end_to_end_ms_p99": pct(e2e, 99),
        "broker_cpu_s": round(broker_cpu_s, 2),
        "broker_cpu_user_s": round(broker_user_s, 2),
        "broker_cpu_system_s": round(broker_sys_s, 2),
        "load_generator_cpu_s": round(own_cpu_s, 2),
        "machine": f"{os.cpu_count()}-core {platform.machine()}, no GPU",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process: system time is the kernel's (fsync, sockets)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def update_doc(result: dict, command: str, note: str) -> None:
    r = result
    body = f"""{SECTION}

Load on the assist broker: {r['cells']} cells, {r['associates']} associates answering at once, CURVE on,
roles on (each key in its role's allowlist folder; every request a real PNG checked at the door),
loopback, broker in its own process, journal on disk (SQLite WAL, synchronous=FULL, one fsync per event-loop
pass). Added latency = (submit -> assignment received) + (answer sent -> result received), i.e. everything
the broker adds to a person's think time. Target: p99 <= 5 ms added, 0 lost.

Command: `{command}`
Machine: {r['machine']}. {note}

| metric | value |
| --- | --- |
| submitted / answered / lost | {r['submitted']} / {r['answered']} / {r['lost']} |
| throughput (final states/s) | {r['throughput_rps']} |
| added latency p50 / p99 / max (ms) | {r['added_latency_ms_p50']} / {r['added_latency_ms_p99']} / \
{r['added_latency_ms_max']} |
| submit -> ack (journaled) p50 / p99 (ms) | {r['ack_latency_ms_p50']} / {r['ack_latency_ms_p99']} |
| submit -> assign p50 / p99 (ms) | {r['submit_to_assign_ms_p50']} / {r['submit_to_assign_ms_p99']} |
| answer -> result (includes one fsync) p50 / p99 (ms) | {r['answer_to_result_ms_p50']} / \
{r['answer_to_result_ms_p99']} |
| transport floor before the run (two bare CURVE round trips, one with the image) p50 / p99 (ms) | \
{r['transport_floor_ms_p50']} / {r['transport_floor_ms_p99']} |
| bare SQLite commit on this disk before the run p50 / p99 (ms) | {r['disk_commit_ms_p50']} / \
{r['disk_commit_ms_p99']} |
| journal rows / missing | {r['journal_rows']} / {r['journal_missing']} |
| duplicate results (re-deliveries, harmless) | {r['duplicate_results']} |
| request image size (bytes) | {r['image_bytes']} |
| broker CPU for the run (s) / per request (ms) | {r['broker_cpu_s']} / \
{r['broker_cpu_s'] / max(r['submitted'], 1) * 1000:.3f} |
| broker CPU user / system (s) | {r['broker_cpu_user_s']} / {r['broker_cpu_system_s']} |
| load generator CPU (s) | {r['load_generator_cpu_s']} |
| load average at end | {r['load_average_at_end']} |
"""  # fmt: skip
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(body + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    DOC.write_text(text)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--echo-server":  # internal: the transport floor's far end
        return echo_server(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50)
    ap.add_argument("--associates", type=int, default=10)
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second, all cells together")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--image-bytes", type=int, default=20_000, help="size of each request's image (bytes)")
    ap.add_argument("--think-ms", type=float, default=0.0, help="associate think time (ms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--profile-broker", type=Path, help="run the broker under cProfile, write stats here")
    ap.add_argument("--dump", type=Path, help="write each request's submit time and added latency here")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--note", default="", help="conditions to record in docs/benchmarks.md")
    args = ap.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if not args.no_doc:
        command = (
            f".venv/bin/python benchmarks/broker_load.py --cells {args.cells} --associates {args.associates} "
            f"--rate {args.rate:g} --seconds {args.seconds:g} --image-bytes {args.image_bytes} "
            f"--think-ms {args.think_ms:g} --json OUT"
        )
        update_doc(result, command, args.note)
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
