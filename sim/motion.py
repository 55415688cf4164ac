"""Robot time: how long a motion takes on the real arm, from its velocity and acceleration limits.

Every motion the simulated arm makes is charged in *robot seconds* computed here, never from the
host's wall clock, so picks per hour mean the same thing however fast the simulator runs.

Two kinds of motion:
- joint-space moves (pre-grasp, transit to the box, back): a synchronised trapezoidal profile. Each
  joint's minimum time for its distance under its own velocity and acceleration limit is computed,
  the slowest joint sets the duration, and the other joints are slowed to finish together
  (time-scaled, same profile shape). That is the minimum-time point-to-point move without jerk
  limits, the standard model for industrial arms.
- Cartesian straight lines (approach, lift, lower, retreat): a trapezoidal profile on the path
  length at a set tool speed and acceleration, and never faster than the joint limits allow for the
  same start and end configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Franka Emika Panda published limits (joints 1-7).
PANDA_MAX_VELOCITY = np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61])  # rad/s
PANDA_MAX_ACCELERATION = np.array([15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0])  # rad/s^2


def trapezoid_time(distance: float, v_max: float, a_max: float) -> float:
    """Minimum time (s) to travel `distance` from rest to rest under |v| <= v_max, |a| <= a_max."""
    d = abs(float(distance))
    if d == 0.0:
        return 0.0
    if v_max <= 0 or a_max <= 0:
        raise ValueError(f"limits must be positive, got v_max={v_max}, a_max={a_max}")
    if d <= v_max * v_max / a_max:  # never reaches cruise speed: triangular profile
        return 2.0 * np.sqrt(d / a_max)
    return d / v_max + v_max / a_max


def trapezoid_fraction(t: np.ndarray | float, duration: float, v_max: float, a_max: float) -> np.ndarray:
    """Fraction of the path done at times `t` for a rest-to-rest trapezoid of unit length.

    `v_max` and `a_max` are in units of the path length (so for a unit path they are already
    scaled). Used to sample a timed trajectory for kinematic execution and acceleration checks.
    """
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, duration)
    if duration <= 0:
        return np.ones_like(t)
    # Re-derive the profile that exactly fits `duration` with acceleration a_max: the cruise
    # speed v solves duration = 1/v + v/a (or the triangular case).
    a = a_max
    disc = duration * duration - 4.0 / a
    v = (duration - np.sqrt(max(disc, 0.0))) * a / 2.0 if disc >= 0 else np.sqrt(a)  # unit length
    t_acc = v / a
    out = np.where(
        t < t_acc,
        0.5 * a * t * t,
        np.where(
            t <= duration - t_acc,
            0.5 * a * t_acc * t_acc + v * (t - t_acc),
            1.0 - 0.5 * a * (duration - t) ** 2,
        ),
    )
    return np.clip(out, 0.0, 1.0)


@dataclass(frozen=True)
class JointMove:
    """A timed rest-to-rest joint-space move."""

    q_start: np.ndarray  # (7,) rad
    q_end: np.ndarray  # (7,) rad
    duration: float  # s
    speed_scale: float = 1.0  # unitless, fraction of the velocity limits (accelerations scale by its square)

    def sample(self, times: np.ndarray) -> np.ndarray:
        """(len(times), 7) joint positions at the given times (s from the start)."""
        dq = self.q_end - self.q_start
        if self.duration <= 0:
            return np.repeat(self.q_end[None, :], len(np.atleast_1d(times)), axis=0)
        # All joints share the profile shape (synchronised), so one fraction curve serves all.
        # The slowest joint's acceleration in path units sets the shape.
        a_unit = _unit_accel(dq, self.duration, self.speed_scale**2)
        s = trapezoid_fraction(np.atleast_1d(times), self.duration, 1.0, a_unit)
        return self.q_start[None, :] + s[:, None] * dq[None, :]


def _unit_accel(dq: np.ndarray, duration: float, accel_scale: float = 1.0) -> float:
    """Acceleration, in path fractions per s^2, of the synchronised profile that the limiting joint sets."""
    dq = np.abs(np.asarray(dq, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        a_unit = np.where(dq > 1e-12, accel_scale * PANDA_MAX_ACCELERATION / dq, np.inf)
    a = float(np.min(a_unit))
    # The profile must fit in `duration`: a unit path needs a >= 4 / duration^2. When no joint moves
    # (every |dq| <= 1e-12) no joint limits the profile: the fitting minimum is used, never inf,
    # whose 0 * inf in the profile made NaN joint targets (a 1e-13 rad home() move did).
    a_fit = 4.0 / (duration * duration) * (1.0 + 1e-9)
    return max(a, a_fit) if np.isfinite(a) else a_fit


def joint_move_time(
    q_start: np.ndarray,
    q_end: np.ndarray,
    v_max: np.ndarray = PANDA_MAX_VELOCITY,
    a_max: np.ndarray = PANDA_MAX_ACCELERATION,
    speed_scale: float = 1.0,
) -> float:
    """Duration (s) of a synchronised minimum-time move; `speed_scale` in (0, 1] scales v and a."""
    if not 0 < speed_scale <= 1:
        raise ValueError(f"speed_scale must be in (0, 1], got {speed_scale}")
    dq = np.abs(np.asarray(q_end, dtype=np.float64) - np.asarray(q_start, dtype=np.float64))
    if dq.shape != (7,):
        raise ValueError(f"expected 7 joint values, got shape {dq.shape}")
    times = [
        trapezoid_time(d, v * speed_scale, a * speed_scale * speed_scale)
        for d, v, a in zip(dq, v_max, a_max, strict=True)
    ]
    return float(max(times))


def plan_joint_move(q_start: np.ndarray, q_end: np.ndarray, speed_scale: float = 1.0) -> JointMove:
    q0 = np.asarray(q_start, dtype=np.float64)[:7].copy()
    q1 = np.asarray(q_end, dtype=np.float64)[:7].copy()
    return JointMove(q0, q1, joint_move_time(q0, q1, speed_scale=speed_scale), speed_scale)


def cartesian_move_time(
    length_m: float,
    tool_speed: float,
    tool_accel: float,
    q_start: np.ndarray | None = None,
    q_end: np.ndarray | None = None,
) -> float:
    """Duration (s) of a straight tool line at the tool-speed profile, never faster than the joints allow."""
    t = trapezoid_time(length_m, tool_speed, tool_accel)
    if q_start is not None and q_end is not None:
        t = max(t, joint_move_time(q_start, q_end))
    return t
