"""The fleet view's data: one row per cell, from whatever source knows the fleet.

`FleetSource` is the seam. `BrokerFleetSource` is what the console can know today, from the broker:
the queue (waiting, held, connected associates and cells) and, per cell, what the requests assigned to
this console said (model version, last request, how many were answered here). What the broker cannot
know (a cell's state, picks per hour, rollout stage) is None and the page shows "unknown" rather than a
guess. `FleetServiceSource` adds the fleet service's status (`pickcell fleet serve`: each cell's
state, picks per hour, assists waiting, model and stage, as the cells report them) on top of it;
`pickcell console --fleet DIR` uses it. Any other source plugs in through
`create_app(..., fleet_factory=...)`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class CellRow:
    cell_id: str
    state: str | None  # "picking" | "waiting" | "stopped" | "protective_stop" | ... ; None = not known
    picks_per_hour: float | None  # None = not known
    assists_waiting: int | None  # requests of this cell waiting for a person; None = not known
    model_version: str | None
    rollout_stage: str | None  # "shadow" | "canary" | "everyone" | ...; None = not known
    last_request_at: float | None  # unix s of the cell's latest assist request seen
    assists_answered_here: int = 0  # answered through this console since it started


@dataclass(frozen=True)
class FleetView:
    source: str  # where the numbers come from, shown on the page
    at: float  # unix s
    cells: tuple[CellRow, ...]
    queue_waiting: int | None  # requests waiting at the broker for any associate
    queue_held: int | None  # requests held by associates (people looking at them)
    associates_connected: int | None
    cells_connected: int | None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cells"] = [asdict(c) for c in self.cells]
        return d


class FleetSource(Protocol):
    async def snapshot(self) -> FleetView: ...


class BrokerFleetSource:
    """What the broker (its status reply) and this console's assignments tell about the fleet."""

    def __init__(self, desk: Any, link: Any, status_timeout_s: float = 2.0):
        self.desk = desk
        self.link = link
        self.status_timeout_s = status_timeout_s

    async def snapshot(self) -> FleetView:
        import asyncio

        status: dict[str, Any] = {}
        try:
            status = await asyncio.wait_for(asyncio.wrap_future(self.link.status()), self.status_timeout_s)
        except Exception:  # broker down or slow: show what the console knows, with the queue unknown
            status = {}
        open_here: dict[str, int] = {}
        for h in self.desk.held.values():
            open_here[h.request.cell_id] = open_here.get(h.request.cell_id, 0) + 1
        rows = []
        for cell_id, seen in sorted(self.desk.cells.items()):
            rows.append(
                CellRow(
                    cell_id=cell_id,
                    # The broker knows a cell is asking while it has requests open; nothing else.
                    state="waiting for a person" if open_here.get(cell_id) else None,
                    picks_per_hour=None,
                    assists_waiting=open_here.get(cell_id, 0),
                    model_version=seen.model_version,
                    rollout_stage=None,
                    last_request_at=seen.last_request_at or None,
                    assists_answered_here=seen.answered_here,
                )
            )

        def _int(key: str) -> int | None:
            v = status.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        return FleetView(
            source="assist broker" if status else "assist broker (not reachable)",
            at=time.time(),
            cells=tuple(rows),
            queue_waiting=_int("waiting"),
            queue_held=_int("held_total") if _int("held_total") is not None else _int("held"),
            associates_connected=_int("associates"),
            cells_connected=_int("cells"),
        )


class FleetServiceSource:
    """The fleet service's status (per cell: state, picks per hour, assists waiting, model version,
    rollout stage) merged with what the broker knows. Asks the service's control socket
    (`ipc://FLEET/control.sock`, so the console runs where the fleet folder is readable); if the service
    does not answer, the view says so and shows the broker's knowledge alone."""

    def __init__(self, fleet_dir: str | Path, broker: BrokerFleetSource, timeout_s: float = 2.0):
        self.fleet_dir = Path(fleet_dir)
        self.broker = broker
        self.timeout_s = timeout_s

    async def snapshot(self) -> FleetView:
        import asyncio

        from fleet.service import send_control

        base = await self.broker.snapshot()
        try:
            status = await asyncio.to_thread(send_control, self.fleet_dir, "status", self.timeout_s)
        except (TimeoutError, OSError, ValueError) as exc:
            return replace(base, source=f"{base.source}; fleet service not reachable ({exc})")
        if not status.get("ok"):
            return replace(base, source=f"{base.source}; fleet service: {status.get('error')}")
        rows = {c.cell_id: c for c in base.cells}
        for name, c in (status.get("cells") or {}).items():
            seen = rows.get(name)
            pph = c.get("picks_per_hour")
            waiting = c.get("assists_waiting")
            rows[name] = CellRow(
                cell_id=name,
                state=c.get("state"),
                picks_per_hour=float(pph) if isinstance(pph, (int, float)) else None,
                assists_waiting=waiting
                if isinstance(waiting, int)
                else (seen.assists_waiting if seen else None),
                model_version=c.get("model_version") or (seen.model_version if seen else None),
                rollout_stage=c.get("stage"),
                last_request_at=seen.last_request_at if seen else None,
                assists_answered_here=seen.assists_answered_here if seen else 0,
            )
        return replace(
            base, source=f"fleet service and {base.source}", cells=tuple(rows[k] for k in sorted(rows))
        )
