"""`pickcell fleet` as people use it: init, serve, publish (gated or --force), status --json, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fleetrig import DEFAULT_MODEL, wait_for

from fleet.rollout import RolloutConfig, RolloutConfigError
from fleet.service import send_control
from pickcell.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_init_serve_publish_status(tmp_path, capsys) -> None:
    d = tmp_path / "fleet"
    assert main(["fleet", "init", "--dir", str(d), "--cell", "cell-1", "--cell", "cell-2"]) == 0
    assert (d / "keys" / "allowed" / "cell-2.key").exists() and (
        d / "cells" / "cell-1" / "signing.pub"
    ).exists()
    assert oct((d / "keys" / "signing.ed25519").stat().st_mode & 0o777) == "0o600"
    assert oct(d.stat().st_mode & 0o777) == "0o700"  # keys and the control socket: the owner only
    assert RolloutConfig.load(d / "fleet.toml") == RolloutConfig()  # the written defaults are the defaults
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pickcell",
            "fleet",
            "serve",
            "--dir",
            str(d),
            "--router",
            "tcp://127.0.0.1:0",
            "--pub",
            "tcp://127.0.0.1:0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def up() -> bool:
            try:
                return bool(send_control(d, "status", timeout_s=0.5)["ok"])
            except TimeoutError:
                return False

        wait_for(up, 60, "the fleet service")
        capsys.readouterr()
        # The shipped model has no gate verdict in this registry: refused without --force, clearly.
        assert main(["fleet", "publish", str(DEFAULT_MODEL), "--dir", str(d)]) == 1
        assert "has not been gated" in capsys.readouterr().err
        assert main(["fleet", "publish", str(DEFAULT_MODEL), "--dir", str(d), "--force", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["stage"] == "everyone"
        assert main(["fleet", "status", "--dir", str(d), "--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert s["rollout"]["live"] == "graspnet-sim-v4" and set(s["cells"]) == {"cell-1", "cell-2"}
        assert s["cells"]["cell-1"]["state"] == "never seen"
        assert main(["fleet", "rollback", "--dir", str(d)]) == 1  # nothing earlier to go back to
        assert "nothing to roll back" in capsys.readouterr().err
        assert main(["fleet", "promote", "--dir", str(d)]) == 1
        assert "no version is being rolled out" in capsys.readouterr().err
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0


def test_status_without_a_service_says_so(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "f").mkdir()
    from fleet import service

    real = service.send_control
    monkeypatch.setattr(service, "send_control", lambda *a, **k: real(*a, **{**k, "timeout_s": 0.2}))
    assert main(["fleet", "status", "--dir", str(tmp_path / "f")]) == 1
    assert "is `pickcell fleet serve" in capsys.readouterr().err


def test_bad_fleet_toml_names_the_field(tmp_path) -> None:
    p = tmp_path / "fleet.toml"
    p.write_text("[canary]\nmin_pick = 3\n")
    with pytest.raises(RolloutConfigError, match="min_pick"):
        RolloutConfig.load(p)
    p.write_text("canary_share = 1.5\n")
    with pytest.raises(RolloutConfigError, match="canary_share"):
        RolloutConfig.load(p)
