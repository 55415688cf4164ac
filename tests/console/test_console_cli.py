"""`pickcell console` as a site admin runs it: a real process serving the page for a real broker, and a
clear error when the console's key is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from consolerig import PASSWORDS, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def _pickcell(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "pickcell", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_pickcell_console_serves_the_page_for_the_broker(rig, tmp_path):
    users = tmp_path / "cli-users.sqlite"  # not the rig console's accounts
    add = _pickcell(
        "console", "users", "add", "erin", "--password-stdin", "--users", str(users), stdin=subprocess.PIPE
    )
    out, _ = add.communicate("erin-password-3\n", timeout=60)
    assert add.returncode == 0, out
    port = free_port()
    proc = _pickcell(
        "console", "--connect", rig.endpoint, "--keys", str(rig.data / "keys"), "--bind", f"127.0.0.1:{port}",
        "--users", str(users),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(url + "/login", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "pickcell console to serve")
        with httpx.Client(base_url=url, timeout=15) as c:
            token = c.get("/login").text.split('name="csrf-token" content="')[1].split('"')[0]
            r = c.post(
                "/api/login",
                json={"name": "erin", "password": "erin-password-3"},
                headers={"X-CSRF-Token": token},
            )
            assert r.status_code == 200 and r.json()["user"] == "erin"
            fleet = c.get("/api/fleet").json()
            assert fleet["source"] == "assist broker"  # this console reached the broker
            # its accounts are its own file: the rig console's alice is unknown here
            token = c.get("/login").text.split('name="csrf-token" content="')[1].split('"')[0]
            assert c.post("/api/login", json={"name": "alice", "password": PASSWORDS["alice"]},
                          headers={"X-CSRF-Token": token}).status_code == 401  # fmt: skip
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "pickcell console on http://127.0.0.1:" in out


def test_pickcell_console_without_its_key_says_how_to_make_one(tmp_path):
    proc = _pickcell("console", "--keys", str(tmp_path / "nokeys"), "--users", str(tmp_path / "u.sqlite"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "console.key_secret" in out and "pickcell keys new console --role console" in out
