"""medseg segment against the MONAI-tutorial recipe, same network and weights, same process.

The recipe is what a user writes from MONAI's tutorials: LoadImaged, EnsureChannelFirstd,
Orientationd, ScaleIntensityRanged, SliceInferer (256x256 window, overlap 0.25, Gaussian,
fp32), Invertd, AsDiscreted, SaveImaged. Both run on a 512x512xN CT-like volume with an
ArticleUNet briefly trained (seeded) to find a liver-like blob, so their outputs mean
something and can be compared with Dice.

Prints seconds for each, the ratio recipe/medseg (higher: medseg faster) and Dice between
outputs. medseg runs with its default options and the model's own 512x512 window (whole
slices, the configuration a model trained on whole CT slices has); ``--sliding`` adds a run
with a 256x256 window (the same sliding windows as the recipe).

It also prints where medseg's time goes: seconds inside the network forward (the engine's
calls) against the whole call, and the network's achieved FLOP/s against the machine's
measured matrix-multiply peak in the precision medseg ran (fp32 on CPUs without native bf16).

``--device`` (default auto: the GPU when PyTorch sees one) runs both on that device: the
recipe as the tutorials move it there (network and input on the GPU, fp32), medseg with
its defaults there (precision auto: bf16 autocast on GPUs that have it). Timings on a GPU
synchronise at the end of each network call, so the forward share is real device time.

    python benchmarks/inference.py [--slices 64] [--base-channels 32] [--repeats 1] [--sliding] [--device auto]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

warnings.filterwarnings("ignore")

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)

import medseg  # noqa: E402
from medseg.inference.options import resolve_device  # noqa: E402
from medseg.io.volume import Geometry  # noqa: E402
from medseg.io.writers import write_nifti_labels  # noqa: E402
from medseg.model import load_model, save_model  # noqa: E402
from medseg.networks import ArticleUNet  # noqa: E402
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names  # noqa: E402
from medseg.transforms.intensity import PRESETS  # noqa: E402

WINDOW = PRESETS["ct_abdomen"]


def ct_phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image HU, liver mask), both (X, Y, Z): air, a body, spine, and a liver-like blob."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.6) ** 2 < 1
    spine = ((x) / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1
    liver = ((x + 0.35) / 0.3) ** 2 + ((y + 0.05) / 0.25) ** 2 + (z / 0.9) ** 2 < 1
    image = np.full(shape, -1000.0)
    image[body] = 0.0
    image[liver] = 90.0
    image[spine] = 700.0
    image += rng.normal(0, 20, shape)
    return image.astype(np.float32), liver.astype(np.uint8)


def train_briefly(image: np.ndarray, mask: np.ndarray, base: int, steps: int) -> ArticleUNet:
    """A few Adam steps on random 128x128 crops inside the body on axial slices (seeded)."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ArticleUNet(1, 2, base_channels=base)
    x = torch.from_numpy(np.clip((image - WINDOW.lower) / (WINDOW.upper - WINDOW.lower), 0, 1))
    y = torch.from_numpy(mask).long()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[2], (8,), generator=gen)
        # Crops start within the body's bounding box so few of them are air only.
        i0 = torch.randint(x.shape[0] // 8, x.shape[0] * 5 // 8, (8,), generator=gen)
        j0 = torch.randint(x.shape[1] // 5, x.shape[1] * 11 // 20, (8,), generator=gen)
        xb = torch.stack([x[a : a + 128, b : b + 128, k] for a, b, k in zip(i0, j0, idx)])[:, None]
        yb = torch.stack([y[a : a + 128, b : b + 128, k] for a, b, k in zip(i0, j0, idx)])
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def monai_recipe(scan: Path, weights: dict, base: int, out_dir: Path, device: torch.device) -> Path:
    """The MONAI-tutorial way: the whole chain as users write it (network and input on
    ``device``, the prediction back on the CPU for inversion and saving)."""
    from monai.inferers import SliceInferer
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
    )

    net = ArticleUNet(1, 2, base_channels=base)
    net.load_state_dict(weights)
    net.to(device).eval()
    pre = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            ScaleIntensityRanged("image", a_min=WINDOW.lower, a_max=WINDOW.upper, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    post = Compose(
        [
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted("pred", argmax=True),
            SaveImaged(
                "pred",
                output_dir=str(out_dir),
                output_postfix="seg",
                separate_folder=False,
                output_dtype=np.uint8,
                resample=False,
                print_log=False,
            ),
        ]
    )
    inferer = SliceInferer(roi_size=(256, 256), spatial_dim=2, sw_batch_size=4, overlap=0.25, mode="gaussian")
    data = pre({"image": str(scan)})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None].to(device), net)[0].cpu()
    post(data)
    return out_dir / "scan_seg.nii.gz"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def matmul_peak(
    dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5, device: torch.device | None = None
) -> float:
    """The machine's measured matrix-multiply rate (FLOP/s) in ``dtype`` on ``device`` (the
    CPU by default): the best of ``repeats`` n x n products of random data, with the threads
    torch uses here."""
    device = device or torch.device("cpu")
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * n**3 / best


def _seconds(fn, device: torch.device | None = None) -> float:
    _synchronize(device)
    t = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - t


def _synchronize(device: torch.device | None) -> None:
    """Wait for ``device``'s queued work (GPU calls return before their kernels finish)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def network_flops(net: torch.nn.Module, size: tuple[int, int], in_channels: int = 1) -> int:
    """Multiply-adds x 2 of one forward pass on a (1, in_channels, *size) input, counted from
    the convolutions' shapes (BatchNorm, ReLU and concatenation are not counted)."""
    total = 0

    def count(module, _inputs, output) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input pixel scatters a kernel
            total += 2 * _inputs[0].shape[-2] * _inputs[0].shape[-1] * module.in_channels * module.out_channels * k
        else:
            total += 2 * output.shape[-2] * output.shape[-1] * module.in_channels * module.out_channels * k

    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    hooks = [m.register_forward_hook(count) for m in convs]
    with torch.no_grad():
        net(torch.zeros(1, in_channels, *size))
    for h in hooks:
        h.remove()
    return total


class EngineTimer:
    """Wraps every engine medseg makes: seconds inside the network forward and pixels sent."""

    def __init__(self) -> None:
        self.seconds, self.pixels, self.calls, self.name, self.precision = 0.0, 0, 0, "", ""
        self.device: torch.device | None = None

    def install(self) -> None:
        import medseg.inference.engines as engines

        make = engines.load_engine

        def timed_load(*args, **kwargs):
            engine = make(*args, **kwargs)
            self.name, self.precision, self.device = engine.name, engine.precision, x_device(args, kwargs)

            def call(x):
                _synchronize(x.device)
                t = time.perf_counter()
                out = engine(x)
                _synchronize(x.device)
                self.seconds += time.perf_counter() - t
                self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
                self.calls += 1
                return out

            return TimedEngine(engine, call)

        engines.load_engine = timed_load


def x_device(args: tuple, kwargs: dict) -> torch.device:
    """The device argument of ``load_engine(model, device, ...)``."""
    return kwargs["device"] if "device" in kwargs else args[1]


class TimedEngine:
    """A proxy: the engine's attributes, the timed call."""

    def __init__(self, engine, call) -> None:
        self._engine, self._call = engine, call

    def __call__(self, x):
        return self._call(x)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sliding", action="store_true", help="also medseg with the recipe's 256 window")
    parser.add_argument("--precision", default="auto", help="medseg's --precision (default: its default)")
    parser.add_argument("--engine", default="auto", help="medseg's --engine (default: its default)")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda[:N]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("monai").setLevel(logging.ERROR)

    device = resolve_device(args.device)
    print(cpu_line())  # every figure comes with the CPU that made it
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    shape = (512, 512, args.slices)
    geometry = Geometry(shape, (0.78125, 0.78125, 2.5), (-200.0, -180.0, -300.0), tuple(np.eye(3).ravel()))
    image, truth = ct_phantom(shape)
    t = time.perf_counter()
    net = train_briefly(image, truth, args.base_channels, args.train_steps)
    print(
        f"trained base-{args.base_channels} ArticleUNet for {args.train_steps} steps in {time.perf_counter() - t:.0f} s"
    )
    timer = EngineTimer()
    timer.install()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scan = tmp / "scan.nii.gz"
        # Stored as CT is, int16 Hounsfield units.
        img = nib.Nifti1Image(np.round(image).astype(np.int16), geometry.affine_ras())
        img.set_qform(geometry.affine_ras(), code=1)
        img.set_sform(geometry.affine_ras(), code=1)
        nib.save(img, str(scan))
        write_nifti_labels(truth, geometry, tmp / "truth.nii.gz")
        spec = ModelSpec(
            labels=labels_from_names(["background", "liver"]),
            network=NetworkSpec(out_channels=2, base_channels=args.base_channels),
            preset="ct_abdomen",
            slice_axis="axial",
            window=(512, 512),
        )
        save_model(tmp / "model512", spec, net)
        save_model(tmp / "model256", replace(spec, window=(256, 256)), net)
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        forward: dict[str, tuple[float, int]] = {}

        def run_medseg(folder: str) -> Path:
            out = tmp / f"out_{folder}"
            model = load_model(tmp / folder)
            before = timer.seconds, timer.pixels
            report = medseg.segment(
                scan,
                out,
                model,
                formats="nifti",
                overwrite=True,
                precision=args.precision,
                engine=args.engine,
                device=args.device,
            )
            forward[folder] = (timer.seconds - before[0], timer.pixels - before[1])
            return Path(report.records[0].outputs["nifti"])

        recipe = "MONAI tutorial recipe (256 window)"
        runs = {"medseg defaults (512 window)": lambda: run_medseg("model512")}
        if args.sliding:
            runs["medseg (256 window, sliding)"] = lambda: run_medseg("model256")
        runs[recipe] = lambda: monai_recipe(scan, weights, args.base_channels, tmp / "monai", device)
        seconds: dict[str, float] = {}
        outputs: dict[str, np.ndarray] = {}
        in_forward: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                t = time.perf_counter()
                path = run()
                took = time.perf_counter() - t
                if took < seconds.get(name, np.inf):
                    seconds[name] = took
                    if name != recipe:
                        in_forward[name] = forward["model512" if "512" in name else "model256"]
                outputs[name] = np.asarray(nib.load(str(path)).dataobj)

    print(
        f"\n512x512x{args.slices} CT-like volume (int16 NIfTI), ArticleUNet base {args.base_channels}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}; on {device}; medseg engine {timer.name}, "
        f"precision {timer.precision}"
    )
    for name, s in seconds.items():
        ratio = seconds[recipe] / s
        print(
            f"{name:38s} {s:7.2f} s   recipe/this {ratio:5.2f}x   "
            f"Dice vs recipe {dice(outputs[name], outputs[recipe]):.4f}   "
            f"vs truth {dice(outputs[name], truth):.4f}"
        )
    per_pixel = network_flops(ArticleUNet(1, 2, base_channels=args.base_channels), (512, 512)) / 512**2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(timer.precision, torch.float32)
    n = 8192 if device.type == "cuda" else 2048
    peak = matmul_peak(dtype, n, device=device)
    print(f"\n{timer.precision} matrix-multiply peak measured here: {peak / 1e9:.1f} GFLOP/s ({n}x{n} mm on {device})")
    for name, (secs, pixels) in in_forward.items():
        achieved = per_pixel * pixels / secs
        print(
            f"{name}: network forward {secs:.2f} s of {seconds[name]:.2f} s wall ({secs / seconds[name]:.0%}); "
            f"{pixels / (512 * 512 * args.slices):.2f}x the volume's pixels sent; "
            f"{achieved / 1e9:.1f} GFLOP/s achieved ({achieved / peak:.0%} of the {timer.precision} matmul peak)"
        )


if __name__ == "__main__":
    main()
