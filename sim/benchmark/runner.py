"""Run benchmark episodes in parallel, reproducibly.

Each episode gets its own seed, derived from the benchmark seed and the episode index with
`np.random.SeedSequence` — never from the worker or the order episodes finish in — so `--workers 1`
and `--workers 4` produce identical episode records and identical metrics (only wall time differs).

Backends:
- `local` (default): a `multiprocessing` pool of W processes (`spawn` context, so each worker starts
  its own PyBullet and torch cleanly); W = 1 runs in-process.
- `ray`: the same episode function as a Ray remote task (`ray.init()` locally, or an existing cluster
  via RAY_ADDRESS). Ray is an optional dependency (`pip install ray`).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm import tqdm

# Benchmark seeds (`pickcell bench --seed`). Tuning seeds are the ones to look at while deciding
# whether to keep or revert a change; reporting seeds are never used for that, only for the numbers
# that are published (README, docs/benchmarks.md), so those numbers are not fitted to their totes.
TUNING_SEEDS = range(0, 100)
REPORTING_SEEDS = range(1000, 1100)
DEFAULT_TUNING_SEED = TUNING_SEEDS[0]
DEFAULT_REPORTING_SEED = REPORTING_SEEDS[0]


def seed_range(seed: int) -> str:
    """'tuning', 'reporting' or 'other' (a seed in neither documented range)."""
    if seed in TUNING_SEEDS:
        return "tuning"
    if seed in REPORTING_SEEDS:
        return "reporting"
    return "other"


@dataclass(frozen=True)
class EpisodeSpec:
    """Everything an episode needs, picklable (it crosses process boundaries)."""

    index: int  # episode number within the benchmark
    seed: int  # this episode's own seed (derived, see episode_seeds)
    catalog: str  # train | test | procedural | procedural-train | a folder
    objects_per_tote: int  # items dropped into the tote
    planner: str  # learned | analytic | MODULE:CLASS
    associate: str  # sim | none
    model_path: str | None = None  # model file for the learned planner (None = the shipped default)
    record_dir: str | None = None  # where annotated frames of failed picks go (None = don't save)
    max_attempts: int = 0  # 0 = the controller's default (2 x objects_per_tote is typical)
    alpha: float | None = None  # the model's thresholds certified for this alpha (None: the file's)


def episode_seeds(seed: int, n: int) -> list[int]:
    """n independent 32-bit seeds from one benchmark seed; episode i always gets the same one."""
    children = np.random.SeedSequence(seed).spawn(n)
    return [int(c.generate_state(1)[0]) for c in children]


def make_specs(n: int, seed: int, **common: Any) -> list[EpisodeSpec]:
    base = EpisodeSpec(index=0, seed=0, **common)
    return [replace(base, index=i, seed=s) for i, s in enumerate(episode_seeds(seed, n))]


def run_episodes(
    specs: list[EpisodeSpec],
    episode_fn: Callable[[EpisodeSpec], dict[str, Any]],
    *,
    workers: int = 1,
    backend: str = "local",
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Run every spec; returns (episode records sorted by index, wall seconds)."""
    t0 = time.perf_counter()
    bar = tqdm(total=len(specs), desc="episodes", unit="ep", disable=not progress)
    results: list[dict[str, Any]] = []
    for rec in _iterate(specs, episode_fn, workers, backend):
        results.append(rec)
        bar.update(1)
        bar.set_postfix(picks=sum(r.get("picks", 0) for r in results))
    bar.close()
    results.sort(key=lambda r: r["episode"])
    return results, time.perf_counter() - t0


def _iterate(
    specs: list[EpisodeSpec], fn: Callable[[EpisodeSpec], dict[str, Any]], workers: int, backend: str
) -> Iterable[dict[str, Any]]:
    if backend == "ray":
        yield from _iterate_ray(specs, fn)
        return
    if backend != "local":
        raise ValueError(f"unknown backend {backend!r}; expected 'local' or 'ray'")
    if workers <= 1:
        for s in specs:
            yield fn(s)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=workers, maxtasksperchild=None) as pool:
        yield from pool.imap_unordered(fn, specs, chunksize=1)


def _iterate_ray(specs: list[EpisodeSpec], fn: Callable[[EpisodeSpec], dict[str, Any]]):
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--backend ray needs Ray: pip install 'ray[default]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(fn)
        pending = [remote.remote(s) for s in specs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started_here:
            ray.shutdown()
