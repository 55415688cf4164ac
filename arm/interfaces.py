"""Hardware interfaces the controller drives. A real cell implements these; `sim/` does in PyBullet.

The controller only ever talks to these protocols, so supporting a real arm means writing one more
implementation, never editing the controller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from grasping.types import (  # re-exported: the shared vocabulary
    Bounds,
    Frame,
    Grasp,
    GripperKind,
    Outcome,
    Placement,
    Reason,
)

__all__ = [
    "Arm",
    "Bounds",
    "Camera",
    "Frame",
    "Grasp",
    "Gripper",
    "GripperKind",
    "Outcome",
    "PickAndPlace",
    "Placement",
    "Reason",
    "ToteFeed",
    "ViewClearNotice",
]


@runtime_checkable
class Camera(Protocol):
    """A depth camera. `capture` raises `CameraError` when no frame could be read."""

    def capture(self) -> Frame: ...


@runtime_checkable
class Gripper(Protocol):
    """An end effector: a suction cup or a parallel-jaw gripper."""

    kind: GripperKind

    def grip(self) -> bool:
        """Activate (suction on / close jaws). Returns whether something is now held."""
        ...

    def release(self) -> None:
        """Deactivate (suction off / open jaws)."""
        ...

    def is_holding(self) -> bool: ...


@runtime_checkable
class ReachCheck(Protocol):
    """Optional arm capability: can the arm reach a grasp, without moving?

    `check_grasp(grasp)` answers Reason.OK, or why not (UNREACHABLE, IK_FAILED, COLLISION of the
    hand with a fixture at the pre-grasp or grasp pose, INVALID), from inverse kinematics and the
    cell's fixed geometry only. The controller asks before it commits to a candidate and skips the
    ones that would fail before the arm moved: a real arm's driver answers from its IK solver.
    """

    def check_grasp(self, grasp: Grasp) -> Reason: ...


@runtime_checkable
class ViewClearNotice(Protocol):
    """Optional arm capability: say when the arm has left the camera's view of the tote.

    `notify_when_clear(fn)` calls fn once, during the next `place`, as soon as the arm and the item
    it carries are out of the camera's view of the tote. The controller captures and plans the next
    pick there, while the arm goes on placing (arm/lookahead.py). A real arm's driver decides it
    from its joint positions and the camera's field of view.
    """

    def notify_when_clear(self, fn: Callable[[], None]) -> None: ...


@runtime_checkable
class PickAndPlace(Protocol):
    """Optional arm capability: a pick and its place as one motion, without a stop between them.

    `pick_and_place(grasp, placement_for)` picks; if the pick succeeds it calls
    `placement_for(pick outcome)` at once (where to put the item depends on how it was gripped)
    and places there, the transit taking over from the lift while it is still moving. Returns
    (pick outcome, place outcome, or None when the pick failed); each reports its own robot time
    and phases as separate `pick` and `place` calls would. A stop, a failure or an exception from
    `placement_for` leaves the arm at rest, as after separate calls.
    """

    def pick_and_place(
        self, grasp: Grasp, placement_for: Callable[[Outcome], Placement]
    ) -> tuple[Outcome, Outcome | None]: ...


@runtime_checkable
class Arm(Protocol):
    """A robot arm with its grippers. Motions return Outcomes; failures are values, not exceptions.

    `robot_time` is the arm's own clock in seconds: on a real arm the wall clock, in simulation
    the simulated time computed from joint velocity and acceleration limits.
    """

    @property
    def robot_time(self) -> float: ...

    def home(self) -> Outcome: ...

    def move(self, position: np.ndarray, orientation: np.ndarray) -> Outcome:
        """Move the tool-centre point to a pose (base frame, quaternion xyzw)."""
        ...

    def pick(self, grasp: Grasp) -> Outcome:
        """Pre-grasp, straight-line approach, grip, lift, verify. Returns what was executed."""
        ...

    def place(self, placement: Placement) -> Outcome:
        """Move over the box, lower, release, retreat."""
        ...

    def stop(self) -> None:
        """Protective stop, category 2 (ISO 10218-1 / IEC 60204-1): a controlled stop with power kept.

        The motion in progress brakes along its path within the joint limits (not an instantaneous
        halt) and holds there: the arm does not move and a gripped item stays gripped. The motion
        call does not return while it holds; it resumes after `clear_stop` and returns its normal
        Outcome, whose details carry `stops` (each with `stop_to_standstill_s`). A motion asked for
        while stopped is refused with Reason.ESTOP before anything moves. Safe to call from another
        thread (the daemon's control socket).
        """
        ...

    @property
    def stopped(self) -> bool:
        """True while a protective stop holds the arm (motions started now return Reason.ESTOP)."""
        ...

    def clear_stop(self) -> None:
        """The only way a protective stop ends (`clear-stop`): a held motion resumes from where it stopped."""
        ...

    def idle(self, seconds: float) -> None:
        """Hold still for `seconds` of robot time (a real arm sleeps; a simulated one advances its clock)."""
        ...


@runtime_checkable
class ToteFeed(Protocol):
    """The conveyor side of a cell: totes in, boxes out. On a real cell these are PLC signals."""

    def next_tote(self) -> str | None:
        """Bring the next tote under the camera; returns its id, or None when no more totes come."""
        ...

    def divert_tote(self, reason: str) -> None:
        """Send the current tote to exception handling (items nobody can pick safely)."""
        ...

    def swap_box(self) -> None:
        """Close the full outbound box and bring an empty one."""
        ...


class CameraError(RuntimeError):
    """No usable frame could be read from the camera."""
