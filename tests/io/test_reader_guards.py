"""Readers refuse, before allocating, what a header cannot deliver; they refuse sheared
grids and bad spacing naming the file; and they say what they found (RGB, complex, an
unreadable file, a missing data file)."""

import gzip
import os
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import make_geometry, phantom, write_dicom_series, write_itk, write_nifti

import medseg.io.readers
from medseg.errors import ScanError
from medseg.io import read_scan
from medseg.io.discover import discover, read_source

GEOMETRY = make_geometry((6, 5, 4))


def header_only(shape, dtype=np.float32) -> bytes:
    """A NIfTI-1 header (and the 4 extension bytes) declaring ``shape`` with no voxels after it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    return header.binaryblock + bytes(4)


def peak_mib(read) -> float:
    """Peak Python/numpy allocation (MiB) while ``read()`` runs (it is expected to raise)."""
    tracemalloc.start()
    try:
        with pytest.raises(ScanError) as err:
            read()
        return tracemalloc.get_traced_memory()[1] / 2**20, err.value  # (MiB, the ScanError)
    finally:
        tracemalloc.stop()


# --- size guard -----------------------------------------------------------------------------


def test_tiny_gzip_declaring_gigabytes_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(header_only((800, 800, 800))))
    assert path.stat().st_size < 200
    peak, err = peak_mib(lambda: read_scan(path))
    assert peak < 20, f"{peak:.0f} MiB allocated before refusing"
    assert "bomb.nii.gz: declares 2,048,000,352 bytes of data but its compressed stream holds only 352" in str(err)


def test_uncompressed_nifti_shorter_than_declared_is_refused(tmp_path):
    path = tmp_path / "short.nii"
    path.write_bytes(header_only((800, 800, 800)))
    peak, err = peak_mib(lambda: read_scan(path))
    assert peak < 20 and "declares 2,048,000,352 bytes of data but it holds only 352" in str(err)


def test_voxel_count_over_the_limit_is_refused_naming_size_and_limit(tmp_path):
    path = tmp_path / "zeros.nii.gz"
    # A gzip of zeros: 1 MiB on disk would inflate to 4 GiB.
    path.write_bytes(gzip.compress(header_only((1024, 1024, 1024)) + bytes(1 << 22)))
    peak, err = peak_mib(lambda: read_scan(path))
    assert peak < 40
    assert "1024 x 1024 x 1024 = 1,073,741,824 voxels, more than the limit of 536,870,912" in str(err)
    assert "MAX_VOXELS" in str(err) and err.path == path


def test_limit_is_a_parameter_and_a_module_constant(tmp_path, monkeypatch):
    write_nifti(tmp_path / "a.nii.gz", phantom(GEOMETRY.shape), GEOMETRY)
    (scan,) = discover(tmp_path).scans
    with pytest.raises(ScanError, match="6 x 5 x 4 = 120 voxels, more than the limit of 100"):
        read_source(scan, max_voxels=100)
    monkeypatch.setattr(medseg.io.readers, "MAX_VOXELS", 100)
    with pytest.raises(ScanError, match="more than the limit of 100"):
        read_source(scan)
    assert read_source(scan, max_voxels=120).geometry.shape == GEOMETRY.shape


def test_dicom_series_over_the_limit_is_refused(tmp_path):
    write_dicom_series(tmp_path / "s", np.round(phantom(GEOMETRY.shape)), GEOMETRY)
    (scan,) = discover(tmp_path).scans
    with pytest.raises(ScanError, match=r"s: declares 6 x 5 x 4 = 120 voxels, more than the limit of 119"):
        read_source(scan, max_voxels=119)


def test_metaimage_declaring_more_than_it_holds_is_refused(tmp_path):
    path = tmp_path / "big.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 800 800 800\nElementType = MET_FLOAT\n"
        "ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n"
    )
    peak, err = peak_mib(lambda: read_scan(path))
    assert peak < 20 and "declares 2,048,000,000 bytes of data but it holds only" in str(err)


def test_multi_member_gzip_still_reads(tmp_path):
    """Block-gzip writers (bgzip) concatenate members: the trailer then tells nothing."""
    plain = write_nifti(tmp_path / "a.nii", phantom(GEOMETRY.shape), GEOMETRY).read_bytes()
    path = tmp_path / "blocks.nii.gz"
    path.write_bytes(gzip.compress(plain[:500]) + gzip.compress(plain[500:]))
    np.testing.assert_array_equal(read_scan(path).array[0], phantom(GEOMETRY.shape))


def _corrupt_gzip(plain: bytes, how: str) -> bytes:
    """A gzip stream of ``plain`` damaged as ``how`` says; Python's gzip refuses each."""
    if how == "crc":  # one byte of the trailer's CRC flipped
        data = bytearray(gzip.compress(plain))
        data[-8] ^= 0xFF
    elif how == "payload":  # one voxel byte flipped in stored (uncompressed) blocks, CRC stale
        data = bytearray(gzip.compress(plain, compresslevel=0))
        data[len(data) - 300] ^= 0x40
    elif how == "length":  # the trailer's length field off by one
        data = bytearray(gzip.compress(plain))
        data[-4] ^= 0x01
    else:  # bytes after the stream that are no gzip member
        data = bytearray(gzip.compress(plain) + b"not gzip")
    return bytes(data)


@pytest.mark.parametrize("how", ["crc", "payload", "length", "trailing"])
@pytest.mark.parametrize("integers", [False, True])
def test_a_corrupt_gzip_stream_is_refused_not_segmented(tmp_path, how, integers):
    """nibabel reads only the bytes the voxels need, and gzip checks a stream at its end:
    read short of it, a flipped bit passed unnoticed. The reader reads to the end."""
    # Larger than gzip's read-ahead (a small file is read to its end, and checked, anyway).
    geometry = make_geometry((60, 50, 40))
    data = (phantom(geometry.shape) * 10).astype(np.int16)
    plain = write_nifti(tmp_path / "a.nii", data, geometry).read_bytes()
    path = tmp_path / f"{how}.nii.gz"
    path.write_bytes(_corrupt_gzip(plain, how))
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(path.read_bytes())
    with pytest.raises(ScanError, match=rf"{how}\.nii\.gz: cannot be read as NIfTI .*re-copy it"):
        medseg.io.readers.read_file(path, integers=integers)


def test_the_whole_stream_is_checked_without_nibabels_open_file(tmp_path):
    plain = write_nifti(tmp_path / "a.nii", phantom(GEOMETRY.shape), GEOMETRY).read_bytes()
    (tmp_path / "bad.nii.gz").write_bytes(_corrupt_gzip(plain, "crc"))
    (tmp_path / "good.nii.gz").write_bytes(gzip.compress(plain))

    class Proxy:  # what another nibabel might leave: no open file
        file_like = str(tmp_path / "bad.nii.gz")

    with pytest.raises(gzip.BadGzipFile):
        medseg.io.readers._read_gzip_to_end(Proxy())
    Proxy.file_like = str(tmp_path / "good.nii.gz")
    medseg.io.readers._read_gzip_to_end(Proxy())


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
@pytest.mark.parametrize("damage", ["none", "flipped", "cut"])
def test_a_corrupt_compressed_metaimage_is_refused_not_segmented(tmp_path, suffix, damage):
    """SimpleITK reads a damaged compressed MetaImage with a message on stderr and wrong
    voxels; the reader checks the zlib stream first and refuses it naming the file."""
    import SimpleITK as sitk

    data = (phantom((40, 50, 30)) * 10).astype(np.int16)
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(data.T)), str(path), useCompression=True)
    stream = path if suffix == ".mha" else tmp_path / "scan.zraw"
    raw = bytearray(stream.read_bytes())
    if damage == "flipped":
        raw[len(raw) - len(raw) // 4] ^= 0x40
    elif damage == "cut":
        raw = raw[: len(raw) - len(raw) // 3]
    stream.write_bytes(bytes(raw))
    if damage == "none":
        np.testing.assert_array_equal(medseg.io.readers.read_file(path).array[0], data)
        return
    with pytest.raises(ScanError, match=rf"scan\{suffix}: its compressed voxel data .*re-copy or re-export"):
        medseg.io.readers.read_file(path)


# --- sheared grids and bad spacing -----------------------------------------------------------


def test_sheared_nifti_is_refused(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[0, 1] = 0.3  # the j axis leans towards i
    img = nib.Nifti1Image(phantom(GEOMETRY.shape), affine)
    img.set_sform(affine, code=1)
    nib.save(img, str(tmp_path / "shear.nii.gz"))
    with pytest.raises(ScanError, match=r"shear\.nii\.gz: has sheared/skewed voxel axes: axes i and j meet at 73\.3"):
        read_scan(tmp_path / "shear.nii.gz")


def test_sheared_nrrd_is_refused(tmp_path):
    np.zeros(6 * 5 * 4, np.float32).tofile(tmp_path / "shear.raw")
    (tmp_path / "shear.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 6 5 4\n"
        "space directions: (1,0,0) (0.5,1,0) (0,0,1)\nencoding: raw\nendian: little\n"
        "space origin: (0,0,0)\ndata file: shear.raw\n\n"
    )
    with pytest.raises(ScanError, match=r"sheared/skewed voxel axes.*resample it to an orthogonal grid first"):
        read_scan(tmp_path / "shear.nhdr")


def with_sform_row(path: Path, row: str, values) -> Path:
    """A copy of the NIfTI at ``path`` whose sform ``row`` ("srow_x"...) holds ``values``
    (nibabel will not build such an image from an affine)."""
    img = nib.load(str(path))
    header = img.header.copy()
    header[row] = values
    header["qform_code"] = 0  # the sform alone places the voxels
    out = path.with_name("edited_" + path.name)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), str(out))
    return out


def test_nifti_with_zero_voxel_size_is_a_scan_error(tmp_path):
    path = write_nifti(tmp_path / "flat.nii.gz", phantom(GEOMETRY.shape), make_geometry(GEOMETRY.shape, (1, 1, 2)))
    path = with_sform_row(path, "srow_y", [0, 0, 0, 0])
    path = with_sform_row(path, "srow_x", [-1, 0, 0, 0])
    with pytest.raises(ScanError, match=r"flat\.nii\.gz: declares a voxel spacing of \(1\.0, 0\.0, 2\.0\) mm"):
        read_scan(path)


def test_metaimage_with_zero_spacing_is_a_scan_error(tmp_path):
    write_itk(tmp_path / "zero.mhd", phantom(GEOMETRY.shape), GEOMETRY)
    text = (tmp_path / "zero.mhd").read_text()
    spacing = next(line for line in text.splitlines() if line.startswith("ElementSpacing"))
    (tmp_path / "zero.mhd").write_text(text.replace(spacing, "ElementSpacing = 0 1 1"))
    with pytest.raises(ScanError, match=r"zero\.mhd: declares a voxel spacing of \(0\.0, 1\.0, 1\.0\) mm"):
        read_scan(tmp_path / "zero.mhd")


def test_non_finite_affine_is_a_scan_error(tmp_path):
    path = with_sform_row(write_nifti(tmp_path / "nan.nii", phantom(GEOMETRY.shape), GEOMETRY), "srow_x", [np.nan] * 4)
    with pytest.raises(ScanError, match=r"edited_nan\.nii: its voxel-to-world transform holds non-finite values"):
        read_scan(path)


# --- saying what was found ------------------------------------------------------------------


def test_rgb_nifti_says_rgb(tmp_path):
    rgb = np.zeros(GEOMETRY.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "colour.nii.gz"))
    with pytest.raises(ScanError, match=r"colour\.nii\.gz: is an RGB \(3 components per voxel\) image") as err:
        read_scan(tmp_path / "colour.nii.gz")
    assert "truncated" not in str(err.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])  # MetaImage has no complex type
def test_complex_voxels_become_magnitude_with_a_note(tmp_path, suffix):
    data = (phantom(GEOMETRY.shape) * (0.6 + 0.8j)).astype(np.complex64)
    path = tmp_path / f"complex{suffix}"
    (write_nifti if "nii" in suffix else write_itk)(path, data, GEOMETRY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's ComplexWarning used to leak to stderr
        volume = read_scan(path)
    np.testing.assert_allclose(volume.array[0], np.abs(data), rtol=1e-6)
    assert volume.notes == ("complex-valued voxels (complex64): their magnitude was used",)


def test_unreadable_file_gives_the_system_reason(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "locked.nii.gz", phantom(GEOMETRY.shape), GEOMETRY)
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):
        if self.name == "locked.nii.gz":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)  # root may read anything: simulate
    with pytest.raises(ScanError, match=r"locked\.nii\.gz: cannot be opened \(Permission denied\)") as err:
        read_scan(path)
    assert "truncated" not in str(err.value) and "may read it" in err.value.hint


def test_unreadable_dicom_file_is_listed_with_the_system_reason(tmp_path, monkeypatch):
    (tmp_path / "IM0001").write_bytes(b"x" * 200)
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):
        if self.name == "IM0001":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    (skipped,) = discover(tmp_path).skipped
    assert skipped.reason.startswith("cannot be read (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read a file without permissions")
def test_file_without_permissions(tmp_path):
    path = write_nifti(tmp_path / "locked.nii.gz", phantom(GEOMETRY.shape), GEOMETRY)
    path.chmod(0)
    with pytest.raises(ScanError, match="cannot be opened"):
        read_scan(path)


def test_metaimage_without_its_raw_names_the_missing_file(tmp_path):
    write_itk(tmp_path / "scan.mhd", phantom(GEOMETRY.shape), GEOMETRY)
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(ScanError, match=r"scan\.mhd: names the data file scan\.raw, which is missing") as err:
        read_scan(tmp_path / "scan.mhd")
    assert "put scan.raw beside scan.mhd" in err.value.hint


@pytest.mark.parametrize(("pixdim", "qform_code"), [((0.0, 1.0, 1.0), 0), ((-1.0, 1.0, 1.0), 1)])
def test_zero_or_negative_pixdim_without_sform_is_refused(tmp_path, pixdim, qform_code):
    import nibabel as nib

    from medseg.errors import ScanError
    from medseg.io import read_scan

    path = tmp_path / "bad.nii"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.float32), np.eye(4)), str(path))
    data = bytearray(path.read_bytes())
    data[80:92] = np.asarray(pixdim, "<f4").tobytes()  # pixdim[1:4] as stored
    data[252:256] = np.asarray([qform_code, 0], "<i2").tobytes()  # qform_code, sform_code (none)
    path.write_bytes(bytes(data))
    with pytest.raises(ScanError, match=r"bad.nii: has voxel sizes .* zero, negative"):
        read_scan(path)
