"""A naive external planner: the reference for "bring your own planner" (docs/benchmark.md).

What it is
    The simplest sensible warehouse heuristic: segment the items (the same open3d point-cloud code
    the real planner uses), then put the suction cup straight down on the middle of each item's top
    surface, highest item first. No seal analysis, no parallel jaw, no learning. It is written *only* against
    the planner interface (`CLASS(tote=Bounds, seed=int)`, `planner(frame) -> Plan`) so that it shows
    how any other planner — a Contact-GraspNet port, a vendor's SDK — runs in `pickcell bench` on the
    same scenes: `pickcell bench --planner sim.benchmark.baselines:TopCentreSuction`.

What is randomised
    Nothing: the same frame gives the same plan.

What counts as success
    As for every planner in the benchmark: first-attempt success, clearance, picks per hour.
    It always says "pick" (it has no notion of confidence), so it never asks a person.
"""

from __future__ import annotations

import time

import numpy as np

from grasping.pointcloud import segment_scene
from grasping.types import Bounds, Candidate, Frame, Grasp, Plan, grasp_frame, matrix_to_quat

_DOWN = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0])))


class TopCentreSuction:
    version = "baseline-top-centre-suction"

    def __init__(self, tote: Bounds, seed: int = 0) -> None:
        self.tote = tote

    def __call__(self, frame: Frame) -> Plan:
        t0 = time.perf_counter()
        cloud = segment_scene(frame, self.tote)
        cands = []
        for k in range(len(cloud.clusters)):
            mask = cloud.labels == k
            pts = cloud.points_base[mask]
            ij = np.argwhere(mask)
            ok = np.isfinite(pts).all(axis=1)
            if not ok.any():
                continue
            # The middle of the item's top surface: the point nearest the centre of everything within
            # 1 cm of its highest point (the highest point itself is usually on an edge).
            z = np.where(ok, pts[:, 2], -np.inf)
            near_top = z >= z.max() - 0.01
            centre = pts[near_top].mean(axis=0)
            d = np.where(near_top, np.linalg.norm(pts[:, :2] - centre[:2], axis=1), np.inf)
            top = int(np.argmin(d))
            i, j = ij[top]
            pixel = (int(cloud.u0 + cloud.stride * j), int(cloud.v0 + cloud.stride * i))
            height = float(pts[top, 2] - cloud.floor_z)
            cands.append(
                Candidate(
                    Grasp("suction", pts[top], _DOWN),
                    analytic_score=float(np.clip(height / 0.2, 0.0, 1.0)),
                    pixel=pixel,
                    cluster=k,
                )
            )
        cands.sort(key=lambda c: -c.grasp.position[2])
        decision = "pick" if cands else "empty"
        return Plan(
            candidates=tuple(cands),
            decision=decision,
            reasons=("middle of each item's top, suction straight down",) if cands else ("tote empty",),
            threshold=0.0,
            model_version=self.version,
            latency_ms=(time.perf_counter() - t0) * 1000.0,
            frame_id=frame.frame_id,
            clusters=cloud.clusters,
        )
