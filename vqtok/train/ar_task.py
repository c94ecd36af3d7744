"""`train-ar` as a TrainTask: a generator on token shards (RAR with permutation annealing), through the shared engine.

The run config is one dataclass, `TrainARConfig`; recipes in vqtok/recipes/ar/ fill it. `arch` names the
generator family (vqtok/ar/families.py), which types the `model` section and builds the model; the
optimizer section is the one shape every trainer uses (vqtok/train/optim.py). What this task adds to
the engine (vqtok/train/engine.py):

- the model: the family's config (`model.preset` names a size, other keys override it), built by the
  family's model class (which supplies condition_ids, null_condition_ids and generation_order), with
  vocabulary, sequence length, classes and token grid taken from the token shards (their manifest),
  which must come from `--tokenizer`; families that generate one token grid refuse multi-scale shards;
- data: token shards read by position (vqtok/train/ar_data.py), one random crop view per image per
  epoch, where one epoch is one pass over the source images;
- per step, from a generator seeded by (seed, step) alone: the orders (families that train on orders:
  a uniform random permutation with probability r, else the target scan order; vectorised) and the
  class-label dropout. They are drawn for the whole global batch and sliced per rank, so a resumed run
  and a run on any number of ranks see the same orders, and nothing but the step needs checkpointing;
- AdamW in two groups: decay exactly the weight matrices of the Linear layers; no decay on biases, norm
  parameters, the embedding table, the cls token and the positional / target-aware / timestep tables
  (the official RAR code picks by parameter-name substrings, which also decays cls_token and, through a
  case quirk, skips the final adaLN weight; this rule treats that one like every other Linear weight);
- the schedule (the paper's: warm-up then cosine to `end_lr`) turned from epochs into steps once;
- a sample grid (KV-cached sampling, decoded by the tokenizer) as the engine's preview, and the final
  export as a generator checkpoint that records the tokenizer identity.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from vqtok.ar.annealing import PermutationAnnealing, annealing_warning
from vqtok.ar.families import Family, get_family
from vqtok.ar.orders import canonical_order_name, sample_orders
from vqtok.config import from_dict, given_keys, to_dict
from vqtok.distributed import DistEnv, broadcast_module
from vqtok.errors import ConfigError, UserError
from vqtok.signals import loader_worker_init
from vqtok.train.ar_data import EpochViewTokens, mix_seed, open_ar_tokens
from vqtok.train.engine import EngineConfig, Phase, build_optimizer
from vqtok.train.optim import OptimizerConfig, ScheduleConfig, in_steps
from vqtok.train.sampler import StreamBatchSampler
from vqtok.weights import same_weights


@dataclass
class ARDataConfig:
    view: str | int = "random"  # "random": a fresh random crop view per image per epoch; or a fixed view index
    preview_classes: list[int] | None = None  # classes in the sample grid; None: 8 spread over the class range
    preview_guidance: float = 4.0  # constant CFG scale of the sample grid (0: none)
    preview_seed: int = 0  # the grid uses its own generator: same noise every time, training RNG untouched

    def check_ranges(self, where: str = "data") -> None:
        from vqtok.validation import check_fields

        check_fields(self, where, {"preview_guidance": {"low": 0.0}})


def rar_optim_defaults() -> OptimizerConfig:
    """The paper's optimizer: AdamW (0.9, 0.96), wd 0.03, clip 1, lr 4e-4, 100 warm-up epochs, cosine to 1e-5."""
    return OptimizerConfig(kind="adamw", lr=4e-4, betas=(0.9, 0.96), weight_decay=0.03, grad_clip=1.0,
                           schedule=ScheduleConfig(kind="cosine", warmup=100, unit="epochs", end_lr=1e-5))


def paper_model() -> Any:
    """The `model` section of vqtok/recipes/ar/rar-b.yaml (RAR-B, dropout 0.1 everywhere, raster order)."""
    return get_family("rar").presets["rar-b"]()


@dataclass
class AnnealConfig:
    """Permutation annealing (RAR Eq. 5): r = 1 before start, linear to 0 at end, 0 after."""

    start: float = 200.0
    end: float = 300.0
    unit: Literal["epochs", "steps"] = "epochs"


def rar_engine_defaults() -> EngineConfig:
    """The `train` section of the paper recipe (vqtok/recipes/ar/rar-b.yaml): what a partial `train:` keeps."""
    return EngineConfig(batch_size=2048, grad_accum=1, seed=42, amp=True, ema=False, log_every=50, ckpt_every=5000,
                        keep_last=3, preview_every=5000, num_workers=4)


@dataclass
class TrainARConfig:
    """Defaults = vqtok/recipes/ar/rar-b.yaml (a test keeps the two identical), section by section."""

    arch: str = "rar"  # generator family (vqtok/ar/families.py); it types `model`
    # the family's config dataclass (RARConfig for rar); `preset: NAME` in the mapping starts from a named size
    model: Any = field(default_factory=paper_model)
    data: ARDataConfig = field(default_factory=ARDataConfig)
    optim: OptimizerConfig = field(default_factory=rar_optim_defaults)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    epochs: float | None = 400.0  # run length in passes over the source images; None: train.steps decides
    train: EngineConfig = field(default_factory=rar_engine_defaults)

    SECTION_EXTRA_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {"model": ("preset",)}

    @classmethod
    def section_type(cls, name: str, data: dict) -> type | None:
        return _family_of(data).config_cls if name == "model" else None

    @classmethod
    def build_section(cls, name: str, value: Any, data: dict, where: str) -> Any:
        """`model`: the family's config, from its preset when the mapping names one."""
        if name != "model" or not isinstance(value, dict):
            return None
        family = _family_of(data)
        value = dict(value)
        preset = value.pop("preset", None)
        base = None
        if preset is not None:
            if preset not in family.presets:
                raise ConfigError(f"unknown generator preset {preset!r} ({where}.preset) for arch {family.name}; "
                                  f"choose one of {', '.join(family.presets)}")
            base = family.presets[preset]()
        return from_dict(family.config_cls, value, where, base=base)


def _family_of(data: dict) -> Family:
    arch = data.get("arch", "rar")
    if not isinstance(arch, str):
        raise ConfigError(f"'arch' must be a string naming a generator family, got {arch!r}")
    return get_family(arch)


DEFAULT_RECIPE = "rar-b"  # what `train-ar` without --config loads


def default_recipe(overrides: list[str] | tuple[str, ...] = ()) -> str:
    """rar-b; another --arch needs a recipe of its own (its model section has other keys)."""
    from vqtok.config import list_recipes, parse_override

    arch = dict((".".join(k), v) for k, v in map(parse_override, overrides)).get("arch", "rar")
    if arch == "rar":
        return DEFAULT_RECIPE
    get_family(arch)
    known = [r for r in list_recipes("ar") if r.startswith(f"{arch}-")]
    raise UserError(f"--arch {arch} needs --config with a recipe for it" + (f" ({', '.join(known)})" if known else ""))


@dataclass
class ARSchedule:
    """A run's length and schedules in optimizer steps, from the config and the number of source images."""

    num_samples: int
    steps_per_epoch: float
    steps: int
    warmup_steps: int
    anneal_start_step: int  # first step trained with r < 1
    anneal_end_step: int  # first step trained with r = 0 (pure target order)


def resolve_schedule(cfg: TrainARConfig, num_samples: int) -> ARSchedule:
    """Steps per epoch, total steps (epochs, when set, decide train.steps), warm-up and annealing in steps.

    Also writes the total back into cfg.train.steps. `ARTrainTask` and the --dry-run plan both use this.
    """
    if num_samples < 1:
        raise UserError("the token shards hold no samples")
    steps_per_epoch = num_samples / cfg.train.batch_size
    if cfg.epochs is not None:
        if cfg.epochs <= 0:
            raise UserError(f"epochs must be positive, got {cfg.epochs}")
        cfg.train.steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    cfg.optim.check_ranges("optim")
    warmup = int(in_steps(cfg.optim, steps_per_epoch).schedule.warmup)
    per_unit = steps_per_epoch if cfg.anneal.unit == "epochs" else 1.0
    PermutationAnnealing(cfg.anneal.start, cfg.anneal.end, "epoch" if cfg.anneal.unit == "epochs" else "step")  # validates
    return ARSchedule(num_samples=num_samples, steps_per_epoch=steps_per_epoch, steps=cfg.train.steps,
                      warmup_steps=int(warmup), anneal_start_step=math.ceil(cfg.anneal.start * per_unit - 1e-9),
                      anneal_end_step=math.ceil(cfg.anneal.end * per_unit - 1e-9))


# ------------------------------------------------------------------------------------------ model


def resolve_model(model: Any, manifest: dict, arch: str = "rar") -> Any:
    """The family's config for these token shards: `model` (typed, from the recipe) with the vocabulary,
    sequence length and grid the shards decide, and their number of classes unless the recipe set it.

    A value the recipe gave explicitly (config.given_keys) must equal the shards'; multi-scale shards
    are refused by families that generate one token grid.
    """
    family = get_family(arch)
    if not isinstance(model, family.config_cls):
        raise UserError(f"the model section is a {type(model).__name__}, but arch {arch} needs a {family.config_cls.__name__}")
    tok = manifest["tokenizer"]
    scales = [[int(v) for v in s] for s in tok["scales"]]
    if len(scales) > 1 and not family.multiscale_tokens:
        raise UserError(
            f"arch {arch} generates one token grid, but the token shards hold multi-scale tokens ({len(scales)} scales); "
            "train a next-scale family on them, or encode with a single-scale tokenizer"
        )
    if len(scales) == 1 and family.multiscale_tokens:
        raise UserError(f"arch {arch} generates scale by scale and needs multi-scale tokens, but the token shards hold "
                        "one token grid; encode with a multi-scale tokenizer")
    decided = family.token_fields(int(tok["vocab_size"]), scales, int(tok["tokens_per_view"]))
    given = given_keys(model)
    for name, value in decided.items():
        mine = getattr(model, name)
        if name in given and mine is not None and mine != value:
            raise UserError(f"model.{name} is {mine} but the token shards have {value}; leave it unset, the shards decide it")
    classes = len(manifest.get("classes") or [])
    updates = dict(decided)
    if classes and "num_classes" not in given:
        updates["num_classes"] = classes
    cfg = from_dict(family.config_cls, {**to_dict(model), **updates}, "model")
    if classes and cfg.num_classes < classes:
        raise UserError(f"model.num_classes {cfg.num_classes} is smaller than the {classes} classes in the token shards")
    return cfg


def ar_optimizer_config(cfg: TrainARConfig, schedule: ARSchedule) -> OptimizerConfig:
    """`optim` with its schedule counted in steps (warm-up epochs x steps per epoch, rounded)."""
    return in_steps(cfg.optim, schedule.steps_per_epoch)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weight matrices of Linear layers only (see the module docstring for the rule)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_tokenizer_matches(manifest: dict, identity: dict, tokens_dir: Path, tokenizer_path: str | Path) -> None:
    """Refuse token shards made by another tokenizer than `--tokenizer` (hash, vocabulary, grid)."""
    made = manifest["tokenizer"]
    problems = []
    if made.get("hash") and identity.get("hash") and not same_weights(made["hash"], identity):
        problems.append(f"weights hash {made['hash'][:12]} vs {identity['hash'][:12]}")
    if int(made["vocab_size"]) != int(identity["vocab_size"]):
        problems.append(f"vocabulary {made['vocab_size']} vs {identity['vocab_size']}")
    grid, native = [list(s) for s in made["scales"]], [list(s) for s in identity["scales"]]
    if grid != native and (len(grid) > 1 or len(native) > 1):  # one-scale tokenizers may encode other sizes
        problems.append(f"token grid {grid} vs {native}")
    if problems:
        raise UserError(
            f"the token shards in {tokens_dir} were made by another tokenizer ({made.get('preset')}) than "
            f"--tokenizer {tokenizer_path} ({identity.get('preset')}): {', '.join(problems)}; "
            "pass the tokenizer the shards were encoded with, or re-encode them with this one"
        )


# arch -> the interop module whose `convert` maps that family's official state dict to vqtok's keys
OFFICIAL_CONVERTERS = {"rar": "vqtok.interop.rar", "var": "vqtok.interop.var_gpt", "llamagen": "vqtok.interop.llamagen_gpt"}


def load_init_weights(model: nn.Module, path: str | Path, tokenizer_identity: dict, trust_pickle: bool = False,
                      arch: str = "rar") -> None:
    """Start from a generator checkpoint directory or an official state dict of the family (`rar_b.bin`)."""
    import importlib

    path = Path(path)
    if path.is_dir():
        from vqtok.ar.checkpoint import load_generator

        source, identity = load_generator(path)
        state = source.state_dict()
        made = identity.get("tokenizer") or {}
        if made.get("hash") and tokenizer_identity.get("hash") and not same_weights(made["hash"], tokenizer_identity):
            raise UserError(f"--init {path} was trained on another tokenizer (hash {made['hash'][:12]}) than --tokenizer")
    elif path.is_file():
        from vqtok.weights import load_state_dict_file

        if arch not in OFFICIAL_CONVERTERS:
            raise UserError(f"--init {path}: no converter for official {arch} weights; pass a vqtok generator checkpoint")
        try:
            convert = importlib.import_module(OFFICIAL_CONVERTERS[arch]).convert
        except (ModuleNotFoundError, AttributeError):
            raise UserError(f"--init {path}: official {arch} weights cannot be converted in this build") from None
        state = convert(load_state_dict_file(path, trust_pickle=trust_pickle))
    else:
        raise UserError(f"--init {path} does not exist")
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise UserError(f"--init {path} lacks {key}; it is not a {arch} generator")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(
                f"--init {path} does not fit this model: {key} is {list(state[key].shape)}, the model needs "
                f"{list(value.shape)}; choose the --preset it was trained with"
            )
    model.load_state_dict({k: state[k] for k in own}, strict=True)


# ------------------------------------------------------------------------------------------- task


class ARTrainTask:
    unit = "tok/s"
    progress_keys = ("loss", "acc", "r")
    point_metrics = ("r",)  # metrics.jsonl: r at the logged step (loss and acc are averages over the log window)
    grad_sync = "ddp"  # plain forward/backward: DDP overlaps the gradient all-reduce with backward

    def __init__(self, cfg: TrainARConfig, env: DistEnv, tokens_dir: str | Path, tokenizer_path: str | Path,
                 init: str | Path | None = None, trust_pickle: bool = False):
        from vqtok.data.token_shards import read_manifest
        from vqtok.tokenizer.tokenizer import load_tokenizer

        self.cfg, self.env = cfg, env
        self.tokens_dir = Path(tokens_dir)
        self.tokenizer_path = Path(tokenizer_path).resolve()
        manifest = read_manifest(self.tokens_dir)
        self.tokenizer = load_tokenizer(tokenizer_path, device=env.device)
        identity = self.tokenizer.identity()
        check_tokenizer_matches(manifest, identity, self.tokens_dir, tokenizer_path)
        # the generator records the grid it was trained on (encode may have used another image size)
        self.tokenizer_identity = dict(identity, scales=manifest["tokenizer"]["scales"],
                                       tokens_per_image=int(manifest["tokenizer"]["tokens_per_view"]))
        self.family = get_family(cfg.arch)
        if self.family.token_fields is None or self.family.train_loss is None:
            raise UserError(f"arch {cfg.arch} cannot be trained by train-ar in this build (its family registers no "
                            "token_fields / train_loss)")
        self.model_config = cfg.model = resolve_model(cfg.model, manifest, cfg.arch)
        self.num_samples = int(manifest["num_samples"])
        if self.num_samples < 1:
            raise UserError(f"{self.tokens_dir} holds no samples")
        self.schedule = resolve_schedule(cfg, self.num_samples)
        self.steps_per_epoch = self.schedule.steps_per_epoch
        unit = "epoch" if cfg.anneal.unit == "epochs" else "step"
        self.annealing = PermutationAnnealing(cfg.anneal.start, cfg.anneal.end, unit)
        self.optim_config = ar_optimizer_config(cfg, self.schedule)

        mcfg = self.model_config
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every run
        self.model = self.family.model_cls(mcfg).to(env.device)
        if init is not None:
            load_init_weights(self.model, init, identity, trust_pickle, cfg.arch)
        if self.family.bind_tokenizer is not None:
            self.family.bind_tokenizer(self.model, self.tokenizer)
        broadcast_module(self.model, env)
        self._forward_loss = self._loss_terms
        if cfg.train.compile:
            self._forward_loss = torch.compile(self._loss_terms)
        optimizer = build_optimizer(self.optim_config, weight_decay_groups(self.model, cfg.optim.weight_decay), env.device)
        self._phases = [Phase("generator", self.model, optimizer, self.optim_config, ema=True)]

        # families without orders train in their fixed order: no permutations, the anneal section unused
        self.target_order = self.model.generation_order().to(env.device) if self.family.trains_on_orders else None
        self.tokens = EpochViewTokens(open_ar_tokens(self.tokens_dir, manifest), len(manifest["views"]),
                                      cfg.train.seed, cfg.data.view)
        classes = cfg.data.preview_classes
        if classes is None:
            n = min(8, mcfg.num_classes)
            classes = torch.linspace(0, mcfg.num_classes - 1, n).round().long().tolist()
        bad = [c for c in classes if not 0 <= c < mcfg.num_classes]
        if bad:
            raise UserError(f"data.preview_classes holds class {bad[0]}, outside 0..{mcfg.num_classes - 1}")
        self.preview_classes = classes
        self.class_names = [str(c) for c in manifest.get("classes") or []]  # label order; grids and generator.json
        self._preview_model: nn.Module | None = None

    # -- TrainTask ----------------------------------------------------------------------------------

    def phases(self) -> list[Phase]:
        return self._phases

    def phase_active(self, phase: str, step: int) -> bool:
        return True

    def epoch(self, step: int) -> float:
        """Passes over the source images after `step` steps (the unit of --anneal epochs)."""
        return step / self.steps_per_epoch

    def random_ratio(self, step: int) -> float:
        """r for the batch of step `step` (0-based, before its update); 0 for families without orders."""
        return self.annealing.ratio(step, self.steps_per_epoch) if self.target_order is not None else 0.0

    def step_conditions(self, step: int) -> tuple[torch.Tensor | None, torch.Tensor, float]:
        """(orders (b, N) or None, class-drop mask (b,), r) of this rank's share of step `step`'s global batch."""
        cfg, env = self.cfg, self.env
        B, local = cfg.train.batch_size, cfg.train.batch_size // env.world
        r = self.random_ratio(step)
        gen_device = env.device if env.device.type == "cuda" else torch.device("cpu")
        gen = torch.Generator(device=gen_device)
        gen.manual_seed(mix_seed(cfg.train.seed, 0x0A3D, step) & (2**63 - 1))
        orders = sample_orders(B, self.target_order, r, generator=gen, device=env.device) if self.target_order is not None else None
        drop = torch.rand(B, generator=gen, device=gen_device).to(env.device) < self.model_config.class_dropout
        part = slice(env.rank * local, (env.rank + 1) * local)
        return (orders[part] if orders is not None else None), drop[part], r

    def batches(self, start_step: int) -> Iterator[dict]:
        cfg, env = self.cfg, self.env
        sampler = StreamBatchSampler(len(self.tokens), cfg.train.batch_size, cfg.train.seed, start_step, env.rank, env.world)
        workers = cfg.train.num_workers
        # its own generator: creating the loader iterator would otherwise draw from the global torch RNG
        # (which dropout uses) at a different point in a resumed run than in an uninterrupted one
        loader = DataLoader(self.tokens, batch_sampler=sampler, num_workers=workers,
                            pin_memory=env.device.type == "cuda", persistent_workers=workers > 0,
                            prefetch_factor=4 if workers > 0 else None, worker_init_fn=loader_worker_init(),
                            generator=torch.Generator().manual_seed(cfg.train.seed))
        step = start_step
        for tokens, classes in loader:
            tokens = tokens.to(env.device, non_blocking=True)
            # the class range check reads the ids: do it on the host copy, not on device (a sync per step)
            cond = self.model.condition_ids(classes).to(env.device, non_blocking=True)
            orders, drop, r = self.step_conditions(step)
            cond = torch.where(drop, self.model.null_condition_ids(cond.shape[0], cond.device), cond)
            yield {"tokens": tokens, "cond": cond, "orders": orders, "r": r}
            step += 1

    def split(self, batch: dict, parts: int) -> list[dict]:
        keys = [k for k in ("tokens", "cond", "orders") if batch[k] is not None]
        chunks = [batch[k].chunk(parts) for k in keys]
        return [{"orders": None, **dict(zip(keys, c)), "r": batch["r"]} for c in zip(*chunks)]

    def batch_size(self, batch: dict) -> int:
        return batch["tokens"].numel()  # tokens, so the progress line reads tok/s

    def _loss_terms(self, tokens: torch.Tensor, cond: torch.Tensor, orders: torch.Tensor | None):
        return self.family.train_loss(self.model, tokens, cond, orders)

    def loss(self, phase: str, mb: dict, micro_index: int, step: int):
        loss, acc = self._phases[0].forward(self._forward_loss, mb["tokens"], mb["cond"], mb["orders"])
        return loss, {"loss": loss.detach(), "acc": acc, "r": torch.tensor(mb["r"])}

    def state_dict(self) -> dict[str, Any]:
        # orders, class dropout and data are functions of (seed, step); the engine saves step and RNGs
        return {"seed": self.cfg.train.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_samples", self.num_samples)) != self.num_samples:
            raise UserError(
                f"the run was trained on {state['num_samples']} samples but {self.tokens_dir} holds {self.num_samples}; "
                "resume with the same token shards"
            )

    @torch.no_grad()
    def preview(self, step: int, weights: dict[str, dict[str, torch.Tensor]] | None) -> torch.Tensor | None:
        from vqtok.ar.sampling import SamplingConfig, sample
        from vqtok.image_grid import sample_grid

        model = self.model
        if weights is not None:  # sample with the EMA weights, from a second copy of the model
            if self._preview_model is None:
                self._preview_model = self.family.model_cls(self.model_config).to(self.env.device)
                if self.family.bind_tokenizer is not None:
                    self.family.bind_tokenizer(self._preview_model, self.tokenizer)
            self._preview_model.load_state_dict(weights["generator"])
            model = self._preview_model
        gen = torch.Generator(device=self.env.device)
        gen.manual_seed(self.cfg.data.preview_seed)
        scfg = SamplingConfig(guidance_scale=self.cfg.data.preview_guidance)
        classes = torch.tensor(self.preview_classes, dtype=torch.long)
        tokens = sample(model, classes, scfg, generator=gen).tokens
        images = self.tokenizer.decode(tokens)
        return sample_grid(images.float(), classes.tolist(), self.class_names)

    def save_final(self, dest: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        from vqtok.ar.checkpoint import save_generator

        state = {k: v.detach().cpu() for k, v in weights["generator"].items()}
        # `vqtok sample` finds the tokenizer through this path when --tokenizer is not given
        extra = {"trained_on": str(self.tokens_dir), "tokenizer_path": str(self.tokenizer_path), "steps": self.cfg.train.steps,
                 "epochs": round(self.epoch(self.cfg.train.steps), 4), "classes": self.class_names}
        save_generator(dest, state, self.model_config, self.tokenizer_identity, extra)


# ------------------------------------------------------------------------------------------ entry


def load_run_config(config: str | Path | dict | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainARConfig:
    """The recipe (rar-b when `config` is None), then the overrides; see `run_length_source` for epochs vs steps."""
    from vqtok.config import load_config, load_yaml, resolve_recipe

    if config is None:
        config = default_recipe(overrides)
    data = config if isinstance(config, dict) else load_yaml(resolve_recipe(config, "ar"))
    source = run_length_source(data, overrides)
    data = dict(data)
    if source.endswith("train.steps"):
        data["epochs"] = None  # steps decide: the command line's over the recipe's epochs, or a recipe without epochs
    cfg = load_config(TrainARConfig, data, list(overrides))
    if source.endswith("train.steps"):
        cfg.epochs = None
    return cfg


def run_length_source(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Which setting decides the run length: epochs or train.steps, and where it came from.

    The command line wins over the recipe; both on the command line, or both in the recipe, is an error.
    """
    from vqtok.config import parse_override
    from vqtok.errors import ConfigError

    cli = dict((".".join(k), v) for k, v in map(parse_override, overrides))
    cli_epochs, cli_steps = cli.get("epochs") is not None, "train.steps" in cli  # epochs=null only clears epochs
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    file_epochs = data.get("epochs") is not None if "epochs" in data else False
    file_steps = "steps" in train
    if cli_epochs and cli_steps:
        raise ConfigError("both epochs (--epochs) and train.steps are given on the command line; give one of them")
    if cli_steps:
        return "command-line train.steps"
    if cli_epochs:
        return "command-line epochs"
    if file_epochs and file_steps:
        raise ConfigError("the recipe sets both epochs and train.steps; keep one (or pick one on the command line)")
    if file_steps or ("epochs" in data and data["epochs"] is None) or ("epochs" in cli and cli["epochs"] is None):
        return "recipe train.steps"
    return "recipe epochs"


def train_ar(
    tokens_dir: str | Path,
    tokenizer: str | Path,
    out: str | Path,
    config: str | Path | dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    device: str | None = None,
    init: str | Path | None = None,
    trust_pickle: bool = False,
    stop_after: int | None = None,
):
    """Library entry of `vqtok train-ar`. Bad input raises UserError before any training starts."""
    import yaml

    from vqtok.distributed import init_distributed
    from vqtok.train.engine import Engine

    from vqtok.run_dirs import resolve_checkpoint

    cfg = load_run_config(config, overrides)
    tokenizer = resolve_checkpoint(tokenizer, "--tokenizer")
    if init is not None:
        init = resolve_checkpoint(init, "--init")
    if not Path(tokenizer).exists():
        raise UserError(f"tokenizer checkpoint {tokenizer} does not exist")
    env = init_distributed(device)
    task = ARTrainTask(cfg, env, tokens_dir, tokenizer, init=init, trust_pickle=trust_pickle)
    warning = None
    if task.family.trains_on_orders:
        warning = annealing_warning(task.annealing, cfg.train.steps, task.steps_per_epoch, task.model_config.order)
    if warning and env.is_main:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    run_dir = Path(out)
    saved = run_dir / "config.yaml"
    if resume and saved.is_file():
        previous = yaml.safe_load(saved.read_text()) or {}
        if previous.get("arch", "rar") != cfg.arch:
            raise UserError(f"--resume: {saved} trained arch {previous.get('arch', 'rar')}, this config arch {cfg.arch}; "
                            "resume with the same --arch")
        before = {k: v for k, v in (previous.get("model") or {}).items() if k != "preset"}  # older runs recorded it
        if before != to_dict(cfg.model):
            raise UserError(f"--resume: the model in {saved} differs from this config's model; resume with the same recipe and flags")
    engine = Engine(cfg.train, env, run_dir, resolved_config=cfg)
    return engine.run(task, resume=resume, stop_after=stop_after)


def cli_overrides(preset: str | None, anneal: tuple[float, float] | None, anneal_unit: str | None,
                  epochs: float | None, order: str | None, arch: str | None = None) -> list[str]:
    """The typed CLI flags as config overrides (applied before the free-form key=value ones)."""
    out = []
    if arch is not None:
        get_family(arch)  # an unknown name: one line naming the choices
        out.append(f"arch={arch}")
    if preset is not None:
        out.append(f"model.preset={preset}")
    if anneal is not None:
        out += [f"anneal.start={anneal[0]}", f"anneal.end={anneal[1]}"]
    if anneal_unit is not None:
        out.append(f"anneal.unit={anneal_unit}")
    if epochs is not None:
        out.append(f"epochs={epochs}")
    if order is not None:
        out.append(f"model.order={canonical_order_name(order)}")
    return out


__all__ = ["TrainARConfig", "ARTrainTask", "train_ar", "resolve_model", "weight_decay_groups", "check_tokenizer_matches"]
