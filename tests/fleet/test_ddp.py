"""The learner's training under torchrun: two local processes (gloo on CPU) give a working model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grasping"))
from synthetic_grasps import make_dataset_synth  # noqa: E402

from grasping.learned_scorer import LearnedScorer  # noqa: E402
from grasping.learning import TrainConfig, evaluate, load_dataset, train  # noqa: E402
from grasping.modelfile import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def write_export(out: Path, ds) -> None:
    """The dataset the way `pickcell ledger export` writes one: an npz shard + manifest with sha256."""
    out.mkdir(parents=True)
    np.savez(
        out / "shard-00000.npz",
        patches=ds.patches,
        features=ds.features,
        gripper=ds.gripper,
        label=ds.label,
        timestamp=ds.timestamp,
        source=ds.source.astype(np.str_),
        family=ds.family.astype(np.str_),
        row_id=np.array([f"{s}:{i}" for i, s in enumerate(ds.scene)]),
        scene=ds.scene.astype(np.str_),
        scene_ood_sigma=np.full(len(ds), np.nan),
    )
    digest = hashlib.sha256((out / "shard-00000.npz").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(
        json.dumps({"format_version": 1, "shards": [{"file": "shard-00000.npz", "sha256": digest}]})
    )


def test_two_torchrun_processes_train_a_working_model(tmp_path) -> None:
    ds, _ = make_dataset_synth(160, seed=11)
    write_export(tmp_path / "export", ds)
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fleet.ddp",
        "--dataset",
        str(tmp_path / "export"),
        "--out",
        str(out),
        "--epochs",
        "6",
        "--seed",
        "3",
        "--version",
        "ddp-test",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 processes" in proc.stdout
    model = load_model(out)
    assert model.version == "ddp-test"
    fresh, _ = make_dataset_synth(150, seed=12, scene_prefix="fresh")
    m = evaluate(LearnedScorer(model, num_threads=1), fresh)
    assert m["auroc"] > 0.8  # it learnt the synthetic rule (chance is 0.5)
    # Each step of the two processes is a step on the whole batch: one process training the same data
    # with the same seed ends at (float rounding) the same network.
    single = train(
        load_dataset(tmp_path / "export"),
        TrainConfig(epochs=6, seed=3, progress=False, model_version="single", threads=1),
        tmp_path / "single.safetensors",
    )
    a, b = load_model(single.path).net.state_dict(), model.net.state_dict()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 0.02
    assert abs(single.metrics["auroc"] - model.meta["metrics"]["auroc"]) < 0.01
