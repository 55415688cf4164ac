"""Sockets for the fleet: CURVE on by default, the peer's name bound to its key, msgpack bodies.

Key folders (zmq.auth certificate files, made by `pickcell fleet init`):
    fleet service:  <fleet>/keys/fleet.key_secret, <fleet>/keys/allowed/<cell>.key
    cell:           <cell-keys>/<cell>.key_secret, <cell-keys>/fleet.key, <cell-keys>/signing.pub
The name of a cell's public key file in `allowed/` is its authenticated identity: the service takes a
cell's status and ledger rows only under that name, whatever the message claims.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from hitl.keys import ClientKeys, KeyFileError, load_public

log = logging.getLogger(__name__)

SERVER_KEY_NAME = "fleet"
MAX_MESSAGE = 8 * 1024 * 1024  # bytes; larger messages are refused by the socket (ZMQ_MAXMSGSIZE)


class WireError(Exception):
    """A message that is not what the protocol says; the message says what is wrong."""


def pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def unpack(raw: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for bad input
        raise WireError(f"not a msgpack message ({exc})") from None
    if not isinstance(body, dict) or not isinstance(body.get("t"), str):
        raise WireError("a message is a map with a string 't' (its type)")
    return body


class Allowlist:
    """ZAP handler for a server context: CURVE keys from `allowed/`, re-read when the folder changes."""

    def __init__(self, context: zmq.Context, allowed_dir: Path) -> None:
        from zmq.auth.thread import ThreadAuthenticator
        from zmq.utils import z85

        self.allowed_dir = Path(allowed_dir)
        self.names: dict[bytes, str] = {}
        self._stamp: tuple | None = None
        self.refused = 0
        outer = self
        auth_log = logging.getLogger("fleet.auth")

        class Authenticator(ThreadAuthenticator):
            def curve_user_id(self, client_public_key: bytes) -> str:
                return outer.names.get(z85.encode(client_public_key), "unnamed")

        class Provider:
            def callback(self, domain: str, z85_key: bytes) -> bool:
                outer.refresh()
                if z85_key in outer.names:
                    return True
                outer.refused += 1
                auth_log.warning(
                    "REFUSED CURVE connection: key %s is not in %s",
                    z85_key.decode("ascii", "replace"),
                    outer.allowed_dir,
                )
                return False

        self.refresh()
        self.thread = Authenticator(context, log=auth_log)
        self.thread.start()
        self.thread.configure_curve_callback("*", credentials_provider=Provider())

    def refresh(self) -> None:
        try:
            stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(self.allowed_dir.glob("*.key")))
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self.names = _flat_allowlist(self.allowed_dir)
            self._stamp = stamp

    def stop(self) -> None:
        self.thread.stop()


def _flat_allowlist(allowed_dir: Path) -> dict[bytes, str]:
    """{z85 public key: name} of `allowed_dir/*.key`. The fleet admits one kind of client (cells), so
    its allowlist is one flat folder, unlike the assist broker's one folder per role."""
    names: dict[bytes, str] = {}
    for p in sorted(Path(allowed_dir).glob("*.key")):
        try:
            names[load_public(p)] = p.stem
        except KeyFileError as exc:
            log.error("fleet allowlist: skipping %s: %s", p, exc)
    return names


@dataclass(frozen=True)
class ServerSecurity:
    """CURVE for a server socket; `insecure` (loopback tests and demos only) turns it off."""

    keys_dir: Path | None
    insecure: bool = False

    def own(self) -> ClientKeys:
        if self.keys_dir is None:
            raise KeyFileError("CURVE is on by default: give the fleet's keys folder (pickcell fleet init)")
        return ClientKeys.from_file(Path(self.keys_dir) / f"{SERVER_KEY_NAME}.key_secret")

    def apply(self, sock: zmq.Socket, own: ClientKeys | None) -> None:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        if self.insecure:
            return
        assert own is not None
        sock.curve_server = True
        sock.curve_publickey = own.public
        sock.curve_secretkey = own.secret


@dataclass(frozen=True)
class ClientSecurity:
    """A cell's keys: its own pair, the fleet service's public key, the fleet's signing key."""

    keys_dir: Path | None
    cell_id: str
    insecure: bool = False

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        if self.insecure:
            return
        if self.keys_dir is None:
            raise KeyFileError("CURVE is on by default: give the cell's fleet keys folder")
        own = ClientKeys.from_file(Path(self.keys_dir) / f"{self.cell_id}.key_secret")
        sock.curve_publickey = own.public
        sock.curve_secretkey = own.secret
        sock.curve_serverkey = load_public(Path(self.keys_dir) / f"{SERVER_KEY_NAME}.key")


def peer_name(frame: zmq.Frame, insecure: bool) -> str:
    """The authenticated name of the peer that sent `frame` ('' without CURVE)."""
    if insecure:
        return ""
    try:
        return str(frame.get("User-Id"))
    except zmq.ZMQError:
        return ""
