"""`vqtok train-ar` on CPU: tiny token shards written with TokenShardWriter for a tiny-vqgan tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.data.token_shards import TokenShardWriter, file_sha256, iter_samples, merge_h5_parts, token_dtype, write_json_atomic
from vqtok.errors import UserError
from vqtok.train.ar_data import EpochViewTokens, open_ar_tokens
from vqtok.ar.presets import get_preset
from vqtok.train.ar_task import ARTrainTask, load_run_config, train_ar, weight_decay_groups
from vqtok.distributed import DistEnv

runner = CliRunner()
# tiny model, tiny batches; CPU fp32 so runs are bit-exact
BASE = ["epochs=null", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=1000", "train.preview_every=1000",
        "train.num_workers=0", "optim.schedule.warmup=0"]


def make_token_dir(out: Path, identity: dict, tokens: np.ndarray, classes: list[int], fmt: str = "wds", shard_size: int = 4) -> Path:
    """Shards + manifest.json as `vqtok encode` writes them, from given tokens (N, views, T)."""
    out.mkdir(parents=True, exist_ok=True)
    n, v, t = tokens.shape
    dtype = token_dtype(identity["vocab_size"])
    counts = []
    for k, start in enumerate(range(0, n, shard_size)):
        writer = TokenShardWriter(out, k, fmt, dtype, v, t)
        for i in range(start, min(n, start + shard_size)):
            writer.write(f"img{i:05d}", tokens[i].astype(dtype), int(classes[i]))
        writer.close()
        counts.append(min(n, start + shard_size) - start)
    if fmt == "h5":
        merge_h5_parts(out, len(counts), dtype, (v, t), n)
        shards = [{"name": "tokens.h5", "count": n}]
    else:
        shards = [{"name": f"tokens-{k:06d}.tar", "count": c} for k, c in enumerate(counts)]
    for shard in shards:  # per-shard checksums, as encode records them
        shard["sha256"] = file_sha256(out / shard["name"])
    tok = {"preset": identity.get("preset"), "hash": identity.get("hash"), "vocab_size": identity["vocab_size"],
           "scales": identity["scales"], "tokens_per_view": t}
    manifest = {"format": fmt, "version": 1, "dtype": dtype.name, "tokenizer": tok, "views": [f"view{i}" for i in range(v)],
                "classes": [f"class{i}" for i in range(max(classes) + 1)], "num_samples": n, "num_skipped": 0, "shards": shards}
    write_json_atomic(out / "manifest.json", manifest)
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from vqtok.tokenizer.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    main = build_tokenizer("tiny-vqgan")
    main.save(root / "main")
    torch.manual_seed(1)
    build_tokenizer("tiny-vqgan").save(root / "other")
    return root / "main", root / "other", main.identity()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tokenizers):
    """12 images x 2 views x 64 tokens in 3 tar shards, 3 classes."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 512, (12, 2, 64))
    return make_token_dir(tmp_path_factory.mktemp("tokens") / "wds", tokenizers[2], data, [i % 3 for i in range(12)])


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_logs_rows_anneals_r_and_exports_a_generator(tmp_path, tokenizers, tokens):
    from vqtok.ar.checkpoint import load_generator

    run = tmp_path / "run"
    overrides = BASE + ["train.steps=8", "anneal.unit=steps", "anneal.start=2", "anneal.end=6", "train.ema=true",
                        "data.preview_classes=[0,2]"]
    result = train_ar(tokens, tokenizers[0], run, config="rar-tiny", overrides=overrides, device="cpu")
    assert result.step == 8 and result.final_dir == run / "final"
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for row in rows:
        assert {"step", "epoch", "lr", "loss", "acc", "r", "throughput"} <= set(row)
        assert np.isfinite(row["loss"]) and 0 <= row["acc"] <= 1
    # the row of step k reports the batch of 0-based step k-1: r = 1 up to the start, linear, 0 from the end on
    assert [r["r"] for r in rows] == pytest.approx([1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
    assert rows[2]["epoch"] == pytest.approx(3 * 4 / 12)  # one epoch = one pass over the 12 source images
    assert (run / "previews" / "step-00000008.png").is_file()
    model, identity = load_generator(run / "final")
    assert identity["tokenizer"]["hash"] == tokenizers[2]["hash"] and identity["tokenizer"]["scales"] == [[8, 8]]
    assert model.config.vocab_size == 512 and model.config.seq_len == 64 and model.config.num_classes == 3
    # EMA is on: the export holds the EMA weights, not the live ones
    state = torch.load(sorted((run / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    exported = load_file(run / "final" / "model.safetensors")
    assert torch.equal(exported["lm_head.weight"], state["ema"]["generator"]["lm_head.weight"])
    assert not torch.equal(exported["lm_head.weight"], state["modules"]["generator"]["lm_head.weight"])


def test_epoch_unit_annealing_and_per_step_orders(tmp_path, tokenizers, tokens):
    cfg = load_run_config("rar-tiny", BASE + ["train.steps=30", "anneal.start=2", "anneal.end=4"])
    task = ARTrainTask(cfg, DistEnv(), tokens, tokenizers[0])
    # 12 images at batch 4: 3 steps per epoch, so r starts falling at step 6 and is 0 from step 12
    assert [task.random_ratio(s) for s in (0, 5, 6, 9, 12, 29)] == pytest.approx([1, 1, 1, 0.5, 0, 0])
    target = torch.arange(64)
    orders, drop, r = task.step_conditions(0)
    assert r == 1 and orders.shape == (4, 64) and drop.shape == (4,)
    assert all(torch.equal(o.sort().values, target) for o in orders)
    assert not any(torch.equal(o, target) for o in orders)
    late, _, _ = task.step_conditions(20)
    assert all(torch.equal(o, target) for o in late)
    # orders are a function of the step alone, and two ranks hold the two halves of the global batch
    assert torch.equal(task.step_conditions(0)[0], orders)
    halves = []
    for rank in (0, 1):
        task.env = DistEnv(rank=rank, world=2)
        halves.append(task.step_conditions(0))
    assert torch.equal(torch.cat([halves[0][0], halves[1][0]]), orders)
    assert torch.equal(torch.cat([halves[0][1], halves[1][1]]), drop)


def test_tar_and_h5_readers_agree_with_the_shards(tmp_path, tokenizers, tokens):
    rng = np.random.default_rng(0)
    h5 = make_token_dir(tmp_path / "h5", tokenizers[2], rng.integers(0, 512, (12, 2, 64)), [i % 3 for i in range(12)], fmt="h5")
    for root in (tokens, h5):
        manifest = json.loads((root / "manifest.json").read_text())
        base = open_ar_tokens(root, manifest)
        reference = list(iter_samples(root))
        assert len(base) == len(reference) == 12
        for i, (_, toks, cls) in enumerate(reference):
            got, got_cls = base[i]
            assert np.array_equal(got, toks) and got_cls == cls
        views = EpochViewTokens(base, 2, seed=0)
        chosen = []
        for epoch in range(8):
            for i in range(3):
                got = views[(epoch, i)][0].numpy()
                match = [v for v in range(2) if np.array_equal(got, reference[i][1][v])]
                assert len(match) == 1 and torch.equal(views[(epoch, i)][0], views[(epoch, i)][0])
                chosen.append(match[0])
        assert set(chosen) == {0, 1}  # a fresh view per (epoch, image), repeatable, both views used


def test_weight_decay_groups_decay_linear_weights_only():
    from vqtok.ar.presets import get_preset
    from vqtok.ar.rar import RAR

    model = RAR(get_preset("rar-tiny"))
    decay, no_decay = weight_decay_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    assert {"lm_head.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
            "adaln_before_head.adaLN_modulation.1.weight"} <= decayed
    for name in ("cls_token", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings", "embeddings.weight",
                 "blocks.0.norm1.weight", "blocks.0.attn.q_norm.weight", "blocks.0.attn.qkv.bias", "lm_head.bias"):
        assert name not in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_overfitting_four_sequences_drives_the_loss_near_zero(tmp_path, tokenizers):
    rng = np.random.default_rng(1)
    data = make_token_dir(tmp_path / "four", tokenizers[2], rng.integers(0, 512, (4, 1, 64)), [0, 1, 2, 3])
    overrides = BASE + ["train.steps=45", "train.log_every=5", "train.ema=false", "model.class_dropout=0.0",
                        "optim.lr=3e-3", "optim.schedule.end_lr=3e-3", "anneal.unit=steps", "anneal.start=0", "anneal.end=0"]
    train_ar(data, tokenizers[0], tmp_path / "run", config="rar-tiny", overrides=overrides, device="cpu")
    rows = _rows(tmp_path / "run")
    assert rows[0]["loss"] > 4.0
    assert rows[-1]["loss"] < 0.1 and rows[-1]["acc"] == 1.0


def test_resume_is_bit_identical(tmp_path, tokenizers, tokens):
    # dropout on, annealing in progress: the resumed run must restore RNGs and the annealing position
    overrides = BASE + ["train.steps=6", "model.dropout=0.1", "model.attn_dropout=0.1", "anneal.unit=steps",
                        "anneal.start=1", "anneal.end=5", "train.ema=true"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_ar(tokens, tokenizers[0], whole, config="rar-tiny", overrides=overrides, device="cpu")
    first = train_ar(tokens, tokenizers[0], split, config="rar-tiny", overrides=overrides, device="cpu", stop_after=3)
    assert first.step == 3 and first.final_dir is None
    with pytest.raises(UserError, match="--resume auto"):
        train_ar(tokens, tokenizers[0], split, config="rar-tiny", overrides=overrides, device="cpu")
    train_ar(tokens, tokenizers[0], split, config="rar-tiny", overrides=overrides, device="cpu", resume=True)
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(split / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "throughput"} for r in rows]  # noqa: E731
    assert strip(_rows(whole)) == strip(_rows(split))


def test_two_process_gloo_run_equals_one_process(tmp_path, tokenizers, tokens):
    # dropout off: each rank draws its own dropout masks, which a single process cannot reproduce
    args = ["train-ar", str(tokens), "--tokenizer", str(tokenizers[0]), "--config", "rar-tiny", "--device", "cpu",
            "--anneal", "1", "3", "--anneal-unit", "steps", *BASE, "train.steps=3", "train.ema=false",
            "model.dropout=0.0", "model.attn_dropout=0.0"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vqtok", *args,
           "--out", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "final" / "model.safetensors"), load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    losses = lambda run: [r["loss"] for r in _rows(run)]  # noqa: E731
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)


def test_shards_from_another_tokenizer_are_refused(tmp_path, tokenizers, tokens):
    result = runner.invoke(app, ["train-ar", str(tokens), "--tokenizer", str(tokenizers[1]), "--preset", "rar-tiny",
                                 "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "made by another tokenizer" in result.output and "hash" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_arguments_are_one_line_errors(tmp_path, tokenizers, tokens):
    common = [str(tokens), "--tokenizer", str(tokenizers[0]), "--out", str(tmp_path / "run"), "--device", "cpu"]
    for extra, message in [
        (["--anneal-unit", "hours"], "--anneal-unit"),
        (["--order", "diagonal"], "unknown scan order"),
        (["--preset", "rar-huge"], "unknown generator preset"),
        (["--anneal", "5", "2"], "start <= end"),
        (["model.vocab_size=1024"], "the shards decide it"),
        (["data.view=7"], "data.view"),
        (["--init", str(tmp_path / "missing.bin")], "does not exist"),
    ]:
        result = runner.invoke(app, ["train-ar", *common, "--config", "rar-tiny", *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)


def test_recipes_hold_the_paper_settings():
    for size in ("b", "l", "xl", "xxl"):
        cfg = load_run_config(f"rar-{size}")
        assert cfg.arch == "rar" and cfg.model == get_preset(f"rar-{size}")  # the preset's size, dropout 0.1 everywhere
        assert cfg.train.batch_size == 2048 and cfg.epochs == 400
        sched = cfg.optim.schedule
        assert (cfg.optim.kind, cfg.optim.lr, cfg.optim.betas) == ("adamw", 4e-4, (0.9, 0.96))
        assert (sched.kind, sched.end_lr, sched.warmup, sched.unit) == ("cosine", 1e-5, 100, "epochs")
        assert (cfg.anneal.start, cfg.anneal.end, cfg.anneal.unit) == (200, 300, "epochs")
        assert cfg.model.class_dropout == 0.1 and cfg.optim.weight_decay == 0.03 and cfg.optim.grad_clip == 1.0


def test_init_loads_a_generator_dir_or_an_official_state_dict(tmp_path, tokenizers, tokens):
    from vqtok.ar.checkpoint import save_generator

    cfg = load_run_config("rar-tiny", BASE + ["train.steps=1"])
    source = ARTrainTask(cfg, DistEnv(), tokens, tokenizers[0]).model
    with torch.no_grad():
        source.lm_head.weight.add_(1.0)  # differs from any fresh initialisation
    save_generator(tmp_path / "gen", source, source.config, tokenizers[2])
    torch.save(source.state_dict(), tmp_path / "rar_tiny.bin")  # the official files are plain state dicts
    for init in (tmp_path / "gen", tmp_path / "rar_tiny.bin"):
        task = ARTrainTask(load_run_config("rar-tiny", BASE + ["train.steps=1"]), DistEnv(), tokens, tokenizers[0], init=init)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in task.model.state_dict().items())
    wider = load_run_config("rar-tiny", BASE + ["train.steps=1", "model.hidden_size=32", "model.intermediate_size=128"])
    with pytest.raises(UserError, match="does not fit this model"):
        ARTrainTask(wider, DistEnv(), tokens, tokenizers[0], init=tmp_path / "gen")
    save_generator(tmp_path / "gen-other", source, source.config, {**tokenizers[2], "hash": "0" * 64})
    with pytest.raises(UserError, match="another tokenizer"):
        ARTrainTask(load_run_config("rar-tiny", BASE), DistEnv(), tokens, tokenizers[0], init=tmp_path / "gen-other")


def test_metrics_rows_hold_r_lr_and_epoch_at_the_logged_step(tmp_path, tokenizers, tokens):
    run = tmp_path / "run"
    overrides = BASE + ["train.steps=8", "train.log_every=4", "anneal.unit=steps", "anneal.start=2", "anneal.end=6",
                        "optim.schedule.warmup=4", "optim.schedule.unit=steps"]
    train_ar(tokens, tokenizers[0], run, config="rar-tiny", overrides=overrides, device="cpu")
    rows = _rows(run)
    assert [r["step"] for r in rows] == [4, 8]
    # row k: the batch of 0-based step k-1. r there is 1 - (3-2)/4 = 0.75 (the window average would be 0.9375)
    assert [r["r"] for r in rows] == pytest.approx([0.75, 0.0])
    assert rows[0]["lr"] == pytest.approx(2e-3 * 4 / 4)  # warm-up (s+1)/4 at s=3: the peak
    assert [r["epoch"] for r in rows] == pytest.approx([4 * 4 / 12, 8 * 4 / 12])


def test_the_typed_model_round_trips_through_config_yaml_and_resume(tmp_path, tokenizers, tokens):
    import yaml

    from vqtok.ar.rar import RARConfig
    from vqtok.config import load_config
    from vqtok.train.ar_task import TrainARConfig

    run = tmp_path / "run"
    overrides = BASE + ["train.steps=2", "model.hidden_size=32", "model.intermediate_size=128"]
    first = train_ar(tokens, tokenizers[0], run, config="rar-tiny", overrides=overrides, device="cpu", stop_after=1)
    assert first.step == 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["arch"] == "rar" and "preset" not in saved["model"]
    assert (saved["model"]["hidden_size"], saved["model"]["vocab_size"], saved["model"]["grid"]) == (32, 512, [8, 8])
    again = load_config(TrainARConfig, run / "config.yaml")
    assert type(again.model) is RARConfig and again.model.num_classes == 3
    # the run's own config.yaml is a recipe that resumes it
    done = train_ar(tokens, tokenizers[0], run, config=run / "config.yaml", device="cpu", resume=True)
    assert done.step == 2 and done.final_dir is not None
    with pytest.raises(UserError, match="differs from this config's model"):
        train_ar(tokens, tokenizers[0], run, config="rar-tiny", overrides=BASE + ["train.steps=3"], device="cpu", resume=True)
    assert json.loads((run / "final" / "generator.json").read_text())["family"] == "rar"


def test_the_task_builds_through_the_family_registry(monkeypatch, tokenizers, tokens):
    import dataclasses

    from vqtok.ar import families

    rar = families.FAMILIES["rar"]
    seen, losses = [], []

    def loss(model, tokens, cond, orders):
        losses.append(orders is not None)
        return rar.train_loss(model, tokens, cond, orders)

    monkeypatch.setitem(families.FAMILIES, "rar", dataclasses.replace(
        rar, train_loss=loss, bind_tokenizer=lambda model, tok: seen.append((type(model).__name__, tok.vocab_size))))
    task = ARTrainTask(load_run_config("rar-tiny", BASE + ["train.steps=1"]), DistEnv(), tokens, tokenizers[0])
    assert seen == [("RAR", 512)]
    batch = next(task.batches(0))
    value, metrics = task.loss("generator", task.split(batch, 1)[0], 0, 0)
    assert losses == [True] and value.ndim == 0 and torch.isfinite(value)
    monkeypatch.setitem(families.FAMILIES, "rar", dataclasses.replace(rar, train_loss=None))
    with pytest.raises(UserError, match="arch rar cannot be trained by train-ar"):
        ARTrainTask(load_run_config("rar-tiny", BASE + ["train.steps=1"]), DistEnv(), tokens, tokenizers[0])
