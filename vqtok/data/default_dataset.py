"""The bundled real-photo dataset: ImageNet folder layout, built offline from photographs in a wheel.

scikit-image ships a handful of public-domain / freely licensed photographs inside its wheel
(`skimage/data/*.png|jpg`: the astronaut Eileen Collins, Chelsea the cat, coffee, a rocket launch,
motorcycle stereo pair, Hubble deep field, ...). They are read straight from the installed package
directory (skimage is never imported, nothing is downloaded) and written as
`OUT/train/<class>/<class>_NNNN.{JPEG,png}`: 8 classes x 4 images, the real photos plus deterministic
crops and flips of them, every image at least 256 px on its short side so the ADM crops of
`vqtok encode` run for real (some need upscaling to 281, retina and hubble exercise BOX halving).
Grayscale photos stay grayscale files, so RGB conversion is exercised too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from PIL import Image, ImageOps

from vqtok.errors import UserError
from vqtok.weights import atomic_dir, refuse_foreign_dir

# class name -> photos (file names inside skimage/data), in the order they are used.
CLASSES: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "cat": ("chelsea.png",),
    "coffee": ("coffee.png",),
    "microscopy": ("ihc.png", "retina.jpg"),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
    "rocket": ("rocket.jpg",),
    "space": ("hubble_deep_field.jpg", "moon.png"),
    "texture": ("brick.png", "grass.png", "gravel.png"),
}
IMAGES_PER_CLASS = 4
MIN_SIDE = 256
VARIANT_SIDE = 272

# Deterministic variants: (name, crop box as fractions (left, top, right, bottom), mirror).
VARIANTS = (
    ("original", (0.0, 0.0, 1.0, 1.0), False),
    ("center85_flip", (0.075, 0.075, 0.925, 0.925), True),
    ("topleft75", (0.0, 0.0, 0.75, 0.75), False),
    ("bottomright70_flip", (0.3, 0.3, 1.0, 1.0), True),
)


def skimage_data_dir() -> Path:
    """The `skimage/data` folder of the installed wheel, found without importing skimage."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo dataset is built from photos that scikit-image ships; install them with: pip install 'vqtok[data]'")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [n for names in CLASSES.values() for n in names if not (data_dir / n).is_file()]
    if missing:
        raise UserError(f"the installed scikit-image lacks {missing[0]} in {data_dir}; install scikit-image>=0.22 with pip install 'vqtok[data]'")
    return data_dir


def _variant(img: Image.Image, box: tuple[float, float, float, float], mirror: bool) -> Image.Image:
    w, h = img.size
    img = img.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
    if mirror:
        img = ImageOps.mirror(img)
    short = min(img.size)
    # Variants are stored small (short side VARIANT_SIDE) to keep the set light; anything under 256 px
    # is scaled up, so every file is a real-size photo for the encode pipeline.
    target = VARIANT_SIDE if box != (0.0, 0.0, 1.0, 1.0) else max(short, MIN_SIDE)
    if short != target:
        scale = target / short
        img = img.resize((max(target, round(img.size[0] * scale)), max(target, round(img.size[1] * scale))), Image.BICUBIC)
    return img


def _plan() -> list[tuple[str, int, str, tuple[str, tuple, bool]]]:
    """(class, index, photo, variant) for every output image, in a fixed order."""
    plan = []
    for cls, photos in CLASSES.items():
        for i in range(IMAGES_PER_CLASS):
            # Each photo first appears as itself, then the variants cycle over the photos.
            plan.append((cls, i, photos[i % len(photos)], VARIANTS[i // len(photos) if i < len(photos) else i % len(VARIANTS)]))
    return plan


def build_default_dataset(out: str | Path, overwrite: bool = False) -> Path:
    """Write the dataset to `out` (atomically) and return `out`; `out/train` is the ImageNet-style split."""
    out = Path(out)
    data_dir = skimage_data_dir()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to rebuild it")
    refuse_foreign_dir(out, ("sources.json",), "vqtok demo dataset", "--overwrite")
    sources = []
    with atomic_dir(out, overwrite=True) as tmp:
        for cls, i, photo, (vname, box, mirror) in _plan():
            src = data_dir / photo
            with Image.open(src) as im:
                im.load()
                img = _variant(im.convert("L" if im.mode == "L" else "RGB"), box, mirror)
            folder = tmp / "train" / cls
            folder.mkdir(parents=True, exist_ok=True)
            # Mostly JPEG (small); the last image of each class is PNG so both decoders run.
            if i != IMAGES_PER_CLASS - 1:
                name = f"{cls}_{i:04d}.JPEG"
                img.save(folder / name, format="JPEG", quality=92)
            else:
                name = f"{cls}_{i:04d}.png"
                img.save(folder / name, format="PNG")
            sources.append({
                "file": f"train/{cls}/{name}",
                "source": f"skimage/data/{photo}",
                "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                "variant": vname,
                "size": list(img.size),
                "mode": img.mode,
            })
        (tmp / "sources.json").write_text(json.dumps({"classes": sorted(CLASSES), "images": sources}, indent=2) + "\n")
    return out
