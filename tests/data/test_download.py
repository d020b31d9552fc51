"""The dataset download path, tested against local files (no network at test time)."""

import tarfile

import pytest

from medseg.data.download import DownloadError, fetch_task04, md5sum


@pytest.fixture
def archive(tmp_path):
    src = tmp_path / "src" / "Task04_Hippocampus"
    (src / "imagesTr").mkdir(parents=True)
    (src / "dataset.json").write_text('{"name": "Hippocampus"}')
    path = tmp_path / "Task04_Hippocampus.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname="Task04_Hippocampus")
    return path


def test_fetch_from_local_url_with_checksum(archive, tmp_path):
    folder = fetch_task04(tmp_path / "cache", url=archive.as_uri(), md5=md5sum(archive))
    assert (folder / "dataset.json").read_text() == '{"name": "Hippocampus"}'
    # Second call uses the cache (the URL is no longer needed).
    assert fetch_task04(tmp_path / "cache", url="file:///nonexistent", md5="0") == folder


def test_checksum_mismatch_is_refused(archive, tmp_path):
    with pytest.raises(DownloadError, match="checksum"):
        fetch_task04(tmp_path / "cache", url=archive.as_uri(), md5="0" * 32)
    assert not list((tmp_path / "cache").glob("*.tar*"))


def test_no_network_gives_instructions(tmp_path):
    with pytest.raises(DownloadError, match=r"put it at .*Task04_Hippocampus\.tar"):
        fetch_task04(tmp_path / "cache", url="http://127.0.0.1:9/Task04_Hippocampus.tar", timeout=2)
