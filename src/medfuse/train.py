"""The one training loop of every learned method: seed, data, model, optimiser, loop, checkpoint.

It needs only a `FusionNet`'s `training_loss(a, b)` (see `medfuse.methods.base`), so W-DUALMINE
and the peers train the same way. A checkpoint after every epoch holds the model, optimiser and
every random state, so `--resume` after a crash gives the same weights as an uninterrupted run
(on CPU, where kernels are deterministic), in float32 and in bfloat16 alike. Checkpoints are read
with `weights_only=True`: a file that would need arbitrary unpickling is refused, and one that is
no sound PyTorch file (text, an image, a cut-short or damaged archive) is named as what it is.

A trained model is model.json plus model.pt, and model.pt's rename is its one commit point (see
`save_weights`). A training killed outright leaves its MLflow run RUNNING; the next training of
the same job into the same folder marks that run KILLED (see `end_killed_runs`).

`train.precision` (see `medfuse.precision`) picks float32 or bfloat16 autocast; parameters,
optimiser state and checkpoints are float32 either way.
"""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import random
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from medfuse.config import canonical_method, job_params, method_config
from medfuse.data.dataset import Augment, PairDataset
from medfuse.data.prepared import PreparedData, Sample
from medfuse.errors import ConfigError, DataError
from medfuse.io import atomic_path, to_uint8, write_image, write_text_atomic
from medfuse.memory import keep_freed_memory
from medfuse.methods.base import FusionNet
from medfuse.methods.registry import build_method
from medfuse.precision import autocast, resolve_precision

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
META = "model.json"
HISTORY = "history.csv"


def default_model_dir(method: str, pair: str, variant: str) -> Path:
    return Path("results") / "models" / canonical_method(method) / pair / variant


def build_learned(method: str, config: Mapping[str, Any], pair: str | None) -> FusionNet:
    """A learned method's network; its factory also receives the pair (a peer may depend on it)."""
    return build_method(method, {**config, "pair": pair})


@dataclass(frozen=True)
class TrainSettings:
    """Everything the loop needs, resolved from params.yaml, the method section and the CLI."""

    seed: int
    epochs: int
    batch_size: int
    optimiser: str
    lr: float
    weight_decay: float
    image_size: int | None
    augment: Augment
    max_steps_per_epoch: int | None
    sample_fusions: int
    num_workers: int
    device: str
    precision: str  # resolved: float32 | bfloat16


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {requested!r}; use auto, cpu or cuda")
    return requested


def resolve_settings(
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    device: str | None = None,
    epochs: int | None = None,
    precision: str | None = None,
) -> TrainSettings:
    train = params.get("train", {})
    optim = config.get("optim", {})
    resolved_device = resolve_device(device or train.get("device", "auto"))
    resolved_precision = resolve_precision(precision or train.get("precision"), resolved_device)
    n_epochs = int(epochs if epochs is not None else optim.get("epochs", 1))
    if n_epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {n_epochs}")
    return TrainSettings(
        seed=int(params.get("seed", 0)),
        epochs=n_epochs,
        batch_size=int(optim.get("batch_size", 8)),
        optimiser=str(optim.get("name", "adam")),
        lr=float(optim.get("lr", 1e-4)),
        weight_decay=float(optim.get("weight_decay", 0.0)),
        image_size=train.get("image_size"),
        augment=Augment.from_config(train.get("augment")),
        max_steps_per_epoch=train.get("max_steps_per_epoch"),
        sample_fusions=int(train.get("sample_fusions", 0)),
        num_workers=int(train.get("num_workers", 0)),
        device=resolved_device,
        precision=resolved_precision,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_optimiser(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimiser == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimiser == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ConfigError(f"unknown optimiser {s.optimiser!r}; use adam or adamw")


# ---- random states and checkpoints (tensors and plain values only: weights_only loads them) ----


def rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], loader_generator: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# ---- the loop ----


def train_one_epoch(
    model: FusionNet,
    loader: DataLoader,
    optimiser: torch.optim.Optimizer,
    s: TrainSettings,
    epoch: int,
) -> dict[str, float]:
    """One pass over the loader (or `max_steps_per_epoch` batches); mean of each loss term."""
    model.train()
    sums: dict[str, float] = {}
    steps = images = 0
    total_steps = (
        len(loader) if s.max_steps_per_epoch is None else min(len(loader), s.max_steps_per_epoch)
    )
    start = time.perf_counter()
    batches = itertools.islice(loader, total_steps)
    bar = tqdm(
        batches, total=total_steps, desc=f"epoch {epoch}/{s.epochs}", leave=False, unit="batch"
    )
    for a, b in bar:
        a = a.to(s.device, non_blocking=True)
        b = b.to(s.device, non_blocking=True)
        with autocast(s.precision, s.device):  # bfloat16 needs no loss scaling
            loss, terms = model.training_loss(a, b)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        steps += 1
        images += a.shape[0]
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        rate = images / (time.perf_counter() - start)
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in terms.items()}, "img/s": f"{rate:.2f}"})
    bar.close()
    if steps == 0:
        raise DataError("no training batch: the train split is empty")
    elapsed = time.perf_counter() - start
    stats = {f"loss/{name}": value / steps for name, value in sums.items()}
    stats.update(
        {"images_per_s": images / elapsed, "s_per_step": elapsed / steps, "epoch_s": elapsed}
    )
    return stats


def _settings_params(s: TrainSettings, method: str, pair: str, variant: str) -> dict[str, str]:
    values = {
        **asdict(s),
        "augment": asdict(s.augment),
        "method": method,
        "pair": pair,
        "variant": variant,
    }
    return {f"run.{k}": str(v) for k, v in values.items()}


def _resume_key(
    method: str, pair: str, variant: str, config: Mapping[str, Any], precision: str = "float32"
) -> dict:
    """What a checkpoint must match to be resumed (the epoch count may grow: train longer).

    The precision is part of it: epochs in float32 continued in bfloat16 (or back) give weights
    that neither an uninterrupted float32 nor an uninterrupted bfloat16 run gives, so a resume
    across precisions is refused rather than silently spliced; `--precision` picks the one the
    checkpoint was written in.
    """
    settings = json.loads(json.dumps(config))
    settings.get("optim", {}).pop("epochs", None)
    return {
        "method": method,
        "pair": pair,
        "variant": variant,
        "config": json.dumps(settings, sort_keys=True),
        "precision": precision,
    }


# Keys added to the resume key later, with the value every older checkpoint was written with.
_KEY_DEFAULTS = {"precision": "float32"}


def _check_resumable(state: Mapping[str, Any], key: Mapping[str, Any], path: Path) -> None:
    for name, expected in key.items():
        found = state.get(name, _KEY_DEFAULTS.get(name))
        if found != expected:
            remedy = f"--precision {found}, " if name == "precision" else ""
            raise ConfigError(
                f"{path}: checkpoint was written for {name}={found!r}, not {expected!r}; "
                f"{remedy}remove it or train into another --out"
            )


def _make_loader(dataset: PairDataset, s: TrainSettings) -> tuple[DataLoader, torch.Generator]:
    """A shuffling loader whose generator is part of the checkpointed random state."""
    generator = torch.Generator().manual_seed(s.seed)
    loader = DataLoader(
        dataset,
        batch_size=s.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=s.num_workers,
        pin_memory=s.device == "cuda",
    )
    return loader, generator


def _resume(path: Path, key: Mapping[str, Any], trainer: dict[str, Any], device: str) -> tuple:
    """Restore model, optimiser and random states; return (epochs done, MLflow run)."""
    state = load_checkpoint(path, device)
    _check_resumable(state, key, path)
    trainer["model"].load_state_dict(state["model"])
    trainer["optimiser"].load_state_dict(state["optimiser"])
    restore_rng_state(state["rng"], trainer["generator"])
    log.info("resuming from epoch %d (%s)", int(state["epoch"]), path)
    return int(state["epoch"]), state.get("run_id")


def _checkpoint(trainer: dict[str, Any], key: Mapping[str, Any], epoch: int, run_id: str) -> dict:
    return {
        **key,
        "epoch": epoch,
        "run_id": run_id,
        "model": trainer["model"].state_dict(),
        "optimiser": trainer["optimiser"].state_dict(),
        "rng": rng_state(trainer["generator"]),
    }


def train_from_params(
    params: Mapping[str, Any],
    method: str = "wdualmine",
    pair: str = "CT-MRI",
    variant: str = "full",
    out_dir: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    epochs: int | None = None,
    precision: str | None = None,
) -> Path:
    """Train `method` (a learned one) on `pair`'s train split; return the final weights' path."""
    from medfuse.tracking import start_run

    params = job_params(params, variant)  # a seeded variant (full_seed<N>) trains with its seed
    config = method_config(params, method, variant)
    if config.get("kind") != "learned":
        raise ConfigError(
            f"method {method!r} is {config.get('kind')!r}, not learned: nothing to train"
        )
    s = resolve_settings(params, config, device, epochs, precision)
    out = Path(out_dir) if out_dir is not None else default_model_dir(method, pair, variant)
    key = _resume_key(method, pair, variant, config, s.precision)

    keep_freed_memory()
    seed_everything(s.seed)
    prepared = PreparedData(params["data"]["prepare"]["out_dir"])
    dataset = PairDataset(prepared.samples(pair, "train"), s.seed, s.augment, s.image_size)
    loader, generator = _make_loader(dataset, s)
    model = build_learned(method, config, pair).to(s.device)
    trainer = {"model": model, "optimiser": make_optimiser(model, s), "generator": generator}
    log.info("training %s in %s on %s", method, s.precision, s.device)
    start_epoch, run_id = 0, None
    checkpoint_path = out / CHECKPOINT
    if not resume:
        (out / HISTORY).unlink(missing_ok=True)
    if resume and checkpoint_path.is_file():
        start_epoch, run_id = _resume(checkpoint_path, key, trainer, s.device)
    elif resume:
        log.warning("%s: no checkpoint to resume from; starting at epoch 1", checkpoint_path)
    job = {"step": "train", "method": method, "pair": pair, "variant": variant}
    job_tags = {**job, "out_dir": str(out.resolve())}
    end_killed_runs(params, job_tags, run_id or _checkpoint_run_id(checkpoint_path))

    with start_run(params, **job, run_id=run_id) as run:
        if run.run_id != run_id:  # a new run (also when the checkpoint's is not in the store)
            run.log_params(_settings_params(s, method, pair, variant))
            run.set_tags(
                {
                    "device": s.device,
                    "precision": s.precision,
                    "parameters": parameter_count(model),
                    "out_dir": job_tags["out_dir"],
                }
            )
        for epoch in range(start_epoch, s.epochs):
            dataset.set_epoch(epoch)
            stats = train_one_epoch(model, loader, trainer["optimiser"], s, epoch + 1)
            run.log_metrics(stats, step=epoch + 1)
            append_history(out / HISTORY, epoch + 1, stats)
            log.info("epoch %d/%d %s", epoch + 1, s.epochs, _format_stats(stats))
            save_checkpoint(checkpoint_path, _checkpoint(trainer, key, epoch + 1, run.run_id))
        meta = {"method": method, "pair": pair, "variant": variant, "config": config}
        meta.update(epochs=s.epochs, seed=s.seed, precision=s.precision, run_id=run.run_id)
        weights = save_weights(out, model, meta)
        run.log_artifact(weights, "model")
        run.log_artifact(out / META, "model")
        samples_dir = write_sample_fusions(model, prepared, pair, s, out / "samples")
        if samples_dir is not None:
            run.log_artifacts(samples_dir, "samples")
    return weights


def _checkpoint_run_id(path: Path) -> str | None:
    """The MLflow run of the checkpoint in `path`, if one is there and can be read."""
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path).get("run_id")
    except DataError:  # a fresh start overwrites an unreadable checkpoint anyway
        return None


def end_killed_runs(
    params: Mapping[str, Any], job_tags: Mapping[str, str], run_id: str | None
) -> None:
    """A training killed outright (SIGKILL, out of memory, a cluster's time limit, a power cut)
    never ends its MLflow run, which would show RUNNING forever. One process trains into a
    folder at a time, so before this one starts, the runs still RUNNING of the same job and
    folder (`job_tags`), and `run_id` (the checkpoint's run), are marked KILLED."""
    from medfuse.tracking import end_stale_runs

    ended = end_stale_runs(params, job_tags["pair"], job_tags, (run_id,) if run_id else ())
    for stale in ended:
        log.warning("MLflow run %s of a killed training of this job: marked KILLED", stale)


def append_history(path: Path, epoch: int, stats: Mapping[str, float]) -> None:
    """history.csv (one row per epoch, for `dvc plots`); rows from a run that was later
    resumed at an earlier epoch are replaced."""
    rows = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if not rows.empty:
        rows = rows[rows["epoch"] < epoch]
    rows = pd.concat([rows, pd.DataFrame([{"epoch": epoch, **stats}])], ignore_index=True)
    write_text_atomic(path, rows.to_csv(index=False))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _format_stats(stats: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in stats.items())


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


def write_sample_fusions(
    model: FusionNet, prepared: PreparedData, pair: str, s: TrainSettings, folder: Path
) -> Path | None:
    """A few test pairs as [A | B | fused] strips, so a run shows what the model does."""
    if s.sample_fusions <= 0:
        return None
    try:
        rows = prepared.rows(pair, "test").head(s.sample_fusions)
    except DataError as exc:
        log.warning("no sample fusions: %s", exc)
        return None
    for _, row in rows.iterrows():
        sample: Sample = prepared.load(row)
        fused = predict_pair(model, sample.a / 255.0, sample.b / 255.0, s.device, s.precision)
        fused = to_uint8(fused)
        write_image(folder / f"{sample.name}.png", np.hstack([sample.a, sample.b, fused]))
    return folder
