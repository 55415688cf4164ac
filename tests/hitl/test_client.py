"""The cell's AssistClient and the associate side (client + terminal) against real brokers on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from hitl.associate import AssociateClient, parse_command, run_terminal
from hitl.broker import Broker, BrokerConfig
from hitl.client import AssistClient, AssistError
from pickcell.cli import main as pickcell_main

HB = 0.3  # the conftest brokers' heartbeat; clients must use the same interval


def test_ask_returns_at_once_and_reconnects_after_a_broker_restart(tmp_path, keyring, hx):
    """No broker yet: ask() still returns a future. Broker up, down, up again: the answer arrives."""
    port = hx.free_port()
    cfg = BrokerConfig(bind=f"tcp://127.0.0.1:{port}", data_dir=tmp_path / "d", keys_dir=keyring.keys_dir,
                       heartbeat_s=HB)  # fmt: skip
    cell = AssistClient(cfg.bind, "cell-1", keyring.client("cell-1"), keyring.server_key, heartbeat_s=HB,
                        backoff_max_s=1.0)  # fmt: skip
    cell.start()
    alice = None
    try:
        req = hx.make_request(deadline_in_s=60)
        fut = cell.ask(req)
        assert not fut.done() and cell.pending == 1 and not cell.connected
        assert cell.ask(req) is fut  # same id, same future
        b1 = Broker(cfg)
        b1.start()
        hx.wait_for(lambda: hx.journal_rows(cfg.data_dir), 15, "request to reach the first broker")
        b1.stop()
        hx.wait_for(lambda: not cell.connected, 10, "client to notice the broker is gone")
        b2 = Broker(cfg)
        b2.start()
        try:
            hx.wait_for(lambda: cell.connected, 15, "client to reconnect")
            alice = AssociateClient(cfg.bind, keyring.client("alice"), keyring.server_key, heartbeat_s=HB)
            job = alice.next_request(15)
            assert job.request_id == req.request_id
            alice.answer(job.request_id, "approve", candidate_index=0)
            assert fut.result(10).associate_id == "alice"
            assert list(hx.journal_rows(cfg.data_dir)) == [req.request_id]  # resubmitted, not duplicated
        finally:
            b2.stop()
    finally:
        cell.close()
        if alice:
            alice.close()


def test_unreachable_broker_expires_locally_after_the_deadline(keyring, hx):
    endpoint = f"tcp://127.0.0.1:{hx.free_port()}"
    cell = AssistClient(endpoint, "cell-1", keyring.client("cell-1"), keyring.server_key, heartbeat_s=0.2,
                        connect_timeout_s=0.5)  # fmt: skip
    cell.start()
    try:
        fut = cell.ask(hx.make_request(deadline_in_s=0.3))
        ans = fut.result(10)
        assert ans.status == "expired" and "unreachable" in ans.note
        assert cell.pending == 0 and "allowed/ folder" in (cell.last_error or "")
    finally:
        cell.close()


def test_ask_rejects_what_it_would_never_send(keyring, hx):
    cell = AssistClient("tcp://127.0.0.1:1", "cell-1", keyring.client("cell-1"), keyring.server_key)
    try:
        with pytest.raises(ValueError, match="cell"):
            cell.ask(hx.make_request(cell_id="cell-2"))
        with pytest.raises(ValueError, match="larger"):
            cell.ask(hx.make_request(image=b"\x00" * (4 * 1024 * 1024 + 1)))
        with pytest.raises(ValueError):
            AssistClient("tcp://127.0.0.1:1", "", None)
        with pytest.raises(ValueError, match="server_public_key"):
            AssistClient("tcp://127.0.0.1:1", "cell-1", keyring.client("cell-1"), None)
        assert cell.pending == 0
    finally:
        cell.close()
    with pytest.raises(AssistError):
        cell.ask(hx.make_request())


def test_heartbeats_keep_flowing_while_the_person_thinks(broker, keyring, hx):
    """Holding a request for 5x the liveness window does not get it taken away."""
    cell = AssistClient(
        broker.endpoint, "cell-1", keyring.client("cell-1"), keyring.server_key, heartbeat_s=HB
    )
    cell.start()
    alice = AssociateClient(broker.endpoint, keyring.client("alice"), keyring.server_key, heartbeat_s=HB)
    bob = AssociateClient(broker.endpoint, keyring.client("bob"), keyring.server_key, heartbeat_s=HB)
    try:
        fut = cell.ask(hx.make_request(deadline_in_s=60))
        job = alice.next_request(10)
        assert bob.next_request(HB * 3 * 5) is None  # bob is ready all along and gets nothing
        assert broker.stats["requeued"] == 0
        alice.answer(job.request_id, "no_safe_pick")
        assert fut.result(10).associate_id == "alice"
    finally:
        for c in (cell, alice, bob):
            c.close()


def test_terminal_shows_request_and_sends_typed_answer(broker, keyring, hx, tmp_path):
    cell = AssistClient(
        broker.endpoint, "cell-1", keyring.client("cell-1"), keyring.server_key, heartbeat_s=HB
    )
    cell.start()
    alice = AssociateClient(broker.endpoint, keyring.client("alice"), keyring.server_key, heartbeat_s=HB)
    typed = iter(["", "9", "p 10", "p 41 37"])
    shown: list[str] = []
    try:
        req = hx.make_request()
        fut = cell.ask(req)
        n = run_terminal(alice, tmp_path / "img", read_line=lambda _: next(typed), write=shown.append,
                         max_requests=1)  # fmt: skip
        assert n == 1
        ans = fut.result(10)
        assert (ans.kind, ans.pixel, ans.associate_id) == ("point", (41, 37), "alice")
        text = "\n".join(shown)
        png = tmp_path / "img" / f"{req.request_id}.png"
        assert png.read_bytes() == req.image_png and str(png) in text
        assert "low confidence" in text and "time left" in text and "waiting in queue" in text
        assert "no candidate 9" in text and "p X Y" in text  # bad lines are explained, not sent
    finally:
        cell.close()
        alice.close()


def test_parse_command(hx):
    req = hx.make_request(n_candidates=3)
    assert parse_command("2", req) == {"action": "answer", "kind": "approve", "candidate_index": 2}
    assert parse_command(" p 3 4 ", req) == {"action": "answer", "kind": "point", "pixel": (3, 4)}
    assert parse_command("n", req)["kind"] == "no_safe_pick"
    assert parse_command("S", req) == {"action": "skip"}
    assert parse_command("q", req) == {"action": "quit"}
    for bad in ("", "3", "-1", "p -1 2", "p 1 2 3", "yes", "n n"):
        with pytest.raises(ValueError):
            parse_command(bad, req)


def test_keys_new_cli_writes_a_pair_and_refuses_to_overwrite(tmp_path: Path, capsys):
    assert pickcell_main(["keys", "new", "alice", "--role", "associate", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "alice.key").is_file() and (tmp_path / "alice.key_secret").is_file()
    assert (tmp_path / "alice.key_secret").stat().st_mode & 0o077 == 0
    assert pickcell_main(["keys", "new", "alice", "--role", "associate", "--dir", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert pickcell_main(["broker", "--bind", "tcp://127.0.0.1:0", "--data", str(tmp_path / "d"),
                          "--keys", str(tmp_path / "nokeys")]) == 2  # fmt: skip
    assert "not found" in capsys.readouterr().err


def test_associate_answer_times_out_cleanly_without_broker(keyring, hx):
    a = AssociateClient(f"tcp://127.0.0.1:{hx.free_port()}", keyring.client("alice"), keyring.server_key)
    try:
        assert a.next_request(0.3) is None
        with pytest.raises(TimeoutError):  # a clear error instead of a hang
            a.answer("nope", "no_safe_pick", timeout_s=0.3)
        assert not a.connected
    finally:
        a.close()


def test_insecure_loopback_round_trip_names_the_associate_as_insecure(tmp_path, hx):
    b = Broker(BrokerConfig(bind=f"tcp://127.0.0.1:{hx.free_port()}", data_dir=tmp_path / "d", insecure=True,
                            heartbeat_s=HB))  # fmt: skip
    b.start()
    cell = AssistClient(b.endpoint, "cell-9", None, heartbeat_s=HB)
    cell.start()
    bob = AssociateClient(b.endpoint, None, name="bob", heartbeat_s=HB)
    try:
        fut = cell.ask(hx.make_request(cell_id="cell-9"))
        job = bob.next_request(10)
        bob.answer(job.request_id, "approve", candidate_index=0)
        ans = fut.result(10)
        assert (ans.status, ans.associate_id) == ("answered", "insecure:bob")  # never passes for a key name
    finally:
        cell.close()
        bob.close()
        b.stop()
