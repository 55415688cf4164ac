"""Tuning seeds vs reporting seeds: published numbers come from a range never used to tune."""

from __future__ import annotations

import json

from pickcell.cli import main
from sim.benchmark.runner import REPORTING_SEEDS, TUNING_SEEDS, episode_seeds, seed_range


def test_the_two_ranges_are_documented_and_disjoint():
    assert (TUNING_SEEDS.start, TUNING_SEEDS.stop) == (0, 100)
    assert (REPORTING_SEEDS.start, REPORTING_SEEDS.stop) == (1000, 1100)
    assert seed_range(0) == seed_range(99) == "tuning"
    assert seed_range(1000) == seed_range(1099) == "reporting"
    assert seed_range(500) == "other"
    # and so are the totes they make: no episode seed of a tuning run appears in a reporting run
    tuning = {s for b in TUNING_SEEDS for s in episode_seeds(b, 20)}
    reporting = {s for b in REPORTING_SEEDS for s in episode_seeds(b, 20)}
    assert not tuning & reporting


def test_reporting_refuses_a_tuning_seed(capsys):
    assert main(["bench", "--reporting", "--seed", "11", "--episodes", "1", "--no-progress"]) == 2
    assert "--reporting needs a reporting seed (1000-1099), got --seed 11" in capsys.readouterr().err


def test_reporting_defaults_to_the_first_reporting_seed_and_says_so(tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["bench", "--reporting", "--episodes", "1", "--objects-per-tote", "1", "--planner", "analytic"]
    argv += ["--catalog", "procedural", "--associate", "none", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    m = json.loads(out.read_text())
    assert m["config"]["seed"] == 1000 and m["seed_range"] == "reporting"
    assert "reporting (--seed 1000)" in capsys.readouterr().out
