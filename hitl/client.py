"""Client side of the assist queue: the cell's AssistClient, and the link both clients share.

A ZeroMQ socket is not thread-safe, so each client runs one background thread that owns its DEALER
socket; callers hand it work through a queue and wake it through an os.pipe that the thread polls
next to the socket. The thread sends heartbeats, notices a silent broker (3 missed heartbeats), then
closes the socket and reconnects with backoff (1 heartbeat doubling up to 32 s), and resubmits whatever
is pending by id. Resubmission is safe because request ids are idempotent at the broker.
"""

from __future__ import annotations

import abc
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from hitl import protocol as P
from hitl.keys import ClientKeys
from hitl.messages import AssistAnswer, AssistRequest

log = logging.getLogger(__name__)


class AssistError(Exception):
    """The broker refused something (code = protocol error code), or the client is closed."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class _Link(abc.ABC):
    """One DEALER connection to the broker, owned by a background thread. Subclasses handle messages."""

    role = "?"

    def __init__(
        self,
        endpoint: str,
        keys: ClientKeys | None,
        server_public_key: bytes | None,
        heartbeat_s: float,
        liveness: int = P.HEARTBEAT_LIVENESS,
        backoff_max_s: float = 32.0,
        connect_timeout_s: float = 5.0,
        context: zmq.Context | None = None,
    ):
        if keys is not None and not server_public_key:
            raise ValueError("CURVE keys given but no server_public_key (the broker's broker.key)")
        if keys is None:
            log.warning(
                "%s client for %s runs INSECURE (no CURVE): loopback experiments only", self.role, endpoint
            )
        self.endpoint = endpoint
        self.keys = keys
        self.server_public_key = server_public_key
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.ctx = context or zmq.Context.instance()
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._connected = threading.Event()
        self.broker_instance: str | None = None
        self.waiting = 0  # queue depth as last reported by the broker
        self.last_error: str | None = None

    # ---- public ----

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"assist-{self.role}", daemon=True)
            self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- for subclasses ----

    def _call(self, *cmd: Any) -> None:
        if self._closing.is_set():
            raise AssistError("client is closed")
        self._cmds.put(cmd)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _send(self, msg_type: bytes, body: dict) -> None:
        try:
            self._sock.send_multipart(P.encode(msg_type, body), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # HWM while disconnected; the reconnect path resends what matters
            log.debug("send %s failed: %s", msg_type, exc)

    def _heartbeat_body(self) -> dict:
        return {"role": self.role}

    def _resend_state(self) -> None:  # noqa: B027 (optional hook)
        """Called on a new socket (after a reconnect) and when the broker restarted: the broker on the
        other end does not know what we sent before, so send again whatever is not final."""

    @abc.abstractmethod
    def _on_message(self, msg_type: bytes, body: dict) -> None:
        """Handle one message from the broker (subclasses: cell or associate side)."""

    @abc.abstractmethod
    def _on_command(self, cmd: tuple) -> None:
        """Handle one command queued by a public method, on the link's own thread."""

    def _tick(self, now: float) -> None:  # noqa: B027 (optional hook)
        """Called at least every 100 ms from the thread."""

    def _on_close(self) -> None:  # noqa: B027 (optional hook)
        """Called on the thread before the socket closes."""

    # ---- thread ----

    def _open_socket(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            sock.curve_serverkey = self.server_public_key
            sock.curve_publickey = self.keys.public
            sock.curve_secretkey = self.keys.secret
        sock.connect(self.endpoint)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._opened_at = time.monotonic()
        self._heard = False
        self._warned_silent = False
        self._send(P.HEARTBEAT, self._heartbeat_body())  # say hello at once

    def _run(self) -> None:
        backoff = self.heartbeat_s
        self._open_socket()
        next_beat = time.monotonic() + self.heartbeat_s
        last_heard = time.monotonic()
        try:
            while not self._closing.is_set():
                events = dict(self._poller.poll(100))
                now = time.monotonic()
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                while True:
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    self._on_command(cmd)
                if self._sock in events:
                    for _ in range(1000):
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        last_heard = now
                        self._receive(frames)
                    backoff = self.heartbeat_s
                if now >= next_beat:
                    self._send(P.HEARTBEAT, self._heartbeat_body())
                    next_beat = now + self.heartbeat_s
                silent = now - (last_heard if self._heard else self._opened_at)
                if self._heard and silent > self.heartbeat_s * self.liveness:
                    log.warning(
                        "broker %s silent for %.1f s: reconnecting in %.1f s", self.endpoint, silent, backoff
                    )
                    self._reconnect(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
                elif not self._heard and silent > max(self.connect_timeout_s, backoff):
                    if not self._warned_silent:
                        self.last_error = (
                            f"no reply from broker {self.endpoint} within {silent:.0f} s: is it running, is "
                            "server_public_key its broker.key, and is our public key in its allowed/ folder?"
                        )
                        log.error("%s", self.last_error)
                        self._warned_silent = True
                    self._reconnect(0.0)
                    backoff = min(backoff * 2, self.backoff_max_s)
                self._tick(time.time())
        except Exception:
            log.exception("%s client thread crashed", self.role)
            raise
        finally:
            try:
                self._on_close()
                self._send(P.DISCONNECT, {})
            finally:
                self._connected.clear()
                self._sock.close(0)

    def _reconnect(self, delay_s: float) -> None:
        self._connected.clear()
        self._sock.close(0)
        if delay_s > 0:
            self._closing.wait(delay_s)
        warned = getattr(self, "_warned_silent", False)
        self._open_socket()
        self._warned_silent = warned
        # Messages queued on the old socket died with it; the new one queues these until it connects.
        self._resend_state()

    def _receive(self, frames: list[bytes]) -> None:
        try:
            msg = P.decode(frames, P.BROKER_TYPES)
        except P.ProtocolError as exc:
            log.warning("dropping malformed message from broker: %s", exc.message)
            return
        body = msg.body
        self._heard = True
        self._connected.set()
        self.last_error = None
        # Every broker message names the broker's instance; a new one means it restarted and lost
        # whatever was in flight (its journal kept everything it acknowledged).
        instance = body.get("instance")
        changed = isinstance(instance, str) and self.broker_instance not in (None, instance)
        if isinstance(instance, str):
            self.broker_instance = instance
        if isinstance(body.get("waiting"), int):
            self.waiting = body["waiting"]
        if changed:
            log.warning("broker restarted (instance %s): sending again what is pending", instance)
            self._resend_state()
        if msg.msg_type != P.HEARTBEAT:
            self._on_message(msg.msg_type, body)


@dataclass
class _Pending:
    request: dict[str, Any]  # wire dict
    future: Future
    deadline: float  # unix s
    acked: bool = False
    cancel_wanted: bool = False
    rechecked: bool = False


class AssistClient(_Link):
    """The cell's side: `ask` returns a Future[AssistAnswer] at once; the answer arrives from the broker.

    Every future ends: with the broker's final state (answered / expired / cancelled), or, if the broker
    stays unreachable, with a local "expired" `liveness` heartbeats after the request's deadline (the
    note says so), so the robot never waits on a broker or a person who is not there.
    """

    role = "cell"

    def __init__(
        self,
        endpoint: str,
        cell_id: str,
        keys: ClientKeys | None,
        server_public_key: bytes | None = None,
        heartbeat_s: float = P.HEARTBEAT_S,
        **link_kwargs: Any,
    ):
        if not cell_id or len(cell_id) > P.MAX_ID_CHARS:
            raise ValueError(f"cell_id must be 1..{P.MAX_ID_CHARS} characters")
        super().__init__(endpoint, keys, server_public_key, heartbeat_s, **link_kwargs)
        self.cell_id = cell_id
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def ask(self, request: AssistRequest) -> Future:
        """Queue a request; returns a Future[AssistAnswer] immediately (never blocks on the network).

        Raises ValueError at once for a request this client would never send (wrong cell, too big).
        Asking again with the same request_id returns the same future.
        """
        if self._closing.is_set():
            raise AssistError("client is closed")
        if request.cell_id != self.cell_id:
            raise ValueError(
                f"request.cell_id {request.cell_id!r} is not this client's cell {self.cell_id!r}"
            )
        wire = request.to_wire()
        if len(P.pack({"request": wire})) > P.MAX_BODY_BYTES:
            raise ValueError(f"request {request.request_id} is larger than {P.MAX_BODY_BYTES} bytes encoded")
        try:
            P.validate_request({"request": wire})  # the broker's own door check, minus the clock
        except P.ProtocolError as exc:
            raise ValueError(f"{exc.message} (field {exc.field})") from None
        with self._lock:
            existing = self._pending.get(request.request_id)
            if existing is not None:
                return existing.future
            fut: Future = Future()
            fut.set_running_or_notify_cancel()
            self._pending[request.request_id] = _Pending(wire, fut, float(request.deadline))
        self._call("submit", request.request_id)
        return fut

    def cancel(self, request_id: str) -> None:
        """Ask the broker to cancel; the future then ends with status "cancelled" (unless already final)."""
        self._call("cancel", request_id)

    def status(self) -> dict[str, int]:
        return {"waiting": self.waiting, "pending": self.pending}

    # ---- thread side ----

    def _heartbeat_body(self) -> dict:
        return {"role": "cell", "name": self.cell_id}

    def _on_command(self, cmd: tuple) -> None:
        kind, rid = cmd
        with self._lock:
            p = self._pending.get(rid)
        if p is None:
            return
        if kind == "submit":
            self._send(P.SUBMIT, {"request": p.request})
        elif kind == "cancel":
            p.cancel_wanted = True
            self._send(P.CANCEL, {"request_id": rid, "cell_id": self.cell_id})

    def _resend_state(self) -> None:  # noqa: B027 (optional hook)
        with self._lock:
            items = list(self._pending.items())
        for rid, p in items:
            p.acked = False
            self._send(P.SUBMIT, {"request": p.request})
            if p.cancel_wanted:
                self._send(P.CANCEL, {"request_id": rid, "cell_id": self.cell_id})

    def _on_message(self, msg_type: bytes, body: dict) -> None:
        if msg_type == P.ACK:
            with self._lock:
                p = self._pending.get(body.get("request_id"))
            if p is not None:
                p.acked = True
        elif msg_type == P.RESULT:
            try:
                answer = AssistAnswer.from_wire(body["answer"])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("dropping unreadable result: %s", exc)
                return
            self._resolve(answer)
            # Confirm so that the broker stops re-sending it (even for a future we already resolved).
            self._send(P.DELIVERED, {"cell_id": self.cell_id, "request_ids": [answer.request_id]})
        elif msg_type == P.ERROR:
            rid, code = body.get("request_id"), body.get("code")
            log.warning("broker error %s %s: %s", code, body.get("name"), body.get("message"))
            if code in (P.E_ALREADY_FINAL, P.E_UNKNOWN_REQUEST) and body.get("ref") == "cancel":
                return  # the final state comes (or came) as a RESULT
            if rid is None:  # about the connection (e.g. our key was revoked): nothing to settle
                self.last_error = f"broker error {code} {body.get('name')}: {body.get('message')}"
                return
            if code == P.E_INVALID and body.get("field") == "deadline":
                with self._lock:
                    p = self._pending.get(rid)
                if p is not None and p.deadline <= time.time():
                    # Sent (or resent after a reconnect) too late to be asked: it simply expired.
                    note = "deadline passed before the broker accepted it"
                    self._resolve(AssistAnswer(rid, "expired", answered_at=time.time(), note=note))
                    return
            if rid is not None and code not in (P.E_INTERNAL,):
                with self._lock:
                    p = self._pending.pop(rid, None)
                if p is not None and not p.future.done():
                    p.future.set_exception(AssistError(f"broker refused {rid}: {body.get('message')}", code))

    def _resolve(self, answer: AssistAnswer) -> None:
        with self._lock:
            p = self._pending.pop(answer.request_id, None)
        if p is not None and not p.future.done():
            p.future.set_result(answer)

    def _tick(self, now: float) -> None:  # noqa: B027 (optional hook)
        grace = self.heartbeat_s * self.liveness
        with self._lock:
            items = list(self._pending.items())
        for rid, p in items:
            if now > p.deadline + self.heartbeat_s and not p.rechecked and self.connected:
                p.rechecked = True  # the result may have been lost: ask again, idempotently
                self._send(P.SUBMIT, {"request": p.request})
            if now > p.deadline + grace:
                log.warning(
                    "request %s: no final state from the broker %.1f s after its deadline", rid, grace
                )
                self._resolve(
                    AssistAnswer(rid, "expired", answered_at=now, note="expired locally: broker unreachable")
                )

    def _on_close(self) -> None:  # noqa: B027 (optional hook)
        with self._lock:
            items = list(self._pending.values())
            self._pending.clear()
        for p in items:
            if not p.future.done():
                p.future.set_exception(AssistError("client closed before the request reached a final state"))
