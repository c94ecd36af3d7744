import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("VQTOK_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    their models are tiny, and extra threads only add synchronisation cost on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        if os.environ.get("VQTOK_REQUIRE_FIXTURES") == "1":  # .ci/run: no conformance checked is a failure
            pytest.fail(f"conformance fixtures not found at {FIXTURES} (set VQTOK_FIXTURES); VQTOK_REQUIRE_FIXTURES=1")
        pytest.skip(f"conformance fixtures not found at {FIXTURES} (set VQTOK_FIXTURES)")
    return FIXTURES
