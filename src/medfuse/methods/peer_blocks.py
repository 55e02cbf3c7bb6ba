"""Pieces shared by the two peer networks, ASFE-Fusion and AdaFuse (same authors, same skeleton).

Both papers use one encoder/decoder skeleton (restated in ../shared/spec/peers.md):
- encoder: a 1x1 stem conv, then stages of (3x3 conv + BN) twice and GELU; every stage after the
  first first halves the resolution with anti-aliased pooling (max-pool of stride 1, then a
  blur-pool of stride 2);
- a fusion block per scale (the part where the two papers differ);
- a U-Net-like decoder: (3x3 conv + BN) twice, bilinear x2 up-sampling, GELU, skip concatenation
  of the fused features, and a final 1x1 conv to one channel with no output activation;
- the cross-attention fusion of 16x16 patches in which each source's attention map is applied to
  the other source's values (ASFE-Fusion uses it with no transformer blocks before it, AdaFuse
  with four per branch).

`PeerFusionNet` wraps a network in the project's `FusionNet` contract: per-image min-max input
normalisation, reflect padding to a size the network accepts, and a per-image min-max stretch of
the output, as the authors' test code does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.errors import ConfigError
from medfuse.methods.blocks import pad_to_multiple
from medfuse.methods.net import FusionNet

_EPS = 1e-8


@dataclass
class BackboneConfig:
    """Settings both peers share (`methods.<name>.model`; params.yaml holds the papers' values)."""

    stem_channels: int
    widths: Sequence[int]
    patch_size: int
    embed_dim: int
    num_heads: int
    head_channels: int  # channels of the last decoder stage, before the 1x1 output conv
    normalize_inputs: bool  # per-image min-max of each source before the network
    stretch_output: bool  # per-image min-max of the output (else clamp to [0, 1])

    def __post_init__(self) -> None:
        self.widths = [int(w) for w in self.widths]
        if not self.widths or min(self.widths) < 1:
            raise ConfigError(f"widths: expected a non-empty list of positive ints: {self.widths}")
        for name in ("stem_channels", "patch_size", "embed_dim", "num_heads", "head_channels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim ({self.embed_dim}) is not divisible by num_heads ({self.num_heads})"
            )

    @property
    def size_multiple(self) -> int:
        """Inputs must be a multiple of this: total encoder stride times the patch size."""
        return 2 ** (len(self.widths) - 1) * self.patch_size


# ----------------------------------------------------------------------------- image helpers


def minmax_per_image(x: torch.Tensor) -> torch.Tensor:
    """Stretch each sample of an (N, C, H, W) batch to [0, 1]; a flat sample becomes 0."""
    flat = x.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return (x - low) / (high - low).clamp_min(_EPS)


# ----------------------------------------------------------------------------- encoder/decoder


class BlurPool2d(nn.Module):
    """Depthwise [1, 3, 3, 1] binomial blur with stride 2 (Zhang 2019, anti-aliased CNNs).

    Hand-written (a few lines) rather than adding the `antialiased-cnns` package as a dependency;
    same filter and the same asymmetric reflect padding (1 before, 2 after).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = torch.outer(taps, taps)
        kernel = kernel / kernel.sum()
        self.register_buffer("kernel", kernel.expand(channels, 1, 4, 4).clone(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 2, 1, 2), mode="reflect")
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=self.channels)


class AntiAliasedDownsample(nn.Sequential):
    """Max-pool with stride 1, then blur-pool with stride 2, then GELU (halves H and W)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.MaxPool2d(kernel_size=2, stride=1), BlurPool2d(channels), nn.GELU())


class DoubleConvBN(nn.Sequential):
    """3x3 conv + BN, twice (the papers put no activation between the two)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
        )


class EncoderStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.down = AntiAliasedDownsample(in_channels) if downsample else nn.Identity()
        self.convs = DoubleConvBN(in_channels, max(in_channels // 2, 1), out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(self.down(x)))


class PyramidEncoder(nn.Module):
    """1x1 stem conv 1 -> stem_channels, then one stage per width; returns every scale."""

    def __init__(self, stem_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, stem_channels, 1)
        ins = [stem_channels, *widths[:-1]]
        self.stages = nn.ModuleList(
            EncoderStage(c_in, c_out, downsample=i > 0)
            for i, (c_in, c_out) in enumerate(zip(ins, widths, strict=True))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        scales = []
        for stage in self.stages:
            x = stage(x)
            scales.append(x)
        return scales


class DecoderStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, upsample: bool) -> None:
        super().__init__()
        self.convs = DoubleConvBN(in_channels, max(out_channels // 2, 1), out_channels)
        self.upsample = upsample
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.act(x)


class UNetDecoder(nn.Module):
    """Deepest fused map first; each stage's output is concatenated with the next finer map.

    Stage outputs are the encoder widths one scale up (the authors' 208, 160, 112) and
    `head_channels` at full resolution, followed by a 1x1 conv to one channel.
    """

    def __init__(
        self, fused_channels: Sequence[int], widths: Sequence[int], head_channels: int
    ) -> None:
        super().__init__()
        depth = len(widths)
        outs = [*reversed(widths[:-1]), head_channels]  # deepest stage first
        stages = []
        previous = 0
        for step, level in enumerate(reversed(range(depth))):
            stages.append(
                DecoderStage(previous + fused_channels[level], outs[step], upsample=level > 0)
            )
            previous = outs[step]
        self.stages = nn.ModuleList(stages)
        self.out = nn.Conv2d(head_channels, 1, 1)

    def forward(self, fused: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.stages[0](fused[-1])
        for stage, skip in zip(self.stages[1:], reversed(fused[:-1]), strict=True):
            x = stage(torch.cat([x, skip], dim=1))
        return self.out(x)


# ----------------------------------------------------------------------------- cross-attention


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a (N, C, H, W) map -> (N, T, D) tokens."""

    def __init__(self, channels: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchUnembed(nn.Module):
    """(N, T, D) tokens -> (N, C, H, W): a linear map to p*p*C values per token, then folded."""

    def __init__(self, channels: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, patch_size * patch_size * channels)
        self.channels = channels
        self.patch_size = patch_size

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        n, p, c = tokens.shape[0], self.patch_size, self.channels
        gh, gw = height // p, width // p
        x = self.proj(tokens).view(n, gh, gw, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, gh * p, gw * p)


class TokenBranch(nn.Module):
    """One source's token path: patch embedding, optional transformer blocks, LayerNorm + QKV."""

    def __init__(
        self,
        channels: int,
        patch_size: int,
        embed_dim: int,
        num_heads: int,
        depth: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.embed = PatchEmbed(channels, patch_size, embed_dim)
        self.blocks = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(
                    embed_dim,
                    num_heads,
                    dim_feedforward=int(embed_dim * mlp_ratio),
                    dropout=0.0,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.blocks(self.embed(x))
        n, t, d = tokens.shape
        qkv = self.qkv(self.norm(tokens)).view(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, T, head_dim)
        return q, k, v


class SwappedCrossAttentionFusion(nn.Module):
    """Each source's attention map softmax(QK^T / sqrt(d)) weights the *other* source's values.

    The two results (each with its own output projection) are averaged, folded back to a map,
    and added to the residual sum of the two inputs.
    """

    def __init__(
        self,
        channels: int,
        patch_size: int,
        embed_dim: int,
        num_heads: int,
        depth: int = 0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        args = (channels, patch_size, embed_dim, num_heads, depth, mlp_ratio)
        self.branch_a = TokenBranch(*args)
        self.branch_b = TokenBranch(*args)
        self.proj_a = nn.Linear(embed_dim, embed_dim)
        self.proj_b = nn.Linear(embed_dim, embed_dim)
        self.unembed = PatchUnembed(channels, patch_size, embed_dim)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:
        n, h, t, d = x.shape
        return x.transpose(1, 2).reshape(n, t, h * d)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        qa, ka, va = self.branch_a(x)
        qb, kb, vb = self.branch_b(y)
        a_on_b = self.proj_a(self._merge_heads(F.scaled_dot_product_attention(qa, ka, vb)))
        b_on_a = self.proj_b(self._merge_heads(F.scaled_dot_product_attention(qb, kb, va)))
        fused = self.unembed((a_on_b + b_on_a) / 2.0, x.shape[-2], x.shape[-1])
        return x + y + fused


# ----------------------------------------------------------------------------- the contract


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


class PeerFusionNet(FusionNet):
    """Shared `FusionNet` wrapper: subclasses implement `fuse_raw` on prepared inputs."""

    def __init__(self, config: BackboneConfig, loss: LossFn) -> None:
        super().__init__()
        self.config = config
        self.loss = loss

    def fuse_raw(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The network's unbounded output for inputs whose size is a multiple of the stride."""
        raise NotImplementedError

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return minmax_per_image(x) if self.config.normalize_inputs else x

    def raw_output(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Normalised inputs -> network output at the input size (padding added and removed)."""
        h, w = a.shape[-2:]
        multiple = self.config.size_multiple
        out = self.fuse_raw(pad_to_multiple(a, multiple)[0], pad_to_multiple(b, multiple)[0])
        return out[..., :h, :w]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # The stretch in float32: under bfloat16 autocast the raw output has 8 significant bits.
        out = self.raw_output(self._prepare(a), self._prepare(b)).float()
        return minmax_per_image(out) if self.config.stretch_output else out.clamp(0.0, 1.0)

    def training_loss(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # The loss sees the raw output, as in the authors' training code; the stretch is for use.
        a, b = self._prepare(a), self._prepare(b)
        return self.loss(self.raw_output(a, b), a, b)
