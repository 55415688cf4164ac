"""The cell's decision loop: observe, plan, decide, pick and pack, record.

One tote at a time:

1. Apply any answers people have sent back (approve k / a pixel / no safe pick / expired).
2. Capture a frame and plan.
3. If a candidate is confident (calibrated p >= threshold) and the scene is in distribution, and it is
   not near a spot that already failed, an item waiting for a person, or an item a person marked
   "no safe pick", pick it and pack it.
4. Otherwise look again once (a fresh capture: noise, holes and the segmentation change), and if the
   planner is still unsure, ask a person about that item — and go on picking *other* items the planner
   is confident about while the person thinks. The cell never blocks on a person: when nothing else can
   be done it idles in short steps, and a request whose deadline passes is skipped. A skipped item
   is not asked about again, but once the tote has changed since it was judged (the arm has been
   in it since) the model may still pick it when it is now sure of it.
5. A failed pick is remembered (don't retry the same spot, Sanders et al. 2020, and don't offer it to a
   person either) and the item is retried according to why it failed (`arm.items`: a drop -> the
   other gripper; a seal failure -> another spot), at most `max_attempts_per_item` times in all;
   then it is set aside for a person and the cell goes on with the other items.

Doubt is per item: the planner's watchdog marks each segmented item in or out of distribution
(`ItemCluster.in_distribution`). A novel item is asked about at once (no look-again: a fresh capture
does not make a new kind of item familiar) and waits for its answer, while the items the model is
sure of are picked. Plans without per-item verdicts fall back to the scene's.

Every plan, attempt, request and answer goes to the ledger with the model version and the reasons.
The controller talks only to the interfaces in `arm.interfaces` and to duck-typed planner, assist
channel, ledger and packer objects, so the same loop drives a simulated or a real cell.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from arm.interfaces import (
    Arm,
    Camera,
    CameraError,
    Grasp,
    Outcome,
    PickAndPlace,
    Placement,
    ReachCheck,
    Reason,
    ToteFeed,
)
from arm.items import ItemMemory, ItemMemoryConfig, TrackedItem
from arm.lookahead import Lookahead
from grasping.draw import item_pixels, offered_indices
from grasping.pixel_grasp import PixelGraspError, grasp_from_pixel
from grasping.types import Candidate, Frame, ItemCluster, Plan, matrix_to_quat
from hitl.messages import AssistAnswer, AssistRequest, CandidateView

log = logging.getLogger(__name__)

# Why the cell asks about an item (AssistRequest.context["cause"]): the item watchdog calls it novel;
# its best score is under the ask threshold; the model failed on it `max_failures_per_item` times.
ASK_CAUSES = ("novel", "low_score", "model_failed")


class AssistChannel(Protocol):
    """Where the cell sends questions: `hitl.client.AssistClient`, or an in-process simulated associate."""

    def ask(self, request: AssistRequest) -> Future: ...

    def cancel(self, request_id: str) -> None: ...


@dataclass(frozen=True)
class ControllerConfig:
    cell_id: str = "cell-1"
    # Failed picks the model makes alone on one item before it asks a person about it, count. With the
    # default equal to max_attempts_per_item, an item the model keeps failing is set aside, not asked
    # about: a person's approval would be a fourth try.
    max_failures_per_item: int = 3
    max_attempts_per_item: int = 3  # tries on one item (model and people together), then set aside, count
    ask_novel_at_once: bool = True  # ask about an out-of-distribution item as soon as it is seen
    max_asks_per_item: int = 2  # questions about one item per tote before it is skipped, count
    # An item the model knows (in distribution) whose best candidate's calibrated p(success) is below
    # this is not asked about: the model is sure that nothing it can do there works, and a person can
    # only confirm it (tuning seed 24, procedural, stop 36: 35 of 68 questions were about such items;
    # 26 got "no safe pick", 2 led to a person's pick that placed an item). It is skipped like an
    # expired question: a later confident plan may still pick it, and the tote goes to exception
    # handling with it. Novel items and items the model failed on are asked about whatever their p.
    # 0: ask about every unsure item, as before. Raised from 0.1 in stop 41: on tuning seeds 3 and 7
    # (procedural, the simulated associate) 14 of the 16 questions about known items whose best p lay
    # under 0.3 were answered "no safe pick" (cups on bottles and tubes, which do not seal), against
    # 3 of 6 between 0.3 and 0.5.
    ask_min_p: float = 0.3
    # A skipped item (its question expired, it was asked about too often, or nobody could be asked)
    # is never asked about again, but after the arm has been in the tote since it was judged, what
    # lay on or against it may be gone: the model picks it if it is now sure of it (a plan's
    # confident, in-distribution candidate). False: a skipped item stays out for the rest of the tote.
    revisit_skipped: bool = True
    max_attempts_per_tote: int = 80  # hard stop for one tote (then it is diverted), count
    look_again: bool = True  # re-capture once before asking a person
    # ... unless the item to ask about was already seen unsure on this many captures since the arm
    # last moved (a question about one item is followed by a new capture, which is a second look at
    # every other unsure item: a further look-again before asking about the next one is a third or
    # fourth). Tuning seeds 3 and 11: see docs/benchmarks.md (cycle time, seventh pass). 0: always
    # look again once before asking, as before.
    looks_before_asking: int = 2  # captures showing the item unsure, since the last motion, count
    assist_deadline_s: float = 30.0  # how long a person has to answer, seconds of robot time
    assist_priority: int = 0  # priority of this cell's requests at the broker
    failed_spot_radius_m: float = 0.015  # candidates this close to a failed grasp are not retried, metres
    # ... except a jaw candidate whose closing line turns at least this far from the failed jaw
    # grasp's: it closes on another pair of faces (issue 12 item 5, "a different face"). On a 2-4 cm
    # part every candidate lies within the radius of the first try, so without this one failed jaw
    # try that did not rule the jaw out (no contact, a collision) left the part for good, degrees.
    # None: a failed spot rules out every candidate near it, as before. Off: on tuning seeds 3 and 7
    # (stop 42, procedural) it made 2 such tries, 1 worked and 1 slipped; `test` made none.
    jaw_retry_axis_deg: float | None = None
    # Before a tote is given up with nothing left to do: an item skipped since the arm last moved
    # (unsure on an earlier look, its question expired, nobody to ask) on which this look has a
    # confident, in-distribution candidate is picked after all, once per motion. False: it waits for
    # the arm to move, which it no longer does, and the tote goes to exception handling with it.
    # Tuning seeds 3 and 7 (stop 42, 20 totes x 8, nobody answering): `test` 133 -> 140 and 137 -> 144
    # items placed alone, auto_precision 93.7 -> 93.3% and 98.6 -> 98.6%; the 5 picks it made all
    # worked, and each freed the items skipped beside it. Procedural: no such pick on those totes.
    revisit_before_divert: bool = True
    item_radius_m: float = (
        0.04  # candidates this close to a pending / no-safe-pick item are held back, metres
    )
    idle_step_s: float = 0.25  # robot idles in steps of this length when it can only wait, seconds
    wall_poll_s: float = 0.02  # wall-clock sleep per idle step, so answers from other threads arrive, seconds
    answer_depth_tolerance_m: float = 0.01  # an approved candidate is still valid if the surface moved less
    plan_while_placing: bool = True  # capture and plan while the arm places, where it can (arm/lookahead.py)
    # Pick and place as one motion where the arm offers it (arm.interfaces.PickAndPlace): the
    # transit takes over from the lift without a stop. False: separate pick and place calls.
    blend_pick_into_place: bool = True
    # While nothing has moved since the last capture (skipping unreachable or unsure items, asking,
    # waiting for a person whose answers come on the robot clock), decide again on that frame and
    # plan instead of capturing and planning anew: the tote cannot have changed. A fresh look is
    # still taken after any motion, a protective stop, a camera failure, an empty plan, a deliberate
    # look-again, before giving a tote up, and at every idle step of a wait for answers that come in
    # wall time (there the look paces the loop for them, as before). Off by default: on the
    # reporting bench it cut sensing and exposed planning per pick by 60-90 % but left 5-9 more of
    # 153 procedural items in the tote (a new capture's noise sometimes shows a candidate the reused
    # one does not; docs/benchmarks.md, cycle time). False: capture every time round.
    reuse_unchanged_view: bool = False
    max_empty_captures: int = 2  # consecutive "empty" plans before the tote counts as cleared, count
    # "Empty" plans that each show this many item voxels no item was made of (`Plan.stray_voxels`),
    # or items without a single candidate, are not an empty tote: after the empty captures the tote
    # goes to exception handling instead of counting as cleared (a 1-2 cm part the segmentation
    # cannot make out was left in a "cleared" tote, stop 39), count. 0: off.
    left_voxels_min: int = 2
    camera_retries: int = 3  # consecutive capture failures before the tote is aborted, count
    place_clearance_m: float = 0.01  # release this far above the packing surface, metres
    ledger_source: str = "production"  # how attempts are labeled in the ledger: production | sim
    guess_when_alone: bool = False  # with no assist channel: pick unsure items anyway (else skip them)
    # Pick order: among confident candidates, suction on an item that something lies on or against
    # (outline share under a higher surface > max_covered_share, [0, 1]) comes after the rest: the
    # visible part's centroid is not the item's centre of mass. None: plain best-first.
    max_covered_share: float | None = 0.15
    # Confident candidates checked for reach (IK, no motion) before one is executed, in pick order,
    # where the arm offers the check (arm.interfaces.ReachCheck); 0: execute unchecked.
    reach_checks: int = 8


@dataclass
class Attempt:
    attempt_id: str
    tote_id: str
    grasp: Grasp
    outcome: Outcome
    decided_by: str  # "model" | "associate:<id>"
    p_success: float | None
    robot_time: float
    placed: Outcome | None = None


@dataclass
class ToteReport:
    tote_id: str
    status: str = "running"  # cleared | diverted | attempt_limit | camera_failed | stopped
    attempts: list[Attempt] = field(default_factory=list)
    assists_requested: int = 0
    assists_answered: int = 0
    assists_expired: int = 0
    human_wait_s: float = 0.0  # robot seconds spent idle waiting for a person
    estop_s: float = 0.0  # robot seconds held in a protective stop
    plans: int = 0
    plan_latency_ms: list[float] = field(default_factory=list)
    plan_exposed_ms: list[float] = field(default_factory=list)  # the part of each plan the arm waited for
    lookahead_used: int = 0  # plans made while placing and used, count
    lookahead_discarded: int = 0  # ... and discarded (the place failed or the tote changed), count
    # Camera captures by whether they cost the cell time of its own (issue 17): the arm waited for it;
    # taken while the arm placed (arm/lookahead.py); taken while the cell idled waiting for a person
    # with nothing else to do (inside that wait, like the plan made on it).
    captures_exposed: int = 0  # count
    captures_behind_motion: int = 0  # count
    captures_while_waiting: int = 0  # count
    planning_while_waiting_ms: float = 0.0  # planner wall time on frames captured while waiting, ms
    robot_seconds: float = 0.0
    items_set_aside: list[str] = field(default_factory=list)  # why each item set aside was set aside
    max_attempts_on_one_item: int = 0  # most tries on one item (as the cell told items apart), count
    novel_items_asked: int = 0  # questions asked at once because an item was out of distribution

    @property
    def picks(self) -> int:
        return sum(
            1 for a in self.attempts if a.outcome.success and a.placed is not None and a.placed.success
        )


@dataclass
class _ToteState:
    """What the controller remembers while working one tote."""

    failed_spots: list[np.ndarray] = field(default_factory=list)  # grasp points that failed
    # index into failed_spots -> the closing line (unit, base frame) of a failed jaw pick there
    failed_jaw_axes: dict[int, np.ndarray] = field(default_factory=dict)
    last_chance_at: int = -1  # motion count at which revisit_before_divert last picked
    no_pick: list[np.ndarray] = field(default_factory=list)  # items a person said can't be picked safely
    # (item centre, motions commanded when it was judged): items whose question expired, asked too
    # often, or unsure with nobody to ask
    skipped: list[tuple[np.ndarray, int]] = field(default_factory=list)
    asks: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (item centre, questions asked)
    # (item centre, captures that showed it unsure) since the arm last moved, and that motion count
    unsure_looks: list[tuple[np.ndarray, int]] = field(default_factory=list)
    unsure_looks_at: int = -1
    items: ItemMemory = field(default_factory=ItemMemory)  # tries per item and what they taught
    pending: dict[str, _Pending] = field(default_factory=dict)  # request id -> question in flight


@dataclass
class _Pools:
    """A plan's candidates by what the cell may do with them now, each list best first."""

    usable: list[tuple[int, Candidate]] = field(default_factory=list)  # not blocked, gripper allowed
    confident: list[tuple[int, Candidate]] = field(default_factory=list)  # usable, sure, item in distribution
    unsure: list[tuple[int, Candidate]] = field(default_factory=list)  # usable, not confident
    novel: list[tuple[int, Candidate]] = field(default_factory=list)  # unsure because the item is novel
    hard: list[tuple[int, Candidate]] = field(default_factory=list)  # items the model failed too often
    # confident, in distribution, held back only because the item was skipped since the arm last moved
    late: list[tuple[int, Candidate]] = field(default_factory=list)


@dataclass
class _Pending:
    request: AssistRequest
    future: Future
    plan: Plan
    plan_id: str | None  # the ledger's id of the plan the question is about
    frame: Frame
    centre: np.ndarray  # (3,) base frame: the item the question is about
    asked_at: float  # robot time
    motions: int = 0  # motions the controller had commanded when it asked
    cluster: ItemCluster | None = None  # the item asked about, as the plan saw it


class CellController:
    """Runs totes through observe -> plan -> decide -> pick/pack -> record."""

    def __init__(
        self,
        arm: Arm,
        camera: Camera,
        planner: Callable[[Frame], Plan],
        *,
        feed: ToteFeed | None = None,
        assist: AssistChannel | None = None,
        ledger: Any | None = None,
        packer: Any | None = None,
        render_png: Callable[..., bytes] | None = None,  # (frame, plan, indices=[...]) -> PNG
        metrics: Any | None = None,
        config: ControllerConfig | None = None,
        pixel_candidate: Callable[[Frame, int, int, str], Any] | None = None,
    ) -> None:
        self.arm = arm
        self.camera = camera
        self.planner = planner
        self.feed = feed
        self.assist = assist
        self.ledger = ledger
        self.packer = packer
        self.render_png = render_png
        self.metrics = metrics
        self.config = config or ControllerConfig()
        # (frame, u, v, gripper) -> grasping.pixel_candidate.PixelCandidate: turns a clicked pixel
        # into a planner candidate with its patch and features, so the attempt is a training row.
        # None: grasping.pixel_grasp's suction grasp (executed, but stored without an observation).
        self.pixel_candidate = pixel_candidate
        self._stop = threading.Event()
        self._planner_lock = threading.Lock()
        self._motions = 0  # pick/place/home motions commanded so far: the tote may have changed
        # The last observation's exposed capture and plan: (index in plan_exposed_ms, plan ms, motions).
        self._exposed_look: tuple[int, float, int] | None = None
        # Called after every attempt with (attempt, the plan it came from): benchmarks and UIs listen here.
        self.on_attempt: Callable[[Attempt, Plan], None] | None = None
        # Called after every question with (request, centre (3,) of the item it is about, base frame).
        self.on_ask: Callable[[AssistRequest, np.ndarray], None] | None = None
        # Called with (item centre, cause) when the cell gives an item up without asking anyone
        # (ask_min_p): the benchmark's account of why an item was not placed alone.
        self.on_skip: Callable[[np.ndarray, str], None] | None = None
        # Provenance of the item at a base-frame point: its family or SKU class from the warehouse
        # system (the simulator's ground truth in sim), or None. Stored with each question so rows
        # that answers label ("no safe pick", passed-over candidates) keep their item's kind like
        # attempts do, and the learner and gate group them with it. Never used to plan or decide.
        self.item_family: Callable[[np.ndarray], str | None] | None = None
        # Sensing and planning while the arm places (arm/lookahead.py); used where the arm can say
        # when it has left the camera's view (arm.interfaces.ViewClearNotice).
        self.lookahead = Lookahead(
            camera,
            lambda: self.planner,
            lambda: self.arm.robot_time,
            self.config.answer_depth_tolerance_m,
            capture_s=getattr(camera, "capture_s", None),
        )

    # --- control from other threads -------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the current motion, then stop (SIGTERM)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def swap_planner(self, planner: Callable[[Frame], Plan]) -> None:
        """Hot-swap: the next plan uses the new planner; the current pick is not disturbed."""
        with self._planner_lock:
            self.planner = planner

    # --- one tote ---------------------------------------------------------------------------------

    def run_tote(self, tote_id: str) -> ToteReport:
        cfg = self.config
        rep = ToteReport(tote_id)
        t0 = self.arm.robot_time
        st = _ToteState(
            items=ItemMemory(
                ItemMemoryConfig(max_attempts=cfg.max_attempts_per_item, radius_m=cfg.item_radius_m)
            )
        )
        pending = st.pending
        self.lookahead.reset()  # a look taken during the last tote's final place is not this tote
        ahead_counts = (self.lookahead.used, self.lookahead.discarded, self.lookahead.looks)
        looked_again = False
        holding = False  # in a protective stop
        empty_captures = 0
        left_seen = False  # every "empty" plan of this run of them saw something left (left_voxels_min)
        camera_failures = 0
        # The last observation (frame, plan, its ledger id, motions then, the planner that made it),
        # and whether the next one must be a new capture (reuse_unchanged_view).
        observed: tuple[Frame, Plan, str | None, int, object] | None = None
        fresh_look, reused = True, False
        # Motions commanded when the cell last idled waiting for a person (None: it has not since
        # its last observation): an observation with no motion since is taken inside that wait.
        waited_at: int | None = None
        look_in_wait: tuple[int, float, int] | None = None  # see _charge_look_to_wait

        while True:
            if self._stop.is_set():
                rep.status = "stopped"
                break
            if getattr(self.arm, "stopped", False):
                # Protective stop: hold still (no planning, no motion) until it is cleared.
                if not holding:
                    holding = True
                    self._count("estop")
                    log.warning("protective stop: holding until it is cleared")
                rep.estop_s += self._idle()
                fresh_look = True  # someone may have been in the cell
                continue
            if holding:
                holding = False
                log.info("protective stop cleared after %.1f robot s; resuming", rep.estop_s)
            if len(rep.attempts) >= cfg.max_attempts_per_tote:
                rep.status = "attempt_limit"
                break
            # 1. answers that came back (one that came back ends the wait: the next look is the cell's)
            answers_before = rep.assists_answered + rep.assists_expired
            self._apply_answers(rep, tote_id, st)
            if rep.assists_answered + rep.assists_expired != answers_before:
                waited_at = None
            # 2. observe and plan (or take the plan made while the arm placed: arm/lookahead.py), or
            # decide again on the last observation when nothing has moved since it was made.
            with self._planner_lock:
                planner_now = self.planner
            waiting, waited_at = waited_at is not None and waited_at == self._motions, None
            if (
                cfg.reuse_unchanged_view
                and not fresh_look
                and observed is not None
                and observed[3] == self._motions
                and observed[4] is planner_now
            ):
                frame, plan, plan_id = observed[:3]
                reused = True
                self._count("observations_reused")
            else:
                obs = self._observe(rep, tote_id, ahead_counts, waiting)
                if obs is None:
                    camera_failures += 1
                    log.warning("camera capture failed (%d/%d)", camera_failures, cfg.camera_retries)
                    if camera_failures >= cfg.camera_retries:
                        rep.status = "camera_failed"
                        break
                    self.arm.idle(cfg.idle_step_s)
                    continue
                camera_failures = 0
                frame, plan, plan_id, planner_used = obs
                observed = (frame, plan, plan_id, self._motions, planner_used)
                fresh_look = reused = False
                # A look charged to the arm, taken while a person was already thinking about a
                # question: if all it finds is to wait for them, it was inside that wait (below).
                look_in_wait = self._exposed_look if pending else None

            if plan.decision == "empty" or not plan.candidates:
                if pending:
                    self._charge_look_to_wait(rep, look_in_wait)
                    look_in_wait = None  # charged once
                    rep.human_wait_s += self._idle()
                    waited_at = self._motions
                    fresh_look = fresh_look or not self._answers_on_robot_clock()
                    continue
                fresh_look = True  # "empty" is confirmed by a second, new look
                empty_captures += 1
                # Every one of the empty looks must see it: one look can catch something passing
                # through the view (an item thrown off the box's edge flew over the tote, stop 39).
                here = bool(plan.clusters) or (
                    cfg.left_voxels_min > 0 and plan.stray_voxels >= cfg.left_voxels_min
                )
                left_seen = here if empty_captures == 1 else (left_seen and here)
                if empty_captures >= cfg.max_empty_captures:
                    if left_seen:
                        # Something is there that the cell can neither make out nor pick: the tote
                        # is not empty, and a person takes out what is left.
                        rep.status = "diverted"
                        log.warning("tote %s: nothing to pick, but something is left in it", tote_id)
                        if self.feed is not None:
                            self.feed.divert_tote(
                                "nothing to pick, but something is left that the cell cannot make out"
                            )
                    else:
                        rep.status = "cleared"
                    break
                continue
            empty_captures = 0
            left_seen = False
            pools = self._pools(plan, st)
            confident = pools.confident
            # A novel item: ask about it now and go on picking the items the model is sure of.
            if pools.novel and self.assist is not None and cfg.ask_novel_at_once:
                i, cand = pools.novel[0]
                centre = _centre_of(plan, cand)
                if self._count_question(st, plan, cand) > cfg.max_asks_per_item:
                    st.skipped.append((centre, self._motions))
                else:
                    self._ask(
                        rep, tote_id, plan, plan_id, frame, centre, pending, st.failed_spots,
                        item=cand.cluster, cause="novel",
                    )  # fmt: skip
                    rep.novel_items_asked += 1
                    self._count("novel_items_asked")
                    log.info("item at %s is out of distribution: asked at once", np.round(centre, 3))
                confident = [
                    (j, c)
                    for j, c in confident
                    if not _near(_centre_of(plan, c), [centre], cfg.item_radius_m)
                ]
                if not confident:
                    continue  # plan again: the item is now pending (or skipped)
            # 3. confident: pick
            if confident:
                chosen = self._first_reachable(_uncovered_first(plan, confident, cfg.max_covered_share), st)
                if chosen is None:
                    continue  # the best ones are out of reach: marked, plan again without them
                i, cand = chosen
                looked_again = False
                self._pick_and_place(rep, st, tote_id, plan, plan_id, i, cand.grasp, "model", cand.p_success)
                continue
            # 4. unsure: look again once, then ask about the best remaining item
            ask_pool = pools.unsure or pools.hard
            if not ask_pool and not pending and cfg.revisit_before_divert and pools.late:
                if st.last_chance_at != self._motions:
                    st.last_chance_at = self._motions
                    chosen = self._first_reachable(pools.late, st)
                    if chosen is not None:
                        i, cand = chosen
                        self._count("revisited_before_divert")
                        log.info("item at %s skipped earlier, confident now: picked before giving up",
                                 np.round(_centre_of(plan, cand), 3))  # fmt: skip
                        self._pick_and_place(
                            rep, st, tote_id, plan, plan_id, i, cand.grasp, "model", cand.p_success
                        )
                    continue
            if not ask_pool:
                if pending:
                    self._charge_look_to_wait(rep, look_in_wait)
                    look_in_wait = None  # charged once
                    rep.human_wait_s += self._idle()
                    waited_at = self._motions
                    fresh_look = fresh_look or not self._answers_on_robot_clock()
                    continue
                if reused:
                    # Before giving the tote up, one new look (as every decision had before): a
                    # new capture can show a candidate the reused one did not.
                    fresh_look = True
                    continue
                # Everything left is marked "no safe pick", skipped or set aside: the tote goes to
                # exception handling, where a person takes those items out.
                rep.status = "diverted"
                if self.feed is not None:
                    set_aside = any(it.set_aside for it in st.items.items)
                    why = "set aside after failed tries" if set_aside else "no safe pick"
                    self.feed.divert_tote(f"{why} on the remaining items")
                break
            seen_unsure = self._count_unsure_looks(st, plan, ask_pool, counted=reused)
            if (
                cfg.look_again
                and not looked_again
                and (cfg.looks_before_asking <= 0 or seen_unsure < cfg.looks_before_asking)
            ):
                looked_again = True
                fresh_look = True  # the point of looking again is a new capture
                self._count("look_again")
                continue
            looked_again = False
            if self.assist is None:
                i, cand = ask_pool[0]
                if cfg.guess_when_alone:
                    # Nobody to ask, and configured to guess: the best remaining candidate, recorded as such.
                    self._pick_and_place(
                        rep, st, tote_id, plan, plan_id, i, cand.grasp, "model-unsure", cand.p_success
                    )
                else:
                    # Nobody to ask: an unsure item is skipped, as if its question had expired.
                    log.info(
                        "unsure about the item at %s and nobody to ask: skipped",
                        np.round(_centre_of(plan, cand), 3),
                    )
                    st.skipped.append((_centre_of(plan, cand), self._motions))
                    self._count("unsure_skipped")
                continue
            i, cand = ask_pool[0]
            centre = _centre_of(plan, cand)
            if (
                pools.unsure
                and cand.p_success is not None
                and cand.p_success < cfg.ask_min_p
                and _item_in_distribution(plan, cand)
            ):
                # Best first: every other unsure item the model knows is below the bar too.
                for _, c in pools.unsure:
                    at = _centre_of(plan, c)
                    skipped_now = [s for s, m in st.skipped if m == self._motions]
                    if not _item_in_distribution(plan, c) or _near(at, skipped_now, cfg.item_radius_m):
                        continue  # novel (asked about next round), or this item is skipped already
                    log.info(
                        "item at %s: best p(success) %.3f < %.3f, nothing to ask a person about: skipped",
                        np.round(at, 3),
                        c.score,
                        cfg.ask_min_p,
                    )
                    st.skipped.append((at, self._motions))
                    self._count("hopeless_skipped")
                    if self.on_skip is not None:
                        self.on_skip(np.asarray(at), "low_score")
                continue
            if self._count_question(st, plan, cand) > cfg.max_asks_per_item:
                log.info(
                    "item at %s asked about %d times already: skipped",
                    np.round(centre, 3),
                    cfg.max_asks_per_item,
                )
                st.skipped.append((centre, self._motions))
                continue
            if not pools.unsure:
                cause = "model_failed"  # the model tried this item enough: a person may
            else:
                cause = "low_score" if _item_in_distribution(plan, cand) else "novel"
            self._ask(
                rep, tote_id, plan, plan_id, frame, centre, pending, st.failed_spots,
                item=cand.cluster, cause=cause,
            )  # fmt: skip

        for p in pending.values():  # leaving the tote: questions about it are moot
            self.assist.cancel(p.request.request_id)
        rep.robot_seconds = self.arm.robot_time - t0
        self._sync_lookahead(rep, ahead_counts)  # a look taken during the tote's last place
        rep.items_set_aside = [it.why_set_aside for it in st.items.items if it.set_aside]
        rep.max_attempts_on_one_item = st.items.max_attempts_on_one_item
        return rep

    def _observe(
        self, rep: ToteReport, tote_id: str, ahead_counts: tuple[int, int, int], waiting: bool = False
    ) -> tuple[Frame, Plan, str | None, object] | None:
        """Capture and plan (or take the plan made while placing); (frame, plan, its ledger id, the
        planner), or None when the camera failed. Charges the capture and the plan to the report:
        `waiting` (the cell idled for a person since its last motion) puts both inside that wait."""
        cfg = self.config
        try:
            ahead = None
            if cfg.plan_while_placing and self.lookahead.has_plan:
                # The check frame: taken while the gripper lets go when its release is long enough
                # (the look-ahead counts it behind motion), else one the arm waits for.
                if not self.lookahead.check_in_release:
                    rep.captures_exposed += 1
                ahead = self.lookahead.take()
            self._exposed_look = None
            if ahead is None:
                if waiting:
                    rep.captures_while_waiting += 1
                else:
                    rep.captures_exposed += 1
                frame = self.camera.capture()
            else:
                frame = ahead.frame
        except CameraError as exc:
            log.warning("camera capture failed: %s", exc)
            self._count("camera_failures")
            return None
        finally:
            self._sync_lookahead(rep, ahead_counts)
        with self._planner_lock:
            planner = self.planner
        planned_ahead = ahead is not None and ahead.plan is not None
        plan = ahead.plan if planned_ahead else planner(frame)
        rep.plans += 1
        rep.plan_latency_ms.append(plan.latency_ms)
        if planned_ahead:
            rep.plan_exposed_ms.append(ahead.exposed_ms)
        elif waiting:
            rep.plan_exposed_ms.append(0.0)
            rep.planning_while_waiting_ms += plan.latency_ms
        else:
            rep.plan_exposed_ms.append(plan.latency_ms)
            if ahead is None:  # a fresh capture charged as exposed (not a look-ahead's check frame)
                self._exposed_look = (len(rep.plan_exposed_ms) - 1, plan.latency_ms, self._motions)
        self._observe_plan(plan)
        plan_id = None
        if self.ledger is not None:
            plan_id = self.ledger.record_plan(plan, tote_id=tote_id, frame=frame)
        return frame, plan, plan_id, planner

    def _charge_look_to_wait(self, rep: ToteReport, look: tuple[int, float, int] | None) -> None:
        """Move a look from the arm's account to a person's wait.

        `look` (its index in `plan_exposed_ms`, the plan's ms, the motions then) is a capture and plan
        charged as exposed that were taken while a question was pending. When all the cell does
        after it is wait for that person, with nothing moved since, the look took place during
        their answer time: the arm would have waited for the person without it, as it does for the
        looks it takes between idle steps (`waiting` in `_observe`). Only a fresh capture is moved,
        never a plan made ahead; robot time and every decision are unchanged.
        """
        if look is None or look[2] != self._motions:
            return
        k, latency_ms, _ = look
        rep.captures_exposed -= 1
        rep.captures_while_waiting += 1
        rep.plan_exposed_ms[k] = 0.0
        rep.planning_while_waiting_ms += latency_ms

    def _count_unsure_looks(
        self, st: _ToteState, plan: Plan, ask_pool: list[tuple[int, Candidate]], counted: bool
    ) -> int:
        """Count this capture for every item it shows unsure (once per item; `counted`: a reused
        view, already counted); returns how many captures since the arm last moved have shown the
        first item of `ask_pool` (the one the cell would ask about) unsure."""
        if st.unsure_looks_at != self._motions:  # the arm moved: what was seen before may differ now
            st.unsure_looks, st.unsure_looks_at = [], self._motions
        radius = self.config.item_radius_m
        first = _centre_of(plan, ask_pool[0][1])
        if not counted:
            # One centre per item: a cluster's candidates share its centroid (hundreds of candidates,
            # a handful of items).
            seen_now: list[np.ndarray] = []
            clusters: set[int] = set()
            for _, cand in ask_pool:
                if _cluster(plan, cand) is not None:
                    if cand.cluster in clusters:
                        continue
                    clusters.add(cand.cluster)
                c = _centre_of(plan, cand)
                if not _near(c, seen_now, radius):
                    seen_now.append(c)
                    _bump(st.unsure_looks, c, radius)
        for c, n in st.unsure_looks:
            if np.linalg.norm(c[:2] - first[:2]) < radius:
                return n
        return 0

    def _sync_lookahead(self, rep: ToteReport, base: tuple[int, int, int]) -> None:
        """The look-ahead's counts since the tote began, into its report."""
        rep.lookahead_used = self.lookahead.used - base[0]
        rep.lookahead_discarded = self.lookahead.discarded - base[1]
        rep.captures_behind_motion = self.lookahead.looks - base[2]

    def _pools(self, plan: Plan, st: _ToteState) -> _Pools:
        """Sort a plan's candidates by what the cell may do with them now (see `_Pools`)."""
        cfg = self.config
        # A skipped item stays out until the arm has been in the tote since it was judged; then only a
        # confident candidate on it is taken (it is never asked about again).
        now = self._motions
        revisit = [c for c, m in st.skipped if cfg.revisit_skipped and m != now]
        blocked = [p.centre for p in st.pending.values()] + st.no_pick
        skipped_now = [c for c, m in st.skipped if not (cfg.revisit_skipped and m != now)]
        memo: dict[int, TrackedItem | None] = {}  # cluster index -> remembered item

        def item(c: Candidate) -> TrackedItem | None:
            if c.cluster < 0:
                return st.items.find(_centre_of(plan, c))
            if c.cluster not in memo:
                found, how = st.items.locate(_centre_of(plan, c), _cluster(plan, c))
                if found is not None and (found.no_safe_pick or found.questions):
                    # Follow it as the tote settles: it is found by its last-seen centre.
                    st.items.follow(found, _centre_of(plan, c), how)
                memo[c.cluster] = found
            return memo[c.cluster]

        pools = _Pools()
        for i, c in enumerate(plan.candidates):
            if self._failed_here(c.grasp, st):
                continue
            it = item(c)  # first: it follows a remembered item even where a spot rule below holds it
            if _near(_centre_of(plan, c), blocked, cfg.item_radius_m):
                continue
            held_back = _near(_centre_of(plan, c), skipped_now, cfg.item_radius_m)
            if it is not None and not it.allows(c.grasp.gripper):
                continue  # set aside, or this gripper already lost it
            if it is not None and c.grasp.gripper == "suction" and not it.cup_allows(c.grasp.position):
                continue  # too far from where the cup's reading put the centre of mass
            if st.items.lost_here(c.grasp.position, c.grasp.gripper) is not None:
                continue  # this gripper lost an item right here (whatever cluster it is in now)
            thr = _threshold(plan, c)
            sure = thr is not None and c.score >= thr
            in_dist = _item_in_distribution(plan, c)
            tried_enough = it is not None and it.model_failures >= cfg.max_failures_per_item
            if held_back:
                if sure and in_dist and not tried_enough:
                    pools.late.append((i, c))
                continue
            if revisit and _near(_centre_of(plan, c), revisit, cfg.item_radius_m):
                if sure and in_dist and not tried_enough:
                    pools.usable.append((i, c))
                    pools.confident.append((i, c))
                continue
            if tried_enough:
                pools.hard.append((i, c))  # the model has tried enough: a person may
                continue
            pools.usable.append((i, c))
            if sure and in_dist:
                pools.confident.append((i, c))
            else:
                pools.unsure.append((i, c))
                if not in_dist:
                    pools.novel.append((i, c))
        return pools

    def _failed_here(self, grasp: Grasp, st: _ToteState) -> bool:
        """Is `grasp` at a spot that failed in this tote (within failed_spot_radius_m)? A jaw grasp
        whose closing line turns at least jaw_retry_axis_deg from a failed jaw grasp's there is not:
        it closes on other faces."""
        cfg = self.config
        if not st.failed_spots:
            return False
        d = np.linalg.norm(np.asarray(st.failed_spots)[:, :2] - np.asarray(grasp.position)[:2], axis=1)
        near = np.flatnonzero(d < cfg.failed_spot_radius_m)
        if near.size == 0:
            return False
        if cfg.jaw_retry_axis_deg is None or grasp.gripper != "parallel_jaw":
            return True
        cos_max = float(np.cos(np.radians(cfg.jaw_retry_axis_deg)))
        closing = grasp.R[:, 0]
        for k in near:
            axis = st.failed_jaw_axes.get(int(k))
            if axis is None or abs(float(closing @ axis)) > cos_max:
                return True  # not a jaw failure, or the same faces
        return False

    # --- pieces -----------------------------------------------------------------------------------

    def _first_reachable(
        self, ordered: list[tuple[int, Candidate]], st: _ToteState
    ) -> tuple[int, Candidate] | None:
        """The first candidate the arm can reach (ReachCheck), checking at most `reach_checks`.

        Unreachable ones are remembered as failed spots of this tote (no attempt is recorded: the
        arm never moved) and the caller plans again. Arms without the check: the first candidate.
        """
        if not isinstance(self.arm, ReachCheck) or self.config.reach_checks <= 0:
            return ordered[0]
        for i, cand in ordered[: self.config.reach_checks]:
            why = self.arm.check_grasp(cand.grasp)
            # Only what the arm itself cannot do is skipped. A hand near a fixture (the check keeps a
            # tracking margin) is left to the pick: the planner's tool-collision check judged it.
            if why not in _UNREACHABLE:
                return i, cand
            st.failed_spots.append(np.asarray(cand.grasp.position))
            self._count("unreachable_skipped")
            log.info(
                "candidate %d at %s skipped before moving: %s", i, np.round(cand.grasp.position, 3), why.value
            )
        return None

    def _count_question(self, st: _ToteState, plan: Plan, cand: Candidate) -> int:
        """Count one more question about `cand`'s item; returns the questions about it so far. The item
        is the remembered one (arm/items.py: it follows its cluster as the tote settles) or, failing
        that, whatever was asked about within item_radius_m of the same spot."""
        centre = _centre_of(plan, cand)
        at_spot = _bump(st.asks, centre, self.config.item_radius_m)
        tracked = st.items.get(centre, _cluster(plan, cand))
        tracked.questions += 1
        return max(at_spot, tracked.questions)

    def _answers_on_robot_clock(self) -> bool:
        """Do this cell's answers come due on the robot clock (a simulated associate), not in wall time?"""
        return bool(getattr(self.assist, "answers_on_robot_clock", False))

    def _idle(self) -> float:
        """Wait one idle step (robot time) and let other threads deliver answers (wall time)."""
        self.arm.idle(self.config.idle_step_s)
        time.sleep(self.config.wall_poll_s)
        return self.config.idle_step_s

    def _ask(
        self,
        rep: ToteReport,
        tote_id: str,
        plan: Plan,
        plan_id: str | None,
        frame: Frame,
        centre: np.ndarray,
        pending: dict[str, _Pending],
        failed_spots: Sequence[np.ndarray] = (),
        item: int | None = None,
        cause: str = "low_score",
    ) -> None:
        """Ask a person about the item at `centre`. `cause` (ASK_CAUSES) says why this item, for the
        ledger, the console and the benchmark's account of what kept items from being placed alone."""
        cfg = self.config
        # Offer the best 20 distinct candidates that have not already failed in this tote: an associate
        # who approves a spot the cell just failed at would see it fail again (measured in the benchmark:
        # five approvals of one failing spot in a row). Indices stay the plan's, so answers map back, and
        # the picture draws exactly this list, so every number the person sees is one they can answer.
        spots = list(failed_spots)

        def failed(k: int) -> bool:
            return _near(plan.candidates[k].grasp.position, spots, cfg.failed_spot_radius_m)

        def on_item(k: int) -> bool:
            return _near(_centre_of(plan, plan.candidates[k]), [centre], cfg.item_radius_m)

        # The item asked about first (best first), then the rest: "approve the first" means this item.
        offered = offered_indices(plan, 20, exclude=lambda k: failed(k) or not on_item(k))
        offered += offered_indices(plan, 20 - len(offered), exclude=lambda k: failed(k) or on_item(k))
        cluster = plan.clusters[item] if item is not None and 0 <= item < len(plan.clusters) else None
        # Where the item asked about lies in the picture: boxed there, and in the request, so a console
        # (and the simulated associate) answers about that item, not about one the cell will pick by
        # itself meanwhile (an approval of such a pick arrives after the surface under it moved).
        where = item_pixels(frame, cluster) if cluster is not None else None
        png = b""
        if self.render_png is not None:
            png = self.render_png(frame, plan, indices=offered, item=item if where is not None else None)
        views = tuple(
            CandidateView(
                index=k,
                u=int(plan.candidates[k].pixel[0]),
                v=int(plan.candidates[k].pixel[1]),
                gripper=plan.candidates[k].grasp.gripper,
                p_success=float(plan.candidates[k].score),
            )
            for k in offered
        )
        now = time.time()
        req = AssistRequest(
            cell_id=cfg.cell_id,
            deadline=now + cfg.assist_deadline_s,
            image_png=png,
            candidates=views,
            reasons=plan.reasons,
            priority=cfg.assist_priority,
            created=now,
            context={
                "tote_id": tote_id,
                "frame_id": plan.frame_id,
                "plan_id": plan_id,
                "model_version": plan.model_version,
                # The item asked about (plan cluster): a "no safe pick" answer labels its
                # candidates only, never those on other items shown in the same picture.
                "item": None if item is None or item < 0 else int(item),
                "cause": cause,
            },
        )
        if where is not None:
            req.context["item_px"] = list(where[0])  # (u, v) of the item's centre
            req.context["item_box_px"] = list(where[1])  # (u0, v0, u1, v1) around it
        family = self.item_family(np.asarray(centre)) if self.item_family is not None else None
        if family:
            req.context["family"] = str(family)
        if self.ledger is not None:
            self.ledger.record_request(req)
        fut = self.assist.ask(req)
        pending[req.request_id] = _Pending(
            req, fut, plan, plan_id, frame, np.asarray(centre), self.arm.robot_time, self._motions, cluster
        )
        rep.assists_requested += 1
        self._count("assists_requested")
        if self.on_ask is not None:
            self.on_ask(req, np.asarray(centre))
        log.info("asked a person (%s): %s", req.request_id[:8], "; ".join(plan.reasons))

    def _apply_answers(self, rep: ToteReport, tote_id: str, st: _ToteState) -> None:
        cfg = self.config
        pending = st.pending
        poll = getattr(self.assist, "poll", None)  # in-process channels deliver on the robot clock
        if poll is not None:
            poll()
        for rid in list(pending):
            p = pending[rid]
            overdue = self.arm.robot_time - p.asked_at > cfg.assist_deadline_s
            if not p.future.done():
                if overdue:
                    self.assist.cancel(rid)
                    answer = AssistAnswer(rid, "expired", note="deadline passed at the cell")
                else:
                    continue
            else:
                try:
                    answer = p.future.result()
                except Exception as exc:  # the channel failed: treat as expired, never crash the cell
                    log.warning("assist request %s failed: %s", rid[:8], exc)
                    answer = AssistAnswer(rid, "expired", note=f"channel error: {exc}")
            del pending[rid]
            if self.ledger is not None:
                self.ledger.record_answer(answer)
            if answer.status != "answered":
                # Deadline passed (or the question was dropped): skip this item and move on.
                st.skipped.append((p.centre, p.motions))
                rep.assists_expired += 1
                self._count("assists_expired")
                continue
            rep.assists_answered += 1
            self._count("assists_answered")
            who = f"associate:{answer.associate_id or 'unknown'}"
            if answer.kind == "no_safe_pick":
                st.no_pick.append(p.centre)
                # The item, not only the spot: a cluster that drifts past item_radius_m as the tote
                # empties is still this item, and it is not asked about again (tuning seed 24, stop 36).
                st.items.get(p.centre, p.cluster).no_safe_pick = True
            elif answer.kind == "approve" and answer.candidate_index is not None:
                k = answer.candidate_index
                if not 0 <= k < len(p.plan.candidates):
                    log.warning("answer approves candidate %d of %d; ignored", k, len(p.plan.candidates))
                    continue
                cand = p.plan.candidates[k]
                item = st.items.get(_centre_of(p.plan, cand), _cluster(p.plan, cand))
                if not item.allows(cand.grasp.gripper):
                    # Set aside meanwhile, or this gripper already lost the item: not tried again.
                    log.info(
                        "approved candidate %d: its item does not allow %s any more; skipped",
                        k,
                        cand.grasp.gripper,
                    )
                    continue
                rep.captures_exposed += 1  # the check below captures a frame the arm waits for
                if not self._still_valid(cand, p.frame):
                    log.info("approved candidate %d: the surface moved since the question; skipped", k)
                    continue
                self._pick_and_place(
                    rep, st, tote_id, p.plan, p.plan_id, k, cand.grasp, who, cand.p_success,
                    request_id=rid, tracked=item,
                )  # fmt: skip
            elif answer.kind == "point" and answer.pixel is not None:
                tracked = st.items.get(p.centre)
                if tracked.set_aside:
                    log.info("clicked pixel on an item already set aside: skipped")
                    continue
                self._apply_point(rep, st, tote_id, p, answer, who, tracked)
            # "skip": nothing to do; the item may be asked about again later.

    def _apply_point(
        self,
        rep: ToteReport,
        st: _ToteState,
        tote_id: str,
        p: _Pending,
        answer: AssistAnswer,
        who: str,
        tracked: TrackedItem | None = None,
    ) -> None:
        """Execute a clicked pixel, if the surface under it is where it was when the person looked.

        If it moved, nothing is executed and the item stays unmarked: the loop plans it afresh and,
        still unsure, asks again about what is there now. The click becomes a planner candidate
        (`pixel_candidate`) so its attempt is stored with a patch and features and labelled by its
        outcome; the item it is on in the plan the person saw is recorded with it.
        """
        u, v = answer.pixel
        rep.captures_exposed += 1
        try:
            frame = self.camera.capture()
        except CameraError as exc:
            log.info("clicked pixel %s: no frame to check it against (%s)", answer.pixel, exc)
            return
        d0, d1 = _window_depth(p.frame, u, v), _window_depth(frame, u, v)
        if d0 is not None and d1 is not None and abs(d1 - d0) > self.config.answer_depth_tolerance_m:
            log.info(
                "clicked pixel %s: the surface moved %.3f m since the question; asking again",
                answer.pixel,
                d1 - d0,
            )
            self._count("answers_stale")
            return
        gripper = answer.gripper or "suction"
        try:
            if self.pixel_candidate is not None:
                pc = self.pixel_candidate(frame, u, v, gripper)
                grasp, patch, features, descriptor = pc.grasp, pc.patch, pc.features, pc.descriptor
            else:
                if gripper != "suction":
                    raise PixelGraspError(f"no {gripper} grasp at a pixel without a pixel_candidate builder")
                grasp, patch, features, descriptor = grasp_from_pixel(frame, u, v), None, None, None
        except (PixelGraspError, CameraError) as exc:
            # Asked again, the person sees the same picture and clicks the same spot (test seed 24,
            # stop 36: four clicks at one pixel): the item is skipped as if its question had expired.
            log.info("clicked pixel %s gives no grasp: %s; the item is skipped", answer.pixel, exc)
            st.skipped.append((p.centre, self._motions))
            self._count("answers_without_grasp")
            return
        item = _item_at(p.plan, grasp.position, self.config.item_radius_m)
        # The try counts on the item the click landed on, which need not be the one asked about: the
        # person may pick another, or see one item where segmentation saw two (an irregular item
        # pushed by failed tries). Counting it on the asked item let a set-aside item be tried a
        # fourth time.
        if item is not None:
            landed = p.plan.clusters[item]
            tracked = st.items.get(np.asarray(landed.centroid), landed)
        else:
            tracked = st.items.find(grasp.position) or tracked
        if tracked is not None and not tracked.allows(grasp.gripper):
            log.info("clicked pixel %s lands on an item that does not allow %s any more: skipped",
                     answer.pixel, grasp.gripper)  # fmt: skip
            self._count("answers_on_set_aside")
            return
        if descriptor is None and item is not None:
            descriptor = p.plan.clusters[item].descriptor
        self._pick_and_place(
            rep, st, tote_id, p.plan, p.plan_id, None, grasp, who, None,
            request_id=p.request.request_id, item=item, item_descriptor=descriptor,
            patch=patch, features=features, tracked=tracked,
        )  # fmt: skip

    def _still_valid(self, cand: Candidate, frame_then: Frame) -> bool:
        """Is the surface under an approved candidate where it was when the person looked?

        Compares the median depth of a 5x5 window around the candidate's pixel in the frame the person
        saw and in a fresh one (a single pixel is too noisy: sensor noise, holes at edges).
        """
        try:
            now = self.camera.capture()
        except CameraError:
            return False
        u, v = cand.pixel
        d0, d1 = _window_depth(frame_then, u, v), _window_depth(now, u, v)
        if d0 is None or d1 is None:
            return True  # nothing measured there either time: trust the person
        return abs(d1 - d0) <= self.config.answer_depth_tolerance_m

    def _pick_and_place(
        self,
        rep: ToteReport,
        st: _ToteState,
        tote_id: str,
        plan: Plan,
        plan_id: str | None,
        index: int | None,
        grasp: Grasp,
        decided_by: str,
        p_success: float | None,
        *,
        request_id: str | None = None,
        item: int | None = None,
        item_descriptor: np.ndarray | None = None,
        patch: np.ndarray | None = None,
        features: np.ndarray | None = None,
        tracked: TrackedItem | None = None,
    ) -> Attempt:
        self._motions += 1  # the arm goes into the tote: what the camera saw may change
        placements: list[Placement] = []

        def placement_for(picked: Outcome) -> Placement:
            placements.append(self._placement_for(plan, index, picked.executed or grasp))
            self._look_while_placing()
            return placements[-1]

        placed = None
        if isinstance(self.arm, PickAndPlace) and self.config.blend_pick_into_place:
            out, placed = self.arm.pick_and_place(grasp, placement_for)
        else:
            out = self.arm.pick(grasp)
        rep.estop_s += _stop_held_s(out)  # a protective stop held inside the motion (stop category 2)
        if out.reason is Reason.ESTOP:
            # Halted by a protective stop, not a failure of this grasp: no failed spot, no record.
            self._count("estop_halts")
            log.warning("pick halted by a protective stop; holding")
            return Attempt(uuid.uuid4().hex, tote_id, grasp, out, decided_by, p_success, self.arm.robot_time)
        if out.success:
            if placed is None:
                placed = self.arm.place(placement_for(out))
            placement = placements[-1]
            rep.estop_s += _stop_held_s(placed)
            while placed.reason is Reason.ESTOP and not self._stop.is_set():
                # Stopped while carrying: hold the item until the stop clears, then finish the place.
                while getattr(self.arm, "stopped", False) and not self._stop.is_set():
                    rep.estop_s += self._idle()
                placed = self.arm.place(placement)
                rep.estop_s += _stop_held_s(placed)
            self.lookahead.placed(placed)
        else:
            # Back out of the camera's view before the next look (a failed pick leaves the arm
            # hovering over the tote, where it hides the items from the camera).
            self.arm.home()
            if grasp.gripper == "parallel_jaw":
                st.failed_jaw_axes[len(st.failed_spots)] = np.asarray(grasp.R[:, 0], dtype=np.float64)
            st.failed_spots.append(np.asarray(grasp.position))
        if tracked is None:
            cand = plan.candidates[index] if index is not None else None
            centre = _centre_of(plan, cand) if cand is not None else np.asarray(grasp.position)
            tracked = st.items.get(centre, _cluster(plan, cand) if cand is not None else None)
        # What this try teaches about the next one on the item: the pick's reason, or the place's
        # (a drop in transit is the grip's failure too).
        why_failed = out if not out.success else placed
        reason = why_failed.reason if why_failed is not None else Reason.OK
        why = str(why_failed.details.get("why", "")) if why_failed is not None else ""
        st.items.record(
            tracked,
            grasp.gripper,
            reason,
            why,
            by_model=decided_by.startswith("model"),
            at=grasp.position,
            details=why_failed.details if why_failed is not None else None,
        )
        if tracked.set_aside and reason is not Reason.OK:
            self._count("items_set_aside")
            log.info("item at %s set aside: %s", np.round(tracked.centre, 3), tracked.why_set_aside)
        att = Attempt(
            attempt_id=uuid.uuid4().hex,
            tote_id=tote_id,
            grasp=out.executed or grasp,
            outcome=out,
            decided_by=decided_by,
            p_success=p_success,
            robot_time=self.arm.robot_time,
            placed=placed,
        )
        rep.attempts.append(att)
        self._count("attempts")
        self._count("picks" if out.success else f"failures_{out.reason.value}")
        if self.ledger is not None:
            if index is not None and plan.patches is not None:
                patch, features = plan.patches[index], plan.features[index]
            if item is None and index is not None:
                cl = _cluster_of(plan, index)
                item = plan.candidates[index].cluster if cl is not None else None
                item_descriptor = cl.descriptor if cl is not None else None
            self.ledger.record_attempt(
                attempt_id=att.attempt_id,
                plan_id=plan_id,
                candidate_index=index if plan_id is not None else None,
                grasp=att.grasp,
                outcome=out,
                decided_by=decided_by,
                model_version=plan.model_version,
                robot_time=att.robot_time,
                patch=patch,
                features=features,
                family=out.details.get("family") if isinstance(out.details, dict) else None,
                source=self.config.ledger_source,
                request_id=request_id,
                item=item,
                item_descriptor=item_descriptor,
            )
        log.info("pick %s by %s: %s", att.attempt_id[:8], decided_by, out.reason.value)
        if self.on_attempt is not None:
            self.on_attempt(att, plan)
        return att

    def _look_while_placing(self) -> None:
        """Ask the arm to call the look-ahead once it has left the camera's view (arm/lookahead.py)."""
        notify = getattr(self.arm, "notify_when_clear", None)
        if self.config.plan_while_placing and notify is not None:
            notify(self.lookahead.look)

    def _placement_for(self, plan: Plan, index: int | None, grasp: Grasp) -> Placement:
        """Where to release: a slot from the packer's height map (swapping a full box for an empty one)."""
        if self.packer is None:
            raise RuntimeError("CellController needs a packer to place items")
        cluster = _cluster_of(plan, index)
        # Size of the item as seen from above (the cluster's box); its visible height is measured
        # from the surface it rested on, which is a conservative guess for a partly hidden item.
        extents = np.maximum(cluster.extents, 0.01) if cluster is not None else np.array([0.08, 0.08, 0.05])
        bottom = cluster.lo[2] if cluster is not None else grasp.position[2] - extents[2]
        tcp_above_bottom = max(0.0, float(grasp.position[2] - bottom))
        ext = tuple(float(e) for e in extents)
        slot = self.packer.propose(ext)
        if slot is None and self.packer.box.items:  # full for this item: ship it, start a new box
            log.info("box full for an item of %s m: shipping it, starting a new box", np.round(ext, 3))
            self.packer.swap()
            if self.feed is not None:
                self.feed.swap_box()
            self._count("boxes_closed")
            slot = self.packer.propose(ext)
        R = grasp.R
        pivot = None
        if slot is None:
            # Larger than an empty box: release over the box centre at rim height, and count it.
            log.warning("item of %s m does not fit an empty box: released over its centre", np.round(ext, 3))
            self._count("unpackable")
            T = self.packer.box.T_base_box
            bottom_at_release = T[:3, 3] + np.array([0.0, 0.0, self.packer.box.inner_size_m[2]])
        else:
            self.packer.commit(slot)
            bottom_at_release = np.asarray(slot.position, dtype=float) + np.array(
                [0.0, 0.0, slot.release_height_m - float(slot.position_box[2])]
            )
            c, s_ = np.cos(slot.yaw), np.sin(slot.yaw)
            Rz = np.array([[c, -s_, 0.0], [s_, c, 0.0], [0.0, 0.0, 1.0]])
            R = Rz @ R  # turn the item to the slot's yaw
            if cluster is not None:
                # The item's centre (not the TCP) over the slot's centre: the grasp's offset from
                # the centre of the item's footprint, turned with the item. The arm may release
                # with the hand turned 180 degrees about the item's centre instead (`pivot`).
                off = np.zeros(3)
                off[:2] = (
                    np.asarray(grasp.position, dtype=float)[:2]
                    - (np.asarray(cluster.lo) + cluster.hi)[:2] / 2
                )
                pivot = bottom_at_release + np.array([0.0, 0.0, tcp_above_bottom])
                bottom_at_release = bottom_at_release + Rz @ off
        pos = bottom_at_release + np.array([0.0, 0.0, tcp_above_bottom])
        return Placement(pos, matrix_to_quat(R), box_id=slot.box_id if slot is not None else -1, pivot=pivot)

    def _observe_plan(self, plan: Plan) -> None:
        if self.metrics is not None:
            self.metrics.observe_plan(plan)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.count(name)


def _stop_held_s(out: Outcome) -> float:
    """Robot seconds a motion spent holding in a protective stop (the arm's "stopped" phase)."""
    phases = out.details.get("phases") if isinstance(out.details, dict) else None
    return float(phases.get("stopped", 0.0)) if isinstance(phases, dict) else 0.0


def _threshold(plan: Plan, cand: Candidate) -> float | None:
    """The score this candidate needs to auto-execute: its own (its gripper's), else the plan's."""
    return cand.threshold if cand.threshold is not None else plan.threshold


def _item_in_distribution(plan: Plan, cand: Candidate) -> bool:
    """The watchdog's verdict on the candidate's item; the scene's where the plan has no item verdicts."""
    cl = _cluster(plan, cand)
    if cl is not None and cl.in_distribution is not None:
        return bool(cl.in_distribution)
    return bool(plan.in_distribution)


def _window_depth(frame: Frame, u: int, v: int, r: int = 2) -> float | None:
    """Median of the valid depths in a (2r+1)^2 window around pixel (u, v), or None."""
    h, w = frame.shape
    win = frame.depth[max(0, v - r) : min(h, v + r + 1), max(0, u - r) : min(w, u + r + 1)]
    ok = win[np.isfinite(win) & (win > 0)]
    return float(np.median(ok)) if ok.size else None


def _near(p: np.ndarray, centres: list[np.ndarray], radius: float) -> bool:
    if not centres:
        return False
    d = np.linalg.norm(np.asarray(centres)[:, :2] - np.asarray(p)[:2], axis=1)
    return bool((d < radius).any())


def _bump(counts: list[tuple[np.ndarray, int]], centre: np.ndarray, radius: float) -> int:
    """Count one more event at the item near `centre`; returns the item's new count."""
    for k, (c, n) in enumerate(counts):
        if np.linalg.norm(c[:2] - centre[:2]) < radius:
            counts[k] = (c, n + 1)
            return n + 1
    counts.append((np.asarray(centre), 1))
    return 1


_UNREACHABLE = (Reason.UNREACHABLE, Reason.IK_FAILED, Reason.INVALID)


def _uncovered_first(
    plan: Plan, confident: list[tuple[int, Candidate]], max_share: float | None
) -> list[tuple[int, Candidate]]:
    """Confident candidates in pick order: suction on items nothing lies on, and every jaw candidate,
    first (best first); then suction on covered items (best first).

    Why: under a covering item the camera sees only part of an item (often split in two by what
    lies across it), so the candidate's distance to the visible centroid, which the model trusts
    for torque, is not the distance to the centre of mass: in the procedural benchmark, suction on
    the visible half of a large mailer under a bottle dropped it. Picking what lies on top first
    uncovers the rest.
    """
    if max_share is None:
        return list(confident)

    first, last = [], []
    for i, c in confident:
        cl = _cluster(plan, c)
        # The centroid bias is a torque error for the cup; the jaw grips across the item.
        covered = c.grasp.gripper == "suction" and cl is not None and cl.occluded > max_share
        (last if covered else first).append((i, c))
    return first + last


def _cluster(plan: Plan, cand: Candidate) -> ItemCluster | None:
    """The item a candidate lies on, where the plan has its clusters."""
    return plan.clusters[cand.cluster] if 0 <= cand.cluster < len(plan.clusters) else None


def _cluster_of(plan: Plan, index: int | None) -> ItemCluster | None:
    return None if index is None else _cluster(plan, plan.candidates[index])


def _item_at(plan: Plan, point: np.ndarray, radius: float) -> int | None:
    """The plan's item under a base-frame point: the nearest cluster whose footprint (grown by
    `radius`) contains it horizontally, or None."""
    best, best_d = None, np.inf
    for k, cl in enumerate(plan.clusters):
        lo, hi = np.asarray(cl.lo)[:2] - radius, np.asarray(cl.hi)[:2] + radius
        xy = np.asarray(point)[:2]
        if (xy >= lo).all() and (xy <= hi).all():
            d = float(np.linalg.norm(xy - np.asarray(cl.centroid)[:2]))
            if d < best_d:
                best, best_d = k, d
    return best


def _centre_of(plan: Plan, cand: Candidate) -> np.ndarray:
    cl = _cluster(plan, cand)
    return np.asarray(cl.centroid if cl is not None else cand.grasp.position)


__all__ = ["AssistChannel", "Attempt", "CellController", "ControllerConfig", "ToteReport", "Reason"]
