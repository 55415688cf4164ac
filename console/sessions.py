"""Signed-in sessions and the sign-in rate limit of the web console.

Sessions live in memory: a console restart signs everyone out, which is the safe failure. A session is a
random 256-bit token in an HttpOnly, SameSite=Strict cookie, with its own CSRF token that every
state-changing request must echo in a header. Both expire together (`ttl_s`, default 8 h).

Time comes from an injectable `clock` (unix seconds) so that expiry and lock-outs can be exercised
without waiting hours.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True)
class Session:
    token: str  # cookie value
    csrf: str  # echoed by the page in X-CSRF-Token on every POST
    user: str
    created: float  # unix s
    expires: float  # unix s


class Sessions:
    def __init__(self, ttl_s: float = 8 * 3600.0, clock: Clock = time.time):
        if ttl_s <= 0:
            raise ValueError(f"session lifetime must be positive, got {ttl_s} s")
        self.ttl_s = ttl_s
        self.clock = clock
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str) -> Session:
        now = self.clock()
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), user, now, now + self.ttl_s)
        with self._lock:
            self._prune(now)
            self._by_token[s.token] = s
        return s

    def get(self, token: str | None) -> Session | None:
        """The live session of this cookie value, or None (unknown or expired; expired ones are dropped)."""
        if not token or len(token) > 100:
            return None
        now = self.clock()
        with self._lock:
            s = self._by_token.get(token)
            if s is not None and s.expires <= now:
                del self._by_token[token]
                return None
            return s

    def end(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)

    def end_user(self, user: str) -> int:
        """Sign a user out everywhere (e.g. the account was removed); returns how many sessions ended."""
        with self._lock:
            gone = [t for t, s in self._by_token.items() if s.user == user]
            for t in gone:
                del self._by_token[t]
        return len(gone)

    def _prune(self, now: float) -> None:
        for t in [t for t, s in self._by_token.items() if s.expires <= now]:
            del self._by_token[t]


def csrf_ok(session: Session, header_value: str | None) -> bool:
    return bool(header_value) and hmac.compare_digest(session.csrf, header_value)


@dataclass(frozen=True)
class RateLimitConfig:
    max_failures: int = 5  # failed sign-ins allowed per key (client address, or user name) in the window
    window_s: float = 900.0  # s; older failures are forgotten


class SignInLimiter:
    """Failed sign-ins per client address and per user name in a sliding window; over the limit, the
    next attempt is refused without checking the password (so guessing costs the attacker time, not us)."""

    def __init__(self, config: RateLimitConfig | None = None, clock: Clock = time.time):
        self.config = config or RateLimitConfig()
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, *keys: str) -> float:
        """Seconds until a sign-in for these keys may be tried again (0 = allowed now)."""
        now = self.clock()
        worst = 0.0
        with self._lock:
            for k in keys:
                q = self._trim(k, now)
                if q is not None and len(q) >= self.config.max_failures:
                    worst = max(worst, q[0] + self.config.window_s - now)
        return worst

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for k in keys:
                self._failures.setdefault(k, deque()).append(now)
            if len(self._failures) > 100_000:  # bound memory under a spray of names
                for k in list(self._failures)[:50_000]:
                    del self._failures[k]

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)

    def _trim(self, key: str, now: float) -> deque[float] | None:
        q = self._failures.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.config.window_s:
            q.popleft()
        if not q:
            del self._failures[key]
            return None
        return q
