"""The ``medseg`` command: argument parsing only; each subcommand calls one library function.

Heavy imports (torch, MONAI) happen after parsing so ``medseg --help`` answers at once.
Exit status: 0 success, 2 bad input or arguments (the message says which file and why),
3 when some of several scans failed (the others were written), 1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import math
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medseg.spec import ModelSpec

logger = logging.getLogger("medseg")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low``, with a message saying so."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from err
        if value < low:
            wanted = "a positive integer" if low == 1 else f"{low} or more"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return convert


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from err
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _uid(text: str) -> str:
    """A DICOM UID: digits and dots (what --list shows)."""
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", text.strip()):
        raise argparse.ArgumentTypeError(f"must be a DICOM UID such as 1.2.840.113619.2.5 (see --list), got {text!r}")
    return text.strip()


def _pair(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        parts = [p for p in text.replace("x", ",").split(",") if p]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected one or two values like 1.0,1.0; got {text}")
        return tuple(kind(p) for p in parts)

    return parse


def _shard_arg(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must look like 0/4 (this shard / number of shards), got {text!r}") from err
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"must be I/N with 0 <= I < N, got {text!r}")
    return index, count


def _checked_value(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type returning a library parser's value (its ValueError -> exit 2)."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return convert


def _network_name(text: str) -> str:
    """A name from medseg's network registry. The registry imports torch, so it is read only
    when --network is given (``medseg --help`` stays instant)."""
    from medseg.networks import NETWORKS

    if text not in NETWORKS:
        raise argparse.ArgumentTypeError(f"unknown network {text!r}; choose one of {', '.join(sorted(NETWORKS))}")
    return text


def _checked(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type running a library check on the raw text (its ValueError -> exit 2)."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
        return text

    return parse


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to each option's help, except where the default is None or a
    switch's False (their help says what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or isinstance(action, argparse._HelpAction):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``medseg`` parser, with the options of ``commands`` filled in (all when None).

    Every subcommand is listed, but only the options of those in ``commands`` are added:
    their choices come from medseg's registries (formats, presets, precisions...), whose
    modules import numpy and more, so ``medseg --help`` fills none and ``medseg segment``
    only its own.
    """
    from medseg import __version__

    parser = argparse.ArgumentParser(
        prog="medseg",
        description="2D U-Net segmentation of medical volumes, written back on each scan's grid.",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (also from libraries)")
    sub = parser.add_subparsers(dest="command", required=True)
    # -v also after the subcommand (medseg segment ... -v); SUPPRESS keeps the top-level value
    # when it is not repeated there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    for name, (help_text, add_options) in _SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, formatter_class=_DefaultsHelp, parents=[common])
        if commands is None or name in commands:
            add_options(command)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (the top-level
    options take no value), or None."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _segment_options(seg: argparse.ArgumentParser) -> None:
    from medseg.inference.options import ENGINES, PRECISIONS, check_device
    from medseg.io.dicom_seg import SEG_TYPES
    from medseg.io.formats import DEFAULT_FORMATS, FORMATS, parse_formats
    from medseg.io.writers import PROBABILITY_ENCODINGS

    seg.add_argument("inputs", type=Path, nargs="+", help="scan files, DICOM series folders or folders of scans")
    seg.add_argument("-o", "--output", type=Path, help="output folder (required unless --list)")
    seg.add_argument("--list", action="store_true", help="print what would be segmented, load no model")
    format_help = "; ".join(f"{name}: {fmt.help}" for name, fmt in FORMATS.items())
    seg.add_argument(
        "--formats",
        type=_checked(parse_formats),
        default=",".join(DEFAULT_FORMATS),
        help=f"comma-separated output formats ({format_help})",
    )
    seg.add_argument("--dicom-seg-type", choices=SEG_TYPES, default="binary", help="DICOM SEG encoding")
    seg.add_argument(
        "--probabilities",
        choices=PROBABILITY_ENCODINGS,
        help="also write one probability map per label (uint8: scaled 0-255 with a NIfTI slope)",
    )
    seg.add_argument("--overwrite", action="store_true", help="redo scans finished by an earlier run")
    seg.add_argument(
        "--shard", type=_shard_arg, help="I/N: segment every N-th scan from the I-th (0-based); torchrun sets it"
    )
    seg.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or per-scan lines; warnings and errors"
    )
    seg.add_argument("--model", type=Path, help="model folder (default: the bundled hippocampus-mr model)")
    seg.add_argument(
        "--device", type=_checked(check_device), default="auto", help="auto (CUDA when present), cpu, cuda[:N]"
    )
    seg.add_argument(
        "--batch-size", type=_positive_int, default=None, help="slices per network call (default: by slice size)"
    )
    seg.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="network arithmetic: auto is bf16 on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on other "
        "CPUs, bf16 (else fp16) autocast on GPUs",
    )
    seg.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="what runs the network: auto is OpenVINO, else ONNX Runtime, else PyTorch on CPUs (fastest "
        "installed, as measured), PyTorch on GPUs; the first run converts and caches the network",
    )
    seg.add_argument("--series-uid", type=_uid, help="segment only this DICOM series (UIDs: see --list)")
    seg.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: a Ray cluster's workers (pip install 'medseg[ray]'; inputs, model "
        "and output folder on storage every node sees)",
    )
    seg.add_argument(
        "--ray-address",
        help="with --executor ray: the cluster's HOST:PORT, or auto on a cluster node (default: start a local Ray)",
    )
    seg.add_argument(
        "--ray-workers",
        type=_positive_int,
        help="with --executor ray: number of workers (default: one per GPU, else one per 4 CPUs)",
    )


def _init_model_options(init: argparse.ArgumentParser) -> None:
    from medseg.spec import SLICE_AXES
    from medseg.transforms.presets import PRESETS

    init.add_argument("-o", "--output", type=Path, required=True, help="model folder to create")
    init.add_argument("--labels", required=True, help="comma-separated names, background first")
    init.add_argument("--preset", choices=sorted(PRESETS), default="mr", help="intensity preset")
    init.add_argument("--base-channels", type=_positive_int, default=64, help="channels of the first level")
    init.add_argument("--depth", type=_positive_int, default=4, help="down/up levels")
    init.add_argument("--in-channels", type=_positive_int, default=1, help="channels of each scan")
    init.add_argument("--slice-axis", choices=SLICE_AXES, default="axial", help="plane the network sees")
    init.add_argument("--spacing", type=_pair(float), default=None, help="target in-plane mm, e.g. 1.0,1.0")
    init.add_argument("--window", type=_pair(int), default=(512, 512), help="largest whole slice, e.g. 256,256")
    init.add_argument("--name", default="medseg-model", help="the model's name (model.json)")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")


def _ensemble_options(ens: argparse.ArgumentParser) -> None:
    from medseg.inference.postprocess import POSTPROCESS

    ens.add_argument("models", type=Path, nargs="+", help="two or more model folders (e.g. RUN/model)")
    ens.add_argument("-o", "--output", type=Path, required=True, help="ensemble model folder to create")
    ens.add_argument("--names", help="comma-separated member names (default: each run folder's name)")
    ens.add_argument("--postprocess", choices=POSTPROCESS, default="none", help="label-map clean-up after averaging")
    ens.add_argument("--name", help="the ensemble's model name (default: the first member's)")
    ens.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    ens.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _export_options(exp: argparse.ArgumentParser) -> None:
    from medseg.export.formats import EXPORT_FORMATS

    exp.add_argument("--model", type=Path, help="model folder (default: the bundled hippocampus-mr model)")
    exp.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        required=True,
        help="torchscript or onnx: a model folder 'medseg segment --model' runs (ONNX through onnxruntime, "
        "medseg[onnx]); bundle: a MONAI bundle",
    )
    exp.add_argument("-o", "--output", type=Path, required=True, help="folder to create")
    exp.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")


def _import_options(imp: argparse.ArgumentParser) -> None:
    from medseg.inference.postprocess import POSTPROCESS
    from medseg.spec import SLICE_AXES, split_label_names
    from medseg.transforms.presets import PRESETS

    imp.add_argument("checkpoint", type=Path, help="checkpoint file, e.g. model.pt (loaded with weights_only=True)")
    imp.add_argument("-o", "--output", type=Path, required=True, help="model folder to create")
    imp.add_argument(
        "--labels",
        type=_checked_value(split_label_names),
        required=True,
        help="comma-separated names of the output channels, background first",
    )
    imp.add_argument("--preset", choices=sorted(PRESETS), required=True, help="intensity preset it was trained with")
    imp.add_argument("--slice-axis", choices=SLICE_AXES, required=True, help="plane the network was trained on")
    imp.add_argument(
        "--network", type=_network_name, help="network class (default: recognised from the tensors' names)"
    )
    imp.add_argument("--window", type=_pair(int), default=(512, 512), help="largest whole slice, e.g. 256,256")
    imp.add_argument("--spacing", type=_pair(float), default=None, help="target in-plane mm, e.g. 1.0,1.0")
    imp.add_argument(
        "--context-slices", type=_non_negative_int, default=0, help="neighbour slices on each side (2.5D input)"
    )
    imp.add_argument("--postprocess", choices=POSTPROCESS, default="none", help="label-map clean-up")
    imp.add_argument("--name", help="the model's name (default: the output folder's name)")
    imp.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")


def _info_options(info: argparse.ArgumentParser) -> None:
    info.add_argument("model", type=Path, nargs="?", help="model folder (default: all bundled)")


def _manifest_options(man: argparse.ArgumentParser) -> None:
    from medseg.spec import split_label_names

    man.add_argument("data_dir", type=Path, help="MSD folder (dataset.json) or images/ + labels/")
    man.add_argument("-o", "--output", type=Path, required=True, help="manifest JSON to write")
    man.add_argument("--val-fraction", type=float, default=0.2, help="share of cases for validation")
    man.add_argument("--seed", type=int, default=0, help="seed of the case shuffle")
    man.add_argument(
        "--labels",
        type=_checked_value(split_label_names),
        default=None,
        help="comma-separated label names for values 0, 1, ... (background first); "
        "default: dataset.json's, else the values found in the label files",
    )
    man.add_argument("--overwrite", action="store_true", help="replace an existing manifest file")


def _train_options(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--manifest", type=Path, required=True, help="dataset manifest (medseg manifest)")
    tr.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    tr.add_argument("--config", type=Path, help="JSON or YAML training configuration (default: built-in)")
    tr.add_argument("--data-root", type=Path, help="resolve manifest paths against this folder")
    again = tr.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output folder from its checkpoint (same configuration; "
        "a finished run is reported and left as it is)",
    )
    again.add_argument("--overwrite", action="store_true", help="replace the run in the output folder and train afresh")
    tr.add_argument("--nproc", type=_positive_int, default=1, help="data-parallel processes (CPU: gloo)")


def _evaluate_options(ev: argparse.ArgumentParser) -> None:
    from medseg.data.manifest import SPLITS

    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--pred", type=Path, help="folder of predictions (medseg segment output)")
    source.add_argument(
        "--model", type=Path, help="segment the split with this model folder first (into OUTPUT/predictions)"
    )
    ev.add_argument("--manifest", type=Path, required=True, help="dataset manifest with the labels")
    ev.add_argument("--split", default="validation", choices=SPLITS, help="which cases")
    ev.add_argument("-o", "--output", type=Path, required=True, help="report folder")
    ev.add_argument("--tolerance-mm", type=_positive_float, default=1.0, help="surface Dice tolerance")
    ev.add_argument("--data-root", type=Path, help="resolve manifest paths against this folder")


# Subcommand -> (its line in ``medseg --help``, the function adding its options), in that order.
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "segment": (
        "segment scans: NIfTI/NRRD/MHA files and DICOM series, or every scan in folder trees",
        _segment_options,
    ),
    "init-model": ("write an untrained model folder", _init_model_options),
    "ensemble": ("combine trained model folders into one (probabilities averaged)", _ensemble_options),
    "export": ("write a model folder with TorchScript or ONNX networks, or as a MONAI bundle", _export_options),
    "import": ("turn a MONAI/PyTorch checkpoint (a network state dict) into a model folder", _import_options),
    "info": ("describe a model folder, or list the bundled models", _info_options),
    "manifest": ("build a dataset manifest (MONAI datalist JSON)", _manifest_options),
    "train": ("train a model folder from a manifest", _train_options),
    "evaluate": ("Dice, HD95 (mm) and surface Dice of predictions", _evaluate_options),
}


# Libraries whose INFO/DEBUG chatter users cannot act on: shown only with -v.
_QUIET_LIBRARIES = ("highdicom", "pydicom", "pylibjpeg", "matplotlib", "PIL", "monai", "nibabel", "urllib3")


class _BarSafeHandler(logging.Handler):
    """Writes log lines to stderr through tqdm, so they never tear a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _say(self.format(record), error=True)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _configure_logging(verbose: bool, quiet: bool = False) -> None:
    """medseg's messages at INFO (WARNING with --quiet, DEBUG with -v); other libraries'
    at WARNING, or INFO with -v (their DEBUG floods never)."""
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger()
    # Replace our own handler from an earlier main() in this process; leave others alone.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _BarSafeHandler)] + [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for name in _QUIET_LIBRARIES:
        # Their warnings are about header details medseg already judges and reports itself.
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="numpy")


class _ProgressBar:
    """A tqdm bar fed with (done, total): created on the first call, reset when the total
    changes (a new scan), and shown complete when done reaches the total."""

    def __init__(self, name: str, unit: str, position: int = 0, leave: bool = False) -> None:
        self.name, self.unit, self.position, self.leave = name, unit, position, leave
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.name, unit=self.unit, position=self.position, leave=self.leave)
        elif self.bar.total != total or done < self.bar.n:
            self.bar.reset(total=total)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.refresh()  # the last update may fall inside tqdm's redraw interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _say(line: str, error: bool = False) -> None:
    """A line for the user that does not break the progress bars."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr if error else sys.stdout)


def _progress(quiet: bool, lines: bool = True):
    """The command line's RunProgress: scan bar, slice bar, one line per scan."""
    from medseg.batch.progress import RunProgress

    class CliProgress(RunProgress):
        def __init__(self) -> None:
            self.scans = _ProgressBar("scans", "scan", leave=True)
            self.slices = _ProgressBar("slices", "slice")
            self.total = 0

        def run_started(self, scans: int) -> None:
            self.total = scans
            if not quiet and scans > 1:
                self.scans(0, scans)
                self.slices.position = 1  # under the scan bar

        def slices_done(self, done: int, total: int) -> None:
            if not quiet:
                self.slices(done, total)

        def scan_done(self, record) -> None:
            if record.status == "failed":
                logger.error(
                    "FAILED  %s at %s: %s\n        fix: %s", record.name, record.stage, record.error, record.hint
                )
            elif lines and not quiet:
                first = next(iter(record.outputs.values()), "(nothing written)")
                done = "done before" if record.status == "skipped" else f"{record.seconds:.1f} s"
                _say(f"{record.status:7s} {record.name} -> {first} ({done})")
                for warning in record.warnings:
                    _say(f"        warning: {warning}", error=True)
            if not quiet and self.total > 1:
                self.scans.bar.update()

        def close(self) -> None:
            self.slices.close()
            self.scans.close()

    return CliProgress()


def _run_list(discovery) -> int:
    from medseg.io.discover import header_info

    for scan in discovery.scans:
        size, spacing = header_info(scan)
        size_text = "x".join(map(str, size)) or "?"
        spacing_text = "x".join(f"{s:.3g}" for s in spacing) or "?"
        line = f"{scan.kind:6s} {size_text:>14s} @ {spacing_text:>16s} mm  {scan.name}  {scan.description}"
        if scan.series is not None:
            uid = scan.series.uid
            line += "  uid=" + ("(empty SeriesInstanceUID)" if uid.startswith("geometry:") else uid)
        print(line)
    print(f"{len(discovery.scans)} scan(s); {len(discovery.skipped)} other file(s) skipped")
    for skipped in discovery.skipped:
        print(f"  skipped {skipped.path}: {skipped.reason}")
    return EXIT_OK


# What ``import monai`` imports when installed (its optional imports are eager, and MONAI's
# __init__ imports every sub-package) that segmenting never uses: engines and handlers
# (pytorch-ignite, tensorboard, mlflow, clearml), networks and losses (transformers,
# torchvision, lpips, segment_anything), other readers and GPU array libraries (itk, cucim,
# openslide, tifffile, zarr, h5py, cv2, cupy, kvikio), TensorRT, tuning (optuna, nni),
# tables (pandas, sklearn, skimage). On an ML image with them installed, importing MONAI
# took 11.7 s of the 13.9 s to the first forward (benchmarks/RESULTS.md, "On a GPU");
# pytorch-ignite alone is 1-2 s and 54 MB ("Start-up").
UNUSED_BY_SEGMENT = (
    "ignite",
    "tensorboard",
    "tensorboardX",
    "mlflow",
    "clearml",
    "transformers",
    "torchvision",
    "lpips",
    "segment_anything",
    "itk",
    "cucim",
    "openslide",
    "tifffile",
    "zarr",
    "h5py",
    "cv2",
    "cupy",
    "cupyx",
    "kvikio",
    "tensorrt",
    "torch_tensorrt",
    "polygraphy",
    "optuna",
    "nni",
    "pandas",
    "sklearn",
    "skimage",
)


def _leave_out_unused_imports() -> None:
    """Tell this process the packages of ``UNUSED_BY_SEGMENT`` are absent, so ``import monai``
    carries on as on a machine without them (MONAI imports them optionally). Only the
    command's own process, and only packages not imported yet: a library user's MONAI keeps
    its engines, and any package already loaded stays."""
    for name in UNUSED_BY_SEGMENT:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "not importable"


def _run_segment(args: argparse.Namespace) -> int:
    if args.list:
        from medseg.io.discover import discover_all

        return _run_list(discover_all(list(args.inputs), args.series_uid))
    _leave_out_unused_imports()
    from medseg.batch.run import segment, torchrun_device, torchrun_shard

    # torchrun's ranks shard a local run; a Ray run is spread by Ray.
    shard = args.shard or (torchrun_shard() if args.executor == "local" else None)
    progress = _progress(args.quiet)
    try:
        report = segment(
            args.inputs,
            args.output,
            args.model,
            formats=args.formats,
            overwrite=args.overwrite,
            shard=shard,
            progress=progress,
            series_uid=args.series_uid,
            device=torchrun_device(args.device),
            batch_size=args.batch_size,
            precision=args.precision,
            engine=args.engine,
            dicom_seg_type=args.dicom_seg_type,
            probabilities=args.probabilities,
            executor=args.executor,
            ray_address=args.ray_address,
            ray_workers=args.ray_workers,
        )
    finally:
        progress.close()
    where = f"report: {report.path}"
    if shard is not None and report.path is not None and report.path.name != "medseg-run.json":
        where += f" (merged into medseg-run.json when all {shard[1]} shards have finished)"
    if report.failed:
        logger.error("%s; %s", report.summary_line(), where)
    elif not args.quiet:
        _say(f"{report.summary_line()}; {where}")
    return EXIT_SOME_FAILED if report.failed else EXIT_OK


def _run_init_model(args: argparse.Namespace) -> int:
    from medseg.model import init_model
    from medseg.spec import ModelLayout, labels_from_names

    names = [n for n in args.labels.split(",") if n.strip()]
    layout = ModelLayout(
        base_channels=args.base_channels,
        depth=args.depth,
        preset=args.preset,
        slice_axis=args.slice_axis,
        spacing=args.spacing,
        window=tuple(args.window),
    )
    spec = layout.to_spec(labels_from_names(names), image_channels=args.in_channels, name=args.name)
    init_model(args.output, spec, seed=args.seed, overwrite=args.overwrite)
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


def _run_export(args: argparse.Namespace) -> int:
    from medseg.bundled import default_model_dir

    model = args.model if args.model is not None else default_model_dir()
    if args.format == "bundle":
        from medseg.export.bundle import export_bundle

        path = export_bundle(model, args.output, args.overwrite)
        print(f"wrote MONAI bundle {path} from {model}")
        return EXIT_OK
    from medseg.export.networks import export_model

    spec = export_model(model, args.output, args.format, args.overwrite)
    what = f"ensemble of {len(spec.members)}" if spec.members else "model"
    print(f"wrote {args.format} {what} {args.output} from {model} (checked against PyTorch)")
    return EXIT_OK


def _run_import(args: argparse.Namespace) -> int:
    from medseg.export.checkpoint import import_checkpoint

    spec = import_checkpoint(
        args.checkpoint,
        args.output,
        args.labels,
        preset=args.preset,
        slice_axis=args.slice_axis,
        network=args.network,
        window=args.window,
        spacing=args.spacing,
        context_slices=args.context_slices,
        postprocess=args.postprocess,
        name=args.name,
        overwrite=args.overwrite,
    )
    print(f"wrote model {args.output}: {_layout(spec)} ({len(spec.labels)} labels: {', '.join(args.labels)})")
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
        f"window {spec.window[0]}x{spec.window[1]} (trained on "
        f"{'x'.join(map(str, spec.trained_window)) if spec.trained_window else 'unknown'}), "
        f"context slices {spec.context_slices}"
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
    exported, imported = spec.provenance.get("exported"), spec.provenance.get("imported_from")
    if isinstance(exported, dict):
        print(f"  exported as {exported.get('format')} from {exported.get('from')}")
    if imported:
        print(f"  imported from {imported}")


def _run_manifest(args: argparse.Namespace) -> int:
    from medseg.data.manifest import build_manifest

    # Checked before it is written (every problem at once); nothing written when invalid.
    content = build_manifest(
        args.data_dir, args.output, args.val_fraction, args.seed, labels=args.labels, overwrite=args.overwrite
    )
    print(f"wrote {args.output}: {len(content['training'])} training, {len(content['validation'])} validation cases")
    return EXIT_OK


def _train_worker(args: argparse.Namespace) -> None:
    """One training process (also the body of each --nproc worker)."""
    from medseg.training.config import TrainConfig
    from medseg.training.trainer import train

    _configure_logging(args.verbose)
    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    result = train(
        config, args.manifest, args.output, resume=args.resume, data_root=args.data_root, overwrite=args.overwrite
    )
    if result.best_epoch > 0:
        dice = ", ".join(f"{k} {v:.4f}" for k, v in result.best_dice.items())
        logger.info("model folder %s (best epoch %d: Dice %s)", result.model_dir, result.best_epoch, dice)


def _run_train(args: argparse.Namespace) -> int:
    if args.nproc > 1:
        from medseg.training.distributed import spawn
        from medseg.training.trainer import check_run_folder

        check_run_folder(args.output, args.resume, args.overwrite)  # one clean refusal, not one per worker
        spawn(_train_worker, args.nproc, args)
    else:
        _train_worker(args)
    return EXIT_OK


def _run_evaluate(args: argparse.Namespace) -> int:
    from medseg.evaluation.report import evaluate

    pred = args.pred
    if args.model is not None:
        from medseg.evaluation.predict import predict_split

        pred = args.output / "predictions"
        progress = _progress(quiet=False, lines=False)
        try:
            predict_split(args.model, args.manifest, pred, args.split, args.data_root, progress)
        finally:
            progress.close()
    result = evaluate(pred, args.manifest, args.output, args.split, args.tolerance_mm, args.data_root)
    print((args.output / "summary.md").read_text())
    print(f"report in {args.output}")
    return EXIT_OK if not result.problems else EXIT_SOME_FAILED


COMMANDS = {
    "segment": _run_segment,
    "init-model": _run_init_model,
    "ensemble": _run_ensemble,
    "export": _run_export,
    "import": _run_import,
    "info": _run_info,
    "manifest": _run_manifest,
    "train": _run_train,
    "evaluate": _run_evaluate,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's cancel, ``docker stop``, ``timeout``) during a segment run:
    handled as Ctrl-C is (scans in flight finished and recorded, the report flushed, the run
    lock released), with exit status 143."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser([command] if (command := _command_in(argv)) else [])
    args = parser.parse_args(argv)
    if args.command == "segment" and not args.list and args.output is None:
        parser.error("segment needs -o/--output (or --list)")  # exit 2, before any discovery
    _configure_logging(args.verbose, getattr(args, "quiet", False))
    from medseg.errors import MedsegError

    if args.command == "segment" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # scancel, docker stop, timeout: as Ctrl-C
    try:
        return COMMANDS[args.command](args)
    except (MedsegError, ValueError) as err:  # bad input, model or option: the message says which
        logger.error("error: %s", err)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        logger.error("%s: what finished is written and in the run report; run the same command to go on", what)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    except OSError as err:  # full disk, read-only or vanished folder: the user's to fix
        where = f" ({err.filename})" if err.filename else ""
        logger.error("error: %s%s: check free space and permissions of the output folder", err.strerror or err, where)
        return EXIT_USAGE


def run() -> None:
    """The ``medseg`` command (``python -m medseg``): ``main()``, then a quick exit.

    Once a command has finished, tearing down the interpreter (the modules of torch and MONAI,
    hundreds of thousands of objects) takes about a second and changes nothing, so the
    process ends with ``os._exit`` after doing what a normal exit does that matters: the
    ``atexit`` callbacks (log handlers flushed and closed, temporary folders removed, child
    processes joined) and flushing stdout and stderr. The normal exit is kept while another
    non-daemon thread runs (the interpreter would wait for it) and when flushing fails (the
    interpreter reports it).
    """
    code = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or not isinstance(code, int):
        sys.exit(code)
    atexit._run_exitfuncs()  # and clears them, so the fallback below does not run them twice
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # e.g. a closed pipe
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    run()
