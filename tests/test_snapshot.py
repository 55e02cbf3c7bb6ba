"""`medfuse snapshot` copies a run's small evidence, chosen by the plan, into a folder to commit;
`medfuse report` leaves no table or figure of an earlier run's pairs behind for it to copy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from medfuse.cli import main
from medfuse.config import load_params
from medfuse.errors import DataError
from medfuse.report.build import remove_stale
from medfuse.report.snapshot import snapshot
from tests.settings import ONE_PAIR_EXPERIMENTS, REPO


def _write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def run(tmp_path: Path) -> tuple[dict, Path, Path]:
    """The params, results folder and overlay of a finished CT-MRI run, with leftovers of an
    earlier PET-MRI run beside its outputs."""
    overlay = _write(
        tmp_path / "ct_only.yaml", yaml.safe_dump({"experiments": ONE_PAIR_EXPERIMENTS})
    )
    params = load_params(REPO / "params.yaml", [overlay], "quick")
    results = tmp_path / "results"
    _write(results / "report.md", "# report\n![fig3](figures/fig3_CT-MRI.png)\n")
    for name in ("tables/table1.csv", "tables/table1.md", "figures/fig3_CT-MRI.png"):
        _write(results / name)
    _write(results / "figures/fig3_CT-MRI.pdf")
    for convention in ("paper", "standard"):
        for method in ("wdualmine", "average"):
            _write(results / f"metrics/{convention}/{method}/CT-MRI/full.json", "{}")
            _write(results / f"metrics/{convention}/{method}/CT-MRI/full.csv")
        _write(results / f"metrics/{convention}/wdualmine/PET-MRI/full.json", "{}")
    for pair in ("CT-MRI", "PET-MRI"):
        model = results / f"models/wdualmine/{pair}/full"
        for name in ("model.json", "history.csv", "model.pt", "checkpoint.pt"):
            _write(model / name, pair)
    return params, results, overlay


def test_snapshot_copies_the_plans_evidence_and_never_weights(tmp_path: Path, run) -> None:
    params, results, overlay = run
    out = tmp_path / "docs" / "reference"
    _write(out / "README.md", "hand-written\n")
    _write(out / "tables" / "stale.md")  # an earlier snapshot's file

    snapshot(params, out, results, REPO / "params.yaml", [overlay])

    copied = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {
        "README.md",
        "report.md",
        "tables/table1.csv",
        "tables/table1.md",
        "figures/fig3_CT-MRI.png",
        *(
            f"metrics/{c}/{m}/CT-MRI/full.json"
            for c in ("paper", "standard")
            for m in ("wdualmine", "average")
        ),
        "models/wdualmine/CT-MRI/full/model.json",
        "models/wdualmine/CT-MRI/full/history.csv",
        "params.yaml",
        "profile.yaml",
        "overlay1.yaml",
        "params.resolved.yaml",
        "machine.json",
    }
    assert copied == expected
    assert (out / "README.md").read_text() == "hand-written\n"
    assert (out / "overlay1.yaml").read_text() == overlay.read_text()
    assert (out / "profile.yaml").read_bytes() == (
        REPO / "workflow/profiles/quick/params.yaml"
    ).read_bytes()
    resolved = yaml.safe_load((out / "params.resolved.yaml").read_text())
    assert resolved["experiments"]["pairs"] == ["CT-MRI"] and resolved["profile"] == "quick"
    machine = json.loads((out / "machine.json").read_text())
    assert machine["logical_cpus"] >= 1 and machine["torch"] and machine["profile"] == "quick"
    assert set(machine["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert not list(out.parent.glob(".reference*")), "temporary folders left behind"


def test_dvc_lock_comes_along_only_when_it_records_this_report(tmp_path: Path, run) -> None:
    params, results, overlay = run
    project = tmp_path / "project"
    params_path = _write(project / "params.yaml", (REPO / "params.yaml").read_text())
    digest = hashlib.md5((results / "report.md").read_bytes()).hexdigest()
    outs = [{"path": "results/tables", "md5": "0.dir"}, {"path": "results/report.md"}]
    lock = {"schema": "2.0", "stages": {"report": {"cmd": "medfuse report", "outs": outs}}}

    for md5, kept in (("0" * 32, False), (digest, True)):
        outs[1]["md5"] = md5
        _write(project / "dvc.lock", yaml.safe_dump(lock))
        out = snapshot(params, tmp_path / "reference", results, params_path, [overlay])
        assert (out / "dvc.lock").is_file() == kept, md5


def test_a_missing_evaluation_is_named_and_the_folder_kept(tmp_path: Path, run) -> None:
    params, results, overlay = run
    (results / "metrics/standard/average/CT-MRI/full.json").unlink()
    out = _write(tmp_path / "reference" / "report.md", "the last good snapshot").parent

    with pytest.raises(DataError, match=r"metrics/standard/average/CT-MRI/full.json: missing"):
        snapshot(params, out, results, REPO / "params.yaml", [overlay])
    assert (out / "report.md").read_text() == "the last good snapshot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_only.yaml", "reference", "results"]


def test_snapshot_command_without_a_report_is_one_line_error(tmp_path: Path, run, capsys):
    _, results, overlay = run
    (results / "report.md").unlink()
    code = main(
        [
            "snapshot",
            "--params",
            str(REPO / "params.yaml"),
            "--profile",
            "quick",
            "--overlay",
            str(overlay),
            "--results",
            str(results),
            "--out",
            str(tmp_path / "ref"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "report.md: no report; run `medfuse report` first" in err


def test_report_removes_the_tables_and_figures_it_did_not_write(tmp_path: Path) -> None:
    written = [_write(tmp_path / "table1.csv"), _write(tmp_path / "stats_CT-MRI.md")]
    stale = _write(tmp_path / "stats_PET-MRI.md")
    remove_stale(tmp_path, written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats_CT-MRI.md", "table1.csv"]
    assert not stale.exists()
