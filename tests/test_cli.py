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
    for command in ("download", "prepare", "train", "fuse", "evaluate", "report"):
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
