"""params.yaml loading: schema validation, profiles, overlays, variants as configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medfuse.config import deep_merge, load_params, method_config
from medfuse.errors import ConfigError


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_repository_params_are_valid_for_every_profile(repo_root):
    for profile in ("paper", "quick"):
        params = load_params(repo_root / "params.yaml", profile=profile)
        assert params["profile"] == profile


def test_quick_profile_shrinks_sizes_only(repo_root):
    paper = load_params(repo_root / "params.yaml", profile="paper")
    quick = load_params(repo_root / "params.yaml", profile="quick")
    assert quick["data"]["prepare"]["image_size"] < 256
    assert quick["data"]["prepare"]["pairs"] == paper["data"]["prepare"]["pairs"]
    assert quick["methods"].keys() == paper["methods"].keys()


def test_bad_value_names_the_key(tmp_path, repo_root):
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["data"]["prepare"]["split"] = "random"
    path = _write(tmp_path / "params.yaml", params)
    with pytest.raises(ConfigError, match=r"data\.prepare\.split: 'random' is not one of"):
        load_params(path)


def test_overlay_and_environment_overlay_merge_in_order(tmp_path, repo_root, monkeypatch):
    first = _write(tmp_path / "a.yaml", {"data": {"download": {"workers": 2}}})
    second = _write(tmp_path / "b.yaml", {"data": {"download": {"workers": 3, "retries": 9}}})
    monkeypatch.setenv("MEDFUSE_PARAMS_OVERLAY", str(second))
    params = load_params(repo_root / "params.yaml", overlays=[first])
    assert params["data"]["download"]["workers"] == 3
    assert params["data"]["download"]["retries"] == 9
    assert params["data"]["download"]["timeout_s"] == 30  # untouched keys survive


def test_unknown_profile_is_a_clear_error(repo_root):
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_params(repo_root / "params.yaml", profile="nope")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_params(bad)


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": [1]}}
    merged = deep_merge(base, {"a": {"b": 2}})
    assert merged == {"a": {"b": 2, "c": [1]}} and base == {"a": {"b": 1, "c": [1]}}


def test_variants_are_overrides_of_one_method(params):
    full = method_config(params, "wdualmine", "full")
    no_we = method_config(params, "wdualmine", "no_we")
    no_avg = method_config(params, "wdualmine", "no_l_avg")
    assert full["model"]["use_we"] and not no_we["model"]["use_we"]
    assert no_avg["loss"]["avg"] == 0 and no_avg["loss"]["grad"] == full["loss"]["grad"]
    with pytest.raises(ConfigError, match="unknown variant"):
        method_config(params, "wdualmine", "no_such")
