"""A user's own catalog: any folder of URDF files (`--catalog DIR`). This is how a site brings its SKUs.

What it is
    Every `*.urdf` under DIR (searched recursively) is one item; its meshes sit beside it and are
    named by paths relative to the URDF file (pybullet resolves them from the URDF's folder;
    `package://` URIs are not supported). A URDF directly in DIR gets the family DIR's name; one in
    a subfolder gets the name of the first-level subfolder, so `DIR/mugs/blue.urdf` is family
    `mugs`. Item names are `<DIR name>/<path relative to DIR without .urdf>`.

    An optional `DIR/catalog.json` overrides per-item settings (see docs/catalogs.md):
        {"default": {"scale": 1.0, "friction": 0.6},
         "items": {"mugs/blue.urdf": {"scale": 0.8, "mass_kg": 0.35, "family": "mugs", "friction": 0.5}}}
    Keys of "items" are paths relative to DIR. Allowed settings: scale (>0, default 1), mass_kg
    (>0; default: the total <mass> the URDF declares, unscaled, as pybullet uses it), friction (>=0, default
    0.6), family (default as above). Unknown keys, unknown files and bad values are errors.

What is randomised
    Nothing in the catalog itself: the items are exactly the user's. Poses come from `fill_tote`.

What counts as success
    Every URDF is checked when the catalog loads (XML well-formed, meshes found, pybullet loads it,
    it has collision geometry and a non-zero mass), and any problem is a ValueError that names the
    file, so a bad SKU is found at start-up, not mid-shift. Extents are measured in a private pybullet
    client at the item's scale.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from sim.catalogs.core import Catalog, ItemSpec, UrdfProbe

log = logging.getLogger(__name__)

_ITEM_KEYS = {"scale", "mass_kg", "friction", "family"}
DEFAULT_FRICTION = 0.6


def _check_urdf_file(path: Path) -> float:
    """Fail with a clear message before pybullet does (pybullet only says 'Cannot load URDF file').

    Returns the total mass the URDF declares (sum of its links' <mass>), kg.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not valid XML ({exc})") from exc
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    if root.tag != "robot":
        raise ValueError(f"{path}: root element is <{root.tag}>, a URDF needs <robot>")
    if root.find("link") is None:
        raise ValueError(f"{path}: has no <link>")
    if root.find(".//collision") is None:
        raise ValueError(f"{path}: has no <collision> element; an item needs collision geometry")
    for mesh in root.iter("mesh"):
        fname = mesh.get("filename", "")
        if not fname:
            raise ValueError(f"{path}: a <mesh> has no filename")
        if "://" in fname:
            raise ValueError(f"{path}: mesh {fname!r} uses a URI; give a path relative to the URDF file")
        if not (path.parent / fname).is_file():
            raise ValueError(f"{path}: mesh file {fname!r} not found (looked in {path.parent / fname})")
    total = 0.0
    for mass in root.iter("mass"):
        try:
            total += float(mass.get("value", "nan"))
        except ValueError as exc:
            raise ValueError(f"{path}: <mass value={mass.get('value')!r}> is not a number") from exc
    if not np.isfinite(total):
        raise ValueError(f"{path}: a <mass> has no valid value")
    return total


def _read_config(folder: Path) -> tuple[dict, dict[str, dict]]:
    cfg_path = folder / "catalog.json"
    if not cfg_path.exists():
        return {}, {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: cannot parse ({exc})") from exc
    if not isinstance(cfg, dict) or set(cfg) - {"default", "items"}:
        raise ValueError(f'{cfg_path}: expected an object with keys "default" and/or "items"')
    default = cfg.get("default", {})
    items = cfg.get("items", {})
    if not isinstance(default, dict) or not isinstance(items, dict):
        raise ValueError(f'{cfg_path}: "default" and "items" must be objects')
    for where, entry in [("default", default), *[(f"items[{k!r}]", v) for k, v in items.items()]]:
        if not isinstance(entry, dict):
            raise ValueError(f"{cfg_path}: {where} must be an object")
        bad = set(entry) - _ITEM_KEYS
        if bad:
            raise ValueError(
                f"{cfg_path}: {where} has unknown keys {sorted(bad)}; allowed {sorted(_ITEM_KEYS)}"
            )
        for key in ("scale", "mass_kg", "friction"):
            if key in entry and (
                not isinstance(entry[key], int | float)
                or entry[key] < 0
                or (key != "friction" and entry[key] == 0)
            ):
                raise ValueError(f"{cfg_path}: {where}.{key} must be a positive number, got {entry[key]!r}")
        if "family" in entry and not (isinstance(entry["family"], str) and entry["family"]):
            raise ValueError(f"{cfg_path}: {where}.family must be a non-empty string")
    for rel in items:
        if not (folder / rel).is_file():
            raise ValueError(f"{cfg_path}: items names {rel!r}, which is not a file under {folder}")
    return default, items


def load(folder: str | Path) -> Catalog:
    """Every URDF under `folder` as one item; ValueError naming the file on any problem."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"catalog folder {str(folder)!r} does not exist or is not a folder")
    root = root.resolve()
    urdfs = sorted(root.rglob("*.urdf"))
    if not urdfs:
        raise ValueError(f"catalog folder {root} holds no .urdf files")
    default, overrides = _read_config(root)
    items = []
    with UrdfProbe() as probe:
        for path in urdfs:
            rel = path.relative_to(root)
            declared_mass = _check_urdf_file(path)
            cfg = {**default, **overrides.get(rel.as_posix(), {})}
            scale = float(cfg.get("scale", 1.0))
            ext, center, _ = probe.measure(path, scale)
            # The URDF's masses as written: pybullet does not scale mass with globalScaling. A link
            # without <inertial> would silently weigh 1 kg in pybullet, so count only declared mass.
            mass = float(cfg["mass_kg"]) if "mass_kg" in cfg else declared_mass
            if mass <= 0:
                raise ValueError(
                    f"{path}: total mass is 0 (it declares no <mass>, pybullet would guess or fix it); "
                    f'give the links a <mass> or set "mass_kg" for it in catalog.json'
                )
            family = cfg.get("family") or (rel.parts[0] if len(rel.parts) > 1 else root.name)
            items.append(
                ItemSpec(
                    name=f"{root.name}/{rel.with_suffix('').as_posix()}",
                    family=str(family),
                    urdf_path=str(path),
                    scale=scale,
                    mass_kg=mass,
                    extents=ext,
                    center_offset=center,
                    friction=float(cfg.get("friction", DEFAULT_FRICTION)),
                )
            )
    log.info("catalog %s: %d items in families %s", root, len(items), sorted({i.family for i in items}))
    return Catalog(str(root), tuple(items))
