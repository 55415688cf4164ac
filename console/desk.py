"""The console's desk: which signed-in person looks at which held request, and what they may answer.

The broker hands the console one request per READY; the desk gives each request to one free person
(the one waiting longest) and asks the broker for more while people are free. It checks every answer
from the browser against what that person holds: the request id, the candidate numbers the cell offered,
a pixel inside the image. It lives on the web server's event loop (single-threaded, no locks); the
broker link's thread reaches it through `loop.call_soon_threadsafe`.

Skip: the request goes to another free person at this console who has not skipped it. If every free
person here skipped it, it stays parked for `park_s` (someone who did not skip may come free) and then
goes back to the broker for associates elsewhere. The console remembers who skipped it, so when the
broker hands it back, it never reaches them again. When nobody here is free, a request goes back at once.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hitl import protocol as P
from hitl.client import AssistError
from hitl.messages import AssistRequest

log = logging.getLogger(__name__)

ANSWER_KINDS = ("approve", "point", "no_safe_pick")
GRIPPERS = ("suction", "parallel_jaw")  # what a 'point' answer may ask the cell to use
MAX_NOTE_CHARS = 500  # what the page lets a person type; the protocol allows 2,000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Key = tuple[str, str]  # (cell_id, request_id): request ids are unique per cell only


class DeskError(Exception):
    """Refused input from the browser; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if `data` is not a PNG."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return (w, h) if w > 0 and h > 0 else None


@dataclass
class Held:
    """A request the broker assigned to this console."""

    request: AssistRequest
    width: int  # px, from the PNG header; 0 when the request carries no readable image
    height: int
    received_at: float  # unix s, when the broker's assign arrived
    holder: str | None = None  # the person looking at it
    given_at: float = 0.0  # unix s, when the holder got it
    skipped_by: set[str] = field(default_factory=set)
    busy: bool = False  # an answer or skip is on its way to the broker
    park_until: float = 0.0  # unix s; >0: everyone free here skipped it, give it back at this time

    @property
    def key(self) -> Key:
        return (self.request.cell_id, self.request.request_id)


@dataclass
class Person:
    name: str
    conns: set[Any] = field(default_factory=set)  # open page connections (WebSockets)
    current: Key | None = None  # (cell_id, request_id) they look at
    free_since: float = 0.0  # unix s; orders who gets the next request
    answered: int = 0
    away: int = 0  # counts departures (last page closed), so a late check of an old one does nothing


@dataclass
class CellSeen:
    """What the console learned about one cell from its requests (the broker's view of the fleet)."""

    cell_id: str
    requests: int = 0  # assigned to this console
    answered_here: int = 0
    last_request_at: float = 0.0  # unix s (cell clock: the request's `created`)
    model_version: str | None = None  # from the request's context
    tote_id: str | None = None


class Desk:
    def __init__(
        self,
        link: Any,  # ConsoleLink (or anything with want_work / answer / release)
        clock: Callable[[], float] = time.time,  # unix s, the clock deadlines are on
        answer_timeout_s: float = 10.0,
        park_s: float = 1.0,
    ):
        self.link = link
        self.clock = clock
        self.answer_timeout_s = answer_timeout_s
        self.park_s = park_s  # s a request everyone free here skipped stays before going back
        # Keyed by (cell_id, request_id): request ids are unique per cell only (docs/protocol.md).
        self.held: dict[Key, Held] = {}
        self.people: dict[str, Person] = {}
        self.cells: dict[str, CellSeen] = {}
        self.broker_waiting = 0  # queue depth the broker last told us
        self.on_change: Callable[[set[str]], None] = lambda names: None  # the app pushes to these people
        self.on_notice: Callable[[str, str], None] = lambda name, text: None  # a line for one page
        self._want_sent = -1
        self._skips: dict[Key, tuple[set[str], float]] = {}  # released after skips: who, until when

    # ---- people ----

    def connect(self, name: str, conn: Any) -> None:
        p = self.people.setdefault(name, Person(name, free_since=self.clock()))
        if not p.conns and p.current is None:
            p.free_since = self.clock()
        p.conns.add(conn)
        self._pump({name})

    def disconnect(self, name: str, conn: Any, keep_s: float = 0.0) -> None:
        """A page closed. When it was the person's last, their request goes to someone else (or back to
        the broker), after `keep_s` seconds if they are still away then: a tablet's Wi-Fi blip or a
        reload should not cost them the question they are looking at."""
        p = self.people.get(name)
        if p is None:
            return
        p.conns.discard(conn)
        if p.conns:
            return
        p.away += 1
        if keep_s > 0 and p.current is not None:
            asyncio.get_running_loop().call_later(keep_s, self._still_away, name, p.away)
        else:
            self._still_away(name, p.away)

    def _still_away(self, name: str, away: int) -> None:
        p = self.people.get(name)
        if p is None or p.conns or p.away != away:
            return  # back meanwhile (or away again since: that later check decides)
        if p.current is not None:
            h = self.held.get(p.current)
            p.current = None
            if h is not None and not h.busy:
                h.holder = None
        self._pump(set())

    def sign_out(self, name: str) -> None:
        p = self.people.get(name)
        if p is not None:
            for conn in list(p.conns):
                self.disconnect(name, conn)

    # ---- the broker's side ----

    def on_link_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "assign":
            req: AssistRequest = payload["request"]
            self.broker_waiting = int(payload.get("waiting", self.broker_waiting))
            size = png_size(req.image_png) or (0, 0)
            key = (req.cell_id, req.request_id)
            if key in self.held:
                return  # re-assigned after a reconnect: we have it already
            held = Held(req, size[0], size[1], self.clock())
            held.skipped_by |= self._skips.pop(key, (set(), 0.0))[0]  # came back after a skip
            self.held[key] = held
            seen = self.cells.setdefault(req.cell_id, CellSeen(req.cell_id))
            seen.requests += 1
            seen.last_request_at = max(seen.last_request_at, req.created)
            mv = req.context.get("model_version")
            if isinstance(mv, str):
                seen.model_version = mv
            tote = req.context.get("tote_id")
            if isinstance(tote, str):
                seen.tote_id = tote
            self._want_sent = -1  # the link counted one READY down
            self._pump(set())
        elif kind == "cancel":
            rid, cell_id = payload["request_id"], payload.get("cell_id") or ""
            keys = [k for k in self.held if k[1] == rid and (not cell_id or k[0] == cell_id)]
            reason = payload.get("reason", "cancelled")
            for key in keys if cell_id or len(keys) == 1 else ():
                self._drop(key, f"request {reason}" if reason != "answered" else "answered by someone else")

    def set_broker_waiting(self, waiting: int) -> None:
        if waiting != self.broker_waiting:
            self.broker_waiting = waiting
            self.on_change(set(self.people))

    def expire_due(self) -> None:
        """Drop held requests past their deadline (the broker's cancel normally does this first), give
        parked ones back to the broker, forget skips of requests that are over."""
        now = self.clock()
        for key, h in list(self.held.items()):
            if h.request.deadline <= now and not h.busy:
                self._drop(key, "request expired")
            elif h.park_until and now >= h.park_until and h.holder is None and not h.busy:
                self._release(h)
        for key in [k for k, (_, deadline) in self._skips.items() if deadline <= now]:
            del self._skips[key]

    # ---- answers from the browser ----

    def holding(self, name: str, request_id: Any) -> Held:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= P.MAX_ID_CHARS:
            raise DeskError(422, "request_id must be a string of 1-128 characters")
        # A person holds at most one request, so its id alone names it.
        h = next(
            (h for h in self.held.values() if h.holder == name and h.request.request_id == request_id), None
        )
        if h is None:
            raise DeskError(409, f"you do not hold request {request_id} (answered, expired or not yours)")
        return h

    def check_answer(self, name: str, body: Any) -> tuple[Held, dict[str, Any]]:
        """Validate an answer from the browser; returns the held request and the normalised fields."""
        if not isinstance(body, dict):
            raise DeskError(422, "the answer must be a JSON object")
        unknown = set(body) - {"request_id", "kind", "candidate_index", "pixel", "gripper", "note"}
        if unknown:
            raise DeskError(422, f"unknown fields {sorted(unknown)}")
        h = self.holding(name, body.get("request_id"))
        kind = body.get("kind")
        if kind not in ANSWER_KINDS:
            raise DeskError(422, f"kind must be one of {list(ANSWER_KINDS)}")
        out: dict[str, Any] = {"kind": kind, "candidate_index": None, "pixel": None, "gripper": None}
        if kind == "approve":
            idx = body.get("candidate_index")
            offered = [c.index for c in h.request.candidates]
            if isinstance(idx, bool) or not isinstance(idx, int) or idx not in offered:
                raise DeskError(422, f"candidate_index must be one of the offered candidates {offered}")
            out["candidate_index"] = idx
        elif kind == "point":
            px = body.get("pixel")
            if (
                not isinstance(px, list)
                or len(px) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in px)
            ):
                raise DeskError(422, "pixel must be [column, row], two integers")
            if not (0 <= px[0] < h.width and 0 <= px[1] < h.height):
                raise DeskError(422, f"pixel {px} is outside the {h.width}x{h.height} image")
            out["pixel"] = (px[0], px[1])
            gripper = body.get("gripper")
            if gripper is not None and gripper not in GRIPPERS:
                raise DeskError(422, f"gripper must be one of {list(GRIPPERS)} or absent")
            out["gripper"] = gripper
        if kind != "point" and body.get("gripper") is not None:
            raise DeskError(422, "gripper goes with a 'point' answer only")
        note = body.get("note", "")
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            raise DeskError(422, f"note must be text of at most {MAX_NOTE_CHARS} characters")
        out["note"] = note
        if h.busy:
            raise DeskError(409, "an answer for this request is already on its way")
        return h, out

    async def answer(self, name: str, body: Any) -> dict[str, Any]:
        h, fields = self.check_answer(name, body)
        rid = h.request.request_id
        h.busy = True
        fut = self.link.answer(
            rid,
            name,
            fields["kind"],
            fields["candidate_index"],
            fields["pixel"],
            fields["note"],
            gripper=fields["gripper"],
            cell_id=h.request.cell_id,
        )
        try:
            state = await asyncio.wait_for(asyncio.wrap_future(fut), self.answer_timeout_s)
        except AssistError as exc:
            self._drop(h.key, f"not sent: {exc}", notify_holder=False)
            status = 409 if exc.code in (P.E_ALREADY_FINAL, P.E_UNKNOWN_REQUEST) else 502
            raise DeskError(status, f"the broker refused the answer: {exc}") from None
        except asyncio.TimeoutError:
            h.busy = False  # the link re-sends it after a reconnect; the person may also try again
            raise DeskError(504, "the broker did not confirm the answer in time; try again") from None
        p = self.people.get(name)
        if p is not None:
            p.answered += 1
        seen = self.cells.get(h.request.cell_id)
        if seen is not None:
            seen.answered_here += 1
        self._drop(h.key, None, notify_holder=False)
        log.info("request %s answered %s by %s", rid, fields["kind"], name)
        return {
            "request_id": rid,
            "state": state,
            "kind": fields["kind"],
            "gripper": fields["gripper"],
            "associate": name,
        }

    async def skip(self, name: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) - {"request_id"}:
            raise DeskError(422, "skip takes {request_id} only")
        h = self.holding(name, body.get("request_id"))
        if h.busy:
            raise DeskError(409, "an answer for this request is already on its way")
        h.skipped_by.add(name)
        h.holder = None
        p = self.people[name]
        p.current = None
        p.free_since = self.clock()
        self._pump({name})
        return {"request_id": h.request.request_id, "state": "skipped", "associate": name}

    # ---- views ----

    def view(self, name: str) -> dict[str, Any]:
        """What one person's page shows (JSON-ready)."""
        p = self.people.get(name)
        h = self.held.get(p.current) if p is not None and p.current else None
        now = self.clock()
        req = None
        if h is not None:
            r = h.request
            req = {
                "request_id": r.request_id,
                "cell_id": r.cell_id,
                "deadline": r.deadline,
                "created": r.created,
                "received_at": h.received_at,
                "reasons": list(r.reasons),
                "priority": r.priority,
                "width": h.width,
                "height": h.height,
                "image_url": f"/api/requests/{r.request_id}/image",
                "candidates": [
                    {"index": c.index, "u": c.u, "v": c.v, "gripper": c.gripper, "p_success": c.p_success}
                    for c in r.candidates
                ],
                "context": {
                    k: v for k, v in r.context.items() if k in ("tote_id", "model_version", "frame_id")
                },
            }
        return {
            "type": "state",
            "you": name,
            "server_time": now,
            "queue": self.queue_view(),
            "request": req,
        }

    def queue_view(self) -> dict[str, Any]:
        now = self.clock()
        open_here = [h for h in self.held.values() if h.holder is None]
        ages = [now - (h.request.created or h.received_at) for h in self.held.values()]
        return {
            "waiting_at_broker": self.broker_waiting,
            "held_here": len(self.held),
            "unassigned_here": len(open_here),
            "people_here": sum(1 for p in self.people.values() if p.conns),
            "oldest_asked_s": round(max(ages), 1) if ages else None,
        }

    # ---- internals ----

    def _drop(self, key: Key, why: str | None, notify_holder: bool = True) -> None:
        h = self.held.pop(key, None)
        if h is None:
            return
        changed: set[str] = set()
        if h.holder is not None:
            p = self.people.get(h.holder)
            if p is not None and p.current == key:
                p.current = None
                p.free_since = self.clock()
                changed.add(p.name)
                if why and notify_holder:
                    self.on_notice(p.name, why)
        self._pump(changed)

    def _pump(self, changed: set[str]) -> None:
        """Give unassigned requests to free people; give back what nobody here can take; ask for more."""
        free = sorted(
            (p for p in self.people.values() if p.conns and p.current is None), key=lambda p: p.free_since
        )
        for h in sorted(self.held.values(), key=lambda h: (h.request.deadline, -h.request.priority)):
            if h.holder is not None or h.busy:
                continue
            taker = next((p for p in free if p.name not in h.skipped_by), None)
            if taker is not None:
                free.remove(taker)
                h.holder, h.given_at = taker.name, self.clock()
                taker.current = h.key
                changed.add(taker.name)
                continue
            if free:
                # Everyone free here skipped it. The broker does not track which person behind a console
                # skipped (a console's skip excludes nobody there), so it would hand it straight back
                # while we ask for work: park it here for a moment (a person who did not skip it may come
                # free), then give it back so that associates elsewhere get their turn.
                if h.park_until == 0.0:
                    h.park_until = self.clock() + self.park_s
                continue
            # Nobody here is free: back to the broker for someone else (it may come back to us later).
            self._release(h)
        want = len(free)
        want = len(free)
        if want != self._want_sent:
            self._want_sent = want
            self.link.want_work(want)
        if changed:
            self.on_change(changed | set(self.people))  # queue counts changed for everyone

    def _release(self, h: Held) -> None:
        rid = h.request.request_id
        del self.held[h.key]
        if h.skipped_by:
            self._skips[h.key] = (set(h.skipped_by), h.request.deadline)
        who = sorted(h.skipped_by)[0] if h.skipped_by else None
        fut = self.link.release(rid, who, skip=bool(h.skipped_by), cell_id=h.request.cell_id)
        fut.add_done_callback(lambda f, rid=rid: _log_release(rid, f))


def _log_release(rid: str, fut: Any) -> None:
    exc = fut.exception()
    if exc is not None:
        log.info("release of %s not confirmed: %s", rid, exc)
