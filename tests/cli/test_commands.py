"""The `pickcell` command as users run it: help for every subcommand, and the README's demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pickcell.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def _subcommands(parser) -> list[list[str]]:
    out = []
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in action.choices.items():
            out.append([name])
            out += [[name, *rest] for rest in _subcommands(sub)]
    return out


@pytest.mark.parametrize("argv", _subcommands(build_parser()), ids=lambda a: " ".join(a))
def test_every_subcommand_explains_itself(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"pickcell {' '.join(argv)}" in text and len(text.splitlines()) > 3


def test_demo_runs_broker_cell_and_associate_and_writes_a_summary(tmp_path):
    out = tmp_path / "demo.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pickcell",
            "demo",
            "--totes",
            "1",
            "--json",
            str(out),
            "--data",
            str(tmp_path / "d"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(out.read_text())
    assert summary["totes"] == 1 and summary["picks"] >= 1
    assert summary["attempts"] >= summary["picks"]
    assert "pickcell demo summary" in proc.stdout and "CURVE on" in proc.stdout
    # everything the cell did is in its ledger, and the broker journaled every question
    from hitl.ledger import Ledger

    led = Ledger(tmp_path / "d" / "ledger.sqlite")
    counts = led.counts()
    assert counts["attempts"] == summary["attempts"]
    assert counts["requests"] == summary["assists_requested"]
    led.close()


def test_train_from_sim_collects_in_simulation_and_refuses_too_little_data(tmp_path):
    """The CLI wiring of `pickcell train --from-sim`: it collects and exports, then training refuses
    2 totes of data with a clear error and writes no model (training: tests/sim/test_collect.py)."""
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "pickcell", "train", "--from-sim", "--episodes", "2", "--epochs", "2"]
    cmd += [
        "--gate-episodes",
        "0",
        "--watchdog-scenes",
        "0",
        "--workers",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "need at least 200 to train" in proc.stdout + proc.stderr
    assert not out.exists()
    manifest = json.loads((tmp_path / "m.work" / "data" / "manifest.json").read_text())
    assert manifest["rows"] > 0 and manifest["parts"][0]["counts"]["by_source"] == {"sim": manifest["rows"]}
    collected = json.loads((tmp_path / "m.work" / "collect" / "collect.json").read_text())
    assert collected["n_totes"] == 2
    assert set(collected["config"]["catalogs"]) == {"train", "procedural-train"}  # never the test catalogs
