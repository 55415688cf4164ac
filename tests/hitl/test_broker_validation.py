"""Validation at the door, journal retention and migration, metrics: over real CURVE sockets and real SQLite.

Each refusal is a 422 naming the request and the field, a log line naming the key, and a Prometheus
count; nothing of it is journaled, and a normal round trip works right after it.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import time
import zlib

import httpx
import msgpack
import pytest

from hitl import protocol as P
from hitl.broker import Broker, BrokerConfig
from hitl.client import AssistClient
from hitl.journal import Journal

HB = 0.3


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def _cands(n: int = 3) -> list[dict]:
    return [{"index": i, "u": 10 * i, "v": 20 + i, "gripper": "suction", "p_success": 0.5} for i in range(n)]


def _with(wire: dict, **changes) -> dict:
    return {**wire, **changes}


def _cand(wire: dict, i: int, **changes) -> dict:
    cands = [dict(c) for c in wire["candidates"]]
    cands[i].update(changes)
    return {**wire, "candidates": cands}


# (what is wrong, how to make it wrong, the field the 422 must name). The image is 64x48.
SUBMIT_CASES = [
    ("not a PNG at all", lambda w: _with(w, image_png=b"GIF89a" + b"\x00" * 40), "image_png"),
    ("PNG signature, then junk", lambda w: _with(w, image_png=P.PNG_SIGNATURE + b"junk" * 10), "image_png"),
    ("truncated PNG", lambda w: _with(w, image_png=w["image_png"][:-20]), "image_png"),
    (
        "a chunk fails its CRC",
        lambda w: _with(
            w, image_png=w["image_png"][:40] + bytes([w["image_png"][40] ^ 1]) + w["image_png"][41:]
        ),
        "image_png",
    ),  # fmt: skip
    (
        "no image data",
        lambda w: _with(
            w,
            image_png=P.PNG_SIGNATURE
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0))
            + _chunk(b"IEND", b""),
        ),
        "image_png",
    ),  # fmt: skip
    ("image is text", lambda w: _with(w, image_png="a string"), "image_png"),
    ("pixel column outside the image", lambda w: _cand(w, 1, u=64), "candidates[1].u"),
    ("pixel row outside the image", lambda w: _cand(w, 2, v=5000), "candidates[2].v"),
    ("negative pixel", lambda w: _cand(w, 0, u=-1), "candidates[0].u"),
    ("unknown gripper", lambda w: _cand(w, 0, gripper="banana"), "candidates[0].gripper"),
    ("probability above 1", lambda w: _cand(w, 1, p_success=7), "candidates[1].p_success"),
    ("probability below 0", lambda w: _cand(w, 1, p_success=-0.01), "candidates[1].p_success"),
    ("probability NaN", lambda w: _cand(w, 1, p_success=float("nan")), "candidates[1].p_success"),
    ("duplicate candidate index", lambda w: _cand(w, 2, index=0), "candidates[2].index"),
    ("negative candidate index", lambda w: _cand(w, 0, index=-3), "candidates[0].index"),
    ("unknown candidate key", lambda w: _cand(w, 0, colour="red"), "candidates[0]"),
    ("candidates not a list", lambda w: _with(w, candidates={"0": 1}), "candidates"),
    ("deadline already past", lambda w: _with(w, deadline=time.time() - 1.0), "deadline"),
    ("deadline beyond the horizon", lambda w: _with(w, deadline=time.time() + 3601.0), "deadline"),
    ("deadline not a number", lambda w: _with(w, deadline="soon"), "deadline"),
    ("no cell_id", lambda w: {k: v for k, v in w.items() if k != "cell_id"}, "cell_id"),
    ("empty request_id", lambda w: _with(w, request_id=""), "request_id"),
    ("priority beyond 32 bits", lambda w: _with(w, priority=2**40), "priority"),
    ("reasons not strings", lambda w: _with(w, reasons=[1, 2]), "reasons"),
    ("context not a map", lambda w: _with(w, context=[1]), "context"),
]

# Answers to a held request (64x48 image, candidates 0..2).
ANSWER_CASES = [
    ("point outside the image", {"kind": "point", "pixel": [5000, 5000]}, "pixel"),
    ("point just past the edge", {"kind": "point", "pixel": [64, 0]}, "pixel"),
    ("point not two integers", {"kind": "point", "pixel": [1.5, 2]}, "pixel"),
    ("approve of a candidate not shown", {"kind": "approve", "candidate_index": 7}, "candidate_index"),
    ("unknown kind", {"kind": "maybe"}, "kind"),
    ("point with an unknown gripper", {"kind": "point", "pixel": [1, 1], "gripper": "banana"}, "gripper"),
    ("note too long", {"kind": "no_safe_pick", "note": "x" * (P.MAX_NOTE_CHARS + 1)}, "note"),
]


def _round_trip(c, a, hx) -> None:
    req = hx.make_request()
    c.send(P.SUBMIT, {"request": req.to_wire()})
    assert c.expect(P.ACK)["request_id"] == req.request_id
    a.send(P.READY, {})
    assert a.expect(P.ASSIGN)["request"]["request_id"] == req.request_id
    a.send(P.ANSWER, {"request_id": req.request_id, "kind": "point", "pixel": [63, 47]})
    assert a.expect(P.ACK)["state"] == "answered"
    assert c.expect(P.RESULT)["answer"]["pixel"] == [63, 47]
    c.send(P.DELIVERED, {"request_ids": [req.request_id]})


def test_every_submit_rule_is_a_422_naming_request_and_field_logged_and_counted(broker, keyring, hx, caplog):
    caplog.set_level(logging.WARNING, logger="hitl.broker")
    c = hx.RawPeer(broker.endpoint, keyring.client("cell-1"), keyring.server_key)
    a = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
    good = []
    try:
        for n, (what, mutate, field) in enumerate(SUBMIT_CASES):
            wire = mutate(hx.make_request().to_wire())
            c.send(P.SUBMIT, {"request": wire})
            err = c.expect(P.ERROR)
            assert (err["code"], err["field"], err["ref"]) == (P.E_INVALID, field, "submit"), (what, err)
            if field != "request_id":
                assert err["request_id"] == wire["request_id"], what
            assert broker.metrics.refused_count("invalid", field, "cell") >= 1, what
            assert broker.metrics.refused_count("invalid") == n + 1
            line = caplog.records[-1].getMessage()
            assert "cell key cell-1" in line and "422" in line and f"field {field}" in line, (what, line)
            _round_trip(c, a, hx)  # the broker still works, for the same key too
            good.append(n)
        rows = hx.journal_rows(broker.config.data_dir)
        assert len(rows) == len(SUBMIT_CASES)  # only the round trips' requests were stored
        assert {r[0] for r in rows.values()} == {"answered"}
    finally:
        c.close()
        a.close()


def test_every_answer_rule_is_a_422_and_the_request_stays_open(broker, keyring, hx, caplog):
    caplog.set_level(logging.WARNING, logger="hitl.broker")
    c = hx.RawPeer(broker.endpoint, keyring.client("cell-1"), keyring.server_key)
    a = hx.RawPeer(broker.endpoint, keyring.client("alice"), keyring.server_key)
    try:
        req = hx.make_request()
        c.send(P.SUBMIT, {"request": req.to_wire()})
        c.expect(P.ACK)
        a.send(P.READY, {})
        a.expect(P.ASSIGN)
        for what, body, field in ANSWER_CASES:
            a.send(P.ANSWER, {"request_id": req.request_id, **body})
            err = a.expect(P.ERROR)
            assert (err["code"], err["field"], err["request_id"]) == (P.E_INVALID, field, req.request_id), (
                what
            )
            assert "associate key alice" in caplog.records[-1].getMessage()
            assert broker.metrics.refused_count("invalid", field, "associate") >= 1
        # The person's valid answer still counts (she still holds it).
        a.send(
            P.ANSWER,
            {"request_id": req.request_id, "kind": "point", "pixel": [0, 47], "gripper": "parallel_jaw"},
        )
        assert a.expect(P.ACK)["state"] == "answered"
        ans = c.expect(P.RESULT)["answer"]
        assert (ans["pixel"], ans["gripper"]) == ([0, 47], "parallel_jaw")
        c.send(P.STATUS, {"request_id": req.request_id})  # and the journal kept the gripper
        assert c.expect(P.STATUS)["answer"]["gripper"] == "parallel_jaw"
        _round_trip(c, a, hx)
    finally:
        c.close()
        a.close()


def test_a_late_or_overlong_request_expires_at_the_client_not_an_error(broker, keyring, hx):
    """The cell client turns a 422 on a deadline already past into the request's expiry."""
    cell = AssistClient(
        broker.endpoint, "cell-1", keyring.client("cell-1"), keyring.server_key, heartbeat_s=HB
    )
    cell.start()
    try:
        assert cell.wait_connected(10)
        late = hx.make_request(deadline_in_s=-0.5)
        ans = cell.ask(late).result(10)
        assert (ans.status, ans.note) == ("expired", "deadline passed before the broker accepted it")
        far = hx.make_request(deadline_in_s=4000.0)
        with pytest.raises(Exception) as err:  # beyond the horizon: a real error, said clearly
            cell.ask(far).result(10)
        assert getattr(err.value, "code", None) == P.E_INVALID and "3600" in str(err.value)
    finally:
        cell.close()


def test_too_large_names_its_request(broker, keyring, hx):
    c = hx.RawPeer(broker.endpoint, keyring.client("cell-1"), keyring.server_key)
    try:
        req = hx.make_request(image=b"\x00" * (P.MAX_BODY_BYTES + 1))
        c.send_raw([P.PROTOCOL, P.SUBMIT, msgpack.packb({"request": req.to_wire()}, use_bin_type=True)])
        err = c.expect(P.ERROR)
        assert (err["code"], err["request_id"], err["field"]) == (P.E_TOO_LARGE, req.request_id, "body")
        assert broker.metrics.refused_count("too_large", "body", "cell") == 1
    finally:
        c.close()


def test_metrics_are_served_over_http(tmp_path, keyring, hx):
    b = Broker(BrokerConfig(bind=f"tcp://127.0.0.1:{hx.free_port()}", data_dir=tmp_path / "d",
                            keys_dir=keyring.keys_dir, heartbeat_s=HB, metrics_port=0))  # fmt: skip
    b.start()
    c = hx.RawPeer(b.endpoint, keyring.client("cell-2"), keyring.server_key)
    try:
        c.send(P.SUBMIT, {"request": _cand(hx.make_request(cell_id="cell-2").to_wire(), 0, gripper="banana")})
        assert c.expect(P.ERROR)["code"] == P.E_INVALID
        text = httpx.get(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=10).text
        line = 'pickcell_broker_refused_total{code="invalid",field="candidates[0].gripper",role="cell"} 1.0'
        assert line in text
        assert 'pickcell_broker_connections{role="cell"} 1.0' in text
    finally:
        c.close()
        b.stop()


def test_retention_deletes_only_old_final_states(tmp_path, hx):
    j = Journal(tmp_path / "j.sqlite")
    now = time.time()
    day = 86400.0
    reqs = {name: hx.make_request(request_id=name).to_wire() for name in ("old-done", "new-done", "old-lost",
                                                                          "new-lost", "open")}  # fmt: skip
    with j.transaction():
        for w in reqs.values():
            j.add(w, "cell-1", now - 40 * day)
        for name in ("old-done", "new-done", "old-lost", "new-lost"):
            age = 40 if name.startswith("old") else 1
            j.finish("cell-1", name, {"status": "expired", "answered_at": now - age * day})
        j.mark_delivered(["old-done"], "cell-1", now - 8 * day)
        j.mark_delivered(["new-done"], "cell-1", now - 6 * day)
    with j.transaction():
        assert j.prune(now, 7 * day, 30 * day) == 2
    left = {r[0] for r in j.db.execute("SELECT request_id FROM requests")}
    assert left == {"new-done", "new-lost", "open"}  # open requests are never deleted
    assert {r[0] for r in j.db.execute("SELECT request_id FROM answers")} == {"new-done", "new-lost"}
    j.close()


def test_the_broker_prunes_by_its_retention_setting_at_start(tmp_path, keyring, hx):
    data = tmp_path / "d"
    j = Journal(data / "journal.sqlite")
    w = hx.make_request(request_id="ancient").to_wire()
    with j.transaction():
        j.add(w, "cell-1", time.time() - 100)
        j.finish("cell-1", "ancient", {"status": "expired", "answered_at": time.time() - 100})
        j.mark_delivered(["ancient"], "cell-1", time.time() - 50)
    j.close()
    cfg = BrokerConfig(bind=f"tcp://127.0.0.1:{hx.free_port()}", data_dir=data, keys_dir=keyring.keys_dir,
                       retention_s=10.0)  # fmt: skip
    b = Broker(cfg)
    b.bind()
    try:
        assert b.stats["pruned"] == 1 and b.journal.counts()["expired"] == 0
    finally:
        b.close()
    assert BrokerConfig().retention_s == 7 * 86400.0  # the safe default: a week after delivery


def test_a_first_schema_journal_is_migrated_keeping_its_rows(tmp_path, hx):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(str(path))
    db.executescript("""
        CREATE TABLE requests (request_id TEXT PRIMARY KEY, cell_id TEXT NOT NULL, submitted_by TEXT NOT NULL,
            deadline REAL NOT NULL, priority INTEGER NOT NULL, received_at REAL NOT NULL, state TEXT NOT NULL,
            body BLOB NOT NULL);
        CREATE TABLE answers (request_id TEXT PRIMARY KEY REFERENCES requests(request_id),
            cell_id TEXT NOT NULL, status TEXT NOT NULL, kind TEXT, candidate_index INTEGER,
            pixel_u INTEGER, pixel_v INTEGER,
            associate_id TEXT, answered_at REAL NOT NULL, note TEXT NOT NULL DEFAULT '', delivered_at REAL);
    """)  # fmt: skip
    w1, w2 = hx.make_request(request_id="a").to_wire(), hx.make_request(request_id="b").to_wire()
    for w, state in ((w1, "answered"), (w2, "queued")):
        db.execute("INSERT INTO requests VALUES (?, 'cell-1', 'cell-1', ?, 0, 1.0, ?, ?)",
                   (w["request_id"], w["deadline"], state, msgpack.packb(w, use_bin_type=True)))  # fmt: skip
    db.execute(
        "INSERT INTO answers VALUES ('a', 'cell-1', 'answered', 'point', NULL, 3, 4, 'alice', 2.0, '', NULL)"
    )
    db.commit()
    db.close()
    j = Journal(path)
    assert j.db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert j.answer("cell-1", "a") == {
        "request_id": "a", "status": "answered", "kind": "point", "candidate_index": None, "pixel": [3, 4],
        "associate_id": "alice", "answered_at": 2.0, "note": "", "via": None, "gripper": None,
    }  # fmt: skip
    assert [r.request_id for r in j.open_requests()] == ["b"]
    with j.transaction():  # another cell may now use the same id
        assert j.add({**w1, "cell_id": "cell-2"}, "cell-2", time.time())
    j.close()


def test_png_checks_accept_what_the_cell_renders(hx):
    for w, h in ((1, 1), (640, 480), (64, 48)):
        assert P.png_size(hx.png_bytes(w, h)) == (w, h)
    with pytest.raises(ValueError, match="after the IEND"):
        P.png_size(hx.png_bytes() + b"\x00")
