"""`medfuse fuse`: test splits and user-given pairs, for every registered method."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfuse.config import deep_merge, load_params, method_config, validate
from medfuse.data.colour import luma_uint8, recolour
from medfuse.data.prepared import PreparedData
from medfuse.errors import ConfigError, DataError
from medfuse.fuse import fuse_files, fuse_from_args, fuse_test_split, load_fuser
from medfuse.io import read_image, write_image
from medfuse.methods.registry import method_names
from medfuse.models import build_learned, save_weights

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "workflow" / "profiles" / "quick" / "params.yaml"
TINY_WDUALMINE = {"model": {"widths": [4, 8, 8, 8], "proj_dim": 8}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fuse_params(tiny_prepared: Path, tracking: dict) -> dict:
    """The quick profile (tiny peers) on the tiny prepared tree, tracking in tmp_path."""
    params = load_params(REPO / "params.yaml", [QUICK])
    overlay = {
        "data": {"prepare": {"out_dir": str(tiny_prepared)}},
        "tracking": tracking,
        "train": {"device": "cpu"},
        "methods": {"wdualmine": TINY_WDUALMINE},
    }
    merged = deep_merge(params, overlay)
    validate(merged)
    return merged


def untrained_weights(params: dict, method: str, pair: str, folder: Path) -> Path:
    """Weights in the training loop's format (model.pt + model.json), without training."""
    config = method_config(params, method)
    torch.manual_seed(0)
    net = build_learned(method, config, pair)
    meta = {"method": method, "pair": pair, "variant": "full", "config": config}
    return save_weights(folder, net, meta)


def test_fuses_a_colour_test_split(fuse_params: dict, tmp_path: Path) -> None:
    weights = untrained_weights(fuse_params, "wdualmine", "PET-MRI", tmp_path / "m")
    out = fuse_test_split(
        fuse_params, "wdualmine", "PET-MRI", out=tmp_path / "fused", model_path=weights
    )
    samples = PreparedData(fuse_params["data"]["prepare"]["out_dir"]).samples("PET-MRI", "test")
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{s.name}.png" for s in samples)
    for sample in samples:
        shown = read_image(out / f"{sample.name}.png")
        grey = read_image(out / "y" / f"{sample.name}.png", mode="L")
        assert shown.shape == (32, 32, 3) and grey.shape == (32, 32)
        # The colour image is the fused luma put back with the PET's own chroma.
        np.testing.assert_array_equal(shown, recolour(grey, sample.a_rgb))
        assert not np.array_equal(grey, sample.a)


def test_default_layout_and_grey_pairs(
    fuse_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    untrained_weights(
        fuse_params, "wdualmine", "CT-MRI", Path("results/models/wdualmine/CT-MRI/full")
    )
    out = fuse_test_split(fuse_params, "wdualmine", "CT-MRI")
    assert out == Path("results/fused/wdualmine/CT-MRI/full")
    names = sorted(p.name for p in out.glob("*.png"))
    assert len(names) == 2
    for name in names:
        np.testing.assert_array_equal(
            read_image(out / name), read_image(out / "y" / name, mode="L")
        )


def test_classical_method_through_the_registry(fuse_params: dict, tmp_path: Path) -> None:
    out = fuse_test_split(fuse_params, "average", "CT-MRI", out=tmp_path / "avg")
    for sample in PreparedData(fuse_params["data"]["prepare"]["out_dir"]).samples("CT-MRI", "test"):
        expected = np.rint((sample.a / 255.0 + sample.b / 255.0) / 2 * 255).astype(np.uint8)
        got = read_image(out / "y" / f"{sample.name}.png", mode="L")
        assert np.abs(got.astype(int) - expected).max() <= 1


def test_fuse_is_logged_to_mlflow(fuse_params: dict, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from medfuse.tracking import tracking_uri

    fuse_test_split(fuse_params, "max", "CT-MRI", out=tmp_path / "max")
    client = MlflowClient(tracking_uri(fuse_params))
    (run,) = client.search_runs([client.get_experiment_by_name("CT-MRI").experiment_id])
    assert run.data.tags["step"] == "fuse" and run.data.tags["method"] == "max"
    assert run.data.metrics["pairs"] == 2 and run.data.metrics["ms_per_pair"] > 0


def test_published_images_are_copied(fuse_params: dict, tmp_path: Path) -> None:
    names = [
        s.name
        for s in PreparedData(fuse_params["data"]["prepare"]["out_dir"]).samples("PET-MRI", "test")
    ]
    published = tmp_path / "raw" / "published-asfe-fusion"  # <data.raw_dir>/<dataset>
    rng = np.random.default_rng(0)
    for name in names:
        write_image(
            published / "PET-MRI" / f"{name}.png", rng.integers(0, 256, (32, 32, 3), np.uint8)
        )
    params = deep_merge(fuse_params, {"data": {"raw_dir": str(tmp_path / "raw")}})
    out = fuse_test_split(params, "published:asfe-fusion", "PET-MRI", out=tmp_path / "pub")
    for name in names:
        source = read_image(published / "PET-MRI" / f"{name}.png")
        np.testing.assert_array_equal(read_image(out / f"{name}.png"), source)
        np.testing.assert_array_equal(read_image(out / "y" / f"{name}.png"), luma_uint8(source))
    (published / "PET-MRI" / f"{names[0]}.png").unlink()
    with pytest.raises(DataError, match=rf"{names[0]}\.png: published fusion .* not found"):
        fuse_test_split(params, "published-asfe-fusion", "PET-MRI", out=tmp_path / "pub2")


def _write_pair(folder: Path, a: np.ndarray, b: np.ndarray) -> tuple[Path, Path]:
    write_image(folder / "a.png", a)
    write_image(folder / "b.png", b)
    return folder / "a.png", folder / "b.png"


@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_fuses_two_given_images(
    method: str, fuse_params: dict, tmp_path: Path, make_pair
) -> None:
    a, b = make_pair(64, 3)  # DM-FNet's head needs 64 pixels a side
    path_a, path_b = _write_pair(tmp_path, a, b)
    model = None
    if method_config(fuse_params, method)["kind"] == "learned":
        model = untrained_weights(fuse_params, method, "CT-MRI", tmp_path / "w")
    out = fuse_files(fuse_params, method, path_a, path_b, tmp_path / "f.png", model_path=model)
    fused = read_image(out, mode="L")
    assert fused.shape == (64, 64)


def test_rgb_functional_and_odd_size(fuse_params: dict, tmp_path: Path, make_pair) -> None:
    a, b = make_pair(40, 5)
    a, b = a[:30, :37], b[:30, :37]  # not a multiple of 16: padded and cropped back
    pet = np.stack([a, a // 2, 255 - a], axis=-1).astype(np.uint8)
    path_a, path_b = _write_pair(tmp_path, pet, b)
    weights = untrained_weights(fuse_params, "wdualmine", "PET-MRI", tmp_path / "w")
    out = fuse_files(
        fuse_params, "wdualmine", path_a, path_b, tmp_path / "o.png", model_path=weights
    )
    fused = read_image(out)
    assert fused.shape == (30, 37, 3)


def test_size_mismatch_names_both_files(fuse_params: dict, tmp_path: Path, make_pair) -> None:
    a, _ = make_pair(32, 0)
    _, b = make_pair(48, 0)
    path_a, path_b = _write_pair(tmp_path, a, b)
    with pytest.raises(DataError, match=r"a\.png is 32x32 but .*b\.png is 48x48"):
        fuse_files(fuse_params, "average", path_a, path_b, tmp_path / "o.png")


def test_learned_method_needs_weights(fuse_params: dict, tmp_path: Path, make_pair) -> None:
    path_a, path_b = _write_pair(tmp_path, *make_pair(32, 0))
    with pytest.raises(ConfigError, match="--model"):
        fuse_files(fuse_params, "wdualmine", path_a, path_b, tmp_path / "o.png")
    with pytest.raises(DataError, match="no trained weights"):
        fuse_files(
            fuse_params,
            "wdualmine",
            path_a,
            path_b,
            tmp_path / "o.png",
            model_path=tmp_path / "missing.pt",
        )


def test_pickled_weights_are_refused(fuse_params: dict, tmp_path: Path, make_pair) -> None:
    path_a, path_b = _write_pair(tmp_path, *make_pair(32, 0))
    evil = tmp_path / "evil.pt"
    torch.save({"x": object()}, evil)
    with pytest.raises(DataError, match="refused"):
        fuse_files(fuse_params, "wdualmine", path_a, path_b, tmp_path / "o.png", model_path=evil)


def test_cli_fuse_two_images(fuse_params: dict, tmp_path: Path, make_pair) -> None:
    import yaml

    from medfuse.cli import main

    path_a, path_b = _write_pair(tmp_path, *make_pair(32, 0))
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        yaml.safe_dump({"data": fuse_params["data"], "tracking": fuse_params["tracking"]})
    )
    out = tmp_path / "cli.png"
    code = main(
        [
            "fuse",
            "--params",
            str(REPO / "params.yaml"),
            "--overlay",
            str(overlay),
            "--method",
            "dwt",
            str(path_a),
            str(path_b),
            "-o",
            str(out),
        ]
    )
    assert code == 0 and read_image(out, mode="L").shape == (32, 32)
    code = main(["fuse", "--params", str(REPO / "params.yaml"), "--method", "dwt", str(path_a)])
    assert code == 2  # one image: a clear one-line error, not a traceback


def test_fuse_from_args_needs_pair_or_two_images(fuse_params: dict) -> None:
    import argparse

    args = argparse.Namespace(
        images=[], method="average", variant="full", model=None, pair=None, out=None, device=None
    )
    with pytest.raises(ConfigError, match="give --pair"):
        fuse_from_args(fuse_params, args)


def test_a_training_checkpoint_can_be_used_as_weights(
    fuse_params: dict, tmp_path: Path, make_pair
) -> None:
    from medfuse.models import save_checkpoint
    from medfuse.train import _checkpoint, _resume_key

    config = method_config(fuse_params, "wdualmine", "no_we")
    net = build_learned("wdualmine", config, "CT-MRI")
    trainer = {
        "model": net,
        "optimiser": torch.optim.Adam(net.parameters()),
        "generator": torch.Generator(),
    }
    key = _resume_key("wdualmine", "CT-MRI", "no_we", config)
    save_checkpoint(tmp_path / "checkpoint.pt", _checkpoint(trainer, key, 1, "run"))
    path_a, path_b = _write_pair(tmp_path, *make_pair(32, 0))
    # The checkpoint's config (no_we) builds the network, whatever --variant says.
    out = fuse_files(
        fuse_params,
        "wdualmine",
        path_a,
        path_b,
        tmp_path / "o.png",
        model_path=tmp_path / "checkpoint.pt",
    )
    assert read_image(out, mode="L").shape == (32, 32)


def test_learned_fusion_runs_in_the_configured_precision(
    fuse_params: dict, tmp_path: Path, make_pair
) -> None:
    weights = untrained_weights(fuse_params, "wdualmine", "CT-MRI", tmp_path / "m")
    a, b = (x / 255.0 for x in make_pair(32, 3))
    fused = {}
    for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        params = deep_merge(fuse_params, {"train": {"precision": precision}})
        fuser = load_fuser(params, "wdualmine", model_path=weights)
        assert fuser.precision == precision
        seen: list[torch.dtype] = []
        first_conv = fuser.net.encoder.stages[0][0].conv1
        hook = first_conv.register_forward_hook(lambda m, i, out, seen=seen: seen.append(out.dtype))
        fused[precision] = fuser.fuse(a, b)
        hook.remove()
        assert seen == [dtype]  # the network ran in that precision
        assert fused[precision].dtype == np.float64
        assert fused[precision].min() >= 0.0 and fused[precision].max() <= 1.0
        assert all(p.dtype == torch.float32 for p in fuser.net.parameters())
    assert np.abs(fused["float32"] - fused["bfloat16"]).max() < 0.02
    bf16_params = deep_merge(fuse_params, {"train": {"precision": "bfloat16"}})
    overridden = load_fuser(bf16_params, "wdualmine", model_path=weights, precision="float32")
    assert overridden.precision == "float32"  # --precision wins over train.precision


def test_fuse_logs_its_precision(fuse_params: dict, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from medfuse.tracking import tracking_uri

    weights = untrained_weights(fuse_params, "wdualmine", "CT-MRI", tmp_path / "m")
    fuse_test_split(
        fuse_params,
        "wdualmine",
        "CT-MRI",
        out=tmp_path / "fused",
        model_path=weights,
        precision="bfloat16",
    )
    client = MlflowClient(tracking_uri(fuse_params))
    (run,) = client.search_runs([client.get_experiment_by_name("CT-MRI").experiment_id])
    assert run.data.params["precision"] == "bfloat16"
    assert run.data.tags["precision"] == "bfloat16"


# ---- `--model FILE` that is not this method's weights: one line saying what the file is ----


class NotATensor:
    """An object only a full (arbitrary-code) unpickling could load."""


def _tensor_bytes_flipped(weights: Path) -> bytes:
    """The weights file with one byte of its largest tensor changed (its CRC no longer fits)."""
    import zipfile

    with zipfile.ZipFile(weights) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(weights.read_bytes())
    header = data[member.header_offset : member.header_offset + 30]  # the local file header
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    data[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0xFF
    return bytes(data)


def _bad_model(kind: str, folder: Path, params: dict) -> Path:
    """A --model file of one kind that is not usable weights of wdualmine."""
    path = folder / f"{kind}.pt"
    if kind in ("truncated", "corrupted"):
        good = untrained_weights(params, "wdualmine", "CT-MRI", folder / "good")
        data = good.read_bytes()
        path.write_bytes(
            data[: len(data) // 2] if kind == "truncated" else _tensor_bytes_flipped(good)
        )
    elif kind == "random":
        path.write_bytes(b"\x17" + np.random.default_rng(0).bytes(4095))  # not PK, not a pickle
    elif kind == "text":
        path.write_text("these are not weights\n" * 20)
    elif kind == "image":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")
    elif kind == "pickled":
        torch.save({"model": NotATensor()}, path)
    elif kind == "other-method":
        torch.save({"w": torch.ones(3)}, path)
    elif kind == "other-size":  # wdualmine, but wider than the configured network
        config = deep_merge(method_config(params, "wdualmine"), {"model": {"widths": [8] * 4}})
        torch.save(build_learned("wdualmine", config, "CT-MRI").state_dict(), path)
    elif kind == "not-a-dict":
        torch.save(torch.ones(3), path)
    return path


BAD_MODELS = {
    "random": "not a PyTorch checkpoint: its bytes are neither a zip archive nor a pickle",
    "text": "not a PyTorch checkpoint: it is a text file",
    "image": "not a PyTorch checkpoint: it is a PNG image",
    "truncated": "a truncated or corrupted PyTorch checkpoint: not a complete zip archive",
    "corrupted": "a corrupted PyTorch checkpoint: '.*' fails its CRC check",
    "pickled": r"refused: .* pickled Python objects \(tests\.test_fuse\.NotATensor\)",
    "other-method": r"weights do not fit method 'wdualmine': (\d+) of the network's \1 tensors "
    "are missing and 1 of the file's 1 are unknown to it",
    "other-size": r"weights do not fit method 'wdualmine': '.*' is \(8, .*\) in the file but \(4, ",
    "not-a-dict": "a PyTorch file holding a Tensor, not a state dict of weights",
}


def _fuse_cli(params: dict, folder: Path, *args: str) -> int:
    """`medfuse fuse` in this process, with the test's data, store and tiny wdualmine."""
    import yaml

    from medfuse.cli import main

    overlay = folder / "overlay.yaml"
    keep = {key: params[key] for key in ("data", "tracking", "methods")}
    overlay.write_text(yaml.safe_dump(keep))
    base = ["fuse", "--params", str(REPO / "params.yaml"), "--overlay", str(QUICK)]
    return main([*base, "--overlay", str(overlay), *args])


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_a_model_file_that_is_not_weights_is_named_in_one_line(
    kind: str, fuse_params: dict, tmp_path: Path, make_pair, capsys: pytest.CaptureFixture
) -> None:
    import re

    path_a, path_b = _write_pair(tmp_path, *make_pair(32, 0))
    model = _bad_model(kind, tmp_path, fuse_params)
    out = tmp_path / "out.png"
    argv = ["--method", "wdualmine", "--model", str(model)]
    # Any exception but a MedfuseError (a traceback for a user) propagates and fails the test.
    code = _fuse_cli(fuse_params, tmp_path, *argv, str(path_a), str(path_b), "-o", str(out))
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    line = rf"^medfuse fuse: error: {re.escape(str(model))}: {BAD_MODELS[kind]}"
    assert re.search(line, err), err


# ---- `-o`: the format its suffix names, a folder, or one line listing the suffixes ----

MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "TIFF": (b"II*\x00", b"MM\x00*"), "JPEG": b"\xff\xd8\xff"}


@pytest.mark.parametrize(
    ("suffix", "image_type"),
    [(".png", "PNG"), (".tif", "TIFF"), (".tiff", "TIFF"), (".jpg", "JPEG"), (".JPEG", "JPEG")],
)
def test_the_output_is_written_in_the_format_its_suffix_names(
    suffix: str,
    image_type: str,
    fuse_params: dict,
    tmp_path: Path,
    make_pair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = make_pair(32, 0)
    pet = np.stack([a, a // 2, 255 - a], axis=-1).astype(np.uint8)
    path_a, path_b = _write_pair(tmp_path, pet, b)
    reference = fuse_files(fuse_params, "average", path_a, path_b, tmp_path / "ref.png")
    caplog.clear()
    out = fuse_files(fuse_params, "average", path_a, path_b, tmp_path / f"fused{suffix}")
    assert out == tmp_path / f"fused{suffix}"
    assert out.read_bytes().startswith(MAGIC[image_type])
    with Image.open(out) as image:
        assert image.format == image_type
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    if image_type == "JPEG":  # lossy: close, not equal, and said so once
        assert np.abs(read_image(out).astype(int) - read_image(reference)).mean() < 3
        (warning,) = warnings
        message = warning.getMessage()
        assert "\n" not in message and str(out) in message
        assert "lossy" in message and "PNG" in message
    else:
        np.testing.assert_array_equal(read_image(out), read_image(reference))
        assert warnings == []


@pytest.mark.parametrize("name", ["fused.xyz", "fused", "fused.bmp"])
def test_an_output_suffix_of_no_supported_format_is_refused_before_any_work(
    name: str, fuse_params: dict, tmp_path: Path, make_pair, capsys: pytest.CaptureFixture
) -> None:
    path_a, path_b = _write_pair(tmp_path, *make_pair(32, 0))
    out = tmp_path / name
    argv = ["--method", "wdualmine", "--model", str(tmp_path / "absent.pt")]
    code = _fuse_cli(fuse_params, tmp_path, *argv, str(path_a), str(path_b), "-o", str(out))
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and f"{out}: " in err  # not the missing weights: checked first
    assert err.endswith("; end the name with one of .png, .tif, .tiff, .jpg, .jpeg\n")


def test_an_output_folder_receives_the_fused_image_named_after_a(
    fuse_params: dict, tmp_path: Path, make_pair, capsys: pytest.CaptureFixture
) -> None:
    path_a, path_b = _write_pair(tmp_path, *make_pair(32, 0))
    folder = tmp_path / "fused"
    folder.mkdir()
    code = _fuse_cli(
        fuse_params, tmp_path, "--method", "dwt", str(path_a), str(path_b), "-o", str(folder)
    )
    written = folder / "a_fused.png"
    assert code == 0 and capsys.readouterr().out == f"{written}\n"  # says where it went
    with Image.open(written) as image:
        assert image.format == "PNG"
    assert [p.name for p in folder.iterdir()] == ["a_fused.png"]


def test_classical_fusion_does_not_import_torch(tmp_path: Path):
    """A classical method fuses without loading torch (2-3 s of every such job's start)."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    write_image(a, np.full((16, 16), 40, np.uint8))
    write_image(b, np.full((16, 16), 200, np.uint8))
    code = (
        "import sys\n"
        "from medfuse.config import load_params\n"
        "from medfuse.fuse import fuse_files\n"
        f"fuse_files(load_params({str(REPO / 'params.yaml')!r}), 'average', "
        f"{str(a)!r}, {str(b)!r}, {str(tmp_path / 'f.png')!r})\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False", result.stdout + result.stderr
    assert read_image(tmp_path / "f.png")[0, 0] == 120
