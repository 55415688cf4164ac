"""Assemble a complete simulated cell: PyBullet cell, tote feed, planner, packer, controller.

`pickcell cell run`, `pickcell demo`, `pickcell bench` and the tests all build their cells here, so
they exercise the same wiring. Planners are chosen by name:

- `learned`: the geometric planner scored by a model file (the shipped default unless given);
- `analytic`: the geometric planner with analytic scores only;
- `MODULE:CLASS`: an external planner. CLASS is constructed as `CLASS(tote=Bounds, seed=int)` and
  called as `planner(frame) -> Plan` (see docs/benchmark.md, "Bring your own planner").
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from arm.controller import CellController, ControllerConfig
from arm.packing import Packer
from grasping.types import Bounds, Frame, Plan

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "grasping" / "models" / "default.safetensors"


def build_planner(
    kind: str,
    tote: Bounds,
    *,
    model_path: str | Path | None = None,
    seed: int = 0,
    fallback: bool = False,
    alpha: float | None = None,
) -> tuple[Callable[[Frame], Plan], str]:
    """(planner function, version string) for a planner name (learned | analytic | MODULE:CLASS).

    A missing or corrupt model file raises `ModelFileError` naming it; `fallback=True` (opt-in) logs
    a warning and plans with analytic scores instead. `alpha`: use the model's thresholds certified
    for that bound on P(fail | executed without asking) (None: the file's own).
    """
    from grasping.planner import PlannerConfig, plan

    if kind == "analytic":
        cfg = PlannerConfig(tote=tote, seed=seed)
        return (lambda frame: plan(frame, cfg)), "analytic"
    if kind == "learned":
        from grasping.learned_scorer import load_scorer

        path = Path(model_path) if model_path else DEFAULT_MODEL
        scorer = load_scorer(
            path if path.exists() or not fallback else None, fallback_to_analytic=fallback, alpha=alpha
        )
        cfg = PlannerConfig(tote=tote, seed=seed, scorer=scorer)
        return (lambda frame: plan(frame, cfg)), (scorer.version if scorer is not None else "analytic")
    if ":" in kind:
        mod_name, cls_name = kind.split(":", 1)
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"planner {kind!r}: cannot import {cls_name} from {mod_name}: {exc}") from exc
        planner = cls(tote=tote, seed=seed)
        return planner, str(getattr(planner, "version", kind))
    raise ValueError(f"unknown planner {kind!r}; expected learned, analytic or MODULE:CLASS")


def pixel_candidate_builder(tote: Bounds, seed: int = 0) -> Callable[..., object]:
    """(frame, u, v, gripper) -> grasping.pixel_candidate.PixelCandidate with the planner's geometry."""
    from grasping.pixel_candidate import PixelCandidateConfig, candidate_at_pixel
    from grasping.planner import PlannerConfig

    cfg = PlannerConfig(tote=tote, seed=seed)
    pcfg = PixelCandidateConfig(seed=seed)
    return lambda frame, u, v, gripper: candidate_at_pixel(frame, u, v, gripper, cfg, pcfg)


def model_planner_factory(tote: Bounds, seed: int = 0, alpha: float | None = None):
    """For hot-swap: model path -> (planner, version); raises on a bad file (never falls back)."""

    def factory(path: Path):
        return build_planner("learned", tote, model_path=path, seed=seed, fallback=False, alpha=alpha)

    return factory


@dataclass
class SimStack:
    cell: object  # sim.scene.SimCell
    camera: object  # sim.associate.RecordingCamera around the cell's camera
    feed: object  # sim.feed.SimToteFeed
    packer: Packer
    controller: CellController
    model_version: str

    def close(self) -> None:
        self.cell.close()


def timed(planner: Callable[[Frame], Plan]) -> Callable[[Frame], Plan]:
    """Fill Plan.latency_ms for planners that don't (external ones)."""

    def run(frame: Frame) -> Plan:
        t0 = time.perf_counter()
        out = planner(frame)
        if out.latency_ms <= 0:
            out = replace(out, latency_ms=(time.perf_counter() - t0) * 1000.0)
        return out

    return run


def build_sim_stack(
    *,
    catalog: str = "procedural",
    objects_per_tote: int = 8,
    seed: int = 0,
    planner: str = "learned",
    model_path: str | Path | None = None,
    controller_config: ControllerConfig | None = None,
    assist=None,
    ledger=None,
    metrics=None,
    first_tote: int = 0,
    gui: bool = False,
    alpha: float | None = None,
) -> SimStack:
    from grasping.draw import render_plan_png
    from sim.associate import RecordingCamera
    from sim.catalogs import load_catalog
    from sim.feed import SimToteFeed
    from sim.scene import SimCell

    cat = load_catalog(catalog)
    cell = SimCell(seed=seed, gui=gui)
    camera = RecordingCamera(cell.camera)
    cfg = controller_config or ControllerConfig()
    feed = SimToteFeed(cell, cat, objects_per_tote, seed=seed, cell_id=cfg.cell_id, first_tote=first_tote)
    box = cell.box_bounds
    T_base_box = np.eye(4)
    T_base_box[:3, 3] = [(box.lo[0] + box.hi[0]) / 2, (box.lo[1] + box.hi[1]) / 2, box.lo[2]]
    packer = Packer(tuple(float(x) for x in (box.hi - box.lo)), resolution_m=0.01, T_base_box=T_base_box)
    plan_fn, version = build_planner(planner, cell.tote_bounds, model_path=model_path, seed=seed, alpha=alpha)
    if metrics is not None:
        metrics.set_model(version)
    controller = CellController(
        cell.arm,
        camera,
        timed(plan_fn),
        feed=feed,
        assist=assist,
        ledger=ledger,
        packer=packer,
        render_png=render_plan_png,
        metrics=metrics,
        config=cfg,
        pixel_candidate=pixel_candidate_builder(cell.tote_bounds, seed=seed),
    )
    return SimStack(cell, camera, feed, packer, controller, version)
