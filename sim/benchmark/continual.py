"""`pickcell bench continual`: one cell, a new kind of item, rounds of collect -> learn -> gate -> swap.

What it is
    One simulated cell (`sim.stack.build_sim_stack`, the real controller, a real ledger stamped on the robot
    clock so a run repeats exactly, the simulated associate on the robot clock) works through totes that mix a
    new kind of item with familiar `procedural-train` items. By default the new kind is `frame` (catalog
    `novel-train`, sim/catalogs/novel.py: a family no shipped model trained on) and the cell starts from the
    shipped model (`grasping/models/default.safetensors`, `graspnet-sim-v4`; `--start-model`); a
    `procedural-train` family as `--new-family` instead trains a starting model for the experiment on
    `--start-data` with that family **left out**. Round 0 measures it: the cell asks a person where the
    model's scores are low (or its watchdog flags the item), or the model's own pick fails. Each later
    round: `pickcell learn`'s round (`learn.learner.run_round`, forced) fine-tunes on the cell's
    ledger (the associate's answers and outcomes are labelled rows) with weighted sampling and
    replay (the familiar items' rows of the same ledger, plus `--start-data` as replay), refits the
    item watchdog on the recorded plans, recalibrates and refits the ask threshold; the gate runs
    (per item kind, calibration, conditional precision; the simulation suite with `--sim-episodes`);
    a passing model is hot-swapped into the running controller (`CellController.swap_planner`), a
    refused one is not (the round says so); then the round's totes are worked and measured.

What is randomised
    Everything from `--seed`: tote contents (the new kind's share of items is `--new-share`),
    associate timing and mistakes, training. Totes are numbered on from round to round (no tote is
    seen twice).

What counts as success (per round, JSON keys)
    `new_family_failure`: share of new-kind items that were not placed by the model alone;
    `old_family_success`: share of familiar items placed by the model alone (autonomous pick rate);
    `assists_per_100_items`; `gate_passed` (None in round 0, where nothing is trained). The
    issue's target: new_family_failure halves from round 0 to round 3, old_family_success drops by
    at most 0.01, assists fall. What a person decided never counts as the model's success.
    `control` (unless `--no-control`): the same three keys for the starting model working the same
    totes in a second cell (`run_control`), so each round's change can be told from tote noise.
    `vs_control`: the learning cell minus the control item by item on the same items, per round
    and pooled over rounds 1..R, with Newcombe's paired 95% interval (what learning did, apart
    from which totes a round happened to draw).
    `held_out` (unless `--eval-totes 0`): every model the cell ran, measured on one fixed set of
    evaluation totes (`run_held_out`: their own tote stream, never recorded to a ledger, so never
    trained on), each in a fresh cell. Round 0 and round R are then measured on the same items,
    and `held_out.vs_round_0` gives the change item by item with its paired interval. The per-round
    keys above mix the change with the draw of each round's totes (the same model measured
    0.42-0.73 new-kind failure from one round's totes to the next); these do not.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_START_DATA = REPO / "tests" / "sim" / "data" / "sim_grasps"
DEFAULT_START_MODEL = REPO / "grasping" / "models" / "default.safetensors"
# 2,124 rows of 200 `train` + `procedural-train` totes (v4 chose 40% of the executed picks); how it
# was made is in its manifest's `made_by`. With the 644-row fixture alone the learner certifies its
# ask threshold on ~100-150 rows and no retrained model passes the gate (docs/benchmarks.md).
DEFAULT_REPLAY = REPO / "tests" / "sim" / "data" / "continual_replay"
CATALOG = "procedural-train"  # a training catalog: the experiment never touches test items
NOVEL_CATALOG = "novel-train"  # the families no shipped model trained on (sim/catalogs/novel.py)
# The held-out evaluation totes' stream: seed + this (a prime, apart from cell B's offset in
# fleet_continual.py), so no evaluation tote is one the learning cell worked and recorded.
EVAL_SEED_OFFSET = 104729
# The experiment's ledgers are stamped on the simulated cell's robot clock from this unix time
# (2026-01-01 UTC), not the wall clock: the learner's recency weights and its cutoff read those
# stamps, so wall-clock stamps made two runs of one command train on different weights. The cell
# starts after its replay data (`ledger_epoch`): the stored replay collection is stamped 2026-12-02.
SIM_LEDGER_EPOCH = 1_767_225_600.0


@dataclass(frozen=True)
class ContinualConfig:
    rounds: int = 3  # learning rounds after round 0
    seed: int = 0
    new_family: str = "frame"  # the kind of item the starting model never trained on
    new_share: float = 0.5  # share of the new kind among a tote's items (expected), in [0, 1]
    start_model: str = str(DEFAULT_START_MODEL)  # used when new_family is not a procedural-train family
    totes_per_round: int = 8  # totes worked (and measured) per round
    # `--cells 2`: totes each arm of cell B works (0: totes_per_round). B runs A's model, so B's gap
    # to A is tote sampling: at 8 totes (25-35 frames a side) its standard error is 8-10 pp, more
    # than the 5 pp the fleet issue asks B to come within (docs/benchmarks.md, stop 38).
    cell_b_totes: int = 0
    objects_per_tote: int = 6  # items per tote
    # Replay export; for a procedural-train new family also the starting model's data (family removed).
    start_data: str = str(DEFAULT_START_DATA)
    # More replay exports (e.g. a `pickcell train --from-sim` collection's `data/`): every learning
    # round trains on them as old data, and the trainer's calibration and threshold splits draw on
    # them too. The 644-row fixture alone leaves ~100-150 rows to certify the ask threshold on.
    extra_replay: tuple[str, ...] = (str(DEFAULT_REPLAY),)
    start_epochs: int = 10  # epochs of the starting model
    learn_epochs: int = 20  # epochs at most per learning round (early stopping, patience 4)
    # Fine-tuning a model trained on ~11,500 rows with a few hundred new ones. All weights at 1e-3
    # (learn's default) moved it far enough that the gate refused it for AUROC (seeds 5 and 21, the
    # continual branch); all weights at 1e-4 in batches of 256 hardly moved it (~16 steps, dev seed
    # 21). Until stop 24 the default was the per-gripper heads only at 1e-3: with today's gate it
    # lost 2-4 AUROC points at two of three learner seeds (offline, dev seed 21) and the gate refused
    # 6 of 8 rounds on seeds 5, 8 and 9. All weights at 1e-4 in batches of 64 (~45 steps an epoch)
    # passed at all three learner seeds and executed more frames alone (8-14 of the later rows'
    # frames vs the start's 7), at the cost of more familiar failures executed alone at two seeds
    # (5-6 vs 1) (docs/learning.md, stop 24).
    learn_lr: float = 1e-4  # AdamW learning rate of the fine-tuning rounds
    learn_batch_size: int = 64  # rows per optimiser step of the fine-tuning rounds
    learn_freeze: str = "none"  # "none": fine-tune every weight; "backbone": the heads only
    learn_distill: float = 1.0  # weight of matching the incumbent's logits on old rows (0: replay alone)
    replay_share: float = 0.5  # share of each epoch drawn from old rows (replay data, earlier rounds)
    # The gate's per-kind forgetting test: kinds with fewer held-out rows are not judged alone (they
    # still count in the pooled old-kinds test), and the one-sided level of the paired test.
    kind_min_rows: int = 10
    kind_test_level: float = 0.05
    metric_test_level: float = 0.05  # the gate's paired bootstrap AUROC/ECE checks (0: point rule)
    sim_episodes: int = 4  # the gate's simulation suite episodes (0: not run)
    min_rows: int = 200  # rows the trainer needs
    # The gate's absolute calibration bar (ECE). The shipped model itself measures ECE ~0.10 on these
    # small held-out totes (docs/benchmarks.md), so the project's 0.05 would refuse every model,
    # the incumbent included; the experiment keeps the relative checks (ECE no worse than the
    # incumbent's + 0.01, AUROC, per-kind success, joint risk) and sets this bar off by default.
    gate_ece_max: float = 1.0
    # Work the same totes with the starting model in a second cell (`run_control`) and report it
    # beside each round: the round-0 -> round-3 change alone cannot tell learning from tote noise.
    control: bool = True
    # Fixed evaluation totes (`run_held_out`): every model the cell ran works the same ones, from a
    # tote stream of their own that no ledger records. 0: not run.
    eval_totes: int = 8


def quick_config(rounds: int, seed: int) -> ContinualConfig:
    """The variant the test suite runs: tiny totes and trainings, no simulation suite."""
    return ContinualConfig(
        rounds=rounds,
        seed=seed,
        totes_per_round=1,
        objects_per_tote=3,
        start_epochs=1,
        learn_epochs=1,
        sim_episodes=0,
        extra_replay=(),  # the fixture alone: a smoke test of the loop, not of learning
        eval_totes=1,
    )


def without_family(export_dir: str | Path, family: str, out_dir: Path) -> Path:
    """A copy of a ledger export without one family's rows (shards re-hashed in a new manifest).

    The starting model trains on it, and the learner replays it: the new kind's only examples are
    then the ones the cell itself records."""
    import hashlib

    src = Path(export_dir)
    manifest = json.loads((src / "manifest.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for sh in manifest["shards"]:
        with np.load(src / sh["file"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        keep = arrays["family"].astype(str) != family
        arrays = {k: v[keep] for k, v in arrays.items()}
        path = out_dir / sh["file"]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        shards.append(
            {**sh, "rows": int(keep.sum()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        )
    removed = sum(sh["rows"] for sh in manifest["shards"]) - sum(sh["rows"] for sh in shards)
    if removed == 0:
        log.warning("the start data %s holds no %r rows: nothing was left out", src, family)
    manifest = {
        **manifest,
        "shards": shards,
        "without_family": family,
        "rows": sum(s["rows"] for s in shards),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


def train_start_model(cfg: ContinualConfig, out: Path) -> Path:
    """The experiment's starting model: trained on the start data (its new-family rows removed)."""
    from grasping.learning import TrainConfig, load_dataset, train

    ds = load_dataset(cfg.start_data)
    keep = np.flatnonzero(ds.family != cfg.new_family)
    tcfg = TrainConfig(
        epochs=cfg.start_epochs,
        seed=cfg.seed,
        progress=False,
        threads=1,
        model_version=f"continual-start-s{cfg.seed}-no-{cfg.new_family}",
        min_rows=min(cfg.min_rows, len(keep)),
        # The fixture is small: wider splits would leave a split with one class.
        val_fraction=0.15,
        calib_fraction=0.2,
        conformal_fraction=0.2,
        test_fraction=0.1,
    )
    return train(ds.subset(keep), tcfg, out).path


def mixed_catalog(new_family: str, new_share: float, seed: int) -> Any:
    """Familiar `procedural-train` items and the new kind, the new kind `new_share` of the items.

    Catalog.sample draws items uniformly, so the share is set by the item counts: all new-kind items
    and a seeded subset of the familiar ones (or the other way round)."""
    from sim.catalogs import Catalog, load_catalog
    from sim.catalogs import procedural as proc

    if not 0.0 < new_share < 1.0:
        raise ValueError(f"new_share must be in (0, 1), got {new_share}")
    full = load_catalog(CATALOG)
    if new_family in proc.FAMILIES:
        new = full.filter([new_family]).items
        old = tuple(it for it in full.items if it.family != new_family)
    else:
        new = load_catalog(NOVEL_CATALOG, [new_family]).items
        old = full.items
    rng = np.random.default_rng([seed, 77])
    n_old = round(len(new) * (1 - new_share) / new_share)
    if n_old <= len(old):
        old = tuple(old[int(i)] for i in np.sort(rng.choice(len(old), n_old, replace=False)))
    else:
        n_new = max(1, round(len(old) * new_share / (1 - new_share)))
        new = tuple(new[int(i)] for i in np.sort(rng.choice(len(new), n_new, replace=False)))
    return Catalog(f"{CATALOG}+{new_family}", tuple(old) + tuple(new))


def _record_item_families(stack: Any) -> None:
    """Put the simulator's family of the item each pick aimed at into the attempt's ledger row, and
    that of the item each question asks about into the question (`CellController.item_family`), so
    rows an answer labels ("no safe pick", passed-over candidates) carry it too.

    `pickcell collect` records it the same way (the item held, else the nearest one to the grasp
    point). The learner and the gate then group rows by family (`frame` and the familiar families)
    rather than by k-means shape kinds, so the gate's per-kind check sees the new kind as one kind
    and each familiar family with its ledger rows as well as its replay rows. Provenance only: the
    planner never sees it, and what counts as placed alone is measured as before."""
    from sim.collect import _nearest_item

    arm = stack.controller.arm
    pick = arm.pick

    def with_family(grasp: Any, out: Any) -> Any:
        fams = {s.body_id: s.spec.family for s in stack.feed.spawned}
        item = out.item_id if out.item_id in fams else _nearest_item(stack.cell, np.asarray(grasp.position))
        fam = fams.get(item)
        if fam is None or not isinstance(out.details, dict):
            return out
        return replace(out, details={**out.details, "family": fam})

    def pick_recording_family(grasp: Any) -> Any:
        return with_family(grasp, pick(grasp))

    arm.pick = pick_recording_family
    # Questions carry the asked item's family too, so "no safe pick" and passed-over rows keep it.
    stack.controller.item_family = lambda centre: {s.body_id: s.spec.family for s in stack.feed.spawned}.get(
        _nearest_item(stack.cell, np.asarray(centre))
    )
    blended = getattr(arm, "pick_and_place", None)
    if blended is not None:  # the controller's default when the arm has it (arm.interfaces.PickAndPlace)

        def pick_and_place_recording_family(grasp: Any, placement_for: Any) -> Any:
            out, placed = blended(grasp, placement_for)
            return with_family(grasp, out), placed

        arm.pick_and_place = pick_and_place_recording_family


def _work_tote(stack: Any, channel: Any, new_family: str) -> dict[str, Any]:
    """Work one tote; per item whether the model placed it alone, and the assists asked."""
    ctl = stack.controller
    tote = stack.feed.next_tote()
    spawned = list(stack.feed.spawned)
    families = {s.body_id: s.spec.family for s in spawned}
    alone: set[int] = set()
    helped: set[int] = set()  # placed by a pick a person chose (the associate's decision, not the model's)

    def on_attempt(att: Any, plan: Any) -> None:
        ok = att.outcome.success and att.placed is not None and att.placed.success
        if ok and att.outcome.item_id in families:
            (alone if att.decided_by == "model" else helped).add(int(att.outcome.item_id))

    ctl.on_attempt = on_attempt
    rep = ctl.run_tote(tote)
    new = [b for b, f in families.items() if f == new_family]
    old = [b for b, f in families.items() if f != new_family]
    return {
        "tote": tote,
        "new_items": len(new),
        "new_alone": sum(1 for b in new if b in alone),
        "old_items": len(old),
        "old_alone": sum(1 for b in old if b in alone),
        "new_by_person": sum(1 for b in new if b in helped and b not in alone),
        "old_by_person": sum(1 for b in old if b in helped and b not in alone),
        "assists": rep.assists_requested,
        "status": rep.status,
        # Per item, in spawn order: the control cell meets the same items in the same order, so the
        # learning cell and the control can be compared item by item (`vs_control`).
        "items": [
            {
                "name": s.spec.name,
                "family": s.spec.family,
                "alone": s.body_id in alone,
                "by_person": s.body_id in helped and s.body_id not in alone,
            }
            for s in spawned
        ],
    }


def _round_metrics(totes: list[dict[str, Any]]) -> dict[str, Any]:
    new = sum(t["new_items"] for t in totes)
    old = sum(t["old_items"] for t in totes)
    items = new + old
    return {
        "new_items": new,
        "old_items": old,
        "new_family_failure": (1.0 - sum(t["new_alone"] for t in totes) / new) if new else None,
        "old_family_success": (sum(t["old_alone"] for t in totes) / old) if old else None,
        "assists_per_100_items": (100.0 * sum(t["assists"] for t in totes) / items) if items else None,
        # What the simulated associate's decisions placed, apart from the model's own (never counted
        # as the model's success above).
        "new_placed_by_person": (sum(t["new_by_person"] for t in totes) / new) if new else None,
        "old_placed_by_person": (sum(t["old_by_person"] for t in totes) / old) if old else None,
    }


def vs_control(
    learning: list[dict[str, Any]], control: list[dict[str, Any]], new_family: str, confidence: float = 0.95
) -> dict[str, Any]:
    """Learning cell minus control, item by item on the same items: per round and pooled over the
    learning rounds (1..R), for the new kind (failure: not placed by the model alone) and the
    familiar items (placed alone). Intervals: Newcombe's paired interval (`newcombe_paired`).

    Both cells meet the same totes (same contents, same drops), so each item is measured twice; the
    difference on the same items removes the tote-to-tote variation that swamps the change from
    round 0 (the same model measured 0.42-0.73 new-kind failure from one round's totes to the
    next). Items are matched by tote number and name (a repeated name by its occurrence); an item
    that did not stay in one cell's tote has no pair and is left out (counted in `unpaired`).
    """
    from sim.benchmark.metrics import newcombe_paired

    def pairs(rl: dict[str, Any], rc: dict[str, Any]) -> tuple[list[tuple[dict, dict]], int]:
        def keyed(items: list[dict]) -> dict[tuple[str, int], dict]:
            seen: dict[str, int] = {}
            out = {}
            for it in items:  # a catalog may put two copies of one item in a tote: number them
                k = seen[it["name"]] = seen.get(it["name"], -1) + 1
                out[(it["name"], k)] = it
            return out

        def number(tote: str) -> str:  # "<cell>-tote-<n>": the same n is the same contents and drops
            return str(tote).rsplit("-tote-", 1)[-1]

        out, unpaired = [], 0
        ctl = {number(t["tote"]): keyed(t.get("items", [])) for t in rc["totes"]}
        for tl in rl["totes"]:
            il, ic = keyed(tl.get("items", [])), ctl.pop(number(tl["tote"]), {})
            out += [(il[k], ic[k]) for k in il if k in ic]
            unpaired += len(set(il) ^ set(ic))
        unpaired += sum(len(v) for v in ctl.values())
        return out, unpaired

    def compare(ps: list[tuple[dict, dict]], new: bool) -> dict[str, Any]:
        sel = [(a, b) for a, b in ps if (a["family"] == new_family) == new]
        # new kind: failure = not placed by the model alone; familiar: success = placed alone
        la = np.array([(not a["alone"]) if new else a["alone"] for a, _ in sel], dtype=bool)
        ca = np.array([(not b["alone"]) if new else b["alone"] for _, b in sel], dtype=bool)
        lo, hi = newcombe_paired(la, ca, confidence)
        return {
            "items": len(sel),
            "learning": float(la.mean()) if len(sel) else None,
            "control": float(ca.mean()) if len(sel) else None,
            "change": float(la.mean() - ca.mean()) if len(sel) else None,
            f"ci{round(100 * confidence)}": [lo, hi],
            "only_learning": int((la & ~ca).sum()),  # items where only the learning cell had the outcome
            "only_control": int((ca & ~la).sum()),
        }

    rounds, pooled, unpaired_all = [], [], 0
    for rl, rc in zip(learning, control, strict=False):
        ps, unpaired = pairs(rl, rc)
        unpaired_all += unpaired
        if rl["round"] > 0:
            pooled += ps
        rounds.append(
            {
                "round": rl["round"],
                "new_family_failure": compare(ps, True),
                "old_family_success": compare(ps, False),
                "unpaired": unpaired,
            }
        )
    return {
        "rounds": rounds,
        "learning_rounds_pooled": {
            "new_family_failure": compare(pooled, True),
            "old_family_success": compare(pooled, False),
        },
        "unpaired": unpaired_all,
    }


@functools.lru_cache(maxsize=8)  # every cell built (held-out totes: one per tote) reads the same exports
def ledger_epoch(replay: tuple[str, ...]) -> float:
    """When the simulated cell starts working: `SIM_LEDGER_EPOCH`, or an hour after the newest row
    of its replay exports if that is later. A cell's rows must be newer than the data its starting
    model was trained on, as in a real deployment: the learner weights by recency from the newest
    row. With the cell stamped from 2026-01-01 and the replay collection from 2026-11-25 to
    2026-12-02, the cell's rows had recency ~1e-15 against the replay's (stop 37). Deterministic:
    read from the stored exports."""
    newest = -np.inf
    for export in replay:
        d = Path(export)
        shards = (
            [d / s["file"] for s in json.loads((d / "manifest.json").read_text())["shards"]]
            if (d / "manifest.json").is_file()
            else sorted(d.glob("*.npz"))
        )
        for shard in shards:
            with np.load(shard, allow_pickle=False) as z:
                if "timestamp" in z.files and z["timestamp"].size:
                    t = z["timestamp"][np.isfinite(z["timestamp"])]
                    newest = max(newest, float(t.max()) if t.size else -np.inf)
    return max(SIM_LEDGER_EPOCH, float(np.ceil(newest)) + 3600.0)


def robot_clock(robot_time: Callable[[], float], epoch: float = SIM_LEDGER_EPOCH) -> Callable[[], float]:
    """A ledger clock on simulated robot time: `epoch + robot_time()`, strictly increasing.

    Several rows are written at one robot instant (a plan and the question it raises); each gets
    a stamp a microsecond after the last, so "rows after the cutoff" never depends on row order
    within an instant, and the same run gives the same stamps.
    """
    last = [-np.inf]

    def clock() -> float:
        last[0] = max(epoch + float(robot_time()), last[0] + 1e-6)
        return last[0]

    return clock


def _build_cell(
    cfg: ContinualConfig,
    model: Path,
    catalog: Any,
    ledger_path: Path | None,
    cell_id: str,
    seed: int | None = None,
    first_tote: int = 0,
) -> tuple:
    """(stack, assist channel, ledger) of one simulated cell working the experiment's totes.
    `ledger_path` None: nothing is recorded (ledger None). `seed`: its tote stream (default cfg.seed);
    `first_tote`: the number of its first tote in that stream."""
    from arm.controller import ControllerConfig
    from hitl.ledger import Ledger
    from sim.associate import GroundTruthJudge, SimAssistChannel, SimAssociateConfig
    from sim.stack import build_sim_stack

    seed = cfg.seed if seed is None else int(seed)
    arm: list[Any] = []  # the cell's arm, once built: the ledger's clock reads its robot time
    ledger = (
        Ledger(
            ledger_path,
            cell_id,
            clock=robot_clock(
                lambda: arm[0].robot_time if arm else 0.0, ledger_epoch((cfg.start_data, *cfg.extra_replay))
            ),
        )
        if ledger_path is not None
        else None
    )
    ccfg = ControllerConfig(
        cell_id=cell_id,
        wall_poll_s=0.0,
        ledger_source="sim",
        max_attempts_per_tote=3 * cfg.objects_per_tote,
    )
    stack = build_sim_stack(
        catalog=CATALOG,
        objects_per_tote=cfg.objects_per_tote,
        seed=seed,
        planner="learned",
        model_path=model,
        controller_config=ccfg,
        ledger=ledger,
        first_tote=first_tote,
    )
    arm.append(stack.cell.arm)
    stack.feed.catalog = catalog  # totes mix the new kind with familiar items
    if ledger is not None:
        _record_item_families(stack)
    clock = lambda: stack.cell.arm.robot_time  # noqa: E731
    judge = GroundTruthJudge(stack.cell, stack.camera, SimAssociateConfig(seed=seed))
    stack.controller.assist = channel = SimAssistChannel(judge, clock)
    return stack, channel, ledger


def run_control(cfg: ContinualConfig, start: Path, work_dir: str | Path, progress: bool = True) -> list[dict]:
    """The control arm: a second cell that keeps the starting model and works the same totes.

    Tote contents and drop poses come from (seed, tote number) (`sim.feed`), so round r of the
    control meets the same items as round r of the learning cell. Tote-to-tote variation at this
    size is as large as the effect looked for (the same model measured 0.08-0.75 new-kind failure
    from round to round, docs/benchmarks.md); the paired difference per round is what learning did.
    """
    from tqdm import tqdm

    work = Path(work_dir)
    catalog = mixed_catalog(cfg.new_family, cfg.new_share, cfg.seed)
    stack, channel, ledger = _build_cell(cfg, Path(start), catalog, work / "control.db", "continual-control")
    rounds = []
    bar = tqdm(total=cfg.rounds + 1, desc="control rounds", disable=not progress)
    try:
        for r in range(cfg.rounds + 1):
            totes = [_work_tote(stack, channel, cfg.new_family) for _ in range(cfg.totes_per_round)]
            rounds.append({"round": r, "model": Path(start).name, **_round_metrics(totes), "totes": totes})
            bar.update(1)
    finally:
        bar.close()
        stack.close()
        ledger.close()
    return rounds


def run_held_out(cfg: ContinualConfig, round_models: list[str], progress: bool = True) -> dict[str, Any]:
    """Every round's model on one fixed set of `cfg.eval_totes` evaluation totes.

    The totes come from their own stream (seed + EVAL_SEED_OFFSET, numbered from 0), mixed like the
    rounds' totes, and are worked with no ledger: nothing measured here is ever trained on. Every
    tote is worked in a fresh cell (empty box, the simulated associate from its seed), so every
    model meets the same items dropped the same way whatever it did with the totes before: in one
    long-lived cell an item that bounces out on the drop is drawn again, and how the drop goes
    depends on the simulation's history (two models then met different items in 2 of 8 totes). A
    round whose model is the one already measured (the gate refused the round's candidate) reuses
    that measurement, which a fresh run would repeat exactly (the simulation is deterministic).
    `vs_round_0`: round r minus round 0 item by item (`vs_control`, the paired interval).
    """
    from tqdm import tqdm

    catalog = mixed_catalog(cfg.new_family, cfg.new_share, cfg.seed)
    seed = cfg.seed + EVAL_SEED_OFFSET
    measured: dict[str, dict[str, Any]] = {}
    rounds = []
    bar = tqdm(total=len(set(round_models)), desc="held-out totes", disable=not progress)
    try:
        for r, model in enumerate(round_models):
            if model not in measured:
                totes = []
                for n in range(cfg.eval_totes):
                    stack, channel, _ = _build_cell(
                        cfg, Path(model), catalog, None, "continual-eval", seed, first_tote=n
                    )
                    try:
                        totes.append(_work_tote(stack, channel, cfg.new_family))
                    finally:
                        stack.close()
                measured[model] = {**_round_metrics(totes), "totes": totes, "measured_in_round": r}
                bar.update(1)
            m = measured[model]
            rounds.append({"round": r, "model": Path(model).name, **m, "reused": m["measured_in_round"] != r})
    finally:
        bar.close()
    keys = ("new_family_failure", "old_family_success", "assists_per_100_items")
    # Round r against round 0 on the same items ("learning" = round r, "control" = round 0). Not
    # pooled over rounds: every round meets the same items, so a pool would count them R times.
    vs_round_0 = vs_control(rounds, [rounds[0]] * len(rounds), cfg.new_family)
    vs_round_0.pop("learning_rounds_pooled")
    return {
        "seed": seed,
        "totes": cfg.eval_totes,
        **{k: [x[k] for x in rounds] for k in keys},
        "rounds": rounds,
        "vs_round_0": vs_round_0,
    }


def learn_config(cfg: ContinualConfig, ledger_path: Path, work: Path) -> Any:
    """The learner's settings (learn.config.LearnConfig) of the experiment's rounds: the cell's
    ledger, the replay exports, fine-tuning and gate settings from `cfg`."""
    from learn.config import GateSettings, LearnConfig, TrainSettings, TriggerConfig, WeightsConfig

    return LearnConfig(
        ledgers=(str(ledger_path),),
        replay=(cfg.start_data, *cfg.extra_replay),
        registry=str(work / "registry"),
        work_dir=str(work / "learn"),
        seed=cfg.seed,
        triggers=TriggerConfig(),
        train=TrainSettings(
            mode="finetune",
            epochs=cfg.learn_epochs,
            lr=cfg.learn_lr,
            batch_size=cfg.learn_batch_size,
            freeze=cfg.learn_freeze,
            distill=cfg.learn_distill,
            min_rows=cfg.min_rows,
            risk="joint",
        ),
        weights=WeightsConfig(replay_share=cfg.replay_share),
        gate=GateSettings(
            sim_episodes=cfg.sim_episodes,
            kind_min_rows=cfg.kind_min_rows,
            kind_test_level=cfg.kind_test_level,
            metric_test_level=cfg.metric_test_level,
            ece_max=cfg.gate_ece_max,
        ),
    )


def run_continual(cfg: ContinualConfig, work_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the experiment (module docstring); returns the JSON-able result."""
    from tqdm import tqdm

    from grasping.registry import ModelRegistry
    from learn.learner import run_round
    from sim.stack import build_planner
    from sim.training import sim_suite_factory

    t0 = time.time()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from sim.catalogs import procedural as proc

    left_out = cfg.new_family in proc.FAMILIES
    if left_out:
        cfg = replace(
            cfg,
            start_data=str(without_family(cfg.start_data, cfg.new_family, work / "start-data")),
            # the new kind's only examples must be the ones the cell records: out of every replay too
            extra_replay=tuple(
                str(without_family(d, cfg.new_family, work / f"replay-{i}"))
                for i, d in enumerate(cfg.extra_replay)
            ),
        )
        start = train_start_model(cfg, work / "start.safetensors")
    else:
        start = Path(cfg.start_model)
    catalog = mixed_catalog(cfg.new_family, cfg.new_share, cfg.seed)
    reg = ModelRegistry(work / "registry")
    reg.add(start)
    reg.promote(reg.list()[0].version, force=True, reason="continual: the experiment's starting model")
    ledger_path = work / "cell.db"
    stack, channel, ledger = _build_cell(cfg, start, catalog, ledger_path, "continual")
    lcfg = learn_config(cfg, ledger_path, work)
    factory = sim_suite_factory(cfg.sim_episodes) if cfg.sim_episodes > 0 else None
    rounds: list[dict[str, Any]] = []
    model = str(start)
    round_models: list[str] = []  # the model file each round ran, for the held-out evaluation
    bar = tqdm(total=cfg.rounds + 1, desc="rounds", disable=not progress)
    try:
        for r in range(cfg.rounds + 1):
            learn_info: dict[str, Any] = {"gate_passed": None, "version": None, "gate_reasons": []}
            if r > 0:
                # Learn from everything the cell has recorded so far, replaying the start data.
                res = run_round(
                    replace(lcfg, incumbent=model), force=True, sim_suite_factory=factory, progress=False
                )
                learn_info = {
                    "gate_passed": res.gate_passed,
                    "version": res.version,
                    "gate_reasons": list(res.gate_reasons),
                    "triggering_kinds": list(res.triggering_kinds),
                }
                if res.gate_passed:
                    # The hot swap: the next plan uses the new model; the cell is not restarted.
                    planner, _ = build_planner(
                        "learned",
                        stack.cell.tote_bounds,
                        model_path=res.model_path,
                        seed=cfg.seed,
                        fallback=False,
                    )
                    stack.controller.swap_planner(planner)
                    model = str(res.model_path)
                else:
                    log.info(
                        "round %d: the gate refused %s; the cell keeps %s", r, res.version, Path(model).name
                    )
            totes = [_work_tote(stack, channel, cfg.new_family) for _ in range(cfg.totes_per_round)]
            rounds.append(
                {"round": r, "model": Path(model).name, **learn_info, **_round_metrics(totes), "totes": totes}
            )
            round_models.append(model)
            bar.update(1)
    finally:
        bar.close()
        stack.close()
        ledger.close()
    keys = ("new_family_failure", "old_family_success", "assists_per_100_items", "gate_passed")
    control = run_control(cfg, start, work, progress) if cfg.control else None
    held_out = run_held_out(cfg, round_models, progress) if cfg.eval_totes > 0 else None
    return {
        "experiment": "continual",
        "new_family": cfg.new_family,
        "new_family_is": (
            "left out of a starting model trained for the experiment"
            if left_out
            else f"a family the starting model ({Path(start).name}) never trained on"
        ),
        "catalog": catalog.name,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        **{k: [x[k] for x in rounds] for k in keys},
        "rounds": rounds,
        # The starting model on the same totes, round by round (None: --no-control). Learning is
        # the difference to it, not the change from round 0, which tote-to-tote variation swamps.
        "control": None
        if control is None
        else {
            **{k: [x[k] for x in control] for k in keys[:3]},
            "rounds": control,
        },
        # Learning cell minus control on the same items, with paired 95% intervals (None: no control).
        "vs_control": None if control is None else vs_control(rounds, control, cfg.new_family),
        # Each round's model on the same fixed evaluation totes, never trained on (None: --eval-totes 0).
        "held_out": held_out,
        "start_model_path": str(start),
        "final_model_path": str(model),  # the model the cell ran in the last round
        "wall_seconds": time.time() - t0,
    }


def write_report(result: dict[str, Any], out_dir: str | Path) -> Path:
    """report.md and continual.png (the four keys per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = [x["round"] for x in result["rounds"]]
    vs = result.get("vs_control")
    fig, ax = plt.subplots(1, 4 if vs else 3, figsize=(16 if vs else 12, 3.5))
    for a, key, title in (
        (ax[0], "new_family_failure", f"new kind ({result['new_family']}) not placed alone"),
        (ax[1], "old_family_success", "familiar items placed alone"),
        (ax[2], "assists_per_100_items", "assists per 100 items"),
    ):
        ys = [np.nan if v is None else v for v in result[key]]
        a.plot(r, ys, "o-", label="learning cell")
        if result.get("control"):
            cs = [np.nan if v is None else v for v in result["control"][key]]
            a.plot(r, cs, "s--", color="grey", label="starting model, same totes")
        if result.get("held_out"):
            hs = [np.nan if v is None else v for v in result["held_out"][key]]
            a.plot(r, hs, "D-", color="tab:green", label="the round's model, fixed held-out totes")
        for x, y, g in zip(r, ys, result["gate_passed"], strict=True):
            if g is False:
                a.plot([x], [y], "rx", ms=12)
        a.set_title(title, fontsize=9)
        a.set_xlabel("round")
        a.set_xticks(r)
    if result.get("control") or result.get("held_out"):
        ax[0].legend(fontsize=7)
    if vs:
        # The paired difference on the same items, with its 95% interval: below 0 is learning.
        for key, off, mark, label in (
            ("new_family_failure", -0.08, "o", "new kind: failure"),
            ("old_family_success", 0.08, "s", "familiar: placed alone"),
        ):
            xs, ys, err = [], [], [[], []]
            for x in vs["rounds"]:
                c = x[key]
                if c["change"] is None:
                    continue
                lo, hi = c["ci95"]
                xs.append(x["round"] + off)
                ys.append(c["change"])
                err[0].append(max(c["change"] - lo, 0.0))
                err[1].append(max(hi - c["change"], 0.0))
            ax[3].errorbar(xs, ys, yerr=err, fmt=mark, capsize=3, label=label)
        ax[3].axhline(0.0, color="grey", lw=0.8)
        ax[3].set_title("learning cell minus control, same items (95%)", fontsize=9)
        ax[3].set_xlabel("round")
        ax[3].set_xticks(r)
        ax[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "continual.png", dpi=110)
    plt.close(fig)
    lines = [
        "# Continual learning on a new kind of item",
        "",
        f"New kind: `{result['new_family']}` ({result['new_family_is']}); catalog `{result['catalog']}`; "
        f"wall time {result['wall_seconds']:.0f} s.",
        "",
        "| round | model | gate passed | new-kind failure | familiar success | assists / 100 items "
        "| new kind placed by a person's pick | familiar placed by a person's pick |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    for x in result["rounds"]:
        lines.append(
            f"| {x['round']} | {x['model']} | {f(x['gate_passed'])} | {f(x['new_family_failure'])} | "
            f"{f(x['old_family_success'])} | {f(x['assists_per_100_items'])} | "
            f"{f(x.get('new_placed_by_person'))} | {f(x.get('old_placed_by_person'))} |"
        )
    if result.get("control"):
        lines += [
            "",
            "Control: the starting model in a second cell on the same totes (same tote contents and drops).",
            "",
            "| round | new-kind failure | familiar success | assists / 100 items |",
            "| --- | --- | --- | --- |",
        ]
        for x in result["control"]["rounds"]:
            lines.append(
                f"| {x['round']} | {f(x['new_family_failure'])} | {f(x['old_family_success'])} | "
                f"{f(x['assists_per_100_items'])} |"
            )
    if vs:
        lines += [
            "",
            "Learning cell minus control on the same items (paired; Newcombe's 95% interval). New kind:",
            "failure (below 0: the learning cell failed fewer); familiar: placed alone (above 0: more).",
            "",
            "| round | new kind: items | change in failure | 95% interval | familiar: items | change in "
            "success | 95% interval |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        rows = [(str(x["round"]), x) for x in vs["rounds"]]
        rows.append(("1..R pooled", vs["learning_rounds_pooled"]))
        for name, x in rows:
            nk, ok = x["new_family_failure"], x["old_family_success"]

            def ci(c: dict) -> str:
                return f"{c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}"

            lines.append(
                f"| {name} | {nk['items']} | {f(nk['change'])} | {ci(nk)} | {ok['items']} | "
                f"{f(ok['change'])} | {ci(ok)} |"
            )
        if vs["unpaired"]:
            lines.append(f"\n{vs['unpaired']} items had no pair in the other cell and are left out.")
    ho = result.get("held_out")
    if ho:
        lines += [
            "",
            f"Held out: each round's model on the same {ho['totes']} evaluation totes (seed {ho['seed']}, "
            "never recorded, never trained on), each in a fresh cell; change against round 0 item by item "
            "(paired; Newcombe's 95% interval).",
            "",
            "| round | model | new-kind failure | change | 95% interval | familiar success | change "
            "| 95% interval | assists / 100 items |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for x, c in zip(ho["rounds"], ho["vs_round_0"]["rounds"], strict=True):
            nk, ok = c["new_family_failure"], c["old_family_success"]
            model = x["model"] + (f" (as round {x['measured_in_round']})" if x["reused"] else "")
            lines.append(
                f"| {x['round']} | {model} | {f(x['new_family_failure'])} | {f(nk['change'])} | "
                f"{nk['ci95'][0]:+.3f} to {nk['ci95'][1]:+.3f} | {f(x['old_family_success'])} | "
                f"{f(ok['change'])} | {ok['ci95'][0]:+.3f} to {ok['ci95'][1]:+.3f} | "
                f"{f(x['assists_per_100_items'])} |"
            )
    lines += ["", "![rounds](continual.png)", "", "Config: `" + json.dumps(result["config"]) + "`", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def register(sub: Any) -> None:
    """Add `pickcell bench continual` under `pickcell bench` (registered by pickcell.commands)."""
    import argparse

    b = sub.choices.get("bench")
    if b is None:
        return
    bs = b.add_subparsers(dest="bench_command", metavar="EXPERIMENT")
    c = bs.add_parser(
        "continual",
        help="one cell, a new kind of item: rounds of collect -> learn -> gate -> hot-swap",
        description=__doc__.split("What is randomised")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--rounds", type=int, default=3, help="learning rounds after round 0 (default 3)")
    c.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    c.add_argument(
        "--new-family",
        default="frame",
        help="the new kind: 'frame' (novel-train, default) or a procedural-train family "
        "left out of a starting model trained for the experiment",
    )
    c.add_argument(
        "--new-share", type=float, default=None, help="new kind's share of tote items (default 0.5)"
    )
    c.add_argument("--start-model", default=None, help="starting model for a novel family (default: shipped)")
    c.add_argument("--totes-per-round", type=int, default=None, help="totes per round (default 8; quick 1)")
    c.add_argument("--objects-per-tote", type=int, default=None, help="items per tote (default 6; quick 3)")
    c.add_argument("--start-data", default=None, help="export the starting model is trained on")
    c.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control arm (the starting model working the same totes in a second cell)",
    )
    c.add_argument(
        "--replay",
        action="append",
        default=None,
        metavar="DIR",
        help="replay exports for every learning round besides --start-data (repeatable; default the "
        "stored 200-tote collection tests/sim/data/continual_replay; 'none': the fixture alone)",
    )
    c.add_argument(
        "--sim-episodes", type=int, default=None, help="gate simulation suite episodes (default 4)"
    )
    c.add_argument(
        "--gate-ece-max", type=float, default=None, help="the gate's absolute ECE bar (default 1.0: off)"
    )
    c.add_argument("--learn-lr", type=float, default=None, help="fine-tuning learning rate")
    c.add_argument("--learn-epochs", type=int, default=None, help="fine-tuning epochs at most")
    c.add_argument("--learn-batch-size", type=int, default=None, help="fine-tuning rows per step")
    c.add_argument(
        "--learn-freeze", choices=("none", "backbone"), default=None, help="fine-tune all or heads only"
    )
    c.add_argument(
        "--learn-distill",
        type=float,
        default=None,
        help="weight of matching the incumbent's logits on old rows while fine-tuning (0: replay alone)",
    )
    c.add_argument("--replay-share", type=float, default=None, help="share of each epoch from old rows")
    c.add_argument(
        "--kind-test-level",
        type=float,
        default=None,
        help="one-sided level of the gate's per-kind forgetting test (0: bare point comparison)",
    )
    c.add_argument(
        "--metric-test-level",
        type=float,
        default=None,
        help="one-sided level of the gate's paired bootstrap AUROC/ECE checks (0: point comparison)",
    )
    c.add_argument(
        "--cells",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: afterwards a fleet service shares cell A's model with cell B, which meets the new kind "
        "for the first time, beside a cell B without the fleet (sim/benchmark/fleet_continual.py)",
    )
    c.add_argument(
        "--eval-totes",
        type=int,
        default=None,
        help="fixed held-out evaluation totes every round's model works, never recorded (default 8; "
        "quick 1; 0: none)",
    )
    c.add_argument(
        "--cell-b-totes",
        type=int,
        default=None,
        help="with --cells 2: totes each arm of cell B works (default: --totes-per-round); more totes "
        "narrow the comparison of B with A",
    )
    c.add_argument("--quick", action="store_true", help="tiny totes and trainings, no simulation suite")
    c.add_argument(
        "--work-dir", type=Path, default=None, help="keep ledger, models, rounds here (default: temp)"
    )
    c.add_argument("--json", type=Path, help="write the result JSON here")
    c.add_argument("--report", type=Path, help="write report.md and continual.png here")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_continual)


def cmd_continual(args: Any) -> int:
    import tempfile

    cfg = (
        quick_config(args.rounds, args.seed)
        if args.quick
        else ContinualConfig(rounds=args.rounds, seed=args.seed)
    )
    over = {
        "new_family": args.new_family,
        "totes_per_round": args.totes_per_round,
        "objects_per_tote": args.objects_per_tote,
        "start_data": args.start_data,
        "extra_replay": (() if args.replay == ["none"] else tuple(args.replay)) if args.replay else None,
        "control": False if args.no_control else None,
        "new_share": args.new_share,
        "start_model": args.start_model,
        "gate_ece_max": args.gate_ece_max,
        "sim_episodes": args.sim_episodes,
        "learn_lr": args.learn_lr,
        "learn_epochs": args.learn_epochs,
        "learn_batch_size": args.learn_batch_size,
        "learn_freeze": args.learn_freeze,
        "learn_distill": args.learn_distill,
        "replay_share": args.replay_share,
        "kind_test_level": args.kind_test_level,
        "metric_test_level": args.metric_test_level,
        "eval_totes": args.eval_totes,
        "cell_b_totes": args.cell_b_totes,
    }
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if (
        cfg.rounds < 0
        or cfg.totes_per_round < 1
        or cfg.objects_per_tote < 1
        or cfg.eval_totes < 0
        or cfg.cell_b_totes < 0
    ):
        print(
            "error: --rounds >= 0, --totes-per-round >= 1, --objects-per-tote >= 1, --eval-totes >= 0 "
            "and --cell-b-totes >= 0",
            flush=True,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="pickcell-continual-") as tmp:
        result = run_continual(cfg, args.work_dir or tmp, progress=not args.no_progress)
        if args.cells == 2:
            from sim.benchmark.fleet_continual import run_cell_b

            t0 = time.time()
            result["fleet"] = run_cell_b(cfg, args.work_dir or tmp, result)
            result["wall_seconds"] += time.time() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.report:
        print(f"report: {write_report(result, args.report)}")
        if "fleet" in result:
            from sim.benchmark.fleet_continual import append_report

            append_report(result, args.report)
    for k in ("new_family_failure", "old_family_success", "assists_per_100_items", "gate_passed"):
        print(
            f"{k:<24} "
            + " ".join(
                "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in result[k]
            )
        )
    if result.get("held_out"):
        for k in ("new_family_failure", "old_family_success", "assists_per_100_items"):
            print(
                f"{'held_out.' + k:<32} "
                + " ".join("-" if v is None else f"{v:.3f}" for v in result["held_out"][k])
            )
    if "fleet" in result:
        for k in ("cell_a_new_family_failure_after", "cell_b_first_contact_failure", "cell_b_without_fleet"):
            v = result["fleet"][k]
            print(f"{k:<32} {'-' if v is None else f'{v:.3f}'}")
    print(f"wall_seconds             {result['wall_seconds']:.0f}")
    return 0
