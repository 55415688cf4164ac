"""Helpers and fixtures for the fleet tests: a fleet folder with keys, model files with their own versions, a
running service on loopback with CURVE, and lightweight cells (FleetLink with a recording loader)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.cell import FleetLink, LinkConfig
from fleet.keys import init_fleet
from fleet.rollout import RolloutConfig, StageRule
from fleet.service import FleetService, ServiceConfig
from grasping.modelfile import load_model, save_model

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "grasping" / "models" / "default.safetensors"


def make_version(version: str, out_dir: Path) -> Path:
    """The shipped model re-saved under another version (a distinct, valid file)."""
    m = load_model(DEFAULT_MODEL)
    out = out_dir / f"{version}.safetensors"
    meta = {k: v for k, v in m.meta.items() if k not in ("format", "format_version", "created")}
    save_model(
        out,
        m.net,
        m.calibrators,
        m.thresholds,
        m.watchdog,
        {**meta, "model_version": version},
        m.item_watchdog,
    )
    return out


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll until `cond()`; the timeout only bounds a hang, it is not what the test asserts."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class RecordingCell:
    """A lightweight cell: verifies through FleetLink, 'loads' by reading the safetensors header."""

    def __init__(self, fleet_dir: Path, name: str, svc: FleetService, data: Path, **kw) -> None:
        self.name = name
        self.loaded: list[str] = []
        self.handed: list[str] = []
        self.shadowed: list[str | None] = []
        self.counts: dict[str, dict[str, int]] = {}
        self.shadow_report: dict | None = None
        cfg = LinkConfig(
            cell_id=name,
            router=svc.router_endpoint,
            pub=svc.pub_endpoint,
            data_dir=data / name,
            keys_dir=fleet_dir / "cells" / name,
            heartbeat_s=0.2,
            status_interval_s=0.2,
            chunk_bytes=64 * 1024,
            fetch_timeout_s=1.0,
            **kw,
        )
        self.link = FleetLink(cfg, self._load, self._shadow, self._status)

    def _load(self, path: Path, version: str) -> tuple[bool, str]:
        self.handed.append(version)  # every file the subscriber hands over, loadable or not
        m = load_model(path, expected_sha256=None)
        if m.version != version:
            return False, f"file holds {m.version}"
        self.loaded.append(version)
        return True, "ok"

    def _shadow(self, path: Path | None, version: str | None) -> tuple[bool, str]:
        self.shadowed.append(version)
        return True, "ok"

    def _status(self) -> dict:
        out = {"state": "picking", "counts": self.counts, "picks_per_hour": 600.0, "assists_waiting": 0}
        if self.shadow_report is not None:
            out["shadow"] = self.shadow_report
        return out

    @property
    def running(self) -> str | None:
        return self.link.live_version


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fleet"
    init_fleet(d, [f"cell-{k}" for k in range(1, 5)])
    return d


def fast_rules(min_picks: int = 100) -> RolloutConfig:
    rule = StageRule(
        min_picks=min_picks, max_picks=5000, max_drop_auto_precision=0.05, max_drop_autonomous_pick_rate=0.05
    )
    return RolloutConfig(
        shadow=rule,
        canary=rule,
        canary_share=0.25,
        heartbeat_s=0.2,
        status_interval_s=0.2,
        chunk_bytes=64 * 1024,
    )


@pytest.fixture
def service(fleet_dir: Path):
    svc = FleetService(
        ServiceConfig(fleet_dir, router="tcp://127.0.0.1:0", pub="tcp://127.0.0.1:0", rollout=fast_rules())
    ).start()
    try:
        yield svc
    finally:
        svc.stop()
