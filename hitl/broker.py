"""The assist broker: one ROUTER socket between cells (who ask) and associates (people who answer).

Majordomo-shaped (associates are workers that ask for work with READY), with the fixes the field notes
call for: a request held by an associate who disconnects or stops heartbeating goes back to the queue;
every accepted request and every final state is journaled (SQLite WAL, synchronous=FULL) before it is
acknowledged; CURVE + ZAP admit only the public keys in the allowlist folders.

Who may do what is bound to keys. Each admitted key has one role, from the allowlist folder it sits in
(allowed/cell/, allowed/associate/, allowed/console/; hitl/keys.py): a cell submits, cancels and confirms
its own requests, in its own request-id namespace, and sees nothing of other cells; an associate (or a
console, answering on behalf of a named person) asks for work and answers only what it holds. A key
taken out of the allowlist loses its open connections within one heartbeat. Every request is checked at
the door (a real PNG, candidates inside it, known grippers, probabilities, deadline); every refusal is an
`error` naming the field, a log line naming the key, and a Prometheus count.

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
import os
import socket
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
from hitl.broker_metrics import BrokerMetrics
from hitl.journal import Journal

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (cell_id, request_id): request ids live in their cell's namespace

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
_DAY_S = 86400.0


@dataclass(frozen=True)
class BrokerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    data_dir: Path = Path("broker-data")  # journal.sqlite lives here
    keys_dir: Path | None = None  # broker.key_secret + allowed/ROLE/; None only with insecure=True
    insecure: bool = False  # no CURVE: loopback experiments only
    heartbeat_s: float = P.HEARTBEAT_S  # s between heartbeats we send; peers must use the same
    liveness: int = P.HEARTBEAT_LIVENESS  # heartbeats missed before a peer counts as gone
    fair_window_s: float = 1.0  # s; deadlines closer than this are ordered by priority, then fairness
    max_batch: int = 1000  # messages per event-loop pass (= per journal transaction)
    redeliver_s: float = 5.0  # s between re-sends of final states a connected cell has not confirmed
    max_deadline_s: float = 3600.0  # s; a new request's deadline may be at most this far ahead
    max_credits: int = 100  # outstanding `ready` credits per connection (a console serves many people)
    retention_s: float = 7 * _DAY_S  # s a final state is kept after its cell confirmed it
    undelivered_retention_s: float = 30 * _DAY_S  # s a final state its cell never confirmed is kept
    prune_every_s: float = 3600.0  # s between retention passes over the journal
    metrics_port: int | None = None  # serve Prometheus /metrics on this port (0 = any free one)
    metrics_host: str = "127.0.0.1"


@dataclass
class _Peer:
    """One connection (ROUTER routing id). Several connections may share one key (= one identity)."""

    routing_id: bytes
    identity: str  # authenticated name (CURVE key name), or "insecure:<declared name>"
    role: str | None  # cell | associate | console (None: insecure peer that has not said yet)
    first_seen: float  # monotonic s
    last_seen: float  # monotonic s
    address: str = "?"
    fd: int | None = None  # the connection's socket (ZMQ_SRCFD), to close it if the key is revoked
    peer_name: Any = None  # getpeername() of that socket when first seen: guards against fd reuse
    cell_id: str | None = None
    credits: int = 0  # `ready`s not yet answered with an assignment


@dataclass
class _Open:
    """A request without a final state, in memory."""

    request_id: str
    cell_id: str
    deadline: float
    priority: int
    request: dict[str, Any]  # wire dict, sent as-is in ASSIGN
    width: int  # px, from the PNG header
    height: int
    seq: int = 0  # position in its cell's heap; stale heap entries carry an older seq
    holder: str | None = None  # identity (key name) of the associate/console holding it
    holder_conn: bytes | None = None  # the connection it was assigned on; None while orphaned
    orphan_since: float = 0.0  # monotonic s: when the holder's connection last spoke before it was lost
    orphan_until: float = 0.0  # monotonic s: back to the queue then unless the holder reconnected
    excluded: set[str] = field(default_factory=set)  # associates who skipped it

    @property
    def key(self) -> Key:
        return (self.cell_id, self.request_id)


class _Auth:
    """ZAP handler: CURVE keys from the allowlist folders, re-read when they change; refusals logged."""

    def __init__(self, context: zmq.Context, allowed_dir: Path):
        from zmq.auth.thread import ThreadAuthenticator

        from hitl.keys import Allowlist, load_role_allowlist

        self._load = load_role_allowlist
        self.allowed_dir = allowed_dir
        self.allowlist: Allowlist = Allowlist()
        self.roles: dict[str, str] = {}  # name -> role of every admitted key
        self.generation = 0  # bumps on every change
        self._stamp: tuple | None = None
        self._lock = threading.Lock()  # the ZAP thread and the broker thread both refresh
        self.refused = 0
        auth_log = logging.getLogger("hitl.broker.auth")
        outer = self

        class Authenticator(ThreadAuthenticator):
            async def handle_zap_message(self, msg: list[bytes]) -> None:
                outer._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
                await super().handle_zap_message(msg)

            def curve_user_id(self, client_public_key: bytes) -> str:
                from zmq.utils import z85

                k = outer.allowlist.keys.get(z85.encode(client_public_key))
                return k.name if k is not None else "unnamed"

        class Provider:
            def callback(self, domain: str, z85_key: bytes) -> bool:
                outer.refresh()
                allowlist = outer.allowlist
                if z85_key in allowlist.keys:
                    return True
                outer.refused += 1
                why = allowlist.refused.get(z85_key)
                if why is not None:
                    auth_log.warning("REFUSED CURVE connection from %s: %s", outer._address, why)
                else:
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

    def refresh(self) -> bool:
        """Re-read the allowlist if any file or folder under it changed; True if it did."""
        with self._lock:
            try:
                paths = [self.allowed_dir, *sorted(self.allowed_dir.rglob("*"))]
                stamp = tuple((str(p), p.stat().st_mtime_ns) for p in paths)
            except OSError:  # a file vanished while we looked: read again next time
                stamp = None
            if stamp == self._stamp and stamp is not None:
                return False
            self.allowlist = self._load(self.allowed_dir)
            self.roles = self.allowlist.roles
            self._stamp = stamp
            self.generation += 1
            by_role = {r: sorted(n for n, rr in self.roles.items() if rr == r) for r in P.ROLE_MESSAGES}
            log.info(
                "allowlist: %s; not admitted: %d",
                "; ".join(f"{r}: {', '.join(ns) or '-'}" for r, ns in by_role.items()),
                len(self.allowlist.refused),
            )
            return True

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


def _peer_name(fd: int | None) -> Any:
    """getpeername() of a connection's socket, or None."""
    if fd is None or fd < 0:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return s.getpeername()
    except OSError:
        return None


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None):
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.instance = uuid.uuid4().hex[:12]  # changes at every start: clients resubmit when it does
        self.journal = Journal(Path(config.data_dir) / "journal.sqlite")
        self.metrics = BrokerMetrics()
        self.metrics_port: int | None = None
        self.peers: dict[bytes, _Peer] = {}
        self.cells: dict[str, bytes] = {}  # cell_id -> routing id of its current connection
        self.answerers: dict[str, list[bytes]] = {}  # associate/console name -> its live connections
        self.open: dict[Key, _Open] = {}
        self.holds: dict[str, set[Key]] = {}  # associate/console name -> keys it holds
        self.orphans: set[Key] = set()  # held requests whose holder's connection was lost
        self.cell_heaps: dict[str, list[tuple[float, int, int, str]]] = {}
        self.expiry: list[tuple[float, str, str]] = []  # (deadline, cell_id, request_id)
        self.idle: deque[bytes] = deque()  # one entry per `ready` credit, first come first served
        self.served: dict[str, int] = {}  # cell_id -> pass number it was last served (fairness)
        self.n_waiting = 0
        self._seq = 0
        self._serve_count = 0
        self._out: list[tuple[bytes, bytes, dict]] = []  # sent after the next commit
        self._out_now: list[tuple[bytes, bytes, dict]] = []  # assignments, sent before it
        self._flush_cells: set[str] = set()
        self._delivered: list[tuple[str, str]] = []  # (request id, cell id) confirmations not yet written
        self._cuts: list[tuple[float, _Peer]] = []  # (monotonic due, peer): connections to close
        self._auth_generation = 0
        self._started_m = time.monotonic()
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
            "cut": 0,
            "pruned": 0,
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
                "!!! INSECURE BROKER: no CURVE encryption, no authentication, roles as declared. Anyone "
                "who can reach %s can submit and answer. For loopback experiments only. !!!",
                cfg.bind,
            )
        else:
            from hitl.keys import ALLOWED_DIR, BROKER_KEY_NAME, ClientKeys, KeyFileError

            if cfg.keys_dir is None:
                raise KeyFileError(
                    "CURVE is on by default: give a keys folder (broker.key_secret + allowed/ROLE/)"
                )
            own = ClientKeys.from_file(Path(cfg.keys_dir) / f"{BROKER_KEY_NAME}.key_secret")
            self.auth = _Auth(self.ctx, Path(cfg.keys_dir) / ALLOWED_DIR)
            self._auth_generation = self.auth.generation
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
        self._prune()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, self.metrics_port)
        log.info("broker %s listening on %s (curve=%s)", self.instance, self.endpoint, not cfg.insecure)
        return self.endpoint

    def _recover(self) -> None:
        """Requests the journal holds without a final state go back to the queue (crash recovery).

        One an associate held stays with that associate for the grace of `liveness` heartbeats: if it
        reconnects meanwhile (its client resends the answer), its answer still counts."""
        from hitl.protocol import png_size

        now_m = time.monotonic()
        for s in self.journal.open_requests():
            try:
                w, h = png_size(s.request.get("image_png", b""))
            except ValueError:  # stored before the door checked images: accept any pixel
                w = h = P.MAX_IMAGE_SIDE
            r = _Open(s.request_id, s.cell_id, s.deadline, s.priority, s.request, w, h)
            if s.holder:
                self._seq += 1
                r.seq, r.holder = self._seq, s.holder
                self.open[r.key] = r
                heapq.heappush(self.expiry, (r.deadline, r.cell_id, r.request_id))
                self.holds.setdefault(s.holder, set()).add(r.key)
                self._orphan(r, since=now_m)
            else:
                self._enqueue(r)
        counts = self.journal.counts()
        if counts["queued"] or counts["undelivered"]:
            log.info(
                "recovered %d open requests (%d held), %d undelivered final states",
                counts["queued"],
                len(self.orphans),
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
        self.metrics.close()
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
        next_prune = time.monotonic() + cfg.prune_every_s
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
                        # early answer is refused (the request is not held by anyone after the restart).
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
                if now_m >= next_prune:
                    self._prune()
                    next_prune = now_m + cfg.prune_every_s
                if self._cuts:
                    self._do_cuts(now_m)
                if self.idle and self.n_waiting:
                    with self.journal.transaction():
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
        msg_type = parts[1] if len(parts) > 1 else None
        peer = self.peers.get(routing_id)
        out_len = len(self._out)
        # One message's writes can be undone without losing the rest of the batch. Only messages whose
        # handler writes need the savepoint: two SQL statements fewer for every heartbeat, ready, status
        # and delivered (about half the traffic under load).
        writes = msg_type in _WRITING_TYPES
        if writes:
            self.journal.mark()
        try:
            if peer is None:
                peer = self._new_peer(routing_id, frames, now_m)
            peer.last_seen = now_m
            msg = P.decode(parts, P.CLIENT_TYPES)
            self._authorize(peer, msg)
            handler = self._handlers[msg.msg_type]
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s from %s %s", msg.msg_type.decode(), peer.role, peer.identity or routing_id.hex()
                )
            handler(self, peer, msg.body)
            if writes:
                self.journal.keep()
        except Exception as exc:
            if writes:
                self.journal.undo()
            del self._out[out_len:]
            if not isinstance(exc, P.ProtocolError):  # a bug of ours: say so, keep serving the others
                log.exception("internal error on a message from %s", _who_str(peer, routing_id))
                exc = P.ProtocolError(
                    P.E_INTERNAL, f"internal error ({type(exc).__name__}); nothing was stored"
                )
            self.stats["errors"] += 1
            name = P.ERROR_NAMES.get(exc.code, "error")
            role = peer.role if peer is not None else None
            self.metrics.refusal(name, exc.field, role)
            log.warning(
                "refused %s from %s: %d %s%s: %s",
                (msg_type or b"?")[:32].decode("ascii", "replace"),
                _who_str(peer, routing_id),
                exc.code,
                name,
                f" (field {exc.field})" if exc.field else "",
                exc.message,
            )
            self._send(
                routing_id,
                P.ERROR,
                P.error_body(exc.code, exc.message, exc.request_id, msg_type, exc.field, exc.cell_id),
            )

    # ---- identity and roles ----

    def _new_peer(self, routing_id: bytes, frames: list[zmq.Frame], now_m: float) -> _Peer:
        """The first message on a connection: who is it, and in which role may it speak?"""
        probe = frames[1] if len(frames) > 1 else frames[0]
        try:
            address = probe.get("Peer-Address")
        except zmq.ZMQError:
            address = "?"
        if self.config.insecure:
            peer = _Peer(routing_id, "", None, now_m, now_m, address=address)
            self.peers[routing_id] = peer
            return peer
        try:
            identity = probe.get("User-Id")
        except zmq.ZMQError:
            identity = ""
        try:
            fd = probe.get(zmq.SRCFD)
        except zmq.ZMQError:
            fd = None
        role = self.auth.roles.get(identity) if self.auth is not None else None
        peer = _Peer(routing_id, identity, role, now_m, now_m, address, fd, _peer_name(fd))
        if role is None:
            # Admitted by ZAP a moment ago but no longer in the allowlist (revoked since): never served.
            self._schedule_cut(peer, "its key is no longer in the allowlist")
            raise P.ProtocolError(P.E_FORBIDDEN, f"key {identity!r} has no role in this broker's allowlist")
        self.peers[routing_id] = peer
        if role in P.ANSWERING_ROLES:
            self._add_answerer(peer)
        self.metrics.connections.labels(role=role).inc()
        return peer

    def _authorize(self, peer: _Peer, msg: P.Message) -> None:
        if peer.role is None:  # insecure mode only: the peer declares its role (or its first message does)
            peer.role = self._declared_role(peer, msg)
            if peer.role is None:
                if msg.msg_type in (P.STATUS, P.HEARTBEAT, P.DISCONNECT):
                    return
                raise P.ProtocolError(P.E_FORBIDDEN, "say your role first (heartbeat {role})", field="role")
        if msg.msg_type not in P.ROLE_MESSAGES[peer.role]:
            raise P.ProtocolError(
                P.E_FORBIDDEN,
                f"a {peer.role} key may not send {msg.msg_type.decode()!r} "
                f"(allowed: {', '.join(sorted(t.decode() for t in P.ROLE_MESSAGES[peer.role]))})",
                _request_id_of(msg.body),
                field="type",
            )

    def _declared_role(self, peer: _Peer, msg: P.Message) -> str | None:
        declared = msg.body.get("role")
        if msg.msg_type == P.HEARTBEAT and declared in P.ROLE_MESSAGES:
            role = declared
        elif msg.msg_type in (P.SUBMIT, P.CANCEL, P.DELIVERED):
            role = P.CELL
        elif msg.msg_type in (P.READY, P.ANSWER, P.RELEASE):
            role = P.ASSOCIATE
        else:
            return None
        name = msg.body.get("name")
        if role == P.CELL:
            req = msg.body.get("request")
            name = msg.body.get("cell_id") or (req.get("cell_id") if isinstance(req, dict) else None) or name
        if not isinstance(name, str) or not name:
            name = peer.routing_id.hex()
        peer.identity = f"insecure:{name[: P.MAX_ID_CHARS]}"
        peer.role = role
        if role in P.ANSWERING_ROLES:
            self._add_answerer(peer)
        self.metrics.connections.labels(role=role).inc()
        return role

    def _cell_of(self, peer: _Peer, cell_id: str | None, request_id: str | None = None) -> str:
        """The cell a cell connection speaks for: its key's name. A body naming another cell is refused."""
        if self.config.insecure:
            own = peer.cell_id or cell_id or peer.identity.removeprefix("insecure:")
        else:
            own = peer.identity
        if cell_id is not None and cell_id != own:
            err = P.ProtocolError(
                P.E_FORBIDDEN,
                f"key {peer.identity!r} speaks for cell {own!r} only, not {cell_id!r} "
                "(cell_id = the key's name)",
                request_id,
                field="cell_id",
            )
            raise err
        if peer.cell_id != own:
            peer.cell_id = own
        if self.cells.get(own) != peer.routing_id:
            self.cells[own] = peer.routing_id
            self._flush_cells.add(own)  # a (re)connected cell gets its undelivered results
        return own

    def _add_answerer(self, peer: _Peer) -> None:
        conns = self.answerers.setdefault(peer.identity, [])
        if peer.routing_id not in conns:
            conns.append(peer.routing_id)
            log.info("%s %s connected (%d connection%s)", peer.role, peer.identity, len(conns),
                     "" if len(conns) == 1 else "s")  # fmt: skip
        # A new connection of a key adopts the requests that key held on a connection it lost
        # (the client reconnected, or the broker restarted): the person may still be answering.
        for key in sorted(self.holds.get(peer.identity, ())):
            r = self.open.get(key)
            if r is not None and r.holder_conn is None and r.orphan_since <= peer.first_seen:
                r.holder_conn = peer.routing_id
                self.orphans.discard(key)

    # ---- cell messages ----

    def _on_submit(self, peer: _Peer, body: dict) -> None:
        checked = P.validate_request(body)
        req = checked.request
        rid = req["request_id"]
        cell_id = self._cell_of(peer, req["cell_id"], rid)
        stored = self.journal.get(cell_id, rid)
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
                self._send(peer.routing_id, P.RESULT, {"answer": self.journal.answer(cell_id, rid)})
            return
        P.check_deadline(float(req["deadline"]), time.time(), self.config.max_deadline_s, rid)
        self.journal.add(req, submitted_by=peer.identity, received_at=time.time())
        self.stats["accepted"] += 1
        self.metrics.accepted.inc()
        self._enqueue(
            _Open(rid, cell_id, float(req["deadline"]), int(req.get("priority", 0) or 0), req, checked.width,
                  checked.height)
        )  # fmt: skip
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
        cell_id = self._cell_of(peer, P.opt_str(body, "cell_id"), rid)
        r = self.open.get((cell_id, rid))
        if r is None:
            stored = self.journal.get(cell_id, rid)
            if stored is None:
                raise P.ProtocolError(P.E_UNKNOWN_REQUEST, f"cell {cell_id} has no request {rid!r}", rid)
            raise P.ProtocolError(P.E_ALREADY_FINAL, f"request {rid} is already {stored.state}", rid)
        self._finish(r, {"status": "cancelled", "note": "cancelled by the cell"})
        self._send(peer.routing_id, P.ACK, {"ref": "cancel", "request_id": rid, "state": "cancelled"})

    def _on_delivered(self, peer: _Peer, body: dict) -> None:
        ids = body.get("request_ids")
        if not isinstance(ids, list) or len(ids) > 10_000 or not all(isinstance(i, str) for i in ids):
            raise P.ProtocolError(
                P.E_INVALID, "field 'request_ids' must be a list of strings", field="request_ids"
            )
        cell_id = self._cell_of(peer, P.opt_str(body, "cell_id"))
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

    # ---- associate / console messages ----

    def _on_ready(self, peer: _Peer, body: dict) -> None:
        if peer.credits >= self.config.max_credits:
            raise P.ProtocolError(
                P.E_INVALID,
                f"already {peer.credits} outstanding ready credits on this connection "
                f"(at most {self.config.max_credits})",
                field="ready",
            )
        peer.credits += 1
        self.idle.append(peer.routing_id)

    def _held(self, peer: _Peer, body: dict) -> _Open:
        """The open request an answer/release names, which this peer's key must hold.

        Refusals: 403 if it is not held by this key (whoever holds it, or if nobody ever gave it to this
        key: an unknown id looks the same, so nothing leaks), 409 if this key held or answered it and it
        has since reached its final state, 422 if the id alone is ambiguous and `cell_id` is missing."""
        rid = P.req_str(body, "request_id")
        cell_id = P.opt_str(body, "cell_id")
        who = peer.identity
        if cell_id is None:
            mine = [k for k in self.holds.get(who, ()) if k[1] == rid]
            if len(mine) > 1:
                raise P.ProtocolError(
                    P.E_INVALID, f"you hold {len(mine)} requests with id {rid!r}: say which cell_id", rid,
                    field="cell_id",
                )  # fmt: skip
            if mine:
                cell_id = mine[0][0]
        r = self.open.get((cell_id, rid)) if cell_id is not None else None
        if r is not None and r.holder == who:
            return r
        # Not held by us now. Did we hold or answer it before it became final?
        finals = self.journal.finished_by(who, rid)
        if cell_id is not None:
            finals = [f for f in finals if f[0] == cell_id]
        if finals:
            state = finals[-1][1]["status"]
            err = P.ProtocolError(P.E_ALREADY_FINAL, f"request {rid} is already {state}", rid)
        else:
            err = P.ProtocolError(
                P.E_FORBIDDEN, f"request {rid!r} is not held by {who}", rid, field="request_id"
            )
        err.cell_id = cell_id
        raise err

    def _on_answer(self, peer: _Peer, body: dict) -> None:
        behalf = body.get("on_behalf_of")
        rid = body.get("request_id") if isinstance(body.get("request_id"), str) else None
        if peer.role == P.CONSOLE:
            if not isinstance(behalf, str) or not behalf.strip() or len(behalf) > P.MAX_ID_CHARS:
                raise P.ProtocolError(
                    P.E_INVALID,
                    "a console's answer must name the person in 'on_behalf_of' (1..128 characters)",
                    body.get("request_id") if isinstance(body.get("request_id"), str) else None,
                    field="on_behalf_of",
                )
            if self.auth is not None and self.auth.roles.get(behalf) in (P.CELL, P.CONSOLE):
                raise P.ProtocolError(
                    P.E_INVALID, f"'on_behalf_of' names {behalf!r}, which is a "
                    f"{self.auth.roles[behalf]} key, not a person", rid, field="on_behalf_of",
                )  # fmt: skip
        elif behalf is not None:
            raise P.ProtocolError(
                P.E_FORBIDDEN, "only a console key may answer on behalf of someone else",
                rid, field="on_behalf_of",
            )  # fmt: skip
        r = self._held(peer, body)
        fields = P.validate_answer(body, r.request.get("candidates"), (r.width, r.height))
        who = {"associate_id": behalf, "via": peer.identity} if peer.role == P.CONSOLE else {
            "associate_id": peer.identity, "via": None}  # fmt: skip
        self._finish(r, {"status": "answered", **who, **fields})
        self._send(
            peer.routing_id, P.ACK,
            {"ref": "answer", "request_id": r.request_id, "cell_id": r.cell_id, "state": "answered"},
        )  # fmt: skip

    def _on_release(self, peer: _Peer, body: dict) -> None:
        skip = body.get("skip", False)
        if not isinstance(skip, bool):
            raise P.ProtocolError(P.E_INVALID, "field 'skip' must be true or false", field="skip")
        r = self._held(peer, body)
        # A console serves several people: which of them skipped is its business, so a console's skip
        # excludes nobody (it would lock every person behind that console out of the request).
        if skip and peer.role == P.ASSOCIATE:
            r.excluded.add(peer.identity)
        self._unhold(r)
        self._requeue(r, "skipped" if skip else "released")
        self._send(
            peer.routing_id, P.ACK,
            {"ref": "release", "request_id": r.request_id, "cell_id": r.cell_id, "state": P.QUEUED},
        )  # fmt: skip

    # ---- any role ----

    def _on_status(self, peer: _Peer, body: dict) -> None:
        """Counts for everyone; request ids and contents only of one's own (cell) or held/answered ones."""
        held_total = len(self.open) - self.n_waiting
        reply: dict[str, Any] = {
            "queue_waiting": self.n_waiting,
            "associates": len(self.answerers),
            "instance": self.instance,
            "role": peer.role,
            "name": peer.identity,
        }
        rid = P.opt_str(body, "request_id")
        if peer.role == P.CELL:
            cell_id = self._cell_of(peer, P.opt_str(body, "cell_id"), rid)
            mine = [r for r in self.open.values() if r.cell_id == cell_id]
            reply["waiting"] = sum(1 for r in mine if r.holder is None)
            reply["held"] = sum(1 for r in mine if r.holder is not None)
            if rid is not None:
                stored = self.journal.get(cell_id, rid)
                reply["request_id"] = rid
                reply["state"] = stored.state if stored else None
                reply["answer"] = (
                    self.journal.answer(cell_id, rid) if stored and stored.state != P.QUEUED else None
                )
        elif peer.role in P.ANSWERING_ROLES:
            holding = sorted(self.holds.get(peer.identity, ()))
            reply["waiting"] = self.n_waiting
            reply["held"] = len(holding)
            reply["held_total"] = held_total
            reply["holding"] = [{"cell_id": c, "request_id": i} for c, i in holding]
            if rid is not None:
                cell_id = P.opt_str(body, "cell_id")
                reply["request_id"] = rid
                reply["state"], reply["answer"] = None, None
                mine = [k for k in holding if k[1] == rid and (cell_id is None or k[0] == cell_id)]
                if mine:
                    reply["state"], reply["cell_id"] = P.QUEUED, mine[0][0]
                else:
                    finals = [f for f in self.journal.finished_by(peer.identity, rid)
                              if cell_id is None or f[0] == cell_id]  # fmt: skip
                    if finals:
                        reply["cell_id"], reply["answer"] = finals[-1]
                        reply["state"] = reply["answer"]["status"]
        else:  # insecure peer that has not said its role: counts only
            reply["waiting"] = self.n_waiting
            reply["held"] = held_total
        self._send(peer.routing_id, P.STATUS, reply)

    def _on_heartbeat(self, peer: _Peer, body: dict) -> None:
        declared = body.get("role")
        if declared is not None and declared != peer.role and peer.role is not None:
            raise P.ProtocolError(
                P.E_FORBIDDEN,
                f"heartbeat says role {declared!r}, but this key is a {peer.role}",
                field="role",
            )
        if peer.role == P.CELL:
            name = body.get("name")
            self._cell_of(peer, name if isinstance(name, str) and name else None)

    def _on_disconnect(self, peer: _Peer, body: dict) -> None:
        self._drop_peer(peer, "said goodbye", graceful=True)

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

    # ---- queue ----

    def _enqueue(self, r: _Open) -> None:
        self._seq += 1
        r.seq = self._seq
        r.holder = None
        r.holder_conn = None
        if r.key not in self.open:
            heapq.heappush(self.expiry, (r.deadline, r.cell_id, r.request_id))
        self.open[r.key] = r
        heapq.heappush(
            self.cell_heaps.setdefault(r.cell_id, []), (r.deadline, -r.priority, r.seq, r.request_id)
        )
        self.n_waiting += 1

    def _unhold(self, r: _Open) -> None:
        if r.holder is not None:
            self.holds.get(r.holder, set()).discard(r.key)
        self.orphans.discard(r.key)

    def _requeue(self, r: _Open, why: str) -> None:
        self.stats["requeued"] += 1
        log.info("request %s of %s back in the queue (%s)", r.request_id, r.cell_id, why)
        self.journal.set_holder(r.cell_id, r.request_id, None)
        self._enqueue(r)

    def _orphan(self, r: _Open, since: float) -> None:
        """The holder's connection is gone: keep the hold for one liveness window, for a reconnect."""
        r.holder_conn = None
        r.orphan_since = since
        r.orphan_until = time.monotonic() + self.config.heartbeat_s * self.config.liveness
        self.orphans.add(r.key)

    def _is_waiting(self, cell_id: str, entry: tuple[float, int, int, str]) -> bool:
        r = self.open.get((cell_id, entry[3]))
        return r is not None and r.holder is None and r.seq == entry[2]

    def _pick(self, who: str) -> tuple[str, tuple] | None:
        """The next request for associate `who` (see module doc for the order), or None."""
        heads = []
        for cell_id in list(self.cell_heaps):
            heap = self.cell_heaps[cell_id]
            while heap and not self._is_waiting(cell_id, heap[0]):
                heapq.heappop(heap)
            if not heap:
                del self.cell_heaps[cell_id]
                continue
            head = heap[0]
            if who in self.open[(cell_id, head[3])].excluded:  # rare: `who` skipped the head; look deeper
                head = next(
                    (e for e in sorted(heap)
                     if self._is_waiting(cell_id, e) and who not in self.open[(cell_id, e[3])].excluded),
                    None,
                )  # fmt: skip
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
            if peer is None or peer.credits <= 0:
                continue
            picked = self._pick(peer.identity)
            if picked is None:
                skipped.append(routing_id)  # everything waiting was skipped by this associate
                continue
            cell_id, head = picked
            r = self.open[(cell_id, head[3])]
            r.holder = peer.identity
            r.holder_conn = routing_id
            self.holds.setdefault(peer.identity, set()).add(r.key)
            self.journal.set_holder(r.cell_id, r.request_id, peer.identity)
            self.n_waiting -= 1
            self._serve_count += 1
            self.served[cell_id] = self._serve_count
            peer.credits -= 1
            self.stats["assigned"] += 1
            log.debug("assign %s/%s to %s (%d waiting)", cell_id, r.request_id, peer.identity, self.n_waiting)
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
            "gripper": None,
            "associate_id": None,
            "via": None,
            "answered_at": time.time(),
            "note": "",
            **fields,
        }
        if not self.journal.finish(r.cell_id, r.request_id, answer):
            raise P.ProtocolError(P.E_ALREADY_FINAL, f"request {r.request_id} is already final", r.request_id)
        self.stats[answer["status"]] += 1
        self.metrics.final_states.labels(state=answer["status"]).inc()
        del self.open[r.key]
        if r.holder is None:
            self.n_waiting -= 1
        else:
            self._unhold(r)
            if answer["status"] != "answered":  # the holder answered it itself otherwise
                for conn in self.answerers.get(r.holder, ()):
                    body = {"request_id": r.request_id, "cell_id": r.cell_id, "reason": answer["status"]}
                    self._send(conn, P.CANCEL, body)
        cell_rid = self.cells.get(r.cell_id)
        if cell_rid is not None:
            self._send(cell_rid, P.RESULT, {"answer": answer})
        by = answer.get("associate_id")
        log.info(
            "request %s of %s %s%s%s",
            r.request_id,
            r.cell_id,
            answer["status"],
            f" by {by}" if by else "",
            f" via {answer['via']}" if answer.get("via") else "",
        )

    def _expire_due(self) -> None:
        now = time.time()
        while self.expiry and self.expiry[0][0] <= now:
            _, cell_id, rid = heapq.heappop(self.expiry)
            r = self.open.get((cell_id, rid))
            if r is not None:
                self._finish(r, {"status": "expired", "note": "deadline passed before a person answered"})

    def _drop_peer(self, peer: _Peer, why: str, graceful: bool = False) -> None:
        """Forget a connection. Requests it held wait one liveness window for the same key to reconnect
        (or go back to the queue at once if it said goodbye, or if no connection of that key is left
        after the window)."""
        if self.peers.pop(peer.routing_id, None) is None:
            return
        if peer.role is not None:
            self.metrics.connections.labels(role=peer.role).dec()
        if peer.cell_id is not None and self.cells.get(peer.cell_id) == peer.routing_id:
            del self.cells[peer.cell_id]
        peer.credits = 0
        if peer.role not in P.ANSWERING_ROLES:
            return
        conns = self.answerers.get(peer.identity, [])
        if peer.routing_id in conns:
            conns.remove(peer.routing_id)
        if not conns:
            self.answerers.pop(peer.identity, None)
        for key in sorted(self.holds.get(peer.identity, ())):
            r = self.open.get(key)
            if r is None or r.holder_conn != peer.routing_id:
                continue
            if graceful:
                self._unhold(r)
                self._requeue(r, f"{peer.role} {peer.identity} {why}")
                continue
            self._orphan(r, since=peer.last_seen)
            # Adopted at once by a connection of the same key opened after this one last spoke.
            for conn in reversed(conns):
                other = self.peers.get(conn)
                if other is not None and other.first_seen >= peer.last_seen:
                    r.holder_conn = conn
                    self.orphans.discard(key)
                    break
        log.info("%s %s connection gone (%s)", peer.role, peer.identity, why)

    def _requeue_orphans(self, now_m: float) -> None:
        for key in sorted(self.orphans):
            r = self.open.get(key)
            if r is None or r.holder_conn is not None:
                self.orphans.discard(key)
                continue
            if now_m >= r.orphan_until:
                holder = r.holder
                self._unhold(r)
                self._requeue(r, f"{holder} did not come back within {self.config.liveness} heartbeats")

    def _heartbeat_and_purge(self, now_m: float) -> None:
        self._write_delivered()
        limit = self.config.heartbeat_s * self.config.liveness
        with self.journal.transaction():
            self._check_allowlist()
            for peer in list(self.peers.values()):
                if now_m - peer.last_seen > limit:
                    self._drop_peer(peer, f"missed {self.config.liveness} heartbeats")
            self._requeue_orphans(now_m)
        body = {"instance": self.instance, "waiting": self.n_waiting, "t": time.time()}
        for routing_id in self.peers:
            self._send(routing_id, P.HEARTBEAT, body)
        self.metrics.waiting.set(self.n_waiting)
        self.metrics.held.set(len(self.open) - self.n_waiting)
        self._flush()

    # ---- revocation ----

    def _check_allowlist(self) -> None:
        """Re-read the allowlist if it changed; connections whose key lost (or changed) its role are cut."""
        if self.auth is None:
            return
        self.auth.refresh()
        if self.auth.generation == self._auth_generation:
            return
        self._auth_generation = self.auth.generation
        roles = self.auth.roles
        for peer in list(self.peers.values()):
            if roles.get(peer.identity) != peer.role:
                now_role = roles.get(peer.identity)
                why = "revoked" if now_role is None else f"now a {now_role} key"
                log.warning("key %s (%s) %s: closing its connection from %s", peer.identity, peer.role, why,
                            peer.address)  # fmt: skip
                msg = f"key {peer.identity!r} was {why}; closing this connection"
                self._send(peer.routing_id, P.ERROR, P.error_body(P.E_FORBIDDEN, msg))
                self._drop_peer(peer, f"key {why}", graceful=True)
                self._schedule_cut(peer, why)

    def _schedule_cut(self, peer: _Peer, why: str) -> None:
        # A moment's delay lets the error reply leave before the socket closes.
        self._cuts.append((time.monotonic() + min(0.2, self.config.heartbeat_s), peer))

    def _do_cuts(self, now_m: float) -> None:
        due = [c for c in self._cuts if c[0] <= now_m]
        if not due:
            return
        self._cuts = [c for c in self._cuts if c[0] > now_m]
        for _, peer in due:
            # Close only the very connection we saw: the fd must still be a socket to the same remote
            # address and port (an fd number can be reused by a later connection).
            if peer.fd is None or peer.peer_name is None or _peer_name(peer.fd) != peer.peer_name:
                log.info("connection of %s from %s already closed", peer.identity, peer.address)
                continue
            try:
                with socket.socket(fileno=os.dup(peer.fd)) as s:
                    s.shutdown(socket.SHUT_RDWR)  # libzmq sees the end of the stream and drops the pipe
            except OSError as exc:
                log.info("closing the connection of %s: %s", peer.identity, exc)
                continue
            self.stats["cut"] += 1
            self.metrics.cut.inc()
            log.warning(
                "CLOSED the connection of key %s from %s (no longer admitted)", peer.identity, peer.address
            )

    # ---- delivery and retention ----

    def _redeliver(self) -> None:
        self._write_delivered()
        cutoff = time.time() - self.config.redeliver_s
        for cell_id, answer in self.journal.undelivered():
            rid = self.cells.get(cell_id)
            if rid is not None and answer["answered_at"] < cutoff:
                self._send(rid, P.RESULT, {"answer": answer})
        self._flush()

    def _prune(self) -> None:
        cfg = self.config
        with self.journal.transaction():
            n = self.journal.prune(time.time(), cfg.retention_s, cfg.undelivered_retention_s)
        if n:
            self.stats["pruned"] += n
            log.info("journal retention: deleted %d final states (older than the retention settings)", n)


# Message types whose handlers may write to the journal (the others only read it, or not at all).
_WRITING_TYPES = frozenset({P.SUBMIT, P.CANCEL, P.ANSWER, P.RELEASE, P.DISCONNECT})


def _request_id_of(body: dict) -> str | None:
    """The request id a body names (directly or in its request map), for an error reply; else None."""
    for holder in (body, body.get("request")):
        if isinstance(holder, dict):
            rid = holder.get("request_id")
            if isinstance(rid, str) and 0 < len(rid) <= P.MAX_ID_CHARS:
                return rid
    return None


def _who_str(peer: _Peer | None, routing_id: bytes) -> str:
    if peer is None:
        return f"connection {routing_id.hex()}"
    return f"{peer.role or 'unknown-role'} key {peer.identity or routing_id.hex()} ({peer.address})"


def run_broker(config: BrokerConfig) -> int:
    """Bind and serve until SIGINT/SIGTERM; used by `pickcell broker` and `python -m hitl.broker`."""
    import signal

    broker = Broker(config)
    broker.bind()
    print(
        f"pickcell broker {broker.instance} listening on {broker.endpoint} "
        f"(journal {broker.journal.path}, curve={'off' if config.insecure else 'on'}"
        + (
            f", metrics http://{config.metrics_host}:{broker.metrics_port}/metrics"
            if broker.metrics_port
            else ""
        )
        + ")",
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
