"""Roles bound to keys, per-cell request ids, only the holder answers, revocation: over real CURVE sockets.

In the manner of pyzmq's own auth tests: real keys, a real broker, each client a real DEALER on loopback,
and after every refusal a normal round trip still works.
"""

from __future__ import annotations

import logging
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from hitl import protocol as P
from hitl.associate import AssociateClient
from hitl.client import AssistClient, AssistError
from hitl.keys import new_keypair, revoke

HB = 0.3  # the conftest brokers' heartbeat


def _until_status(raw, timeout_s: float = 5.0) -> tuple[list[dict], list[tuple[bytes, dict]], dict]:
    """Send STATUS and read until its reply: (errors, other messages, the status reply)."""
    raw.send(P.STATUS, {})
    errors, other = [], []
    end = time.monotonic() + timeout_s
    while True:
        got = raw.recv(max(0.01, end - time.monotonic()))
        assert got is not None, "no STATUS reply: the broker stopped answering"
        kind, body = got
        if kind == P.STATUS:
            return errors, other, body
        (errors if kind == P.ERROR else other).append(body if kind == P.ERROR else (kind, body))


def _expect_beating(raw, msg_type: bytes, timeout_s: float = 10.0) -> dict:
    """Like RawPeer.expect, but heartbeating while it waits (a silent peer is forgotten after 3 beats)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        raw.send(P.HEARTBEAT, {})
        got = raw.recv(HB / 3)
        if got is not None:
            assert got[0] == msg_type, got
            return got[1]
    raise AssertionError(f"no {msg_type!r} within {timeout_s} s")


def _round_trip(broker, keyring, hx, cell="cell-3", person="bob") -> None:
    """A normal request, answered: the broker still works for everyone who is allowed.

    Whatever earlier steps of a test left in the queue is answered "no safe pick" on the way."""
    c = hx.RawPeer(broker.endpoint, keyring.client(cell), keyring.server_key)
    a = hx.RawPeer(broker.endpoint, keyring.client(person), keyring.server_key)
    try:
        req = hx.make_request(cell_id=cell)
        c.send(P.SUBMIT, {"request": req.to_wire()})
        assert c.expect(P.ACK)["request_id"] == req.request_id
        for _ in range(20):
            a.send(P.READY, {})
            job = _expect_beating(a, P.ASSIGN)["request"]
            mine = (job["cell_id"], job["request_id"]) == (cell, req.request_id)
            body = {"request_id": job["request_id"], "cell_id": job["cell_id"]}
            body.update({"kind": "approve", "candidate_index": 0} if mine else {"kind": "no_safe_pick"})
            a.send(P.ANSWER, body)
            assert a.expect(P.ACK)["state"] == "answered"
            if mine:
                break
        ans = _expect_beating(c, P.RESULT)["answer"]
        while ans["request_id"] != req.request_id:  # an earlier round trip's result, re-sent: at-least-once
            ans = _expect_beating(c, P.RESULT)["answer"]
        assert (ans["request_id"], ans["associate_id"], ans["candidate_index"]) == (req.request_id, person, 0)
        c.send(P.DELIVERED, {"request_ids": [req.request_id]})
    finally:
        c.close()
        a.close()


def _minimal_body(msg_type: bytes, hx, cell_request) -> dict:
    return {
        P.SUBMIT: {"request": cell_request.to_wire()},
        P.CANCEL: {"request_id": cell_request.request_id},
        P.DELIVERED: {"request_ids": []},
        P.READY: {},
        P.ANSWER: {"request_id": "nobody-holds-this", "kind": "no_safe_pick", "on_behalf_of": "carol"},
        P.RELEASE: {"request_id": "nobody-holds-this", "skip": False},
        P.STATUS: {},
        P.HEARTBEAT: {},
        P.DISCONNECT: {},
    }[msg_type]


@pytest.mark.parametrize("name,role", [("cell-1", "cell"), ("alice", "associate"), ("desk", "console")])
def test_role_by_message_type_matrix(broker, keyring, hx, name, role, caplog):
    """Every client message type from every role: allowed exactly where docs/protocol.md's table says."""
    caplog.set_level(logging.WARNING, logger="hitl.broker")
    raw = hx.RawPeer(broker.endpoint, keyring.client(name), keyring.server_key)
    try:
        for msg_type in sorted(P.CLIENT_TYPES):
            req = hx.make_request(cell_id="cell-1")
            raw.send(msg_type, _minimal_body(msg_type, hx, req))
            if msg_type == P.STATUS:  # the STATUS under test has its own reply
                assert raw.expect(P.STATUS)["role"] == role
            errors, _, _ = _until_status(raw)
            role_refusals = [e for e in errors if e["code"] == P.E_FORBIDDEN and e["field"] == "type"]
            allowed = msg_type in P.ROLE_MESSAGES[role]
            assert bool(role_refusals) == (not allowed), (role, msg_type, errors)
            if not allowed:
                (e,) = role_refusals
                assert e["ref"] == msg_type.decode() and role in e["message"]
                if msg_type == P.SUBMIT:
                    assert e["request_id"] == req.request_id  # the refusal names the request
                assert any(
                    f"key {name}" in r.getMessage() and "403" in r.getMessage() for r in caplog.records
                )
                # A normal round trip right after the refusal (the goodbye drops any ready credit of ours,
                # so the request goes to bob).
                raw.send(P.DISCONNECT, {})
                _round_trip(broker, keyring, hx)
        refused = {t for t in P.CLIENT_TYPES if t not in P.ROLE_MESSAGES[role]}
        assert broker.metrics.refused_count("forbidden", "type", role) == len(refused)
        if role != "cell":  # nothing an answering key sent was journaled: only the round trips' requests
            import sqlite3

            con = sqlite3.connect(str(broker.config.data_dir / "journal.sqlite"))
            by = {r[0] for r in con.execute("SELECT submitted_by FROM requests")}
            con.close()
            assert by == {"cell-3"}
    finally:
        raw.close()
    _round_trip(broker, keyring, hx)


def test_the_table_in_the_code_is_the_documented_one():
    assert P.ROLE_MESSAGES["cell"] == {P.SUBMIT, P.CANCEL, P.DELIVERED, P.STATUS, P.HEARTBEAT, P.DISCONNECT}
    answering = {P.READY, P.ANSWER, P.RELEASE, P.STATUS, P.HEARTBEAT, P.DISCONNECT}
    assert P.ROLE_MESSAGES["associate"] == answering and P.ROLE_MESSAGES["console"] == answering


def test_a_key_without_a_role_is_refused_and_the_log_names_it(broker, keyring, hx, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="hitl.broker")
    # The layout before roles: allowed/NAME.key. And a key made for one role put in another's folder.
    new_keypair("oldcell", keyring.keys_dir / "allowed")
    new_keypair("sneaky", tmp_path / "k", role="associate")
    (keyring.keys_dir / "allowed" / "cell" / "sneaky.key").write_bytes(
        (tmp_path / "k" / "sneaky.key").read_bytes()
    )
    from hitl.keys import ClientKeys

    for keys, name in (
        (ClientKeys.from_file(keyring.keys_dir / "allowed" / "oldcell.key_secret"), "oldcell"),
        (ClientKeys.from_file(tmp_path / "k" / "sneaky.key_secret"), "sneaky"),
    ):
        c = AssistClient(
            broker.endpoint, name, keys, keyring.server_key, heartbeat_s=HB, connect_timeout_s=1.0
        )
        c.start()
        try:
            fut = c.ask(hx.make_request(cell_id=name))

            def refused(n=name):
                return any(n in r.getMessage() and "REFUSED" in r.getMessage() for r in caplog.records)

            hx.wait_for(refused, 10, f"the refusal of {name} logged")
            assert not c.connected and not fut.done()
        finally:
            c.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("'oldcell'" in m and "has no role" in m for m in msgs)
    assert any("'sneaky'" in m and "made for role 'associate'" in m for m in msgs)
    assert hx.journal_rows(broker.config.data_dir) == {}
    _round_trip(broker, keyring, hx)


def test_console_answers_on_behalf_of_a_named_person_who_is_recorded_beside_it(broker, keyring, hx):
    cell = AssistClient(
        broker.endpoint, "cell-1", keyring.client("cell-1"), keyring.server_key, heartbeat_s=HB
    )
    cell.start()
    desk = AssociateClient(broker.endpoint, keyring.client("desk"), keyring.server_key, heartbeat_s=HB)
    alice = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
    try:
        assert desk.role == "console"  # from the key's metadata
        req = hx.make_request()
        fut = cell.ask(req)
        job = desk.next_request(10)
        assert job.request_id == req.request_id
        with pytest.raises(AssistError) as err:  # a console must say for whom
            desk.answer(job.request_id, "approve", candidate_index=1)
        assert err.value.code == P.E_INVALID
        with pytest.raises(AssistError) as err:  # and it must be a person, not a cell's key
            desk.answer(job.request_id, "approve", candidate_index=1, on_behalf_of="cell-2")
        assert err.value.code == P.E_INVALID
        # An associate may not claim to answer for someone else.
        alice.send(P.ANSWER, {"request_id": req.request_id, "kind": "no_safe_pick", "on_behalf_of": "carol"})
        e = alice.expect(P.ERROR)
        assert (e["code"], e["field"], e["request_id"]) == (P.E_FORBIDDEN, "on_behalf_of", req.request_id)
        assert not fut.done()
        assert desk.answer(job.request_id, "approve", candidate_index=1, on_behalf_of="carol") == "answered"
        ans = fut.result(10)
        assert (ans.status, ans.associate_id, ans.via, ans.candidate_index) == (
            "answered",
            "carol",
            "desk",
            1,
        )
        db = hx.journal_rows(broker.config.data_dir)
        assert db[req.request_id][:3] == ("answered", "answered", "carol")
        import sqlite3

        con = sqlite3.connect(str(broker.config.data_dir / "journal.sqlite"))
        assert con.execute("SELECT associate_id, via FROM answers").fetchall() == [("carol", "desk")]
        con.close()
    finally:
        cell.close()
        desk.close()
        alice.close()
    _round_trip(broker, keyring, hx)


def test_request_ids_live_in_their_cells_namespace(broker, keyring, hx):
    """cell-2 can neither read, cancel, resubmit nor receive cell-1's request, even knowing its id."""
    c1 = hx.RawPeer(broker.endpoint, keyring.client("cell-1"), keyring.server_key)
    c2 = hx.RawPeer(broker.endpoint, keyring.client("cell-2"), keyring.server_key)
    alice = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
    try:
        r1 = hx.make_request(cell_id="cell-1", request_id="shared-id")
        c1.send(P.SUBMIT, {"request": r1.to_wire()})
        assert c1.expect(P.ACK)["duplicate"] is False
        # Read: cell-2 asks about that id and learns nothing.
        c2.send(P.STATUS, {"request_id": "shared-id"})
        st = c2.expect(P.STATUS)
        assert (st["state"], st["answer"], st["waiting"], st["held"]) == (None, None, 0, 0)
        # Cancel: not in cell-2's namespace.
        c2.send(P.CANCEL, {"request_id": "shared-id"})
        assert c2.expect(P.ERROR)["code"] == P.E_UNKNOWN_REQUEST
        # Submit as cell-1: refused.
        c2.send(P.SUBMIT, {"request": hx.make_request(cell_id="cell-1").to_wire()})
        e = c2.expect(P.ERROR)
        assert (e["code"], e["field"]) == (P.E_FORBIDDEN, "cell_id")
        # Resubmit with the same id: a new request of cell-2's own, not a duplicate of cell-1's.
        r2 = hx.make_request(cell_id="cell-2", request_id="shared-id", n_candidates=2)
        c2.send(P.SUBMIT, {"request": r2.to_wire()})
        ack = c2.expect(P.ACK)
        assert (ack["duplicate"], ack["state"]) == (False, "queued")
        # Both are answered, differently; each cell receives its own answer and never the other's.
        answers = {}
        for _ in range(2):
            alice.send(P.READY, {})
            job = alice.expect(P.ASSIGN)["request"]
            k = 1 if job["cell_id"] == "cell-1" else 0
            alice.send(P.ANSWER, {"request_id": "shared-id", "cell_id": job["cell_id"], "kind": "approve",
                                  "candidate_index": k})  # fmt: skip
            assert alice.expect(P.ACK)["cell_id"] == job["cell_id"]
            answers[job["cell_id"]] = k
        assert c1.expect(P.RESULT)["answer"]["candidate_index"] == answers["cell-1"] == 1
        assert c2.expect(P.RESULT)["answer"]["candidate_index"] == answers["cell-2"] == 0
        assert c1.recv(0.5) is None and c2.recv(0.5) is None  # no one else's result, no second one
        # cell-2 confirming "shared-id" confirms its own only; cell-1's is still re-sent to cell-1.
        c2.send(P.DELIVERED, {"request_ids": ["shared-id"]})
        c1.send(P.HEARTBEAT, {})
        c2.send(P.STATUS, {"request_id": "shared-id"})
        assert c2.expect(P.STATUS)["answer"]["candidate_index"] == 0
        import sqlite3

        con = sqlite3.connect(str(broker.config.data_dir / "journal.sqlite"))
        rows = con.execute("SELECT cell_id, request_id, state FROM requests ORDER BY cell_id").fetchall()
        con.close()
        assert rows == [("cell-1", "shared-id", "answered"), ("cell-2", "shared-id", "answered")]
    finally:
        for p in (c1, c2, alice):
            p.close()
    _round_trip(broker, keyring, hx)


def test_status_shows_an_associate_only_what_it_holds_or_answered(broker, keyring, hx):
    c = hx.RawPeer(broker.endpoint, keyring.client("cell-1"), keyring.server_key)
    alice = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
    bob = hx.RawPeer(broker.endpoint, keyring.client("bob"), keyring.server_key)
    try:
        r = hx.make_request()
        c.send(P.SUBMIT, {"request": r.to_wire()})
        c.expect(P.ACK)
        alice.send(P.READY, {})
        alice.expect(P.ASSIGN)
        alice.send(P.STATUS, {"request_id": r.request_id})
        st = alice.expect(P.STATUS)
        assert (st["state"], st["held"], st["holding"]) == (
            "queued",
            1,
            [{"cell_id": "cell-1", "request_id": r.request_id}],
        )
        bob.send(P.STATUS, {"request_id": r.request_id})
        st = bob.expect(P.STATUS)
        assert (st["state"], st["held"], st["holding"]) == (None, 0, [])
        alice.send(P.ANSWER, {"request_id": r.request_id, "kind": "no_safe_pick"})
        alice.expect(P.ACK)
        assert c.expect(P.RESULT)["answer"]["associate_id"] == "alice"
        alice.send(P.STATUS, {"request_id": r.request_id})
        st = alice.expect(P.STATUS)
        assert (st["state"], st["answer"]["associate_id"]) == ("answered", "alice")
        bob.send(P.STATUS, {"request_id": r.request_id})
        assert bob.expect(P.STATUS)["answer"] is None
        c.send(P.STATUS, {})
        st = c.expect(P.STATUS)
        assert "holding" not in st and (st["waiting"], st["held"]) == (0, 0)
    finally:
        for p in (c, alice, bob):
            p.close()


def test_only_the_holder_answers(broker, keyring, hx):
    cell = AssistClient(
        broker.endpoint, "cell-1", keyring.client("cell-1"), keyring.server_key, heartbeat_s=HB
    )
    cell.start()
    alice = AssociateClient(broker.endpoint, keyring.client("alice"), keyring.server_key, heartbeat_s=HB)
    bob = AssociateClient(broker.endpoint, keyring.client("bob"), keyring.server_key, heartbeat_s=HB)
    try:
        req = hx.make_request()
        fut = cell.ask(req)
        job = alice.next_request(10)
        for action in (lambda: bob.answer(job.request_id, "no_safe_pick"), lambda: bob.skip(job.request_id)):
            with pytest.raises(AssistError) as err:
                action()
            assert err.value.code == P.E_FORBIDDEN  # 403: bob does not hold it
        assert not fut.done() and broker.metrics.refused_count("forbidden", "request_id", "associate") == 2
        assert alice.answer(job.request_id, "approve", candidate_index=2) == "answered"
        assert (fut.result(10).associate_id, fut.result(10).candidate_index) == ("alice", 2)
        with pytest.raises(AssistError) as err:
            alice.answer(job.request_id, "no_safe_pick")
        assert err.value.code == P.E_ALREADY_FINAL  # 409: hers, and already final
        with pytest.raises(AssistError) as err:
            bob.answer(job.request_id, "no_safe_pick")
        assert err.value.code == P.E_FORBIDDEN  # never his: 403, whatever the state
    finally:
        for c in (cell, alice, bob):
            c.close()
    _round_trip(broker, keyring, hx)


def test_one_key_on_two_connections_is_one_associate(broker, keyring, hx):
    c = hx.RawPeer(broker.endpoint, keyring.client("cell-1"), keyring.server_key)
    a1 = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
    try:
        r = hx.make_request()
        c.send(P.SUBMIT, {"request": r.to_wire()})
        c.expect(P.ACK)
        a1.send(P.READY, {})
        a1.expect(P.ASSIGN)
        # The same person's second screen (or her client after a reconnect) answers what she holds.
        a2 = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
        try:
            a2.send(P.STATUS, {})
            st = a2.expect(P.STATUS)
            assert (st["held"], st["associates"]) == (1, 1)  # one associate, holding one request
            a2.send(P.ANSWER, {"request_id": r.request_id, "kind": "point", "pixel": [63, 47]})
            assert a2.expect(P.ACK)["state"] == "answered"
        finally:
            a2.close()
        ans = c.expect(P.RESULT)["answer"]
        assert (ans["associate_id"], ans["pixel"]) == ("alice", [63, 47])
        # A lost connection's hold is adopted by the same key's new connection (a reconnect) ...
        r2 = hx.make_request()
        c.send(P.SUBMIT, {"request": r2.to_wire()})
        c.expect(P.ACK)
        a1.send(P.READY, {})
        a1.expect(P.ASSIGN)
        a1.close()  # no goodbye: the connection just goes silent
        time.sleep(HB)
        t_new = time.monotonic()  # the broker's clock too: a3's connection is first seen after this
        a3 = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
        try:

            def beat_for(seconds: float) -> None:  # keep a3 alive (a raw peer does not heartbeat)
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    a3.send(P.HEARTBEAT, {"role": "associate"})
                    a3.recv(HB / 3)  # nothing is expected but heartbeats

            beat_for(HB)
            # The broker drops the silent connection after 3 missed beats; a3 adopts what it held.
            end = time.monotonic() + 10

            def only_a3() -> bool:
                alices = [p for p in list(broker.peers.values()) if p.identity == "alice"]
                return len(alices) == 1 and alices[0].first_seen >= t_new

            while not only_a3():
                assert time.monotonic() < end, "the silent connection was never dropped"
                beat_for(HB / 3)
            beat_for(HB * 3 + 0.5)  # well past the grace window in which an orphaned hold is kept
            assert broker.stats["requeued"] == 0 and not broker.orphans
            a3.send(P.STATUS, {})
            while (got := a3.recv(5)) is not None and got[0] != P.STATUS:
                pass
            assert got is not None and got[1]["holding"] == [
                {"cell_id": "cell-1", "request_id": r2.request_id}
            ]
            a3.send(P.ANSWER, {"request_id": r2.request_id, "kind": "no_safe_pick"})
            while (got := a3.recv(5)) is not None and got[0] != P.ACK:
                pass
            assert got is not None and got[1]["state"] == "answered"
            assert broker.stats["requeued"] == 0
        finally:
            a3.close()
    finally:
        c.close()
        a1.close()


def test_ready_credits_add_up_per_connection_up_to_the_cap(broker, keyring, hx):
    c = hx.RawPeer(broker.endpoint, keyring.client("cell-1"), keyring.server_key)
    desk = hx.RawPeer(broker.endpoint, keyring.client("desk"), keyring.server_key)
    try:
        ids = []
        for _ in range(3):
            r = hx.make_request()
            c.send(P.SUBMIT, {"request": r.to_wire()})
            c.expect(P.ACK)
            ids.append(r.request_id)
        desk.send(P.READY, {})
        desk.send(P.READY, {})  # a console serves two people: two credits, two requests
        got = {desk.expect(P.ASSIGN)["request"]["request_id"] for _ in range(2)}
        assert got < set(ids) and desk.recv(0.5) is None  # not a third
        desk.send(P.READY, {})
        assert desk.expect(P.ASSIGN)["request"]["request_id"] in set(ids) - got
        # Nothing waits now: credits pile up to the cap, and one more is refused.
        for _ in range(broker.config.max_credits):
            desk.send(P.READY, {})
        errors, _, _ = _until_status(desk)
        assert errors == []
        desk.send(P.READY, {})
        errors, _, _ = _until_status(desk)
        assert [(e["code"], e["field"]) for e in errors] == [(P.E_INVALID, "ready")]
    finally:
        c.close()
        desk.close()


def test_revoking_a_key_closes_its_open_connection_and_requeues_what_it_held(broker, keyring, hx, caplog):
    caplog.set_level(logging.INFO, logger="hitl.broker")
    c = hx.RawPeer(broker.endpoint, keyring.client("cell-1"), keyring.server_key)
    alice = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
    mon = alice.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    bob = None
    try:
        r = hx.make_request()
        c.send(P.SUBMIT, {"request": r.to_wire()})
        c.expect(P.ACK)
        alice.send(P.READY, {})
        assert alice.expect(P.ASSIGN)["request"]["request_id"] == r.request_id
        assert revoke("alice", keyring.keys_dir) == [keyring.keys_dir / "allowed" / "associate" / "alice.key"]
        err = alice.expect(P.ERROR, 10)
        assert err["code"] == P.E_FORBIDDEN and "revoked" in err["message"]
        assert mon.poll(10_000), "the broker did not close the revoked key's connection"
        assert recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED
        hx.wait_for(lambda: broker.stats["cut"] == 1, 5, "the cut counted")
        # Its reconnection is refused by ZAP; its messages get nothing.
        alice.send(P.ANSWER, {"request_id": r.request_id, "kind": "no_safe_pick"})
        assert alice.recv(1.5) is None
        assert any("REFUSED CURVE connection" in m.getMessage() for m in caplog.records)
        assert any("CLOSED the connection of key alice" in m.getMessage() for m in caplog.records)
        # What alice held went back to the queue: bob answers it.
        bob = hx.RawPeer(broker.endpoint, keyring.client("bob"), keyring.server_key)
        bob.send(P.READY, {})
        assert bob.expect(P.ASSIGN)["request"]["request_id"] == r.request_id
        bob.send(P.ANSWER, {"request_id": r.request_id, "kind": "no_safe_pick"})
        bob.expect(P.ACK)
        c.send(P.HEARTBEAT, {})  # a raw peer does not heartbeat: say we are still here
        assert c.expect(P.RESULT)["answer"]["associate_id"] == "bob"
    finally:
        alice.sock.disable_monitor()
        mon.close(0)
        for p in (c, alice, bob):
            if p is not None:
                p.close()
    _round_trip(broker, keyring, hx)


def test_keys_cli_binds_roles_admits_lists_and_revokes(tmp_path, capsys):
    import json

    from pickcell.cli import main as pickcell_main

    keys, own = tmp_path / "keys", tmp_path / "mine"
    assert pickcell_main(["keys", "new", "broker", "--dir", str(keys)]) == 0
    assert pickcell_main(["keys", "new", "cell-7", "--dir", str(own)]) == 2  # a client key needs a role
    assert "--role is required" in capsys.readouterr().err
    assert pickcell_main(["keys", "new", "cell-7", "--role", "cell", "--dir", str(own)]) == 0
    assert (
        pickcell_main(["keys", "new", "desk", "--role", "console", "--dir", str(own), "--allow", str(keys)])
        == 0
    )
    assert (keys / "allowed" / "console" / "desk.key").is_file()
    assert pickcell_main(["keys", "allow", str(own / "cell-7.key"), "--keys", str(keys)]) == 0
    assert (keys / "allowed" / "cell" / "cell-7.key").is_file()
    assert not list((keys / "allowed").rglob("*.key_secret"))  # secrets never leave their owner's folder
    # A key made for one role cannot be admitted as another.
    assert (
        pickcell_main(["keys", "allow", str(own / "cell-7.key"), "--keys", str(keys), "--role", "associate"])
        == 2
    )
    assert "made for role 'cell'" in capsys.readouterr().err
    capsys.readouterr()
    assert pickcell_main(["keys", "list", "--keys", str(keys), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["role"], r["name"]) for r in listed["admitted"]] == [("cell", "cell-7"), ("console", "desk")]
    assert pickcell_main(["keys", "revoke", "cell-7", "--keys", str(keys)]) == 0
    assert not (keys / "allowed" / "cell" / "cell-7.key").exists()
    assert pickcell_main(["keys", "revoke", "cell-7", "--keys", str(keys)]) == 2
