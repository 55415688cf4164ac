"""What the cell remembers about each item of the tote it is working on: learning within a tote.

The controller never sees simulator ground truth, so an item is what the planner segmented: a
cluster with a centre and a size. `ItemMemory` follows items from plan to plan and keeps, per item,
how often it was tried and why it failed, and turns that into the next try (Sanders et al., CASE
2020: remembering failed grasps doubled picks per hour on a real robot):

* a drop, or a slip (lost under load) -> not that gripper again on that item: the other one.
  "Heavier than the cup holds" (the seal held but the static load alone is over the cup's limit)
  rules the cup out for good, whichever gripper would come next, unless the cup's reading says why
  (a wrist force-torque sensor: the weight, and where its centre of mass lies from the cup): when
  the weight is within the cup's rating and only the lever was too long, the cup may try once more,
  with its seal within `cup_lever_share` of the lever it could carry from that centre of mass (a
  large mailer sealed near its edge; procedural reporting seed 1017 had 7 such drops on mailers,
  which the jaw cannot take). Slower motion is already the arm's own answer to load (payload-aware
  lift and transit): a second drop under it means the gripper is wrong for the item, not the speed.
* a seal failure, no contact, a collision -> another spot (the controller keeps the failed spots);
  the gripper stays allowed.
* at most `max_attempts` tries on one item, by the model and by people together; then the item is
  set aside for a person to take out by hand. An item no gripper may take any more is set aside at
  once. Setting an item aside never ends the tote: the other items are still picked.

Where a grip lost an item under load is remembered too (`lost_here`): no grip of that gripper within
`lost_spot_radius_m` of the spot, whatever item the planner now segments there. In a pile the
cluster an item belongs to changes from look to look (a dropped mailer merged with the items it
fell among, its cluster centre 6 cm away and twice its size), so following the item alone let the
cup drop it a second time 2 cm from the first spot. A successful pick near a spot takes what was
lost there: the spot is forgotten.

Following an item: the nearest remembered centre within `radius_m`. An item a try failed on may
have moved (dropped, slipped, pushed by the cup or a finger), so it is also recognised by its size
(sorted footprint and height, within `size_tol_m` plus `size_tol_rel`) anywhere in the tote. Two
items of the same size can then be taken for one: the cell is more careful with the second, never
less, and the limit on tries holds for the item that moved.

Recognising a moved item by its size can take another item of that size for it, and a pick then
marks the wrong one picked: the item the failed try left in place loses its history and is tried
afresh (reporting seed 1034, `test`, stop 43: a jaw closed on nothing on an irregular mesh, a 2.5 cm
item 10 cm away was taken for it by size and picked, and the mesh got three more tries under a new
name, four in all). So an item whose failed tries all left it in place (`LEFT_IN_PLACE`: nothing
lifted it) and that was last found only by its size is not marked picked by a success there: the
pick is counted on a new item, and the remembered one stays where it was last seen for sure, with
its tries. An item a drop or slip moved is still followed by its size and marked picked as before
(it fell; a same-size cluster is most likely it).

An item a try touched without lifting it (the cup did not seal, nothing was touched) has not moved,
but what the camera sees of it can: a large mailer that something leaned on, or that the cup pressed
flat, came back as a cluster whose centre lay more than `radius_m` from the last one and whose size
differed, so it was a "new" item and got a fourth try (tuning seed 19 and reporting seed 1000). Such
a try's grip point is remembered (`touched_at`), and a cluster whose box (grown by
`touched_margin_m`) holds one of them is that item.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from grasping.types import GRIPPER_KINDS, ItemCluster, Reason

# Failures that say the grip could not carry the item: try the other gripper next.
LOST_UNDER_LOAD = (Reason.DROPPED, Reason.SLIPPED)
# Failures that leave the item where it was (nothing lifted it): the grip point is still on it.
LEFT_IN_PLACE = (Reason.SEAL_FAILED, Reason.NO_CONTACT)
TOO_HEAVY_FOR_CUP = "item heavier than the cup holds"  # SimArm's reason; a real cup reads its vacuum


@dataclass(frozen=True)
class ItemMemoryConfig:
    max_attempts: int = 3  # tries on one item, model and people together, count
    radius_m: float = 0.04  # a cluster this close to a remembered centre is that item, metres
    size_tol_m: float = 0.015  # size match for an item that may have moved: absolute part, metres
    size_tol_rel: float = 0.15  # ... plus this share of the size, [0, 1]
    # No grip of a gripper this close (in the tote's plane) to where it lost an item under load:
    # about the cup's diameter, so the new contact patch does not overlap the lost one, metres
    lost_spot_radius_m: float = 0.03
    # A cluster's box (axis-aligned, grown by this much) holding the grip point of a try that left
    # an item in place is that item, metres
    touched_margin_m: float = 0.005
    # An item set aside claims every cluster whose centre is this close to where it was last seen,
    # metres: an item whose view changed past every rule above must not get a fourth try (reporting
    # seed 1018, stop 35: a tall item, three seal failures, then seen 4.0 cm off as a "new" item and
    # tried again). A neighbour this close waits for the person who takes the item out.
    set_aside_radius_m: float = 0.06
    # ... and every cluster whose footprint comes this close to its last-seen footprint (both axes),
    # unless that cluster is an item with tries of its own: a big item seen as two clusters got a
    # fourth try on its other piece, 6.6 cm from where it was last seen (reporting seed 1022, `test`,
    # stop 36), metres
    set_aside_touch_m: float = 0.01
    # After "heavier than the cup holds" with a reading: the next seal goes within this share of the
    # longest lever the cup could carry that weight at, around the measured centre of mass ([0, 1]:
    # the estimate and the cup's placement both err)...
    cup_lever_share: float = 0.6
    # ... and only if that leaves at least this much room; else the cup is ruled out, metres
    min_cup_radius_m: float = 0.006

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass
class TrackedItem:
    """One item of the tote, as the cell has come to know it."""

    key: int  # stable id within the tote
    centre: np.ndarray  # (3,) metres, base frame: where it was last seen
    size: np.ndarray | None  # (3,) metres: sorted footprint (large, small) and visible height
    attempts: int = 0  # tries executed on it (model and people)
    failures: int = 0  # of them, failed
    model_failures: int = 0  # failed tries the model chose alone
    reasons: list[str] = field(default_factory=list)  # why each failed try failed (Reason values)
    banned: set[str] = field(default_factory=set)  # grippers not to use on it again
    moved: bool = False  # a try failed on it, which may have moved it (recognise it by size too)
    picked: bool = False  # taken out of the tote: what is seen there later is another item
    set_aside: bool = False  # no more tries this tote: a person takes it out by hand
    why_set_aside: str = ""
    lost_at: list[tuple[np.ndarray, str]] = field(default_factory=list)  # grip points that lost it
    touched_at: list[np.ndarray] = field(default_factory=list)  # grip points of tries that left it in place
    # (x, y of its centre of mass, radius), metres, base frame: the cup only within this (see above)
    cup_within: tuple[np.ndarray, float] | None = None
    questions: int = 0  # questions asked about it this tote, count
    box: tuple[np.ndarray, np.ndarray] | None = None  # (lo, hi) metres, base frame: its last-seen cluster
    # A person answered "no safe pick" about it: nobody (model or person) tries it or is asked about it
    # again this tote; it goes to exception handling with the tote.
    no_safe_pick: bool = False
    # (3,) metres, base frame: where it was last seen for sure (by position or grip point), while it
    # is followed by its size alone since (see the module docstring); None when not
    seen_by_size_from: np.ndarray | None = None

    def allows(self, gripper: str) -> bool:
        return not self.set_aside and not self.no_safe_pick and gripper not in self.banned

    def cup_allows(self, point: np.ndarray) -> bool:
        """May the cup seal at `point` (base frame)? Anywhere, unless a reading narrowed it."""
        if self.cup_within is None:
            return True
        centre, radius = self.cup_within
        return float(np.linalg.norm(np.asarray(point, dtype=np.float64)[:2] - centre)) <= radius


def _size_of(cluster: ItemCluster | None) -> np.ndarray | None:
    if cluster is None:
        return None
    e = np.asarray(cluster.extents, dtype=np.float64)
    return np.array([max(e[0], e[1]), min(e[0], e[1]), e[2]])


class ItemMemory:
    """Items of one tote: lookup by cluster, the outcome of every try, and what it means next."""

    def __init__(self, config: ItemMemoryConfig | None = None) -> None:
        self.config = config or ItemMemoryConfig()
        self.items: list[TrackedItem] = []

    def find(self, centre: np.ndarray, cluster: ItemCluster | None = None) -> TrackedItem | None:
        """The remembered item at `centre` (or, for one that may have moved, of this size)."""
        return self.locate(centre, cluster)[0]

    def locate(
        self, centre: np.ndarray, cluster: ItemCluster | None = None
    ) -> tuple[TrackedItem | None, str]:
        """`find`, and how the item was recognised: "near", "touched", "size", "set_aside" or ""."""
        c = np.asarray(centre, dtype=np.float64)
        live = [it for it in self.items if not it.picked]
        near = [(float(np.linalg.norm(it.centre[:2] - c[:2])), it) for it in live]
        near = [(d, it) for d, it in near if d < self.config.radius_m]
        claim = self._set_aside_claim(c, cluster, live)
        if near:
            best = min(near, key=lambda x: x[0])[1]
            # An item the cell only asked about (no tries) next to one set aside is that item's
            # other piece as likely as a neighbour: either way it waits for the person.
            if claim is not None and best.attempts == 0 and not best.set_aside:
                return claim, "set_aside"
            return best, "near"
        if cluster is not None:
            # In 3-D: a grip point on the top of a tall item lies over the footprint of a flat one
            # beside it (reporting seed 1018, stop 35), not inside its box.
            lo = np.asarray(cluster.lo, dtype=np.float64) - self.config.touched_margin_m
            hi = np.asarray(cluster.hi, dtype=np.float64) + self.config.touched_margin_m
            held = [
                (float(np.linalg.norm(it.centre[:2] - c[:2])), it)
                for it in live
                if any(bool(np.all((p >= lo) & (p <= hi))) for p in it.touched_at)
            ]
            if held:
                return min(held, key=lambda x: x[0])[1], "touched"
        size = _size_of(cluster)
        moved = []
        if size is not None:
            tol = self.config.size_tol_m + self.config.size_tol_rel * size
            moved = [
                (float(np.linalg.norm(it.centre[:2] - c[:2])), it)
                for it in live
                if it.moved and it.size is not None and bool(np.all(np.abs(it.size - size) <= tol))
            ]
        if moved:
            return min(moved, key=lambda x: x[0])[1], "size"
        return claim, ("set_aside" if claim is not None else "")

    def _set_aside_claim(
        self, c: np.ndarray, cluster: ItemCluster | None, live: list[TrackedItem]
    ) -> TrackedItem | None:
        """The nearest item set aside whose last-seen centre lies within set_aside_radius_m of `c`
        or whose last-seen footprint comes within set_aside_touch_m of the cluster's."""
        cfg = self.config
        out = []
        for it in live:
            if not it.set_aside:
                continue
            d = float(np.linalg.norm(it.centre[:2] - c[:2]))
            touches = False
            if cluster is not None and it.box is not None:
                gap = np.maximum(
                    np.asarray(cluster.lo)[:2] - it.box[1][:2], it.box[0][:2] - np.asarray(cluster.hi)[:2]
                )
                touches = bool(np.all(gap <= cfg.set_aside_touch_m))
            if d < cfg.set_aside_radius_m or touches:
                out.append((d, it))
        return min(out, key=lambda x: x[0])[1] if out else None

    def get(self, centre: np.ndarray, cluster: ItemCluster | None = None) -> TrackedItem:
        """`find`, or a new remembered item; the item's last-seen centre is updated either way."""
        it, how = self.locate(centre, cluster)
        if it is None:
            it = TrackedItem(len(self.items), np.asarray(centre, dtype=np.float64), _size_of(cluster))
            self.items.append(it)
        else:
            self.follow(it, centre, how)
            if it.size is None:
                it.size = _size_of(cluster)
        if cluster is not None and not it.set_aside:
            it.box = (np.array(cluster.lo, dtype=np.float64), np.array(cluster.hi, dtype=np.float64))
        return it

    def follow(self, item: TrackedItem, centre: np.ndarray, how: str) -> None:
        """`item`, recognised `how` (`locate`), is seen at `centre` now: its last-seen centre follows.
        Found by its size alone, where it was last seen for sure is kept (see the module docstring)."""
        if how == "size" and item.seen_by_size_from is None:
            item.seen_by_size_from = item.centre.copy()
        item.centre = np.asarray(centre, dtype=np.float64)

    def record(
        self,
        item: TrackedItem,
        gripper: str,
        reason: Reason,
        why: str = "",
        by_model: bool = True,
        at: np.ndarray | None = None,
        details: Mapping[str, object] | None = None,
    ) -> TrackedItem:
        """Count one try on `item` and decide what the next one may be (`at`: the grip point, base
        frame; `details`: the outcome's details, where a cup's load reading may be). Returns the item
        the try is counted on: `item`, or a new one for a success on an item known only by its size
        whose failed tries left it in place (see the module docstring)."""
        if reason is Reason.OK and self._maybe_another(item):
            item = self._split_off(item)
        item.attempts += 1
        if reason is Reason.OK:
            item.picked = True  # an item seen here later (one it lay on) is another item
            if at is not None:
                for other in self.items:  # what was lost near here is most likely what was just taken
                    other.lost_at = [(p, g) for p, g in other.lost_at if not self._within(p, at)]
            return item
        item.failures += 1
        item.model_failures += int(by_model)
        item.reasons.append(reason.value)
        item.moved = True
        lost = {gripper} if reason in LOST_UNDER_LOAD else set()
        if TOO_HEAVY_FOR_CUP in why:
            spot = self._cup_spot(at, details) if item.cup_within is None else None
            if spot is not None:
                item.cup_within = spot  # once more, near the centre of mass
                lost.discard("suction")
            else:
                lost.add("suction")
        item.banned |= lost
        if at is not None:
            item.lost_at += [(np.asarray(at, dtype=np.float64), g) for g in sorted(lost)]
            if reason in LEFT_IN_PLACE:
                item.touched_at.append(np.asarray(at, dtype=np.float64))
        if all(g in item.banned for g in GRIPPER_KINDS):
            self.set_aside(item, "no gripper holds it: " + ", ".join(item.reasons))
        elif item.attempts >= self.config.max_attempts:
            self.set_aside(item, f"{item.attempts} tries failed: " + ", ".join(item.reasons))
        return item

    @staticmethod
    def _maybe_another(item: TrackedItem) -> bool:
        """Is `item`, found by its size alone, as likely another item of that size? Yes when no
        failed try on it lifted it (it has not moved) and it was found by its size since."""
        return (
            item.seen_by_size_from is not None
            and item.failures > 0
            and all(Reason(r) in LEFT_IN_PLACE for r in item.reasons)
        )

    def _split_off(self, item: TrackedItem) -> TrackedItem:
        """A new item where `item` is seen now (what was picked there); `item` goes back to where
        it was last seen for sure, with its tries."""
        size = None if item.size is None else item.size.copy()
        new = TrackedItem(len(self.items), item.centre.copy(), size)
        new.box = item.box
        self.items.append(new)
        assert item.seen_by_size_from is not None
        item.centre = item.seen_by_size_from
        item.seen_by_size_from = None
        item.box = None
        return new

    def _cup_spot(
        self, at: np.ndarray | None, details: Mapping[str, object] | None
    ) -> tuple[np.ndarray, float] | None:
        """(centre of mass x, y; radius) from a cup's load reading, or None (no reading, or no room)."""
        if at is None or not details:
            return None
        try:
            off = np.asarray(details["com_offset_m"], dtype=np.float64).reshape(2)
            lever = float(details["max_lever_m"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return None
        radius = self.config.cup_lever_share * lever
        if not (np.all(np.isfinite(off)) and np.isfinite(radius)) or radius < self.config.min_cup_radius_m:
            return None
        return np.asarray(at, dtype=np.float64)[:2] + off, radius

    def lost_here(self, position: np.ndarray, gripper: str) -> TrackedItem | None:
        """The item `gripper` lost under load within `lost_spot_radius_m` of `position`, if any."""
        for it in self.items:
            if not it.picked and any(g == gripper and self._within(p, position) for p, g in it.lost_at):
                return it
        return None

    def _within(self, a: np.ndarray, b: np.ndarray) -> bool:
        d = np.asarray(a, dtype=np.float64)[:2] - np.asarray(b, dtype=np.float64)[:2]
        return float(np.linalg.norm(d)) < self.config.lost_spot_radius_m

    def set_aside(self, item: TrackedItem, why: str) -> None:
        item.set_aside = True
        item.why_set_aside = why

    @property
    def max_attempts_on_one_item(self) -> int:
        return max((it.attempts for it in self.items), default=0)


__all__ = [
    "ItemMemory",
    "ItemMemoryConfig",
    "TrackedItem",
    "LEFT_IN_PLACE",
    "LOST_UNDER_LOAD",
    "TOO_HEAVY_FOR_CUP",
]
