"""ASFE-Fusion (Gu et al., Biomed. Signal Process. Control 96, 2024, 106478), re-implemented.

Written from the description in ../shared/spec/peers.md; decisions where it leaves a point open
are listed in docs/methods.md. Per scale, the two sources' encoder features are fused by
- `AdaptiveFrequencyFusion` (per source: real FFT, 1x1 conv + BN + ReLU over the stacked real and
  imaginary parts, a CBAM-style spatial mask applied in the frequency domain, inverse FFT; the
  two results summed),
- `SwappedCrossAttentionFusion` (peer_blocks: 16x16 patches, each source's attention map applied
  to the other's values),
- `SoftExpertMixture` (a soft mixture of feed-forward experts, Puigcerver et al. 2023, over the
  concatenated spatial and frequency results).

`FusionLoss` is the paper's loss; AdaFuse is trained with it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.config import config_from_mapping
from medfuse.methods.blocks import gaussian_window, in_float32, ssim_map
from medfuse.methods.peer_blocks import (
    BackboneConfig,
    PeerFusionNet,
    PyramidEncoder,
    SwappedCrossAttentionFusion,
    UNetDecoder,
)

# ----------------------------------------------------------------------------- configuration


@dataclass
class ASFEConfig(BackboneConfig):
    """`methods.asfe-fusion.model` (params.yaml holds the paper's values)."""

    num_experts: int
    expert_slots: int  # slots per expert (the authors' 1024 slots shared by 4 experts)
    expert_mult: int  # hidden width of each expert = expert_mult * 2C
    mask_kernel: int  # kernel of the spatial-attention mask in the frequency domain


@dataclass
class LossConfig:
    """`methods.<name>.loss`: weights and SSIM settings of the ASFE-Fusion loss."""

    intensity: float
    structure: float
    ssim: float
    ssim_window: int
    ssim_sigma: float
    # True reproduces the released code, whose SSIM term carries no gradient.
    ssim_detached: bool


# ----------------------------------------------------------------------------- loss


def ssim(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of two (N, 1, H, W) batches for data range 1 (zero-padded Gaussian window)."""
    window = window.to(dtype=x.dtype, device=x.device)
    return ssim_map(x, y, window, window.shape[-1] // 2).mean()


def structure_tensor(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 4, H, W): [dx², dx·dy, dy·dx, dy²] from forward differences, summed
    over channels (so for the stacked sources it is the sum of their structure tensors)."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    dxdy = (dx * dy).sum(dim=1)
    return torch.stack([(dx * dx).sum(dim=1), dxdy, dxdy, (dy * dy).sum(dim=1)], dim=1)


class FusionLoss(nn.Module):
    """0.5·‖F − (A+B)/2‖₂ + 0.5·log(1 + ‖ST(F) − ST(A,B)‖_F) + (2 − SSIM(F,A) − SSIM(F,B)).

    Norms are taken over the whole batch, as in the authors' code.
    """

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer(
            "window", gaussian_window(config.ssim_window, config.ssim_sigma), persistent=False
        )

    def _ssim_term(self, fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        term = 2.0 - ssim(fused, a, self.window) - ssim(fused, b, self.window)
        return term.detach() if self.config.ssim_detached else term

    @in_float32
    def forward(
        self, fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        intensity = torch.linalg.vector_norm(fused - (a + b) / 2.0)
        st_gap = torch.linalg.vector_norm(
            structure_tensor(fused) - structure_tensor(torch.cat([a, b], dim=1))
        )
        structure = torch.log1p(st_gap)
        ssim_term = self._ssim_term(fused, a, b)
        total = cfg.intensity * intensity + cfg.structure * structure + cfg.ssim * ssim_term
        terms = {
            "intensity": float(intensity.detach()),
            "structure": float(structure.detach()),
            "ssim": float(ssim_term.detach()),
            "total": float(total.detach()),
        }
        return total, terms


# ----------------------------------------------------------------------------- fusion block


class SpectralBranch(nn.Module):
    """One source's adaptive frequency path (rFFT -> conv/BN/ReLU -> spatial mask -> irFFT)."""

    def __init__(self, channels: int, mask_kernel: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(
            nn.Conv2d(2 * channels, 2 * channels, 1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
        )
        self.mask = nn.Conv2d(2, 1, mask_kernel, padding=mask_kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # FFTs in float32: half-precision FFTs are restricted to power-of-two sizes on CUDA.
        spectrum = torch.fft.rfft2(x.float())
        parts = torch.stack([spectrum.real, spectrum.imag], dim=2).flatten(1, 2)  # (N, 2C, H, W')
        parts = self.mix(parts)
        pooled = torch.cat(
            [parts.mean(dim=1, keepdim=True), parts.amax(dim=1, keepdim=True)], dim=1
        )
        parts = parts * torch.sigmoid(self.mask(pooled))
        parts = parts.float().view(n, c, 2, h, -1)
        return torch.fft.irfft2(torch.complex(parts[:, :, 0], parts[:, :, 1]), s=(h, w)).to(x.dtype)


class AdaptiveFrequencyFusion(nn.Module):
    """Sum of the two sources' adaptive frequency paths (one path per source)."""

    def __init__(self, channels: int, mask_kernel: int) -> None:
        super().__init__()
        self.branch_a = SpectralBranch(channels, mask_kernel)
        self.branch_b = SpectralBranch(channels, mask_kernel)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.branch_a(x) + self.branch_b(y)


class SoftExpertMixture(nn.Module):
    """Soft mixture of feed-forward experts over pixels (Puigcerver et al., "From Sparse to Soft
    Mixtures of Experts"), with RMSNorm on tokens and slot embeddings.

    Every slot is a softmax-weighted average of all pixels (dispatch, softmax over pixels); each
    expert processes its slots; every pixel's output is a softmax-weighted average of all slot
    outputs (combine, softmax over slots).
    """

    def __init__(self, dim: int, num_experts: int, slots: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.slot_norm = nn.RMSNorm(dim)
        self.slot_embeds = nn.Parameter(torch.randn(num_experts, slots, dim))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))
            for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, h, w = x.shape
        # RMSNorm in float32 (its weight's dtype): under bfloat16 autocast a bfloat16 input
        # misses the fused kernel; the einsums below take bfloat16 again.
        tokens = self.norm(x.flatten(2).transpose(1, 2).float())  # (N, HW, D)
        logits = torch.einsum("bnd,esd->bnes", tokens, self.slot_norm(self.slot_embeds))
        dispatch = logits.softmax(dim=1)
        combine = logits.flatten(2).softmax(dim=-1).view_as(logits)
        slots = torch.einsum("bnd,bnes->besd", tokens, dispatch)
        outs = torch.stack([expert(slots[:, i]) for i, expert in enumerate(self.experts)], dim=1)
        mixed = torch.einsum("besd,bnes->bnd", outs, combine)
        return mixed.transpose(1, 2).reshape(n, d, h, w)


class ASFEFusionBlock(nn.Module):
    """Frequency + cross-attention spatial fusion, mixed by soft experts into 2C channels."""

    def __init__(self, channels: int, cfg: ASFEConfig) -> None:
        super().__init__()
        self.frequency = AdaptiveFrequencyFusion(channels, cfg.mask_kernel)
        self.spatial = SwappedCrossAttentionFusion(
            channels, cfg.patch_size, cfg.embed_dim, cfg.num_heads, depth=0
        )
        self.experts = SoftExpertMixture(
            2 * channels, cfg.num_experts, cfg.expert_slots, cfg.expert_mult
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.experts(torch.cat([self.spatial(x, y), self.frequency(x, y)], dim=1))


# ----------------------------------------------------------------------------- network


class ASFEFusionNet(PeerFusionNet):
    """One encoder shared by both sources, an ASFE fusion block per scale, a U-Net decoder."""

    def __init__(self, config: ASFEConfig, loss: FusionLoss) -> None:
        super().__init__(config, loss)
        self.encoder = PyramidEncoder(config.stem_channels, config.widths)
        self.fusion = nn.ModuleList(ASFEFusionBlock(c, config) for c in config.widths)
        self.decoder = UNetDecoder(
            [2 * c for c in config.widths], config.widths, config.head_channels
        )

    def fuse_raw(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fused = [
            block(fa, fb)
            for block, fa, fb in zip(self.fusion, self.encoder(a), self.encoder(b), strict=True)
        ]
        return self.decoder(fused)


def build(
    model: Mapping[str, Any] | None = None,
    loss: Mapping[str, Any] | None = None,
    optim: Mapping[str, Any] | None = None,
    pair: str | None = None,
) -> ASFEFusionNet:
    """Registry factory. `optim` is read by the training loop; `pair` does not change ASFE."""
    del optim, pair
    config = config_from_mapping(ASFEConfig, "methods.asfe-fusion.model", model)
    loss_config = config_from_mapping(LossConfig, "methods.asfe-fusion.loss", loss)
    return ASFEFusionNet(config, FusionLoss(loss_config))


__all__ = [
    "ASFEConfig",
    "ASFEFusionNet",
    "FusionLoss",
    "LossConfig",
    "build",
    "ssim",
    "structure_tensor",
]
