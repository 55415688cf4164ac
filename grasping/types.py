"""The shared vocabulary of pickcell: small frozen dataclasses that every package passes around.

They live in `grasping` (the bottom of the dependency chain grasping <- hitl <- arm <- sim) so that
every package can import them without breaking the one-way rule; `arm.interfaces` re-exports them.

Conventions (ROS REP 103): SI units, right-handed frames, z up. Poses are a position (3,) in metres
plus a quaternion (4,) in x, y, z, w order, expressed in the robot base frame unless the field name
says otherwise. Camera frames use the OpenCV convention (x right, y down, z forward along the
optical axis). A homogeneous transform named `T_a_b` maps points from frame b into frame a.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

GripperKind = Literal["suction", "parallel_jaw"]
GRIPPER_KINDS: tuple[GripperKind, ...] = ("suction", "parallel_jaw")


def _frozen_array(a: np.ndarray | list | tuple, dtype: type = np.float64) -> np.ndarray:
    """Copy into a read-only array so a frozen dataclass really is immutable."""
    out = np.array(a, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class Frame:
    """One RGB-D observation, as a real depth camera delivers it.

    Pixels the sensor could not measure are NaN or 0 in `depth`; consumers must ignore them.
    Nothing here comes from simulator ground truth.
    """

    depth: np.ndarray  # (H, W) float32, metres along the optical axis (z of the camera frame)
    rgb: np.ndarray  # (H, W, 3) uint8
    K: np.ndarray  # (3, 3) pinhole intrinsics, pixels
    T_base_camera: np.ndarray  # (4, 4) camera pose in the robot base frame (OpenCV camera axes)
    stamp: float = 0.0  # seconds of robot time when the frame was taken
    frame_id: str = ""  # unique id of the capture, for the ledger

    def __post_init__(self) -> None:
        depth = np.asarray(self.depth)
        rgb = np.asarray(self.rgb)
        if depth.ndim != 2:
            raise ValueError(f"Frame.depth must be (H, W), got shape {depth.shape}")
        if rgb.shape != (*depth.shape, 3):
            raise ValueError(f"Frame.rgb must be {(*depth.shape, 3)}, got shape {rgb.shape}")
        if np.asarray(self.K).shape != (3, 3):
            raise ValueError("Frame.K must be 3x3")
        if np.asarray(self.T_base_camera).shape != (4, 4):
            raise ValueError("Frame.T_base_camera must be 4x4")
        object.__setattr__(self, "depth", _frozen_array(depth, np.float32))
        object.__setattr__(self, "rgb", _frozen_array(rgb, np.uint8))
        object.__setattr__(self, "K", _frozen_array(self.K))
        object.__setattr__(self, "T_base_camera", _frozen_array(self.T_base_camera))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.depth.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class Grasp:
    """A pick to execute, in the robot base frame.

    The gripper frame: +z is the approach direction (pointing into the item, so a top-down pick has
    z = (0, 0, -1) in the base frame); for the parallel-jaw gripper +x is the direction the fingers
    close along. `position` is the contact point: for suction the point where the cup's lip meets
    the surface, for the jaw the midpoint between the fingertips at grasp depth.
    """

    gripper: GripperKind
    position: np.ndarray  # (3,) metres, base frame
    orientation: np.ndarray  # (4,) quaternion xyzw, gripper frame in base frame
    width: float = 0.0  # metres, jaw opening before closing (0 for suction)

    def __post_init__(self) -> None:
        if self.gripper not in GRIPPER_KINDS:
            raise ValueError(f"unknown gripper {self.gripper!r}; expected one of {GRIPPER_KINDS}")
        q = np.asarray(self.orientation, dtype=np.float64)
        if q.shape != (4,) or not np.isfinite(q).all() or np.linalg.norm(q) < 1e-9:
            raise ValueError(f"Grasp.orientation must be a finite non-zero quaternion, got {q}")
        p = np.asarray(self.position, dtype=np.float64)
        if p.shape != (3,) or not np.isfinite(p).all():
            raise ValueError(f"Grasp.position must be a finite (3,) vector, got {p}")
        object.__setattr__(self, "position", _frozen_array(p))
        object.__setattr__(self, "orientation", _frozen_array(q / np.linalg.norm(q)))
        object.__setattr__(self, "width", float(self.width))

    @classmethod
    def many(
        cls, gripper: np.ndarray, positions: np.ndarray, orientations: np.ndarray, widths: np.ndarray
    ) -> list[Grasp]:
        """Grasps from arrays (N,) gripper index into GRIPPER_KINDS, (N, 3) m, (N, 4) xyzw, (N,) m,
        checked as a whole: equal to `[Grasp(...) for each row]`, the same floats, without paying
        the per-grasp checks and copies (a plan builds several hundred; that was ~10 ms a plan)."""
        g = np.asarray(gripper)
        p = np.array(positions, dtype=np.float64)  # copies: the grasps own their numbers
        q = np.array(orientations, dtype=np.float64)
        w = np.asarray(widths, dtype=np.float64)
        n = len(g)
        if p.shape != (n, 3) or q.shape != (n, 4) or w.shape != (n,):
            raise ValueError(f"Grasp.many: shapes {p.shape}, {q.shape}, {w.shape} for {n} grippers")
        if n and (g.min() < 0 or g.max() >= len(GRIPPER_KINDS)):
            raise ValueError(f"Grasp.many: gripper index outside 0..{len(GRIPPER_KINDS) - 1}")
        if not (np.isfinite(p).all() and np.isfinite(q).all()):
            raise ValueError("Grasp.many: positions and orientations must be finite")
        # sqrt of each row's dot product, as np.linalg.norm takes it for one quaternion (a batched
        # matmul, so the same floats as `Grasp(...)` row by row; a plain sum of squares can differ
        # in the last bit, and a plan must not depend on how its grasps were built).
        norm = np.sqrt((q[:, None, :] @ q[:, :, None])[:, 0, 0])
        if n and norm.min() < 1e-9:
            raise ValueError("Grasp.many: zero quaternion")
        q /= norm[:, None]
        p.setflags(write=False)
        q.setflags(write=False)
        out = []
        for i in range(n):
            gr = object.__new__(cls)
            object.__setattr__(gr, "gripper", GRIPPER_KINDS[int(g[i])])
            object.__setattr__(gr, "position", p[i])
            object.__setattr__(gr, "orientation", q[i])
            object.__setattr__(gr, "width", float(w[i]))
            out.append(gr)
        return out

    @property
    def R(self) -> np.ndarray:
        """(3, 3) rotation of the gripper frame in the base frame."""
        return quat_to_matrix(self.orientation)

    @property
    def approach(self) -> np.ndarray:
        """(3,) unit approach direction in the base frame (the gripper's +z axis)."""
        return self.R[:, 2]


@dataclass(frozen=True)
class Placement:
    """Where to release the held item: the tool-centre point pose at release, base frame."""

    position: np.ndarray  # (3,) metres: TCP position at release
    orientation: np.ndarray  # (4,) quaternion xyzw of the gripper at release
    box_id: int = 0  # which outbound box
    # (3,) metres or None: the point (the item's centre over its slot) the item turns about if the arm
    # releases with the gripper turned 180 degrees about its axis (the slot's footprint is the same
    # either way; the TCP then goes to the pivot's other side). None: turn about the TCP itself.
    pivot: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", _frozen_array(self.position))
        object.__setattr__(self, "orientation", _frozen_array(self.orientation))
        if self.pivot is not None:
            object.__setattr__(self, "pivot", _frozen_array(self.pivot))


class Reason(str, enum.Enum):
    """Why a motion ended the way it did. Failures are values, not exceptions."""

    OK = "ok"
    NO_CONTACT = "no_contact"  # the gripper reached the grasp pose and touched nothing
    SEAL_FAILED = "seal_failed"  # suction touched a surface but could not seal on it
    SLIPPED = "slipped"  # grip closed but the item was not held after lifting
    DROPPED = "dropped"  # item was held, then lost during transport
    COLLISION = "collision"  # the arm or gripper hit the tote, the box or the scene
    IK_FAILED = "ik_failed"  # no joint solution within tolerance
    UNREACHABLE = "unreachable"  # pose outside the arm's workspace
    NOT_HOLDING = "not_holding"  # place was asked while nothing was held
    ESTOP = "estop"  # a protective stop halted the motion
    INVALID = "invalid"  # the request itself was malformed (e.g. width beyond the opening)


@dataclass(frozen=True)
class Outcome:
    """What happened when a pick or a place was executed.

    `executed` is the grasp actually executed (clipped width, snapped pose), not the one asked
    for, so the ledger records the truth (the lerobot `send_action` convention).
    """

    success: bool
    reason: Reason
    executed: Grasp | None = None  # for picks: the grasp as executed
    robot_seconds: float = 0.0  # simulated/robot time the motion took, seconds
    item_id: int | None = None  # which item was held (simulation ground truth; metrics only)
    details: dict = field(default_factory=dict)  # extra numbers (e.g. seal_angle_deg, drop_height_m)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", Reason(self.reason))
        if self.success != (self.reason is Reason.OK):
            raise ValueError(f"Outcome.success={self.success} contradicts reason={self.reason}")


@dataclass(frozen=True)
class Candidate:
    """One scored grasp candidate inside a Plan."""

    grasp: Grasp
    analytic_score: float  # [0, 1] geometric quality (seal / antipodal quality)
    learned_score: float | None = None  # [0, 1] raw model probability, before calibration
    p_success: float | None = None  # [0, 1] calibrated probability of success
    ood_score: float | None = None  # watchdog score of this candidate (higher = further away)
    pixel: tuple[int, int] = (0, 0)  # (u, v) image pixel of the grasp point, for drawing
    cluster: int = -1  # index of the item cluster it belongs to
    threshold: float | None = None  # score needed to auto-execute (its gripper's); None: Plan.threshold

    @property
    def score(self) -> float:
        """The number to rank by: calibrated if present, else learned, else analytic."""
        for s in (self.p_success, self.learned_score):
            if s is not None:
                return float(s)
        return float(self.analytic_score)


@dataclass(frozen=True)
class ItemCluster:
    """One segmented item (an unknown object's points), as the planner saw it. Base frame."""

    centroid: np.ndarray  # (3,) metres
    lo: np.ndarray  # (3,) metres, minimum corner; z = the support (tote floor): the camera sees only tops
    hi: np.ndarray  # (3,) metres, axis-aligned maximum corner
    n_points: int = 0
    # [0, 1] share of the item's outline where the surface just outside is over 1 cm higher: how much
    # of it lies under (or against) something else. A covered item's visible part is not the whole
    # item, so its centroid is not where its centre of mass is.
    occluded: float = 0.0
    # The item watchdog's verdict on this item (None: no per-item verdict; the Plan's scene verdict
    # applies) and its score (LOF units, about 1 for a typical training item; None: not scored).
    in_distribution: bool | None = None
    ood_score: float | None = None
    # (len(grasping.watchdog.ITEM_FEATURES),) the item watchdog's shape descriptor of this item, or
    # None (too few points, or a planner that does not compute it). The ledger stores it with every
    # row on this item, so "which kind of item" is known on a real cell without simulator families.
    descriptor: np.ndarray | None = None

    @property
    def extents(self) -> np.ndarray:
        """(3,) metres: axis-aligned size; z is the visible height above the cluster's lowest point."""
        return np.asarray(self.hi) - np.asarray(self.lo)


Decision = Literal["pick", "ask", "empty"]


@dataclass(frozen=True)
class Plan:
    """The planner's answer for one Frame: ranked candidates, confidence, and why."""

    candidates: tuple[Candidate, ...]  # best first
    decision: Decision  # pick: execute candidates[0]; ask: ask a person; empty: nothing to pick
    reasons: tuple[str, ...] = ()  # short human-readable reasons for the decision
    threshold: float | None = None  # calibrated p(success) needed to auto-execute
    scene_ood_sigma: float | None = None  # watchdog: scene distance from training data, sigmas
    in_distribution: bool = True
    model_version: str = "analytic"
    latency_ms: float = 0.0  # wall time to compute this plan
    frame_id: str = ""
    # What the scorer saw, same order as `candidates`, kept so the ledger can store the local
    # geometry of chosen and rejected candidates as training data.
    patches: np.ndarray | None = None  # (M, C, S, S) float32 local height maps (grasping.patches)
    features: np.ndarray | None = None  # (M, F) float32 analytic features
    clusters: tuple[ItemCluster, ...] = ()  # segmented items; Candidate.cluster indexes into this
    # Points above the tote floor that no item was made of (too few to be one: a 1-2 cm part lying
    # flat shows a handful), voxels. An "empty" plan with some is not an empty tote.
    stray_voxels: int = 0

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


@dataclass(frozen=True)
class Bounds:
    """An axis-aligned box in the robot base frame, e.g. the inside of the tote."""

    lo: np.ndarray  # (3,) metres, minimum corner
    hi: np.ndarray  # (3,) metres, maximum corner

    def __post_init__(self) -> None:
        lo, hi = _frozen_array(self.lo), _frozen_array(self.hi)
        if lo.shape != (3,) or hi.shape != (3,) or not (hi > lo).all():
            raise ValueError(f"Bounds need lo < hi, (3,) each; got lo={lo}, hi={hi}")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: which of the (N, 3) points lie inside."""
        p = np.asarray(points)
        return np.all((p >= self.lo) & (p <= self.hi), axis=-1)


# --- small rotation helpers shared by every package (numpy only) ---------------------------------


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Quaternion xyzw -> (3, 3) rotation matrix."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quat(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation matrix -> quaternion xyzw with w >= 0."""
    R = np.asarray(R, dtype=np.float64)
    t = np.trace(R)
    if t > 0:
        s = np.sqrt(t + 1.0) * 2
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2]) * 2
        q = [0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif R[1, 1] > R[2, 2]:
        s = np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2]) * 2
        q = [(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1]) * 2
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def grasp_frame(approach: np.ndarray, closing: np.ndarray | None = None) -> np.ndarray:
    """Rotation whose +z is `approach` and whose +x is `closing` projected orthogonal to it.

    Used to build a Grasp orientation from a surface normal (suction: approach = -normal) or from
    an antipodal pair (jaw: closing = the line between the contacts).
    """
    z = np.asarray(approach, dtype=np.float64)
    z = z / np.linalg.norm(z)
    if closing is None:
        # Any x orthogonal to z; prefer the base x axis so top-down suction grasps are canonical.
        closing = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.asarray(closing, dtype=np.float64)
    x = x - z * (x @ z)
    n = np.linalg.norm(x)
    if n < 1e-9:
        raise ValueError("closing direction is parallel to the approach direction")
    x /= n
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)
