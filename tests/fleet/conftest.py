"""Fixtures for tests/fleet. The helpers live in fleetrig.py: every test folder has a conftest,
so `from conftest import ...` would pick up whichever one was imported last."""

from fleetrig import *  # noqa: F401,F403
