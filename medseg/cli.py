"""The ``medseg`` command: argument parsing only; each subcommand calls one library function.

Heavy imports (torch, MONAI) happen after parsing so ``medseg --help`` answers at once.
Exit status: 0 success, 2 bad input or arguments (the message says which file and why),
1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

logger = logging.getLogger("medseg")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2


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
        "segment", help="segment one scan (NIfTI, NRRD, MHA file or DICOM series folder)"
    )
    seg.add_argument("input", type=Path, help="scan file or DICOM series folder")
    seg.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    seg.add_argument(
        "--model", type=Path, required=True, help="model folder (model.json + weights)"
    )
    seg.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    seg.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="slices per network call (default: by size)",
    )
    seg.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    seg.add_argument(
        "--series-uid", help="which series to segment when a DICOM folder holds several"
    )

    init = sub.add_parser("init-model", help="write an untrained model folder")
    init.add_argument("-o", "--output", type=Path, required=True, help="model folder to create")
    init.add_argument("--labels", required=True, help="comma-separated names, background first")
    init.add_argument(
        "--preset", default="mr", help="intensity preset (mr, ct_abdomen, ct_lung, ...)"
    )
    init.add_argument("--base-channels", type=_positive_int, default=64)
    init.add_argument("--depth", type=_positive_int, default=4)
    init.add_argument("--in-channels", type=_positive_int, default=1)
    init.add_argument("--slice-axis", choices=SLICE_AXES, default="axial")
    init.add_argument(
        "--spacing", type=_pair(float), default=None, help="target in-plane mm, e.g. 1.0,1.0"
    )
    init.add_argument(
        "--window", type=_pair(int), default=(512, 512), help="largest whole slice, e.g. 256,256"
    )
    init.add_argument("--name", default="medseg-model")
    init.add_argument("--seed", type=int, default=0)

    info = sub.add_parser("info", help="describe a model folder: labels, preset, network")
    info.add_argument("model", type=Path)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    # Third-party chatter users cannot act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    logging.getLogger("monai").setLevel(logging.WARNING)


class _SliceProgress:
    """A tqdm bar over slices, created once the slice count is known."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.name, unit="slice", leave=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _SliceProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_segment(args: argparse.Namespace) -> int:
    from medseg.inference import InferenceOptions, SlicePredictor, segment_scan
    from medseg.model import load_model

    options = InferenceOptions(
        device=args.device, batch_size=args.batch_size, precision=args.precision
    )
    predictor = SlicePredictor(load_model(args.model), options)
    with _SliceProgress(args.input.name) as progress:
        result = segment_scan(args.input, predictor, args.output, args.series_uid, progress)
    names = {lab.value: lab.name for lab in predictor.model.spec.labels}
    found = ", ".join(f"{names.get(v, v)}: {n} voxels" for v, n in result.label_counts.items() if v)
    print(f"{result.output}  ({result.seconds:.1f} s; {found or 'no foreground found'})")
    return EXIT_OK


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


def _run_info(args: argparse.Namespace) -> int:
    from medseg.model import load_spec

    spec = load_spec(args.model)
    net = spec.network
    print(
        f"{spec.name}: {net.name} in={net.in_channels} base={net.base_channels} depth={net.depth}"
    )
    print(
        f"  preset {spec.preset}, slice axis {spec.slice_axis}, "
        f"spacing {spec.spacing or 'native'}, "
        f"window {spec.window[0]}x{spec.window[1]}"
    )
    for lab in spec.labels:
        print(f"  {lab.value:3d} {lab.name:24s} rgb{lab.color}")
    return EXIT_OK


COMMANDS = {"segment": _run_segment, "init-model": _run_init_model, "info": _run_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
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
