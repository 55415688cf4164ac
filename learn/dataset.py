"""One dataset from many cells' ledgers (and replay exports), with a manifest that reproduces it.

`build_dataset` exports every ledger (`hitl.ledger.Ledger.export`: labels from every answer, item
identity, tote ids) into the round's directory, loads the exports and any replay exports (older
data, e.g. the simulated collection the default model was trained on), and joins them. Rows are
split by **tote** downstream (the Dataset's scene key is set to the tote: re-plans of one tote are
near-duplicates and must not straddle a split).

The manifest (`manifest.json` next to the exports) lists every source with its shards' sha256, every
row's id and content hash, the dataset fingerprint and the code version (git commit and a hash of
the package sources). `load_manifest` rebuilds the identical dataset from it and refuses if any
shard or row differs, which is what makes a training run reproducible from its manifest.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from grasping.learning import Dataset, DatasetError, join_datasets, load_dataset
from hitl.ledger import Ledger

MANIFEST_FORMAT = 1
_REPO = Path(__file__).resolve().parent.parent
_SOURCE_PACKAGES = ("grasping", "hitl", "learn")


def code_version() -> dict[str, str]:
    """The code that built a dataset: git commit (when in a checkout, "+dirty" with local changes)
    and the sha256 of the Python sources of the packages that decide labels, features and training."""
    h = hashlib.sha256()
    for pkg in _SOURCE_PACKAGES:
        for f in sorted((_REPO / pkg).rglob("*.py")):
            h.update(str(f.relative_to(_REPO)).encode())
            h.update(f.read_bytes())
    out = {"sources_sha256": h.hexdigest()[:16], "git": "unknown"}
    try:
        commit = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            out["git"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def row_hashes(ds: Dataset) -> list[str]:
    """sha256 (16 hex) of each row's content: observation, label, weight, gripper, id and tote."""
    out = []
    for i in range(len(ds)):
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(ds.patches[i]).tobytes())
        h.update(np.ascontiguousarray(ds.features[i]).tobytes())
        h.update(f"{int(ds.gripper[i])}|{float(ds.label[i])}|{float(ds.weight[i]):.6g}|".encode())
        h.update(f"{ds.row_id[i]}|{ds.tote[i]}|{ds.family[i]}".encode())
        out.append(h.hexdigest()[:16])
    return out


@dataclass(frozen=True)
class BuiltDataset:
    dataset: Dataset  # scene key = tote
    is_replay: np.ndarray  # (N,) bool: rows from replay exports (always "old" data)
    manifest: dict[str, Any]
    manifest_path: Path


def _shards(export_dir: Path) -> list[dict[str, Any]]:
    m = json.loads((export_dir / "manifest.json").read_text())
    return [{"file": s["file"], "sha256": s["sha256"], "rows": s["rows"]} for s in m["shards"]]


def _by_tote(ds: Dataset) -> Dataset:
    return replace(ds, scene=ds.tote.astype(str))


def build_dataset(
    ledgers: list[Path],
    replay: tuple[str, ...] | list[str],
    out_dir: str | Path,
    *,
    weak_negative_weight: float,
    extra: dict[str, Any] | None = None,
) -> BuiltDataset:
    """Export the ledgers into `out_dir`, join them with the replay exports, write the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[Dataset] = []
    replay_mask: list[np.ndarray] = []
    sources: list[dict[str, Any]] = []
    for i, path in enumerate(ledgers):
        with Ledger(path, None, create=False) as ledger:
            cell = ledger.cell_id
            exp = out_dir / f"export-{i:03d}-{cell}"
            m = ledger.export(exp, weak_negative_weight=weak_negative_weight)
        sources.append(
            {"kind": "ledger", "path": str(path), "cell_id": cell, "export": exp.name, "rows": m.rows,
             "shards": _shards(exp)}
        )  # fmt: skip
        if m.rows:
            parts.append(load_dataset(exp))
            replay_mask.append(np.zeros(m.rows, dtype=bool))
    for r in replay:
        ds = load_dataset(r)  # verifies every shard's sha256 against its manifest
        sources.append(
            {"kind": "replay", "path": str(Path(r).resolve()), "rows": len(ds), "shards": _shards(Path(r))}
        )
        parts.append(ds)
        replay_mask.append(np.ones(len(ds), dtype=bool))
    ds = _by_tote(join_datasets(parts, origin=str(out_dir)))
    hashes = row_hashes(ds)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "weak_negative_weight": float(weak_negative_weight),
        "sources": sources,
        "rows": len(ds),
        "fingerprint": ds.fingerprint(),
        "row_ids": ds.row_id.astype(str).tolist(),
        "row_hashes": hashes,
        "summary": ds.summary(),
        **(extra or {}),
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=float))
    return BuiltDataset(ds, np.concatenate(replay_mask), manifest, path)


def load_manifest(path: str | Path) -> BuiltDataset:
    """Rebuild a dataset from its manifest (the exports beside it and the replay paths it names).

    Raises DatasetError if a shard's sha256, a row's content hash or the fingerprint differs.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"manifest {path}: cannot be read ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"manifest {path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    parts, replay_mask = [], []
    for src in manifest["sources"]:
        where = path.parent / src["export"] if src["kind"] == "ledger" else Path(src["path"])
        if src["rows"] == 0:
            continue
        if _shards(where) != src["shards"]:
            raise DatasetError(f"manifest {path}: the shards of {where} are not the ones it was built from")
        parts.append(load_dataset(where))
        replay_mask.append(np.full(src["rows"], src["kind"] == "replay"))
    ds = _by_tote(join_datasets(parts, origin=str(path.parent)))
    hashes = row_hashes(ds)
    if len(hashes) != len(manifest["row_hashes"]):
        raise DatasetError(
            f"manifest {path}: {len(hashes)} rows rebuilt, it lists {len(manifest['row_hashes'])}"
        )
    if hashes != manifest["row_hashes"]:
        bad = next(i for i, (a, b) in enumerate(zip(hashes, manifest["row_hashes"], strict=False)) if a != b)
        raise DatasetError(f"manifest {path}: row {bad} ({ds.row_id[bad]}) differs from the one it lists")
    if ds.fingerprint() != manifest["fingerprint"]:
        raise DatasetError(f"manifest {path}: dataset fingerprint differs")
    return BuiltDataset(ds, np.concatenate(replay_mask), manifest, path)
