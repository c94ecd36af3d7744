"""The figures `make demo` prints beyond the commands' own output: the held-out tiles and class consistency."""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqtok.data.crops import crop_views

REPO = Path(__file__).resolve().parent.parent


def _demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(root: Path) -> list[tuple[Path, int]]:
    out = []
    for label, name in enumerate(("a", "b", "c")):
        d = root / "train" / name
        d.mkdir(parents=True)
        for i in range(2):
            rng = np.random.default_rng(10 * label + i)
            arr = (rng.random((80, 90, 3)) * 80 + 60 * label).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{name}_{i}.png")
            out.append((d / f"{name}_{i}.png", label))
    return out


def test_class_consistency_counts_nearest_training_view_of_the_same_class(tmp_path):
    demo = _demo()
    images = _dataset(tmp_path / "data")
    # "samples" that are training views themselves: every nearest neighbour is of its own class
    views = [crop_views(Image.open(p).convert("RGB"), 64, ten=True)[3] for p, _ in images]
    arr = torch.stack(views).permute(0, 2, 3, 1).numpy()
    labels = np.array([lab for _, lab in images])
    np.savez(tmp_path / "right.npz", arr_0=arr, labels=labels)
    score, n = demo.class_consistency(tmp_path / "right.npz", tmp_path / "data")
    assert (score, n) == (1.0, 6)
    np.savez(tmp_path / "wrong.npz", arr_0=arr, labels=(labels + 1) % 3)  # every label wrong
    assert demo.class_consistency(tmp_path / "wrong.npz", tmp_path / "data")[0] == 0.0


def test_held_out_tiles_come_from_photos_outside_the_demo_dataset(tmp_path):
    from vqtok.data.default_dataset import CLASSES

    demo = _demo()
    in_dataset = {n for names in CLASSES.values() for n in names}
    assert not in_dataset & set(demo.HELD_OUT_PHOTOS)
    n = demo.write_held_out(tmp_path / "held")
    files = list((tmp_path / "held").glob("*.png"))
    assert n == len(files) >= 64
    assert all(Image.open(f).size == (64, 64) for f in files[:5])


def test_held_out_set_has_enough_tokens_per_code_for_the_book_the_demo_trains(tmp_path):
    """Held-out usage can only show a full book when every code has many chances to occur: at 6.75 tokens
    per code (two zooms, 1024 codes) the demo measured 92.2% usage, at 19.5 (three zooms) 98.6%."""
    from vqtok.config import load_config
    from vqtok.train.tokenizer_task import TrainTokenizerConfig

    demo = _demo()
    tok = load_config(TrainTokenizerConfig, demo.TOKENIZER_RECIPE, demo.TOKENIZER_OVERRIDES, kind="tokenizer")
    book = tok.model.quantizer.params["codebook_size"]
    assert book == 1024  # the recipe's book, not a demo-sized one
    tokens_per_tile = (tok.model.resolution // 2 ** (len(tok.model.autoencoder.ch_mult) - 1)) ** 2
    assert demo.write_held_out(tmp_path / "held") * tokens_per_tile >= 16 * book


def test_demo_settings_are_valid_overrides_of_their_recipes():
    """A renamed config key or a bad value in the demo's settings fails here, not minutes into `make demo`."""
    from vqtok.config import load_config
    from vqtok.train.ar_task import load_run_config, run_length_source
    from vqtok.train.tokenizer_task import TrainTokenizerConfig

    demo = _demo()
    tok = load_config(TrainTokenizerConfig, demo.TOKENIZER_RECIPE, demo.TOKENIZER_OVERRIDES, kind="tokenizer")
    assert tok.train.steps == 600
    overrides = [*demo.AR_OVERRIDES, f"epochs={demo.AR_EPOCHS}"]  # what `--epochs N` adds
    ar = load_run_config(demo.AR_RECIPE, overrides)
    assert run_length_source({}, overrides) == "command-line epochs"
    assert (ar.model.hidden_size, ar.model.depth, ar.train.batch_size, ar.epochs) == (128, 3, 32, 400.0)
    assert ar.optim.weight_decay == 0.0
    assert float(demo.CFG) > 1.0  # guided: a scale of 1 would be plain conditional sampling
    assert demo.SAMPLE_ARGS == ["--cfg", demo.CFG, "--temperature", demo.TEMPERATURE]
