"""The console's one connection to the assist broker: a `console`-role client that holds requests for
the people signed in to the web page and answers on their behalf.

It speaks the associate side of the protocol (docs/protocol.md: ready / assign / answer / release),
with two differences from `hitl.associate.AssociateClient`, which serves one person in a terminal:
  * it may hold several requests at once (one per person at the page), asking for the next one with
    `want_work()` whenever a person is free, one READY at a time as the broker expects;
  * every answer and release carries `on_behalf_of`: the signed-in associate's name, which the broker
    records beside the console's own key so that the cell's ledger names the person.

Everything the broker sends is handed to `on_event(kind, payload)` from the link's own thread; the
web app forwards it onto its event loop. Replies to answers/releases come back as Futures.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from hitl import protocol as P
from hitl.client import AssistError, _Link
from hitl.keys import ClientKeys
from hitl.messages import AssistRequest

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]


class ConsoleLink(_Link):
    """A `console` client of the broker. `on_event` receives ("assign", {request, waiting}),
    ("cancel", {request_id, cell_id, reason})."""

    role = "console"

    def __init__(
        self,
        endpoint: str,
        keys: ClientKeys | None,
        server_public_key: bytes | None,
        on_event: EventSink,
        name: str = "console",
        heartbeat_s: float = P.HEARTBEAT_S,
        context: zmq.Context | None = None,
        **link_kwargs: Any,
    ):
        super().__init__(endpoint, keys, server_public_key, heartbeat_s, context=context, **link_kwargs)
        self.name = keys.name if keys is not None and keys.name else name
        self._on_event = on_event
        self._lock = threading.Lock()
        # Keyed by (cell_id, request_id): request ids are unique per cell only (docs/protocol.md).
        self._replies: dict[tuple[str, str], Future] = {}  # -> Future of the broker's ack
        self._unacked: dict[tuple[str, str], tuple[bytes, dict]] = {}  # answers/releases to resend
        self._status_futs: list[Future] = []
        self._ready_out = False  # thread side: one READY is outstanding (the broker keeps one per peer)
        self._want = 0  # thread side: how many more requests the page can use right now
        self.start()

    # ---- public (any thread) ----

    def want_work(self, n: int) -> None:
        """The page has `n` people free for a request: keep one READY outstanding while n > 0."""
        self._call("want", max(0, int(n)))

    def answer(
        self,
        request_id: str,
        on_behalf_of: str,
        kind: str,
        candidate_index: int | None = None,
        pixel: tuple[int, int] | None = None,
        note: str = "",
        gripper: str | None = None,
        cell_id: str = "",
    ) -> Future:
        """Send a person's answer; the Future ends with the journaled state ("answered") or AssistError.
        `gripper` goes with a 'point': the gripper the person chose for that spot (None: the cell's)."""
        body = {
            "request_id": request_id,
            "cell_id": cell_id or None,
            "kind": kind,
            "candidate_index": candidate_index,
            "pixel": list(pixel) if pixel is not None else None,
            "note": note,
            "name": self.name,
            "on_behalf_of": on_behalf_of,
        }
        if gripper is not None:
            body["gripper"] = gripper
        return self._request_ack((cell_id, request_id), P.ANSWER, body)

    def release(self, request_id: str, on_behalf_of: str | None, skip: bool, cell_id: str = "") -> Future:
        """Give a held request back; skip=True asks the broker not to offer it to this console again."""
        body: dict[str, Any] = {"request_id": request_id, "cell_id": cell_id or None, "skip": bool(skip)}
        if on_behalf_of is not None:
            body["on_behalf_of"] = on_behalf_of
        return self._request_ack((cell_id, request_id), P.RELEASE, body)

    def status(self) -> Future:
        """The broker's queue status (waiting, held, associates, cells) as a Future of the reply map."""
        fut: Future = Future()
        self._call("status", fut)
        return fut

    # ---- internals ----

    def _request_ack(self, key: tuple[str, str], msg_type: bytes, body: dict) -> Future:
        fut: Future = Future()
        with self._lock:
            old = self._replies.pop(key, None)
            self._replies[key] = fut
        if old is not None and not old.done():
            old.set_exception(AssistError("superseded by a newer message for this request"))
        self._call("send", key, msg_type, body)
        return fut

    def _heartbeat_body(self) -> dict:
        return {"role": "console", "name": self.name}

    def _on_command(self, cmd: tuple) -> None:
        if cmd[0] == "want":
            self._want = cmd[1]
            self._maybe_ready()
        elif cmd[0] == "send":
            _, key, msg_type, body = cmd
            self._unacked[key] = (msg_type, body)
            self._send(msg_type, body)
        elif cmd[0] == "status":
            self._status_futs.append(cmd[1])
            self._send(P.STATUS, {})

    def _maybe_ready(self) -> None:
        if self._want > 0 and not self._ready_out:
            self._ready_out = True
            self._send(P.READY, {"name": self.name})

    def _resend_state(self) -> None:
        # A new socket (or a restarted broker) knows nothing of what we asked for or answered.
        for msg_type, body in self._unacked.values():
            self._send(msg_type, body)
        if self._ready_out:
            self._send(P.READY, {"name": self.name})

    def _on_message(self, msg_type: bytes, body: dict) -> None:
        rid = body.get("request_id")
        cell_id = body.get("cell_id") if isinstance(body.get("cell_id"), str) else ""
        if msg_type == P.ASSIGN:
            self._ready_out = False
            self._want = max(0, self._want - 1)
            try:
                req = AssistRequest.from_wire(body["request"])
            except (KeyError, TypeError, ValueError) as exc:
                log.error("unreadable assignment, giving it back: %s", exc)
                bad = (body.get("request") or {}).get("request_id")
                if isinstance(bad, str):
                    self._send(P.RELEASE, {"request_id": bad, "skip": True})
                self._maybe_ready()
                return
            waiting = body.get("waiting")
            self._on_event("assign", {"request": req, "waiting": waiting if isinstance(waiting, int) else 0})
            self._maybe_ready()
        elif msg_type == P.CANCEL:
            reason = str(body.get("reason", "cancelled"))
            self._on_event("cancel", {"request_id": str(rid), "cell_id": cell_id, "reason": reason})
        elif msg_type == P.ACK:
            key = self._key(rid, cell_id)
            self._unacked.pop(key, None)
            self._settle(key, result=body.get("state"))
        elif msg_type == P.ERROR:
            log.warning("broker error %s %s: %s", body.get("code"), body.get("name"), body.get("message"))
            if rid is not None and body.get("code") != P.E_INTERNAL:
                key = self._key(rid, cell_id)
                self._unacked.pop(key, None)
                self._settle(key, error=AssistError(str(body.get("message")), body.get("code")))
        elif msg_type == P.STATUS:
            futs, self._status_futs = self._status_futs, []
            for f in futs:
                if not f.done():
                    f.set_result(body)

    def _key(self, rid: Any, cell_id: str) -> tuple[str, str]:
        """The (cell_id, request_id) a reply is about; a reply without cell_id matches by id alone."""
        if cell_id:
            return (cell_id, rid)
        with self._lock:
            keys = [k for k in self._replies if k[1] == rid]
        return keys[0] if len(keys) == 1 else ("", rid)

    def _settle(self, key: tuple[str, str], result: Any = None, error: Exception | None = None) -> None:
        with self._lock:
            fut = self._replies.pop(key, None)
        if fut is not None and not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def _on_close(self) -> None:
        with self._lock:
            futs = list(self._replies.values()) + self._status_futs
            self._replies.clear()
            self._status_futs = []
        for f in futs:
            if not f.done():
                f.set_exception(AssistError("console link closed"))
