"""W-DUALMINE model: shapes, range, ablation switches, gradients, Haar transform, overfitting."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfuse.errors import ConfigError
from medfuse.methods.blocks import (
    Conv1x1,
    haar_dwt,
    haar_idwt,
    lerp,
    sobel_magnitude,
    spatial_mean,
    subsample,
)
from medfuse.methods.registry import build_method
from medfuse.methods.wdualmine import (
    GlobalContextExpert,
    ScaleFusion,
    WaveletExpert,
    WDualmineConfig,
    build,
)
from tests.settings import section
from tests.tiny import train_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {"widths": [4, 8, 8, 8], "proj_dim": 8}
VARIANTS = {
    "full": {},
    "no_gce": {"use_gce": False},
    "no_we": {"use_we": False},
    "no_sgm": {"use_sgm": False},
}


def tiny_model(seed: int = 0, loss: dict | None = None, **model: object):
    torch.manual_seed(seed)
    return build(**section("wdualmine", model={**TINY, **model}, loss=loss or {}))


def images(
    n: int = 2, h: int = 32, w: int = 32, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g), torch.rand(n, 1, h, w, generator=g)


@pytest.mark.parametrize("size", [(32, 32), (30, 34), (17, 48)])
def test_output_shape_and_range(size: tuple[int, int]) -> None:
    model = tiny_model(head_init_scale=5.0).eval()  # a large residual, so clipping matters
    a, b = images(2, *size)
    with torch.no_grad():
        out = model(a, b)
    assert out.shape == a.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.allclose(out, (a + b) / 2)


def test_registry_builds_from_params(params: dict) -> None:
    from medfuse.config import method_config

    model = build_method("wdualmine", method_config(params, "wdualmine", "no_sgm"))
    assert model.cfg.use_sgm is False and model.cfg.widths == (16, 32, 64, 128)
    loss = params["methods"]["wdualmine"]["loss"]
    assert model.weights.avg == loss["avg"] and model.weights.tau == loss["tau"]
    assert model.cfg.head_init_scale == params["methods"]["wdualmine"]["model"]["head_init_scale"]


def test_initial_output_is_close_to_average() -> None:
    """The small output layer starts the model near the residual-to-average anchor."""
    model = tiny_model().eval()
    a, b = images()
    with torch.no_grad():
        gap = (model(a, b) - (a + b) / 2).abs().max()
    assert 0 < gap < 0.25


def test_haar_round_trip_and_matches_pytorch_wavelets() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorch_wavelets import DWTForward, DWTInverse
    x = torch.randn(2, 3, 16, 24)
    ll, lh, hl, hh = haar_dwt(x)
    assert ll.shape == (2, 3, 8, 12)
    torch.testing.assert_close(haar_idwt(ll, lh, hl, hh), x, atol=1e-6, rtol=0)
    ref_ll, (ref_high,) = DWTForward(J=1, wave="haar", mode="zero")(x)
    torch.testing.assert_close(ll, ref_ll, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.stack((lh, hl, hh), dim=2), ref_high, atol=1e-6, rtol=0)
    ref_x = DWTInverse(wave="haar", mode="zero")((ref_ll, [ref_high]))
    torch.testing.assert_close(haar_idwt(ll, lh, hl, hh), ref_x, atol=1e-6, rtol=0)


def test_haar_works_on_channels_last() -> None:
    x = torch.randn(1, 4, 8, 8)
    xc = x.contiguous(memory_format=torch.channels_last)
    for band, band_cl in zip(haar_dwt(x), haar_dwt(xc), strict=True):
        torch.testing.assert_close(band, band_cl)


def test_sobel_magnitude_of_a_ramp() -> None:
    ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # +1 per column
    g = sobel_magnitude(ramp, padding="replicate")
    assert torch.allclose(g[..., 1:-1, 1:-1], torch.full((6, 6), 8.0))  # |[-1 0 1]x[1 2 1]| = 8


def test_wavelet_expert_rule() -> None:
    """LL by reliability weights; each detail coefficient from the larger-magnitude source."""
    f1, f2 = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    w1 = torch.full((1, 1, 8, 8), 0.25)
    out = WaveletExpert()(f1, f2, w1)
    ll, *details = haar_dwt(out)
    ll1, *d1 = haar_dwt(f1)
    ll2, *d2 = haar_dwt(f2)
    torch.testing.assert_close(ll, 0.25 * ll1 + 0.75 * ll2, atol=1e-5, rtol=0)
    for got, x, y in zip(details, d1, d2, strict=True):
        torch.testing.assert_close(got, torch.where(x.abs() > y.abs(), x, y), atol=1e-5, rtol=0)


def _scale_fusion(**switches: bool) -> ScaleFusion:
    torch.manual_seed(0)
    model = section("wdualmine", model={"widths": (4, 8, 8, 8), "channels_last": False, **switches})
    return ScaleFusion(4, WDualmineConfig(**model["model"]))


def test_switches_select_the_expert_combination() -> None:
    f1, f2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    full = _scale_fusion()
    with torch.no_grad():
        w1 = full.reliability(f1, f2)
        spatial, wave = full.gce(f1, f2, w1), full.we(f1, f2, w1)
        no_sgm = _scale_fusion(use_sgm=False)
        no_sgm.load_state_dict(full.state_dict(), strict=False)
        torch.testing.assert_close(no_sgm(f1, f2), (spatial + wave) / 2)
        no_gce = _scale_fusion(use_gce=False)
        no_gce.load_state_dict(full.state_dict(), strict=False)
        torch.testing.assert_close(no_gce(f1, f2), wave)  # the remaining expert passes through
        no_we = _scale_fusion(use_we=False)
        no_we.load_state_dict(full.state_dict(), strict=False)
        torch.testing.assert_close(no_we(f1, f2), spatial)
        mixed = full(f1, f2)
    assert not torch.allclose(mixed, (spatial + wave) / 2)
    assert no_gce.gce is None and no_gce.sgm is None and no_we.we is None and no_sgm.sgm is None
    assert isinstance(full.gce, GlobalContextExpert)


@pytest.mark.parametrize("variant", ["no_gce", "no_we", "no_sgm"])
def test_each_switch_changes_the_output(variant: str) -> None:
    full = tiny_model(head_init_scale=5.0).eval()
    other = tiny_model(head_init_scale=5.0, **VARIANTS[variant]).eval()
    other.load_state_dict(full.state_dict(), strict=False)  # same weights where they exist
    a, b = images()
    with torch.no_grad():
        assert (full(a, b) - other(a, b)).abs().max() > 1e-4


def test_both_experts_off_is_refused() -> None:
    with pytest.raises(ConfigError, match="no expert"):
        tiny_model(use_gce=False, use_we=False)


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key 'width' \\(did you mean 'widths'"):
        build(**section("wdualmine", model={"width": 3}))


def test_a_missing_setting_is_named_not_defaulted() -> None:
    settings = section("wdualmine")
    del settings["model"]["head_init_scale"]
    with pytest.raises(ConfigError, match=r"model: missing key\(s\) head_init_scale"):
        build(**settings)


@pytest.mark.parametrize(
    ("model_switches", "loss"),
    [({}, {}), *[(v, {}) for v in list(VARIANTS.values())[1:]], ({}, {"mi": 0.0, "rec": 0.0})],
)
def test_gradients_reach_every_used_parameter(model_switches: dict, loss: dict) -> None:
    model = tiny_model(loss=loss, **model_switches)
    a, b = images()
    total, _ = model.training_loss(a, b)
    total.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    if loss.get("mi") == 0.0:
        assert model.projection is None and model.reconstruction is None


def test_zero_weight_terms_are_not_computed() -> None:
    model = tiny_model(loss={"grad": 0.0, "mi": 0.0})
    _, terms = model.training_loss(*images())
    assert set(terms) == {"avg", "cc", "rec", "total"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains(variant: str) -> None:
    model = tiny_model(**VARIANTS[variant], head_init_scale=3.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    a, b = images()
    losses = [loss for loss, _ in train_steps(model, a, b, opt, 8)]
    assert losses[-1] < losses[0]


def test_tiny_model_overfits_two_pairs(make_pair) -> None:
    """The full loss has a positive floor (the gradient term pulls away from the average that
    L_avg wants), so overfitting shows in the total falling and in the terms that can reach
    about 0 falling by a large factor: L_mi (two distinct pairs told apart) and L_rec.

    The deepest width is 16, giving the projection head 16 hidden ReLUs: with 8, all of them
    died in 2 of 6 seeds and L_mi then stayed at ln 2 (a rounding-level change of the
    gradients was enough to tip seed 0 either way); with 16, L_mi fell in 6 of 6."""
    a0, b0 = make_pair(32, 0)
    a1, b1 = make_pair(32, 1)
    pairs = [(a0, b0), (np.rot90(a1).copy(), np.flipud(b1).copy())]  # two distinct anatomies
    a = torch.stack([torch.from_numpy(p[0]).float()[None] / 255 for p in pairs])
    b = torch.stack([torch.from_numpy(p[1]).float()[None] / 255 for p in pairs])
    # The paper's loss weights (L_avg 5): how close to the average the total can fall depends on
    # them, the capacity to fit does not.
    model = tiny_model(widths=[4, 8, 8, 16], loss={"avg": 5.0}, head_init_scale=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = [terms for _, terms in train_steps(model, a, b, opt, 150)]
    first, last = history[0], history[-1]
    assert last["total"] < 0.8 * first["total"]
    assert last["mi"] < first["mi"] / 10
    assert last["rec"] < first["rec"] / 4


def test_haar_gradients_are_exact() -> None:
    """The custom backward (the transform's adjoint is its inverse) against finite differences."""
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(haar_dwt, (x,))
    bands = [torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(haar_idwt, bands)


@pytest.mark.parametrize(
    ("c_in", "c_out", "stride"), [(1, 8, 1), (4, 8, 2), (8, 8, 2), (16, 32, 2)]
)
def test_conv1x1_matches_a_plain_convolution(c_in: int, c_out: int, stride: int) -> None:
    """Conv1x1's fast paths (broadcast from one channel; subsample, then stride 1) compute the
    plain convolution and its gradients, on channels-last inputs that crashed oneDNN's own
    strided path at 64 x 64."""
    torch.manual_seed(0)
    conv = Conv1x1(c_in, c_out, stride)
    x = torch.randn(2, c_in, 64, 64).contiguous(memory_format=torch.channels_last)
    x_ref = x.contiguous().detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    weight = conv.weight.detach().clone().requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    out = conv(x)
    ref = F.conv2d(x_ref, weight, bias, stride=stride)  # NCHW: not the affected path
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(conv.weight.grad, weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.bias.grad, bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad)


# ---- bfloat16 autocast ----


def test_bfloat16_forward_gives_a_float32_image_near_the_float32_one(make_pair) -> None:
    model = tiny_model().eval()
    a, b = (torch.from_numpy(x.astype(np.float32) / 255)[None, None] for x in make_pair(32, 0))
    with torch.no_grad():
        want = model(a, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(a, b)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.min() >= 0.0 and got.max() <= 1.0
    # Measured 0.008 max, 0.0005 mean; the wavelet expert's larger-magnitude choice can flip
    # where two coefficients are within bfloat16's rounding, hence a max well above the mean.
    diff = (got - want).abs()
    assert diff.max() < 0.03 and diff.mean() < 0.002


def test_bfloat16_training_runs_the_network_in_bfloat16_and_the_loss_in_float32() -> None:
    model = tiny_model()
    a, b = images()
    _, want = model.training_loss(a, b)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats_a, _ = model.encode_pair(model._layout(a), model._layout(b))
        total, got = model.training_loss(a, b)
    assert {f.dtype for f in feats_a} == {torch.bfloat16}  # no float32 round trips
    assert total.dtype == torch.float32
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=0.05, abs=2e-3), name
    total.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_lerp_accepts_the_mixed_dtypes_of_autocast() -> None:
    start, end = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    weight = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(lerp(start, end, weight), torch.lerp(start, end, weight))
    mixed = lerp(start.bfloat16(), end.bfloat16(), weight)  # torch.lerp refuses this
    torch.testing.assert_close(mixed, torch.lerp(start, end, weight), atol=1e-2, rtol=0)


@pytest.mark.parametrize("op", ["spatial_mean", "subsample"])
def test_gradients_keep_the_channels_last_layout(op: str) -> None:
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours, plain = {
        "spatial_mean": (spatial_mean, lambda t: t.mean(dim=(2, 3))),
        "subsample": (lambda t: subsample(t, (2, 2)), lambda t: t[:, :, ::2, ::2]),
    }[op]
    out = ours(x)
    assert out.is_contiguous(memory_format=torch.channels_last) or out.dim() == 2
    torch.testing.assert_close(out, plain(x))
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, g)
    (want,) = torch.autograd.grad(plain(x), x, g)
    torch.testing.assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)  # autograd's own is NCHW
