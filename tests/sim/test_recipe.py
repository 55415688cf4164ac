"""The shipped model's rebuild recipe (sim/recipe.py): it parses, bad recipes are refused naming the
problem, and `pickcell train --recipe ... --reduced` runs every step of it end to end (two rounds of
seeded collection, the second replaying the first's data and letting its model choose candidates)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sim.recipe import RecipeError, load_recipe, reduce

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO / "grasping" / "models" / "default.recipe.toml"


def test_the_default_recipe_parses_and_reduces():
    r = load_recipe(DEFAULT_RECIPE)
    assert r.version == "graspnet-sim-v5" and len(r.rounds) == 2
    assert r.rounds[0].p_model_top == 0 and r.rounds[1].p_model_top > 0
    assert sum(x.episodes for x in r.rounds) >= 900  # about v4's 957 scenes
    assert r.train["seed"] == 3 and len(r.sha256) == 64
    small = reduce(r)
    assert small.version == "graspnet-sim-v5-reduced"
    assert [x.episodes for x in small.rounds] == [16, 3] and small.train["epochs"] == 1
    assert [x.seed for x in small.rounds] == [x.seed for x in r.rounds]  # the same totes, fewer of them


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('version = "v"\n', "at least one [[rounds]]"),
        ("[[rounds]]\nepisodes = 2\nseed = 1\n", "`version`"),
        ('version = "v"\ncolour = 1\n[[rounds]]\nepisodes = 2\nseed = 1\n', "unknown keys ['colour']"),
        ('version = "v"\n[[rounds]]\nepisodes = 2\nseed = 1\np_model_top = 0.5\n', "no previous model"),
        ('version = "v"\n[[rounds]]\nepisodes = 0\nseed = 1\n', "episodes >= 1"),
        ('version = "v"\n[[rounds]]\nepisodes = 2\nseed = 1\n[train]\nepochz = 3\n', "unknown [train] keys"),
        ('version = "v\n', "not valid TOML"),
    ],
)
def test_a_bad_recipe_is_refused_naming_the_file_and_the_problem(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_the_reduced_rebuild_runs_every_step_from_the_command_line(tmp_path):
    out = tmp_path / "m.safetensors"
    env = dict(os.environ, MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "pickcell", "train", "--recipe", str(DEFAULT_RECIPE), "--reduced"]
    cmd += ["--out", str(out), "--workers", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from grasping.modelfile import load_model

    m = load_model(out)
    assert m.version == "graspnet-sim-v5-reduced"
    card = out.with_suffix(".md").read_text()
    recipe = load_recipe(DEFAULT_RECIPE)
    assert recipe.sha256 in card and "round 2 of 2" in card
    work = Path(str(out.with_suffix("")) + ".work")
    assert "round-1/data" in card  # round 2 replayed round 1's collection
    # round 1 wrote its own model, which chose a share of round 2's executed candidates
    assert load_model(work / "round-1" / "model.safetensors").version == "graspnet-sim-v5-reduced-round1"
    chosen = []
    for db in (work / "round-2" / "collect").glob("ledger-*.db"):
        with sqlite3.connect(db) as c:
            chosen += [r[0] for r in c.execute("SELECT decided_by FROM attempts")]
    assert "explore:model_top" in chosen  # candidates round 1's model chose
    assert {d for d in chosen} - {"explore:model_top"}  # and the analytic / random exploration beside it
