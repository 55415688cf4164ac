"""Write tests/sim/data/sim_grasps: a small slice of a real simulation collection, for train_from_sim tests.

Why a stored slice: `grasping.learning.train` needs a few hundred labelled rows (its calibration and
watchdog splits need >= 32 rows of a family each), which takes minutes to collect on the 2-core test
machine; the test adds these rows to a tiny live collection instead (`TrainFromSimConfig.extra_data`).

Run (from the repository root, after a collection into DIR with `python -m sim.collect`):
    .venv/bin/python tests/sim/data/make_sim_grasps.py DIR/ledger-w0.db DIR/ledger-w1.db --rows 640

Rows are the first `--rows` labelled rows of whole totes in tote order, exported by
`hitl.ledger.Ledger.export` (same arrays and meaning), with patches stored as float16 in a compressed
npz (the loader converts to float32) to keep the file under 1 MB, and a manifest.json with its sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "sim_grasps"


def main() -> int:
    from sim.collect import export_merged
    from sim.training import tote_number, tote_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ledgers", nargs="+", help="collection ledger files")
    ap.add_argument("--rows", type=int, default=640, help="rows to keep (whole totes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_merged(args.ledgers, Path(tmp) / "x")
        parts = [dict(np.load(f, allow_pickle=False)) for f in sorted((Path(tmp) / "x").glob("*.npz"))]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    totes = np.array([tote_number(tote_of(r)) for r in arrays["row_id"]])
    order = np.argsort(totes, kind="stable")
    last = totes[order][min(args.rows, len(order)) - 1]
    keep = order[totes[order] <= last]
    out = {k: v[keep] for k, v in arrays.items()}
    out["patches"] = out["patches"].astype(np.float16)
    OUT.mkdir(parents=True, exist_ok=True)
    for f in OUT.glob("*.npz"):
        f.unlink()
    shard = OUT / "shard-00000.npz"
    np.savez_compressed(shard, **out)
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest = {
        "format_version": 1,
        "rows": int(len(keep)),
        "positives": int(out["label"].sum()),
        "shards": [{"file": shard.name, "rows": int(len(keep)), "sha256": digest}],
        "made_by": "tests/sim/data/make_sim_grasps.py",
        "totes": int(np.unique(totes[keep]).size),
        "families": {str(f): int((out["family"] == f).sum()) for f in np.unique(out["family"])},
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"{OUT}: {len(keep)} rows, {shard.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
