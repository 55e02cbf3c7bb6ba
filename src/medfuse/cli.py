"""The one entry point: `medfuse <command> ...`.

Each command parses its arguments and calls one function of the package; every error a user
can cause (a `MedfuseError`) becomes one line on stderr and exit code 2, not a traceback.
Heavy modules (torch, mlflow) are imported inside the handlers so `medfuse --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medfuse.errors import MedfuseError

PAIRS = ["CT-MRI", "PET-MRI", "SPECT-MRI"]


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """The command's params: --params, else ./params.yaml (else the package's defaults, for a
    command that sets `packaged_params`), then the profile and the overlays."""
    from medfuse.config import load_params, params_file

    path = params_file(args.params, getattr(args, "packaged_params", False))
    return load_params(path, args.overlay, args.profile)


def _cmd_download(args: argparse.Namespace) -> None:
    from medfuse.data.download import download_dataset

    params = _params(args)
    download_dataset(params, args.dataset, source=args.source, out_dir=args.out)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from medfuse.data.prepare import prepare_from_params

    prepare_from_params(_params(args), raw_root=args.raw, out_dir=args.out)


def _cmd_train(args: argparse.Namespace) -> None:
    from medfuse.train import train_from_params

    train_from_params(
        _params(args),
        method=args.method,
        pair=args.pair,
        variant=args.variant,
        out_dir=args.out,
        resume="yes" if args.resume else "no" if args.fresh else "if-unchanged",
        device=args.device,
        epochs=args.epochs,
        precision=args.precision,
        stage1=args.stage1,
        stage1_model=args.stage1_model,
    )


def _cmd_fuse(args: argparse.Namespace) -> None:
    from medfuse.fuse import fuse_from_args

    fuse_from_args(_params(args), args)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from medfuse.metrics.evaluate import evaluate_from_args

    evaluate_from_args(_params(args), args)


def _cmd_report(args: argparse.Namespace) -> None:
    from medfuse.report import build_report

    build_report(_params(args), results_dir=args.results, out_dir=args.out)


def _cmd_snapshot(args: argparse.Namespace) -> None:
    from medfuse.config import params_file
    from medfuse.report.snapshot import snapshot

    path = params_file(args.params)
    print(snapshot(_params(args), args.out, args.results, path, args.overlay))


def _cmd_init_tracking(args: argparse.Namespace) -> None:
    import json

    from medfuse.io import write_text_atomic
    from medfuse.tracking import init_store

    uri = init_store(_params(args))
    print(uri)
    if args.stamp:  # the workflow's marker that the store exists before any parallel job
        write_text_atomic(args.stamp, json.dumps({"tracking_uri": uri}, indent=2) + "\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        default=None,
        help="paper | quick | ... (default: params.yaml's `profile`, or $MEDFUSE_PROFILE)",
    )
    parser.add_argument(
        "--params", default=None, type=Path, help="parameter file (default: ./params.yaml)"
    )
    parser.add_argument(
        "--overlay",
        action="append",
        default=[],
        type=Path,
        help="overlay merged on top (repeatable), e.g. workflow/profiles/quick/params.yaml",
    )


def _add_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default=None,
        help="learned methods: float32, bfloat16 autocast, or auto = bfloat16 where the device "
        "has fast bfloat16 (overrides params.yaml's train.precision)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfuse", description="Reproducible multimodal medical image fusion (W-DUALMINE)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch a dataset's files from its manifest and base URL")
    _add_common(p)
    p.add_argument(
        "--dataset", default="aanlib", help="dataset name in params.yaml (default aanlib)"
    )
    p.add_argument(
        "--source", help="base URL or local mirror directory (overrides params.yaml)", default=None
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (overrides params.yaml)"
    )
    p.set_defaults(handler=_cmd_download)

    p = sub.add_parser(
        "prepare", help="pair, convert and validate images; write the split manifest"
    )
    _add_common(p)
    p.add_argument(
        "--raw", type=Path, default=None, help="raw dataset root (overrides params.yaml)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (overrides params.yaml)"
    )
    p.set_defaults(handler=_cmd_prepare)

    p = sub.add_parser("train", help="train a learned method on one modality pair")
    _add_common(p)
    p.add_argument(
        "--pair",
        required=True,
        choices=[*PAIRS, "all"],
        help="all: every pair's training images (a method with unified: true, e.g. dm-fnet)",
    )
    p.add_argument("--method", default="wdualmine")
    p.add_argument("--variant", default="full", help="ablation variant from params.yaml")
    p.add_argument("--out", type=Path, default=None, help="weights directory")
    # Default: continue a checkpoint of the same settings, code and data (an interrupted run of
    # the same command, e.g. by Snakemake or DVC), else train from epoch 1.
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint even under other code or data (refused if written for "
        "other settings)",
    )
    resume.add_argument(
        "--fresh", action="store_true", help="train from epoch 1 whatever checkpoint there is"
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda (overrides params.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="override the epoch count")
    p.add_argument(
        "--stage1", action="store_true", help="train the method's first stage (dm-fnet's U-Net)"
    )
    p.add_argument(
        "--stage1-model",
        type=Path,
        default=None,
        help="trained first stage to start from (default results/stage1/<method>/model.pt)",
    )
    _add_precision(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("fuse", help="fuse a pair's test split, or two given registered images")
    _add_common(p)
    p.add_argument("images", nargs="*", type=Path, help="A.png B.png (functional/CT, then MRI)")
    p.add_argument("--method", default="wdualmine")
    p.add_argument("--variant", default="full")
    p.add_argument("--model", type=Path, default=None, help="weights file of a learned method")
    p.add_argument("--pair", choices=PAIRS, default=None, help="fuse this pair's test split")
    p.add_argument("-o", "--out", type=Path, default=None, help="output file or directory")
    p.add_argument("--device", default=None)
    _add_precision(p)
    # Fusing two given images needs no project: with no params.yaml the defaults are the package's.
    p.set_defaults(handler=_cmd_fuse, packaged_params=True)

    p = sub.add_parser("evaluate", help="score a folder of fused images against their sources")
    _add_common(p)
    sources = p.add_mutually_exclusive_group(required=True)
    sources.add_argument("--pair", choices=PAIRS, help="against this pair's prepared test split")
    sources.add_argument(
        "--sources",
        nargs=2,
        type=Path,
        metavar=("A_DIR", "B_DIR"),
        help="against same-named images: A (CT or functional, grey or RGB) and B (MRI, grey)",
    )
    p.add_argument("--fused", required=True, type=Path, help="folder of fused images")
    p.add_argument("--convention", default=None, help="paper | standard | cddfuse")
    p.add_argument("--out", type=Path, default=None, help="output prefix (CSV + JSON)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="score the pairs in N processes")
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser("report", help="tables, figures and results/report.md")
    _add_common(p)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(handler=_cmd_report)

    p = sub.add_parser(
        "snapshot",
        help="copy a run's small evidence (report, tables, figures, metric summaries, model "
        "settings and histories, parameters, machine) into a folder to commit",
    )
    _add_common(p)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument(
        "--out", type=Path, required=True, help="folder, replaced whole (its README.md is kept)"
    )
    p.set_defaults(handler=_cmd_snapshot)

    p = sub.add_parser("init-tracking", help="create or migrate the MLflow store once")
    _add_common(p)
    p.add_argument("--stamp", type=Path, default=None, help="write a JSON marker file here")
    p.set_defaults(handler=_cmd_init_tracking)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Idle OpenMP threads sleep instead of spinning. Set before the handler's first `import
    # torch` (OpenMP reads it once): on the shared 2-core machine, spinning threads made fusion
    # 25x slower whenever another job was running (3.3 s vs 0.14 s per pair). Env wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        args.handler(args)
    except MedfuseError as exc:
        print(f"medfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medfuse {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
