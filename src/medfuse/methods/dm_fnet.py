"""DM-FNet (He et al., IEEE Trans. Multimedia 2025), re-implemented in its two stages.

Written from ../shared/spec/seed-methods.md (a restatement of the authors' code); the choices
it leaves open are listed in docs/methods.md.

- Stage 1, `DiffusionUNet`: an SR3-style U-Net conditioned on the continuous noise level
  γ = sqrt(ᾱ), trained to predict the clean image x0 from x_t = γ·x0 + sqrt(1 − γ²)·ε
  (cosine schedule, one t per batch, γ uniform between the levels of t and t − 1).
- Stage 2, `DMFNet`: the U-Net frozen; each source noised at t = 5, 10, 20 and passed through
  it; the first decoder block's output of every level feeds `FusionHead`, which fuses the two
  sources level by level with three-way attention (`TripleAttention`) and decodes the result.

Images enter both stages in [-1, 1], as the authors' loaders map them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.config import config_from_mapping
from medfuse.errors import ConfigError
from medfuse.methods.blocks import (
    SSIM_C2,
    gaussian_window,
    in_float32,
    local_moments,
    sobel_magnitude,
)
from medfuse.methods.net import FusionNet

# ----------------------------------------------------------------------------- configuration


@dataclass
class UNetConfig:
    """`methods.dm-fnet.stage1.model` (params.yaml holds the paper's values)."""

    base_channels: int
    channel_mults: Sequence[int]
    res_blocks: int
    norm_groups: int
    dropout: float

    def __post_init__(self) -> None:
        self.channel_mults = [int(m) for m in self.channel_mults]
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ConfigError(f"channel_mults: expected positive ints, got {self.channel_mults}")
        if min(self.base_channels, self.res_blocks, self.norm_groups) < 1:
            raise ConfigError("base_channels, res_blocks and norm_groups must be >= 1")
        odd = [w for w in self.widths if w % self.norm_groups]
        if odd:
            raise ConfigError(f"widths {odd} are not divisible by norm_groups {self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def widths(self) -> list[int]:
        """Channels of each level, finest first."""
        return [self.base_channels * m for m in self.channel_mults]

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


@dataclass
class DiffusionConfig:
    """`methods.dm-fnet.stage1.diffusion`: the stage-1 noise schedule (the paper's: cosine)."""

    timesteps: int
    schedule: str  # cosine | linear
    cosine_s: float
    linear_start: float
    linear_end: float

    def __post_init__(self) -> None:
        check_schedule(self.schedule, self.timesteps, self.linear_start, self.linear_end)


@dataclass
class HeadConfig:
    """`methods.dm-fnet.model`: the fusion head and how it reads the frozen U-Net."""

    timesteps: Sequence[int]
    # "linear": the authors' stage-2 config (betas 1e-6 -> 1e-2 over the stage-1 T steps);
    # "stage1": the schedule the U-Net was trained with.
    feature_schedule: str
    linear_start: float
    linear_end: float
    reduction: int  # channel reduction of the attention's channel branch
    noise_seed: int  # seeds every image's feature noise at inference (see DMFNet.forward)

    def __post_init__(self) -> None:
        self.timesteps = [int(t) for t in self.timesteps]
        if not self.timesteps or min(self.timesteps) < 1:
            raise ConfigError(f"timesteps: expected ints >= 1, got {self.timesteps}")
        if self.feature_schedule not in ("linear", "stage1"):
            raise ConfigError(f"feature_schedule must be linear or stage1: {self.feature_schedule}")
        if self.reduction < 1:
            raise ConfigError(f"reduction must be >= 1, got {self.reduction}")


@dataclass
class HeadLossConfig:
    """`methods.dm-fnet.loss`: weights of the three terms and the SSIM window (the paper's)."""

    intensity: float
    gradient: float
    ssim: float
    ssim_window: int
    ssim_sigma: float


# ----------------------------------------------------------------------------- schedules


def check_schedule(kind: str, timesteps: int, linear_start: float, linear_end: float) -> None:
    if kind not in ("cosine", "linear"):
        raise ConfigError(f"schedule must be cosine or linear, got {kind!r}")
    if timesteps < 1:
        raise ConfigError(f"timesteps must be >= 1, got {timesteps}")
    if not 0.0 < linear_start <= linear_end < 1.0:
        raise ConfigError(f"need 0 < linear_start <= linear_end < 1: {linear_start}, {linear_end}")


def cosine_betas(timesteps: int, s: float = 8e-3) -> torch.Tensor:
    """Nichol and Dhariwal's cosine schedule: ᾱ(t) ∝ cos²((t/T + s)/(1 + s)·π/2), β ≤ 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s
    alpha_bar = torch.cos(steps / (1 + s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def linear_betas(timesteps: int, start: float, end: float) -> torch.Tensor:
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


def noise_levels(betas: torch.Tensor) -> torch.Tensor:
    """γ_t = sqrt(ᾱ_t) for t = 0..T (γ_0 = 1: no noise), decreasing."""
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return torch.cat([torch.ones(1, dtype=betas.dtype), alpha_bar]).sqrt()


class NoiseSchedule:
    """The levels γ_0..γ_T, kept on the CPU in float64 whatever the network's device: they
    follow from the config (so they are not weights), and γ is drawn on the CPU."""

    def __init__(self, betas: torch.Tensor) -> None:
        self.levels = noise_levels(betas.detach().to("cpu", torch.float64))

    @classmethod
    def make(
        cls, kind: str, timesteps: int, cosine_s: float, linear_start: float, linear_end: float
    ) -> NoiseSchedule:
        if kind == "cosine":
            return cls(cosine_betas(timesteps, cosine_s))
        return cls(linear_betas(timesteps, linear_start, linear_end))

    @property
    def timesteps(self) -> int:
        return self.levels.numel() - 1

    def sample_gamma(
        self, t: int, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n levels drawn uniformly in [γ_t, γ_{t−1}] (SR3's continuous noise level), float64."""
        if not 1 <= t <= self.timesteps:
            raise ValueError(f"timestep {t} outside 1..{self.timesteps}")
        low, high = self.levels[t], self.levels[t - 1]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return low + (high - low) * u


def add_noise(x0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = γ·x0 + sqrt(1 − γ²)·ε, one γ per image."""
    g = gamma.to(device=x0.device, dtype=x0.dtype).view(-1, 1, 1, 1)
    return g * x0 + (1 - g * g).clamp_min(0).sqrt() * noise


def check_size(x: torch.Tensor, multiple: int, what: str) -> None:
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{what}: image size {h}x{w} is not a multiple of {multiple} "
            f"(2^(levels-1) for the U-Net's {int(math.log2(multiple)) + 1} levels)"
        )


# ----------------------------------------------------------------------------- U-Net


class NoiseLevelEncoding(nn.Module):
    """Sinusoidal encoding of γ itself (WaveGrad's, no ×1000): sin and cos of γ·10000^(−k/half)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        angles = gamma.view(-1, 1).float() * self.freqs.view(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class NormActConv(nn.Sequential):
    """GroupNorm, Swish, (dropout), 3x3 conv: SR3's pre-activation unit."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.GroupNorm(groups, c_in),
            nn.SiLU(),
            nn.Dropout(dropout) if dropout else nn.Identity(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
        )


class ResBlock(nn.Module):
    """Two pre-activation units; the noise-level embedding is added after the first."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.unit1 = NormActConv(c_in, c_out, groups)
        self.emb = nn.Linear(emb_dim, c_out)
        self.unit2 = NormActConv(c_out, c_out, groups, dropout)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.unit1(x) + self.emb(emb)[:, :, None, None]
        return self.unit2(h) + self.shortcut(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over all pixels (scale 1/sqrt(C)), residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n, c, h, w)
        return x + self.out(y)


class Upsample(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1)
        )


class SR3UNet(nn.Module):
    """SR3's U-Net for one grey channel, predicting x0 from (x_t, γ).

    Every encoder output is a skip (the stem, each block, each stride-2 conv); each decoder level
    has res_blocks + 1 blocks on concat(x, skip). Attention only in the middle: the authors'
    configured attention resolution (16) matches no level of their 160-pixel crops.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        c, groups, drop = cfg.base_channels, cfg.norm_groups, cfg.dropout
        self.embed = nn.Sequential(
            NoiseLevelEncoding(c), nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, c)
        )
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        widths = cfg.widths
        skips, width = [c], c
        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        for level, out in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(width, out, c, groups, drop))
                width = out
                skips.append(width)
            self.down_blocks.append(blocks)
            if level < len(widths) - 1:
                self.downsamples.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skips.append(width)
        self.mid1 = ResBlock(width, width, c, groups, drop)
        self.mid_attn = SelfAttention(width, groups)
        self.mid2 = ResBlock(width, width, c, groups, drop)
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for level, out in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(cfg.res_blocks + 1):
                blocks.append(ResBlock(width + skips.pop(), out, c, groups, drop))
                width = out
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamples.append(Upsample(width))
        self.out = NormActConv(width, 1, groups)

    def forward(
        self, x: torch.Tensor, gamma: torch.Tensor, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """x0 estimate; with `features`, also the first decoder block's output of every level
        (coarsest first), the maps DM-FNet's head reads."""
        emb = self.embed(gamma.to(x.device))
        h = self.stem(x)
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        taken = []
        for level, blocks in enumerate(self.up_blocks):
            for i, block in enumerate(blocks):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
                if i == 0:
                    taken.append(h)
            if level < len(self.upsamples):
                h = self.upsamples[level](h)
        out = self.out(h)
        return (out, taken) if features else out


def orthogonal_init(module: nn.Module) -> None:
    """The authors' initialisation: orthogonal conv and linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range both stages work in."""
    return x * 2.0 - 1.0


class DiffusionUNet(FusionNet):
    """Stage 1: the U-Net and its training objective. It never fuses."""

    def __init__(self, config: UNetConfig, diffusion: DiffusionConfig) -> None:
        super().__init__()
        self.config, self.diffusion = config, diffusion
        self.net = SR3UNet(config)
        orthogonal_init(self.net)
        d = diffusion
        self.schedule = NoiseSchedule.make(
            d.schedule, d.timesteps, d.cosine_s, d.linear_start, d.linear_end
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the DM-FNet U-Net (stage 1) does not fuse; use dm-fnet")

    def training_loss(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE of the x0 estimate; both images of every pair form one batch, one t per batch.
        t, γ and ε come from torch's global generators, which the training loop checkpoints."""
        x0 = to_signed(torch.cat([a, b], dim=0))
        check_size(x0, self.config.size_multiple, "dm-fnet:stage1")
        t = int(torch.randint(1, self.schedule.timesteps + 1, (1,)))
        gamma = self.schedule.sample_gamma(t, x0.shape[0])
        x_t = add_noise(x0, gamma, torch.randn_like(x0))
        estimate = self.net(x_t, gamma)
        loss = F.mse_loss(estimate.float(), x0.float())
        return loss, {"mse": float(loss.detach())}


# ----------------------------------------------------------------------------- fusion head


def conv_relu_pair(c_in: int, c_out: int) -> nn.Sequential:
    """1x1 conv, ReLU, 3x3 conv, ReLU: the head's recurring reduction unit."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU()
    )


class TripleAttention(nn.Module):
    """Channel, spatial and pixel attention (DEA-Net's, as DM-FNet uses it): returns x·p2.

    p1 = channel branch (GAP, 1x1 C→C/r, ReLU, 1x1 →C) + spatial branch (7x7 conv on the channel
    mean and max), neither squashed; p2 = sigmoid of a grouped 3x3 conv over (x_c, p1_c) pairs.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, padding_mode="reflect")
        self.pixel = nn.Conv2d(
            2 * channels, channels, 3, padding=1, padding_mode="reflect", groups=channels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        p1 = self.channel(x) + self.spatial(pooled)
        pairs = torch.stack([x, p1], dim=2).flatten(1, 2)  # x_0, p1_0, x_1, p1_1, ...
        return x * torch.sigmoid(self.pixel(pairs))


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class FusionHead(nn.Module):
    """Fuses two sources' multi-timestep U-Net features, coarsest level first.

    Per level: the timesteps' maps are reduced (shared by both sources); x = MRI, y = other,
    w = TripleAttention(x + y), fused = w·x + (1 − w)·y + x + y; then a 1x1/3x3 unit to the next
    level's width, after adding the previous level's upsampled result and (from the third level
    on) the one before it, passed through a bridge unit and upsampled. The authors' output
    convs (128 → 64 → 1, tanh) are the finest width → half of it → 1.
    """

    def __init__(self, widths: Sequence[int], n_timesteps: int, reduction: int) -> None:
        super().__init__()
        widths = list(widths)  # coarsest first
        nexts = [*widths[1:], widths[-1]]
        self.reduce = nn.ModuleList(conv_relu_pair(n_timesteps * w, w) for w in widths)
        self.attend = nn.ModuleList(TripleAttention(w, reduction) for w in widths)
        self.bridge = nn.ModuleList(
            conv_relu_pair(widths[i - 1], widths[i]) if i >= 2 else nn.Identity()
            for i in range(len(widths))
        )
        self.mix = nn.ModuleList(conv_relu_pair(w, n) for w, n in zip(widths, nexts, strict=True))
        last = widths[-1]
        self.out = nn.Sequential(
            nn.Conv2d(last, last // 2 or 1, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(last // 2 or 1, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, mri: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> torch.Tensor:
        carried: list[torch.Tensor] = []  # each level's result, upsampled to the next level
        fused = torch.empty(0)
        for i, (fm, fo) in enumerate(zip(mri, other, strict=True)):
            x, y = self.reduce[i](fm), self.reduce[i](fo)
            w = self.attend[i](x + y)
            fused = w * x + (1 - w) * y + x + y
            if i >= 1:
                fused = fused + carried[i - 1]
            if i >= 2:
                fused = fused + upsample2(self.bridge[i](carried[i - 2]))
            fused = self.mix[i](fused)
            if i < len(mri) - 1:
                carried.append(upsample2(fused))
        return self.out(fused)


# ----------------------------------------------------------------------------- head loss


def ssim_cs_map(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """SSIM's contrast-structure part (2σ_xy + C2)/(σ_x² + σ_y² + C2), C2 = 0.03²."""
    _, _, var_x, var_y, cov = local_moments(x, y, window, window.shape[-1] // 2)
    return (2 * cov + SSIM_C2) / (var_x + var_y + SSIM_C2)


class HeadLoss(nn.Module):
    """1.5·L1(F, max(A, B)) + L1(S(F), max(S(A), S(B))) + 0.5·(1 − mean SSIM_cs), SSIM_cs taken
    per pixel against the source of larger local variance (ties: MRI). Inputs in [-1, 1]."""

    def __init__(self, config: HeadLossConfig) -> None:
        super().__init__()
        self.config = config
        window = gaussian_window(config.ssim_window, config.ssim_sigma)
        self.register_buffer("window", window, persistent=False)

    @in_float32
    def forward(
        self, fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, window = self.config, self.window.to(fused)
        intensity = F.l1_loss(fused, torch.maximum(a, b))
        gradient = F.l1_loss(
            sobel_magnitude(fused), torch.maximum(sobel_magnitude(a), sobel_magnitude(b))
        )
        # Variances rather than the authors' standard deviations: the same order, and no NaN
        # from the square root of a slightly negative variance.
        pad = window.shape[-1] // 2
        var_a = local_moments(a, a, window, pad)[2]
        var_b = local_moments(b, b, window, pad)[2]
        cs = torch.where(
            var_b >= var_a, ssim_cs_map(fused, b, window), ssim_cs_map(fused, a, window)
        )
        ssim_term = 1 - cs.mean()
        total = cfg.intensity * intensity + cfg.gradient * gradient + cfg.ssim * ssim_term
        terms = {
            "intensity": float(intensity.detach()),
            "gradient": float(gradient.detach()),
            "ssim": float(ssim_term.detach()),
            "total": float(total.detach()),
        }
        return total, terms


# ----------------------------------------------------------------------------- stage 2


class DMFNet(FusionNet):
    """Stage 2: the frozen U-Net's features of both sources, fused by `FusionHead`.

    `unet` is a `DiffusionUNet` whose weights `load_stage1` sets; it is in this module's
    state_dict (a trained model.pt is self-contained) but never trained: no gradient, and in
    eval mode whatever `train()` is called with (no dropout, as the authors extract features).
    """

    def __init__(
        self,
        unet_config: UNetConfig,
        diffusion: DiffusionConfig,
        config: HeadConfig,
        loss: HeadLossConfig,
    ) -> None:
        super().__init__()
        self.config = config
        self.unet = DiffusionUNet(unet_config, diffusion)
        self.unet.requires_grad_(False)
        if max(config.timesteps) > diffusion.timesteps:
            raise ConfigError(
                f"methods.dm-fnet.model.timesteps {config.timesteps} exceed the U-Net's "
                f"{diffusion.timesteps} diffusion steps"
            )
        d, linear = diffusion, config.feature_schedule == "linear"
        self.feature_schedule = NoiseSchedule.make(
            "linear" if linear else d.schedule,
            d.timesteps,
            d.cosine_s,
            config.linear_start if linear else d.linear_start,
            config.linear_end if linear else d.linear_end,
        )
        widths = list(reversed(unet_config.widths))
        self.head = FusionHead(widths, len(config.timesteps), config.reduction)
        orthogonal_init(self.head)
        self.loss = HeadLoss(loss)
        # The head's reflect-padded 7x7 conv needs at least 4 pixels at the coarsest level.
        self.min_size = 4 * unet_config.size_multiple
        self.train()

    def train(self, mode: bool = True) -> DMFNet:
        super().train(mode)
        self.unet.eval()
        return self

    def load_stage1(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a trained `DiffusionUNet`'s state_dict (strictly) into the frozen U-Net."""
        self.unet.load_state_dict(state, strict=True)

    def _check(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            raise ValueError(f"dm-fnet: sources differ in shape: {a.shape} vs {b.shape}")
        check_size(a, self.unet.config.size_multiple, "dm-fnet")
        if min(a.shape[-2:]) < self.min_size:
            raise ValueError(f"dm-fnet: images must be at least {self.min_size} pixels a side")

    def _noise(self, x: torch.Tensor, seeded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """γ (n_t·2N,) and ε for the stacked sources x (2N images), ordered timestep-major.

        Seeded: each image gets a generator of its own seeded with `noise_seed`, so an image's
        noise, and hence its fusion, depends neither on the batch nor on the global RNG."""
        ts, n = self.config.timesteps, x.shape[0]
        if not seeded:
            gamma = torch.cat([self.feature_schedule.sample_gamma(t, n) for t in ts])
            return gamma, torch.randn((len(ts) * n, *x.shape[1:]), device=x.device, dtype=x.dtype)
        gammas = torch.empty(len(ts), n, dtype=torch.float64)
        noise = torch.empty(len(ts), n, *x.shape[1:], dtype=torch.float32)
        half = n // 2  # x is [MRI images; other images]: image i's two sources share a stream
        for i in range(half):
            g = torch.Generator().manual_seed(self.config.noise_seed)
            for k, t in enumerate(ts):
                for j in (i, half + i):  # MRI, then the other source, as the authors draw
                    gammas[k, j] = self.feature_schedule.sample_gamma(t, 1, g)[0]
                    noise[k, j] = torch.randn(x.shape[1:], generator=g)
        return gammas.flatten(), noise.flatten(0, 1).to(device=x.device, dtype=x.dtype)

    def features(
        self, a: torch.Tensor, b: torch.Tensor, seeded: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level (coarsest first), the MRI's and the other source's maps of every timestep,
        concatenated along channels in timestep order. Inputs in [-1, 1]."""
        x = torch.cat([b, a], dim=0)
        gamma, noise = self._noise(x, seeded)
        n_t, n = len(self.config.timesteps), x.shape[0]
        x_t = add_noise(x.repeat(n_t, 1, 1, 1), gamma, noise)
        with torch.no_grad():
            _, maps = self.unet.net(x_t, gamma, features=True)
        per_level = [m.view(n_t, n, *m.shape[1:]).transpose(0, 1).flatten(1, 2) for m in maps]
        half = n // 2
        return [m[:half] for m in per_level], [m[half:] for m in per_level]

    def _fuse(self, a: torch.Tensor, b: torch.Tensor, seeded: bool) -> torch.Tensor:
        self._check(a, b)
        mri, other = self.features(a, b, seeded)
        return self.head(mri, other)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fused = self._fuse(to_signed(a), to_signed(b), seeded=True)
        return ((fused.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def training_loss(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        a, b = to_signed(a), to_signed(b)
        return self.loss(self._fuse(a, b, seeded=False), a, b)


# ----------------------------------------------------------------------------- factories


def stage1_configs(
    model: Mapping[str, Any] | None, diffusion: Mapping[str, Any] | None
) -> tuple[UNetConfig, DiffusionConfig]:
    return (
        config_from_mapping(UNetConfig, "methods.dm-fnet.stage1.model", model),
        config_from_mapping(DiffusionConfig, "methods.dm-fnet.stage1.diffusion", diffusion),
    )


def build_unet(
    model: Mapping[str, Any] | None = None,
    diffusion: Mapping[str, Any] | None = None,
    **_: Any,
) -> DiffusionUNet:
    """Registry factory of stage 1 (`dm-fnet:stage1`, from `methods.dm-fnet.stage1`); other
    keys (train, optim, ...) are the training loop's."""
    return DiffusionUNet(*stage1_configs(model, diffusion))


def build(
    model: Mapping[str, Any] | None = None,
    loss: Mapping[str, Any] | None = None,
    stage1: Mapping[str, Any] | None = None,
    **_: Any,
) -> DMFNet:
    """Registry factory of stage 2 (`dm-fnet`); `stage1` (the first stage's settings: its
    `model` and `diffusion`) sizes the U-Net whose trained weights `DMFNet.load_stage1` sets.
    Other keys (train, optim, unified, ...) are the training loop's."""
    stage1 = stage1 or {}
    unet_config, diffusion = stage1_configs(stage1.get("model"), stage1.get("diffusion"))
    head = config_from_mapping(HeadConfig, "methods.dm-fnet.model", model)
    loss_config = config_from_mapping(HeadLossConfig, "methods.dm-fnet.loss", loss)
    return DMFNet(unet_config, diffusion, head, loss_config)


__all__ = [
    "DMFNet",
    "DiffusionConfig",
    "DiffusionUNet",
    "FusionHead",
    "HeadConfig",
    "HeadLoss",
    "HeadLossConfig",
    "NoiseSchedule",
    "SR3UNet",
    "TripleAttention",
    "UNetConfig",
    "build",
    "build_unet",
    "cosine_betas",
    "linear_betas",
    "noise_levels",
    "ssim_cs_map",
]
