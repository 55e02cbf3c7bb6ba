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

from medfuse.config import deep_merge
from medfuse.errors import ConfigError, DataError
from medfuse.io import atomic_path
from medfuse.methods.net import FusionNet
from medfuse.methods.registry import build_method
from medfuse.plan import META, WEIGHTS, weights_meta
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
        _torch_save(dict(state), tmp)


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a file object: given a path, torch names the zip's inner folder after
    the file, here a random temporary name, so the same weights would never give the same bytes
    (nor the same DVC hash) twice."""
    with open(path, "wb") as file:
        torch.save(obj, file)


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
        _torch_save(model.state_dict(), weights_tmp)
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


class NetFuser:
    """A trained `FusionNet` seen through the `Fuser` interface (float [0, 1] in and out), run
    in a resolved precision (float32 or bfloat16 autocast; the weights stay float32)."""

    def __init__(self, name: str, net: FusionNet, device: str, precision: str = "float32") -> None:
        self.name = name
        self.net = net.to(device).eval()
        self.device = device
        self.precision = precision

    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return predict_pair(self.net, a, b, self.device, self.precision)


def load_learned(
    method: str,
    config: dict[str, Any],
    weights: Path,
    device: str,
    pair: str | None = None,
    precision: str = "float32",
) -> NetFuser:
    """The network the weights were trained as (config from model.json when present)."""
    state = load_checkpoint(weights, map_location=device)
    if not isinstance(state, Mapping):
        raise DataError(
            f"{weights}: a PyTorch file holding a {type(state).__name__}, not a state dict of "
            f"weights for method {method!r}"
        )
    if "model" in state and "epoch" in state:  # a training checkpoint carries its own meta
        meta = {k: state[k] for k in ("method", "pair", "config") if k in state}
        state = state["model"]
    else:
        meta = weights_meta(weights)
    if meta.get("method") not in (None, method):
        raise ConfigError(f"{weights}: trained for method {meta['method']!r}, not {method!r}")
    saved = meta.get("config", {})
    # What the weights were trained with wins; a setting added to params.yaml since (so absent
    # from an older model.json) comes from the current settings.
    trained_as = deep_merge(config, json.loads(saved) if isinstance(saved, str) else saved)
    net = build_learned(method, trained_as, meta.get("pair", pair))
    misfit = _misfit(net, state)
    if misfit is None:
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            misfit = str(exc).strip().splitlines()[0]
    if misfit is not None:
        raise DataError(f"{weights}: weights do not fit method {method!r}: {misfit}")
    return NetFuser(method, net, device, precision)


def _misfit(net: torch.nn.Module, state: Mapping[str, Any]) -> str | None:
    """Why `state` is not a state dict of `net`, in one line (torch's own message spans many
    lines and names every tensor); None when it fits."""
    not_tensors = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        return f"the file holds a dict, but not of tensors (e.g. {not_tensors[0]!r})"
    expected = net.state_dict()
    unknown = [name for name in state if name not in expected]
    missing = [name for name in expected if name not in state]
    if unknown or missing:
        return (
            f"{len(missing)} of the network's {len(expected)} tensors are missing and "
            f"{len(unknown)} of the file's {len(state)} are unknown to it (e.g. "
            f"{(unknown or missing)[0]!r}); weights of another method or model size?"
        )
    for name, value in state.items():
        if value.shape != expected[name].shape:
            return (
                f"{name!r} is {tuple(value.shape)} in the file but {tuple(expected[name].shape)} "
                "in the network; trained with other model settings?"
            )
    return None
