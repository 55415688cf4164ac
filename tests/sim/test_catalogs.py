"""Object catalogs and tote filling, on real pybullet DIRECT clients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pybullet as p
import pytest

from grasping.types import Bounds
from sim.catalogs import Catalog, load_catalog, spawn_item
from sim.catalogs import procedural as procedural_mod
from sim.catalogs import random_urdfs as random_urdfs_mod
from sim.catalogs.core import MESH_AABB_EXCESS_M
from sim.tote import fill_tote

TOTE_INNER = (0.5, 0.35, 0.2)  # m
TOTE_CENTER = (0.6, 0.0)  # m, base frame
WALL = 0.01  # m


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Generated URDFs and measured metadata go to a per-session folder, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PICKCELL_CACHE_DIR", str(tmp_path_factory.mktemp("pickcell-cache")))
        yield


@pytest.fixture
def client():
    cid = p.connect(p.DIRECT)
    p.setGravity(0, 0, -9.81, physicsClientId=cid)
    yield cid
    p.disconnect(physicsClientId=cid)


def build_tote(cid: int) -> Bounds:
    """A static tote (floor + 4 walls) whose inside is TOTE_INNER; returns the inside as Bounds."""
    lx, ly, lz = TOTE_INNER
    cx, cy = TOTE_CENTER
    parts = [
        ((lx / 2 + WALL, ly / 2 + WALL, WALL / 2), (cx, cy, -WALL / 2)),
        ((WALL / 2, ly / 2 + WALL, lz / 2), (cx - lx / 2 - WALL / 2, cy, lz / 2)),
        ((WALL / 2, ly / 2 + WALL, lz / 2), (cx + lx / 2 + WALL / 2, cy, lz / 2)),
        ((lx / 2, WALL / 2, lz / 2), (cx, cy - ly / 2 - WALL / 2, lz / 2)),
        ((lx / 2, WALL / 2, lz / 2), (cx, cy + ly / 2 + WALL / 2, lz / 2)),
    ]
    for half, pos in parts:
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=cid)
        p.createMultiBody(0, col, basePosition=pos, physicsClientId=cid)
    return Bounds(lo=(cx - lx / 2, cy - ly / 2, 0.0), hi=(cx + lx / 2, cy + ly / 2, lz))


def positions(cid: int, items) -> np.ndarray:
    return np.array([p.getBasePositionAndOrientation(s.body_id, physicsClientId=cid)[0] for s in items])


# --- random_urdfs -------------------------------------------------------------------------------------


def test_random_urdf_splits_are_disjoint_and_cover_all_indices():
    train, test = load_catalog("train"), load_catalog("test")
    train_idx = {int(it.name.split("/")[1]) for it in train.items}
    test_idx = {int(it.name.split("/")[1]) for it in test.items}
    broken = set(random_urdfs_mod.broken_indices())
    assert broken == {168}  # the one object pybullet_data ships with NaN vertices
    assert train_idx == set(range(800)) - broken
    assert test_idx == set(range(800, 1000))
    assert not {it.urdf_path for it in train.items} & {it.urdf_path for it in test.items}
    assert all(Path(it.urdf_path).is_file() for it in test.items)


def test_random_urdfs_are_scaled_to_tote_sizes_and_deterministic():
    test = load_catalog("test")
    ext = np.array([it.extents for it in test.items])
    assert ext.max(axis=1).min() >= 0.04 - 1e-9 and ext.max(axis=1).max() <= 0.15 + 1e-9
    masses = np.array([it.mass_kg for it in test.items])
    assert masses.min() >= 0.02 and masses.max() <= 1.5
    assert load_catalog("test").items == test.items  # the second load comes from the cache, identical


def test_random_urdf_extents_match_the_spawned_body(client):
    spec = load_catalog("test").get("random_urdfs/812")
    body = spawn_item(client, spec, (0, 0, 1), (0, 0, 0, 1))
    lo, hi = (np.array(v) for v in p.getAABB(body, physicsClientId=client))
    # getAABB pads convex meshes by MESH_AABB_EXCESS_M per side beyond the physical surface.
    np.testing.assert_allclose(hi - lo, np.array(spec.extents) + 2 * MESH_AABB_EXCESS_M, atol=1e-4)
    np.testing.assert_allclose((lo + hi) / 2 - (0, 0, 1), spec.center_offset, atol=1e-4)
    info = p.getDynamicsInfo(body, -1, physicsClientId=client)
    assert info[0] == pytest.approx(spec.mass_kg)
    assert info[1] == pytest.approx(spec.friction)


# --- procedural ---------------------------------------------------------------------------------------


def test_procedural_splits_never_share_an_item():
    held_out, train = load_catalog("procedural"), load_catalog("procedural-train")
    assert len(held_out) == 240 and len(train) == 960
    assert not {it.name for it in held_out.items} & {it.name for it in train.items}
    assert not {it.urdf_path for it in held_out.items} & {it.urdf_path for it in train.items}
    # Different seeds must also give different geometry, not only different names.
    geometry = lambda c: {(it.family, it.extents, round(it.mass_kg, 9)) for it in c.items}  # noqa: E731
    assert not geometry(held_out) & geometry(train)
    texts = {Path(it.urdf_path).read_text() for it in held_out.items + train.items}
    assert len(texts) == 1200


def test_procedural_is_deterministic_and_sizes_are_realistic():
    a = load_catalog("procedural")
    spec, text = procedural_mod.generate("procedural", 7)
    assert a.items[7] == spec and Path(spec.urdf_path).read_text() == text
    tote = np.array(TOTE_INNER)
    for it in a.items:
        ext = np.sort(it.extents)[::-1]
        assert (ext <= np.sort(tote)[::-1]).all(), it  # fits the tote lying flat
        jaw_ok = ext[1] <= 0.08 or ext[2] <= 0.08 and it.family != "carton"
        flat_face = it.family in ("carton", "mailer", "small_part", "tube", "bottle")
        assert jaw_ok or flat_face, it
    by_family = {f: [it for it in a.items if it.family == f] for f in a.families}
    assert {f: len(v) for f, v in by_family.items()} == dict.fromkeys(procedural_mod.FAMILIES, 40)
    mailers = np.array([it.extents for it in by_family["mailer"]])
    assert mailers[:, 2].min() >= 0.01 and mailers[:, 2].max() <= 0.03
    bottles = np.array([it.extents for it in by_family["bottle"]])
    assert bottles[:, 0].min() >= 0.05 and bottles[:, 0].max() <= 0.08


def _lying_flat(extents) -> tuple[float, ...]:
    """Orientation that puts the item's shortest side vertical."""
    axis = int(np.argmin(extents))
    return ((0, 0.7071068, 0, 0.7071068), (0.7071068, 0, 0, 0.7071068), (0, 0, 0, 1))[axis]


def _floor(cid: int) -> None:
    col = p.createCollisionShape(p.GEOM_BOX, halfExtents=(3, 3, 0.05), physicsClientId=cid)
    p.createMultiBody(0, col, basePosition=(0, 0, -0.05), physicsClientId=cid)


def test_procedural_items_rest_at_their_stated_size(client):
    """One item of each family laid on a floor, shortest side up: its top is that side's height."""
    _floor(client)
    cat = load_catalog("procedural")
    specs = [it for f in procedural_mod.FAMILIES for it in cat.items if it.family == f][::13][:12]
    bodies = []
    for i, spec in enumerate(specs):
        body = spawn_item(
            client, spec, (0.4 * i - 2, 0, min(spec.extents) / 2 + 0.005), _lying_flat(spec.extents)
        )
        assert p.getDynamicsInfo(body, -1, physicsClientId=client)[0] == pytest.approx(spec.mass_kg)
        bodies.append(body)
    for _ in range(240):
        p.stepSimulation(physicsClientId=client)
    for spec, body in zip(specs, bodies, strict=True):
        lo, hi = (np.array(v) for v in p.getAABB(body, physicsClientId=client))
        assert abs(lo[2]) < 0.004, spec.name  # on the floor, not sunk into it
        assert hi[2] - lo[2] == pytest.approx(min(spec.extents), abs=0.007), spec.name
        top = p.getBasePositionAndOrientation(body, physicsClientId=client)[0][2] + min(spec.extents) / 2
        assert top == pytest.approx(min(spec.extents), abs=0.0015), spec.name


# --- family filters and errors ------------------------------------------------------------------------


def test_family_filter_keeps_only_those_families():
    mailers = load_catalog("procedural", families=["mailer"])
    assert len(mailers) == 40 and mailers.families == ("mailer",)
    no_mailers = load_catalog("procedural-train", families=["carton", "bottle", "ball", "tube", "small_part"])
    assert "mailer" not in no_mailers.families and len(no_mailers) == 800


def test_unknown_family_and_catalog_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no family.*'cups'"):
        load_catalog("procedural", families=["cups"])
    with pytest.raises(ValueError, match="unknown catalog 'trian'"):
        load_catalog("trian")
    with pytest.raises(ValueError, match="does not exist"):
        load_catalog(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no .urdf files"):
        load_catalog(str(tmp_path))


def test_sample_is_seeded():
    cat = load_catalog("procedural")
    a = cat.sample(np.random.default_rng(3), 10)
    b = cat.sample(np.random.default_rng(3), 10)
    assert a == b and len({it.name for it in a}) == 10  # distinct while the catalog is big enough
    assert len(Catalog("one", cat.items[:1]).sample(np.random.default_rng(0), 3)) == 3


# --- user folders -------------------------------------------------------------------------------------

_CUBE_OBJ = "\n".join(
    [f"v {x} {y} {z}" for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]
    + ["f 1 3 4 2", "f 5 6 8 7", "f 1 2 6 5", "f 3 7 8 4", "f 1 5 7 3", "f 2 4 8 6"]
)


def _urdf(name: str, geometry: str, mass: float = 0.2) -> str:
    return (
        f'<robot name="{name}"><link name="base"><inertial><mass value="{mass}"/>'
        '<inertia ixx="1e-4" ixy="0" ixz="0" iyy="1e-4" iyz="0" izz="1e-4"/></inertial>'
        f"<visual><geometry>{geometry}</geometry></visual>"
        f"<collision><geometry>{geometry}</geometry></collision></link></robot>"
    )


def make_user_folder(root: Path) -> Path:
    """skus/soap.urdf (box primitive) and skus/mugs/cube_mug.urdf (an OBJ mesh beside it)."""
    folder = root / "skus"
    (folder / "mugs").mkdir(parents=True)
    (folder / "soap.urdf").write_text(_urdf("soap", '<box size="0.08 0.05 0.03"/>', mass=0.15))
    (folder / "mugs" / "cube.obj").write_text(_CUBE_OBJ)
    (folder / "mugs" / "cube_mug.urdf").write_text(
        _urdf("mug", '<mesh filename="cube.obj" scale="0.1 0.1 0.1"/>')
    )
    return folder


def test_user_folder_loads_and_spawns(tmp_path, client):
    folder = make_user_folder(tmp_path)
    cat = load_catalog(str(folder))
    assert sorted(it.name for it in cat.items) == ["skus/mugs/cube_mug", "skus/soap"]
    assert cat.families == ("mugs", "skus")
    soap = cat.get("skus/soap")
    assert soap.scale == 1.0 and soap.mass_kg == pytest.approx(0.15)
    np.testing.assert_allclose(soap.extents, (0.08, 0.05, 0.03), atol=1e-4)
    mug = cat.get("skus/mugs/cube_mug")
    np.testing.assert_allclose(mug.extents, (0.102, 0.102, 0.102), atol=1e-4)  # 1 mm convex margin a side
    for i, spec in enumerate(cat.items):
        body = spawn_item(client, spec, (i * 0.3, 0, 0.5), (0, 0, 0, 1))
        assert p.getDynamicsInfo(body, -1, physicsClientId=client)[0] == pytest.approx(spec.mass_kg)
    assert load_catalog(str(folder), families=["mugs"]).families == ("mugs",)


def test_catalog_json_sets_scale_mass_family(tmp_path):
    folder = make_user_folder(tmp_path)
    cfg = {"default": {"friction": 0.9}, "items": {"mugs/cube_mug.urdf": {"scale": 0.5, "mass_kg": 0.4}}}
    (folder / "catalog.json").write_text(json.dumps(cfg))
    mug = load_catalog(str(folder)).get("skus/mugs/cube_mug")
    assert mug.scale == 0.5 and mug.mass_kg == 0.4 and mug.friction == 0.9
    np.testing.assert_allclose(mug.extents, (0.052, 0.052, 0.052), atol=1e-4)
    (folder / "catalog.json").write_text(json.dumps({"items": {"mugs/cube_mug.urdf": {"colour": "red"}}}))
    with pytest.raises(ValueError, match=r"catalog.json.*unknown keys \['colour'\]"):
        load_catalog(str(folder))
    (folder / "catalog.json").write_text(json.dumps({"items": {"ghost.urdf": {"scale": 2}}}))
    with pytest.raises(ValueError, match="ghost.urdf"):
        load_catalog(str(folder))


def test_broken_urdf_error_names_the_file(tmp_path):
    folder = make_user_folder(tmp_path)
    broken = folder / "broken.urdf"
    broken.write_text("<robot name='x'><link name='base'>")  # truncated file
    with pytest.raises(ValueError, match=r"broken\.urdf.*not valid XML"):
        load_catalog(str(folder))
    broken.write_text(_urdf("x", '<mesh filename="meshes/missing.obj"/>'))
    with pytest.raises(ValueError, match=r"broken\.urdf.*meshes/missing\.obj.*not found"):
        load_catalog(str(folder))
    broken.write_text(_urdf("x", '<box size="0.05 0.05 0.05"/>', mass=0.0))
    with pytest.raises(ValueError, match=r"broken\.urdf.*mass is 0"):
        load_catalog(str(folder))
    # No <inertial> at all: pybullet would silently make it 1 kg; we refuse and say why.
    broken.write_text(
        '<robot name="x"><link name="b"><collision><geometry><box size="0.05 0.05 0.05"/>'
        "</geometry></collision></link></robot>"
    )
    with pytest.raises(ValueError, match=r"broken\.urdf.*declares no <mass>"):
        load_catalog(str(folder))
    broken.write_text(
        _urdf("x", '<box size="0.05 0.05 0.05"/>')
        .replace("<collision>", "<!--")
        .replace("</collision>", "-->")
    )
    with pytest.raises(ValueError, match=r"broken\.urdf.*no <collision>"):
        load_catalog(str(folder))


# --- tote filling -------------------------------------------------------------------------------------


def _fill(seed: int, n: int = 6, catalog: str = "procedural", settle_steps: int = 120):
    cid = p.connect(p.DIRECT)
    try:
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        region = build_tote(cid)
        items = fill_tote(cid, load_catalog(catalog), n, np.random.default_rng(seed), region, settle_steps)
        return [s.spec.name for s in items], positions(cid, items), region
    finally:
        p.disconnect(physicsClientId=cid)


def test_same_seed_same_items_and_same_settled_poses():
    names_a, pos_a, _ = _fill(11)
    names_b, pos_b, _ = _fill(11)
    assert names_a == names_b
    np.testing.assert_array_equal(pos_a, pos_b)
    names_c, pos_c, _ = _fill(12)
    assert names_c != names_a or not np.array_equal(pos_c, pos_a)


@pytest.mark.parametrize("catalog", ["procedural", "test"])
def test_filled_items_end_inside_the_tote(catalog):
    names, pos, region = _fill(5, n=8, catalog=catalog)
    assert len(names) == 8
    lo, hi = region.lo, region.hi
    assert ((pos[:, :2] >= lo[:2]) & (pos[:, :2] <= hi[:2])).all()
    assert (pos[:, 2] > lo[2]).all() and (pos[:, 2] < hi[2] + 0.15).all()


def test_items_that_land_outside_are_replaced():
    """A drop region narrower than the tote floor's walls: items that roll off its footprint are removed."""
    cid = p.connect(p.DIRECT)
    try:
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=(2, 2, 0.05), physicsClientId=cid)
        p.createMultiBody(0, col, basePosition=(0, 0, -0.05), physicsClientId=cid)
        # No walls and a small footprint: balls roll out, every survivor must still be inside it.
        region = Bounds(lo=(-0.1, -0.1, 0.0), hi=(0.1, 0.1, 0.2))
        balls = load_catalog("procedural", families=["ball", "carton"])
        items = fill_tote(cid, balls, 4, np.random.default_rng(0), region, settle_steps=240)
        pos = positions(cid, items)
        assert ((pos[:, :2] >= -0.1) & (pos[:, :2] <= 0.1)).all()
        n_bodies = p.getNumBodies(physicsClientId=cid)
        assert n_bodies == 1 + len(items)  # the removed ones are gone from the simulation
    finally:
        p.disconnect(physicsClientId=cid)


def test_fill_tote_refuses_zero_gravity():
    cid = p.connect(p.DIRECT)
    try:
        region = Bounds(lo=(0, 0, 0), hi=(0.5, 0.35, 0.2))
        with pytest.raises(ValueError, match="gravity"):
            fill_tote(cid, load_catalog("procedural"), 2, np.random.default_rng(0), region)
        assert p.getNumBodies(physicsClientId=cid) == 0  # nothing half-spawned
    finally:
        p.disconnect(physicsClientId=cid)


def test_an_overfull_tote_gets_fewer_items_none_above_the_top():
    """Cartons into a shallow 5 cm tray: what does not fit is removed, never left piled above it."""
    cid = p.connect(p.DIRECT)
    try:
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        region = build_tote(cid)
        tray = Bounds(lo=region.lo, hi=(region.hi[0], region.hi[1], 0.05))
        cartons = load_catalog("procedural", families=["carton"])
        items = fill_tote(cid, cartons, 12, np.random.default_rng(1), tray, settle_steps=60)
        assert 0 < len(items) < 12
        for s in items:
            lo, hi = (np.array(v) for v in p.getAABB(s.body_id, physicsClientId=cid))
            assert (lo[2] + hi[2]) / 2 <= 0.05
        assert p.getNumBodies(physicsClientId=cid) == 5 + len(items)
    finally:
        p.disconnect(physicsClientId=cid)


def test_ring_family_is_deterministic_held_out_and_has_an_opening(tmp_path, monkeypatch) -> None:
    """`novel-test` (sim/catalogs/novel.py): same index -> same URDF; no item is in a training
    catalog; a ring lies flat at its thickness, a ray down its centre reaches the floor, one down its
    band hits it."""
    from sim.catalogs import novel

    monkeypatch.setenv("PICKCELL_CACHE_DIR", str(tmp_path / "cache"))
    assert novel.generate_ring(5) == novel.generate_ring(5) != novel.generate_ring(6)
    cat = load_catalog("novel-test")
    assert len(cat) == novel.N_ITEMS and cat.families == ("ring",)
    names = {it.name for it in cat.items}
    for other in ("novel-train", "procedural-train"):
        assert not names & {it.name for it in load_catalog(other).items}
    cid = p.connect(p.DIRECT)
    try:
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        floor = p.createCollisionShape(p.GEOM_BOX, halfExtents=(5, 5, 0.01), physicsClientId=cid)
        p.createMultiBody(0, floor, basePosition=(0, 0, -0.01), physicsClientId=cid)
        specs = cat.items[::40]
        bodies = [
            spawn_item(cid, s, (0.5 * i - 1.5, 0, s.extents[2] / 2 + 0.005), (0, 0, 0, 1))
            for i, s in enumerate(specs)
        ]
        for _ in range(240):
            p.stepSimulation(physicsClientId=cid)
        for i, (spec, body) in enumerate(zip(specs, bodies, strict=True)):
            assert p.getDynamicsInfo(body, -1, physicsClientId=cid)[0] == pytest.approx(spec.mass_kg)
            lo, hi = (np.array(v) for v in p.getAABB(body, physicsClientId=cid))
            assert abs(lo[2]) < 0.004 and hi[2] - lo[2] == pytest.approx(spec.extents[2], abs=0.007)
            x = 0.5 * i - 1.5
            r_out = spec.extents[0] / 2
            for dx, dy, on_ring in ((0.0, 0.0, False), (0.02, 0.01, False), (r_out - 0.012, 0.0, True),
                                    (0.0, -(r_out - 0.012), True)):  # fmt: skip
                hit = p.rayTest((x + dx, dy, 0.5), (x + dx, dy, -0.005), physicsClientId=cid)[0]
                assert (hit[0] == body) == on_ring, (spec.name, dx, dy)
    finally:
        p.disconnect(physicsClientId=cid)
