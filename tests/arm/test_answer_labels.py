"""Answers become training rows: a real simulated cell, the real planner and a real ledger.

The question is asked through an in-process assist channel (an `AssistChannel` like the simulated
associate's) that answers at once, so each test controls exactly what the person said and what
happened to the tote in between; the broker path is covered by test_controller.py.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import replace

import numpy as np
import pybullet as pb
from cellrig import Counts, add_carton, project

from grasping.watchdog import ITEM_FEATURES
from hitl.ledger import Ledger
from hitl.messages import AssistAnswer


class Unsure:
    """The real planner, made unsure about everything (candidate order, patches, features kept)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, frame):
        plan = self.inner(frame)
        cands = tuple(replace(c, p_success=0.3, threshold=None) for c in plan.candidates)
        return replace(plan, candidates=cands, threshold=0.6, decision="ask" if cands else plan.decision)


class Person:
    """Answers every request at once with `decide(request)`; `before(request)` may change the scene."""

    def __init__(self, decide, before=None) -> None:
        self.decide = decide
        self.before = before
        self.seen = []

    def ask(self, request) -> Future:
        self.seen.append(request)
        if self.before is not None:
            self.before(request)
        fut: Future = Future()
        fut.set_result(self.decide(request))
        return fut

    def cancel(self, request_id: str) -> None:
        pass


def _top_centre(st, body: int) -> np.ndarray:
    lo, hi = (np.array(x) for x in pb.getAABB(body, physicsClientId=st.cell.client_id))
    return np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2]])


def add_narrow_box(st) -> int:
    """A 10 x 5 x 6 cm box in the tote centre: narrow enough for the 8 cm jaw."""
    b = st.cell.tote_bounds
    c = (b.lo + b.hi) / 2
    body = st.cell.add_primitive(
        "box", (0.05, 0.025, 0.03), (c[0], c[1], b.lo[2] + 0.032), mass=0.2, name="box"
    )
    st.cell.settle(0.3)
    return body


def test_a_clicked_pixel_is_a_training_row_with_its_patch_item_and_gripper(stack_factory, tmp_path):
    st = stack_factory()
    body = add_narrow_box(st)
    u, v = project(st, _top_centre(st, body))
    ctl = st.controller
    ctl.planner = Unsure(ctl.planner)
    ledger = Ledger(tmp_path / "cell.db", "cell-1")
    ctl.ledger = ledger
    # The person clicks the box's top and names the parallel jaw.
    ctl.assist = Person(
        lambda r: AssistAnswer(
            r.request_id, "answered", "point", pixel=(u, v), associate_id="eve", gripper="parallel_jaw"
        )
    )
    rep = ctl.run_tote("t0")
    first = rep.attempts[0]
    assert first.decided_by == "associate:eve" and first.grasp.gripper == "parallel_jaw"
    (a,) = [x for x in ledger.attempts() if x.request_id == ctl.assist.seen[0].request_id]
    assert a.patch is not None and a.patch.shape == (2, 32, 32) and a.features is not None
    assert a.item == 0 and a.item_descriptor is not None and a.item_descriptor.shape == (len(ITEM_FEATURES),)
    assert ctl.assist.seen[0].context["item"] == 0
    m = ledger.export(tmp_path / "out")
    with np.load(tmp_path / "out" / m.shards[0]["file"], allow_pickle=False) as z:
        i = list(z["row_id"]).index(a.attempt_id)
        np.testing.assert_array_equal(z["patches"][i], a.patch)
        assert z["label"][i] == float(first.outcome.success) and z["label_kind"][i] == "outcome"
        assert z["decided_by"][i] == "associate:eve" and z["tote_id"][i] == "t0"
        # The shown candidates on the box that the person passed over are weak negatives.
        passed = z["label_kind"] == "passed_over"
        assert passed.any() and np.allclose(z["weight"][passed], 0.3) and (z["item"][passed] == 0).all()
    ledger.close()


def test_a_click_on_a_surface_that_moved_is_not_executed_and_the_cell_asks_again(stack_factory, tmp_path):
    st = stack_factory()
    body = add_carton(st)
    u, v = project(st, _top_centre(st, body))
    ctl = st.controller
    ctl.planner = Unsure(ctl.planner)
    ctl.metrics = Counts()
    ledger = Ledger(tmp_path / "cell.db", "cell-1")
    ctl.ledger = ledger

    def push_away(request) -> None:
        # While the person looks at the first picture, the carton is knocked 8 cm aside.
        if len(ctl.assist.seen) == 1:
            pos, orn = pb.getBasePositionAndOrientation(body, physicsClientId=st.cell.client_id)
            pb.resetBasePositionAndOrientation(
                body, (pos[0] + 0.08, pos[1], pos[2]), orn, physicsClientId=st.cell.client_id
            )
            st.cell.settle(0.3)

    def decide(request) -> AssistAnswer:
        # First question: the spot where the carton was. Second: where it is now.
        px = (u, v) if len(ctl.assist.seen) == 1 else project(st, _top_centre(st, body))
        return AssistAnswer(request.request_id, "answered", "point", pixel=px, associate_id="eve")

    ctl.assist = Person(decide, push_away)
    rep = ctl.run_tote("t0")
    assert ctl.metrics.n.get("answers_stale") == 1
    first, second = ctl.assist.seen[0].request_id, ctl.assist.seen[1].request_id
    rows = ledger.attempts()
    assert not [a for a in rows if a.request_id == first]  # the stale click was never executed
    done = [a for a in rows if a.request_id == second]
    assert len(done) == 1 and done[0].outcome.success and done[0].patch is not None
    assert rep.attempts[0].decided_by == "associate:eve"
    ledger.close()
