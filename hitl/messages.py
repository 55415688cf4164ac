"""What the cell asks a person, and what the person answers. The assist queue's payload vocabulary.

These travel msgpack-encoded inside the broker protocol (docs/protocol.md); `to_wire`/`from_wire`
convert to and from plain dicts of msgpack-native types.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

AnswerKind = Literal["approve", "point", "no_safe_pick", "skip"]
FinalStatus = Literal["answered", "expired", "cancelled"]


@dataclass(frozen=True)
class CandidateView:
    """One candidate as an associate sees it (numbered on the image)."""

    index: int  # number drawn on the image (0-based position in the Plan)
    u: int  # pixel column of the grasp point
    v: int  # pixel row of the grasp point
    gripper: str  # "suction" | "parallel_jaw"
    p_success: float  # calibrated probability shown to the person


@dataclass(frozen=True)
class AssistRequest:
    cell_id: str
    deadline: float  # unix seconds; after this the broker answers "expired"
    image_png: bytes  # the tote with numbered candidates drawn (PNG)
    candidates: tuple[CandidateView, ...] = ()
    reasons: tuple[str, ...] = ()  # why the cell is asking (the Plan's reasons)
    priority: int = 0  # higher first among equal deadlines
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # idempotency key, per cell
    created: float = 0.0  # unix seconds when the cell created it
    context: dict[str, Any] = field(default_factory=dict)  # e.g. frame_id, tote id, model version

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = [asdict(c) for c in self.candidates]
        d["reasons"] = list(self.reasons)
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> AssistRequest:
        return cls(
            cell_id=str(d["cell_id"]),
            deadline=float(d["deadline"]),
            image_png=bytes(d["image_png"]),
            candidates=tuple(CandidateView(**c) for c in d.get("candidates", ())),
            reasons=tuple(str(r) for r in d.get("reasons", ())),
            priority=int(d.get("priority", 0)),
            request_id=str(d["request_id"]),
            created=float(d.get("created", 0.0)),
            context=dict(d.get("context", {})),
        )


@dataclass(frozen=True)
class AssistAnswer:
    request_id: str
    status: FinalStatus  # answered by a person, expired at the deadline, or cancelled by the cell
    kind: AnswerKind | None = None  # only when status == "answered"
    candidate_index: int | None = None  # for kind == "approve"
    pixel: tuple[int, int] | None = None  # (u, v) for kind == "point"
    # For kind == "point": the gripper the person chose for the clicked spot ("suction" |
    # "parallel_jaw"); None lets the cell choose (suction).
    gripper: str | None = None
    # Who answered: the person. For an associate key, its authenticated name; for a console, the person
    # the console named (on_behalf_of), with the console's key name in `via`.
    associate_id: str | None = None
    answered_at: float = 0.0  # unix seconds
    note: str = ""
    via: str | None = None  # console key name when a console answered for `associate_id`; else None

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel"] = list(self.pixel) if self.pixel is not None else None
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> AssistAnswer:
        px = d.get("pixel")
        return cls(
            request_id=str(d["request_id"]),
            status=d["status"],
            kind=d.get("kind"),
            candidate_index=d.get("candidate_index"),
            pixel=(int(px[0]), int(px[1])) if px is not None else None,
            associate_id=d.get("associate_id"),
            answered_at=float(d.get("answered_at", 0.0)),
            note=str(d.get("note", "")),
            gripper=d.get("gripper"),
            via=d.get("via"),
        )
