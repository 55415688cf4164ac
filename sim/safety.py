"""Protective stops of the simulated cell: the safety zone, the stop record, and braking along the path.

What it is
    A stop category 2 in the sense of ISO 10218-1 / IEC 60204-1: a controlled stop with power kept.
    On a stop (a person walking into the guarded zone, or `estop` on the daemon's control socket) the
    arm brakes along the path it was following, within its joint acceleration and jerk limits (never
    an instantaneous halt), then holds that position with the motors powered: a gripped item stays
    gripped (the cup keeps its vacuum, the jaw its force). Nothing but `clear_stop` (the control
    socket's `clear-stop`, or a simulated operator pressing it) ends a stop; a person leaving the
    zone does not. After `clear_stop` the interrupted motion accelerates again along the same path
    and finishes. The time from the trigger to standstill is recorded for every stop.

What is randomised
    Nothing here: tests and scenarios say when people enter. (A scenario may draw the intervals from
    its own seeded generator.)

What counts as success
    Braking starts at the arm's next control sample after the trigger (within 20 ms of robot time in
    free space, 4.2 ms in contact moves), joint accelerations stay within the Panda's limits while
    braking and resuming, the arm does not move while stopped, the held item stays where it was, and
    the motion resumes only after `clear_stop`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# Franka Emika Panda published jerk limit, joints 1-7 (rad/s^3).
PANDA_MAX_JERK = np.full(7, 7500.0)


@dataclass
class SafetyZone:
    """The guarded area around the cell, occupied during given intervals of robot time."""

    intrusions: list[tuple[float, float]] = field(default_factory=list)  # (t_in, t_out), robot seconds
    # A simulated operator presses clear-stop this long after the zone is empty again (robot seconds);
    # None: nobody does, the stop holds until `clear_stop` is called (control socket, test).
    operator_reset_s: float | None = 1.0
    max_halt_s: float = 0.1  # required reaction: braking starts this soon after an intrusion, seconds

    def enter(self, t_in: float, t_out: float) -> None:
        if not t_out > t_in:
            raise ValueError(f"a person must leave after entering: t_in={t_in}, t_out={t_out}")
        self.intrusions.append((float(t_in), float(t_out)))

    def entered_at(self, t: float) -> float | None:
        """When the person now in the zone entered (robot seconds), or None if the zone is empty at t."""
        for t_in, t_out in self.intrusions:
            if t_in <= t < t_out:
                return t_in
        return None

    def reset_due(self, triggered_at: float, t: float) -> bool:
        """Has the simulated operator pressed clear-stop by time t for a stop triggered at `triggered_at`?"""
        if self.operator_reset_s is None or self.entered_at(t) is not None:
            return False
        left = [t_out for t_in, t_out in self.intrusions if t_out > triggered_at and t_in <= t]
        t_empty = max(left) if left else triggered_at
        return t >= t_empty + self.operator_reset_s


@dataclass(frozen=True)
class StopEvent:
    """One protective stop, in robot seconds."""

    cause: str  # "zone" | "command"
    triggered_at: float  # s, person entered / stop commanded
    halted_at: float  # s, the arm stood still (braking done, motors settled)
    braking_from: float = float("nan")  # s, when braking started (the first control sample after the trigger)
    cleared_at: float | None = None  # s, when clear_stop released it (None: still holding)
    speed_at_trigger: float = 0.0  # rad/s, fastest joint when braking started
    phase: str = ""  # the motion phase it interrupted ("transit", "lift", ...; "" between motions)

    @property
    def reaction_s(self) -> float:
        """Trigger to the start of braking: how fast the controller noticed."""
        start = self.braking_from if np.isfinite(self.braking_from) else self.halted_at
        return start - self.triggered_at

    @property
    def stop_to_standstill_s(self) -> float:
        return self.halted_at - self.triggered_at

    def as_dict(self) -> dict:
        return {
            "cause": self.cause,
            "phase": self.phase,
            "triggered_at": round(self.triggered_at, 4),
            "braking_from": round(self.braking_from, 4) if np.isfinite(self.braking_from) else None,
            "halted_at": round(self.halted_at, 4),
            "stop_to_standstill_s": round(self.stop_to_standstill_s, 4),
            "speed_at_trigger_rad_s": round(self.speed_at_trigger, 3),
            "cleared_at": None if self.cleared_at is None else round(self.cleared_at, 4),
            "held_s": None if self.cleared_at is None else round(self.cleared_at - self.halted_at, 4),
        }


class PathRate:
    """Time scaling of a path q(tau) for braking to rest on it and accelerating back (stop category 2).

    `q_of_tau` gives the joints at nominal time tau (the trajectory as planned). The executed time t
    runs tau at rate r = dtau/dt: 1 on the plan, 0 at rest. Then
        qdot = q'(tau) r,   qddot = q''(tau) r^2 + q'(tau) rdot,
    and each step picks the most negative (braking) or most positive (resuming) rdot that keeps
    every joint within its acceleration limit, changing rdot no faster than the jerk limit allows and
    easing off early enough that r arrives at 0 (or 1) with rdot = 0 (no acceleration step at the
    end). rdot = 0 is always feasible when the plan itself respects the limits and r <= 1, so the
    greedy choice never gets stuck; it is time-optimal up to the jerk ramps.
    """

    def __init__(
        self,
        q_of_tau: Callable[[float], np.ndarray],
        tau: float,
        tau_end: float,
        a_max: np.ndarray,
        j_max: np.ndarray = PANDA_MAX_JERK,
        r: float = 1.0,
        h: float = 1e-3,
    ) -> None:
        self.q_of_tau = q_of_tau
        self.tau = float(tau)
        self.tau_end = float(tau_end)
        self.a_max = np.asarray(a_max, dtype=np.float64)
        self.j_max = np.asarray(j_max, dtype=np.float64)
        self.r = float(r)
        self.rdot = 0.0
        self.h = h  # s of nominal time, finite-difference step for q' and q''

    def _derivatives(self) -> tuple[np.ndarray, np.ndarray]:
        h = self.h
        lo, hi = max(self.tau - h, 0.0), min(self.tau + h, self.tau_end)
        if hi - lo < 1e-9:
            return np.zeros_like(self.a_max), np.zeros_like(self.a_max)
        q_lo, q_mid, q_hi = self.q_of_tau(lo), self.q_of_tau(self.tau), self.q_of_tau(hi)
        d1 = (q_hi - q_lo) / (hi - lo)
        d2 = np.zeros_like(d1)
        if self.tau - h >= 0 and self.tau + h <= self.tau_end:
            d2 = (q_hi - 2 * q_mid + q_lo) / (h * h)
        elif self.tau - h < 0 and self.tau + 2 * h <= self.tau_end:
            # At the start of a path that begins moving (a transit taking over from a lift): its
            # acceleration there is not zero, so a one-sided difference rather than none.
            d2 = (self.q_of_tau(self.tau + 2 * h) - 2 * q_hi + q_mid) / (h * h)
        return d1, d2

    def speed(self) -> float:
        """Fastest joint speed now (rad/s)."""
        d1, _ = self._derivatives()
        return float(np.max(np.abs(d1))) * self.r

    def step(self, dt: float, target: float) -> float:
        """Advance by dt (s) towards rate `target` (0: brake, 1: resume); returns the new tau."""
        d1, d2 = self._derivatives()
        r = self.r
        moving = np.abs(d1) > 1e-9
        lo, hi = -np.inf, np.inf
        # The bounds where the path is now and where this step takes it: where the path's own
        # velocity and acceleration change fast (the jerk-limited start of a move that took over
        # from a moving state), the bound of the current point alone is exceeded a step later.
        tau_keep = self.tau
        self.tau = min(self.tau + r * dt, self.tau_end)
        d1_next, d2_next = self._derivatives()
        self.tau = tau_keep
        for dd1, dd2 in ((d1, d2), (d1_next, d2_next)):
            for j in np.flatnonzero(np.abs(dd1) > 1e-9):
                b1 = (-self.a_max[j] - dd2[j] * r * r) / dd1[j]
                b2 = (self.a_max[j] - dd2[j] * r * r) / dd1[j]
                lo, hi = max(lo, min(b1, b2)), min(hi, max(b1, b2))
        if not moving.any():  # nothing moves at this point of the path: rate changes cost nothing
            lo, hi = -1.0 / dt, 1.0 / dt
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # rdot = 0 is feasible (see the class docstring)
        jerk = float(np.min(self.j_max[moving] / np.abs(d1[moving]))) if moving.any() else 1.0 / (dt * dt)
        gap = target - r
        want = lo if gap < 0 else hi
        # Ease off so that rdot is back to 0 when r reaches the target (jerk-limited arrival).
        if abs(gap) <= self.rdot * self.rdot / (2.0 * jerk) + abs(self.rdot) * dt:
            want = 0.0
        rdot = float(np.clip(want, self.rdot - jerk * dt, self.rdot + jerk * dt))
        r_new = r + rdot * dt
        if (gap < 0 and r_new <= target) or (gap > 0 and r_new >= target) or gap == 0:
            r_new, rdot = target, 0.0
        self.tau = min(self.tau + 0.5 * (r + r_new) * dt, self.tau_end)
        self.r, self.rdot = r_new, rdot
        if self.tau >= self.tau_end:  # the plan ends at rest anyway
            self.r, self.rdot = target, 0.0
        return self.tau
