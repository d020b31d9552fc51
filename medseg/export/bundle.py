"""A model folder as a MONAI bundle (MONAI's ``docs/source/mb_specification.rst``).

``export_bundle(model_folder, output)`` writes::

    output/
      configs/metadata.json    every required field, network_data_format for the 2D network
      configs/inference.json   a folder of scans -> label maps on each scan's grid (MONAI engines)
      configs/evaluate.json    a manifest's validation cases -> mean Dice per label
      configs/train.json       fine-tunes one member through MONAI's SupervisedTrainer
      configs/logging.conf
      models/model.pt          plain state dict of the SliceEnsemble (all members)
      docs/README.md           how to run it (and the model card, when the folder has one)
      docs/data_license.txt    the licence of the training data
      LICENSE

The configs instantiate medseg's own components (LoadScand, the intensity preset,
SliceEnsemble, SliceEnsembleInferer, PostprocessLabelsd), so ``python -m monai.bundle run``
writes the same label maps as ``medseg segment`` with the same model. Everything is
generated from the model folder; nothing in a bundle is kept by hand.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from medseg.errors import ConfigError
from medseg.model import Model, load_model, pytorch_members
from medseg.networks.ensemble import SliceEnsemble, slice_ensemble
from medseg.spec import ModelSpec

logger = logging.getLogger(__name__)

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# The tutorial the network comes from, cited in metadata.json.
ARTICLE = (
    "Unet医疗影像分割 (PyTorch U-Net tutorial): the 2D U-Net with stride-2 convolutions and transposed convolutions"
)
MODALITY = {"mr": "MR"}  # the CT presets all mean Hounsfield units
RUN_FILES = ("configs/metadata.json", "configs/inference.json", "models/model.pt")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _members(model: Model) -> tuple[Model, ...]:
    return model.members or (model,)


def bundle_network(model: Model) -> tuple[SliceEnsemble, dict[str, torch.Tensor]]:
    """``model``'s SliceEnsemble and its state dict as stored (see ``slice_ensemble``),
    refusing exported (TorchScript, ONNX) members: a bundle stores a state dict."""
    pytorch_members(
        model,
        "is an exported network, not PyTorch weights; a bundle stores a state dict",
        "export the bundle from the PyTorch model folder this one was exported from",
    )
    return slice_ensemble(model)


def _label_names(spec: ModelSpec) -> dict[str, str]:
    return {str(i): label.name for i, label in enumerate(spec.labels)}


def _channel_def(model: Model, network: SliceEnsemble) -> dict[str, str]:
    """Meaning of each input channel of the 2D network: neighbouring slices, channel-major."""
    k = network.widest
    out = {}
    for c in range(network.image_channels):
        for j in range(2 * k + 1):
            offset = j - k
            where = "the slice" if offset == 0 else f"slice {offset:+d} along the member's slice axis"
            prefix = f"image channel {c}: " if network.image_channels > 1 else ""
            out[str(c * (2 * k + 1) + j)] = prefix + where
    return out


def metadata(model: Model, network: SliceEnsemble) -> dict[str, Any]:
    """``configs/metadata.json``: the specification's required keys and more."""
    import monai
    import numpy

    from medseg import __version__

    spec = model.spec
    provenance = spec.provenance
    multiple = max(2**m.spec.network.depth for m in _members(model))
    shape = [f"{multiple}*n", f"{multiple}*n"]
    names = [label.name for label in spec.labels[1:]]
    preset = spec.preset
    image_format = "magnitude" if preset in ("mr", "none") else "hounsfield"
    dice = provenance.get("validation_dice") or {}
    modality = MODALITY.get(preset, "CT") if preset != "none" else "n/a"
    members = _members(model)
    description = (
        f"medseg model '{spec.name}': {len(members)} 2D network(s) "
        f"({', '.join(f'{m.spec.network.name} {m.spec.slice_axis}' for m in members)}) run slice by slice "
        "over whole volumes in RAS orientation, their class probabilities averaged; label maps are written "
        "on each scan's original grid. Volumes go through medseg's SliceEnsembleInferer."
    )
    return {
        "schema": SCHEMA_URL,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by medseg {__version__} from the model folder '{spec.name}'"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        # The specification's "optional_packages_version", under the name MONAI 1.4+ reads (it
        # renames the old key with a deprecation warning).
        "required_packages_version": {
            "medseg": __version__,
            "pytorch-ignite": _version("pytorch-ignite"),
            "fire": _version("fire"),
            "nibabel": _version("nibabel"),
            "SimpleITK": _version("SimpleITK"),
        },
        "name": spec.name,
        "task": f"Segmentation of {', '.join(names)} ({modality})",
        "description": description,
        "authors": str(provenance.get("authors", "medseg")),
        "copyright": str(provenance.get("copyright", "medseg authors; see docs/data_license.txt for the data")),
        "data_source": str(provenance.get("dataset", "not recorded in model.json")),
        "data_type": "nibabel, nrrd, mha, dicom (any format medseg reads)",
        "image_classes": f"{spec.image_channels} channel(s), intensity preset '{preset}'",
        "label_classes": ", ".join(f"{label.value} is {label.name}" for label in spec.labels),
        "pred_classes": f"{len(spec.labels)} channels, the argmax is the label: " + ", ".join(names),
        "eval_metrics": {f"mean_dice_{name}": float(value) for name, value in dice.items()},
        "intended_use": "Research only; not for clinical use",
        "references": [ARTICLE],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": image_format,
                    "modality": modality,
                    "num_channels": network.in_channels,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": _channel_def(model, network),
                    "intensity_preset": preset,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "modality": modality,
                    "num_channels": len(spec.labels),
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": _label_names(spec),
                }
            },
        },
    }


def _network_def(network: SliceEnsemble) -> dict[str, Any]:
    return {
        "_target_": "medseg.networks.ensemble.SliceEnsemble",
        "members": network.layouts,
        "image_channels": network.image_channels,
    }


def _loading(keys: list[str]) -> list[dict[str, Any]]:
    """LoadScand -> channel first -> RAS: what ``medseg.transforms.build_transforms`` does.
    An item's ``series_uid`` picks the image's DICOM series (labels are read on their own)."""
    loads = [{"_target_": "medseg.transforms.LoadScand", "keys": "image", "series_uid_key": "series_uid"}]
    loads += [{"_target_": "medseg.transforms.LoadScand", "keys": key} for key in keys if key != "image"]
    return [
        *loads,
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS", "labels": None},
    ]


def _labels_to_values(spec: ModelSpec, key: str) -> list[dict[str, Any]]:
    """Channel indices -> label values, when they differ."""
    values = list(spec.label_values)
    if values == list(range(len(values))):
        return []
    return [
        {"_target_": "MapLabelValued", "keys": key, "orig_labels": list(range(len(values))), "target_labels": values}
    ]


def _common(model: Model, network: SliceEnsemble) -> dict[str, Any]:
    return {
        "imports": [
            "$import os",
            "$import sys",
            "$import numpy",
            "$import torch",
            "$from medseg.inference.bundle import member_layout",
            "$from medseg.inference.bundle import member_network",
            "$from medseg.inference.bundle import scan_datalist",
            "$from medseg.inference.bundle import scan_name",
        ],
        "bundle_root": ".",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "num_workers": 0,
        "network_def": _network_def(network),
        "network": "$@network_def.to(@device)",
    }


def _postprocessing(spec: ModelSpec, values: list[int]) -> list[dict[str, Any]]:
    """The model's label-map clean-up on labels ``values`` (label values, or channel indices
    where the labels are still indices), when it has one."""
    if spec.postprocess == "none":
        return []
    return [
        {
            "_target_": "medseg.inference.bundle.PostprocessLabelsd",
            "keys": "pred",
            "method": spec.postprocess,
            "values": values,
        }
    ]


def inference_config(model: Model, network: SliceEnsemble) -> dict[str, Any]:
    """``configs/inference.json``: every scan under ``dataset_dir`` -> ``output_dir``."""
    spec = model.spec
    postprocessing = [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        *_labels_to_values(spec, "pred"),
        *_postprocessing(spec, values=list(spec.label_values[1:])),
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": True,
            "to_tensor": True,
        },
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg",
            "output_ext": ".nii.gz",
            "output_dtype": "$numpy.uint8",
            "resample": False,
            "separate_folder": False,
            "output_name_formatter": "$scan_name",
            "print_log": False,
        },
    ]
    return {
        **_common(model, network),
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$scan_datalist(@dataset_dir, @output_dir)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                *_loading(["image"]),
                {"_target_": "medseg.transforms.NormalizeIntensityPresetd", "keys": "image", "preset": spec.preset},
            ],
        },
        "dataset": {
            "_target_": "medseg.inference.bundle.ScanDataset",
            "data": "@datalist",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
        },
        "inferer": {
            "_target_": "medseg.inference.bundle.SliceEnsembleInferer",
            "batch_size": None,
            "overlap": 0.25,
            "precision": "fp32",
        },
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "@ckpt_path",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "medseg.inference.bundle.ScanEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
            "output_dir": "@output_dir",
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        # Exit status 3 when any scan failed, as `medseg segment` (0 otherwise).
        "run": ["$@evaluator.run()", "$sys.exit(@evaluator.exit_status()) if @evaluator.exit_status() else None"],
    }


def _datalist(key: str) -> str:
    """A MONAI datalist (medseg manifest) section, paths relative to the manifest's folder."""
    return f"$monai.data.load_decathlon_datalist(@datalist_file, True, '{key}')"


def _label_to_indices(spec: ModelSpec) -> list[dict[str, Any]]:
    """Check each label map against its image and the model's label values (naming both files
    when they do not fit), then label values -> channel indices where they differ."""
    values = list(spec.label_values)
    check = [
        {
            "_target_": "medseg.inference.bundle.CheckLabelsd",
            "keys": "label",
            "values": values,
            "image_channels": spec.image_channels,
        }
    ]
    if values == list(range(len(values))):
        return check
    return [
        *check,
        {
            "_target_": "MapLabelValued",
            "keys": "label",
            "orig_labels": values,
            "target_labels": list(range(len(values))),
        },
    ]


def evaluate_config(model: Model, network: SliceEnsemble) -> dict[str, Any]:
    """``configs/evaluate.json``: the manifest's validation cases -> Dice per label, in RAS
    orientation (scores and labels on the same grid, no inversion needed)."""
    spec = model.spec
    classes = len(spec.labels)
    inference = inference_config(model, network)
    return {
        **_common(model, network),
        "datalist_file": "/workspace/data/dataset.json",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": _datalist("validation"),
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                *_loading(["image", "label"]),
                {"_target_": "medseg.transforms.NormalizeIntensityPresetd", "keys": "image", "preset": spec.preset},
                *_label_to_indices(spec),
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": inference["dataloader"],
        "inferer": inference["inferer"],
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                *_postprocessing(spec, values=list(range(1, classes))),
                {"_target_": "AsDiscreted", "keys": "pred", "to_onehot": classes},
                {"_target_": "AsDiscreted", "keys": "label", "to_onehot": classes},
            ],
        },
        "handlers": [
            inference["handlers"][0],
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                "_target_": "MetricsSaver",
                "save_dir": "@output_dir",
                "metrics": ["val_mean_dice"],
                "metric_details": ["val_mean_dice"],
                "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
                "summary_ops": "*",
            },
        ],
        "evaluator": {
            **{k: v for k, v in inference["evaluator"].items() if k != "output_dir"},
            "_target_": "SupervisedEvaluator",
            "key_val_metric": {
                "val_mean_dice": {
                    "_target_": "MeanDice",
                    "include_background": False,
                    "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                }
            },
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def train_config(model: Model, network: SliceEnsemble) -> dict[str, Any]:
    """``configs/train.json``: fine-tune member ``member_index`` (from ``models/model.pt``)
    on the manifest's training cases through MONAI's SupervisedTrainer; the whole ensemble's
    state dict is saved to ``output_dir``/model.pt at the end."""
    spec = model.spec
    return {
        **_common(model, network),
        "datalist_file": "/workspace/data/dataset.json",
        "output_dir": "$@bundle_root + '/train'",
        "member_index": 0,
        "member_layout": "$member_layout(@network_def, @member_index)",
        "finetune": True,
        "epochs": 10,
        "num_samples": 16,
        "pos_fraction": 0.67,
        "learning_rate": 2e-4,
        "datalist": _datalist("training"),
        "member": "$member_network(@network, @member_index)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                *_loading(["image", "label"]),
                {"_target_": "medseg.transforms.NormalizeIntensityPresetd", "keys": "image", "preset": spec.preset},
                *_label_to_indices(spec),
                # In-plane resampling to the member's spacing, as medseg trains (a no-op for
                # members without one).
                {
                    "_target_": "medseg.transforms.ResampleInPlaned",
                    "keys": "image",
                    "spacing": "$@member_layout['spacing']",
                    "slice_axis_rule": "$@member_layout['slice_axis']",
                    "mode": "bilinear",
                },
                {
                    "_target_": "medseg.transforms.ResampleInPlaned",
                    "keys": "label",
                    "spacing": "$@member_layout['spacing']",
                    "slice_axis_rule": "$@member_layout['slice_axis']",
                    "mode": "nearest",
                },
                # Slices smaller than the window padded as medseg's training pads them (the
                # image with its minimum, labels with background), larger ones cropped.
                {
                    "_target_": "medseg.transforms.PadInPlaned",
                    "keys": "image",
                    "window": "$@member_layout['window']",
                    "slice_axis_rule": "$@member_layout['slice_axis']",
                },
                {
                    "_target_": "medseg.transforms.PadInPlaned",
                    "keys": "label",
                    "window": "$@member_layout['window']",
                    "slice_axis_rule": "$@member_layout['slice_axis']",
                    "value": 0,
                },
                {
                    "_target_": "medseg.transforms.RandSliceSamplerd",
                    "keys": ["image", "label"],
                    "label_key": "label",
                    "slice_axis_rule": "$@member_layout['slice_axis']",
                    "num_samples": "@num_samples",
                    "pos_fraction": "@pos_fraction",
                    "context": "$@member_layout['context_slices']",
                },
                {
                    "_target_": "RandSpatialCropd",
                    "keys": ["image", "label"],
                    "roi_size": "$@member_layout['window']",
                    "random_size": False,
                },
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 2,
            "shuffle": True,
            "num_workers": "@num_workers",
        },
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "include_background": False},
        "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@member.parameters()", "lr": "@learning_rate"},
        "handlers": [
            {
                "_target_": "StatsHandler",
                "tag_name": "train_loss",
                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
            },
            {
                "_target_": "CheckpointSaver",
                "save_dir": "@output_dir",
                "save_dict": {"model": "@network"},
                "save_final": True,
                "final_filename": "model.pt",
            },
        ],
        "trainer": {
            "_target_": "SupervisedTrainer",
            "device": "@device",
            "max_epochs": "@epochs",
            "train_data_loader": "@dataloader",
            "network": "@member",
            "optimizer": "@optimizer",
            "loss_function": "@loss",
            "inferer": {"_target_": "SimpleInferer"},
            "train_handlers": "@handlers",
            "amp": False,
        },
        "initialize": [
            "$monai.utils.set_determinism(seed=0)",
            # Always the shipped weights (the other members stay trained); with --finetune False
            # the trained member starts from fresh random weights.
            "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
            "$[m.reset_parameters() for m in @member.modules() if hasattr(m, 'reset_parameters')] "
            "if str(@finetune).lower() in ('false', '0', 'no') else None",
        ],
        "run": ["$@trainer.run()"],
    }


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LICENSE_TEXT = """The code this bundle runs (medseg) is licensed under the Apache License 2.0
(https://www.apache.org/licenses/LICENSE-2.0). The weights in models/ are derived from the
training data: see docs/data_license.txt for the data's licence, which they carry.
"""


def _card_section(card: str, title: str) -> str | None:
    """The text of the Markdown section ``## title`` of ``card``, or None."""
    lines = card.splitlines()
    for i, line in enumerate(lines):
        if line.strip().lower() == f"## {title}".lower():
            body = []
            for rest in lines[i + 1 :]:
                if rest.startswith("## "):
                    break
                body.append(rest)
            return "\n".join(body).strip() or None
    return None


def data_licence(model: Model) -> str:
    """The training data's licence: the model card's "Data and licence" section, or
    ``provenance.data_licence``, or a note that it is not recorded."""
    card = model.folder / "MODEL_CARD.md"
    if card.is_file():
        section = _card_section(card.read_text(encoding="utf-8"), "Data and licence")
        if section:
            return section + "\n"
    recorded = model.spec.provenance.get("data_licence")
    if recorded:
        return f"{recorded}\n"
    return (
        "The licence of the training data is not recorded in the model folder (no MODEL_CARD.md "
        "'Data and licence' section, no provenance.data_licence). State it here before sharing this bundle.\n"
    )


def readme(model: Model, network: SliceEnsemble) -> str:
    """``docs/README.md``: what the bundle does, how to run each config, and the model card."""
    spec = model.spec
    members = _members(model)
    rows = "\n".join(
        f"| {i} | {m.spec.network.name} | {m.spec.slice_axis} | {m.spec.window[0]}x{m.spec.window[1]} | "
        f"{m.spec.context_slices} | {'native' if m.spec.spacing is None else m.spec.spacing} |"
        for i, m in enumerate(members)
    )
    labels = ", ".join(f"{label.value} {label.name}" for label in spec.labels)
    dice_columns = ", ".join(f"`class{i}` is {label.name}" for i, label in enumerate(spec.labels[1:]))
    text = f"""# {spec.name}: a MONAI bundle exported by medseg

Segments {", ".join(label.name for label in spec.labels[1:])} slice by slice with the 2D U-Net of the
tutorial "Unet医疗影像分割" ({len(members)} network(s), probabilities averaged). Label values: {labels}.
Intensity preset `{spec.preset}`; post-processing `{spec.postprocess}`. Generated from the medseg model
folder by `medseg export --format bundle`: edit the model folder and re-export rather than these files.

| member | network | slice axis | window | context slices | in-plane spacing |
|---|---|---|---|---|---|
{rows}

Needs `pip install 'medseg[monai]'` (medseg, pytorch-ignite, fire). Run from this folder, or add
`--bundle_root PATH`.

## Inference: a folder of scans -> label maps on each scan's grid

```bash
python -m monai.bundle run --config_file configs/inference.json \\
    --dataset_dir /path/to/scans --output_dir /path/to/masks
```

Every NIfTI/NRRD/MHA file and DICOM series under `dataset_dir` is read with medseg's reader
(`LoadScand`: no silent fall-back to another reader), put in RAS orientation, normalised, and
segmented by `SliceEnsembleInferer` (each member along its own slice axis, 2.5D members with
their neighbouring slices, slices padded to the window with the volume's minimum, sliding window
for larger slices, probabilities averaged). `Invertd` undoes the orientation and `SaveImaged` writes
`NAME_seg.nii.gz` (uint8) on the scan's own grid, NAME being the name `medseg segment` gives the
scan (unique within the folder: `case.nii.gz` and `case.nrrd`, or two series of one DICOM folder,
never share a mask). The label maps are identical to `medseg segment --model MODEL` (tested).
A scan medseg refuses (a DICOM series with a missing slice, a 4D file...) is logged with medseg's
message, naming the file and the fix, and skipped; the run ends with one summary line, writes
`output_dir/medseg-bundle-run.json` (scans written and failed) and exits with status 3 when any scan
failed. An `output_dir` that is or holds `dataset_dir` is refused; earlier runs' output folders are
left out of the scans.

## Evaluation: Dice on a manifest's validation cases

```bash
python -m monai.bundle run --config_file configs/evaluate.json \\
    --datalist_file /path/to/manifest.json --output_dir /path/to/eval
```

`datalist_file` is a MONAI datalist (`medseg manifest` writes one); paths in it are relative to its
folder. Mean Dice over the labels (background excluded) goes to the log and `output_dir/metrics.csv`,
per case and label to `val_mean_dice_raw.csv` ({dice_columns}).

## Training: fine-tune one member through MONAI's SupervisedTrainer

```bash
python -m monai.bundle run --config_file configs/train.json \\
    --datalist_file /path/to/manifest.json --member_index 0 --epochs 10 --output_dir /path/to/train
```

Loads `models/model.pt` (`--finetune false` starts member `member_index` from random weights; the
other members keep theirs), trains that member on 2D slices along its own axis, resampled to its
in-plane spacing if it has one (`RandSliceSamplerd`, padded and cropped to its window)
and saves the whole ensemble's state dict as `output_dir/model.pt`; copy it to `models/model.pt` to use it.

## Checks and exports with MONAI's tools

```bash
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
python -m monai.bundle ckpt_export network_def --filepath models/model.ts \\
    --ckpt_file models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json
```

The network's 2D `forward` takes {network.in_channels} channel(s) (neighbouring slices, see
`network_data_format`) of any height and width that are multiples of 16 and returns the members' mean
softmax probabilities: every member applied to the same 2D stack. Whole volumes need
`SliceEnsembleInferer`, since the members slice along different axes.
"""
    card = model.folder / "MODEL_CARD.md"
    if card.is_file():
        body = card.read_text(encoding="utf-8").split("\n", 1)[-1]
        text += "\n# The model card\n" + body.replace("\n## ", "\n### ").replace("\n# ", "\n## ")
    return text


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} is a file, not a folder; give a new folder for the bundle")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"{output} is not empty; give a new folder, or --overwrite to replace the bundle there")
    if output.is_dir() and overwrite and any(output.iterdir()) and not (output / "configs" / "metadata.json").is_file():
        # --overwrite replaces a bundle, never an unrelated folder's files
        raise ConfigError(f"{output} holds files but no bundle (configs/metadata.json); give a new folder")


# Files MONAI's tools derive from models/model.pt (ckpt_export, ONNX/TensorRT exports): stale
# once the weights are replaced.
DERIVED = ("models/model.ts", "models/model.onnx", "models/model.trt.ts")


def _replace_files(staging: Path, output: Path) -> None:
    """Put the bundle built in ``staging`` into the existing bundle ``output``, file by file,
    leaving every other file there alone (a run's eval/ or train/ outputs). The old files are
    moved aside first and put back if anything fails, so the configs and the weights never
    come from two different exports; files derived from the old weights are renamed *.stale."""
    files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    for rel in files:
        target = output / rel
        if target.exists() and not target.is_file():
            raise ConfigError(f"{target} is in the way of the bundle's file {rel} (not a file); move it away")
    backup = output.parent / f".{output.name}.medseg-old.tmp"
    shutil.rmtree(backup, ignore_errors=True)
    moved: list[Path] = []
    try:
        for rel in files:
            if (output / rel).exists():
                (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(output / rel, backup / rel)
                moved.append(rel)
        for rel in files:
            (output / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, output / rel)
    except BaseException:
        for rel in moved:
            os.replace(backup / rel, output / rel)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    for rel in DERIVED:
        derived = output / rel
        if derived.is_file():
            derived.rename(derived.with_name(derived.name + ".stale"))
            logger.warning("%s came from the replaced weights: renamed to %s.stale; re-export it", derived, rel)


def export_bundle(model_folder: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write the MONAI bundle of the model in ``model_folder`` to the folder ``output``.

    The bundle is built in a temporary folder beside ``output`` and renamed into place, so a
    failure leaves no half-written bundle. ``overwrite`` replaces the files of an existing
    bundle (a folder with configs/metadata.json) and leaves any other file there alone.
    Returns ``output``.
    """
    model = load_model(Path(model_folder))
    output = Path(output).absolute()
    _prepare(output, overwrite)
    network, state = bundle_network(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.medseg-export.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        for sub in ("configs", "models", "docs"):
            (staging / sub).mkdir(parents=True)
        _write_json(staging / "configs" / "metadata.json", metadata(model, network))
        _write_json(staging / "configs" / "inference.json", inference_config(model, network))
        _write_json(staging / "configs" / "evaluate.json", evaluate_config(model, network))
        _write_json(staging / "configs" / "train.json", train_config(model, network))
        (staging / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        torch.save(state, staging / "models" / "model.pt")
        (staging / "docs" / "README.md").write_text(readme(model, network), encoding="utf-8")
        (staging / "docs" / "data_license.txt").write_text(data_licence(model), encoding="utf-8")
        (staging / "LICENSE").write_text(LICENSE_TEXT, encoding="utf-8")
        if output.exists():
            _replace_files(staging, output)
            shutil.rmtree(staging)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.debug("wrote MONAI bundle %s", output)
    return output
