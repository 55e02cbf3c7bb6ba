"""MMIF-AMIN: the authors' released weights reproduce their fusions (network and CLI), the loss
on analytic inputs, gradients, the per-method output settings, and an exact resume."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfuse.config import deep_merge, method_config, validate
from medfuse.data.colour import luma_pil, recolour_opencv_yuv
from medfuse.data.prepared import PreparedData
from medfuse.errors import ConfigError, DataError
from medfuse.fuse import OutputSettings, fuse_test_split
from medfuse.io import read_image, write_image
from medfuse.methods.blocks import gaussian_window
from medfuse.methods.mmif_amin import (
    MMIFAMINLossConfig,
    MMIFAMINNet,
    StripWidthError,
    average_gradient,
    build,
    entropy_bits,
    rmi_term,
    ssim_valid,
)
from medfuse.models import build_learned, load_checkpoint, save_weights
from medfuse.plan import WEIGHTS, checkpoint_path
from tests.settings import section

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data" / "published-models" / "MMIF-AMIN"
TEST_DIR = "datasets/test_datasets/SPECT_MRI"
# The three of the authors' 20 test ids that are in this dataset's SPECT-MRI test split.
IN_OUR_TEST_SPLIT = ("15009", "35007", "40031")
# Parameters the authors' code holds but never lets reach the output (so no gradient): the
# dense sub-networks of the discarded half of each block, the unused patch-embedding norm, and
# the position table of a one-token attention.
DISCARDED = (".r.", ".y.", "patch_embed.", "relative_position_bias_table")
# The authors ran their network on a GPU: its float32 rounding is not the CPU's, so a pixel
# whose value x 255 lies this close to an integer may be truncated to either side of it.
TIE = 2e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mirror() -> Path:
    if not (MIRROR / "models" / "model_25.pth").is_file():
        pytest.skip(f"the authors' MMIF-AMIN release is not mirrored at {MIRROR}")
    return MIRROR


@pytest.fixture(scope="module")
def released(mirror: Path) -> MMIFAMINNet:
    """The network with the authors' weights, loaded strictly (weights only), in eval mode."""
    net = build(**section("mmif-amin"))
    state = torch.load(mirror / "models" / "model_25.pth", map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def _grey(path: Path) -> np.ndarray:
    """An image as the authors' test script read it: PIL's convert("L")."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


@pytest.fixture(scope="module")
def authors(mirror: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per test id: the SPECT colour image, its luma, the MRI, and the authors' Y and colour."""
    names = sorted(p.stem for p in (mirror / "fusion_out" / "Y" / "SPECT_MRI").glob("*.png"))
    assert len(names) == 20
    return {
        name: {
            "spect": read_image(mirror / TEST_DIR / "SPECT" / f"{name}.png", mode="RGB"),
            "a": _grey(mirror / TEST_DIR / "SPECT" / f"{name}.png"),
            "b": _grey(mirror / TEST_DIR / "MRI" / f"{name}.png"),
            "y": read_image(mirror / "fusion_out" / "Y" / "SPECT_MRI" / f"{name}.png", mode="L"),
            "yuv": read_image(mirror / "fusion_out" / "YUV" / "SPECT_MRI" / f"{name}.png"),
        }
        for name in names
    }


@pytest.fixture(scope="module")
def ours(released: MMIFAMINNet, authors: dict) -> dict[str, np.ndarray]:
    """Our float32 output for each of the 20 pairs, fed as the authors' test script did: one
    pair at a time, ToTensor's uint8 / 255, SPECT luma in channel 0, MRI in channel 1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two spinning OpenMP threads on the shared 2 cores: 4x slower
    fused = {}
    try:
        for name, theirs in authors.items():
            a, b = (torch.tensor(theirs[k]).float().div(255)[None, None] for k in ("a", "b"))
            with torch.no_grad():
                fused[name] = released(a, b)[0, 0].numpy()
    finally:
        torch.set_num_threads(previous)
    return fused


def truncation_ties_only(fused: np.ndarray, theirs: np.ndarray, ours: np.ndarray) -> None:
    """Every pixel where our 8-bit value differs from theirs differs by one level, at a value
    x 255 within TIE of the integer between them (a float32 rounding tie, not an error)."""
    scaled = fused.astype(np.float32) * np.float32(255)
    differ = ours != theirs
    boundary = np.maximum(ours, theirs).astype(np.float32)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert np.all(np.abs(scaled[differ] - boundary[differ]) < TIE), "a difference not at a tie"


# ----------------------------------------------------------------------------- the released weights


def test_the_released_checkpoint_loads_strictly_with_every_key(mirror: Path) -> None:
    state = torch.load(mirror / "models" / "model_25.pth", map_location="cpu", weights_only=True)
    net = build(**section("mmif-amin"))
    assert list(net.state_dict()) == list(state)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    # The discarded sub-networks never learned: their zero-initialised last convs are still 0.
    for name, value in state.items():
        if name.endswith(("r.conv5.weight", "y.conv5.weight")):
            assert not value.any(), name


def test_the_network_reproduces_the_authors_grey_fusions(authors: dict, ours: dict) -> None:
    exact = differing = 0
    for name, theirs in authors.items():
        fused = ours[name]
        mine = (fused * np.float32(255)).astype(np.uint8)  # the authors' own conversion
        truncation_ties_only(fused, theirs["y"], mine)
        exact += int(np.array_equal(mine, theirs["y"]))
        differing += int((mine != theirs["y"]).sum())
    # Measured on CPU: 265 of 1,310,720 pixels (0.02 %) sit on ties the GPU cut the other way,
    # and 0 of the 20 images are bit-identical (docs/methods.md, MMIF-AMIN).
    assert differing < 1e-3 * 20 * 256 * 256, (exact, differing)


def test_the_authors_colour_fusions_are_their_grey_ones_in_opencv_yuv(
    authors: dict, ours: dict
) -> None:
    for name, theirs in authors.items():
        # Their own Y recoloured here gives their colour image exactly (tests the YUV code) ...
        np.testing.assert_array_equal(
            recolour_opencv_yuv(theirs["y"], theirs["spect"]), theirs["yuv"]
        )
        # ... and ours is within one level of it.
        mine = recolour_opencv_yuv(
            OutputSettings(**section("mmif-amin")["output"]).to_uint8(ours[name]), theirs["spect"]
        )
        assert np.abs(mine.astype(int) - theirs["yuv"].astype(int)).max() <= 1, name


def test_their_functional_luma_is_pils(authors: dict) -> None:
    for theirs in authors.values():
        np.testing.assert_array_equal(luma_pil(theirs["spect"]), theirs["a"])


def _cli(*args: str) -> int:
    from medfuse.cli import main

    base = ["fuse", "--params", str(REPO / "params.yaml"), "--method", "mmif-amin"]
    return main([*base, "--device", "cpu", "--precision", "float32", *args])


@pytest.mark.parametrize("name", IN_OUR_TEST_SPLIT)
def test_the_cli_gives_the_networks_fusions(
    name: str, mirror: Path, authors: dict, ours: dict, tmp_path: Path
) -> None:
    theirs, model = authors[name], str(mirror / "models" / "model_25.pth")
    mri = str(mirror / TEST_DIR / "MRI" / f"{name}.png")
    # The colour SPECT image: fused through PIL's luma, recoloured through OpenCV's YUV.
    spect = str(mirror / TEST_DIR / "SPECT" / f"{name}.png")
    assert _cli("--model", model, spect, mri, "-o", str(tmp_path / "colour.png")) == 0
    colour = read_image(tmp_path / "colour.png", mode="RGB")
    assert np.abs(colour.astype(int) - theirs["yuv"].astype(int)).max() <= 1
    # Its luma as a grey file: the grey fusion, recoloured into the colour one.
    write_image(tmp_path / "spect_y.png", theirs["a"])
    grey_a = str(tmp_path / "spect_y.png")
    assert _cli("--model", model, grey_a, mri, "-o", str(tmp_path / "y.png")) == 0
    grey = read_image(tmp_path / "y.png", mode="L")
    np.testing.assert_array_equal(recolour_opencv_yuv(grey, theirs["spect"]), colour)
    truncation_ties_only(ours[name], theirs["y"], grey)
    # Even on one CPU, a batch of 1 and a batch of 20 may cut a tie differently (measured: one
    # pixel of 15009): the CLI equals the network-level fusion but at ties.
    truncation_ties_only(ours[name], (ours[name] * np.float32(255)).astype(np.uint8), grey)


# ----------------------------------------------------------------------------- the network


def test_shapes_range_and_the_width_rule() -> None:
    torch.manual_seed(0)
    net = build(**section("mmif-amin")).eval()
    a, b = torch.rand(2, 1, 24, 48), torch.rand(2, 1, 24, 48)
    with torch.no_grad():
        fused = net(a, b)
    assert fused.shape == (2, 1, 24, 48) and fused.dtype == torch.float32
    assert fused.min() >= 0.0 and fused.max() <= 1.0
    with pytest.raises(ValueError, match=r"multiple of 16 .* got width 40"):
        net(torch.rand(1, 1, 32, 40), torch.rand(1, 1, 32, 40))
    assert issubclass(StripWidthError, DataError)  # the CLI reports it in one line


def test_the_parameter_count_is_the_authors() -> None:
    assert sum(p.numel() for p in build(**section("mmif-amin")).parameters()) == 76_684


def test_unknown_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"methods\.mmif-amin\.model: unknown key 'width'"):
        build(**section("mmif-amin", model={"width": 8}))
    with pytest.raises(ConfigError, match=r"methods\.mmif-amin\.loss: .*rmi_bce_weight"):
        build(**section("mmif-amin", loss={"rmi_bce_weight": 2.0}))
    net = build(**section("mmif-amin", model={"channels": 8}))
    assert net.config.channels == 8


def test_tokens_are_strips_of_one_row_of_one_channel() -> None:
    """Changing one pixel of one channel before the transformer changes only the 16-column strip
    of that row and channel holding it (a view, not a permute, makes the tokens)."""
    torch.manual_seed(0)
    layer = build(**section("mmif-amin")).basicLayer.eval()
    x = torch.rand(1, 16, 4, 32)
    y = x.clone()
    y[0, 3, 2, 20] += 1.0
    with torch.no_grad():
        changed = (layer(x) != layer(y)).nonzero().tolist()
    assert {(c, r) for _, c, r, _ in changed} == {(3, 2)}
    assert {col for *_, col in changed} <= set(range(16, 32))


# ----------------------------------------------------------------------------- the loss


def test_ssim_of_an_image_with_itself_is_one() -> None:
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    window = gaussian_window(11, 1.5)
    assert ssim_valid(x, x, window).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim_valid(x, 1 - x, window).item() < 0.0  # anti-correlated structure


def test_rmi_of_a_constant_target_is_the_floor_of_the_log_det() -> None:
    """Σ_Y = 0 makes M = 0, so the term is 0.5·logdet(εI)/9 = log(√ε) (with the 1e-8 inside
    the authors' log), whatever the prediction."""
    cfg = MMIFAMINLossConfig(**section("mmif-amin")["loss"])
    target = torch.full((1, 1, 32, 32), 0.3)
    prob = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = math.log(math.sqrt(cfg.rmi_epsilon) + 1e-8)
    assert rmi_term(prob, target, cfg).item() == pytest.approx(expected, rel=1e-9)


def test_rmi_of_identical_images_is_its_closed_form_and_the_smallest() -> None:
    """With P = Y, M = Σ − Σ(Σ + εI)⁻¹Σ has eigenvalues λε/(λ + ε) for the eigenvalues λ of Σ."""
    cfg = MMIFAMINLossConfig(**section("mmif-amin")["loss"])
    image = torch.rand(1, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    vectors = torch.nn.functional.unfold(
        torch.nn.functional.max_pool2d(image, 3, 3, 1), 3
    ).double()[0]
    centred = vectors - vectors.mean(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(centred @ centred.T)
    eps = cfg.rmi_epsilon
    expected = 0.5 * torch.log(lam * eps / (lam + eps) + eps).sum().item() / 9
    same = rmi_term(image, image, cfg).item()
    assert same == pytest.approx(expected, abs=1e-5)
    other = torch.rand(1, 1, 48, 48, generator=torch.Generator().manual_seed(3))
    assert same < rmi_term(other, image, cfg).item()


def test_average_gradient_on_known_images() -> None:
    assert average_gradient(torch.full((1, 1, 8, 8), 0.7)).item() == 0.0
    ramp = 0.01 * torch.arange(16.0).expand(1, 1, 8, 16)  # gx = 0.01 everywhere, gy = 0
    assert average_gradient(ramp).item() == pytest.approx(0.01 / math.sqrt(2), rel=1e-6)
    # Central differences inside, one-sided at the borders (the authors' explicit formula).
    x = torch.rand(1, 1, 9, 7, generator=torch.Generator().manual_seed(4))
    gx = torch.cat(
        [x[..., 1:2] - x[..., :1], (x[..., 2:] - x[..., :-2]) / 2, x[..., -1:] - x[..., -2:-1]], -1
    )
    gy = torch.cat(
        [
            x[..., 1:2, :] - x[..., :1, :],
            (x[..., 2:, :] - x[..., :-2, :]) / 2,
            x[..., -1:, :] - x[..., -2:-1, :],
        ],
        -2,
    )
    expected = torch.sqrt((gx**2 + gy**2) / 2).mean()
    assert average_gradient(x).item() == pytest.approx(expected.item(), rel=1e-6)


def test_entropy_is_the_binary_entropy_of_pixels_above_one_half() -> None:
    """The authors round [0, 1] images to uint8 before the histogram: only 0 and 1 remain."""
    quarter = torch.zeros(1, 1, 8, 8)
    quarter[..., :2, :] = 0.9  # 1/4 of the pixels above 0.5
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert entropy_bits(quarter).item() == pytest.approx(h, rel=1e-6)
    noise = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    assert 0.99 < entropy_bits(noise).item() <= 1.0  # not ~6 bits: the quirk
    assert entropy_bits(torch.full((1, 1, 8, 8), 0.5)).item() == 0.0  # 0.5 rounds to 0


def test_adaptive_weights_and_the_zero_over_zero_guard() -> None:
    net = build(**section("mmif-amin"))
    flat_a, flat_b = torch.zeros(1, 1, 32, 32), torch.full((1, 1, 32, 32), 0.2)
    # Both constant and both below 0.5: AG 0 and EN 0 for both, the authors' 0/0 is NaN.
    w = net.loss.weights(flat_a, flat_b)
    assert w == {"ag_a": 0.5, "ag_b": 0.5, "en_a": 0.5, "en_b": 0.5}
    loss, terms = net.training_loss(flat_a, flat_b)
    assert math.isfinite(loss.item()) and math.isfinite(terms["total"])
    ramp = 0.03 * torch.arange(32.0).expand(1, 1, 32, 32)  # 0 .. 0.93
    w = net.loss.weights(ramp, flat_b)  # only A has gradients; only A has pixels above 0.5
    assert (w["ag_a"], w["ag_b"], w["en_a"], w["en_b"]) == (1.0, 0.0, 1.0, 0.0)


def test_the_loss_is_the_weighted_sum_of_its_terms() -> None:
    torch.manual_seed(0)
    net = build(**section("mmif-amin")).train()
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    loss, terms = net.training_loss(a, b)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    parts = ("ssim_a", "ssim_b", "rmi_a", "rmi_b")
    assert sum(terms[k] for k in parts) == pytest.approx(loss.item(), rel=1e-6)
    assert terms["ag_a"] + terms["ag_b"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in terms.values())


def test_gradients_reach_what_learns_and_not_the_discarded_parts() -> None:
    torch.manual_seed(0)
    net = build(**section("mmif-amin")).train()
    a, b = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    # One step first: the dense blocks' last convs start at 0, which blocks the gradient of the
    # convs before them until they have moved.
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.training_loss(a, b)[0].backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    net.training_loss(a, b)[0].backward()
    grads = dict(net.named_parameters())
    silent = [n for n, p in grads.items() if p.grad is None or not p.grad.abs().sum()]
    assert sorted(silent) == sorted(n for n in grads if any(d in n for d in DISCARDED))
    assert all(grads[n].grad is None for n in silent)
    for block in net.basicLayer.blocks:  # queries and keys: a softmax over one token is 1
        assert not block.attn.qkv.weight.grad[:32].any() and block.attn.qkv.weight.grad[32:].any()


# ----------------------------------------------------------------------------- the fuse path


def test_output_settings_are_per_method(params: dict) -> None:
    assert OutputSettings.of(params, "mmif-amin") == OutputSettings("pil", "truncate", "opencv-yuv")
    project = OutputSettings(**params["output"])
    assert project == OutputSettings("bt601", "round", "ycbcr")
    assert OutputSettings.of(params, "wdualmine") == project
    # The released weights are fused as their method is.
    assert OutputSettings.of(params, "pretrained-mmif-amin") == OutputSettings.of(
        params, "mmif-amin"
    )
    assert OutputSettings.of(params, "dwt") == project
    broken = deep_merge(params, {"methods": {"mmif-amin": {"output": {"rounding": "floor"}}}})
    with pytest.raises(
        ConfigError, match=r"output \(with methods\.mmif-amin\.output\): rounding must be one of"
    ):
        OutputSettings.of(broken, "mmif-amin")
    fused = np.array([0.0, 0.5, 1.0 / 255 - 1e-7, 1.0])
    np.testing.assert_array_equal(
        replace(project, rounding="truncate").to_uint8(fused), [0, 127, 0, 255]
    )
    np.testing.assert_array_equal(project.to_uint8(fused), [0, 128, 1, 255])


def test_a_colour_test_split_is_truncated_and_recoloured_in_opencv_yuv(
    params: dict, tiny_prepared: Path, tracking: dict, tmp_path: Path
) -> None:
    merged = deep_merge(
        params,
        {
            "data": {"prepare": {"out_dir": str(tiny_prepared)}},
            "tracking": tracking,
            "train": {"device": "cpu", "precision": "float32"},
        },
    )
    validate(merged)
    torch.manual_seed(0)
    config = method_config(merged, "mmif-amin")
    net = build_learned("mmif-amin", config, "PET-MRI")
    weights = save_weights(
        tmp_path / "m", net, {"method": "mmif-amin", "pair": "PET-MRI", "config": config}
    )
    out = fuse_test_split(
        merged, "mmif-amin", "PET-MRI", out=tmp_path / "fused", model_path=weights
    )
    net.eval()
    for sample in PreparedData(tiny_prepared).samples("PET-MRI", "test"):
        a = torch.from_numpy(luma_pil(sample.a_rgb)).float()[None, None] / 255
        b = torch.tensor(sample.b).float()[None, None] / 255
        with torch.no_grad():
            want = (net(a, b)[0, 0].numpy() * np.float32(255)).astype(np.uint8)
        grey = read_image(out / "y" / f"{sample.name}.png", mode="L")
        np.testing.assert_array_equal(grey, want)
        colour = read_image(out / f"{sample.name}.png", mode="RGB")
        np.testing.assert_array_equal(colour, recolour_opencv_yuv(want, sample.a_rgb))


# ----------------------------------------------------------------------------- training


@pytest.fixture
def tiny_params(params: dict, tiny_prepared: Path, tracking: dict) -> dict:
    """The real mmif-amin settings (whole images, batch 1) on the 32 x 32 tiny pairs."""
    overlay = {
        "data": {"prepare": {"out_dir": str(tiny_prepared)}},
        "tracking": tracking,
        "train": {"sample_fusions": 0, "device": "cpu"},
        "methods": {"mmif-amin": {"optim": {"epochs": 2}}},
    }
    merged = deep_merge(params, overlay)
    validate(merged)
    return merged


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(
    tiny_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    from medfuse.train import train_from_params

    tiny_params = deep_merge(tiny_params, {"train": {"precision": precision}})
    job = {"method": "mmif-amin", "pair": "CT-MRI", "epochs": 2}
    straight = train_from_params(tiny_params, out_dir=tmp_path / "a", **job)

    # 3 train pairs, batch 1: 3 steps per epoch. Die in the middle of epoch 2.
    original = MMIFAMINNet.training_loss
    calls = {"n": 0}

    def dies_at_step_5(self, a, b):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, a, b)

    monkeypatch.setattr(MMIFAMINNet, "training_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_from_params(tiny_params, out_dir=tmp_path / "b", **job)
    assert load_checkpoint(checkpoint_path(tmp_path / "b"))["epoch"] == 1
    assert not (tmp_path / "b" / WEIGHTS).exists()
    monkeypatch.setattr(MMIFAMINNet, "training_loss", original)
    resumed = train_from_params(tiny_params, out_dir=tmp_path / "b", resume="yes", **job)

    want, got = load_checkpoint(straight), load_checkpoint(resumed)
    assert want.keys() == got.keys()
    for key in want:  # BatchNorm running statistics included
        assert torch.equal(want[key], got[key]), key
    assert not torch.equal(want["Basic3x3.bn1.running_mean"], torch.zeros(16))
