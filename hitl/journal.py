"""The broker's journal: every accepted request and every final state, in SQLite (WAL, synchronous=FULL).

The broker writes here *before* it acknowledges anything (Titanic, rfc 9: persist, then reply), and it
groups all the writes of one pass of its event loop into one transaction so that one fsync covers many
messages. After a crash the journal is the truth: requests without a final state go back to the queue
(a request an associate held stays with that associate if it reconnects in time), final states not yet
delivered to their cell are delivered again.

Request ids live in their cell's namespace: the key of a request is (cell_id, request_id), so two cells
may use the same id without meeting. Each request has exactly one final state: `requests.state` moves
from 'queued' to one of 'answered' | 'expired' | 'cancelled' only through `finish`, whose UPDATE is
guarded by `state='queued'`, and the answer row's primary key is the request's.

Retention: `prune` deletes final states (request + answer) delivered more than `retention_s` ago, and
undelivered ones older than `undelivered_retention_s`; nothing without a final state is ever deleted.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from hitl.protocol import FINAL_STATES, QUEUED

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # PRAGMA user_version; 0 = the first schema (request_id alone was the key)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    cell_id      TEXT NOT NULL,     -- the submitting cell (= its key name with CURVE): the id's namespace
    request_id   TEXT NOT NULL,     -- chosen by the cell; unique within the cell
    submitted_by TEXT NOT NULL,     -- authenticated identity of the submitting connection
    deadline     REAL NOT NULL,     -- unix s
    priority     INTEGER NOT NULL,
    received_at  REAL NOT NULL,     -- unix s, broker clock
    state        TEXT NOT NULL CHECK (state IN ('queued', 'answered', 'expired', 'cancelled')),
    holder       TEXT,              -- associate/console key name holding it (kept at the final state)
    body         BLOB NOT NULL,     -- msgpack of AssistRequest.to_wire()
    PRIMARY KEY (cell_id, request_id)
);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state);
CREATE TABLE IF NOT EXISTS answers (
    cell_id         TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('answered', 'expired', 'cancelled')),
    kind            TEXT,
    candidate_index INTEGER,
    pixel_u         INTEGER,
    pixel_v         INTEGER,
    gripper         TEXT,           -- for 'point': the tool the person chose (NULL = the cell chooses)
    associate_id    TEXT,           -- the person who answered (key name, or a console's on_behalf_of)
    via             TEXT,           -- the console's key name when a console answered; else NULL
    answered_at     REAL NOT NULL,  -- unix s
    note            TEXT NOT NULL DEFAULT '',
    delivered_at    REAL,           -- unix s when the cell confirmed receipt; NULL = deliver again
    PRIMARY KEY (cell_id, request_id),
    FOREIGN KEY (cell_id, request_id) REFERENCES requests(cell_id, request_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS answers_undelivered ON answers(cell_id) WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS answers_delivered_at ON answers(delivered_at);
"""

# From the first schema (request_id PRIMARY KEY, no holder, no via): same rows, new keys.
_MIGRATE_FROM_0 = (
    """
ALTER TABLE answers RENAME TO answers_v0;
ALTER TABLE requests RENAME TO requests_v0;
DROP INDEX IF EXISTS requests_state;
DROP INDEX IF EXISTS answers_undelivered;
"""
    + SCHEMA
    + """
INSERT INTO requests (cell_id, request_id, submitted_by, deadline, priority, received_at, state, holder, body)
    SELECT cell_id, request_id, submitted_by, deadline, priority, received_at, state, NULL, body
    FROM requests_v0;
INSERT INTO answers (cell_id, request_id, status, kind, candidate_index, pixel_u, pixel_v, gripper,
                     associate_id, via, answered_at, note, delivered_at)
    SELECT cell_id, request_id, status, kind, candidate_index, pixel_u, pixel_v, NULL, associate_id, NULL,
           answered_at, note, delivered_at FROM answers_v0;
DROP TABLE answers_v0;
DROP TABLE requests_v0;
"""
)


@dataclass(frozen=True)
class StoredRequest:
    request_id: str
    cell_id: str
    deadline: float
    priority: int
    received_at: float
    state: str
    holder: str | None
    request: dict[str, Any]  # AssistRequest wire dict


class Journal:
    """One SQLite file; used only from the broker's event-loop thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per loop pass.
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"journal {self.path}: could not switch to WAL mode (got {mode!r})")
        # FULL: the WAL is fsynced at every commit, so an acknowledged write survives power loss too.
        self.db.execute("PRAGMA synchronous=FULL")
        self._open_schema()
        self.db.execute("PRAGMA foreign_keys=ON")
        self._in_tx = False

    def _open_schema(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self.db.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name='requests'"
        ).fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"journal {self.path} has schema {version}, newer than this broker's {SCHEMA_VERSION}; "
                "run a newer pickcell (the file is left untouched)"
            )
        if version == SCHEMA_VERSION or not has_tables:
            self.db.executescript(SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
            return
        # version 0 with tables: the first schema. Migrate in one transaction (all or nothing).
        log.warning("journal %s: migrating schema 0 -> %d (request ids per cell)", self.path, SCHEMA_VERSION)
        self.db.execute("PRAGMA foreign_keys=OFF")
        try:
            self.db.executescript(
                "BEGIN IMMEDIATE;" + _MIGRATE_FROM_0 + f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
        except sqlite3.Error:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes; commit (and fsync) once at the end. Nested use joins the outer transaction."""
        if self._in_tx:
            yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._in_tx = False

    def mark(self) -> None:
        """Savepoint inside the current transaction (one message's writes)."""
        self.db.execute("SAVEPOINT message")

    def keep(self) -> None:
        self.db.execute("RELEASE message")

    def undo(self) -> None:
        self.db.execute("ROLLBACK TO message")
        self.db.execute("RELEASE message")

    # ---- requests ----

    def get(self, cell_id: str, request_id: str) -> StoredRequest | None:
        row = self.db.execute(
            _REQUEST_SELECT + " WHERE cell_id = ? AND request_id = ?", (cell_id, request_id)
        ).fetchone()
        return _row_to_request(row) if row else None

    def add(self, request: dict[str, Any], submitted_by: str, received_at: float) -> bool:
        """Insert a new request; False (and nothing written) if the cell already used that id."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO requests "
            "(cell_id, request_id, submitted_by, deadline, priority, received_at, state, holder, body) "
            "VALUES (?, ?, ?, ?, ?, ?, 'queued', NULL, ?)",
            (
                request["cell_id"],
                request["request_id"],
                submitted_by,
                float(request["deadline"]),
                int(request.get("priority", 0) or 0),
                received_at,
                msgpack.packb(request, use_bin_type=True),
            ),
        )
        return cur.rowcount == 1

    def set_holder(self, cell_id: str, request_id: str, holder: str | None) -> None:
        """Who holds a queued request now (None = waiting); survives a broker restart."""
        self.db.execute(
            "UPDATE requests SET holder = ? WHERE cell_id = ? AND request_id = ? AND state = 'queued'",
            (holder, cell_id, request_id),
        )

    def open_requests(self) -> list[StoredRequest]:
        rows = self.db.execute(_REQUEST_SELECT + " WHERE state = 'queued' ORDER BY received_at").fetchall()
        return [_row_to_request(r) for r in rows]

    def finish(self, cell_id: str, request_id: str, answer: dict[str, Any]) -> bool:
        """Give a queued request its final state (answer = AssistAnswer wire dict). False if already final."""
        status = answer["status"]
        if status not in FINAL_STATES:
            raise ValueError(f"not a final state: {status!r}")
        cur = self.db.execute(
            "UPDATE requests SET state = ? WHERE cell_id = ? AND request_id = ? AND state = ?",
            (status, cell_id, request_id, QUEUED),
        )
        if cur.rowcount != 1:
            return False
        px = answer.get("pixel")
        self.db.execute(
            "INSERT INTO answers (cell_id, request_id, status, kind, candidate_index, pixel_u, pixel_v, "
            "gripper, associate_id, via, answered_at, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cell_id,
                request_id,
                status,
                answer.get("kind"),
                answer.get("candidate_index"),
                px[0] if px else None,
                px[1] if px else None,
                answer.get("gripper"),
                answer.get("associate_id"),
                answer.get("via"),
                float(answer.get("answered_at") or time.time()),
                answer.get("note", ""),
            ),
        )
        return True

    # ---- answers ----

    def answer(self, cell_id: str, request_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            _ANSWER_SELECT + " WHERE cell_id = ? AND request_id = ?", (cell_id, request_id)
        ).fetchone()
        return _row_to_answer(row) if row else None

    def finished_by(self, who: str, request_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(cell_id, answer) of final requests with this id that `who` held or answered (directly or via)."""
        rows = self.db.execute(
            "SELECT a.request_id, a.status, a.kind, a.candidate_index, a.pixel_u, a.pixel_v, a.associate_id, "
            "a.answered_at, a.note, a.via, a.gripper, a.cell_id "
            "FROM answers a JOIN requests r USING (cell_id, request_id) WHERE a.request_id = ? "
            "AND (r.holder = ? OR (a.associate_id = ? AND a.via IS NULL) OR a.via = ?)",
            (request_id, who, who, who),
        ).fetchall()
        return [(r[-1], _row_to_answer(r)) for r in rows]

    def undelivered(self, cell_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(cell_id, answer wire dict) of final states the cell has not confirmed, oldest first."""
        sql = _ANSWER_SELECT + " WHERE delivered_at IS NULL"
        params: tuple = ()
        if cell_id is not None:
            sql += " AND cell_id = ?"
            params = (cell_id,)
        rows = self.db.execute(sql + " ORDER BY answered_at", params).fetchall()
        return [(r[-1], _row_to_answer(r)) for r in rows]

    def mark_delivered(self, request_ids: list[str], cell_id: str, when: float) -> int:
        n = 0
        for rid in request_ids:
            n += self.db.execute(
                "UPDATE answers SET delivered_at = ? "
                "WHERE cell_id = ? AND request_id = ? AND delivered_at IS NULL",
                (when, cell_id, rid),
            ).rowcount
        return n

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (QUEUED, *FINAL_STATES)}
        for state, n in self.db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state"):
            out[state] = n
        out["undelivered"] = self.db.execute(
            "SELECT COUNT(*) FROM answers WHERE delivered_at IS NULL"
        ).fetchone()[0]
        return out

    # ---- retention ----

    def prune(self, now: float, retention_s: float, undelivered_retention_s: float) -> int:
        """Delete final states delivered more than retention_s ago, and undelivered ones answered more than
        undelivered_retention_s ago (their cell never came back). Returns how many requests went.
        Queued requests are never deleted. Call inside a transaction."""
        keys = self.db.execute(
            "SELECT cell_id, request_id FROM answers WHERE (delivered_at IS NOT NULL AND delivered_at < ?) "
            "OR (delivered_at IS NULL AND answered_at < ?)",
            (now - retention_s, now - undelivered_retention_s),
        ).fetchall()
        for cell_id, rid in keys:
            self.db.execute("DELETE FROM answers WHERE cell_id = ? AND request_id = ?", (cell_id, rid))
            self.db.execute(
                "DELETE FROM requests WHERE cell_id = ? AND request_id = ? AND state != 'queued'",
                (cell_id, rid),
            )
        return len(keys)


_REQUEST_SELECT = (
    "SELECT request_id, cell_id, deadline, priority, received_at, state, holder, body FROM requests"
)
_ANSWER_SELECT = (
    "SELECT request_id, status, kind, candidate_index, pixel_u, pixel_v, associate_id, answered_at, note, "
    "via, gripper, cell_id FROM answers"
)


def _row_to_request(row: tuple) -> StoredRequest:
    return StoredRequest(
        request_id=row[0],
        cell_id=row[1],
        deadline=row[2],
        priority=row[3],
        received_at=row[4],
        state=row[5],
        holder=row[6],
        request=msgpack.unpackb(row[7], raw=False),
    )


def _row_to_answer(row: tuple) -> dict[str, Any]:
    return {
        "request_id": row[0],
        "status": row[1],
        "kind": row[2],
        "candidate_index": row[3],
        "pixel": [row[4], row[5]] if row[4] is not None else None,
        "associate_id": row[6],
        "answered_at": row[7],
        "note": row[8],
        "via": row[9],
        "gripper": row[10],
    }
