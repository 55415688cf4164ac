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
    # the fleet service runs too: the starting model is its first live version, and the cell received it
    # over the fleet protocol (hash and signature checked) and loaded it, and reported it back
    assert "fleet service on" in proc.stdout
    fleet = summary["fleet"]
    assert fleet["live"] == summary["model_version"] == fleet["cell_model_version"]
    assert fleet["model_loads_from_fleet"] >= 1
    verdicts = [json.loads(x) for x in (tmp_path / "d" / "fleet" / "verdicts.jsonl").read_text().splitlines()]
    assert verdicts[0]["action"] == "first-live" and verdicts[0]["forced"] is True
    assert any((tmp_path / "d" / "cell-1" / "fleet" / "models").glob("*.safetensors"))
    # the operator metrics of issue 12, from the same bookkeeping as `pickcell bench`
    assert "items placed by the model alone" in proc.stdout and "procedural items" in proc.stdout
    assert summary["items"] == 6 and summary["max_attempts_on_one_item"] >= 1
    alone = summary["autonomous_pick_rate"] * summary["items"]
    assert abs(alone - round(alone)) < 1e-9 and round(alone) <= summary["picks"]
    assert 0.0 <= summary["auto_precision"] <= 1.0 and summary["auto_attempts"] <= summary["attempts"]
    assert summary["auto_attempts"] + summary["person_attempts"] == summary["attempts"]
    left = summary["items_left_rate"] * summary["items"]
    assert round(left) == sum(summary["items_left_by_fate"].values())
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


def test_refit_watchdog_fits_the_current_item_descriptor_into_a_copy_and_leaves_the_source(tmp_path):
    """An upgraded descriptor leaves an old item watchdog reading the features it knows
    (`guaranteed.safetensors`, the shipped network with thresholds refit before descriptor version 3,
    is version 2: no `opening`); `sim refit-watchdog` fits one on the current version. (The shipped
    default was refit this way in stop 30.)"""
    import shutil

    from grasping.modelfile import file_sha256, load_model, read_sidecar, sidecar_path
    from grasping.watchdog import ITEM_DESCRIPTOR_VERSION, ITEM_FEATURE_COUNT, ITEM_FEATURES

    src = REPO / "grasping" / "models" / "guaranteed.safetensors"
    shipped = load_model(src)
    old = tmp_path / "old.safetensors"
    shutil.copy(src, old)
    shutil.copy(sidecar_path(src), sidecar_path(old))
    assert shipped.item_watchdog.version == 2 < ITEM_DESCRIPTOR_VERSION
    assert shipped.item_watchdog.center.shape == (ITEM_FEATURE_COUNT[2],)
    before = file_sha256(old)
    out = tmp_path / "new.safetensors"
    argv = [sys.executable, "-m", "pickcell", "sim", "refit-watchdog", str(old), "--out", str(out)]
    proc = subprocess.run(
        [*argv, "--scenes", "4", "--item-threshold-scenes", "4", "--workers", "1", "--seed", "11", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(proc.stdout)
    assert file_sha256(old) == before  # the source is untouched
    assert read_sidecar(out) == file_sha256(out) == info["sha256"]
    new = load_model(out)
    assert new.item_watchdog is not None and new.item_watchdog.version == ITEM_DESCRIPTOR_VERSION
    assert new.item_watchdog.bank.shape[0] == info["item_watchdog"]["item_watchdog_items"] > 10
    assert new.item_watchdog.center.shape == (len(ITEM_FEATURES),)  # now with `opening`
    # Doubt per item: a per-item threshold from 4 further totes (not the bank's), in the file.
    thr = info["item_watchdog"]["item_threshold"]
    assert thr["items"] >= 20 and new.item_watchdog.item_threshold == pytest.approx(thr["item_threshold"])
    assert info["scenes_ref"] + info["scenes_threshold"] == 4
    # The network is the same one: refitting the watchdog does not retrain.
    for a, b in zip(new.net.state_dict().values(), shipped.net.state_dict().values(), strict=True):
        assert (a == b).all()


def test_refit_watchdog_names_a_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    proc = subprocess.run(
        [sys.executable, "-m", "pickcell", "sim", "refit-watchdog", str(bad), "--scenes", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
    assert bad.read_bytes() == b"not a model"
