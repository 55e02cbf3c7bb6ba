"""The CLI: one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medfuse.cli import main


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for command in ("download", "prepare", "train", "fuse", "evaluate", "report", "snapshot"):
        assert command in out


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["prepare", "--params", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "missing.yaml: parameter file not found" in err


def test_entry_point_is_installed(repo_root):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfuse.cli",
            "download",
            "--source",
            "ftp://x",
            "--params",
            str(repo_root / "params.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=repo_root,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unsupported base URL 'ftp://x'" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["download"],
        ["prepare"],
        ["train", "--pair", "CT-MRI"],
        ["fuse"],
        ["evaluate", "--pair", "CT-MRI", "--fused", "x"],
        ["report"],
        ["snapshot", "--out", "x"],
        ["init-tracking"],
    ],
)
def test_ctrl_c_is_one_line_and_exit_130_for_every_command(argv, monkeypatch, capsys):
    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("medfuse.cli._params", interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err == f"medfuse {argv[0]}: interrupted\n"


@pytest.mark.parametrize("command", [["train", "--pair", "CT-MRI"], ["fuse"]])
def test_precision_option_replaces_amp(command: list[str]) -> None:
    from medfuse.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([*command, "--precision", "bfloat16"]).precision == "bfloat16"
    assert parser.parse_args(command).precision is None  # params.yaml's train.precision
    for wrong in (["--precision", "float16"], ["--amp"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*command, *wrong])


def _run_fuse_cli(folder, *args: str) -> subprocess.CompletedProcess:
    """The installed CLI in a fresh process (logging, warnings and all), from a folder without
    params.yaml: the package's defaults."""
    import numpy as np
    from PIL import Image

    for name, seed in (("a.png", 0), ("b.png", 1)):
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    command = [sys.executable, "-m", "medfuse.cli", "fuse", *args, "a.png", "b.png"]
    return subprocess.run(command, capture_output=True, text=True, cwd=folder, check=False)


def test_fuse_names_a_model_file_of_random_bytes_in_one_line(tmp_path):
    (tmp_path / "random.pt").write_bytes(b"\x17" + bytes(range(256)) * 16)
    result = _run_fuse_cli(tmp_path, "--method", "wdualmine", "--model", "random.pt", "-o", "f.png")
    assert result.returncode == 2 and not (tmp_path / "f.png").exists()
    assert result.stderr == (
        "medfuse fuse: error: random.pt: not a PyTorch checkpoint: its bytes are neither a zip "
        "archive nor a pickle; expected weights written by torch.save, such as a training's "
        "model.pt\n"
    )


def test_fuse_to_jpeg_writes_jpeg_and_warns_once_that_it_is_lossy(tmp_path):
    result = _run_fuse_cli(tmp_path, "--method", "average", "-o", "fused.jpg")
    assert result.returncode == 0 and result.stdout == "fused.jpg\n"
    assert (tmp_path / "fused.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG
    (line,) = result.stderr.splitlines()
    assert line.startswith("WARNING ") and "fused.jpg: JPEG is lossy" in line
    assert "compute metrics on a PNG" in line
