"""Dataset manifests: MONAI datalist JSON (``training``/``validation``/``test`` lists of
``{"image": ..., "label": ...}``) plus MSD ``labels`` and ``modality``.

Paths are relative to the manifest's folder (as ``monai.data.load_decathlon_datalist``
resolves them) or to a ``data_root`` given when loading. Splits are made by subject (one
case = one subject's scan), never by slice, so no subject is on both sides.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, FileProblem, MedsegError
from medseg.io.volume import Geometry
from medseg.spec import MAX_LABEL_NAME, check_text

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")


class ManifestError(MedsegError):
    """A manifest that cannot be used; lists every problem found, each with its case."""

    def __init__(self, path: Path, problems: list[str], hint: str = "") -> None:
        self.path = path
        self.problems = problems
        listing = "\n  ".join(problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n  {listing}" + (f"\n({hint})" if hint else ""))


@dataclass(frozen=True)
class Case:
    """One subject's scan and (for training and validation) its label map.

    ``image`` is a scan file or a DICOM series folder; ``series_uid`` picks one series when
    that folder holds several (manifest key ``"series_uid"``).
    """

    id: str
    image: Path
    label: Path | None
    series_uid: str | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    labels: dict[int, str]
    modality: dict[str, str]
    splits: dict[str, tuple[Case, ...]] = field(default_factory=dict)
    name: str = ""

    def cases(self, split: str) -> tuple[Case, ...]:
        if split not in SPLITS:
            raise MedsegError(f"unknown split {split!r}; choose one of {SPLITS}")
        return self.splits.get(split, ())


def case_id(path: Path) -> str:
    """The subject id of a scan file: its name without scan suffixes."""
    from medseg.io.readers import scan_name

    return scan_name(path)


def split_cases(ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle of the sorted ids; the last ``val_fraction`` become validation.

    Sorting first makes the split independent of file-system listing order.
    """
    if not 0 <= val_fraction < 1:
        raise MedsegError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = sorted(ids)
    np.random.default_rng(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    return sorted(order[: len(order) - n_val]), sorted(order[len(order) - n_val :])


def _pairs_from_msd(data_dir: Path) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    meta = json.loads((data_dir / "dataset.json").read_text())
    pairs = []
    for item in meta.get("training", []):
        # MSD dataset.json paths start with "./"; resolve them against the dataset folder.
        pairs.append((data_dir / item["image"], data_dir / item["label"]))
    if not pairs:
        labels_dir = data_dir / "labelsTr"
        pairs = [(p, labels_dir / p.name) for p in sorted((data_dir / "imagesTr").glob("*.nii*"))]
    return pairs, meta


def _pairs_from_folders(data_dir: Path) -> list[tuple[Path, Path]]:
    from medseg.io.readers import scan_suffix

    images = next((data_dir / n for n in ("images", "imagesTr", "image") if (data_dir / n).is_dir()), None)
    labels = next((data_dir / n for n in ("labels", "labelsTr", "label") if (data_dir / n).is_dir()), None)
    if images is None or labels is None:
        raise MedsegError(
            f"{data_dir}: neither an MSD folder (dataset.json, imagesTr/, labelsTr/) nor paired "
            "images/ and labels/ folders; arrange the data in one of those layouts"
        )
    by_id = {case_id(p): p for p in sorted(labels.iterdir()) if scan_suffix(p)}
    return [(p, by_id.get(case_id(p), labels / p.name)) for p in sorted(images.iterdir()) if scan_suffix(p)]


def build_manifest(
    data_dir: Path,
    output: Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a manifest for an MSD folder or paired image/label folders; return its content.

    The labels are ``labels`` (names of values 0, 1, ..., background first) when given, else
    the MSD dataset.json's, else the values found in the label files (named "background",
    "label_1", ...). The content is checked as ``load_manifest`` checks it before anything is
    written (ManifestError listing every problem; nothing written), and written atomically.
    An existing ``output`` is replaced only with ``overwrite`` (FileProblem otherwise).
    """
    data_dir, output = Path(data_dir), Path(output)
    if output.exists() and not overwrite:
        raise FileProblem(output, "already exists", "pass --overwrite to replace it, or choose another file name")
    if (data_dir / "dataset.json").is_file():
        pairs, meta = _pairs_from_msd(data_dir)
    else:
        pairs, meta = _pairs_from_folders(data_dir), {}
    by_id = {case_id(image): (image, label) for image, label in pairs}
    train_ids, val_ids = split_cases(list(by_id), val_fraction, seed)
    base = output.resolve().parent

    def entry(cid: str) -> dict[str, str]:
        image, label = by_id[cid]
        return {"image": _relative(image, base), "label": _relative(label, base)}

    content = {
        "name": meta.get("name", data_dir.name),
        "description": meta.get("description", ""),
        "labels": _declared_labels(labels, meta, [label for _, label in pairs]),
        "modality": meta.get("modality", {}),
        "split": {
            "rule": "seeded shuffle (numpy default_rng) of the sorted case ids; the last "
            "val_fraction of the shuffled list is validation; one case per subject",
            "seed": seed,
            "val_fraction": val_fraction,
        },
        "training": [entry(c) for c in train_ids],
        "validation": [entry(c) for c in val_ids],
    }
    try:
        manifest_from_json(content, output, base)
    except ManifestError as err:
        raise ManifestError(
            output,
            err.problems,
            "nothing was written: fix the data, or give every label's name (--labels background,...)",
        ) from err
    from medseg.io.files import atomic_path

    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(content, indent=1) + "\n")
    return content


def _declared_labels(names: Sequence[str] | None, meta: dict[str, Any], label_files: list[Path]) -> dict[str, str]:
    """MSD-style ``{"0": "background", ...}``: from ``names``, the dataset.json, or the files."""
    if names is not None:
        names = list(names)
        if not names:
            raise ConfigError("labels: give at least one name (background first)")
        for i, name in enumerate(names):
            check_text(name, f"label name {i}", MAX_LABEL_NAME)
        if len(set(names)) != len(names):
            raise ConfigError(f"labels: names must be unique, got {names}")
        return {str(i): name for i, name in enumerate(names)}
    if meta.get("labels"):
        return meta["labels"]
    found: set[float] = set()
    for path in label_files:
        try:
            found.update(float(v) for v in _label_values(path))
        except Exception:  # readers raise many types; the check that follows names the file
            continue
    # Non-integer values are left out: the check then reports them, naming their file.
    values = sorted(int(v) for v in found if v.is_integer())
    logger.info("label values found in %d label files: %s", len(label_files), values)
    return {str(v): "background" if v == 0 else f"label_{v}" for v in values} or {"0": "background"}


def _relative(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), base)


def load_manifest(path: str | Path, data_root: Path | None = None, check: bool = True) -> Manifest:
    """Read a manifest; with ``check``, validate every case and report all problems at once.

    Checks: files exist, no case listed twice, image and label share shape and affine, label
    values lie among the declared labels.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not JSON or not UTF-8
        raise ManifestError(path, [f"cannot be read as JSON ({type(err).__name__}: {err})"]) from err
    base = Path(data_root) if data_root is not None else path.resolve().parent
    return manifest_from_json(raw, path, base, check)


def manifest_from_json(raw: Any, path: Path, base: Path, check: bool = True) -> Manifest:
    """The Manifest ``raw`` (parsed JSON) describes, its paths relative to ``base``; ``path``
    is where it is (or will be) stored. ManifestError lists every problem at once."""
    if not isinstance(raw, dict):
        raise ManifestError(path, [f"must hold a JSON object, got {type(raw).__name__}"])
    problems: list[str] = []
    labels = _labels(raw.get("labels"), problems)
    modality = raw.get("modality") or {}
    if not isinstance(modality, dict):
        problems.append(f'\'modality\' must map channels to names ({{"0": "MRI"}}), got {modality!r:.80}')
        modality = {}
    splits: dict[str, tuple[Case, ...]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        cases = []
        for i, item in enumerate(raw.get(split, [])):
            if isinstance(item, str):  # MSD "test" lists plain paths
                item = {"image": item}
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                problems.append(f'{split}[{i}]: needs an "image" path, got {item!r:.80}')
                continue
            if not isinstance(item.get("label") or "", str):
                problems.append(f'{split}[{i}]: "label" must be a path, got {item["label"]!r:.80}')
                continue
            image = _resolve(base, item["image"])
            label = _resolve(base, item["label"]) if item.get("label") else None
            cid = case_id(image)
            if cid in seen:
                problems.append(f"case {cid}: listed twice ({seen[cid]} and {split}[{i}])")
            seen[cid] = f"{split}[{i}]"
            cases.append(Case(cid, image, label, item.get("series_uid") or None))
        splits[split] = tuple(cases)
    if check:
        for split, cases in splits.items():
            for case in cases:
                problems += _check_case(case, split, labels)
    if problems:
        raise ManifestError(path, problems)
    return Manifest(
        path=path,
        labels=labels,
        modality={str(k): str(v) for k, v in modality.items()},
        splits=splits,
        name=str(raw.get("name", "")),
    )


def _labels(raw: Any, problems: list[str]) -> dict[int, str]:
    """``{value: name}`` from the MSD-style mapping; what is wrong with it goes to ``problems``."""
    if not isinstance(raw, dict) or not raw:
        problems.append('no \'labels\' mapping (MSD style: {"0": "background", ...})')
        return {}
    labels = {}
    for key, name in raw.items():
        try:
            labels[int(key)] = str(name)
            # The name becomes a model's label name: refused here rather than after training.
            check_text(name, f"labels: name of {key}", MAX_LABEL_NAME)
        except ValueError:
            problems.append(f'labels: key {key!r} is not a label value (an integer such as "1")')
        except ConfigError as err:
            problems.append(str(err))
    return labels


def _resolve(base: Path, relative: str) -> Path:
    """``base / relative`` with ".." collapsed (as MONAI resolves datalist paths)."""
    import os

    return Path(os.path.normpath(base / relative))


def _check_case(case: Case, split: str, labels: dict[int, str]) -> list[str]:
    problems = []
    missing = [p for p in (case.image, case.label) if p is not None and not p.exists()]
    for p in missing:
        problems.append(f"case {case.id} ({split}): file {p} is missing")
    if missing or case.label is None:
        if case.label is None and split != "test":
            problems.append(f"case {case.id} ({split}): has no label")
        return problems
    try:
        image, label = _grid(case.image, case.series_uid), _grid(case.label)
        values = _label_values(case.label)
    except Exception as err:  # readers raise many types for broken files
        return [f"case {case.id} ({split}): cannot be read ({type(err).__name__}: {err})"]
    if image.shape != label.shape:
        problems.append(f"case {case.id} ({split}): image shape {image.shape} != label {label.shape}")
    elif image.mismatch(label, atol=1e-3):
        problems.append(f"case {case.id} ({split}): image and label grids differ ({image.mismatch(label, atol=1e-3)})")
    unexpected = [v for v in values.tolist() if v not in labels or v != int(v)]
    if unexpected:
        problems.append(
            f"case {case.id} ({split}): label values {unexpected} are not among the declared labels {sorted(labels)}"
        )
    return problems


def _label_values(path: Path) -> np.ndarray:
    """The distinct values in the label map at ``path`` (sorted)."""
    if _is_nifti(path):
        import nibabel as nib

        return np.unique(np.asarray(nib.load(str(path)).dataobj))
    from medseg.io import read_scan

    return np.unique(read_scan(path).array[0])


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _grid(path: Path, series_uid: str | None = None) -> Geometry:
    """The grid of the scan at ``path``: from the header for NIfTI, else through the reader
    (DICOM series, NRRD, MHA), as ``medseg.io.read_scan`` places it."""
    if _is_nifti(path) and series_uid is None:
        import nibabel as nib

        img = nib.load(str(path))
        return Geometry.from_affine_ras(img.affine, img.shape[:3])
    from medseg.io import read_scan

    return read_scan(path, series_uid).geometry
