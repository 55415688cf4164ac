"""The benchmark report: a Markdown page with PNG plots and annotated frames of failed picks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else (f"{x:.1f}" if isinstance(x, float) else str(x))


def write_report(out_dir: Path, metrics: dict[str, Any], episodes: list[dict[str, Any]], args: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # success by family, with 95% CIs
    fams = metrics["families"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(fams)
    vals = [fams[f]["first_attempt_success"]["value"] or 0.0 for f in names]
    lo = [v - fams[f]["first_attempt_success"]["ci95"][0] for f, v in zip(names, vals, strict=True)]
    hi = [fams[f]["first_attempt_success"]["ci95"][1] - v for f, v in zip(names, vals, strict=True)]
    ax.bar(names, vals, yerr=[lo, hi], capsize=4, color="#4c72b0")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("first-attempt success")
    ax.set_title("First-attempt success by item family (95% CI)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out / "success_by_family.png", dpi=110)
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

    # cycle-time breakdown per pick
    picks = max(metrics["picks"], 1)
    parts = {
        "motion + idle (robot)": metrics["robot_seconds"] / picks,
        "sensing": metrics["sensing_seconds"] / picks,
        "planning": metrics["planning_seconds"] / picks,
    }
    fig, ax = plt.subplots(figsize=(6, 2.2))
    left = 0.0
    for (name, v), c in zip(parts.items(), ["#4c72b0", "#dd8452", "#55a868"], strict=True):
        ax.barh([0], [v], left=left, color=c, label=f"{name}: {v:.2f} s")
        left += v
    ax.set_yticks([])
    ax.set_xlabel("seconds per successful pick")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, fontsize=8)
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
        "| metric | value | 95% CI |",
        "| --- | --- | --- |",
        f"| first-attempt success | {_fmt(metrics['first_attempt_success'], True)} | "
        f"{_fmt(metrics['first_attempt_success_ci95'][0], True)}-"
        f"{_fmt(metrics['first_attempt_success_ci95'][1], True)} |",
        f"| clearance rate | {_fmt(metrics['clearance_rate'], True)} | "
        f"{_fmt(metrics['clearance_rate_ci95'][0], True)}-{_fmt(metrics['clearance_rate_ci95'][1], True)} |",
        f"| mean picks per hour (robot time) | {_fmt(metrics['mpph'])} | |",
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
