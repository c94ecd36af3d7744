"""Fixtures and helpers shared by the test modules (helpers are imported with `from conftest import ...`)."""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


# ------------------------------------------------------------------------------------------ pictures

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "brick.png", "retina.jpg")


def smooth_photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth colour fields with some texture: realistic enough for a tokenizer, cheap to make."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], -1) * 0.4 + 0.5
    return Image.fromarray((np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1) * 255).astype(np.uint8))


def make_photos(folder: Path, side: int = 32) -> Path:
    """8 real photographs (scikit-image's bundled ones), center-cropped and resized to side x side."""
    from vqtok.data.default_dataset import skimage_data_dir

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        with Image.open(skimage_data_dir() / name) as im:
            im = im.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im.crop((left, top, left + s, top + s)).resize((side, side), Image.BICUBIC).save(folder / f"{Path(name).stem}.png")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of `make_photos` pictures, made once per test module."""
    return make_photos(tmp_path_factory.mktemp("photos"))


# ------------------------------------------------------------------------------------------ processes


@contextlib.contextmanager
def process_group(cmd: list[str], env: dict[str, str]):
    """Run `cmd` in a session of its own (a signal to the group reaches its DataLoader workers too), with
    stdout and stderr piped; whatever is still running when the block ends is killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def signal_group(proc: subprocess.Popen, sig: int, timeout: float = 120) -> tuple[str, str]:
    """Send `sig` to the process group of `proc` and return its (stdout, stderr) once it exits."""
    os.killpg(proc.pid, sig)
    return proc.communicate(timeout=timeout)
