"""Self-supervised data collection: execute sampled candidates in the simulated cell, label them by outcome.

What it is
    Tote after tote of training-catalog items (`train` = random_urdfs 000-799 and `procedural-train`;
    the test catalogs `test` and `procedural` are refused), each in a fresh `SimCell`:
    capture -> `grasping.planner.plan` (analytic scores, with the patches and features the learned
    scorer reads) -> choose one candidate by an exploration policy -> `SimArm.pick` -> place it in the
    outbound box (the box packer's slot, as the controller does) -> record the attempt in a `Ledger`
    with its patch, features, gripper, outcome, `source="sim"` and the item's family (simulation
    ground truth). Items that fail stay in the tote and can be tried again; a tote ends when it is
    empty, when the planner sees nothing, or after `max_attempts_per_tote`.

What is randomised
    Everything from (seed, tote number): the tote's catalog (round robin over `catalogs`), its items
    and their drop poses, the camera noise, the planner's candidate sampling and the exploration
    choices. Tote n is the same whatever ran before it, which makes collection restartable: a worker
    reopens its ledger, skips the totes it finished and redoes the last one, whose attempts have
    deterministic ids (`record_attempt` is idempotent), so nothing is counted twice.

What counts as success (the label)
    1 when the pick held the item and it was carried to the box without being dropped (a place that
    fails for the box's sake, e.g. a collision with the stack, still counts: the grasp held). 0 for
    no contact, seal failure, slip, a collision on the way in, or a drop during lift or transit.
    Attempts the arm never executed (IK failure, unreachable, invalid) are recorded too, and
    `Ledger.export` leaves them unlabeled.

Exploration policy (why: a model trained only on the analytic top choice never sees what the
analytic score gets wrong at the bottom of the ranking, nor the other gripper): with probability
`p_top` the analytic best candidate; with `p_top_gripper` the best candidate of a uniformly chosen
gripper; otherwise a uniformly chosen gripper, then a uniformly chosen non-empty analytic-score bin,
then a uniform candidate in it.

On-policy rounds (`CollectConfig.model` plus `p_model_top`): with probability `p_model_top` the
candidate a learned model ranks best (highest calibrated p), avoiding spots and items that already
failed. Why: the benchmark executes exactly the learned model's top choices, and the grasps it is
wrongly sure of (a hand that clips a neighbour, a jaw on a tapered item) are the negatives a model
trained on analytic-ranked data rarely sees; labelling them is how the next model learns them
(the same loop as Dex-Net's and QT-Opt's on-policy rounds). The model only chooses; the rows store
the same patch and features as any other, and `details.mode` says "model_top".

Parallelism: `collect_parallel` runs W worker processes, worker k taking the totes n = k, k + W, ...
into its own ledger file `ledger-wk.db` (SQLite files are not shared between writers); `export_merged`
exports each and merges the shards into one dataset directory with a manifest.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from grasping.types import GRIPPER_KINDS, Grasp, Outcome, Placement, Plan, Reason, matrix_to_quat
from sim.config_sim_arm import SimArmConfig

log = logging.getLogger(__name__)

TRAINING_CATALOGS = ("train", "procedural-train")
# Held-out catalogs: what the benchmark measures on. Collection refuses them outright.
TEST_CATALOGS = ("test", "procedural")


class CollectError(ValueError):
    """A collection request that must not run (e.g. a test catalog); nothing was written."""


def check_training_catalogs(catalogs: Sequence[str]) -> tuple[str, ...]:
    """The catalogs, if every one is a training catalog; CollectError otherwise (test data stays unseen)."""
    if isinstance(catalogs, str):
        catalogs = (catalogs,)
    cats = tuple(str(c) for c in catalogs)
    if not cats:
        raise CollectError("no catalog given; expected some of " + ", ".join(TRAINING_CATALOGS))
    for c in cats:
        if c in TEST_CATALOGS:
            raise CollectError(
                f"catalog {c!r} is a held-out test catalog: training data must never come from it "
                f"(use {' or '.join(TRAINING_CATALOGS)})"
            )
        if c not in TRAINING_CATALOGS:
            raise CollectError(
                f"catalog {c!r} is not a training catalog; expected one of {TRAINING_CATALOGS}"
            )
    return cats


@dataclass(frozen=True)
class ExplorationConfig:
    """How the candidate to execute is chosen from a plan (see the module docstring)."""

    p_top: float = 0.35  # probability, execute the analytic best candidate
    p_top_gripper: float = 0.2  # probability, execute the best candidate of a random gripper
    p_model_top: float = 0.0  # probability, execute the learned model's best (needs CollectConfig.model)
    score_bins: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0 + 1e-9)  # analytic-score bin edges
    avoid_radius_m: float = 0.015  # metres: "top" choices skip spots that already failed in this tote
    item_radius_m: float = 0.04  # metres: candidates whose item centre is this close belong to that item
    max_failures_per_item: int = 3  # count: after this many failures "top" choices leave the item alone

    def __post_init__(self) -> None:
        probs = (self.p_model_top, self.p_top, self.p_top_gripper)
        if min(probs) < 0 or sum(probs) > 1:
            raise ValueError(
                f"p_model_top {self.p_model_top}, p_top {self.p_top} and p_top_gripper "
                f"{self.p_top_gripper} must be probabilities that sum to at most 1"
            )
        if len(self.score_bins) < 2 or np.any(np.diff(self.score_bins) <= 0):
            raise ValueError(f"score_bins must be increasing edges, got {self.score_bins}")


@dataclass(frozen=True)
class CollectConfig:
    catalogs: tuple[str, ...] = TRAINING_CATALOGS  # round robin by tote number; training catalogs only
    families: tuple[str, ...] | None = None  # only these families (None: all of each catalog)
    objects_per_tote: int = 8  # items dropped into each tote, count
    max_attempts_per_tote: int = 16  # attempts before the tote is abandoned, count
    seed: int = 0  # seeds every tote (see module docstring)
    cell_id: str = "sim-collect"  # ledger cell id prefix (worker k appends "-wk")
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    max_empty_plans: int = 2  # consecutive "empty" plans before a tote counts as cleared, count
    model: str | None = None  # model file whose ranking the "model_top" choices follow (None: analytic only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "catalogs", check_training_catalogs(self.catalogs))
        if self.objects_per_tote < 1 or self.max_attempts_per_tote < 1:
            raise ValueError("objects_per_tote and max_attempts_per_tote must be >= 1")
        if self.exploration.p_model_top > 0 and not self.model:
            raise ValueError("exploration.p_model_top > 0 needs a model file (CollectConfig.model)")
        if self.model and not Path(self.model).is_file():
            raise CollectError(f"exploration model {self.model}: no such file")


@dataclass
class CollectStats:
    totes: int = 0
    attempts: int = 0  # recorded this run (replayed duplicates not counted)
    labeled: int = 0  # of those, executed (labelled in the export)
    successes: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_gripper: dict[str, list[int]] = field(default_factory=dict)  # gripper -> [labelled, successes]
    by_family: dict[str, list[int]] = field(default_factory=dict)  # family -> [labelled, successes]
    wall_seconds: float = 0.0
    plan_errors: int = 0  # plans that raised (tote abandoned), count

    def add(self, gripper: str, family: str, reason: Reason) -> None:
        self.attempts += 1
        self.by_reason[reason.value] = self.by_reason.get(reason.value, 0) + 1
        if reason in _UNLABELED:
            return
        ok = int(reason is Reason.OK)
        self.labeled += 1
        self.successes += ok
        for d, k in ((self.by_gripper, gripper), (self.by_family, family or "unknown")):
            row = d.setdefault(k, [0, 0])
            row[0] += 1
            row[1] += ok

    def merge(self, other: CollectStats) -> None:
        self.totes += other.totes
        self.attempts += other.attempts
        self.labeled += other.labeled
        self.successes += other.successes
        self.plan_errors += other.plan_errors
        self.wall_seconds = max(self.wall_seconds, other.wall_seconds)
        for k, v in other.by_reason.items():
            self.by_reason[k] = self.by_reason.get(k, 0) + v
        for mine, theirs in ((self.by_gripper, other.by_gripper), (self.by_family, other.by_family)):
            for k, (n, s) in theirs.items():
                row = mine.setdefault(k, [0, 0])
                row[0] += n
                row[1] += s


_UNLABELED = frozenset(
    {Reason.IK_FAILED, Reason.UNREACHABLE, Reason.INVALID, Reason.ESTOP, Reason.NOT_HOLDING}
)


# --- exploration ------------------------------------------------------------------------------------


def _centres(plan: Plan) -> np.ndarray:
    """(M, 3) the centre of each candidate's item cluster (its own position when it has none)."""
    out = np.array([c.grasp.position for c in plan.candidates], dtype=np.float64)
    for k, c in enumerate(plan.candidates):
        if plan.clusters and 0 <= c.cluster < len(plan.clusters):
            out[k] = plan.clusters[c.cluster].centroid
    return out


def choose_candidate(
    plan: Plan,
    rng: np.random.Generator,
    cfg: ExplorationConfig,
    failed_spots: Sequence[np.ndarray] = (),
    item_failures: Sequence[tuple[np.ndarray, int]] = (),
) -> tuple[int, str]:
    """(index into plan.candidates, mode) of the candidate to execute. The plan must have candidates.

    `failed_spots`: grasp points that failed in this tote; `item_failures`: (item centre, failures).
    Only the "top" modes avoid them (the stratified mode samples everything, failures included).
    """
    cands = plan.candidates
    if not cands:
        raise ValueError("choose_candidate needs a plan with candidates")
    grippers = np.array([GRIPPER_KINDS.index(c.grasp.gripper) for c in cands])
    scores = np.array([c.analytic_score for c in cands])
    pos = np.array([c.grasp.position for c in cands])
    fresh = np.ones(len(cands), dtype=bool)
    for s in failed_spots:
        fresh &= np.linalg.norm(pos[:, :2] - np.asarray(s)[:2], axis=1) >= cfg.avoid_radius_m
    hard = [c for c, n in item_failures if n >= cfg.max_failures_per_item]
    if hard:
        centres = _centres(plan)
        for c in hard:
            fresh &= np.linalg.norm(centres[:, :2] - np.asarray(c)[:2], axis=1) >= cfg.item_radius_m
    present = np.unique(grippers)
    u = rng.random()
    g = int(rng.choice(present))
    # u's first slice is the model's: with p_model_top == 0 the other choices see the same u as before.
    if u < cfg.p_model_top:
        p = np.array([np.nan if c.p_success is None else c.p_success for c in cands], dtype=np.float64)
        if not np.isfinite(p).any():
            raise ValueError("model_top exploration needs a plan scored by a learned model")
        pool = fresh if fresh.any() else np.ones(len(cands), dtype=bool)
        return int(np.nanargmax(np.where(pool, p, -np.inf))), "model_top"
    u -= cfg.p_model_top
    if u < cfg.p_top + cfg.p_top_gripper:
        pool = fresh if u < cfg.p_top else fresh & (grippers == g)
        if not pool.any():
            pool = np.ones(len(cands), dtype=bool) if u < cfg.p_top else grippers == g
        # the analytic best of the pool (np.argmax takes the first of ties: with an analytic-only
        # planner, whose candidates come ranked best first, this is the pool's first candidate)
        return int(np.argmax(np.where(pool, scores, -np.inf))), ("top" if u < cfg.p_top else "top_gripper")
    rows = np.flatnonzero(grippers == g)
    bins = np.clip(np.digitize(scores[rows], cfg.score_bins) - 1, 0, len(cfg.score_bins) - 2)
    b = int(rng.choice(np.unique(bins)))
    return int(rng.choice(rows[bins == b])), f"bin{b}"


# --- one tote -------------------------------------------------------------------------------------


_SCORERS: dict[str, Any] = {}  # model path -> LearnedScorer, loaded once per worker process


def _exploration_scorer(path: str) -> Any:
    """The learned scorer of the exploration model (verified by its sha256 sidecar on first load)."""
    if path not in _SCORERS:
        from grasping.learned_scorer import LearnedScorer

        _SCORERS[path] = LearnedScorer.from_file(path)
    return _SCORERS[path]


def tote_seed(seed: int, n: int) -> int:
    """A 32-bit seed for tote n of a collection (independent of the worker that runs it)."""
    return int(np.random.SeedSequence([int(seed), int(n)]).generate_state(1)[0])


def tote_catalog(cfg: CollectConfig, n: int) -> str:
    return cfg.catalogs[n % len(cfg.catalogs)]


def _placement(packer: Any, cell: Any, plan: Plan, index: int, grasp: Grasp) -> Placement:
    """A release pose from the box packer (the controller's rule: item extents from its cluster)."""
    k = plan.candidates[index].cluster
    cluster = plan.clusters[k] if plan.clusters and 0 <= k < len(plan.clusters) else None
    extents = np.maximum(cluster.extents, 0.01) if cluster is not None else np.array([0.08, 0.08, 0.05])
    bottom = cluster.lo[2] if cluster is not None else grasp.position[2] - extents[2]
    tcp_above_bottom = max(0.0, float(grasp.position[2] - bottom))
    ext = tuple(float(e) for e in extents)
    slot = packer.propose(ext)
    if slot is None and packer.box.items:  # full for this item: ship the box
        packer.swap()
        for b in cell.items_in_box():
            cell.remove_item(b)
        slot = packer.propose(ext)
    R = grasp.R
    if slot is None:
        T = packer.box.T_base_box
        bottom_at_release = T[:3, 3] + np.array([0.0, 0.0, packer.box.inner_size_m[2]])
    else:
        packer.commit(slot)
        bottom_at_release = np.asarray(slot.position, dtype=float) + np.array(
            [0.0, 0.0, slot.release_height_m - float(slot.position_box[2])]
        )
        c, s = np.cos(slot.yaw), np.sin(slot.yaw)
        R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ R
    pos = bottom_at_release + np.array([0.0, 0.0, tcp_above_bottom])
    return Placement(pos, matrix_to_quat(R), box_id=slot.box_id if slot is not None else -1)


def _bump(counts: list[tuple[np.ndarray, int]], centre: np.ndarray, radius: float) -> None:
    for k, (c, n) in enumerate(counts):
        if np.linalg.norm(c[:2] - centre[:2]) < radius:
            counts[k] = (c, n + 1)
            return
    counts.append((np.asarray(centre), 1))


def _nearest_item(cell: Any, p_base: np.ndarray, within_m: float = 0.05) -> int | None:
    """The item whose bounding box is closest to the grasp point (ground truth: what it aimed at)."""
    import pybullet as pb

    best, best_d = None, within_m
    for b in cell.items_in_tote():
        lo, hi = (np.array(x) for x in pb.getAABB(b, physicsClientId=cell.client_id))
        d = float(np.linalg.norm(np.maximum(0.0, np.maximum(lo - p_base, p_base - hi))))
        if d < best_d:
            best, best_d = b, d
    return best


def _label_outcome(pick: Outcome, place: Outcome | None) -> Outcome:
    """The outcome the grasp is labelled by: a drop while carrying to the box counts against the grasp."""
    if not pick.success or place is None or place.success or place.reason is not Reason.DROPPED:
        return pick
    details = {**pick.details, "place_reason": place.reason.value, "place_details": place.details}
    return Outcome(
        False,
        Reason.DROPPED,
        executed=pick.executed,
        robot_seconds=pick.robot_seconds + place.robot_seconds,
        item_id=pick.item_id,
        details=details,
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def collect_tote(
    ledger: Any,
    cfg: CollectConfig,
    n: int,
    stats: CollectStats | None = None,
    planner_config: Any = None,
    code: str = "",
) -> CollectStats:
    """Run tote n (fresh cell, seeded by (cfg.seed, n)) and record every attempt in `ledger`."""
    from arm.packing import Packer
    from grasping.planner import PlannerConfig, plan
    from sim.catalogs import load_catalog
    from sim.scene import SceneConfig, SimCell

    stats = stats if stats is not None else CollectStats()
    ts = tote_seed(cfg.seed, n)
    cat_name = tote_catalog(cfg, n)
    catalog = load_catalog(cat_name, cfg.families if cat_name == "procedural-train" else None)
    tote_id = f"{cfg.cell_id}-s{cfg.seed}-tote-{n:06d}"
    rng = np.random.default_rng([ts, 1])  # exploration choices
    with SimCell(seed=ts, config=SceneConfig(arm=LABELLING_ARM)) as cell:
        cell.fill(catalog, cfg.objects_per_tote, np.random.default_rng([ts, 0]))
        box = cell.box_bounds
        T_base_box = np.eye(4)
        T_base_box[:3, 3] = [(box.lo[0] + box.hi[0]) / 2, (box.lo[1] + box.hi[1]) / 2, box.lo[2]]
        packer = Packer(tuple(float(x) for x in (box.hi - box.lo)), resolution_m=0.01, T_base_box=T_base_box)
        pcfg = planner_config or PlannerConfig(tote=cell.tote_bounds)
        if cfg.model:
            pcfg = replace(pcfg, scorer=_exploration_scorer(cfg.model))
        failed: list[np.ndarray] = []
        item_failures: list[tuple[np.ndarray, int]] = []
        empty = 0
        for k in range(cfg.max_attempts_per_tote):
            if not cell.items_in_tote():
                break
            frame = cell.camera.capture()
            try:
                p = plan(frame, replace(pcfg, tote=cell.tote_bounds, seed=int(rng.integers(2**31))))
            except Exception:  # a planner bug must not end a long collection: log it, drop the tote
                log.exception("%s: planner failed on attempt %d; tote abandoned", tote_id, k)
                stats.plan_errors += 1
                break
            if p.decision == "empty" or not p.candidates:
                empty += 1
                if empty >= cfg.max_empty_plans:
                    break
                continue
            empty = 0
            i, mode = choose_candidate(p, rng, cfg.exploration, failed, item_failures)
            cand = p.candidates[i]
            target = _nearest_item(cell, np.asarray(cand.grasp.position))
            pick = cell.arm.pick(cand.grasp)
            place = None
            if pick.success:
                place = cell.arm.place(_placement(packer, cell, p, i, pick.executed or cand.grasp))
            else:
                failed.append(np.asarray(cand.grasp.position))
                _bump(item_failures, _centres(p)[i], cfg.exploration.item_radius_m)
            item = pick.item_id if pick.item_id is not None else target
            spec = cell.items.get(item) if item is not None else None
            family = getattr(spec, "family", "") or ""
            out = _label_outcome(pick, place)
            details = {
                **out.details,
                "tote": tote_id,
                "catalog": cat_name,
                "item": getattr(spec, "name", ""),
                "mode": mode,
                "rank": i,
                "analytic_score": round(float(cand.analytic_score), 4),
                "place_reason": place.reason.value if place is not None else None,
                "code": code,
            }
            out = replace(out, details=_jsonable(details))
            plan_id = f"{tote_id}-p{k:03d}"
            one = replace(
                p,
                candidates=(cand,),
                patches=p.patches[i : i + 1],
                features=p.features[i : i + 1],
                frame_id=plan_id,
            )
            ledger.record_plan(one, tote_id=tote_id, plan_id=plan_id)
            new = ledger.record_attempt(
                attempt_id=f"{tote_id}-a{k:03d}",
                plan_id=plan_id,
                candidate_index=0,
                grasp=cand.grasp,
                outcome=out,
                decided_by=f"explore:{mode}",
                model_version=p.model_version,
                robot_time=float(cell.arm.robot_time),
                patch=p.patches[i],
                features=p.features[i],
                family=family or None,
                source="sim",
            )
            if new:
                stats.add(cand.grasp.gripper, family, out.reason)
    stats.totes += 1
    return stats


# --- a worker: many totes into one ledger ------------------------------------------------------------


# The arm that labels attempts: the cell's, without the cycle-time choices of issue 17's third pass
# (wrist turn nearest the current joints, low retreat and checked shortcut paths). They change how a
# borderline grasp or place turns out, and so the labels; the shipped model's data was collected
# without them (and the reduced rebuild's few scenes then gave a one-class validation split).
LABELLING_ARM = SimArmConfig(
    wrist_near_current=False,
    retreat_clearance=None,
    pick_shortcut=False,
    lift_clearance=None,
    blended_exit=False,
    lift_blend=False,
    via_search=False,
    approach_blend=False,
)

# The code whose behaviour the labels depend on: the arm and grippers (outcomes) and the planner
# (candidates, patches). Its digest goes with every attempt so stale data can be told apart later.
_LABEL_CODE = (
    "sim/sim_arm.py",
    "sim/grippers.py",
    "sim/scene.py",
    "sim/config_sim_arm.py",
    "grasping/planner.py",
    "grasping/candidates.py",
    "grasping/pointcloud.py",
    "grasping/patches.py",
)


def code_digest() -> str:
    """sha256 (16 hex) of the source files that decide the labels and observations."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _LABEL_CODE:
        f = root / rel
        h.update(rel.encode())
        h.update(f.read_bytes() if f.exists() else b"")
    return h.hexdigest()[:16]


def _done_totes(ledger: Any, prefix: str) -> list[int]:
    out = []
    for t in ledger.tote_ids():
        if t.startswith(prefix):
            try:
                out.append(int(t.rsplit("-", 1)[1]))
            except ValueError:
                continue
    return sorted(out)


def collect(
    ledger_path: str | Path,
    cfg: CollectConfig,
    totes: Sequence[int],
    *,
    progress: bool = True,
    position: int = 0,
) -> CollectStats:
    """Collect the given tote numbers into one ledger file; restartable (see the module docstring)."""
    from tqdm import tqdm

    from hitl.ledger import Ledger

    t0 = time.perf_counter()
    stats = CollectStats()
    import grasping.planner  # noqa: F401  (import the label code now, then fingerprint what was imported)
    import sim.scene  # noqa: F401

    code = code_digest()
    with Ledger(ledger_path, cfg.cell_id) as ledger:
        prefix = f"{cfg.cell_id}-s{cfg.seed}-tote-"
        done = set(_done_totes(ledger, prefix))
        # The last tote started may be incomplete: redo it (its attempts replay idempotently).
        if done:
            done.discard(max(done))
        todo = [n for n in totes if n not in done]
        if len(todo) < len(totes):
            log.info(
                "%s: resuming, %d of %d totes already collected",
                ledger_path,
                len(totes) - len(todo),
                len(totes),
            )
        bar = tqdm(todo, desc=f"collect w{position}", unit="tote", disable=not progress, position=position)
        for n in bar:
            collect_tote(ledger, cfg, n, stats, code=code)
            bar.set_postfix(att=stats.attempts, ok=f"{stats.successes / max(stats.labeled, 1):.2f}")
    stats.wall_seconds = time.perf_counter() - t0
    return stats


def _worker(args: tuple[str, CollectConfig, list[int], bool, int]) -> dict[str, Any]:
    path, cfg, totes, progress, k = args
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)  # one core per worker: planner + physics, no torch work here
    return asdict(collect(path, cfg, totes, progress=progress, position=k))


def collect_parallel(
    out_dir: str | Path, cfg: CollectConfig, n_totes: int, *, workers: int = 2, progress: bool = True
) -> CollectStats:
    """Totes 0..n_totes-1 over `workers` processes, worker k into `out_dir/ledger-wk.db`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "collect.json").write_text(
        json.dumps({"config": _jsonable(asdict(cfg)), "n_totes": n_totes, "workers": workers}, indent=2)
    )
    jobs = [
        (
            str(out_dir / f"ledger-w{k}.db"),
            replace(cfg, cell_id=f"{cfg.cell_id}-w{k}"),
            list(range(k, n_totes, workers)),
            progress,
            k,
        )
        for k in range(workers)
    ]
    total = CollectStats()
    if workers <= 1:
        results = [_worker(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_worker, jobs)
    for r in results:
        total.merge(CollectStats(**r))
    return total


def ledger_paths(out_dir: str | Path) -> list[Path]:
    paths = sorted(Path(out_dir).glob("ledger-w*.db"))
    if not paths:
        raise CollectError(f"{out_dir}: no ledger-w*.db files (run a collection first)")
    return paths


def export_merged(ledgers: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Export every ledger and merge the shards into one dataset directory with one manifest.json.

    `grasping.learning.load_dataset` reads the result (every shard sha256-checked). The merged
    manifest keeps each source ledger's own manifest under "parts".
    """
    from hitl.ledger import Ledger

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CollectError(f"export target {out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, parts = [], []
    for k, path in enumerate(ledgers):
        sub = out_dir / f"part-{k}"
        with Ledger(path, None, create=False) as ledger:
            man = ledger.export(sub)
        m = json.loads((sub / "manifest.json").read_text())
        parts.append({"ledger": str(path), **{x: m[x] for x in ("rows", "positives", "counts")}})
        for s in m["shards"]:
            name = f"p{k}-{s['file']}"
            os.replace(sub / s["file"], out_dir / name)
            shards.append({**s, "file": name})
        (sub / "manifest.json").unlink()
        sub.rmdir()
        log.info("exported %s: %d rows", path, man.rows)
    merged = {
        "format_version": 1,
        "rows": sum(s["rows"] for s in shards),
        "positives": sum(s["positives"] for s in shards),
        "shards": shards,
        "parts": parts,
    }
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True))
    os.replace(tmp, out_dir / "manifest.json")
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sim.collect --out DIR --totes N`: collect into DIR/ledger-w*.db (restartable)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sim.collect", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the worker ledgers (ledger-wk.db)")
    ap.add_argument("--totes", type=int, required=True, help="number of totes (0 .. N-1)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="collection seed (default 0)")
    ap.add_argument("--objects", type=int, default=8, help="items per tote (default 8)")
    ap.add_argument(
        "--catalog", action="append", default=None, help="training catalog (repeatable; default both)"
    )
    ap.add_argument("--family", action="append", default=None, help="only this family (repeatable)")
    ap.add_argument("--model", help="learned model whose best candidate the model_top choices execute")
    ap.add_argument(
        "--p-model-top",
        type=float,
        default=0.0,
        help="probability of executing the model's best candidate (needs --model; default 0)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = CollectConfig(
            model=args.model,
            exploration=ExplorationConfig(p_model_top=args.p_model_top),
            catalogs=tuple(args.catalog or TRAINING_CATALOGS),
            families=tuple(args.family) if args.family else None,
            objects_per_tote=args.objects,
            max_attempts_per_tote=2 * args.objects,
            seed=args.seed,
        )
    except (ValueError, CollectError) as exc:
        print(f"error: {exc}")
        return 2
    stats = collect_parallel(args.out, cfg, args.totes, workers=args.workers, progress=not args.no_progress)
    print(json.dumps(_jsonable(asdict(stats)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
