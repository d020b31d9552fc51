"""Start-up: how long the interpreter, medseg's imports and the model take before any work.

Each figure is a fresh process, repeated (the machine is shared and noisy; median and min):

  (a) ``python -c "import medseg"``
  (b) ``python -m medseg --help``
  (c) ``python -m medseg segment --help``
  (d) ``python -m medseg segment SCAN -o OUT`` with the bundled model (an ensemble of four
      2D U-Nets) on one synthetic 36x50x40 MR-like NIfTI, instrumented from outside the
      library (post-import hooks in the child, see ``_PROBE``): when torch and MONAI had been
      imported, when ``load_model`` started and ended, when the first slice batch reached a
      network, and when the command was done (its atexit callbacks); the whole process
      includes the interpreter's exit after that
  (e) ``medseg.model.load_model`` of the bundled model alone, in a fresh process (first
      call) and again in the same process (second call: no import or file-cache cost)
  (f) the top import-time offenders of the segment run (``python -X importtime``):
      self time summed per top-level package, and the slowest single imports.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)

PY = sys.executable

# Runs ``python -m medseg ARGS`` in the child and writes event times (time.time()) to the
# file named by MEDSEG_STARTUP_EVENTS. Patching happens in a post-import hook, so nothing is
# imported earlier than medseg itself would import it; the library stays untouched.
_PROBE = r"""
import atexit, importlib.abc, importlib.machinery, json, os, runpy, sys, time

events = {}
depth = [0]

def patch_module_call(module):
    cls = module.Module
    original = cls.__call__
    def call(self, *args, **kwargs):
        if "first_forward" not in events and type(self).__name__ not in ("Sequential", "ModuleList"):
            events["first_forward"] = time.time()
        return original(self, *args, **kwargs)
    cls.__call__ = call
    events["torch_imported"] = time.time()

def patch_model(module):
    original = module.load_model
    def load_model(*args, **kwargs):
        depth[0] += 1
        if depth[0] == 1:
            events["load_model_start"] = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                events["load_model_end"] = time.time()
    module.load_model = load_model

def monai_done(module):
    events["monai_imported"] = time.time()

HOOKS = {"torch.nn.modules.module": patch_module_call, "medseg.model": patch_model, "monai": monai_done}

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module
        def run(module):
            exec_module(module)
            HOOKS[name](module)
        spec.loader.exec_module = run
        return spec

sys.meta_path.insert(0, Hook())

def write_events():  # at exit: ``medseg`` may end the process with os._exit after atexit
    events["exit"] = time.time()
    with open(os.environ["MEDSEG_STARTUP_EVENTS"], "w") as f:
        json.dump(events, f)

atexit.register(write_events)
sys.argv = ["medseg", *json.loads(os.environ["MEDSEG_STARTUP_ARGS"])]
runpy.run_module("medseg", run_name="__main__", alter_sys=True)
"""

_LOAD_MODEL = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from medseg.bundled import default_model_dir
from medseg.model import load_model
t2 = time.perf_counter()
load_model(default_model_dir())
t3 = time.perf_counter()
load_model(default_model_dir())
t4 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "import": t2 - t1, "first": t3 - t2, "second": t4 - t3}))
"""


def make_scan(path: Path) -> Path:
    """A hippocampus-sized MR-like crop (36x50x40, 1 mm): noise plus a bright ellipsoid."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in (36, 50, 40)], indexing="ij")
    blob = (x / 0.3) ** 2 + (y / 0.6) ** 2 + (z / 0.4) ** 2 < 1
    image = (rng.normal(300, 40, x.shape) + 400 * blob).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(path))
    return path


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of ``command`` in a fresh process (its output discarded; it must succeed)."""
    t = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    return time.perf_counter() - t


def line(name: str, values: list[float]) -> str:
    return f"{name:58s} median {statistics.median(values):6.2f} s   min {min(values):6.2f} s   (n={len(values)})"


def segment_runs(tmp: Path, repeats: int) -> dict[str, list[float]]:
    """(d): the whole command and its phases, measured from the parent's process start."""
    scan = make_scan(tmp / "scan.nii.gz")
    phases: dict[str, list[float]] = defaultdict(list)
    for i in range(repeats):
        events_file = tmp / f"events{i}.json"
        args = ["segment", str(scan), "-o", str(tmp / f"out{i}"), "--quiet"]
        env = {**os.environ, "MEDSEG_STARTUP_ARGS": json.dumps(args), "MEDSEG_STARTUP_EVENTS": str(events_file)}
        start = time.time()
        subprocess.run([PY, "-c", _PROBE], check=True, env=env, cwd=ROOT)
        end = time.time()
        events = json.loads(events_file.read_text())
        phases["segment, whole process"].append(end - start)
        for key in ("torch_imported", "monai_imported", "load_model_start", "load_model_end", "first_forward", "exit"):
            if key in events:
                phases[f"  start -> {key.replace('_', ' ')}"].append(events[key] - start)
        if "load_model_start" in events and "load_model_end" in events:
            phases["  load_model (inside the run)"].append(events["load_model_end"] - events["load_model_start"])
    return phases


def import_offenders(tmp: Path, top: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(f): self time per top-level package, and the slowest first-level imports, of a
    segment run (``-X importtime``, microseconds in its stderr)."""
    scan = make_scan(tmp / "importtime.nii.gz")
    result = subprocess.run(
        [PY, "-X", "importtime", "-m", "medseg", "segment", str(scan), "-o", str(tmp / "it"), "--quiet"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    per_package: dict[str, float] = defaultdict(float)
    outside: list[tuple[str, float]] = []
    rows = [
        r.removeprefix("import time:").split("|") for r in result.stderr.splitlines() if r.startswith("import time:")
    ]
    parents: dict[int, str] = {}
    # Children are printed before their parent: read backwards to know each import's importer.
    for self_us, cumulative_us, name in reversed(rows[1:]):  # rows[0] is the header
        module, level = name.strip(), (len(name) - len(name.lstrip()) - 1) // 2
        parents[level] = module
        per_package[module.split(".")[0]] += int(self_us) / 1e6
        parent = parents.get(level - 1, "") if level else ""
        if module.split(".")[0] != "medseg" and (not parent or parent.split(".")[0] == "medseg"):
            outside.append((f"{module} (by {parent or 'a function'})", int(cumulative_us) / 1e6))
    by_package = sorted(per_package.items(), key=lambda kv: -kv[1])[:top]
    return by_package, sorted(outside, key=lambda kv: -kv[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per figure")
    args = parser.parse_args()
    print(cpu_line())
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    n = args.repeats
    print(line("(0) python -c pass", [timed([PY, "-c", "pass"]) for _ in range(n)]))
    print(line("(a) python -c 'import medseg'", [timed([PY, "-c", "import medseg"]) for _ in range(n)]))
    print(line("(b) python -m medseg --help", [timed([PY, "-m", "medseg", "--help"]) for _ in range(n)]))
    print(
        line(
            "(c) python -m medseg segment --help",
            [timed([PY, "-m", "medseg", "segment", "--help"]) for _ in range(n)],
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("(d) python -m medseg segment SCAN -o OUT (36x50x40, bundled 4-member ensemble):")
        for name, values in segment_runs(tmp, n).items():
            print(line(name, values))
        loads = [
            json.loads(subprocess.run([PY, "-c", _LOAD_MODEL], check=True, capture_output=True, cwd=ROOT).stdout)
            for _ in range(n)
        ]
        print("(e) medseg.model.load_model(bundled) in a fresh process:")
        print(line("  import torch", [x["torch"] for x in loads]))
        print(line("  import medseg.model", [x["import"] for x in loads]))
        print(line("  load_model, first call", [x["first"] for x in loads]))
        print(line("  load_model, second call (same process)", [x["second"] for x in loads]))
        by_package, first_level = import_offenders(tmp)
    print("(f) python -X importtime -m medseg segment SCAN -o OUT; self time per top-level package:")
    for name, seconds in by_package:
        print(f"  {name:40s} {seconds:6.3f} s")
    print("    slowest imports of other packages made by medseg's code (cumulative):")
    for name, seconds in first_level:
        print(f"  {name:60s} {seconds:6.3f} s")


if __name__ == "__main__":
    main()
