"""The benchmark report: a Markdown page with PNG plots and annotated frames of failed picks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _counts(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items()) or "none"


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else (f"{x:.1f}" if isinstance(x, float) else str(x))


def _err(value: float | None, ci: list[float] | tuple[float, float]) -> tuple[float, float]:
    """Error-bar lengths below and above a rate, never negative.

    An interval bound can land a hair on the wrong side of the rate (a family at 100% whose upper
    bound is 0.9999999999999999), and matplotlib refuses negative error bars: clamp at zero.
    """
    if value is None:
        return (0.0, 0.0)
    return (max(0.0, float(value) - float(ci[0])), max(0.0, float(ci[1]) - float(value)))


def _bars(rates: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Bar heights (a rate with no trials draws as 0) and the 2xN error array matplotlib wants."""
    vals = [float(r["value"]) if r.get("value") is not None else 0.0 for r in rates]
    errs = [_err(r.get("value"), r.get("ci95", (0.0, 1.0))) for r in rates]
    return vals, [[e[0] for e in errs], [e[1] for e in errs]]


def _rate_of(metrics: dict[str, Any], key: str, n_key: str | None = None) -> dict[str, Any]:
    return {
        "value": metrics.get(key),
        "ci95": metrics.get(f"{key}_ci95") or [0.0, 1.0],
        "n": metrics.get(n_key, 0) if n_key else metrics.get("items", 0),
    }


def _operator_rates(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    fasd = metrics.get("first_attempt_success_by_decider") or {}
    none = {"value": None, "ci95": [0.0, 1.0], "n": 0}
    return [
        ("items placed, model alone", _rate_of(metrics, "autonomous_pick_rate")),
        ("model's unasked attempts OK", _rate_of(metrics, "auto_precision", "auto_attempts")),
        ("first attempt OK, model", fasd.get("model", none)),
        ("person's attempts OK", _rate_of(metrics, "person_precision", "person_attempts")),
        ("first attempt OK, person", fasd.get("person", none)),
        ("items left (not in a box)", _rate_of(metrics, "items_left_rate")),
        (
            "damaging motions",
            dict(
                _rate_of(metrics, "damage_rate"),
                n=metrics.get("attempts", 0) + metrics.get("halted_motions", 0),
            ),
        ),
    ]


def write_report(out_dir: Path, metrics: dict[str, Any], episodes: list[dict[str, Any]], args: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # success by family, with 95% CIs
    fams = metrics.get("families") or {}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(fams)
    rates = [fams[f]["first_attempt_success"] for f in names]
    vals, err = _bars(rates)
    if names:
        ax.bar(names, vals, yerr=err, capsize=4, color="#4c72b0")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    else:
        ax.text(0.5, 0.5, "no attempts", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("first-attempt success")
    ax.set_title("First-attempt success by item family (95% CI)")
    fig.tight_layout()
    fig.savefig(out / "success_by_family.png", dpi=110)
    plt.close(fig)

    # the operator's view: what the model did alone, what people decided, what was left
    ops = _operator_rates(metrics)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [name for name, _ in ops]
    vals, err = _bars([r for _, r in ops])
    y = np.arange(len(labels))
    ax.barh(y, vals, xerr=err, capsize=4, color=["#4c72b0"] * 3 + ["#dd8452"] * 2 + ["#c44e52"] * 2)
    for yi, (_, r) in zip(y, ops, strict=True):
        txt = "n/a" if r["value"] is None else f"{100 * r['value']:.1f}% (n={r['n']})"
        ax.text(1.02, yi, txt, va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.3)  # room for the labels right of 100%
    ax.set_xlabel("rate (95% CI)")
    ax.set_xticks(np.linspace(0.0, 1.0, 6))
    ax.set_title(
        "Operator metrics, 95% CI\nblue: the model alone; orange: a person chose; red: losses", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out / "operator.png", dpi=110)
    plt.close(fig)

    # planning latency histogram
    lat = np.array([x for e in episodes for x in e["plan_latency_ms"]])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if lat.size:
        ax.hist(lat, bins=40, color="#55a868")
        for q, ls in ((50, "--"), (99, ":")):
            ax.axvline(np.percentile(lat, q), color="k", ls=ls, label=f"p{q} {np.percentile(lat, q):.0f} ms")
        ax.legend()
    ax.set_xlabel("frame -> plan, ms (wall)")
    ax.set_ylabel("plans")
    ax.set_title("Planning latency")
    fig.tight_layout()
    fig.savefig(out / "latency_hist.png", dpi=110)
    plt.close(fig)

    # cycle-time breakdown per pick, by phase (sim/benchmark/cycle.py)
    picks = max(metrics["picks"], 1)
    parts = {k: v for k, v in (metrics.get("cycle_breakdown_s_per_pick") or {}).items() if v}
    if not parts:
        parts = {
            "motion + idle (robot)": metrics["robot_seconds"] / picks,
            "sensing": metrics["sensing_seconds"] / picks,
            "planning": metrics["planning_seconds"] / picks,
        }
    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = 0.0
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(parts), 2)))
    for (name, v), c in zip(parts.items(), colours, strict=False):
        ax.barh([0], [v], left=left, color=c, label=f"{name}: {v:.2f} s")
        left += v
    ax.set_yticks([])
    ax.set_xlabel("seconds per successful pick")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=7)
    ax.set_title("Cycle time per pick")
    fig.tight_layout()
    fig.savefig(out / "cycle_breakdown.png", dpi=110)
    plt.close(fig)

    # picks over robot time, per episode
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for e in episodes:
        t = [a["t"] for a in e["attempts"] if a["success"]]
        ax.step([0, *t], range(len(t) + 1), where="post", alpha=0.6)
    ax.set_xlabel("robot seconds into the episode")
    ax.set_ylabel("items packed")
    ax.set_title("Picks over time (one line per episode)")
    fig.tight_layout()
    fig.savefig(out / "picks_over_time.png", dpi=110)
    plt.close(fig)

    failed = [p for e in episodes for p in e.get("failed_frames", [])][:6]
    lines = [
        "# pickcell simulation benchmark",
        "",
        "Command: `pickcell bench " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items()) + "`",
        "",
        "## Operator metrics",
        "",
        "What the model did without asking is counted apart from what a person decided; every item",
        "presented is in the denominators (see docs/benchmark.md).",
        "",
        "| metric | value | 95% CI |",
        "| --- | --- | --- |",
        *[
            f"| {name} | {_fmt(r['value'], True)} (n={r['n']}) | "
            f"{_fmt(r['ci95'][0], True)}-{_fmt(r['ci95'][1], True)} |"
            for name, r in _operator_rates(metrics)
        ],
        f"| interventions (questions) per 100 items | {_fmt(metrics.get('interventions_per_100_items'))} | |",
        f"| most attempts on one item | {_fmt(metrics.get('max_attempts_on_one_item'))} | |",
        "",
        "Items left, by fate: "
        + (", ".join(f"{k} {v}" for k, v in (metrics.get("items_left_by_fate") or {}).items()) or "none"),
        "",
        "Items not placed by the model alone, by what happened to them first: "
        + _counts(metrics.get("items_not_alone_by_cause"))
        + "; questions by why the cell asked: "
        + _counts(metrics.get("questions_by_cause")),
        "",
        "Damage by kind: "
        + (", ".join(f"{k} {v}" for k, v in (metrics.get("damage_by_kind") or {}).items()) or "none"),
        "",
        "![operator metrics](operator.png)",
        "",
        "## All metrics",
        "",
        "| metric | value | 95% CI |",
        "| --- | --- | --- |",
        f"| first-attempt success | {_fmt(metrics['first_attempt_success'], True)} | "
        f"{_fmt(metrics['first_attempt_success_ci95'][0], True)}-"
        f"{_fmt(metrics['first_attempt_success_ci95'][1], True)} |",
        f"| clearance rate | {_fmt(metrics['clearance_rate'], True)} | "
        f"{_fmt(metrics['clearance_rate_ci95'][0], True)}-{_fmt(metrics['clearance_rate_ci95'][1], True)} |",
        f"| mean picks per hour (robot time) | {_fmt(metrics['mpph'])} | |",
        f"| picks per hour with exposed planning | {_fmt(metrics.get('mpph_with_planning'))} | |",
        f"| picks per hour excluding waits for a person | {_fmt(metrics.get('mpph_excluding_waits'))} | |",
        f"| share of the layout's limit ({_fmt(metrics.get('mpph_limit'))} MPPH) | "
        f"{_fmt(metrics.get('mpph_share_of_limit'), True)} | |",
        f"| assists per 100 picks | {_fmt(metrics['assists_per_100_picks'])} | |",
        f"| human seconds per 100 picks | {_fmt(metrics['human_seconds_per_100_picks'])} | |",
        f"| damage rate | {_fmt(metrics['damage_rate'], True)} | "
        f"{_fmt(metrics['damage_rate_ci95'][0], True)}-{_fmt(metrics['damage_rate_ci95'][1], True)} |",
        f"| planning latency p50 / p99 | {_fmt(metrics['plan_latency_ms_p50'])} / "
        f"{_fmt(metrics['plan_latency_ms_p99'])} ms | |",
        f"| picks / attempts / items | {metrics['picks']} / {metrics['attempts']} / {metrics['items']} | |",
        f"| wall seconds | {_fmt(metrics.get('wall_seconds'))} | |",
        "",
        "Failures by reason: "
        + (", ".join(f"{k} {v}" for k, v in metrics["failures_by_reason"].items()) or "none"),
        "",
        "![success by family](success_by_family.png)",
        "![latency](latency_hist.png)",
        "![cycle](cycle_breakdown.png)",
        "![picks over time](picks_over_time.png)",
        "",
        "## Failed picks",
        "",
    ]
    lines += [f"![failed pick]({Path(p).name})" for p in failed] or ["No failed picks were recorded."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
