"""Defaults that survive partial configs, steps vs epochs precedence, and `--dry-run` plans (vqtok/train/plan.py)."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.config import RECIPES_DIR, load_config, to_dict
from vqtok.errors import ConfigError
from vqtok.train.ar_task import TrainARConfig, load_run_config, run_length_source
from vqtok.train.plan import memory_estimate, saved_activation_bytes

runner = CliRunner()
IMAGENET_TRAIN = 1_281_167


def write_imagenet_tokens(root: Path, num_samples: int = IMAGENET_TRAIN, preset: str = "maskgit-vqgan-f16",
                          vocab: int = 1024, scales: list[list[int]] | None = None,
                          digest: str = "ab" * 32) -> tuple[Path, Path]:
    """A manifest as `vqtok encode --ten-crop` writes for ImageNet with a tokenizer (default: the MaskGIT VQGAN,
    one 16x16 grid), and that tokenizer's tokenizer.json + config.yaml. No shard and no weights exist: a dry run
    must need neither."""
    from vqtok.tokenizer.config import tokenizer_config_to_dict
    from vqtok.tokenizer.presets import PRESETS

    scales = scales or [[16, 16]]
    per_view = sum(h * w for h, w in scales)
    tok = root / "ckpt" / preset
    tok.mkdir(parents=True)
    identity = {"preset": preset, "vocab_size": vocab, "scales": scales, "tokens_per_image": per_view,
                "resolution": 256, "downsample": 16, "index_dtype": "uint16", "hash": digest}
    (tok / "tokenizer.json").write_text(json.dumps(identity))
    (tok / "config.yaml").write_text(yaml.safe_dump(tokenizer_config_to_dict(PRESETS[preset]())))
    tokens = root / "tokens"
    tokens.mkdir()
    manifest = {"format": "wds", "version": 1, "dtype": "uint16",
                "tokenizer": {"preset": preset, "hash": digest, "vocab_size": vocab, "scales": scales,
                              "tokens_per_view": per_view},
                "views": [f"crop{i}" for i in range(10)], "classes": [f"n{i:08d}" for i in range(1000)],
                "num_samples": num_samples, "num_skipped": 0,
                "shards": [{"name": f"tokens-{k:06d}.tar", "count": 10_000} for k in range(129)]}
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    return tokens, tok


@pytest.fixture
def imagenet(tmp_path):
    return write_imagenet_tokens(tmp_path)


# ------------------------------------------------------------------------------------------ defaults


def test_train_ar_without_config_is_exactly_the_rar_b_recipe():
    recipe = to_dict(load_config(TrainARConfig, RECIPES_DIR / "ar" / "rar-b.yaml"))
    assert to_dict(load_run_config(None)) == recipe
    assert to_dict(TrainARConfig()) == recipe  # the dataclass defaults are the recipe, section by section


def test_a_partial_train_section_keeps_the_tasks_defaults(tmp_path):
    from vqtok.train.tokenizer_task import load_run_config as load_tokenizer_config

    custom = tmp_path / "custom.yaml"
    custom.write_text("train: {batch_size: 64}\noptim: {lr: 1.0e-4}\n")
    cfg = load_run_config(custom)
    assert cfg.train.batch_size == 64 and cfg.optim.lr == 1e-4
    assert cfg.train.ema is False  # RAR keeps no EMA: a fresh EngineConfig would have turned it on
    assert (cfg.train.seed, cfg.train.ckpt_every, cfg.optim.schedule.end_lr, cfg.optim.betas) == (42, 5000, 1e-5, (0.9, 0.96))
    tok = load_tokenizer_config({"train": {"steps": 5}, "loss": {"disc": {"channels": 32}},
                                 "optim": {"generator": {"lr": 2e-4}}})
    assert tok.train.steps == 5 and tok.train.ema is True and tok.train.ckpt_every == 500
    assert (tok.loss.disc.kind, tok.loss.disc.channels, tok.loss.disc.layers) == ("patchgan", 32, 3)
    assert tok.optim.generator.lr == 2e-4 and tok.optim.generator.betas == (0.5, 0.9)


def test_command_line_steps_or_epochs_win_and_both_on_the_command_line_is_an_error(tmp_path):
    cfg = load_run_config("rar-tiny", ["train.steps=4"])  # the recipe says epochs: 120
    assert cfg.epochs is None and cfg.train.steps == 4
    assert run_length_source({"epochs": 120}, ["train.steps=4"]) == "command-line train.steps"
    steps_recipe = tmp_path / "steps.yaml"
    steps_recipe.write_text("epochs: null\ntrain: {steps: 100}\n")
    assert load_run_config(steps_recipe, ["epochs=3"]).epochs == 3
    assert run_length_source(yaml.safe_load(steps_recipe.read_text()), ["epochs=3"]) == "command-line epochs"
    assert run_length_source({"epochs": 400}) == "recipe epochs"
    only_steps = tmp_path / "only-steps.yaml"
    only_steps.write_text("train: {steps: 100}\n")  # no epochs key: the task's default epochs must not win
    cfg = load_run_config(only_steps)
    assert cfg.epochs is None and cfg.train.steps == 100
    with pytest.raises(ConfigError, match="both epochs .* and train.steps are given on the command line"):
        load_run_config("rar-tiny", ["epochs=3", "train.steps=4"])
    both = tmp_path / "both.yaml"
    both.write_text("epochs: 10\ntrain: {steps: 100}\n")
    with pytest.raises(ConfigError, match="sets both epochs and train.steps"):
        load_run_config(both)


def test_step_schedule_drops_by_gamma_at_each_milestone():
    from vqtok.train.optim import OptimizerConfig, ScheduleConfig, learning_rate

    drops = OptimizerConfig(lr=1.0, schedule=ScheduleConfig(kind="step", warmup=2, milestones=[5, 8], gamma=0.1))
    assert [learning_rate(drops, s, 10) for s in (0, 1, 4, 5, 7, 8, 9)] == pytest.approx([0.5, 1, 1, 0.1, 0.1, 0.01, 0.01])


# ------------------------------------------------------------------------------------------ estimates


def test_saved_activation_count_and_memory_formula():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.zeros(3, 4, device="meta")
    # autograd keeps: Linear1's input (3x4; its weight is a parameter, not counted), ReLU's output (3x8),
    # which Linear2 also saves (counted once)
    assert saved_activation_bytes(lambda: model(x), [model], 4) == (12 + 24) * 4
    assert saved_activation_bytes(lambda: model(x), [model], 2) == (12 + 24) * 2
    params = 4 * 8 + 8 + 8 * 2 + 2
    mem = memory_estimate([model], [model], [], 144)["bytes"]
    assert mem == {"weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params, "ema": 4 * params, "frozen": 0,
                   "activations": 144, "total": 20 * params + 144}


# ------------------------------------------------------------------------------------------ dry runs


def test_train_ar_dry_run_prints_and_writes_the_paper_plan(imagenet, tmp_path, monkeypatch):
    tokens, tok = imagenet
    monkeypatch.setenv("WORLD_SIZE", "32")  # torchrun's 4 nodes x 8 GPUs; no process group is started
    run = tmp_path / "runs" / "rar-b"
    # the README / examples/imagenet_rar_b.md command, plus --dry-run
    result = runner.invoke(app, ["train-ar", str(tokens), "--tokenizer", str(tok), "--preset", "rar-b", "--anneal", "200", "300",
                                 "--out", str(run), "--dry-run", "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert "global 2,048 = 32 ranks x 64 per rank" in result.output
    assert "r = 1 until step 125,114, linear to 0 at step 187,671" in result.output
    plan = json.loads((run / "plan.json").read_text())
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["ema"] is False
    assert plan["world_size"] == 32 and plan["global_batch_size"] == 2048 and plan["per_rank_batch_size"] == 64
    assert plan["steps"] == 250_228 and plan["ema"] is False and plan["run_length_from"] == "recipe epochs"
    assert plan["parameters"]["total"] == 260_923_648
    mem = plan["memory"]["bytes"]
    assert mem["optimizer"] == 8 * 260_923_648 and mem["activations"] > 0 and plan["precision"] == "bf16 autocast"
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")


def test_dry_run_errors_are_one_line_exit_2(imagenet, tmp_path, monkeypatch):
    tokens, tok = imagenet
    common = ["train-ar", str(tokens), "--tokenizer", str(tok), "--out", str(tmp_path / "run"), "--dry-run"]
    monkeypatch.setenv("WORLD_SIZE", "48")
    result = runner.invoke(app, common)
    assert result.exit_code == 2 and "train.batch_size 2048 must be divisible" in result.output
    monkeypatch.setenv("WORLD_SIZE", "8")
    result = runner.invoke(app, [*common, "--epochs", "3", "train.steps=10"])
    assert result.exit_code == 2 and "both epochs" in result.output
    assert not (tmp_path / "run" / "plan.json").exists()
    result = runner.invoke(app, [*common, "train.steps=10"])  # command-line steps win over the recipe's epochs
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["steps"] == 10 and plan["run_length_from"] == "command-line train.steps" and plan["epochs"] is not None


def test_train_tokenizer_dry_run_counts_images_and_plans_both_phases(tmp_path, monkeypatch):
    data = tmp_path / "data" / "train" / "cls"
    data.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(data / f"{i}.png")
    monkeypatch.setenv("WORLD_SIZE", "8")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-tokenizer", str(tmp_path / "data"), "--config", "vqgan-f16", "--out", str(run),
                                 "--dry-run", "--device", "cuda"])
    assert result.exit_code == 0, result.output
    plan = json.loads((run / "plan.json").read_text())
    assert plan["num_images"] == 5 and plan["per_rank_batch_size"] == 16 and plan["steps"] == 400_000
    # LlamaGen VQ-16: 71,883,403 parameters, its PatchGAN 2,765,633 (the official modules built at full size)
    assert sum(plan["parameters"]["modules"]["tokenizer"].values()) == 71_883_403
    assert plan["parameters"]["modules"]["discriminator"] == 2_765_633
    assert plan["disc_start_step"] == 20_000 and plan["ema"] is False
    acts = plan["activations_by_phase"]
    assert acts["generator"] > acts["discriminator"] > 0
    assert not (run / "checkpoints").exists()


def test_grad_checkpointing_shrinks_the_activation_estimate_to_block_inputs_plus_one_block(imagenet):
    from vqtok.data.token_shards import read_manifest
    from vqtok.train.plan import ar_plan

    manifest = read_manifest(imagenet[0])
    plain = ar_plan(load_run_config("rar-b"), manifest, 32, "recipe epochs", "cuda")["memory"]["bytes"]["activations"]
    ckpt = ar_plan(load_run_config("rar-b", ["model.grad_checkpointing=true"]), manifest, 32, "recipe epochs", "cuda")
    saved = ckpt["memory"]["bytes"]["activations"]
    block_inputs = 24 * 2 * 64 * 258 * 768 * 4  # depth x (x, c) x per-rank batch x sequence x width x fp32
    assert block_inputs + plain / 24 < saved < plain / 4


@pytest.mark.parametrize("recipe,preset,vocab,scales,listing,batch,epochs", [
    ("var-d16", "var-msvq-f16", 4096, [[p, p] for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)], "var_d16.json", 768, 200),
    ("llamagen-b", "llamagen-vq-f16", 16384, [[16, 16]], "llamagen_gpt_b_c2i.json", 256, 300),
])
def test_var_and_llamagen_dry_run_plans_are_the_official_configs(tmp_path, monkeypatch, recipe, preset, vocab, scales,
                                                                   listing, batch, epochs):
    """The plan of each family's full recipe on ImageNet tokens: the released model's parameter count (from
    the official key listing of the fixtures), the release's global batch and run length."""
    import math

    fixtures = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
    listing_path = Path(os.environ.get("VQTOK_FIXTURES", fixtures)) / "generators" / "keys" / listing
    if not listing_path.is_file():
        if os.environ.get("VQTOK_REQUIRE_FIXTURES") == "1":
            pytest.fail(f"{listing_path} is missing and VQTOK_REQUIRE_FIXTURES=1 makes that a failure")
        pytest.skip(f"no key listing at {listing_path}")
    official = json.loads(listing_path.read_text())["num_parameters"]
    tokens, tok = write_imagenet_tokens(tmp_path, preset=preset, vocab=vocab, scales=scales, digest="cd" * 32)
    monkeypatch.setenv("WORLD_SIZE", "8")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-ar", str(tokens), "--tokenizer", str(tok), "--config", recipe, "--out", str(run),
                                 "--dry-run", "--device", "cuda"])
    assert result.exit_code == 0, result.output
    plan = json.loads((run / "plan.json").read_text())
    assert plan["parameters"]["total"] == official
    assert plan["global_batch_size"] == batch and plan["per_rank_batch_size"] == batch // 8
    assert plan["steps"] == math.ceil(epochs * IMAGENET_TRAIN / batch) or plan["steps"] == epochs * (IMAGENET_TRAIN // batch)
    assert yaml.safe_load((run / "config.yaml").read_text())["arch"] == recipe.split("-")[0]
