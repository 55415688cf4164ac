"""How fast the ledger records and exports, with the durability the cell runs with (WAL, synchronous=FULL).

    .venv/bin/python benchmarks/ledger_write.py [--attempts 2000] [--plans 200] [--json OUT] [--update-docs]

Measures, on a fresh ledger file in a temporary directory (same disk as the repository unless --dir):
  * record_attempt, one thread: attempts/s and per-call latency (each call is one fsynced commit),
    with a (2, 32, 32) float32 patch and 8 float32 features per attempt;
  * record_attempt from 4 threads at once (the lock serialises them; this shows the cost of contention);
  * record_plan with 32 candidates (patches and features), without and with a stored 640x480 frame;
  * export: labeled rows/s and MB/s of npz written (sha256 included).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grasping.types import Candidate, Frame, Grasp, Outcome, Plan, Reason  # noqa: E402
from hitl.ledger import Ledger  # noqa: E402

DOC_SECTION = "## ledger_write"


def _grasp(rng: np.random.Generator) -> Grasp:
    return Grasp("suction", rng.uniform(-0.3, 0.3, 3), rng.normal(size=4))


def _attempt(rng: np.random.Generator, attempt_id: str, plan_id: str | None, index: int | None) -> dict:
    g = _grasp(rng)
    ok = bool(rng.uniform() < 0.7)
    return dict(
        attempt_id=attempt_id,
        plan_id=plan_id,
        candidate_index=index,
        grasp=g,
        outcome=Outcome(ok, Reason.OK if ok else Reason.SLIPPED, g, 3.1, details={"seal_angle_deg": 3.0}),
        decided_by="model",
        model_version="bench-model",
        robot_time=float(rng.uniform(0, 1e4)),
        patch=rng.normal(size=(2, 32, 32)).astype(np.float32),
        features=rng.normal(size=8).astype(np.float32),
        family="bench",
        source="sim",
    )


def _plan(rng: np.random.Generator, m: int, frame_id: str) -> Plan:
    cands = tuple(Candidate(_grasp(rng), float(rng.uniform()), 0.5, 0.5, 0.1, (10, 10), 0) for _ in range(m))
    return Plan(
        candidates=cands,
        decision="pick",
        reasons=("confident",),
        threshold=0.8,
        scene_ood_sigma=0.7,
        model_version="bench-model",
        frame_id=frame_id,
        patches=rng.normal(size=(m, 2, 32, 32)).astype(np.float32),
        features=rng.normal(size=(m, 8)).astype(np.float32),
    )


def _frame(rng: np.random.Generator, frame_id: str) -> Frame:
    # A tote seen from 0.9 m: a floor plane with a few boxes, 1 mm sensor noise, a textured RGB image.
    h, w = 480, 640
    depth = np.full((h, w), 0.9, dtype=np.float32)
    for _ in range(8):
        r, c = rng.integers(0, h - 80), rng.integers(0, w - 80)
        depth[r : r + 80, c : c + 80] -= rng.uniform(0.03, 0.15)
    depth += rng.normal(0, 0.001, (h, w)).astype(np.float32)
    uu, vv = np.meshgrid(np.arange(w), np.arange(h))
    rgb = ((uu + vv)[..., None] % 256).astype(np.uint8)
    rgb = np.repeat(rgb, 3, axis=2) ^ rng.integers(0, 16, (h, w, 3), dtype=np.uint8)
    K = np.array([[600.0, 0, 320], [0, 600.0, 240], [0, 0, 1]])
    return Frame(depth=depth, rgb=rgb, K=K, T_base_camera=np.eye(4), frame_id=frame_id)


def _pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a), q))


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="ledger-bench-", dir=args.dir))
    try:
        db = workdir / "cell.db"
        ledger = Ledger(db, "bench-cell")
        res: dict = {"attempts": args.attempts, "plans": args.plans, "candidates_per_plan": args.candidates}

        # 1) one thread, one fsynced commit per attempt
        kws = [_attempt(rng, f"a-{i}", None, None) for i in range(args.attempts)]
        lat = []
        t0 = time.perf_counter()
        for kw in kws:
            t = time.perf_counter()
            ledger.record_attempt(**kw)
            lat.append(time.perf_counter() - t)
        dt = time.perf_counter() - t0
        res["attempts_per_s_1thread"] = args.attempts / dt
        res["attempt_latency_ms_p50"] = 1e3 * _pct(lat, 50)
        res["attempt_latency_ms_p99"] = 1e3 * _pct(lat, 99)

        # 2) four threads at once
        n_threads, per = 4, args.attempts // 4
        batches = [[_attempt(rng, f"t{t}-{i}", None, None) for i in range(per)] for t in range(n_threads)]

        def work(batch: list[dict]) -> None:
            for kw in batch:
                ledger.record_attempt(**kw)

        threads = [threading.Thread(target=work, args=(b,)) for b in batches]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        res["attempts_per_s_4threads"] = n_threads * per / (time.perf_counter() - t0)

        # 3) decision records with all candidates, without and with the frame
        plans = [_plan(rng, args.candidates, f"f-{i}") for i in range(args.plans)]
        t0 = time.perf_counter()
        plan_ids = [ledger.record_plan(p, tote_id="tote") for p in plans]
        res["plans_per_s"] = args.plans / (time.perf_counter() - t0)
        n_frames = max(1, args.plans // 10)
        frames = [_frame(rng, f"f-{i}") for i in range(n_frames)]
        t0 = time.perf_counter()
        for p, f in zip(plans[:n_frames], frames, strict=True):
            ledger.record_plan(p, tote_id="tote", frame=f, store_frame=True)
        res["plans_with_frame_per_s"] = n_frames / (time.perf_counter() - t0)
        size_before = db.stat().st_size + (workdir / "cell.db-wal").stat().st_size
        # attempts that point at a plan candidate (export joins their observation from the plan)
        for i, pid in enumerate(plan_ids):
            ledger.record_attempt(**{**_attempt(rng, f"p-{i}", pid, 0), "patch": None, "features": None})
        res["ledger_bytes"] = size_before

        # 4) export
        t0 = time.perf_counter()
        m = ledger.export(workdir / "export")
        dt = time.perf_counter() - t0
        out_bytes = sum(s["bytes"] for s in m.shards)
        res["export_rows"] = m.rows
        res["export_rows_per_s"] = m.rows / dt
        res["export_mb_per_s"] = out_bytes / dt / 1e6
        res["export_seconds"] = dt
        res["integrity"] = ledger.integrity_check()
        ledger.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def _markdown(res: dict, cmd: str) -> str:
    rows = [
        ("record_attempt, 1 thread", f"{res['attempts_per_s_1thread']:.0f} attempts/s"),
        (
            "record_attempt latency p50 / p99",
            f"{res['attempt_latency_ms_p50']:.2f} / {res['attempt_latency_ms_p99']:.2f} ms",
        ),
        ("record_attempt, 4 threads together", f"{res['attempts_per_s_4threads']:.0f} attempts/s"),
        (
            f"record_plan, {res['candidates_per_plan']} candidates with patches",
            f"{res['plans_per_s']:.0f} plans/s",
        ),
        ("record_plan + 640x480 frame (npz, deflate 1)", f"{res['plans_with_frame_per_s']:.1f} plans/s"),
        (
            f"export ({res['export_rows']} labeled rows, sha256 included)",
            f"{res['export_rows_per_s']:.0f} rows/s, {res['export_mb_per_s']:.1f} MB/s",
        ),
    ]
    return "\n".join(
        [
            DOC_SECTION,
            "",
            "The ledger (hitl.ledger) on a fresh SQLite file: WAL, `synchronous=FULL`, one fsynced commit "
            "per `record_*` call. Attempts carry a (2, 32, 32) float32 patch and 8 float32 features.",
            "",
            f"Command: `{cmd}`",
            "",
            f"Machine: 2-core x86_64, no GPU, local virtual disk; Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}. Taken while other engineers' jobs shared the 2 cores "
            "(contended); repeated runs differ by up to about 2x.",
            "",
            "| measure | value |",
            "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in rows],
            "",
            "A pick cycle takes about 3 s of robot time (FIELD-NOTES), so one plan, one attempt and even a "
            "stored frame per cycle use a small fraction of it. Writers share one connection behind a lock "
            "(SQLite has one writer at a time); the 4-thread figure is their total throughput.",
            "",
            "Each `record_*` call costs one fdatasync of the WAL (strace on 500 attempts counted 519, "
            "the rest "
            "from opening the file). On this virtual machine an fdatasync returns in about 30 us, so the "
            "disk is acknowledging from a host cache: on a physical disk the fsync latency bounds "
            "record_attempt instead and the 1-thread rate will be lower. Measure on the target cell's disk.",
            "",
        ]
    )


def _update_docs(section: str, doc: Path) -> None:
    # Re-read right before writing: other benchmarks edit their own sections of the same file.
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == DOC_SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:])
    doc.write_text(new.rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempts", type=int, default=2000, help="attempts per write measurement")
    ap.add_argument("--plans", type=int, default=200, help="decision records to write")
    ap.add_argument("--candidates", type=int, default=32, help="candidates per decision record")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="directory for the temporary ledger (default: system temp)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    ap.add_argument("--update-docs", action="store_true", help="rewrite this section of docs/benchmarks.md")
    args = ap.parse_args()
    res = run(args)
    for k, v in res.items():
        print(f"{k:>28}: {v:.3f}" if isinstance(v, float) else f"{k:>28}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.update_docs:
        cmd = "python benchmarks/ledger_write.py " + " ".join(sys.argv[1:])
        _update_docs(
            _markdown(res, cmd.strip()), Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
