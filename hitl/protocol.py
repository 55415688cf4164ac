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
import zlib
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

# Roles (bound to keys by the broker's allowlist folders, hitl/keys.py) and what each may send.
# Any other message type from a role is refused with E_FORBIDDEN. docs/protocol.md has the table.
CELL, ASSOCIATE, CONSOLE = "cell", "associate", "console"
ROLE_MESSAGES: dict[str, frozenset[bytes]] = {
    CELL: frozenset({SUBMIT, CANCEL, DELIVERED, STATUS, HEARTBEAT, DISCONNECT}),
    ASSOCIATE: frozenset({READY, ANSWER, RELEASE, STATUS, HEARTBEAT, DISCONNECT}),
    CONSOLE: frozenset({READY, ANSWER, RELEASE, STATUS, HEARTBEAT, DISCONNECT}),
}
ANSWERING_ROLES = (ASSOCIATE, CONSOLE)

# Grippers a candidate may name (grasping.types.GRIPPER_KINDS; kept here so the wire has no torch/numpy).
KNOWN_GRIPPERS = ("suction", "parallel_jaw")
MAX_CANDIDATES = 256
MAX_REASONS = 64
MAX_IMAGE_SIDE = 16384  # px; a larger PNG header is refused

# Request states. "queued" covers waiting and held-by-an-associate; the rest are final.
QUEUED = "queued"
FINAL_STATES = ("answered", "expired", "cancelled")
ANSWER_KINDS = ("approve", "point", "no_safe_pick")  # "skip" is a RELEASE, not a final answer

# Error codes (HTTP-like numbers so that they read at a glance).
E_MALFORMED = 400  # wrong frame count, body not msgpack, body not a map
E_FORBIDDEN = 403  # not for this key: wrong role, another cell, a request it does not hold
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
    """A message that breaks the protocol; `code` is one of the E_* numbers, `field` the offending key."""

    def __init__(self, code: int, message: str, request_id: str | None = None, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.field = field
        self.cell_id: str | None = None  # set where the request's cell is known and worth saying


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode(msg_type: bytes, body: dict[str, Any]) -> list[bytes]:
    """The three frames of one message (without any routing envelope)."""
    return [PROTOCOL, msg_type, pack(body)]


def error_body(
    code: int,
    message: str,
    request_id: str | None = None,
    ref: bytes | None = None,
    field: str | None = None,
    cell_id: str | None = None,
) -> dict:
    return {
        "code": int(code),
        "name": ERROR_NAMES.get(code, "error"),
        "message": message[:500],
        "request_id": request_id,
        "cell_id": cell_id,
        "field": field,
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
        raise ProtocolError(
            E_TOO_LARGE,
            f"body of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES}",
            _peek_request_id(raw),
            field="body",
        )
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


# ---- field validation (every refusal is E_INVALID naming the field) ----


def _invalid(field: str, message: str, request_id: str | None = None) -> ProtocolError:
    return ProtocolError(E_INVALID, message, request_id, field)


def req_str(body: dict, key: str, max_chars: int = MAX_ID_CHARS, allow_empty: bool = False) -> str:
    value = body.get(key)
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > max_chars:
        raise _invalid(key, f"field {key!r} must be a non-empty string of at most {max_chars} characters")
    return value


def opt_str(body: dict, key: str, max_chars: int = MAX_ID_CHARS) -> str | None:
    """A string field that may be absent or null (None then)."""
    if body.get(key) is None:
        return None
    return req_str(body, key, max_chars)


def req_float(body: dict, key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(key, f"field {key!r} must be a finite number")
    return float(value)


def opt_int(body: dict, key: str, default: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(key, f"field {key!r} must be an integer")
    return value


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bit depths the PNG spec allows for each colour type (IHDR).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR, after checking the file's structure.

    Checked without decompressing (cheap enough for every request): the signature, IHDR first with a
    legal bit depth / colour type and sides in 1..MAX_IMAGE_SIDE, every chunk's length and CRC, at least
    one IDAT, IEND last and nothing after it. Raises ValueError saying what is wrong.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("not binary")
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("no PNG signature")
    mv = memoryview(data)
    n, pos = len(data), len(PNG_SIGNATURE)
    size: tuple[int, int] | None = None
    idat = False
    while True:
        if pos + 12 > n:
            raise ValueError("truncated (no IEND chunk)")
        length = int.from_bytes(mv[pos : pos + 4], "big")
        ctype = bytes(mv[pos + 4 : pos + 8])
        end = pos + 12 + length
        if end > n:
            raise ValueError(f"truncated: chunk {ctype!r} runs past the end")
        if zlib.crc32(mv[pos + 4 : pos + 8 + length]) != int.from_bytes(mv[end - 4 : end], "big"):
            raise ValueError(f"chunk {ctype!r} fails its CRC")
        if size is None:
            if ctype != b"IHDR" or length != 13:
                raise ValueError("does not start with an IHDR chunk")
            w = int.from_bytes(mv[pos + 8 : pos + 12], "big")
            h = int.from_bytes(mv[pos + 12 : pos + 16], "big")
            depth, colour = mv[pos + 16], mv[pos + 17]
            if not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
                raise ValueError(f"image size {w}x{h} outside 1..{MAX_IMAGE_SIDE} px a side")
            if depth not in _PNG_DEPTHS.get(colour, ()):
                raise ValueError(f"bit depth {depth} with colour type {colour} is not a PNG format")
            size = (w, h)
        elif ctype == b"IDAT":
            idat = True
        elif ctype == b"IEND":
            if end != n:
                raise ValueError(f"{n - end} bytes after the IEND chunk")
            break
        pos = end
    if not idat:
        raise ValueError("no image data (IDAT chunk)")
    return size


@dataclass(frozen=True)
class CheckedRequest:
    """A submit's request map that passed validate_request, with its image size (px)."""

    request: dict[str, Any]  # wire dict, stored and sent to associates as-is
    width: int
    height: int


_CANDIDATE_KEYS = frozenset({"index", "u", "v", "gripper", "p_success"})


def _int_in(c: dict, key: str, lo: int, hi: int, field: str) -> int:
    v = c.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise _invalid(field, f"field {field!r} must be an integer in [{lo}, {hi})")
    return v


def validate_request(body: dict) -> CheckedRequest:
    """Check a submit body's "request" map (AssistRequest.to_wire) at the door (docs/protocol.md 3).

    Required: request_id, cell_id, deadline, image_png (a real PNG). Optional: candidates (each inside the
    image, unique index, known gripper, p_success in [0, 1]), reasons, priority, created, context. The
    deadline's distance from now is the broker's check (check_deadline): a resubmitted id may be past it.
    """
    req = body.get("request")
    if not isinstance(req, dict):
        raise _invalid("request", "submit needs a 'request' map (AssistRequest.to_wire())")
    rid = req.get("request_id")
    rid_for_error = rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else None
    try:
        req_str(req, "request_id")
        req_str(req, "cell_id")
        req_float(req, "deadline")
        image = req.get("image_png")
        if not isinstance(image, bytes):
            raise _invalid("image_png", "field 'image_png' must be binary (the PNG's bytes)")
        try:
            w, h = png_size(image)
        except ValueError as exc:
            raise _invalid("image_png", f"field 'image_png' is not a valid PNG: {exc}") from None
        prio = opt_int(req, "priority", 0)
        if prio is not None and not -(2**31) <= prio < 2**31:
            raise _invalid("priority", "field 'priority' must fit in 32 bits")
        if req.get("created") is not None:
            req_float(req, "created")
        cands = req.get("candidates", [])
        if not isinstance(cands, list) or len(cands) > MAX_CANDIDATES:
            raise _invalid(
                "candidates", f"field 'candidates' must be a list of at most {MAX_CANDIDATES} maps"
            )
        seen: set[int] = set()
        for i, c in enumerate(cands):
            f = f"candidates[{i}]"
            if not isinstance(c, dict):
                raise _invalid(f, f"{f} must be a map {{index, u, v, gripper, p_success}}")
            unknown = set(c) - _CANDIDATE_KEYS
            missing = _CANDIDATE_KEYS - set(c)
            if unknown or missing:
                raise _invalid(f, f"{f} must have exactly the keys {sorted(_CANDIDATE_KEYS)}")
            idx = _int_in(c, "index", 0, 2**31, f"{f}.index")
            if idx in seen:
                raise _invalid(f"{f}.index", f"candidate index {idx} appears twice")
            seen.add(idx)
            _int_in(c, "u", 0, w, f"{f}.u")  # column, inside the image
            _int_in(c, "v", 0, h, f"{f}.v")  # row, inside the image
            if c["gripper"] not in KNOWN_GRIPPERS:
                raise _invalid(f"{f}.gripper", f"{f}.gripper must be one of {KNOWN_GRIPPERS}")
            p = c["p_success"]
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
                raise _invalid(f"{f}.p_success", f"{f}.p_success must be a probability in [0, 1]")
        reasons = req.get("reasons", [])
        if (
            not isinstance(reasons, list)
            or len(reasons) > MAX_REASONS
            or not all(isinstance(r, str) and len(r) <= MAX_NOTE_CHARS for r in reasons)
        ):
            raise _invalid(
                "reasons", f"field 'reasons' must be a list of at most {MAX_REASONS} strings "
                f"of at most {MAX_NOTE_CHARS} characters"
            )  # fmt: skip
        if not isinstance(req.get("context", {}), dict):
            raise _invalid("context", "field 'context' must be a map")
    except ProtocolError as exc:
        exc.request_id = rid_for_error
        raise
    return CheckedRequest(req, w, h)


def check_deadline(deadline: float, now: float, max_horizon_s: float, request_id: str | None) -> None:
    """A new request's deadline must lie in the future and at most max_horizon_s ahead (broker clock)."""
    if deadline <= now:
        raise _invalid(
            "deadline",
            f"deadline {deadline:.3f} is {now - deadline:.3f} s in the past (broker clock)",
            request_id,
        )
    if deadline > now + max_horizon_s:
        raise _invalid(
            "deadline",
            f"deadline is {deadline - now:.0f} s ahead; this broker accepts at most {max_horizon_s:.0f} s",
            request_id,
        )


def validate_answer(body: dict, candidates: list[dict] | None, size: tuple[int, int]) -> dict[str, Any]:
    """Check an answer body against its request; returns {kind, candidate_index, pixel, note[, gripper]}."""
    rid = req_str(body, "request_id")
    try:
        kind = body.get("kind")
        if kind not in ANSWER_KINDS:
            raise _invalid("kind", f"field 'kind' must be one of {ANSWER_KINDS}")
        out: dict[str, Any] = {"kind": kind, "candidate_index": None, "pixel": None}
        if kind == "approve":
            idx = opt_int(body, "candidate_index")
            valid = {c.get("index") for c in candidates or ()}
            if idx is None or idx not in valid:
                raise _invalid("candidate_index", f"'approve' needs candidate_index among {sorted(valid)}")
            out["candidate_index"] = idx
        elif kind == "point":
            px = body.get("pixel")
            w, h = size
            if (
                not isinstance(px, (list, tuple))
                or len(px) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in px)
                or not (0 <= px[0] < w and 0 <= px[1] < h)
            ):
                raise _invalid(
                    "pixel",
                    f"'point' needs pixel [u, v] inside the {w}x{h} image (0 <= u < {w}, 0 <= v < {h})",
                )
            out["pixel"] = [int(px[0]), int(px[1])]
            gripper = body.get("gripper")  # the tool for the clicked spot; absent = the cell chooses
            if gripper is not None and gripper not in KNOWN_GRIPPERS:
                raise _invalid("gripper", f"field 'gripper' must be one of {KNOWN_GRIPPERS}")
            if gripper is not None:
                out["gripper"] = gripper
        note = body.get("note", "")
        if note is None:
            note = ""
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            raise _invalid("note", f"field 'note' must be a string of at most {MAX_NOTE_CHARS} chars")
        out["note"] = note
    except ProtocolError as exc:
        exc.request_id = rid
        raise
    return out


def _peek_request_id(raw: bytes) -> str | None:
    """The request_id of a body refused as too large, if it parses (so the 413 can name it)."""
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception:  # whatever the bytes are, the 413 stands; the id is a courtesy
        return None
    if not isinstance(body, dict):
        return None
    for holder in (body, body.get("request")):
        if isinstance(holder, dict):
            rid = holder.get("request_id")
            if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS:
                return rid
    return None
