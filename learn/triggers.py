"""When to retrain: enough new labels, a shifted world (watchdog), or autonomous picks failing.

Read straight from the cells' ledgers (read-only SQLite snapshots; a cell keeps writing):
  * new labelled rows: attempts labelled by their outcome plus "no safe pick" answers recorded after
    the last round's cutoff (the learner's state), across every ledger;
  * out-of-distribution rate: the share of the last `ood_window_plans` plans (newest first, all
    cells pooled) that the watchdog flagged (`plans.in_distribution = 0`);
  * autonomous failure rate: the share of the last `failure_window_items` attempts the model made
    alone (`decided_by = 'model'`, one item each) that failed; attempts that say nothing about the
    grasp (IK failure, e-stop, ...) are not counted.
A rate trigger needs its full window of rows, and counts only rows recorded after the cutoff (the
last round): a few early failures on a fresh cell do not fire it, and after a round it fires again
only when K new plans or picks say the world is still shifted (the data that fired it is trained on).
"""

from __future__ import annotations

import glob
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hitl.ledger import UNLABELED_REASONS
from learn.config import TriggerConfig

_UNLABELED = tuple(r.value for r in UNLABELED_REASONS)


@dataclass(frozen=True)
class TriggerStatus:
    fired: bool
    reasons: tuple[str, ...]  # one line per trigger that fired
    new_labelled_rows: int
    ood_rate: float | None  # None: fewer plans than the window
    ood_plans: int
    failure_rate: float | None  # None: fewer autonomous attempts than the window
    failure_items: int
    since: float  # the cutoff (unix s) new rows are counted from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def expand_ledgers(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Ledger files named by paths or glob patterns, sorted and unique; an error if none exist."""
    out: set[Path] = set()
    for pat in patterns:
        hits = glob.glob(pat)
        if not hits and Path(pat).is_file():
            hits = [pat]
        out.update(Path(h).resolve() for h in hits if Path(h).is_file())
    if not out:
        raise FileNotFoundError(f"no ledger files match {list(patterns)}")
    return sorted(out)


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def check_triggers(ledgers: list[Path], cfg: TriggerConfig, since: float) -> TriggerStatus:
    """Evaluate the three triggers over `ledgers` (see the module docstring)."""
    new_rows = 0
    plans: list[tuple[float, int]] = []
    autonomous: list[tuple[float, int]] = []
    marks = ",".join("?" * len(_UNLABELED))
    for path in ledgers:
        conn = _ro(path)
        try:
            new_rows += conn.execute(
                f"SELECT count(*) FROM attempts WHERE recorded_at > ? AND reason NOT IN ({marks})",
                (since, *_UNLABELED),
            ).fetchone()[0]
            new_rows += conn.execute(
                "SELECT count(*) FROM answers WHERE recorded_at > ? AND kind = 'no_safe_pick'", (since,)
            ).fetchone()[0]
            plans += conn.execute(
                "SELECT recorded_at, in_distribution FROM plans WHERE decision != 'empty' AND recorded_at > ?"
                " ORDER BY recorded_at DESC LIMIT ?",
                (since, cfg.ood_window_plans),
            ).fetchall()
            autonomous += conn.execute(
                f"SELECT recorded_at, success FROM attempts WHERE decided_by = 'model' AND recorded_at > ?"
                f" AND reason NOT IN ({marks}) ORDER BY recorded_at DESC LIMIT ?",
                (since, *_UNLABELED, cfg.failure_window_items),
            ).fetchall()
        finally:
            conn.close()
    plans = sorted(plans, reverse=True)[: cfg.ood_window_plans]
    autonomous = sorted(autonomous, reverse=True)[: cfg.failure_window_items]
    ood = None if len(plans) < cfg.ood_window_plans else sum(1 - int(f) for _, f in plans) / len(plans)
    fail = (
        None
        if len(autonomous) < cfg.failure_window_items
        else sum(1 - int(s) for _, s in autonomous) / len(autonomous)
    )
    reasons = []
    if cfg.new_labelled_rows > 0 and new_rows >= cfg.new_labelled_rows:
        reasons.append(f"{new_rows} new labelled rows >= {cfg.new_labelled_rows}")
    if cfg.ood_rate > 0 and ood is not None and ood >= cfg.ood_rate:
        reasons.append(f"watchdog flagged {ood:.0%} of the last {len(plans)} plans >= {cfg.ood_rate:.0%}")
    if cfg.failure_rate > 0 and fail is not None and fail >= cfg.failure_rate:
        reasons.append(
            f"{fail:.0%} of the last {len(autonomous)} autonomous picks failed >= {cfg.failure_rate:.0%}"
        )
    return TriggerStatus(
        fired=bool(reasons),
        reasons=tuple(reasons),
        new_labelled_rows=int(new_rows),
        ood_rate=ood,
        ood_plans=len(plans),
        failure_rate=fail,
        failure_items=len(autonomous),
        since=float(since),
    )
