"""Every installed inference engine on the same networks and inputs, in the same process.

Times one network call per engine (torch fp32 as is, torch with BatchNorm folded, torch bf16
where the CPU has native bf16, OpenVINO f32 and bf16 where native, ONNX Runtime fp32) on:

- the bundled hippocampus-mr ensemble: its four members, each on a batch of N slices of its
  window (64x48 or 48x64; ``--batch 40`` is a whole scan's slices, as the predictor batches
  them), summed over the members: one scan's network time;
- an ArticleUNet of base 16 and one of base 32 (random weights, BatchNorm statistics made
  non-trivial) on one 512x512 slice.

Engines take turns in each round and the best round counts, so a burst of load on a shared
machine does not fall on one engine only. Also prints each engine's argmax agreement with
torch fp32 on the same input, its largest |logit difference|, and the start-up of
``load_engine`` over the bundled ensemble's members with an empty cache (the conversion) and
with the cache filled.

    python benchmarks/engines.py [--repeats 5] [--batch 40] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)

from medseg.bundled import default_model_dir  # noqa: E402
from medseg.inference.engines import load_engine  # noqa: E402
from medseg.inference.options import cpu_has_native_bf16  # noqa: E402
from medseg.model import Model, load_model  # noqa: E402
from medseg.networks import ArticleUNet  # noqa: E402
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names  # noqa: E402

CPU = torch.device("cpu")


def engine_choices() -> list[tuple[str, str, str]]:
    """(row name, engine, precision) of every engine installed here."""
    import importlib.util

    native = cpu_has_native_bf16()
    rows = [("torch fp32 (BatchNorm as is)", "unfolded", "fp32"), ("torch fp32", "torch", "fp32")]
    if native:
        rows.append(("torch bf16", "torch", "bf16"))
    if importlib.util.find_spec("openvino"):
        rows.append(("openvino f32", "openvino", "fp32"))
        if native:
            rows.append(("openvino bf16", "openvino", "bf16"))
    if importlib.util.find_spec("onnxruntime"):
        rows.append(("onnxruntime fp32", "onnxruntime", "fp32"))
    return rows


def make_engine(model: Model, engine: str, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if engine == "unfolded":  # the model's own network: channels-last, nothing folded
        network = copy.deepcopy(model.network).to(memory_format=torch.channels_last).eval()
        return lambda x: network(x.contiguous(memory_format=torch.channels_last))
    return load_engine(model, CPU, precision, engine)


def synthetic(base: int) -> Model:
    """An ArticleUNet (1 -> 3 classes, depth 4) with random weights and BatchNorm statistics."""
    generator = torch.Generator().manual_seed(base)
    network = ArticleUNet(1, 3, base, 4).eval()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    spec = ModelSpec(
        labels=labels_from_names(["background", "a", "b"]),
        network=NetworkSpec(out_channels=3, base_channels=base),
        window=(512, 512),
    )
    return Model(spec=spec, network=network, folder=Path(f"ArticleUNet-base{base}"))


def workloads(batch: int) -> list[tuple[str, list[tuple[Model, torch.Tensor]]]]:
    """(name, [(model, input) per network]) for each workload timed."""
    generator = torch.Generator().manual_seed(0)
    bundled = load_model(default_model_dir())
    members = []
    for member in bundled.members:
        shape = (batch, member.spec.network.in_channels, *member.spec.window)
        members.append((member, torch.randn(*shape, generator=generator)))
    one_slice = torch.randn(1, 1, 512, 512, generator=generator)
    return [
        (f"hippocampus-mr, 4 members x {batch} slices of 64x48", members),
        ("ArticleUNet base 16, 1 x 512x512", [(synthetic(16), one_slice)]),
        ("ArticleUNet base 32, 1 x 512x512", [(synthetic(32), one_slice)]),
    ]


def bench_workload(name: str, items: list[tuple[Model, torch.Tensor]], repeats: int) -> None:
    rows = engine_choices()
    engines = {row: [make_engine(model, engine, precision) for model, _ in items] for row, engine, precision in rows}
    outputs, seconds = {}, dict.fromkeys(engines, float("inf"))
    with torch.inference_mode():
        for row, calls in engines.items():  # warm-up, and the outputs compared
            outputs[row] = [call(x).float() for call, (_, x) in zip(calls, items)]
        for _ in range(repeats):
            for row, calls in engines.items():
                start = time.perf_counter()
                for call, (_, x) in zip(calls, items):
                    call(x)
                seconds[row] = min(seconds[row], time.perf_counter() - start)
    reference = outputs["torch fp32 (BatchNorm as is)"]
    base = seconds["torch fp32"]
    print(f"\n{name}\n")
    print("| engine | seconds | torch fp32 / engine | argmax agreement with torch fp32 | max abs logit diff |")
    print("|---|---|---|---|---|")
    for row in engines:
        agree = sum(int((o.argmax(1) == r.argmax(1)).sum()) for o, r in zip(outputs[row], reference))
        total = sum(r[:, 0].numel() for r in reference)
        diff = max(float((o - r).abs().max()) for o, r in zip(outputs[row], reference))
        print(f"| {row} | {seconds[row]:.4f} | {base / seconds[row]:.2f} | {100 * agree / total:.4f}% | {diff:.2e} |")


def bench_startup() -> None:
    """load_engine over the bundled members: empty cache (converts), then filled (reads)."""
    print("\nStart-up: load_engine for the 4 bundled members, seconds\n")
    print("| engine | empty cache (converts) | cache filled | saved |")
    print("|---|---|---|---|")
    members = load_model(default_model_dir()).members
    previous = os.environ.get("MEDSEG_CACHE_DIR")
    try:
        for _, engine, _precision in engine_choices():
            with tempfile.TemporaryDirectory() as cache:
                os.environ["MEDSEG_CACHE_DIR"] = cache
                times = []
                for _ in range(2):
                    start = time.perf_counter()
                    for member in members:
                        make_engine(member, engine, "fp32")
                    times.append(time.perf_counter() - start)
            if engine in ("openvino", "onnxruntime"):
                print(f"| {engine} | {times[0]:.2f} | {times[1]:.2f} | {times[0] - times[1]:.2f} |")
            elif engine == "torch":
                print(f"| torch (nothing to convert) | {times[0]:.2f} | {times[1]:.2f} | - |")
    finally:
        if previous is None:
            os.environ.pop("MEDSEG_CACHE_DIR", None)
        else:
            os.environ["MEDSEG_CACHE_DIR"] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (engines take turns; the best counts)")
    parser.add_argument("--batch", type=int, default=40, help="slices per call for the bundled members")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as torch sets them)")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up (conversion) timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_line())  # every figure comes with the CPU that made it
    versions = [f"torch {torch.__version__}"]
    for package in ("openvino", "onnxruntime"):
        try:
            versions.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            versions.append(f"{package} not installed")
    print(f"{', '.join(versions)}; {torch.get_num_threads()} threads; native bf16: {cpu_has_native_bf16()}")
    with tempfile.TemporaryDirectory() as cache:  # conversions of this run only
        os.environ["MEDSEG_CACHE_DIR"] = cache
        for name, items in workloads(args.batch):
            bench_workload(name, items, args.repeats)
    if not args.no_startup:
        bench_startup()


if __name__ == "__main__":
    main()
