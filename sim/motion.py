"""Robot time: how long a motion takes on the real arm, from its velocity, acceleration and jerk limits.

Every motion the simulated arm makes is charged in *robot seconds* computed here, never from the
host's wall clock, so picks per hour mean the same thing however fast the simulator runs.

Kinds of motion:
- joint-space moves (to the pre-grasp, transit to the box): time-optimal, jerk-limited trajectories
  from ruckig (`RuckigMove`) at the Panda's published velocity, acceleration and jerk limits, all
  joints synchronised. A move through via points (`plan_via_move`) does not stop at them: each via
  point gets a velocity (blending), chosen by a bounded search to make the whole move short
  (`via_velocities`), and ruckig computes the time-optimal segment between consecutive states.
- free-space Cartesian straight lines (the descent to the pre-grasp, the lift above the pile, the
  lowering into the box, the retreat): a 1-D jerk-limited ruckig profile of the path length at the
  tool limits (`line_profile`), slowed until every joint's sampled velocity and acceleration are
  within their limits.
- contact lines (the physical approach and the first centimetres of the lift): a trapezoidal
  profile on the path length at a set tool speed and acceleration (`trapezoid_time`), never faster
  than the joint limits allow for the same start and end configuration. These run with full physics.
- `joint_move_time` is the synchronised trapezoid without jerk limits: a lower bound, used to keep
  Cartesian lines no faster than the joints allow.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ruckig import ControlInterface, InputParameter, Result, Ruckig, RuckigError, Synchronization, Trajectory

# Franka Emika Panda published limits (joints 1-7).
PANDA_MAX_VELOCITY = np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61])  # rad/s
PANDA_MAX_ACCELERATION = np.array([15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0])  # rad/s^2
PANDA_MAX_JERK = np.full(7, 7500.0)  # rad/s^3


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


def ramp_profile(distance: float, v_max: float, a_max: float) -> tuple[float, float]:
    """A line that starts at rest and ends moving, for another motion to take over: it accelerates
    at `a_max` to the cruise speed min(v_max, sqrt(a_max * distance)) (reached by half way, so it
    ends cruising, at zero acceleration) and cruises to the end. (duration s, end speed m/s)."""
    d = abs(float(distance))
    if v_max <= 0 or a_max <= 0:
        raise ValueError(f"limits must be positive, got v_max={v_max}, a_max={a_max}")
    if d == 0.0:
        return 0.0, 0.0
    v = min(float(v_max), float(np.sqrt(a_max * d)))
    return v / a_max + (d - v * v / (2.0 * a_max)) / v, v


def ramp_fraction(t: np.ndarray | float, distance: float, v: float, a_max: float) -> np.ndarray:
    """Fraction of the path of `ramp_profile` done at times `t` (cruise speed `v`, m/s)."""
    t = np.maximum(np.asarray(t, dtype=np.float64), 0.0)
    t_acc = v / a_max
    s = np.where(t < t_acc, 0.5 * a_max * t * t, 0.5 * a_max * t_acc * t_acc + v * (t - t_acc))
    return np.clip(s / max(abs(float(distance)), 1e-12), 0.0, 1.0)


def brake_profile(distance: float, v0: float, a_max: float) -> float:
    """Duration (s) of a line taken over moving at `v0` (m/s): it cruises at v0, then brakes at
    `a_max` to rest at the end. Raises ValueError when the line is too short to brake in."""
    d = abs(float(distance))
    if v0 <= 0 or a_max <= 0:
        raise ValueError(f"speed and acceleration must be positive, got v0={v0}, a_max={a_max}")
    if d < v0 * v0 / (2.0 * a_max):
        raise ValueError(f"a line of {d} m is too short to brake from {v0} m/s at {a_max} m/s^2")
    return d / v0 + v0 / (2.0 * a_max)


def brake_fraction(t: np.ndarray | float, distance: float, v0: float, a_max: float) -> np.ndarray:
    """Fraction of the path of `brake_profile` done at times `t`."""
    d = abs(float(distance))
    duration = brake_profile(d, v0, a_max)
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, duration)
    s = np.where(t <= duration - v0 / a_max, v0 * t, d - 0.5 * a_max * (duration - t) ** 2)
    return np.clip(s / max(d, 1e-12), 0.0, 1.0)


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


def plan_trapezoid_move(q_start: np.ndarray, q_end: np.ndarray, speed_scale: float = 1.0) -> JointMove:
    """The synchronised trapezoid (no jerk limit): the reference the ruckig moves are compared with."""
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


class RuckigMove:
    """A time-optimal, jerk-limited joint trajectory through a sequence of states (ruckig).

    `states` are (q (7,), qd (7,)) pairs: the first is where the arm is, the last must be at rest,
    the ones between are via points passed at their velocity. Accelerations at the states are 0,
    except at the first where `start_acceleration` (7,) says otherwise (a move that takes over from
    one still under way, e.g. the transit from a lift that has not stopped). A start velocity above
    a (scaled) limit is braked into it first (ruckig does that).
    Limits: the Panda's, with velocity scaled by `speed_scale`, acceleration by its square and jerk
    by its cube (a uniformly slower move), or velocity by `velocity_scale` where given (a
    payload-aware carry: `carry_velocity_scale`). Same interface as `JointMove` (q_start, q_end,
    duration, sample).
    """

    def __init__(
        self,
        states: Sequence[tuple[np.ndarray, np.ndarray]],
        speed_scale: float = 1.0,
        v_max: np.ndarray = PANDA_MAX_VELOCITY,
        a_max: np.ndarray = PANDA_MAX_ACCELERATION,
        j_max: np.ndarray = PANDA_MAX_JERK,
        start_acceleration: np.ndarray | None = None,
        velocity_scale: float | None = None,
    ) -> None:
        if not 0 < speed_scale <= 1:
            raise ValueError(f"speed_scale must be in (0, 1], got {speed_scale}")
        vs = _velocity_scale(speed_scale, velocity_scale)
        if len(states) < 2:
            raise ValueError("a move needs at least a start and an end state")
        self.speed_scale = float(speed_scale)
        self.v_max = np.asarray(v_max, dtype=np.float64) * vs
        self.a_max = np.asarray(a_max, dtype=np.float64) * speed_scale**2
        self.j_max = np.asarray(j_max, dtype=np.float64) * speed_scale**3
        self.q_start = np.asarray(states[0][0], dtype=np.float64)[:7].copy()
        self.q_end = np.asarray(states[-1][0], dtype=np.float64)[:7].copy()
        self.segments: list[Trajectory] = []
        self.starts: list[float] = []
        t = 0.0
        otg = Ruckig(7)
        a_start = np.zeros(7)
        if start_acceleration is not None:
            a_start = np.asarray(start_acceleration, dtype=np.float64)
        for k, ((q0, v0), (q1, v1)) in enumerate(zip(states[:-1], states[1:], strict=True)):
            inp = InputParameter(7)
            inp.current_position = [float(x) for x in np.asarray(q0)[:7]]
            inp.current_velocity = [float(x) for x in np.asarray(v0)[:7]]
            inp.current_acceleration = [float(x) for x in a_start[:7]] if k == 0 else [0.0] * 7
            inp.target_position = [float(x) for x in np.asarray(q1)[:7]]
            inp.target_velocity = [float(x) for x in np.asarray(v1)[:7]]
            inp.target_acceleration = [0.0] * 7
            inp.max_velocity = self.v_max.tolist()
            inp.max_acceleration = self.a_max.tolist()
            inp.max_jerk = self.j_max.tolist()
            d = np.asarray(q1, dtype=np.float64)[:7] - np.asarray(q0, dtype=np.float64)[:7]
            inp.synchronization = _synchronization(v0, v1, d, k == 0 and bool(np.any(a_start)))
            traj = Trajectory(7)
            try:
                res = otg.calculate(inp, traj)
            except RuckigError as exc:  # input outside the limits (e.g. a via velocity at its limit)
                raise ValueError(f"ruckig refused a segment: {exc}") from exc
            if res not in (Result.Working, Result.Finished):
                raise ValueError(f"ruckig could not plan a segment: {res}")
            self.segments.append(traj)
            self.starts.append(t)
            t += float(traj.duration)
        self.duration = t

    def state(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q, qd, qdd) at time t (s from the start), clamped to the move."""
        t = min(max(float(t), 0.0), self.duration)
        k = int(np.searchsorted(self.starts, t, side="right")) - 1
        k = min(max(k, 0), len(self.segments) - 1)
        q, qd, qdd = self.segments[k].at_time(t - self.starts[k])
        return np.array(q), np.array(qd), np.array(qdd)

    def sample(self, times: np.ndarray) -> np.ndarray:
        """(len(times), 7) joint positions at the given times (s from the start)."""
        return np.array([self.state(t)[0] for t in np.atleast_1d(times)])


def _velocity_scale(speed_scale: float, velocity_scale: float | None) -> float:
    """The velocity limits' scale of a move at `speed_scale` (itself, unless given otherwise)."""
    if velocity_scale is None:
        return float(speed_scale)
    if not 0 < velocity_scale <= 1:
        raise ValueError(f"velocity_scale must be in (0, 1], got {velocity_scale}")
    return float(velocity_scale)


def carry_velocity_scale(speed_scale: float) -> float:
    """Velocity scale of a payload-aware carry slowed to `speed_scale` (accelerations by its square,
    jerk by its cube): its square root. What a held item's grip feels is the tool's acceleration:
    the inertial part goes with the joint accelerations, the centripetal part with the velocities
    squared. Scaling velocities as much as accelerations (a uniformly slower move) slows a long
    carry's cruise for nothing; keeping them at full speed would leave the centripetal load. The
    carry's load is checked sample by sample either way (`SimArm._carry_utilisation`). A 1.5 kg
    carton on the cup (59 % of it at rest): pick-and-place 4.8 s with velocities scaled alike,
    4.3 s so; 1.2 kg (47 %) 4.6 -> 4.3 s."""
    return float(np.sqrt(speed_scale))


def _segment_durations(
    states: Sequence[tuple[np.ndarray, np.ndarray]],
    speed_scale: float,
    start_acceleration: np.ndarray | None,
    velocity_scale: float | None = None,
) -> list[float]:
    """The segment times `RuckigMove(states, ...)` would have, without building it (one reused
    ruckig instance, ~7x faster: the via-velocity search calls this hundreds of times); [] when a
    segment cannot be planned."""
    otg, inp, traj = _LEAN
    inp.max_velocity = (PANDA_MAX_VELOCITY * _velocity_scale(speed_scale, velocity_scale)).tolist()
    inp.max_acceleration = (PANDA_MAX_ACCELERATION * speed_scale**2).tolist()
    inp.max_jerk = (PANDA_MAX_JERK * speed_scale**3).tolist()
    zero = [0.0] * 7
    a0 = np.zeros(7) if start_acceleration is None else np.asarray(start_acceleration, dtype=np.float64)
    out = []
    for k, ((q0, v0), (q1, v1)) in enumerate(zip(states[:-1], states[1:], strict=True)):
        inp.current_position, inp.current_velocity = q0.tolist(), np.asarray(v0).tolist()
        inp.current_acceleration = a0.tolist() if k == 0 else zero
        inp.target_position, inp.target_velocity, inp.target_acceleration = (
            q1.tolist(),
            np.asarray(v1).tolist(),
            zero,
        )
        inp.synchronization = _synchronization(v0, v1, q1 - q0, k == 0 and bool(np.any(a0)))
        try:
            res = otg.calculate(inp, traj)
        except RuckigError:
            return []
        if res not in (Result.Working, Result.Finished):
            return []
        out.append(float(traj.duration))
    return out


_LEAN = (Ruckig(7), InputParameter(7), Trajectory(7))


def _synchronization(v0: np.ndarray, v1: np.ndarray, d: np.ndarray, accelerating: bool) -> Synchronization:
    """Rest to rest, or passing both ends along the segment's own line `d`: phase synchronisation
    keeps the joint-space straight line (as the trapezoid did); else time synchronisation (phase
    needs collinear states; `accelerating`: the segment starts with an acceleration)."""
    straight = _along(v0, d) and _along(v1, d) and not accelerating
    return Synchronization.Phase if straight else Synchronization.Time


def _along(v: np.ndarray, d: np.ndarray) -> bool:
    """Is velocity `v` zero or along +d (the segment's own joint-space direction)?"""
    v = np.asarray(v, dtype=np.float64)[:7]
    if not np.any(v):
        return True
    dd = float(d @ d)
    if dd < 1e-18:
        return False
    c = float(v @ d) / dd
    return c > 0 and float(np.max(np.abs(v - c * d))) <= 1e-9 * (1.0 + float(np.max(np.abs(v))))


def plan_stop(q: np.ndarray, qd: np.ndarray, qdd: np.ndarray | None = None) -> RuckigMove:
    """Time-optimal, jerk-limited stop of the joints from a motion under way (q, qd, qdd) to rest,
    wherever that is (ruckig's velocity interface; all joints stop together), at the Panda's limits."""
    q0 = np.asarray(q, dtype=np.float64)[:7]
    inp = InputParameter(7)
    inp.control_interface = ControlInterface.Velocity
    inp.synchronization = Synchronization.Time
    inp.current_position = [float(x) for x in q0]
    inp.current_velocity = [float(x) for x in np.asarray(qd, dtype=np.float64)[:7]]
    a0 = np.zeros(7) if qdd is None else np.asarray(qdd, dtype=np.float64)[:7]
    inp.current_acceleration = [float(x) for x in a0]
    inp.target_velocity, inp.target_acceleration = [0.0] * 7, [0.0] * 7
    inp.max_velocity = PANDA_MAX_VELOCITY.tolist()
    inp.max_acceleration = PANDA_MAX_ACCELERATION.tolist()
    inp.max_jerk = PANDA_MAX_JERK.tolist()
    traj = Trajectory(7)
    res = Ruckig(7).calculate(inp, traj)
    if res not in (Result.Working, Result.Finished):
        raise ValueError(f"ruckig could not plan a stop: {res}")
    move = RuckigMove.__new__(RuckigMove)  # same interface, one segment planned here
    move.speed_scale = 1.0
    move.v_max, move.a_max, move.j_max = PANDA_MAX_VELOCITY, PANDA_MAX_ACCELERATION, PANDA_MAX_JERK
    move.segments, move.starts = [traj], [0.0]
    move.duration = float(traj.duration)
    move.q_start = q0.copy()
    move.q_end = np.array(traj.at_time(move.duration)[0])
    return move


def plan_joint_move(
    q_start: np.ndarray, q_end: np.ndarray, speed_scale: float = 1.0, velocity_scale: float | None = None
) -> RuckigMove:
    """Time-optimal, jerk-limited rest-to-rest joint move (ruckig, phase-synchronised)."""
    q0 = np.asarray(q_start, dtype=np.float64)[:7]
    q1 = np.asarray(q_end, dtype=np.float64)[:7]
    return RuckigMove([(q0, np.zeros(7)), (q1, np.zeros(7))], speed_scale, velocity_scale=velocity_scale)


def via_velocity(
    q_prev: np.ndarray,
    q_via: np.ndarray,
    q_next: np.ndarray,
    speed_scale: float = 1.0,
    share: float = 0.5,
    velocity_scale: float | None = None,
) -> np.ndarray:
    """Velocity to pass a via point with (blending): zero for a joint that turns back there,
    otherwise along its motion, `share` of what it could reach from rest over the shorter of its two
    adjacent distances (sqrt(2 a d)), never above its velocity limit."""
    d_in = np.asarray(q_via, dtype=np.float64) - np.asarray(q_prev, dtype=np.float64)
    d_out = np.asarray(q_next, dtype=np.float64) - np.asarray(q_via, dtype=np.float64)
    same = np.sign(d_in) * np.sign(d_out) > 0
    reach = np.sqrt(2.0 * PANDA_MAX_ACCELERATION * speed_scale**2 * np.minimum(np.abs(d_in), np.abs(d_out)))
    speed = np.minimum(share * reach, PANDA_MAX_VELOCITY * _velocity_scale(speed_scale, velocity_scale))
    return np.where(same, np.sign(d_out) * speed, 0.0)


def plan_via_move(
    points: Sequence[np.ndarray],
    speed_scale: float = 1.0,
    start_velocity: np.ndarray | None = None,
    start_acceleration: np.ndarray | None = None,
    optimise: bool = True,
    end_velocity: np.ndarray | None = None,
    straight_first: bool = False,
    velocity_scale: float | None = None,
) -> RuckigMove:
    """Joint move from points[0] through the via points without stopping, to rest at the last.

    points[0] is passed at `start_velocity` / `start_acceleration` (7,) when the arm is already
    moving there (rad/s, rad/s^2; default at rest); the last is reached at `end_velocity` (7,)
    (rad/s, zero acceleration) when another motion takes over there. `optimise`: choose the
    velocities the via points are passed at to make the whole move short (`via_velocities`; with
    `straight_first` its first leg stays on its joint-space line); else the `via_velocity` rule."""
    pts = [np.asarray(q, dtype=np.float64)[:7] for q in points]
    v0 = np.zeros(7) if start_velocity is None else np.asarray(start_velocity, dtype=np.float64)[:7]
    a0 = None if start_acceleration is None else np.asarray(start_acceleration, dtype=np.float64)[:7]
    v1 = np.zeros(7) if end_velocity is None else np.asarray(end_velocity, dtype=np.float64)[:7]
    if optimise and len(pts) > 2:
        vias = via_velocities(pts, speed_scale, v0, a0, v1, straight_first, velocity_scale)
    else:
        vias = [
            via_velocity(pts[k - 1], pts[k], pts[k + 1], speed_scale, velocity_scale=velocity_scale)
            for k in range(1, len(pts) - 1)
        ]
    states = [(pts[0], v0), *zip(pts[1:-1], vias, strict=True), (pts[-1], v1)]
    return RuckigMove(states, speed_scale, start_acceleration=a0, velocity_scale=velocity_scale)


# Evaluations of the whole move the via-velocity search may spend (each a ruckig plan of every
# segment, 0.03-0.05 ms): on 24 moves recorded on the tuning bench, a search free at every via point
# took 8.9 % off their time with 150, 9.7 % with 300, 11 % with 3,000; with the last leg held to its
# line (as now) 200 took 6.8 %.
VIA_SEARCH_EVALUATIONS = 200
_VIA_CACHE: OrderedDict[bytes, list[np.ndarray]] = OrderedDict()
_VIA_CACHE_SIZE = 256


def via_velocities(
    points: Sequence[np.ndarray],
    speed_scale: float = 1.0,
    start_velocity: np.ndarray | None = None,
    start_acceleration: np.ndarray | None = None,
    end_velocity: np.ndarray | None = None,
    straight_first: bool = False,
    velocity_scale: float | None = None,
) -> list[np.ndarray]:
    """Velocities (rad/s, one (7,) per via point) that make a blended move through `points` short.

    Ruckig (the community version) plans one segment at a time between given states; how fast each
    via point is passed decides how long the whole move takes. The `via_velocity` rule is safe but
    slow: it stops every joint that turns back and passes the others at half of what they could
    reach. This searches the via velocities directly (scipy's Powell, bounded by the velocity
    limits, a fixed budget), from the best of that rule and central differences over the segment
    times, the last via point passed along the last segment's line (which keeps that unchecked
    descent straight), and keeps the rule's where it is faster. Deterministic for the same input (so
    the move a path check sampled is the move executed); results are cached.
    """
    from scipy.optimize import minimize  # a slow import, only when a blended move is planned

    pts = [np.asarray(q, dtype=np.float64)[:7] for q in points]
    v0 = np.zeros(7) if start_velocity is None else np.asarray(start_velocity, dtype=np.float64)[:7]
    a0 = None if start_acceleration is None else np.asarray(start_acceleration, dtype=np.float64)[:7]
    v1 = np.zeros(7) if end_velocity is None else np.asarray(end_velocity, dtype=np.float64)[:7]
    vs = _velocity_scale(speed_scale, velocity_scale)
    key = np.concatenate(
        [*pts, v0, np.zeros(7) if a0 is None else a0, v1, [speed_scale, straight_first, vs]]
    ).tobytes()
    if key in _VIA_CACHE:
        _VIA_CACHE.move_to_end(key)
        return [v.copy() for v in _VIA_CACHE[key]]
    n_via = len(pts) - 2
    v_lim = 0.999 * PANDA_MAX_VELOCITY * vs  # (ruckig refuses a target velocity at its limit)

    def timed(vias: list[np.ndarray]) -> tuple[float, list[float]]:
        segs = _segment_durations(
            [(pts[0], v0), *zip(pts[1:-1], vias, strict=True), (pts[-1], v1)], speed_scale, a0, vs
        )
        return (sum(segs), segs) if segs else (np.inf, [])

    # The last via point is passed along the last segment's own joint-space line (a speed `s` up to
    # where the first joint reaches its limit), so that segment stays on that straight line (ruckig
    # phase-synchronises collinear states): it is the descent into the box or down the approach
    # axis, which no path check covers, and a bent one swung a held item into the box's rim. With
    # `straight_first`, the first via point likewise (the leg backing straight out of the box).
    lines: dict[int, np.ndarray] = {}  # via index -> its direction, scaled so s = 1 is at a limit
    for k, d in ((n_via - 1, pts[-1] - pts[-2]), *(((0, pts[1] - pts[0]),) if straight_first else ())):
        lines[k] = d / max(float(np.max(np.abs(d) / v_lim)), 1e-12)
    free = [k for k in range(n_via) if k not in lines]
    lined = sorted(lines)

    def unpack(x: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros(7)] * n_via
        for i, k in enumerate(free):
            out[k] = x[7 * i : 7 * i + 7]
        for i, k in enumerate(lined):
            out[k] = x[7 * len(free) + i] * lines[k]
        return out

    def pack(vias: list[np.ndarray]) -> np.ndarray:
        lim = np.tile(v_lim, len(free))
        loose = np.concatenate([vias[k] for k in free]) if free else np.zeros(0)
        speeds = [
            float(np.clip(vias[k] @ lines[k] / max(lines[k] @ lines[k], 1e-12), 0.0, 1.0)) for k in lined
        ]
        return np.concatenate([np.clip(loose, -lim, lim), speeds])

    rule = [
        via_velocity(pts[k - 1], pts[k], pts[k + 1], speed_scale, velocity_scale=vs)
        for k in range(1, n_via + 1)
    ]
    rule_t, seg = timed(rule)
    best_t, best = np.inf, rule
    # Starting points: the rule and central differences over the segment times (repeated as the
    # times change), each with its last via velocity put on the last segment's line.
    starts = [rule]
    for _ in range(3):
        if not seg:
            break
        starts.append(
            [
                np.clip((pts[k + 1] - pts[k - 1]) / max(seg[k - 1] + seg[k], 1e-6), -v_lim, v_lim)
                for k in range(1, n_via + 1)
            ]
        )
        seg = timed(starts[-1])[1]
    x0 = None
    for vias in starts:
        x = pack(vias)
        t = timed(unpack(x))[0]
        if t < best_t:
            best_t, x0 = t, x

    def cost(x: np.ndarray) -> float:
        return timed(unpack(x))[0]

    if x0 is not None and np.isfinite(best_t):
        bounds = [*((-v, v) for v in np.tile(v_lim, len(free))), *((0.0, 1.0) for _ in lined)]
        res = minimize(
            cost,
            x0,
            method="Powell",
            bounds=bounds,
            options={"maxfev": VIA_SEARCH_EVALUATIONS, "xtol": 1e-3, "ftol": 1e-4},
        )
        if np.isfinite(res.fun) and res.fun < best_t:
            x0, best_t = res.x, float(res.fun)
        best = unpack(np.clip(x0, [b[0] for b in bounds], [b[1] for b in bounds]))
    if not best_t < rule_t:  # the rule's own pass was faster (its last segment may bend, as always)
        best = rule
    _VIA_CACHE[key] = [v.copy() for v in best]
    if len(_VIA_CACHE) > _VIA_CACHE_SIZE:
        _VIA_CACHE.popitem(last=False)
    return best


@dataclass(frozen=True)
class LineProfile:
    """A jerk-limited profile of a path length (ruckig, one degree of freedom), from rest."""

    length: float  # m
    duration: float  # s
    trajectory: Trajectory

    def fraction(self, times: np.ndarray) -> np.ndarray:
        """Fraction of the path done at the given times (s from the start)."""
        if self.length <= 0:
            return np.ones(len(np.atleast_1d(times)))
        out = [
            self.trajectory.at_time(min(max(float(t), 0.0), self.duration))[0][0]
            for t in np.atleast_1d(times)
        ]
        return np.clip(np.array(out) / self.length, 0.0, 1.0)


def line_reachable_speed(length: float, a_max: float, j_max: float) -> float:
    """Speed (m/s) a jerk-limited profile from rest surely reaches within `length` metres, zero
    acceleration at the end (accelerate, then let the acceleration fall back to 0): a safe
    `end_speed` for `line_profile` (one that needs no overshoot)."""
    if length <= 0:
        return 0.0
    # Jerk-only ramp up and down (a peak a_p = sqrt(j v)): d = v * sqrt(v / j); with an acceleration
    # plateau d = v^2 / (2 a) + v a / (2 j). The larger distance bounds both; solve it for v.
    lo, hi = 0.0, 100.0
    for _ in range(60):
        v = (lo + hi) / 2
        d = max(v * np.sqrt(v / j_max), v * v / (2 * a_max) + v * a_max / (2 * j_max))
        lo, hi = (v, hi) if d <= length else (lo, v)
    return lo


def line_profile(
    length: float, v_max: float, a_max: float, j_max: float, end_speed: float = 0.0, start_speed: float = 0.0
) -> LineProfile:
    """Time-optimal jerk-limited profile for a straight tool line of `length` metres, from rest to
    rest, or to `end_speed` (m/s, zero acceleration) when another motion takes over there; from
    `start_speed` (m/s along the line, zero acceleration) when it takes over from one."""
    if v_max <= 0 or a_max <= 0 or j_max <= 0:
        raise ValueError(f"limits must be positive, got v={v_max}, a={a_max}, j={j_max}")
    if not 0.0 <= end_speed <= v_max:
        raise ValueError(f"end speed must be in [0, v_max={v_max}], got {end_speed}")
    inp = InputParameter(1)
    inp.current_position, inp.current_velocity, inp.current_acceleration = [0.0], [float(start_speed)], [0.0]
    inp.target_position, inp.target_velocity = [float(length)], [float(end_speed)]
    inp.target_acceleration = [0.0]
    inp.max_velocity, inp.max_acceleration, inp.max_jerk = [float(v_max)], [float(a_max)], [float(j_max)]
    traj = Trajectory(1)
    res = Ruckig(1).calculate(inp, traj)
    if res not in (Result.Working, Result.Finished):
        raise ValueError(f"ruckig could not plan a line of {length} m: {res}")
    return LineProfile(float(length), float(traj.duration), traj)
