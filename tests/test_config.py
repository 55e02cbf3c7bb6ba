"""params.yaml loading: schema validation, profiles, overlays, variants as configuration."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from medfuse.cli import main
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


# ----------------------------------------------------------------- unknown keys, YAML numbers


def _load_with(tmp_path: Path, repo_root: Path, overlay_text: str) -> dict:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(overlay_text)
    return load_params(repo_root / "params.yaml", overlays=[overlay])


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ("trian: {epochs: 1}\n", r": unknown key 'trian' \(did you mean 'train'\?\)$"),
        (
            "methods: {wdualmine: {optim: {learning_rate: 0.001}}}\n",
            r": methods\.wdualmine\.optim: unknown key 'learning_rate' \(did you mean 'lr'\?\)$",
        ),
        (
            "methods: {dwt: {wavlet: db2}}\n",
            r": methods\.dwt: unknown key 'wavlet' \(did you mean 'wavelet'\?\)$",
        ),
        (
            "methods: {laplacian: {sigm: 1.0}}\n",
            r": methods\.laplacian: unknown key 'sigm' \(did you mean 'sigma'\?\)$",
        ),
        ("methods: {dwtt: {kind: classical}}\n", r": methods: unknown key 'dwtt'"),
        (
            "methods: {asfe-fusion: {loss: {ssim_windw: 7}}}\n",
            r": methods\.asfe-fusion\.loss: unknown key 'ssim_windw'",
        ),
        (
            "methods: {adafuse: {model: {dept: 2}}}\n",
            r": methods\.adafuse\.model: unknown key 'dept' \(did you mean 'depth'\?\)$",
        ),
        (
            "methods: {published-adafuse: {datset: x}}\n",
            r": methods\.published-adafuse: unknown key 'datset'",
        ),
        (
            "variants: {wdualmine: {no_gce: {model: {use_gcee: false}}}}\n",
            r": variants\.wdualmine\.no_gce\.model: unknown key 'use_gcee'",
        ),
        (
            "variants: {wdualmine: {fast: {optim: {epoch: 1}}}}\n",
            r": variants\.wdualmine\.fast\.optim: unknown key 'epoch' \(did you mean 'epochs'\?\)$",
        ),
        ("evaluate: {conventon: paper}\n", r": evaluate: unknown key 'conventon'"),
        ("report: {figure_sample: 2}\n", r": report: unknown key 'figure_sample'"),
        ("tracking: {url: x}\n", r": tracking: unknown key 'url' \(did you mean 'uri'\?\)$"),
        ("data: {download: {retry: 1}}\n", r": data\.download: unknown key 'retry'"),
        ("train: {augment: {hflp: true}}\n", r": train\.augment: unknown key 'hflp'"),
    ],
)
def test_unknown_key_is_one_line_naming_it_and_the_nearest_known(
    tmp_path, repo_root, overlay, message
):
    with pytest.raises(ConfigError, match=message) as caught:
        _load_with(tmp_path, repo_root, overlay)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{repo_root / 'params.yaml'} + ")  # names the files


@pytest.mark.parametrize(
    ("wavelet", "where", "hint"),
    [
        ("db99", "methods.dwt", " (did you mean 'db9'?)"),
        ("xyzzy", "methods.dwt", ""),
    ],
)
def test_bad_wavelet_name_is_one_line_naming_the_key(tmp_path, repo_root, wavelet, where, hint):
    with pytest.raises(ConfigError) as caught:
        _load_with(tmp_path, repo_root, f"methods: {{dwt: {{wavelet: {wavelet}}}}}\n")
    message = str(caught.value)
    assert message.endswith(
        f'{where}.wavelet: unknown wavelet {wavelet!r}{hint}; known: pywt.wavelist(kind="discrete")'
    )
    assert "\n" not in message


def test_a_variant_is_checked_against_its_own_method(tmp_path, repo_root):
    with pytest.raises(ConfigError, match=r"variants\.dwt\.lo\.wavelet: unknown wavelet 'hear'"):
        _load_with(tmp_path, repo_root, "variants: {dwt: {lo: {wavelet: hear}}}\n")
    # A W-DUALMINE model key is not a key of the peers' models.
    with pytest.raises(ConfigError, match=r"variants\.adafuse\.x\.model: unknown key 'use_gce'"):
        _load_with(tmp_path, repo_root, "variants: {adafuse: {x: {model: {use_gce: false}}}}\n")
    params = _load_with(tmp_path, repo_root, "variants: {dwt: {haar: {wavelet: haar}}}\n")
    assert method_config(params, "dwt", "haar")["wavelet"] == "haar"


def test_more_published_images_are_accepted(tmp_path, repo_root):
    params = _load_with(
        tmp_path, repo_root, "methods: {published-mine: {kind: published, dataset: mine}}\n"
    )
    assert params["methods"]["published-mine"]["dataset"] == "mine"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 0.001), ("1E-3", 0.001), ("5e+2", 500.0), ("2e4", 20000.0), ("+1.5e-3", 0.0015)],
)
def test_exponent_without_a_dot_is_a_number(tmp_path, repo_root, text, value):
    params = _load_with(tmp_path, repo_root, f"methods: {{wdualmine: {{optim: {{lr: {text}}}}}}}\n")
    lr = params["methods"]["wdualmine"]["optim"]["lr"]
    assert isinstance(lr, float) and lr == pytest.approx(value)


def test_yaml_numbers_and_strings_otherwise_as_before(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("a: 1.0e-5\nb: 3\nc: db2\nd: 1e\ne: e5\nf: '1e-3'\ng: 0.5\nh: -2e-3\n")
    from medfuse.config import _read_yaml

    assert _read_yaml(path) == {
        "a": 1e-5, "b": 3, "c": "db2", "d": "1e", "e": "e5", "f": "1e-3", "g": 0.5, "h": -0.002
    }  # fmt: skip


def test_every_profile_overlay_is_valid(repo_root):
    """params.yaml merged with each profile's overlay in workflow/profiles passes the schema."""
    overlays = (repo_root / "workflow" / "profiles").glob("*/params.yaml")
    profiles = sorted(p.parent.name for p in overlays)
    assert {"paper", "quick", "slurm"} <= set(profiles)
    for profile in profiles:
        assert load_params(repo_root / "params.yaml", profile=profile)["profile"] == profile


def test_schema_lists_exactly_the_settings_the_code_reads():
    """The schema's per-method keys are the config dataclasses' fields and the classical
    classes' keyword arguments: a new setting in the code must be added to the schema."""
    import dataclasses
    import inspect

    from medfuse.config import SCHEMA_PATH
    from medfuse.data.dataset import Augment
    from medfuse.methods.adafuse import AdaFuseConfig
    from medfuse.methods.asfe_fusion import ASFEConfig, LossConfig
    from medfuse.methods.classical import DWTFusion, LaplacianFusion
    from medfuse.methods.wdualmine import WDualmineConfig
    from medfuse.methods.wdualmine_losses import LossWeights

    defs = yaml.safe_load(SCHEMA_PATH.read_text())["$defs"]

    def keys(schema: dict) -> set[str]:
        return set(schema["properties"])

    def fields(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def kwargs(cls: type) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    assert keys(defs["wdualmine"]["properties"]["model"]) == fields(WDualmineConfig)
    assert keys(defs["wdualmine"]["properties"]["loss"]) == fields(LossWeights)
    assert keys(defs["asfe-fusion"]["properties"]["model"]) == fields(ASFEConfig)
    assert keys(defs["adafuse"]["properties"]["model"]) == fields(AdaFuseConfig)
    assert keys(defs["peer-loss"]) == fields(LossConfig)
    assert keys(defs["dwt"]) - {"kind"} == kwargs(DWTFusion)
    assert keys(defs["laplacian"]) - {"kind"} == kwargs(LaplacianFusion)
    train = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["train"]
    assert keys(train["properties"]["augment"]) == fields(Augment)


def test_cli_bad_overlay_is_one_line_and_exit_2(tmp_path, repo_root, capsys):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("methods: {wdualmine: {optim: {learning_rate: 0.001}}}\n")
    params = str(repo_root / "params.yaml")
    code = main(["train", "--pair", "CT-MRI", "--params", params, "--overlay", str(overlay)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert err.startswith(f"medfuse train: error: {params} + ")
    assert err.strip().endswith(
        "methods.wdualmine.optim: unknown key 'learning_rate' (did you mean 'lr'?)"
    )


def test_paths_are_relative_to_the_params_file_when_run_elsewhere(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDFUSE_PARAMS_OVERLAY", raising=False)
    monkeypatch.chdir(repo_root)
    here = load_params(repo_root / "params.yaml")
    assert here["data"]["prepare"]["out_dir"] == "data/prepared"  # unchanged for the tools
    assert here["tracking"]["uri"] == "sqlite:///mlflow.db"
    monkeypatch.chdir(tmp_path)
    elsewhere = load_params(repo_root / "params.yaml")
    assert elsewhere["data"]["prepare"]["out_dir"] == str(repo_root / "data/prepared")
    assert elsewhere["data"]["datasets"]["aanlib"]["manifest"] == str(
        repo_root / "data/manifests/aanlib.tsv"
    )
    assert elsewhere["data"]["datasets"]["aanlib"]["base_url"].startswith("https://")
    assert elsewhere["tracking"]["uri"] == f"sqlite:///{repo_root / 'mlflow.db'}"


def test_a_command_run_elsewhere_says_where_it_looked(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--params` from another folder reads the project's prepared data, and the error for a
    missing one names the project's path, not the current folder's."""
    import subprocess

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(repo_root / "params.yaml", project / "params.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFUSE_", "MLFLOW_"))}
    result = subprocess.run(
        [
            "medfuse",
            "evaluate",
            "--params",
            str(project / "params.yaml"),
            "--pair",
            "CT-MRI",
            "--fused",
            "results/fused/dwt/CT-MRI/full",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert str(project / "data" / "prepared") in result.stderr


LEARNED_WITH_SETTINGS = ("wdualmine", "asfe-fusion", "adafuse", "mmif-amin", "dm-fnet")


@pytest.mark.parametrize("method", LEARNED_WITH_SETTINGS)
def test_no_setting_has_a_default_outside_params_yaml(params, method):
    """Each model and loss setting is read from params.yaml: dropping any one of them is an
    error naming it, never a value the code fills in."""
    from medfuse.models import build_learned

    section = method_config(params, method)
    for part in ("model", "loss"):
        for key in section[part]:
            broken = deep_merge(section, {})
            del broken[part][key]
            with pytest.raises(ConfigError, match=rf"\.{part}: missing key\(s\) {key} "):
                build_learned(method, broken, "CT-MRI")


@pytest.mark.parametrize(
    ("section", "key"),
    [("train", "precision"), ("train", "augment"), ("output", "rounding"), (None, "output")],
)
def test_a_params_file_missing_a_key_is_refused_naming_it(tmp_path, repo_root, section, key):
    data = yaml.safe_load((repo_root / "params.yaml").read_text())
    del (data[section] if section else data)[key]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"{section or '<top level>'}: '{key}' is a required"):
        load_params(path)


def test_every_study_overlay_loads_over_the_studys_starting_point(repo_root):
    """docs/study/run.sh merges base.yaml, then one overlay: each must stay a valid params set."""
    study = repo_root / "docs" / "study"
    overlays = sorted(study.glob("*.yaml"))
    assert len(overlays) >= 9
    for overlay in overlays:
        params = load_params(repo_root / "params.yaml", [study / "base.yaml", overlay])
        assert params["methods"]["wdualmine"]["model"]["head_init_scale"] in (0.0, 0.01, 0.1)
