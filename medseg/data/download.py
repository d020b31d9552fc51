"""Fetch the public Medical Segmentation Decathlon Task04 (hippocampus) archive into a cache.

Used only where ``../shared/data`` is absent (a user's fresh clone): the archive is checked
against its MD5 before it is unpacked, and a missing network gives a message saying what
to download by hand and where to put it.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from medseg.errors import MedsegError
from medseg.io.files import file_digest

logger = logging.getLogger(__name__)

# The archive MONAI's DecathlonDataset downloads (same URL and MD5).
TASK04_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar"
TASK04_MD5 = "9d24dba78a72977dbd1d2e110310f31b"
TASK04_FOLDER = "Task04_Hippocampus"


class DownloadError(MedsegError):
    """The dataset could not be fetched or failed its checksum."""


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


def fetch_task04(cache_dir: Path, url: str = TASK04_URL, md5: str = TASK04_MD5, timeout: float = 30) -> Path:
    """The unpacked ``Task04_Hippocampus`` folder in ``cache_dir``, downloading it if needed."""
    folder = cache_dir / TASK04_FOLDER
    if (folder / "dataset.json").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / f"{TASK04_FOLDER}.tar"
    if not archive.is_file() or md5sum(archive) != md5:
        partial = archive.with_suffix(".tar.part")
        logger.info("downloading %s to %s", url, archive)
        try:
            with (
                urllib.request.urlopen(url, timeout=timeout) as response,
                partial.open("wb") as out,
            ):
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            partial.unlink(missing_ok=True)
            raise DownloadError(
                f"cannot download {url} ({err}); without network, download it elsewhere and put it "
                f"at {archive}, or point the demo at a local copy of the data"
            ) from err
        got = md5sum(partial)
        if got != md5:
            partial.unlink(missing_ok=True)
            raise DownloadError(f"{url}: checksum {got} != expected {md5}; the download is corrupt, retry")
        partial.replace(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(cache_dir, filter="data")  # "data" refuses absolute paths and links out
    if not (folder / "dataset.json").is_file():
        raise DownloadError(f"{archive}: does not contain {TASK04_FOLDER}/dataset.json")
    return folder
