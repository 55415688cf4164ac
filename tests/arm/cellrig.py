"""Helpers for the controller tests: a real simulated cell, a real CURVE broker, scripted people."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from arm.controller import ControllerConfig
from grasping.types import Candidate, Frame, Grasp, Plan
from hitl.associate import AssociateClient
from hitl.broker import Broker, BrokerConfig
from hitl.client import AssistClient, AssistError
from hitl.keys import ClientKeys, allow, load_public, new_keypair
from hitl.messages import AssistRequest

CARTON = (0.05, 0.04, 0.03)  # half extents, m: a 10 x 8 x 6 cm carton


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = predicate()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def stack_factory():
    """Builds simulated cells with an emptied tote; closes them after the test."""
    from sim.stack import build_sim_stack

    made = []

    def make(planner: str = "analytic", **cfg) -> object:
        base = dict(cell_id="cell-1", max_attempts_per_tote=6, wall_poll_s=0.0, idle_step_s=0.25)
        base.update(cfg)
        st = build_sim_stack(
            catalog="procedural",
            objects_per_tote=1,
            seed=0,
            planner=planner,
            controller_config=ControllerConfig(**base),
        )
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


def count_captures(stack) -> dict[str, int]:
    """Count the stack camera's captures from now on: the returned dict's "n"."""
    captures = {"n": 0}
    capture = stack.camera.capture

    def counting():
        captures["n"] += 1
        return capture()

    stack.camera.capture = counting
    return captures


def add_carton(stack, dx: float = 0.0, dy: float = 0.0) -> int:
    """A carton lying flat in the tote, offset (dx, dy) m from the tote centre; returns its body id."""
    b = stack.cell.tote_bounds
    c = (b.lo + b.hi) / 2
    body = stack.cell.add_primitive(
        "box", CARTON, (c[0] + dx, c[1] + dy, b.lo[2] + CARTON[2] + 0.002), mass=0.3, name="carton"
    )
    stack.cell.settle(0.3)
    return body


def project(stack, point: np.ndarray) -> tuple[int, int]:
    cam = stack.cell.camera
    T = np.linalg.inv(cam.T_base_camera)
    pc = T[:3, :3] @ point + T[:3, 3]
    uvw = cam.K @ pc
    return int(round(uvw[0] / uvw[2])), int(round(uvw[1] / uvw[2]))


class Counts:
    """The controller's metrics sink, reduced to the counters (arm.metrics has the real one)."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def count(self, name: str) -> None:
        self.n[name] = self.n.get(name, 0) + 1

    def observe_plan(self, plan) -> None:
        pass


class ScriptedPlanner:
    """Wraps the real planner and scripts only its confidence, so each decision branch can be driven.

    `unsure(centre) -> bool` says which items (by cluster centre) the planner should be unsure about;
    `prepend(frame) -> list[Grasp]` adds fabricated candidates at the front (e.g. a known-bad grasp).
    """

    def __init__(self, inner, unsure=lambda c: False, prepend=None, threshold: float = 0.6) -> None:
        self.inner = inner
        self.unsure = unsure
        self.prepend = prepend
        self.threshold = threshold
        self.plans = 0

    def __call__(self, frame: Frame) -> Plan:
        plan = self.inner(frame)
        self.plans += 1
        cands = []
        for c in plan.candidates:
            centre = plan.clusters[c.cluster].centroid if plan.clusters else c.grasp.position
            p = 0.3 if self.unsure(np.asarray(centre)) else 0.95
            cands.append(replace(c, p_success=p, threshold=None))
        cands.sort(key=lambda c: -c.score)
        extra = [
            Candidate(g, analytic_score=1.0, p_success=0.99)
            for g in (self.prepend(frame) if self.prepend else [])
        ]
        return replace(
            plan,
            candidates=tuple(extra + cands),
            threshold=self.threshold,
            decision="pick" if cands else plan.decision,
            patches=None,
            features=None,
        )


@dataclass
class AssistRig:
    endpoint: str
    keys: Path
    server_key: bytes
    broker: Broker

    def cell_client(self, cell_id: str = "cell-1") -> AssistClient:
        c = AssistClient(
            self.endpoint, cell_id, ClientKeys.from_file(self.keys / f"{cell_id}.key_secret"), self.server_key
        )
        c.start()
        return c

    def associate(self, name: str = "alice") -> AssociateClient:
        return AssociateClient(
            self.endpoint,
            ClientKeys.from_file(self.keys / f"{name}.key_secret"),
            server_public_key=self.server_key,
        )


@pytest.fixture
def assist_rig(tmp_path: Path):
    keys = tmp_path / "keys"
    new_keypair("broker", keys)
    for name, role in (("cell-1", "cell"), ("alice", "associate")):
        new_keypair(name, keys, role=role)
        allow(keys / f"{name}.key", keys)  # into keys/allowed/ROLE/
    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:0", data_dir=tmp_path / "broker", keys_dir=keys))
    endpoint = broker.start()
    try:
        yield AssistRig(endpoint, keys, load_public(keys / "broker.key"), broker)
    finally:
        broker.stop()


class ScriptedAssociate:
    """A person at a terminal, scripted: `decide(request) -> (kind, index, pixel)` after `delay_s`."""

    def __init__(self, client: AssociateClient, decide, delay_s: float = 0.0) -> None:
        self.client = client
        self.decide = decide
        self.delay_s = delay_s
        self.seen: list[AssistRequest] = []
        self.refused: list[tuple[str, str]] = []  # (request id, the broker's refusal) of late answers
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            req = self.client.next_request(timeout_s=0.2)
            if req is None:
                continue
            self.seen.append(req)
            kind, index, pixel = self.decide(req)
            if self._stop.wait(self.delay_s):
                return
            try:
                self.client.answer(req.request_id, kind, candidate_index=index, pixel=pixel)
            except AssistError as exc:
                # The request ended before the answer reached the broker, which refuses it (409), as
                # it refuses a person's late click; the person goes on to the next request. E.g. a
                # cell that reconnects submits again a question it has given up, then cancels it:
                # the broker can hand it out between the two. (Uncaught, this ended the thread and
                # left the cell's next question unanswered: a flaky daemon test.)
                self.refused.append((req.request_id, str(exc)))

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)
        self.client.close()


def grasp_above(stack, body: int, height: float) -> Grasp:
    """A top-down suction grasp `height` m above the item's top centre (touches nothing)."""
    import pybullet as pb

    from grasping.types import grasp_frame, matrix_to_quat

    lo, hi = (np.array(x) for x in pb.getAABB(body, physicsClientId=stack.cell.client_id))
    top = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2] + height])
    return Grasp("suction", top, matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0]))))
