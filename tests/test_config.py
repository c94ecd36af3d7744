import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.config import from_dict, given_keys, load_config, parse_override, save_config, to_dict
from vqtok.errors import ConfigError, UserError


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Model:
    kind: Literal["vq", "fsq"] = "vq"
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    dim: int | None = None


@dataclass
class Run:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    ema: bool = False


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  kind: fsq\n  levels: [7, 5]\nsteps: 3\n")
    cfg = load_config(Run, path, ["optim.lr=3e-4", "model.dim=8", "ema=true", "optim.betas=[0.5, 0.9]"])
    assert cfg.model.kind == "fsq" and cfg.model.levels == [7, 5] and cfg.model.dim == 8
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == (0.5, 0.9)
    assert cfg.steps == 3 and cfg.ema is True


def test_roundtrip(tmp_path):
    cfg = load_config(Run, None, ["model.levels=[8,8]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = from_dict(Run, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.bogus=1"], "unknown config key 'model.bogus'; valid keys under 'model': kind, levels, dim"),
        (["nope=1"], "unknown config key 'nope'; valid keys: model, optim, steps, ema"),
        (["steps=abc"], "'steps' must be an integer, got 'abc'"),
        (["ema=3"], "'ema' must be true or false"),
        (["model.kind=lfq"], "'model.kind' must be one of vq, fsq"),
        (["model.levels=5"], "'model.levels' must be a list"),
        (["optim.betas=[1,2,3]"], "'optim.betas' must have 2 items"),
        (["steps"], "is not of the form key.sub=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(Run, None, overrides)
    assert message in str(exc.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'; valid keys under 'optim': lr, betas"):
        load_config(Run, path)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, bad)


def test_parse_override_values():
    assert parse_override("a.b=1e-4") == (["a", "b"], "1e-4")  # YAML 1.1: float conversion happens by type
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)


def test_cli_info_runs():
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "device" in result.output


# ------------------------------------------------------------------ the trainers' configs (one optimizer shape,
# typed model sections, the generator family registry, the loss options)

runner = CliRunner()


def _ar(overrides=(), config="rar-tiny"):
    from vqtok.train.ar_task import load_run_config

    return load_run_config(config, list(overrides))


def _tok(overrides=(), config="tiny-vqgan", **kw):
    from vqtok.train.tokenizer_task import load_run_config

    return load_run_config(config, list(overrides), **kw)


def test_both_trainers_use_one_optimizer_shape():
    from vqtok.train.optim import OptimizerConfig, ScheduleConfig

    ar, tok = _ar(), _tok()
    for optim in (ar.optim, tok.optim.generator, tok.optim.discriminator):
        assert type(optim) is OptimizerConfig and type(optim.schedule) is ScheduleConfig
    assert (ar.optim.kind, ar.optim.schedule.unit, ar.optim.schedule.end_lr) == ("adamw", "epochs", 1e-4)
    assert (tok.optim.generator.schedule.unit, tok.optim.generator.schedule.end_lr) == ("steps", 1.5e-4)


@pytest.mark.parametrize("which, overrides, message", [
    ("ar", ["optim.end_lr=1e-5"], "config key 'optim.end_lr' was replaced by 'optim.schedule.end_lr'"),
    ("ar", ["optim.warmup_epochs=5"], "config key 'optim.warmup_epochs' was replaced by 'optim.schedule.warmup' (with schedule.unit: epochs)"),
    ("ar", ["optim.warmup_steps=0"], "config key 'optim.warmup_steps' was replaced by 'optim.schedule.warmup' (with schedule.unit: steps)"),
    ("tok", ["optim.generator.schedule.min_lr_ratio=0.1"],
     "config key 'optim.generator.schedule.min_lr_ratio' was replaced by 'optim.generator.schedule.end_lr', an absolute"),
    ("tok", ["optim.discriminator.schedule.warmup_steps=5"],
     "config key 'optim.discriminator.schedule.warmup_steps' was replaced by 'optim.discriminator.schedule.warmup'"),
])
def test_old_optimizer_keys_name_their_replacement(which, overrides, message):
    with pytest.raises(ConfigError) as exc:
        (_ar if which == "ar" else _tok)(overrides)
    assert message in str(exc.value)


def test_old_optimizer_keys_in_a_user_yaml_are_one_line_cli_errors(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model: {preset: rar-tiny}\noptim:\n  lr: 2.0e-3\n  end_lr: 1.0e-4\n  warmup_epochs: 5\n")
    result = runner.invoke(app, ["train-ar", str(tmp_path), "--tokenizer", str(tmp_path), "--config", str(old),
                                 "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: config key 'optim.end_lr' was replaced by 'optim.schedule.end_lr'"
    assert not (tmp_path / "run").exists()
    tok = tmp_path / "tok.yaml"
    tok.write_text("model: {preset: tiny-vqgan}\noptim:\n  generator: {lr: 1.0e-3, schedule: {kind: cosine, min_lr_ratio: 0.1}}\n")
    result = runner.invoke(app, ["train-tokenizer", str(tmp_path), "--config", str(tok), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "'optim.generator.schedule.min_lr_ratio' was replaced by 'optim.generator.schedule.end_lr'" in result.output


@pytest.mark.parametrize("which, overrides, message", [
    ("ar", ["model.hidden=64"], "unknown config key 'model.hidden'; valid keys under 'model': hidden_size, depth"),
    ("ar", ["model.depth=two"], "'model.depth' must be an integer, got 'two'"),
    ("ar", ["model.grad_checkpointing=3"], "'model.grad_checkpointing' must be true or false"),
    ("ar", ["model.preset=rar-huge"], "unknown generator preset 'rar-huge' (model.preset) for arch rar; choose one of rar-b"),
    ("ar", ["arch=diffusion"], "unknown generator architecture 'diffusion'; choose one of rar"),
    ("tok", ["model.autoencoder.chanels=4"], "unknown config key 'model.autoencoder.chanels'; valid keys under 'model.autoencoder'"),
    ("tok", ["model.resolution=big"], "'model.resolution' must be an integer, got 'big'"),
    ("tok", ["model.quantizer.params.codebook_sise=8"], "unknown config key 'model.quantizer.params.codebook_sise'"),
    ("tok", ["model.quantizer.kind=pq"], "'model.quantizer.kind' must be one of vq, fsq, lfq, msvq"),
])
def test_model_sections_are_typed_and_errors_name_the_key(which, overrides, message):
    with pytest.raises(UserError) as exc:
        (_ar if which == "ar" else _tok)(overrides)
    assert message in str(exc.value)


def test_model_section_types_in_a_yaml_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: rar-tiny\n  num_heads: [4]\n")
    with pytest.raises(ConfigError, match="'model.num_heads' must be an integer, got \\[4\\]"):
        _ar(config=bad)
    bad.write_text("model:\n  preset: tiny-vqgan\n  autoencoder: {ch_mult: 2}\n")
    with pytest.raises(ConfigError, match="'model.autoencoder.ch_mult' must be a list"):
        _tok(config=bad)


def test_the_ar_model_section_is_the_family_config_from_its_preset():
    from vqtok.ar.presets import get_preset
    from vqtok.ar.rar import RARConfig

    cfg = _ar(["model.hidden_size=32", "model.intermediate_size=128"])
    assert type(cfg.model) is RARConfig
    assert dataclasses.replace(cfg.model, hidden_size=64, intermediate_size=256) == dataclasses.replace(
        get_preset("rar-tiny"), dropout=0.0, attn_dropout=0.0)
    assert given_keys(cfg.model) == {"dropout", "attn_dropout", "class_dropout", "hidden_size", "intermediate_size"}
    assert _ar(["model.preset=rar-l"]).model.hidden_size == 1024  # the preset changes, the recipe's dropout stays
    assert _ar(["model.preset=rar-l"]).model.dropout == 0.0


def test_tokenizer_model_section_is_a_tokenizer_config():
    from vqtok.tokenizer.config import TokenizerConfig

    cfg = _tok(["model.quantizer.params.codebook_size=64"])
    assert type(cfg.model) is TokenizerConfig and cfg.model.preset == "tiny-vqgan"
    assert cfg.model.quantizer.params["codebook_size"] == 64 and cfg.model.quantizer.params["kmeans_init"] is True
    fsq = _tok(["model.quantizer.kind=fsq", "model.quantizer.params={levels: [5, 5]}"])
    assert fsq.model.quantizer.params == {"levels": [5, 5]}  # another kind: the preset's VQ parameters do not apply


def test_arch_flag_unknown_value_is_one_line(tmp_path):
    result = runner.invoke(app, ["train-ar", str(tmp_path), "--tokenizer", str(tmp_path), "--arch", "dit",
                                 "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: unknown generator architecture 'dit'; choose one of rar")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- schedules


def test_schedule_units_kinds_and_ranges():
    from vqtok.train.optim import OptimizerConfig, ScheduleConfig, in_steps, learning_rate

    epochs = OptimizerConfig(lr=1.0, schedule=ScheduleConfig(kind="linear", warmup=1.5, unit="epochs", end_lr=0.2,
                                                            milestones=[2.0]))
    steps = in_steps(epochs, steps_per_epoch=4.0)
    assert (steps.schedule.unit, steps.schedule.warmup, steps.schedule.milestones) == ("steps", 6, [8])
    assert epochs.schedule.unit == "epochs"  # a copy: the config itself is untouched
    assert learning_rate(steps, 5, 106) == pytest.approx(1.0)
    assert learning_rate(steps, 56, 106) == pytest.approx(1.0 - 0.8 * 0.5)  # linear: halfway from lr to end_lr
    assert learning_rate(steps, 106, 106) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="in_steps"):
        learning_rate(epochs, 0, 10)
    with pytest.raises(ConfigError, match="'optim.schedule' counts whole steps .* has 2.5"):
        _ar(["optim.schedule.unit=steps", "optim.schedule.warmup=2.5"])
    with pytest.raises(ConfigError, match="'optim.schedule.end_lr' 0.01 is above 'optim.lr' 0.002"):
        _ar(["optim.schedule.end_lr=1e-2"])
    with pytest.raises(ConfigError, match="'optim.kind' must be one of adam, adamw"):
        _ar(["optim.kind=sgd"])


def test_epoch_warmup_is_resolved_with_the_run_length():
    from vqtok.train.ar_task import ar_optimizer_config, resolve_schedule

    cfg = _ar(["train.batch_size=16"])
    schedule = resolve_schedule(cfg, num_samples=320)  # 20 steps per epoch
    assert schedule.warmup_steps == 5 * 20 and ar_optimizer_config(cfg, schedule).schedule.warmup == 100
    assert cfg.optim.schedule.warmup == 5  # the resolved copy counts steps; config.yaml keeps the recipe's epochs


# ----------------------------------------------------------------------------- generator families


def _manifest(scales, vocab=512, classes=4):
    return {"tokenizer": {"vocab_size": vocab, "scales": scales, "tokens_per_view": sum(h * w for h, w in scales)},
            "classes": [f"c{i}" for i in range(classes)], "num_samples": 8, "views": ["v0"]}


def test_raster_families_refuse_multiscale_tokens_and_shards_decide_the_data_fields():
    from vqtok.train.ar_task import resolve_model

    with pytest.raises(UserError) as exc:
        resolve_model(_ar().model, _manifest([[1, 1], [2, 2], [4, 4]]), "rar")
    assert "arch rar generates one token grid, but the token shards hold multi-scale tokens (3 scales)" in str(exc.value)
    assert "\n" not in str(exc.value)
    mcfg = resolve_model(_ar().model, _manifest([[4, 8]]), "rar")
    assert (mcfg.vocab_size, mcfg.seq_len, mcfg.grid, mcfg.num_classes) == (512, 32, [4, 8], 4)
    kept = resolve_model(_ar(["model.num_classes=1000"]).model, _manifest([[4, 8]]), "rar")
    assert kept.num_classes == 1000  # set explicitly (e.g. to fine-tune a 1000-class checkpoint): kept
    with pytest.raises(UserError, match="model.seq_len is 64 but the token shards have 32"):
        resolve_model(_ar(["model.seq_len=64"]).model, _manifest([[4, 8]]), "rar")
    assert resolve_model(mcfg, _manifest([[4, 8]]), "rar") == mcfg  # a resolved config (config.yaml) resolves to itself


@dataclasses.dataclass
class _NextScaleConfig:
    width: int = 8
    vocab_size: int = 16
    scales: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    num_classes: int = 10
    class_dropout: float = 0.1


def test_a_registered_family_types_the_model_section(monkeypatch, tmp_path):
    from vqtok.ar import families
    from vqtok.train.ar_task import resolve_model

    fake = families.Family(
        "nextscale", _NextScaleConfig, torch.nn.Module, presets={"ns-tiny": lambda: _NextScaleConfig(width=4)},
        token_fields=lambda vocab, scales, n: {"vocab_size": vocab, "scales": [h for h, _ in scales]},
        multiscale_tokens=True)
    monkeypatch.setitem(families.FAMILIES, "nextscale", fake)
    recipe = tmp_path / "ns.yaml"
    recipe.write_text("arch: nextscale\nmodel: {preset: ns-tiny}\nepochs: 2\n")
    cfg = _ar(["model.class_dropout=0.2"], config=recipe)
    assert cfg.model == _NextScaleConfig(width=4, class_dropout=0.2)
    with pytest.raises(ConfigError, match="unknown config key 'model.hidden_size'; valid keys under 'model': width, vocab_size"):
        _ar(["model.hidden_size=8"], config=recipe)
    with pytest.raises(ConfigError, match="unknown generator preset 'rar-tiny' \\(model.preset\\) for arch nextscale; choose one of ns-tiny"):
        _ar(["arch=nextscale"])  # the rar recipe's preset is not one of this family's
    resolved = resolve_model(cfg.model, _manifest([[1, 1], [2, 2], [3, 3]], vocab=64), "nextscale")
    assert (resolved.vocab_size, resolved.scales, resolved.num_classes) == (64, [1, 2, 3], 4)
    with pytest.raises(UserError, match="arch nextscale generates scale by scale and needs multi-scale tokens"):
        resolve_model(cfg.model, _manifest([[4, 4]]), "nextscale")
    with pytest.raises(UserError, match="--arch nextscale needs --config"):
        _ar(["arch=nextscale"], config=None)


# ------------------------------------------------------------------- run-dir round trips (dry runs)


def _tokenizer_dir(root: Path) -> tuple[Path, Path]:
    """A tiny-vqgan tokenizer.json + config.yaml and a single-scale manifest; a dry run reads no weights or shards."""
    from vqtok.tokenizer.config import tokenizer_config_to_dict
    from vqtok.tokenizer.presets import PRESETS

    tok = root / "tok"
    tok.mkdir()
    identity = {"preset": "tiny-vqgan", "vocab_size": 512, "scales": [[4, 4]], "tokens_per_image": 16, "hash": "cd" * 32}
    (tok / "tokenizer.json").write_text(json.dumps(identity))
    (tok / "config.yaml").write_text(yaml.safe_dump(tokenizer_config_to_dict(PRESETS["tiny-vqgan"]())))
    tokens = root / "tokens"
    tokens.mkdir()
    manifest = {"format": "wds", "version": 1, "dtype": "uint16",
                "tokenizer": {"preset": "tiny-vqgan", "hash": "cd" * 32, "vocab_size": 512, "scales": [[4, 4]],
                              "tokens_per_view": 16},
                "views": ["v0"], "classes": ["a", "b"], "num_samples": 64, "num_skipped": 0,
                "shards": [{"name": "tokens-000000.tar", "count": 64}]}
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    return tokens, tok


def test_typed_sections_round_trip_through_the_run_dirs_config_yaml(tmp_path):
    from vqtok.ar.rar import RARConfig
    from vqtok.train.ar_task import TrainARConfig

    tokens, tok = _tokenizer_dir(tmp_path)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-ar", str(tokens), "--tokenizer", str(tok), "--config", "rar-tiny", "--arch", "rar",
                                 "--out", str(run), "--dry-run", "model.hidden_size=32", "model.intermediate_size=128"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["arch"] == "rar" and saved["model"]["hidden_size"] == 32 and saved["model"]["seq_len"] == 16
    assert saved["optim"]["schedule"] == {"kind": "cosine", "warmup": 5.0, "unit": "epochs", "end_lr": 1e-4,
                                          "milestones": [], "gamma": 0.1}
    again = load_config(TrainARConfig, run / "config.yaml")
    assert type(again.model) is RARConfig and to_dict(again) == saved
    plan = json.loads((run / "plan.json").read_text())
    assert plan["arch"] == "rar" and plan["warmup_steps"] == 5 * 64 // 16
    # the saved config is a recipe: a second dry run from it plans the same run (it records both epochs and the
    # steps they came to, so the command line picks which decides)
    rerun = runner.invoke(app, ["train-ar", str(tokens), "--tokenizer", str(tok), "--config", str(run / "config.yaml"),
                                "--out", str(tmp_path / "again"), "--dry-run", f"train.steps={saved['train']['steps']}"])
    assert rerun.exit_code == 0, rerun.output
    assert {**yaml.safe_load((tmp_path / "again" / "config.yaml").read_text()), "epochs": saved["epochs"]} == saved


def test_tokenizer_config_yaml_round_trips_and_records_lpips_weights(tmp_path):
    from PIL import Image

    from vqtok.train.tokenizer_task import TrainTokenizerConfig

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(images / f"{i}.png")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-tokenizer", str(images), "--config", "tiny-vqgan", "--out", str(run), "--dry-run",
                                 "--lpips-weights", "1234", "model.quantizer.params.codebook_size=128"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["lpips_weights"] == "1234"  # a path, kept a string (not parsed as YAML)
    assert saved["model"]["quantizer"]["params"]["codebook_size"] == 128
    assert saved["model"]["quantizer"]["params"]["ema_decay"] == 0.9  # parameters written out in full
    again = load_config(TrainTokenizerConfig, run / "config.yaml")
    assert to_dict(again) == saved


def test_the_loss_is_built_from_the_one_loss_config():
    from vqtok.losses.tokenizer_loss import TokenizerLoss

    cfg = _tok(["loss.perceptual_weight=1.0"], lpips_weights="random-for-tests")
    assert cfg.loss.lpips_weights == "random-for-tests"
    loss = TokenizerLoss(cfg.loss, 64)
    assert loss.uses_random_lpips and loss.cfg is cfg.loss


def test_a_tokenizer_schedule_in_epochs_reaches_the_engine_in_steps(tmp_path):
    from PIL import Image

    from vqtok.distributed import DistEnv
    from vqtok.train.plan import tokenizer_plan
    from vqtok.train.tokenizer_task import TokenizerTrainTask

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (64, 64), (i * 30, 0, 0)).save(images / f"{i}.png")
    over = ["train.batch_size=2", "train.num_workers=0", "data.preview_images=0", "optim.generator.schedule.unit=epochs",
            "optim.generator.schedule.warmup=1.5", "optim.generator.schedule.milestones=[2]",
            "optim.generator.schedule.kind=step"]
    cfg = _tok(over)
    task = TokenizerTrainTask(cfg, DistEnv(), images, tmp_path / "run")
    sched = task.phases()[0].config.schedule  # 8 images / batch 2 = 4 steps per epoch
    assert (sched.unit, sched.warmup, sched.milestones) == ("steps", 6, [8])
    assert cfg.optim.generator.schedule.unit == "epochs"  # the run's config keeps what the user wrote
    assert tokenizer_plan(_tok(over), 8, world=1, device="cpu")["warmup_steps"] == 6
