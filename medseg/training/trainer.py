"""``medseg train``: 2D slices in, a model folder out, validated on whole 3D volumes through
the exact ``segment`` code path so the reported Dice is what users get."""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.data.manifest import Case, Manifest, load_manifest
from medseg.errors import ConfigError
from medseg.evaluation.metrics import dice_per_label
from medseg.inference.predictor import InferenceOptions, SlicePredictor, resolve_device
from medseg.inference.segment import segment_volume
from medseg.io.readers import read_scan
from medseg.io.volume import Volume
from medseg.model import Model, save_model
from medseg.networks import build_network
from medseg.spec import LabelSpec, ModelSpec, NetworkSpec, labels_from_names
from medseg.training import distributed
from medseg.training.augment import augment_batch
from medseg.training.config import TrainConfig
from medseg.training.data import SliceBank, build_slice_bank, crop_batch, epoch_samples

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"


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
    in_channels = max(1, len(manifest.modality)) * (2 * config.context_slices + 1)
    return ModelSpec(
        labels=labels,
        network=NetworkSpec(config.network, in_channels, len(labels), config.base_channels, config.depth),
        preset=config.preset,
        slice_axis=config.slice_axis,
        spacing=config.spacing,
        window=config.window,
        context_slices=config.context_slices,
        name=manifest.name or "medseg-model",
    )


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None for fp32. "auto": bf16 only where the hardware has it (emulated bf16 on CPUs
    without AVX512-BF16/AMX measured ~10x slower than fp32 here)."""
    if config.precision == "fp32":
        return None
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else None


def _lr_lambda(config: TrainConfig) -> Any:
    total = config.epochs * config.steps_per_epoch
    warmup = config.warmup_epochs * config.steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * t)) if config.schedule == "cosine" else (1 - t) ** 0.9

    return factor


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


def _save_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["epoch"] for r in rows], [r["loss"] for r in rows])
    ax_loss.set(xlabel="epoch", ylabel="training loss (Dice + CE)", yscale="log")
    for key in [k for k in rows[-1] if k.startswith("dice_")]:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) not in (None, "")]
        if pts:
            ax_dice.plot(*zip(*pts), marker="o", label=key.removeprefix("dice_"))
    ax_dice.set(xlabel="epoch", ylabel="validation Dice (3D, per case mean)")
    ax_dice.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(
    config: TrainConfig,
    manifest_path: Path,
    run_dir: Path,
    resume: bool = False,
    data_root: Path | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train as ``config`` says on ``manifest_path``; the model folder is ``run_dir/model``."""
    device = resolve_device(config.device)
    ctx = distributed.init_from_env(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        return _train(config, manifest_path, run_dir, resume, data_root, show_progress, device, ctx)
    finally:
        distributed.shutdown(ctx)


@dataclass
class _Progress:
    """Where a training stands: what a checkpoint carries besides weights and optimiser."""

    next_epoch: int = 0
    best_score: float = -1.0  # mean foreground Dice of the best epoch
    best_epoch: int = -1
    best_dice: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one log row per epoch
    elapsed_before: float = 0.0  # seconds spent by earlier runs of this training (before --resume)

    def record(self, epoch: int, scores: dict[str, float]) -> bool:
        """Note validation ``scores`` of 1-based ``epoch``; True when it is the best so far."""
        mean = float(np.mean(list(scores.values())))
        if mean <= self.best_score:
            return False
        self.best_score, self.best_epoch, self.best_dice = mean, epoch, scores
        return True


class _Optimisation:
    """The network with its optimiser, schedule, loss and precision, one step at a time.

    ``module`` is the bare network (saved and validated); ``network`` is what trains
    (``module`` wrapped in DistributedDataParallel when several processes run).
    """

    def __init__(self, config: TrainConfig, spec: ModelSpec, device: torch.device, ctx: distributed.DistContext):
        from monai.losses import DiceCELoss

        # Initial weights depend on the seed alone, not on what ran before in this process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            module = build_network(spec.network)
        self.module = module.to(device, memory_format=torch.channels_last)
        self.network: nn.Module = self.module
        if ctx.enabled:
            self.network = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.device = device
        self.grad_clip = config.grad_clip
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=config.batch_dice)
        self.amp = _autocast_dtype(config, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimiser step on (B, C, H, W) images and (B, 1, H, W) labels; the loss."""
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.network(images)
        loss = self.loss_fn(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item()

    def save(self, path: Path, progress: _Progress, epoch: int, elapsed_seconds: float) -> None:
        """Checkpoint after 0-based ``epoch`` (written atomically: a killed run keeps the last one)."""
        from medseg.io.files import atomic_path

        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best_score": progress.best_score,
            "best_epoch": progress.best_epoch,
            "best_dice": progress.best_dice,
            "history": progress.history,
            "elapsed_seconds": elapsed_seconds,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load(self, path: Path) -> _Progress:
        """Restore a checkpoint written by ``save``; where training stood."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        return _Progress(
            next_epoch=state["epoch"] + 1,
            best_score=state["best_score"],
            best_epoch=state["best_epoch"],
            best_dice=state["best_dice"],
            history=history,
            # Checkpoints written before elapsed time was recorded: their epochs' own seconds.
            elapsed_before=float(state.get("elapsed_seconds", sum(r["seconds"] for r in history))),
        )


def _train(
    config: TrainConfig,
    manifest_path: Path,
    run_dir: Path,
    resume: bool,
    data_root: Path | None,
    show_progress: bool,
    device: torch.device,
    ctx: distributed.DistContext,
) -> TrainResult:
    start_time = time.perf_counter()
    manifest = load_manifest(manifest_path, data_root)
    spec = model_spec(config, manifest)
    _write_resolved_config(config, spec, run_dir, resume, ctx)
    opt = _Optimisation(config, spec, device, ctx)
    checkpoint = run_dir / CHECKPOINT
    progress = _Progress()
    if resume and checkpoint.is_file():
        progress = opt.load(checkpoint)
        logger.info("resuming %s at epoch %d", run_dir, progress.next_epoch)

    def elapsed() -> float:
        """Seconds of training so far, earlier runs of this training included."""
        return progress.elapsed_before + time.perf_counter() - start_time

    bank = build_slice_bank(manifest.cases("training"), spec)
    validator = _Validator(manifest.cases("validation"), spec) if ctx.is_main else None
    writer = _tensorboard(run_dir) if ctx.is_main else None
    epoch = progress.next_epoch - 1
    seconds = progress.elapsed_before  # training time at the last checkpoint: what the run reports
    for epoch in range(progress.next_epoch, config.epochs):
        row = _train_epoch(opt, bank, config, epoch, ctx, show_progress)
        last = epoch + 1 == config.epochs
        out_of_time = config.time_limit_minutes is not None and elapsed() > 60 * config.time_limit_minutes
        if ctx.is_main:
            if (epoch + 1) % config.val_every == 0 or last or out_of_time:
                scores = validator(opt.module, str(device))
                opt.module.to(memory_format=torch.channels_last)
                row.update({f"dice_{k}": round(v, 4) for k, v in scores.items()})
                if progress.record(epoch + 1, scores):
                    _save_model_folder(run_dir / MODEL_DIR, spec, opt.module, config, manifest, progress, elapsed())
            progress.history.append(row)
            _log_epoch(progress.history, run_dir, writer)
        seconds = elapsed()
        if ctx.is_main:
            opt.save(checkpoint, progress, epoch, seconds)
        if distributed.broadcast_flag(ctx, out_of_time):
            logger.info("time limit of %s min reached after epoch %d", config.time_limit_minutes, epoch + 1)
            break
    # Reloading a finished run trains nothing and adds no time to it.
    return _finish(run_dir, opt.module, progress, epoch + 1, seconds, ctx, writer)


def _write_resolved_config(
    config: TrainConfig, spec: ModelSpec, run_dir: Path, resume: bool, ctx: distributed.DistContext
) -> None:
    """Save the configuration with every default filled in; refuse to resume under another one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    # Through JSON so tuples and lists compare equal with the saved file.
    resolved = json.loads(json.dumps({**config.to_dict(), "labels": [lab.name for lab in spec.labels]}))
    if resume and config_path.is_file() and _saved_config(config_path) != resolved:
        raise ConfigError(f"{config_path}: --resume with a different configuration; use a new run folder")
    if ctx.is_main:
        config_path.write_text(json.dumps(resolved, indent=2) + "\n")


def _train_epoch(
    opt: _Optimisation,
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


def _log_epoch(history: list[dict[str, Any]], run_dir: Path, writer: Any) -> None:
    """The newest row of ``history`` to the log, ``log.csv`` and TensorBoard (when installed)."""
    row = history[-1]
    logger.info("epoch %s", " ".join(f"{k}={v}" for k, v in row.items()))
    _write_csv(history, run_dir / "log.csv")
    if writer is not None:
        for k, v in row.items():
            if k != "epoch":
                writer.add_scalar(k, v, row["epoch"])


def _finish(
    run_dir: Path,
    module: nn.Module,
    progress: _Progress,
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
        if progress.history:
            _save_curves(progress.history, run_dir / "curves.png")
        summary = {
            "best_epoch": progress.best_epoch,
            "best_dice": progress.best_dice,
            "epochs_run": epochs_run,
            "seconds": round(seconds, 1),
            "world_size": ctx.world_size,
            "replicas_in_sync": in_sync,
            "weight_fingerprint": fingerprints[0][:4],
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if writer is not None:
            writer.close()
    return TrainResult(run_dir, run_dir / MODEL_DIR, progress.best_epoch, progress.best_dice, epochs_run, seconds)


def _saved_config(path: Path) -> dict[str, Any]:
    """The resolved configuration saved in a run folder, with defaults filled in for options
    added since it was written (so a run stays resumable across medseg versions)."""
    saved = TrainConfig.from_dict(json.loads(path.read_text()), where=str(path))
    return json.loads(json.dumps(saved.to_dict()))


def _save_model_folder(
    folder: Path,
    spec: ModelSpec,
    module: nn.Module,
    config: TrainConfig,
    manifest: Manifest,
    progress: _Progress,
    elapsed_seconds: float,
) -> None:
    """The best model so far; ``elapsed_seconds`` of training up to it, across resumes."""
    provenance = {
        "trained": True,
        "manifest": str(manifest.path),
        "dataset": manifest.name,
        "training_cases": len(manifest.cases("training")),
        "validation_cases": len(manifest.cases("validation")),
        "epoch": progress.best_epoch,
        "validation_dice": progress.best_dice,
        "training_minutes": round(elapsed_seconds / 60, 1),
        "hardware": f"{platform.machine()} CPU x{torch.get_num_threads()} threads"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": config.to_dict(),
    }
    save_model(folder, replace(spec, provenance=provenance), module)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
