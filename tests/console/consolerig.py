"""Helpers for the console's tests: a real broker (CURVE), a real cell client, the console served by
uvicorn on loopback, real accounts (argon2), and Debian's chromium driven by Playwright. (A module of
its own, not conftest.py: every test folder has a conftest, and `from conftest import` would pick
whichever was imported last.)"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from console.app import ConsoleConfig
from console.demo import admit, new_key
from console.server import BrokerAccess, ConsoleServer
from console.users import UserStore
from hitl.associate import AssociateClient
from hitl.broker import Broker, BrokerConfig
from hitl.client import AssistClient
from hitl.keys import ClientKeys, load_public
from hitl.messages import AssistRequest, CandidateView

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}
W, H = 640, 480
HB = 0.5  # s; broker and clients agree


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.02):
    """Poll until predicate() is truthy; fail the test (never hang) after timeout_s."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Clock:
    """Wall time plus an offset the test can move forward (session expiry without waiting hours)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.offset += seconds


def tote_png(seed: int = 0, candidates: tuple[CandidateView, ...] = ()) -> bytes:
    """A 640x480 picture of a tote with a few boxes and the candidates marked as a cell would."""
    import random

    rnd = random.Random(seed)
    img = Image.new("RGB", (W, H), (70, 80, 90))
    d = ImageDraw.Draw(img)
    d.rectangle([40, 40, W - 40, H - 40], outline=(200, 200, 200), width=4)
    for _ in range(6):
        x, y = rnd.randint(60, W - 160), rnd.randint(60, H - 140)
        d.rectangle(
            [x, y, x + rnd.randint(40, 100), y + rnd.randint(30, 80)],
            fill=tuple(rnd.randint(90, 230) for _ in range(3)),
        )
    for c in candidates:
        d.ellipse([c.u - 6, c.v - 6, c.u + 6, c.v + 6], outline=(0, 220, 0), width=2)
        d.text((c.u + 7, c.v - 7), str(c.index), fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# Candidates of the test requests: #0 alone, #1 (jaw) and #2 (cup) on the same spot, #7 far away.
CANDIDATES = (
    CandidateView(0, 200, 150, "suction", 0.62),
    CandidateView(1, 420, 300, "parallel_jaw", 0.55),
    CandidateView(2, 424, 304, "suction", 0.51),
    CandidateView(7, 100, 400, "suction", 0.33),
)


def make_request(cell_id: str = "cell-1", deadline_in_s: float = 60.0, seed: int = 0, **kw) -> AssistRequest:
    now = time.time()
    return AssistRequest(
        cell_id=cell_id,
        deadline=now + deadline_in_s,
        image_png=tote_png(seed, CANDIDATES),
        candidates=CANDIDATES,
        reasons=("low confidence: best p(success) 0.62 < 0.80", "watchdog: item unlike the training set"),
        priority=0,
        created=now,
        context={"tote_id": f"tote-{seed}", "model_version": "graspnet-sim-v4"},
        **kw,
    )


@dataclass
class Rig:
    broker: Broker
    cell: AssistClient
    console: ConsoleServer
    users: UserStore
    clock: Clock
    url: str
    data: Path
    endpoint: str

    def another_cell(self, cell_id: str = "cell-2") -> AssistClient:
        keys = self.data / "keys"
        c = AssistClient(
            self.endpoint,
            cell_id,
            ClientKeys.from_file(keys / f"{cell_id}.key_secret"),
            load_public(keys / "broker.key"),
            heartbeat_s=HB,
        )
        c.start()
        return c

    def terminal(self, name: str = "dave") -> AssociateClient:
        """An associate at `pickcell assist`, connected to the same broker."""
        keys = self.data / "keys"
        return AssociateClient(
            self.endpoint,
            ClientKeys.from_file(keys / f"{name}.key_secret"),
            load_public(keys / "broker.key"),
            heartbeat_s=HB,
        )


@pytest.fixture(scope="session")
def accounts_file(tmp_path_factory) -> Path:
    """alice and bob, hashed once per session (each argon2 hash costs ~0.5 s on a busy machine)."""
    path = tmp_path_factory.mktemp("accounts") / "users.sqlite"
    users = UserStore(path)
    for name, pw in PASSWORDS.items():
        users.add(name, pw)
    users.close()
    return path


@pytest.fixture
def rig(tmp_path: Path, accounts_file: Path):
    keys = tmp_path / "keys"
    for name, role in (
        ("broker", None),
        ("cell-1", "cell"),
        ("cell-2", "cell"),
        ("console", "console"),
        ("dave", "associate"),
    ):
        new_key(keys, name, role)
    admit(keys, "cell-1", "cell")
    admit(keys, "cell-2", "cell")
    admit(keys, "console", "console")
    admit(keys, "dave", "associate")  # an associate at a terminal, beside the console
    broker = Broker(
        BrokerConfig(
            bind=f"tcp://127.0.0.1:{free_port()}", data_dir=tmp_path / "broker", keys_dir=keys, heartbeat_s=HB
        )
    )
    endpoint = broker.start()
    shutil.copyfile(accounts_file, tmp_path / "users.sqlite")  # WAL checkpointed at close: one file
    users = UserStore(tmp_path / "users.sqlite")
    clock = Clock()
    console = ConsoleServer(
        BrokerAccess.from_keys_dir(endpoint, keys, "console"),
        users,
        ConsoleConfig(tick_s=0.2, fleet_every_s=0.5, reconnect_grace_s=30.0),
        clock=clock,
        heartbeat_s=HB,
    )
    url = console.start()
    cell = AssistClient(
        endpoint,
        "cell-1",
        ClientKeys.from_file(keys / "cell-1.key_secret"),
        load_public(keys / "broker.key"),
        heartbeat_s=HB,
    )
    cell.start()
    wait_for(
        lambda: console.state.link is not None and console.state.link.connected,
        10,
        "the console to reach the broker",
    )
    yield Rig(broker, cell, console, users, clock, url, tmp_path, endpoint)
    cell.close()
    console.stop()
    broker.stop()
    users.close()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `./run.sh test` installs Debian's chromium (apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    pg.set_default_timeout(15_000)
    yield pg
    ctx.close()


def sign_in(page, url: str, name: str, password: str) -> None:
    page.goto(url + "/")
    page.wait_for_url(url + "/login")
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("#sign-in")
