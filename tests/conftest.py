import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import SHARED_DATA

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


@pytest.fixture(autouse=True, scope="session")
def _engine_cache(tmp_path_factory):
    """Engine conversions go to a folder of this test session, never to the user's cache."""
    import os

    folder = tmp_path_factory.mktemp("medseg-cache")
    before = os.environ.get("MEDSEG_CACHE_DIR")
    os.environ["MEDSEG_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("MEDSEG_CACHE_DIR", None)
    else:
        os.environ["MEDSEG_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: real scans are referenced, never copied into the repo."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-scan test: {SHARED_DATA} is absent (it sits beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained ArticleUNet model folder (base 4) made with the library."""
    from medseg.model import init_model
    from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

    folder = tmp_path_factory.mktemp("model")
    spec = ModelSpec(
        labels=labels_from_names(["background", "anterior", "posterior"]),
        network=NetworkSpec(out_channels=3, base_channels=4),
        preset="mr",
        slice_axis="sagittal",
        window=(64, 64),
    )
    init_model(folder, spec)
    return folder
