"""Small building blocks shared by the learned methods (W-DUALMINE and any other network).

Everything here is written for speed on a CPU as much as for clarity: tensors may be in the
channels-last memory format, and no block loops over channels or pixels in Python.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

LossFn = TypeVar("LossFn", bound=Callable[..., Any])


def in_float32(loss: LossFn) -> LossFn:
    """Run a loss (a function or a module's forward) in float32 whatever the network's
    precision: autocast off, tensor arguments cast up. Means, softmax, correlations and SSIM's
    variances lose too much in bfloat16 (8 significant bits), while a loss costs little next
    to the network."""

    @functools.wraps(loss)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return loss(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# Sobel kernels (horizontal derivative, vertical derivative), stacked as (2, 1, 3, 3).
_SOBEL = torch.tensor(
    [
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
        [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]],
    ]
).unsqueeze(1)


def conv3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution whose zero padding keeps the size (divided by `stride`)."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


class _Subsample(torch.autograd.Function):
    """Every s-th pixel, copied out; its gradient is scattered into zeros of the input's
    memory format (autograd's slice backward gives a contiguous NCHW gradient, and every
    channels-last op it then meets ran 2.5-4x slower on the mixed layouts)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
        ctx.shape, ctx.step, ctx.format = x.shape, (sh, sw), _memory_format(x)
        return x[:, :, ::sh, ::sw].contiguous(memory_format=ctx.format)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sh, sw = ctx.step
        out = torch.empty(
            ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.format
        ).zero_()
        out[:, :, ::sh, ::sw] = grad
        return out, None, None


def subsample(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """x[:, :, ::sh, ::sw] as a compact tensor in x's memory format (and so its gradient)."""
    return _Subsample.apply(x, *stride)


class _SpatialMean(torch.autograd.Function):
    """x.mean over H and W, (N, C); the gradient keeps x's memory format (see `_Subsample`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.format = x.shape, _memory_format(x)
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.shape
        spread = (grad / (h * w))[:, :, None, None].expand(n, c, h, w)
        return spread.contiguous(memory_format=ctx.format)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over height and width of an (N, C, H, W) tensor: (N, C)."""
    return _SpatialMean.apply(x)


class Conv1x1(nn.Conv2d):
    """A 1x1 convolution. From a single channel it is a per-channel scale and shift of the image:
    computed as one broadcast multiply-add, which on CPU was several times faster in training
    than oneDNN's convolution with one input channel. Same parameters either way."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(c_in, c_out, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            # A strided 1x1 conv reads every s-th pixel: take them first, then convolve with
            # stride 1. oneDNN's own strided 1x1 path writes past its workspace in the weight
            # gradient for channels-last inputs with few channels (uxlfoundation/oneDNN#6035):
            # it crashed torch 2.13 here (4 or 8 -> 8 channels at 64 x 64 and above).
            return F.conv2d(subsample(x, self.stride), self.weight, self.bias)
        if self.in_channels != 1:
            return super().forward(x)
        # (N, H, W, 1) * (C,) + (C,) -> (N, H, W, C): one fused multiply-add over the output.
        # Parameters follow the input's dtype: autocast does not cover addcmul.
        weight, bias = self.weight.flatten().to(x.dtype), self.bias.to(x.dtype)
        y = torch.addcmul(bias, x.permute(0, 2, 3, 1), weight)
        return y.permute(0, 3, 1, 2)  # (N, C, H, W) view of channels-last memory


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return Conv1x1(c_in, c_out, stride)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The ECA paper's adaptive kernel size: nearest odd number to (log2(C) + b) / gamma."""
    k = int(abs((math.log2(channels) + b) / gamma))
    return k if k % 2 else k + 1


class ECA(nn.Module):
    """Efficient Channel Attention (Wang et al., CVPR 2020): a 1-D conv over pooled channels.

    `kernel_size=0` picks the ECA paper's adaptive size from the channel count.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        k = kernel_size or eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = spatial_mean(x)  # (N, C)
        gate = torch.sigmoid(self.conv(pooled.unsqueeze(1))).squeeze(1)
        return x * gate[:, :, None, None]


class ResidualBlock(nn.Module):
    """conv3x3 (stride) -> ReLU -> conv3x3, plus a (projected) identity, then ReLU.

    No normalisation layer: the Siamese encoder sees CT, MRI and fused images, whose batch
    statistics differ, and a plain block behaves the same in training and inference.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.conv2 = conv3x3(c_out, c_out)
        self.skip = (
            conv1x1(c_in, c_out, stride) if (stride != 1 or c_in != c_out) else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x), inplace=True))
        return F.relu(out + self.skip(x), inplace=True)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """A normalised (1, 1, size, size) Gaussian kernel (the losses' SSIM window)."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    taps = torch.exp(-(coords**2) / (2.0 * sigma**2))
    taps = taps / taps.sum()
    return torch.outer(taps, taps).view(1, 1, size, size)


SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # SSIM's constants for data range 1


def local_moments(
    x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, pad: int
) -> tuple[torch.Tensor, ...]:
    """Local means, variances and covariance (mu_x, mu_y, var_x, var_y, cov) of two (N, 1, H, W)
    batches under `window`, with `pad` zeros on each side (0: the valid region only)."""

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, padding=pad)

    mu_x, mu_y = blur(x), blur(y)
    return mu_x, mu_y, blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, pad: int) -> torch.Tensor:
    """SSIM (luminance, contrast, structure) per pixel for data range 1 (see local_moments)."""
    mu_x, mu_y, var_x, var_y, cov = local_moments(x, y, window, pad)
    return ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )


def sobel_xy(x: torch.Tensor, padding: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel Sobel derivatives (horizontal, vertical), same size as `x`.

    `padding` is "zeros" (used inside networks) or "replicate" (no false edge at the image
    border; used by the losses). Single-channel images take separable shifted differences, which
    on CPU were ~50x faster than a convolution with one input channel; feature maps take two
    depthwise convolutions (oneDNN's fast path needs one output per input channel).
    """
    if x.shape[1] == 1:
        p = F.pad(x, (1, 1, 1, 1), mode="constant" if padding == "zeros" else padding)
        diff_w = p[..., 2:] - p[..., :-2]  # [-1, 0, 1] along width, (H + 2) rows
        smooth_w = p[..., 2:] + 2 * p[..., 1:-1] + p[..., :-2]  # [1, 2, 1] along width
        gx = diff_w[..., :-2, :] + 2 * diff_w[..., 1:-1, :] + diff_w[..., 2:, :]
        gy = smooth_w[..., 2:, :] - smooth_w[..., :-2, :]
        return gx, gy
    channels = x.shape[1]
    kernels = _SOBEL.to(device=x.device, dtype=x.dtype)
    if padding != "zeros":
        x = F.pad(x, (1, 1, 1, 1), mode=padding)
    pad = 1 if padding == "zeros" else 0
    gx = F.conv2d(x, kernels[:1].expand(channels, 1, 3, 3), padding=pad, groups=channels)
    gy = F.conv2d(x, kernels[1:].expand(channels, 1, 3, 3), padding=pad, groups=channels)
    return gx, gy


def sobel_magnitude(x: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """G(x) = |Sobel_h x| + |Sobel_v x|, per channel (the paper's eq. 8)."""
    gx, gy = sobel_xy(x, padding)
    return gx.abs() + gy.abs()


def _haar_analysis(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"haar_dwt needs even height and width, got {h} x {w}")
    v = x.view(n, c, h // 2, 2, w // 2, 2)
    p, q = v[:, :, :, 0, :, 0], v[:, :, :, 0, :, 1]  # top-left, top-right of each 2x2 block
    r, s = v[:, :, :, 1, :, 0], v[:, :, :, 1, :, 1]  # bottom-left, bottom-right
    top_sum, top_diff, bot_sum, bot_diff = p + q, p - q, r + s, r - s
    ll = (top_sum + bot_sum) * 0.5
    lh = (top_sum - bot_sum) * 0.5  # vertical detail (horizontal edges)
    hl = (top_diff + bot_diff) * 0.5  # horizontal detail (vertical edges)
    hh = (top_diff - bot_diff) * 0.5
    return ll, lh, hl, hh


def _haar_synthesis(
    ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor
) -> torch.Tensor:
    n, c, h, w = ll.shape
    top_sum, bot_sum = ll + lh, ll - lh
    top_diff, bot_diff = hl + hh, hl - hh
    # The four pixels of each 2x2 block go straight into a channels-last output.
    out = torch.empty(
        (n, c, 2 * h, 2 * w), dtype=ll.dtype, device=ll.device, memory_format=torch.channels_last
    )
    blocks = out.view(n, c, h, 2, w, 2)
    blocks[:, :, :, 0, :, 0] = (top_sum + top_diff) * 0.5
    blocks[:, :, :, 0, :, 1] = (top_sum - top_diff) * 0.5
    blocks[:, :, :, 1, :, 0] = (bot_sum + bot_diff) * 0.5
    blocks[:, :, :, 1, :, 1] = (bot_sum - bot_diff) * 0.5
    return out


class _HaarDWT(torch.autograd.Function):
    """The orthonormal Haar transform's adjoint is its inverse, so each direction's backward is
    the other direction: one pass, where autograd through the strided views would allocate and
    zero a full-size gradient per view."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _haar_analysis(x)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        return _haar_synthesis(*(g if g is not None else torch.zeros_like(grads[0]) for g in grads))


class _HaarIDWT(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *bands: torch.Tensor) -> torch.Tensor:
        return _haar_synthesis(*bands)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _haar_analysis(grad)


def haar_dwt(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-level orthonormal 2-D Haar DWT: (LL, LH, HL, HH), each of half the size.

    Equal (to float rounding; see tests) to pytorch_wavelets' `DWTForward(J=1, wave="haar",
    mode="zero")` on even sizes, whose detail bands come in the same order. Written out
    because Haar is four sums of the 2x2 neighbours: strided views do it in one pass over
    memory, where the library's two separable convolution passes were 10x slower on CPU
    (25 ms vs 2 ms for 2 x 16 x 256 x 256).
    """
    return _HaarDWT.apply(x)


def haar_idwt(
    ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor
) -> torch.Tensor:
    """Inverse of `haar_dwt` (exact up to float rounding)."""
    return _HaarIDWT.apply(ll, lh, hl, hh)


def lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """start + weight * (end - start): `torch.lerp` (one pass) when the dtypes agree; written
    out otherwise, since `torch.lerp` refuses the mixed dtypes autocast produces."""
    if start.dtype == end.dtype == weight.dtype:
        return torch.lerp(start, end, weight)
    return start + weight * (end - start)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the bottom/right so height and width are multiples of `multiple`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        mode = "reflect" if (pad_h < h and pad_w < w) else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (h, w)
