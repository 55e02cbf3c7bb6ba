"""ASFE-Fusion and AdaFuse re-implementations, through the `FusionNet` contract, at tiny sizes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medfuse.errors import ConfigError
from medfuse.methods import adafuse, asfe_fusion
from medfuse.methods.asfe_fusion import FusionLoss, LossConfig, ssim, structure_tensor
from medfuse.methods.blocks import gaussian_window, ssim_map
from medfuse.methods.net import FusionNet
from medfuse.methods.peer_blocks import (
    BlurPool2d,
    PatchUnembed,
    SwappedCrossAttentionFusion,
    minmax_per_image,
)
from tests.settings import section
from tests.tiny import TINY_PEER_BACKBONE, train_steps

# The same code as the papers' models, shrunk: 32 x 32 inputs are a multiple of 2^3 * patch 4.
TINY = {
    "asfe-fusion": {**TINY_PEER_BACKBONE, "expert_slots": 4},
    "adafuse": {**TINY_PEER_BACKBONE, "depth": 1, "shared_encoder": False},
}
FACTORIES = {"asfe-fusion": asfe_fusion.build, "adafuse": adafuse.build}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_net(name: str, loss: dict | None = None, **model: object) -> FusionNet:
    torch.manual_seed(0)
    return build_tiny(name, model={**TINY[name], **model}, loss=loss or {})


def build_tiny(
    name: str, model: dict | None = None, loss: dict | None = None, pair: str | None = None
) -> FusionNet:
    """Method `name` with params.yaml's settings, keys of `model` and `loss` replaced."""
    settings = section(name)
    return FACTORIES[name](
        model={**settings["model"], **(model or {})},
        loss={**settings["loss"], **(loss or {})},
        pair=pair,
    )


def loss_config(**overrides: object) -> LossConfig:
    return LossConfig(**section("asfe-fusion", loss=overrides)["loss"])


def batch(make_pair, size: int = 32, seeds: tuple[int, ...] = (0, 1)) -> tuple[torch.Tensor, ...]:
    pairs = [make_pair(size, s) for s in seeds]
    a = torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)[:, None] / 255.0
    b = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)[:, None] / 255.0
    return a, b


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shape_and_per_image_stretch(name: str, make_pair) -> None:
    net = tiny_net(name).eval()
    a, b = batch(make_pair)
    with torch.no_grad():
        fused = net(a, b)
    assert fused.shape == a.shape
    for image in fused:  # stretched per image to exactly [0, 1], as the authors' test code does
        assert image.min().item() == pytest.approx(0.0, abs=1e-6)
        assert image.max().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_sizes_off_the_stride_are_padded_and_cropped(name: str) -> None:
    net = tiny_net(name, stretch_output=False).eval()
    a, b = torch.rand(1, 1, 40, 37), torch.rand(1, 1, 40, 37)
    with torch.no_grad():
        fused = net(a, b)
    assert fused.shape == (1, 1, 40, 37)
    assert fused.min() >= 0.0 and fused.max() <= 1.0  # clamped, not stretched


@pytest.mark.parametrize("name", sorted(TINY))
def test_inputs_are_min_max_normalised_per_image(name: str, make_pair) -> None:
    net = tiny_net(name).eval()
    a, b = batch(make_pair, seeds=(0,))
    with torch.no_grad():
        plain = net(a, b)
        rescaled = net(0.1 + 0.5 * a, 0.2 + 0.3 * b)  # same images, other grey ranges
    torch.testing.assert_close(plain, rescaled, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_gradients_reach_every_parameter(name: str, make_pair) -> None:
    net = tiny_net(name).train()
    a, b = batch(make_pair)
    loss, terms = net.training_loss(a, b)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert set(terms) == {"intensity", "structure", "ssim", "total"}
    assert all(isinstance(v, float) for v in terms.values())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_few_optimiser_steps_reduce_the_loss(name: str, make_pair) -> None:
    net = tiny_net(name).train()
    a, b = batch(make_pair)
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = [loss for loss, _ in train_steps(net, a, b, optimiser, 8)]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", sorted(TINY))
def test_mixed_precision_runs_with_the_loss_in_float32(name: str, make_pair) -> None:
    # The FFTs and the loss leave autocast (bfloat16 on CPU here; the same code path as CUDA AMP).
    net = tiny_net(name).train()
    a, b = batch(make_pair)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = net.training_loss(a, b)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("name", sorted(TINY))
def test_bfloat16_fusion_is_a_float32_image_near_the_float32_one(name: str, make_pair) -> None:
    net = tiny_net(name).eval()
    a, b = batch(make_pair)
    with torch.no_grad():
        want = net(a, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = net(a, b)
    assert got.dtype == torch.float32  # stretched in float32, not in bfloat16's 8 bits
    assert got.min() >= 0.0 and got.max() <= 1.0
    assert (got - want).abs().mean() < 0.05


# ----------------------------------------------------------------------------- the loss


def test_ssim_term_has_a_gradient_unless_detached(make_pair) -> None:
    a, b = batch(make_pair)
    fused = torch.rand_like(a, requires_grad=True)

    def grad_of(config: LossConfig) -> torch.Tensor:
        total, _ = FusionLoss(config)(fused, a, b)
        return torch.autograd.grad(total, fused)[0]

    with_ssim = grad_of(loss_config())
    released = grad_of(loss_config(ssim_detached=True))
    without_ssim = grad_of(loss_config(ssim=0.0))
    assert not torch.allclose(with_ssim, released)
    torch.testing.assert_close(released, without_ssim)  # detached SSIM adds nothing to the grad
    # ... but still counts in the loss value the released code logs.
    _, terms = FusionLoss(loss_config(ssim_detached=True))(fused, a, b)
    assert terms["ssim"] > 0.0


def test_loss_terms_on_hand_made_cases() -> None:
    a = torch.full((1, 1, 16, 16), 0.2)
    b = torch.full((1, 1, 16, 16), 0.6)
    _, terms = FusionLoss(loss_config())((a + b) / 2, a, b)
    assert terms["intensity"] == pytest.approx(0.0, abs=1e-6)  # F is the mean of the sources
    assert terms["structure"] == pytest.approx(0.0, abs=1e-6)  # flat images: no structure
    x = torch.rand(2, 1, 24, 24)
    assert ssim(x, x, gaussian_window(11, 1.5)).item() == pytest.approx(1.0)


def test_structure_tensor_of_a_ramp() -> None:
    ramp = torch.arange(5.0).repeat(4, 1).view(1, 1, 4, 5)  # dx = 1 (0 in the last column), dy = 0
    st = structure_tensor(ramp)[0]
    expected_dx2 = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]).repeat(4, 1)
    torch.testing.assert_close(st[0], expected_dx2)
    assert st[1:].abs().sum() == 0
    # Two stacked sources: the sum of their tensors.
    torch.testing.assert_close(
        structure_tensor(torch.cat([ramp, ramp], 1)), 2 * structure_tensor(ramp)
    )


# ----------------------------------------------------------------------------- the blocks


def test_blur_pool_halves_and_keeps_constants() -> None:
    out = BlurPool2d(3)(torch.full((1, 3, 9, 16), 0.5))
    assert out.shape == (1, 3, 5, 8)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))


def test_patch_unembed_folds_tokens_back_in_place() -> None:
    channels, patch = 3, 2
    unembed = PatchUnembed(channels, patch, embed_dim=patch * patch * channels)
    with torch.no_grad():
        unembed.proj.weight.copy_(torch.eye(patch * patch * channels))
        unembed.proj.bias.zero_()
    image = torch.rand(2, channels, 4, 6)
    # tokens in row-major patch order, each holding its (row, col, channel) values
    tokens = image.view(2, channels, 2, patch, 3, patch).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, -1)
    torch.testing.assert_close(unembed(tokens, 4, 6), image)


def test_cross_attention_applies_each_map_to_the_other_sources_values() -> None:
    torch.manual_seed(0)
    block = SwappedCrossAttentionFusion(channels=4, patch_size=2, embed_dim=8, num_heads=2).eval()
    x, y = torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return (weights @ v).transpose(1, 2).flatten(2)

    with torch.no_grad():
        qa, ka, va = block.branch_a(x)
        qb, kb, vb = block.branch_b(y)
        mixed = (block.proj_a(attend(qa, ka, vb)) + block.proj_b(attend(qb, kb, va))) / 2
        expected = x + y + block.unembed(mixed, 8, 8)
        torch.testing.assert_close(block(x, y), expected)


def test_log_amplitude_of_a_constant_has_only_a_centred_dc() -> None:
    spectrum = adafuse.log_amplitude(torch.full((1, 1, 8, 8), 2.0))
    assert spectrum[0, 0, 4, 4].item() == pytest.approx(math.log1p(2.0 * 64))
    spectrum[0, 0, 4, 4] = 0
    assert spectrum.abs().max() < 1e-5


def test_minmax_per_image_is_per_sample() -> None:
    x = torch.stack([torch.full((1, 2, 2), 3.0), torch.tensor([[[1.0, 2.0], [3.0, 5.0]]])])
    out = minmax_per_image(x)
    assert out[0].abs().max() == 0  # a flat image maps to 0, not NaN
    torch.testing.assert_close(out[1], torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))


# ----------------------------------------------------------------------------- configuration


def test_adafuse_encoder_sharing_follows_the_pair() -> None:
    per_pair = {**TINY["adafuse"], "shared_encoder": {"CT-MRI": True, "PET-MRI": False}}
    assert len(tiny_net("adafuse", shared_encoder=True).encoders) == 1
    assert len(build_tiny("adafuse", model=per_pair, pair="CT-MRI").encoders) == 1
    assert len(build_tiny("adafuse", model=per_pair, pair="PET-MRI").encoders) == 2
    with pytest.raises(ConfigError, match="pair"):
        build_tiny("adafuse", model=per_pair)
    with pytest.raises(ConfigError, match="SPECT-MRI"):
        build_tiny("adafuse", model=per_pair, pair="SPECT-MRI")


@pytest.mark.parametrize("name", sorted(TINY))
def test_bad_model_or_loss_settings_name_the_key(name: str) -> None:
    with pytest.raises(ConfigError, match="widthz"):
        build_tiny(name, model={**TINY[name], "widthz": [8]})
    with pytest.raises(ConfigError, match="num_heads"):
        build_tiny(name, model={**TINY[name], "embed_dim": 15})
    with pytest.raises(ConfigError, match="ssim_weight"):
        build_tiny(name, model=TINY[name], loss={"ssim_weight": 1.0})


def test_empty_widths_are_rejected() -> None:
    with pytest.raises(ConfigError, match="widths"):
        build_tiny("asfe-fusion", model={**TINY["asfe-fusion"], "widths": []})


# ----------------------------------------------------------------------------- the training loop


@pytest.fixture(scope="module")
def tracking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for the module: creating a store costs seconds."""
    return tmp_path_factory.mktemp("tracking")


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_epoch_through_the_project_training_loop(
    name: str,
    params: dict,
    tiny_prepared: Path,
    tracking_dir: Path,
    tmp_path: Path,
    make_pair,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medfuse.config import deep_merge
    from medfuse.fuse import load_fuser
    from medfuse.train import train_from_params

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # AdaFuse keeps params.yaml's per-pair encoder sharing: the loop passes the pair.
    model = {k: v for k, v in TINY[name].items() if k != "shared_encoder"}
    overlay = {
        "data": {"prepare": {"out_dir": str(tiny_prepared)}},
        "tracking": {
            "uri": f"sqlite:///{tracking_dir}/mlflow.db",
            "artifact_root": str(tracking_dir / "artifacts"),
        },
        "train": {"image_size": 32, "sample_fusions": 1, "device": "cpu"},
        "methods": {name: {"model": model, "optim": {"epochs": 1, "batch_size": 2}}},
    }
    run_params = deep_merge(params, overlay)
    out = tmp_path / "model"
    weights = train_from_params(run_params, method=name, pair="CT-MRI", out_dir=out)
    assert any((out / "samples").glob("*.png"))

    # `medfuse fuse --model` rebuilds the same network from model.json and loads the weights.
    fuser = load_fuser(run_params, name, model_path=weights, device="cpu")
    if name == "adafuse":
        assert len(fuser.net.encoders) == 1  # CT-MRI: one encoder shared by both sources
    a, b = (x / 255.0 for x in make_pair(32, 7))
    fused = fuser.fuse(a, b)
    assert fused.shape == a.shape
    assert fused.min() >= 0.0 and fused.max() <= 1.0


def test_the_losses_ssim_map_is_scikit_images_away_from_the_border() -> None:
    """The one SSIM of the peers' and seed methods' losses against scikit-image's Gaussian SSIM
    (sigma 1.5, an 11-tap window, population covariance), where no padding reaches: the valid
    map (pad 0) is its interior, and the zero-padded one (pad 5) keeps the image's size."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.random((40, 48))
    y = np.clip(0.6 * x + 0.4 * rng.random((40, 48)), 0, 1)
    _, want = structural_similarity(
        x,
        y,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )
    tx, ty = (torch.from_numpy(v).view(1, 1, 40, 48) for v in (x, y))
    window = gaussian_window(11, 1.5).double()
    valid = ssim_map(tx, ty, window, 0)[0, 0].numpy()
    # 1e-6: the window's taps are computed in float32
    np.testing.assert_allclose(valid, want[5:-5, 5:-5], atol=1e-6)
    same = ssim_map(tx, ty, window, 5)[0, 0].numpy()
    assert same.shape == (40, 48)
    np.testing.assert_allclose(same[5:-5, 5:-5], valid, atol=1e-12)
