"""Every registered method builds from params.yaml; classical ones fuse a tiny pair."""

from __future__ import annotations

import numpy as np
import pytest

from medfuse.config import deep_merge, method_config
from medfuse.errors import ConfigError
from medfuse.methods import build_method, method_names
from medfuse.methods.base import Fuser
from medfuse.methods.net import FusionNet
from tests.tiny import TINY_PEER_BACKBONE

# Tiny sizes for the learned methods (the same code as the papers' sizes; see test_peers.py).
TINY_OVERRIDES = {
    "wdualmine": {"model": {"widths": [8, 8, 8, 8]}},
    "asfe-fusion": {"model": {**TINY_PEER_BACKBONE, "expert_slots": 4}},
    "adafuse": {"model": {**TINY_PEER_BACKBONE, "depth": 1}},
}


def _config(params: dict, name: str) -> dict:
    config = deep_merge(method_config(params, name), TINY_OVERRIDES.get(name, {}))
    if config["kind"] == "learned":
        config["pair"] = "CT-MRI"  # as the training loop does (AdaFuse's encoders depend on it)
    return config


def test_every_registered_method_has_a_params_section(params: dict) -> None:
    assert set(method_names()) <= set(params["methods"])
    experiments = params["experiments"]
    assert {*experiments["learned"], *experiments["classical"]} <= set(method_names())


@pytest.mark.parametrize("name", method_names())
def test_every_method_builds_from_params(params: dict, name: str) -> None:
    config = _config(params, name)
    method = build_method(name, config)
    if config["kind"] == "learned":
        assert isinstance(method, FusionNet)
    else:
        assert isinstance(method, Fuser)


@pytest.mark.parametrize(
    "name", [n for n in method_names() if n in {"average", "max", "dwt", "laplacian"}]
)
def test_classical_methods_fuse_a_tiny_pair(params: dict, name: str, tiny_pair) -> None:
    a, b = (x.astype(np.float64) / 255.0 for x in tiny_pair)
    fused = build_method(name, _config(params, name)).fuse(a, b)
    assert fused.shape == a.shape
    assert fused.min() >= 0.0 and fused.max() <= 1.0
    assert not np.allclose(fused, a) and not np.allclose(fused, b)  # both sources contribute


def test_classical_settings_reach_the_constructor(params: dict) -> None:
    dwt = build_method("dwt", method_config(params, "dwt"))
    assert (dwt.wavelet.name, dwt.levels) == (
        params["methods"]["dwt"]["wavelet"],
        params["methods"]["dwt"]["levels"],
    )
    laplacian = {**method_config(params, "laplacian"), "levels": 2}
    assert build_method("laplacian", laplacian).levels == 2


def test_a_setting_missing_from_params_is_named_not_defaulted(params: dict) -> None:
    dwt = {k: v for k, v in method_config(params, "dwt").items() if k != "mode"}
    with pytest.raises(ConfigError, match=r"methods.dwt: missing key\(s\) mode"):
        build_method("dwt", dwt)


def test_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_method("nope", {})
