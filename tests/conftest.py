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
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        if os.environ.get("VQTOK_REQUIRE_FIXTURES") == "1":  # .ci/run: no conformance checked is a failure
            pytest.fail(f"conformance fixtures not found at {FIXTURES} (set VQTOK_FIXTURES); VQTOK_REQUIRE_FIXTURES=1")
        pytest.skip(f"conformance fixtures not found at {FIXTURES} (set VQTOK_FIXTURES)")
    return FIXTURES
