"""`pickcell train` and `pickcell models ...`: train from a ledger export, gate, register, promote.

Handlers import torch (through grasping.learning / grasping.modelfile) lazily so `pickcell --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = os.environ.get("PICKCELL_REGISTRY", "runs/registry")


def _add_registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        default=DEFAULT_REGISTRY,
        help=f"registry directory (default: $PICKCELL_REGISTRY or {DEFAULT_REGISTRY})",
    )


def _dump(obj: Any) -> str:
    from grasping.modelfile import _json_safe

    return json.dumps(_json_safe(obj), indent=2, sort_keys=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser(
        "train",
        help="train the learned grasp scorer from a ledger export",
        description=(
            "Train the grasp scorer (shared CNN backbone, one head per gripper) on a ledger export "
            "(`pickcell ledger export`): splits by scene, importance weights (recency, new families, "
            "watchdog-flagged scenes, replay of old data), early stopping, per-gripper calibration, "
            "conformal auto-execute threshold, watchdog fit. Writes FILE, FILE.sha256 and a model card "
            "(FILE with .md) and prints the test metrics."
        ),
    )
    t.add_argument(
        "--data",
        help="ledger export directory (npz shards + manifest.json); or collect in simulation with --from-sim",
    )
    t.add_argument("--out", help="model file to write (default runs/models/<version>.safetensors)")
    t.add_argument("--epochs", type=int, default=30, help="maximum epochs (default 30)")
    t.add_argument("--seed", type=int, default=0, help="seed for splits, init and shuffling (default 0)")
    t.add_argument("--alpha", type=float, default=0.05, help="auto-execute risk level (default 0.05)")
    t.add_argument(
        "--risk",
        choices=("joint", "executed"),
        default="joint",
        help="joint: bound P(auto-executed and failed) by conformal risk control (default); "
        "executed: bound P(failed | auto-executed) (Learn-then-Test, stricter)",
    )
    t.add_argument("--incumbent", help="current model file: families it never saw are weighted up")
    t.add_argument(
        "--forbid-family",
        action="append",
        default=[],
        metavar="FAMILY",
        help="refuse to train if any row is from this family (e.g. the test catalog); repeatable",
    )
    t.add_argument("--version", help="model version string (default graspnet-<UTC time>-s<seed>)")
    t.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_train)

    m = subparsers.add_parser(
        "models",
        help="list, verify, gate, add, show and promote model files in the registry",
        description="The model registry: every model file with its sha256, metrics and gate result.",
    )
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    ls = msub.add_parser("list", help="list registered models (current one marked *)")
    _add_registry_arg(ls)
    ls.add_argument("--json", action="store_true", help="print as JSON")
    ls.set_defaults(func=cmd_list)

    v = msub.add_parser("verify", help="re-hash and re-load every registered model (or one FILE)")
    _add_registry_arg(v)
    v.add_argument("file", nargs="?", help="verify this model file instead of the registry")
    v.add_argument("--json", action="store_true", help="print as JSON")
    v.set_defaults(func=cmd_verify)

    sh = msub.add_parser("show", help="show a model's metadata (a registered VERSION or a FILE)")
    _add_registry_arg(sh)
    sh.add_argument("target", help="registered version, 'current', or a model file path")
    sh.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    sh.set_defaults(func=cmd_show)

    a = msub.add_parser("add", help="verify a model file and copy it into the registry")
    _add_registry_arg(a)
    a.add_argument("file", help="model file (.safetensors)")
    a.add_argument("--json", action="store_true", help="print as JSON")
    a.set_defaults(func=cmd_add)

    g = msub.add_parser(
        "gate",
        help="run the whole gate on a model (a registered VERSION or a FILE) and store the verdict with it",
        description=(
            "Evaluate the candidate and the incumbent (default: the registry's current model) on held-out "
            "rows neither trained on: export directories (--holdout) and/or the held-out totes of cells' "
            "ledgers (--ledger: the totes `pickcell learn` never trains on). Checks: AUROC, calibration "
            "(ECE), joint and conditional auto-execute failure at alpha, per item kind autonomous success "
            "(old kinds may lose at most 1 pp, the kinds that triggered training must improve), and the "
            "fixed-seed simulation suite (autonomous pick rate, first-attempt success, damage, cycle "
            "time). A refusal names each failed check and by how much. The verdict is stored with the "
            "version in the registry (a FILE is added first). Exit 0 passed, 1 refused or error."
        ),
    )
    _add_registry_arg(g)
    g.add_argument("target", help="registered model version, 'current', or a model file")
    g.add_argument("--holdout", action="append", default=[], help="holdout export directory (repeatable)")
    g.add_argument(
        "--ledger", action="append", default=[], help="cell ledger: its held-out totes are used (repeatable)"
    )
    g.add_argument("--incumbent", help="incumbent model file (default: the registry's current model)")
    g.add_argument(
        "--new-kind",
        action="append",
        default=None,
        help="item kind that triggered training (repeatable; default: the model's own triggering_kinds)",
    )
    g.add_argument(
        "--sim-episodes",
        type=int,
        default=6,
        help="fixed-seed simulation suite episodes (default 6; 0: not run, and the verdict says so)",
    )
    g.add_argument(
        "--kind-drop", type=float, default=0.01, help="old kinds may lose this much (default 0.01)"
    )
    g.add_argument(
        "--kind-test-level",
        type=float,
        default=0.05,
        help="one-sided level of the per-kind forgetting test (default 0.05; 0: bare point comparison)",
    )
    g.add_argument(
        "--metric-test-level",
        type=float,
        default=0.05,
        help="one-sided level of the paired bootstrap AUROC/ECE checks (default 0.05; 0: point comparison)",
    )
    g.add_argument("--json", action="store_true", help="print the gate report as JSON")
    g.set_defaults(func=cmd_gate)

    p = msub.add_parser("promote", help="make a registered version current (only if it passed the gate)")
    _add_registry_arg(p)
    p.add_argument("version", help="registered model version")
    p.add_argument("--force", action="store_true", help="promote even without a passed gate (recorded)")
    p.add_argument("--reason", default="", help="why (kept in the registry history)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_promote)

    m.set_defaults(func=lambda args: (m.print_help(), 2)[1])


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def cmd_train(args: argparse.Namespace) -> int:
    from grasping.learning import DatasetError, TrainConfig, load_dataset, train
    from grasping.modelfile import ModelFileError

    if not 0 < args.alpha < 1:
        return _fail(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.epochs < 1:
        return _fail(f"--epochs must be >= 1, got {args.epochs}")
    try:
        ds = load_dataset(args.data)
        version = args.version or f"graspnet-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-s{args.seed}"
        out = Path(args.out) if args.out else Path("runs/models") / f"{version}.safetensors"
        cfg = TrainConfig(
            epochs=args.epochs,
            seed=args.seed,
            alpha=args.alpha,
            risk=args.risk,
            incumbent=args.incumbent,
            forbidden_families=tuple(args.forbid_family),
            model_version=version,
            progress=not args.no_progress and sys.stderr.isatty(),
            threads=args.threads,
        )
        res = train(ds, cfg, out)
    except (DatasetError, ModelFileError, ValueError) as exc:
        return _fail(str(exc))
    if args.json:
        print(
            _dump(
                {
                    "path": str(res.path),
                    "card": str(res.card_path),
                    "sha256": res.sha256,
                    "version": res.version,
                    "splits": res.splits,
                    "metrics": res.metrics,
                }
            )
        )
    else:
        m = res.metrics
        print(f"wrote {res.path} (version {res.version}, sha256 {res.sha256[:16]}...), card {res.card_path}")
        print(
            f"test: AUROC {m['auroc']:.3f} (analytic-feature baseline {m['baseline_feature_auroc']:.3f}), "
            f"ECE {m['ece_raw']:.3f} -> {m['ece']:.3f} calibrated, Brier {m['brier']:.3f}, "
            f"auto-execute {m['auto_execute_rate']:.1%} with {m['auto_fail_joint']:.1%} executed-and-failed "
            f"({m['auto_fail_given_executed']:.1%} of executed)"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from grasping.registry import ModelRegistry, RegistryError

    reg = ModelRegistry(args.registry)
    try:
        entries, cur = reg.list(), reg.current_version()
    except RegistryError as exc:
        return _fail(str(exc))
    if args.json:
        from dataclasses import asdict

        print(_dump({"current": cur, "models": [asdict(e) for e in entries]}))
        return 0
    if not entries:
        print(f"no models in {args.registry}")
        return 0
    for e in entries:
        gate = {True: "gate passed", False: "gate FAILED", None: "not gated"}[e.gate_passed]
        auc = e.metrics.get("auroc")
        ece = e.metrics.get("ece")
        stats = f"AUROC {auc:.3f} ECE {ece:.3f}" if isinstance(auc, float) and isinstance(ece, float) else ""
        print(f"{'*' if e.version == cur else ' '} {e.version}  {e.sha256[:12]}  {e.added}  {gate}  {stats}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from grasping.modelfile import ModelFileError, load_model
    from grasping.registry import ModelRegistry, RegistryError

    if args.file:
        try:
            m = load_model(args.file)
        except ModelFileError as exc:
            return _fail(str(exc))
        result = {"file": args.file, "ok": True, "version": m.version, "sha256": m.sha256}
        print(_dump(result) if args.json else f"ok: {args.file} version {m.version} sha256 {m.sha256}")
        return 0
    try:
        problems = ModelRegistry(args.registry).verify()
    except RegistryError as exc:
        return _fail(str(exc))
    if args.json:
        print(_dump({"ok": not problems, "problems": [p.__dict__ for p in problems]}))
    else:
        for p in problems:
            print(f"PROBLEM {p.version}: {p.problem}")
        print("all models verified" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def _resolve(reg: Any, target: str) -> Path:
    if Path(target).is_file():
        return Path(target)
    if target == "current":
        p = reg.current()
        if p is None:
            raise ValueError(f"registry {reg.root} has no current model")
        return p
    return reg.root / reg.get(target).file


def cmd_show(args: argparse.Namespace) -> int:
    from grasping.modelfile import ModelFileError, load_model
    from grasping.registry import ModelRegistry, RegistryError

    try:
        path = _resolve(ModelRegistry(args.registry), args.target)
        m = load_model(path)
    except (ModelFileError, RegistryError, ValueError) as exc:
        return _fail(str(exc))
    meta = {**m.meta, "sha256": m.sha256, "path": str(path)}
    if args.json:
        print(_dump(meta))
        return 0
    mt = meta.get("metrics", {})
    print(f"{meta['model_version']}  ({path}, sha256 {m.sha256})")
    print(
        f"created {meta.get('created')}, arch {meta.get('arch')}, "
        f"alpha {meta.get('alpha')}, risk {meta.get('risk')}"
    )
    print(
        f"thresholds (suction, jaw): {meta.get('thresholds')}; "
        f"watchdog threshold {m.watchdog.threshold_sigma:.2f} sigma"
    )
    data = meta.get("data", {})
    print(f"data: {data.get('rows')} rows, {data.get('scenes')} scenes, families {data.get('by_family')}")
    for k in (
        "auroc",
        "baseline_feature_auroc",
        "ece_raw",
        "ece",
        "brier",
        "auto_execute_rate",
        "auto_fail_joint",
    ):
        if k in mt:
            print(f"  {k}: {mt[k]}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from grasping.modelfile import ModelFileError
    from grasping.registry import ModelRegistry, RegistryError

    try:
        e = ModelRegistry(args.registry).add(args.file)
    except (ModelFileError, RegistryError) as exc:
        return _fail(str(exc))
    print(
        _dump(e.__dict__)
        if args.json
        else f"added {e.version} (sha256 {e.sha256[:16]}...) to {args.registry}"
    )
    return 0


def _holdout_rows(args: argparse.Namespace, tmp: Path) -> Any:
    """The gate's held-out rows: export directories, plus the held-out totes of ledgers."""
    import numpy as np

    from grasping.learning import DatasetError, held_out, load_dataset, outcome_rows

    parts = [load_dataset(h) for h in args.holdout]
    for i, db in enumerate(args.ledger):
        from hitl.ledger import Ledger  # the CLI is above both packages

        with Ledger(db, None, create=False) as ledger:
            ledger.export(tmp / f"ledger-{i}")
        ds = load_dataset(tmp / f"ledger-{i}")
        parts.append(ds.subset(np.flatnonzero(held_out(ds.tote) & outcome_rows(ds))))
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DatasetError("no held-out rows: give --holdout DIR and/or --ledger DB")
    if len(parts) == 1:
        return parts[0]
    from grasping.learning import join_datasets

    return join_datasets(parts, origin=" + ".join(p.origin for p in parts))


def _unseen_by(holdout: Any, models: list[Any]) -> Any:
    """`holdout` without the rows of totes any of `models` was fitted on (their files' `fitted_totes`;
    a model that does not record them is taken at its word). Says on stderr how many were left out."""
    import numpy as np

    from grasping.learning import incumbent_fitted_on
    from grasping.modelfile import load_model

    keep = np.ones(len(holdout), dtype=bool)
    for m in models:
        seen = incumbent_fitted_on(load_model(m).meta, holdout.tote)
        if seen is not None and (keep & seen).any():
            print(
                f"gate: {int((keep & seen).sum())} held-out rows left out: "
                f"{Path(m).name} was fitted on their totes",
                file=sys.stderr,
            )
            keep &= ~seen
    if not keep.any():
        from grasping.learning import DatasetError

        raise DatasetError("no held-out rows left: the models were fitted on every held-out tote")
    return holdout if keep.all() else holdout.subset(np.flatnonzero(keep))


def cmd_gate(args: argparse.Namespace) -> int:
    import tempfile

    from grasping.learning import DatasetError, GateTolerance, gate
    from grasping.modelfile import ModelFileError, load_model
    from grasping.registry import ModelRegistry, RegistryError

    reg = ModelRegistry(args.registry)
    try:
        path = _resolve(reg, args.target)
        version = load_model(path).version
        current = reg.current()
        incumbent = args.incumbent or (
            str(current) if current and current.resolve() != path.resolve() else None
        )
        suite = None
        if args.sim_episodes > 0:
            from sim.training import sim_suite_factory  # the CLI may hand the gate the simulator

            suite = sim_suite_factory(args.sim_episodes)(Path(incumbent) if incumbent else None)
        with tempfile.TemporaryDirectory(prefix="pickcell-gate-") as tmp:
            holdout = _holdout_rows(args, Path(tmp))
        holdout = _unseen_by(holdout, [p for p in (path, incumbent) if p])
        report = gate(
            path,
            incumbent,
            holdout,
            GateTolerance(
                kind_success_drop=args.kind_drop,
                kind_test_level=args.kind_test_level or None,
                metric_test_level=args.metric_test_level or None,
            ),
            sim_suite=suite,
            new_kinds=tuple(args.new_kind) if args.new_kind is not None else None,
        )
        if any(e.version == version for e in reg.list()):
            reg.record_gate(version, report)
        else:
            reg.add(path, gate_report=report)
    except (DatasetError, ModelFileError, RegistryError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if args.json:
        print(_dump(report.to_json()))
    else:
        print(
            f"gate {'PASSED' if report.passed else 'REFUSED'} for {report.candidate_version} "
            f"against {incumbent or 'no incumbent'} on {report.holdout}"
        )
        for r in report.reasons:
            print(f"  {r}")
        failed = [r for r in report.reasons if r.startswith("FAIL")]
        if failed:
            print(
                f"refused by {len(failed)} check(s); the verdict is stored with {version} in {args.registry}"
            )
    return 0 if report.passed else 1


def cmd_promote(args: argparse.Namespace) -> int:
    from grasping.registry import ModelRegistry, RegistryError

    try:
        e = ModelRegistry(args.registry).promote(args.version, force=args.force, reason=args.reason)
    except RegistryError as exc:
        return _fail(str(exc))
    print(_dump(e.__dict__) if args.json else f"current model is now {e.version} (sha256 {e.sha256[:16]}...)")
    return 0
