"""W-DUALMINE's loss terms (paper eq. 12-17), each a small function tested on analytic inputs.

L = w_avg L_avg + w_grad L_grad + w_cc L_cc + w_mi L_mi + w_rec L_rec, weights from params.yaml
(5, 2, 1, 0.1, 0.1 in the paper). A weight of 0 removes its term: the model does not compute it
(nor build the head it needs). Images are (N, 1, H, W) tensors in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.errors import ConfigError
from medfuse.methods.blocks import in_float32, sobel_magnitude, spatial_mean

_CC_EPS = 1e-8


@dataclass(frozen=True)
class LossWeights:
    avg: float
    grad: float
    cc: float
    mi: float
    rec: float
    tau: float

    def __post_init__(self) -> None:
        for name in ("avg", "grad", "cc", "mi", "rec", "tau"):
            object.__setattr__(self, name, float(getattr(self, name)))
        terms = [getattr(self, name) for name in ("avg", "grad", "cc", "mi", "rec")]
        if any(w < 0 for w in terms) or not any(w > 0 for w in terms):
            raise ConfigError(f"weights must be >= 0 and not all 0, got {terms}")
        if self.tau <= 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")


@in_float32
def l_avg(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 13: mean absolute distance to the pixel-wise average of the sources."""
    return (fused - (a + b) * 0.5).abs().mean()


@in_float32
def l_grad(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 14: mean | G(If) - max(G(I1), G(I2)) |, G the Sobel magnitude |gx| + |gy|.

    Replicate padding so the image border does not count as an edge.
    """
    with torch.no_grad():
        target = torch.maximum(
            sobel_magnitude(a, padding="replicate"), sobel_magnitude(b, padding="replicate")
        )
    return (sobel_magnitude(fused, padding="replicate") - target).abs().mean()


def correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image (N,) over all pixels of each sample."""
    xc = x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
    yc = y.flatten(1) - y.flatten(1).mean(dim=1, keepdim=True)
    cov = (xc * yc).mean(dim=1)
    return cov / torch.sqrt(xc.pow(2).mean(dim=1) * yc.pow(2).mean(dim=1) + _CC_EPS)


@in_float32
def l_cc(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 15: 1 - corr(If, (I1 + I2) / 2), per image, averaged over the batch."""
    return (1.0 - correlation(fused, (a + b) * 0.5)).mean()


@in_float32
def infonce(z_query: torch.Tensor, z_key: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 16: InfoNCE with cosine similarity; the positive of query i is key i, the other keys
    of the batch are its negatives."""
    logits = F.normalize(z_query, dim=1) @ F.normalize(z_key, dim=1).T / tau
    targets = torch.arange(z_query.shape[0], device=z_query.device)
    return F.cross_entropy(logits, targets)


def infonce_pair(
    z_f: torch.Tensor, z_1: torch.Tensor, z_2: torch.Tensor, tau: float
) -> torch.Tensor:
    """L_mi: the fused image's projection against each source's, the two terms averaged."""
    return 0.5 * (infonce(z_f, z_1, tau) + infonce(z_f, z_2, tau))


@in_float32
def l_rec(reconstructions: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 17: mean |R1(If) - I1| + mean |R2(If) - I2|; `reconstructions` is (N, 2, H, W)."""
    return (reconstructions[:, :1] - a).abs().mean() + (reconstructions[:, 1:] - b).abs().mean()


class ProjectionHead(nn.Module):
    """Global average pool of the deepest encoder features, then a 2-layer MLP (for L_mi)."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, dim)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(spatial_mean(features))


class ReconstructionHeads(nn.Module):
    """R1 and R2 of eq. 17: two independent conv3x3 -> ReLU -> conv3x3 -> sigmoid heads.

    Both are computed by one pair of convolutions (the second grouped), which is exactly two
    separate heads on the same input but one pass over the full-resolution image.
    """

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2 * hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(2 * hidden, 2, 3, padding=1, groups=2)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv2(F.relu(self.conv1(fused), inplace=True)))
