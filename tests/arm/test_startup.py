"""`pickcell cell run` refuses a missing or corrupt model file, naming it: never a silent fallback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arm.daemon import StartupError, check_model_file
from sim.stack import DEFAULT_MODEL, build_planner

REPO = Path(__file__).resolve().parents[2]


def _cell_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pickcell",
            "cell",
            "run",
            "--data",
            str(tmp_path / "cell"),
            "--broker",
            "none",
            "--metrics-port",
            "-1",
            "--totes",
            "0",
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_corrupt_model_file_is_refused_by_cell_run_with_its_name(tmp_path):
    bad = tmp_path / "bad.safetensors"
    data = DEFAULT_MODEL.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated, as an interrupted copy leaves it
    proc = _cell_run(tmp_path, "--model", str(bad))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(bad) in proc.stderr and "refusing to start" in proc.stderr
    assert "--planner analytic" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cell" / "ledger.sqlite").exists()  # refused before anything was set up


def test_a_missing_model_file_is_refused_and_analytic_must_be_asked_for(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    proc = _cell_run(tmp_path, "--model", str(missing))
    assert proc.returncode == 2 and str(missing) in proc.stderr and "does not exist" in proc.stderr
    ok = _cell_run(tmp_path, "--model", str(missing), "--planner", "analytic")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "model analytic" in ok.stdout


def test_a_model_whose_hash_does_not_match_its_sidecar_is_refused(tmp_path):
    copy = tmp_path / "m.safetensors"
    shutil.copy(DEFAULT_MODEL, copy)
    (tmp_path / "m.safetensors.sha256").write_text("0" * 64 + "  m.safetensors\n")
    with pytest.raises(StartupError, match="sha256 mismatch"):
        check_model_file(copy)
    # the simulated stack does not fall back to analytic scoring either, unless asked to
    from grasping.modelfile import ModelFileError
    from grasping.types import Bounds

    tote = Bounds([0.3, -0.2, 0.0], [0.7, 0.2, 0.2])
    with pytest.raises(ModelFileError, match=str(copy)):
        build_planner("learned", tote, model_path=copy)
    assert build_planner("learned", tote, model_path=copy, fallback=True)[1] == "analytic"
    assert check_model_file(DEFAULT_MODEL)
