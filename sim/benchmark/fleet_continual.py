"""Two cells, one fleet: a new kind of item troubles cell A; cell B gets A's model before it meets it.

What it is
    `pickcell bench continual --cells 2` (issue 15, item 5). Cell A runs the single-cell experiment
    (sim.benchmark.continual: rounds of work -> learn -> gate -> hot swap, the new kind in its totes).
    Then a real fleet service (fleet.service.FleetService: the learner's registry, the fleet's ed25519
    signing key, CURVE on loopback) rolls A's last gated model out as a canary on cell B, a second
    simulated cell at another site that has never seen the new kind. Cell B receives it the way every
    cell does (fleet.cell.FleetLink: Clone snapshot, chunked download, sha256 and signature checked),
    swaps it in, and works its first totes with the new kind: `cell_b_first_contact_failure`.
    The control is the same cell B on the very same totes with the starting model, i.e. a cell that is
    not in the fleet: `cell_b_without_fleet`. Each arm keeps its own ledger (`cell-b-with-fleet.db`,
    `cell-b-without-fleet.db` in the work dir), as a cell of the fleet does: why B's items were left
    (never confident, asked, tried and failed) is read from it, as from cell A's.

What is randomised
    Cell B's totes come from the experiment's seed plus `CELL_B_SEED_OFFSET` (a different site's
    stream of totes and drop poses); both arms of cell B see identical totes, camera noise and
    simulated associate, so the only difference between them is the model. Each arm works
    `cell_b_totes` totes (`--cell-b-totes`; default as many as one of A's rounds).

What counts as success
    `cell_b_first_contact_failure` within 5 percentage points of cell A's new-kind failure in its last
    round (what A reached after learning), and clearly below `cell_b_without_fleet`. If no model of A
    passed its gate, nothing is shared: both arms run the starting model and the result says so.
    Failure = share of the new kind's items not placed by the model alone (a person's help counts as a
    failure of the model), the same measure as cell A's `new_family_failure`. The gap to A comes with
    two 95% intervals: counting items as independent (Newcombe) and resampling whole totes (items of
    one tote fail together, so the second is the honest one), and with each cell's tries on the new
    kind by gripper from its ledger (`new_kind_tries`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CELL_B_SEED_OFFSET = 7919  # cell B's tote stream: another site, disjoint from cell A's seed


def _work(cfg: Any, stack: Any, channel: Any, totes: int) -> dict[str, Any]:
    from sim.benchmark.continual import _round_metrics, _work_tote

    worked = [_work_tote(stack, channel, cfg.new_family) for _ in range(totes)]
    return {**_round_metrics(worked), "totes": worked}


def new_kind_tries(ledger_path: Path, family: str, model_version: str | None = None) -> dict[str, Any] | None:
    """What a cell's ledger says about the new kind: the model's own tries by gripper ([worked, tried]),
    a person's, and why the model's failed. `model_version`: only tries made with that model. None
    when there is no ledger. This is where a gap between two cells running one model shows up (stop
    39: cell B's suction tries on frames worked 8 of 18 times, cell A's 4 of 5)."""
    import sqlite3

    if not Path(ledger_path).exists():
        return None
    conn = sqlite3.connect(f"{Path(ledger_path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        q = "SELECT decided_by, gripper, success, reason FROM attempts WHERE family = ?"
        args: tuple = (family,)
        if model_version is not None:
            q += " AND model_version = ?"
            args += (model_version,)
        rows = conn.execute(q, args).fetchall()
    finally:
        conn.close()
    out: dict[str, Any] = {"model": {}, "person": {}, "model_failures_by_reason": {}}
    for decided_by, gripper, success, reason in rows:
        who = "model" if str(decided_by).startswith("model") else "person"
        worked, tried = out[who].get(gripper, [0, 0])
        out[who][gripper] = [worked + int(bool(success)), tried + 1]
        if who == "model" and not success:
            out["model_failures_by_reason"][reason] = out["model_failures_by_reason"].get(reason, 0) + 1
    return out


def _share_through_fleet(
    work: Path, registry: Path, start_version: str, shared_version: str, stack: Any, seed: int
) -> dict[str, Any]:
    """Roll `shared_version` out to cell B through a real fleet service; B swaps it in when verified."""
    from fleet.cell import FleetLink, LinkConfig
    from fleet.keys import init_fleet
    from fleet.rollout import RolloutConfig
    from fleet.service import FleetService, ServiceConfig, send_control
    from sim.stack import build_planner

    fleet_dir = work / "fleet"
    init_fleet(fleet_dir, ["cell-a", "cell-b"])
    rules = RolloutConfig.load(fleet_dir / "fleet.toml")
    svc = FleetService(
        ServiceConfig(fleet_dir, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", False, rules, registry)
    )
    # The starting model is the fleet's first live version (every cell ran it before A learned).
    svc.op_publish(start_version, force=True, stage=None, cells=[])
    loaded: list[str] = []

    def on_model(path: Path, version: str) -> tuple[bool, str]:
        planner, v = build_planner(
            "learned", stack.cell.tote_bounds, model_path=path, seed=seed, fallback=False
        )
        if v != version:
            return False, f"the file holds {v}, the fleet announced {version}"
        stack.controller.swap_planner(planner)
        loaded.append(version)
        return True, f"swapped in {version}"

    svc.start()
    link = None
    try:
        # A's gated model: a canary on cell B, the cell that has not met the new kind yet (through the
        # operator's control socket, as `pickcell fleet publish VERSION --stage canary --cells cell-b`).
        reply = send_control(
            fleet_dir, "publish", path=shared_version, force=False, stage="canary", cells=["cell-b"]
        )
        if not reply.get("ok"):
            raise RuntimeError(f"the fleet refused to publish {shared_version}: {reply.get('error')}")
        link = FleetLink(
            LinkConfig(
                "cell-b",
                svc.router_endpoint,
                svc.pub_endpoint,
                work / "cell-b",
                fleet_dir / "cells" / "cell-b",
                site="site-b",
            ),
            on_model,
            lambda path, version: (True, "no shadow"),
            lambda: {"state": "picking", "counts": {}, "picks_per_hour": 0.0, "assists_waiting": 0},
        ).start()
        end = time.monotonic() + 120.0
        while shared_version not in loaded:
            if time.monotonic() > end:
                raise RuntimeError(f"cell B did not receive {shared_version} from the fleet in 120 s")
            time.sleep(0.05)
        refused = list(link.refused)
    finally:
        if link is not None:
            link.stop()
        svc.stop()
    return {
        "fleet_dir": str(fleet_dir),
        "delivered": shared_version,
        "loaded_by_cell_b": loaded,
        "refused": refused,
    }


def run_cell_b(cfg: Any, work_dir: str | Path, cell_a: dict[str, Any]) -> dict[str, Any]:
    """Both arms of cell B after cell A's experiment (`cell_a`: run_continual's result)."""
    from grasping.modelfile import load_model
    from grasping.registry import ModelRegistry
    from sim.benchmark.continual import _build_cell, mixed_catalog, vs_control
    from sim.benchmark.metrics import clustered_difference, newcombe

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed + CELL_B_SEED_OFFSET
    catalog = mixed_catalog(cfg.new_family, cfg.new_share, seed)
    start = Path(cell_a["start_model_path"])
    start_version = load_model(start).version
    final = Path(cell_a["final_model_path"])
    final_version = load_model(final).version  # read (hashed) once
    shared = final != start
    reg = ModelRegistry(work / "registry")
    arms: dict[str, Any] = {}
    for arm in ("without_fleet", "with_fleet"):
        ledger_path = work / f"cell-b-{arm.replace('_', '-')}.db"
        # Every cell keeps a ledger: what B planned, asked and tried is there to look at.
        stack, channel, ledger = _build_cell(cfg, start, catalog, ledger_path, "cell-b", seed)
        try:
            info: dict[str, Any] = {"model": start_version}
            if arm == "with_fleet" and shared:
                info = _share_through_fleet(work, reg.root, start_version, final_version, stack, seed)
                info["model"] = info["delivered"]
            arms[arm] = {
                **info,
                "ledger": str(ledger_path),
                **_work(cfg, stack, channel, cfg.cell_b_totes or cfg.totes_per_round),
            }
        finally:
            stack.close()
            ledger.close()
        arms[arm]["new_kind_tries"] = new_kind_tries(ledger_path, cfg.new_family)
    a_after = cell_a["new_family_failure"][-1]
    b_with = arms["with_fleet"]["new_family_failure"]
    # Failures and items behind each rate, for the 95% intervals of the two comparisons the issue
    # names (B with the fleet vs A after learning; B with vs without the fleet). At 25-35 new items
    # a side the intervals are +-15-20 pp wide: a point gap says little on its own.
    a_n = int(cell_a["rounds"][-1]["new_items"])
    counts = {
        "a": (round((a_after or 0.0) * a_n), a_n),
        **{
            arm: (round((x["new_family_failure"] or 0.0) * x["new_items"]), int(x["new_items"]))
            for arm, x in arms.items()
        },
    }
    gap_ci = [100.0 * v for v in newcombe(*counts["with_fleet"], *counts["a"])]

    def per_tote(totes: list[dict[str, Any]]) -> list[tuple[int, int]]:
        return [(t["new_items"] - t["new_alone"], t["new_items"]) for t in totes]

    a_totes = cell_a["rounds"][-1].get("totes")
    # The same gap with whole totes resampled: items of one tote fail together.
    gap_ci_tote = (
        [
            100.0 * v
            for v in clustered_difference(
                per_tote(arms["with_fleet"]["totes"]), per_tote(a_totes), seed=cfg.seed
            )
        ]  # fmt: skip
        if a_totes
        else None
    )
    # Cell A's failure with the model it shared, over every round A ran that model (one round's
    # 8 totes is a noisy estimate of it; the rounds after the last promotion all ran it).
    final_name = final.name
    a_final = [t for r in cell_a["rounds"] if r.get("model") == final_name for t in r.get("totes", [])]
    a_pooled = None
    if shared and a_final:
        k, n = (sum(x) for x in zip(*per_tote(a_final), strict=True))
        lo, hi = clustered_difference(per_tote(arms["with_fleet"]["totes"]), per_tote(a_final), seed=cfg.seed)
        a_pooled = {
            "rounds": [r["round"] for r in cell_a["rounds"] if r.get("model") == final_name],
            "failures_and_items": [k, n],
            "new_family_failure": k / n if n else None,
            "cell_b_gap_pp": (100.0 * (b_with - k / n)) if (n and b_with is not None) else None,
            "cell_b_gap_ci95_pp_by_tote": [100.0 * lo, 100.0 * hi],
        }
    benefit_ci = [100.0 * v for v in newcombe(*counts["without_fleet"], *counts["with_fleet"])]
    b_without = arms["without_fleet"]["new_family_failure"]
    # Both arms of cell B work the very same items: the benefit is also measured item by item
    # (Newcombe's paired interval), which removes what the items share (which frames were hard).
    paired = vs_control(
        [{"round": 0, "totes": arms["without_fleet"]["totes"]}],
        [{"round": 0, "totes": arms["with_fleet"]["totes"]}],
        cfg.new_family,
    )["rounds"][0]["new_family_failure"]
    return {
        "cells": 2,
        "shared_model": final_version if shared else None,
        "cell_b_seed": seed,
        "cell_a_new_family_failure_after": a_after,
        "cell_b_first_contact_failure": b_with,
        "cell_b_without_fleet": arms["without_fleet"]["new_family_failure"],
        "cell_b_gap_to_a_pp": (100.0 * (b_with - a_after))
        if (b_with is not None and a_after is not None)
        else None,
        "cell_b_gap_to_a_ci95_pp": gap_ci,
        "cell_b_gap_to_a_ci95_pp_by_tote": gap_ci_tote,
        # ... and to cell A pooled over every round it ran the shared model (None: nothing shared)
        "cell_a_with_shared_model": a_pooled,
        # The model's own tries on the new kind by gripper, in cell A's last round's model and in
        # each arm of cell B (their ledgers): where a gap between the cells comes from.
        "cell_a_new_kind_tries": new_kind_tries(work / "cell.db", cfg.new_family, final_version)
        if shared
        else None,
        # How much more often cell B fails the new kind without the fleet than with it (> 0: the
        # fleet's model helped), with its 95% interval.
        "cell_b_fleet_benefit_pp": (100.0 * (b_without - b_with))
        if (b_with is not None and b_without is not None)
        else None,
        "cell_b_fleet_benefit_ci95_pp": benefit_ci,
        "cell_b_fleet_benefit_paired_ci95_pp": [100.0 * v for v in paired["ci95"]],
        # new-kind items where only the arm without the fleet failed / only the arm with it failed
        "cell_b_fleet_benefit_discordant": [paired["only_learning"], paired["only_control"]],
        "new_kind_failures_and_items": {k: list(v) for k, v in counts.items()},
        "cell_b": arms,
        "note": None
        if shared
        else "no model of cell A passed its gate: nothing was shared, both arms ran the start",
    }


def append_report(result: dict[str, Any], out_dir: str | Path) -> None:
    """Add the two-cell section and fleet.png (new-kind failure: A after learning, B with and without)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fl = result["fleet"]
    out = Path(out_dir)
    names = ["A, last round", "B with fleet\n(first contact)", "B without fleet"]
    keys = ["cell_a_new_family_failure_after", "cell_b_first_contact_failure", "cell_b_without_fleet"]
    vals = [fl[k] for k in keys]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.bar(names, [float("nan") if v is None else v for v in vals], color=["#4c72b0", "#55a868", "#c44e52"])
    for i, v in enumerate(vals):
        if v is not None:
            ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=9)
    ax.set_ylabel(f"new kind ({result['new_family']}) not placed alone")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(out / "fleet.png", dpi=110)
    plt.close(fig)
    b = fl["cell_b"]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [
        "",
        "## Two cells, one fleet",
        "",
        f"Shared model: {fl['shared_model'] or 'none (no model of cell A passed its gate)'}; "
        f"cell B's totes from seed {fl['cell_b_seed']}, the same in both arms.",
        "",
        "| | model | new-kind failure | familiar success | assists / 100 items | new-kind items |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| cell A, last round | - | {f(fl['cell_a_new_family_failure_after'])} | - | - | - |",
    ]
    for arm, label in (("with_fleet", "cell B, fleet's model"), ("without_fleet", "cell B, no fleet")):
        x = b[arm]
        lines.append(
            f"| {label} | {x['model']} | {f(x['new_family_failure'])} | {f(x['old_family_success'])} | "
            f"{f(x['assists_per_100_items'])} | {x['new_items']} |"
        )
    gap, benefit = fl.get("cell_b_gap_to_a_pp"), fl.get("cell_b_fleet_benefit_pp")
    if gap is not None and "cell_b_gap_to_a_ci95_pp" in fl:
        lo, hi = fl["cell_b_gap_to_a_ci95_pp"]
        text = (
            f"Cell B with the fleet minus cell A after learning: {gap:+.1f} pp (95% CI {lo:+.1f} to {hi:+.1f}"
        )
        if fl.get("cell_b_gap_to_a_ci95_pp_by_tote"):
            tlo, thi = fl["cell_b_gap_to_a_ci95_pp_by_tote"]
            text += f"; whole totes resampled: {tlo:+.1f} to {thi:+.1f}"
        lines += ["", text + ")."]
        pooled = fl.get("cell_a_with_shared_model")
        if pooled and pooled.get("cell_b_gap_pp") is not None:
            k, n = pooled["failures_and_items"]
            plo, phi = pooled["cell_b_gap_ci95_pp_by_tote"]
            lines += [
                f"Cell A over every round it ran the shared model (rounds "
                f"{', '.join(str(r) for r in pooled['rounds'])}): {k} of {n} new-kind items not placed "
                f"alone; cell B minus that {pooled['cell_b_gap_pp']:+.1f} pp (whole totes resampled: "
                f"{plo:+.1f} to {phi:+.1f})."
            ]
    if benefit is not None and "cell_b_fleet_benefit_ci95_pp" in fl:
        lo, hi = fl["cell_b_fleet_benefit_ci95_pp"]
        text = f"Cell B without the fleet minus with it: {benefit:+.1f} pp (95% CI {lo:+.1f} to {hi:+.1f}"
        if "cell_b_fleet_benefit_paired_ci95_pp" in fl:
            plo, phi = fl["cell_b_fleet_benefit_paired_ci95_pp"]
            only_without, only_with = fl["cell_b_fleet_benefit_discordant"]
            text += (
                f"; on the same items, paired: {plo:+.1f} to {phi:+.1f}, {only_without} items failed "
                f"only without the fleet, {only_with} only with it"
            )
        lines += [text + ")."]
    tries = [("cell A, its last model (all its rounds)", fl.get("cell_a_new_kind_tries"))] + [
        (label, b[arm].get("new_kind_tries"))
        for arm, label in (("with_fleet", "cell B, fleet's model"), ("without_fleet", "cell B, no fleet"))
    ]
    if any(t for _, t in tries):

        def wt(t: dict[str, Any] | None, who: str, gripper: str) -> str:
            x = (t or {}).get(who, {}).get(gripper)
            return "-" if not x else f"{x[0]} of {x[1]}"

        lines += [
            "",
            "The new kind in each cell's ledger: tries that worked, by who chose them and the gripper.",
            "",
            "| | model, suction | model, jaw | person, suction | person, jaw | the model's failures |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, t in tries:
            failed = sorted((t or {}).get("model_failures_by_reason", {}).items())
            why = ", ".join(f"{k} {v}" for k, v in failed)
            lines.append(
                f"| {label} | {wt(t, 'model', 'suction')} | {wt(t, 'model', 'parallel_jaw')} | "
                f"{wt(t, 'person', 'suction')} | {wt(t, 'person', 'parallel_jaw')} | {why or '-'} |"
            )
    lines += ["", "![fleet](fleet.png)", ""]
    if fl.get("note"):
        lines += [f"Note: {fl['note']}.", ""]
    with open(out / "report.md", "a") as fh:
        fh.write("\n".join(lines))
