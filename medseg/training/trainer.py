"""``medseg train``: 2D slices in, a model folder out, validated on whole 3D volumes through
the exact ``segment`` code path so the reported Dice is what users get."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.data.manifest import Case, Manifest, load_manifest
from medseg.errors import ConfigError, FileProblem, MedsegError
from medseg.evaluation.metrics import dice_per_label
from medseg.inference.predictor import InferenceOptions, SlicePredictor, resolve_device
from medseg.inference.segment import segment_volume
from medseg.io import read_scan
from medseg.io.volume import Volume
from medseg.model import Model, save_model
from medseg.spec import LabelSpec, ModelSpec, labels_from_names
from medseg.training import distributed
from medseg.training.augment import augment_batch
from medseg.training.config import TrainConfig
from medseg.training.data import SliceBank, build_slice_bank, crop_batch, epoch_samples
from medseg.training.logs import log_epoch, save_curves, tensorboard_writer
from medseg.training.optimisation import Optimisation, TrainingState

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"
CONFIG_FILE = "config.json"
# What a training run writes into its folder (``overwrite`` removes these, nothing else).
RUN_OUTPUTS = (CONFIG_FILE, CHECKPOINT, "log.csv", "curves.png", "summary.json", MODEL_DIR, "tensorboard")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    model_dir: Path
    best_epoch: int
    best_dice: dict[str, float]
    epochs_run: int
    seconds: float


def model_spec(config: TrainConfig, manifest: Manifest) -> ModelSpec:
    """The ModelSpec a training run produces (labels from the config or the manifest)."""
    names = list(config.labels) if config.labels else [manifest.labels[k] for k in sorted(manifest.labels)]
    if config.labels:
        labels = labels_from_names(names)
    else:
        defaults = labels_from_names(names)
        labels = tuple(LabelSpec(v, d.name, d.color) for v, d in zip(sorted(manifest.labels), defaults))
    spec = config.layout.to_spec(labels, max(1, len(manifest.modality)), manifest.name or "medseg-model")
    # Every training slice is padded to at least the window and cropped to it (crop_batch):
    # recorded so inference pads small slices the same way and no others.
    return replace(spec, trained_window=tuple(config.window))


class _Validator:
    """Whole-volume validation through ``segment_volume`` (the code path users run)."""

    def __init__(self, cases: tuple[Case, ...], spec: ModelSpec) -> None:
        self.cases = cases
        self.spec = spec
        self.volumes: list[Volume] = [read_scan(c.image) for c in cases]
        self.refs = [np.rint(read_scan(c.label).array[0]).astype(np.int64) for c in cases]

    def __call__(self, network: nn.Module, device: str) -> dict[str, float]:
        model = Model(self.spec, network, Path("training"))
        predictor = SlicePredictor(model, InferenceOptions(device=device))
        values = [lab.value for lab in self.spec.labels[1:]]
        scores = {v: [] for v in values}
        for volume, ref in zip(self.volumes, self.refs):
            for v, d in dice_per_label(segment_volume(volume, predictor), ref, values).items():
                scores[v].append(d)
        names = {lab.value: lab.name for lab in self.spec.labels}
        return {names[v]: float(np.mean(s)) for v, s in scores.items()}


def train(
    config: TrainConfig,
    manifest_path: Path,
    run_dir: Path,
    resume: bool = False,
    data_root: Path | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train as ``config`` says on ``manifest_path``; the model folder is ``run_dir/model``.

    A ``run_dir`` that is not empty is refused (FileProblem), so no run is trained over by
    mistake: ``resume`` continues the run in it from its checkpoint (the configuration must be
    the saved one; a finished run is returned as it is), ``overwrite`` deletes that run's
    outputs and starts afresh.
    """
    if resume and overwrite:
        raise ConfigError(f"{run_dir}: resume and overwrite exclude each other; pass one of them")
    device = resolve_device(config.device)
    ctx = distributed.init_from_env(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        return _train(config, manifest_path, run_dir, resume, overwrite, data_root, show_progress, device, ctx)
    finally:
        distributed.shutdown(ctx)


def _train(
    config: TrainConfig,
    manifest_path: Path,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    data_root: Path | None,
    show_progress: bool,
    device: torch.device,
    ctx: distributed.DistContext,
) -> TrainResult:
    start_time = time.perf_counter()
    manifest = load_manifest(manifest_path, data_root)
    spec = model_spec(config, manifest)
    _prepare_run_dir(config, spec, run_dir, resume, overwrite, ctx)
    opt = Optimisation(config, spec, device, ctx)
    checkpoint = run_dir / CHECKPOINT
    state = opt.load(checkpoint) if resume and checkpoint.is_file() else TrainingState()
    if state.next_epoch >= config.epochs:
        _log_finished(run_dir, state)
        return _finish(run_dir, opt.module, state, state.next_epoch, state.elapsed_before, ctx, None)
    if resume:
        logger.info("resuming %s at epoch %d of %d", run_dir, state.next_epoch + 1, config.epochs)

    def elapsed() -> float:
        """Seconds of training so far, earlier runs of this training included."""
        return state.elapsed_before + time.perf_counter() - start_time

    bank = build_slice_bank(manifest.cases("training"), spec)
    # What the model saw, kept in its provenance: runs warn on scans far outside it.
    modality = ", ".join(manifest.modality.values())
    spec = replace(spec, provenance={**spec.provenance, "training_data": {"modality": modality, **bank.domain}})
    validator = _Validator(manifest.cases("validation"), spec) if ctx.is_main else None
    writer = tensorboard_writer(run_dir) if ctx.is_main else None
    epoch = state.next_epoch - 1
    # Training time at the last checkpoint is what the run reports, so reloading a finished
    # run (no epoch left) trains nothing and adds no time to it.
    seconds = state.elapsed_before
    for epoch in range(state.next_epoch, config.epochs):
        row = _train_epoch(opt, bank, config, epoch, ctx, show_progress)
        last = epoch + 1 == config.epochs
        out_of_time = config.time_limit_minutes is not None and elapsed() > 60 * config.time_limit_minutes
        if ctx.is_main:
            if (epoch + 1) % config.val_every == 0 or last or out_of_time:
                scores = validator(opt.module, str(device))
                opt.module.to(memory_format=torch.channels_last)
                row.update({f"dice_{k}": round(v, 4) for k, v in scores.items()})
                if state.record(epoch + 1, scores):
                    _save_model_folder(run_dir / MODEL_DIR, spec, opt, config, manifest, state, elapsed())
            state.history.append(row)
            log_epoch(state.history, run_dir, writer)
        seconds = elapsed()
        if ctx.is_main:
            opt.save(checkpoint, state, epoch, seconds)
        if distributed.broadcast_flag(ctx, out_of_time):
            logger.info("time limit of %s min reached after epoch %d", config.time_limit_minutes, epoch + 1)
            break
    return _finish(run_dir, opt.module, state, epoch + 1, seconds, ctx, writer)


def _prepare_run_dir(
    config: TrainConfig, spec: ModelSpec, run_dir: Path, resume: bool, overwrite: bool, ctx: distributed.DistContext
) -> None:
    """Refuse what would lose work, then save the resolved configuration.

    Rank 0 alone reads and writes the folder; the other ranks wait for its verdict, so none
    reads a half-written config.json or refuses a folder that rank 0 has just started.
    """
    error: MedsegError | None = None
    if ctx.is_main:
        try:
            _claim_run_dir(run_dir, resume, overwrite)
            _write_resolved_config(config, spec, run_dir, resume)
        except MedsegError as err:
            error = err
    if distributed.broadcast_flag(ctx, error is not None):
        raise error or ConfigError(f"{run_dir}: refused by rank 0 (its message says why)")


def check_run_folder(run_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse (FileProblem) a ``run_dir`` that training would write over without being asked:
    a file, or a folder that is not empty, unless ``resume`` or ``overwrite``. Changes nothing;
    callers that start several processes call it first, to fail once with a clear message."""
    if resume and overwrite:
        raise ConfigError(f"{run_dir}: resume and overwrite exclude each other; pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise FileProblem(run_dir, "is a file, not a run folder", "choose a folder for the run")
    if resume or overwrite or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    earlier_run = (run_dir / CONFIG_FILE).is_file() or (run_dir / CHECKPOINT).is_file()
    problem = "holds an earlier training run" if earlier_run else "is not empty"
    raise FileProblem(
        run_dir,
        f"{problem}; training into it would replace its files",
        "pass --resume to continue that run, --overwrite to replace it, or choose a new run folder",
    )


def _claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """``check_run_folder``, then with ``overwrite`` remove an earlier run's outputs (only
    those: other files in the folder stay)."""
    import shutil

    check_run_folder(run_dir, resume, overwrite)
    if not overwrite or not run_dir.is_dir():
        return
    removed = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.warning(
            "%s: overwrite: removed the earlier run's %s; training starts afresh", run_dir, ", ".join(removed)
        )


def _write_resolved_config(config: TrainConfig, spec: ModelSpec, run_dir: Path, resume: bool) -> None:
    """Save the configuration with every default filled in; refuse to resume under another one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    # Through JSON so tuples and lists compare equal with the saved file.
    resolved = json.loads(json.dumps({**config.to_dict(), "labels": [lab.name for lab in spec.labels]}))
    if resume and config_path.is_file():
        differences = config_differences(_saved_config(config_path), resolved)
        if differences:
            raise ConfigError(
                f"{config_path}: --resume with a different configuration ({'; '.join(differences)}); "
                f"resume with the saved one (--config {config_path}) or train into a new run folder"
            )
    config_path.write_text(json.dumps(resolved, indent=2) + "\n")


def config_differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: saved X, now Y`` for every setting that differs (nested ones as ``augment.gamma``)."""
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: saved {old!r}, now {new!r}")
    return out


def _log_finished(run_dir: Path, state: TrainingState) -> None:
    """Say that a resumed run has nothing left to train, and where its result is."""
    logger.warning(
        "%s is finished: all %d epochs are trained (best epoch %d, validation Dice %s); nothing to resume. "
        "Its model folder is %s; to train longer, start a new run folder with more epochs",
        run_dir,
        state.next_epoch,
        state.best_epoch,
        ", ".join(f"{k} {v:.4f}" for k, v in state.best_dice.items()) or "none",
        run_dir / MODEL_DIR,
    )


def _train_epoch(
    opt: Optimisation,
    bank: SliceBank,
    config: TrainConfig,
    epoch: int,
    ctx: distributed.DistContext,
    show_progress: bool,
) -> dict[str, Any]:
    """Train 0-based ``epoch``; its log row (loss, learning rate, speed)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    per_rank = config.steps_per_epoch * config.batch_size
    # The epoch's samples depend only on (seed, epoch): resuming replays them exactly, and
    # every rank draws the same list, which DistributedSampler then partitions.
    gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    samples = epoch_samples(bank, per_rank * ctx.world_size, config.pos_fraction, gen)
    sampler = torch.utils.data.DistributedSampler(
        range(len(samples)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False
    )
    local = samples[list(sampler)]
    aug_gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch * 101 + ctx.rank + 7)
    opt.network.train()
    losses: list[float] = []
    bar = tqdm(
        range(config.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        leave=False,
        disable=not (show_progress and ctx.is_main),
    )
    for step in bar:
        idx = local[step * config.batch_size : (step + 1) * config.batch_size]
        images, labels = crop_batch(bank, idx, config.window, aug_gen)
        images, labels = augment_batch(images, labels, config.augment, aug_gen)
        losses.append(opt.step(images, labels))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    seconds = time.perf_counter() - t0
    return {
        "epoch": epoch + 1,
        "lr": opt.lr,
        "loss": float(np.mean(losses)),
        "seconds": round(seconds, 2),
        "slices_per_s": round(per_rank * ctx.world_size / seconds, 1),
    }


def _finish(
    run_dir: Path,
    module: nn.Module,
    state: TrainingState,
    epochs_run: int,
    seconds: float,
    ctx: distributed.DistContext,
    writer: Any,
) -> TrainResult:
    """Check that replicas agree, write ``curves.png`` and ``summary.json``; the result."""
    fingerprints = distributed.weight_fingerprints(ctx, module)
    in_sync = all(f == fingerprints[0] for f in fingerprints)
    if not in_sync:
        raise RuntimeError("distributed replicas ended with different weights: a DDP bug")
    if ctx.is_main:
        if state.history:
            save_curves(state.history, run_dir / "curves.png")
        summary = {
            "best_epoch": state.best_epoch,
            "best_dice": state.best_dice,
            "epochs_run": epochs_run,
            "seconds": round(seconds, 1),
            "world_size": ctx.world_size,
            "replicas_in_sync": in_sync,
            "weight_fingerprint": fingerprints[0][:4],
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if writer is not None:
            writer.close()
    return TrainResult(run_dir, run_dir / MODEL_DIR, state.best_epoch, state.best_dice, epochs_run, seconds)


def _saved_config(path: Path) -> dict[str, Any]:
    """The resolved configuration saved in a run folder, with defaults filled in for options
    added since it was written (so a run stays resumable across medseg versions)."""
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()), where=str(path))
    except (OSError, ValueError, TypeError, RecursionError) as err:  # unreadable, not JSON, a field's type
        raise ConfigError(f"{path}: the saved configuration cannot be read ({type(err).__name__}: {err})") from err
    return json.loads(json.dumps(saved.to_dict()))


def _save_model_folder(
    folder: Path,
    spec: ModelSpec,
    opt: Optimisation,
    config: TrainConfig,
    manifest: Manifest,
    state: TrainingState,
    elapsed_seconds: float,
) -> None:
    """The best model so far; ``elapsed_seconds`` of training up to it, across resumes."""
    provenance = {
        "trained": True,
        "manifest": str(manifest.path),
        "dataset": manifest.name,
        "training_cases": len(manifest.cases("training")),
        "validation_cases": len(manifest.cases("validation")),
        "epoch": state.best_epoch,
        "validation_dice": state.best_dice,
        "training_minutes": round(elapsed_seconds / 60, 1),
        # What this training ran on: the device it used, not merely one the machine has.
        "hardware": torch.cuda.get_device_name(opt.device)
        if opt.device.type == "cuda"
        else f"{platform.machine()} CPU x{torch.get_num_threads()} threads",
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[opt.amp],
        "torch": torch.__version__,
        "config": config.to_dict(),
        **({"training_data": spec.provenance["training_data"]} if "training_data" in spec.provenance else {}),
    }
    save_model(folder, replace(spec, provenance=provenance), opt.module)
