"""Fixtures for tests/console. The helpers live in consolerig.py: every test folder has a conftest,
so `from conftest import ...` would pick up whichever one was imported last."""

from consolerig import *  # noqa: F401,F403
