"""The one training loop of every learned method: seed, data, model, optimiser, loop, checkpoint.

It needs only a `FusionNet`'s `training_loss(a, b)` (see `medfuse.methods.net`), so W-DUALMINE
and the peers train the same way. A checkpoint after every epoch holds the model, optimiser and
every random state and the history so far, so `--resume` after a crash gives the same weights as
an uninterrupted run (on CPU, where kernels are deterministic), in float32 and in bfloat16 alike.
Checkpoints are read with `weights_only=True` (`medfuse.models`) and live beside the model folder
(`plan.checkpoint_path`), where the workflow tools' removal of a rerun job's outputs leaves them.

Resume modes: "if-unchanged" (the default, so what the Snakefile and dvc.yaml run) continues the
checkpoint only when settings, precision, medfuse's source and the prepared data are all those
that wrote it, and otherwise trains from epoch 1: an interrupted `snakemake`/`dvc repro`
continues each training where it stopped, and a changed one starts afresh. "yes" (`--resume`)
continues it under other code or data too and refuses one of other settings; "no" (`--fresh`)
trains from epoch 1.

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
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from medfuse.config import (
    canonical_method,
    deep_merge,
    job_params,
    method_config,
    setting,
    split_seed,
)
from medfuse.data.dataset import Augment, PairDataset
from medfuse.data.prepared import PreparedData, Sample
from medfuse.errors import ConfigError, DataError
from medfuse.io import to_uint8, write_image, write_text_atomic
from medfuse.memory import keep_freed_memory
from medfuse.methods.net import FusionNet
from medfuse.models import (
    build_learned,
    load_checkpoint,
    parameter_count,
    predict_pair,
    resolve_device,
    save_checkpoint,
    save_weights,
)
from medfuse.plan import (
    ALL_PAIRS,
    HISTORY,
    LEGACY_CHECKPOINT,
    META,
    WEIGHTS,
    checkpoint_path,
    model_dir,
    stage1_dir,
    weights_meta,
)
from medfuse.precision import autocast, resolve_precision

log = logging.getLogger(__name__)

Resume = Literal["no", "yes", "if-unchanged"]
RESUME_MODES: tuple[Resume, ...] = ("no", "yes", "if-unchanged")


def stage1_name(method: str) -> str:
    """The registry name of a two-stage method's first stage (its own network and loss)."""
    return f"{canonical_method(method)}:stage1"


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


def resolve_settings(
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    device: str | None = None,
    epochs: int | None = None,
    precision: str | None = None,
) -> TrainSettings:
    # A method's own `train` section (e.g. whole images, no augmentation) overrides the global one.
    train = deep_merge(setting(params, "train", "params"), config.get("train", {}))
    optim = setting(config, "optim", "the method's settings")

    resolved_device = resolve_device(device or setting(train, "device", "train"))
    resolved_precision = resolve_precision(
        precision or setting(train, "precision", "train"), resolved_device
    )
    n_epochs = int(epochs if epochs is not None else setting(optim, "epochs", "optim"))
    if n_epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {n_epochs}")
    return TrainSettings(
        seed=int(setting(params, "seed", "params")),
        epochs=n_epochs,
        batch_size=int(setting(optim, "batch_size", "optim")),
        optimiser=str(setting(optim, "name", "optim")),
        lr=float(setting(optim, "lr", "optim")),
        weight_decay=float(setting(optim, "weight_decay", "optim")),
        image_size=setting(train, "image_size", "train"),
        augment=Augment.from_config(setting(train, "augment", "train")),
        max_steps_per_epoch=setting(train, "max_steps_per_epoch", "train"),
        sample_fusions=int(setting(train, "sample_fusions", "train")),
        num_workers=int(setting(train, "num_workers", "train")),
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
# What wrote a checkpoint besides its settings: a difference stops "if-unchanged" only; `--resume`
# continues anyway (the user vouches for the change) and says so.
_SOURCE_KEYS = {"code": "medfuse source", "data": "prepared data"}


def _source_key(params: Mapping[str, Any]) -> dict[str, str]:
    from medfuse.tracking import code_fingerprint, data_manifest_hash

    return {"code": code_fingerprint(), "data": data_manifest_hash(params)}


def _differences(state: Mapping[str, Any], key: Mapping[str, Any], epochs: int) -> list[str]:
    """The names of what `state` was written for that this training is not."""
    names = [n for n, want in key.items() if state.get(n, _KEY_DEFAULTS.get(n)) != want]
    return [*names, "epochs"] if int(state.get("epoch", 0)) > epochs else names


def _check_resumable(
    state: Mapping[str, Any], key: Mapping[str, Any], path: Path, epochs: int
) -> None:
    """Refuse (`--resume`) a checkpoint of other settings, precision or a later epoch; warn of
    other code or data."""
    for name in _differences(state, key, epochs):
        if name == "epochs":
            done = int(state["epoch"])
            raise ConfigError(
                f"{path}: checkpoint is at epoch {done}, beyond the {epochs} asked; "
                f"give --epochs {done} or more, remove it or train into another --out"
            )
        found = state.get(name, _KEY_DEFAULTS.get(name))
        if name in _SOURCE_KEYS:
            log.warning("%s: written by other %s; resuming as asked", path, _SOURCE_KEYS[name])
            continue
        remedy = f"--precision {found}, " if name == "precision" else ""
        raise ConfigError(
            f"{path}: checkpoint was written for {name}={found!r}, not {key[name]!r}; "
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


def _read_checkpoint(path: Path, mode: Resume, device: str) -> dict[str, Any] | None:
    """The checkpoint at `path`, read once: to continue from, or for the MLflow run a fresh
    start ends. None when there is none, or (unless `--resume` asked for it) it is unreadable."""
    if not path.is_file():
        if mode == "yes":
            log.warning("%s: no checkpoint to resume from; starting at epoch 1", path)
        return None
    try:
        return load_checkpoint(path, device)
    except DataError as exc:
        if mode == "yes":
            raise
        log.warning("%s; training from epoch 1", exc)
        return None


def _state_to_resume(
    found: Mapping[str, Any] | None, path: Path, key: Mapping[str, Any], mode: Resume, epochs: int
) -> Mapping[str, Any] | None:
    """The checkpoint to continue from, or None to train from epoch 1 (see the resume modes)."""
    if found is None or mode == "no":
        return None
    if mode == "yes":
        _check_resumable(found, key, path, epochs)
        return found
    changed = _differences(found, key, epochs)
    if changed:
        log.info("%s: written for other %s; training from epoch 1", path, ", ".join(changed))
        return None
    return found


def _resume(state: Mapping[str, Any], trainer: dict[str, Any], path: Path) -> tuple:
    """Restore model, optimiser and random states; return (epochs done, MLflow run)."""
    trainer["model"].load_state_dict(state["model"])
    trainer["optimiser"].load_state_dict(state["optimiser"])
    restore_rng_state(state["rng"], trainer["generator"])
    log.info("resuming from epoch %d (%s)", int(state["epoch"]), path)
    return int(state["epoch"]), state.get("run_id")


def _history_to_resume(state: Mapping[str, Any], out: Path) -> list[dict[str, float]]:
    """The epochs' history rows up to the checkpoint: its own (a checkpoint of older code has
    none: then the rows of history.csv up to its epoch)."""
    if "history" in state:
        return [dict(row) for row in state["history"]]
    path = out / HISTORY
    if not path.is_file():
        return []
    rows = pd.read_csv(path)
    rows = rows[rows["epoch"] <= int(state["epoch"])]
    # Plain Python numbers: a weights-only load of the next checkpoint refuses numpy scalars.
    return [
        {k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
        for row in rows.to_dict("records")
    ]


def _move_legacy_checkpoint(out: Path, path: Path) -> None:
    legacy = out / LEGACY_CHECKPOINT
    if legacy.is_file() and not path.exists():
        legacy.rename(path)
        log.info("moved %s to %s (checkpoints now live beside the model folder)", legacy, path)


def _finished_by(out: Path, run_id: str | None, epochs: int) -> bool:
    """Whether `out` holds the final weights of training run `run_id` (its model.json names the
    run and the epochs): then a resume has nothing to do, and leaves weights, samples and the
    MLflow run as they are. A run killed between its last checkpoint and its weights is not."""
    if run_id is None or not (out / WEIGHTS).is_file():
        return False
    try:
        meta = weights_meta(out / WEIGHTS)  # {} when there is none
    except DataError:  # an unreadable model.json: the resume writes a new one
        return False
    return isinstance(meta, dict) and meta.get("run_id") == run_id and meta.get("epochs") == epochs


def _checkpoint(
    trainer: dict[str, Any],
    key: Mapping[str, Any],
    epoch: int,
    run_id: str,
    history: list[dict[str, float]] | None = None,
) -> dict:
    return {
        **key,
        "epoch": epoch,
        "run_id": run_id,
        "model": trainer["model"].state_dict(),
        "optimiser": trainer["optimiser"].state_dict(),
        "rng": rng_state(trainer["generator"]),
        "history": history or [],
    }


def train_from_params(
    params: Mapping[str, Any],
    method: str = "wdualmine",
    pair: str = "CT-MRI",
    variant: str = "full",
    out_dir: str | Path | None = None,
    resume: Resume = "if-unchanged",
    device: str | None = None,
    epochs: int | None = None,
    precision: str | None = None,
    stage1: bool = False,
    stage1_model: str | Path | None = None,
) -> Path:
    """Train `method` (a learned one) on `pair`'s train split, or on every pair's when `pair` is
    ALL_PAIRS (a unified method); with `stage1`, train the method's first stage instead. A
    two-stage method's training starts from its trained first stage (`stage1_model`, else
    plan.stage1_dir). `resume`: one of RESUME_MODES (see the module's doc). Return the final
    weights' path."""
    from medfuse.tracking import start_run

    params = job_params(params, variant)  # a seeded variant (full_seed<N>) trains with its seed
    config = method_config(params, method, variant)
    if config.get("kind") != "learned":
        raise ConfigError(
            f"method {method!r} is {config.get('kind')!r}, not learned: nothing to train"
        )
    job_method = stage1_name(method) if stage1 else canonical_method(method)
    if stage1:
        config = _stage1_config(method, variant, config, pair)
    else:
        _check_training_pair(method, variant, config, pair)
    s = resolve_settings(params, config, device, epochs, precision)
    if out_dir is not None:
        out = Path(out_dir)
    else:
        out = stage1_dir(method) if stage1 else model_dir(method, pair, variant)
    if resume not in RESUME_MODES:
        raise ConfigError(f"resume must be one of {', '.join(RESUME_MODES)}, not {resume!r}")
    key = {**_resume_key(job_method, pair, variant, config, s.precision), **_source_key(params)}
    keep_freed_memory()
    seed_everything(s.seed)
    prepared = PreparedData(params["data"]["prepare"]["out_dir"])
    samples = _training_samples(prepared, pair, params["experiments"]["pairs"])
    dataset = PairDataset(samples, s.seed, s.augment, s.image_size)
    loader, generator = _make_loader(dataset, s)
    model = build_learned(job_method, config, pair).to(s.device)
    if "stage1" in config:
        _load_stage1(model, method, stage1_model, s.device)
    trainer = {"model": model, "optimiser": make_optimiser(model, s), "generator": generator}
    log.info("training %s in %s on %s", job_method, s.precision, s.device)
    start_epoch, run_id, history = 0, None, []
    checkpoint = checkpoint_path(out)
    _move_legacy_checkpoint(out, checkpoint)  # also for --fresh: none stays in the folder
    found = _read_checkpoint(checkpoint, resume, s.device)
    state = _state_to_resume(found, checkpoint, key, resume, s.epochs)
    old_run_id = found.get("run_id") if found is not None else None
    del found  # a discarded checkpoint's weights need not stay in memory through the training
    if state is None:
        (out / HISTORY).unlink(missing_ok=True)
    else:
        start_epoch, run_id = _resume(state, trainer, checkpoint)
        if start_epoch == s.epochs and _finished_by(out, run_id, s.epochs):
            log.info("%s: already trained (%d epochs, MLflow run %s)", out, s.epochs, run_id)
            return out / WEIGHTS
        history = _history_to_resume(state, out)
        write_history(out / HISTORY, history)
    job = {"step": "train", "method": job_method, "pair": pair, "variant": variant}
    job_tags = {**job, "out_dir": str(out.resolve())}
    end_killed_runs(params, job_tags, old_run_id)
    with start_run(params, **job, run_id=run_id) as run:
        if run.run_id != run_id:  # a new run (also when the checkpoint's is not in the store)
            run.log_params(_settings_params(s, job_method, pair, variant))
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
            history.append({"epoch": epoch + 1, **stats})
            write_history(out / HISTORY, history)
            log.info("epoch %d/%d %s", epoch + 1, s.epochs, _format_stats(stats))
            save_checkpoint(checkpoint, _checkpoint(trainer, key, epoch + 1, run.run_id, history))
        meta = {"method": job_method, "pair": pair, "variant": variant, "config": config}
        meta.update(epochs=s.epochs, seed=s.seed, precision=s.precision, run_id=run.run_id)
        weights = save_weights(out, model, meta)
        run.log_artifact(weights, "model")
        run.log_artifact(out / META, "model")
        if not stage1:  # a first stage does not fuse
            sample_pair = params["experiments"]["pairs"][0] if pair == ALL_PAIRS else pair
            samples_dir = write_sample_fusions(model, prepared, sample_pair, s, out / "samples")
            if samples_dir is not None:
                run.log_artifacts(samples_dir, "samples")
    return weights


def _check_training_pair(method: str, variant: str, config: Mapping[str, Any], pair: str) -> None:
    """A unified model is trained on every pair's images (pair `all`), any other per pair."""
    unified = bool(config.get("unified", False))
    if unified and pair != ALL_PAIRS:
        raise ConfigError(
            f"{method} ({variant}) trains one model on every pair's training images: use "
            f"--pair {ALL_PAIRS} (or a variant with unified: false for one model per pair)"
        )
    if pair == ALL_PAIRS and not unified:
        raise ConfigError(
            f"{method} ({variant}) trains one model per pair: give --pair, not {ALL_PAIRS!r}"
        )


def _stage1_config(
    method: str, variant: str, config: Mapping[str, Any], pair: str
) -> dict[str, Any]:
    """The first stage's own settings (a variant may change only the second stage's); it
    trains once, on every pair's images."""
    if "stage1" not in config:
        raise ConfigError(f"method {method!r} has no first stage (no methods.{method}.stage1)")
    if variant != "full" and split_seed(variant)[1] is None:
        raise ConfigError(
            f"{method}: the first stage is trained once, from the method's own settings; "
            f"train it with --variant full, not {variant!r}"
        )
    if pair != ALL_PAIRS:
        raise ConfigError(
            f"{method}: the first stage trains on every pair's images: use --pair {ALL_PAIRS}"
        )
    return dict(config["stage1"])


def _training_samples(prepared: PreparedData, pair: str, pairs: list[str]) -> list[Sample]:
    """`pair`'s training pairs, or those of every pair of the experiments for ALL_PAIRS."""
    chosen = pairs if pair == ALL_PAIRS else [pair]
    return [sample for name in chosen for sample in prepared.samples(name, "train")]


def _load_stage1(model: FusionNet, method: str, path: str | Path | None, device: str) -> None:
    """Give a two-stage method's network its trained (frozen) first stage."""
    path = Path(path) if path is not None else stage1_dir(method) / WEIGHTS
    if not path.is_file():
        raise DataError(
            f"{path}: no trained first stage of {method}; run `medfuse train --method {method} "
            f"--stage1 --pair {ALL_PAIRS}` first (or give --stage1-model)"
        )
    trained_as = weights_meta(path).get("method")
    if trained_as not in (None, stage1_name(method)):
        raise ConfigError(f"{path}: weights of {trained_as!r}, not of {stage1_name(method)!r}")
    model.load_stage1(load_checkpoint(path, device))


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


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """history.csv: one row per epoch done (for `dvc plots` and the report's training times);
    the checkpoint carries the same rows, so a resume restores them whole."""
    if rows:
        write_text_atomic(path, pd.DataFrame(rows).to_csv(index=False))


def _format_stats(stats: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in stats.items())


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
