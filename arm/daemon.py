"""The cell daemon an operator runs all day: totes in, picks out, state visible, stops safely.

- Runs totes through the `CellController` until told to stop or N totes are done.
- SIGTERM / SIGINT: the current motion finishes (a pick or place is never cut in half), pending
  questions are cancelled, the ledger is flushed and closed, and the process exits 0.
- A control socket (ZeroMQ REQ/REP on an `ipc://` path inside the data folder, so only local users
  with access to that folder can reach it) takes `reload-model PATH`, `estop`, `clear-stop` and
  `status`. `estop` is a protective stop that holds (stop category 2: the arm brakes within its
  limits and holds its position and its item, powered); only `clear-stop` releases it.
  `pickcell cell reload-model PATH` is a client of it.
- A new model file dropped into `<data>/models/` is picked up the same way: verified first, swapped in
  between picks; a bad file is refused and the running model keeps working.
- With `fleet` (a fleet.celllink.CellFleet), models also come from the fleet service (verified by
  hash and signature, then through `reload_model`), plans can be shadow-scored, and the cell reports
  its status and ships its ledger rows.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from arm.controller import CellController, ToteReport
from arm.interfaces import ToteFeed
from grasping.types import Frame, Plan

log = logging.getLogger(__name__)

PlannerFactory = Callable[[Path], tuple[Callable[[Frame], Plan], str]]  # model path -> (planner, version)


class StartupError(RuntimeError):
    """The cell must not start as configured; the message says what to fix."""


def check_model_file(path: str | Path, alpha: float | None = None) -> str:
    """Verify the model file the cell is configured with (hash, format, contents); returns its version.

    A missing or corrupt model is a reason to refuse to start, never to fall back silently to
    another scorer: the operator chose a model, and its thresholds are what bounds the cell's
    unasked failures. `--planner analytic` is the explicit way to run without one. With `alpha`,
    the file must hold thresholds certified for it.
    """
    from grasping.learned_scorer import thresholds_for_alpha
    from grasping.modelfile import ModelFileError, load_model

    try:
        model = load_model(path)
        thresholds_for_alpha(model, alpha)
        return model.version
    except ModelFileError as exc:
        raise StartupError(
            f"refusing to start: {exc}. Restore the file (or its .sha256), give another with --model, "
            "or run without a learned model with --planner analytic."
        ) from None


def control_endpoint(data_dir: Path) -> str:
    return f"ipc://{Path(data_dir).resolve() / 'control.sock'}"


@dataclass
class DaemonStats:
    totes: int = 0
    picks: int = 0
    attempts: int = 0
    assists_requested: int = 0
    assists_answered: int = 0
    assists_expired: int = 0
    model_version: str = "analytic"
    model_reloads: int = 0
    model_refusals: int = 0
    reports: list[ToteReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "reports"}
        return d


class CellDaemon:
    def __init__(
        self,
        controller: CellController,
        feed: ToteFeed,
        *,
        data_dir: Path,
        planner_factory: PlannerFactory | None = None,
        model_version: str = "analytic",
        totes: int | None = None,
        watch_models: bool = True,
        watch_interval_s: float = 1.0,
        on_tote: Callable[[ToteReport], None] | None = None,
        fleet: Any | None = None,  # fleet.celllink.CellFleet: models from the fleet, status to it
    ) -> None:
        self.controller = controller
        self.feed = feed
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "models").mkdir(exist_ok=True)
        self.planner_factory = planner_factory
        self.totes = totes
        self.watch_models = watch_models
        self.watch_interval_s = watch_interval_s
        self.on_tote = on_tote
        self.fleet = fleet
        self.stats = DaemonStats(model_version=model_version)
        self._ctx = zmq.Context.instance()
        self._control_thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._seen_models: dict[Path, float] = {}
        self._lock = threading.Lock()

    # --- model hot-swap -------------------------------------------------------------------------

    def reload_model(self, path: Path) -> tuple[bool, str]:
        """Verify a model file and swap it in between picks. A bad file is refused; nothing changes."""
        if self.planner_factory is None:
            return False, "this cell has no planner factory (analytic only)"
        try:
            planner, version = self.planner_factory(Path(path))
        except Exception as exc:  # any failure to verify/load must leave the running model alone
            with self._lock:
                self.stats.model_refusals += 1
            log.error("refused model file %s: %s", path, exc)
            self.controller._count("model_refused")
            return False, f"refused {path}: {exc}"
        if self.fleet is not None:
            planner = self.fleet.wrap(planner)  # shadow scoring beside whichever model is live
        self.controller.swap_planner(planner)
        with self._lock:
            self.stats.model_version = version
            self.stats.model_reloads += 1
        if self.controller.metrics is not None:
            self.controller.metrics.set_model(version)
        log.info("model %s swapped in from %s", version, path)
        return True, f"swapped in {version}"

    def _scan_models(self) -> None:
        for p in sorted((self.data_dir / "models").glob("*.safetensors")):
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue
            if self._seen_models.get(p) == mtime:
                continue
            self._seen_models[p] = mtime
            # Wait until the file stops changing: a copy may still be in progress.
            time.sleep(0.05)
            if p.exists() and p.stat().st_mtime == mtime:
                self.reload_model(p)
            else:
                self._seen_models.pop(p, None)

    # --- control socket -------------------------------------------------------------------------

    def _control_loop(self) -> None:
        sock = self._ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(control_endpoint(self.data_dir))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        # Models already in the folder at start-up are the starting point, not news.
        for p in (self.data_dir / "models").glob("*.safetensors"):
            self._seen_models[p] = p.stat().st_mtime
        next_scan = time.monotonic() + self.watch_interval_s
        try:
            while not self._halt.is_set():
                if dict(poller.poll(100)).get(sock):
                    raw = sock.recv()
                    sock.send_string(json.dumps(self._handle_control(raw)))
                if self.watch_models and time.monotonic() >= next_scan:
                    self._scan_models()
                    next_scan = time.monotonic() + self.watch_interval_s
        finally:
            sock.close(0)

    def _handle_control(self, raw: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(raw.decode("utf-8"))
            cmd = msg["cmd"]
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"malformed control message: {exc}"}
        if cmd == "reload-model":
            ok, text = self.reload_model(Path(msg.get("path", "")))
            return {"ok": ok, "message": text, "model_version": self.stats.model_version}
        if cmd == "estop":
            # Stop category 2: the arm brakes along its path, then holds powered (a gripped item stays
            # gripped) until `clear-stop`, the only thing that releases it; the motion then resumes.
            self.controller.arm.stop()  # the controller counts the stop when it starts holding
            log.warning("protective stop requested over the control socket")
            return {"ok": True, "message": "protective stop engaged: braking, then holding until clear-stop"}
        if cmd == "clear-stop":
            self.controller.arm.clear_stop()
            log.warning("protective stop cleared over the control socket")
            return {"ok": True, "message": "protective stop cleared: the interrupted motion resumes"}
        if cmd == "status":
            with self._lock:
                return {"ok": True, **self.stats.as_dict()}
        if cmd == "stop":
            self.controller.request_stop()
            return {"ok": True, "message": "stopping after the current motion"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # --- main loop ------------------------------------------------------------------------------

    def run(self, install_signal_handlers: bool = True) -> int:
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        self._control_thread = threading.Thread(target=self._control_loop, name="cell-control", daemon=True)
        self._control_thread.start()
        if self.fleet is not None:
            self.controller.swap_planner(self.fleet.wrap(self.controller.planner))
            self.fleet.start(self)
        try:
            while not self.controller.stopping:
                if self.totes is not None and self.stats.totes >= self.totes:
                    break
                tote_id = self.feed.next_tote()
                if tote_id is None:
                    break
                rep = self.controller.run_tote(tote_id)
                with self._lock:
                    self.stats.totes += 1
                    self.stats.picks += rep.picks
                    self.stats.attempts += len(rep.attempts)
                    self.stats.assists_requested += rep.assists_requested
                    self.stats.assists_answered += rep.assists_answered
                    self.stats.assists_expired += rep.assists_expired
                    self.stats.reports.append(rep)
                log.info(
                    "tote %s %s: %d picks in %d attempts, %.0f robot s",
                    tote_id,
                    rep.status,
                    rep.picks,
                    len(rep.attempts),
                    rep.robot_seconds,
                )
                if self.fleet is not None:
                    self.fleet.on_tote(rep)
                if self.on_tote is not None:
                    self.on_tote(rep)
        finally:
            if self.fleet is not None:
                self.fleet.stop()
            self._halt.set()
            if self._control_thread is not None:
                self._control_thread.join(timeout=2.0)
            if self.controller.ledger is not None:
                self.controller.ledger.close()
        return 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.warning("signal %d: finishing the current motion, then stopping", signum)
        self.controller.request_stop()
        # A motion held by a protective stop (now or later) cannot finish: it ends where it stands,
        # still stopped and still holding what it grips. Only a flag is set here (signal context).
        abandon = getattr(self.controller.arm, "abandon_hold", None)
        if abandon is not None:
            abandon()


def send_control(data_dir: Path, cmd: str, timeout_s: float = 5.0, **fields: Any) -> dict[str, Any]:
    """Send one command to a running cell daemon; raises TimeoutError if nobody answers."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_endpoint(data_dir))
        sock.send_string(json.dumps({"cmd": cmd, **fields}))
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(
                f"no cell daemon answered on {control_endpoint(data_dir)} within {timeout_s} s"
            )
        return json.loads(sock.recv())
    finally:
        sock.close(0)
