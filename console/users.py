"""Associates' accounts for the web console: names and argon2id password hashes in a small SQLite file.

Only hashes are stored (argon2-cffi's PasswordHasher: argon2id, its default cost). The name is the
identity the console sends to the broker as `on_behalf_of`, so the ledger records it.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024  # argon2 takes any length; this bounds the work one sign-in can cause


class UserError(ValueError):
    """A bad name or password, or a user that does (not) exist; the message says which."""


@dataclass(frozen=True)
class User:
    name: str
    created: float  # unix s


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(
            f"invalid user name {name!r}: 1-64 characters, letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise UserError(f"a password needs {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")
    return password


class UserStore:
    """users(name, hash, created) in SQLite (WAL). Safe to use from several threads."""

    def __init__(self, path: str | Path, hasher: PasswordHasher | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._hasher = hasher or PasswordHasher()
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS users "
            "(name TEXT PRIMARY KEY, hash TEXT NOT NULL, created REAL NOT NULL)"
        )
        self._dummy: str | None = None  # made on first use (one argon2 hash costs ~0.1-0.5 s)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(self, name: str, password: str) -> User:
        check_name(name)
        check_password(password)
        h = self._hasher.hash(password)
        now = time.time()
        with self._lock:
            try:
                self._conn.execute("INSERT INTO users (name, hash, created) VALUES (?,?,?)", (name, h, now))
            except sqlite3.IntegrityError:
                raise UserError(f"user {name!r} exists already (remove it first to reset)") from None
        return User(name, now)

    def remove(self, name: str) -> None:
        check_name(name)
        with self._lock:
            cur = self._conn.execute("DELETE FROM users WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise UserError(f"no user {name!r}")

    def list(self) -> list[User]:
        with self._lock:
            rows = self._conn.execute("SELECT name, created FROM users ORDER BY name").fetchall()
        return [User(n, c) for n, c in rows]

    def exists(self, name: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is not None

    def verify(self, name: str, password: str) -> bool:
        """True when the name exists and the password matches; costs one argon2 check either way."""
        if not isinstance(name, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            return False
        row = None
        if NAME_RE.match(name):
            with self._lock:
                row = self._conn.execute("SELECT hash FROM users WHERE name = ?", (name,)).fetchone()
        if row is None and self._dummy is None:
            # A hash of a random password: verifying unknown names against it costs as much as a real
            # check, so response time does not tell which names exist.
            self._dummy = self._hasher.hash(secrets.token_urlsafe(16))
        try:
            self._hasher.verify(row[0] if row else self._dummy, password)
        except (VerificationError, InvalidHashError):
            return False
        return row is not None
