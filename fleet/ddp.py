"""Training under torchrun: the learner's training, data-parallel over processes (DDP, gloo on CPU).

    torchrun --standalone --nproc_per_node 2 -m fleet.ddp --dataset EXPORT --out model.safetensors

Everything but the network fit is `grasping.learning.train`, unchanged: splits, weights,
calibration, thresholds, watchdog, evaluation, the model file and its card. The fit itself is the same
loop as `learning._fit_net` with the network wrapped in DistributedDataParallel: every process draws
the same seeded permutation and flips, takes its slice (rank::world) of each batch, and scales its
loss so that DDP's averaged gradient is the gradient of the whole batch's weighted loss. The weights
stay identical on every process, so each makes the same early-stopping decision; only rank 0 writes
the model file (the others write to a temporary folder that is removed). Batches smaller than the
number of processes (a tail) are skipped. Run as a single process (no torchrun), it is plain training.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grasping import learning
from grasping.calibration import auroc, sigmoid

log = logging.getLogger(__name__)


def _fit_net_ddp(
    train_ds: learning.Dataset,
    val_ds: learning.Dataset,
    w_train: np.ndarray,
    w_val: np.ndarray,
    cfg: learning.TrainConfig,
    anchor: np.ndarray | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    """`learning._fit_net` across processes: training from scratch, so fine-tuning's logit matching
    (`cfg.distill`, which reads `anchor`) has nothing to match and is refused."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from grasping.model import GraspNet

    if cfg.distill > 0 or cfg.init_model:
        raise ValueError("training under torchrun starts from scratch: no init_model, no distill")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = GraspNet(train_ds.n_channels, train_ds.patch_size, train_ds.n_features, cfg.embed_dim)
    f = torch.from_numpy(train_ds.features)
    net.set_feature_normalisation(f.mean(0), f.std(0) if len(train_ds) > 1 else torch.ones(f.shape[1]))
    ddp = DistributedDataParallel(net)  # broadcasts rank 0's parameters and buffers
    opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    P, F = torch.from_numpy(train_ds.patches), torch.from_numpy(train_ds.features)
    G, Y = torch.from_numpy(train_ds.gripper), torch.from_numpy(train_ds.label)
    W = torch.from_numpy(w_train.astype(np.float32))
    best = (math.inf, None, -1)
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.epochs), desc=f"train[{rank}/{world}]", disable=not cfg.progress or rank != 0)
    for epoch in bar:
        ddp.train()
        perm = torch.randperm(len(train_ds), generator=gen)
        total, count = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            flip_w = torch.rand(len(idx), generator=gen) < 0.5
            flip_h = torch.rand(len(idx), generator=gen) < 0.5
            if len(idx) < world:
                continue  # every process must take part in every step
            mine = torch.arange(rank, len(idx), world)
            x = P[idx[mine]]
            if cfg.augment:
                x = torch.where(flip_w[mine].view(-1, 1, 1, 1), x.flip(-1), x)
                x = torch.where(flip_h[mine].view(-1, 1, 1, 1), x.flip(-2), x)
            j = idx[mine]
            logits, _ = ddp(x, F[j], G[j])
            loss_rows = torch.nn.functional.binary_cross_entropy_with_logits(logits, Y[j], reduction="none")
            # DDP averages gradients over processes: scale by world so the sum of the slices' partial
            # sums over the whole batch's weight is what is minimised.
            loss = (loss_rows * W[j]).sum() / W[idx].sum() * world
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) / world * len(idx)
            count += len(idx)
        sched.step()
        net.eval()
        val_logits = _logits(net, val_ds)
        p = np.clip(sigmoid(val_logits), 1e-6, 1 - 1e-6)
        y = val_ds.label.astype(np.float64)
        val_loss = float(-np.sum(w_val * (y * np.log(p) + (1 - y) * np.log(1 - p))) / w_val.sum())
        val_auc = auroc(val_logits, y) if len(val_ds) else float("nan")
        history.append(
            {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss, "val_auroc": val_auc}
        )
        if val_loss < best[0] - 1e-4:
            best = (val_loss, {k: v.detach().clone() for k, v in net.state_dict().items()}, epoch)
        elif epoch - best[2] >= cfg.patience:
            break
    if best[1] is not None:
        net.load_state_dict(best[1])
    net.eval()
    return net, history


def _logits(net: Any, ds: learning.Dataset, batch: int = 4096) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(ds), batch):
            sl = slice(s, s + batch)
            logits, _ = net(
                torch.from_numpy(ds.patches[sl]),
                torch.from_numpy(ds.features[sl]),
                torch.from_numpy(ds.gripper[sl]),
            )
            out.append(logits.numpy())
    return np.concatenate(out) if out else np.zeros(0)


@contextlib.contextmanager
def _distributed_fit() -> Iterator[None]:
    """`learning.train` fits with the DDP loop inside this block (this process only)."""
    original = learning._fit_net
    learning._fit_net = _fit_net_ddp
    try:
        yield
    finally:
        learning._fit_net = original


def train_distributed(
    dataset: learning.Dataset, cfg: learning.TrainConfig, out: Path
) -> learning.TrainResult:
    """Train across the processes of an initialised process group; rank 0's file is `out`."""
    import torch.distributed as dist

    rank = dist.get_rank()
    with contextlib.ExitStack() as stack:
        target = Path(out)
        if rank != 0:
            target = Path(stack.enter_context(tempfile.TemporaryDirectory())) / Path(out).name
        stack.enter_context(_distributed_fit())
        result = learning.train(dataset, cfg, target)
        dist.barrier()  # rank 0's file is complete when any process returns
        return result


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    ap = argparse.ArgumentParser(prog="python -m fleet.ddp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=Path, required=True, help="a ledger export folder (manifest.json)")
    ap.add_argument("--out", type=Path, required=True, help="the model file rank 0 writes")
    ap.add_argument("--epochs", type=int, default=learning.TrainConfig.epochs)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", default=None, help="model version (default: generated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo on CPU; nccl on GPUs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if "RANK" not in os.environ:  # not under torchrun: a group of one
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
        )
    dist.init_process_group(args.backend)
    try:
        ds = learning.load_dataset(args.dataset)
        cfg = learning.TrainConfig(
            epochs=args.epochs,
            seed=args.seed,
            model_version=args.version,
            progress=False,
            threads=args.threads,
        )
        res = train_distributed(ds, cfg, args.out)
        if dist.get_rank() == 0:
            n = dist.get_world_size()
            print(f"wrote {res.path} ({res.version}) on {n} processes; test AUROC {res.metrics.get('auroc')}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
