"""MMIF-AMIN (Luo and Xu, 2025), re-implemented from the authors' released code.

Restated in ../shared/spec/seed-methods.md (section MMIF-AMIN) from the authors' repository at
commit 44cd59f; decisions are listed in docs/methods.md. The network:

- two dense branches (`up_rout` on the functional luma, `down_rout` on the MRI), each six
  blocks `x + f(x)` with `f` a 1-channel residual-dense block;
- CBAM on the two stacked sources (its channel attention multiplies by the input twice);
- three convolution branches (3x3, 5x5, 7x7) whose modules and BatchNorms are *reused* within a
  branch, each passing once through one shared transformer layer whose tokens are strips of
  `channels` consecutive memory elements (one channel, one row, adjacent columns);
- the sum of the three branches and both dense branches, a 1x1 conv and a hard sigmoid.

Module names are the authors' (`Basic3x3`, `basicLayer`, `up_rout`, ...) so that their released
state dict loads strictly; parameters their code holds but never uses are kept for the same
reason (see `InvertibleDenseBlock`, `OneTokenAttention`, `patch_embed`).

The loss weighs SSIM and RMI (region mutual information) of the output against each source by
the sources' average gradient and entropy, as the authors' training script does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.config import config_from_mapping
from medfuse.errors import DataError
from medfuse.methods.blocks import gaussian_window, in_float32, ssim_map
from medfuse.methods.net import FusionNet

# ----------------------------------------------------------------------------- configuration


@dataclass
class MMIFAMINConfig:
    """`methods.mmif-amin.model` (params.yaml holds the authors' values, their checkpoint's
    shapes)."""

    channels: int  # width of the three branches, also the length of a transformer token
    dense_blocks: int  # blocks per dense branch
    dense_growth: int  # channels each conv of a residual-dense block adds
    depth: int  # transformer blocks in the shared layer
    num_heads: int  # shapes only the (inert) relative-position table
    mlp_ratio: float
    unused_embed_dim: int  # width of the authors' unused patch-embedding LayerNorm

    def __post_init__(self) -> None:
        for name in ("channels", "dense_blocks", "dense_growth", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")


@dataclass
class MMIFAMINLossConfig:
    """`methods.mmif-amin.loss`: SSIM and RMI settings of the authors' loss (their values)."""

    ssim_window: int
    ssim_sigma: float
    rmi_radius: int  # side of the square regions whose pixels form one vector
    rmi_pool: int  # max-pool kernel and stride before the regions are taken
    rmi_bce_weight: float  # RMI = w * BCE-with-logits + (1 - w) * the RMI term
    rmi_epsilon: float
    weight_guard: float  # each adaptive weight when both sources score 0 (authors: NaN)

    def __post_init__(self) -> None:
        if self.ssim_window < 1 or self.rmi_radius < 1 or self.rmi_pool < 1:
            raise ValueError("ssim_window, rmi_radius and rmi_pool must be >= 1")
        if not 0.0 <= self.rmi_bce_weight <= 1.0:
            raise ValueError(f"rmi_bce_weight must be in [0, 1], got {self.rmi_bce_weight}")
        if self.rmi_epsilon <= 0:
            raise ValueError(f"rmi_epsilon must be > 0, got {self.rmi_epsilon}")


class StripWidthError(DataError, ValueError):
    """An image width the transformer's token strips do not tile (a ValueError for callers of
    the network, a DataError for the CLI, which reports it in one line)."""


# ----------------------------------------------------------------------------- dense branches


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each fed every earlier output (growth `growth`), LeakyReLU between; the
    last conv starts at zero, so each block starts as the identity."""

    def __init__(self, channels: int = 1, growth: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, growth, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels + growth, growth, 3, 1, 1)
        self.conv3 = nn.Conv2d(channels + 2 * growth, growth, 3, 1, 1)
        self.conv4 = nn.Conv2d(channels + 3 * growth, growth, 3, 1, 1)
        self.conv5 = nn.Conv2d(channels + 4 * growth, channels, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.01)
        nn.init.zeros_(self.conv5.weight)
        nn.init.zeros_(self.conv5.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(self.lrelu(conv(torch.cat(features, dim=1))))
        return self.conv5(torch.cat(features, dim=1))


class InvertibleDenseBlock(nn.Module):
    """`x + f(x)`. The authors' block also computes an affine second half from two more dense
    sub-networks (`r`, `y`) and discards it: they never affect the output nor get a gradient,
    so they are not run here, only kept so that the released weights load strictly."""

    def __init__(self, growth: int) -> None:
        super().__init__()
        self.r = ResidualDenseBlock(1, growth)
        self.y = ResidualDenseBlock(1, growth)
        self.f = ResidualDenseBlock(1, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class DenseBranch(nn.Module):
    """A chain of invertible dense blocks on one 1-channel source."""

    def __init__(self, num_blocks: int, growth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(InvertibleDenseBlock(growth) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# ----------------------------------------------------------------------------- CBAM


class ChannelAttention(nn.Module):
    """Avg- and max-pooled vectors through a shared 1x1 MLP (no bias), summed, sigmoid; the
    module multiplies by its input itself (and CBAM multiplies once more, as the authors do)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.fc(F.adaptive_avg_pool2d(x, 1)) + self.fc(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(pooled) * x


class SpatialAttention(nn.Module):
    """Channel mean and max -> 7x7 conv (with bias, zero padding) -> sigmoid: the mask only."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat(
            [torch.mean(x, dim=1, keepdim=True), torch.max(x, dim=1, keepdim=True)[0]], dim=1
        )
        return torch.sigmoid(self.conv2d(pooled))


class CBAM(nn.Module):
    """Channel then spatial attention; the channel step yields sigmoid(.)·x² (authors' code)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel_attention = ChannelAttention(channels)
        self.spatial_attention = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.channel_attention(x) * x
        return self.spatial_attention(out) * out


# ----------------------------------------------------------------------------- conv branches


class ConvBNReLU(nn.Module):
    """k x k conv (no bias, same padding), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class OutputHead(nn.Module):
    """1x1 conv to one channel (with bias), hard sigmoid: the output lies in [0, 1]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 1, 1)
        self.act = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(x))


# ----------------------------------------------------------------------------- transformer


class OneTokenAttention(nn.Module):
    """Swin window attention with window size 1: each window holds one token, whose softmax
    weight is exactly 1, so the result is `proj(v(x))`. Queries, keys and the relative-position
    table cannot change the output (the authors' code computes them to no effect); they are kept
    as parameters for the released weights, and only the value rows of `qkv` are used."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.relative_position_bias_table = nn.Parameter(torch.zeros(1, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", torch.zeros(1, 1, dtype=torch.long))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        value = F.linear(tokens, self.qkv.weight[2 * self.dim :], self.qkv.bias[2 * self.dim :])
        return self.proj(value)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StripTransformerBlock(nn.Module):
    """Pre-norm attention and MLP, both residual, on tokens of `dim` consecutive elements.

    The authors turn (B, C, H, W) into tokens with a view, not a permute: a token is `dim`
    adjacent memory elements, i.e. one channel, one row, `dim` adjacent columns (when the width
    is a multiple of `dim`, which `MMIFAMINNet` checks), and the result is viewed back.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = OneTokenAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.contiguous().view(-1, self.norm1.normalized_shape[0])
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.view(x.shape)


class StripTransformerLayer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            StripTransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class UnusedPatchEmbedding(nn.Module):
    """The authors' patch embedding is built but never called; only its LayerNorm holds weights,
    kept so that the released state dict loads strictly."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)


# ----------------------------------------------------------------------------- loss


def average_gradient(x: torch.Tensor) -> torch.Tensor:
    """Mean of sqrt((gx² + gy²)/2) over the batch; central differences, one-sided at borders."""
    gx = torch.gradient(x, dim=-1)[0]
    gy = torch.gradient(x, dim=-2)[0]
    return torch.sqrt((gx**2 + gy**2) / 2).mean()


def entropy_bits(x: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of the batch rounded to uint8, as the authors compute it. On images in
    [0, 1] rounding leaves only 0 and 1, so this is the binary entropy of the share of pixels
    above 0.5 (kept: it is what weighs their loss)."""
    counts = torch.bincount(torch.round(x).to(torch.uint8).flatten(), minlength=256)
    p = counts[counts > 0].float() / x.numel()
    return -(p * torch.log2(p)).sum()


def share(score_a: torch.Tensor, score_b: torch.Tensor, guard: float) -> tuple[float, float]:
    """(a, b) / (a + b); `guard` each when both are 0 (the authors' code gives NaN there)."""
    total = float(score_a + score_b)
    if total == 0.0:
        return guard, guard
    return float(score_a) / total, float(score_b) / total


def ssim_valid(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (luminance, contrast, structure) over the valid region (no padding), L = 1."""
    size = min(window.shape[-1], x.shape[-2], x.shape[-1])
    if size != window.shape[-1]:  # the authors shrink the window to a smaller image
        raise ValueError(f"SSIM window {window.shape[-1]} exceeds the image {tuple(x.shape)}")
    return ssim_map(x, y, window.to(dtype=x.dtype, device=x.device), 0).mean()


def region_vectors(x: torch.Tensor, radius: int, pool: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, radius², L): max-pool (kernel = stride = `pool`, padding pool//2),
    then every radius x radius region at stride 1 as a vector, in float64."""
    if pool > 1:
        x = F.max_pool2d(x, kernel_size=pool, stride=pool, padding=pool // 2)
    n, c = x.shape[:2]
    return F.unfold(x, kernel_size=radius).view(n, c, radius * radius, -1).double()


def rmi_term(prob: torch.Tensor, target: torch.Tensor, cfg: MMIFAMINLossConfig) -> torch.Tensor:
    """Zhao et al.'s region mutual information lower-bound loss (float64), as a scalar:
    0.5·logdet(Σ_Y − Σ_YP (Σ_P + εI)⁻¹ Σ_YPᵀ + εI) / radius², summed over channels, averaged
    over the batch; the log-determinant via Cholesky (with the authors' 1e-8 inside the log)."""
    y = region_vectors(target, cfg.rmi_radius, cfg.rmi_pool)
    p = region_vectors(prob, cfg.rmi_radius, cfg.rmi_pool)
    size = cfg.rmi_radius**2
    eps = torch.eye(size, dtype=y.dtype, device=y.device) * cfg.rmi_epsilon
    y = y - y.mean(dim=3, keepdim=True)
    p = p - p.mean(dim=3, keepdim=True)
    y_cov = y @ y.transpose(-2, -1)
    p_cov = p @ p.transpose(-2, -1)
    yp_cov = y @ p.transpose(-2, -1)
    m = y_cov - yp_cov @ torch.inverse(p_cov + eps).transpose(-2, -1) @ yp_cov.transpose(-2, -1)
    diag = torch.diagonal(torch.linalg.cholesky(m + eps), dim1=-2, dim2=-1)
    log_det = 2 * torch.log(diag + 1e-8).sum(dim=-1)
    return (0.5 * log_det / size).sum(dim=1).mean(dim=0)


def rmi_loss(logits: torch.Tensor, target: torch.Tensor, cfg: MMIFAMINLossConfig) -> torch.Tensor:
    """The authors' RMI loss with the fused output taken as logits: a BCE part and the RMI term
    on its sigmoid (float64)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    rmi = rmi_term(torch.sigmoid(logits), target, cfg)
    return cfg.rmi_bce_weight * bce + (1.0 - cfg.rmi_bce_weight) * rmi


class MMIFAMINLoss(nn.Module):
    """`a_A·(1−SSIM(F,A)) + a_B·(1−SSIM(F,B)) + e_A·RMI(F,A) + e_B·RMI(F,B)`, with the weights
    a (average gradient) and e (entropy) each the sources' shares, computed per batch and
    carrying no gradient."""

    def __init__(self, config: MMIFAMINLossConfig) -> None:
        super().__init__()
        self.config = config
        window = gaussian_window(config.ssim_window, config.ssim_sigma)
        self.register_buffer("window", window, persistent=False)

    def weights(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        guard = self.config.weight_guard
        ag_a, ag_b = share(average_gradient(a), average_gradient(b), guard)
        en_a, en_b = share(entropy_bits(a), entropy_bits(b), guard)
        return {"ag_a": ag_a, "ag_b": ag_b, "en_a": en_a, "en_b": en_b}

    @in_float32  # (and float64 inside RMI): its covariance inverses cancel badly otherwise
    def forward(
        self, fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.weights(a, b)
        terms = {
            "ssim_a": w["ag_a"] * (1 - ssim_valid(fused, a, self.window)),
            "ssim_b": w["ag_b"] * (1 - ssim_valid(fused, b, self.window)),
            "rmi_a": w["en_a"] * rmi_loss(fused, a, self.config),
            "rmi_b": w["en_b"] * rmi_loss(fused, b, self.config),
        }
        total = terms["ssim_a"] + terms["ssim_b"] + terms["rmi_a"] + terms["rmi_b"]
        logged = {name: float(value.detach()) for name, value in terms.items()}
        return total.float(), {**logged, **w, "total": float(total.detach())}


# ----------------------------------------------------------------------------- network


class MMIFAMINNet(FusionNet):
    """The authors' network; `forward(a, b)` with a the functional/CT luma and b the MRI."""

    def __init__(self, config: MMIFAMINConfig, loss: MMIFAMINLoss) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        # Attribute names are the authors' (their state dict's keys).
        self.cbam = CBAM(2)
        self.Basic1x1 = OutputHead(c)
        self.Basic3x3 = ConvBNReLU(c, c, 3)
        self.Basic5x5 = ConvBNReLU(c, c, 5)
        self.Basic7x7 = ConvBNReLU(c, c, 7)
        self.Basic3x3_expand = ConvBNReLU(2, c, 3)
        self.Basic5x5_expand = ConvBNReLU(2, c, 5)
        self.Basic7x7_expand = ConvBNReLU(2, c, 7)
        self.patch_embed = UnusedPatchEmbedding(config.unused_embed_dim)
        self.basicLayer = StripTransformerLayer(c, config.depth, config.num_heads, config.mlp_ratio)
        self.up_rout = DenseBranch(config.dense_blocks, config.dense_growth)
        self.down_rout = DenseBranch(config.dense_blocks, config.dense_growth)
        self.loss = loss

    def check_width(self, width: int) -> None:
        strip = self.config.channels
        if width % strip:
            raise StripWidthError(
                f"MMIF-AMIN needs an image width that is a multiple of {strip} (its transformer "
                f"tokens are strips of {strip} adjacent pixels of one row); got width {width}"
            )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.check_width(a.shape[-1])
        functional = self.up_rout(a)
        anatomical = self.down_rout(b)
        attended = self.cbam(torch.cat([a, b], dim=1))
        # The same modules (and BatchNorms) several times per branch, in the authors' order,
        # which is also the order of the BatchNorm running-statistic updates in training.
        branch3 = self.Basic3x3(self.Basic3x3(self.Basic3x3_expand(attended)))
        branch3 = self.Basic3x3(self.basicLayer(branch3))
        branch5 = self.Basic5x5(self.basicLayer(self.Basic5x5_expand(attended)))
        branch7 = self.Basic7x7(self.Basic7x7_expand(attended))
        branch7 = self.Basic7x7(self.basicLayer(branch7))
        summed = branch7 + branch5 + branch3 + functional + anatomical
        return self.Basic1x1(summed)

    def training_loss(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(self(a, b), a, b)


def build(
    model: Mapping[str, Any] | None = None,
    loss: Mapping[str, Any] | None = None,
    optim: Mapping[str, Any] | None = None,
    pair: str | None = None,
    **_: Any,
) -> MMIFAMINNet:
    """Registry factory. `optim` (and `train`, `output`) are read elsewhere; one network per
    pair, the same for every pair."""
    del optim, pair
    config = config_from_mapping(MMIFAMINConfig, "methods.mmif-amin.model", model)
    loss_config = config_from_mapping(MMIFAMINLossConfig, "methods.mmif-amin.loss", loss)
    return MMIFAMINNet(config, MMIFAMINLoss(loss_config))


__all__ = [
    "MMIFAMINConfig",
    "MMIFAMINLoss",
    "MMIFAMINLossConfig",
    "MMIFAMINNet",
    "StripWidthError",
    "average_gradient",
    "build",
    "entropy_bits",
    "rmi_loss",
    "rmi_term",
    "ssim_valid",
]
