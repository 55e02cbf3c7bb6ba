"""The training loop: data augmentation, checkpoints, exact resume, MLflow logging, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medfuse.config import deep_merge, validate
from medfuse.data.dataset import Augment, PairDataset, augment_pair
from medfuse.data.prepared import PreparedData
from medfuse.errors import ConfigError, DataError
from medfuse.methods.wdualmine import WDualmine
from medfuse.models import (
    load_checkpoint,
    resolve_device,
    save_checkpoint,
)
from medfuse.plan import META, WEIGHTS, checkpoint_path
from medfuse.precision import resolve_precision
from medfuse.tracking import code_fingerprint
from medfuse.train import resolve_settings, train_from_params

TINY_METHOD = {
    "model": {"widths": [4, 8, 8, 8], "proj_dim": 8},
    "optim": {"batch_size": 2, "epochs": 2, "lr": 1e-3},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_overlay(prepared: Path, tracking: dict) -> dict:
    return {
        "data": {"prepare": {"out_dir": str(prepared)}},
        "tracking": tracking,  # an absolute sqlite:////... URI (four slashes)
        "train": {"image_size": 32, "sample_fusions": 1, "device": "cpu"},
        "methods": {"wdualmine": TINY_METHOD},
    }


@pytest.fixture
def tiny_params(params: dict, tiny_prepared: Path, tracking: dict) -> dict:
    merged = deep_merge(params, tiny_overlay(tiny_prepared, tracking))
    validate(merged)
    return merged


def client_for(params: dict):
    from mlflow.tracking import MlflowClient

    from medfuse.tracking import tracking_uri

    return MlflowClient(tracking_uri(params))


# ---- data ----


def test_augment_is_identical_for_both_images_and_seeded() -> None:
    a = np.arange(64, dtype=np.uint8).reshape(8, 8)
    b = 255 - a
    seen = set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        ta, tb = augment_pair(a, b, rng, Augment(True, True, True), crop=6)
        assert ta.shape == (6, 6)
        np.testing.assert_array_equal(tb, 255 - ta)  # the same crop, flips and turn
        seen.add(ta.tobytes())
        again = augment_pair(a, b, np.random.default_rng(seed), Augment(True, True, True), crop=6)
        np.testing.assert_array_equal(again[0], ta)
    assert len(seen) > 5
    off = augment_pair(a, b, np.random.default_rng(0), Augment(False, False, False), None)
    np.testing.assert_array_equal(off[0], a)


def test_dataset_items(tiny_prepared: Path) -> None:
    samples = PreparedData(tiny_prepared).samples("PET-MRI", "train")
    data = PairDataset(samples, seed=1, augment=Augment(True, True, True), crop=16)
    a, b = data[0]
    assert a.dtype == torch.float32 and a.shape == (1, 16, 16) and b.shape == (1, 16, 16)
    assert a.min() >= 0.0 and a.max() <= 1.0
    torch.testing.assert_close(data[0][0], a)  # same epoch, same item: the same draw
    epoch0 = [data[i][0] for i in range(len(data))]
    data.set_epoch(1)
    assert any(not torch.equal(x, data[i][0]) for i, x in enumerate(epoch0))


# ---- checkpoints ----


class NotATensor:
    """Anything a weights-only load must refuse."""


def test_pickled_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": NotATensor()}, path)
    with pytest.raises(DataError, match=r"evil\.pt: refused: not a weights-only checkpoint"):
        load_checkpoint(path)


def test_checkpoint_round_trip_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"epoch": 3, "w": torch.ones(2), "rng": {"x": [1, 2]}})
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary left behind
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.ones(2))


def test_the_same_state_is_saved_as_the_same_bytes(tmp_path: Path) -> None:
    """A retrained or resumed model gives DVC the same hash (torch would otherwise name the
    zip's inner folder after the random temporary file)."""
    state = {"epoch": 3, "w": torch.arange(4.0)}
    save_checkpoint(tmp_path / "a.pt", state)
    save_checkpoint(tmp_path / "other name.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other name.pt").read_bytes()


def test_resume_refuses_a_checkpoint_of_another_variant(tiny_params: dict, tmp_path: Path) -> None:
    out = tmp_path / "model"
    save_checkpoint(
        checkpoint_path(out),
        {"method": "wdualmine", "pair": "CT-MRI", "variant": "no_we", "config": "{}", "epoch": 1},
    )
    with pytest.raises(ConfigError, match="variant='no_we'"):
        train_from_params(tiny_params, pair="CT-MRI", out_dir=out, resume="yes")


def test_resume_refuses_a_pickled_checkpoint(tiny_params: dict, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    torch.save({"payload": NotATensor()}, checkpoint_path(out))
    with pytest.raises(DataError, match="refused"):
        train_from_params(tiny_params, pair="CT-MRI", out_dir=out, resume="yes")


# ---- the loop ----


def test_train_writes_weights_and_logs_to_mlflow(tiny_params: dict, tmp_path: Path) -> None:
    out = tmp_path / "model"
    weights = train_from_params(tiny_params, pair="CT-MRI", variant="no_sgm", out_dir=out)
    assert weights == out / WEIGHTS
    meta = json.loads((out / META).read_text())
    assert meta["variant"] == "no_sgm" and meta["config"]["model"]["use_sgm"] is False
    state = load_checkpoint(weights)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert load_checkpoint(checkpoint_path(out))["epoch"] == 2
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and "loss/total" in history[0] and len(history) == 3

    client = client_for(tiny_params)
    experiment = client.get_experiment_by_name("CT-MRI")
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "CT-MRI").as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["step"], tags["method"], tags["pair"], tags["variant"]) == (
        "train",
        "wdualmine",
        "CT-MRI",
        "no_sgm",
    )
    assert "git_commit" in tags and len(tags["data_manifest_sha256"]) == 64
    assert tags["code_sha256"] == code_fingerprint()  # what ran, also without git
    logged = run.data.params
    assert logged["seed"] == str(tiny_params["seed"])
    assert logged["methods.wdualmine.optim.lr"] == "0.001"
    assert logged["run.epochs"] == "2"
    for name in (
        "loss/total",
        "loss/avg",
        "loss/grad",
        "loss/cc",
        "loss/mi",
        "loss/rec",
        "images_per_s",
        "s_per_step",
    ):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/model.pt", "model/model.json"}
    samples = client.list_artifacts(run.info.run_id, "samples")
    assert len(samples) == 1 and samples[0].path.endswith(".png")


def test_resuming_a_finished_training_does_nothing(tiny_params: dict, tmp_path: Path) -> None:
    """`--resume` on a training that ran to its end leaves weights, history, samples and the
    MLflow run untouched (a rerun script or a second `medfuse train --resume` is harmless)."""
    out = tmp_path / "model"
    weights = train_from_params(tiny_params, pair="CT-MRI", out_dir=out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    client = client_for(tiny_params)
    (run,) = client.search_runs([client.get_experiment_by_name("CT-MRI").experiment_id])
    end_time = run.info.end_time

    assert train_from_params(tiny_params, pair="CT-MRI", out_dir=out, resume="yes") == weights
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    (again,) = client.search_runs([client.get_experiment_by_name("CT-MRI").experiment_id])
    assert (again.info.run_id, again.info.end_time) == (run.info.run_id, end_time)

    # Weights of another run (e.g. killed after its last checkpoint, before its weights): the
    # resume writes this run's weights.
    meta = json.loads((out / META).read_text())
    (out / META).write_text(json.dumps({**meta, "run_id": "another"}))
    train_from_params(tiny_params, pair="CT-MRI", out_dir=out, resume="yes")
    assert json.loads((out / META).read_text())["run_id"] == run.info.run_id


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(
    tiny_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    tiny_params = deep_merge(tiny_params, {"train": {"precision": precision}})
    straight = train_from_params(tiny_params, pair="CT-MRI", out_dir=tmp_path / "a", epochs=3)

    # 3 train pairs, batch 2: 2 steps per epoch. Die in the middle of epoch 3.
    original = WDualmine.training_loss
    calls = {"n": 0}

    def dies_at_step_6(self, a, b):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, a, b)

    monkeypatch.setattr(WDualmine, "training_loss", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_from_params(tiny_params, pair="CT-MRI", out_dir=tmp_path / "b", epochs=3)
    assert load_checkpoint(checkpoint_path(tmp_path / "b"))["epoch"] == 2
    assert not (tmp_path / "b" / WEIGHTS).exists()
    monkeypatch.setattr(WDualmine, "training_loss", original)
    resumed = train_from_params(
        tiny_params, pair="CT-MRI", out_dir=tmp_path / "b", epochs=3, resume="yes"
    )

    want, got = load_checkpoint(straight), load_checkpoint(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key

    client = client_for(tiny_params)
    runs = client.search_runs([client.get_experiment_by_name("CT-MRI").experiment_id])
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FINISHED", "FINISHED"]  # the killed run was reopened and finished
    resumed_run = next(
        r
        for r in runs
        if r.info.run_id != json.loads((tmp_path / "a" / META).read_text())["run_id"]
    )
    steps = [m.step for m in client.get_metric_history(resumed_run.info.run_id, "loss/total")]
    assert steps == [1, 2, 3]
    epochs = [line.split(",")[0] for line in (tmp_path / "b/history.csv").read_text().split()]
    assert epochs == ["epoch", "1", "2", "3"]  # the history survives the kill and resume


def _dies_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    original = WDualmine.training_loss
    calls = {"n": 0}

    def dies(self, a, b):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self, a, b)

    monkeypatch.setattr(WDualmine, "training_loss", dies)


def _epochs_done(out: Path) -> list[int]:
    return pd.read_csv(out / "history.csv")["epoch"].tolist()


_LOSSES = ["loss/total", "loss/avg", "loss/grad", "loss/cc", "loss/mi", "loss/rec"]


def test_a_rerun_of_an_interrupted_pipeline_training_continues_it(
    tiny_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun of the same training (what Snakemake and DVC do after an interruption; the default
    resume mode): killed in epoch 3, its model folder then removed by the tool, it continues from
    epoch 2 to the uninterrupted weights, with the whole history."""
    straight = train_from_params(tiny_params, pair="CT-MRI", out_dir=tmp_path / "a", epochs=3)
    out = tmp_path / "b"
    with monkeypatch.context() as patched:
        _dies_at_step(patched, 6)  # 2 steps an epoch: in epoch 3
        with pytest.raises(KeyboardInterrupt):
            train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=3)
    shutil.rmtree(out)  # DVC removes a stage's outs before it reruns the stage
    assert load_checkpoint(checkpoint_path(out))["epoch"] == 2  # kept beside the folder

    resumed = train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=3)
    want, got = load_checkpoint(straight), load_checkpoint(resumed)
    assert all(torch.equal(want[key], got[key]) for key in want)
    assert _epochs_done(out) == [1, 2, 3]
    assert pd.read_csv(out / "history.csv")[_LOSSES].equals(
        pd.read_csv(tmp_path / "a" / "history.csv")[_LOSSES]
    )


@pytest.mark.parametrize("change", ["settings", "code", "data", "fewer epochs"])
def test_a_pipeline_training_starts_afresh_when_what_wrote_its_checkpoint_changed(
    tiny_params: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    out = tmp_path / "m"
    train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=2)
    epochs = 1 if change == "fewer epochs" else 3
    if change == "settings":
        tiny_params = deep_merge(tiny_params, {"methods": {"wdualmine": {"optim": {"lr": 2e-3}}}})
    elif change == "code":
        monkeypatch.setattr("medfuse.tracking.code_fingerprint", lambda: "other source")
    elif change == "data":
        monkeypatch.setattr("medfuse.tracking.data_manifest_hash", lambda params: "other data")
    caplog.set_level("INFO", logger="medfuse.train")
    reads: list[Path] = []

    def counted(path: Path, *args: object) -> dict:
        reads.append(path)
        return load_checkpoint(path, *args)

    monkeypatch.setattr("medfuse.train.load_checkpoint", counted)

    train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=epochs, resume="if-unchanged")
    assert "training from epoch 1" in caplog.text and "resuming" not in caplog.text
    assert reads == [checkpoint_path(out)]  # read once, to decide and for the run it ends
    assert _epochs_done(out) == list(range(1, epochs + 1))
    assert load_checkpoint(checkpoint_path(out))["epoch"] == epochs


def test_resume_continues_under_other_code_and_says_so(
    tiny_params: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`--resume` is the user's word that a change (e.g. a fix to the report) leaves the
    training as it was: it continues, with a warning."""
    out = tmp_path / "m"
    train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=1)
    monkeypatch.setattr("medfuse.tracking.code_fingerprint", lambda: "other source")
    caplog.set_level("INFO", logger="medfuse.train")
    train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=2, resume="yes")
    assert "written by other medfuse source; resuming as asked" in caplog.text
    assert "resuming from epoch 1" in caplog.text and _epochs_done(out) == [1, 2]
    with pytest.raises(ConfigError, match=r"at epoch 2, beyond the 1 asked; give --epochs 2"):
        train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=1, resume="yes")


@pytest.mark.parametrize("resume", ["yes", "no"])
def test_a_checkpoint_in_the_model_folder_of_older_versions_is_moved_out_of_it(
    tiny_params: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, resume: str
) -> None:
    """Resumed with --resume; with --fresh, replaced by the new training's (none stays behind
    in the folder DVC tracks)."""
    out = tmp_path / "m"
    train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=1)
    old_run = load_checkpoint(checkpoint_path(out))["run_id"]
    checkpoint_path(out).rename(out / "checkpoint.pt")
    caplog.set_level("INFO", logger="medfuse.train")
    train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=2, resume=resume)
    assert ("resuming from epoch 1" in caplog.text) == (resume == "yes")
    assert not (out / "checkpoint.pt").exists()
    state = load_checkpoint(checkpoint_path(out))
    assert state["epoch"] == 2
    assert (state["run_id"] == old_run) == (resume == "yes")


def test_cli_trains_a_colour_pair(tiny_params: dict, tmp_path: Path) -> None:
    from medfuse.cli import main

    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        yaml.safe_dump(
            tiny_overlay(Path(tiny_params["data"]["prepare"]["out_dir"]), tiny_params["tracking"])
        )
    )
    out = tmp_path / "pet"
    args = [
        "train",
        "--params",
        str(Path(__file__).parents[1] / "params.yaml"),
        "--overlay",
        str(overlay),
        "--pair",
        "PET-MRI",
        "--variant",
        "no_l_mi",
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert json.loads((out / META).read_text())["config"]["loss"]["mi"] == 0.0
    run_id = json.loads((out / META).read_text())["run_id"]

    # The same command with more epochs continues the run; --fresh trains from epoch 1.
    args = [a if a != "1" else "2" for a in args]
    assert main(args) == 0 and json.loads((out / META).read_text())["run_id"] == run_id
    assert main([*args, "--fresh"]) == 0
    assert json.loads((out / META).read_text())["run_id"] != run_id
    with pytest.raises(SystemExit):  # one or the other
        main([*args, "--fresh", "--resume"])


def test_train_rejects_a_method_without_training(tiny_params: dict) -> None:
    with pytest.raises(ConfigError, match="not learned"):
        train_from_params(tiny_params, method="average", pair="CT-MRI")


def test_device_resolution() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")


def test_keep_freed_memory_applies_on_glibc() -> None:
    import platform
    import sys

    from medfuse.memory import keep_freed_memory

    applied = keep_freed_memory()
    assert applied is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


def test_a_longer_run_may_resume_a_shorter_one() -> None:
    """Raising the epoch count keeps the checkpoint resumable; any other change does not."""
    from medfuse.train import _resume_key

    base = {"model": {"widths": [4, 8, 8, 8]}, "optim": {"epochs": 2, "lr": 1e-3}}
    longer = {"model": {"widths": [4, 8, 8, 8]}, "optim": {"epochs": 50, "lr": 1e-3}}
    other = {"model": {"widths": [4, 8, 8, 8]}, "optim": {"epochs": 2, "lr": 1e-4}}
    key = _resume_key("wdualmine", "CT-MRI", "full", base)
    assert key == _resume_key("wdualmine", "CT-MRI", "full", longer)
    assert key != _resume_key("wdualmine", "CT-MRI", "full", other)
    assert base["optim"]["epochs"] == 2  # the caller's config is left alone


def test_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from medfuse.tracking import flatten, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = {"tracking": {"uri": "sqlite:///mlflow.db"}}
    # A relative SQLite path becomes absolute: sqlite:/// + /abs/path (four slashes).
    assert tracking_uri(params) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(params).startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking_uri(params) == "http://localhost:5000"  # the environment wins
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "{}",
    }


# ---- precision ----


def float_tensors(tree: object) -> list[torch.Tensor]:
    """Every floating-point tensor in a nested checkpoint (dicts, lists, tuples)."""
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in float_tensors(value)]
    if isinstance(tree, list | tuple):
        return [t for value in tree for t in float_tensors(value)]
    return []


def test_precision_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import medfuse.precision as precision

    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"  # asked for: honoured anywhere
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bfloat16"
    assert resolve_precision(None, "cpu") == "bfloat16"  # unset = auto
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "float32"
    with pytest.raises(ConfigError, match=r"^train\.precision: unknown value 'float16'; use ") as e:
        resolve_precision("float16", "cpu")
    assert "\n" not in str(e.value)


def test_cpu_fast_bf16_means_amx() -> None:
    from medfuse.precision import cpu_has_fast_bf16

    assert cpu_has_fast_bf16() is bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def test_precision_setting_and_its_override(tiny_params: dict) -> None:
    config = tiny_params["methods"]["wdualmine"]
    params = deep_merge(tiny_params, {"train": {"precision": "bfloat16"}})
    assert resolve_settings(params, config).precision == "bfloat16"
    assert resolve_settings(params, config, precision="float32").precision == "float32"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        validate(deep_merge(tiny_params, {"train": {"precision": "half"}}))


def test_bfloat16_training_keeps_float32_weights_and_records_the_precision(
    tiny_params: dict, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    weights = train_from_params(
        tiny_params, pair="CT-MRI", out_dir=out, epochs=1, precision="bfloat16"
    )
    assert json.loads((out / META).read_text())["precision"] == "bfloat16"
    for path in (weights, checkpoint_path(out)):
        tensors = float_tensors(load_checkpoint(path))
        assert tensors and {t.dtype for t in tensors} == {torch.float32}, path.name
    assert load_checkpoint(checkpoint_path(out))["precision"] == "bfloat16"
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "nan" not in history[1]
    (run,) = client_for(tiny_params).search_runs(
        [client_for(tiny_params).get_experiment_by_name("CT-MRI").experiment_id]
    )
    assert run.data.params["run.precision"] == "bfloat16"
    assert run.data.tags["precision"] == "bfloat16"


def test_resume_refuses_a_checkpoint_of_another_precision(
    tiny_params: dict, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    train_from_params(tiny_params, pair="CT-MRI", out_dir=out, epochs=1, precision="float32")
    with pytest.raises(
        ConfigError, match="precision='float32', not 'bfloat16'; --precision float32"
    ):
        train_from_params(
            tiny_params, pair="CT-MRI", out_dir=out, epochs=2, resume="yes", precision="bfloat16"
        )


def test_checkpoints_from_before_the_precision_setting_resume_as_float32(tmp_path: Path) -> None:
    from medfuse.train import _check_resumable, _resume_key

    config = {"model": {"widths": [4, 8, 8, 8]}}
    old = _resume_key("wdualmine", "CT-MRI", "full", config)
    del old["precision"]  # written before train.precision existed: always float32
    key = _resume_key("wdualmine", "CT-MRI", "full", config, "float32")
    _check_resumable(old, key, tmp_path, epochs=2)
    with pytest.raises(ConfigError, match="precision='float32', not 'bfloat16'"):
        _check_resumable(
            old, _resume_key("wdualmine", "CT-MRI", "full", config, "bfloat16"), tmp_path, 2
        )


def test_a_seeded_variant_trains_the_full_model_with_its_own_seed(
    tiny_params: dict, tmp_path: Path
) -> None:
    seeded = train_from_params(
        tiny_params, pair="CT-MRI", variant="full_seed7", out_dir=tmp_path / "s"
    )
    full = train_from_params(tiny_params, pair="CT-MRI", variant="full", out_dir=tmp_path / "f")
    meta = json.loads((tmp_path / "s" / META).read_text())
    assert meta["seed"] == 7 and meta["variant"] == "full_seed7"
    assert meta["config"] == json.loads((tmp_path / "f" / META).read_text())["config"]
    a, b = load_checkpoint(seeded), load_checkpoint(full)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # another seed, other weights


# ---- one commit point for a trained model ----

CRASH_POINTS = ["writing model.pt", "writing model.json", "the first rename", "the second rename"]


def _crash_at(point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `save_weights` fail at `point` as a crash would (an OSError there)."""
    import os

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash")

    if point == "writing model.pt":
        monkeypatch.setattr(torch, "save", crash)
    elif point == "writing model.json":
        monkeypatch.setattr(Path, "write_text", crash)
    else:
        replace, calls = os.replace, []
        fatal = 1 if point == "the first rename" else 2

        def replace_until_fatal(src: object, dst: object) -> None:
            calls.append(dst)
            if len(calls) == fatal:
                crash()
            replace(src, dst)

        monkeypatch.setattr(os, "replace", replace_until_fatal)


@pytest.mark.parametrize("previous", [True, False], ids=["over-a-model", "first-model"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_while_saving_never_leaves_weights_without_their_model_json(
    point: str, previous: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medfuse.models import save_weights

    out = tmp_path / "model"
    old, new = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    if previous:
        save_weights(out, old, {"run_id": "old"})
    with monkeypatch.context() as patch:
        _crash_at(point, patch)
        with pytest.raises(OSError, match="simulated crash"):
            save_weights(out, new, {"run_id": "new"})
    left = {p.name for p in out.iterdir()} if out.is_dir() else set()
    assert left <= {WEIGHTS, META}  # no temporary file left either
    if (out / WEIGHTS).exists():  # then it is the previous model, whole: its weights, its json
        assert json.loads((out / META).read_text())["run_id"] == "old"
        torch.testing.assert_close(load_checkpoint(out / WEIGHTS)["weight"], old.weight)
    # else: the model is cleanly absent; a model.json alone is not a model to anything.
    save_weights(out, new, {"run_id": "new"})  # and the next save completes
    assert json.loads((out / META).read_text())["run_id"] == "new"
    torch.testing.assert_close(load_checkpoint(out / WEIGHTS)["weight"], new.weight)


# ---- no MLflow run left RUNNING by a training killed outright ----


def _train_killed_outright(
    params: dict, out: Path, at_step: int, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Train until step `at_step`, then die as SIGKILL would: no `finally` ends the MLflow run.
    Returns the run it left RUNNING."""
    from mlflow.tracking import MlflowClient

    before = {run.info.run_id for run in _train_runs(params)}
    original, calls = WDualmine.training_loss, []

    def dies(self, a, b):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return original(self, a, b)

    with monkeypatch.context() as patch:
        patch.setattr(WDualmine, "training_loss", dies)
        patch.setattr(MlflowClient, "set_terminated", lambda *args, **kwargs: None)
        with pytest.raises(KeyboardInterrupt):
            train_from_params(params, pair="CT-MRI", out_dir=out)
    (run,) = [r for r in _train_runs(params) if r.info.run_id not in before]
    assert run.info.status == "RUNNING"
    return run.info.run_id


def _train_runs(params: dict) -> list:
    """Every run of the CT-MRI experiment (none before the first training)."""
    client = client_for(params)
    experiment = client.get_experiment_by_name("CT-MRI")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _status(params: dict, run_id: str) -> str:
    return client_for(params).get_run(run_id).info.status


def test_the_next_training_of_a_job_marks_the_run_a_killed_one_left_running_killed(
    tiny_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_epoch_1 = _train_killed_outright(tiny_params, tmp_path / "x", 1, monkeypatch)
    in_epoch_2 = _train_killed_outright(tiny_params, tmp_path / "y", 3, monkeypatch)
    assert not checkpoint_path(tmp_path / "x").exists()
    assert checkpoint_path(tmp_path / "y").exists()
    client = client_for(tiny_params)
    if "out_dir" in client.get_run(in_epoch_2).data.tags:  # as a run of older code: only its
        client.delete_tag(in_epoch_2, "out_dir")  # checkpoint says it is this folder's

    train_from_params(tiny_params, pair="CT-MRI", out_dir=tmp_path / "x")
    assert _status(tiny_params, in_epoch_1) == "KILLED"  # found by its job and folder
    assert _status(tiny_params, in_epoch_2) == "RUNNING"  # another folder's run: left alone
    train_from_params(tiny_params, pair="CT-MRI", out_dir=tmp_path / "y", resume="no")
    assert _status(tiny_params, in_epoch_2) == "KILLED"  # found through the checkpoint
    statuses = sorted(run.info.status for run in _train_runs(tiny_params))
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "KILLED"]


def test_resuming_a_run_a_killed_training_left_running_marks_it_killed_first(
    tiny_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    run_id = _train_killed_outright(tiny_params, tmp_path / "m", 3, monkeypatch)
    ended: list[tuple[str, str]] = []
    set_terminated = MlflowClient.set_terminated

    def recorded(self, run, status=None, end_time=None):
        ended.append((run, status))
        return set_terminated(self, run, status=status, end_time=end_time)

    monkeypatch.setattr(MlflowClient, "set_terminated", recorded)
    train_from_params(tiny_params, pair="CT-MRI", out_dir=tmp_path / "m", resume="yes")
    assert ended == [(run_id, "KILLED"), (run_id, "FINISHED")]  # killed, reopened, finished
    client = client_for(tiny_params)
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == [1, 2]
