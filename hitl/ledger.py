"""The ledger: the cell's durable record of decisions, attempts and human answers (SQLite, WAL).

Everything the cell learns from passes through here: every Plan (with every candidate's local
geometry, chosen or rejected), every executed attempt with its outcome, who decided it and with which
model version, every assist request and its final answer. `export` turns that record into a training
dataset (npz shards + a manifest with sha256 values).

Durability: the database runs in WAL mode with `synchronous=FULL`, and every `record_*` call commits
before it returns, so a row that a caller was told about survives a SIGKILL or a power cut (the WAL is
fsynced at every commit). Writers are serialised by one lock around one connection, so the controller
may record from several threads. Arrays are stored as `.npy` bytes and always loaded with
`allow_pickle=False`: a ledger file never executes code when read.

The schema is versioned with `PRAGMA user_version`; `_MIGRATIONS[k]` takes a file from version k to
k + 1, and opening an older file runs the missing steps in one transaction. See docs/ledger.md.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import io
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grasping.types import GRIPPER_KINDS, Frame, Grasp, Outcome, Plan, Reason
from grasping.watchdog import ITEM_FEATURES
from hitl.messages import AssistAnswer, AssistRequest, CandidateView

log = logging.getLogger(__name__)

# Marks the file as a pickcell ledger (PRAGMA application_id, a 32-bit int: ASCII "PKLG").
APPLICATION_ID = 0x504B4C47
# Where a training row came from; a trainer weights by it.
SOURCES = ("production", "sim", "associate")
# Attempts that ended for a reason that says nothing about the grasp's geometry are stored but not
# labeled: the arm never touched the item (kinematics, a malformed request, a protective stop).
UNLABELED_REASONS = frozenset(
    {Reason.IK_FAILED, Reason.UNREACHABLE, Reason.INVALID, Reason.ESTOP, Reason.NOT_HOLDING}
)
EXPORT_FORMAT_VERSION = 2
# Weight of a "passed over" row: a candidate on the item a person answered about that they did not
# choose. A weak negative: the person preferred another spot, which says little about this one.
WEAK_NEGATIVE_WEIGHT = 0.3
# Length of an item descriptor row in the export (grasping.watchdog.ITEM_FEATURES). A stored descriptor
# of an older version (shorter: versions only append features) exports its features and NaN for the
# rest; a longer one (a newer pickcell's) exports NaN.
ITEM_DESCRIPTOR_DIM = len(ITEM_FEATURES)


class LedgerError(RuntimeError):
    """The ledger file cannot be used as asked; the message names the file."""


class LedgerVersionError(LedgerError):
    """The file was written by a newer pickcell than this one (its schema version is unknown here)."""


class LedgerCorruptError(LedgerError):
    """The file is not a SQLite database, is damaged, or is not a pickcell ledger."""


# --- schema ----------------------------------------------------------------------------------------


def _run_ddl(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): on Python <= 3.11 it COMMITs any open transaction first, which would break
    # the one-transaction migration. The DDL below holds no ';' inside a statement.
    for stmt in script.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    """The first layout: plans with their candidates, attempts, assist requests and answers."""
    _run_ddl(
        conn,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE plans (
            plan_id TEXT PRIMARY KEY, frame_id TEXT NOT NULL, tote_id TEXT NOT NULL, cell_id TEXT NOT NULL,
            recorded_at REAL NOT NULL, decision TEXT NOT NULL, reasons TEXT NOT NULL, threshold REAL,
            scene_ood_sigma REAL, in_distribution INTEGER NOT NULL, model_version TEXT NOT NULL,
            latency_ms REAL NOT NULL, n_candidates INTEGER NOT NULL);
        CREATE TABLE candidates (
            plan_id TEXT NOT NULL REFERENCES plans(plan_id), idx INTEGER NOT NULL, gripper TEXT NOT NULL,
            grasp TEXT NOT NULL, analytic_score REAL NOT NULL, learned_score REAL, p_success REAL,
            ood_score REAL, u INTEGER NOT NULL, v INTEGER NOT NULL, cluster INTEGER NOT NULL,
            patch BLOB, features BLOB, PRIMARY KEY (plan_id, idx));
        CREATE TABLE attempts (
            attempt_id TEXT PRIMARY KEY, plan_id TEXT, candidate_index INTEGER, cell_id TEXT NOT NULL,
            recorded_at REAL NOT NULL, robot_time REAL NOT NULL, gripper TEXT NOT NULL, grasp TEXT NOT NULL,
            success INTEGER NOT NULL, reason TEXT NOT NULL, executed TEXT, robot_seconds REAL NOT NULL,
            item_id INTEGER, details TEXT NOT NULL, decided_by TEXT NOT NULL, model_version TEXT NOT NULL,
            patch BLOB, features BLOB);
        CREATE TABLE requests (
            request_id TEXT PRIMARY KEY, cell_id TEXT NOT NULL, plan_id TEXT, created REAL NOT NULL,
            deadline REAL NOT NULL, priority INTEGER NOT NULL, reasons TEXT NOT NULL,
            candidates TEXT NOT NULL, context TEXT NOT NULL, image_png BLOB NOT NULL,
            recorded_at REAL NOT NULL);
        CREATE TABLE answers (
            request_id TEXT PRIMARY KEY, status TEXT NOT NULL, kind TEXT, candidate_index INTEGER,
            pixel_u INTEGER, pixel_v INTEGER, associate_id TEXT, answered_at REAL NOT NULL,
            note TEXT NOT NULL, recorded_at REAL NOT NULL);
        """,
    )


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Provenance for weighted retraining (item family, data source), optional frames, item clusters,
    and the indexes that incremental export (`since`) and plan look-ups need."""
    _run_ddl(
        conn,
        """
        ALTER TABLE attempts ADD COLUMN family TEXT;
        ALTER TABLE attempts ADD COLUMN source TEXT NOT NULL DEFAULT 'production';
        ALTER TABLE plans ADD COLUMN clusters TEXT NOT NULL DEFAULT '[]';
        CREATE TABLE frames (
            plan_id TEXT PRIMARY KEY REFERENCES plans(plan_id), frame_id TEXT NOT NULL,
            stamp REAL NOT NULL, data BLOB NOT NULL, recorded_at REAL NOT NULL);
        CREATE INDEX attempts_recorded_at ON attempts(recorded_at);
        CREATE INDEX attempts_plan ON attempts(plan_id);
        CREATE INDEX answers_recorded_at ON answers(recorded_at);
        CREATE INDEX requests_plan ON requests(plan_id);
        CREATE INDEX plans_frame ON plans(frame_id);
        """,
    )


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """Labels from every answer and item identity: which assist request an attempt answered, and
    which segmented item it was on with that item's shape descriptor (the item watchdog's)."""
    _run_ddl(
        conn,
        """
        ALTER TABLE attempts ADD COLUMN request_id TEXT;
        ALTER TABLE attempts ADD COLUMN item INTEGER;
        ALTER TABLE attempts ADD COLUMN item_descriptor BLOB;
        CREATE INDEX attempts_request ON attempts(request_id);
        """,
    )


# _MIGRATIONS[k] takes a file from schema version k to k + 1. Append only; never edit a shipped step.
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_0_to_1,
    _migrate_1_to_2,
    _migrate_2_to_3,
)
SCHEMA_VERSION = len(_MIGRATIONS)


# --- encoding helpers ------------------------------------------------------------------------------


def _npy(a: np.ndarray | None, dtype: type = np.float32) -> bytes | None:
    if a is None:
        return None
    buf = io.BytesIO()
    np.save(buf, np.asarray(a, dtype=dtype, order="C"), allow_pickle=False)
    return buf.getvalue()


def _from_npy(b: bytes | None) -> np.ndarray | None:
    if b is None:
        return None
    b = bytes(b)
    # Fast path: the .npy header is the same for every patch of a shape, and parsing it (numpy uses
    # ast.literal_eval) costs more than reading the data; parse each distinct header once.
    hlen_size = {1: 2, 2: 4}.get(b[6] if len(b) > 8 and b[:6] == b"\x93NUMPY" else 0)
    if hlen_size is None:  # another format version, or not .npy at all: numpy's own reader decides
        return np.load(io.BytesIO(b), allow_pickle=False)
    start = 8 + hlen_size
    end = start + int.from_bytes(b[8:start], "little")
    shape, dtype = _npy_header(b[:end])
    return np.frombuffer(b, dtype=dtype, offset=end, count=int(np.prod(shape))).reshape(shape)


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype]:
    f = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("refusing to load an object array from the ledger (it would need unpickling)")
    if fortran and len(shape) > 1:
        raise ValueError("unexpected Fortran-ordered array in the ledger")
    return tuple(shape), dtype


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, enum.Enum):
        return o.value
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _dumps(o: Any, what: str) -> str:
    try:
        return json.dumps(o, default=_json_default, allow_nan=True, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot store {what}: {exc}") from exc


def _grasp_json(g: Grasp) -> str:
    return json.dumps(
        {
            "gripper": g.gripper,
            "position": [float(x) for x in g.position],
            "orientation": [float(x) for x in g.orientation],
            "width": float(g.width),
        }
    )


def _grasp_from_json(s: str | None) -> Grasp | None:
    if s is None:
        return None
    d = json.loads(s)
    g = Grasp(gripper=d["gripper"], position=d["position"], orientation=d["orientation"], width=d["width"])
    # The stored quaternion was already normalised by Grasp; normalising again can move the last bit,
    # and the ledger must give back exactly what it was given.
    q = np.array(d["orientation"], dtype=np.float64)
    q.setflags(write=False)
    object.__setattr__(g, "orientation", q)
    return g


def _opt_float(x: float | None) -> float | None:
    return None if x is None else float(x)


def _check_patch(a: np.ndarray | None, what: str) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(a)
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{what} must be a numeric (C, S, S) array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


def _check_features(a: np.ndarray | None, what: str) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(a)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{what} must be a numeric (F,) array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


def _check_decided_by(decided_by: str) -> None:
    if not isinstance(decided_by, str) or not decided_by.strip():
        raise ValueError("decided_by must be a non-empty string: 'model', 'oracle' or 'associate:<identity>'")
    if decided_by.startswith("associate:") and not decided_by[len("associate:") :].strip():
        raise ValueError("decided_by 'associate:' needs the associate's identity after the colon")


def encode_frame(frame: Frame) -> bytes:
    """A Frame as npz bytes (depth, rgb, K, T_base_camera, stamp), deflate level 1.

    Level 1 rather than numpy's default (savez_compressed, level 6): on a noisy 640x480 depth image it
    is about 3.5x faster (37 vs 132 ms here) and no larger, and this runs inside the pick loop.
    Lossless: depth stays float32 metres, NaN holes included. np.load reads it as any npz.
    """
    buf = io.BytesIO()
    arrays = {
        "depth": frame.depth,
        "rgb": frame.rgb,
        "K": frame.K,
        "T_base_camera": frame.T_base_camera,
        "stamp": np.float64(frame.stamp),
    }
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, a in arrays.items():
            entry = io.BytesIO()
            np.save(entry, np.asarray(a), allow_pickle=False)
            zf.writestr(f"{name}.npy", entry.getvalue())
    return buf.getvalue()


def decode_frame(data: bytes, frame_id: str) -> Frame:
    """Inverse of `encode_frame` (never unpickles)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return Frame(
            depth=z["depth"],
            rgb=z["rgb"],
            K=z["K"],
            T_base_camera=z["T_base_camera"],
            stamp=float(z["stamp"]),
            frame_id=frame_id,
        )


# --- records returned by queries -------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptRecord:
    """One executed attempt as stored."""

    attempt_id: str
    plan_id: str | None
    candidate_index: int | None
    cell_id: str
    grasp: Grasp  # the grasp that was asked for
    outcome: Outcome  # outcome.executed is the grasp as executed
    decided_by: str  # "model" | "oracle" | "associate:<identity>" | ...
    model_version: str
    robot_time: float  # seconds of robot time when the attempt was made
    recorded_at: float  # unix seconds when the ledger committed it
    patch: np.ndarray | None  # (C, S, S) float32
    features: np.ndarray | None  # (F,) float32
    family: str | None
    source: str
    request_id: str | None = None  # the assist request this attempt answered (approve / point)
    item: int | None = None  # index of the segmented item (plan cluster) it was on
    item_descriptor: np.ndarray | None = None  # (D,) that item's shape descriptor


@dataclass(frozen=True)
class CandidateRecord:
    index: int
    grasp: Grasp
    analytic_score: float
    learned_score: float | None
    p_success: float | None
    ood_score: float | None
    pixel: tuple[int, int]
    cluster: int
    patch: np.ndarray | None
    features: np.ndarray | None


@dataclass(frozen=True)
class PlanRecord:
    """One decision record: what the planner decided, why, and every candidate it weighed."""

    plan_id: str
    frame_id: str
    tote_id: str
    cell_id: str
    recorded_at: float
    decision: str
    reasons: tuple[str, ...]
    threshold: float | None
    scene_ood_sigma: float | None
    in_distribution: bool
    model_version: str
    latency_ms: float
    candidates: tuple[CandidateRecord, ...]
    has_frame: bool


@dataclass(frozen=True)
class ExportManifest:
    """What `Ledger.export` wrote; the same content is in `out_dir/manifest.json`."""

    out_dir: Path
    cell_id: str
    schema_version: int
    rows: int
    positives: int
    negatives: int
    shards: tuple[dict, ...]  # {"file", "rows", "sha256", "bytes", "patch_shape", "feature_dim"}
    counts: dict = field(default_factory=dict)  # breakdowns and rows left out, by cause

    def to_json(self) -> dict:
        return {
            "format_version": EXPORT_FORMAT_VERSION,
            "cell_id": self.cell_id,
            "schema_version": self.schema_version,
            "rows": self.rows,
            "positives": self.positives,
            "negatives": self.negatives,
            "shards": list(self.shards),
            "counts": self.counts,
        }


def verify_export(out_dir: str | Path) -> list[str]:
    """Check every shard of an export against its manifest; return the problems (empty = all good)."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    problems = []
    for shard in manifest["shards"]:
        p = out_dir / shard["file"]
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest != shard["sha256"]:
            problems.append(f"{p}: sha256 {digest} != manifest {shard['sha256']}")
    return problems


# --- the ledger ------------------------------------------------------------------------------------


class Ledger:
    """The cell's durable record (one SQLite file per cell, WAL, synchronous=FULL).

    `cell_id` is stored in the file when it is created; opening it later as another cell is refused
    (pass None to open whatever cell's ledger it is, e.g. to export it). `create=False` refuses to
    make a new file (the CLI uses it so a typo in a path does not silently create an empty ledger).
    `clock` gives the unix time written as `recorded_at` (injectable for tests).
    """

    def __init__(
        self,
        path: str | Path,
        cell_id: str | None = None,
        *,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 10.0,  # seconds to wait for another process's write lock
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        if not create and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}")
        if self.path.is_dir():
            raise LedgerError(f"{self.path} is a directory, not a ledger file")
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits implicitly.
            self._conn = sqlite3.connect(
                str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        try:
            self._open(cell_id)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise LedgerCorruptError(
                f"{self.path} is not a readable pickcell ledger (SQLite says: {exc})"
            ) from exc
        except BaseException:
            self._conn.close()
            raise

    def _open(self, cell_id: str | None) -> None:
        c = self._conn
        # Read the header first: on a file that is not SQLite this is what raises.
        c.execute("SELECT count(*) FROM sqlite_master").fetchone()
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        version = c.execute("PRAGMA user_version").fetchone()[0]
        n_objects = c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id not in (0, APPLICATION_ID) or (version == 0 and n_objects > 0):
            raise LedgerCorruptError(
                f"{self.path} is a SQLite database but not a pickcell ledger "
                f"(application_id={app_id:#x}, user_version={version}, {n_objects} schema objects)"
            )
        if version == 0 and cell_id is None:
            raise LedgerError(f"{self.path} is not a ledger yet: a cell_id is needed to create one")
        if version > SCHEMA_VERSION:
            raise LedgerVersionError(
                f"{self.path} has ledger schema version {version}, but this pickcell knows versions up to "
                f"{SCHEMA_VERSION}: upgrade pickcell to read it (the file was left untouched)"
            )
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(f"{self.path}: could not switch to WAL journal mode (got {mode!r})")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        with self._lock:
            row = c.execute("SELECT value FROM meta WHERE key='cell_id'").fetchone()
            if row is None:
                if cell_id is None:
                    raise LedgerError(f"{self.path} is a new ledger: a cell_id is needed to create it")
                self._write(
                    lambda: c.executemany(
                        "INSERT INTO meta(key, value) VALUES (?, ?)",
                        [("cell_id", cell_id), ("created_at", repr(self._clock()))],
                    )
                )
                self.cell_id = cell_id
            else:
                stored = row[0]
                if cell_id is not None and cell_id != stored:
                    raise LedgerError(
                        f"{self.path} is the ledger of cell {stored!r}, not of cell {cell_id!r}"
                    )
                self.cell_id = stored

    def _migrate(self) -> None:
        c = self._conn
        with self._lock:
            c.execute("BEGIN IMMEDIATE")
            try:
                # Re-read inside the write lock: another process may have migrated meanwhile.
                start = c.execute("PRAGMA user_version").fetchone()[0]
                for k in range(start, SCHEMA_VERSION):
                    try:
                        _MIGRATIONS[k](c)
                    except sqlite3.Error as exc:
                        raise LedgerError(
                            f"{self.path}: migrating the ledger schema from version {k} to {k + 1} failed "
                            f"({exc}); the file was left at version {start}"
                        ) from exc
                if start < SCHEMA_VERSION:
                    c.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            if 0 < start < SCHEMA_VERSION:
                log.info("migrated ledger %s from schema version %d to %d", self.path, start, SCHEMA_VERSION)

    def _write(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` inside one write transaction, committed (fsynced) before returning."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                result = fn()
                c.execute("COMMIT")
            except BaseException:
                # On a full disk (SQLITE_FULL) or an I/O error SQLite may already have rolled the
                # transaction back; a second ROLLBACK would raise "no transaction is active" and hide
                # the error that matters (continual runs that filled the disk died with only that).
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            return result

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writes ------------------------------------------------------------------------------------

    def record_plan(
        self,
        plan: Plan,
        *,
        tote_id: str,
        frame: Frame | None = None,
        store_frame: bool = False,
        plan_id: str | None = None,
    ) -> str:
        """Store one decision record and every candidate (grasp, scores, patch, features); return its id.

        The id is `<frame_id>-<uuid>` unless `plan_id` is given; recording the same `plan_id` twice
        writes nothing the second time. With `store_frame`, `frame` is stored as a compressed npz.
        Rejected candidates are stored too (with their geometry) but carry no label in `export`.
        """
        m = len(plan.candidates)
        patches = None if plan.patches is None else np.asarray(plan.patches)
        features = None if plan.features is None else np.asarray(plan.features)
        if patches is not None and (patches.ndim != 4 or patches.shape[0] != m):
            raise ValueError(f"Plan.patches must be (M={m}, C, S, S), got shape {patches.shape}")
        if features is not None and (features.ndim != 2 or features.shape[0] != m):
            raise ValueError(f"Plan.features must be (M={m}, F), got shape {features.shape}")
        if store_frame and frame is None:
            raise ValueError("store_frame=True needs the frame")
        if frame is not None and plan.frame_id and frame.frame_id and frame.frame_id != plan.frame_id:
            raise ValueError(f"frame {frame.frame_id!r} is not the frame of plan {plan.frame_id!r}")
        frame_id = plan.frame_id or (frame.frame_id if frame is not None else "")
        pid = plan_id or (f"{frame_id}-{uuid.uuid4().hex}" if frame_id else uuid.uuid4().hex)
        clusters = [
            {
                "centroid": np.asarray(cl.centroid, dtype=float).tolist(),
                "lo": np.asarray(cl.lo, dtype=float).tolist(),
                "hi": np.asarray(cl.hi, dtype=float).tolist(),
                "n_points": int(cl.n_points),
                "occluded": round(float(getattr(cl, "occluded", 0.0)), 4),
                "descriptor": _descriptor_list(getattr(cl, "descriptor", None)),
            }
            for cl in getattr(plan, "clusters", ())
        ]
        now = self._clock()
        cand_rows = [
            (
                pid,
                i,
                c.grasp.gripper,
                _grasp_json(c.grasp),
                float(c.analytic_score),
                _opt_float(c.learned_score),
                _opt_float(c.p_success),
                _opt_float(c.ood_score),
                int(c.pixel[0]),
                int(c.pixel[1]),
                int(c.cluster),
                None if patches is None else _npy(patches[i]),
                None if features is None else _npy(features[i]),
            )
            for i, c in enumerate(plan.candidates)
        ]
        frame_blob = encode_frame(frame) if store_frame and frame is not None else None
        reasons = _dumps(list(plan.reasons), "Plan.reasons")

        def write() -> str:
            c = self._conn
            if c.execute("SELECT 1 FROM plans WHERE plan_id=?", (pid,)).fetchone():
                return pid
            c.execute(
                "INSERT INTO plans(plan_id, frame_id, tote_id, cell_id, recorded_at, decision, reasons, "
                "threshold, scene_ood_sigma, in_distribution, model_version, latency_ms, n_candidates, "
                "clusters) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    pid,
                    frame_id,
                    str(tote_id),
                    self.cell_id,
                    now,
                    plan.decision,
                    reasons,
                    _opt_float(plan.threshold),
                    _opt_float(plan.scene_ood_sigma),
                    int(bool(plan.in_distribution)),
                    plan.model_version,
                    float(plan.latency_ms),
                    m,
                    json.dumps(clusters),
                ),
            )
            c.executemany("INSERT INTO candidates VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", cand_rows)
            if frame_blob is not None:
                c.execute(
                    "INSERT INTO frames(plan_id, frame_id, stamp, data, recorded_at) VALUES (?,?,?,?,?)",
                    (pid, frame_id, float(frame.stamp), frame_blob, now),
                )
            return pid

        return self._write(write)

    def record_attempt(
        self,
        *,
        attempt_id: str,
        plan_id: str | None,
        candidate_index: int | None,
        grasp: Grasp,
        outcome: Outcome,
        decided_by: str,
        model_version: str,
        robot_time: float,
        patch: np.ndarray | None = None,
        features: np.ndarray | None = None,
        family: str | None = None,
        source: str = "production",
        request_id: str | None = None,
        item: int | None = None,
        item_descriptor: np.ndarray | None = None,
    ) -> bool:
        """Store one executed attempt; committed (fsynced) before returning.

        Idempotent by `attempt_id`: returns False and writes nothing if that id is already stored (a
        cell that restarts after a crash can replay its last attempt safely). `patch` (C, S, S) and
        `features` (F,) are the observation the label belongs to; when omitted, export takes them
        from the plan's candidate `candidate_index`. `plan_id` is the id record_plan returned, or the
        plan's frame_id (resolved to that frame's latest plan). `source` is one of SOURCES.

        `request_id`: the assist request this attempt carries out (an approved candidate or a
        clicked pixel); export uses it to label the candidates the person passed over. `item` is
        the index of the segmented item (the plan's cluster) the grasp is on and `item_descriptor`
        its shape descriptor; when omitted and the attempt names a plan candidate, both are taken
        from that candidate's cluster in the stored plan.
        """
        if not attempt_id:
            raise ValueError("attempt_id must be a non-empty string")
        _check_decided_by(decided_by)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if candidate_index is not None and plan_id is None:
            raise ValueError("candidate_index needs the plan_id it indexes into")
        if not math.isfinite(float(robot_time)):
            raise ValueError(f"robot_time must be finite, got {robot_time}")
        patch = _check_patch(patch, "patch")
        features = _check_features(features, "features")
        item_descriptor = _check_features(item_descriptor, "item_descriptor")
        details = _dumps(outcome.details, "Outcome.details")
        row = [
            attempt_id,
            plan_id,
            None if candidate_index is None else int(candidate_index),
            self.cell_id,
            self._clock(),
            float(robot_time),
            grasp.gripper,
            _grasp_json(grasp),
            int(bool(outcome.success)),
            outcome.reason.value,
            None if outcome.executed is None else _grasp_json(outcome.executed),
            float(outcome.robot_seconds),
            None if outcome.item_id is None else int(outcome.item_id),
            details,
            decided_by,
            str(model_version),
            _npy(patch),
            _npy(features),
            family,
            source,
            request_id,
            None if item is None else int(item),
            _npy(item_descriptor),
        ]

        def write() -> bool:
            row[1] = _resolve_plan(self._conn, plan_id)
            if item is None and row[1] is not None and candidate_index is not None:
                row[21], row[22] = _item_of_candidate(self._conn, row[1], int(candidate_index))
            cur = self._conn.execute(
                "INSERT INTO attempts(attempt_id, plan_id, candidate_index, cell_id, recorded_at, "
                "robot_time, gripper, grasp, success, reason, executed, robot_seconds, item_id, details, "
                "decided_by, model_version, patch, features, family, source, request_id, item, "
                "item_descriptor) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(attempt_id) DO NOTHING",
                row,
            )
            return cur.rowcount == 1

        return self._write(write)

    def record_request(self, request: AssistRequest) -> bool:
        """Store an assist request; idempotent by request_id (returns False if already stored).

        `request.context["plan_id"]` (or, failing that, `context["frame_id"]`, resolved to that frame's
        latest plan) links the request to its decision record, which is how a "no_safe_pick" answer
        finds the candidates it labels.
        """
        ctx = _dumps(request.context, "AssistRequest.context")
        plan_ref = request.context.get("plan_id") or request.context.get("frame_id") or None
        row = [
            request.request_id,
            request.cell_id,
            None,  # resolved inside the write transaction
            float(request.created),
            float(request.deadline),
            int(request.priority),
            _dumps(list(request.reasons), "AssistRequest.reasons"),
            _dumps([c.__dict__ for c in request.candidates], "AssistRequest.candidates"),
            ctx,
            bytes(request.image_png),
            self._clock(),
        ]

        def write() -> bool:
            row[2] = _resolve_plan(self._conn, None if plan_ref is None else str(plan_ref))
            cur = self._conn.execute(
                "INSERT INTO requests(request_id, cell_id, plan_id, created, deadline, priority, reasons, "
                "candidates, context, image_png, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(request_id) DO NOTHING",
                row,
            )
            return cur.rowcount == 1

        return self._write(write)

    def record_answer(self, answer: AssistAnswer) -> bool:
        """Store the final answer to a request; idempotent by request_id (one final answer).

        A second answer for the same request is not stored (returns False); if it differs from the
        stored one a warning is logged, since the broker promises exactly one final answer.
        """
        if answer.status not in ("answered", "expired", "cancelled"):
            raise ValueError(f"unknown answer status {answer.status!r}")
        if answer.status == "answered" and answer.kind not in ("approve", "point", "no_safe_pick", "skip"):
            raise ValueError(f"an answered request needs a kind, got {answer.kind!r}")
        px = answer.pixel
        row = (
            answer.request_id,
            answer.status,
            answer.kind,
            answer.candidate_index,
            None if px is None else int(px[0]),
            None if px is None else int(px[1]),
            answer.associate_id,
            float(answer.answered_at),
            answer.note,
            self._clock(),
        )

        def write() -> bool:
            cur = self._conn.execute(
                "INSERT INTO answers(request_id, status, kind, candidate_index, pixel_u, pixel_v, "
                "associate_id, answered_at, note, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(request_id) DO NOTHING",
                row,
            )
            return cur.rowcount == 1

        stored = self._write(write)
        if not stored:
            prev = self.answer(answer.request_id)
            if prev is not None and (prev.status, prev.kind, prev.candidate_index, prev.pixel) != (
                answer.status,
                answer.kind,
                answer.candidate_index,
                answer.pixel,
            ):
                log.warning(
                    "ledger %s: request %s already has final answer %s/%s; ignoring %s/%s",
                    self.path,
                    answer.request_id,
                    prev.status,
                    prev.kind,
                    answer.status,
                    answer.kind,
                )
        return stored

    # --- reads -------------------------------------------------------------------------------------

    def _rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._conn.execute(sql, params)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def attempts(
        self,
        *,
        since: float | None = None,
        plan_id: str | None = None,
        decided_by: str | None = None,
        source: str | None = None,
        attempt_id: str | None = None,
        limit: int | None = None,
    ) -> list[AttemptRecord]:
        """Stored attempts, oldest first, filtered by any of the arguments (`since`: recorded_at >=)."""
        where, params = [], []
        for col, op, val in (
            ("recorded_at", ">=", since),
            ("plan_id", "=", plan_id),
            ("decided_by", "=", decided_by),
            ("source", "=", source),
            ("attempt_id", "=", attempt_id),
        ):
            if val is not None:
                where.append(f"{col} {op} ?")
                params.append(val)
        sql = "SELECT * FROM attempts" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY recorded_at, rowid"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [self._attempt_from_row(r) for r in self._rows(sql, tuple(params))]

    @staticmethod
    def _attempt_from_row(r: dict) -> AttemptRecord:
        outcome = Outcome(
            success=bool(r["success"]),
            reason=Reason(r["reason"]),
            executed=_grasp_from_json(r["executed"]),
            robot_seconds=r["robot_seconds"],
            item_id=r["item_id"],
            details=json.loads(r["details"]),
        )
        return AttemptRecord(
            attempt_id=r["attempt_id"],
            plan_id=r["plan_id"],
            candidate_index=r["candidate_index"],
            cell_id=r["cell_id"],
            grasp=_grasp_from_json(r["grasp"]),
            outcome=outcome,
            decided_by=r["decided_by"],
            model_version=r["model_version"],
            robot_time=r["robot_time"],
            recorded_at=r["recorded_at"],
            patch=_from_npy(r["patch"]),
            features=_from_npy(r["features"]),
            family=r["family"],
            source=r["source"],
            request_id=r["request_id"],
            item=r["item"],
            item_descriptor=_from_npy(r["item_descriptor"]),
        )

    def plan(self, plan_id: str) -> PlanRecord | None:
        """The decision record `plan_id` with all its candidates, or None."""
        rows = self._rows("SELECT * FROM plans WHERE plan_id=?", (plan_id,))
        if not rows:
            return None
        p = rows[0]
        cands = self._rows("SELECT * FROM candidates WHERE plan_id=? ORDER BY idx", (plan_id,))
        has_frame = bool(self._rows("SELECT 1 AS x FROM frames WHERE plan_id=?", (plan_id,)))
        return PlanRecord(
            plan_id=p["plan_id"],
            frame_id=p["frame_id"],
            tote_id=p["tote_id"],
            cell_id=p["cell_id"],
            recorded_at=p["recorded_at"],
            decision=p["decision"],
            reasons=tuple(json.loads(p["reasons"])),
            threshold=p["threshold"],
            scene_ood_sigma=p["scene_ood_sigma"],
            in_distribution=bool(p["in_distribution"]),
            model_version=p["model_version"],
            latency_ms=p["latency_ms"],
            candidates=tuple(
                CandidateRecord(
                    index=c["idx"],
                    grasp=_grasp_from_json(c["grasp"]),
                    analytic_score=c["analytic_score"],
                    learned_score=c["learned_score"],
                    p_success=c["p_success"],
                    ood_score=c["ood_score"],
                    pixel=(c["u"], c["v"]),
                    cluster=c["cluster"],
                    patch=_from_npy(c["patch"]),
                    features=_from_npy(c["features"]),
                )
                for c in cands
            ),
            has_frame=has_frame,
        )

    def frame(self, plan_id: str) -> Frame | None:
        """The frame stored with plan `plan_id` (record_plan(store_frame=True)), or None."""
        rows = self._rows("SELECT frame_id, data FROM frames WHERE plan_id=?", (plan_id,))
        return decode_frame(rows[0]["data"], rows[0]["frame_id"]) if rows else None

    def request(self, request_id: str) -> AssistRequest | None:
        rows = self._rows("SELECT * FROM requests WHERE request_id=?", (request_id,))
        if not rows:
            return None
        r = rows[0]
        return AssistRequest(
            cell_id=r["cell_id"],
            deadline=r["deadline"],
            image_png=bytes(r["image_png"]),
            candidates=tuple(CandidateView(**c) for c in json.loads(r["candidates"])),
            reasons=tuple(json.loads(r["reasons"])),
            priority=r["priority"],
            request_id=r["request_id"],
            created=r["created"],
            context=json.loads(r["context"]),
        )

    def answer(self, request_id: str) -> AssistAnswer | None:
        rows = self._rows("SELECT * FROM answers WHERE request_id=?", (request_id,))
        if not rows:
            return None
        r = rows[0]
        return AssistAnswer(
            request_id=r["request_id"],
            status=r["status"],
            kind=r["kind"],
            candidate_index=r["candidate_index"],
            pixel=None if r["pixel_u"] is None else (r["pixel_u"], r["pixel_v"]),
            associate_id=r["associate_id"],
            answered_at=r["answered_at"],
            note=r["note"],
        )

    def counts(self) -> dict[str, int]:
        """Row counts for metrics and `pickcell ledger stats` (flat ints)."""
        q = {
            "plans": "SELECT count(*) FROM plans",
            "candidates": "SELECT count(*) FROM candidates",
            "frames": "SELECT count(*) FROM frames",
            "attempts": "SELECT count(*) FROM attempts",
            "successes": "SELECT count(*) FROM attempts WHERE success=1",
            "failures": "SELECT count(*) FROM attempts WHERE success=0",
            "by_model": "SELECT count(*) FROM attempts WHERE decided_by='model'",
            "by_associate": "SELECT count(*) FROM attempts WHERE decided_by LIKE 'associate:%'",
            "requests": "SELECT count(*) FROM requests",
            "answers": "SELECT count(*) FROM answers",
            "answered": "SELECT count(*) FROM answers WHERE status='answered'",
            "expired": "SELECT count(*) FROM answers WHERE status='expired'",
            "no_safe_pick": "SELECT count(*) FROM answers WHERE kind='no_safe_pick'",
            "skipped": "SELECT count(*) FROM answers WHERE kind='skip'",
        }
        with self._lock:
            return {k: int(self._conn.execute(sql).fetchone()[0]) for k, sql in q.items()}

    def tote_ids(self) -> list[str]:
        """Every tote this cell planned on, in the order first seen (a restarted cell resumes after them)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT tote_id FROM plans GROUP BY tote_id ORDER BY min(recorded_at), tote_id"
            ).fetchall()
        return [r[0] for r in rows]

    def integrity_check(self) -> list[str]:
        """SQLite's full integrity check; ["ok"] when the file is sound."""
        with self._lock:
            return [r[0] for r in self._conn.execute("PRAGMA integrity_check").fetchall()]

    # --- export ------------------------------------------------------------------------------------

    def export(
        self,
        out_dir: str | Path,
        *,
        since: float | None = None,
        shard_rows: int = 4096,
        weak_negative_weight: float = WEAK_NEGATIVE_WEIGHT,
    ) -> ExportManifest:
        """Write the labeled rows as a training dataset: npz shards plus manifest.json.

        Labels (1.0 = success, 0.0 = failure):
          * every executed attempt is labeled by its outcome, with the observation stored with it (or,
            if none, its plan candidate's patch and features). Attempts that ended for a reason that
            says nothing about the grasp (UNLABELED_REASONS: IK failure, unreachable, invalid, e-stop)
            and attempts with no observation are left out and counted in the manifest;
          * an associate's "no_safe_pick" labels each candidate shown in that request 0.0, source
            "associate" (the request must carry context["plan_id"] to find them);
          * rejected candidates that were never executed are stored in the ledger but are NOT
            labeled and NOT exported: nobody knows whether they would have worked.
        `since` keeps rows committed at or after that unix time (attempts: recorded_at; associate
        rows: when the answer was recorded).

        Each shard holds rows of one observation shape: patches (N, C, S, S) float32, features (N, F)
        float32, gripper (N,) int64 (0 suction, 1 parallel_jaw), label (N,) float32, timestamp (N,)
        float64 unix seconds, robot_time (N,) float64, source/family/decided_by/model_version/cell_id/
        row_id (N,) unicode strings (family "" when unknown), scene_ood_sigma (N,) float64 (NaN when
        unknown), p_success (N,) float64 (the calibrated score at decision time, NaN when unknown).
        Shards are plain npz (load with allow_pickle=False); the manifest holds each shard's sha256.
        A consistent snapshot is read through a separate read-only connection, so a cell can keep
        writing while it exports.
        """
        out_dir = Path(out_dir)
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        if not 0.0 <= float(weak_negative_weight) <= 1.0:
            raise ValueError(f"weak_negative_weight must be in [0, 1], got {weak_negative_weight}")
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise LedgerError(f"export target {out_dir} exists and is not an empty directory")
        out_dir.mkdir(parents=True, exist_ok=True)
        ro = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            ro.execute("BEGIN")  # one read snapshot for the whole export (WAL readers never block writers)
            writer = _ShardWriter(out_dir, shard_rows)
            counts: Counter[str] = Counter()
            for row in _labeled_rows(ro, since, counts, weak_negative_weight):
                writer.add(row)
            writer.flush_all()
            ro.execute("COMMIT")
        finally:
            ro.close()
        shards = tuple(writer.shards)
        rows = sum(s["rows"] for s in shards)
        positives = sum(s["positives"] for s in shards)
        manifest = ExportManifest(
            out_dir=out_dir,
            cell_id=self.cell_id,
            schema_version=self.schema_version,
            rows=rows,
            positives=positives,
            negatives=rows - positives,
            shards=shards,
            counts={
                "since": since,
                "exported_at": self._clock(),
                "weak_negative_weight": float(weak_negative_weight),
                "by_label_kind": dict(writer.by_label_kind),
                "by_source": dict(writer.by_source),
                "by_gripper": dict(writer.by_gripper),
                "by_family": dict(writer.by_family),
                **dict(sorted(counts.items())),
            },
        )
        tmp = out_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
        os.replace(tmp, out_dir / "manifest.json")  # the manifest appears last, and whole
        log.info("exported %d rows (%d shards) from %s to %s", rows, len(shards), self.path, out_dir)
        return manifest


def _resolve_plan(conn: sqlite3.Connection, ref: str | None) -> str | None:
    """A plan reference as stored: a plan id, or a frame id resolved to that frame's latest plan.

    Callers that only kept the Plan (not the id record_plan returned) can still link their attempts
    and requests to its decision record through `plan.frame_id`.
    """
    if ref is None:
        return None
    if conn.execute("SELECT 1 FROM plans WHERE plan_id=?", (ref,)).fetchone():
        return ref
    row = conn.execute(
        "SELECT plan_id FROM plans WHERE frame_id=? ORDER BY recorded_at DESC, rowid DESC LIMIT 1", (ref,)
    ).fetchone()
    return row[0] if row else ref


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _descriptor_list(d: np.ndarray | None) -> list[float] | None:
    """An item descriptor as stored in a plan's clusters JSON (None when the item has none)."""
    if d is None:
        return None
    a = np.asarray(d, dtype=np.float64).reshape(-1)
    return [float(x) for x in a] if np.isfinite(a).all() else None


def _plan_clusters(conn: sqlite3.Connection, plan_id: str) -> list[dict]:
    row = conn.execute("SELECT clusters FROM plans WHERE plan_id=?", (plan_id,)).fetchone()
    return json.loads(row[0]) if row and row[0] else []


def _item_of_candidate(conn: sqlite3.Connection, plan_id: str, idx: int) -> tuple[int | None, bytes | None]:
    """(item index, descriptor .npy bytes) of plan candidate `idx`, from the stored plan."""
    row = conn.execute("SELECT cluster FROM candidates WHERE plan_id=? AND idx=?", (plan_id, idx)).fetchone()
    if row is None or row[0] is None or int(row[0]) < 0:
        return None, None
    k = int(row[0])
    clusters = _plan_clusters(conn, plan_id)
    desc = clusters[k].get("descriptor") if k < len(clusters) else None
    return k, (None if desc is None else _npy(np.asarray(desc, dtype=np.float32)))


def _descriptor_row(d: Any) -> np.ndarray:
    """(ITEM_DESCRIPTOR_DIM,) float32 for the export: the descriptor, or NaN when unknown."""
    if d is None:
        return np.full(ITEM_DESCRIPTOR_DIM, np.nan, np.float32)
    a = _from_npy(d) if isinstance(d, (bytes, memoryview)) else np.asarray(d, dtype=np.float32)
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    if a.size > ITEM_DESCRIPTOR_DIM:
        return np.full(ITEM_DESCRIPTOR_DIM, np.nan, np.float32)  # a newer pickcell's: not readable here
    # An older descriptor version is a prefix of this one: the features it lacks are unknown (NaN).
    return np.concatenate([a, np.full(ITEM_DESCRIPTOR_DIM - a.size, np.nan, np.float32)])


def _context_family(ctx: Any) -> str:
    """The asked item's family a request's context carries (`Controller.item_family`), else ""."""
    fam = ctx.get("family") if isinstance(ctx, dict) else None
    return fam if isinstance(fam, str) else ""


def _labeled_rows(
    conn: sqlite3.Connection, since: float | None, counts: Counter, weak_negative_weight: float
) -> Iterator[dict]:
    """Yield one dict per training row, from a snapshot connection; count what is left out.

    Every answer kind (docs/ledger.md, "Labels"): executed attempts (the model's, an approved
    candidate, a clicked pixel) by their outcome; "no safe pick" as negatives for the asked item's
    shown candidates; candidates on the answered item that the person passed over as weak negatives;
    skip and expiry as nothing (counted).
    """
    t0 = -math.inf if since is None else float(since)
    tote_of: dict[str, str] = {}
    clusters_of: dict[str, list[dict]] = {}

    def tote(plan_id: str | None) -> str:
        if not plan_id:
            return ""
        if plan_id not in tote_of:
            r = conn.execute("SELECT tote_id FROM plans WHERE plan_id=?", (plan_id,)).fetchone()
            tote_of[plan_id] = r[0] if r else ""
        return tote_of[plan_id]

    def plan_descriptor(plan_id: str, k: int) -> np.ndarray:
        if plan_id not in clusters_of:
            clusters_of[plan_id] = _plan_clusters(conn, plan_id)
        cl = clusters_of[plan_id]
        return _descriptor_row(cl[k].get("descriptor") if 0 <= k < len(cl) else None)

    def item_key(plan_id: str | None, item: int | None) -> str:
        return f"{plan_id}:{item}" if plan_id and item is not None and item >= 0 else ""

    cur = conn.execute(
        "SELECT a.attempt_id, a.plan_id, a.candidate_index, a.cell_id, a.recorded_at, a.robot_time,"
        " a.gripper, a.success, a.reason, a.decided_by, a.model_version, a.patch, a.features,"
        " a.family, a.source, a.request_id, a.item, a.item_descriptor,"
        " c.patch AS c_patch, c.features AS c_features, c.p_success, p.scene_ood_sigma"
        " FROM attempts a"
        " LEFT JOIN candidates c ON c.plan_id = a.plan_id AND c.idx = a.candidate_index"
        " LEFT JOIN plans p ON p.plan_id = a.plan_id"
        " WHERE a.recorded_at >= ? ORDER BY a.recorded_at, a.rowid",
        (t0,),
    )
    answered_attempts: list[tuple] = []  # (request_id, attempt_id, plan_id, cidx, item, who, rec_at)
    for r in cur.fetchall():
        (aid, plan_id, cidx, cell, rec_at, robot_t, gripper, success, reason, who, ver, patch, feats, family,
         source, req_id, item, item_desc, c_patch, c_feats, p_success, sigma) = r  # fmt: skip
        counts["attempts_seen"] += 1
        if Reason(reason) in UNLABELED_REASONS:
            counts[f"left_out_reason_{reason}"] += 1
            continue
        if patch is None:
            patch = c_patch
        if feats is None:
            feats = c_feats
        if patch is None or feats is None:
            counts["left_out_no_observation"] += 1
            continue
        if req_id:
            answered_attempts.append((req_id, aid, plan_id, cidx, item, who, rec_at))
        desc = _descriptor_row(item_desc)
        yield {
            "patch": _from_npy(patch),
            "features": _from_npy(feats),
            "gripper": GRIPPER_KINDS.index(gripper),
            "label": 1.0 if success else 0.0,
            "weight": 1.0,
            "label_kind": "outcome",
            "timestamp": rec_at,
            "robot_time": robot_t,
            "source": source,
            "family": family or "",
            "decided_by": who,
            "model_version": ver,
            "cell_id": cell,
            "row_id": aid,
            "plan_id": plan_id or "",  # the scene: rows of one plan share it
            "tote_id": tote(plan_id),  # split by tote: re-plans of one tote are near-duplicates
            "request_id": req_id or "",
            "item": -1 if item is None else int(item),
            "item_key": item_key(plan_id, item),
            "item_descriptor": desc,
            "scene_ood_sigma": _nan(sigma),
            "p_success": _nan(p_success),
        }

    def shown_rows(
        req_id: str,
        plan_id: str,
        views: list[dict],
        keep: Callable[[int, int], bool],
        label_kind: str,
        weight: float,
        who: str,
        rec_at: float,
        cell: str,
        family: str = "",
    ) -> Iterator[dict]:
        """Label-0 rows for the shown candidates `keep(index, cluster)` accepts."""
        plan = conn.execute(
            "SELECT model_version, scene_ood_sigma FROM plans WHERE plan_id=?", (plan_id,)
        ).fetchone()
        ver, sigma = plan
        for view in views:
            k = int(view["index"])
            c = conn.execute(
                "SELECT gripper, patch, features, p_success, cluster FROM candidates"
                " WHERE plan_id=? AND idx=?",
                (plan_id, k),
            ).fetchone()
            if c is None or not keep(k, int(c[4])):
                continue
            if c[1] is None or c[2] is None:
                counts["left_out_no_observation"] += 1
                continue
            yield {
                "patch": _from_npy(c[1]),
                "features": _from_npy(c[2]),
                "gripper": GRIPPER_KINDS.index(c[0]),
                "label": 0.0,
                "weight": weight,
                "label_kind": label_kind,
                "timestamp": rec_at,
                "robot_time": float("nan"),
                "source": "associate",
                "family": family,
                "decided_by": who,
                "model_version": ver,
                "cell_id": cell,
                "row_id": f"{req_id}:{k}",
                "plan_id": plan_id,
                "tote_id": tote(plan_id),
                "request_id": req_id,
                "item": int(c[4]),
                "item_key": item_key(plan_id, int(c[4])),
                "item_descriptor": plan_descriptor(plan_id, int(c[4])),
                "scene_ood_sigma": _nan(sigma),
                "p_success": _nan(c[3]),
            }

    # Every final answer: no_safe_pick labels, the rest counted (skip / expired / cancelled: no label).
    cur = conn.execute(
        "SELECT a.request_id, a.status, a.kind, a.associate_id, a.recorded_at, q.plan_id, q.candidates,"
        " q.cell_id, q.context"
        " FROM answers a LEFT JOIN requests q ON q.request_id = a.request_id"
        " WHERE a.recorded_at >= ? ORDER BY a.recorded_at, a.rowid",
        (t0,),
    )
    for req_id, status, kind, associate, rec_at, plan_id, shown_json, cell, ctx_json in cur.fetchall():
        counts[f"answers_{kind if status == 'answered' else status}"] += 1
        if kind != "no_safe_pick" or status != "answered":
            continue
        if (
            plan_id is None
            or shown_json is None
            or conn.execute("SELECT 1 FROM plans WHERE plan_id=?", (plan_id,)).fetchone() is None
        ):
            counts["left_out_no_safe_pick_unlinked"] += 1
            continue
        ctx = json.loads(ctx_json or "{}")
        item = ctx.get("item")
        if not isinstance(item, int) or isinstance(item, bool):
            # Which item the person judged is unknown: labelling every shown candidate 0 would mark
            # good grasps on other items as unsafe, so nothing is labelled.
            counts["left_out_no_safe_pick_no_item"] += 1
            continue
        yield from shown_rows(
            req_id,
            plan_id,
            json.loads(shown_json),
            lambda _k, cl, it=item: cl == it,
            "no_safe_pick",
            1.0,
            f"associate:{associate or 'unknown'}",
            rec_at,
            cell,
            _context_family(ctx),
        )
    # Candidates on the answered item that the person passed over: weak negatives.
    if weak_negative_weight > 0:
        for req_id, _aid, a_plan, cidx, item, who, rec_at in answered_attempts:
            q = conn.execute(
                "SELECT plan_id, candidates, cell_id, context FROM requests WHERE request_id=?", (req_id,)
            ).fetchone()
            if q is None or q[0] is None or item is None or q[0] != a_plan:
                counts["left_out_passed_over_unlinked"] += 1
                continue
            chosen = -1 if cidx is None else int(cidx)
            yield from shown_rows(
                req_id,
                q[0],
                json.loads(q[1]),
                lambda k, cl, it=item, ch=chosen: cl == it and k != ch,
                "passed_over",
                float(weak_negative_weight),
                who,
                rec_at,
                q[2],
                _context_family(json.loads(q[3] or "{}")),
            )


_STR_COLUMNS = (
    "source",
    "family",
    "decided_by",
    "model_version",
    "cell_id",
    "row_id",
    "plan_id",
    "tote_id",
    "request_id",
    "item_key",
    "label_kind",
)
_F64_COLUMNS = ("timestamp", "robot_time", "scene_ood_sigma", "p_success")


class _ShardWriter:
    """Buffers rows per observation shape and writes a shard each time a buffer is full."""

    def __init__(self, out_dir: Path, shard_rows: int) -> None:
        self.out_dir = out_dir
        self.shard_rows = shard_rows
        self.buffers: dict[tuple, list[dict]] = {}
        self.shards: list[dict] = []
        self.by_source: Counter[str] = Counter()
        self.by_gripper: Counter[str] = Counter()
        self.by_family: Counter[str] = Counter()
        self.by_label_kind: Counter[str] = Counter()

    def add(self, row: dict) -> None:
        key = (row["patch"].shape, row["features"].shape)
        buf = self.buffers.setdefault(key, [])
        buf.append(row)
        self.by_source[row["source"]] += 1
        self.by_gripper[GRIPPER_KINDS[row["gripper"]]] += 1
        self.by_family[row["family"] or "unknown"] += 1
        self.by_label_kind[row["label_kind"]] += 1
        if len(buf) >= self.shard_rows:
            self._write(key)

    def flush_all(self) -> None:
        for key in list(self.buffers):
            if self.buffers[key]:
                self._write(key)

    def _write(self, key: tuple) -> None:
        rows = self.buffers[key]
        self.buffers[key] = []
        arrays: dict[str, np.ndarray] = {
            "patches": np.stack([r["patch"] for r in rows]).astype(np.float32, copy=False),
            "features": np.stack([r["features"] for r in rows]).astype(np.float32, copy=False),
            "gripper": np.array([r["gripper"] for r in rows], dtype=np.int64),
            "label": np.array([r["label"] for r in rows], dtype=np.float32),
            "weight": np.array([r["weight"] for r in rows], dtype=np.float32),
            "item": np.array([r["item"] for r in rows], dtype=np.int64),
            "item_descriptor": np.stack([r["item_descriptor"] for r in rows]).astype(np.float32, copy=False),
        }
        for k in _F64_COLUMNS:
            arrays[k] = np.array([r[k] for r in rows], dtype=np.float64)
        for k in _STR_COLUMNS:
            arrays[k] = np.array([str(r[k]) for r in rows], dtype=np.str_)
        name = f"shard-{len(self.shards):05d}.npz"
        path = self.out_dir / name
        with open(path, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.shards.append(
            {
                "file": name,
                "rows": len(rows),
                "positives": int(arrays["label"].sum()),
                "weight": float(arrays["weight"].sum()),
                "sha256": digest,
                "bytes": path.stat().st_size,
                "patch_shape": list(key[0]),
                "feature_dim": int(key[1][0]),
            }
        )
