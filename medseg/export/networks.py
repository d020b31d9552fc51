"""Model folders as TorchScript or ONNX networks: the same model.json, another weights file.

An exported folder segments with ``medseg segment --model`` exactly like the folder it came
from (``medseg.model`` loads it by the weights file's suffix), and its network runs without
medseg's network code: TorchScript in any libtorch, ONNX in any onnxruntime. Every export is
loaded back and compared with the PyTorch network before the folder appears.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from medseg.errors import ConfigError, MedsegError, ModelError
from medseg.export.folders import check_output_folder, copy_documents, staged_folder
from medseg.export.formats import NETWORK_FORMATS
from medseg.io.files import file_digest
from medseg.model import SPEC_FILE, STATE_DICT_SUFFIXES, Model, load_model, pytorch_members
from medseg.spec import MAX_WINDOW, ModelSpec

logger = logging.getLogger(__name__)

# Largest |logit difference| an export may show against PyTorch on the check input. Float32
# reorderings give 0 (TorchScript) to 1.3e-5 (ONNX, the bundled members); 1e-3 is far from
# both that and a real bug.
TOLERANCE = 1e-3

# Files never copied from the source folder into the export: weights of any kind.
_WEIGHT_SUFFIXES = (*STATE_DICT_SUFFIXES, *NETWORK_FORMATS.values())


def export_model(model_folder: str | Path, output: str | Path, format: str, overwrite: bool = False) -> ModelSpec:
    """Write the model in ``model_folder`` to the new folder ``output`` as ``format``
    ("torchscript" or "onnx"): model.json as it was, but for the weights file it names, its
    checksum, and a provenance note ``exported`` (format, source folder, source weights and
    their sha256). An ensemble's members are exported each in its own sub-folder under the
    same name; documents beside model.json (model card, validation figures) are copied.

    Each exported network is loaded back as ``medseg segment`` loads it and must give the
    PyTorch logits within ``TOLERANCE`` on a random input of another batch size, height and
    width than the one it was exported with (ModelError otherwise). ``output`` must be absent
    or empty unless ``overwrite``; it is written under a temporary name and renamed, so a
    failed export leaves nothing behind. Returns the top-level spec written.
    """
    if format not in NETWORK_FORMATS:
        raise ValueError(f"format must be one of {tuple(NETWORK_FORMATS)}, got {format!r}")
    source, output = Path(model_folder), Path(output)
    check_output_folder(output, overwrite, source)
    if format == "onnx":
        _require_onnx_export()
    model = load_model(source)
    pytorch_members(
        model, "is already an exported network", "export from the PyTorch model folder (safetensors or .pt weights)"
    )
    note = {
        "format": format,
        "from": str(source.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    with staged_folder(output) as tmp:
        if model.members:
            for name, member in zip(model.spec.members, model.members):
                (tmp / name).mkdir()
                _export_single(member, tmp / name, format, note)
            spec = replace(model.spec, provenance={**model.spec.provenance, "exported": note})
            spec.save(tmp / SPEC_FILE)
            copy_documents(source, tmp, _WEIGHT_SUFFIXES)
        else:
            spec = _export_single(model, tmp, format, note)
        load_model(tmp)  # everything written loads together
    logger.debug("exported %s to %s (%s)", source, output, format)
    return spec


def _export_single(model: Model, folder: Path, format: str, note: dict) -> ModelSpec:
    """Export one (non-ensemble) model into ``folder``, check it, and return its spec."""
    weights = folder / f"weights{NETWORK_FORMATS[format]}"
    example, check = _inputs(model.spec)
    network = model.network.to("cpu").eval()
    try:
        if format == "onnx":
            details = {"onnx_opset": export_onnx(network, weights, example, 2**model.spec.network.depth)}
        else:
            details = {"torchscript": export_torchscript(network, weights, example)}
    except MedsegError:
        raise
    except Exception as err:  # the exporters raise many types; the message and -v say what failed
        logger.debug("export of %s failed", model.folder, exc_info=True)
        raise ModelError(
            model.folder,
            f"could not be exported to {format} ({type(err).__name__}: {_first_line(err)})",
            "run with -v for the exporter's report",
        ) from err
    spec = replace(
        model.spec,
        weights=weights.name,
        weights_sha256=file_digest(weights),
        provenance={
            **model.spec.provenance,
            "exported": {
                **note,
                **details,
                "source_weights": model.spec.weights,
                "source_weights_sha256": model.weights_digest,
            },
        },
    )
    spec.save(folder / SPEC_FILE)
    copy_documents(model.folder, folder, _WEIGHT_SUFFIXES)
    difference = _difference(network, load_model(folder).network, check)
    # Errors name the source folder: the temporary export folder is deleted with them.
    if not difference <= TOLERANCE:  # also refuses NaN
        raise ModelError(
            model.folder,
            f"its {format} export disagrees with the PyTorch network: max |logit difference| "
            f"{difference:.3g} on a random {'x'.join(map(str, check.shape))} input, more than {TOLERANCE} allowed",
            "this network does not export faithfully; keep using the PyTorch model folder",
        )
    logger.debug("%s as %s: max |logit difference| %.3g at %s", model.folder, format, difference, tuple(check.shape))
    return spec


def _inputs(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (N, C, H, W) inputs: the export example (2 x C x window, at least two multiples of
    2**depth a side) and the check input (3 x C x larger H and W), from a seeded generator.

    The example has batch 2 and H, W of at least 2 * 2**depth because torch.export fixes any
    size traced at 1 (measured: a 16x16 example of a depth-4 network fails with "Constraints
    violated (16*kh, 16*kw)"); the check input differs in all three, so a size baked in by
    mistake fails the check."""
    generator = torch.Generator().manual_seed(0)
    multiple = 2**spec.network.depth
    height, width = (max(size, 2 * multiple) for size in spec.window)
    channels = spec.network.in_channels
    example = torch.randn(2, channels, height, width, generator=generator)
    check = torch.randn(3, channels, height + multiple, width + 2 * multiple, generator=generator)
    return example, check


def _difference(reference: nn.Module, exported: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((reference(x) - exported(x)).abs().max())


def export_onnx(network: nn.Module, path: Path, example: torch.Tensor, multiple: int) -> int:
    """Write ``network`` (eval mode, CPU) to ``path`` as ONNX with dynamic batch, height and
    width; returns the opset. Input "image" (N, C, H, W), output "logits" (N, classes, H, W).

    torch 2.13's ``torch.onnx.export`` uses the dynamo exporter (torch.export underneath), which
    fixes every size at the example's unless told otherwise ("Got invalid dimensions for input"
    at any other size). H and W are declared as multiples of ``multiple`` (2**depth, derived
    dims ``multiple * k``), the U-Net's one rule on sizes, so the graph keeps them symbolic
    ("16*kh") and the size check in forward is proven rather than baked in. Measured with torch
    2.13 on ArticleUNet and MonaiUNet: this exports and matches PyTorch to ~1e-7 at other sizes.
    (The legacy TorchScript-based exporter with ``dynamic_axes`` also works and is faster, about
    0.1 s against 5 s, but it is deprecated and cannot state the multiple-of rule.) The weights
    are stored inside the one file, so model.json's checksum covers all of it.
    """
    from torch.export import Dim

    limit = MAX_WINDOW // multiple
    kh, kw = Dim("kh", min=1, max=limit), Dim("kw", min=1, max=limit)
    shapes = ({0: Dim("batch", min=1), 2: multiple * kh, 3: multiple * kw},)
    with _quiet_exporter():
        torch.onnx.export(
            network,
            (example,),
            str(path),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=shapes,
            external_data=False,
            verbose=False,
        )
    import onnx

    return max(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == "")


def export_torchscript(network: nn.Module, path: Path, example: torch.Tensor) -> str:
    """Write ``network`` (eval mode, CPU) to ``path`` as TorchScript; returns how: "script"
    (control flow kept: medseg's networks script) or "trace" (the fallback when scripting fails;
    it records the operations run on ``example``, which for these U-Nets do not depend on it)."""
    with _quiet_exporter():
        try:
            module = torch.jit.script(network)
            how = "script"
        except Exception as err:  # torch.jit.frontend.NotSupportedError, RuntimeError...
            logger.info("torch.jit.script failed (%s: %s); tracing instead", type(err).__name__, _first_line(err))
            module = torch.jit.trace(network, example)
            how = "trace"
        torch.jit.save(module, str(path))
    return how


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide what the exporters say that users cannot act on (torch.jit's deprecation notices,
    torch.onnx's "torchvision is not installed"), and restore the logger level afterwards."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)


def _require_onnx_export() -> None:
    """ConfigError naming the extra when a package the ONNX export needs is missing."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"exporting to ONNX needs {', '.join(missing)}, which is not installed; pip install 'medseg[onnx]'"
        )


def _first_line(err: Exception) -> str:
    """The first line of ``err``'s message, without terminal colour codes, at most 300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return (text.splitlines() or [""])[0][:300]
