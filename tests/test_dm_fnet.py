"""DM-FNet's two stages (diffusion U-Net, fusion head) through the `FusionNet` contract, at tiny
sizes (32 x 32 images), plus the paper size's parameter counts (built, never run)."""

from __future__ import annotations

import math

import pytest
import torch

from medfuse.errors import ConfigError
from medfuse.methods import dm_fnet
from medfuse.methods.blocks import gaussian_window, sobel_magnitude
from medfuse.methods.dm_fnet import (
    DMFNet,
    HeadLoss,
    HeadLossConfig,
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    noise_levels,
    ssim_cs_map,
)
from medfuse.models import parameter_count
from tests.settings import section
from tests.tiny import train_steps

# Four levels: 32-pixel images reach 4 x 4 at the bottom (the head's 7x7 reflect conv needs 4).
TINY_UNET = {"base_channels": 8, "channel_mults": [1, 1, 1, 2], "res_blocks": 1, "norm_groups": 4}
SETTINGS = section("dm-fnet")  # params.yaml's, where every value lives
TINY_STAGE1 = section("dm-fnet", stage1={"model": TINY_UNET})["stage1"]
HEAD = {"model": SETTINGS["model"], "loss": SETTINGS["loss"]}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_unet(seed: int = 0) -> dm_fnet.DiffusionUNet:
    torch.manual_seed(seed)
    return dm_fnet.build_unet(**TINY_STAGE1)


def tiny_head(seed: int = 0, **model: object) -> DMFNet:
    torch.manual_seed(seed)
    return dm_fnet.build(model={**HEAD["model"], **model}, loss=HEAD["loss"], stage1=TINY_STAGE1)


def pair_batch(n: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.rand(n, 1, size, size, generator=g)


# ----------------------------------------------------------------------------- schedules


def test_cosine_levels_fall_from_one_to_almost_zero() -> None:
    levels = noise_levels(cosine_betas(2000))
    assert levels.shape == (2001,) and levels[0] == 1.0
    assert bool((levels[1:] < levels[:-1]).all())  # strictly decreasing
    assert levels[-1] < 1e-3
    # Away from the end (where β is clipped at 0.999), ᾱ_t is the closed form f(t)/f(0).
    s, t = 8e-3, 1000
    closed = math.cos((t / 2000 + s) / (1 + s) * math.pi / 2) ** 2
    closed /= math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert levels[t].item() ** 2 == pytest.approx(closed, rel=1e-9)


def test_linear_schedule_endpoints() -> None:
    betas = linear_betas(2000, 1e-6, 1e-2)
    assert betas[0].item() == pytest.approx(1e-6) and betas[-1].item() == pytest.approx(1e-2)
    levels = noise_levels(betas)
    assert levels[1].item() ** 2 == pytest.approx(1 - 1e-6)
    assert bool((levels[1:] < levels[:-1]).all())


def test_gamma_is_drawn_between_the_levels_of_t_and_t_minus_1() -> None:
    schedule = NoiseSchedule(cosine_betas(2000))
    g = torch.Generator().manual_seed(0)
    for t in (1, 5, 700, 2000):
        low, high = schedule.levels[t].item(), schedule.levels[t - 1].item()
        gamma = schedule.sample_gamma(t, 2000, g)
        assert gamma.min().item() >= low and gamma.max().item() <= high
        spread = high - low
        assert (
            gamma.min().item() < low + 0.01 * spread and gamma.max().item() > high - 0.01 * spread
        )
    with pytest.raises(ValueError, match="outside"):
        schedule.sample_gamma(0, 1)


# ----------------------------------------------------------------------------- stage 1


def test_stage1_loss_is_one_scalar_and_the_unet_does_not_fuse() -> None:
    net = tiny_unet().train()
    a, b = pair_batch()
    loss, terms = net.training_loss(a, b)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and set(terms) == {"mse"}
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(NotImplementedError):
        net(a, b)


def test_one_t_per_batch_of_both_images_of_every_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_unet()
    seen: dict[str, torch.Tensor] = {}

    def spy(x: torch.Tensor, gamma: torch.Tensor, features: bool = False) -> torch.Tensor:
        seen["x"], seen["gamma"] = x, gamma
        return torch.zeros_like(x)

    monkeypatch.setattr(net.net, "forward", spy)
    levels = net.schedule.levels
    for seed in range(20):
        torch.manual_seed(seed)
        net.training_loss(*pair_batch(n=3))
        gamma = seen["gamma"]
        assert seen["x"].shape == (6, 1, 32, 32) and gamma.shape == (6,)
        # The interval [γ_t, γ_{t-1}] holding the first γ holds all six.
        t = int(torch.searchsorted(-levels, -gamma[0]))
        assert bool((gamma >= levels[t]).all() and (gamma <= levels[t - 1]).all())


def test_x0_prediction_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_unet()
    a, b = pair_batch()
    x0 = torch.cat([a, b]) * 2 - 1
    seen: dict[str, torch.Tensor] = {}

    def predict(kind: str):
        def forward(x: torch.Tensor, gamma: torch.Tensor, features: bool = False) -> torch.Tensor:
            seen["x_t"] = x
            return {"x0": x0, "zero": torch.zeros_like(x), "x_t": x}[kind]

        return forward

    monkeypatch.setattr(net.net, "forward", predict("x0"))
    assert net.training_loss(a, b)[0].item() == 0.0
    monkeypatch.setattr(net.net, "forward", predict("zero"))
    assert net.training_loss(a, b)[0].item() == pytest.approx((x0**2).mean().item(), rel=1e-6)
    monkeypatch.setattr(net.net, "forward", predict("x_t"))
    loss = net.training_loss(a, b)[0].item()
    assert loss == pytest.approx(((seen["x_t"] - x0) ** 2).mean().item(), rel=1e-6)
    assert loss > 0


def test_unet_features_are_the_first_decoder_block_of_every_level() -> None:
    net = tiny_unet().eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out, maps = net.net(x, torch.tensor([0.9, 0.5]), features=True)
    assert out.shape == x.shape
    widths = [8 * m for m in reversed(TINY_UNET["channel_mults"])]
    assert [tuple(m.shape) for m in maps] == [
        (2, w, 32 // 2**i, 32 // 2**i) for i, w in zip(range(3, -1, -1), widths, strict=True)
    ]


def test_sizes_off_the_level_multiple_are_refused() -> None:
    with pytest.raises(ValueError, match=r"30x32 is not a multiple of 8"):
        tiny_unet().training_loss(torch.rand(1, 1, 30, 32), torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        tiny_head().eval()(torch.rand(1, 1, 36, 36), torch.rand(1, 1, 36, 36))


# ----------------------------------------------------------------------------- head loss


def test_ssim_cs_of_an_image_with_itself_is_one() -> None:
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    cs = ssim_cs_map(x, x, gaussian_window(11, 1.5))
    torch.testing.assert_close(cs, torch.ones_like(cs))


def test_sobel_of_a_constant_is_zero_inside_and_of_a_ramp_its_slope_times_8() -> None:
    flat = sobel_magnitude(torch.full((1, 1, 8, 8), 0.7))
    assert flat[..., 1:-1, 1:-1].abs().max().item() == pytest.approx(0.0, abs=1e-6)
    assert flat[..., 0, :].abs().min().item() > 0  # zero padding, as the authors'
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8) * 0.1
    inner = sobel_magnitude(ramp)[..., 1:-1, 1:-1]
    torch.testing.assert_close(inner, torch.full_like(inner, 0.8))


def test_head_loss_is_zero_when_the_fusion_equals_identical_sources() -> None:
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    total, terms = HeadLoss(HeadLossConfig(**HEAD["loss"]))(x, x, x)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert terms["intensity"] == 0.0 and terms["gradient"] == 0.0


def test_head_loss_terms_on_analytic_inputs() -> None:
    loss = HeadLoss(HeadLossConfig(**HEAD["loss"]))
    flat = torch.full((1, 1, 32, 32), -0.5)
    textured = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # L1 to the pixelwise maximum of the sources.
    _, terms = loss(torch.zeros_like(flat), flat, textured)
    assert terms["intensity"] == pytest.approx(torch.maximum(flat, textured).abs().mean().item())
    # SSIM_cs is taken against the source of larger local variance: the textured one here.
    _, terms = loss(textured, flat, textured)
    assert terms["ssim"] == pytest.approx(0.0, abs=1e-6)
    _, terms = loss(flat, flat, textured)
    assert terms["ssim"] > 0.5
    total, terms = loss(torch.zeros_like(flat), flat, textured)
    expected = 1.5 * terms["intensity"] + terms["gradient"] + 0.5 * terms["ssim"]
    assert total.item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- stage 2


def test_fusion_shape_and_range() -> None:
    net = tiny_head().eval()
    a, b = pair_batch()
    with torch.no_grad():
        fused = net(a, b)
    assert fused.shape == a.shape and fused.dtype == torch.float32
    assert fused.min().item() >= 0.0 and fused.max().item() <= 1.0


def test_gradients_reach_the_head_and_never_the_frozen_unet() -> None:
    # reduction 2: at width 8 the paper's 8 leaves the channel branch one ReLU unit, which a
    # draw of the weights may leave dead (no gradient) for a given input.
    net = tiny_head(reduction=2).train()
    loss, terms = net.training_loss(*pair_batch())
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert set(terms) == {"intensity", "gradient", "ssim", "total"}
    loss.backward()
    head = [(n, p) for n, p in net.named_parameters() if not n.startswith("unet.")]
    assert head and all(p.requires_grad for _, p in head)
    assert [n for n, p in head if p.grad is None or not p.grad.abs().sum()] == []
    assert all(not p.requires_grad and p.grad is None for p in net.unet.parameters())


def test_load_stage1_round_trip_and_the_unet_stays_in_eval_mode() -> None:
    unet = tiny_unet(seed=1)
    net = tiny_head(seed=2)
    state = unet.state_dict()
    assert any(not torch.equal(v, net.unet.state_dict()[k]) for k, v in state.items())
    net.load_stage1(state)
    for k, v in state.items():
        assert torch.equal(net.unet.state_dict()[k], v), k
    net.train()
    assert net.training and net.head.training
    assert not any(m.training for m in net.unet.modules())
    assert all(not p.requires_grad for p in net.unet.parameters())
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_stage1({k: v for k, v in state.items() if not k.endswith("stem.bias")})
    # model.pt is self-contained: DMFNet's own state_dict carries the U-Net.
    copy = tiny_head(seed=3)
    copy.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(copy.unet.net.stem.weight, unet.net.stem.weight)


def test_fusion_is_repeatable_batch_independent_and_seeded_by_config() -> None:
    net = tiny_head().eval()
    a, b = pair_batch(n=3)
    with torch.no_grad():
        torch.manual_seed(1)
        first = net(a, b)
        torch.manual_seed(2)  # the global RNG plays no part
        second = net(a, b)
        alone = net(a[1:2], b[1:2])
        net.train()  # the same in train mode: the U-Net stays in eval, the head has no dropout
        in_train = net(a, b)
        reseeded = tiny_head(noise_seed=1).eval()
        reseeded.load_state_dict(net.state_dict())
        other_seed = reseeded(a, b)
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[1:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(in_train, first, atol=1e-6, rtol=0)
    assert (other_seed - first).abs().max().item() > 1e-4


def test_training_noise_comes_from_the_global_rng() -> None:
    net = tiny_head().train()
    a, b = pair_batch()
    torch.manual_seed(5)
    first = net.training_loss(a, b)[0].item()
    torch.manual_seed(5)
    same = net.training_loss(a, b)[0].item()
    second = net.training_loss(a, b)[0].item()
    assert first == same and second != first


def test_a_few_head_steps_reduce_the_loss() -> None:
    net = tiny_head().train()
    a, b = pair_batch()
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    losses = [loss for loss, _ in train_steps(net, a, b, optimiser, 10)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_mixed_precision_keeps_the_loss_in_float32() -> None:
    net = tiny_head().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = net.training_loss(*pair_batch())
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()


# ----------------------------------------------------------------------------- config and sizes


def test_config_errors_are_one_line_and_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"methods\.dm-fnet\.stage1\.model: unknown key 'width'"):
        dm_fnet.build_unet(model={"width": 8})
    with pytest.raises(ConfigError, match="not divisible by norm_groups"):
        dm_fnet.build_unet(**section("dm-fnet", stage1={"model": {"base_channels": 12}})["stage1"])
    with pytest.raises(ConfigError, match="schedule must be cosine or linear"):
        dm_fnet.build_unet(
            **section("dm-fnet", stage1={"model": TINY_UNET, "diffusion": {"schedule": "quad"}})[
                "stage1"
            ]
        )
    with pytest.raises(ConfigError, match=r"methods\.dm-fnet\.loss: unknown key"):
        dm_fnet.build(**{**HEAD, "loss": {**HEAD["loss"], "l1": 1.0}}, stage1=TINY_STAGE1)
    with pytest.raises(ConfigError, match="feature_schedule"):
        tiny_head(feature_schedule="cosine")
    missing = {k: v for k, v in HEAD["model"].items() if k != "noise_seed"}
    with pytest.raises(ConfigError, match=r"methods\.dm-fnet\.model: missing key\(s\) noise_seed"):
        dm_fnet.build(model=missing, loss=HEAD["loss"], stage1=TINY_STAGE1)


def test_other_method_keys_are_accepted_and_ignored() -> None:
    unet = dm_fnet.build_unet(**TINY_STAGE1)
    assert isinstance(unet, dm_fnet.DiffusionUNet)
    net = dm_fnet.build(**{**SETTINGS, "stage1": TINY_STAGE1})
    assert net.unet.config.base_channels == 8


def test_stage1_feature_schedule_switch() -> None:
    linear = tiny_head()
    same = tiny_head(feature_schedule="stage1")
    assert torch.equal(same.feature_schedule.levels, same.unet.schedule.levels)
    # The authors' stage-2 linear betas add a little more noise at t = 20 than the cosine ones.
    assert linear.feature_schedule.levels[20] < same.feature_schedule.levels[20] < 1


def test_paper_size_parameter_counts(repo_root) -> None:
    """The spec's 20.7 M (U-Net) and 3.0 M (head) at base width 128, GroupNorm 32: the gpu
    profile is the paper's size."""
    from medfuse.config import load_params

    gpu = load_params(repo_root / "params.yaml", profile="gpu")["methods"]["dm-fnet"]
    net = dm_fnet.build(**gpu)
    unet, head = parameter_count(net.unet), parameter_count(net, trainable_only=True)
    assert unet == 20_670_081 and unet == pytest.approx(20.7e6, rel=0.01)
    assert head == parameter_count(net.head) == 3_026_640 and head == pytest.approx(3.0e6, rel=0.02)


def test_params_yaml_sizes_build(params: dict) -> None:
    """The CPU size (params.yaml) builds."""
    net = dm_fnet.build(**params["methods"]["dm-fnet"])
    assert net.unet.config.base_channels == 16
    assert parameter_count(net.unet) == pytest.approx(0.33e6, rel=0.02)


# ----------------------------------------------------------------------------- the two trainings


@pytest.fixture
def two_stage_params(params: dict, tiny_prepared, tracking: dict) -> dict:
    """dm-fnet at tiny sizes on the tiny prepared pairs (CT-MRI and PET-MRI, 3 train pairs each)."""
    from medfuse.config import deep_merge, validate

    tiny = {"train": {"image_size": None}, "optim": {"epochs": 1, "lr": 1e-3}}
    overlay = {
        "data": {"prepare": {"out_dir": str(tiny_prepared)}},
        "tracking": tracking,
        "train": {"sample_fusions": 1, "device": "cpu"},
        "experiments": {"pairs": ["CT-MRI", "PET-MRI"]},
        "methods": {"dm-fnet": {**tiny, "stage1": {**tiny, "model": TINY_UNET}}},
    }
    merged = deep_merge(params, overlay)
    validate(merged)
    return merged


def _state(path) -> dict[str, torch.Tensor]:
    from medfuse.models import load_checkpoint

    return load_checkpoint(path)


def test_stage1_then_one_unified_head_on_every_pairs_images(
    two_stage_params, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from medfuse.fuse import fuse_test_split
    from medfuse.train import train_from_params

    job = {"method": "dm-fnet", "pair": "all"}
    with pytest.raises(ConfigError, match="--pair all"):
        train_from_params(two_stage_params, method="dm-fnet", pair="CT-MRI", out_dir=tmp_path)
    with pytest.raises(Exception, match=r"no trained first stage of dm-fnet.*--stage1"):
        train_from_params(
            two_stage_params,
            out_dir=tmp_path / "h",
            **job,
            stage1_model=tmp_path / "missing" / "model.pt",
        )
    unet = train_from_params(two_stage_params, stage1=True, out_dir=tmp_path / "s1", **job)
    meta = json.loads((tmp_path / "s1" / "model.json").read_text())
    assert meta["method"] == "dm-fnet:stage1" and "stage1" not in meta["config"]
    assert not (tmp_path / "s1" / "samples").exists()  # a first stage does not fuse
    seen = []  # the head's training batches: every training pair of both modality pairs
    original = DMFNet.training_loss

    def counted(self, a, b):
        seen.append(a.shape[0])
        return original(self, a, b)

    monkeypatch.setattr(DMFNet, "training_loss", counted)
    head = train_from_params(two_stage_params, out_dir=tmp_path / "h", stage1_model=unet, **job)
    assert sum(seen) == 6
    trained, stage1 = _state(head), _state(unet)
    for key, value in stage1.items():  # the frozen U-Net is stage 1's, unchanged
        assert torch.equal(trained[f"unet.{key}"], value), key
    meta = json.loads((tmp_path / "h" / "model.json").read_text())
    assert meta["pair"] == "all" and meta["config"]["stage1"]["model"]["base_channels"] == 8
    for pair in ("CT-MRI", "PET-MRI"):  # one model fuses every pair, the same on a rerun
        first = fuse_test_split(
            two_stage_params, "dm-fnet", pair, out=tmp_path / pair / "1", model_path=head
        )
        again = fuse_test_split(
            two_stage_params, "dm-fnet", pair, out=tmp_path / pair / "2", model_path=head
        )
        for image in sorted((first / "y").glob("*.png")):
            assert image.read_bytes() == (again / "y" / image.name).read_bytes()


def test_a_variant_never_trains_its_own_first_stage(two_stage_params, tmp_path) -> None:
    from medfuse.train import train_from_params

    with pytest.raises(ConfigError, match="--variant full"):
        train_from_params(
            two_stage_params,
            method="dm-fnet",
            pair="all",
            variant="per_pair",
            stage1=True,
            out_dir=tmp_path,
        )


def test_stage1_resume_after_a_kill_equals_an_uninterrupted_run(
    two_stage_params, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 1 draws t, γ and ε from the global generators: the checkpoint must carry them."""
    from medfuse.models import load_checkpoint
    from medfuse.plan import WEIGHTS, checkpoint_path
    from medfuse.train import train_from_params

    job = {"method": "dm-fnet", "pair": "all", "stage1": True, "epochs": 2}
    straight = train_from_params(two_stage_params, out_dir=tmp_path / "a", **job)
    original = dm_fnet.DiffusionUNet.training_loss
    calls = {"n": 0}

    def dies_at_step_9(self, a, b):  # 6 steps an epoch: in the middle of epoch 2
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return original(self, a, b)

    monkeypatch.setattr(dm_fnet.DiffusionUNet, "training_loss", dies_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        train_from_params(two_stage_params, out_dir=tmp_path / "b", **job)
    assert load_checkpoint(checkpoint_path(tmp_path / "b"))["epoch"] == 1
    assert not (tmp_path / "b" / WEIGHTS).exists()
    monkeypatch.setattr(dm_fnet.DiffusionUNet, "training_loss", original)
    resumed = train_from_params(two_stage_params, out_dir=tmp_path / "b", resume="yes", **job)
    want, got = _state(straight), _state(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
