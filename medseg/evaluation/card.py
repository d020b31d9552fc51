"""The model card of a shipped model, generated from its files so that it cannot drift from them.

Every figure comes from a file: the layout, labels and training configuration from the
``model.json`` of the model and of each ensemble member (``provenance.config`` is the member's
full resolved training configuration), the measured metrics from ``validation.json`` (one entry
per training run, as ``pipelines/train_bundled.py`` writes it). Only the prose no file holds
(licence, split, limits, goal, findings) comes from the recipe (``medseg.training.recipe``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.spec import ModelLayout, ModelSpec
from medseg.training.recipe import Recipe

# medseg evaluate's default surface tolerance; validation.json does not record it.
NSD_TOLERANCE_MM = 1.0

# Training-configuration keys the training table shows (or the networks table, for the
# layout); every other key is listed once below the table, shared or per member.
_TABLE_KEYS = {
    *(f.name for f in fields(ModelLayout)),
    *("labels", "epochs", "steps_per_epoch", "batch_size", "lr", "schedule", "warmup_epochs", "batch_dice", "seed"),
    "augment.flip_axes",
}
_FLIP_AXES = {0: "rows", 1: "columns"}  # AugmentConfig.flip_axes: in-plane axes of the slice
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class _Member:
    """One network of the card: its name (the ensemble sub-folder), spec and folder."""

    name: str
    spec: ModelSpec
    folder: Path

    @property
    def config(self) -> dict[str, Any]:
        """Its resolved training configuration (empty for an untrained model)."""
        return self.spec.provenance.get("config", {})


def model_card(model_dir: Path, validation: Mapping[str, Any], recipe: Recipe) -> str:
    """The Markdown model card of the model (or ensemble) in ``model_dir``.

    ``validation`` maps run names to their measured result, as ``validation.json`` holds it:
    ``description``, ``training_minutes``, ``seconds_per_case`` and ``all``, one entry per
    post-processing variant with a per-label ``summary`` (``dice_mean``, ``hd95_mm_mean``,
    ``nsd_mean``). The model's ``provenance.validation_run`` names the shipped run's entry.
    """
    from medseg.model import load_spec

    spec = load_spec(model_dir)
    if spec.members:
        members = [_Member(name, load_spec(model_dir / name), model_dir / name) for name in spec.members]
    else:
        members = [_Member(spec.name, spec, model_dir)]
    shipped_run = spec.provenance.get("validation_run")
    if shipped_run not in validation:
        raise ConfigError(
            f"{model_dir / 'model.json'}: provenance.validation_run {shipped_run!r} names no entry of the "
            f"validation figures ({sorted(validation)}); the recipe's install step records it"
        )
    sections = [
        _overview(spec, members, validation[shipped_run], recipe),
        _data(spec, recipe),
        _networks(spec, members),
        _training(members, recipe),
        _metrics(spec, validation, shipped_run, recipe),
        _hardware(members, validation[shipped_run], recipe),
        _precision(model_dir),
        ["## Limits", recipe.card.limits],
        _goal(spec, validation[shipped_run], recipe),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _overview(spec: ModelSpec, members: list[_Member], shipped: Mapping[str, Any], recipe: Recipe) -> list[str]:
    files = [m.folder / m.spec.weights for m in members]
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    dtypes = " / ".join(sorted({d for f in files for d in _float_dtypes(f)})) or "unknown"
    return [
        f"# {spec.name}",
        "",
        recipe.card.summary,
        "",
        f"Shipped: {shipped['description']}, post-processing `{spec.postprocess}`. Input: "
        f"{spec.image_channels} image channel(s), intensity preset `{spec.preset}` ({_preset_text(spec.preset)}). "
        f"Weights: {len(files)} file(s), {megabytes:.1f} MB, float tensors stored as {dtypes}. " + recipe.card.shipping,
    ]


def _data(spec: ModelSpec, recipe: Recipe) -> list[str]:
    prov = spec.provenance
    labels = "; ".join(f"{lab.value} {lab.name} (RGB {', '.join(map(str, lab.color))})" for lab in spec.labels)
    return [
        "## Data and licence",
        recipe.card.data,
        "",
        f"Labels (value, name, colour): {labels}.",
        "",
        "## Split",
        f"`{prov.get('manifest', recipe.manifest)}` (dataset {prov.get('dataset', '?')}): "
        f"{prov.get('training_cases', '?')} training / {prov.get('validation_cases', '?')} validation cases. "
        + recipe.card.split,
    ]


def _networks(spec: ModelSpec, members: list[_Member]) -> list[str]:
    lines = ["## Networks"]
    if spec.members:
        axes = list(dict.fromkeys(m.spec.slice_axis for m in members))
        lines += [
            f"The ensemble averages its {len(members)} members' softmax probabilities on each scan's grid, "
            f"each member slicing along its own axis ({', '.join(axes)}"
            + (": a multi-view ensemble)." if len(axes) > 1 else ")."),
            "",
        ]
    header = ["member", "network", "in / base / depth / out channels", "parameters", "slice axis", "window"]
    header += ["context slices", "in-plane spacing"]
    rows = []
    for m in members:
        net, s = m.spec.network, m.spec
        rows.append(
            [
                f"`{m.name}`",
                net.name,
                f"{net.in_channels} / {net.base_channels} / {net.depth} / {net.out_channels}",
                f"{_parameters(m.spec) / 1e6:.2f} M",
                s.slice_axis,
                "x".join(map(str, s.window)),
                f"{s.context_slices}" + (" (2.5D)" if s.context_slices else ""),
                "x".join(f"{v:g}" for v in s.spacing) + " mm" if s.spacing else "native",
            ]
        )
    return lines + _table(header, rows)


def _training(members: list[_Member], recipe: Recipe) -> list[str]:
    header = ["member", "epochs x steps x batch", "learning rate", "schedule", "batch Dice", "flips", "seed"]
    header += ["best epoch", "minutes to best epoch"]
    rows = []
    for m in members:
        c, prov = m.config, m.spec.provenance
        if not c:
            rows.append([f"`{m.name}`", *["-"] * (len(header) - 1)])
            continue
        flips = ", ".join(_FLIP_AXES.get(a, str(a)) for a in c["augment"]["flip_axes"]) or "none"
        rows.append(
            [
                f"`{m.name}`",
                f"{c['epochs']} x {c['steps_per_epoch']} x {c['batch_size']}",
                f"{c['lr']:g}",
                f"{c['schedule']}, {c['warmup_epochs']} warm-up epoch(s)",
                "yes" if c["batch_dice"] else "no",
                flips,
                str(c["seed"]),
                str(prov.get("epoch", "-")),
                str(prov.get("training_minutes", "-")),
            ]
        )
    runs = [
        f"- `{run.name}`: `{run.config}`"
        + (f" with network {run.network}" if run.network else "")
        + f": {run.description}"
        for run in recipe.runs
    ]
    return [
        "## Training",
        recipe.card.training,
        "",
        *_table(header, rows),
        "",
        *_other_settings(members),
        "",
        "Runs of the recipe (name, configuration, what it is):",
        *runs,
        "",
        recipe.card.selection,
        "",
        f"Reproduce everything with one command: `{recipe.card.reproduce}`.",
    ]


def _other_settings(members: list[_Member]) -> list[str]:
    """The training settings the table leaves out: once if every member shares them, else per member."""
    configs = {m.name: _flatten(m.config) for m in members if m.config}
    if not configs:
        return ["No training configuration is recorded in model.json."]
    keys = [k for k in dict.fromkeys(k for c in configs.values() for k in c) if k not in _TABLE_KEYS]
    shared = [k for k in keys if len({json.dumps(c.get(k)) for c in configs.values()}) == 1]
    first = next(iter(configs.values()))
    who = "every member" if len(configs) > 1 else "the model"
    lines = [f"Other settings of {who}: " + ", ".join(f"`{k}` {json.dumps(first.get(k))}" for k in shared) + "."]
    for k in (k for k in keys if k not in shared):
        lines.append(f"`{k}`: " + ", ".join(f"{name} {json.dumps(c.get(k))}" for name, c in configs.items()) + ".")
    return lines


def _metrics(spec: ModelSpec, validation: Mapping[str, Any], shipped_run: str, recipe: Recipe) -> list[str]:
    names = [lab.name for lab in spec.labels[1:]]
    both = " / ".join(names)
    header = ["network", "post-processing", *(f"Dice {n}" for n in names), f"HD95 mm ({both})"]
    header += [f"NSD@{NSD_TOLERANCE_MM:g}mm ({both})", "training min"]
    rows = []
    for run, result in validation.items():
        for variant in result["all"]:
            shipped = run == shipped_run and variant["postprocess"] == spec.postprocess
            per = [_label_summary(variant["summary"], n) for n in names]
            rows.append(
                [
                    result["description"],
                    variant["postprocess"] + (" (shipped)" if shipped else ""),
                    *(f"{s['dice_mean']:.4f}" for s in per),
                    " / ".join(f"{s['hd95_mm_mean']:.2f}" for s in per),
                    " / ".join(f"{s['nsd_mean']:.4f}" for s in per),
                    str(result["training_minutes"]),
                ]
            )
    notes = [run.note for run in recipe.runs if run.note and run.name in validation]
    cases = spec.provenance.get("validation_cases", "?")
    return [
        f"## Validation metrics ({cases} cases, 3D, on each case's original grid)",
        "",
        *_table(header, rows),
        "",
        " ".join([recipe.card.timing, *notes]),
    ]


def _hardware(members: list[_Member], shipped: Mapping[str, Any], recipe: Recipe) -> list[str]:
    machines = dict.fromkeys(
        f"{m.spec.provenance['hardware']} with PyTorch {m.spec.provenance.get('torch', '?')}"
        for m in members
        if "hardware" in m.spec.provenance
    )
    return [
        "## Hardware and time",
        f"Trained on {' and '.join(machines) or 'unrecorded hardware'}: {recipe.card.hardware} "
        f"Training took {shipped['training_minutes']} min in all (whole runs). Inference: "
        f"{shipped['seconds_per_case']:.2f} s per case on the same CPU, read to write.",
    ]


def _precision(model_dir: Path) -> list[str]:
    """The model in reduced precision against fp32, from ``precision.json`` beside model.json
    (written by ``benchmarks/precision.py --record``); nothing when it is absent."""
    path = model_dir / "precision.json"
    if not path.is_file():
        return []
    figures = json.loads(path.read_text())
    rows = [
        [
            name,
            f"{run['voxel_agreement']:.4%}",
            f"{run['identical_cases']}/{figures['cases']}",
            " / ".join(f"{d:.4f}" for d in run["dice"]),
            " / ".join(f"{d or 0.0:+.4f}" for d in run["dice_change"]),  # no "-0.0000"
        ]
        for name, run in figures["precisions"].items()
    ]
    return [
        "## Reduced precision",
        f"`--precision auto` (the default) runs the networks in bf16 on CPUs with native bf16 (AVX512-BF16 "
        f"or AMX) and under bf16/fp16 autocast on GPUs, fp32 elsewhere. Against fp32 on the {figures['cases']} "
        f"validation cases ({figures['cpu']}; fp32 Dice {' / '.join(f'{d:.4f}' for d in figures['fp32_dice'])}):",
        "",
        *_table(["precision", "voxel agreement", "identical masks", "Dice (ant / post)", "change"], rows),
    ]


def _goal(spec: ModelSpec, shipped: Mapping[str, Any], recipe: Recipe) -> list[str]:
    variant = next((v for v in shipped["all"] if v["postprocess"] == spec.postprocess), None)
    if variant is None:
        raise ConfigError(f"the shipped run has no figures for post-processing {spec.postprocess!r}")
    dice = {name: _label_summary(variant["summary"], name)["dice_mean"] for name in recipe.goal}
    met = all(dice[name] >= goal for name, goal in recipe.goal.items())
    goal = " and ".join(f">= {v:g} {name}" for name, v in recipe.goal.items())
    return [
        "## Against the goal",
        f"Goal: mean Dice {goal}. Shipped: {' / '.join(f'{d:.4f}' for d in dice.values())}: "
        + ("met. " if met else "NOT met. ")
        + recipe.card.findings,
    ]


def _label_summary(summary: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """``summary``'s entry for label ``name``; evaluation names labels as the dataset's manifest
    does (MSD: "Anterior"), the model in lower case, so the match ignores case."""
    by_name = {k.lower(): v for k, v in summary.items()}
    if name.lower() not in by_name:
        raise ConfigError(f"the validation figures have no label {name!r} (they have {sorted(summary)})")
    return by_name[name.lower()]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested configuration as dotted keys (``augment.flip_axes``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _parameters(spec: ModelSpec) -> int:
    """Trainable parameters of the spec's network (built untrained: no weights needed)."""
    from medseg.networks import build_network

    return sum(p.numel() for p in build_network(spec.network).parameters())


def _preset_text(preset: str) -> str:
    from medseg.transforms.intensity import PRESETS

    p = PRESETS[preset]
    if p.kind == "window":
        return f"clipped to [{p.lower:g}, {p.upper:g}] and scaled to [0, 1]"
    if p.kind == "percentile_zscore":
        return f"each volume clipped to its {p.lower:g}-{p.upper:g} percentiles and z-scored"
    return "intensities used as they are"


def _float_dtypes(weights: Path) -> set[str]:
    """Storage types of the float tensors in a safetensors file, read from its header (an
    8-byte little-endian length, then JSON); empty for other weight formats."""
    if weights.suffix != ".safetensors":
        return set()
    with weights.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return {_SAFETENSORS_DTYPES[d] for d in dtypes if d in _SAFETENSORS_DTYPES}
