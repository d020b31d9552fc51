"""The ``medseg`` command: argument parsing only; each subcommand calls one library function.

Heavy imports (torch, MONAI) happen after parsing so ``medseg --help`` answers at once.
Exit status: 0 success, 2 bad input or arguments (the message says which file and why),
3 when some of several scans failed (the others were written), 1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medseg.spec import ModelSpec

logger = logging.getLogger("medseg")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _pair(kind: type) -> callable:
    def parse(text: str) -> tuple:
        parts = [p for p in text.replace("x", ",").split(",") if p]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected one or two values like 1.0,1.0; got {text}")
        return tuple(kind(p) for p in parts)

    return parse


def build_parser() -> argparse.ArgumentParser:
    from medseg.spec import SLICE_AXES

    parser = argparse.ArgumentParser(
        prog="medseg",
        description="2D U-Net segmentation of medical volumes, written back on each scan's grid.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser(
        "segment", help="segment scans: NIfTI/NRRD/MHA files and DICOM series, or every scan in folder trees"
    )
    seg.add_argument("inputs", type=Path, nargs="+", help="scan files, DICOM series folders or folders of scans")
    seg.add_argument("-o", "--output", type=Path, help="output folder (required unless --list)")
    seg.add_argument("--list", action="store_true", help="print what would be segmented, load no model")
    seg.add_argument("--formats", default="nifti,seg.nrrd", help="comma-separated: nifti, seg.nrrd, dicom-seg, qc")
    seg.add_argument("--dicom-seg-type", choices=("binary", "labelmap"), default="binary", help="DICOM SEG encoding")
    seg.add_argument(
        "--probabilities",
        choices=("uint8", "float32"),
        help="also write one probability map per label (uint8: scaled 0-255 with a NIfTI slope)",
    )
    seg.add_argument("--overwrite", action="store_true", help="redo scans finished by an earlier run")
    seg.add_argument("--shard", default=None, help="I/N: segment every N-th scan from the I-th (0-based)")
    seg.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    seg.add_argument("--model", type=Path, help="model folder (default: the bundled hippocampus-mr model)")
    seg.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    seg.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="slices per network call (default: by size)",
    )
    seg.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    seg.add_argument("--series-uid", help="which series to segment when a DICOM folder holds several")

    init = sub.add_parser("init-model", help="write an untrained model folder")
    init.add_argument("-o", "--output", type=Path, required=True, help="model folder to create")
    init.add_argument("--labels", required=True, help="comma-separated names, background first")
    init.add_argument("--preset", default="mr", help="intensity preset (mr, ct_abdomen, ct_lung, ...)")
    init.add_argument("--base-channels", type=_positive_int, default=64)
    init.add_argument("--depth", type=_positive_int, default=4)
    init.add_argument("--in-channels", type=_positive_int, default=1)
    init.add_argument("--slice-axis", choices=SLICE_AXES, default="axial")
    init.add_argument("--spacing", type=_pair(float), default=None, help="target in-plane mm, e.g. 1.0,1.0")
    init.add_argument("--window", type=_pair(int), default=(512, 512), help="largest whole slice, e.g. 256,256")
    init.add_argument("--name", default="medseg-model")
    init.add_argument("--seed", type=int, default=0)

    ens = sub.add_parser("ensemble", help="combine trained model folders into one (probabilities averaged)")
    ens.add_argument("models", type=Path, nargs="+", help="two or more model folders (e.g. RUN/model)")
    ens.add_argument("-o", "--output", type=Path, required=True, help="ensemble model folder to create")
    ens.add_argument("--names", help="comma-separated member names (default: each run folder's name)")
    ens.add_argument("--postprocess", choices=("none", "largest_component"), default="none")
    ens.add_argument("--name", help="the ensemble's model name (default: the first member's)")
    ens.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    ens.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    info = sub.add_parser("info", help="describe a model folder, or list the bundled models")
    info.add_argument("model", type=Path, nargs="?", help="model folder (default: all bundled)")

    man = sub.add_parser("manifest", help="build a dataset manifest (MONAI datalist JSON)")
    man.add_argument("data_dir", type=Path, help="MSD folder (dataset.json) or images/ + labels/")
    man.add_argument("-o", "--output", type=Path, required=True, help="manifest JSON to write")
    man.add_argument("--val-fraction", type=float, default=0.2)
    man.add_argument("--seed", type=int, default=0)

    tr = sub.add_parser("train", help="train a model folder from a manifest")
    tr.add_argument("--manifest", type=Path, required=True)
    tr.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    tr.add_argument("--config", type=Path, help="JSON or YAML training configuration")
    tr.add_argument("--data-root", type=Path, help="resolve manifest paths against this folder")
    tr.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    tr.add_argument("--nproc", type=_positive_int, default=1, help="data-parallel processes (CPU: gloo)")

    ev = sub.add_parser("evaluate", help="Dice, HD95 (mm) and surface Dice of predictions")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--pred", type=Path, help="folder of predictions (medseg segment output)")
    source.add_argument(
        "--model", type=Path, help="segment the split with this model folder first (into OUTPUT/predictions)"
    )
    ev.add_argument("--manifest", type=Path, required=True)
    ev.add_argument("--split", default="validation", choices=("training", "validation", "test"))
    ev.add_argument("-o", "--output", type=Path, required=True, help="report folder")
    ev.add_argument("--tolerance-mm", type=float, default=1.0, help="surface Dice tolerance")
    ev.add_argument("--data-root", type=Path)
    return parser


def _configure_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    # Third-party chatter users cannot act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    logging.getLogger("monai").setLevel(logging.WARNING)


class _ProgressBar:
    """A tqdm bar fed by a ``Progress`` callback (done, total), created once the total is known."""

    def __init__(self, name: str, disabled: bool = False, unit: str = "slice", leave: bool = False) -> None:
        self.name = name
        self.disabled = disabled
        self.unit = unit
        self.leave = leave
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.disabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.name, unit=self.unit, leave=self.leave)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _shard(args: argparse.Namespace) -> tuple[int, int]:
    """--shard I/N, or torchrun's RANK/WORLD_SIZE, or the whole set."""
    import os

    if args.shard:
        try:
            index, count = (int(v) for v in args.shard.split("/"))
        except ValueError as err:
            raise ValueError(f"--shard must look like 0/4, got {args.shard!r}") from err
        return index, count
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _rank_device(device: str) -> str:
    """Under torchrun each rank takes its own GPU (cuda:LOCAL_RANK) when the device is auto."""
    import os

    import torch

    if device == "auto" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def _run_list(discovery) -> int:
    from medseg.io.discover import header_info

    for scan in discovery.scans:
        size, spacing = header_info(scan)
        size_text = "x".join(map(str, size)) or "?"
        spacing_text = "x".join(f"{s:.3g}" for s in spacing) or "?"
        print(f"{scan.kind:6s} {size_text:>14s} @ {spacing_text:>16s} mm  {scan.name}  {scan.description}")
    print(f"{len(discovery.scans)} scan(s); {len(discovery.skipped)} other file(s) skipped")
    return EXIT_OK


def _run_segment(args: argparse.Namespace) -> int:
    from medseg.io.discover import discover_all

    discovery = discover_all(list(args.inputs), args.series_uid)
    if args.list:
        return _run_list(discovery)
    if not discovery.scans:
        skipped = "; ".join(f"{s.path}: {s.reason}" for s in discovery.skipped[:10])
        logger.error(
            "error: no scan found in %s%s", ", ".join(map(str, args.inputs)), f" ({skipped})" if skipped else ""
        )
        return EXIT_USAGE
    if args.output is None:
        raise ValueError("segment needs -o/--output (or --list)")
    from tqdm import tqdm

    from medseg.batch.merge import merge_shard_reports
    from medseg.batch.runner import BatchOptions, BatchRunner
    from medseg.bundled import default_model_dir
    from medseg.inference import InferenceOptions, make_predictor
    from medseg.model import load_model

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    batch = BatchOptions(formats, args.overwrite, _shard(args), args.dicom_seg_type, args.probabilities)
    options = InferenceOptions(device=_rank_device(args.device), batch_size=args.batch_size, precision=args.precision)
    model = load_model(args.model or default_model_dir())  # loaded once for all scans
    runner = BatchRunner(make_predictor(model, options), args.output, batch, model.sha256)
    total = len(discovery.scans[batch.shard[0] :: batch.shard[1]])
    with tqdm(total=total, unit="scan", disable=args.quiet or total < 2) as bar:

        def done(record) -> None:
            bar.set_postfix_str(f"{record.name[:30]} {record.status} {record.seconds:.1f}s")
            bar.update()

        with _ProgressBar("slices", disabled=args.quiet or total > 1) as slices:
            report = runner.run(discovery, done, slices)
    if batch.shard[1] > 1:
        merge_shard_reports(args.output, batch.shard[1])
    for record in report.records:
        if record.status == "failed":
            logger.error("FAILED %s at %s: %s (%s)", record.input, record.stage, record.error, record.hint)
        elif not args.quiet:
            print(f"{record.status:7s} {record.outputs.get('nifti', '')}  ({record.seconds:.1f} s)")
    if not args.quiet:
        print(f"report: {args.output / runner.report_name}")
    return EXIT_SOME_FAILED if report.failed else EXIT_OK


def _run_init_model(args: argparse.Namespace) -> int:
    from medseg.model import init_model
    from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

    names = [n for n in args.labels.split(",") if n.strip()]
    spec = ModelSpec(
        labels=labels_from_names(names),
        network=NetworkSpec(
            in_channels=args.in_channels,
            out_channels=len(names),
            base_channels=args.base_channels,
            depth=args.depth,
        ),
        preset=args.preset,
        slice_axis=args.slice_axis,
        spacing=args.spacing,
        window=args.window,
        name=args.name,
    )
    init_model(args.output, spec, seed=args.seed)
    print(f"wrote untrained model {args.output} ({len(names)} labels: {', '.join(names)})")
    return EXIT_OK


def _run_ensemble(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.model import build_ensemble, member_name

    names = [n.strip() for n in args.names.split(",")] if args.names else [member_name(m) for m in args.models]
    if len(names) != len(args.models):
        raise ConfigError(f"--names gives {len(names)} names for {len(args.models)} model folders")
    if len(set(names)) != len(names):
        raise ConfigError(f"member names must differ, got {names}; pass --names")
    spec = build_ensemble(
        dict(zip(names, args.models)), args.output, args.postprocess, args.name, args.half, args.overwrite
    )
    print(f"wrote ensemble {args.output}: {', '.join(spec.members)} ({len(spec.labels)} labels)")
    return EXIT_OK


def _run_info(args: argparse.Namespace) -> int:
    from medseg.bundled import DEFAULT_MODEL, bundled_models

    if args.model is not None:
        _describe_model(args.model)
        return EXIT_OK
    models = bundled_models()
    if not models:
        print("no bundled models; pass a model folder")
    for name, folder in models.items():
        print(f"{name}{' (default)' if name == DEFAULT_MODEL else ''}: {folder}")
        _describe_model(folder)
    return EXIT_OK


def _layout(spec: ModelSpec) -> str:
    """One line: network, slicing and window of a single (non-ensemble) model."""
    net = spec.network
    return (
        f"{net.name} in={net.in_channels} base={net.base_channels} depth={net.depth}, "
        f"slice axis {spec.slice_axis}, spacing {spec.spacing or 'native'}, "
        f"window {spec.window[0]}x{spec.window[1]}, context slices {spec.context_slices}"
    )


def _describe_model(folder: Path) -> None:
    from medseg.model import load_spec

    spec = load_spec(folder)
    if spec.members:
        print(f"{spec.name}: ensemble (probabilities averaged), preset {spec.preset}, ", end="")
        print(f"post-processing {spec.postprocess}")
        # Each member has its own network, slice axis and window: a top-level one would mislead.
        for name in spec.members:
            print(f"  {name}: {_layout(load_spec(folder / name))}")
    else:
        print(f"{spec.name}: {_layout(spec)}, preset {spec.preset}, post-processing {spec.postprocess}")
    for lab in spec.labels:
        print(f"  {lab.value:3d} {lab.name:24s} rgb{lab.color}")
    dice = spec.provenance.get("validation_dice")
    if dice:
        print("  validation Dice: " + ", ".join(f"{k} {v:.4f}" for k, v in dice.items()))


def _run_manifest(args: argparse.Namespace) -> int:
    from medseg.data.manifest import build_manifest, load_manifest

    content = build_manifest(args.data_dir, args.output, args.val_fraction, args.seed)
    load_manifest(args.output)  # validate what was written: every problem at once
    print(f"wrote {args.output}: {len(content['training'])} training, {len(content['validation'])} validation cases")
    return EXIT_OK


def _train_worker(args: argparse.Namespace) -> None:
    """One training process (also the body of each --nproc worker)."""
    from medseg.training.config import TrainConfig
    from medseg.training.trainer import train

    _configure_logging(args.verbose)
    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    result = train(config, args.manifest, args.output, resume=args.resume, data_root=args.data_root)
    if result.best_epoch > 0:
        dice = ", ".join(f"{k} {v:.4f}" for k, v in result.best_dice.items())
        logger.info("model folder %s (best epoch %d: Dice %s)", result.model_dir, result.best_epoch, dice)


def _run_train(args: argparse.Namespace) -> int:
    if args.nproc > 1:
        from medseg.training.distributed import spawn

        spawn(_train_worker, args.nproc, args)
    else:
        _train_worker(args)
    return EXIT_OK


def _run_evaluate(args: argparse.Namespace) -> int:
    from medseg.evaluation.report import evaluate

    pred, failures = args.pred, None
    if args.model is not None:
        pred, failures = args.output / "predictions", _predict_split(args)
    result = evaluate(pred, args.manifest, args.output, args.split, args.tolerance_mm, args.data_root, failures)
    print((args.output / "summary.md").read_text())
    print(f"report in {args.output}")
    return EXIT_OK if not result.problems else EXIT_SOME_FAILED


def _predict_split(args: argparse.Namespace) -> dict[str, str]:
    """``evaluate --model``: segment the split into OUTPUT/predictions; failures by case id."""
    from medseg.evaluation.predict import predict_split
    from medseg.model import load_model

    model = load_model(args.model)
    with _ProgressBar("segmenting", unit="case", leave=True) as bar:
        return predict_split(model, args.manifest, args.output / "predictions", args.split, args.data_root, bar)


COMMANDS = {
    "segment": _run_segment,
    "init-model": _run_init_model,
    "ensemble": _run_ensemble,
    "info": _run_info,
    "manifest": _run_manifest,
    "train": _run_train,
    "evaluate": _run_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, getattr(args, "quiet", False))
    from medseg.errors import MedsegError

    try:
        return COMMANDS[args.command](args)
    except MedsegError as err:
        logger.error("error: %s", err)
        return EXIT_USAGE
    except ValueError as err:  # invalid option values caught by the library's checks
        logger.error("error: %s", err)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
