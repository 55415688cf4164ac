"""Fixtures for the fleet tests (helpers live in fleetrig.py)."""

from fleetrig import fleet_dir, service  # noqa: F401
