"""The box packer: height map, flat support, no overlap or overhang, box swaps, utilisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arm.packing import BoxPacker, Packer, PackerConfig, PackSlot
from grasping.types import quat_to_matrix


def slot_box(slot: PackSlot) -> tuple[np.ndarray, np.ndarray]:
    """The item's box-frame AABB (lo, hi) as placed."""
    fx, fy = slot.footprint_m
    c = slot.position_box
    lo = np.array([c[0] - fx / 2, c[1] - fy / 2, c[2]])
    return lo, lo + np.array([fx, fy, slot.height_m])


def overlap_volume(a: PackSlot, b: PackSlot) -> float:
    (alo, ahi), (blo, bhi) = slot_box(a), slot_box(b)
    d = np.minimum(ahi, bhi) - np.maximum(alo, blo)
    return float(np.prod(np.clip(d, 0, None)))


# --- hand-built cases ------------------------------------------------------------------------------


def test_six_cubes_fill_a_box_exactly_then_it_swaps():
    packer = Packer((0.3, 0.2, 0.1), resolution_m=0.01)
    slots = [packer.pack((0.1, 0.1, 0.1)) for _ in range(6)]
    assert all(s is not None and s.box_id == 0 for s in slots)
    assert packer.box.utilisation == pytest.approx(1.0)
    centres = sorted(tuple(np.round(s.position_box[:2], 6)) for s in slots)
    assert centres == [(-0.1, -0.05), (-0.1, 0.05), (0.0, -0.05), (0.0, 0.05), (0.1, -0.05), (0.1, 0.05)]
    assert packer.propose((0.1, 0.1, 0.1)) is None  # full for this item
    seventh = packer.pack((0.1, 0.1, 0.1))
    assert seventh.box_id == 1
    assert len(packer.closed) == 1
    box0 = packer.closed[0]
    assert box0.n_items == 6 and box0.utilisation == pytest.approx(1.0)
    assert box0.max_height_m == pytest.approx(0.1)
    assert packer.box.utilisation == pytest.approx(1 / 6)
    assert packer.utilisation_closed == pytest.approx(1.0)


def test_utilisation_numbers_on_a_hand_built_box():
    """Box 0.4 x 0.3 x 0.2 m = 0.024 m^3; four 0.2 x 0.15 x 0.1 items = 0.012 m^3 -> 50%."""
    packer = Packer((0.4, 0.3, 0.2))
    for _ in range(4):
        packer.pack((0.2, 0.15, 0.1))
    assert packer.box.utilisation == pytest.approx(0.5)
    assert packer.utilisation_closed is None  # nothing closed yet
    packer.pack((0.1, 0.1, 0.05))  # still room on top: same box
    assert packer.box.utilisation == pytest.approx((0.012 + 0.0005) / 0.024)
    closed = packer.swap()
    assert closed.box_id == 0 and closed.n_items == 5
    assert closed.packed_volume_m3 == pytest.approx(0.0125) and closed.box_volume_m3 == pytest.approx(0.024)
    assert packer.report()["utilisation_closed"] == pytest.approx(0.0125 / 0.024)
    packer.pack((0.4, 0.3, 0.2))  # exactly one full box
    packer.swap()
    assert packer.utilisation_closed == pytest.approx((0.0125 + 0.024) / 0.048)
    assert [b.utilisation for b in packer.closed] == pytest.approx([0.0125 / 0.024, 1.0])


def test_yaw_turns_an_item_into_the_free_strip():
    packer = BoxPacker((0.3, 0.3, 0.1))
    packer.commit(packer.propose((0.2, 0.3, 0.1)))  # fills x in [-0.15, 0.05]: a 0.1 m strip remains
    slot = packer.propose((0.25, 0.1, 0.1))  # long along x: only fits the strip turned 90 degrees
    assert slot is not None and slot.yaw == pytest.approx(math.pi / 2)
    assert slot.footprint_m == pytest.approx((0.1, 0.25))
    assert slot.position_box[0] == pytest.approx(0.1) and slot.position_box[2] == 0.0
    fixed = BoxPacker((0.3, 0.3, 0.1), config=PackerConfig(allow_rotation=False))
    fixed.commit(fixed.propose((0.2, 0.3, 0.1)))
    assert fixed.propose((0.25, 0.1, 0.1)) is None  # may not turn it: no room


def test_flat_item_is_not_balanced_on_one_post():
    packer = BoxPacker((0.2, 0.2, 0.2))
    heights = np.zeros(packer.shape)
    heights[:6, :6] = 0.06  # one post in a corner
    packer.update_heights(heights)
    # The only footprint for a 0.2 x 0.2 sheet covers the post: support in one quadrant only.
    assert packer.propose((0.2, 0.2, 0.01)) is None
    heights[:, :8] = 0.06  # a ledge along one side: 40% of the cells, but only half the quadrants
    packer.update_heights(heights)
    assert packer.propose((0.2, 0.2, 0.01)) is None  # it would tip off the ledge
    heights[:] = 0.0
    heights[:6, :6] = heights[:6, -6:] = heights[-6:, :6] = heights[-6:, -6:] = 0.06  # a post in every corner
    packer.update_heights(heights)
    slot = packer.propose((0.2, 0.2, 0.01))
    assert slot is not None and slot.position_box[2] == pytest.approx(0.06)
    assert slot.support_fraction == pytest.approx(4 * 36 / 400)
    assert slot.void_depth_m == pytest.approx(0.06)
    assert slot.drop_height_m == pytest.approx(PackerConfig().release_clearance_m)
    assert slot.release_height_m == pytest.approx(0.06 + PackerConfig().release_clearance_m)
    # Fragile goods: forbid bridging holes deeper than 3 cm.
    fragile = BoxPacker((0.2, 0.2, 0.2), config=PackerConfig(max_void_depth_m=0.03))
    fragile.update_heights(heights)
    assert fragile.propose((0.2, 0.2, 0.01)) is None


def test_items_go_on_the_floor_before_stacking_and_never_above_the_top():
    packer = BoxPacker((0.3, 0.2, 0.15))
    first = packer.propose((0.1, 0.1, 0.1))
    packer.commit(first)
    second = packer.propose((0.1, 0.1, 0.1))
    assert second.position_box[2] == 0.0 and overlap_volume(first, second) < 1e-12
    assert packer.propose((0.1, 0.1, 0.2)) is None  # taller than the box: it could not close
    capped = BoxPacker((0.3, 0.2, 0.15), config=PackerConfig(max_fill_height_m=0.05))
    assert capped.propose((0.1, 0.1, 0.06)) is None and capped.propose((0.1, 0.1, 0.05)) is not None


def test_measured_top_height_updates_the_map():
    packer = BoxPacker((0.2, 0.2, 0.3))
    slot = packer.propose((0.2, 0.2, 0.05))
    packer.commit(slot, measured_top_height=0.07)  # the camera saw it 2 cm higher than planned
    nxt = packer.propose((0.2, 0.2, 0.05))
    assert nxt.position_box[2] == pytest.approx(0.07)
    packer.commit(nxt, measured_top_height=0.01)  # nonsense below its rest: clipped to the rest height
    assert packer.heights.max() == pytest.approx(0.07)


def test_slot_pose_in_the_base_frame():
    yaw90 = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    T_base_box = np.eye(4)
    T_base_box[:3, :3], T_base_box[:3, 3] = yaw90, (0.5, -0.4, 0.2)
    packer = BoxPacker((0.4, 0.2, 0.2), T_base_box=T_base_box)
    slot = packer.propose((0.1, 0.1, 0.05))
    np.testing.assert_allclose(slot.position_box, (-0.15, -0.05, 0.0), atol=1e-9)
    np.testing.assert_allclose(slot.position, yaw90 @ slot.position_box + (0.5, -0.4, 0.2), atol=1e-9)
    np.testing.assert_allclose(quat_to_matrix(slot.orientation), yaw90, atol=1e-9)


# --- invariants over random streams ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_never_overlap_overhang_or_float(seed):
    rng = np.random.default_rng(seed)
    size = (0.4, 0.3, 0.25)
    packer = Packer(size)
    placed: dict[int, list[PackSlot]] = {}
    for _ in range(60):
        ext = (rng.uniform(0.03, 0.3), rng.uniform(0.02, 0.2), rng.uniform(0.01, 0.12))
        slot = packer.pack(ext)
        assert slot is not None
        placed.setdefault(slot.box_id, []).append(slot)
    assert len(packer.closed) >= 2
    half = np.array(size[:2]) / 2
    for slots in placed.values():
        for k, s in enumerate(slots):
            lo, hi = slot_box(s)
            assert (lo[:2] >= -half - 1e-9).all() and (hi[:2] <= half + 1e-9).all()  # no overhang
            assert lo[2] >= 0 and hi[2] <= size[2] + 1e-9  # inside, under the lid
            assert s.support_fraction >= PackerConfig().min_support_fraction
            for other in slots[:k]:
                assert overlap_volume(s, other) < 1e-12, (s.cells, other.cells)
            if lo[2] > 0:  # resting on something: an earlier item's top touches its bottom
                below = [o for o in slots[:k] if abs(slot_box(o)[1][2] - lo[2]) < 1e-9]
                assert any(
                    (np.minimum(hi[:2], slot_box(o)[1][:2]) > np.maximum(lo[:2], slot_box(o)[0][:2])).all()
                    for o in below
                )
    total = sum(b.packed_volume_m3 for b in packer.closed)
    assert packer.utilisation_closed == pytest.approx(total / (len(packer.closed) * np.prod(size)))


# --- bad input -------------------------------------------------------------------------------------


def test_bad_input_is_refused_and_changes_nothing():
    packer = Packer((0.3, 0.2, 0.1))
    for bad in [(0.1, 0.1), (0.1, -0.1, 0.1), (0.1, float("nan"), 0.1)]:
        with pytest.raises(ValueError, match="extents"):
            packer.propose(bad)
    with pytest.raises(ValueError, match="no slot"):
        packer.commit(None)
    stale = packer.propose((0.1, 0.1, 0.1))
    packer.commit(packer.propose((0.1, 0.1, 0.1)))
    before = packer.box.heights.copy()
    with pytest.raises(ValueError, match="stale"):
        packer.commit(stale)  # proposed before another commit: could overlap it
    np.testing.assert_array_equal(packer.box.heights, before)
    old = packer.propose((0.1, 0.1, 0.1))
    packer.swap()
    with pytest.raises(ValueError, match="for box 0"):
        packer.commit(old)
    with pytest.raises(ValueError):
        BoxPacker((0.3, 0.2, 0.0))
    with pytest.raises(ValueError, match="dropped"):
        PackerConfig(release_clearance_m=0.05, max_drop_m=0.03)
    with pytest.raises(ValueError, match="shape"):
        packer.box.update_heights(np.zeros((3, 3)))


def test_an_item_no_box_can_hold_does_not_close_empty_boxes():
    packer = Packer((0.3, 0.2, 0.1))
    assert not packer.fits_empty_box((0.5, 0.1, 0.05))
    assert packer.pack((0.5, 0.1, 0.05)) is None
    assert packer.closed == [] and packer.swap() is None  # an empty box is not shipped
    assert packer.fits_empty_box((0.1, 0.25, 0.05))  # fits turned 90 degrees
    closed_box = BoxPacker((0.3, 0.2, 0.1))
    closed_box.close()
    with pytest.raises(ValueError, match="closed"):
        closed_box.propose((0.1, 0.1, 0.1))
