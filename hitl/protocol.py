"""The assist queue's wire protocol (docs/protocol.md is the normative description; this follows it).

Every message, in both directions, is three ZeroMQ frames after the ROUTER's routing envelope:

    frame 0: b"PKC1"           protocol tag + version
    frame 1: message type      ASCII, e.g. b"submit"
    frame 2: body              a msgpack map (str keys)

Clients are DEALER sockets, the broker is one ROUTER socket. This module holds only constants and
pure encode/decode helpers so that the broker, both clients, the fuzz tests and the benchmark share one
definition of the protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL = b"PKC1"  # tag + version; a peer speaking another version gets E_VERSION
MAX_BODY_BYTES = 4 * 1024 * 1024  # a larger body is answered with E_TOO_LARGE
# Hard cap per ZeroMQ message (zmq.MAXMSGSIZE on the broker socket): above this libzmq drops the
# connection itself, before Python sees a byte, so memory stays bounded under abuse.
MAX_WIRE_BYTES = 2 * MAX_BODY_BYTES + 4096
MAX_ID_CHARS = 128  # request_id, cell_id, associate names
MAX_NOTE_CHARS = 2000

HEARTBEAT_S = 1.0  # both directions; both ends must agree
HEARTBEAT_LIVENESS = 3  # missed heartbeats after which a peer is gone

# Message types.
SUBMIT = b"submit"  # cell -> broker: a new (or resubmitted) AssistRequest
ACK = b"ack"  # broker -> cell/associate: the submit/answer/cancel was journaled
RESULT = b"result"  # broker -> cell: the request's one final state (AssistAnswer)
DELIVERED = b"delivered"  # cell -> broker: results received; the broker stops re-sending them
CANCEL = b"cancel"  # cell -> broker: withdraw a request; broker -> associate: stop working on it
READY = b"ready"  # associate -> broker: give me one request
ASSIGN = b"assign"  # broker -> associate: here is one request
ANSWER = b"answer"  # associate -> broker: a person's answer
RELEASE = b"release"  # associate -> broker: give the held request back (skip, or not at the screen)
STATUS = b"status"  # any -> broker: queue depth (and one request's state); broker -> any: the reply
HEARTBEAT = b"heartbeat"  # both directions, every HEARTBEAT_S
DISCONNECT = b"disconnect"  # client -> broker: leaving now (held requests go back to the queue)
ERROR = b"error"  # broker -> any: the message was refused

CLIENT_TYPES = frozenset({SUBMIT, DELIVERED, CANCEL, READY, ANSWER, RELEASE, STATUS, HEARTBEAT, DISCONNECT})
BROKER_TYPES = frozenset({ACK, RESULT, CANCEL, ASSIGN, STATUS, HEARTBEAT, ERROR})

# Request states. "queued" covers waiting and held-by-an-associate; the rest are final.
QUEUED = "queued"
FINAL_STATES = ("answered", "expired", "cancelled")
ANSWER_KINDS = ("approve", "point", "no_safe_pick")  # "skip" is a RELEASE, not a final answer

# Error codes (HTTP-like numbers so that they read at a glance).
E_MALFORMED = 400  # wrong frame count, body not msgpack, body not a map
E_FORBIDDEN = 403  # e.g. cancelling another cell's request
E_UNKNOWN_REQUEST = 404  # no such request_id
E_UNKNOWN_TYPE = 405  # message type not in the protocol
E_ALREADY_FINAL = 409  # answering/cancelling a request that already has its final state
E_TOO_LARGE = 413  # body above MAX_BODY_BYTES
E_INVALID = 422  # well-formed msgpack, but fields missing, of the wrong type or out of range
E_VERSION = 426  # frame 0 is not PROTOCOL
E_INTERNAL = 500  # the broker failed; the message was not journaled, retry
ERROR_NAMES = {
    E_MALFORMED: "malformed",
    E_FORBIDDEN: "forbidden",
    E_UNKNOWN_REQUEST: "unknown_request",
    E_UNKNOWN_TYPE: "unknown_type",
    E_ALREADY_FINAL: "already_final",
    E_TOO_LARGE: "too_large",
    E_INVALID: "invalid",
    E_VERSION: "version",
    E_INTERNAL: "internal",
}


class ProtocolError(Exception):
    """A message that breaks the protocol; `code` is one of the E_* numbers."""

    def __init__(self, code: int, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode(msg_type: bytes, body: dict[str, Any]) -> list[bytes]:
    """The three frames of one message (without any routing envelope)."""
    return [PROTOCOL, msg_type, pack(body)]


def error_body(code: int, message: str, request_id: str | None = None, ref: bytes | None = None) -> dict:
    return {
        "code": int(code),
        "name": ERROR_NAMES.get(code, "error"),
        "message": message[:500],
        "request_id": request_id,
        "ref": ref.decode("ascii", "replace")[:32] if ref is not None else None,
    }


@dataclass(frozen=True)
class Message:
    msg_type: bytes
    body: dict[str, Any]


def decode(frames: list[bytes], allowed_types: frozenset[bytes]) -> Message:
    """Parse the three protocol frames; raises ProtocolError with the right code on anything else."""
    if len(frames) != 3:
        raise ProtocolError(E_MALFORMED, f"expected 3 frames (tag, type, body), got {len(frames)}")
    tag, msg_type, raw = frames
    if tag != PROTOCOL:
        raise ProtocolError(
            E_VERSION, f"unsupported protocol tag {bytes(tag[:16])!r}, this broker speaks PKC1"
        )
    if msg_type not in allowed_types:
        raise ProtocolError(E_UNKNOWN_TYPE, f"unknown message type {bytes(msg_type[:32])!r}")
    if len(raw) > MAX_BODY_BYTES:
        raise ProtocolError(E_TOO_LARGE, f"body of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES}")
    try:
        # Limits keep a hostile body from making msgpack allocate far more than it sent.
        body = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_BODY_BYTES,
            max_str_len=MAX_BODY_BYTES,
            max_array_len=100_000,
            max_map_len=10_000,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(E_MALFORMED, f"body is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError(E_MALFORMED, "body must be a msgpack map")
    return Message(bytes(msg_type), body)


# ---- field validation helpers (raise E_INVALID with the field name) ----


def req_str(body: dict, key: str, max_chars: int = MAX_ID_CHARS, allow_empty: bool = False) -> str:
    value = body.get(key)
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > max_chars:
        raise ProtocolError(
            E_INVALID, f"field {key!r} must be a non-empty string of at most {max_chars} characters"
        )
    return value


def req_float(body: dict, key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(E_INVALID, f"field {key!r} must be a finite number")
    return float(value)


def opt_int(body: dict, key: str, default: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(E_INVALID, f"field {key!r} must be an integer")
    return value


def validate_request(body: dict) -> dict[str, Any]:
    """Check a submit body's "request" map (AssistRequest.to_wire); returns it unchanged if valid."""
    req = body.get("request")
    if not isinstance(req, dict):
        raise ProtocolError(E_INVALID, "submit needs a 'request' map (AssistRequest.to_wire())")
    rid = req.get("request_id")
    rid_for_error = rid if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS else None
    try:
        req_str(req, "request_id")
        req_str(req, "cell_id")
        req_float(req, "deadline")
        if not isinstance(req.get("image_png"), bytes):
            raise ProtocolError(E_INVALID, "field 'image_png' must be binary (PNG bytes)")
        prio = opt_int(req, "priority", 0)
        if prio is not None and not -(2**31) <= prio < 2**31:
            raise ProtocolError(E_INVALID, "field 'priority' must fit in 32 bits")
        cands = req.get("candidates", [])
        if not isinstance(cands, list) or not all(isinstance(c, dict) for c in cands):
            raise ProtocolError(E_INVALID, "field 'candidates' must be a list of maps")
        reasons = req.get("reasons", [])
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise ProtocolError(E_INVALID, "field 'reasons' must be a list of strings")
        if not isinstance(req.get("context", {}), dict):
            raise ProtocolError(E_INVALID, "field 'context' must be a map")
        # The dataclass is the last word on the shape (candidate fields etc.).
        from hitl.messages import AssistRequest

        AssistRequest.from_wire(req)
    except ProtocolError as exc:
        exc.request_id = rid_for_error
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(E_INVALID, f"request does not parse: {exc}", rid_for_error) from None
    return req


def validate_answer(body: dict, candidates: list[dict] | None) -> dict[str, Any]:
    """Check an answer body; returns the normalized fields {kind, candidate_index, pixel, note}."""
    rid = req_str(body, "request_id")
    kind = body.get("kind")
    if kind not in ANSWER_KINDS:
        raise ProtocolError(E_INVALID, f"field 'kind' must be one of {ANSWER_KINDS}", rid)
    out: dict[str, Any] = {"kind": kind, "candidate_index": None, "pixel": None}
    if kind == "approve":
        idx = opt_int(body, "candidate_index")
        valid = {c.get("index") for c in candidates or ()}
        if idx is None or idx not in valid:
            raise ProtocolError(E_INVALID, f"'approve' needs candidate_index among {sorted(valid)}", rid)
        out["candidate_index"] = idx
    elif kind == "point":
        px = body.get("pixel")
        if (
            not isinstance(px, (list, tuple))
            or len(px) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 100_000 for p in px)
        ):
            raise ProtocolError(E_INVALID, "'point' needs pixel [u, v] of two non-negative integers", rid)
        out["pixel"] = [int(px[0]), int(px[1])]
        gripper = body.get("gripper")
        if gripper is not None and gripper not in ("suction", "parallel_jaw"):
            raise ProtocolError(E_INVALID, "field 'gripper' must be 'suction' or 'parallel_jaw'", rid)
        if gripper is not None:
            out["gripper"] = gripper
    note = body.get("note", "")
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
        raise ProtocolError(
            E_INVALID, f"field 'note' must be a string of at most {MAX_NOTE_CHARS} chars", rid
        )
    out["note"] = note
    return out
