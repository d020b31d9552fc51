"""Peak memory of one `medseg segment` on a 512x512xN CT-like volume (issue 12, item 4).

Writes the volume as int16 NIfTI (as CT is stored), gzip-compressed and not, and an
untrained ArticleUNet model (base 16, preset ct_abdomen, axial slices, 512x512 window:
memory does not depend on what the weights learnt). Then runs, each in a fresh process, and
reads that process's peak resident set size (``os.wait4``'s ``ru_maxrss``):

* the bare interpreter importing medseg, torch and MONAI (what every run pays first),
* ``python -m medseg segment SCAN -o OUT --model MODEL --formats nifti`` per file,
* the MONAI-tutorial recipe of ``benchmarks/inference.py`` (LoadImaged ... SaveImaged,
  SliceInferer) on the same file, same network and weights.

Prints each peak in GB and as a multiple of the volume's float32 size; the goal is a
medseg peak of at most 2x that size, interpreter included. ``--timeline`` also prints the
resident size of each medseg run sampled every 50 ms, to see which stage holds what.

    python benchmarks/memory.py [--slices 600] [--base-channels 16] [--timeline] [--no-recipe]

The medseg runs import the ``medseg`` found from the working directory first (``python -m``),
so running this from a folder holding another checkout's ``medseg/`` measures that one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine import cpu_line  # benchmarks/, beside this script

GB = 1e9
IMPORTS = "import medseg, torch, monai"
SPACING = (0.78125, 0.78125, 2.5)


def ct_volume(shape: tuple[int, int, int], seed: int = 0, slab: int = 32) -> np.ndarray:
    """(X, Y, Z) int16 Hounsfield units: air, a body, spine and a liver-like blob, with noise.

    The phantom of ``benchmarks/inference.py`` (``ct_phantom``), built slab by slab so that
    making a 600-slice volume costs the int16 array, not several float64 copies of it.
    """
    rng = np.random.default_rng(seed)
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    y = np.linspace(-1, 1, shape[1])[None, :, None]
    z_all = np.linspace(-1, 1, shape[2])
    out = np.empty(shape, dtype=np.int16, order="F")  # NIfTI's own order: written as is
    for k0 in range(0, shape[2], slab):
        z = z_all[k0 : k0 + slab][None, None, :]
        body = np.broadcast_to((x / 0.85) ** 2 + (y / 0.6) ** 2 < 1, (*shape[:2], z.shape[2]))
        spine = np.broadcast_to((x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1, body.shape)
        liver = ((x + 0.35) / 0.3) ** 2 + ((y + 0.05) / 0.25) ** 2 + (z / 0.9) ** 2 < 1
        hu = np.where(spine, 700.0, np.where(liver, 90.0, np.where(body, 0.0, -1000.0)))
        out[:, :, k0 : k0 + slab] = np.rint(hu + rng.normal(0, 20, body.shape))
    return out


def write_scans(folder: Path, shape: tuple[int, int, int]) -> list[Path]:
    """The volume as ``scan.nii.gz`` and ``scan.nii`` (int16, qform = sform, RAS-stored)."""
    import nibabel as nib

    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-200.0, -180.0, -300.0)
    img = nib.Nifti1Image(ct_volume(shape), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    paths = []
    for name in ("scan.nii.gz", "scan.nii"):
        sub = folder / name.replace(".", "_")
        sub.mkdir()
        nib.save(img, str(sub / name))
        paths.append(sub / name)
    return paths


def write_model(folder: Path, base_channels: int, preset: str = "ct_abdomen") -> Path:
    from medseg.model import init_model
    from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

    spec = ModelSpec(
        labels=labels_from_names(["background", "liver"]),
        network=NetworkSpec(out_channels=2, base_channels=base_channels),
        preset=preset,
        slice_axis="axial",
        window=(512, 512),
    )
    init_model(folder, spec)
    return folder


def peak_rss(command: list[str], timeline: bool = False) -> tuple[float, float, list[tuple[float, float]]]:
    """Run ``command``; its peak RSS (bytes), its seconds and, with ``timeline``, its
    (seconds, RSS bytes) every 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while not done.wait(0.05):
            try:
                line = next(s for s in status.read_text().splitlines() if s.startswith("VmRSS:"))
            except (OSError, StopIteration):
                continue
            samples.append((time.perf_counter() - start, int(line.split()[1]) * 1024))

    sampler = threading.Thread(target=sample, daemon=True)
    if timeline:
        sampler.start()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would give the largest of all).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {proc.returncode}")
    return usage.ru_maxrss * 1024.0, time.perf_counter() - start, samples


def print_timeline(samples: list[tuple[float, float]], every: float = 1.0) -> None:
    """The largest RSS in each ``every``-second bin, with the change from the bin before."""
    last, bins = 0.0, {}
    for t, rss in samples:
        bins[int(t // every)] = max(bins.get(int(t // every), 0.0), rss)
    for b, rss in sorted(bins.items()):
        print(f"    {b * every:6.1f} s  {rss / GB:5.2f} GB  {'+' if rss >= last else '-'}{abs(rss - last) / GB:.2f}")
        last = rss


def run_recipe(scan: Path, model_dir: Path, out_dir: Path) -> None:
    """The recipe child: ``monai_recipe`` of benchmarks/inference.py with the model's weights."""
    from inference import monai_recipe

    from medseg.model import load_model

    model = load_model(model_dir)
    weights = model.network.state_dict()
    monai_recipe(scan, weights, model.spec.network.base_channels, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--timeline", action="store_true", help="sample each medseg run's RSS every 50 ms")
    parser.add_argument("--no-recipe", action="store_true", help="skip the MONAI recipe (the slowest run)")
    parser.add_argument("--engine", help="passed to medseg segment --engine (default: the command's own)")
    parser.add_argument(
        "--preset",
        default="ct_abdomen",
        help="the model's intensity preset (default ct_abdomen; mr: percentiles and z-score, "
        "which need the whole volume; the recipe, a CT window, runs with ct_abdomen only)",
    )
    parser.add_argument("--recipe-child", nargs=3, metavar=("SCAN", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe_child:
        import warnings

        warnings.filterwarnings("ignore")
        run_recipe(*(Path(p) for p in args.recipe_child))
        return

    print(cpu_line())  # every figure comes with the CPU that made it
    shape = (512, 512, args.slices)
    size = 4.0 * np.prod(shape)
    print(
        f"volume {'x'.join(map(str, shape))}, int16 on disk; float32 size {size / GB:.3f} GB "
        f"(2x: {2 * size / GB:.3f}); model preset {args.preset}"
    )
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = write_scans(tmp, shape)
        model = write_model(tmp / "model", args.base_channels, args.preset)
        runs: list[tuple[str, list[str]]] = [(f"python: {IMPORTS}", [python, "-c", IMPORTS])]
        for scan in scans:
            out = tmp / f"out-{scan.parent.name}"
            command = [python, "-m", "medseg", "segment", str(scan), "-o", str(out), "--model", str(model)]
            command += ["--formats", "nifti", "--quiet"] + (["--engine", args.engine] if args.engine else [])
            runs.append((f"medseg segment {scan.name}", command))
        if not args.no_recipe and args.preset == "ct_abdomen":
            for scan in scans:
                out = tmp / f"recipe-{scan.parent.name}"
                command = [python, __file__, "--recipe-child", str(scan), str(model), str(out)]
                runs.append((f"MONAI tutorial recipe {scan.name}", command))
        print(f"{'process':40s} {'peak RSS':>9s} {'x float32':>9s} {'seconds':>8s}")
        for name, command in runs:
            timeline = args.timeline and "medseg segment" in name
            peak, seconds, samples = peak_rss(command, timeline)
            print(f"{name:40s} {peak / GB:6.3f} GB {peak / size:8.2f}x {seconds:8.1f}", flush=True)
            if timeline:
                print_timeline(samples)


if __name__ == "__main__":
    main()
