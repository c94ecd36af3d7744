"""`vqtok sample` end to end on a tiny generator + the tiny-vqgan tokenizer, and its library pieces."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vqtok.ar.checkpoint import save_generator
from vqtok.app.sample import class_labels, draw_tokens, rank_chunk, sample_noise, sample_tokens, sampling_config
from vqtok.ar.rar import RAR, RARConfig
from vqtok.ar.sampling import SamplingConfig, sample
from vqtok.cli import app
from vqtok.errors import UserError
from vqtok.tokenizer.tokenizer import build_tokenizer

runner = CliRunner()
NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_generator(seed=0, **kw) -> tuple[RAR, RARConfig]:
    base = dict(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, vocab_size=512, seq_len=64,
                num_classes=NUM_CLASSES, dropout=0.0, attn_dropout=0.0, class_dropout=0.0)
    base.update(kw)
    cfg = RARConfig(**base)
    model = RAR(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero modulation, so classes and guidance change the logits
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    tok = build_tokenizer("tiny-vqgan")
    tok.save(root / "tok")
    identity = tok.identity()
    model, cfg = tiny_generator()
    # the path is recorded relative to the generator directory, as a run directory would hold it
    save_generator(root / "gen", model, cfg, dict(identity, path="../tok"))
    save_generator(root / "gen-nopath", model, cfg, identity)
    small_vocab, small_cfg = tiny_generator(vocab_size=256)
    save_generator(root / "gen-vocab", small_vocab, small_cfg, None)
    odd_grid, odd_cfg = tiny_generator(seq_len=48, grid=[6, 8])
    save_generator(root / "gen-tokens", odd_grid, odd_cfg, None)
    save_generator(root / "gen-hash", model, cfg, dict(identity, hash="0" * 64, path="../tok"))
    save_generator(root / "gen-named", model, cfg, dict(identity, path="../tok"),
                   {"classes": ["cat", "coffee", "dog", "7", "zebra"]})
    return root


def sample_cli(ckpts, out, *args):
    result = runner.invoke(app, ["sample", "--ckpt", str(ckpts / "gen"), "--out", str(out), "--device", "cpu", *args])
    return result


# ------------------------------------------------------------------------------------------- labels


def test_per_class_labels_are_class_balanced_in_official_order():
    labels = class_labels(1000, per_class=50)
    assert labels.shape == (50_000,) and labels.dtype == np.int64
    assert np.array_equal(labels, np.array(list(range(1000)) * 50))
    assert np.array_equal(np.bincount(labels), np.full(1000, 50))


def test_num_labels_come_from_the_seed_and_classes_are_checked():
    a, b = class_labels(10, num_samples=40, seed=3), class_labels(10, num_samples=40, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, class_labels(10, num_samples=40, seed=4))
    assert a.min() >= 0 and a.max() < 10
    with pytest.raises(UserError, match="outside"):
        class_labels(10, classes=[3, 10])
    with pytest.raises(UserError, match="cannot be combined"):
        class_labels(10, classes=[1], per_class=2)
    with pytest.raises(UserError, match="at least 1"):
        class_labels(10, per_class=0)


def test_rank_chunks_cover_the_list_contiguously():
    chunks = [rank_chunk(11, r, 3) for r in range(3)]
    assert chunks[0][0] == 0 and chunks[-1][1] == 11
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


def test_sampling_flags_resolve_like_the_issue_says():
    assert sampling_config(guidance=4.0).guidance_schedule == "constant"
    cfg = sampling_config(guidance=4.0, power=2.0)
    assert (cfg.guidance_schedule, cfg.guidance_power) == ("power-cosine", 2.0)
    paper = sampling_config("rar-l")
    assert (paper.guidance_scale, paper.guidance_power, paper.temperature, paper.guidance_schedule) == (15.5, 2.5, 1.02, "power-cosine")
    assert sampling_config("rar-l", temperature=0.9).temperature == 0.9  # explicit flags win over the preset
    with pytest.raises(UserError, match="schedule"):
        sampling_config(schedule="cosine")


def test_paper_preset_with_cfg_changes_only_the_scale():
    paper = sampling_config("rar-b")
    scaled = sampling_config("rar-b", guidance=8.0)
    assert (scaled.guidance_schedule, scaled.guidance_power, scaled.temperature) == (
        paper.guidance_schedule, paper.guidance_power, paper.temperature) == ("power-cosine", 2.75, 1.0)
    assert scaled.guidance_scale == 8.0 and paper.guidance_scale == 16.0
    assert sampling_config("rar-b", guidance=8.0, power=1.0).guidance_power == 1.0
    assert sampling_config("rar-b", guidance=8.0, schedule="constant").guidance_schedule == "constant"
    assert sampling_config(guidance=8.0).guidance_schedule == "constant"  # without the preset: a constant scale


# ------------------------------------------------------------------------------------------ drawing


def test_inverse_cdf_draw_follows_the_distribution_and_never_picks_masked_tokens():
    logits = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]])).expand(20_000, 4)
    u = torch.from_numpy(np.random.default_rng(0).random(20_000))
    tokens = draw_tokens(logits, SamplingConfig(temperature=1.0), u)
    freq = torch.bincount(tokens, minlength=4).double() / 20_000
    assert freq[1] == 0
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64), atol=0.015)
    # top-k 1 leaves one token whatever the noise; temperature 0 is the argmax
    assert (draw_tokens(logits, SamplingConfig(temperature=1.0, top_k=1), u) == 2).all()
    assert (draw_tokens(logits, SamplingConfig(temperature=0.0), u) == 2).all()
    edge = draw_tokens(logits[:2], SamplingConfig(), torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64))
    assert edge.tolist() == [0, 3]


def test_greedy_sampling_matches_the_rar_sampler_with_cfg():
    model, _ = tiny_generator()
    classes = torch.tensor([0, 3, 4])
    cfg = SamplingConfig(guidance_scale=3.0, guidance_schedule="power-cosine", guidance_power=1.5, temperature=0.0)
    ours = sample_tokens(model, classes, cfg, sample_noise(0, range(3), 64))
    assert torch.equal(ours, sample(model, classes, cfg).tokens)


def test_each_sample_depends_only_on_its_own_noise_not_on_the_batch():
    model, _ = tiny_generator()
    classes = torch.tensor([1, 2, 0, 4])
    cfg = SamplingConfig(guidance_scale=2.0, top_p=0.9)
    whole = sample_tokens(model, classes, cfg, sample_noise(5, range(4), 64))
    halves = torch.cat([sample_tokens(model, classes[:1], cfg, sample_noise(5, range(0, 1), 64)),
                        sample_tokens(model, classes[1:], cfg, sample_noise(5, range(1, 4), 64))])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, sample_tokens(model, classes, cfg, sample_noise(6, range(4), 64)))


# ---------------------------------------------------------------------------------------------- CLI


def test_per_class_npz_is_adm_format_and_class_balanced(ckpts, tmp_path):
    out = tmp_path / "s"
    result = sample_cli(ckpts, out, "--per-class", "2", "--npz", "--png", "--batch-size", "4", "--cfg", "3.0")
    assert result.exit_code == 0, result.output
    with np.load(out / "samples.npz") as data:
        arr, labels = data["arr_0"], data["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (2 * NUM_CLASSES, 64, 64, 3)  # NHWC
    assert labels.tolist() == list(range(NUM_CLASSES)) * 2
    assert np.array_equal(np.load(out / "labels.npy"), labels)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(10)]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "images" / "000007.png")), arr[7])
    assert Image.open(out / "grid.png").size[0] >= 4 * 64
    settings = json.loads((out / "sample.json").read_text())
    assert settings["sampling"]["guidance_scale"] == 3.0 and settings["sampling"]["guidance_schedule"] == "constant"
    assert not list(tmp_path.glob(".*"))  # the work directory is gone


def test_same_seed_same_samples_at_any_batch_size(ckpts, tmp_path):
    def run(name, batch, seed, *extra):
        result = sample_cli(ckpts, tmp_path / name, "--num-samples", "5", "--batch-size", batch, "--seed", seed, *extra)
        assert result.exit_code == 0, result.output
        return np.load(tmp_path / name / ("tokens.npy" if extra == ("--tokens-only",) else "samples.npz"))

    # tokens are exactly the same whatever the batching; another seed gives others
    tokens = run("t5", "5", "1", "--tokens-only")
    assert np.array_equal(tokens, run("t2", "2", "1", "--tokens-only"))
    assert not np.array_equal(tokens, run("t5b", "5", "2", "--tokens-only"))
    # pixels: identical for a rerun; across batch sizes the decoder's batched convolutions round differently,
    # which can move a truncated uint8 value by one in a rare pixel
    a = run("a", "5", "1", "--npz")["arr_0"]
    assert np.array_equal(a, run("a2", "5", "1", "--npz")["arr_0"])
    diff = np.abs(a.astype(int) - run("b", "2", "1", "--npz")["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_tokens_only_writes_token_grids_and_labels(ckpts, tmp_path):
    out = tmp_path / "t"
    result = runner.invoke(app, ["sample", "--ckpt", str(ckpts / "gen-nopath"), "--out", str(out), "--classes", "4,0,4",
                                 "--tokens-only", "--temperature", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output  # no tokenizer needed
    tokens, labels = np.load(out / "tokens.npy"), np.load(out / "labels.npy")
    assert tokens.shape == (3, 8, 8) and tokens.dtype == np.uint16 and labels.tolist() == [4, 0, 4]
    assert np.array_equal(tokens[0], tokens[2])  # greedy: same class, same tokens
    assert sorted(p.name for p in out.iterdir()) == ["labels.npy", "sample.json", "tokens.npy"]


@pytest.mark.parametrize("args, message", [
    (["--classes", "1,5"], "outside this generator's 5 classes"),
    (["--classes", "1", "--per-class", "2"], "cannot be combined"),
    (["--tokens-only", "--npz"], "cannot be combined"),
    (["--classes", "1,x"], "not a class id, and this generator records no class names"),
    (["--cfg-preset", "paper"], "not one of its family's published sizes"),
])
def test_bad_options_fail_cleanly(ckpts, tmp_path, args, message):
    result = sample_cli(ckpts, tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("gen, message", [
    ("gen-vocab", "has 512 codes but the generator samples 256"),
    ("gen-tokens", "makes 64 tokens per image but the generator samples 48"),
    ("gen-hash", "is not the one the generator was trained with"),
    ("gen-nopath", "pass it with --tokenizer"),
    ("missing", "does not exist"),
])
def test_mismatched_or_missing_checkpoints_are_refused(ckpts, tmp_path, gen, message):
    tok = [] if gen in ("gen-nopath", "gen-hash") else ["--tokenizer", str(ckpts / "tok")]
    result = runner.invoke(app, ["sample", "--ckpt", str(ckpts / gen), "--out", str(tmp_path / "o"), "--num-samples", "2", *tok])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list(tmp_path.iterdir())


def test_unwritable_or_occupied_output_is_refused(ckpts, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = sample_cli(ckpts, blocker / "out", "--num-samples", "1")
    assert result.exit_code == 2 and "not a directory" in result.output
    result = sample_cli(ckpts, blocker, "--num-samples", "1")
    assert result.exit_code == 2 and "is a file" in result.output
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    result = sample_cli(ckpts, occupied, "--num-samples", "1")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (occupied / "keep.txt").read_text() == "mine"
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        result = sample_cli(ckpts, locked / "out", "--num-samples", "1")
        assert result.exit_code == 2 and "not writable" in result.output


def test_a_run_that_fails_midway_leaves_nothing_behind(ckpts, tmp_path, monkeypatch):
    import vqtok.app.sample as generate

    calls = []
    real = generate.sample

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(generate, "sample", failing)
    opts = generate.SampleJob(ckpt=ckpts / "gen", labels=generate.LabelRequest(num_samples=4),
                              output=generate.SampleOutput(out=tmp_path / "o", npz=True, png=True), batch_size=2,
                              device="cpu", progress=False)
    with pytest.raises(KeyboardInterrupt):
        generate.run_sampling(opts)
    assert len(calls) == 2 and not list(tmp_path.iterdir())


def test_two_torchrun_ranks_write_the_same_npz_as_one_process(ckpts, tmp_path):
    args = ["--ckpt", str(ckpts / "gen"), "--per-class", "1", "--npz", "--batch-size", "2", "--seed", "9", "--device", "cpu"]
    single = runner.invoke(app, ["sample", *args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vqtok", "sample", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote 5 samples") == 1  # only rank 0 reports
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(one["labels"], two["labels"])
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert json.loads((tmp_path / "two" / "sample.json").read_text())["world_size"] == 2


def test_sample_prints_the_resolved_settings_before_it_starts(ckpts, tmp_path):
    result = sample_cli(ckpts, tmp_path / "o", "--num-samples", "2", "--tokens-only", "--cfg", "3", "--cfg-power", "2",
                        "--top-k", "40", "--top-p", "0.9", "--temperature", "0.8")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    settings = next(i for i, line in enumerate(lines) if line.startswith("sampling settings:"))
    assert settings < next(i for i, line in enumerate(lines) if line.startswith("wrote 2 samples"))
    assert "guidance power-cosine, power 2, scale 3 (step 0: 1" in lines[settings]
    assert "temperature 0.8; top-k 40; top-p 0.9" in lines[settings]
    assert "CUDA graphs off" in result.output and "batch 32" in result.output


def test_classes_accept_the_recorded_class_names(ckpts, tmp_path):
    out = tmp_path / "n"
    result = runner.invoke(app, ["sample", "--ckpt", str(ckpts / "gen-named"), "--out", str(out), "--device", "cpu",
                                 "--classes", "dog, cat,1,7,4", "--tokens-only"])
    assert result.exit_code == 0, result.output
    # a recorded name wins over reading the entry as an id: "7" is class 3's name
    assert np.load(out / "labels.npy").tolist() == [2, 0, 1, 3, 4]
    assert "2 (dog), 0 (cat)" not in result.output and "0 (cat), 1 (coffee)" in result.output
    assert json.loads((out / "sample.json").read_text())["labels"]["classes"] == [2, 0, 1, 3, 4]
    bad = runner.invoke(app, ["sample", "--ckpt", str(ckpts / "gen-named"), "--out", str(tmp_path / "b"),
                              "--device", "cpu", "--classes", "cat,lion", "--tokens-only"])
    assert bad.exit_code == 2 and "'lion' is neither a class id nor one of this generator's 5 class names (cat, coffee" in bad.output
    assert not (tmp_path / "b").exists()


def test_cuda_graphs_on_without_cuda_is_refused(ckpts, tmp_path):
    result = sample_cli(ckpts, tmp_path / "o", "--num-samples", "1", "--cuda-graphs", "on", "--tokens-only")
    assert result.exit_code == 2 and "--cuda-graphs on needs a CUDA device" in result.output
    assert not list(tmp_path.iterdir())


def test_static_decoder_run_with_a_padded_last_batch_writes_the_eager_tokens(ckpts, tmp_path, monkeypatch):
    # what --cuda-graphs does on CUDA, on CPU: one static decoder for --batch-size rows, the last batch padded
    from static_sampling import eager_and_static_tokens
    from vqtok.ar.rar_decoding import StaticDecoder

    args = ["--num-samples", "5", "--batch-size", "2", "--seed", "3", "--tokens-only", "--cfg", "2", "--top-p", "0.9"]
    eager, static, made = eager_and_static_tokens(
        lambda out: sample_cli(ckpts, out, *args),
        lambda model, cfg, batch: StaticDecoder(model, batch, cfg.uses_cfg, torch.arange(model.config.seq_len)),
        monkeypatch, tmp_path)
    assert len(made) == 1 and made[0].batch == 2
    assert np.array_equal(eager, static)
    assert static.shape == (5, 8, 8)
