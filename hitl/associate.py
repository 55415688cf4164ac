"""Associate side of the assist queue: AssociateClient (for programs) and the `pickcell assist` terminal.

An associate is a worker in Majordomo terms: it says READY, the broker assigns it one request, a person
answers (or skips), and it says READY again. The client's background thread keeps heartbeating while the
person thinks, so the broker only takes a request back when the associate's process or network is gone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import zmq

from hitl import protocol as P
from hitl.client import AssistError, _Link
from hitl.keys import ClientKeys
from hitl.messages import AssistRequest

log = logging.getLogger(__name__)


class AssociateClient(_Link):
    """One associate's connection. The broker knows it by its CURVE key name (`name`).

    A console (a web console answering for the people logged into it) uses the same client with a
    `console`-role key and `role="console"`, and names the person in every answer (`on_behalf_of`).
    """

    role = "associate"

    def __init__(
        self,
        endpoint: str,
        keys: ClientKeys | None,
        server_public_key: bytes | None = None,
        name: str | None = None,
        heartbeat_s: float = P.HEARTBEAT_S,
        context: zmq.Context | None = None,
        role: str | None = None,
        **link_kwargs: Any,
    ):
        # The broker decides the role from where the key sits in its allowlist; we only say it in our
        # heartbeats (a mismatch is refused, which makes a misplaced key visible at once).
        role = role or (keys.role if keys is not None and keys.role in P.ANSWERING_ROLES else P.ASSOCIATE)
        if role not in P.ANSWERING_ROLES:
            raise ValueError(f"an AssociateClient's role is one of {P.ANSWERING_ROLES}, not {role!r}")
        self.role = role
        super().__init__(endpoint, keys, server_public_key, heartbeat_s, context=context, **link_kwargs)
        # With CURVE the broker ignores a declared name and uses the key's; without, it is all we have.
        self.name = keys.name if keys is not None and keys.name else (name or "associate")
        self._inbox: queue.SimpleQueue[AssistRequest] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._cancelled: dict[str, str] = {}  # request id -> why (expired / cancelled / answered by another)
        self._replies: dict[str, Future] = {}  # request id -> Future of the broker's ack
        self._unacked: dict[str, tuple[bytes, dict]] = {}  # answers/releases to resend after a reconnect
        self._cell_of: dict[str, str] = {}  # request id -> cell id of the assigned request (ids are per cell)
        self._status_futs: list[Future] = []
        self._ready_out = False  # thread side: a READY is outstanding
        self.start()

    # ---- public ----

    def next_request(self, timeout_s: float) -> AssistRequest | None:
        """The next request for this associate, or None if none arrived within timeout_s.

        Asks the broker for work (once; the ask stays open across calls). A request that was cancelled
        or expired while it sat here is dropped, never returned.
        """
        self._call("ready")
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            try:
                req = self._inbox.get(timeout=max(0.0, left)) if left > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return None
            if self.cancelled_reason(req.request_id) is None and req.deadline > time.time():
                return req

    def answer(
        self,
        request_id: str,
        kind: str,
        candidate_index: int | None = None,
        pixel: tuple[int, int] | None = None,
        note: str = "",
        timeout_s: float = 10.0,
        gripper: str | None = None,
        on_behalf_of: str | None = None,
    ) -> str:
        """Send a person's answer; returns the final state once journaled ("answered").

        `gripper` ("suction" | "parallel_jaw") goes with a `point` answer: the tool for the clicked spot.
        `on_behalf_of` names the person: required for a console key, refused for an associate key.
        Raises AssistError (with the broker's code) if refused, e.g. already expired (409), not held by
        us (403) or invalid (422); TimeoutError if the broker did not confirm in time (the answer is
        resent after a reconnect).
        """
        body: dict[str, Any] = {
            "request_id": request_id,
            "kind": kind,
            "candidate_index": candidate_index,
            "pixel": list(pixel) if pixel is not None else None,
            "note": note,
        }
        if gripper is not None:
            body["gripper"] = gripper
        if on_behalf_of is not None:
            body["on_behalf_of"] = on_behalf_of
        self._add_cell(request_id, body)
        return self._request_ack(request_id, P.ANSWER, body, timeout_s)

    def skip(self, request_id: str, timeout_s: float = 10.0) -> str:
        """Give the request back; the broker offers it to someone else, not to us again."""
        body = self._add_cell(request_id, {"request_id": request_id, "skip": True})
        return self._request_ack(request_id, P.RELEASE, body, timeout_s)

    def release(self, request_id: str, timeout_s: float = 10.0) -> str:
        """Give the request back without excluding ourselves (e.g. stepping away from the screen)."""
        body = self._add_cell(request_id, {"request_id": request_id, "skip": False})
        return self._request_ack(request_id, P.RELEASE, body, timeout_s)

    def cancelled_reason(self, request_id: str) -> str | None:
        """Why the broker took this request away from us (expired, cancelled, answered), or None."""
        with self._lock:
            return self._cancelled.get(request_id)

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The broker's queue status: waiting (queue depth), held (by us), holding, associates."""
        fut: Future = Future()
        self._call("status", fut)
        return fut.result(timeout_s)

    # ---- internals ----

    def _add_cell(self, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        # Request ids are unique per cell only: say which cell's request we mean.
        with self._lock:
            cell_id = self._cell_of.get(request_id)
        if cell_id is not None:
            body["cell_id"] = cell_id
        return body

    def _request_ack(self, request_id: str, msg_type: bytes, body: dict, timeout_s: float) -> str:
        fut: Future = Future()
        with self._lock:
            self._replies[request_id] = fut
        self._call("send", request_id, msg_type, body)
        try:
            return fut.result(timeout_s)
        except FutureTimeout:
            raise TimeoutError(
                f"broker did not confirm {msg_type.decode()} for {request_id} in {timeout_s} s"
            ) from None

    def _heartbeat_body(self) -> dict:
        return {"role": self.role, "name": self.name}

    def _on_command(self, cmd: tuple) -> None:
        if cmd[0] == "ready":
            if not self._ready_out:
                self._ready_out = True
                self._send(P.READY, {})
        elif cmd[0] == "send":
            _, rid, msg_type, body = cmd
            self._unacked[rid] = (msg_type, body)
            self._send(msg_type, body)
        elif cmd[0] == "status":
            self._status_futs.append(cmd[1])
            self._send(P.STATUS, {})

    def _resend_state(self) -> None:
        # A new socket (or a restarted broker) does not know we asked for work or what we answered.
        for msg_type, body in self._unacked.values():
            self._send(msg_type, body)
        if self._ready_out:
            self._send(P.READY, {})

    def _on_message(self, msg_type: bytes, body: dict) -> None:
        rid = body.get("request_id")
        if msg_type == P.ASSIGN:
            self._ready_out = False
            try:
                req = AssistRequest.from_wire(body["request"])
            except (KeyError, TypeError, ValueError) as exc:
                log.error("unreadable assignment, giving it back: %s", exc)
                wire = body.get("request") if isinstance(body.get("request"), dict) else {}
                rid, cell_id = wire.get("request_id"), wire.get("cell_id")
                if isinstance(rid, str):
                    self._send(P.RELEASE, {"request_id": rid, "cell_id": cell_id, "skip": True})
                return
            with self._lock:
                self._cell_of[req.request_id] = req.cell_id
            self._inbox.put(req)
        elif msg_type == P.CANCEL:
            with self._lock:
                self._cancelled[str(rid)] = str(body.get("reason", "cancelled"))
        elif msg_type == P.ACK:
            self._unacked.pop(rid, None)
            with self._lock:
                self._cell_of.pop(rid, None)
            self._settle(rid, result=body.get("state"))
        elif msg_type == P.ERROR:
            log.warning("broker error %s %s: %s", body.get("code"), body.get("name"), body.get("message"))
            if rid is not None and body.get("code") != P.E_INTERNAL:
                self._unacked.pop(rid, None)
                self._settle(rid, error=AssistError(str(body.get("message")), body.get("code")))
        elif msg_type == P.STATUS:
            futs, self._status_futs = self._status_futs, []
            for f in futs:
                if not f.done():
                    f.set_result(body)

    def _settle(self, rid: Any, result: Any = None, error: Exception | None = None) -> None:
        with self._lock:
            fut = self._replies.pop(rid, None)
        if fut is not None and not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)


# ---- the terminal ----

HELP = (
    "answer: NUMBER approves that candidate | p X Y picks pixel (x=column, y=row) | "
    "n no safe pick | s skip | q quit"
)


def parse_command(line: str, request: AssistRequest) -> dict[str, Any]:
    """One typed line -> {"action": "answer"|"skip"|"quit", ...}; ValueError with a helpful message."""
    words = line.strip().lower().split()
    if not words:
        raise ValueError("empty answer. " + HELP)
    head = words[0]
    if head.isdigit() and len(words) == 1:
        idx = int(head)
        valid = [c.index for c in request.candidates]
        if idx not in valid:
            raise ValueError(f"no candidate {idx}; the image shows {valid or 'none'}")
        return {"action": "answer", "kind": "approve", "candidate_index": idx}
    if head == "p":
        if len(words) != 3 or not all(w.isdigit() for w in words[1:]):
            raise ValueError("pixel answer is: p X Y  (two non-negative integers, column then row)")
        return {"action": "answer", "kind": "point", "pixel": (int(words[1]), int(words[2]))}
    if head == "n" and len(words) == 1:
        return {"action": "answer", "kind": "no_safe_pick"}
    if head == "s" and len(words) == 1:
        return {"action": "skip"}
    if head == "q" and len(words) == 1:
        return {"action": "quit"}
    raise ValueError(f"did not understand {line.strip()!r}. " + HELP)


def describe(request: AssistRequest, png_path: Path, waiting: int) -> str:
    left = request.deadline - time.time()
    lines = [
        f"request {request.request_id} from {request.cell_id} (priority {request.priority})",
        f"  image: {png_path}",
        f"  time left: {left:.1f} s    waiting in queue: {waiting}",
        "  why the cell asks: " + ("; ".join(request.reasons) or "(no reason given)"),
    ]
    for c in request.candidates:
        lines.append(f"  [{c.index}] {c.gripper} at pixel ({c.u}, {c.v})  p(success)={c.p_success:.2f}")
    lines.append(HELP)
    return "\n".join(lines)


def run_terminal(
    client: AssociateClient,
    out_dir: Path,
    read_line: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    max_requests: int | None = None,
) -> int:
    """Show requests one by one and send the typed answers; returns how many were answered."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answered = 0
    shown = 0
    last_waiting = -1
    while max_requests is None or shown < max_requests:
        req = client.next_request(1.0)
        if req is None:
            if client.waiting != last_waiting or not client.connected:
                state = "" if client.connected else f" (not connected: {client.last_error or 'connecting'})"
                write(f"waiting for a request... {client.waiting} in queue{state}")
                last_waiting = client.waiting
            continue
        shown += 1
        png = out_dir / f"{req.request_id}.png"
        png.write_bytes(req.image_png)
        write(describe(req, png, client.waiting))
        while True:
            try:
                line = read_line("> ")
            except EOFError:
                client.release(req.request_id)
                return answered
            try:
                cmd = parse_command(line, req)
            except ValueError as exc:
                write(str(exc))
                continue
            gone = client.cancelled_reason(req.request_id)
            if gone is not None or req.deadline <= time.time():
                write(f"too late: this request is {gone or 'expired'}; nothing sent")
                break
            try:
                if cmd["action"] == "quit":
                    client.release(req.request_id)
                    return answered
                if cmd["action"] == "skip":
                    client.skip(req.request_id)
                    write("skipped: someone else will get it")
                    break
                client.answer(req.request_id, cmd["kind"], cmd.get("candidate_index"), cmd.get("pixel"))
                answered += 1
                write(f"sent: {cmd['kind']}")
                break
            except (AssistError, TimeoutError) as exc:
                write(f"not sent: {exc}")
                break
        last_waiting = -1
    return answered
