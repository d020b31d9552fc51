"""Batch throughput: one `medseg segment` call over N small volumes, against N single-scan
calls, against the MONAI-tutorial recipe looping over the files, and against the same call
with ``--executor ray`` (a local Ray started by medseg: Ray's overhead on one node), same model.

Volumes are hippocampus-sized MR crops (about 36x50x40, 1 mm), written as NIfTI. Prints
scans per second for each way and the ratios to the one-call run, then the per-scan time
spent outside the network (reading, preprocessing and inference, writing each format) from
the run report.

    python benchmarks/batch.py [--scans 40] [--single-calls 8] [--ray-workers N] [--no-ray] [--device auto]

``--device`` (default auto: the GPU when PyTorch sees one) is where both medseg and the
recipe run the network.

Single-scan calls are timed on a subset (``--single-calls``) and scaled, since each one
pays the interpreter and model start-up this benchmark is about.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)

from medseg.bundled import default_model_dir  # noqa: E402
from medseg.inference.options import resolve_device  # noqa: E402
from medseg.model import load_model, load_spec  # noqa: E402


def make_scans(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in (36, 50, 40)], indexing="ij")
    for i in range(n):
        blob = ((x / 0.3) ** 2 + ((y - 0.1 * rng.normal()) / 0.6) ** 2 + (z / 0.4) ** 2) < 1
        image = (rng.normal(300, 40, x.shape) + 400 * blob).astype(np.float32)
        path = folder / f"crop_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(path))
        paths.append(path)
    return paths


def monai_recipe(paths: list[Path], model_dir: Path, out_dir: Path, device: torch.device) -> None:
    """What a MONAI user writes: a Compose per file, SliceInferer, Invertd, SaveImaged."""
    from monai.inferers import SliceInferer
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImaged,
        ScaleIntensityRangePercentilesd,
    )

    model = load_model(model_dir)
    net = model.network.to(device).eval()
    pre = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.5, 99.5, clip=True, relative=False),
            NormalizeIntensityd("image"),
        ]
    )
    post = Compose(
        [
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted("pred", argmax=True),
            SaveImaged("pred", output_dir=str(out_dir), separate_folder=False, output_dtype=np.uint8, print_log=False),
        ]
    )
    # Sagittal slices (axis 0 in RAS) padded to the 64x64 window, as the model was trained.
    inferer = SliceInferer(roi_size=(64, 64), spatial_dim=0, sw_batch_size=16, overlap=0.25, mode="gaussian")
    for path in paths:
        data = pre({"image": str(path)})
        with torch.no_grad():
            data["pred"] = inferer(data["image"][None].to(device), net)[0].cpu()
        post(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=40)
    parser.add_argument("--single-calls", type=int, default=8)
    parser.add_argument("--ray-workers", type=int, default=None, help="--ray-workers of the Ray run")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray executor")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda[:N]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    # One network on both sides: an ensemble's first plain 2D sagittal member (this measures
    # batch overhead, not ensembling; the recipe below runs one such network).
    model_dir = default_model_dir()
    members = [model_dir / name for name in load_spec(model_dir).members]
    for member in members:
        spec = load_spec(member)
        if spec.slice_axis == "sagittal" and spec.context_slices == 0:
            model_dir = member
            break
    device = resolve_device(args.device)
    medseg = [sys.executable, "-m", "medseg", "segment", "--quiet", "--model", str(model_dir), "--device", str(device)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_scans(tmp / "scans", args.scans)
        seconds = {}
        for formats in ("nifti", "nifti,seg.nrrd"):
            t = time.perf_counter()
            subprocess.run(
                [*medseg, str(tmp / "scans"), "-o", str(tmp / f"one-{formats}"), "--formats", formats], check=True
            )
            seconds[f"medseg, one call ({formats})"] = time.perf_counter() - t
        run_seconds = {"medseg, one call (nifti)": _report_seconds(tmp / "one-nifti")}
        ray_settings = None
        if not args.no_ray and _has_ray():
            ray_command = [
                *medseg,
                str(tmp / "scans"),
                "-o",
                str(tmp / "ray"),
                "--formats",
                "nifti",
                "--executor",
                "ray",
            ]
            if args.ray_workers:
                ray_command += ["--ray-workers", str(args.ray_workers)]
            t = time.perf_counter()
            subprocess.run(ray_command, check=True)
            seconds["medseg, one call, --executor ray (nifti)"] = time.perf_counter() - t
            run_seconds["medseg, one call, --executor ray (nifti)"] = _report_seconds(tmp / "ray")
            ray_settings = json.loads((tmp / "ray" / "medseg-run.json").read_text())["settings"]
        subset = paths[: args.single_calls]
        t = time.perf_counter()
        for path in subset:
            subprocess.run([*medseg, str(path), "-o", str(tmp / "single"), "--formats", "nifti"], check=True)
        seconds["medseg, one call per scan (nifti)"] = (time.perf_counter() - t) * len(paths) / len(subset)
        t = time.perf_counter()
        monai_recipe(paths, model_dir, tmp / "monai", device)
        seconds["MONAI tutorial recipe, in-process loop"] = time.perf_counter() - t
        report = json.loads((tmp / "one-nifti,seg.nrrd" / "medseg-run.json").read_text())

    base = seconds["medseg, one call (nifti)"]
    print(cpu_line())  # every figure comes with the CPU that made it
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"{args.scans} volumes of 36x50x40, bundled model, {torch.get_num_threads()} threads, network on {device}")
    for name, s in seconds.items():
        print(f"{name:42s} {s:7.1f} s  {args.scans / s:6.2f} scans/s  time / one-call {s / base:5.2f}x")
    for name, s in run_seconds.items():
        # From the run report: planning to the last record, without interpreter, Ray and model start-up.
        print(f"{name:42s} {s:7.1f} s  {args.scans / s:6.2f} scans/s  run only (report), without start-up")
    if ray_settings is not None:
        print(f"Ray run: {ray_settings['workers']} worker(s) on {ray_settings['nodes']} node(s)")
    timings = [r["timings"] for r in report["scans"] if r["status"] == "ok"]
    for stage in ("read", "preprocess", "infer", "write"):
        values = np.array([t.get(stage, 0.0) for t in timings])
        print(f"per scan {stage:10s} (nifti + seg.nrrd run): median {1000 * np.median(values):6.1f} ms")


def _report_seconds(out: Path) -> float:
    return float(json.loads((out / "medseg-run.json").read_text())["summary"]["seconds"])


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("Ray is not installed (pip install 'medseg[ray]'): no Ray run")
        return False
    return True


if __name__ == "__main__":
    main()
