"""Totes in, boxes out — the conveyor side of the simulated cell (`arm.interfaces.ToteFeed`).

What it is
    Each `next_tote` clears whatever is left of the previous tote (it rolled away to exception
    handling or was finished) and drops a fresh set of catalog items into it. `swap_box` ships the
    full outbound box (its items are removed) and brings an empty one.

What is randomised
    The items of tote n and their drop poses, from a generator seeded by (seed, n): tote n has the
    same contents in every run, whatever happened in earlier totes.

What counts as success
    Not this file's business: the controller's ToteReport says whether a tote was cleared.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


class SimToteFeed:
    def __init__(
        self,
        cell,
        catalog,
        objects_per_tote: int,
        seed: int = 0,
        cell_id: str = "cell-1",
        first_tote: int = 0,
    ) -> None:
        self.cell = cell
        self.catalog = catalog
        self.objects_per_tote = int(objects_per_tote)
        self.seed = int(seed)
        self.cell_id = cell_id
        self.n = int(first_tote)  # number of the next tote
        self.current: str | None = None
        self.spawned: list = []  # SpawnedItems of the current tote
        self.diverted: list[tuple[str, str]] = []  # (tote id, reason)
        self.boxes_shipped = 0

    def _clear(self, bodies: list[int]) -> None:
        for b in bodies:
            self.cell.remove_item(b)

    def next_tote(self) -> str | None:
        self._clear(self.cell.items_in_tote())
        rng = np.random.default_rng([self.seed, self.n])
        self.spawned = self.cell.fill(self.catalog, self.objects_per_tote, rng)
        self.current = f"{self.cell_id}-tote-{self.n:05d}"
        self.n += 1
        log.info("tote %s: %d items", self.current, len(self.spawned))
        return self.current

    def divert_tote(self, reason: str) -> None:
        log.warning("tote %s diverted to exception handling: %s", self.current, reason)
        self.diverted.append((self.current or "?", reason))
        self._clear(self.cell.items_in_tote())

    def swap_box(self) -> None:
        self._clear(self.cell.items_in_box())
        self.boxes_shipped += 1
