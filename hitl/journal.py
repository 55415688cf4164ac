"""The broker's journal: every accepted request and every final state, in SQLite (WAL, synchronous=FULL).

The broker writes here *before* it acknowledges anything (Titanic, rfc 9: persist, then reply), and it
groups all the writes of one pass of its event loop into one transaction so that one fsync covers many
messages. After a crash the journal is the truth: requests without a final state go back to the queue,
final states not yet delivered to their cell are delivered again.

Each request has exactly one final state: the `requests.state` column moves from 'queued' to one of
'answered' | 'expired' | 'cancelled' only through `finish`, whose UPDATE is guarded by `state='queued'`,
and the answer row's primary key is the request id.
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id   TEXT PRIMARY KEY,
    cell_id      TEXT NOT NULL,
    submitted_by TEXT NOT NULL,     -- authenticated identity of the submitting connection
    deadline     REAL NOT NULL,     -- unix s
    priority     INTEGER NOT NULL,
    received_at  REAL NOT NULL,     -- unix s, broker clock
    state        TEXT NOT NULL CHECK (state IN ('queued', 'answered', 'expired', 'cancelled')),
    body         BLOB NOT NULL      -- msgpack of AssistRequest.to_wire()
);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state);
CREATE TABLE IF NOT EXISTS answers (
    request_id      TEXT PRIMARY KEY REFERENCES requests(request_id),
    cell_id         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('answered', 'expired', 'cancelled')),
    kind            TEXT,
    candidate_index INTEGER,
    pixel_u         INTEGER,
    pixel_v         INTEGER,
    associate_id    TEXT,           -- authenticated identity (CURVE key name) of who answered
    answered_at     REAL NOT NULL,  -- unix s
    note            TEXT NOT NULL DEFAULT '',
    delivered_at    REAL            -- unix s when the cell confirmed receipt; NULL = deliver again
);
CREATE INDEX IF NOT EXISTS answers_undelivered ON answers(cell_id) WHERE delivered_at IS NULL;
"""


@dataclass(frozen=True)
class StoredRequest:
    request_id: str
    cell_id: str
    deadline: float
    priority: int
    received_at: float
    state: str
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
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._in_tx = False

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

    def get(self, request_id: str) -> StoredRequest | None:
        row = self.db.execute(
            "SELECT request_id, cell_id, deadline, priority, received_at, state, body "
            "FROM requests WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        return _row_to_request(row) if row else None

    def add(self, request: dict[str, Any], submitted_by: str, received_at: float) -> bool:
        """Insert a new request; False (and nothing written) if the id exists already."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO requests "
            "(request_id, cell_id, submitted_by, deadline, priority, received_at, state, body) "
            "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
            (
                request["request_id"],
                request["cell_id"],
                submitted_by,
                float(request["deadline"]),
                int(request.get("priority", 0)),
                received_at,
                msgpack.packb(request, use_bin_type=True),
            ),
        )
        return cur.rowcount == 1

    def open_requests(self) -> list[StoredRequest]:
        rows = self.db.execute(
            "SELECT request_id, cell_id, deadline, priority, received_at, state, body "
            "FROM requests WHERE state = 'queued' ORDER BY received_at"
        ).fetchall()
        return [_row_to_request(r) for r in rows]

    def finish(self, request_id: str, answer: dict[str, Any]) -> bool:
        """Give a queued request its final state (answer = AssistAnswer wire dict). False if already final."""
        status = answer["status"]
        if status not in FINAL_STATES:
            raise ValueError(f"not a final state: {status!r}")
        cur = self.db.execute(
            "UPDATE requests SET state = ? WHERE request_id = ? AND state = ?", (status, request_id, QUEUED)
        )
        if cur.rowcount != 1:
            return False
        cell_id = self.db.execute(
            "SELECT cell_id FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()[0]
        px = answer.get("pixel")
        self.db.execute(
            "INSERT INTO answers (request_id, cell_id, status, kind, candidate_index, pixel_u, pixel_v, "
            "associate_id, answered_at, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                request_id,
                cell_id,
                status,
                answer.get("kind"),
                answer.get("candidate_index"),
                px[0] if px else None,
                px[1] if px else None,
                answer.get("associate_id"),
                float(answer.get("answered_at") or time.time()),
                answer.get("note", ""),
            ),
        )
        return True

    # ---- answers ----

    def answer(self, request_id: str) -> dict[str, Any] | None:
        row = self.db.execute(_ANSWER_SELECT + " WHERE request_id = ?", (request_id,)).fetchone()
        return _row_to_answer(row) if row else None

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
                "WHERE request_id = ? AND cell_id = ? AND delivered_at IS NULL",
                (when, rid, cell_id),
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


_ANSWER_SELECT = (
    "SELECT request_id, status, kind, candidate_index, pixel_u, pixel_v, associate_id, answered_at, note, "
    "cell_id FROM answers"
)


def _row_to_request(row: tuple) -> StoredRequest:
    return StoredRequest(
        request_id=row[0],
        cell_id=row[1],
        deadline=row[2],
        priority=row[3],
        received_at=row[4],
        state=row[5],
        request=msgpack.unpackb(row[6], raw=False),
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
    }
