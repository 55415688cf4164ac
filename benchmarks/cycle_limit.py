"""The minimum pick-and-place cycle for the simulated cell's layout, from the arm model and limits the
controller uses (sim.benchmark.cycle.minimum_cycle_s): the bench's MPPH is read against it.

    PYTHONPATH=. python benchmarks/cycle_limit.py [--json OUT]

Prints the cycle (s), its legs, and the picks per hour at 100% success with no sensing, planning or
waiting. Deterministic (no randomness, no timing of the host).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--item-height", type=float, default=0.05, help="height of the picked item, m")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    from sim.benchmark.cycle import minimum_cycle_s
    from sim.scene import SimCell

    with SimCell(seed=0) as cell:
        out = minimum_cycle_s(cell.arm, cell.tote_bounds, cell.box_bounds, args.item_height)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
