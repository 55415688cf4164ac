"""Does the ground-truth oracle (and so the simulated associate) find a grasp on each picture frame?

What it is
    The simulated associate answers from `sim/oracle.py`'s grasp for the item it is asked about;
    no grasp means "no safe pick". Each `novel-train` frame is laid flat, alone, in the middle of
    the tote floor and settled; the oracle is asked for a grasp, and with `--execute` the grasp is
    picked and placed in the box in real physics. Prints one token per frame (`s` suction, `p`
    parallel jaw, `-` none; with `--execute`, a trailing `!` for a failed pick or place) and the
    counts.

What is randomised
    Nothing: frames come from the catalog in index order (`--first`, `--count`), each at the same
    pose; the simulator is deterministic.

What counts as success
    A grasp on every frame that a cup or a jaw can hold (a frame's bars are 3.5-5 cm wide and
    flat, sim/catalogs/novel.py), and every executed grasp picked and placed. Frames thinner than
    the jaw's floor clearance allows and with bars too narrow for the cup's robust seal have none:
    the oracle stays conservative there.

    python experiments/oracle_frames_flat.py --count 40 [--execute]
"""

from __future__ import annotations

import argparse
import collections


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--first", type=int, default=0, help="first catalog index")
    ap.add_argument("--count", type=int, default=40, help="frames to try")
    ap.add_argument("--execute", action="store_true", help="pick and place each grasp in physics")
    args = ap.parse_args(argv)

    from sim.catalogs import load_catalog
    from sim.oracle import OracleGraspSource
    from sim.scene import SimCell

    specs = load_catalog("novel-train").items[args.first : args.first + args.count]
    counts: collections.Counter[str] = collections.Counter()
    tokens = []
    for spec in specs:
        cell = SimCell(seed=0)
        try:
            body = cell.add_item(spec)
            oracle = OracleGraspSource(cell)
            g = oracle.grasp_for(body)
            tok = "-" if g is None else g.gripper[0]
            counts["none" if g is None else g.gripper] += 1
            if g is not None and args.execute:
                ok = cell.arm.pick(g).success and cell.arm.place(oracle.placement()).success
                ok = ok and body in cell.items_in_box()
                counts["executed ok" if ok else "executed failed"] += 1
                tok += "" if ok else "!"
            tokens.append(f"{spec.name.rsplit('-', 1)[-1]}:{tok}")
        finally:
            cell.close()
    print(" ".join(tokens))
    print(dict(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
