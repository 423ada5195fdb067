"""Shared fixtures: tiny real data (scikit-learn digits) and tiny backbones, so tests run in seconds."""
from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (`make test` runs 2 workers, one per core) each worker keeps to one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

# Small settings per backbone, used wherever a test needs "a real backbone, but small".
TINY_BACKBONES: dict[str, dict] = {
    "small_resnet": {"widths": [8, 16, 32]},
    "resnet18": {},
    "vit_tiny": {"depth": 2, "embed_dim": 48, "num_heads": 3},
    "small_r3d": {"widths": [8, 16, 32]},
    "small_r2plus1d": {"widths": [8, 16, 32]},
    "video_vit": {"patch_size": 4, "width": 24, "depth": 1, "heads": 2, "frames": 4},
}


@pytest.fixture(scope="session")
def digits():
    from selfsup.data.load import load_digits

    return load_digits()


@pytest.fixture(autouse=True, scope="session")
def _image_cache(tmp_path_factory):
    """Image-folder caches (selfsup.data.cache) go to a temporary folder, never the user's ~/.cache/selfsup;
    subprocesses inherit it."""
    os.environ["SELFSUP_CACHE"] = str(tmp_path_factory.mktemp("selfsup_cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``) or one
    test run: tiny tensors gain nothing from a second thread, and on a busy 2-core machine OpenMP threads that
    wait on each other made tiny steps ~20× slower (measured; Cholesky's internal ``tril`` opens a parallel region
    even for 2×2 matrices, which made a gradcheck take half a minute)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
