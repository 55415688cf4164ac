"""Ground-truth bookkeeping of a simulated tote: who decided each attempt, what became of each item,
and every way an item was damaged.

The controller only reports what it knows (its attempts, who decided them, its questions). The
operator metrics need more, and only the simulator knows it: which item each attempt and each
question was about, which items ended in a box, and how far an item fell when it was let go.
`ToteRecorder` installs itself around a controller built by `sim.stack.build_sim_stack` and turns
one `run_tote` into the plain-dict record that `sim.benchmark.metrics.aggregate` reads. The
benchmark episode (`sim.benchmark.episode`) and `pickcell demo` both use it, so the demo's
summary and the bench's JSON are the same numbers computed the same way.

Who decided: an attempt whose `decided_by` starts with "associate" was chosen by a person; every
other attempt ("model", "model-unsure") was executed by the model without asking. An item counts as
*placed by the model alone* only if it ended in a box, no attempt on it was decided by a person and
no question about it was answered. Questions nobody answered (expired or cancelled) do not make a
person "involved", but they still count as interventions asked for.

Why an item was not placed by the model alone (`not_alone_because`, one per such item), from what
happened to it first: `model_failed` (the model's own first try on it failed), `novel`, `low_score`
(the first question about it, by the controller's ask cause: arm.controller.ASK_CAUSES, or the cause
the controller gave when it gave the item up without asking: `low_score` for an item the model was
sure it could not pick, `ControllerConfig.ask_min_p`), or, for an item never tried, asked about nor
given up, `not_reached` (the tote was diverted or ran out of tries first).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

NOT_ALONE_CAUSES = ("model_failed", "novel", "low_score", "not_reached", "other")
DAMAGE_DROP_M = 0.3  # a fall from higher than this counts as damage, metres
# Arm-on-item contact force that counts as a damaging hit, newtons (sustained over ~20 ms, see
# SimArm._note_impact). Ordinary picks of procedural items measured 35-70 N (median 43 N over 19
# picks), so the limit flags hits of about twice the hardest ordinary press.
DAMAGE_IMPACT_N = 150.0
HELD_ITEM_LINK = -2  # SimArm's link index for "the held item" in collision details

# What can become of an item, in the order the first matching one is chosen (see ToteRecorder.finish).
FATES = ("placed", "lost", "given_up", "no_safe_pick", "expired", "diverted", "skipped")


def decider(decided_by: str) -> str:
    """'person' for attempts a person chose (approve / point), else 'model'."""
    return "person" if str(decided_by).startswith("associate") else "model"


class _Instrumented:
    """Wraps the simulated arm to attribute each motion to an item (ground truth) and measure damage.

    Every pick and place is watched, including the ones a protective stop halts (the controller
    records no attempt for those): the held item's height when the arm lets go of it, how far it
    then falls, the hardest arm-on-item press, and whether the held item hit something.
    """

    def __init__(self, cell) -> None:
        self.cell = cell
        self.arm = cell.arm
        self.target: int | None = None
        self.drop_m = 0.0
        self.impact_n = 0.0
        self.last_pick: dict[str, Any] | None = None  # damage record of the latest pick
        self.last_place: dict[str, Any] | None = None  # ... and place
        self.halted: list[dict[str, Any]] = []  # motions a protective stop ended (no attempt recorded)
        self._releases: list[tuple[int, float]] = []  # (item, z when let go) during the current motion
        self._watch_releases()

    def __getattr__(self, name: str):
        return getattr(self.arm, name)

    @property
    def robot_time(self) -> float:
        return self.arm.robot_time

    def _watch_releases(self) -> None:
        """Note the held item and its height whenever the arm lets go of it outside a normal place.

        SimArm lets go in `_drop` (seal lost, friction exceeded, a stop while carrying) and in
        `_abort_recover` (after a failed or halted pick). Wrapping them on this instance only (the
        simulator's code is untouched) gives the exact release height, which the item's position
        after the motion no longer shows: it has already fallen.
        """
        import pybullet as pb

        for name in ("_drop", "_abort_recover"):
            orig = getattr(self.arm, name, None)
            if orig is None:
                continue

            def wrapped(*a, _orig=orig, **kw):
                held = getattr(self.arm, "_held", None)
                if held is not None and held in self.cell.items:
                    z = pb.getBasePositionAndOrientation(held, physicsClientId=self.cell.client_id)[0][2]
                    self._releases.append((int(held), float(z)))
                return _orig(*a, **kw)

            setattr(self.arm, name, wrapped)

    def _aimed_item(self, grasp) -> int | None:
        """The item a grasp aims at (ground truth): the first item on the approach line through the
        grasp point, from 10 cm before it to 2 cm past it; failing that, the item whose bounding box
        is nearest the grasp point. The line comes first because the bounding box of a long item
        lying diagonally covers its neighbours: a pick on a small part beside a tube would be
        charged to the tube."""
        import pybullet as pb

        from sim.grippers import RAY_MASK

        p = np.asarray(grasp.position, dtype=np.float64)
        a = np.asarray(grasp.approach, dtype=np.float64)
        hit = pb.rayTest(
            (p - 0.10 * a).tolist(),
            (p + 0.02 * a).tolist(),
            collisionFilterMask=RAY_MASK,
            physicsClientId=self.cell.client_id,
        )[0][0]
        if hit >= 0 and hit in self.cell.items_in_tote():
            return int(hit)
        return self._nearest_item(p)

    def _item_at(self, centre: np.ndarray) -> int | None:
        """The item a question is about (ground truth), from the centre of the points the cell saw:
        the first item a vertical ray meets from 10 cm above that centre to 5 cm below it; failing
        that, the item whose bounding box is nearest. The ray comes first for the reason given in
        `_aimed_item`: a large mailer's bounding box holds the centres of the items lying on it."""
        import pybullet as pb

        from sim.grippers import RAY_MASK

        hit = pb.rayTest(
            (centre + [0.0, 0.0, 0.10]).tolist(),
            (centre - [0.0, 0.0, 0.05]).tolist(),
            collisionFilterMask=RAY_MASK,
            physicsClientId=self.cell.client_id,
        )[0][0]
        if hit >= 0 and hit in self.cell.items_in_tote():
            return int(hit)
        return self._nearest_item(centre)

    def _nearest_item(self, p: np.ndarray) -> int | None:
        import pybullet as pb

        best, best_d = None, 0.05  # further than 5 cm from every item: aimed at nothing
        for b in self.cell.items_in_tote():
            lo, hi = (np.array(x) for x in pb.getAABB(b, physicsClientId=self.cell.client_id))
            d = float(np.linalg.norm(np.maximum(0.0, np.maximum(lo - p, p - hi))))
            if d < best_d:
                best, best_d = b, d
        return best

    def _z(self, body: int) -> float:
        import pybullet as pb

        return float(pb.getBasePositionAndOrientation(body, physicsClientId=self.cell.client_id)[0][2])

    def _damage(self, out, during: str, item: int | None, extra_fall: int | None = None) -> dict[str, Any]:
        """What this motion did to items: falls after a release, presses, a held item's collision."""
        falls: dict[int, float] = {}
        watched = [(b, z) for b, z in self._releases if b in self.cell.items]
        seen = {b for b, _ in watched}
        if extra_fall is not None and extra_fall in self.cell.items and extra_fall not in seen:
            watched.append((extra_fall, self._z(extra_fall)))  # an arm without the release hooks
        if watched:
            self.cell.settle(1.0)  # let what was let go come to rest
            for b, z0 in watched:
                falls[b] = max(falls.get(b, 0.0), z0 - self._z(b))
        drop = max(falls.values(), default=0.0)
        details = out.details if isinstance(out.details, dict) else {}
        impact = float(details.get("max_impact_n", 0.0) or 0.0)
        reason = out.reason.value
        kinds = []
        if drop > DAMAGE_DROP_M:
            kinds.append("drop")
        if impact > DAMAGE_IMPACT_N:
            kinds.append("impact")
        if reason == "collision" and (
            details.get("link") == HELD_ITEM_LINK or details.get("link_name") == "held_item"
        ):
            kinds.append("held_collision")
        if reason == "estop" and self._releases:
            kinds.append("stop_drop")  # the stop made the arm let go of what it held
        released = sorted(falls, key=lambda b: -falls[b])
        return {
            "item": _name(item if item is not None else (released[0] if released else None)),
            "during": during,
            "reason": reason,
            "damage": kinds,
            "drop_m": round(drop, 3),
            "impact_n": round(impact, 1),
        }

    def pick(self, grasp):
        self._before_pick(grasp)
        out = self.arm.pick(grasp)
        self._after_pick(out)
        return out

    def place(self, placement):
        held = self.arm.held_item
        self._releases = []
        out = self.arm.place(placement)
        self._after_place(out, held)
        return out

    def pick_and_place(self, grasp, placement_for):
        """The arm's blended pick and place (arm.interfaces.PickAndPlace), watched as `pick` and
        `place` are: the pick's record is made at the hand-over, before the place starts."""
        self._before_pick(grasp)
        held: list[int | None] = []

        def handover(out):
            self._after_pick(out)
            held.append(self.arm.held_item)
            self._releases = []
            return placement_for(out)

        out, placed = self.arm.pick_and_place(grasp, handover)
        if not held:  # the pick failed (or raised before the hand-over): recorded as a pick
            self._after_pick(out)
        if placed is not None:
            self._after_place(placed, held[0])
        return out, placed

    def _before_pick(self, grasp) -> None:
        self._releases = []
        self.last_place = None
        self.target = self._aimed_item(grasp)

    def _after_pick(self, out) -> None:
        if out.item_id is not None and out.item_id in self.cell.items:
            self.target = int(out.item_id)  # what the gripper really took
        rec = self._damage(out, "pick", self.target)
        self.last_pick = rec
        self.drop_m, self.impact_n = rec["drop_m"], rec["impact_n"]
        if rec["reason"] == "estop":
            self.halted.append(rec)

    def _after_place(self, out, held: int | None) -> None:
        rec = self._damage(out, "place", held, extra_fall=held if not out.success else None)
        self.last_place = rec
        self.drop_m = max(self.drop_m, rec["drop_m"])
        if rec["reason"] == "estop":
            self.halted.append(rec)


def _not_alone_because(rows: list[dict[str, Any]], asks: list[tuple[float, str]]) -> str:
    """What happened first to an item the model did not place alone (module docstring).

    `rows`: the item's attempts (each with its robot time `t`), `asks`: (robot time, cause) of the
    questions about it. An attempt and a question at one instant: the attempt came first (a
    question is asked after the look that follows a try)."""
    first_try = min(rows, key=lambda r: r["t"]) if rows else None
    if first_try is not None and (not asks or first_try["t"] <= asks[0][0]):
        if first_try["decider"] == "model" and not first_try["success"]:
            return "model_failed"
        return "other"  # a person's pick first (a question asked before the episode's records began)
    if asks:
        cause = asks[0][1]
        return cause if cause in NOT_ALONE_CAUSES else "other"
    return "not_reached"


def _name(body: int | None) -> str:
    return f"b{body}" if body is not None else "none"


class _RecordingChannel:
    """Passes questions to the real channel and notes how each one was answered (or not)."""

    def __init__(self, inner, answers: dict[str, str]) -> None:
        self.inner = inner
        self.answers = answers  # request id -> answer kind | "expired" | "cancelled" | "error"

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # poll, human_seconds, ... where the inner channel has them

    def ask(self, request) -> Future:
        fut = self.inner.ask(request)
        rid = request.request_id

        def done(f: Future) -> None:
            try:
                ans = f.result()
            except Exception:  # the channel failed: nobody answered
                self.answers[rid] = "error"
                return
            self.answers[rid] = ans.kind if ans.status == "answered" and ans.kind else str(ans.status)

        fut.add_done_callback(done)
        return fut


class ToteRecorder:
    """Install on a simulated stack's controller; `begin()` before and `finish(report)` after each tote."""

    def __init__(self, stack, on_row: Callable[[dict[str, Any], Any, Any], None] | None = None) -> None:
        self.cell = stack.cell
        self.feed = stack.feed
        self.ctl = stack.controller
        self.arm = _Instrumented(self.cell)
        self.ctl.arm = self.arm
        self.ctl.on_attempt = self._on_attempt
        self.ctl.on_ask = self._on_ask
        self.ctl.on_skip = self._on_skip
        self.answers: dict[str, str] = {}
        if self.ctl.assist is not None:
            self.ctl.assist = _RecordingChannel(self.ctl.assist, self.answers)
        self.on_row = on_row  # called with (row, attempt, plan) after each attempt is recorded
        self.begin()

    def begin(self) -> None:
        """Start a tote: call after `feed.next_tote()` (the families come from what it spawned)."""
        self.families = {int(s.body_id): s.spec.family for s in self.feed.spawned}
        self.rows: list[dict[str, Any]] = []
        self.asks: dict[str, str] = {}  # request id -> item name
        self.ask_events: dict[str, tuple[str, float]] = {}  # request id -> (cause, robot s into the tote)
        # (item name, robot s into the tote, cause) of items the cell gave up on without asking
        self.skip_events: list[tuple[str, float, str]] = []
        self.answers.clear()
        self.arm.halted = []
        self.tried: set[str] = set()
        self.packed: set[int] = set()
        self.t_start = self.arm.robot_time
        self.t_wall = time.perf_counter()

    def _on_ask(self, request, centre) -> None:
        self.asks[request.request_id] = _name(self.arm._item_at(np.asarray(centre, dtype=np.float64)))
        cause = str(request.context.get("cause", "other"))
        self.ask_events[request.request_id] = (cause, self.arm.robot_time - self.t_start)

    def _on_skip(self, centre, cause: str) -> None:
        name = _name(self.arm._item_at(np.asarray(centre, dtype=np.float64)))
        self.skip_events.append((name, self.arm.robot_time - self.t_start, cause))

    def _on_attempt(self, att, plan) -> None:
        arm = self.arm
        item = arm.target
        name = _name(item)
        first = item is not None and name not in self.tried
        if item is not None:
            self.tried.add(name)
        ok = bool(att.placed is not None and att.placed.success)
        if ok and att.outcome.item_id in self.families:
            self.packed.add(int(att.outcome.item_id))
        reason = att.outcome.reason.value if not att.outcome.success else att.placed.reason.value
        kinds = list((arm.last_pick or {}).get("damage", []))
        if att.placed is not None and arm.last_place is not None:
            kinds += [k for k in arm.last_place["damage"] if k not in kinds]
        row = {
            "item": name,
            "family": self.families.get(item, "none") if item is not None else "none",
            "first": bool(first),
            "success": ok,
            "reason": reason,
            "decided_by": att.decided_by,
            "decider": decider(att.decided_by),
            "gripper": att.grasp.gripper,
            "damaged": bool(kinds),
            "damage": kinds,
            "drop_m": round(arm.drop_m, 3),
            "impact_n": round(arm.impact_n, 1),
            "t": round(att.robot_time - self.t_start, 3),
        }
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row, att, plan)

    def finish(self, rep) -> dict[str, Any]:
        """The tote's record: attempts, item fates, questions, halted motions and the report's counters."""
        in_box = set(self.cell.items_in_box())
        in_tote = set(self.cell.items_in_tote())
        asked: dict[str, list[str]] = {}
        causes: dict[str, list[tuple[float, str]]] = {}
        for rid, item in self.asks.items():
            asked.setdefault(item, []).append(self.answers.get(rid, "expired"))
            cause, t = self.ask_events.get(rid, ("other", 0.0))
            causes.setdefault(item, []).append((t, cause))
        skipped: dict[str, list[tuple[float, str]]] = {}  # given up without a question: a cause, no ask
        for name, t, cause in self.skip_events:
            skipped.setdefault(name, []).append((t, cause))
        item_log = []
        for body, family in sorted(self.families.items()):
            name = _name(body)
            rows = [r for r in self.rows if r["item"] == name]
            answers = asked.get(name, [])
            answered = [a for a in answers if a not in ("expired", "cancelled", "error")]
            person = any(r["decider"] == "person" for r in rows) or bool(answered)
            if body in self.packed or body in in_box:
                fate = "placed"
            elif body in self.cell.items and body not in in_tote:
                fate = "lost"  # on the floor, or somewhere neither tote nor box
            elif rows:
                fate = "given_up"
            elif "no_safe_pick" in answered:
                fate = "no_safe_pick"
            elif answers and not answered:
                fate = "expired"
            elif rep.status == "diverted":
                fate = "diverted"
            else:
                fate = "skipped"
            asked_because = [c for _, c in sorted(causes.get(name, []))]
            item_log.append(
                {
                    "item": name,
                    "family": family,
                    "fate": fate,
                    "attempts": len(rows),
                    "questions": len(answers),
                    "answers": answers,
                    "asked_because": asked_because,
                    "not_alone_because": (
                        None
                        if fate == "placed" and not person
                        else _not_alone_because(rows, sorted(causes.get(name, []) + skipped.get(name, [])))
                    ),
                    "person": person,
                    "damaged": any(r["damaged"] for r in rows)
                    or any(h["damage"] and h["item"] == name for h in self.arm.halted),
                }
            )
        return {
            "status": rep.status,
            "items": len(self.families),
            "items_cleared": sum(1 for i in item_log if i["fate"] == "placed"),
            "picks": rep.picks,
            "attempts": self.rows,
            "item_log": item_log,
            "halted": list(self.arm.halted),
            "questions": len(self.asks),
            "questions_answered": sum(
                1 for a in self.answers.values() if a not in ("expired", "cancelled", "error")
            ),
            "robot_seconds": rep.robot_seconds,
            "planning_seconds": sum(rep.plan_latency_ms) / 1000.0,
            "assists_requested": rep.assists_requested,
            "assists_answered": rep.assists_answered,
            "assists_expired": rep.assists_expired,
            "plan_latency_ms": [round(x, 2) for x in rep.plan_latency_ms],
        }
