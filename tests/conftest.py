"""Shared pytest fixtures. Keep small: package-specific helpers live next to their tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def sim_cell():
    """A fresh simulated cell (PyBullet DIRECT, seed 0) with an empty tote; closed after the test."""
    from sim.scene import SimCell

    cell = SimCell(seed=0)
    try:
        yield cell
    finally:
        cell.close()
