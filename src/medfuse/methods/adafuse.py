"""AdaFuse (Gu et al., 2023; the conference forerunner of ASFE-Fusion), re-implemented.

Written from the description in ../shared/spec/peers.md; decisions are listed in docs/methods.md.
The skeleton (encoder, decoder, swapped cross-attention) is shared with ASFE-Fusion
(peer_blocks). Per scale, three cross-attention fusion blocks, each with `depth` transformer
blocks per branch before the swapped-attention step:
- one on the spatial features;
- one on the log-amplitude spectra log(1 + |fftshift(FFT(x))|), whose output is brought back by
  inverse shift, inverse FFT and magnitude;
- a final one fusing the spatial and frequency results.

The public release has no training code or loss: we train AdaFuse with ASFE-Fusion's loss
(`medfuse.methods.asfe_fusion.FusionLoss`) and settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medfuse.config import config_from_mapping
from medfuse.errors import ConfigError
from medfuse.methods.asfe_fusion import FusionLoss, LossConfig
from medfuse.methods.peer_blocks import (
    BackboneConfig,
    PeerFusionNet,
    PyramidEncoder,
    SwappedCrossAttentionFusion,
    UNetDecoder,
)


@dataclass
class AdaFuseConfig(BackboneConfig):
    """`methods.adafuse.model` (params.yaml holds the paper's values)."""

    depth: int  # transformer encoder blocks per branch before the swapped attention
    mlp_ratio: float
    # One encoder for both sources (the authors' CT-MRI model) or one per source (PET/SPECT).
    # In params.yaml either a boolean or a mapping pair -> boolean, resolved by `build(pair=...)`.
    shared_encoder: bool


def log_amplitude(x: torch.Tensor) -> torch.Tensor:
    """log(1 + |fftshift(FFT2(x))|) per channel (shifted over H and W only)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    return torch.log1p(spectrum.abs()).to(x.dtype)


def back_to_space(spectrum: torch.Tensor) -> torch.Tensor:
    """Inverse shift, inverse FFT, magnitude: the fused log-amplitude map back to a feature map."""
    shifted = torch.fft.ifftshift(spectrum.float(), dim=(-2, -1))
    return torch.fft.ifft2(shifted).abs().to(spectrum.dtype)


class AdaFuseFusionBlock(nn.Module):
    """Spatial and frequency cross-attention fusion, then a third fusing both results."""

    def __init__(self, channels: int, cfg: AdaFuseConfig) -> None:
        super().__init__()
        args = (channels, cfg.patch_size, cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.mlp_ratio)
        self.spatial = SwappedCrossAttentionFusion(*args)
        self.frequency = SwappedCrossAttentionFusion(*args)
        self.final = SwappedCrossAttentionFusion(*args)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spatial = self.spatial(x, y)
        frequency = back_to_space(self.frequency(log_amplitude(x), log_amplitude(y)))
        return self.final(spatial, frequency)


class AdaFuseNet(PeerFusionNet):
    def __init__(self, config: AdaFuseConfig, loss: FusionLoss) -> None:
        super().__init__(config, loss)
        count = 1 if config.shared_encoder else 2
        self.encoders = nn.ModuleList(
            PyramidEncoder(config.stem_channels, config.widths) for _ in range(count)
        )
        self.fusion = nn.ModuleList(AdaFuseFusionBlock(c, config) for c in config.widths)
        self.decoder = UNetDecoder(config.widths, config.widths, config.head_channels)

    def fuse_raw(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        feats_a, feats_b = self.encoders[0](a), self.encoders[-1](b)
        fused = [block(fa, fb) for block, fa, fb in zip(self.fusion, feats_a, feats_b, strict=True)]
        return self.decoder(fused)


def resolve_shared_encoder(value: Any, pair: str | None) -> bool:
    """`shared_encoder` as given: a boolean, or a mapping from modality pair to boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Mapping):
        if pair is None:
            raise ConfigError(
                "methods.adafuse.model.shared_encoder is set per modality pair "
                f"({', '.join(sorted(value))}); build the model with pair=<pair>"
            )
        if pair not in value:
            raise ConfigError(
                f"methods.adafuse.model.shared_encoder has no entry for pair {pair!r}; "
                f"known: {', '.join(sorted(value))}"
            )
        return bool(value[pair])
    raise ConfigError(
        f"methods.adafuse.model.shared_encoder must be a boolean or a mapping, got {value!r}"
    )


def build(
    model: Mapping[str, Any] | None = None,
    loss: Mapping[str, Any] | None = None,
    optim: Mapping[str, Any] | None = None,
    pair: str | None = None,
) -> AdaFuseNet:
    """Registry factory. `optim` is read by the training loop; `pair` picks the encoder sharing."""
    del optim
    settings = dict(model or {})
    if "shared_encoder" in settings:
        settings["shared_encoder"] = resolve_shared_encoder(settings["shared_encoder"], pair)
    config = config_from_mapping(AdaFuseConfig, "methods.adafuse.model", settings)
    loss_config = config_from_mapping(LossConfig, "methods.adafuse.loss", loss)
    return AdaFuseNet(config, FusionLoss(loss_config))
