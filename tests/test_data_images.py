"""Listing (ImageFolder order, keys, labels files, image shards) and robust decoding of odd files."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from vqtok.data.images import (
    ImageDecodeError,
    decode_image,
    list_images,
    load_record,
    make_keys,
)
from vqtok.errors import UserError


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _photo(w=40, h=30, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_imagefolder_labels_follow_sorted_synsets_like_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "imagenet"
    for wnid, names in {"n02123045": ["b.JPEG", "a.JPEG"], "n01440764": ["n01440764_2.JPEG", "n01440764_10.JPEG"],
                        "n15075141": ["z.png"]}.items():
        (root / "train" / wnid).mkdir(parents=True)
        for i, name in enumerate(names):
            (root / "train" / wnid / name).write_bytes(_jpeg_bytes(_photo(seed=i)))
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image, not listed")
    listing = list_images(root, split="train")
    assert listing.layout == "imagefolder"
    assert listing.classes == ["n01440764", "n02123045", "n15075141"]
    tv = ImageFolder(str(root / "train"))
    assert tv.classes == listing.classes
    assert [(r.path, r.label) for r in listing.records] == [(p, lab) for p, lab in tv.samples]
    # Class folders given directly give the same listing.
    direct = list_images(root / "train", split="train")
    assert [(r.key, r.label) for r in direct.records] == [(r.key, r.label) for r in listing.records]
    assert [r.key for r in listing.records][:2] == ["n01440764_10", "n01440764_2"]
    assert all("." not in r.key for r in listing.records)


def test_keys_are_unique_and_dot_free_when_stems_collide():
    keys = make_keys(["cat/001.jpg", "dog/001.jpg", "dog/x.y.png"])
    assert keys == ["cat_001", "dog_001", "dog_x_y"]
    keys = make_keys(["a.b.jpg", "a_b.png", "c.jpg"])  # collide after sanitising
    assert len(set(keys)) == 3 and all("." not in k for k in keys)


def test_flat_folder_unlabelled_and_with_labels_file(tmp_path):
    for name in ("img2.png", "img1.jpg"):
        (tmp_path / name).write_bytes(_png_bytes(_photo()))
    listing = list_images(tmp_path)
    assert listing.layout == "flat" and [r.label for r in listing.records] == [-1, -1]
    assert [r.key for r in listing.records] == ["img1", "img2"]
    labels = tmp_path.parent / "labels.txt"
    labels.write_text("img1.jpg dog\nimg2.png,cat\n")
    listing = list_images(tmp_path, labels_file=labels)
    assert listing.classes == ["cat", "dog"] and [r.label for r in listing.records] == [1, 0]
    labels.write_text("img1.jpg 3\n")
    with pytest.raises(UserError, match="no label for img2.png"):
        list_images(tmp_path, labels_file=labels)


def test_webdataset_image_shards_are_indexed_for_random_access(tmp_path):
    shard = tmp_path / "imagenet-train-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for i, (key, ext) in enumerate([("00000001", "jpg"), ("00000002", "png")]):
            img = _photo(seed=i)
            data = _jpeg_bytes(img) if ext == "jpg" else _png_bytes(img)
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(7 + i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    listing = list_images(tmp_path)
    assert listing.layout == "wds"
    assert [(r.key, r.label) for r in listing.records] == [("00000001", 7), ("00000002", 8)]
    png = load_record(listing.records[1])
    assert np.array_equal(np.asarray(png), np.asarray(_photo(seed=1)))


def test_missing_and_empty_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(UserError, match="found no images"):
        list_images(tmp_path)


# ------------------------------------------------------------------------------------ decoding


def test_odd_but_valid_files_decode_to_rgb():
    rgb = _photo(seed=3)
    cmyk = decode_image(_jpeg_bytes(rgb.convert("CMYK"), quality=95))
    gray = decode_image(_jpeg_bytes(rgb.convert("L")))
    palette = decode_image(_png_bytes(rgb.convert("P")))
    rgba = decode_image(_png_bytes(rgb.convert("RGBA")))
    for img in (cmyk, gray, palette, rgba):
        assert img.mode == "RGB" and img.size == (40, 30)
    assert np.abs(np.asarray(cmyk, dtype=int) - np.asarray(rgb, dtype=int)).mean() < 12
    g = np.asarray(gray)
    assert np.array_equal(g[..., 0], g[..., 1])
    assert np.array_equal(np.asarray(palette), np.asarray(rgb.convert("P").convert("RGB")))
    # A PNG with a .JPEG name: PIL sniffs the header, the extension never matters.
    assert np.array_equal(np.asarray(decode_image(_png_bytes(rgb))), np.asarray(rgb))


def test_16bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode.startswith("I")
    out = np.asarray(decode_image(_png_bytes(img16)))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: b"", "empty file"),
        (lambda: b"hello, this is a text file\n" * 10, "not an image"),
        (lambda: _jpeg_bytes(_photo(200, 200))[:600], "truncated or corrupt"),
        (lambda: _png_bytes(_photo(200, 200))[:300], "truncated or corrupt"),
    ],
    ids=["zero-byte", "non-image", "truncated-jpeg", "truncated-png"],
)
def test_undecodable_files_raise_with_a_reason(make, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(make())
    assert reason in info.value.reason
