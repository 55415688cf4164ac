"""The learned grasp scorer's network: one shared backbone, one head per gripper.

The backbone sees each candidate's local geometry in the grasp's own frame (a C-channel S x S patch:
normalised height map + occupancy, from `grasping.patches`) and its analytic features (through a
small MLP); the two are fused into an embedding. The embedding feeds one small head per gripper
type and also the covariate-shift watchdog (`grasping.watchdog`), so "how far from the training
data is this candidate" is measured in the very space the heads decide in.

Sized for the cell's latency budget: about 45 k parameters; stride-2 convolutions from the first
layer on, and narrow early layers (8, 16, 32 channels), because on a CPU the cost sits in the
full-resolution layers (widths 16/32/32 scored the same on the synthetic benchmark task at 2.5x the
time). Latency is measured by `benchmarks/scorer_latency.py`.
"""

from __future__ import annotations

import torch
from torch import nn

N_GRIPPERS = 2  # grasping.scoring.SUCTION = 0, PARALLEL_JAW = 1


class GraspNet(nn.Module):
    """patches (M, C, S, S) + features (M, F) + gripper (M,) -> (logits (M,), embeddings (M, D)).

    Both heads are computed for every row and each row's own head is gathered, so a mixed batch of
    suction and jaw candidates is one forward pass with no Python-level branching.
    """

    def __init__(
        self,
        in_channels: int,
        patch_size: int,
        n_features: int,
        embed_dim: int = 64,
        channels: tuple[int, int, int] = (8, 16, 32),
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if in_channels < 1 or n_features < 0 or embed_dim < 1 or len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"bad GraspNet args: {in_channels=}, {n_features=}, {embed_dim=}, {channels=}")
        if patch_size < 8 or patch_size % 8:
            # Three stride-2 convolutions: the patch must halve cleanly three times.
            raise ValueError(f"patch_size must be a multiple of 8 and >= 8, got {patch_size}")
        self.in_channels = int(in_channels)
        self.patch_size = int(patch_size)
        self.n_features = int(n_features)
        self.embed_dim = int(embed_dim)
        self.channels = channels
        c1, c2, c3 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            # A 4x4 grid keeps *where* things are (centre vs rim matters for a seal or a pinch);
            # global average pooling would throw that away. At S = 32 the grid is already 4x4, and
            # an identity adaptive pool still costs more than a convolution on the CPU: skip it.
            nn.Identity() if patch_size // 8 == 4 else nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        conv_out = c3 * 4 * 4
        feat_hidden = 32 if n_features > 0 else 0
        self.feature_mlp = (
            nn.Sequential(nn.Linear(n_features, feat_hidden), nn.ReLU(inplace=True))
            if n_features > 0
            else None
        )
        self.fuse = nn.Sequential(nn.Linear(conv_out + feat_hidden, embed_dim), nn.ReLU(inplace=True))
        # Heads as one batched layer pair: (M, D) -> (M, N_GRIPPERS) logits, then gather.
        self.head_hidden = nn.Linear(embed_dim, 32 * N_GRIPPERS)
        self.head_out = nn.Parameter(torch.randn(N_GRIPPERS, 32) * (1.0 / 32**0.5))
        self.head_bias = nn.Parameter(torch.zeros(N_GRIPPERS))
        # Feature standardisation learnt from the training set, saved with the weights so a model
        # file is self-contained (the raw features have mixed units: metres, radians, counts).
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))

    def set_feature_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training set's feature mean/std (std floored so constant features stay finite)."""
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def embed(self, patches: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(M, C, S, S), (M, F) -> (M, D) backbone embedding."""
        h = self.conv(patches)
        if self.feature_mlp is not None:
            f = (features - self.feature_mean) / self.feature_std
            h = torch.cat([h, self.feature_mlp(f)], dim=1)
        return self.fuse(h)

    def heads(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(M, D) -> (M, N_GRIPPERS): every head's logit for every row."""
        hidden = torch.relu(self.head_hidden(embeddings)).view(-1, N_GRIPPERS, 32)
        return (hidden * self.head_out).sum(-1) + self.head_bias

    def forward(
        self, patches: torch.Tensor, features: torch.Tensor, gripper: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(patches, features)
        all_logits = self.heads(emb)
        logits = all_logits.gather(1, gripper.long().view(-1, 1)).squeeze(1)
        return logits, emb

    def arch_args(self) -> dict[str, int | list[int]]:
        """Constructor arguments, as written into a model file's metadata."""
        return {
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "n_features": self.n_features,
            "embed_dim": self.embed_dim,
            "channels": list(self.channels),
        }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
