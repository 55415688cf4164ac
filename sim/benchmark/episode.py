"""One benchmark episode: clear one tote through the real cell controller.

What it is
    A fresh simulated cell, one tote of `objects_per_tote` items from the catalog, the chosen
    planner, the real `CellController` (same decision loop as `pickcell cell run`), and either the
    simulated associate on the robot clock (`sim`) or nobody (`none`: requests expire at their
    deadline and the item is skipped).

What is randomised
    Everything comes from the episode's own seed (derived from the benchmark seed and the episode
    index): tote contents and drop poses, camera noise, planner sampling, associate timing and
    mistakes. The same seed gives the same record, whichever worker runs it.

What counts as success
    An attempt succeeds when its item is picked *and* placed in the box. First-attempt success is
    per item: the first attempt at each item in the tote. An item counts as cleared when it ends
    in the box. Damage: an item that falls more than `DAMAGE_DROP_M` (dropped in transit, or
    released from height), or that the arm hits with more than `DAMAGE_IMPACT_N`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from sim.benchmark.runner import EpisodeSpec

DAMAGE_DROP_M = 0.3  # a fall from higher than this counts as damage, metres
# Arm-on-item contact force that counts as a damaging hit, newtons (sustained over ~20 ms, see
# SimArm._note_impact). Ordinary picks of procedural items measured 35-70 N (median 43 N over 19
# picks), so the limit flags hits of about twice the hardest ordinary press.
DAMAGE_IMPACT_N = 150.0
SENSING_S_PER_CAPTURE = 0.1  # exposure + transfer of one RGB-D capture on a real cell, seconds


class _Instrumented:
    """Wraps the simulated arm to attribute each attempt to an item (ground truth) and measure drops."""

    def __init__(self, cell) -> None:
        self.cell = cell
        self.arm = cell.arm
        self.target: int | None = None
        self.drop_m = 0.0
        self.impact_n = 0.0

    def __getattr__(self, name: str):
        return getattr(self.arm, name)

    @property
    def robot_time(self) -> float:
        return self.arm.robot_time

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

    def _nearest_item(self, p: np.ndarray) -> int | None:
        import pybullet as pb

        best, best_d = None, 0.05  # further than 5 cm from every item: aimed at nothing
        for b in self.cell.items_in_tote():
            lo, hi = (np.array(x) for x in pb.getAABB(b, physicsClientId=self.cell.client_id))
            d = float(np.linalg.norm(np.maximum(0.0, np.maximum(lo - p, p - hi))))
            if d < best_d:
                best, best_d = b, d
        return best

    def _fall(self, body: int | None) -> float:
        """Height the item falls after being let go: its z now minus its z once settled."""
        import pybullet as pb

        if body is None or body not in self.cell.items:
            return 0.0
        z0 = pb.getBasePositionAndOrientation(body, physicsClientId=self.cell.client_id)[0][2]
        self.cell.settle(1.0)
        z1 = pb.getBasePositionAndOrientation(body, physicsClientId=self.cell.client_id)[0][2]
        return max(0.0, z0 - z1)

    def pick(self, grasp):
        self.target = self._aimed_item(grasp)
        out = self.arm.pick(grasp)
        if out.item_id is not None and out.item_id in self.cell.items:
            self.target = int(out.item_id)  # what the gripper really took
        self.impact_n = float(out.details.get("max_impact_n", 0.0))
        self.drop_m = self._fall(out.item_id) if out.reason.value == "dropped" else 0.0
        return out

    def place(self, placement):
        held = self.arm.held_item
        out = self.arm.place(placement)
        self.drop_m = max(self.drop_m, self._fall(held) if not out.success else 0.0)
        return out


def run_bench_episode(spec: EpisodeSpec) -> dict[str, Any]:
    """Run one episode and return its JSON-able record (see sim.benchmark.metrics)."""
    from arm.controller import ControllerConfig
    from grasping.draw import render_plan_png
    from sim.associate import GroundTruthJudge, SimAssistChannel, SimAssociateConfig
    from sim.stack import build_sim_stack

    t0 = time.perf_counter()
    cfg = ControllerConfig(
        cell_id="bench",
        wall_poll_s=0.0,  # the associate answers on the robot clock: no wall-clock waiting
        ledger_source="sim",
        max_attempts_per_tote=spec.max_attempts or 3 * spec.objects_per_tote,
    )
    stack = build_sim_stack(
        catalog=spec.catalog,
        objects_per_tote=spec.objects_per_tote,
        seed=spec.seed,
        planner=spec.planner,
        model_path=spec.model_path,
        controller_config=cfg,
        alpha=spec.alpha,
    )
    try:
        cell = stack.cell
        arm = _Instrumented(cell)
        ctl = stack.controller
        ctl.arm = arm
        clock = lambda: cell.arm.robot_time  # noqa: E731
        if spec.associate == "sim":
            judge = GroundTruthJudge(cell, stack.camera, SimAssociateConfig(seed=spec.seed))
            channel = SimAssistChannel(judge, clock)
        elif spec.associate == "none":
            channel = SimAssistChannel(None, clock, answer=False)
        else:
            raise ValueError(f"associate must be 'sim' or 'none', got {spec.associate!r}")
        ctl.assist = channel

        captures = {"n": 0}
        cam_capture = stack.camera.capture

        def counting_capture():
            captures["n"] += 1
            return cam_capture()

        stack.camera.capture = counting_capture  # type: ignore[method-assign]
        tote = stack.feed.next_tote()
        families = {s.body_id: s.spec.family for s in stack.feed.spawned}
        n_items = len(families)
        attempts: list[dict[str, Any]] = []
        tried: set[int] = set()
        packed: set[int] = set()  # items placed in a box (a full box is shipped and leaves the scene)
        failed_frames: list[str] = []
        t_start = cell.arm.robot_time

        def on_attempt(att, plan) -> None:
            item = arm.target
            first = item is not None and item not in tried
            if item is not None:
                tried.add(item)
            ok = bool(att.placed is not None and att.placed.success)
            if ok and att.outcome.item_id in families:
                packed.add(att.outcome.item_id)
            reason = att.outcome.reason.value if not att.outcome.success else (att.placed.reason.value)
            attempts.append(
                {
                    "item": f"b{item}" if item is not None else "none",
                    "family": families.get(item, "none"),
                    "first": bool(first),
                    "success": ok,
                    "reason": reason,
                    "decided_by": att.decided_by,
                    "gripper": att.grasp.gripper,
                    "damaged": arm.drop_m > DAMAGE_DROP_M or arm.impact_n > DAMAGE_IMPACT_N,
                    "drop_m": round(arm.drop_m, 3),
                    "impact_n": round(arm.impact_n, 1),
                    "t": round(att.robot_time - t_start, 3),
                }
            )
            if not ok and spec.record_dir and len(failed_frames) < 3:
                out = Path(spec.record_dir) / f"failed-ep{spec.index:03d}-{len(failed_frames)}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                last = getattr(stack.camera, "last_frame", None)
                if last is not None:
                    out.write_bytes(render_plan_png(last, plan))
                    failed_frames.append(str(out))

        ctl.on_attempt = on_attempt
        rep = ctl.run_tote(tote)
        cleared = len(packed | (set(cell.items_in_box()) & set(families)))
        return {
            "episode": spec.index,
            "seed": spec.seed,
            "catalog": spec.catalog,
            "planner": spec.planner,
            "model_version": stack.model_version,
            "status": rep.status,
            "items": n_items,
            "items_cleared": cleared,
            "picks": rep.picks,
            "attempts": attempts,
            "robot_seconds": rep.robot_seconds,
            "sensing_seconds": captures["n"] * SENSING_S_PER_CAPTURE,
            "planning_seconds": sum(rep.plan_latency_ms) / 1000.0,
            "human_seconds": channel.human_seconds,
            "assists_requested": rep.assists_requested,
            "assists_answered": rep.assists_answered,
            "assists_expired": rep.assists_expired,
            "plan_latency_ms": [round(x, 2) for x in rep.plan_latency_ms],
            "failed_frames": failed_frames,
            "wall_seconds": time.perf_counter() - t0,
        }
    finally:
        stack.close()
