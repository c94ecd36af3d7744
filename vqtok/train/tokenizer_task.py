"""`train-tokenizer` as a TrainTask: the Tokenizer is the generator phase, the GAN discriminator the second.

The run config is one dataclass, `TrainTokenizerConfig`: model (a TokenizerConfig; `preset: NAME` starts
from a named tokenizer and the other keys override it), data, loss (the one loss-options object, with
--lpips-weights folded in when the config is loaded), optim (per phase, the optimizer shape every
trainer uses: vqtok/train/optim.py) and train; recipes in vqtok/recipes/tokenizer/ fill it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from vqtok.config import to_dict
from vqtok.errors import ConfigError, UserError
from vqtok.losses.tokenizer_loss import LossConfig, TokenizerLoss
from vqtok.signals import loader_worker_init
from vqtok.tokenizer.config import TokenizerConfig
from vqtok.distributed import DistEnv, broadcast_module
from vqtok.train.engine import EngineConfig, Phase, build_optimizer
from vqtok.train.optim import OptimizerConfig, in_steps
from vqtok.image_grid import reconstruction_grid
from vqtok.train.image_dataset import TrainImageDataset, collate, preview_images
from vqtok.train.sampler import StreamBatchSampler


@dataclass
class DataConfig:
    resolution: int | None = None  # None: the model's resolution
    scale_range: tuple[float, float] = (1.0, 1.25)  # short side drawn from resolution x [low, high] (ADM / LlamaGen)
    hflip: bool = True
    split: str = "train"  # sub-folder used when DATA has one (ImageNet layout)
    preview_images: int = 8

    def check_ranges(self, where: str = "data") -> None:
        from vqtok.validation import check_fields

        check_fields(self, where, {"resolution": {"low": 8}, "scale_range": {"low": 1.0}, "preview_images": {"low": 0}})


@dataclass
class TokenizerOptimConfig:
    generator: OptimizerConfig = field(default_factory=OptimizerConfig)
    discriminator: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class TokenizerEngineConfig(EngineConfig):
    # parts of the tokenizer that do not train, comma-separated: encoder, quantizer, decoder
    # (decoder-only fine-tuning from --init: freeze=encoder,quantizer)
    freeze: str = ""
    # conv weights (tokenizer, discriminator, LPIPS trunk) in channels_last (NHWC), the layout oneDNN and cuDNN
    # run fastest: the tiny-vqgan step takes ~20% less time on CPU (bench/README "channels_last")
    channels_last: bool = True


def _default_tokenizer() -> TokenizerConfig:
    from vqtok.tokenizer.presets import PRESETS

    return PRESETS["tiny-vqgan"]()


@dataclass
class TrainTokenizerConfig:
    model: TokenizerConfig = field(default_factory=_default_tokenizer)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    train: TokenizerEngineConfig = field(default_factory=TokenizerEngineConfig)

    @classmethod
    def build_section(cls, name: str, value: Any, data: dict, where: str) -> Any:
        """`model`: a preset and the keys that override it (another quantizer kind drops the preset's parameters)."""
        if name != "model" or not isinstance(value, dict):
            return None
        from vqtok.tokenizer.tokenizer import tokenizer_config_from_dict

        return tokenizer_config_from_dict(value, where)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_model(cfg: TrainTokenizerConfig) -> TokenizerConfig:
    """cfg.model checked, with its quantizer parameters written out in full (what config.yaml records)."""
    from vqtok.tokenizer.config import quantizer_config
    from vqtok.tokenizer.tokenizer import tokenizer_config_from_dict

    if isinstance(cfg.model, dict):  # set in code rather than loaded
        cfg.model = tokenizer_config_from_dict(cfg.model, "model")
    tok_cfg = cfg.model
    tok_cfg.validate()
    tok_cfg.quantizer.params = to_dict(quantizer_config(tok_cfg.quantizer))
    res = cfg.data.resolution or tok_cfg.resolution
    if res % tok_cfg.downsample:
        raise UserError(f"data.resolution {res} is not divisible by the tokenizer's downsampling factor {tok_cfg.downsample}")
    if tok_cfg.quantizer.kind == "msvq" and res != tok_cfg.resolution:
        raise UserError(f"a multi-scale tokenizer trains at its own resolution {tok_cfg.resolution}; got data.resolution {res}")
    cfg.data.resolution = res
    return tok_cfg


class TokenizerTrainTask:
    unit = "img/s"
    progress_keys = ("loss", "rec_l1", "rec_l2", "lpips", "quant", "d_loss", "code_usage")
    # the adaptive GAN weight calls autograd.grad inside the loss, R1 needs double backward and D runs
    # several forwards per backward: DDP's reducer supports none of these (vqtok/train/ddp.py)
    grad_sync = "explicit"

    def __init__(self, cfg: TrainTokenizerConfig, env: DistEnv, data: str | Path, run_dir: Path,
                 init: str | Path | None = None, trust_pickle: bool = False):
        from vqtok.data.images import list_images
        from vqtok.tokenizer.tokenizer import build_tokenizer
        from vqtok.train import tokenizer_init

        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        tok_cfg = resolve_model(cfg)
        listing = list_images(data, split=cfg.data.split)
        if not listing.records:
            raise UserError(f"found no images under {data}")
        self.records = listing.records
        res = cfg.data.resolution
        seed_everything(cfg.train.seed)  # identical initial weights on every rank and every run
        device = env.device
        self.tokenizer = build_tokenizer(tok_cfg)
        frozen_parts = tokenizer_init.parse_freeze(getattr(cfg.train, "freeze", ""))
        source = tokenizer_init.read_init_source(init, trust_pickle) if init is not None else None
        notes: list[str] = []
        if source is not None:
            notes = tokenizer_init.load_into_tokenizer(self.tokenizer, source, init)
        self.tokenizer.to(device)
        n_frozen = tokenizer_init.freeze_parts(self.tokenizer, frozen_parts)
        if cfg.loss.adaptive_weight and cfg.loss.disc_weight > 0 and not self.tokenizer.last_layer_weight().requires_grad:
            raise ConfigError(
                f"train.freeze={cfg.train.freeze} freezes the decoder's last layer, where loss.adaptive_weight measures "
                "the gradients that set the adversarial weight; set loss.adaptive_weight=false (the adversarial term "
                "is then weighted by loss.disc_weight alone) or leave the decoder trainable"
            )
        self.loss_fn = TokenizerLoss(cfg.loss, res).to(device)
        if self.loss_fn.uses_random_lpips and env.is_main:
            print("warning: LPIPS uses a RANDOM VGG16 trunk (lpips_weights: random-for-tests): not a perceptual metric", flush=True)
        broadcast_module(self.tokenizer, env)
        if self.loss_fn.discriminator is not None:
            broadcast_module(self.loss_fn.discriminator, env)
        if cfg.train.channels_last:  # before the optimizers: their moments take the parameters' layout
            self.tokenizer.to(memory_format=torch.channels_last)
            self.loss_fn.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            self.tokenizer.compile()
        self.dataset = TrainImageDataset(self.records, res, tuple(cfg.data.scale_range), cfg.data.hflip, cfg.train.seed)
        trainable = [p for p in self.tokenizer.parameters() if p.requires_grad]
        steps_per_epoch = len(self.records) / cfg.train.batch_size  # schedules in epochs count passes over the images
        g_optim = in_steps(cfg.optim.generator, steps_per_epoch)
        self._phases = [Phase("generator", self.tokenizer, build_optimizer(g_optim, trainable, device), g_optim, ema=True)]
        if self.loss_fn.discriminator is not None:
            d = self.loss_fn.discriminator
            d_optim = in_steps(cfg.optim.discriminator, steps_per_epoch)
            self._phases.append(Phase("discriminator", d, build_optimizer(d_optim, d.parameters(), device), d_optim))
        if source is not None:
            notes += self._restore_from_source(source, frozen_parts)
            if env.is_main:
                print(f"init: tokenizer weights from {source.description}" + "".join(f"; {n}" for n in notes), flush=True)
        if frozen_parts and env.is_main:
            print(f"frozen: {', '.join(frozen_parts)} ({n_frozen:,} parameters do not train)", flush=True)
        self._param_names = {id(p): n for n, p in self.tokenizer.named_parameters()}
        self.monitor = self._make_monitor(tok_cfg)
        self._recon: dict[int, torch.Tensor] = {}
        # D's logits of the reconstruction, kept from the generator pass for the discriminator pass of the
        # same step (one D forward saved); with one micro-batch only, so that no more than one graph waits
        self._fake: dict[int, torch.Tensor] = {}
        self._share_fake = self.loss_fn.can_share_fake and cfg.train.grad_accum == 1
        self.skipped_total = 0
        self.codebook_restarts = 0
        self._preview = preview_images(self.records, res, cfg.data.preview_images)
        self._preview_resolution = res

    def _restore_from_source(self, source, frozen_parts: list[str]) -> list[str]:
        """Discriminator and optimizer states of an --init source: restored when present and fitting."""
        notes = []
        d = self.loss_fn.discriminator
        if d is not None:
            if source.discriminator is None:
                notes.append("discriminator started fresh (the source has none)")
            else:
                try:
                    d.load_state_dict(source.discriminator)
                    notes.append("discriminator restored")
                except RuntimeError:
                    notes.append("discriminator started fresh (the source's has another architecture)")
        for phase in self._phases:
            saved = source.optimizers.get(phase.name)
            if saved is None:
                notes.append(f"{phase.name} optimizer started fresh (the source has no optimizer state)")
            elif phase.name == "generator" and frozen_parts:
                notes.append("generator optimizer started fresh (train.freeze changes the trained parameters)")
            elif phase.name == "discriminator" and not any(n == "discriminator restored" for n in notes):
                notes.append("discriminator optimizer started fresh")
            else:
                try:
                    phase.optimizer.load_state_dict(saved)
                    notes.append(f"{phase.name} optimizer restored")
                except (ValueError, KeyError, RuntimeError):
                    notes.append(f"{phase.name} optimizer started fresh (its parameters differ from the source's)")
        return notes

    def _make_monitor(self, tok_cfg):
        from vqtok.train.codebook_monitor import CodebookMonitor

        kind = tok_cfg.quantizer.kind
        warn = self.cfg.loss.usage_warn
        if warn is None:
            warn = 0.5 if kind in ("vq", "msvq") else 0.0
        hint = ""
        if kind in ("vq", "msvq"):
            hint = ("; turn on quantizer guards, e.g. model.quantizer.params.kmeans_init=true "
                    "model.quantizer.params.dead_code_threshold=0.1 (see the tiny-vqgan recipe)")
        return CodebookMonitor(self.tokenizer.vocab_size, self.tokenizer.scales, self.cfg.loss.usage_window, warn, hint=hint)

    # -- optional engine hooks ----------------------------------------------------------------------

    @torch.no_grad()
    def after_optimizer_step(self, phase: str, optimizer: torch.optim.Optimizer, ema, step: int) -> None:
        """Once per step on every rank: the quantizer's codebook care (k-means init, EMA codebook, dead-code
        restarts, a collective), then for each re-seeded code fresh Adam moments and weight-EMA rows, so
        neither the optimizer's memory of the old code nor the exported EMA keeps the stale row."""
        if phase != "generator":
            return
        update = self.tokenizer.quantize.update_codebook(step)
        self.monitor.push(update.counts)
        rows = update.replaced
        if rows is None or not bool(rows.any()):
            return
        for p in update.row_params:
            state = optimizer.state.get(p)
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if state and torch.is_tensor(state.get(key)) and state[key].shape[:1] == rows.shape:
                    state[key][rows] = 0
            name = self._param_names.get(id(p))
            if ema is not None and name in ema.shadow:
                ema.shadow[name][rows] = p.detach().float()[rows]
        self.codebook_restarts += int(rows.sum())

    def on_log(self, step: int) -> tuple[dict[str, float], list[str]]:
        """At each log step on every rank: usage over the sliding window, all ranks (one all-reduce)."""
        metrics, notes = self.monitor.report(self.env.device)
        metrics["codes_reseeded"] = float(self.codebook_restarts)
        return metrics, notes

    # -- TrainTask ----------------------------------------------------------------------------------

    def phases(self) -> list[Phase]:
        return self._phases

    def phase_active(self, phase: str, step: int) -> bool:
        return phase == "generator" or self.loss_fn.disc_active(step)

    def epoch(self, step: int) -> float:
        return step * self.cfg.train.batch_size / len(self.records)

    def batches(self, start_step: int) -> Iterator[dict]:
        sampler = StreamBatchSampler(len(self.dataset), self.cfg.train.batch_size, self.cfg.train.seed, start_step,
                                     self.env.rank, self.env.world)
        workers = self.cfg.train.num_workers
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                            pin_memory=self.env.device.type == "cuda", persistent_workers=workers > 0,
                            prefetch_factor=4 if workers > 0 else None, worker_init_fn=loader_worker_init())
        for batch in loader:
            if batch["skipped"]:
                self._record_skips(batch["skipped"])
            yield {"images": batch["images"].to(self.env.device, non_blocking=True)}

    def _record_skips(self, skipped: list[tuple[str, str]]) -> None:
        self.skipped_total += len(skipped)
        if self.env.is_main:
            with open(self.run_dir / "skipped.jsonl", "a") as fh:
                for source, reason in skipped:
                    fh.write(json.dumps({"source": source, "reason": reason}) + "\n")

    def split(self, batch: dict, parts: int) -> list[dict]:
        return [{"images": x} for x in batch["images"].chunk(parts)]

    def batch_size(self, batch: dict) -> int:
        return batch["images"].shape[0]

    def loss(self, phase: str, mb: dict, micro_index: int, step: int):
        images = mb["images"]
        if phase == "generator":
            out = self.tokenizer(images)
            recon = out.recon.float()
            if len(self._phases) > 1:
                self._recon[micro_index] = recon.detach()
            loss, metrics, fake = self.loss_fn.generator_loss(images, recon, out.aux, step,
                                                              self.tokenizer.last_layer_weight(), self._share_fake)
            if fake is not None:
                self._fake[micro_index] = fake
            metrics["skipped_images"] = torch.tensor(float(self.skipped_total))
            return loss, metrics
        return self.loss_fn.discriminator_loss(images, self._recon.pop(micro_index), step,
                                               self._fake.pop(micro_index, None))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"skipped_total": self.skipped_total, "codebook_restarts": self.codebook_restarts,
                               "quantizer": self.tokenizer.quantize.pending_state()}
        if self.loss_fn.lecam is not None:
            out["lecam"] = self.loss_fn.lecam.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.codebook_restarts = int(state.get("codebook_restarts", 0))
        self.tokenizer.quantize.load_pending_state(state.get("quantizer", {}))
        if self.loss_fn.lecam is not None and "lecam" in state:
            self.loss_fn.lecam.load_state_dict(state["lecam"])

    @torch.no_grad()
    def preview(self, step: int, weights: dict[str, dict[str, torch.Tensor]] | None) -> torch.Tensor | None:
        if self._preview is None:
            return None
        # a different set of images at each preview (the first set stays at step 0)
        drawn = preview_images(self.records, self._preview_resolution, self.cfg.data.preview_images, draw=step) if step else None
        images = (drawn if drawn is not None else self._preview).to(self.env.device)
        was_training = self.tokenizer.training
        self.tokenizer.eval()
        try:
            if weights is not None:
                recon = torch.func.functional_call(self.tokenizer, weights["generator"], (images,)).recon
            else:
                recon = self.tokenizer(images).recon
        finally:
            self.tokenizer.train(was_training)
        return reconstruction_grid(images, recon)

    def save_final(self, dest: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        state = {k: v.detach().cpu() for k, v in weights["generator"].items()}
        self.tokenizer.save(dest, state_dict=state)


def load_run_config(config: str | Path | dict | None, overrides: list[str] | tuple[str, ...] = (),
                    lpips_weights: str | Path | None = None) -> TrainTokenizerConfig:
    """The recipe, the overrides, then --lpips-weights (a path, so not parsed as YAML) into loss.lpips_weights."""
    from vqtok.config import load_config

    cfg = load_config(TrainTokenizerConfig, config, list(overrides), kind="tokenizer")
    if lpips_weights is not None:
        cfg.loss.lpips_weights = str(lpips_weights)
    return cfg


def train_tokenizer(
    data: str | Path,
    config: str | Path | dict | None,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    device: str | None = None,
    lpips_weights: str | None = None,
    stop_after: int | None = None,
    init: str | Path | None = None,
    trust_pickle: bool = False,
):
    """Library entry of `vqtok train-tokenizer`. Bad input raises UserError before any training starts."""
    import yaml

    from vqtok.distributed import init_distributed
    from vqtok.train.engine import Engine

    cfg = load_run_config(config, overrides, lpips_weights)
    run_dir = Path(out)
    if not Path(data).exists():
        raise UserError(f"data path {data} does not exist")
    env = init_distributed(device)
    task = TokenizerTrainTask(cfg, env, data, run_dir, init=init, trust_pickle=trust_pickle)
    saved = run_dir / "config.yaml"
    if resume and saved.is_file():
        previous = yaml.safe_load(saved.read_text()) or {}
        if previous.get("model") != to_dict(cfg.model):
            raise UserError(f"--resume: the model in {saved} differs from this config's model; resume with the same recipe")
    run_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine(cfg.train, env, run_dir, resolved_config=cfg)
    return engine.run(task, resume=resume, stop_after=stop_after)
