"""One episode of the simulated cell: fill a tote, then capture -> grasp -> pick -> place until it is empty.

Everything random comes from the episode seed: the tote contents (one np.random.Generator from the
seed, handed to fill_tote) and the camera noise (SimCamera seeded with it). PyBullet DIRECT is
deterministic for the same sequence of calls, so the same seed gives the same episode: the same
outcomes, robot times and final item poses (tested in tests/sim/test_episode.py).

Success of an attempt = the pick held the item, the place released it, and it came to rest inside
the outbound box. Attempts stop when the tote is empty, when the grasp source has nothing to offer,
or after `max_attempts` (default 2 x the items in the tote).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pybullet as p

from grasping.types import Reason
from sim.oracle import OracleGraspSource
from sim.scene import SceneConfig, SimCell

log = logging.getLogger(__name__)


@dataclass
class PickRecord:
    """One attempt."""

    index: int
    item: str  # catalog name of the item the grasp aimed at
    family: str
    gripper: str
    reason: str  # Reason value of the pick, or of the place if the pick succeeded
    success: bool  # picked, placed, and at rest inside the box
    robot_seconds: float  # pick + place robot time, s
    wall_seconds: float  # host time for pick + place (not the capture), s
    details: dict = field(default_factory=dict)


@dataclass
class EpisodeResult:
    catalog: str
    seed: int
    objects: int  # items in the tote after filling
    attempts: int
    picks_succeeded: int
    items_left: int  # items still in the tote at the end
    robot_seconds: float  # total robot time of all motions, s
    wall_seconds: float  # total host time of the episode after filling, s
    capture_wall_seconds: float  # host time spent rendering frames, s
    picks: list[PickRecord]
    final_poses: dict[str, list[float]] = field(default_factory=dict)  # body id -> position + quaternion

    @property
    def success_rate(self) -> float:
        return self.picks_succeeded / self.attempts if self.attempts else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["success_rate"] = self.success_rate
        return d


def _item_label(cell: SimCell, body: int) -> tuple[str, str]:
    spec = cell.items.get(body)
    if spec is None:
        return f"body-{body}", "unknown"
    if isinstance(spec, str):
        return spec, spec.split("-")[0]
    return spec.name, spec.family


def _save_frame(frame, out_dir: Path, k: int) -> None:
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(frame.rgb)).save(out_dir / f"frame_{k:04d}_rgb.png")
    # 16-bit depth in millimetres, 0 = missing (the usual convention of depth-camera drivers).
    d = np.nan_to_num(np.asarray(frame.depth, dtype=np.float64) * 1000.0, nan=0.0)
    Image.fromarray(np.clip(d, 0, 65535).astype(np.uint16)).save(out_dir / f"frame_{k:04d}_depth.png")


def run_episode(
    catalog,
    objects: int,
    seed: int,
    grasp_source: str = "oracle",
    record_dir: str | Path | None = None,
    gui: bool = False,
    max_attempts: int | None = None,
    scene_config: SceneConfig | None = None,
    on_pick=None,
) -> EpisodeResult:
    """Run one episode; `catalog` is a Catalog or a catalog name. `on_pick(record)` is called per attempt."""
    if grasp_source != "oracle":
        raise ValueError(f"unknown grasp source {grasp_source!r}; the simulator offers 'oracle'")
    if objects < 1:
        raise ValueError(f"objects per tote must be >= 1, got {objects}")
    if isinstance(catalog, str):
        from sim.catalogs import load_catalog

        catalog = load_catalog(catalog)
    rng = np.random.default_rng(seed)
    record = Path(record_dir) if record_dir is not None else None
    with SimCell(seed=seed, config=scene_config, gui=gui) as cell:
        cell.fill(catalog, objects, rng)
        n_items = len(cell.items_in_tote())
        limit = max_attempts if max_attempts is not None else 2 * n_items
        oracle = OracleGraspSource(cell)
        picks: list[PickRecord] = []
        t_start = time.perf_counter()
        t_capture = 0.0
        succeeded = 0
        while len(picks) < limit and cell.items_in_tote():
            t0 = time.perf_counter()
            frame = cell.camera.capture()  # one render per decision, as the real cell does
            t_capture += time.perf_counter() - t0
            if record is not None:
                _save_frame(frame, record, len(picks))
            proposal = oracle.propose()
            if proposal is None:
                log.info("oracle: nothing graspable left (%d items in the tote)", len(cell.items_in_tote()))
                break
            body, grasp = proposal
            name, family = _item_label(cell, body)
            t1 = time.perf_counter()
            t_robot = cell.arm.robot_time
            out = cell.arm.pick(grasp)
            reason = out.reason
            details = {"pick": out.details}
            ok = False
            if out.success:
                placement = oracle.placement()
                if placement is None:
                    reason = Reason.NOT_HOLDING
                else:
                    placed = cell.arm.place(placement)
                    reason = placed.reason
                    details["place"] = placed.details
                    ok = placed.success and body in cell.items_in_box()
                    if placed.success and not ok:
                        details["outside_box"] = True
            else:
                if cell.arm.held_item is not None:  # e.g. collision in transit while holding
                    cell.arm.home()
            if not ok:
                oracle.record_failure(body, grasp.gripper, grasp)
            succeeded += int(ok)
            rec = PickRecord(
                index=len(picks),
                item=name,
                family=family,
                gripper=grasp.gripper,
                reason=reason.value if ok or reason is not Reason.OK else "not_in_box",
                success=ok,
                robot_seconds=round(cell.arm.robot_time - t_robot, 4),
                wall_seconds=round(time.perf_counter() - t1, 4),
                details=details,
            )
            picks.append(rec)
            if on_pick is not None:
                on_pick(rec)
        cell.arm.home()
        wall = time.perf_counter() - t_start
        poses = {}
        for b in sorted(cell.items):
            pos, orn = p.getBasePositionAndOrientation(b, physicsClientId=cell.client_id)
            poses[str(b)] = [round(v, 6) for v in (*pos, *orn)]
        return EpisodeResult(
            catalog=catalog.name,
            seed=seed,
            objects=n_items,
            attempts=len(picks),
            picks_succeeded=succeeded,
            items_left=len(cell.items_in_tote()),
            robot_seconds=round(cell.arm.robot_time, 4),
            wall_seconds=round(wall, 4),
            capture_wall_seconds=round(t_capture, 4),
            picks=picks,
            final_poses=poses,
        )
