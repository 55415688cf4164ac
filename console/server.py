"""Run the console: its broker link, its users, and uvicorn serving the app.

`serve_forever` is `pickcell console`; `ConsoleServer` runs the same thing in a background thread for
the demo, the browser tests and the latency benchmark.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from console.app import ConsoleConfig, create_app
from console.fleet import BrokerFleetSource, FleetServiceSource
from console.link import ConsoleLink
from console.users import UserStore
from hitl.keys import BROKER_KEY_NAME, ClientKeys, KeyFileError, load_public

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAccess:
    """How the console reaches the broker. The keys stay in this process; the browser never sees them."""

    endpoint: str
    keys: ClientKeys | None  # the console's own CURVE key pair; None = insecure loopback broker
    server_public_key: bytes | None  # the broker's public key

    @classmethod
    def from_keys_dir(cls, endpoint: str, keys_dir: str | Path, name: str = "console") -> BrokerAccess:
        """NAME.key_secret and broker.key from one folder (what `pickcell keys new` writes)."""
        d = Path(keys_dir)
        return cls(
            endpoint,
            ClientKeys.from_file(d / f"{name}.key_secret"),
            load_public(d / f"{BROKER_KEY_NAME}.key"),
        )


def parse_bind(bind: str) -> tuple[str, int]:
    """'127.0.0.1:8080' -> ('127.0.0.1', 8080); '[::1]:8080' works too."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise ValueError(f"--bind wants HOST:PORT (e.g. 127.0.0.1:8080), got {bind!r}")
    return host.strip("[]"), int(port)


def build_app(
    access: BrokerAccess,
    users: UserStore,
    config: ConsoleConfig | None = None,
    clock: Callable[[], float] = time.time,
    fleet_dir: str | Path | None = None,
    **link_kwargs: Any,
):
    """The app; with `fleet_dir`, the fleet view adds the fleet service's status to the broker's view."""

    def link_factory(on_event):
        return ConsoleLink(access.endpoint, access.keys, access.server_public_key, on_event, **link_kwargs)

    fleet_factory = None
    if fleet_dir is not None:

        def fleet_factory(desk, link):
            return FleetServiceSource(fleet_dir, BrokerFleetSource(desk, link))

    return create_app(link_factory, users, config, clock, fleet_factory)


def _uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        lifespan="on",
        access_log=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
    )


def serve_forever(
    access: BrokerAccess,
    users: UserStore,
    bind: str,
    config: ConsoleConfig,
    fleet_dir: str | Path | None = None,
) -> int:
    host, port = parse_bind(bind)
    if host not in ("127.0.0.1", "localhost", "::1") and not config.cookie_secure:
        log.warning(
            "console bound to %s without --secure-cookies: put a TLS proxy in front before people sign "
            "in over a network (passwords and session cookies would cross it in clear)",
            host,
        )
    server = uvicorn.Server(
        _uvicorn_config(build_app(access, users, config, fleet_dir=fleet_dir), host, port)
    )
    print(f"pickcell console on http://{host}:{port}/ (broker {access.endpoint})", flush=True)
    server.run()
    return 0


class ConsoleServer:
    """The console in a background thread (demo, tests, benchmark). `url` once `start()` returns."""

    def __init__(
        self,
        access: BrokerAccess,
        users: UserStore,
        config: ConsoleConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        fleet_dir: str | Path | None = None,
        **link_kwargs: Any,
    ):
        self.app = build_app(access, users, config, clock, fleet_dir, **link_kwargs)
        self.server = uvicorn.Server(_uvicorn_config(self.app, host, port))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.host = host
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def state(self):
        """The running console's state (desk, sessions, link): for tests and the benchmark."""
        return self.app.state

    def start(self, timeout_s: float = 20.0) -> str:
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the console web server did not start (port taken?)")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


__all__ = ["BrokerAccess", "ConsoleServer", "KeyFileError", "build_app", "parse_bind", "serve_forever"]
