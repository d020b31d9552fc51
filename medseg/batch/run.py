"""``medseg.segment``: from scans (files, DICOM folders, folder trees) to outputs, in one call.

Everything a run needs lives behind this function: option checks (before any discovery or
model load), discovery, the model (loaded once), resume, shards, the run report. The
``medseg segment`` command parses its arguments and calls it; so do ``evaluate --model``
and the demo. To segment a volume already in memory, use ``medseg.segment_volume``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.batch.progress import RunProgress
from medseg.batch.report import RunReport, load_report
from medseg.errors import FileProblem, ScanError
from medseg.inference.options import InferenceOptions
from medseg.io.discover import Discovery, ScanInput, ScanSource, Skipped, discover_all
from medseg.io.formats import DEFAULT_FORMATS, WriteOptions, parse_formats

if TYPE_CHECKING:
    from medseg.batch.runner import BatchOptions, Executor
    from medseg.model import Model

logger = logging.getLogger(__name__)

Inputs = str | Path | ScanInput | Sequence[str | Path | ScanInput]

# Where a run's scans are segmented: this process, or a Ray cluster (medseg[ray]).
EXECUTORS = ("local", "ray")


def segment(
    inputs: Inputs,
    output_dir: str | Path,
    model: str | Path | Model | None = None,
    *,
    formats: str | Sequence[str] = DEFAULT_FORMATS,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: RunProgress | None = None,
    series_uid: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    engine: str = "auto",
    dicom_seg_type: str = "binary",
    probabilities: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
) -> RunReport:
    """Segment every scan in ``inputs`` into ``output_dir`` and return the run's report.

    Args:
        inputs: scan files (NIfTI, NRRD, MHA/MHD), DICOM files or series folders, folder
            trees of any of these, or :class:`~medseg.io.discover.ScanInput` (a path and the
            one DICOM series wanted from it).
        output_dir: where outputs and ``medseg-run.json``/``.csv`` go (created if needed).
        model: a model folder, a loaded :class:`~medseg.model.Model`, or None for the
            bundled default model.
        formats: names from ``medseg.io.formats.FORMATS`` ("nifti,seg.nrrd" or a list).
        overwrite: redo scans an earlier run in ``output_dir`` finished; otherwise a scan
            whose outputs exist and whose inputs, model and options are unchanged is kept.
        shard: (i, n) segments scans i, i+n, ... of the sorted discovery; each shard writes
            a report part, and the last to finish merges them into ``medseg-run.json``.
        progress: callbacks as the run goes (see :class:`~medseg.batch.progress.RunProgress`).
        series_uid: keep only this DICOM series among the scans found.
        device, batch_size, precision, engine: how to run the network (``InferenceOptions``;
            "auto" picks the precision and the fastest installed engine for the device).
        dicom_seg_type: "binary" or "labelmap" DICOM SEG encoding.
        probabilities: "uint8" or "float32" also writes a probability map per label.
        executor: "local" segments in this process; "ray" on a Ray cluster (``pip install
            'medseg[ray]'``): actors that each load the model once read, segment and write
            the scans (inputs, model folder and ``output_dir`` on storage every node sees),
            largest first; scans whose worker died are segmented again. This process
            plans the run and writes the report, as for a local run.
        ray_address: the cluster's address ("HOST:PORT", or "auto" on a cluster node);
            None starts a local Ray (or uses the one this process is connected to).
        ray_workers: number of Ray actors (default: one per GPU, else one per 4 CPUs).

    Returns:
        The :class:`~medseg.batch.report.RunReport`: one record per scan (ok, failed with
        stage, error and hint, or skipped as done before); ``report.path`` is the report file.

    Raises:
        ValueError: a bad option (nothing was read or written).
        ScanError: an input does not exist or holds no scan.
        ModelError: the model folder cannot be used.
    """
    names = parse_formats(formats)
    if probabilities is not None:
        names = (*names, "probabilities")
    write = WriteOptions(dicom_seg_type, probabilities or "uint8")
    inference = InferenceOptions(device=device, batch_size=batch_size, precision=precision, engine=engine)
    requests = _as_list(inputs)
    _check_arguments(output_dir, overwrite, shard)
    _check_executor(executor, ray_address, ray_workers, shard)
    if progress is not None and not all(
        callable(getattr(progress, m, None)) for m in ("run_started", "slices_done", "scan_done")
    ):
        raise TypeError("progress must be a medseg.RunProgress (run_started, slices_done, scan_done)")
    from medseg.batch.runner import BatchOptions  # torch and MONAI load here, after the cheap checks
    from medseg.inference.options import resolve_device

    options = BatchOptions(names, overwrite, shard or (0, 1), write)
    from medseg.model import Model

    if model is not None and not isinstance(model, str | Path | Model):
        raise TypeError(f"model must be a model folder, a loaded Model or None, got {model!r}")
    if executor == "local":
        resolve_device(inference.device)  # "cuda" on a machine without one: said before any work
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not output_dir.is_dir():
        raise FileProblem(output_dir, "is a file, not a folder", "give -o a folder (it is created if missing)")
    _refuse_inputs_inside(output_dir, requests)
    discovery = _without_outputs(discover_all(requests, series_uid), output_dir)
    if not discovery.scans:
        raise _nothing_found(discovery)
    _check_formats_apply(names, discovery)
    _prepare_output_folder(output_dir)
    placement = Placement(executor, ray_address, ray_workers)
    return _run(discovery, output_dir, _loaded(model), options, inference, placement, progress)


def _as_list(inputs: Inputs) -> list[str | Path | ScanInput]:
    """``inputs`` as a non-empty list of paths or ScanInputs (TypeError/ValueError otherwise)."""
    items = [inputs] if isinstance(inputs, str | Path | ScanInput) else inputs
    if not isinstance(items, Sequence) or isinstance(items, bytes):
        raise TypeError(f"inputs must be a path, a ScanInput or a list of them, got {type(inputs).__name__}")
    bad = [i for i in items if not isinstance(i, str | Path | ScanInput)]
    if bad:
        raise TypeError(f"inputs must be paths or ScanInputs, got {bad[0]!r}")
    if not items:
        raise ValueError("no inputs given: pass scan files, DICOM folders or folders of scans")
    if any(not str(i.path if isinstance(i, ScanInput) else i).strip() for i in items):
        raise ValueError("an input is an empty path (it would mean the current folder); name the scans")
    # Absolute, so the report names files that evaluate and later runs find from anywhere.
    return [
        ScanInput(Path(i.path).absolute(), i.series_uid) if isinstance(i, ScanInput) else Path(i).absolute()
        for i in items
    ]


def _check_arguments(output_dir: object, overwrite: object, shard: object) -> None:
    """Types a Python caller can get wrong, said plainly rather than deep inside."""
    if not isinstance(output_dir, str | Path) or not str(output_dir):
        raise TypeError(f"output_dir must be a folder path, got {output_dir!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if shard is not None and (
        not isinstance(shard, tuple | list) or len(shard) != 2 or not all(isinstance(v, int) for v in shard)
    ):
        raise TypeError(f"shard must be (index, count), for example (0, 2); got {shard!r}")


def _check_executor(executor: object, address: object, workers: object, shard: object) -> None:
    """The executor options, before anything is read or Ray is started."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor != "ray" and (address is not None or workers is not None):
        raise ValueError("ray_address and ray_workers (--ray-address, --ray-workers) need executor 'ray'")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ValueError(f"ray_address must be HOST:PORT or 'auto', got {address!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"ray_workers must be a positive integer, got {workers!r}")
    if executor == "ray" and shard is not None:
        raise ValueError(
            "shard and executor 'ray' do not combine: Ray spreads one run over its workers itself; "
            "use --shard I/N for processes you start yourself (a SLURM array), or --executor ray"
        )


def _check_formats_apply(names: tuple[str, ...], discovery: Discovery) -> None:
    """Refuse a run in which no scan can get any of the formats asked for (dicom-seg over
    NIfTI files): it would report "ok" with nothing written."""
    from medseg.io.formats import FORMATS

    if any(s.series is not None for s in discovery.scans) or not all(FORMATS[n].dicom_only for n in names):
        return
    raise ValueError(
        f"--formats {','.join(names)} writes DICOM inputs only, and none of the {len(discovery.scans)} scan(s) "
        "is DICOM; add nifti or seg.nrrd to --formats"
    )


def _prepare_output_folder(output_dir: Path) -> None:
    """Create the output folder and prove it writable, before the model loads."""
    probe = output_dir / f".medseg-write-check.{os.getpid()}.tmp"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        full = err.errno == errno.ENOSPC
        raise FileProblem(
            output_dir,
            "is on a full disk" if full else f"cannot be used as the output folder ({err.strerror or err})",
            "free some space" if full else "choose a folder you can create and write to",
        ) from err


def _refuse_inputs_inside(output_dir: Path, requests: list[str | Path | ScanInput]) -> None:
    """An input that is the output folder or inside it would be overwritten by its own
    outputs (``scan.nii.gz`` -> ``scan.nii.gz``): refuse before anything is read."""
    out = output_dir.resolve()
    for request in requests:
        path = Path(request.path if isinstance(request, ScanInput) else request).resolve()
        if path == out or out in path.parents:
            raise FileProblem(
                output_dir,
                f"holds the input {request if not isinstance(request, ScanInput) else request.path}: "
                "outputs written there could overwrite the scans",
                "choose an output folder outside the inputs",
            )


def _without_outputs(discovery: Discovery, output_dir: Path) -> Discovery:
    """``discovery`` less what lies in the output folder (when that folder is inside an input
    tree): medseg's own outputs are not scans to segment on the next run."""
    out = output_dir.resolve()

    def inside(scan: ScanSource) -> bool:
        # This run's output folder, or any other folder a medseg run wrote (its report is there).
        return any(out in f.resolve().parents or _holds_run_report(f.parent) for f in scan.files)

    outputs = [s for s in discovery.scans if inside(s)]
    if not outputs:
        return discovery
    skipped = [Skipped(s.path, "in a medseg output folder (medseg's outputs are not scans)") for s in outputs]
    scans = tuple(s for s in discovery.scans if not inside(s))
    return Discovery(discovery.root, scans, (*discovery.skipped, *skipped))


def _holds_run_report(folder: Path) -> bool:
    # medseg-bundle-run.json: the record a MONAI bundle run of medseg's writes beside its masks.
    return (
        (folder / "medseg-run.json").is_file()
        or (folder / "medseg-bundle-run.json").is_file()
        or any(folder.glob("medseg-run.part*of*.json"))
    )


def _nothing_found(discovery: Discovery) -> ScanError:
    reasons = "; ".join(f"{s.path}: {s.reason}" for s in discovery.skipped[:5])
    more = f" and {len(discovery.skipped) - 5} more" if len(discovery.skipped) > 5 else ""
    return ScanError(
        discovery.root,
        "holds no scan medseg can read" + (f" ({reasons}{more})" if reasons else ""),
        "give NIfTI/NRRD/MHA files or DICOM series, or folders holding them",
    )


def _loaded(model: str | Path | Model | None) -> Model:
    from medseg.bundled import default_model_dir
    from medseg.model import Model, load_model

    if isinstance(model, Model):
        return model
    return load_model(model if model is not None else default_model_dir())


@dataclass(frozen=True)
class Placement:
    """Where the scans are segmented: ``executor`` "local" (this process) or "ray" (the
    cluster at ``ray_address``, None for a local Ray, with ``ray_workers`` actors)."""

    executor: str = "local"
    ray_address: str | None = None
    ray_workers: int | None = None


def _run(
    discovery: Discovery,
    output_dir: Path,
    model: Model,
    options: BatchOptions,
    inference: InferenceOptions,
    placement: Placement,
    progress: RunProgress | None,
) -> RunReport:
    from medseg.batch.merge import merge_shard_reports
    from medseg.batch.runner import BatchRunner, run_lock

    # The lock first: a second run into this folder is refused before it starts any worker.
    with (
        run_lock(output_dir, options.report_name),
        _executor(model, output_dir, options, inference, placement) as executor,
    ):
        report = BatchRunner(model, output_dir, options, executor).run(discovery, progress)
    count = options.shard[1]
    if count > 1:
        merged = merge_shard_reports(output_dir, count)
        if merged is not None:  # the last shard to finish answers for the whole run
            report = load_report(merged)
    return report


@contextlib.contextmanager
def _executor(
    model: Model, output_dir: Path, options: BatchOptions, inference: InferenceOptions, placement: Placement
) -> Iterator[Executor]:
    """The executor ``placement`` names, stopped (and a Ray it started shut down) on leaving."""
    if placement.executor == "ray":
        from medseg.batch.ray_executor import RayExecutor

        with RayExecutor(
            model, output_dir, options.formats, options.write, inference, placement.ray_address, placement.ray_workers
        ) as ray_executor:
            yield ray_executor
        return
    from medseg.batch.runner import LocalExecutor
    from medseg.inference.predictor import make_predictor

    yield LocalExecutor(make_predictor(model, inference), output_dir, options)


def torchrun_shard() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when started by torchrun with several processes, else None."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return (rank, world) if world > 1 else None


def torchrun_device(device: str) -> str:
    """Under torchrun each rank takes its own GPU (cuda:LOCAL_RANK) when the device is auto."""
    if device != "auto" or "LOCAL_RANK" not in os.environ:
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
