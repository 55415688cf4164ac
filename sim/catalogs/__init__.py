"""Object catalogs: the items that go into totes.

    load_catalog("train" | "test")                       pybullet_data random_urdfs 000-799 / 800-999
    load_catalog("procedural" | "procedural-train")      warehouse items from primitives, disjoint seeds
    load_catalog("novel-train")                          `frame`, a family no shipped model trained on
    load_catalog("novel-test")                           `ring`, held out from every design decision
    load_catalog("/path/to/folder")                      a user's own URDFs (see docs/catalogs.md)

Each kind lives in its own module (`random_urdfs`, `procedural`, `novel`, `folder`) whose docstring says what
it is, what is randomised and what counts as success.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sim.catalogs.core import Catalog, ItemSpec, spawn_item

__all__ = ["BUILTIN_CATALOGS", "Catalog", "ItemSpec", "load_catalog", "spawn_item"]

BUILTIN_CATALOGS = ("train", "test", "procedural", "procedural-train", "novel-train", "novel-test")


def load_catalog(name: str, families: Sequence[str] | None = None) -> Catalog:
    """A catalog by name or folder path, optionally only some families.

    Raises ValueError naming the problem: unknown name, missing or empty folder, unreadable URDF,
    unknown family.
    """
    if not isinstance(name, str | Path) or not str(name):
        raise ValueError(f"catalog name must be a non-empty string, got {name!r}")
    name = str(name)
    if name in ("train", "test"):
        from sim.catalogs import random_urdfs

        catalog = random_urdfs.load(name)
    elif name in ("procedural", "procedural-train"):
        from sim.catalogs import procedural

        catalog = procedural.load(name)
    elif name in ("novel-train", "novel-test"):
        from sim.catalogs import novel

        catalog = novel.load() if name == "novel-train" else novel.load_test()
    elif Path(name).expanduser().exists() or "/" in name or name.startswith("."):
        from sim.catalogs import folder

        catalog = folder.load(name)
    else:
        raise ValueError(
            f"unknown catalog {name!r}: expected one of {list(BUILTIN_CATALOGS)} "
            "or the path of a folder of URDFs"
        )
    return catalog.filter(families)
