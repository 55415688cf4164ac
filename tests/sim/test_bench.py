"""`pickcell bench`: reproducible whatever the parallelism, on every kind of catalog, with a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sim.benchmark.episode import run_bench_episode
from sim.benchmark.metrics import aggregate, wilson
from sim.benchmark.runner import episode_seeds, make_specs, run_episodes

REPO = Path(__file__).resolve().parents[2]
# Everything that comes from simulation (not from this host's clock) must match exactly.
DETERMINISTIC = (
    "first_attempt_success",
    "clearance_rate",
    "mpph",
    "assists_per_100_picks",
    "human_seconds_per_100_picks",
    "damage_rate",
    "picks",
    "attempts",
    "items",
    "robot_seconds",
    "failures_by_reason",
    "families",
)


def _bench(tmp: Path, name: str, *extra: str) -> dict:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "pickcell", "bench", "--episodes", "2", "--objects-per-tote", "2"]
    cmd += ["--planner", "analytic", "--seed", "7", "--json", str(out), "--no-progress", *extra]
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_one_and_two_workers_give_identical_metrics(tmp_path):
    one = _bench(tmp_path, "one", "--catalog", "procedural", "--workers", "1")
    two = _bench(
        tmp_path, "two", "--catalog", "procedural", "--workers", "2", "--report", str(tmp_path / "rep")
    )
    for k in DETERMINISTIC:
        assert one[k] == two[k], k
    assert one["picks"] >= 1 and one["attempts"] >= one["picks"]
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "first-attempt success" in report
    # The report's command line is one a person can paste back: options of `pickcell bench` only.
    line = next(ln for ln in report.splitlines() if ln.startswith("Command: "))
    assert line.startswith("Command: `pickcell bench --") and "--command" not in line
    assert "--catalog procedural" in line and "--workers 2" in line
    for png in ("success_by_family.png", "latency_hist.png", "cycle_breakdown.png", "picks_over_time.png"):
        assert (tmp_path / "rep" / png).read_bytes().startswith(b"\x89PNG")


def test_ray_backend_runs_the_same_episode_function_with_the_same_results():
    specs = make_specs(2, 3, catalog="procedural", objects_per_tote=2, planner="analytic", associate="sim")
    local, _ = run_episodes(specs, run_bench_episode, workers=1, progress=False)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote, _ = run_episodes(specs, run_bench_episode, backend="ray", progress=False)
    finally:
        ray.shutdown()
    a, b = aggregate(local), aggregate(remote)
    for k in DETERMINISTIC:
        assert a[k] == b[k], k


def test_a_users_folder_of_urdfs_is_a_catalog(tmp_path):
    folder = tmp_path / "my_skus"
    folder.mkdir()
    for i, (sx, sy, sz) in enumerate([(0.10, 0.07, 0.05), (0.08, 0.08, 0.04)]):
        (folder / f"sku{i}.urdf").write_text(
            f"""<robot name="sku{i}"><link name="base">
  <inertial><mass value="0.3"/><inertia ixx="1e-4" iyy="1e-4" izz="1e-4" ixy="0" ixz="0" iyz="0"/></inertial>
  <visual><geometry><box size="{sx} {sy} {sz}"/></geometry></visual>
  <collision><geometry><box size="{sx} {sy} {sz}"/></geometry></collision>
</link></robot>"""
        )
    m = _bench(tmp_path, "folder", "--catalog", str(folder), "--associate", "none")
    assert m["items"] == 4 and set(m["families"]) <= {"my_skus", "none"}


def test_episode_seeds_do_not_depend_on_how_many_episodes_run():
    assert episode_seeds(5, 3) == episode_seeds(5, 10)[:3]


def test_wilson_interval_brackets_the_rate():
    lo, hi = wilson(45, 50)
    assert lo < 0.9 < hi and 0.75 < lo and hi < 0.97
    assert wilson(0, 0) == (0.0, 1.0)


def test_an_external_planner_runs_in_the_same_harness_by_module_and_class_name():
    specs = make_specs(
        1,
        11,
        catalog="procedural",
        objects_per_tote=2,
        planner="sim.benchmark.baselines:TopCentreSuction",
        associate="none",
    )
    (ep,), _ = run_episodes(specs, run_bench_episode, progress=False)
    assert ep["model_version"] == "baseline-top-centre-suction"
    assert ep["attempts"] and all(a["gripper"] == "suction" for a in ep["attempts"])


def test_an_unknown_planner_is_a_clear_error():
    import pytest

    from grasping.types import Bounds
    from sim.stack import build_planner

    tote = Bounds([0, 0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="cannot import NoSuch"):
        build_planner("sim.benchmark.baselines:NoSuch", tote)
    with pytest.raises(ValueError, match="unknown planner"):
        build_planner("magic", tote)


def test_an_attempt_is_charged_to_the_item_it_aimed_at_not_a_long_neighbours_bounding_box(sim_cell):
    """A tube lying diagonally has a bounding box that covers a small part beside it: a grasp on
    the small part is charged to the small part (the first item on the approach line), and a grasp
    over bare floor to whichever item's box is nearest (within 5 cm) or to nothing."""
    import numpy as np
    import pybullet as pb

    from grasping.types import Grasp, grasp_frame, matrix_to_quat
    from sim.benchmark.episode import _Instrumented

    cell = sim_cell
    b = cell.tote_bounds
    c = np.array([(b.lo[0] + b.hi[0]) / 2, (b.lo[1] + b.hi[1]) / 2, b.lo[2]])
    yaw45 = pb.getQuaternionFromEuler([np.pi / 2, 0.0, np.pi / 4])  # cylinder axis along x = -y
    tube = cell.add_primitive("cylinder", (0.025, 0.30), (c[0], c[1], c[2] + 0.026), yaw45, name="tube")
    # 6 cm off the tube's axis, across it: inside the tube's bounding box, beside the tube itself.
    off = 0.06 * np.array([1.0, 1.0]) / np.sqrt(2.0)
    part = cell.add_primitive("box", (0.012, 0.012, 0.01), (c[0] + off[0], c[1] + off[1], c[2] + 0.011))
    cell.settle(0.3)
    lo, hi = (np.array(x) for x in pb.getAABB(tube, physicsClientId=cell.client_id))
    part_pos = cell.item_pose(part)[0]
    assert (lo[:2] <= part_pos[:2]).all() and (part_pos[:2] <= hi[:2]).all()  # the premise
    arm = _Instrumented(cell)
    down = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0])))
    on_part = Grasp("suction", part_pos + [0.0, 0.0, 0.01], down)
    assert arm._aimed_item(on_part) == part
    on_tube = Grasp("suction", np.array([c[0], c[1], c[2] + 0.05]), down)
    assert arm._aimed_item(on_tube) == tube
    nowhere = Grasp("suction", np.array([b.lo[0] + 0.03, b.hi[1] - 0.03, c[2] + 0.01]), down)
    assert arm._aimed_item(nowhere) is None
