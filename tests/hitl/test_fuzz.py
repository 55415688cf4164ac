"""Random frames thrown at a live CURVE broker: it refuses each, keeps serving, journals nothing bad."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hitl import protocol as P
from hitl.associate import AssociateClient
from hitl.client import AssistClient

HB = 0.3  # the conftest brokers' heartbeat

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)  # fmt: skip
msg_types = st.sampled_from(sorted(P.CLIENT_TYPES)) | st.binary(max_size=12)
# Bodies that look almost right: the real field names with random values.
field_names = st.sampled_from(["request", "request_id", "cell_id", "kind", "candidate_index", "pixel", "note",
                               "request_ids", "role", "name", "skip", "deadline", "image_png"])  # fmt: skip
near_bodies = st.dictionaries(field_names, msgpack_values, max_size=6)
frames_strategy = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=5),  # random bytes, random frame count
    st.tuples(st.just(P.PROTOCOL), msg_types, st.binary(max_size=64)).map(list),  # right tag, junk body
    st.tuples(st.sampled_from([P.PROTOCOL, b"PKC0", b"PKC2", b""]), msg_types, near_bodies.map(P.pack)).map(
        list
    ),
    st.tuples(st.just(P.PROTOCOL), msg_types, msgpack_values.map(lambda v: msgpack.packb(v))).map(list),
)


def test_random_frames_then_a_normal_round_trip(broker, keyring, hx):
    raw = hx.RawPeer(broker.endpoint, keyring.client("cell-3"), keyring.server_key)
    replies = {"error": 0, "other": 0, "none": 0}

    @settings(max_examples=200, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
    @given(frames=frames_strategy)
    def throw(frames):
        raw.send_raw(frames)
        # A STATUS right behind it must still be answered: the broker is alive and not wedged.
        raw.send(P.STATUS, {})
        seen_status = False
        for _ in range(4):
            got = raw.recv(5.0)
            assert got is not None, f"broker stopped answering after {frames!r}"
            kind, body = got
            if kind == P.ERROR:
                assert body["code"] in P.ERROR_NAMES and isinstance(body["message"], str)
                replies["error"] += 1
            elif kind == P.STATUS and "waiting" in body and body.get("request_id") is None:
                seen_status = True
                break
            else:
                replies["other"] += 1
        assert seen_status

    try:
        throw()
        assert broker._thread is not None and broker._thread.is_alive()
        assert replies["error"] > 50  # the strategies really did produce bad input
        raw.send(P.DISCONNECT, {})  # it may have said READY along the way; it must not take the next job
        cell = AssistClient(
            broker.endpoint, "cell-1", keyring.client("cell-1"), keyring.server_key, heartbeat_s=HB
        )
        cell.start()
        alice = AssociateClient(broker.endpoint, keyring.client("alice"), keyring.server_key, heartbeat_s=HB)
        try:
            req = hx.make_request()
            fut = cell.ask(req)
            job = alice.next_request(10)
            assert job is not None and job.request_id == req.request_id
            alice.answer(job.request_id, "approve", candidate_index=1)
            ans = fut.result(10)
            assert (ans.status, ans.candidate_index, ans.associate_id) == ("answered", 1, "alice")
        finally:
            cell.close()
            alice.close()
        # Nothing the fuzzer sent was journaled: the one row is the normal request, with one final state.
        rows = hx.journal_rows(broker.config.data_dir)
        assert list(rows) == [req.request_id] and rows[req.request_id][:2] == ("answered", "answered")
    finally:
        raw.close()
