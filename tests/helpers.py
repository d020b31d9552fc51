"""Test helpers: synthetic scans on chosen grids, known-answer models, synthetic DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.io.volume import Geometry
from medseg.model import Model
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class ThresholdNet(nn.Module):
    """Known answer: class 0 up to ``low``, 1 in (low, high], 2 above ``high``.

    Ties score equal and argmax takes the first, so the boundaries are exact.

    Works per pixel, so any padding, batching or window stitching must give exactly the
    thresholded input back.
    """

    def __init__(self, low: float, high: float, sharpness: float = 1000.0) -> None:
        super().__init__()
        self.low, self.high, self.k = low, high, sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1].float()
        one = (x - self.low) * self.k
        return torch.cat([torch.zeros_like(x), one, one + (x - self.high) * self.k], dim=1)


def threshold_labels(array: np.ndarray, low: float, high: float) -> np.ndarray:
    return (array > low).astype(np.uint8) + (array > high).astype(np.uint8)


def threshold_model(
    low: float,
    high: float,
    slice_axis: str = "axial",
    window: tuple[int, int] = (512, 512),
    spacing: tuple[float, float] | None = None,
    values: tuple[int, int, int] = (0, 1, 2),
) -> Model:
    """A Model whose network thresholds raw intensities (preset "none")."""
    labels = labels_from_names(["background", "low", "high"])
    labels = tuple(type(lab)(v, lab.name, lab.color) for lab, v in zip(labels, values))
    spec = ModelSpec(
        labels=labels,
        network=NetworkSpec(out_channels=3, base_channels=4),
        preset="none",
        slice_axis=slice_axis,
        window=window,
        spacing=spacing,
    )
    return Model(spec=spec, network=ThresholdNet(low, high), folder=Path("known-answer"))


def rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """(3, 3) rotation about x, then y, then z."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_geometry(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float] = (0.8, 1.1, 2.5),
    origin: tuple[float, float, float] = (-12.5, 30.25, 7.0),
    direction: np.ndarray | None = None,
) -> Geometry:
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    return Geometry(tuple(shape), tuple(spacing), tuple(origin), tuple(d.ravel()))


def phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(X, Y, Z) float32: an off-centre ellipsoid (~100), a brighter core (~300), noise.

    Asymmetric on purpose so a flipped or transposed output cannot pass for the right one.
    """
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    x, y, z = grid
    body = ((x - 0.2) / 0.6) ** 2 + ((y + 0.1) / 0.5) ** 2 + (z / 0.8) ** 2 < 1
    core = ((x - 0.35) / 0.2) ** 2 + ((y + 0.2) / 0.25) ** 2 + ((z - 0.3) / 0.3) ** 2 < 1
    image = 100.0 * body + 200.0 * core + rng.normal(0, 5, size=shape)
    return image.astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, geometry: Geometry) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(array, geometry.affine_ras())
    img.set_qform(geometry.affine_ras(), code=1)
    img.set_sform(geometry.affine_ras(), code=1)
    nib.save(img, str(path))
    return path


def write_itk(path: Path, array: np.ndarray, geometry: Geometry) -> Path:
    """NRRD, MHA or MHD depending on ``path``'s suffix, via SimpleITK."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    sitk.WriteImage(img, str(path))
    return path


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    geometry: Geometry,
    series_uid: str | None = None,
    description: str = "synthetic",
    intercept: float = -1024.0,
    prefix: str = "img",
) -> list[Path]:
    """One CT file per slice (uncompressed, stored as uint16 with ``intercept``).

    Files are named in reverse order of position so that file-name order is wrong.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid() if series_uid is None else series_uid
    study_uid, frame_uid = generate_uid(), generate_uid()
    d = geometry.direction_matrix
    paths = []
    n = array.shape[2]
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{n - k:04d}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            frame_uid,
        )
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber = "CT", description, 3
        ds.PatientName, ds.PatientID = "Test^Synthetic", "SYN001"
        ds.InstanceNumber = k + 1
        position = np.asarray(geometry.origin) + d[:, 2] * geometry.spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{geometry.spacing[1]:.6f}", f"{geometry.spacing[0]:.6f}"]
        ds.SliceThickness = f"{geometry.spacing[2] * 1.5:.3f}"  # thickness != step on purpose
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", "1"
        stored = np.round(array[:, :, k].T - intercept).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_msd_dataset(root: Path, n_cases: int = 6, shape=(20, 24, 16), seed: int = 0) -> Path:
    """A tiny Medical Segmentation Decathlon folder: bright blobs labelled 1 (left half) and
    2 (right half) on noise, NIfTI with 1 mm identity affines, plus dataset.json."""
    import json

    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    geometry = make_geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0]))
    training = []
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for i in range(n_cases):
        c = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        r = rng.uniform(4, 6)
        blob = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r**2
        label = np.where(blob, np.where(y < c[1], 1, 2), 0).astype(np.float32)
        image = (rng.normal(100, 10, shape) + 200 * blob + 80 * (label == 2)).astype(np.float32)
        name = f"case_{i:03d}.nii.gz"
        write_nifti(root / "imagesTr" / name, image, geometry)
        write_nifti(root / "labelsTr" / name, label, geometry)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "Blobs",
        "labels": {"0": "background", "1": "left", "2": "right"},
        "modality": {"0": "MRI"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def segment_one(path, model, out_dir, **options) -> Path:
    """``medseg.segment`` on the one scan at ``path`` (NIfTI output only): its label map."""
    from medseg import segment

    report = segment(path, out_dir, model, formats="nifti", **options)
    (record,) = report.records
    assert record.status in ("ok", "skipped"), f"{record.error} ({record.hint})"
    return Path(record.outputs["nifti"])
