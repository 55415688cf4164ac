"""The safety zone around the simulated cell: a person walking in triggers a protective stop.

What it is
    A stand-in for the laser scanner or light curtain that guards a real cell. The zone is occupied
    during given intervals of robot time (a person walks in at `t_in` and out at `t_out`). The
    simulated arm checks the zone at every motion sample (20 ms in free space, every 4.2 ms physics
    step in contact moves) and halts; the time between the person entering and the arm standing
    still is recorded for every stop.

What is randomised
    Nothing here: tests and scenarios say when people enter. (A scenario may draw the intervals from
    its own seeded generator.)

What counts as success
    The arm is halted within `max_halt_s` (100 ms) of robot time after the person enters, does not
    move while the zone is occupied, and, with `auto_reset`, resumes only after the person has left
    (a protective stop that resets itself, as collaborative cells do; explicit e-stops from the
    control socket always need `clear-stop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SafetyZone:
    intrusions: list[tuple[float, float]] = field(default_factory=list)  # (t_in, t_out), robot seconds
    auto_reset: bool = True  # clear the stop by itself once the zone is empty again
    max_halt_s: float = 0.1  # required reaction: halted this soon after an intrusion, seconds

    def enter(self, t_in: float, t_out: float) -> None:
        if not t_out > t_in:
            raise ValueError(f"a person must leave after entering: t_in={t_in}, t_out={t_out}")
        self.intrusions.append((float(t_in), float(t_out)))

    def entered_at(self, t: float) -> float | None:
        """When the person now in the zone entered (robot seconds), or None if the zone is empty at t."""
        for t_in, t_out in self.intrusions:
            if t_in <= t < t_out:
                return t_in
        return None


@dataclass(frozen=True)
class StopEvent:
    cause: str  # "zone" | "command"
    triggered_at: float  # robot seconds: person entered / stop commanded
    halted_at: float  # robot seconds: the arm stood still

    @property
    def reaction_s(self) -> float:
        return self.halted_at - self.triggered_at
