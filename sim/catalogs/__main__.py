"""Check a catalog and list its items: `python -m sim.catalogs DIR|NAME [--families A,B]`.

A site bringing its own SKUs runs this on its folder first: every URDF is loaded and measured, and
any problem is reported with the file that causes it (exit status 2).
"""

from __future__ import annotations

import argparse
import sys

from sim.catalogs import BUILTIN_CATALOGS, load_catalog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim.catalogs",
        description="Load a pickcell object catalog, check every item, and list sizes and masses.",
    )
    parser.add_argument("catalog", help=f"one of {', '.join(BUILTIN_CATALOGS)}, or a folder of URDF files")
    parser.add_argument("--families", default=None, help="comma-separated families to keep (default: all)")
    parser.add_argument("--limit", type=int, default=50, help="list at most this many items (default 50)")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    try:
        catalog = load_catalog(args.catalog, families)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"catalog {catalog.name}: {len(catalog)} items, families {', '.join(catalog.families)}")
    print(f"{'name':40s} {'family':12s} {'extents (cm)':>20s} {'mass (kg)':>9s} {'scale':>6s}")
    for it in catalog.items[: max(args.limit, 0)]:
        ext = " x ".join(f"{100 * e:.1f}" for e in it.extents)
        print(f"{it.name:40s} {it.family:12s} {ext:>20s} {it.mass_kg:9.3f} {it.scale:6.3f}")
    if len(catalog) > args.limit:
        print(f"... {len(catalog) - args.limit} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
