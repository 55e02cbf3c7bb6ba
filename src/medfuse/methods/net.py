"""The interface of learned methods: `FusionNet`, an `nn.Module` whose `forward(a, b)` maps
(N, 1, H, W) tensors in [0, 1] to the fused (N, 1, H, W) tensor in [0, 1], and whose
`training_loss(a, b)` returns the scalar loss to minimise plus a dict of its named terms (floats,
for logging). The one training loop in `medfuse.train` needs nothing else. A trained one is used
through `medfuse.methods.base.Fuser` (`medfuse.models.NetFuser`).
"""

from __future__ import annotations

import torch
from torch import nn


class FusionNet(nn.Module):
    """Base class of learned fusion networks (see the module docstring for the contract)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def training_loss(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError
