"""Training plans for `--dry-run`: what a run will do, resolved without training and without opening a shard.

`ar_plan` / `tokenizer_plan` resolve the recipe, the overrides, the data size (the token manifest, or the
image listing) and the world size (`WORLD_SIZE` from the torchrun environment; no process group is
started) into a JSON-able dict; `write_plan` puts it in RUN/plan.json next to the resolved RUN/config.yaml
and `format_plan` prints it. Models are built on the meta device (shapes only: no weights are allocated),
so the plan of RAR-XXL costs about a second.

Memory estimate per rank (bytes; `memory` in plan.json, every term listed):

    weights      = 4 x params of the trained modules            fp32 master weights (autocast casts per op)
    gradients    = 4 x trainable params
    optimizer    = 8 x trainable params                         Adam/AdamW: exp_avg and exp_avg_sq in fp32
    ema          = 4 x params of EMA-tracked modules            when train.ema is on
    frozen       = 4 x params of frozen modules on the device   LPIPS trunk; the tokenizer that decodes previews
    activations  = what autograd saves for backward in one forward pass of one micro-batch
                   (per-rank batch / grad_accum), counted tensor by tensor with saved-tensor hooks on the meta
                   device: 4 bytes per float in fp32, 2 under bf16 autocast (train.amp on CUDA; autocast saves
                   matmul and conv inputs in bf16, and the fp32 norm statistics are a small share). Attention is
                   counted as SDPA's fused kernels store it (q, k, v, output, log-sum-exp), not the N x N
                   probabilities. With model.grad_checkpointing (RAR): the activations outside the blocks, the
                   inputs each block keeps, and one block's activations while it is recomputed. For the tokenizer it is the larger of the two phases: generator (encoder,
                   decoder, the LPIPS trunk and D on the reconstruction) and discriminator (D on real and fake).
    total        = the sum; not included: the CUDA context and allocator fragmentation (typically 1-3 GiB),
                   data-loader buffers, and transient workspace of single kernels.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vqtok.config import save_config, to_dict
from vqtok.errors import UserError

GIB = 2**30


# ------------------------------------------------------------------------------------------ counting


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun); no process group is started."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise UserError(f"WORLD_SIZE must be a positive integer, got '{raw}'") from None
    if world < 1:
        raise UserError(f"WORLD_SIZE must be a positive integer, got {world}")
    return world


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def params_by_module(model: nn.Module) -> dict[str, int]:
    """Parameters of each top-level child, plus the model's own (e.g. positional tables) as 'own'."""
    out = {name: count_params(child) for name, child in model.named_children() if count_params(child)}
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        out["own"] = own
    return out


class _FusedAttentionShape(torch.autograd.Function):
    """Stands in for SDPA on the meta device: the output shape, saving what the fused kernels save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: meta tensors only carry shapes
        raise RuntimeError("shape-only attention has no backward")


@contextmanager
def _fused_attention_on_meta():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.device.type != "meta":
            return original(q, k, v, *args, **kwargs)
        return _FusedAttentionShape.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activation_bytes(forward: Callable[[], Any], modules: list[nn.Module], float_bytes: int) -> int:
    """Bytes autograd keeps for backward while `forward()` runs (on meta tensors): each saved tensor (or the
    tensor it is a view of) counted once; parameters are not activations. Floats count `float_bytes` each."""
    param_ids = {id(p) for m in modules for p in m.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        base = t._base if t._base is not None else t
        if id(base) in param_ids or id(t) in param_ids or id(base) in seen:
            return t
        seen.add(id(base))
        size = float_bytes if base.dtype.is_floating_point else base.element_size()
        total += base.numel() * size
        return t

    with _fused_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def memory_estimate(trained: list[nn.Module], ema: list[nn.Module], frozen: list[nn.Module], activations: int) -> dict:
    trainable = sum(count_params(m, trainable_only=True) for m in trained)
    terms = {
        "weights": 4 * sum(count_params(m) for m in trained),
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "ema": 4 * sum(count_params(m) for m in ema),
        "frozen": 4 * sum(count_params(m) for m in frozen),
        "activations": int(activations),
    }
    terms["total"] = sum(terms.values())
    return {"bytes": terms, "gib": {k: round(v / GIB, 2) for k, v in terms.items()},
            "formula": "weights 4P + gradients 4P + AdamW 8P + EMA 4P_ema + frozen 4P_frozen + saved activations "
                       "of one micro-batch (meta-device count; 2 bytes/float under bf16 autocast); see vqtok/train/plan.py"}


def _float_bytes(amp: bool, device: str) -> tuple[int, str]:
    if amp and device == "cuda":
        return 2, "bf16 autocast"
    return 4, "fp32"


def _lr_points(optim, steps: int) -> dict[str, float]:
    """Learning rates of an optimizer config whose schedule counts steps (optim.in_steps)."""
    from vqtok.train.optim import learning_rate

    return {"lr_at_step_0": learning_rate(optim, 0, steps), "lr": optim.lr,
            "lr_at_last_step": learning_rate(optim, steps - 1, steps),
            "end_lr": learning_rate(optim, max(steps, int(optim.schedule.warmup)), steps)}


def _schedule_name(schedule) -> str:
    after = {"constant": "constant", "cosine": "cosine", "linear": "linear decay", "step": "step drops"}[schedule.kind]
    return f"linear warm-up, then {after}" if int(schedule.warmup) > 0 else after


def _batches(train, world: int) -> dict[str, int]:
    train.validate(world)
    per_rank = train.batch_size // world
    return {"global_batch_size": train.batch_size, "world_size": world, "per_rank_batch_size": per_rank,
            "grad_accum": train.grad_accum, "micro_batch_size": per_rank // train.grad_accum}


# ------------------------------------------------------------------------------------------ train-ar


def ar_plan(cfg, manifest: dict, world: int, length_source: str, device: str = "cuda",
            tokenizer_config: dict | None = None) -> dict:
    """The plan of a `train-ar` run (cfg: TrainARConfig, resolved in place as the run would)."""
    from vqtok.ar.families import get_family
    from vqtok.train.ar_task import ar_optimizer_config, resolve_model, resolve_schedule, weight_decay_groups

    family = get_family(cfg.arch)
    model_cfg = cfg.model = resolve_model(cfg.model, manifest, cfg.arch)
    schedule = resolve_schedule(cfg, int(manifest["num_samples"]))
    batches = _batches(cfg.train, world)
    optim = ar_optimizer_config(cfg, schedule)
    with torch.device("meta"):
        model = family.model_cls(model_cfg)
    groups = weight_decay_groups(model, cfg.optim.weight_decay)
    frozen = []
    if tokenizer_config is not None:
        from vqtok.tokenizer.tokenizer import build_tokenizer

        with torch.device("meta"):
            frozen.append(build_tokenizer(tokenizer_config))
        if family.bind_tokenizer is not None:  # VAR's loss builds its inputs from the tokenizer's codebook
            family.bind_tokenizer(model, frozen[0])
    float_bytes, precision = _float_bytes(cfg.train.amp, device)
    b = batches["micro_batch_size"]
    tokens = torch.zeros(b, model_cfg.seq_len, dtype=torch.long, device="meta")
    cond = torch.zeros(b, dtype=torch.long, device="meta")
    orders = torch.arange(model_cfg.seq_len, device="meta").expand(b, model_cfg.seq_len) if family.trains_on_orders else None
    model.train()
    checkpointed = model_cfg.grad_checkpointing

    def count(checkpointing: bool) -> int:
        model.config.grad_checkpointing = checkpointing
        try:
            return saved_activation_bytes(lambda: family.train_loss(model, tokens, cond, orders), [model], float_bytes)
        finally:
            model.config.grad_checkpointing = checkpointed

    activations = count(False)
    if checkpointed:
        # checkpointed blocks keep only their inputs (residual stream x and per-token condition c, fp32) and
        # recompute one block at a time in backward: outside-block activations + depth x inputs + one block
        outside = count(True)
        per_block = (activations - outside) / model_cfg.depth
        width = next(getattr(model_cfg, k) for k in ("hidden_size", "embed_dim", "dim") if hasattr(model_cfg, k))
        inputs = 2 * b * (model_cfg.seq_len + 2) * width * 4
        activations = int(outside + model_cfg.depth * inputs + per_block)
    spe = schedule.steps_per_epoch
    plan = {
        "command": "train-ar",
        "arch": cfg.arch,
        "num_samples": schedule.num_samples,
        **batches,
        "steps": schedule.steps,
        "steps_per_epoch": round(spe, 3),
        "epochs": round(schedule.steps / spe, 3),
        "run_length_from": length_source,
        "warmup_steps": schedule.warmup_steps,
        "anneal_start_step": schedule.anneal_start_step,
        "anneal_end_step": schedule.anneal_end_step,
        "anneal": {"start": cfg.anneal.start, "end": cfg.anneal.end, "unit": cfg.anneal.unit},
        **_lr_points(optim, schedule.steps),
        "schedule": _schedule_name(optim.schedule),
        "optimizer": {"kind": optim.kind, "betas": list(optim.betas), "weight_decay": optim.weight_decay,
                      "grad_clip": optim.grad_clip},
        "weight_decay_params": {"decayed": sum(p.numel() for p in groups[0]["params"]),
                                "not_decayed": sum(p.numel() for p in groups[1]["params"]),
                                "decayed_tensors": len(groups[0]["params"]), "not_decayed_tensors": len(groups[1]["params"])},
        "ema": cfg.train.ema,
        "ema_decay": cfg.train.ema_decay if cfg.train.ema else None,
        # each family's dropout fields as its config names them (RAR: dropout, attn_dropout, class_dropout)
        "dropout": {k: v for k, v in to_dict(model_cfg).items() if "drop" in k},
        "order": "next-scale" if family.multiscale_tokens else (getattr(model_cfg, "order", None) or "raster"),
        "seed": cfg.train.seed,
        "ckpt_every": cfg.train.ckpt_every,
        "preview_every": cfg.train.preview_every,
        "log_every": cfg.train.log_every,
        "parameters": {"total": count_params(model), "trainable": count_params(model, True),
                       "modules": {"generator": params_by_module(model)}},
        "precision": precision,
        "memory": memory_estimate([model], [model] if cfg.train.ema else [], frozen, activations),
    }
    if frozen:
        plan["parameters"]["frozen"] = {"tokenizer": count_params(frozen[0])}
    return plan


# ------------------------------------------------------------------------------------ train-tokenizer


def tokenizer_plan(cfg, num_images: int, world: int, device: str = "cuda") -> dict:
    """The plan of a `train-tokenizer` run (cfg: TrainTokenizerConfig, resolved in place)."""
    from vqtok.losses.discriminators import build_discriminator
    from vqtok.train.tokenizer_task import resolve_model
    from vqtok.tokenizer.tokenizer import build_tokenizer

    if num_images < 1:
        raise UserError("found no images to train on")
    tok_cfg = resolve_model(cfg)
    batches = _batches(cfg.train, world)
    steps = cfg.train.steps
    res = cfg.data.resolution
    loss = cfg.loss
    float_bytes, precision = _float_bytes(cfg.train.amp, device)
    with torch.device("meta"):
        tokenizer = build_tokenizer(tok_cfg)
        disc = build_discriminator(loss.disc, res) if loss.disc_weight > 0 else None
        lpips_trunk = _lpips_trunk() if loss.perceptual_weight > 0 else None
    tokenizer.train()
    b = batches["micro_batch_size"]
    images = torch.zeros(b, 3, res, res, device="meta")
    frozen = [lpips_trunk] if lpips_trunk is not None else []
    for m in frozen:
        m.requires_grad_(False)

    def generator_pass():
        recon = tokenizer.decode_latent(tokenizer.encode_latent(images))
        if lpips_trunk is not None:
            lpips_trunk(recon, images)
        if disc is not None:
            disc.requires_grad_(False)
            disc(recon)
            disc.requires_grad_(True)

    models = [tokenizer] + ([disc] if disc is not None else []) + frozen
    g_act = saved_activation_bytes(generator_pass, models, float_bytes)
    d_act = 0
    if disc is not None:
        disc.train()
        d_act = saved_activation_bytes(lambda: (disc(images), disc(images)), models, float_bytes)
    trained = [tokenizer] + ([disc] if disc is not None else [])
    from vqtok.train.optim import in_steps

    spe = num_images / cfg.train.batch_size
    phases = {"generator": in_steps(cfg.optim.generator, spe)}
    if disc is not None:
        phases["discriminator"] = in_steps(cfg.optim.discriminator, spe)
    optim = {}
    for name, oc in phases.items():
        module = tokenizer if name == "generator" else disc
        n = count_params(module, True)
        optim[name] = {"kind": oc.kind, "betas": list(oc.betas), "weight_decay": oc.weight_decay, "grad_clip": oc.grad_clip,
                       "warmup_steps": int(oc.schedule.warmup), "schedule": oc.schedule.kind,
                       **_lr_points(oc, steps),
                       "decayed_params": n if oc.weight_decay > 0 else 0, "not_decayed_params": 0 if oc.weight_decay > 0 else n}
    modules = {"tokenizer": params_by_module(tokenizer)}
    if disc is not None:
        modules["discriminator"] = count_params(disc)
    gen = optim["generator"]
    plan = {
        "command": "train-tokenizer",
        "num_images": num_images,
        "resolution": res,
        **batches,
        "steps": steps,
        "steps_per_epoch": round(spe, 3),
        "epochs": round(steps / spe, 3),
        "run_length_from": "train.steps",
        "warmup_steps": gen["warmup_steps"],
        "lr_at_step_0": gen["lr_at_step_0"], "lr": gen["lr"], "end_lr": gen["end_lr"],
        "optimizers": optim,
        "weight_decay_params": {"decayed": sum(o["decayed_params"] for o in optim.values()),
                                "not_decayed": sum(o["not_decayed_params"] for o in optim.values())},
        "disc_start_step": loss.disc_start if disc is not None else None,
        "losses": {k: getattr(loss, k) for k in ("l1_weight", "l2_weight", "perceptual_weight", "quantizer_weight", "disc_weight",
                                                  "adaptive_weight", "d_loss", "g_loss", "lecam_weight", "r1_weight")},
        "ema": cfg.train.ema,
        "ema_decay": cfg.train.ema_decay if cfg.train.ema else None,
        "seed": cfg.train.seed,
        "ckpt_every": cfg.train.ckpt_every,
        "preview_every": cfg.train.preview_every,
        "log_every": cfg.train.log_every,
        "parameters": {"total": sum(count_params(m) for m in trained), "trainable": sum(count_params(m, True) for m in trained),
                       "modules": modules, "frozen": {"lpips_vgg16": count_params(lpips_trunk)} if lpips_trunk is not None else {}},
        "precision": precision,
        "activations_by_phase": {"generator": g_act, "discriminator": d_act},
        "memory": memory_estimate(trained, [tokenizer] if cfg.train.ema else [], frozen, max(g_act, d_act)),
    }
    return plan


def _lpips_trunk() -> nn.Module:
    """The LPIPS-VGG network's architecture (random weights: only shapes matter for the estimate)."""
    import warnings

    import lpips

    with warnings.catch_warnings():  # torchvision's 'pretrained' deprecation notes: not the user's concern here
        warnings.simplefilter("ignore")
        trunk = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    # its scaling buffers are made on the CPU whatever the default device: move them to meta too
    return trunk.to("meta")


# ------------------------------------------------------------------------------------------ output


def write_plan(run_dir: str | Path, plan: dict, resolved_config: Any) -> Path:
    """RUN/plan.json and RUN/config.yaml (each written atomically); on rank 0 only."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; pass a directory")
    if (run_dir / "checkpoints").is_dir() or (run_dir / "final").exists():
        raise UserError(f"--out {run_dir} holds a training run; a dry run would replace its config.yaml, so give it another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    tmp.replace(path)
    save_config(resolved_config, run_dir / "config.yaml")
    return path


def _n(x: float | int) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:.4g}"


def format_plan(plan: dict) -> str:
    """The plan as aligned lines for the terminal."""
    lines = [f"plan for {plan['command']} (dry run: nothing trained)"]

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<28}{value}")

    data = plan.get("num_samples", plan.get("num_images"))
    row("data", f"{_n(data)} {'source images (token manifest)' if 'num_samples' in plan else 'images'}")
    row("world size", f"{plan['world_size']} (WORLD_SIZE)")
    row("batch", f"global {_n(plan['global_batch_size'])} = {plan['world_size']} ranks x {_n(plan['per_rank_batch_size'])}"
                 f" per rank ({plan['grad_accum']} x {_n(plan['micro_batch_size'])} micro-batch)")
    row("steps", f"{_n(plan['steps'])} ({plan['epochs']:,.2f} epochs, {plan['steps_per_epoch']:.2f} steps/epoch; "
                 f"length from {plan['run_length_from']})")
    row("warm-up", f"{_n(plan['warmup_steps'])} steps")
    if "anneal_start_step" in plan:
        a = plan["anneal"]
        row("annealing", f"r = 1 until step {_n(plan['anneal_start_step'])}, linear to 0 at step {_n(plan['anneal_end_step'])} "
                         f"({a['start']:g} -> {a['end']:g} {a['unit']})")
    row("learning rate", f"{plan['lr_at_step_0']:.3g} at step 0, peak {plan['lr']:.3g}, end {plan['end_lr']:.3g}")
    if "optimizer" in plan:
        o = plan["optimizer"]
        row("optimizer", f"AdamW betas {tuple(o['betas'])}, weight decay {o['weight_decay']:g}, clip {o['grad_clip']:g}")
    for name, o in plan.get("optimizers", {}).items():
        row(f"optimizer ({name})", f"{o['kind']} lr {o['lr']:.3g} betas {tuple(o['betas'])}, wd {o['weight_decay']:g}, "
                                    f"clip {o['grad_clip']:g}, {o['schedule']} (end {o['end_lr']:.3g})")
    wd = plan["weight_decay_params"]
    row("weight decay on", f"{_n(wd['decayed'])} parameters; not on {_n(wd['not_decayed'])}")
    if plan.get("disc_start_step") is not None:
        row("discriminator", f"from step {_n(plan['disc_start_step'])}")
    if "dropout" in plan:
        d = plan["dropout"]
        row("dropout", ", ".join(f"{k} {v:g}" for k, v in d.items()) + f"; order {plan['order']}")
    row("EMA", f"on, decay {plan['ema_decay']:g}" if plan["ema"] else "off")
    row("checkpoints", f"every {_n(plan['ckpt_every'])} steps (previews every {_n(plan['preview_every'])}, log every {plan['log_every']})")
    p = plan["parameters"]
    row("parameters", f"{_n(p['total'])} trained ({_n(p['trainable'])} trainable)")
    for group, modules in p["modules"].items():
        if isinstance(modules, dict):
            row(f"  {group}", ", ".join(f"{k} {_n(v)}" for k, v in modules.items()))
        else:
            row(f"  {group}", _n(modules))
    for name, count in p.get("frozen", {}).items():
        row(f"  frozen {name}", _n(count))
    m = plan["memory"]["gib"]
    row("memory per rank", f"~{m['total']:.1f} GiB ({plan['precision']}): weights {m['weights']:.2f} + grads {m['gradients']:.2f} "
                           f"+ optimizer {m['optimizer']:.2f} + EMA {m['ema']:.2f} + frozen {m['frozen']:.2f} "
                           f"+ activations {m['activations']:.2f}")
    return "\n".join(lines)


__all__ = ["ar_plan", "tokenizer_plan", "write_plan", "format_plan", "world_size_from_env", "saved_activation_bytes",
           "memory_estimate"]


# ------------------------------------------------------------------------------------------ entries


def plan_device(device: str | None) -> str:
    """The device type the run would use: `--device` as given (a dry run may plan a GPU run on a laptop),
    else CUDA when present, else CPU."""
    if device:
        return device.split(":")[0]
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_tokenizer_dir(path: Path) -> tuple[dict, dict]:
    """(identity from tokenizer.json, architecture from config.yaml) of a tokenizer checkpoint, weights unread."""
    import yaml

    from vqtok.tokenizer.tokenizer import IDENTITY_FILE

    files = {name: path / name for name in (IDENTITY_FILE, "config.yaml")}
    for name, f in files.items():
        if not f.is_file():
            raise UserError(f"tokenizer checkpoint {path} has no {name}; pass a directory written by vqtok (train-tokenizer or convert)")
    try:
        identity = json.loads(files[IDENTITY_FILE].read_text())
        arch = yaml.safe_load(files["config.yaml"].read_text()) or {}
    except (json.JSONDecodeError, yaml.YAMLError):
        raise UserError(f"tokenizer checkpoint {path} has an unreadable {IDENTITY_FILE} or config.yaml") from None
    return identity, arch


def dry_run_ar(tokens_dir: str | Path, tokenizer: str | Path, out: str | Path, config=None, overrides=(), device=None) -> dict:
    """`train-ar --dry-run`: plan from the manifest alone (no shard opened, no weights read, nothing trained)."""
    from vqtok.data.token_shards import read_manifest
    from vqtok.train.ar_task import check_tokenizer_matches, load_run_config, run_length_source
    from vqtok.config import load_yaml, resolve_recipe
    from vqtok.train.ar_task import default_recipe

    cfg = load_run_config(config, overrides)
    config = config if config is not None else default_recipe(overrides)
    source_data = config if isinstance(config, dict) else load_yaml(resolve_recipe(config, "ar"))
    length_source = run_length_source(source_data, overrides)
    from vqtok.run_dirs import resolve_checkpoint

    tokenizer = resolve_checkpoint(tokenizer, "--tokenizer")
    if not tokenizer.exists():
        raise UserError(f"tokenizer checkpoint {tokenizer} does not exist")
    manifest = read_manifest(tokens_dir)
    identity, arch = _read_tokenizer_dir(tokenizer)
    check_tokenizer_matches(manifest, identity, Path(tokens_dir), tokenizer)
    plan = ar_plan(cfg, manifest, world_size_from_env(), length_source, plan_device(device), arch)
    plan.update({"tokens": str(tokens_dir), "tokenizer": str(tokenizer), "config": str(config)})
    _emit(out, plan, cfg)
    return plan


def dry_run_tokenizer(data: str | Path, out: str | Path, config=None, overrides=(), device=None, lpips_weights=None) -> dict:
    """`train-tokenizer --dry-run`: plan from the image listing (file names only; no image decoded)."""
    from vqtok.data.images import list_images
    from vqtok.train.tokenizer_task import load_run_config

    cfg = load_run_config(config, overrides, lpips_weights)
    if not Path(data).exists():
        raise UserError(f"data path {data} does not exist")
    listing = list_images(data, split=cfg.data.split)
    plan = tokenizer_plan(cfg, len(listing.records), world_size_from_env(), plan_device(device))
    plan.update({"data": str(data), "config": str(config)})
    _emit(out, plan, cfg)
    return plan


def _emit(out: str | Path, plan: dict, cfg: Any) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = write_plan(out, plan, cfg)
    print(format_plan(plan), flush=True)
    print(f"wrote {path} and {Path(out) / 'config.yaml'}", flush=True)
