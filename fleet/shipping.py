"""Ledger rows from every cell to the learner, exactly once, resumable after either side restarts.

The cell side (`LedgerShipper`, a thread in the cell or `pickcell fleet ship`) reads its SQLite ledger
through its own read-only connection and sends new rows in batches over a DEALER socket; the learner
side (`LedgerIntake`, `pickcell fleet intake`) keeps one replica ledger per cell,
`<out>/<site>/<cell>.sqlite`, in the same schema, so the learner reads it like any cell's ledger.

Exactly once: the ledger only ever inserts, so each table's SQLite rowid grows. The intake keeps, per
cell and table, the highest source rowid it holds (`meta` keys `ship.cursor.<table>` in the replica)
and writes a batch's rows and the new cursors in one transaction (WAL, synchronous=FULL) before it
acknowledges. A cell asks for its cursors whenever it (re)connects or an acknowledgement is late, and
sends from there: a batch the intake already holds is acknowledged without writing (only rows past the
cursor are inserted), and a batch that starts past the cursor (rows would be skipped) is refused with
the cursors to resend from. Neither side needs to have been shut down cleanly.

A cell keeps working while the learner is down: shipping is its own thread, it only reads the ledger,
and it retries with backoff (0.5 s doubling to 16 s). Rows keep `cell_id`; the replica records the
site in `meta` (key `site`) and in its path.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from fleet.net import Allowlist, ClientSecurity, ServerSecurity, WireError, pack, peer_name, unpack
from hitl.ledger import SCHEMA_VERSION, Ledger

log = logging.getLogger(__name__)

# Parents before children, so a replica is whole at every acknowledged point; tables a newer ledger
# adds are shipped after these, in name order.
TABLE_ORDER = ("plans", "candidates", "frames", "attempts", "requests", "answers")
SKIP_TABLES = frozenset({"meta", "sqlite_sequence"})
CURSOR_PREFIX = "ship.cursor."


def _tables(conn: sqlite3.Connection) -> list[str]:
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    names -= SKIP_TABLES
    names = {n for n in names if not n.startswith("sqlite_")}
    return [t for t in TABLE_ORDER if t in names] + sorted(names - set(TABLE_ORDER))


@dataclass(frozen=True)
class ShipConfig:
    ledger: Path  # the cell's ledger file
    cell_id: str
    endpoint: str  # the intake's ROUTER endpoint
    keys_dir: Path | None  # the cell's fleet keys folder (<cell>.key_secret, fleet.key)
    site: str = "site-1"
    insecure: bool = False
    batch_rows: int = 200  # rows per table per batch at most
    batch_bytes: int = 2 * 1024 * 1024  # a batch stops growing past this many bytes (one row at least)
    ack_timeout_s: float = 5.0  # no answer for this long: ask for the cursors again, seconds
    idle_s: float = 1.0  # nothing new: look again after this long, seconds


class LedgerShipper:
    def __init__(self, config: ShipConfig) -> None:
        self.config = config
        self.cursor: dict[str, int] | None = None  # the intake's cursors, as last acknowledged
        self.shipped_rows = 0
        self.batches = 0
        self.last_error = ""
        self._halt = threading.Event()
        self._finishing = threading.Event()  # stop once nothing is left to ship
        self._thread: threading.Thread | None = None
        self._batch_id = 0

    def start(self) -> LedgerShipper:
        self._thread = threading.Thread(target=self.run, name="ledger-shipper", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop; with `drain_s`, first keep shipping for up to that long until nothing is left."""
        if drain_s > 0 and self._thread is not None:
            self._finishing.set()
            self._thread.join(drain_s)
        self._halt.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def pending_rows(self) -> int | None:
        """Rows the intake does not hold yet (None before the first contact)."""
        if self.cursor is None:
            return None
        with self._reader() as conn:
            return sum(
                conn.execute(
                    f'SELECT count(*) FROM "{t}" WHERE rowid > ?', (self.cursor.get(t, 0),)
                ).fetchone()[0]
                for t in _tables(conn)
            )

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection of our own: shipping never writes to the cell's ledger."""
        uri = f"file:{Path(self.config.ledger).resolve()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()

    def _socket(self, ctx: zmq.Context) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        ClientSecurity(self.config.keys_dir, self.config.cell_id, self.config.insecure).apply(s)
        s.connect(self.config.endpoint)
        return s

    def _ask(self, sock: zmq.Socket, body: dict[str, Any]) -> dict[str, Any] | None:
        self._batch_id += 1
        body = {**body, "id": self._batch_id}
        sock.send(pack(body))
        end = time.monotonic() + self.config.ack_timeout_s
        while not self._halt.is_set():
            left = end - time.monotonic()
            if left <= 0 or not sock.poll(int(min(left, 0.2) * 1000) + 1):
                if left <= 0:
                    return None
                continue
            try:
                reply = unpack(sock.recv())
            except WireError:
                continue
            if reply.get("id") == self._batch_id:  # a late answer to an earlier request is dropped
                return reply
        return None

    def run(self) -> None:
        cfg = self.config
        ctx = zmq.Context.instance()
        sock = self._socket(ctx)
        backoff = 0.5
        try:
            while not self._halt.is_set():
                if self.cursor is None:
                    reply = self._ask(
                        sock, {"t": "hello", "cell": cfg.cell_id, "site": cfg.site, "schema": SCHEMA_VERSION}
                    )
                    if reply is None or reply["t"] != "cursor":
                        self.last_error = (
                            "learner not answering" if reply is None else str(reply.get("error"))
                        )
                        log.warning(
                            "ledger shipping %s: %s; retrying in %.1f s",
                            cfg.cell_id,
                            self.last_error,
                            backoff,
                        )
                        # A fresh socket: the old one may hold requests for a peer that is gone.
                        sock.close(0)
                        sock = self._socket(ctx)
                        self._halt.wait(backoff)
                        backoff = min(backoff * 2, 16.0)
                        continue
                    self.cursor = {k: int(v) for k, v in reply["cursor"].items()}
                    backoff = 0.5
                batch = self._read_batch(self.cursor)
                if batch is None:
                    if self._finishing.is_set():
                        break  # everything the ledger held is at the learner
                    self._halt.wait(cfg.idle_s)
                    continue
                reply = self._ask(sock, {"t": "batch", "cell": cfg.cell_id, "site": cfg.site, **batch})
                if reply is None or reply["t"] not in ("ack", "cursor"):
                    self.last_error = "no acknowledgement" if reply is None else str(reply.get("error"))
                    self.cursor = None  # ask where the intake stands before sending anything else
                    continue
                new = {k: int(v) for k, v in reply["cursor"].items()}
                if reply["t"] == "ack":
                    self.shipped_rows += sum(max(0, new.get(t, 0) - self.cursor.get(t, 0)) for t in new)
                    self.batches += 1
                self.cursor = new
        finally:
            sock.close(0)

    def _read_batch(self, cursor: dict[str, int]) -> dict[str, Any] | None:
        cfg = self.config
        rows: dict[str, list[dict[str, Any]]] = {}
        frm: dict[str, int] = {}
        to: dict[str, int] = {}
        budget = cfg.batch_bytes
        with self._reader() as conn:
            conn.execute("BEGIN")  # one read snapshot for every table
            try:
                for t in _tables(conn):
                    start = cursor.get(t, 0)
                    cur = conn.execute(
                        f'SELECT rowid AS _rowid, * FROM "{t}" WHERE rowid > ? ORDER BY rowid LIMIT ?',
                        (start, cfg.batch_rows),
                    )
                    cols = [d[0] for d in cur.description]
                    out = []
                    for r in cur:
                        row = dict(zip(cols, r, strict=True))
                        size = sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in r)
                        if out and size > budget:
                            break
                        if not out and rows and size > budget:
                            break  # this table's rows go in the next batch
                        budget -= size
                        out.append(row)
                    if out:
                        rows[t] = out
                        frm[t] = start
                        to[t] = out[-1]["_rowid"]
                    if budget <= 0:
                        break
            finally:
                conn.execute("COMMIT")
        if not rows:
            return None
        return {"from": frm, "to": to, "rows": rows}


# --- the learner's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IntakeConfig:
    out_dir: Path  # replicas go to <out>/<site>/<cell>.sqlite
    bind: str = "tcp://127.0.0.1:5575"
    keys_dir: Path | None = None  # the fleet's keys folder (fleet.key_secret, allowed/)
    insecure: bool = False


class LedgerIntake:
    def __init__(self, config: IntakeConfig) -> None:
        self.config = config
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self._conns: dict[str, sqlite3.Connection] = {}
        self._halt = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.endpoint = ""
        self.rows_written = 0
        self._lock = threading.Lock()  # replica connections: one message at a time

    def start(self) -> LedgerIntake:
        self._thread = threading.Thread(target=self.run, name="ledger-intake", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        return self

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def replica_path(self, site: str, cell: str) -> Path:
        for s in (site, cell):
            if not s or "/" in s or "\\" in s or s.startswith("."):
                raise ValueError(f"site/cell name {s!r} is not usable as a file name")
        return self.out / site / f"{cell}.sqlite"

    def _replica(self, site: str, cell: str) -> sqlite3.Connection:
        key = f"{site}/{cell}"
        conn = self._conns.get(key)
        if conn is None:
            path = self.replica_path(site, cell)
            path.parent.mkdir(parents=True, exist_ok=True)
            Ledger(path, cell_id=cell).close()  # creates or migrates the schema; refuses another cell's file
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=OFF")  # rows arrive table by table
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('site', ?)", (site,))
            self._conns[key] = conn
        return conn

    def cursor(self, conn: sqlite3.Connection) -> dict[str, int]:
        return {
            k.removeprefix(CURSOR_PREFIX): int(v)
            for k, v in conn.execute("SELECT key, value FROM meta WHERE key LIKE ?", (CURSOR_PREFIX + "%",))
        }

    def handle(self, name: str, msg: dict[str, Any]) -> dict[str, Any]:
        """One message from the cell known by key as `name` ('' without CURVE) -> the reply."""
        with self._lock:
            return self._handle(name, msg)

    def _handle(self, name: str, msg: dict[str, Any]) -> dict[str, Any]:
        t = msg["t"]
        cell = name or str(msg.get("cell", ""))
        site = str(msg.get("site", ""))
        rid = msg.get("id")
        if name and msg.get("cell") not in (None, name):
            return {
                "t": "error",
                "id": rid,
                "error": f"this key belongs to {name!r}, not {msg.get('cell')!r}",
            }
        if int(msg.get("schema", SCHEMA_VERSION)) > SCHEMA_VERSION:
            return {
                "t": "error",
                "id": rid,
                "error": f"ledger schema {msg.get('schema')} is newer than the "
                f"learner's {SCHEMA_VERSION}: upgrade the learner",
            }
        try:
            conn = self._replica(site, cell)
        except (ValueError, Exception) as exc:  # a bad name, or a replica file that is not a ledger
            return {"t": "error", "id": rid, "error": f"cannot open the replica of {site}/{cell}: {exc}"}
        if t == "hello":
            return {"t": "cursor", "id": rid, "cursor": self.cursor(conn)}
        if t != "batch":
            return {"t": "error", "id": rid, "error": f"unknown message type {t!r}"}
        try:
            return {"t": "ack", "id": rid, "cursor": self._apply(conn, msg)}
        except _Gap as gap:
            return {"t": "cursor", "id": rid, "cursor": gap.cursor}
        except (sqlite3.Error, KeyError, TypeError, ValueError) as exc:
            log.error("ledger intake %s/%s: batch refused: %s", site, cell, exc)
            return {"t": "error", "id": rid, "error": f"batch refused: {exc}"}

    def _apply(self, conn: sqlite3.Connection, msg: dict[str, Any]) -> dict[str, int]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = self.cursor(conn)
            for t, start in msg["from"].items():
                if int(start) > cur.get(t, 0):
                    raise _Gap(cur)
            known = set(_tables(conn))
            for t, rows in msg["rows"].items():
                if t not in known:
                    raise ValueError(f"table {t!r} is not in the learner's ledger schema")
                have = cur.get(t, 0)
                fresh = [r for r in rows if int(r["_rowid"]) > have]
                if fresh:
                    cols = [c for c in fresh[0] if c != "_rowid"]
                    sql = f'INSERT INTO "{t}" ({", ".join(cols)}) VALUES ({", ".join("?" * len(cols))})'
                    conn.executemany(sql, [tuple(r[c] for c in cols) for r in fresh])
                    self.rows_written += len(fresh)
                top = max(have, int(msg["to"][t]))
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (CURSOR_PREFIX + t, str(top))
                )
                cur[t] = top
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return cur

    def run(self) -> None:
        cfg = self.config
        ctx = zmq.Context()
        sec = ServerSecurity(cfg.keys_dir, cfg.insecure)
        auth = None if cfg.insecure else Allowlist(ctx, Path(cfg.keys_dir or ".") / "allowed")
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sec.apply(sock, None if cfg.insecure else sec.own())
        try:
            sock.bind(cfg.bind)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._ready.set()
            while not self._halt.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart(copy=False)
                if len(frames) != 2:
                    continue
                name = peer_name(frames[1], cfg.insecure)
                try:
                    msg = unpack(frames[1].bytes)
                except WireError as exc:
                    sock.send_multipart([frames[0].bytes, pack({"t": "error", "error": str(exc)})])
                    continue
                sock.send_multipart([frames[0].bytes, pack(self.handle(name, msg))])
        finally:
            sock.close(0)
            if auth is not None:
                auth.stop()
            with self._lock:
                for c in self._conns.values():
                    c.close()
            ctx.term()


class _Gap(Exception):
    def __init__(self, cursor: dict[str, int]) -> None:
        super().__init__("batch starts past the cursor")
        self.cursor = cursor


def replicas(out_dir: str | Path) -> list[Path]:
    """Every replica ledger under an intake's folder (for the learner)."""
    return sorted(p for p in Path(out_dir).glob("*/*.sqlite") if not p.name.startswith("."))
