"""`medfuse fuse`: every registered method fuses the same way.

Two uses:
- `--pair P`: fuse P's prepared test split into results/fused/<method>/<pair>/<variant>/:
  <name>.png is what a user sees (RGB for PET/SPECT: the fused luma put back with the functional
  image's Cb/Cr; grey for CT) and y/<name>.png the grey fused luma the metrics read.
- `A.png B.png -o OUT.png`: any registered pair given by the user (A grey or RGB functional/CT,
  B the MRI); an RGB A is fused through its luma and recoloured. OUT's suffix names the format
  (.png, .tif/.tiff, or .jpg/.jpeg with a warning that JPEG is lossy); an existing folder as OUT
  receives <A's stem>_fused.png.

Classical methods build a `Fuser`; learned ones load their trained weights into the network the
registry builds and run it in `train.precision` (or `--precision`); `published` methods copy the
authors' released image for each test pair.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfuse.config import canonical_method, config_from_mapping, method_config, setting
from medfuse.data.colour import luma_pil, luma_uint8, recolour, recolour_opencv_yuv
from medfuse.data.prepared import PreparedData
from medfuse.errors import ConfigError, DataError
from medfuse.io import LOSSY_FORMATS, atomic_path, image_format, read_image, to_uint8, write_image
from medfuse.memory import keep_freed_memory
from medfuse.methods.base import Fuser
from medfuse.methods.registry import build_method
from medfuse.plan import WEIGHTS, Job, model_dir, trained_on

log = logging.getLogger(__name__)


def default_fused_dir(method: str, pair: str, variant: str) -> Path:
    return Job(canonical_method(method), pair, variant).fused_dir


@dataclass(frozen=True)
class OutputSettings:
    """params.yaml's `output` merged with `methods.<m>.output`: how an RGB functional image
    becomes the grey input, and how the fused [0, 1] luma becomes 8 bits and colour. The
    project's convention is BT.601 YCbCr with rounding; a method may take its authors'
    (MMIF-AMIN: PIL's luma, truncation, OpenCV's YUV), so that its fusions are theirs to the bit."""

    luma: str  # bt601: the YCbCr Y, rounded | pil: PIL's convert("L")
    rounding: str  # round | truncate: x255 in float32, then cut (numpy's astype)
    colour: str  # ycbcr: the functional image's Cb/Cr | opencv-yuv: its U/V

    def __post_init__(self) -> None:
        for name, allowed in (
            ("luma", ("bt601", "pil")),
            ("rounding", ("round", "truncate")),
            ("colour", ("ycbcr", "opencv-yuv")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")

    @classmethod
    def of(cls, params: Mapping[str, Any], method: str, variant: str = "full") -> OutputSettings:
        """A method's settings; released weights (`pretrained`) take their method's."""
        config = method_config(params, method, variant)
        if config.get("kind") == "pretrained":
            method, config = config["method"], method_config(params, config["method"])
        settings = {**setting(params, "output", "params"), **config.get("output", {})}
        return config_from_mapping(cls, f"output (with methods.{method}.output)", settings)

    def functional_luma(self, rgb: np.ndarray) -> np.ndarray:
        return luma_pil(rgb) if self.luma == "pil" else luma_uint8(rgb)

    def to_uint8(self, fused: np.ndarray) -> np.ndarray:
        if self.rounding == "truncate":  # as (float32 output * 255).astype(np.uint8)
            scaled = np.clip(np.asarray(fused, dtype=np.float32) * np.float32(255.0), 0, 255)
            return scaled.astype(np.uint8)
        return to_uint8(fused)

    def recolour(self, fused_y: np.ndarray, functional_rgb: np.ndarray) -> np.ndarray:
        if self.colour == "opencv-yuv":
            return recolour_opencv_yuv(fused_y, functional_rgb)
        return recolour(fused_y, functional_rgb)


def load_fuser(
    params: Mapping[str, Any],
    method: str,
    variant: str = "full",
    pair: str | None = None,
    model_path: Path | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> Fuser:
    """Any registered classical or learned method, ready to `fuse(a, b)`; a learned one runs in
    `precision` (None: `train.precision`)."""
    config = method_config(params, method, variant)
    kind = config.get("kind")
    if kind == "classical":
        return build_method(method, config)
    if kind == "pretrained":
        model_path = model_path or _released_weights(params, method, config)
        # Released weights run as their authors ran them: float32 unless asked otherwise.
        precision = precision or "float32"
        method, config = config["method"], method_config(params, config["method"])
        kind = config.get("kind")
    if kind == "learned":
        # torch only here: classical and published fusion start without it (2-3 s a job).
        from medfuse.models import load_learned, resolve_device
        from medfuse.precision import resolve_precision

        if model_path is None:
            if pair is None:
                raise ConfigError(
                    f"{method} is a learned method: give its weights with --model, or --pair to "
                    f"use results/models/{canonical_method(method)}/<pair>/{variant}/{WEIGHTS}"
                )
            model_path = model_dir(method, trained_on(params, method, pair, variant), variant)
            model_path = model_path / WEIGHTS
        if not Path(model_path).is_file():
            raise DataError(
                f"{model_path}: no trained weights; run `medfuse train --method {method}"
                f"{' --pair ' + pair if pair else ''} --variant {variant}` first"
            )
        train = setting(params, "train", "params")
        device = resolve_device(device or setting(train, "device", "train"))
        resolved = resolve_precision(precision or setting(train, "precision", "train"), device)
        keep_freed_memory()
        return load_learned(method, config, Path(model_path), device, pair, resolved)
    raise ConfigError(
        f"method {method!r} ({kind}) only has released images for the test pairs; use --pair"
    )


def _released_weights(params: Mapping[str, Any], method: str, config: Mapping[str, Any]) -> Path:
    """The weights file a `pretrained` method names inside its downloaded dataset."""
    from medfuse.data.download import dataset_dir

    path = dataset_dir(params, config["dataset"]) / config["weights"]
    if not path.is_file():
        raise DataError(
            f"{path}: released weights of {method} not found; "
            f"run `medfuse download --dataset {config['dataset']}`"
        )
    return path


def write_fused(
    out_dir: Path,
    name: str,
    fused_y: np.ndarray,
    a_rgb: np.ndarray | None,
    output: OutputSettings,
) -> None:
    """<name>.png (RGB when the functional image is colour) and y/<name>.png (grey luma)."""
    write_image(out_dir / "y" / f"{name}.png", fused_y)
    colour = output.recolour(fused_y, a_rgb) if a_rgb is not None else fused_y
    write_image(out_dir / f"{name}.png", colour)


def copy_published(
    params: Mapping[str, Any], config: Mapping[str, Any], pair: str, rows: pd.DataFrame, out: Path
) -> None:
    """The authors' released fused image for each test name, and its luma under y/."""
    from medfuse.data.download import dataset_dir
    from medfuse.data.prepare import resize_square

    dataset = config.get("dataset")
    if dataset not in params["data"]["datasets"]:
        raise ConfigError(f"published method needs a dataset in data.datasets, got {dataset!r}")
    source_dir = dataset_dir(params, dataset) / pair
    resized = params["data"]["prepare"]["image_size"] is not None
    for _, row in rows.iterrows():
        name = str(row["name"])
        source = source_dir / f"{name}.png"
        if not source.is_file():
            raise DataError(
                f"{source}: published fusion of test pair {name} not found; "
                f"run `medfuse download --dataset {dataset}`"
            )
        image = read_image(source)
        if resized and image.shape[:2] != (row["height"], row["width"]):
            # `prepare` resized the sources (small profiles): match them the same way.
            image = resize_square(image, int(row["height"]))
            write_image(out / f"{name}.png", image)
        else:
            with atomic_path(out / f"{name}.png") as tmp:
                shutil.copyfile(source, tmp)
        write_image(out / "y" / f"{name}.png", luma_uint8(image) if image.ndim == 3 else image)


def fuse_test_split(
    params: Mapping[str, Any],
    method: str,
    pair: str,
    variant: str = "full",
    out: Path | None = None,
    model_path: Path | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> Path:
    """Fuse every test pair of `pair`; returns the output folder. Logged to MLflow."""
    from medfuse.tracking import start_run

    out = Path(out) if out is not None else default_fused_dir(method, pair, variant)
    config = method_config(params, method, variant)
    prepared = PreparedData(params["data"]["prepare"]["out_dir"])
    rows = prepared.rows(pair, "test")
    start = time.perf_counter()
    used_precision = "n/a"  # classical and published methods have none
    if config.get("kind") == "published":
        copy_published(params, config, pair, rows, out)
        fuse_s = 0.0
    else:
        fuser = load_fuser(params, method, variant, pair, model_path, device, precision)
        used_precision = getattr(fuser, "precision", used_precision)
        output = OutputSettings.of(params, method, variant)
        fuse_s = 0.0
        for _, row in rows.iterrows():
            sample = prepared.load(row)
            a = sample.a if sample.a_rgb is None else output.functional_luma(sample.a_rgb)
            tic = time.perf_counter()
            fused = fuser.fuse(a / 255.0, sample.b / 255.0)
            fuse_s += time.perf_counter() - tic
            write_fused(out, sample.name, output.to_uint8(fused), sample.a_rgb, output)
    total_s = time.perf_counter() - start
    log.info("fused %d %s test pairs with %s into %s", len(rows), pair, method, out)
    with start_run(
        params, step="fuse", method=method, pair=pair, variant=variant, log_all_params=False
    ) as run:
        run.log_params(
            {"out_dir": str(out), "model": str(model_path or ""), "precision": used_precision}
        )
        run.set_tags({"precision": used_precision})
        run.log_metrics(
            {"pairs": len(rows), "ms_per_pair": 1000 * fuse_s / len(rows), "total_s": total_s},
            step=0,
        )
    return out


def fuse_files(
    params: Mapping[str, Any],
    method: str,
    path_a: Path,
    path_b: Path,
    out: Path,
    variant: str = "full",
    model_path: Path | None = None,
    device: str | None = None,
    pair: str | None = None,
    precision: str | None = None,
) -> Path:
    """Fuse one user-given registered pair; A may be grey or RGB (fused through its luma).
    Returns the file written: `out`, or <out>/<A's stem>_fused.png when `out` is a folder."""
    out = fused_file_path(Path(out), Path(path_a))
    output = OutputSettings.of(params, method, variant)
    a_image = read_image(path_a)
    b = read_image(path_b, mode="L")
    a_rgb = None
    if a_image.ndim == 3 and not (
        np.array_equal(a_image[..., 0], a_image[..., 1])
        and np.array_equal(a_image[..., 0], a_image[..., 2])
    ):
        a_rgb, a = a_image, output.functional_luma(a_image)
    else:
        a = a_image if a_image.ndim == 2 else a_image[..., 0]
    if a.shape != b.shape:
        raise DataError(
            f"{path_a} is {a.shape[0]}x{a.shape[1]} but {path_b} is {b.shape[0]}x{b.shape[1]}: "
            "the two sources must be registered images of the same size"
        )
    fuser = load_fuser(params, method, variant, pair, model_path, device, precision)
    fused_y = output.to_uint8(fuser.fuse(a / 255.0, b / 255.0))
    try:
        write_image(out, output.recolour(fused_y, a_rgb) if a_rgb is not None else fused_y)
    except OSError as exc:  # no permission, a file where a folder should be, a full disk
        raise DataError(f"{out}: cannot write the fused image ({exc.strerror or exc})") from exc
    return out


def fused_file_path(out: Path, path_a: Path) -> Path:
    """The file `-o` names, checked before any work: an existing folder means "into it", as
    for cp (<folder>/<A's stem>_fused.png); the suffix must name a format `write_image` writes
    (a JPEG is written, with a warning that it is lossy)."""
    if out.is_dir():
        out = out / f"{path_a.stem}_fused.png"
    if image_format(out) in LOSSY_FORMATS:
        log.warning(
            "%s: JPEG is lossy, so the file is not the exact fused image; compute metrics on a "
            "PNG (-o NAME.png)",
            out,
        )
    return out


def fuse_from_args(params: Mapping[str, Any], args: argparse.Namespace) -> Path:
    """The CLI's `fuse` command (see the module docstring for the two uses)."""
    images = list(args.images or [])
    precision = getattr(args, "precision", None)
    if args.pair is not None and not images:
        out = fuse_test_split(
            params,
            args.method,
            args.pair,
            args.variant,
            args.out,
            args.model,
            args.device,
            precision,
        )
    elif len(images) == 2:
        if args.out is None:
            raise ConfigError("fusing two images needs an output file: -o OUT.png")
        out = fuse_files(
            params,
            args.method,
            images[0],
            images[1],
            args.out,
            args.variant,
            args.model,
            args.device,
            args.pair,
            precision,
        )
    else:
        raise ConfigError(
            "give --pair P to fuse a test split, or two images: medfuse fuse A.png B.png -o OUT.png"
            f" (got {len(images)} image(s){' and --pair' if args.pair else ''})"
        )
    print(out)
    return out
