"""What a training run leaves to read: ``log.csv``, ``curves.png`` and TensorBoard events."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def save_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """A PNG of training loss and validation Dice per epoch, from the log rows."""
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


def tensorboard_writer(run_dir: Path) -> Any:
    """A SummaryWriter into ``run_dir/tensorboard``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def log_epoch(history: list[dict[str, Any]], run_dir: Path, writer: Any) -> None:
    """The newest row of ``history`` to the log, ``log.csv`` and TensorBoard (when installed)."""
    row = history[-1]
    logger.info("epoch %s", " ".join(f"{k}={v}" for k, v in row.items()))
    write_csv(history, run_dir / "log.csv")
    if writer is not None:
        for k, v in row.items():
            if k != "epoch":
                writer.add_scalar(k, v, row["epoch"])


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All ``rows`` to ``path``; columns in first-seen order (Dice appears with validation)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
