"""The fleet inside a running cell daemon: models from the fleet, shadow scoring, counts, status, and
the ledger shipper. `arm.daemon.CellDaemon(fleet=CellFleet(...))` is the whole hook.

- Models: the FleetLink verifies a file (sha256, the fleet's signature) and hands it to the daemon's
  `reload_model`, which loads it (safetensors, never a pickle) and swaps it in between picks; a file
  the daemon refuses leaves the running model in place and is reported to the fleet.
- Shadow: while the fleet names this cell for a shadow stage, every plan is also scored by the
  challenger. The live model's decision is what the cell does; each plan's disagreement and, for every
  executed attempt, both models' predicted p(success) beside the actual outcome are appended to
  `<data>/fleet/shadow.jsonl` and counted for the stage's rule (see fleet.rollout).
- Counts per model version (for the canary's rule) come from every attempt, for the version that
  planned it; picks per hour from the daemon's tote reports; the cell's state from the arm (protective
  stop), the controller (stopping) and the assist client (questions waiting for a person).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fleet.cell import FleetLink, LinkConfig
from fleet.rollout import Counts
from fleet.shipping import LedgerShipper, ShipConfig
from grasping.types import GRIPPER_KINDS, Frame, Plan

log = logging.getLogger(__name__)

_MAX_REMEMBERED = 200  # plans whose shadow scores are kept for matching attempts to them
_MATCH_RADIUS_M = 0.02  # an executed grasp this close to a candidate (same gripper) is that candidate, m


class ShadowPlanner:
    """The live planner, unchanged, with the challenger scoring every plan beside it."""

    def __init__(self, live: Callable[[Frame], Plan], fleet: CellFleet) -> None:
        self.live = live
        self.fleet = fleet

    def __call__(self, frame: Frame) -> Plan:
        plan = self.live(frame)
        try:
            self.fleet.shadow_score(plan)
        except Exception:  # the challenger must never cost the cell a pick
            log.exception("shadow scoring failed; the live plan stands")
        return plan


class CellFleet:
    def __init__(
        self,
        link: LinkConfig,
        ship: ShipConfig | None = None,
        shadow_loader: Callable[[Path], Any] | None = None,
        connect: bool = True,  # False: ship ledger rows only (no fleet service to follow)
    ) -> None:
        self.connect = connect
        self.link_config = link
        self.ship_config = ship
        self.shadow_loader = shadow_loader or _load_scorer
        self.link: FleetLink | None = None
        self.shipper: LedgerShipper | None = None
        self.daemon: Any = None
        self.counts: dict[str, Counts] = {}
        self._stopped = False
        self._lock = threading.Lock()
        self._picks: deque[tuple[float, int]] = deque()  # (wall time, picks) per tote, last hour
        self._started = time.time()
        self.challenger: Any = None
        self.challenger_version: str | None = None
        self._shadow_seen: OrderedDict[str, dict[str, Any]] = OrderedDict()  # frame_id -> scores
        self.shadow_counts = {"live": Counts(), "challenger": Counts(), "plans": 0, "disagreements": 0}
        self.shadow_log = Path(link.data_dir) / "fleet" / "shadow.jsonl"

    # --- daemon hooks ---------------------------------------------------------------------------

    def start(self, daemon: Any) -> None:
        self.daemon = daemon
        ctl = daemon.controller
        listener = ctl.on_attempt  # keep whoever listened before (benchmarks, UIs)

        def on_attempt(att: Any, plan: Plan) -> None:
            self._on_attempt(att, plan)
            if listener is not None:
                listener(att, plan)

        ctl.on_attempt = on_attempt
        if self.connect:
            self.link = FleetLink(self.link_config, self._on_model, self._on_shadow, self.status).start()
        if self.ship_config is not None:
            self.shipper = LedgerShipper(self.ship_config).start()

    def stop(self) -> None:
        self._stopped = True
        if self.link is not None:
            self.link.stop()
        if self.shipper is not None:
            self.shipper.stop(drain_s=5.0)  # what the last tote wrote, if the learner is there to take it

    def wrap(self, planner: Callable[[Frame], Plan]) -> Callable[[Frame], Plan]:
        return planner if isinstance(planner, ShadowPlanner) else ShadowPlanner(planner, self)

    def _on_model(self, path: Path, version: str) -> tuple[bool, str]:
        ok, text = self.daemon.reload_model(path)
        if ok and self.daemon.stats.model_version != version:
            return False, f"the file holds {self.daemon.stats.model_version}, the fleet announced {version}"
        return ok, text

    def _on_shadow(self, path: Path | None, version: str | None) -> tuple[bool, str]:
        if path is None:
            with self._lock:
                self.challenger, self.challenger_version = None, None
            return True, "shadow ended"
        try:
            scorer = self.shadow_loader(path)
        except Exception as exc:
            return False, str(exc)
        with self._lock:
            self.challenger, self.challenger_version = scorer, version
            self.shadow_counts = {"live": Counts(), "challenger": Counts(), "plans": 0, "disagreements": 0}
            self._shadow_seen.clear()
        return True, f"shadowing {version}"

    def _count(self, version: str, c: Counts) -> None:
        with self._lock:
            self.counts[version] = self.counts.get(version, Counts()) + c

    def on_tote(self, rep: Any) -> None:
        """After each tote: picks per hour, and the items given up (questions that expired)."""
        self._count(self.daemon.stats.model_version, Counts(items_done=int(rep.assists_expired)))
        now = time.time()
        with self._lock:
            self._picks.append((now, rep.picks))
            while self._picks and self._picks[0][0] < now - 3600:
                self._picks.popleft()

    # --- shadow ---------------------------------------------------------------------------------

    def shadow_score(self, plan: Plan) -> None:
        with self._lock:
            scorer, version = self.challenger, self.challenger_version
        if scorer is None or plan.patches is None or plan.features is None or not plan.candidates:
            return
        g = np.array([GRIPPER_KINDS.index(c.grasp.gripper) for c in plan.candidates], dtype=np.int64)
        res = scorer.score(plan.patches, plan.features, g)
        thr = scorer.candidate_thresholds(g)
        top = int(np.argmax(res.calibrated))
        c_pick = bool(res.in_distribution and res.calibrated[top] >= thr[top])
        l_pick = plan.decision == "pick"
        disagree = c_pick != l_pick or (c_pick and top != 0)
        with self._lock:
            self.shadow_counts["plans"] += 1
            self.shadow_counts["disagreements"] += int(disagree)
            self._shadow_seen[plan.frame_id] = {
                "challenger": version,
                "positions": np.array([np.asarray(c.grasp.position, dtype=float) for c in plan.candidates]),
                "grippers": [c.grasp.gripper for c in plan.candidates],
                "challenger_auto": [c_pick and j == top for j in range(len(plan.candidates))],
                "challenger_p": [float(x) for x in res.calibrated],
                "live_auto": [l_pick and j == 0 for j in range(len(plan.candidates))],
                "live_p": [None if c.p_success is None else float(c.p_success) for c in plan.candidates],
            }
            while len(self._shadow_seen) > _MAX_REMEMBERED:
                self._shadow_seen.popitem(last=False)
        if disagree:
            self._log_shadow(
                {
                    "kind": "disagreement",
                    "frame_id": plan.frame_id,
                    "live": plan.model_version,
                    "live_decision": plan.decision,
                    "challenger": version,
                    "challenger_decision": "pick" if c_pick else "ask",
                    "challenger_top": top,
                }
            )

    def _on_attempt(self, attempt: Any, plan: Plan) -> None:
        """Called by the controller after every attempt: count it for the model that planned it (a swap
        mid-tote is counted right), and match it to the shadow scores of its plan."""
        placed = bool(attempt.outcome.success and attempt.placed is not None and attempt.placed.success)
        auto = attempt.decided_by == "model"
        self._count(
            plan.model_version,
            Counts(
                picks=int(placed),
                auto_attempts=int(auto),
                auto_success=int(auto and attempt.outcome.success),
                auto_picks=int(auto and placed),
                items_done=int(placed),
            ),
        )
        with self._lock:
            seen = self._shadow_seen.get(plan.frame_id)
            if seen is None:
                return
            # The executed grasp is the planned one snapped by the arm: the nearest candidate of the
            # same gripper within 2 cm is the one that was executed (an associate's click is not one).
            d = np.linalg.norm(seen["positions"] - np.asarray(attempt.grasp.position, dtype=float), axis=1)
            d[[g != attempt.grasp.gripper for g in seen["grippers"]]] = np.inf
            j = int(np.argmin(d))
            if not np.isfinite(d[j]) or d[j] > _MATCH_RADIUS_M:
                return
            ok = bool(attempt.outcome.success)
            if seen["challenger"] == self.challenger_version:  # counts are for the current shadow only
                for who in ("live", "challenger"):
                    auto = bool(seen[f"{who}_auto"][j])
                    self.shadow_counts[who] = self.shadow_counts[who] + Counts(
                        picks=int(placed),
                        auto_attempts=int(auto),
                        auto_success=int(auto and ok),
                        auto_picks=int(auto and placed),
                        items_done=1,
                    )
        self._log_shadow(
            {
                "kind": "outcome",
                "frame_id": plan.frame_id,
                "candidate": j,
                "challenger": seen["challenger"],
                "challenger_p": seen["challenger_p"][j],
                "challenger_would_execute": seen["challenger_auto"][j],
                "live_p": seen["live_p"][j],
                "success": ok,
                "placed": placed,
                "decided_by": attempt.decided_by,
            }
        )

    def _log_shadow(self, entry: dict[str, Any]) -> None:
        self.shadow_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.shadow_log, "a") as f:
            f.write(json.dumps({"time": time.time(), **entry}) + "\n")

    # --- status ---------------------------------------------------------------------------------

    def state(self) -> str:
        d = self.daemon
        if d is None:
            return "starting"
        if self._stopped:
            return "stopped"
        if getattr(d.controller.arm, "stopped", False):
            return "protective_stop"
        if d.controller.stopping:
            return "stopped"
        if self._assists_waiting() > 0:
            return "waiting_for_person"
        return "picking"

    def _assists_waiting(self) -> int:
        assist = getattr(getattr(self.daemon, "controller", None), "assist", None)
        return int(getattr(assist, "pending", 0) or 0)

    def status(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            picks = sum(p for t, p in self._picks if t >= now - 3600)
            window = max(min(now - self._started, 3600.0), 1.0)
            out: dict[str, Any] = {
                "state": self.state(),
                "picks_per_hour": picks * 3600.0 / window,
                "assists_waiting": int(
                    getattr(getattr(self.daemon, "controller", None), "assist", None)
                    and getattr(self.daemon.controller.assist, "pending", 0)
                    or 0
                ),
                "counts": {v: c.to_json() for v, c in self.counts.items()},
            }
            if self.challenger_version is not None:
                sc = self.shadow_counts
                out["shadow"] = {
                    "version": self.challenger_version,
                    "plans": sc["plans"],
                    "disagreements": sc["disagreements"],
                    "live": sc["live"].to_json(),
                    "challenger": sc["challenger"].to_json(),
                }
        if self.shipper is not None:
            out["ledger_rows_shipped"] = self.shipper.shipped_rows
        return out


def _load_scorer(path: Path) -> Any:
    from grasping.learned_scorer import LearnedScorer
    from grasping.modelfile import load_model

    return LearnedScorer(load_model(path))
