"""The optimisation side of training: network, optimiser, schedule, loss and precision, one
step at a time, and the training state a checkpoint carries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.inference.options import resolve_precision
from medseg.networks import build_network
from medseg.spec import ModelSpec
from medseg.training import distributed
from medseg.training.config import TrainConfig


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None for fp32. "auto": bf16 only where the hardware has it (emulated bf16 on CPUs
    without AVX512-BF16/AMX measured ~10x slower than fp32 here)."""
    if config.precision == "fp32":
        return None
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision == "fp16":
        return torch.float16
    chosen = resolve_precision("auto", device)
    return None if chosen == "fp32" else getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[chosen])


def lr_lambda(config: TrainConfig) -> Any:
    """Learning-rate factor per optimiser step: linear warm-up, then cosine or poly (0.9) to 0."""
    total = config.epochs * config.steps_per_epoch
    warmup = config.warmup_epochs * config.steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * t)) if config.schedule == "cosine" else (1 - t) ** 0.9

    return factor


@dataclass
class TrainingState:
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


class Optimisation:
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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=config.batch_dice)
        self.amp = autocast_dtype(config, device)
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

    def save(self, path: Path, training: TrainingState, epoch: int, elapsed_seconds: float) -> None:
        """Checkpoint after 0-based ``epoch`` (written atomically: a killed run keeps the last one)."""
        from medseg.io.files import atomic_path

        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best_score": training.best_score,
            "best_epoch": training.best_epoch,
            "best_dice": training.best_dice,
            "history": training.history,
            "elapsed_seconds": elapsed_seconds,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load(self, path: Path) -> TrainingState:
        """Restore a checkpoint written by ``save``; where training stood."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        return TrainingState(
            next_epoch=state["epoch"] + 1,
            best_score=state["best_score"],
            best_epoch=state["best_epoch"],
            best_dice=state["best_dice"],
            history=history,
            # Checkpoints written before elapsed time was recorded: their epochs' own seconds.
            elapsed_before=float(state.get("elapsed_seconds", sum(r["seconds"] for r in history))),
        )
