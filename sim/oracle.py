"""The oracle grasp source: reads simulator ground truth and proposes a good grasp and a box spot.

It exercises the arm, the grippers and the physics, not the planner: it sees what no camera sees
(every item's body, pose, mass and surface, by casting rays at that body alone) and uses the same
seal test as the suction cup. For the topmost items first (the ones a person would take):

- suction at the surface point that seals (rim rays: flat enough, normal within the cup's tolerance;
  the approach is along the surface normal, up to `max_tilt_deg` from vertical) and that loads the
  cup least (smallest moment about the centre of mass, at the tool acceleration up and sideways),
  among points whose whole cup footprint lies on the item's visible top (an item whose centre of
  mass lies over an opening, a picture frame, is held on the middle of a bar, not its inner edge);
- otherwise a parallel-jaw grasp whose line passes through the centre of mass (around it, or, when
  nothing is there to hold, across one part of the item that line crosses) and where both
  finger pads meet the item squarely: horizontal rays over each pad's face find where it first
  touches the item and the surface normal there; the normals must lie in the friction cone with
  margin and must not face upwards (a squeeze on a face tilted up pushes the item out of the
  fingers: the slips on tapered items), no finger may come down on another part of the item, and
  no neighbour may sit between an open finger and the item. Closing directions every 10 deg and
  TCP heights every 4 mm are searched; the squarest contact nearest the centre of mass's height
  wins (see `_jaw`). Tilted approaches are offered too, for items near a tote wall. A small item
  (under 4.5 cm across) lying on another item is held with the fingertips (5 mm below the pads)
  just above that item and the pads reaching below its centre of mass, or declined with the reason
  in `declined` (pressed into the support, the fingers lever the part out in the lift).

Suction is preferred when its load stays under `suction_preferred_load` of the cup's rating (cartons,
mailers, flat random objects); the jaw takes round and heavy items (bottles, balls, tubes, small
parts). Items that failed before are tried after the others, with the other gripper first and
never with a grasp that already failed on them (within 8 mm and 15 deg).

Placement: a grid of cells over the box floor; the next item goes to the cell whose stack is lowest
(height from a ray down the cell centre), large items to the box centre, long side along the box's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pybullet as p

from grasping.types import Grasp, Placement, Reason, grasp_frame, matrix_to_quat
from sim.grippers import RAY_MASK, seal_check, suction_utilisation
from sim.scene import SimCell

log = logging.getLogger(__name__)

# The Panda finger pad (stock collision mesh, measured): 17.5 mm wide, its face from 11.6 mm above
# the jaw TCP (panda_grasptarget) to the fingertip 7.2 mm below it.
_PAD_HALF_WIDTH = 0.007  # m, lateral ray offset on the pad (inside its 8.75 mm half width)
_PAD_ABOVE_TCP = 0.0116  # m
_PAD_BELOW_TCP = 0.0072  # m
# The finger's lowest point is its rounded tip, 12 mm below the TCP (finger links' AABB with the
# hand pointing down), 5 mm below the pad's lower edge; it sits just outside the pad face.
_TIP_BELOW_TCP = 0.012  # m
_TIP_DEPTH = 0.012  # m, extent of the tip's footprint outwards from the pad face (estimate)
_FINGER_THICKNESS = 0.026  # m, finger depth behind the pad face (along the closing line)
_FINGER_HALF_WIDTH = 0.0105  # m
# Rows 3 mm apart: on a 25 mm tube the patch then straddles the equator (mean normal level)
# instead of one ray above it whose normal looks tilted up.
_PAD_ROWS = 7  # count, ray rows over the pad's height
_RAY_HITS = 3  # count, hits read along each pad ray (neighbours may hide the item)


@dataclass(frozen=True)
class OracleConfig:
    """Oracle search settings."""

    ray_spacing: float = 0.004  # m, grid spacing of the rays that sample an item's top surface
    max_tilt_deg: float = 30.0  # deg, largest tilt of a suction approach from vertical
    max_jaw_width: float = 0.07  # m, widest item the jaw is asked to take (opening 0.08 m)
    max_jaw_depth: float = 0.04  # m, deepest jaw TCP below the item's top (the palm is 4.7 cm above the TCP)
    jaw_height_step: float = 0.004  # m, spacing of the jaw TCP heights searched
    jaw_angle_step_deg: float = 10.0  # deg, spacing of the closing directions searched
    max_contact_angle_deg: float = 20.0  # deg, largest angle of a contact normal from the closing line
    max_wedge_deg: float = 12.0  # deg, largest upward tilt of a contact normal (squeezes the item out)
    pad_compliance: float = 0.0015  # m, depth of the rubber pad's squeeze: hits this close form the patch
    jaw_floor_clearance: float = 0.017  # m, lowest jaw TCP height above the tote floor (tips 1.2 cm below)
    small_item_extent: float = 0.045  # m, items narrower than this (largest AABB side in x, y) get the
    #   fingertip check against the item they rest on (small parts: every side 1-4 cm)
    tip_clearance: float = 0.0005  # m, fingertips at least this far above the item a small item rests on
    min_pad_contact: float = 0.008  # m, least pad height on a small item when raised to clear its support
    pad_below_com: float = 0.002  # m, pads' lower edge at least this far below a small item's centre of mass
    small_height_step: float = 0.0005  # m, spacing of the TCP heights searched on a small item on a support
    suction_preferred_load: float = 0.6  # unitless, cup load fraction below which suction wins
    max_load: float = 0.9  # unitless, largest cup load fraction (at lift acceleration) the oracle accepts
    max_suction_candidates: int = 40  # count, surface points tested with the seal check per item
    seal_robustness: float = 0.004  # m, the seal must also hold this far from the chosen point
    box_grid: tuple[int, int] = (3, 2)  # cells along box x, y
    jaw_tilts_deg: tuple[float, ...] = (0.0, 20.0, -20.0)  # deg, jaw approach tilts tried (two axes)
    max_failures: int = 3  # count, failed attempts after which an item is left in the tote


class OracleGraspSource:
    """Ground-truth grasps for a SimCell. Deterministic: no randomness at all."""

    def __init__(self, cell: SimCell, config: OracleConfig | None = None) -> None:
        self.cell = cell
        self.cfg = config or OracleConfig()
        self.failures: dict[int, list[str]] = {}  # body -> grippers that failed on it
        self.failed_grasps: dict[int, list[Grasp]] = {}  # body -> grasps that failed on it
        self.declined: dict[int, str] = {}  # body -> why its jaw grasps were all dropped (small items)

    def record_failure(self, body: int | None, gripper: str, grasp: Grasp | None = None) -> None:
        """Note a failed attempt on `body`; with `grasp`, that grasp is not proposed again."""
        if body is not None:
            self.failures.setdefault(body, []).append(gripper)
            if grasp is not None:
                self.failed_grasps.setdefault(body, []).append(grasp)

    def _failed_before(self, body: int, g: Grasp) -> bool:
        """Is `g` (nearly) a grasp that already failed on `body`? Simulated physics is deterministic
        and real picks nearly so: the same grasp on an unmoved item fails the same way, so the next
        attempt should differ (remembering failed grasps is what Sanders et al. 2020 measured)."""
        for f in self.failed_grasps.get(body, []):
            if f.gripper != g.gripper or np.linalg.norm(f.position - g.position) > 0.008:
                continue
            if g.gripper == "suction" or abs(f.R[:, 0] @ g.R[:, 0]) > np.cos(np.radians(15.0)):
                return True
        return False

    # --- grasps ------------------------------------------------------------------------------------
    def propose(self, exclude: set[int] | None = None) -> tuple[int, Grasp] | None:
        """(item body, grasp) for the best item in the tote, or None when nothing is graspable."""
        items = [
            b
            for b in self.cell.items_in_tote()
            if (not exclude or b not in exclude) and len(self.failures.get(b, [])) < self.cfg.max_failures
        ]
        tops = {b: p.getAABB(b, physicsClientId=self.cell.client_id)[1][2] for b in items}
        # Topmost first; items that already failed go last (fewest failures first).
        order = sorted(items, key=lambda b: (len(self.failures.get(b, [])), -tops[b], b))
        for b in order:
            g = self.grasp_for(b)
            if g is not None:
                return b, g
        return None

    def _surface(self, body: int) -> tuple[np.ndarray, np.ndarray]:
        """Points (N, 3) and normals (N, 3) of `body` seen from straight above, by ray grid."""
        cid = self.cell.client_id
        lo, hi = (np.asarray(v) for v in p.getAABB(body, physicsClientId=cid))
        s = self.cfg.ray_spacing
        xs = np.arange(lo[0] + s / 2, hi[0], s)
        ys = np.arange(lo[1] + s / 2, hi[1], s)
        X, Y = np.meshgrid(xs, ys, indexing="ij")
        X, Y = X.ravel(), Y.ravel()
        z0, z1 = hi[2] + 0.3, lo[2] - 0.01
        starts = np.stack([X, Y, np.full_like(X, z0)], 1)
        ends = np.stack([X, Y, np.full_like(X, z1)], 1)
        pts, nrm = [], []
        for k in range(0, len(starts), 4000):  # pybullet caps a batch at 16k rays
            hits = p.rayTestBatch(
                starts[k : k + 4000].tolist(),
                ends[k : k + 4000].tolist(),
                collisionFilterMask=RAY_MASK,
                physicsClientId=cid,
            )
            for h in hits:
                if h[0] == body:
                    pts.append(h[3])
                    nrm.append(h[4])
        return np.array(pts).reshape(-1, 3), np.array(nrm).reshape(-1, 3)

    def grasp_for(self, body: int) -> Grasp | None:
        """The best feasible grasp on `body` (see the module docstring), or None."""
        pts, nrm = self._surface(body)
        if len(pts) < 3:
            return None  # hidden under other items
        failed = self.failures.get(body, [])
        suctions = self._suction(body, pts, nrm)  # [(load, grasp)], least load first
        jaws = self._jaw(body, pts)
        preferred = [g for load, g in suctions if load <= self.cfg.suction_preferred_load]
        fallback = [g for load, g in suctions if self.cfg.suction_preferred_load < load <= self.cfg.max_load]
        # Suction first whenever it seals and its load stays within the cup's rating: a sealed cup
        # holds whatever the item's shape, while the two fingers can let a long or tall item swing.
        choices = preferred + fallback + jaws
        # After a failure try the other gripper first (stable sort keeps the order within one).
        choices.sort(key=lambda g: failed.count(g.gripper))
        choices = [g for g in choices if not self._failed_before(body, g)]
        for g in choices:
            verdict = self.cell.arm.check_grasp(g, target=body)
            if verdict is Reason.OK:
                return g
            log.debug("oracle: %s grasp on body %d rejected (%s)", g.gripper, body, verdict.value)
        return None

    def _suction(self, body: int, pts: np.ndarray, nrm: np.ndarray) -> list[tuple[float, Grasp]]:
        """Sealing surface points, as (cup load at lift acceleration, grasp), least load first."""
        cid = self.cell.client_id
        cfg_cup = self.cell.arm.cfg.suction
        cos_tilt = np.cos(np.radians(self.cfg.max_tilt_deg))
        ok = nrm[:, 2] >= cos_tilt
        if not ok.any():
            return []
        com, _ = p.getBasePositionAndOrientation(body, physicsClientId=cid)
        com = np.asarray(com)
        mass = p.getDynamicsInfo(body, -1, physicsClientId=cid)[0]
        # Only points whose whole cup footprint (lip radius + the seal's robustness margin) lies on
        # this item's visible top: a cup that overhangs an edge, an opening or a neighbour cannot
        # seal. Without this the search below tested only the points nearest the centre of mass,
        # and on an item whose centre of mass lies over an opening (a picture frame) those are all
        # on the inner edges: the oracle found no suction on 16 of 24 frames that a cup on the
        # middle of a bar holds.
        reach = cfg_cup.cup_radius + self.cfg.seal_robustness
        full = _footprint_on_item(pts, ok, reach, self.cfg.ray_spacing)
        cand, cn = pts[full], nrm[full]
        if len(cand) == 0:
            return []
        # Closest to the centre of mass (in the horizontal plane) first: least moment on the cup.
        order = np.argsort(np.linalg.norm(cand[:, :2] - com[:2], axis=1))
        step = max(1, len(order) // (4 * self.cfg.max_suction_candidates))
        # The cup must hold at the lift and through transit: the load at the tool acceleration
        # upwards and in each horizontal direction (a sideways push on an item hanging off-centre
        # is what peels the lip, so a point that is fine while lifting can drop in transit).
        a_tool = self.cell.arm.cfg.tool_accel
        accs = [np.array([0.0, 0.0, a_tool])] + [
            np.array([a_tool * np.cos(t), a_tool * np.sin(t), 0.0]) for t in np.radians([0, 90, 180, 270])
        ]
        found: list[tuple[float, Grasp]] = []
        for i in order[::step][: self.cfg.max_suction_candidates]:
            approach = -cn[i] / np.linalg.norm(cn[i])
            # Robust seal: it must hold at the point and 4 mm around it (the cup lands where the
            # arm's tracking and the item's give put it, not exactly on the chosen point).
            u = grasp_frame(approach)
            spots = [cand[i]] + [
                cand[i] + self.cfg.seal_robustness * s * u[:, k] for k in (0, 1) for s in (-1, 1)
            ]
            seals = [seal_check(cid, spot, approach, cfg_cup) for spot in spots]
            if not all(sl.sealed and sl.body_id == body for sl in seals):
                continue
            if any(np.linalg.norm(g.position - cand[i]) < 0.01 for _, g in found):
                continue  # keep alternatives at least 1 cm apart
            R = grasp_frame(approach)
            com_in_cup = R.T @ (com - cand[i])
            load = max(suction_utilisation(cfg_cup, mass, com_in_cup, R, acc) for acc in accs)
            found.append((load, Grasp("suction", cand[i], matrix_to_quat(R))))
            if len(found) >= 6:
                break
        found.sort(key=lambda t: t[0])
        return found

    def _jaw(self, body: int, pts: np.ndarray) -> list[Grasp]:
        """Top-down jaw grasps where both finger pads meet the item squarely, best first.

        For closing directions every `jaw_angle_step_deg` and TCP heights every `jaw_height_step`
        (pads fully on the item, palm clear of its top), horizontal rays sample each pad's face
        (`_pad_contacts`): where it first touches the item and the surface normal there. A grasp
        is kept when both contact normals lie within `max_contact_angle_deg` of the closing line
        (a friction cone with margin: on a tapered side the squeeze pushes the item out of the
        fingers, which is how tapered items slipped), neither tilts up by more than
        `max_wedge_deg` (a surface facing up is squeezed downwards, out of the grip), the width
        fits, and no other item sits between the open fingers and the item. The grasp line goes
        through the centre of mass (no torque about the closing axis); ranked by the worse contact
        angle, then by distance from the centre of mass's height. Up to 4 closing directions.
        """
        cid = self.cell.client_id
        cfg = self.cfg
        top = float(pts[:, 2].max())
        lo, hi = (np.asarray(v) for v in p.getAABB(body, physicsClientId=cid))
        lo_z = float(lo[2])
        floor_z = float(self.cell.tote_bounds.lo[2]) + cfg.jaw_floor_clearance
        z_hi = top - _PAD_ABOVE_TCP + 0.002  # the pad's upper edge at most 2 mm above the top
        z_lo = max(floor_z, top - cfg.max_jaw_depth, lo_z + _PAD_BELOW_TCP)
        if z_hi < z_lo:
            # Too flat for the whole pad: hold it as low as the tote floor allows, if that is on it.
            if top - floor_z < 0.004:
                return []
            z_hi = z_lo = max(floor_z, lo_z + 0.5 * (top - lo_z))
        heights = np.arange(z_hi, z_lo - 1e-9, -cfg.jaw_height_step) if z_hi > z_lo else np.array([z_hi])
        # A small item lying on another item: the fingertips (5 mm below the pads) must stay clear of
        # that item. Pressed into it, the fingers close against the support and the item leaves them
        # in the lift (how small parts on mailers slipped). Only the item it rests on counts (ground
        # truth contacts), not the neighbours: a footprint check against everything rejected grasps
        # among neighbours that work. Heights up to where the pads still overlap the item by
        # `min_pad_contact` are searched, finer, for the window between the support and the top.
        small = float(max(hi[0] - lo[0], hi[1] - lo[1])) < cfg.small_item_extent
        supports = self._supports(body) if small else []
        if supports:
            z_top = top + _PAD_BELOW_TCP - cfg.min_pad_contact
            z_bottom = float(heights.min())
            heights = np.arange(max(z_top, z_bottom), z_bottom - 1e-9, -cfg.small_height_step)
        com = np.asarray(p.getBasePositionAndOrientation(body, physicsClientId=cid)[0])
        mu = self.cell.arm.cfg.jaw.finger_friction * p.getDynamicsInfo(body, -1, physicsClientId=cid)[1]
        # The cone actually available shrinks with the item's friction (PyBullet multiplies them).
        max_angle = min(cfg.max_contact_angle_deg, float(np.degrees(np.arctan(mu))) - 10.0)
        found: list[tuple[float, float, Grasp, float]] = []  # (score, direction, grasp, tip clearance)
        n_on_support = 0  # candidates dropped because the fingertips would land on the support

        def best_at(xy: np.ndarray, d: np.ndarray) -> tuple[float, np.ndarray, float, float] | None:
            """The best jaw height for fingers closing along `d` through `xy` (score, centre, width,
            tip clearance), or None."""
            nonlocal n_on_support
            best = None
            for z in heights:
                centre = np.array([xy[0], xy[1], z])
                c = self._pad_contacts(body, centre, d)
                if c is None:
                    continue
                width, shift, angle, wedge = c
                if width > cfg.max_jaw_width or angle > max_angle or wedge > cfg.max_wedge_deg:
                    continue
                if self._fingers_land_on(pts, centre + shift * d, d, width):
                    continue
                clearance = np.inf
                if supports:
                    overlap = min(top, z + _PAD_ABOVE_TCP) - max(lo_z, z - _PAD_BELOW_TCP)
                    # Pads gripping only above the centre of mass let the part tip out downwards
                    # as they squeeze (a 17 mm part, pads' lower edge 1 mm below it: it did).
                    if overlap < cfg.min_pad_contact or z - _PAD_BELOW_TCP > com[2] - cfg.pad_below_com:
                        continue
                    clearance = self._tip_clearance(supports, centre + shift * d, d, width)
                    if clearance < 0.0:
                        n_on_support += 1
                        continue
                score = angle + 100.0 * abs(z - com[2])  # 1 cm of height counts as 1 degree
                if supports:
                    # On a support the tips just above it hold best (measured on two procedural parts
                    # on mailers: 0.4 and 0.6 mm above picked both; 1.4 mm above slipped the 8 g one,
                    # 2.6 mm the other): the lowest height that clears it wins. 1 mm counts as 5 deg: the
                    # contact angle read by rays on a box's vertical faces varies by up to 6 degrees
                    # from one height to the next (hits near its edges), which must not outweigh it.
                    score = angle + 5000.0 * clearance
                if best is None or score < best[0]:
                    best = (score, centre + shift * d, width, clearance)
            return best

        directions = [
            (th, np.array([np.cos(th), np.sin(th), 0.0]))
            for th in np.radians(np.arange(0.0, 180.0, cfg.jaw_angle_step_deg))
        ]
        for th, d in directions:
            best = best_at(com[:2], d)
            if best is not None:
                found.append((best[0], th, self._jaw_grasp(best[1], d, best[2]), best[3]))
        if not found and not supports:
            # Nothing to hold at the centre of mass (a frame's lies over its opening): close across
            # one part of the item on a line through the centre of mass, so its weight puts no
            # torque about the closing axis; the pads' patch holds the moment about the other axis
            # as they hold a long item off-centre. Nearest part first (least moment).
            for th, d in directions:
                for t in self._parts_on_line(pts, com, d):
                    best = best_at(com[:2] + t * d[:2], d)
                    if best is not None:
                        score = best[0] + 100.0 * abs(t)  # 1 cm off the centre of mass counts as 1 degree
                        found.append((score, th, self._jaw_grasp(best[1], d, best[2]), best[3]))
                        break
        if supports and not found and n_on_support:
            why = (
                f"no jaw height keeps the fingertips above the item it rests on (bodies {supports}) with "
                f"{1000 * cfg.min_pad_contact:.0f} mm of pad on it, its lower edge "
                f"{1000 * cfg.pad_below_com:.0f} mm below the centre of mass"
            )
            if self.declined.get(body) != why:
                log.info("oracle: no jaw grasp on small body %d: %s", body, why)
            self.declined[body] = why
        found.sort(key=lambda t: t[0])
        out: list[Grasp] = []
        used: list[float] = []
        for _score, th, g, clearance in found:
            if len(used) >= 4:
                break
            if any(abs((th - u + np.pi / 2) % np.pi - np.pi / 2) < np.radians(20) for u in used):
                continue
            used.append(th)
            out.extend(self._tilted(g, clearance))
        return out

    def _parts_on_line(self, pts: np.ndarray, com: np.ndarray, d: np.ndarray) -> list[float]:
        """Offsets t (m, along `d` from the centre of mass) of the middles of the item's parts that
        the horizontal line through the centre of mass along `d` crosses, seen from above, nearest
        first; only parts the open jaw can span."""
        s = self.cfg.ray_spacing
        rel = pts[:, :2] - com[:2]
        along = rel @ d[:2]
        across = rel @ np.array([-d[1], d[0]])
        on = np.sort(along[np.abs(across) <= s])
        if len(on) == 0:
            return []
        breaks = np.flatnonzero(np.diff(on) > 2.5 * s)
        starts = np.concatenate([[on[0]], on[breaks + 1]])
        ends = np.concatenate([on[breaks], [on[-1]]])
        mids = [
            0.5 * (a + b)
            for a, b in zip(starts, ends, strict=True)
            if 0.01 <= b - a <= self.cfg.max_jaw_width - 0.005
        ]
        return sorted(mids, key=abs)

    def _jaw_grasp(self, centre: np.ndarray, d: np.ndarray, width: float) -> Grasp:
        R = grasp_frame(np.array([0.0, 0.0, -1.0]), d)
        return Grasp("parallel_jaw", centre, matrix_to_quat(R), width=width)

    def _tilted(self, g: Grasp, clearance: float = np.inf) -> list[Grasp]:
        """The grasp top-down and tilted by `jaw_tilts_deg` about its two horizontal axes.

        A tilt lowers one fingertip (about the closing axis by up to the finger's half width, about
        the other axis by up to the finger's reach from the TCP, times the tilt's sine); tilts that
        lower it by more than its `clearance` above a support (see `_tip_clearance`) are left out.
        """
        closing = g.R[:, 0]
        across = np.array([-closing[1], closing[0], 0.0])
        reach = 0.5 * (g.width + self.cell.arm.cfg.jaw.open_margin) + _FINGER_THICKNESS
        tilts = [(closing, t, _FINGER_HALF_WIDTH) for t in self.cfg.jaw_tilts_deg]
        tilts += [(across, t, reach) for t in self.cfg.jaw_tilts_deg if t != 0.0]
        out = []
        for axis, tilt, lever in tilts:
            if lever * np.sin(np.radians(abs(tilt))) > clearance:
                continue
            # Tilting about the closing axis keeps the fingers closing horizontally while the
            # hand leans away from a tote wall beside the item; tilting about the other
            # horizontal axis leans the hand's long side away from a wall it faces.
            approach = _rotate(np.array([0.0, 0.0, -1.0]), axis, np.radians(tilt))
            R = grasp_frame(approach, _rotate(closing, axis, np.radians(tilt)))
            out.append(Grasp("parallel_jaw", g.position.copy(), matrix_to_quat(R), width=g.width))
        return out

    def _supports(self, body: int) -> list[int]:
        """Items `body` rests on: ground-truth contacts whose normal points up from the other item.

        The tote is left out (the jaw's floor clearance keeps the fingertips off it).
        """
        out = set()
        for c in p.getContactPoints(bodyA=body, physicsClientId=self.cell.client_id):
            # c[2] is the other body; c[7] the contact normal on it, pointing towards `body`.
            if c[2] != body and c[2] in self.cell.items and c[7][2] > 0.5:
                out.add(int(c[2]))
        return sorted(out)

    def _tip_clearance(self, supports: list[int], centre: np.ndarray, d: np.ndarray, width: float) -> float:
        """Height of the open fingertips above the highest point of `supports` under them (m).

        Negative: the tips would come down on (into) a support. Vertical rays over both fingertips'
        footprints (from just outside the open pad faces, `_TIP_DEPTH` outwards, across the finger's
        width) read only hits on the supports; inf when no support lies under the fingertips.
        """
        cid = self.cell.client_id
        open_half = 0.5 * (width + self.cell.arm.cfg.jaw.open_margin)
        perp = np.array([-d[1], d[0], 0.0])
        starts, ends = [], []
        for sign in (-1.0, 1.0):
            for a in (open_half + 0.001, open_half + 0.5 * _TIP_DEPTH, open_half + _TIP_DEPTH):
                for u in (-_FINGER_HALF_WIDTH + 0.001, 0.0, _FINGER_HALF_WIDTH - 0.001):
                    xy = centre + sign * a * d + u * perp
                    starts.append([xy[0], xy[1], float(centre[2]) + 0.05])
                    ends.append([xy[0], xy[1], float(self.cell.tote_bounds.lo[2]) - 0.02])
        support_z = -np.inf
        for k in range(_RAY_HITS + 1):  # the k-th hit of each ray (pybullet reports them in no order)
            for h in p.rayTestBatch(
                starts, ends, reportHitNumber=k, collisionFilterMask=RAY_MASK, physicsClientId=cid
            ):
                if h[0] in supports:
                    support_z = max(support_z, float(h[3][2]))
        tips = float(centre[2]) - _TIP_BELOW_TCP
        return float(tips - (support_z + self.cfg.tip_clearance))

    def _fingers_land_on(self, pts: np.ndarray, centre: np.ndarray, d: np.ndarray, width: float) -> bool:
        """Would an open finger coming down come to rest on another part of the item itself?

        The pads only work if the item is between them: a lobe of the same item under a finger's
        footprint (outside the pad face) holds the hand up or levers the item when the jaw closes.
        """
        open_half = 0.5 * (width + self.cell.arm.cfg.jaw.open_margin)
        rel = pts - centre
        along = rel @ d
        across = rel @ np.array([-d[1], d[0], 0.0])
        under = (np.abs(along) > open_half) & (np.abs(along) < open_half + _FINGER_THICKNESS)
        under &= np.abs(across) < _FINGER_HALF_WIDTH
        tip_z = centre[2] - _PAD_BELOW_TCP
        return bool((pts[under, 2] > tip_z - 0.002).any())

    def _pad_contacts(
        self, body: int, centre: np.ndarray, d: np.ndarray
    ) -> tuple[float, float, float, float] | None:
        """Where two pads closing along `d` through `centre` (the TCP) first touch `body`.

        Each pad's face is sampled by a grid of horizontal rays cast from outside the open jaw
        towards the closing line; the first contact is the hit that sticks out furthest, and the
        contact normal is the mean normal of the hits within `pad_compliance` of it (the pad is
        rubber: it touches that patch once squeezed). Returns (width between the contacts,
        shift of the contacts' midpoint along `d`, worse angle of a contact normal from the
        closing line (deg), worse upward tilt of a contact normal (deg)), or None when a pad
        misses the item, or another item lies between an open finger and the item.
        """
        cid = self.cell.client_id
        cfg = self.cfg
        perp = np.array([-d[1], d[0], 0.0])
        reach = 0.5 * self.cell.arm.cfg.jaw.max_opening + 0.01
        offsets = [
            u * perp + np.array([0.0, 0.0, h])
            for u in (-_PAD_HALF_WIDTH, 0.0, _PAD_HALF_WIDTH)
            for h in np.linspace(-_PAD_BELOW_TCP + 0.001, _PAD_ABOVE_TCP - 0.001, _PAD_ROWS)
        ]
        sides = []
        for sign in (-1.0, 1.0):  # the finger on the -d side, then the one on the +d side
            starts = [centre + o + sign * reach * d for o in offsets]
            ends = [centre + o for o in offsets]
            target: list[tuple[float, np.ndarray]] = []  # (extent from the closing plane, normal)
            others: list[float] = []
            for k in range(_RAY_HITS):  # the k-th hit along each ray, to see past neighbours
                for h in p.rayTestBatch(
                    starts, ends, reportHitNumber=k, collisionFilterMask=RAY_MASK, physicsClientId=cid
                ):
                    if h[0] < 0:
                        continue
                    extent = float(sign * (np.asarray(h[3]) - centre) @ d)
                    if h[0] == body:
                        target.append((extent, np.asarray(h[4], dtype=np.float64)))
                    else:
                        others.append(extent)
            if not target:
                return None
            e_max = max(e for e, _ in target)
            patch = [n for e, n in target if e >= e_max - cfg.pad_compliance]
            n = np.mean(patch, axis=0)
            n /= max(np.linalg.norm(n), 1e-9)
            sides.append((e_max, n, others))
        (e_l, n_l, o_l), (e_r, n_r, o_r) = sides
        width = e_l + e_r
        open_half = 0.5 * (width + self.cell.arm.cfg.jaw.open_margin)
        for e_here, others in ((e_l, o_l), (e_r, o_r)):
            if any(e_here < e < open_half + 0.002 for e in others):
                return None  # a neighbour inside the closing fingers' path
        # Outward normals: -d on the -d side, +d on the +d side.
        ang_l = float(np.degrees(np.arccos(np.clip(n_l @ -d, -1.0, 1.0))))
        ang_r = float(np.degrees(np.arccos(np.clip(n_r @ d, -1.0, 1.0))))
        wedge = float(np.degrees(np.arcsin(np.clip(max(n_l[2], n_r[2]), -1.0, 1.0))))
        return width, 0.5 * (e_r - e_l), max(ang_l, ang_r), wedge

    # --- placements -------------------------------------------------------------------------------
    def placement(self) -> Placement | None:
        """Where to release the item the arm holds now (None when nothing is held)."""
        arm = self.cell.arm
        body = arm.held_item
        if body is None:
            return None
        cid = self.cell.client_id
        box = self.cell.box_bounds
        link = arm.tcp_link(arm._held_kind or "parallel_jaw")
        tcp, R_tcp_hand = arm.link_pose(link)
        lo, hi = (np.asarray(v) for v in p.getAABB(body, physicsClientId=cid))
        hang = float(tcp[2] - lo[2])  # how far the item reaches below the TCP
        size = hi[:2] - lo[:2]
        nx, ny = self.cfg.box_grid
        span = box.hi[:2] - box.lo[:2]
        cells = [
            box.lo[:2] + span * np.array([(i + 0.5) / nx, (j + 0.5) / ny])
            for i in range(nx)
            for j in range(ny)
        ]
        if (size > span / np.array([nx, ny])).any():
            cells = [(box.lo[:2] + box.hi[:2]) / 2]
        heights = [self._stack_top(c, size) for c in cells]
        k = int(np.argmin(heights))
        target_xy = cells[k]
        # Offset between the TCP and the item's footprint centre, kept while carried.
        target_xy = target_xy + (tcp[:2] - (lo[:2] + hi[:2]) / 2)
        # Keep the carried wrist; turn by 90 deg about vertical if that aligns the long side with the box's.
        R_grasp = R_tcp_hand @ np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        turn = (size[0] < size[1]) != (span[0] < span[1])
        if turn:
            Rz = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
            R_grasp = Rz @ R_grasp
            rel = tcp[:2] - (lo[:2] + hi[:2]) / 2
            target_xy = cells[k] + Rz[:2, :2] @ rel
        z = heights[k] + hang + arm.cfg.place_drop_height
        return Placement(np.array([target_xy[0], target_xy[1], z]), matrix_to_quat(R_grasp))

    def _stack_top(self, centre_xy: np.ndarray, size: np.ndarray) -> float:
        """Highest surface under a footprint of `size` at `centre_xy` in the box (5 rays)."""
        cid = self.cell.client_id
        box = self.cell.box_bounds
        half = np.minimum(size / 2, (box.hi[:2] - box.lo[:2]) / 2 - 0.01)
        offs = [np.zeros(2), half * [1, 1], half * [1, -1], half * [-1, 1], half * [-1, -1]]
        starts = [[*(centre_xy + o), box.hi[2] + 0.5] for o in offs]
        ends = [[*(centre_xy + o), box.lo[2] - 0.02] for o in offs]
        hits = p.rayTestBatch(starts, ends, collisionFilterMask=RAY_MASK, physicsClientId=cid)
        return max(float(h[3][2]) if h[0] >= 0 else float(box.lo[2]) for h in hits)


def _footprint_on_item(pts: np.ndarray, ok: np.ndarray, radius: float, spacing: float) -> np.ndarray:
    """(N,) bool: points (of `ok`) whose disc of `radius` (horizontal) is covered by the item's own
    ray hits `pts`, seen from above: the rays lie on a square grid of `spacing`, so a disc on the
    item holds a known number of hits around its centre; all but one of them must hit this item,
    so no edge, opening or covering neighbour lies under the cup."""
    from scipy.spatial import cKDTree

    if len(pts) == 0:
        return np.zeros(0, dtype=bool)
    k = int(np.floor(radius / spacing))
    i, j = np.mgrid[-k : k + 1, -k : k + 1]
    lattice = int(((i * spacing) ** 2 + (j * spacing) ** 2 <= radius**2 + 1e-12).sum())
    tree = cKDTree(pts[:, :2])
    counts = tree.query_ball_point(pts[:, :2], radius + 1e-9, return_length=True)
    return ok & (np.asarray(counts) >= lattice - 1)


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: `v` turned by `angle` (rad) about the unit `axis`."""
    k = axis / np.linalg.norm(axis)
    return v * np.cos(angle) + np.cross(k, v) * np.sin(angle) + k * (k @ v) * (1 - np.cos(angle))
