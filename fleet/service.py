"""`pickcell fleet serve`: the fleet service. Holds the registry and the rollout, publishes to every
cell with the ZeroMQ Guide's Clone pattern, collects the cells' status, and judges each stage.

Sockets (CURVE servers; cells must be in `<fleet>/keys/allowed/`):
    ROUTER  `router` endpoint  snapshot on connect, model-file chunks, cells' status reports
    PUB     `pub` endpoint     numbered key-value updates and heartbeats (carrying the latest number)
    REP     ipc://<fleet>/control.sock   publish / promote / rollback / status for people (file
            permissions on the fleet folder decide who may: the same rule as the cell's control socket)
The wire protocol is in docs/fleet.md. Everything runs on one thread (ZeroMQ sockets are not
thread-safe); the state that must survive a restart (rollout.json, verdicts.jsonl, the registry) is
written atomically before the update goes out.

The state published, as key -> value:
    model/<version>   {version, sha256, size, signature}: a version a cell may need
    rollout           {live, candidate, stage, cells, generation}: who runs what
A cell runs `candidate` if the stage is canary and it is one of `cells`, else `live`; in shadow, the
named `cells` also score every plan with `candidate` beside `live`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from fleet import signing
from fleet.net import Allowlist, ServerSecurity, WireError, pack, peer_name, unpack
from fleet.rollout import Counts, RolloutConfig, StageVerdict, canary_cells, judge
from grasping.modelfile import ModelFileError
from grasping.registry import ModelRegistry, RegistryError

log = logging.getLogger(__name__)

STATE_NAME = "rollout.json"
VERDICTS_NAME = "verdicts.jsonl"
CELL_STATES = ("picking", "waiting_for_person", "stopped", "protective_stop", "starting")


class FleetError(Exception):
    """A fleet operation that cannot be done; the message says why and what to do."""


def control_endpoint(fleet_dir: Path) -> str:
    return f"ipc://{Path(fleet_dir).resolve() / 'control.sock'}"


@dataclass(frozen=True)
class ServiceConfig:
    fleet_dir: Path  # the fleet folder (keys/, registry/, rollout.json, fleet.toml)
    router: str = "tcp://127.0.0.1:5570"  # snapshot, chunks, status
    pub: str = "tcp://127.0.0.1:5571"  # updates and heartbeats
    insecure: bool = False  # no CURVE (loopback tests only)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    registry: Path | None = None  # the model registry (default <fleet>/registry); share it with the learner


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FleetService:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.dir = Path(config.fleet_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.registry = ModelRegistry(config.registry or self.dir / "registry")
        self._key = signing.load_private(self.dir / "keys" / signing.PRIVATE_NAME)
        self.state = self._load_state()
        self.epoch = secrets.token_hex(8)  # a restarted service is a new epoch: cells re-snapshot
        self.seq = 0
        self.kv: dict[str, Any] = {}
        self.cells: dict[str, dict[str, Any]] = {}  # cell -> last status report (+ received time)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.router_endpoint = ""
        self.pub_endpoint = ""
        self.allowlist: Allowlist | None = None
        self._dirty = False  # a status report changed the rollout: publish on the next loop

    # --- persistent state ----------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        p = self.dir / STATE_NAME
        if not p.exists():
            return {"live": None, "candidate": None, "stage": None, "cells": [], "generation": 0, "past": []}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise FleetError(f"{p} is corrupt ({exc}); restore it from backup or remove it") from None

    def _save_state(self) -> None:
        _atomic_write(self.dir / STATE_NAME, json.dumps(self.state, indent=2, sort_keys=True))

    def _record_verdict(self, entry: dict[str, Any]) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
        with open(self.dir / VERDICTS_NAME, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.state["last_verdict"] = entry

    def verdicts(self) -> list[dict[str, Any]]:
        p = self.dir / VERDICTS_NAME
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    # --- the published state -------------------------------------------------------------------

    def _model_value(self, version: str) -> dict[str, Any]:
        entry = self.registry.get(version)
        path = self.registry.root / entry.file
        sig_path = Path(str(path) + ".sig")
        size = path.stat().st_size
        if not sig_path.exists():
            sig = signing.sign(self._key, version, entry.sha256, size)
            _atomic_write(sig_path, sig.hex() + "\n")
        sig = bytes.fromhex(sig_path.read_text().strip())
        return {"version": version, "sha256": entry.sha256, "size": size, "signature": sig}

    def _rollout_value(self) -> dict[str, Any]:
        s = self.state
        return {
            "live": s["live"],
            "candidate": s["candidate"],
            "stage": s["stage"],
            "cells": list(s["cells"]),
            "generation": s["generation"],
        }

    def _set(self, key: str, value: Any, pub: zmq.Socket | None) -> None:
        """One numbered update; value None deletes the key (the Clone pattern's empty value)."""
        if self.kv.get(key) == value:
            return
        self.seq += 1
        if value is None:
            self.kv.pop(key, None)
        else:
            self.kv[key] = value
        if pub is not None:
            pub.send_multipart(
                [b"kv", pack({"epoch": self.epoch, "seq": self.seq, "key": key, "value": value})]
            )

    def _publish_state(self, pub: zmq.Socket | None) -> None:
        """Bring the key-value store in line with the state; each change goes out as one update."""
        needed = {v for v in (self.state["live"], self.state["candidate"]) if v is not None}
        for v in sorted(needed):
            self._set(f"model/{v}", self._model_value(v), pub)
        self._set("rollout", self._rollout_value(), pub)
        # Versions no cell runs any more leave the store, so a snapshot stays small (their files stay
        # in the registry: a rollback announces them again).
        for key in [k for k in self.kv if k.startswith("model/") and k.removeprefix("model/") not in needed]:
            self._set(key, None, pub)

    # --- operations (run on the service thread, from the control socket) -------------------------

    def known_cells(self) -> list[str]:
        names = set(self.cells)
        if self.allowlist is not None:
            self.allowlist.refresh()
            names |= set(self.allowlist.names.values())
        return sorted(names)

    def _check_cells(self, cells: list[str]) -> None:
        known = set(self.known_cells())
        unknown = sorted(set(cells) - known)
        if unknown:
            raise FleetError(
                f"unknown cells {unknown}: the fleet knows {sorted(known) or 'none yet'} "
                "(a cell is known by its key in keys/allowed/ or by reporting)"
            )

    def _change(self, **fields: Any) -> None:
        self.state.update(fields)
        self.state["generation"] += 1
        self.state["stage_started"] = time.time()
        self._save_state()

    def op_publish(self, path: str, force: bool, stage: str | None, cells: list[str]) -> dict[str, Any]:
        """Add a model file to the registry (or name a registered version) and start its rollout."""
        p = Path(path)
        try:
            entry = self.registry.add(p) if p.exists() else self.registry.get(path)
        except RegistryError as exc:
            raise FleetError(str(exc)) from None
        if entry.gate_passed is not True and not force:
            state = "has not been gated" if entry.gate_passed is None else "failed its gate"
            raise FleetError(f"version {entry.version} {state}; publish with --force to roll it out anyway")
        self._model_value(entry.version)  # signs it
        v = entry.version
        if self.state["live"] is None:
            self.registry.promote(v, force=True, reason="first version of the fleet")
            self._change(live=v, candidate=None, stage=None, cells=[])
            self._record_verdict({"version": v, "stage": "everyone", "action": "first-live", "forced": force})
            return {"version": v, "stage": "everyone"}
        if v == self.state["live"]:
            raise FleetError(f"version {v} is already live")
        if self.state["candidate"] is not None:
            raise FleetError(
                f"version {self.state['candidate']} is in {self.state['stage']}; "
                "promote or roll it back before starting another"
            )
        self._check_cells(cells)
        stage = stage or ("shadow" if cells else "canary")
        if stage == "shadow" and not cells:
            raise FleetError("a shadow stage needs the cells that run it (--cells)")
        if stage == "canary" and not cells:
            cells = canary_cells(self.known_cells(), self.config.rollout.canary_share, v)
            if not cells:
                raise FleetError("no cells are known yet to run a canary on (--cells)")
        self._change(candidate=v, stage=stage, cells=sorted(cells), forced=bool(force))
        self._record_verdict({"version": v, "stage": stage, "action": "start", "cells": sorted(cells)})
        return {"version": v, "stage": stage, "cells": sorted(cells)}

    def op_promote(self, force: bool, cells: list[str]) -> dict[str, Any]:
        """Advance the candidate one stage (shadow -> canary -> everyone) if its stage passed."""
        v, stage = self.state["candidate"], self.state["stage"]
        if v is None:
            raise FleetError("no version is being rolled out (publish one first)")
        verdict = self.evaluate()
        if verdict is not None and verdict.verdict != "pass" and not force:
            raise FleetError(
                f"{v} in {stage}: the rule says {verdict.verdict} ({verdict.reason}); wait, or --force"
            )
        self._check_cells(cells)
        if stage == "shadow":
            cells = cells or canary_cells(self.known_cells(), self.config.rollout.canary_share, v)
            self._change(stage="canary", cells=sorted(cells))
            action = {"version": v, "stage": "canary", "action": "promote", "cells": sorted(cells)}
        else:
            try:
                self.registry.promote(v, force=True, reason=f"fleet rollout: {stage} passed")
            except RegistryError as exc:
                raise FleetError(str(exc)) from None
            past = [*self.state.get("past", []), self.state["live"]]
            self._change(live=v, candidate=None, stage=None, cells=[], past=past[-20:])
            action = {"version": v, "stage": "everyone", "action": "promote"}
        action["forced"] = bool(force and verdict is not None and verdict.verdict != "pass")
        if verdict is not None:
            action["verdict"] = verdict.to_json()
        self._record_verdict(action)
        return action

    def op_rollback(self, reason: str, automatic: bool = False, verdict: StageVerdict | None = None) -> dict:
        """End the candidate's rollout; with no candidate, put the previous live version back."""
        if self.state["candidate"] is not None:
            v, stage = self.state["candidate"], self.state["stage"]
            self._change(candidate=None, stage=None, cells=[])
            entry = {
                "version": v,
                "stage": stage,
                "action": "rollback",
                "automatic": automatic,
                "reason": reason,
            }
        else:
            past = list(self.state.get("past", []))
            if not past:
                raise FleetError("nothing to roll back: no candidate, and no earlier live version")
            back, bad = past.pop(), self.state["live"]
            self.registry.promote(back, force=True, reason=f"fleet rollback: {reason}")
            self._change(live=back, past=past)
            entry = {"version": bad, "to": back, "stage": "everyone", "action": "rollback", "reason": reason}
            entry["automatic"] = automatic
        if verdict is not None:
            entry["verdict"] = verdict.to_json()
        self._record_verdict(entry)
        log.warning("rollback: %s", entry)
        return entry

    def evaluate(self) -> StageVerdict | None:
        """The current stage's verdict from the cells' latest reports (None without a candidate)."""
        v, stage, cells = self.state["candidate"], self.state["stage"], set(self.state["cells"])
        if v is None:
            return None
        cand, base = Counts(), Counts()
        for name, rep in self.cells.items():
            if stage == "shadow":
                sh = rep.get("shadow") or {}
                if name in cells and sh.get("version") == v:
                    cand = cand + Counts.from_json(sh.get("challenger", {}))
                    base = base + Counts.from_json(sh.get("live", {}))
            else:
                counts = rep.get("counts", {})
                if name in cells:
                    cand = cand + Counts.from_json(counts.get(v, {}))
                else:
                    base = base + Counts.from_json(counts.get(self.state["live"], {}))
        rule = self.config.rollout.shadow if stage == "shadow" else self.config.rollout.canary
        return judge(stage, rule, cand, base)

    def _after_report(self) -> None:
        verdict = self.evaluate()
        if verdict is None or verdict.verdict == "collecting":
            return
        last = self.state.get("last_verdict", {})
        if verdict.verdict == "fail":
            self.op_rollback(
                f"{verdict.stage} rule failed: {verdict.reason}", automatic=True, verdict=verdict
            )
        elif not (last.get("action") == "pass" and last.get("version") == self.state["candidate"]):
            self._record_verdict(
                {
                    "version": self.state["candidate"],
                    "stage": verdict.stage,
                    "action": "pass",
                    "verdict": verdict.to_json(),
                }
            )
            self._save_state()

    def status(self) -> dict[str, Any]:
        now = time.time()
        cells = {}
        for name in self.known_cells():
            rep = self.cells.get(name)
            if rep is None:
                cells[name] = {"state": "never seen"}
                continue
            age = now - rep["received"]
            # Silent for three report intervals: unreachable, unless its last word was that it stopped.
            fresh = age < 3 * self.config.rollout.status_interval_s + 2 or rep.get("state") == "stopped"
            cells[name] = {
                "state": rep.get("state") if fresh else "unreachable",
                "model_version": rep.get("model_version"),
                "stage": rep.get("stage"),
                "shadow_version": (rep.get("shadow") or {}).get("version"),
                "picks_per_hour": rep.get("picks_per_hour"),
                "assists_waiting": rep.get("assists_waiting"),
                "site": rep.get("site"),
                "last_report_s": round(age, 1),
                "refused": rep.get("refused", []),
            }
        verdict = self.evaluate()
        return {
            "rollout": self._rollout_value(),
            "verdict": verdict.to_json() if verdict is not None else None,
            "last_verdict": self.state.get("last_verdict"),
            "seq": self.seq,
            "epoch": self.epoch,
            "cells": cells,
        }

    # --- the service loop ----------------------------------------------------------------------

    def start(self) -> FleetService:
        self._thread = threading.Thread(target=self._run_guarded, name="fleet-service", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    def run(self) -> None:
        cfg = self.config
        ctx = zmq.Context()
        sec = ServerSecurity(self.dir / "keys", cfg.insecure)
        own = None if cfg.insecure else sec.own()
        if not cfg.insecure:
            self.allowlist = Allowlist(ctx, self.dir / "keys" / "allowed")
        router = ctx.socket(zmq.ROUTER)
        pub = ctx.socket(zmq.PUB)
        control = ctx.socket(zmq.REP)
        for s in (router, pub, control):
            s.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, 100000)
        pub.setsockopt(zmq.SNDHWM, 100000)
        sec.apply(router, own)
        sec.apply(pub, own)
        try:
            router.bind(cfg.router)
            pub.bind(cfg.pub)
            control.bind(control_endpoint(self.dir))
            self.router_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.pub_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self._publish_state(pub)
            self._ready.set()
            log.info("fleet service: router %s, pub %s", self.router_endpoint, self.pub_endpoint)
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            poller.register(control, zmq.POLLIN)
            next_hb = 0.0
            while not self._halt.is_set():
                events = dict(poller.poll(50))
                if router in events:
                    for _ in range(1000):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            self._on_router(router, frames)
                        except Exception:  # one bad request must not stop the service
                            log.exception("fleet service: a message from a cell could not be handled")
                if control in events:
                    reply = self._on_control(control.recv())
                    self._publish_state(pub)
                    control.send(json.dumps(reply, default=str).encode())
                now = time.monotonic()
                if now >= next_hb:
                    pub.send_multipart([b"hb", pack({"epoch": self.epoch, "seq": self.seq})])
                    next_hb = now + cfg.rollout.heartbeat_s
                if self._dirty:
                    self._dirty = False
                    self._publish_state(pub)
        finally:
            for s in (router, pub, control):
                s.close(0)
            if self.allowlist is not None:
                self.allowlist.stop()
            ctx.term()

    def _on_router(self, router: zmq.Socket, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            return
        ident = frames[0].bytes
        name = peer_name(frames[1], self.config.insecure)
        try:
            msg = unpack(frames[1].bytes)
        except WireError as exc:
            router.send_multipart([ident, pack({"t": "error", "error": str(exc)})])
            return
        t = msg["t"]
        if t == "snapshot":
            router.send_multipart(
                [ident, pack({"t": "snapshot", "epoch": self.epoch, "seq": self.seq, "kv": self.kv})]
            )
        elif t == "fetch":
            router.send_multipart([ident, pack(self._chunk(msg))])
        elif t == "status":
            cell = name or str(msg.get("cell", ""))
            if not cell:
                return
            if name and msg.get("cell") not in (None, name):
                log.warning(
                    "status claiming cell %r came with the key of %r: stored as %r",
                    msg.get("cell"),
                    name,
                    name,
                )
            self.cells[cell] = {**msg, "cell": cell, "received": time.time()}
            stage_before = (self.state["candidate"], self.state["stage"])
            self._after_report()
            if (self.state["candidate"], self.state["stage"]) != stage_before:
                self._dirty = True
        else:
            router.send_multipart([ident, pack({"t": "error", "error": f"unknown message type {t!r}"})])

    def _chunk(self, msg: dict[str, Any]) -> dict[str, Any]:
        version = str(msg.get("version", ""))
        try:
            offset, length = (
                int(msg.get("offset", 0)),
                int(msg.get("length", self.config.rollout.chunk_bytes)),
            )
        except (TypeError, ValueError):
            return {"t": "error", "error": "fetch needs integer offset and length"}
        if f"model/{version}" not in self.kv:
            return {"t": "error", "version": version, "error": f"version {version!r} is not published"}
        length = max(0, min(length, self.config.rollout.chunk_bytes))
        entry = self.registry.get(version)
        path = self.registry.root / entry.file
        with open(path, "rb") as f:
            f.seek(max(0, offset))
            data = f.read(length)
        return {"t": "chunk", "version": version, "offset": offset, "size": path.stat().st_size, "data": data}

    def _on_control(self, raw: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(raw)
            cmd = msg["cmd"]
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"malformed control message: {exc}"}
        try:
            if cmd == "publish":
                out = self.op_publish(
                    msg["path"], bool(msg.get("force")), msg.get("stage"), list(msg.get("cells") or [])
                )
            elif cmd == "promote":
                out = self.op_promote(bool(msg.get("force")), list(msg.get("cells") or []))
            elif cmd == "rollback":
                out = self.op_rollback(str(msg.get("reason") or "manual rollback"))
            elif cmd == "status":
                out = self.status()
            else:
                return {"ok": False, "error": f"unknown command {cmd!r}"}
        except (FleetError, RegistryError, ModelFileError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug or an unexpected file problem must not stop the service
            log.exception("fleet control %r failed", cmd)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, **out}


def send_control(fleet_dir: Path, cmd: str, timeout_s: float = 10.0, **fields: Any) -> dict[str, Any]:
    """One command to a running fleet service; raises TimeoutError if none answers."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_endpoint(fleet_dir))
        sock.send(json.dumps({"cmd": cmd, **fields}).encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(
                f"no fleet service answered on {control_endpoint(fleet_dir)} within {timeout_s} s"
            )
        return json.loads(sock.recv())
    finally:
        sock.close(0)
