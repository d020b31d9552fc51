"""Start-up: help and argument errors import no heavy library, and the faster model loading
and process exit change nothing a user can see."""

import json
import os
import subprocess
import sys

import pytest
import torch

from medseg.bundled import default_model_dir
from medseg.model import _read_state_dict, load_model, load_spec
from medseg.networks import build_network

HEAVY = ("torch", "monai", "SimpleITK", "highdicom", "ignite", "scipy")

# Runs ``medseg ARGS`` as ``python -m medseg`` does and prints, as JSON, which of HEAVY were
# imported by the time it exited (at exit: ``medseg`` ends with os._exit after atexit).
_PROBE = """
import atexit, json, runpy, sys
args, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
atexit.register(
    lambda: sys.__stderr__.write(
        "\\nHEAVY " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)) + "\\n"
    )
)
sys.argv = ["medseg", *args]
runpy.run_module("medseg", run_name="__main__", alter_sys=True)
"""


def _heavy_imports(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args), json.dumps(HEAVY)], capture_output=True, text=True
    )
    line = [x for x in done.stderr.splitlines() if x.startswith("HEAVY ")][-1]
    return done.returncode, json.loads(line.removeprefix("HEAVY "))


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("--version",),
        ("segment", "--help"),
        ("segment", "scan.nii.gz"),  # no -o: refused by the parser
        ("segment", "scan.nii.gz", "-o", "out", "--formats", "nope"),
        ("segment", "scan.nii.gz", "-o", "out", "--batch-size", "0"),
        ("bogus",),
    ],
)
def test_help_and_argument_errors_import_no_heavy_library(args):
    code, heavy = _heavy_imports(*args)
    assert code in (0, 2)
    assert heavy == [], f"medseg {' '.join(args)} imported {heavy}"


def test_segment_command_leaves_ignite_out(tmp_path):
    """MONAI would import pytorch-ignite (1-2 s, ~54 MB) for engines segmenting never uses."""
    from helpers import make_geometry, phantom, write_nifti

    g = make_geometry((12, 14, 6), (1.0, 1.0, 2.0))
    scan = write_nifti(tmp_path / "scan.nii.gz", phantom(g.shape), g)
    code, heavy = _heavy_imports("segment", str(scan), "-o", str(tmp_path / "out"), "--quiet")
    assert code == 0 and (tmp_path / "out" / "scan.nii.gz").is_file()
    # "ignite" itself is there as the None that marks it absent; none of its modules loaded.
    assert "monai" in heavy and not [m for m in heavy if m.startswith("ignite.")]


# Packages MONAI imports when they are installed (none is here): stand-ins that say so.
_STAND_INS = ("transformers", "torchvision", "cupy", "pandas", "skimage", "itk", "tensorboard")


def test_segment_command_leaves_out_what_monai_would_import_and_segmenting_never_uses(tmp_path):
    """Stand-ins for packages an ML image has installed record their import; ``import monai``
    alone imports them (so the check can fail), ``medseg segment`` imports none and works."""
    from helpers import make_geometry, phantom, write_nifti

    site, marks = tmp_path / "site", tmp_path / "imported.txt"
    for name in _STAND_INS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"open({str(marks)!r}, 'a').write('{name}\\n')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    subprocess.run([sys.executable, "-c", "import monai"], env=env, capture_output=True, check=True)
    assert set(marks.read_text().split()) >= {"transformers", "torchvision", "cupy"}
    marks.unlink()

    g = make_geometry((12, 14, 6), (1.0, 1.0, 2.0))
    scan = write_nifti(tmp_path / "scan.nii.gz", phantom(g.shape), g)
    done = subprocess.run(
        [sys.executable, "-m", "medseg", "segment", str(scan), "-o", str(tmp_path / "out"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "scan.nii.gz").is_file()
    assert not marks.exists(), marks.read_text()


def test_info_reads_model_json_without_torch():
    code, heavy = _heavy_imports("info", str(default_model_dir()))
    assert code == 0
    assert heavy == []


def test_command_output_and_exit_status_survive_the_quick_exit(tmp_path):
    """``python -m medseg`` ends with os._exit: its output is flushed and its status kept."""
    done = subprocess.run(
        [sys.executable, "-m", "medseg", "info", str(default_model_dir())], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "2 posterior" in done.stdout and done.stdout.rstrip().endswith("posterior 0.8793")
    done = subprocess.run(
        [sys.executable, "-m", "medseg", "info", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "is not a model folder" in done.stderr


def test_loaded_networks_equal_plainly_loaded_ones():
    """Built on the meta device, weights converted by numpy and assigned: the same tensors
    (values, dtypes, layout), parameters and outputs as building and copying them in."""
    model = load_model(default_model_dir())
    assert len(model.members) == len(load_spec(default_model_dir()).members) == 4
    for member in model.members:
        plain = build_network(member.spec.network)
        plain.load_state_dict(_read_state_dict(member.folder / member.spec.weights))
        plain.eval()
        loaded = member.network
        assert not loaded.training
        expected, got = plain.state_dict(), loaded.state_dict()
        assert list(expected) == list(got)
        for key, tensor in expected.items():
            assert got[key].dtype == tensor.dtype and got[key].device == tensor.device
            assert got[key].stride() == tensor.stride() and torch.equal(got[key], tensor), key
        for (name, param), (_, other) in zip(plain.named_parameters(), loaded.named_parameters(), strict=True):
            assert type(other) is type(param) and other.requires_grad == param.requires_grad, name
        x = torch.randn(2, member.spec.network.in_channels, 64, 48, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(plain(x), loaded(x))
