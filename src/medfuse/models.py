"""A trained model on disk and in memory: its files, reading them safely, running it.

The training loop writes these files and `fuse` reads them; both import them from here (one
place), and neither imports the other. Checkpoints and weights are read with
`weights_only=True`: a file that would need arbitrary unpickling is refused, and one that is no
sound PyTorch file (text, an image, a cut-short or damaged archive) is named as what it is.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfuse.errors import ConfigError, DataError
from medfuse.io import atomic_path
from medfuse.methods.base import FusionNet
from medfuse.methods.registry import build_method
from medfuse.plan import META, WEIGHTS
from medfuse.precision import autocast


def build_learned(method: str, config: Mapping[str, Any], pair: str | None) -> FusionNet:
    """A learned method's network; its factory also receives the pair (a peer may depend on it)."""
    return build_method(method, {**config, "pair": pair})


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {requested!r}; use auto, cpu or cuda")
    return requested


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write the checkpoint under a temporary name and rename it: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint or weights file with `weights_only=True`; anything else is refused,
    with one line saying what the file is instead (see `_check_torch_file`)."""
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    _check_torch_file(path)
    try:
        with warnings.catch_warnings():  # its advice on pickle protocols is a second line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(_unpickling_problem(path, exc)) from exc
    except EOFError as exc:
        raise DataError(f"{path}: a truncated PyTorch file: it ends too early") from exc
    except Exception as exc:  # the weights-only unpickler fails on damaged bytes in any way
        raise DataError(f"{path}: a corrupted PyTorch file: {_first_line(exc)}") from exc


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # torch.save's default format is a zip archive
# Older torch.save files (and other pickles) start with a pickle PROTO opcode (protocol 2-5).
_PICKLE_PROTO = tuple(bytes([0x80, n]) for n in range(2, 6))
_EXPECTED = "expected weights written by torch.save, such as a training's model.pt"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_torch_file(path: Path) -> None:
    """Refuse, before torch reads it, a file that is no PyTorch file at all (text, an image,
    random bytes: torch.load's errors for them are tracebacks or misleading) or a zip archive
    that is cut short, damaged or not a weights file."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(_ZIP_MAGIC):
        _check_torch_zip(path)
    elif not head.startswith(_PICKLE_PROTO):
        what = _describe_bytes(path, head)
        raise DataError(f"{path}: not a PyTorch checkpoint: {what}; {_EXPECTED}")


def _describe_bytes(path: Path, head: bytes) -> str:
    """What a file that is not a PyTorch file looks like, in a few words."""
    from PIL import Image, UnidentifiedImageError

    if not head:
        return "the file is empty"
    try:
        with Image.open(path) as image:
            return f"it is a {image.format} image"
    except (UnidentifiedImageError, OSError, ValueError):
        pass
    if _looks_like_text(head):
        return "it is a text file"
    return "its bytes are neither a zip archive nor a pickle"


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 without NUL bytes (a character cut off at the end of the sample still counts)."""
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3
    return True


def _check_torch_zip(path: Path) -> None:
    """A zip archive must be complete, pass its CRC checks and hold a torch.save data.pkl."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()  # torch itself does not check the CRCs
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(
            f"{path}: a truncated or corrupted PyTorch checkpoint: not a complete zip archive "
            f"({_first_line(exc)}); an interrupted save or copy? save or copy it again"
        ) from exc
    if damaged is not None:
        raise DataError(
            f"{path}: a corrupted PyTorch checkpoint: {damaged!r} fails its CRC check; "
            "save or copy it again"
        )
    if any(name.endswith("/constants.pkl") for name in names):
        raise DataError(
            f"{path}: a TorchScript module, not a weights checkpoint; save the model's "
            "state_dict() with torch.save"
        )
    if not any(name.endswith("/data.pkl") for name in names):
        raise DataError(
            f"{path}: not a PyTorch checkpoint: a zip archive of other files; {_EXPECTED}"
        )


def _unpickling_problem(path: Path, exc: pickle.UnpicklingError) -> str:
    """A pickled object outside the weights-only allow-list is refused; any other unpickling
    failure means a pickle torch.save did not write, or damaged bytes."""
    text = str(exc)
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        name = text[text.index(marker) + len(marker) :].split()[0]
        return (
            f"{path}: refused: not a weights-only checkpoint: it holds pickled Python objects "
            f"({name}) and unpickling them could run arbitrary code; save a state_dict() instead"
        )
    return f"{path}: a corrupted PyTorch file, or a pickle not written by torch.save; {_EXPECTED}"


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_weights(out: Path, model: torch.nn.Module, meta: Mapping[str, Any]) -> Path:
    """model.json (what built the weights) and model.pt (a plain state_dict), committed by
    model.pt's rename, which comes last: model.pt is what Snakemake, DVC and `fuse` take as
    "the model exists", so a crash at any point leaves the previous complete pair or no
    model.pt, never weights without (or with another run's) model.json."""
    weights = out / WEIGHTS
    info = {**meta, "parameters": parameter_count(model), "torch": torch.__version__}
    # Exit order: the inner block renames model.json first, then the outer one model.pt.
    with atomic_path(weights) as weights_tmp, atomic_path(out / META) as meta_tmp:
        torch.save(model.state_dict(), weights_tmp)
        meta_tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        weights.unlink(missing_ok=True)  # the old weights must not pair with the new model.json
    return weights


@torch.no_grad()
def predict_pair(
    model: FusionNet, a: np.ndarray, b: np.ndarray, device: str, precision: str = "float32"
) -> np.ndarray:
    """Float (H, W) sources in [0, 1] -> fused float64 (H, W) in [0, 1], by a learned model
    (run in `precision`, a resolved one: float32 or bfloat16)."""
    model.eval()
    ta = torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None].to(device)
    tb = torch.as_tensor(np.asarray(b, dtype=np.float32))[None, None].to(device)
    with autocast(precision, device):
        fused = model(ta, tb)
    return fused[0, 0].double().clamp(0.0, 1.0).cpu().numpy()
