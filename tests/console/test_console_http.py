"""The console's guards, over real HTTP and WebSocket connections to the running server (uvicorn on
loopback), with a real broker and cell behind it: CSRF, origin, rate limit, sessions, validation of
everything a browser sends, and no broker key material in anything served."""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest
from consolerig import PASSWORDS, make_request, wait_for
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from console import cli as console_cli
from console.users import UserError, UserStore


class Person:
    """One signed-in browser, without the browser: an HTTP client plus the page's WebSocket."""

    def __init__(self, url: str, name: str, password: str | None = None):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=15)
        self.states: list[dict] = []
        self.ws = None
        r = self.sign_in(name, password or PASSWORDS[name])
        assert r.status_code == 200, r.text
        self.csrf = re.search(r'name="csrf-token" content="([^"]+)"', self.http.get("/").text).group(1)

    def sign_in(self, name: str, password: str) -> httpx.Response:
        page = self.http.get("/login")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
        return self.http.post(
            "/api/login", json={"name": name, "password": password}, headers={"X-CSRF-Token": token}
        )

    def open_page(self) -> None:
        cookie = "; ".join(f"{k}={v}" for k, v in self.http.cookies.items())
        host = self.url.removeprefix("http://")
        self._ws_cm = connect(f"ws://{host}/ws", additional_headers={"Cookie": cookie, "Origin": self.url})
        self.ws = self._ws_cm.__enter__()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                msg = json.loads(raw)
                if msg["type"] == "state":
                    self.states.append(msg)
        except Exception:
            return

    def holding(self) -> str | None:
        return (
            self.states[-1]["request"]["request_id"] if self.states and self.states[-1]["request"] else None
        )

    def post(self, path: str, body: dict, **headers) -> httpx.Response:
        return self.http.post(path, json=body, headers={"X-CSRF-Token": self.csrf, **headers})

    def close(self) -> None:
        if self.ws is not None:
            self._ws_cm.__exit__(None, None, None)
        self.http.close()


@pytest.fixture
def people(rig):
    made = []

    def make(name: str) -> Person:
        p = Person(rig.url, name)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_posts_need_the_session_csrf_token_and_this_origin(rig, people):
    req = make_request(seed=10)
    fut = rig.cell.ask(req)
    alice = people("alice")
    alice.open_page()
    rid = wait_for(alice.holding, 10, "alice to be given the request")
    assert rid == req.request_id
    body = {"request_id": rid, "kind": "approve", "candidate_index": 0}
    assert alice.http.post("/api/answer", json=body).status_code == 403  # no CSRF token
    assert alice.post("/api/answer", body, **{"X-CSRF-Token": "forged"}).status_code == 403
    assert alice.post("/api/answer", body, Origin="http://evil.example").status_code == 403
    # A WebSocket from another site gets nothing.
    cookie = "; ".join(f"{k}={v}" for k, v in alice.http.cookies.items())
    with pytest.raises(InvalidStatus):
        with connect(
            rig.url.replace("http", "ws") + "/ws",
            additional_headers={"Cookie": cookie, "Origin": "http://evil.example"},
        ) as ws:
            ws.recv(timeout=5)
    assert not fut.done()
    r = alice.post("/api/answer", body)
    assert r.status_code == 200 and r.json()["associate"] == "alice"
    assert fut.result(10).candidate_index == 0


def test_everything_from_the_browser_is_checked(rig, people):
    req = make_request(seed=11)
    fut = rig.cell.ask(req)
    alice, bob = people("alice"), people("bob")
    alice.open_page()
    bob.open_page()
    rid = wait_for(alice.holding, 10, "alice to be given the request")
    wait_for(lambda: bob.states, 10, "bob's page")
    bad = [
        {"request_id": rid, "kind": "approve", "candidate_index": 3},  # not offered (0, 1, 2, 7 are)
        {"request_id": rid, "kind": "approve", "candidate_index": True},
        {"request_id": rid, "kind": "approve", "candidate_index": "0"},
        {"request_id": rid, "kind": "point", "pixel": [640, 10]},  # the image is 640 x 480
        {"request_id": rid, "kind": "point", "pixel": [10, 480]},
        {"request_id": rid, "kind": "point", "pixel": [-1, 10]},
        {"request_id": rid, "kind": "point", "pixel": [1.5, 10]},
        {"request_id": rid, "kind": "point", "pixel": [1, 2, 3]},
        {"request_id": rid, "kind": "banana"},
        {"request_id": rid, "kind": "point", "pixel": [10, 10], "gripper": "banana"},
        {"request_id": rid, "kind": "approve", "candidate_index": 0, "gripper": "suction"},
        {"request_id": rid, "kind": "no_safe_pick", "note": "x" * 501},
        {"request_id": rid, "kind": "no_safe_pick", "associate_id": "mallory"},  # no field to claim a name
        {"request_id": "x" * 129, "kind": "no_safe_pick"},
        {"request_id": "not-a-request", "kind": "no_safe_pick"},
    ]
    for body in bad:
        r = alice.post("/api/answer", body)
        assert r.status_code in (409, 422), (body, r.status_code, r.text)
        assert r.json()["error"]
    assert (
        alice.http.post(
            "/api/answer",
            content=b"{not json",
            headers={"X-CSRF-Token": alice.csrf, "Content-Type": "application/json"},
        ).status_code
        == 400
    )
    assert (
        alice.post(
            "/api/answer", {"request_id": rid, "kind": "no_safe_pick", "note": "y" * 20_000}
        ).status_code
        == 413
    )
    chunked = alice.http.post(  # no Content-Length: the server stops reading at the limit
        "/api/answer",
        content=iter([b" " * 10_000] * 3),
        headers={"X-CSRF-Token": alice.csrf, "Content-Type": "application/json"},
    )
    assert chunked.status_code == 413
    # Bob holds nothing: he can neither answer, skip nor see alice's request.
    assert bob.post("/api/answer", {"request_id": rid, "kind": "no_safe_pick"}).status_code == 409
    assert bob.post("/api/skip", {"request_id": rid}).status_code == 409
    assert bob.http.get(f"/api/requests/{rid}/image").status_code == 409
    img = alice.http.get(f"/api/requests/{rid}/image")
    assert img.status_code == 200 and img.content == req.image_png
    assert not fut.done()  # nothing of the above reached the cell
    r = alice.post(
        "/api/answer", {"request_id": rid, "kind": "point", "pixel": [639, 479], "gripper": "parallel_jaw"}
    )
    assert r.status_code == 200
    ans = fut.result(10)
    assert (ans.kind, ans.pixel, ans.gripper) == ("point", (639, 479), "parallel_jaw")
    # Answering again: the request is no longer hers.
    assert alice.post("/api/answer", {"request_id": rid, "kind": "no_safe_pick"}).status_code == 409


def test_a_skip_nobody_here_can_take_goes_to_an_associate_elsewhere(rig, people):
    req = make_request(seed=13)
    fut = rig.cell.ask(req)
    alice = people("alice")
    alice.open_page()
    rid = wait_for(alice.holding, 10, "alice to be given the request")
    dave = rig.terminal("dave")  # a person at `pickcell assist`
    try:
        assert dave.next_request(0.5) is None  # the console holds it
        n_before = len(alice.states)
        r = alice.post("/api/skip", {"request_id": rid})
        assert r.status_code == 200 and r.json()["state"] == "skipped"
        got = dave.next_request(10)
        assert got is not None and got.request_id == rid
        dave.answer(rid, "approve", candidate_index=2)
        ans = fut.result(10)
        assert (ans.kind, ans.candidate_index, ans.associate_id) == ("approve", 2, "dave")
        # It never came back to alice's page, though the broker may have offered it to the console again.
        after = alice.states[n_before:]
        assert after and all(s["request"] is None or s["request"]["request_id"] != rid for s in after)
    finally:
        dave.close()


def test_a_page_that_drops_keeps_its_request_and_signing_out_gives_it_back(rig, people):
    req = make_request(seed=15)
    fut = rig.cell.ask(req)
    alice = people("alice")
    alice.open_page()
    rid = wait_for(alice.holding, 10, "alice to be given the request")
    alice._ws_cm.__exit__(None, None, None)  # the tablet's Wi-Fi drops
    alice.states.clear()
    alice.open_page()  # and comes back: the same question is still hers
    assert wait_for(alice.holding, 10, "the page to show her request again") == rid
    assert rig.console.state.desk.held[("cell-1", rid)].holder == "alice"
    assert alice.post("/api/logout", {}).status_code == 200  # signing out gives it back at once
    wait_for(
        lambda: ("cell-1", rid) not in rig.console.state.desk.held, 10, "the request to go back to the broker"
    )
    assert not fut.done()


def test_two_cells_with_the_same_request_id_are_two_questions(rig, people):
    # Request ids are unique per cell only: the console keeps them apart and answers each to its cell.
    cell2 = rig.another_cell("cell-2")
    try:
        r1 = make_request(seed=17, request_id="same-id")
        r2 = make_request(cell_id="cell-2", seed=18, request_id="same-id")
        f1, f2 = rig.cell.ask(r1), cell2.ask(r2)
        alice, bob = people("alice"), people("bob")
        alice.open_page()
        bob.open_page()
        wait_for(lambda: alice.holding() and bob.holding(), 10, "both to be given a request")
        cells = {alice.states[-1]["request"]["cell_id"]: alice, bob.states[-1]["request"]["cell_id"]: bob}
        assert set(cells) == {"cell-1", "cell-2"}
        assert (
            cells["cell-1"].post("/api/answer", {"request_id": "same-id", "kind": "no_safe_pick"}).status_code
            == 200
        )
        assert (
            cells["cell-2"]
            .post("/api/answer", {"request_id": "same-id", "kind": "approve", "candidate_index": 7})
            .status_code
            == 200
        )
        a1, a2 = f1.result(10), f2.result(10)
        assert (a1.kind, a2.kind, a2.candidate_index) == ("no_safe_pick", "approve", 7)
        names = {"cell-1": a1.associate_id, "cell-2": a2.associate_id}
        assert names == {c: p.states[-1]["you"] for c, p in cells.items()}
    finally:
        cell2.close()


def test_sign_in_is_rate_limited_per_name_and_address(rig):
    with httpx.Client(base_url=rig.url, timeout=15) as c:
        page = c.get("/login")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
        h = {"X-CSRF-Token": token}
        assert (
            c.post("/api/login", json={"name": "alice", "password": "x" * 8}).status_code == 403
        )  # no token
        for _ in range(5):
            assert (
                c.post("/api/login", json={"name": "alice", "password": "wrong-guess"}, headers=h).status_code
                == 401
            )
        r = c.post("/api/login", json={"name": "alice", "password": PASSWORDS["alice"]}, headers=h)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0  # even the right password waits
        rig.clock.advance(901)  # the window has passed
        r = c.post("/api/login", json={"name": "alice", "password": PASSWORDS["alice"]}, headers=h)
        assert r.status_code == 200 and r.json()["user"] == "alice"
        assert c.get("/api/state").json()["you"] == "alice"


def test_no_broker_key_material_reaches_the_browser(rig, people):
    rig.cell.ask(make_request(seed=12))
    alice = people("alice")
    alice.open_page()
    rid = wait_for(alice.holding, 10, "a request")
    served = [
        alice.http.get(p).text
        for p in ("/", "/login", "/api/state", "/api/fleet", "/static/console.js", "/static/login.js")
    ]
    served += [json.dumps(s) for s in alice.states]
    keys = rig.data / "keys"
    secrets_ = []
    for f in keys.glob("*.key*"):
        secrets_ += re.findall(r'(?:public|secret)-key = "([^"]+)"', f.read_text())
    assert len(secrets_) >= 5
    blob = "\n".join(served)
    for s in secrets_:
        assert s not in blob
    assert rid in blob  # (the check looked at real content)


def test_a_removed_account_is_signed_out_at_once(rig, people):
    alice = people("alice")
    assert alice.http.get("/api/state").status_code == 200
    rig.users.remove("alice")
    assert alice.http.get("/api/state").status_code == 401
    assert alice.sign_in("alice", PASSWORDS["alice"]).status_code == 401


def pickcell_main(argv: list[str]) -> int:
    """`pickcell ARGV` with only the console's commands registered (the full CLI imports far more)."""
    import argparse

    parser = argparse.ArgumentParser(prog="pickcell")
    console_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_user_store_and_cli(tmp_path, monkeypatch, capsys):
    store = UserStore(tmp_path / "u.sqlite")
    store.add("carol", "carol-password")
    assert store.verify("carol", "carol-password") and not store.verify("carol", "Carol-password")
    assert not store.verify("dave", "carol-password")
    with pytest.raises(UserError):
        store.add("carol", "another-password")
    for bad_name in ("", "a b", "../x", "x" * 65, "-lead"):
        with pytest.raises(UserError):
            store.add(bad_name, "long-enough")
    with pytest.raises(UserError):
        store.add("erin", "short")
    assert "$argon2id$" in store._conn.execute("SELECT hash FROM users").fetchone()[0]
    store.close()
    path = str(tmp_path / "u.sqlite")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("frank-password\n"))
    assert pickcell_main(["console", "users", "add", "frank", "--password-stdin", "--users", path]) == 0
    assert pickcell_main(["console", "users", "list", "--json", "--users", path]) == 0
    out = capsys.readouterr().out
    assert [u["name"] for u in json.loads(out.strip().splitlines()[-1])] == ["carol", "frank"]
    assert pickcell_main(["console", "users", "remove", "frank", "--users", path]) == 0
    assert pickcell_main(["console", "users", "remove", "frank", "--users", path]) == 2
    assert UserStore(path).verify("frank", "frank-password") is False


def _run(coro):
    """Run a coroutine to its end on a fresh event loop in its own thread (Playwright's sync API may
    hold this thread's loop when the browser tests ran first)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(30)


def test_fleet_view_from_the_fleet_service_and_the_broker(rig, people, tmp_path):
    from console.fleet import BrokerFleetSource, FleetServiceSource
    from fleet.keys import init_fleet
    from fleet.service import FleetService, ServiceConfig

    req = make_request(seed=14)
    rig.cell.ask(req)
    alice = people("alice")
    alice.open_page()
    wait_for(alice.holding, 10, "alice to be given the request")
    st = rig.console.state
    broker_view = BrokerFleetSource(st.desk, st.link)
    fleet_dir = tmp_path / "fleet"
    src = FleetServiceSource(fleet_dir, broker_view, timeout_s=1.0)
    # No fleet service yet: the broker's view, and the page says the service is not reachable.
    alone = _run(src.snapshot())
    assert "not reachable" in alone.source
    row = {c.cell_id: c for c in alone.cells}["cell-1"]
    assert (row.state, row.assists_waiting, row.model_version) == (
        "waiting for a person",
        1,
        "graspnet-sim-v4",
    )
    assert row.picks_per_hour is None and row.rollout_stage is None  # the broker cannot know: unknown
    init_fleet(fleet_dir, ["cell-1", "cell-2"])
    svc = FleetService(ServiceConfig(fleet_dir, router="tcp://127.0.0.1:0", pub="tcp://127.0.0.1:0")).start()
    try:
        view = _run(src.snapshot())
    finally:
        svc.stop()
    assert view.source.startswith("fleet service and assist broker")
    rows = {c.cell_id: c for c in view.cells}
    assert set(rows) == {"cell-1", "cell-2"}  # cell-2 is known to the fleet only
    assert rows["cell-1"].state == "never seen" and rows["cell-1"].model_version == "graspnet-sim-v4"
    assert rows["cell-2"].state == "never seen" and rows["cell-2"].last_request_at is None
