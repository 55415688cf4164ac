"""Fixtures for the controller tests (helpers live in cellrig.py)."""

from cellrig import assist_rig, stack_factory  # noqa: F401
