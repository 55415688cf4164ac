"""Fixtures for the assist-queue tests: real keys, real brokers (in-thread or subprocess), real sockets."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import zmq

from hitl import protocol as P
from hitl.broker import Broker, BrokerConfig
from hitl.keys import ClientKeys, load_public, new_keypair
from hitl.messages import AssistRequest, CandidateView

REPO = Path(__file__).resolve().parents[2]
# Faster than the 1 s production default so that "3 missed heartbeats" takes 0.9 s, yet slow enough
# that a busy 2-core machine does not miss beats by accident.
HB = 0.3


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


ROLES_OF = {"cell-1": "cell", "cell-2": "cell", "cell-3": "cell", "alice": "associate", "bob": "associate",
            "desk": "console"}  # fmt: skip


@dataclass
class Keyring:
    keys_dir: Path  # broker.key_secret + allowed/ROLE/
    server_key: bytes
    stranger_dir: Path

    def client(self, name: str) -> ClientKeys:
        (path,) = (self.keys_dir / "allowed").glob(f"*/{name}.key_secret")
        return ClientKeys.from_file(path)

    def path(self, name: str) -> Path:
        """Where NAME's public key sits in the allowlist (delete it to revoke)."""
        (path,) = (self.keys_dir / "allowed").glob(f"*/{name}.key")
        return path

    def stranger(self) -> ClientKeys:
        return ClientKeys.from_file(self.stranger_dir / "mallory.key_secret")


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    keys = tmp_path / "keys"
    new_keypair("broker", keys)
    for name, role in ROLES_OF.items():
        # Secret keys beside the public ones only because this is a test: in a site, the allowlist
        # holds public keys alone.
        new_keypair(name, keys / "allowed" / role, role=role)
    new_keypair("mallory", tmp_path / "strangers", role="associate")
    return Keyring(keys, load_public(keys / "broker.key"), tmp_path / "strangers")


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A real PNG (seeded noise) of the given size, as a cell would send."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


PNG_64x48 = png_bytes()


def make_request(
    cell_id: str = "cell-1",
    deadline_in_s: float = 30.0,
    priority: int = 0,
    request_id: str | None = None,
    n_candidates: int = 3,
    image: bytes = PNG_64x48,
) -> AssistRequest:
    kw = {"request_id": request_id} if request_id else {}
    return AssistRequest(
        cell_id=cell_id,
        deadline=time.time() + deadline_in_s,
        image_png=image,
        candidates=tuple(
            CandidateView(i, 10 * i, 20 + i, "suction", 0.3 + 0.1 * i) for i in range(n_candidates)
        ),
        reasons=("low confidence", "watchdog: shifted"),
        priority=priority,
        created=time.time(),
        context={"tote": "T1"},
        **kw,
    )


@pytest.fixture
def broker(tmp_path: Path, keyring: Keyring):
    """A CURVE broker in a thread, on a random free port."""
    b = Broker(
        BrokerConfig(
            bind=f"tcp://127.0.0.1:{free_port()}",
            data_dir=tmp_path / "data",
            keys_dir=keyring.keys_dir,
            heartbeat_s=HB,
        )
    )
    b.start()
    yield b
    b.stop()


class BrokerProcess:
    """`python -m hitl.broker` as a real process, so that tests can SIGKILL it."""

    def __init__(self, endpoint: str, data_dir: Path, keys_dir: Path, log_path: Path):
        self.endpoint, self.data_dir, self.keys_dir, self.log_path = endpoint, data_dir, keys_dir, log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "hitl.broker", "--bind", self.endpoint, "--data", str(self.data_dir),
               "--keys", str(self.keys_dir), "--heartbeat", str(HB), "-v"]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
        log.close()
        wait_for(lambda: b"listening on" in self.log_path.read_bytes() or self.proc.poll() is not None,
                 timeout_s, "broker process to listen")  # fmt: skip
        assert self.proc.poll() is None, self.log_path.read_text()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def broker_process(tmp_path: Path, keyring: Keyring):
    bp = BrokerProcess(
        f"tcp://127.0.0.1:{free_port()}", tmp_path / "data", keyring.keys_dir, tmp_path / "broker.log"
    )
    yield bp
    bp.stop()


def journal_holder(data_dir: Path, request_id: str) -> str | None:
    """Who the journal says holds a request (None: nobody, or no such request)."""
    db = sqlite3.connect(str(data_dir / "journal.sqlite"))
    try:
        row = db.execute("SELECT holder FROM requests WHERE request_id = ?", (request_id,)).fetchone()
    finally:
        db.close()
    return row[0] if row else None


def journal_rows(data_dir: Path) -> dict[str, tuple]:
    """request_id -> (state, answer status, associate_id, delivered_at) straight from the SQLite file.

    Only for tests whose request ids are unique across cells (the journal's key is (cell_id, request_id))."""
    db = sqlite3.connect(str(data_dir / "journal.sqlite"))
    try:
        rows = db.execute(
            "SELECT r.request_id, r.state, a.status, a.associate_id, a.delivered_at "
            "FROM requests r LEFT JOIN answers a USING (request_id)"
        ).fetchall()
    finally:
        db.close()
    return {r[0]: r[1:] for r in rows}


class RawPeer:
    """A bare DEALER speaking the protocol by hand: for malformed input and for checking frames."""

    def __init__(self, endpoint: str, keys: ClientKeys | None, server_key: bytes | None, ctx=None):
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 3000)  # a DEALER with no connected peer blocks on send
        if keys is not None:
            self.sock.curve_serverkey = server_key
            self.sock.curve_publickey = keys.public
            self.sock.curve_secretkey = keys.secret
        self.sock.connect(endpoint)

    def send(self, msg_type: bytes, body: dict) -> None:
        self.sock.send_multipart(P.encode(msg_type, body))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 5.0, skip_heartbeats: bool = True) -> tuple[bytes, dict] | None:
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000):
                return None
            frames = self.sock.recv_multipart()
            assert frames[0] == P.PROTOCOL and len(frames) == 3, frames
            body = msgpack.unpackb(frames[2], raw=False)
            if skip_heartbeats and frames[1] == P.HEARTBEAT:
                continue
            return frames[1], body

    def expect(self, msg_type: bytes, timeout_s: float = 5.0) -> dict:
        got = self.recv(timeout_s)
        assert got is not None, f"no {msg_type!r} within {timeout_s} s"
        assert got[0] == msg_type, got
        return got[1]

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def hx():
    """The helpers above, as a fixture: test modules cannot import a conftest by name reliably."""
    import types

    return types.SimpleNamespace(
        HB=HB,
        free_port=free_port,
        wait_for=wait_for,
        make_request=make_request,
        png_bytes=png_bytes,
        journal_rows=journal_rows,
        journal_holder=journal_holder,
        RawPeer=RawPeer,
    )
