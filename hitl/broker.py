"""The assist broker: one ROUTER socket between cells (who ask) and associates (people who answer).

Majordomo-shaped (associates are workers that ask for work with READY), with the fixes the field notes
call for: a request held by an associate who disconnects or stops heartbeating goes back to the queue;
every accepted request and every final state is journaled (SQLite WAL, synchronous=FULL) before it is
acknowledged; CURVE + ZAP admit only the public keys in the allowlist folder.

One thread runs the event loop; each pass reads every message waiting on the socket, applies them
inside one journal transaction, commits (one fsync for the whole batch), and only then sends the
replies. Ordering of waiting requests: earliest deadline first; deadlines within `fair_window_s` of the
earliest count as equal, and among those higher priority wins, then the cell served least recently
(so one busy cell cannot starve the others). See docs/protocol.md.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from hitl import protocol as P
from hitl.journal import Journal

log = logging.getLogger(__name__)


_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_EVENT_NAMES = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication",
}


@dataclass(frozen=True)
class BrokerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    data_dir: Path = Path("broker-data")  # journal.sqlite lives here
    keys_dir: Path | None = None  # broker.key_secret + allowed/; None only with insecure=True
    insecure: bool = False  # no CURVE: loopback experiments only
    heartbeat_s: float = P.HEARTBEAT_S  # s between heartbeats we send; peers must use the same
    liveness: int = P.HEARTBEAT_LIVENESS  # heartbeats missed before a peer counts as gone
    fair_window_s: float = 1.0  # s; deadlines closer than this are ordered by priority, then fairness
    max_batch: int = 1000  # messages per event-loop pass (= per journal transaction)
    redeliver_s: float = 5.0  # s between re-sends of final states a connected cell has not confirmed


@dataclass
class _Peer:
    routing_id: bytes
    identity: str  # authenticated name (CURVE key name), or "insecure:<declared name>"
    last_seen: float  # monotonic s
    cell_id: str | None = None
    associate: bool = False
    ready: bool = False  # associate asked for work and has not been given any yet
    held: set[str] = field(default_factory=set)  # request ids assigned to this associate


@dataclass
class _Open:
    """A request without a final state, in memory."""

    request_id: str
    cell_id: str
    deadline: float
    priority: int
    request: dict[str, Any]  # wire dict, sent as-is in ASSIGN
    seq: int = 0  # position in its cell's heap; stale heap entries carry an older seq
    holder: bytes | None = None  # routing id of the associate holding it
    excluded: set[str] = field(default_factory=set)  # associates who skipped it


class _Auth:
    """ZAP handler: CURVE keys from the allowlist folder, re-read when it changes; refusals logged."""

    def __init__(self, context: zmq.Context, allowed_dir: Path):
        from zmq.auth.thread import ThreadAuthenticator

        from hitl.keys import load_allowlist

        self._load = load_allowlist
        self.allowed_dir = allowed_dir
        self.names: dict[bytes, str] = {}
        self._stamp: tuple | None = None
        self.refused = 0
        auth_log = logging.getLogger("hitl.broker.auth")
        outer = self

        class Authenticator(ThreadAuthenticator):
            async def handle_zap_message(self, msg: list[bytes]) -> None:
                outer._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
                await super().handle_zap_message(msg)

            def curve_user_id(self, client_public_key: bytes) -> str:
                from zmq.utils import z85

                return outer.names.get(z85.encode(client_public_key), "unnamed")

        class Provider:
            def callback(self, domain: str, z85_key: bytes) -> bool:
                outer.refresh()
                if z85_key in outer.names:
                    return True
                outer.refused += 1
                auth_log.warning(
                    "REFUSED CURVE connection from %s: public key %s is not in the allowlist %s",
                    outer._address,
                    z85_key.decode("ascii", "replace"),
                    outer.allowed_dir,
                )
                return False

        self._address = "?"
        self.refresh()
        self.thread = Authenticator(context, log=auth_log)
        self.thread.start()
        self.thread.configure_curve_callback("*", credentials_provider=Provider())

    def refresh(self) -> None:
        try:
            files = sorted(self.allowed_dir.glob("*.key"))
            stamp = tuple((p.name, p.stat().st_mtime_ns) for p in files)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self.names = self._load(self.allowed_dir)
            self._stamp = stamp
            log.info("allowlist: %d keys (%s)", len(self.names), ", ".join(sorted(self.names.values())))

    def stop(self) -> None:
        self.thread.stop()


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None):
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.instance = uuid.uuid4().hex[:12]  # changes at every start: clients resubmit when it does
        self.journal = Journal(Path(config.data_dir) / "journal.sqlite")
        self.peers: dict[bytes, _Peer] = {}
        self.cells: dict[str, bytes] = {}  # cell_id -> routing id of its current connection
        self.open: dict[str, _Open] = {}
        self.cell_heaps: dict[str, list[tuple[float, int, int, str]]] = {}
        self.expiry: list[tuple[float, str]] = []
        self.idle: deque[bytes] = deque()  # associates waiting for work, first come first served
        self.served: dict[str, int] = {}  # cell_id -> pass number it was last served (fairness)
        self.n_waiting = 0
        self._seq = 0
        self._serve_count = 0
        self._out: list[tuple[bytes, bytes, dict]] = []  # sent after the next commit
        self._out_now: list[tuple[bytes, bytes, dict]] = []  # assignments, sent before it
        self._flush_cells: set[str] = set()
        self._delivered: list[tuple[str, str]] = []  # (request id, cell id) confirmations not yet written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.auth: _Auth | None = None
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.handshake_failures = 0
        self.endpoint = config.bind
        self.stats = {
            "accepted": 0,
            "duplicates": 0,
            "answered": 0,
            "expired": 0,
            "cancelled": 0,
            "requeued": 0,
            "errors": 0,
            "assigned": 0,
        }

    # ---- lifecycle ----

    def bind(self) -> str:
        """Set up ZAP and the socket and bind; returns the bound endpoint (resolves tcp://...:0)."""
        cfg = self.config
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_WIRE_BYTES)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if cfg.insecure:
            if not is_loopback(cfg.bind):
                raise ValueError(f"--insecure is for loopback experiments only; refusing to bind {cfg.bind}")
            log.warning(
                "!!! INSECURE BROKER: no CURVE encryption, no authentication. Anyone who can reach "
                "%s can submit and answer. For loopback experiments only. !!!",
                cfg.bind,
            )
        else:
            from hitl.keys import BROKER_KEY_NAME, ClientKeys, KeyFileError

            if cfg.keys_dir is None:
                raise KeyFileError(
                    "CURVE is on by default: give a keys folder (broker.key_secret + allowed/)"
                )
            own = ClientKeys.from_file(Path(cfg.keys_dir) / f"{BROKER_KEY_NAME}.key_secret")
            self.auth = _Auth(self.ctx, Path(cfg.keys_dir) / "allowed")
            sock.curve_server = True
            sock.curve_publickey = own.public
            sock.curve_secretkey = own.secret
        sock.bind(cfg.bind)
        self.sock = sock
        # ZAP only sees clients that speak CURVE; a client without it (or with a broken handshake) fails
        # before ZAP, and only the socket monitor can tell us, so that every refusal gets a log line.
        self.monitor = sock.get_monitor_socket(_HANDSHAKE_FAILURES) if not cfg.insecure else None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._recover()
        log.info("broker %s listening on %s (curve=%s)", self.instance, self.endpoint, not cfg.insecure)
        return self.endpoint

    def _recover(self) -> None:
        """Requests the journal holds without a final state go back to the queue (crash recovery)."""
        for r in self.journal.open_requests():
            self._enqueue(_Open(r.request_id, r.cell_id, r.deadline, r.priority, r.request))
        counts = self.journal.counts()
        if counts["queued"] or counts["undelivered"]:
            log.info(
                "recovered %d waiting requests, %d undelivered final states",
                counts["queued"],
                counts["undelivered"],
            )

    def start(self) -> str:
        """Bind and serve in a background thread (tests, embedding). Returns the endpoint."""
        endpoint = self.bind()
        self._thread = threading.Thread(target=self.serve, name="assist-broker", daemon=True)
        self._thread.start()
        return endpoint

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def close(self) -> None:
        if self.sock is not None:
            self._write_delivered()
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.monitor = None
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.journal.close()

    # ---- event loop ----

    def serve(self) -> None:
        assert self.sock is not None, "call bind() first"
        sock, cfg = self.sock, self.config
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        next_beat = time.monotonic()
        next_redeliver = time.monotonic() + cfg.redeliver_s
        try:
            while not self._stop.is_set():
                now_m = time.monotonic()
                wait = min(next_beat - now_m, 0.1)
                if self.expiry:
                    wait = min(wait, self.expiry[0][0] - time.time())
                events = dict(poller.poll(max(0.0, wait) * 1000.0))
                if self.monitor is not None and self.monitor in events:
                    self._log_handshake_failures()
                if sock in events:
                    batch = []
                    while len(batch) < cfg.max_batch:
                        try:
                            batch.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                    with self.journal.transaction():
                        for frames in batch:
                            self._handle(frames)
                        # An assignment acknowledges nothing, so it may leave before the commit: the
                        # fsync then overlaps the associate's work instead of adding to the cell's wait.
                        # If we crash before the commit, the cell (never acked) resubmits, and the
                        # early answer is refused with 404.
                        self._dispatch(send_now=True)
                    self._flush()
                if self.expiry and self.expiry[0][0] <= time.time():
                    with self.journal.transaction():
                        self._expire_due()
                    self._flush()
                now_m = time.monotonic()
                if now_m >= next_beat:
                    self._heartbeat_and_purge(now_m)
                    next_beat = now_m + cfg.heartbeat_s
                if now_m >= next_redeliver:
                    self._redeliver()
                    next_redeliver = now_m + cfg.redeliver_s
                self._dispatch()
                self._flush()
        finally:
            self.close()

    def _log_handshake_failures(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                continue  # already logged with the key by the ZAP handler
            self.handshake_failures += 1
            log.warning("REFUSED connection on %s: security handshake failed (%s, code %s); "
                        "a client without CURVE or with the wrong server key?",
                        ev["endpoint"].decode("utf-8", "replace"), _EVENT_NAMES.get(ev["event"], ev["event"]),
                        ev["value"])  # fmt: skip

    def _flush(self) -> None:
        """Send what the last transaction produced: only ever after its commit."""
        for cell_id in self._flush_cells:
            rid = self.cells.get(cell_id)
            if rid is not None:
                for _, answer in self.journal.undelivered(cell_id):
                    self._out.append((rid, P.RESULT, {"answer": answer}))
        self._flush_cells.clear()
        out, self._out = self._out, []
        self._send_all(out)

    def _send_all(self, out: list[tuple[bytes, bytes, dict]]) -> None:
        for routing_id, msg_type, body in out:
            body["instance"] = self.instance  # lets clients notice a restart from any message
            try:
                self.sock.send_multipart([routing_id, P.PROTOCOL, msg_type, P.pack(body)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # peer gone / HWM: the journal keeps what matters
                log.debug("send %s to %r failed: %s", msg_type, routing_id, exc)

    def _send(self, routing_id: bytes, msg_type: bytes, body: dict) -> None:
        self._out.append((routing_id, msg_type, body))

    def _handle(self, frames: list[zmq.Frame]) -> None:
        routing_id = frames[0].bytes
        parts = [f.bytes for f in frames[1:]]
        now_m = time.monotonic()
        peer = self.peers.get(routing_id)
        if peer is None:
            identity = ""
            if not self.config.insecure:
                try:
                    identity = frames[0].get("User-Id")
                except zmq.ZMQError:
                    identity = ""
            peer = _Peer(routing_id, identity, now_m)
            self.peers[routing_id] = peer
        peer.last_seen = now_m
        msg_type = parts[1] if len(parts) > 1 else None
        out_len = len(self._out)
        self.journal.mark()  # one message's writes can be undone without losing the rest of the batch
        try:
            msg = P.decode(parts, P.CLIENT_TYPES)
            handler = self._handlers[msg.msg_type]
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s from %s", msg.msg_type.decode(), peer.identity or routing_id.hex())
            handler(self, peer, msg.body)
            self.journal.keep()
        except Exception as exc:
            self.journal.undo()
            del self._out[out_len:]
            if not isinstance(exc, P.ProtocolError):  # a bug of ours: say so, keep serving the others
                log.exception("internal error on a message from %s", peer.identity or routing_id.hex())
                exc = P.ProtocolError(
                    P.E_INTERNAL, f"internal error ({type(exc).__name__}); nothing was stored"
                )
            self.stats["errors"] += 1
            log.warning(
                "refused message from %s (%s): %d %s",
                peer.identity or routing_id.hex(),
                P.ERROR_NAMES.get(exc.code),
                exc.code,
                exc.message,
            )
            self._send(routing_id, P.ERROR, P.error_body(exc.code, exc.message, exc.request_id, msg_type))

    # ---- identity ----

    def _who(self, peer: _Peer, declared: Any) -> str:
        if self.config.insecure:
            name = declared if isinstance(declared, str) and declared else peer.routing_id.hex()
            return f"insecure:{name[: P.MAX_ID_CHARS]}"
        return peer.identity

    def _bind_cell(self, peer: _Peer, cell_id: str, request_id: str | None = None) -> None:
        # With CURVE a connection speaks only for the cell its key is named after, so that an admitted
        # associate (or another cell) cannot read, cancel or submit as someone else's cell.
        if not self.config.insecure and cell_id != peer.identity:
            msg = f"key {peer.identity!r} may not act as cell {cell_id!r}"
            raise P.ProtocolError(P.E_FORBIDDEN, msg, request_id)
        if peer.cell_id != cell_id:
            peer.cell_id = cell_id
            if not peer.identity or self.config.insecure:
                peer.identity = self._who(peer, cell_id)
        if self.cells.get(cell_id) != peer.routing_id:
            self.cells[cell_id] = peer.routing_id
            self._flush_cells.add(cell_id)  # a (re)connected cell gets its undelivered results

    def _become_associate(self, peer: _Peer, body: dict) -> None:
        if not peer.associate:
            peer.associate = True
            if self.config.insecure:
                peer.identity = self._who(peer, body.get("name"))
            log.info("associate %s connected", peer.identity)

    # ---- cell messages ----

    def _on_submit(self, peer: _Peer, body: dict) -> None:
        req = P.validate_request(body)
        rid, cell_id = req["request_id"], req["cell_id"]
        self._bind_cell(peer, cell_id, rid)
        stored = self.journal.get(rid)
        if stored is not None:
            self.stats["duplicates"] += 1
            ack = {
                "ref": "submit",
                "request_id": rid,
                "state": stored.state,
                "duplicate": True,
                "waiting": self.n_waiting,
            }
            self._send(peer.routing_id, P.ACK, ack)
            if stored.state != P.QUEUED:
                self._send(peer.routing_id, P.RESULT, {"answer": self.journal.answer(rid)})
            return
        self.journal.add(req, submitted_by=peer.identity or self._who(peer, cell_id), received_at=time.time())
        self.stats["accepted"] += 1
        self._enqueue(_Open(rid, cell_id, float(req["deadline"]), int(req.get("priority", 0)), req))
        ack = {
            "ref": "submit",
            "request_id": rid,
            "state": P.QUEUED,
            "duplicate": False,
            "waiting": self.n_waiting,
        }
        self._send(peer.routing_id, P.ACK, ack)

    def _on_cancel(self, peer: _Peer, body: dict) -> None:
        rid = P.req_str(body, "request_id")
        cell_id = P.req_str(body, "cell_id")
        self._bind_cell(peer, cell_id)
        r = self.open.get(rid)
        if r is None:
            self._not_open(rid)
        if r.cell_id != cell_id:
            raise P.ProtocolError(P.E_FORBIDDEN, f"request {rid} belongs to another cell", rid)
        self._finish(r, {"status": "cancelled", "note": "cancelled by the cell"})
        self._send(peer.routing_id, P.ACK, {"ref": "cancel", "request_id": rid, "state": "cancelled"})

    def _on_delivered(self, peer: _Peer, body: dict) -> None:
        cell_id = P.req_str(body, "cell_id")
        ids = body.get("request_ids")
        if not isinstance(ids, list) or len(ids) > 10_000 or not all(isinstance(i, str) for i in ids):
            raise P.ProtocolError(P.E_INVALID, "field 'request_ids' must be a list of strings")
        self._bind_cell(peer, cell_id)
        # Confirmations need no fsync of their own: one lost in a crash only means the result is sent
        # again, and cells ignore results they already have. They are written once per heartbeat.
        self._delivered.extend((rid, cell_id) for rid in ids)

    def _write_delivered(self) -> None:
        if not self._delivered:
            return
        batch, self._delivered = self._delivered, []
        now = time.time()
        with self.journal.transaction():
            for rid, cell_id in batch:
                self.journal.mark_delivered([rid], cell_id, now)

    # ---- associate messages ----

    def _on_ready(self, peer: _Peer, body: dict) -> None:
        self._become_associate(peer, body)
        if not peer.ready:
            peer.ready = True
            self.idle.append(peer.routing_id)

    def _on_answer(self, peer: _Peer, body: dict) -> None:
        rid = P.req_str(body, "request_id")
        self._become_associate(peer, body)
        r = self.open.get(rid)
        if r is None:
            self._not_open(rid)
        fields = P.validate_answer(body, r.request.get("candidates"))
        # First answer wins even if the request was requeued meanwhile: a person's judgement is still good.
        self._finish(r, {"status": "answered", "associate_id": peer.identity, **fields})
        self._send(peer.routing_id, P.ACK, {"ref": "answer", "request_id": rid, "state": "answered"})

    def _on_release(self, peer: _Peer, body: dict) -> None:
        rid = P.req_str(body, "request_id")
        skip = bool(body.get("skip", False))
        r = self.open.get(rid)
        if r is None:
            self._not_open(rid)
        if r.holder != peer.routing_id:
            raise P.ProtocolError(P.E_FORBIDDEN, f"request {rid} is not held by you", rid)
        if skip:
            r.excluded.add(peer.identity)
        peer.held.discard(rid)
        self._requeue(r, "skipped" if skip else "released")
        self._send(peer.routing_id, P.ACK, {"ref": "release", "request_id": rid, "state": P.QUEUED})

    # ---- any peer ----

    def _on_status(self, peer: _Peer, body: dict) -> None:
        reply: dict[str, Any] = {
            "waiting": self.n_waiting,
            "held": len(self.open) - self.n_waiting,
            "associates": sum(1 for p in self.peers.values() if p.associate),
            "cells": len(self.cells),
            "instance": self.instance,
        }
        rid = body.get("request_id")
        if rid is not None:
            rid = P.req_str(body, "request_id")
            stored = self.journal.get(rid)
            reply["request_id"] = rid
            reply["state"] = stored.state if stored else None
            reply["answer"] = self.journal.answer(rid) if stored and stored.state != P.QUEUED else None
        self._send(peer.routing_id, P.STATUS, reply)

    def _on_heartbeat(self, peer: _Peer, body: dict) -> None:
        role, name = body.get("role"), body.get("name")
        if role == "cell" and isinstance(name, str) and 0 < len(name) <= P.MAX_ID_CHARS:
            self._bind_cell(peer, name)
        elif role == "associate":
            self._become_associate(peer, body)

    def _on_disconnect(self, peer: _Peer, body: dict) -> None:
        self._drop_peer(peer, "said goodbye")

    _handlers = {
        P.SUBMIT: _on_submit,
        P.CANCEL: _on_cancel,
        P.DELIVERED: _on_delivered,
        P.READY: _on_ready,
        P.ANSWER: _on_answer,
        P.RELEASE: _on_release,
        P.STATUS: _on_status,
        P.HEARTBEAT: _on_heartbeat,
        P.DISCONNECT: _on_disconnect,
    }

    def _not_open(self, rid: str) -> None:
        stored = self.journal.get(rid)
        if stored is None:
            raise P.ProtocolError(P.E_UNKNOWN_REQUEST, f"no request {rid!r}", rid)
        raise P.ProtocolError(P.E_ALREADY_FINAL, f"request {rid} is already {stored.state}", rid)

    # ---- queue ----

    def _enqueue(self, r: _Open) -> None:
        self._seq += 1
        r.seq = self._seq
        r.holder = None
        if r.request_id not in self.open:
            heapq.heappush(self.expiry, (r.deadline, r.request_id))
        self.open[r.request_id] = r
        heapq.heappush(
            self.cell_heaps.setdefault(r.cell_id, []), (r.deadline, -r.priority, r.seq, r.request_id)
        )
        self.n_waiting += 1

    def _requeue(self, r: _Open, why: str) -> None:
        self.stats["requeued"] += 1
        log.info("request %s back in the queue (%s)", r.request_id, why)
        self._enqueue(r)

    def _is_waiting(self, entry: tuple[float, int, int, str]) -> bool:
        r = self.open.get(entry[3])
        return r is not None and r.holder is None and r.seq == entry[2]

    def _pick(self, who: str) -> tuple[str, tuple] | None:
        """The next request for associate `who` (see module doc for the order), or None."""
        heads = []
        for cell_id in list(self.cell_heaps):
            heap = self.cell_heaps[cell_id]
            while heap and not self._is_waiting(heap[0]):
                heapq.heappop(heap)
            if not heap:
                del self.cell_heaps[cell_id]
                continue
            head = heap[0]
            if who in self.open[head[3]].excluded:  # rare: this associate skipped the head; look deeper
                head = next(
                    (e for e in sorted(heap) if self._is_waiting(e) and who not in self.open[e[3]].excluded),
                    None,
                )
                if head is None:
                    continue
            heads.append((head, cell_id))
        if not heads:
            return None
        earliest = min(h[0] for h, _ in heads)
        eligible = [(h, c) for h, c in heads if h[0] <= earliest + self.config.fair_window_s]
        head, cell_id = min(
            eligible, key=lambda hc: (hc[0][1], self.served.get(hc[1], 0), hc[0][0], hc[0][2])
        )
        return cell_id, head

    def _dispatch(self, send_now: bool = False) -> None:
        skipped = []
        while self.idle and self.n_waiting:
            routing_id = self.idle.popleft()
            peer = self.peers.get(routing_id)
            if peer is None or not peer.ready:
                continue
            picked = self._pick(peer.identity)
            if picked is None:
                skipped.append(routing_id)  # everything waiting was skipped by this associate
                continue
            cell_id, head = picked
            r = self.open[head[3]]
            r.holder = routing_id
            self.n_waiting -= 1
            self._serve_count += 1
            self.served[cell_id] = self._serve_count
            peer.ready = False
            peer.held.add(r.request_id)
            self.stats["assigned"] += 1
            log.debug("assign %s to %s (%d waiting)", r.request_id, peer.identity, self.n_waiting)
            body = {"request": r.request, "waiting": self.n_waiting, "assigned_at": time.time()}
            if send_now:
                self._out_now.append((routing_id, P.ASSIGN, body))
            else:
                self._send(routing_id, P.ASSIGN, body)
        if self._out_now:
            out, self._out_now = self._out_now, []
            self._send_all(out)
        self.idle.extendleft(reversed(skipped))

    def _finish(self, r: _Open, fields: dict[str, Any]) -> None:
        """Journal the one final state, drop the request from memory, tell the cell and any holder."""
        answer = {
            "request_id": r.request_id,
            "kind": None,
            "candidate_index": None,
            "pixel": None,
            "associate_id": None,
            "answered_at": time.time(),
            "note": "",
            **fields,
        }
        if not self.journal.finish(r.request_id, answer):
            raise P.ProtocolError(P.E_ALREADY_FINAL, f"request {r.request_id} is already final", r.request_id)
        self.stats[answer["status"]] += 1
        del self.open[r.request_id]
        if r.holder is None:
            self.n_waiting -= 1
        else:
            holder = self.peers.get(r.holder)
            if holder is not None:
                holder.held.discard(r.request_id)
                if answer.get("associate_id") != holder.identity or answer["status"] != "answered":
                    self._send(r.holder, P.CANCEL, {"request_id": r.request_id, "reason": answer["status"]})
        cell_rid = self.cells.get(r.cell_id)
        if cell_rid is not None:
            self._send(cell_rid, P.RESULT, {"answer": answer})
        log.info(
            "request %s %s%s",
            r.request_id,
            answer["status"],
            f" by {answer['associate_id']}" if answer.get("associate_id") else "",
        )

    def _expire_due(self) -> None:
        now = time.time()
        while self.expiry and self.expiry[0][0] <= now:
            _, rid = heapq.heappop(self.expiry)
            r = self.open.get(rid)
            if r is not None:
                self._finish(r, {"status": "expired", "note": "deadline passed before a person answered"})

    def _drop_peer(self, peer: _Peer, why: str) -> None:
        self.peers.pop(peer.routing_id, None)
        if peer.cell_id is not None and self.cells.get(peer.cell_id) == peer.routing_id:
            del self.cells[peer.cell_id]
        peer.ready = False
        for rid in sorted(peer.held):
            r = self.open.get(rid)
            if r is not None and r.holder == peer.routing_id:
                self._requeue(r, f"associate {peer.identity} {why}")
        peer.held.clear()
        if peer.associate:
            log.info("associate %s gone (%s)", peer.identity, why)

    def _heartbeat_and_purge(self, now_m: float) -> None:
        self._write_delivered()
        limit = self.config.heartbeat_s * self.config.liveness
        for peer in list(self.peers.values()):
            if now_m - peer.last_seen > limit:
                self._drop_peer(peer, f"missed {self.config.liveness} heartbeats")
        body = {"instance": self.instance, "waiting": self.n_waiting, "t": time.time()}
        for routing_id in self.peers:
            self._send(routing_id, P.HEARTBEAT, body)
        self._flush()

    def _redeliver(self) -> None:
        self._write_delivered()
        cutoff = time.time() - self.config.redeliver_s
        for cell_id, answer in self.journal.undelivered():
            rid = self.cells.get(cell_id)
            if rid is not None and answer["answered_at"] < cutoff:
                self._send(rid, P.RESULT, {"answer": answer})
        self._flush()


def run_broker(config: BrokerConfig) -> int:
    """Bind and serve until SIGINT/SIGTERM; used by `pickcell broker` and `python -m hitl.broker`."""
    import signal

    broker = Broker(config)
    broker.bind()
    print(
        f"pickcell broker {broker.instance} listening on {broker.endpoint} "
        f"(journal {broker.journal.path}, curve={'off' if config.insecure else 'on'})",
        flush=True,
    )

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        broker._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    broker.serve()
    return 0


if __name__ == "__main__":
    from hitl.cli import main_broker

    raise SystemExit(main_broker())
