"""The cell's side of the fleet: a Clone-pattern subscriber that keeps the cell on the version the
fleet assigns it, downloads model files in chunks (resuming after a break), verifies each one (sha256
and the fleet's ed25519 signature) before anything loads it, and reports the cell's status.

One thread, two sockets to the fleet service (both CURVE clients):
    SUB     numbered updates and heartbeats
    DEALER  snapshot requests, chunk requests, status reports
Clone pattern (ZeroMQ Guide ch. 5): subscribe first, then ask for a snapshot; updates numbered up to
the snapshot's are dropped, later ones applied in order; a gap in the numbers, a heartbeat carrying a
larger number, or a new service epoch (a restarted service) means "ask for a snapshot again"; three
heartbeats missed means the service is gone: reconnect with backoff (0.5 s doubling to 8 s).

A file that fails verification is deleted and refused (the refusal is reported to the service); the
running model keeps working. Nothing here unpickles: the loader the cell hands us reads safetensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from fleet import signing
from fleet.net import ClientSecurity, WireError, pack, unpack

log = logging.getLogger(__name__)

# (path, version) -> (loaded?, message). Called on the subscriber's thread; must not raise.
ModelHook = Callable[[Path, str], tuple[bool, str]]
ShadowHook = Callable[[Path | None, str | None], tuple[bool, str]]


@dataclass(frozen=True)
class LinkConfig:
    cell_id: str
    router: str  # the fleet service's ROUTER endpoint
    pub: str  # the fleet service's PUB endpoint
    data_dir: Path  # the cell's data folder; models land in <data>/fleet/models
    keys_dir: Path | None  # <cell>.key_secret, fleet.key, signing.pub
    site: str = "site-1"
    insecure: bool = False  # no CURVE (loopback tests only); signatures are checked regardless
    signing_key: Path | None = None  # default: <keys_dir>/signing.pub
    heartbeat_s: float = 1.0  # the service's heartbeat interval, seconds (must match the service)
    status_interval_s: float = 2.0  # seconds between status reports
    chunk_bytes: int = 256 * 1024  # bytes asked per chunk (the service may send fewer)
    window: int = 4  # chunk requests in flight
    fetch_timeout_s: float = 3.0  # no chunk for this long: ask again from what we have, seconds


@dataclass
class _Download:
    version: str
    meta: dict[str, Any]
    part: Path
    have: int = 0
    next_offset: int = 0
    step: int = 0  # bytes per request: ours, or the service's if it sends less
    last_rx: float = field(default_factory=time.monotonic)


class FleetLink:
    """Keeps one cell in step with the fleet. `status()` gives what the cell reports (a callable)."""

    def __init__(
        self,
        config: LinkConfig,
        on_model: ModelHook,
        on_shadow: ShadowHook | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.on_model = on_model
        self.on_shadow = on_shadow
        self.status_fn = status or (lambda: {})
        self.models_dir = Path(config.data_dir) / "fleet" / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        key_path = config.signing_key or (Path(config.keys_dir or ".") / signing.PUBLIC_NAME)
        self.public_key = signing.load_public(key_path)
        self.kv: dict[str, Any] = {}
        self.seq = -1
        self.epoch: str | None = None
        self.live_version: str | None = None  # what on_model last accepted from the fleet
        self.shadow_version: str | None = None
        self.refused: list[dict[str, Any]] = []  # verification or load refusals, newest last
        self.applied = threading.Event()  # set whenever the assigned version is in use
        self.snapshots = 0  # snapshots taken (first connect, gaps, reconnects)
        self.reconnects = 0
        self._refused_keys: set[tuple[str, str, bytes]] = set()
        self._download: _Download | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._paused = threading.Event()  # tests and the load benchmark: drop off the network
        self.online = threading.Event()  # set while a session (sockets open) is running

    # --- public --------------------------------------------------------------------------------

    def start(self) -> FleetLink:
        self._thread = threading.Thread(
            target=self._run, name=f"fleet-link-{self.config.cell_id}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def disconnect(self) -> None:
        """Drop off the network (sockets closed) until `reconnect()`: a cell that goes offline."""
        self._paused.set()

    def reconnect(self) -> None:
        self._paused.clear()

    def assignment(self) -> tuple[str | None, str | None, str]:
        """(version to run, version to shadow, stage name) for this cell under the current rollout."""
        r = self.kv.get("rollout") or {}
        live, cand, stage = r.get("live"), r.get("candidate"), r.get("stage")
        mine = self.config.cell_id in (r.get("cells") or [])
        if cand is not None and stage == "canary" and mine:
            return cand, None, "canary"
        if cand is not None and stage == "shadow" and mine:
            return live, cand, "shadow"
        return live, None, "live"

    # --- the loop ------------------------------------------------------------------------------

    def _open(self, ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
        sec = ClientSecurity(self.config.keys_dir, self.config.cell_id, self.config.insecure)
        sub = ctx.socket(zmq.SUB)
        dealer = ctx.socket(zmq.DEALER)
        for s in (sub, dealer):
            s.setsockopt(zmq.LINGER, 0)
            sec.apply(s)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.config.pub)
        dealer.connect(self.config.router)
        return sub, dealer

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        backoff = 0.5
        while not self._halt.is_set():
            if self._paused.is_set():
                time.sleep(0.05)
                continue
            sub, dealer = self._open(ctx)
            self.online.set()
            try:
                heard = self._session(sub, dealer)
            except Exception:
                log.exception("fleet link %s: session failed", self.config.cell_id)
                heard = False
            finally:
                sub.close(0)
                dealer.close(0)
                self.online.clear()
            if self._halt.is_set():
                break
            self.reconnects += 1
            backoff = 0.5 if heard else min(backoff * 2, 8.0)
            if not self._paused.is_set():
                self._halt.wait(backoff)
        self._last_word(ctx)

    def _last_word(self, ctx: zmq.Context) -> None:
        """The cell is stopping: say so on a connection of its own (in or between sessions alike)."""
        if self._paused.is_set():
            return
        dealer = ctx.socket(zmq.DEALER)
        try:
            ClientSecurity(self.config.keys_dir, self.config.cell_id, self.config.insecure).apply(dealer)
            dealer.setsockopt(
                zmq.LINGER, 2000
            )  # ms the message may wait for the connection (CURVE handshake)
            dealer.connect(self.config.router)
            self._send_status(dealer)
        finally:
            dealer.close()

    def _session(self, sub: zmq.Socket, dealer: zmq.Socket) -> bool:
        """One connection; returns when the service is presumed gone. True if it was ever heard."""
        cfg = self.config
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        syncing = True
        buffered: list[dict[str, Any]] = []
        dealer.send(pack({"t": "snapshot"}))
        asked = time.monotonic()
        last_heard = time.monotonic()
        heard = False
        next_status = 0.0
        self._download = None
        while not self._halt.is_set() and not self._paused.is_set():
            events = dict(poller.poll(50))
            now = time.monotonic()
            if sub in events:
                while True:
                    try:
                        topic, raw = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ValueError:
                        continue
                    try:
                        msg = _unpack_any(raw)
                    except WireError:
                        continue
                    last_heard, heard = now, True
                    if msg.get("epoch") != self.epoch and not syncing:
                        syncing = True  # the service restarted: its numbers start again
                        buffered = []
                        dealer.send(pack({"t": "snapshot"}))
                        asked = now
                    if topic == b"hb":
                        if not syncing and int(msg.get("seq", -1)) > self.seq:
                            syncing, buffered = True, []  # we missed an update
                            dealer.send(pack({"t": "snapshot"}))
                            asked = now
                    elif topic == b"kv":
                        if syncing:
                            buffered.append(msg)
                        elif int(msg["seq"]) == self.seq + 1:
                            self._apply_update(msg, dealer)
                        elif int(msg["seq"]) > self.seq + 1:
                            syncing, buffered = True, [msg]
                            dealer.send(pack({"t": "snapshot"}))
                            asked = now
            if dealer in events:
                while True:
                    try:
                        raw = dealer.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = unpack(raw)
                    except WireError:
                        continue
                    last_heard, heard = now, True
                    if msg["t"] == "snapshot":
                        self.kv = dict(msg["kv"])
                        self.seq = int(msg["seq"])
                        self.epoch = msg["epoch"]
                        self.snapshots += 1
                        syncing = False
                        for u in sorted(buffered, key=lambda m: int(m["seq"])):
                            if u.get("epoch") == self.epoch and int(u["seq"]) == self.seq + 1:
                                self._apply_update(u, dealer)
                        buffered = []
                        self._reconcile(dealer)
                    elif msg["t"] == "chunk":
                        self._on_chunk(dealer, msg)
                    elif msg["t"] == "error":
                        log.warning("fleet service: %s", msg.get("error"))
                        if self._download is not None and msg.get("version") == self._download.version:
                            self._download = None
            if syncing and now - asked > 2 * cfg.heartbeat_s:
                dealer.send(pack({"t": "snapshot"}))  # the request or its answer was lost
                asked = now
            d = self._download
            if d is not None and now - d.last_rx > cfg.fetch_timeout_s:
                self._restart_download(dealer)
            if now >= next_status:
                self._send_status(dealer)
                next_status = now + cfg.status_interval_s
            if now - last_heard > 3 * cfg.heartbeat_s:
                log.warning(
                    "fleet link %s: no heartbeat for %.1f s; reconnecting", cfg.cell_id, now - last_heard
                )
                return heard
        return heard

    def _apply_update(self, msg: dict[str, Any], dealer: zmq.Socket) -> None:
        self.seq = int(msg["seq"])
        if msg["value"] is None:  # a deleted key
            self.kv.pop(msg["key"], None)
        else:
            self.kv[msg["key"]] = msg["value"]
        self._reconcile(dealer)

    # --- bring the cell to its assignment ----------------------------------------------------------

    def _final_path(self, version: str) -> Path:
        return self.models_dir / f"{version}.safetensors"

    def _reconcile(self, dealer: zmq.Socket) -> None:
        run, shadow, _stage = self.assignment()
        if self._download is not None and self._download.version not in (run, shadow):
            self._download = None  # no longer assigned (a rollback mid-download); its .part stays for later
        ready: set[str] = set()  # versions whose file is here and verified against the announcement
        for v in (run, shadow):
            if v is None:
                continue
            meta = self.kv.get(f"model/{v}")
            if meta is None or self._is_refused(v, meta):
                continue  # not announced (yet), or refused: the cell stays on what it runs
            if self._verified(v, meta):
                ready.add(v)
                continue
            if self._download is None or self._download.version != v:
                self._start_download(v, meta)
            self._pump(dealer)
            return  # one file at a time; the rest once this one is in
        if run is not None and run != self.live_version and run in ready:
            ok, text = self._call(self.on_model, self._final_path(run), run)
            if ok:
                self.live_version = run
                log.info("fleet link %s: running %s", self.config.cell_id, run)
            else:
                self._refuse(run, self.kv[f"model/{run}"], f"the cell refused to load it: {text}")
        if shadow != self.shadow_version and (shadow is None or shadow in ready):
            if self.on_shadow is None:
                self.shadow_version = shadow
            else:
                ok, text = self._call(self.on_shadow, self._final_path(shadow) if shadow else None, shadow)
                if ok:
                    self.shadow_version = shadow
                elif shadow is not None:
                    self._refuse(shadow, self.kv[f"model/{shadow}"], f"the cell refused to shadow it: {text}")
        if (run is None or run == self.live_version) and shadow == self.shadow_version:
            self.applied.set()
        else:
            self.applied.clear()

    def _call(self, hook: Callable[..., tuple[bool, str]], *args: Any) -> tuple[bool, str]:
        """A cell's loader must not take the subscriber down: an exception is a refusal."""
        try:
            return hook(*args)
        except Exception as exc:
            log.exception("fleet link %s: loader failed", self.config.cell_id)
            return False, f"{type(exc).__name__}: {exc}"

    def _verified(self, version: str, meta: dict[str, Any]) -> bool:
        """The final file exists and matches meta (hash, size, signature). Re-checked every time."""
        p = self._final_path(version)
        if not p.exists():
            return False
        ok, why = self._check(p, version, meta)
        if not ok:
            log.error(
                "fleet link %s: cached %s no longer verifies (%s); fetching again",
                self.config.cell_id,
                p,
                why,
            )
            p.unlink(missing_ok=True)
        return ok

    def _check(self, path: Path, version: str, meta: dict[str, Any]) -> tuple[bool, str]:
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                size += len(block)
        if size != int(meta["size"]):
            return False, f"size {size} != announced {meta['size']}"
        if h.hexdigest() != meta["sha256"]:
            return False, f"sha256 {h.hexdigest()[:16]}... != announced {str(meta['sha256'])[:16]}..."
        if not signing.verify(self.public_key, meta["signature"], version, meta["sha256"], size):
            return False, "the signature is not the fleet's"
        return True, ""

    def _key(self, version: str, meta: dict[str, Any]) -> tuple[str, str, bytes]:
        return version, str(meta.get("sha256")), bytes(meta.get("signature", b""))

    def _is_refused(self, version: str, meta: dict[str, Any]) -> bool:
        return self._key(version, meta) in self._refused_keys

    def _refuse(self, version: str, meta: dict[str, Any], why: str) -> None:
        self._refused_keys.add(self._key(version, meta))
        self.refused.append({"version": version, "reason": why, "time": time.time()})
        del self.refused[:-20]
        log.error("fleet link %s: REFUSED model %s: %s", self.config.cell_id, version, why)

    # --- chunked download with resume --------------------------------------------------------------

    def _start_download(self, version: str, meta: dict[str, Any]) -> None:
        part = self.models_dir / f"{version}.safetensors.part"
        have = part.stat().st_size if part.exists() else 0
        if have > int(meta["size"]):
            part.unlink()
            have = 0
        self._download = _Download(
            version, meta, part, have=have, next_offset=have, step=self.config.chunk_bytes
        )

    def _restart_download(self, dealer: zmq.Socket) -> None:
        d = self._download
        assert d is not None
        d.next_offset = d.have
        d.last_rx = time.monotonic()
        self._pump(dealer)

    def _pump(self, dealer: zmq.Socket) -> None:
        d = self._download
        if d is None:
            return
        size = int(d.meta["size"])
        if d.have >= size:
            self._finish(dealer)
            return
        step = d.step
        while d.next_offset < size and d.next_offset - d.have < self.config.window * step:
            dealer.send(pack({"t": "fetch", "version": d.version, "offset": d.next_offset, "length": step}))
            d.next_offset += step

    def _on_chunk(self, dealer: zmq.Socket, msg: dict[str, Any]) -> None:
        d = self._download
        if d is None or msg.get("version") != d.version:
            return
        offset, data = int(msg["offset"]), bytes(msg["data"])
        if offset != d.have:
            return  # a late answer to a request we already re-sent; ignore it
        with open(d.part, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        d.have += len(data)
        d.last_rx = time.monotonic()
        if not data and d.have < int(d.meta["size"]):
            self._fail_download(f"the service sent an empty chunk at {offset} of {d.meta['size']}")
            return
        if len(data) < d.step and d.have < int(d.meta["size"]):
            # The service caps chunks below our request: ask again from here in its size (answers to
            # the requests already out are dropped unless one lands exactly where we are, where its
            # bytes are the right ones anyway).
            d.step = len(data)
            d.next_offset = d.have
        self._pump(dealer)

    def _finish(self, dealer: zmq.Socket) -> None:
        d = self._download
        assert d is not None
        self._download = None
        ok, why = self._check(d.part, d.version, d.meta)
        if not ok:
            d.part.unlink(missing_ok=True)
            self._refuse(d.version, d.meta, why)
            return
        final = self._final_path(d.version)
        os.replace(d.part, final)
        Path(str(final) + ".sha256").write_text(f"{d.meta['sha256']}  {final.name}\n")
        self._reconcile(dealer)

    def _fail_download(self, why: str) -> None:
        d = self._download
        assert d is not None
        self._download = None
        d.part.unlink(missing_ok=True)
        self._refuse(d.version, d.meta, why)

    # --- status ---------------------------------------------------------------------------------

    def _send_status(self, dealer: zmq.Socket) -> None:
        _run, _shadow, stage = self.assignment()
        try:
            extra = self.status_fn()
        except Exception:
            log.exception("fleet link %s: status provider failed", self.config.cell_id)
            extra = {}
        body = {
            "t": "status",
            "cell": self.config.cell_id,
            "site": self.config.site,
            "model_version": self.live_version,
            "stage": stage,
            "refused": self.refused[-5:],
            "state": "picking",
            **extra,
        }
        if self.shadow_version is None:
            body.pop("shadow", None)
        dealer.send(pack(body))


def _unpack_any(raw: bytes) -> dict[str, Any]:
    """PUB bodies carry no 't' (the topic frame says what they are)."""
    import msgpack

    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:
        raise WireError(f"not a msgpack message ({exc})") from None
    if not isinstance(body, dict):
        raise WireError("an update is a map")
    return body
