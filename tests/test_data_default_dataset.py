"""The bundled real-photo dataset: ImageNet layout, real photos >= 256 px, deterministic bytes."""

import hashlib
import importlib.util
import json

import pytest
from PIL import Image

from vqtok.data.default_dataset import CLASSES, IMAGES_PER_CLASS, build_default_dataset
from vqtok.data.images import list_images
from vqtok.errors import UserError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None, reason="needs the photos scikit-image ships: pip install '.[data]'"
)


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_dataset_layout_and_determinism(tmp_path):
    out = build_default_dataset(tmp_path / "photos")
    listing = list_images(out, split="train")
    assert listing.layout == "imagefolder"
    assert listing.classes == sorted(CLASSES)
    assert len(listing.records) == len(CLASSES) * IMAGES_PER_CLASS
    sizes, modes, formats = [], set(), set()
    for r in listing.records:
        with Image.open(r.path) as im:
            sizes.append(min(im.size))
            modes.add(im.mode)
            formats.add(im.format)
    assert min(sizes) >= 256 and max(sizes) >= 2 * 281  # some images take the BOX-halving path
    assert modes == {"RGB", "L"} and formats == {"JPEG", "PNG"}
    sources = json.loads((out / "sources.json").read_text())
    assert len({s["source"] for s in sources["images"]}) >= 12  # distinct real photographs
    again = build_default_dataset(tmp_path / "again")
    assert _digest(out) == _digest(again)
    with pytest.raises(UserError, match="already exists"):
        build_default_dataset(out)
