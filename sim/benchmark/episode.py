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
    in the box. Damage: an item that falls more than `DAMAGE_DROP_M` after the arm lets go of it
    (dropped in transit, or released from height), that the arm hits with more than
    `DAMAGE_IMPACT_N`, that hits something while held, or that the arm lets go of because of a
    protective stop. Who decided each attempt and what became of each item: `sim.benchmark.record`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sim.benchmark.cycle import SENSING_S_PER_CAPTURE, cycle_record
from sim.benchmark.record import DAMAGE_DROP_M, DAMAGE_IMPACT_N, ToteRecorder, _Instrumented
from sim.benchmark.runner import EpisodeSpec

__all__ = [
    "DAMAGE_DROP_M",
    "DAMAGE_IMPACT_N",
    "SENSING_S_PER_CAPTURE",
    "_Instrumented",
    "build_bench_stack",
    "run_bench_episode",
]


def build_bench_stack(spec: EpisodeSpec):
    """The simulated cell and controller of one bench episode (no assist channel yet): what every
    bench-like experiment must run so that the same seed gives the same totes and decisions."""
    from arm.controller import ControllerConfig
    from sim.stack import build_sim_stack

    cfg = ControllerConfig(
        cell_id="bench",
        wall_poll_s=0.0,  # the associate answers on the robot clock: no wall-clock waiting
        ledger_source="sim",
        max_attempts_per_tote=spec.max_attempts or 3 * spec.objects_per_tote,
    )
    return build_sim_stack(
        catalog=spec.catalog,
        objects_per_tote=spec.objects_per_tote,
        seed=spec.seed,
        planner=spec.planner,
        model_path=spec.model_path,
        controller_config=cfg,
        alpha=spec.alpha,
    )


def run_bench_episode(spec: EpisodeSpec) -> dict[str, Any]:
    """Run one episode and return its JSON-able record (see sim.benchmark.metrics)."""
    from grasping.draw import render_plan_png
    from sim.associate import GroundTruthJudge, SimAssistChannel, SimAssociateConfig

    t0 = time.perf_counter()
    stack = build_bench_stack(spec)
    try:
        cell = stack.cell
        clock = lambda: cell.arm.robot_time  # noqa: E731
        if spec.associate == "sim":
            judge = GroundTruthJudge(cell, stack.camera, SimAssociateConfig(seed=spec.seed))
            channel = SimAssistChannel(judge, clock)
        elif spec.associate == "none":
            channel = SimAssistChannel(None, clock, answer=False)
        else:
            raise ValueError(f"associate must be 'sim' or 'none', got {spec.associate!r}")
        stack.controller.assist = channel

        captures = {"n": 0}
        cam_capture = stack.camera.capture

        def counting_capture():
            captures["n"] += 1
            return cam_capture()

        stack.camera.capture = counting_capture  # type: ignore[method-assign]
        failed_frames: list[str] = []

        def save_failed_frame(row, att, plan) -> None:
            if not row["success"] and spec.record_dir and len(failed_frames) < 3:
                out = Path(spec.record_dir) / f"failed-ep{spec.index:03d}-{len(failed_frames)}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                last = getattr(stack.camera, "last_frame", None)
                if last is not None:
                    out.write_bytes(render_plan_png(last, plan))
                    failed_frames.append(str(out))

        tote = stack.feed.next_tote()
        recorder = ToteRecorder(stack, on_row=save_failed_frame)
        rep = stack.controller.run_tote(tote)
        rec = recorder.finish(rep)
        return {
            "episode": spec.index,
            "seed": spec.seed,
            "catalog": spec.catalog,
            "planner": spec.planner,
            "associate": spec.associate,
            "model_version": stack.model_version,
            **rec,
            "sensing_seconds": captures["n"] * SENSING_S_PER_CAPTURE,
            "human_seconds": channel.human_seconds,
            **cycle_record(cell.arm, rep, cell),  # per-phase robot time, waits, exposed planning (cycle.py)
            "failed_frames": failed_frames,
            "wall_seconds": time.perf_counter() - t0,
        }
    finally:
        stack.close()
