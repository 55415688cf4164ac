"""Rollout stages, their rules (`fleet.toml`), and the verdict on a stage from the cells' counts.

A new version goes shadow -> canary -> everyone. Each stage has a rule: at least `min_picks` picks
observed, and the drop of `auto_precision` and `autonomous_pick_rate` against the live model no larger
than `max_drop_*`, judged with a confidence interval on the difference (Newcombe's hybrid Wilson score
interval for a difference of two proportions):
  pass        the interval's lower end >= -max_drop for both metrics (it is shown not to be worse by more);
  fail        the interval's upper end < -max_drop for either metric (it is shown to be worse by more),
              or `max_picks` were seen without showing either;
  collecting  otherwise.
A canary that fails is rolled back automatically; a shadow that fails is ended. Advancing a stage is a
person's decision (`pickcell fleet promote`), and it is refused unless the stage passed (or --force).

The counts (fleet's on-line estimates; a real cell does not know how many items a tote held):
  auto_precision        = auto_success / auto_attempts  (attempts the model executed without asking)
  autonomous_pick_rate  = auto_picks / items_done       (items placed with no person involved, over
                                                         items placed or given up)
In shadow the live model decides; the challenger's numbers are counterfactual on the attempts that were
executed: of the executed attempts the challenger would also have executed alone, the share that
succeeded (auto_precision), and of all executed attempts, the share the challenger would have executed
alone and that succeeded (autonomous_pick_rate); the live model's are counted the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import norm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STAGES = ("shadow", "canary", "everyone")
METRICS = ("auto_precision", "autonomous_pick_rate")


class RolloutConfigError(Exception):
    """fleet.toml cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class StageRule:
    min_picks: int = 200  # picks observed before a verdict, count
    max_picks: int = 2000  # picks after which an undecided stage fails, count
    max_drop_auto_precision: float = 0.02  # [0, 1] largest drop against the live model allowed
    max_drop_autonomous_pick_rate: float = 0.05  # [0, 1]
    confidence: float = 0.95  # two-sided confidence of the intervals, (0, 1)


@dataclass(frozen=True)
class RolloutConfig:
    shadow: StageRule = field(default_factory=StageRule)
    canary: StageRule = field(default_factory=StageRule)
    canary_share: float = 0.2  # (0, 1] share of cells that run a canary (at least one cell)
    heartbeat_s: float = 1.0  # seconds between the service's heartbeats (cells assume it dead after 3)
    status_interval_s: float = 2.0  # seconds between a cell's status reports
    chunk_bytes: int = 256 * 1024  # bytes per model-file chunk

    @classmethod
    def load(cls, path: str | Path | None) -> RolloutConfig:
        if path is None or not Path(path).exists():
            return cls()
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise RolloutConfigError(f"{p}: not valid TOML ({exc})") from None
        rules: dict[str, StageRule] = {}
        for stage in ("shadow", "canary"):
            raw = data.pop(stage, {})
            unknown = set(raw) - set(StageRule.__dataclass_fields__)
            if unknown:
                raise RolloutConfigError(f"{p}: [{stage}] has unknown fields {sorted(unknown)}")
            rule = StageRule(**raw)
            _check_rule(p, stage, rule)
            rules[stage] = rule
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise RolloutConfigError(f"{p}: unknown fields {sorted(unknown)}")
        cfg = cls(**rules, **data)
        if not 0.0 < cfg.canary_share <= 1.0:
            raise RolloutConfigError(f"{p}: canary_share must be in (0, 1], got {cfg.canary_share}")
        if cfg.heartbeat_s <= 0 or cfg.status_interval_s <= 0 or cfg.chunk_bytes < 1024:
            raise RolloutConfigError(f"{p}: heartbeat_s, status_interval_s > 0 and chunk_bytes >= 1024")
        return cfg

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_rule(p: Path, stage: str, r: StageRule) -> None:
    if r.min_picks < 1 or r.max_picks < r.min_picks:
        raise RolloutConfigError(f"{p}: [{stage}] needs 1 <= min_picks <= max_picks")
    if not (0 <= r.max_drop_auto_precision <= 1 and 0 <= r.max_drop_autonomous_pick_rate <= 1):
        raise RolloutConfigError(f"{p}: [{stage}] max_drop_* must be in [0, 1]")
    if not 0 < r.confidence < 1:
        raise RolloutConfigError(f"{p}: [{stage}] confidence must be in (0, 1)")


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def diff_interval(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """(p1 - p2, lower, upper): Newcombe's hybrid score interval (his method 10) for p1 - p2."""
    p1 = k1 / n1 if n1 else float("nan")
    p2 = k2 / n2 if n2 else float("nan")
    l1, u1 = wilson(k1, n1, confidence)
    l2, u2 = wilson(k2, n2, confidence)
    if not (n1 and n2):
        return p1 - p2, -1.0, 1.0
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, lo, hi


@dataclass(frozen=True)
class Counts:
    """What a cell counted for one model version (cumulative since the cell started)."""

    picks: int = 0  # items placed, by anyone's decision
    auto_attempts: int = 0  # attempts the model executed without asking
    auto_success: int = 0  # of those, the ones that held the item
    auto_picks: int = 0  # items placed with no person involved
    items_done: int = 0  # items placed or given up (asks that expired)

    def __add__(self, other: Counts) -> Counts:
        return Counts(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Counts:
        return cls(**{k: int(d.get(k, 0)) for k in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class MetricVerdict:
    metric: str
    candidate: float
    baseline: float
    diff: float
    lower: float
    upper: float
    max_drop: float
    verdict: str  # pass | fail | collecting


@dataclass(frozen=True)
class StageVerdict:
    stage: str
    verdict: str  # pass | fail | collecting
    picks: int
    reason: str
    metrics: tuple[MetricVerdict, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": [asdict(m) for m in self.metrics]}


def judge(stage: str, rule: StageRule, candidate: Counts, baseline: Counts) -> StageVerdict:
    """The verdict on a stage: the candidate's counts against the live model's."""
    pairs = {
        "auto_precision": (
            candidate.auto_success,
            candidate.auto_attempts,
            baseline.auto_success,
            baseline.auto_attempts,
            rule.max_drop_auto_precision,
        ),
        "autonomous_pick_rate": (
            candidate.auto_picks,
            candidate.items_done,
            baseline.auto_picks,
            baseline.items_done,
            rule.max_drop_autonomous_pick_rate,
        ),
    }
    mv: list[MetricVerdict] = []
    for name, (k1, n1, k2, n2, drop) in pairs.items():
        d, lo, hi = diff_interval(k1, n1, k2, n2, rule.confidence)
        v = "pass" if lo >= -drop else "fail" if hi < -drop else "collecting"
        p1 = k1 / n1 if n1 else float("nan")
        p2 = k2 / n2 if n2 else float("nan")
        mv.append(MetricVerdict(name, p1, p2, d, lo, hi, drop, v))
    picks = candidate.picks
    if picks < rule.min_picks:
        return StageVerdict(stage, "collecting", picks, f"{picks} of {rule.min_picks} picks", tuple(mv))
    failed = [m for m in mv if m.verdict == "fail"]
    if failed:
        text = "; ".join(
            f"{m.metric} {m.candidate:.3f} vs live {m.baseline:.3f}: drop CI [{-m.upper:.3f}, {-m.lower:.3f}]"
            f" entirely above the {m.max_drop:.3f} allowed"
            for m in failed
        )
        return StageVerdict(stage, "fail", picks, text, tuple(mv))
    if all(m.verdict == "pass" for m in mv):
        return StageVerdict(
            stage, "pass", picks, "no drop beyond the allowed one, at the stated confidence", tuple(mv)
        )
    if picks >= rule.max_picks:
        return StageVerdict(
            stage,
            "fail",
            picks,
            f"{picks} picks (max_picks {rule.max_picks}) without showing no drop",
            tuple(mv),
        )
    undecided = ", ".join(m.metric for m in mv if m.verdict == "collecting")
    return StageVerdict(stage, "collecting", picks, f"not yet decided: {undecided}", tuple(mv))


def canary_cells(cells: list[str], share: float, version: str) -> list[str]:
    """A deterministic share of the cells (at least one) for a version's canary."""
    import hashlib

    if not cells:
        return []
    n = max(1, int(math.floor(share * len(cells) + 1e-9)))
    ranked = sorted(cells, key=lambda c: hashlib.sha256(f"{version}:{c}".encode()).hexdigest())
    return sorted(ranked[:n])
