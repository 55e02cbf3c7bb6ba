"""W-DUALMINE: reliability-weighted dual-expert fusion (../shared/spec/w-dualmine-method.md).

The paper (W-DUALMINE, sections 3-4) builds four parts, each a module below:
a Siamese encoder of four residual + ECA stages; at every scale a `ReliabilityHead` giving
pixel-wise modality weights; two experts (`GlobalContextExpert`, `WaveletExpert`) mixed by a
`SoftGradientMixer`; and a `ResidualDecoder` whose residual map is added to the average of the
sources. The ablations of the paper's Table 4 are the three switches of `WDualmineConfig`.

Choices the paper leaves open, made here: widths 16/32/64/128, stride 2 between stages, stage 1
at full resolution; plain residual blocks without normalisation, He-initialised; `H_rel` = 1x1
reduction, ReLU, 3x3 conv, ReLU (then the paper's 1x1 + Softplus); reliability weights brought
to the LL resolution by 2x2 average pooling; a removed expert lets the other pass through the
mixer; an FPN-style top-down decoder (1x1 at the coarse scale, bilinear x2, add the fused
features, 3x3 conv) whose small output layer starts the fused image near the average; inputs
padded (reflect) to a multiple of 16 and cropped back.

For speed on CPU some steps are computed in an equivalent form (same function, same
parameters): convolutions over a channel concatenation as sums over its parts, the GCE's 1x1
merge folded into its two 3x3 filters, the two-way softmax as a sigmoid of the logit difference.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.config import config_from_mapping
from medfuse.errors import ConfigError
from medfuse.methods.blocks import (
    ECA,
    ResidualBlock,
    conv1x1,
    conv3x3,
    haar_dwt,
    haar_idwt,
    lerp,
    pad_to_multiple,
    sobel_magnitude,
)
from medfuse.methods.net import FusionNet
from medfuse.methods.wdualmine_losses import (
    LossWeights,
    ProjectionHead,
    ReconstructionHeads,
    infonce_pair,
    l_avg,
    l_cc,
    l_grad,
    l_rec,
)
from medfuse.precision import to_autocast_dtype

# Three stride-2 steps and the Haar transform at the coarsest scale need sizes divisible by 16.
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class WDualmineConfig:
    """The model's settings (params.yaml `methods.wdualmine.model`); switches are ablations."""

    widths: tuple[int, ...]
    eca_kernel: int
    residual_scale: float  # lambda in If = clip(avg + lambda * tanh(R), 0, 1)
    reliability_eps: float
    use_gce: bool
    use_we: bool
    use_sgm: bool
    proj_dim: int
    head_init_scale: float
    channels_last: bool

    def __post_init__(self) -> None:
        if not (self.use_gce or self.use_we):
            raise ConfigError("wdualmine: use_gce and use_we cannot both be false (no expert left)")
        if len(self.widths) != 4 or any(int(w) < 1 for w in self.widths):
            raise ConfigError(
                f"wdualmine: widths must be four positive integers, got {self.widths}"
            )
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))


def init_kaiming(module: nn.Module) -> None:
    """He initialisation for every conv (as ResNets do): without normalisation layers, PyTorch's
    default init shrinks the signal by about 3x per layer, leaving deep features bias-driven."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(layer.bias)


class Encoder(nn.Module):
    """Four stages of (residual block, ECA); stage 1 at full resolution, then stride 2."""

    def __init__(self, widths: tuple[int, ...], eca_kernel: int) -> None:
        super().__init__()
        stages = []
        c_in = 1
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(ResidualBlock(c_in, c_out, stride), ECA(c_out, eca_kernel)))
            c_in = c_out
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ReliabilityHead(nn.Module):
    """r_k = Softplus(Conv1x1(H_rel([f_1, f_2]))); returns w_1 = r_1 / (r_1 + r_2 + eps)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        hidden = max(channels // 2, 4)
        self.h_rel = nn.Sequential(
            conv1x1(2 * channels, hidden),
            nn.ReLU(inplace=True),
            conv3x3(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.to_scores = conv1x1(hidden, 2)
        self.eps = eps

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        # The first 1x1 conv of H_rel over [f1, f2], as the sum of its halves over f1 and f2:
        # the same result without writing the concatenation.
        first, c = self.h_rel[0], f1.shape[1]
        hidden = F.conv2d(f1, first.weight[:, :c]) + F.conv2d(f2, first.weight[:, c:], first.bias)
        scores = F.softplus(self.to_scores(self.h_rel[1:](hidden)))
        r1, r2 = scores[:, :1], scores[:, 1:]
        return r1 / (r1 + r2 + self.eps)  # w_1 (N, 1, H, W); w_2 = 1 - w_1


class GlobalContextExpert(nn.Module):
    """E_spatial = Conv1x1(Concat(Conv3x3(f_base), Conv3x3_d2(f_base))), f_base = w1 f1 + w2 f2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.local = conv3x3(channels, channels)
        self.context = conv3x3(channels, channels, dilation=2)
        self.merge = conv1x1(2 * channels, channels)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        base = lerp(f2, f1, w1)  # w1 * f1 + (1 - w1) * f2 in one pass
        # The 1x1 merge is linear, so it folds into the two 3x3 filters: merge(cat(local, context))
        # = conv3x3(M_l W_l) + conv3x3_d2(M_c W_c), the same function and parameters without the
        # concatenation and the extra full-size pass of the 1x1 conv.
        c = base.shape[1]
        merge = self.merge.weight.flatten(1)  # (C, 2C)
        m_local, m_context = merge[:, :c], merge[:, c:]
        w_local = torch.einsum("om,mikl->oikl", m_local, self.local.weight)
        w_context = torch.einsum("om,mikl->oikl", m_context, self.context.weight)
        bias = m_local @ self.local.bias + m_context @ self.context.bias + self.merge.bias
        local = F.conv2d(base, w_local, bias, padding=1)
        return local + F.conv2d(base, w_context, padding=2, dilation=2)


class WaveletExpert(nn.Module):
    """Haar DWT of both features; LL by reliability weights, details by larger magnitude; IDWT.

    No learned parameters: the reliability weights carry the learning into this branch.
    """

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        ll1, *details1 = haar_dwt(f1)
        ll2, *details2 = haar_dwt(f2)
        w1_half = F.avg_pool2d(w1, 2)  # weights brought to the LL resolution
        ll = lerp(ll2, ll1, w1_half)
        details = [
            torch.where(d1.abs() > d2.abs(), d1, d2)
            for d1, d2 in zip(details1, details2, strict=True)
        ]
        return haar_idwt(ll, *details)


class SoftGradientMixer(nn.Module):
    """alpha = Softmax(Conv1x1([E_s + G(E_s), E_w + G(E_w)])); F = alpha_1 E_s + alpha_2 E_w."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.to_logits = conv1x1(2 * channels, 2)

    def forward(self, spatial: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        # A softmax over two logits is the sigmoid of their difference: one output channel (the
        # difference of the 1x1 conv's two filters) gives alpha_1 exactly; alpha_2 = 1 - alpha_1.
        # The conv over the concatenation is the sum of its halves over each expert.
        c = spatial.shape[1]
        weight, bias = self.to_logits.weight, self.to_logits.bias
        diff = weight[:1] - weight[1:]
        logit = F.conv2d(spatial + sobel_magnitude(spatial), diff[:, :c]) + F.conv2d(
            wave + sobel_magnitude(wave), diff[:, c:], bias[:1] - bias[1:]
        )
        return lerp(wave, spatial, torch.sigmoid(logit))


class ScaleFusion(nn.Module):
    """Reliability weights, the enabled experts, and their mixing at one scale."""

    def __init__(self, channels: int, cfg: WDualmineConfig) -> None:
        super().__init__()
        self.reliability = ReliabilityHead(channels, cfg.reliability_eps)
        self.gce = GlobalContextExpert(channels) if cfg.use_gce else None
        self.we = WaveletExpert() if cfg.use_we else None
        both = cfg.use_gce and cfg.use_we
        self.sgm = SoftGradientMixer(channels) if (both and cfg.use_sgm) else None

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        w1 = self.reliability(f1, f2)
        spatial = self.gce(f1, f2, w1) if self.gce is not None else None
        wave = self.we(f1, f2, w1) if self.we is not None else None
        if spatial is None:
            return wave  # no GCE: the wavelet expert passes through the mixer
        if wave is None:
            return spatial  # no WE: the spatial expert passes through
        if self.sgm is None:
            return (spatial + wave) * 0.5  # no SGM: plain pixel-wise average
        return self.sgm(spatial, wave)


class ResidualDecoder(nn.Module):
    """Top-down path from scale 4 to full resolution; returns the one-channel residual R."""

    def __init__(self, widths: tuple[int, ...], head_init_scale: float) -> None:
        super().__init__()
        fine_to_coarse = list(widths)
        self.lateral = nn.ModuleList(
            conv1x1(c_coarse, c_fine) for c_fine, c_coarse in itertools.pairwise(fine_to_coarse)
        )
        self.smooth = nn.ModuleList(conv3x3(c, c) for c in fine_to_coarse[:-1])
        self.head = conv3x3(widths[0], 1)
        init_kaiming(self)
        # A small output layer starts the fused image near the average (the residual-to-average
        # anchor) while every layer still receives gradients from the first step.
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.zero_()

    def forward(self, fused: list[torch.Tensor]) -> torch.Tensor:
        x = fused[-1]
        for scale in range(len(fused) - 2, -1, -1):
            # 1x1 before upsampling: equal to after (both linear) at a quarter of the cost.
            up = F.interpolate(
                self.lateral[scale](x), scale_factor=2, mode="bilinear", align_corners=False
            )
            x = F.relu(self.smooth[scale](up + fused[scale]), inplace=True)
        return self.head(x)


class WDualmine(FusionNet):
    """The full network plus its training-only heads (projection for L_mi, R1/R2 for L_rec)."""

    def __init__(self, cfg: WDualmineConfig, weights: LossWeights) -> None:
        super().__init__()
        self.cfg = cfg
        self.weights = weights
        self.encoder = Encoder(cfg.widths, cfg.eca_kernel)
        self.fusion = nn.ModuleList(ScaleFusion(c, cfg) for c in cfg.widths)
        init_kaiming(self.encoder)
        init_kaiming(self.fusion)
        self.decoder = ResidualDecoder(cfg.widths, cfg.head_init_scale)
        # Heads exist only when their loss term is on, so every parameter is trained.
        self.projection = ProjectionHead(cfg.widths[-1], cfg.proj_dim) if weights.mi > 0 else None
        self.reconstruction = ReconstructionHeads() if weights.rec > 0 else None
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """A network input: channels-last if configured, and in autocast's dtype under autocast
        (then the whole network runs in bfloat16, with no float32 round trips between layers)."""
        x = x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x
        return to_autocast_dtype(x)

    def encode_pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[list, list]:
        """Both sources through the shared encoder in one batch (one pass, not two)."""
        features = self.encoder(self._layout(torch.cat((a, b), dim=0)))
        halves = [f.chunk(2, dim=0) for f in features]  # chunk: its backward needs no zero fill
        return [h[0] for h in halves], [h[1] for h in halves]

    def fuse_features(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """Fused image (inputs already of a size divisible by 16) and both sources' features."""
        feats_a, feats_b = self.encode_pair(a, b)
        fused = [fuse(f1, f2) for fuse, f1, f2 in zip(self.fusion, feats_a, feats_b, strict=True)]
        residual = self.decoder(fused)
        average = (a + b) * 0.5  # the sources' dtype (float32): the output image stays exact
        out = average + self.cfg.residual_scale * torch.tanh(residual.float())
        return out.clamp(0.0, 1.0).contiguous(), feats_a, feats_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a_pad, (h, w) = pad_to_multiple(a, SIZE_MULTIPLE)
        b_pad, _ = pad_to_multiple(b, SIZE_MULTIPLE)
        fused, _, _ = self.fuse_features(a_pad, b_pad)
        return fused[..., :h, :w]

    def training_loss(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        a_pad, (h, w) = pad_to_multiple(a, SIZE_MULTIPLE)
        b_pad, _ = pad_to_multiple(b, SIZE_MULTIPLE)
        fused_pad, feats_a, feats_b = self.fuse_features(a_pad, b_pad)
        fused = fused_pad[..., :h, :w]
        wts = self.weights
        terms: dict[str, torch.Tensor] = {}
        if wts.avg > 0:
            terms["avg"] = l_avg(fused, a, b)
        if wts.grad > 0:
            terms["grad"] = l_grad(fused, a, b)
        if wts.cc > 0:
            terms["cc"] = l_cc(fused, a, b)
        if self.projection is not None:
            z_f = self.projection(self.encoder(self._layout(fused_pad))[-1])
            terms["mi"] = infonce_pair(
                z_f, self.projection(feats_a[-1]), self.projection(feats_b[-1]), wts.tau
            )
        if self.reconstruction is not None:
            terms["rec"] = l_rec(self.reconstruction(self._layout(fused)), a, b)
        total = sum(getattr(wts, name) * value for name, value in terms.items())
        logged = {name: float(value.detach()) for name, value in terms.items()}
        logged["total"] = float(total.detach())
        return total, logged


def build(
    model: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    **_: Any,
) -> WDualmine:
    """Registry factory: params.yaml `methods.wdualmine` (merged with a variant) -> model.

    `optim` is read by the training loop, not the model, and the loop's `pair` keyword does not
    change W-DUALMINE (one model per pair, same architecture); both are accepted so the whole
    method section can be passed through.
    """
    cfg = config_from_mapping(WDualmineConfig, "methods.wdualmine.model", model)
    return WDualmine(cfg, config_from_mapping(LossWeights, "methods.wdualmine.loss", loss))
