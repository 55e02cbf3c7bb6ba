"""Each W-DUALMINE loss term on inputs whose value is known analytically."""

from __future__ import annotations

import math

import pytest
import torch

from medfuse.config import config_from_mapping
from medfuse.errors import ConfigError
from medfuse.methods.wdualmine_losses import (
    LossWeights,
    ReconstructionHeads,
    correlation,
    infonce,
    infonce_pair,
    l_avg,
    l_cc,
    l_grad,
    l_rec,
)
from tests.settings import section

TERMS = ("avg", "grad", "cc", "mi", "rec")


def pair(seed: int = 0, n: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.rand(n, 1, size, size, generator=g)


def test_l_avg_is_zero_for_the_average_and_l1_otherwise() -> None:
    a, b = pair()
    assert l_avg((a + b) / 2, a, b).item() == pytest.approx(0.0, abs=1e-7)
    assert l_avg((a + b) / 2 + 0.1, a, b).item() == pytest.approx(0.1, abs=1e-6)


def test_l_grad_is_zero_when_fused_has_the_larger_gradient_everywhere() -> None:
    a, _ = pair()
    flat = torch.full_like(a, 0.5)  # no gradient at all
    assert l_grad(a, a, flat).item() == pytest.approx(0.0, abs=1e-7)
    # A flat fused image misses every edge of a ramp of slope 1/16 per column: the Sobel
    # magnitude is 4 * 2/16 = 0.5 inside and 4 * 1/16 = 0.25 on the two replicate-padded
    # border columns, so the loss is their mean.
    ramp = torch.arange(16.0).repeat(16, 1)[None, None] / 16
    loss = l_grad(torch.zeros_like(ramp), ramp, torch.zeros_like(ramp)).item()
    assert loss == pytest.approx((14 * 0.5 + 2 * 0.25) / 16, abs=1e-6)


def test_l_grad_exact_on_an_interior_ramp() -> None:
    ramp = torch.arange(16.0).repeat(16, 1)[None, None] / 16
    scaled = 2 * ramp  # gradients twice as large: |G(2r) - G(r)| = G(r)
    expected = l_grad(torch.zeros_like(ramp), ramp, torch.zeros_like(ramp))
    assert l_grad(scaled, ramp, torch.zeros_like(ramp)).item() == pytest.approx(expected.item())


def test_l_cc_is_zero_for_perfect_correlation_and_two_for_anticorrelation() -> None:
    a, b = pair()
    avg = (a + b) / 2
    assert l_cc(3 * avg + 0.2, a, b).item() == pytest.approx(0.0, abs=1e-5)
    assert l_cc(1 - avg, a, b).item() == pytest.approx(2.0, abs=1e-5)


def test_correlation_matches_numpy() -> None:
    import numpy as np

    x, y = pair(3)
    expected = [np.corrcoef(x[i].flatten(), y[i].flatten())[0, 1] for i in range(2)]
    assert correlation(x, y).tolist() == pytest.approx(expected, abs=1e-5)


def test_infonce_values() -> None:
    z = torch.eye(4)
    # Perfect alignment: logit 1/tau for the positive, 0 for the 3 negatives.
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3))
    assert infonce(z, z, tau).item() == pytest.approx(expected, rel=1e-5)
    # Identical keys: every logit equal, the loss is log(batch size).
    same = torch.ones(4, 8)
    assert infonce(torch.randn(4, 8), same, tau).item() == pytest.approx(math.log(4), rel=1e-5)
    # Cosine similarity: scaling a projection does not change the loss.
    assert infonce(3 * z, z, tau).item() == pytest.approx(expected, rel=1e-5)
    assert infonce_pair(z, z, same[:, :4], tau).item() == pytest.approx(
        (expected + math.log(4)) / 2, rel=1e-5
    )


def test_l_rec_is_the_sum_of_two_l1_terms() -> None:
    a, b = pair()
    recon = torch.cat((a, b), dim=1)
    assert l_rec(recon, a, b).item() == pytest.approx(0.0, abs=1e-7)
    assert l_rec(recon + 0.25, a, b).item() == pytest.approx(0.5, abs=1e-6)


def test_reconstruction_heads_are_independent() -> None:
    """The grouped second conv keeps R1 and R2 separate: R2's weights do not affect R1."""
    heads = ReconstructionHeads(hidden=4)
    x = torch.rand(1, 1, 8, 8)
    before = heads(x)[:, :1].clone()
    with torch.no_grad():
        heads.conv2.weight[1].add_(1.0)  # the second head's filter
        heads.conv1.weight[4:].add_(1.0)  # the second head's hidden channels
    torch.testing.assert_close(heads(x)[:, :1], before)


def test_weights_come_from_params_yaml_whole() -> None:
    """Every weight is read from params.yaml's section: unknown or missing keys are named."""
    loss = section("wdualmine")["loss"]
    w = config_from_mapping(LossWeights, "loss", {**loss, "grad": 0})
    assert w.avg == float(loss["avg"]) and w.grad == 0.0
    with pytest.raises(ConfigError, match="unknown key 'avgg' \\(did you mean 'avg'"):
        config_from_mapping(LossWeights, "loss", {**loss, "avgg": 1})
    with pytest.raises(ConfigError, match=r"loss: missing key\(s\) mi \(set them in params.yaml"):
        config_from_mapping(LossWeights, "loss", {k: v for k, v in loss.items() if k != "mi"})
    with pytest.raises(ConfigError, match="not all 0"):
        config_from_mapping(LossWeights, "loss", {**loss, **dict.fromkeys(TERMS, 0)})
    with pytest.raises(ConfigError, match="tau"):
        config_from_mapping(LossWeights, "loss", {**loss, "tau": 0})
