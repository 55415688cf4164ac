"""The simulated associate: answers assist requests like a person would, a few seconds later.

What it is
    A stand-in for a warehouse associate looking at the annotated tote image. It sees what a
    careful person sees — which item each numbered candidate lies on and where a good pick on that
    item would be — by reading the simulator's ground truth (the segmentation of the frame the cell
    asked about, and the oracle's grasp for that item). It never sees the planner's internals.

What is randomised (seeded)
    - Answer time: log-normal, median `median_answer_s`, spread `answer_spread` (people are mostly
      quick and sometimes slow).
    - Mistakes: with probability `error_rate` the answer approves a random candidate instead.

What it answers
    About the item asked about: the one the picture boxes (`item_box_px` in the request; without it,
    the item under the first candidate offered).
    - approve k: candidate k lies on that item and is within `approve_radius_px` of the oracle's
      grasp for it, with the same gripper (without a box: on any item, best-ranked first);
    - point (u, v) with a gripper: no candidate is right, but the oracle has a grasp on the asked
      item: click its pixel (a jaw's at the middle between the fingers) and name its gripper;
    - no_safe_pick: the oracle has no grasp for the asked item (too big, too heavy, unreachable).

Two ways to use it
    - `SimAssistChannel`: in-process, on the robot clock (answers arrive `delay` robot seconds after
      the question). The benchmark uses it so that human time is measured on the same clock as
      robot time and results do not depend on host speed.
    - `SimAssociateWorker`: a thread that connects to a real broker as an associate (CURVE) and
      answers in wall-clock seconds. `pickcell demo` uses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from grasping.types import Frame
from hitl.messages import AssistAnswer, AssistRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimAssociateConfig:
    median_answer_s: float = 4.0  # seconds, median time a person takes to answer
    answer_spread: float = 0.4  # sigma of log(answer time), unitless
    error_rate: float = 0.05  # probability that an answer approves a random candidate, [0, 1]
    approve_radius_px: float = 10.0  # candidate this close (pixels) to the right spot counts as right
    seed: int = 0  # seeds answer times and mistakes
    identity: str = "sim-associate"  # recorded as who answered


@dataclass(frozen=True)
class Judgement:
    kind: str  # approve | point | no_safe_pick
    candidate_index: int | None = None
    pixel: tuple[int, int] | None = None
    gripper: str | None = None  # for "point": the gripper the person names for the clicked spot


class RecordingCamera:
    """Wraps the simulated camera and keeps the segmentation of recent frames by frame id.

    The controller only ever sees the Frame; the associate needs to know which item is where in the
    frame the cell asked about, even if the cell has captured newer frames since.
    """

    def __init__(self, camera, keep: int = 64) -> None:
        self.camera = camera
        self.keep = keep
        self.segmentations: OrderedDict[str, np.ndarray] = OrderedDict()
        self.last_frame: Frame | None = None
        self._lock = threading.Lock()

    def capture(self) -> Frame:
        frame = self.camera.capture()
        self.last_frame = frame
        with self._lock:
            self.segmentations[frame.frame_id] = np.array(self.camera.last_segmentation, copy=True)
            while len(self.segmentations) > self.keep:
                self.segmentations.popitem(last=False)
        return frame

    def segmentation(self, frame_id: str) -> np.ndarray | None:
        with self._lock:
            return self.segmentations.get(frame_id)

    def __getattr__(self, name: str):
        return getattr(self.camera, name)


class GroundTruthJudge:
    """Decides what a careful person would answer, from simulator ground truth."""

    def __init__(self, cell, camera: RecordingCamera, config: SimAssociateConfig | None = None) -> None:
        from sim.oracle import OracleGraspSource

        self.cell = cell
        self.camera = camera
        self.cfg = config or SimAssociateConfig()
        self.oracle = OracleGraspSource(cell)
        self.rng = np.random.default_rng(self.cfg.seed)
        self._lock = threading.Lock()

    def _project(self, point: np.ndarray) -> tuple[int, int]:
        T = np.linalg.inv(self.camera.T_base_camera)
        pc = T[:3, :3] @ point + T[:3, 3]
        uvw = self.camera.K @ pc
        return int(round(uvw[0] / uvw[2])), int(round(uvw[1] / uvw[2]))

    def judge(self, request: AssistRequest) -> Judgement:
        with self._lock:
            if request.candidates and self.rng.random() < self.cfg.error_rate:
                k = int(self.rng.integers(len(request.candidates)))
                return Judgement("approve", candidate_index=request.candidates[k].index)
            return self._judge(request)

    def _judge(self, request: AssistRequest) -> Judgement:
        seg = self.camera.segmentation(str(request.context.get("frame_id", "")))
        if seg is None or not request.candidates:
            return Judgement("no_safe_pick")
        h, w = seg.shape
        bodies = []
        for c in request.candidates:
            b = int(seg[min(max(c.v, 0), h - 1), min(max(c.u, 0), w - 1)])
            bodies.append(b if b in self.cell.items else None)
        # The item asked about: the one the picture boxes (the request says where, `item_px`), else
        # the one under the first candidate offered (the cell offers the asked item's first).
        asked = None
        box = request.context.get("item_box_px")
        if box is not None:
            asked = self._body_in_box(seg, box, request.context.get("item_px"))
        if asked is None:
            asked = next((b for b in bodies if b is not None), None)
        if asked is None:
            return Judgement("no_safe_pick")
        # Approve the best-ranked candidate that a person would agree with: on the item asked about
        # when the picture shows which it is, else on any item.
        for c, b in zip(request.candidates, bodies, strict=True):
            if b is None or (box is not None and b != asked):
                continue
            g = self.oracle.grasp_for(b)
            if g is None or g.gripper != c.gripper:
                continue
            u, v = self._project(g.position)
            if np.hypot(u - c.u, v - c.v) <= self.cfg.approve_radius_px:
                # The candidate's own number (its place in the plan, drawn on the image), not its
                # place in the offered list: the cell executes plan.candidates[candidate_index].
                return Judgement("approve", candidate_index=c.index)
        # None offered is right: click where a good grasp is, naming the gripper (the console's
        # click carries one; a jaw is clicked at the middle between its fingers).
        g = self.oracle.grasp_for(asked)
        if g is not None:
            u, v = self._project(g.position)
            if 0 <= u < w and 0 <= v < h:
                return Judgement("point", pixel=(u, v), gripper=g.gripper)
        return Judgement("no_safe_pick")

    def _body_in_box(self, seg: np.ndarray, box: Any, centre: Any) -> int | None:
        """The item a person sees in the boxed part of the picture: the one under the box's centre
        pixel if there is one, else the item covering most of the box."""
        h, w = seg.shape
        try:
            u0, v0, u1, v1 = (int(x) for x in box)
        except (TypeError, ValueError):
            return None
        if centre is not None:
            u, v = (int(x) for x in centre)
            b = int(seg[min(max(v, 0), h - 1), min(max(u, 0), w - 1)])
            if b in self.cell.items:
                return b
        patch = seg[max(v0, 0) : min(v1, h - 1) + 1, max(u0, 0) : min(u1, w - 1) + 1].ravel()
        ids, counts = np.unique(patch, return_counts=True)
        best = [(n, int(i)) for i, n in zip(ids, counts, strict=True) if int(i) in self.cell.items]
        return max(best)[1] if best else None

    def answer_delay(self) -> float:
        with self._lock:
            return float(
                self.cfg.median_answer_s * np.exp(self.cfg.answer_spread * self.rng.standard_normal())
            )


class SimAssistChannel:
    """In-process assist channel on the robot clock (benchmark). `answer=False`: nobody ever answers."""

    # Answers come due as the robot clock advances, never in wall time: a controller waiting on this
    # channel needs no new look at an unchanged tote to give a person time (arm/controller.py).
    answers_on_robot_clock = True

    def __init__(
        self, judge: GroundTruthJudge | None, clock: Callable[[], float], answer: bool = True
    ) -> None:
        self.judge = judge
        self.clock = clock
        self.answer = answer and judge is not None
        self._due: dict[str, tuple[float, float, Future, AssistAnswer]] = {}  # id -> (due, delay, ...)
        self.human_seconds = 0.0  # robot seconds people spent on answered requests
        self.asked = 0

    def ask(self, request: AssistRequest) -> Future:
        fut: Future = Future()
        self.asked += 1
        if self.answer:
            j = self.judge.judge(request)
            delay = self.judge.answer_delay()
            ans = AssistAnswer(
                request_id=request.request_id,
                status="answered",
                kind=j.kind,
                candidate_index=j.candidate_index,
                pixel=j.pixel,
                gripper=j.gripper,
                associate_id=self.judge.cfg.identity,
                answered_at=time.time(),
            )
            self._due[request.request_id] = (self.clock() + delay, delay, fut, ans)
        return fut

    def poll(self) -> None:
        now = self.clock()
        for rid, (due, delay, fut, ans) in list(self._due.items()):
            if now >= due:
                del self._due[rid]
                self.human_seconds += delay
                fut.set_result(ans)

    def cancel(self, request_id: str) -> None:
        self._due.pop(request_id, None)


class SimAssociateWorker:
    """A simulated associate connected to a real broker (wall-clock answers). For `pickcell demo`."""

    def __init__(self, client, judge: GroundTruthJudge, time_scale: float = 1.0) -> None:
        self.client = client  # hitl.associate.AssociateClient
        self.judge = judge
        self.time_scale = time_scale  # multiply answer delays (e.g. 0.5 for a brisk demo)
        self.answered = 0
        self._judged: dict[str, Judgement] = {}  # request id -> judged when the cell asked
        self._judged_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-associate", daemon=True)

    def judge_at_ask(self, channel):
        """Wrap the cell's assist channel so that each request is judged when the cell asks, on its thread.

        PyBullet is not thread-safe: the judge reads ground truth (item poses, contacts) and must do so
        on the thread that steps the simulation, not on this worker's (which crashed the worker with
        "GetBasePositionAndOrientation failed" while the arm moved). Judging at ask time is also what a
        person judges: the scene in the picture, not the scene seconds later.
        """
        worker = self

        class _JudgingChannel:
            def __init__(self, inner) -> None:
                self._inner = inner

            def ask(self, request: AssistRequest):
                fut = self._inner.ask(request)  # on its way first: judging must not eat the deadline
                j = worker.judge.judge(request)
                with worker._judged_lock:
                    worker._judged[request.request_id] = j
                return fut

            def __getattr__(self, name: str):
                return getattr(self._inner, name)

        return _JudgingChannel(channel)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                req = self.client.next_request(timeout_s=0.5)
            except Exception as exc:  # broker gone: keep trying, like a person refreshing the screen
                log.warning("simulated associate: %s", exc)
                self._stop.wait(1.0)
                continue
            if req is None:
                continue
            j = self._wait_judged(req)
            if j is None:  # not asked through judge_at_ask: judging here would race the simulation
                log.warning("simulated associate: request %s was not judged by its deadline; giving it back",
                            req.request_id[:8])  # fmt: skip
                try:
                    self.client.release(req.request_id)
                except Exception as exc:  # expired meanwhile, or the broker is gone
                    log.info("simulated associate could not release %s: %s", req.request_id[:8], exc)
                self._stop.wait(1.0)
                continue
            if self._stop.wait(self.judge.answer_delay() * self.time_scale):
                return
            if self.client.cancelled_reason(req.request_id) is not None:
                continue
            try:
                self.client.answer(
                    req.request_id,
                    j.kind,
                    candidate_index=j.candidate_index,
                    pixel=j.pixel,
                    gripper=j.gripper,
                )
                self.answered += 1
            except Exception as exc:  # expired while "thinking", or answered elsewhere
                log.info("simulated associate could not answer %s: %s", req.request_id[:8], exc)

    def _wait_judged(self, req: AssistRequest) -> Judgement | None:
        """The judgement made when the cell asked (it may still be in the making), or None by the deadline."""
        while not self._stop.is_set() and time.time() < req.deadline:
            with self._judged_lock:
                j = self._judged.pop(req.request_id, None)
            if j is not None:
                return j
            self._stop.wait(0.05)
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
