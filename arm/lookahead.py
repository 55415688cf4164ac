"""See and plan while the arm places (issue 17): the next plan is ready when the arm is.

How it works
    After a pick, the controller asks the arm (optional capability `notify_when_clear`, see
    `arm.interfaces.ViewClearNotice`) to call `Lookahead.look` once, during the place, as soon as the
    arm and its item have left the camera's view of the tote. `look` captures a frame and plans on
    it while the arm goes on placing. When the place ends:
    - a failed place (the item fell, maybe back into the tote) discards the plan;
    - otherwise, before the plan is used, a fresh frame is compared with the one it was made on at
      every candidate's pixel (median depth of a 5x5 window): if the surface under any candidate
      moved by more than the tolerance (the place or a settling item disturbed the tote), the plan is
      discarded and the controller plans on the fresh frame;
    - a plan made by a planner that has since been swapped out (a new model was hot-swapped in during
      the place) is discarded too: picks after a swap use the new model.

What it charges
    Planning time that the place motion covered is hidden: the exposed part is what is left of the
    planner's wall time after the robot time from the look to the end of the place. A discarded
    plan charges the new plan in full. The look's capture is taken while the arm moves, so it is
    counted apart (`looks`: sensing behind motion). The check's capture belongs inside the place's
    release when the gripper takes at least a capture's time (`capture_s`) to let go: the arm stands
    over the box then, out of the camera's view, so it is counted behind motion too
    (`check_in_release`); else it is one the arm waits for (the controller counts it as exposed).
    In simulation the check frame is rendered after the released item has settled, not during the
    release: the simulator steps no physics while the arm carries kinematically, so the pile in
    the tote settles from the lift only in the release's physics steps, where on a real cell it
    settles during the carry. That frame is what a real cell's capture during its release sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from arm.interfaces import Camera, CameraError, Outcome
from grasping.types import Frame, Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ahead:
    """What the controller observes next: a frame, and the plan made on it while placing (or None)."""

    frame: Frame
    plan: Plan | None  # None: plan on `frame` now (no look-ahead, or it was discarded)
    exposed_ms: float  # planning wall time the arm waits for, ms (0 when the place covered it)


class Lookahead:
    def __init__(
        self,
        camera: Camera,
        planner: Callable[[], Callable[[Frame], Plan]],
        clock: Callable[[], float],
        tolerance_m: float = 0.01,
        capture_s: float | None = None,
    ) -> None:
        self.camera = camera
        self.planner = planner  # returns the planner in use now (it may be swapped between picks)
        self.clock = clock  # robot seconds
        self.tolerance_m = tolerance_m  # m, depth change at a candidate that voids the plan
        self.capture_s = capture_s  # s, one capture (None: unknown, a check is never in a release)
        self._check_in_release = False  # the ready plan's check capture fits in the place's release
        # frame, plan, robot time of the look, the planner that made the plan
        self._looked: tuple[Frame, Plan, float, object] | None = None
        self._ready: tuple[Frame, Plan, float, object] | None = None  # frame, plan, exposed ms, planner
        self.used = 0  # plans made while placing and used, count
        self.discarded = 0  # plans made while placing and thrown away, count
        self.looks = 0  # captures behind motion (looks while placing, checks in a release), count

    @property
    def has_plan(self) -> bool:
        """Is a plan made while placing waiting to be taken (so `take` will capture a check frame)?"""
        return self._ready is not None

    @property
    def check_in_release(self) -> bool:
        """Will `take`'s check capture be one taken during the place's release (behind motion)?"""
        return self._ready is not None and self._check_in_release

    def reset(self) -> None:
        """Forget any look-ahead (a new tote)."""
        self._looked = self._ready = None

    def look(self) -> None:
        """Called by the arm once it is out of the camera's view of the tote: capture and plan now."""
        self.looks += 1
        try:
            frame = self.camera.capture()
        except CameraError as exc:
            log.info("look-ahead capture failed (%s): the next plan is made after the place", exc)
            return
        planner = self.planner()
        self._looked = (frame, planner(frame), self.clock(), planner)

    def placed(self, outcome: Outcome) -> None:
        """The place ended: keep the plan (with its exposed planning time) unless the place failed."""
        looked, self._looked = self._looked, None
        if looked is None:
            return
        frame, plan, t_look, planner = looked
        if not outcome.success:
            self.discarded += 1
            log.info("place failed (%s): the plan made while placing is discarded", outcome.reason.value)
            return
        covered_ms = (self.clock() - t_look) * 1000.0
        self._ready = (frame, plan, max(0.0, plan.latency_ms - covered_ms), planner)
        release_s = float((outcome.details or {}).get("phases", {}).get("release", 0.0))
        self._check_in_release = self.capture_s is not None and release_s >= self.capture_s

    def take(self) -> Ahead | None:
        """The next observation: the look-ahead plan if the tote did not change under it, else a fresh
        frame to plan on. None when there is no look-ahead plan (capture as usual). Raises
        CameraError when the check frame cannot be read."""
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        frame, plan, exposed, planner = ready
        now = self.camera.capture()
        if self._check_in_release:
            self.looks += 1
        if planner is not self.planner():
            self.discarded += 1
            log.info("the model was swapped since the plan made while placing: planning again")
            return Ahead(now, None, 0.0)
        if moved_under(plan, frame, now, self.tolerance_m):
            self.discarded += 1
            log.info("the tote changed under the plan made while placing: planning again")
            return Ahead(now, None, 0.0)
        self.used += 1
        return Ahead(frame, plan, exposed)


def moved_under(plan: Plan, then: Frame, now: Frame, tolerance_m: float) -> bool:
    """Did the surface under any of the plan's candidates move by more than `tolerance_m`?"""
    for cand in plan.candidates:
        u, v = (int(x) for x in cand.pixel)
        d0, d1 = _window_depth(then, u, v), _window_depth(now, u, v)
        if d0 is None or d1 is None:
            if (d0 is None) != (d1 is None):
                return True  # a surface appeared or vanished there
            continue
        if abs(d1 - d0) > tolerance_m:
            return True
    return False


def _window_depth(frame: Frame, u: int, v: int, r: int = 2) -> float | None:
    """Median of the valid depths in a (2r+1)^2 window around pixel (u, v), or None."""
    h, w = frame.depth.shape[:2]
    win = frame.depth[max(0, v - r) : min(h, v + r + 1), max(0, u - r) : min(w, u + r + 1)]
    ok = win[np.isfinite(win) & (win > 0)]
    return float(np.median(ok)) if ok.size else None
