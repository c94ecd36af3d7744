"""Recipe conformance: every full recipe's resolved plan pinned to its anchor, and every full recipe built at
its real size taking one real optimizer step on CPU.

Each number carries the file of the official repository it comes from:
- RAR: bytedance/1d-tokenizer configs/training/generator/rar.yaml ("rar.yaml"), README_RAR.md, and the
  parameter counts of modeling/rar.py built at each size.
- vqgan-f16: LlamaGen tokenizer/tokenizer_image/vq_train.py argparse defaults ("vq_train.py") and vq_loss.py.
- lfq-llamagen-f16: SEED-Voken configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml ("lfqgan_256_L.yaml").
- msvq-f16: VAR models/vqvae.py (vae_ch160v4096z32); VAR published no tokenizer training recipe.
"""

import math

import pytest
import torch
from PIL import Image

from vqtok.config import RECIPES_DIR
from vqtok.train.ar_task import load_run_config
from vqtok.train.plan import ar_plan, tokenizer_plan

IMAGENET_TRAIN = 1_281_167  # rar.yaml experiment.max_train_examples
MASKGIT_MANIFEST = {
    "tokenizer": {"preset": "maskgit-vqgan-f16", "vocab_size": 1024, "scales": [[16, 16]], "tokens_per_view": 256},
    "classes": [f"n{i:08d}" for i in range(1000)], "views": [f"crop{i}" for i in range(10)], "num_samples": IMAGENET_TRAIN,
}
# the official modeling/rar.py built on the meta device at the README_RAR.md sizes
OFFICIAL_RAR_PARAMS = {"b": 260_923_648, "l": 461_668_352, "xl": 955_425_024, "xxl": 1_498_520_704}
# README_RAR.md L68-71: hidden size, layers, intermediate size (16 heads for all)
RAR_SIZES = {"b": (768, 24, 3072), "l": (1024, 24, 4096), "xl": (1280, 32, 5120), "xxl": (1408, 40, 6144)}


def within(value: float, anchor: float, rel: float = 0.002) -> bool:
    return abs(value - anchor) <= rel * anchor


def _header(path) -> str:
    """The recipe's comment header as one line of text."""
    lines = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return " ".join(" ".join(lines).split())


# ------------------------------------------------------------------------------------------ RAR


@pytest.mark.parametrize("size", ["b", "l", "xl", "xxl"])
def test_rar_recipe_plan_is_the_papers(size):
    cfg = load_run_config(f"rar-{size}", ["anneal.start=200", "anneal.end=300"])  # the README's --anneal 200 300
    plan = ar_plan(cfg, MASKGIT_MANIFEST, world=32, length_source="recipe epochs", device="cuda")
    assert plan["global_batch_size"] == 2048  # rar.yaml training.per_gpu_batch_size 64 x 32 GPUs
    assert plan["per_rank_batch_size"] == 64  # rar.yaml per_gpu_batch_size
    assert plan["grad_accum"] == 1  # rar.yaml training.gradient_accumulation_steps
    assert within(plan["steps"], 250_000)  # rar.yaml training.max_train_steps
    assert within(plan["warmup_steps"], 62_500)  # rar.yaml lr_scheduler.params.warmup_steps
    assert within(plan["anneal_start_step"], 125_000)  # rar.yaml model.generator.randomness_anneal_start
    assert within(plan["anneal_end_step"], 187_500)  # rar.yaml model.generator.randomness_anneal_end
    assert plan["lr"] == 4e-4 and plan["end_lr"] == pytest.approx(1e-5)  # rar.yaml learning_rate, end_lr
    assert plan["schedule"] == "linear warm-up, then cosine"  # rar.yaml lr_scheduler.scheduler: cosine
    assert plan["lr_at_step_0"] == pytest.approx(4e-4 / plan["warmup_steps"])
    opt = plan["optimizer"]
    assert opt["kind"] == "adamw" and tuple(opt["betas"]) == (0.9, 0.96)  # rar.yaml optimizer name, beta1, beta2
    assert opt["weight_decay"] == 0.03  # rar.yaml optimizer.params.weight_decay
    assert opt["grad_clip"] == 1.0  # rar.yaml training.max_grad_norm
    assert plan["ema"] is False  # rar.yaml training.use_ema: False
    assert plan["dropout"] == {"dropout": 0.1, "attn_dropout": 0.1, "class_dropout": 0.1}  # rar.yaml dropout, attn_drop, class_label_dropout
    assert plan["seed"] == 42  # rar.yaml training.seed
    assert plan["log_every"] == 50 and plan["preview_every"] == 5000  # rar.yaml log_every, generate_every
    assert plan["parameters"]["total"] == OFFICIAL_RAR_PARAMS[size]  # the official model at this size
    wd = plan["weight_decay_params"]
    assert wd["decayed"] + wd["not_decayed"] == OFFICIAL_RAR_PARAMS[size]
    hidden, depth, inter = RAR_SIZES[size]
    # vqtok decays exactly the Linear weights (ar_task.py docstring): qkv, proj, fc1, fc2, adaLN, lm_head
    per_block = 3 * hidden * hidden + hidden * hidden + 2 * hidden * inter + 6 * hidden * hidden
    assert wd["decayed"] == depth * per_block + 2 * hidden * hidden + 1024 * hidden
    mem = plan["memory"]["gib"]
    assert mem["optimizer"] == pytest.approx(2 * mem["weights"], abs=0.011) and mem["ema"] == 0


def test_rar_l_xl_xxl_are_built_on_the_meta_device_at_their_official_sizes():
    from vqtok.ar.rar import RAR
    from vqtok.train.ar_task import resolve_model

    for size in ("l", "xl", "xxl"):
        cfg = load_run_config(f"rar-{size}")
        mcfg = resolve_model(cfg.model, MASKGIT_MANIFEST)
        assert (mcfg.hidden_size, mcfg.depth, mcfg.intermediate_size, mcfg.num_heads) == (*RAR_SIZES[size], 16)
        with torch.device("meta"):
            model = RAR(mcfg)
        assert sum(p.numel() for p in model.parameters()) == OFFICIAL_RAR_PARAMS[size]
        assert all(p.device.type == "meta" for p in model.parameters())


def test_rar_recipes_differ_only_in_the_preset():
    texts = {size: (RECIPES_DIR / "ar" / f"rar-{size}.yaml").read_text().replace(f"rar-{size}", "rar-X")
             for size in ("b", "l", "xl", "xxl")}
    assert len(set(texts.values())) == 1


@pytest.mark.slow
def test_rar_b_at_full_size_takes_one_real_optimizer_step_on_cpu():
    from vqtok.ar.orders import sample_orders
    from vqtok.ar.rar import RAR, ar_loss
    from vqtok.train.ar_task import ar_optimizer_config, resolve_model, resolve_schedule, weight_decay_groups
    from vqtok.train.engine import build_optimizer

    cfg = load_run_config("rar-b")
    mcfg = resolve_model(cfg.model, MASKGIT_MANIFEST)
    schedule = resolve_schedule(cfg, IMAGENET_TRAIN)
    torch.manual_seed(0)
    model = RAR(mcfg)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_RAR_PARAMS["b"]
    optim_cfg = ar_optimizer_config(cfg, schedule)
    opt = build_optimizer(optim_cfg, weight_decay_groups(model, cfg.optim.weight_decay), torch.device("cpu"))
    for group in opt.param_groups:
        group["lr"] = optim_cfg.lr  # the peak, as at the end of the warm-up
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1024, (1, 256), generator=gen)
    cond = model.condition_ids(torch.tensor([7]))
    orders = sample_orders(1, torch.arange(256), 1.0, generator=gen)
    head_before = model.lm_head.weight.detach().clone()
    model.train()
    loss, acc = ar_loss(*model.forward_conditions(tokens, cond, orders))
    assert abs(loss.item() - math.log(1024)) < 0.5  # about 7 at random init: the uniform distribution over 1024 codes
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
    assert torch.isfinite(norm)
    opt.step()
    assert not torch.equal(model.lm_head.weight, head_before)
    assert model.blocks[0].adaLN_modulation[1].weight.abs().sum() > 0  # zero-initialised adaLN-Zero left zero
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------ tokenizers


def _tok_plan(recipe: str, overrides=()):
    from vqtok.train.tokenizer_task import load_run_config as load_tokenizer_config

    cfg = load_tokenizer_config(recipe, list(overrides))
    return cfg, tokenizer_plan(cfg, IMAGENET_TRAIN, world=8, device="cuda")


def test_vqgan_f16_is_llamagen_vq16():
    cfg, plan = _tok_plan("vqgan-f16")
    q = cfg.model.quantizer.params
    assert (q["codebook_size"], q["dim"], q["l2_norm"], q["beta"]) == (16384, 8, True, 0.25)  # vq_train.py --codebook-size, --codebook-embed-dim, --codebook-l2-norm, --commit-loss-beta
    assert sum(plan["parameters"]["modules"]["tokenizer"].values()) == 71_883_403  # LlamaGen VQ-16 (its paper: "72M")
    assert plan["resolution"] == 256  # vq_train.py --image-size
    assert tuple(cfg.data.scale_range) == (1.0, 1.25) and cfg.data.hflip  # vq_train.py random_crop_arr [256, 320] + RandomHorizontalFlip
    loss = cfg.loss
    assert (loss.l1_weight, loss.l2_weight) == (0.0, 1.0)  # vq_train.py --reconstruction-loss l2, --reconstruction-weight 1.0
    assert loss.perceptual_weight == 1.0  # vq_train.py --perceptual-weight
    assert loss.quantizer_weight == 1.0  # vq_loss.py: codebook terms added unweighted
    assert loss.disc_weight == 0.5 and loss.d_loss_weight == 0.5  # vq_train.py --disc-weight; vq_loss.py multiplies D's loss by it
    assert loss.adaptive_weight is False  # vq_loss.py disc_adaptive_weight=False
    assert loss.disc_start == 20000  # vq_train.py --disc-start
    assert (loss.d_loss, loss.g_loss) == ("hinge", "hinge")  # vq_train.py --disc-loss, --gen-loss
    assert (loss.disc.kind, loss.disc.channels, loss.disc.layers) == ("patchgan", 64, 3)  # vq_train.py --disc-type; vq_loss.py disc_dim, disc_num_layers
    assert plan["parameters"]["modules"]["discriminator"] == 2_765_633  # LlamaGen PatchGAN (ndf 64, 3 layers)
    for name in ("generator", "discriminator"):
        o = plan["optimizers"][name]
        assert o["kind"] == "adam" and o["lr"] == 1e-4  # vq_train.py torch.optim.Adam, --lr
        assert tuple(o["betas"]) == (0.9, 0.95)  # vq_train.py --beta1, --beta2
        assert o["weight_decay"] == 0.0  # vq_train.py: --weight-decay is parsed but not passed to Adam
        assert o["grad_clip"] == 1.0  # vq_train.py --max-grad-norm
        assert o["schedule"] == "constant" and o["warmup_steps"] == 0  # vq_train.py: no scheduler
    assert plan["global_batch_size"] == 128  # vq_train.py --global-batch-size
    assert within(plan["steps"], 40 * IMAGENET_TRAIN / 128)  # vq_train.py --epochs 40
    assert plan["ema"] is False and cfg.train.ema_decay == 0.9999  # vq_train.py --ema (store_true); utils/ema.py decay 0.9999
    assert cfg.train.seed == 0 and cfg.train.ckpt_every == 5000  # vq_train.py --global-seed, --ckpt-every
    assert cfg.train.amp  # vq_train.py --mixed-precision bf16


def test_lfq_recipe_is_open_magvit2s_losses_and_schedule_on_another_autoencoder():
    cfg, plan = _tok_plan("lfq-llamagen-f16")
    q = cfg.model.quantizer.params
    assert q["codebook_size"] == 262144  # lfqgan_256_L.yaml n_embed
    assert q["entropy_weight"] == 0.1  # lfqgan_256_L.yaml lossconfig codebook_weight
    assert q["commitment_weight"] == 0.25  # lfqgan_256_L.yaml commit_weight
    assert q["diversity_gamma"] == 1.0  # lfqgan_256_L.yaml batch_maximization_weight / sample_minimization_weight
    assert q["all_reduce_avg_probs"] is False  # Open-MAGVIT2 computes the batch entropy per GPU
    loss = cfg.loss
    assert (loss.l1_weight, loss.perceptual_weight) == (1.0, 1.0)  # vqperceptual.py pixel + perceptual_weight 1.0
    assert loss.disc_weight == 0.1 and loss.adaptive_weight is False  # lfqgan_256_L.yaml gen_loss_weight (adaptive weight skipped)
    assert loss.g_loss == "non_saturating" and loss.d_loss == "hinge"  # vqperceptual.py
    assert loss.lecam_weight == 0.05 and loss.lecam_decay == 0.999  # lfqgan_256_L.yaml lecam_loss_weight; vqperceptual.py ema decay
    assert loss.disc_start == 0  # lfqgan_256_L.yaml disc_start: 0
    assert loss.disc.kind == "patchgan" and loss.r1_weight == 0  # NLayerDiscriminator (BatchNorm); no R1 in SEED-Voken
    for name in ("generator", "discriminator"):
        o = plan["optimizers"][name]
        assert o["kind"] == "adam" and o["lr"] == 1e-4  # lfqgan_256_L.yaml learning_rate
        assert tuple(o["betas"]) == (0.5, 0.9) and o["weight_decay"] == 0 and o["grad_clip"] == 0  # lfqgan.py Adam (0.5, 0.9)
    assert plan["global_batch_size"] == 256  # lfqgan_256_L.yaml batch_size 8 x devices 8 x num_nodes 4
    assert within(plan["steps"], 270 * IMAGENET_TRAIN / 256)  # lfqgan_256_L.yaml max_epochs 270
    for name in ("generator", "discriminator"):  # lfqgan_256_L.yaml lr_drop_epoch [200, 250]; lfqgan.py lr_drop_rate 0.1
        sched = getattr(cfg.optim, name).schedule
        assert sched.kind == "step" and sched.gamma == 0.1
        assert [round(m / (IMAGENET_TRAIN / 256), 2) for m in sched.milestones] == [200.0, 250.0]
        assert plan["optimizers"][name]["end_lr"] == pytest.approx(1e-6)
    assert plan["ema"] is True and plan["ema_decay"] == 0.999  # lfqgan_256_L.yaml use_ema; ema.py decay 0.999
    header = _header(RECIPES_DIR / "tokenizer" / "lfq-llamagen-f16.yaml")
    assert "NOT Open-MAGVIT2's architecture" in header and "LlamaGen" in header
    assert not (RECIPES_DIR / "tokenizer" / "lfq-f16.yaml").exists()  # no recipe claims to be Open-MAGVIT2 itself


def test_msvq_f16_has_vars_architecture_and_says_the_rest_is_not_vars():
    cfg, plan = _tok_plan("msvq-f16")
    q = cfg.model.quantizer.params
    assert (q["codebook_size"], q["dim"]) == (4096, 32)  # VAR vae_ch160v4096z32
    assert q["patch_nums"] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]  # VAR train.py --pn 256
    assert (q["beta"], q["quant_resi"], q["share_quant_resi"]) == (0.25, 0.5, 4)  # VAR models/vqvae.py defaults
    assert cfg.model.autoencoder.ch == 160 and cfg.model.autoencoder.z_channels == 32  # vae_ch160v4096z32
    assert sum(plan["parameters"]["modules"]["tokenizer"].values()) == 108_948_355  # VAR VQVAE (vae_ch160v4096z32)
    header = _header(RECIPES_DIR / "tokenizer" / "msvq-f16.yaml")
    assert "never released its tokenizer training code" in header and "nothing below except the architecture is VAR's" in header


def test_fsq_f16_uses_the_vqgan_f16_losses_and_schedule():
    fsq, _ = _tok_plan("fsq-f16")
    vq, _ = _tok_plan("vqgan-f16")
    q = fsq.model.quantizer
    assert q.kind == "fsq" and q.params["levels"] == [8, 8, 8, 5, 5, 5]  # FSQ paper (Mentzer et al.): the ~2^16 levels
    assert fsq.loss == vq.loss and fsq.optim == vq.optim and fsq.train == vq.train


@pytest.fixture(scope="module")
def images64(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img64") / "train" / "cls"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder.parent.parent


SMALL_RUN = ["data.resolution=64", "train.batch_size=1", "train.num_workers=0", "data.preview_images=1",
             "loss.lpips_weights=random-for-tests"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["vqgan-f16", "fsq-f16", "lfq-llamagen-f16", "msvq-f16"])
def test_full_size_tokenizer_recipe_takes_one_real_step_with_the_gan_phase(recipe, images64, tmp_path):
    from vqtok.distributed import DistEnv
    from vqtok.train.engine import Engine
    from vqtok.train.tokenizer_task import TokenizerTrainTask
    from vqtok.train.tokenizer_task import load_run_config as load_tokenizer_config

    overrides = list(SMALL_RUN)
    if recipe == "msvq-f16":  # the same weights; at 64 px the 4x4 latent holds scales 1..4 instead of 1..16
        overrides += ["model.resolution=64", "model.quantizer.params.patch_nums=[1,2,3,4]"]
    cfg = load_tokenizer_config(recipe, overrides)
    full = tokenizer_plan(load_tokenizer_config(recipe, ["loss.lpips_weights=random-for-tests"]), IMAGENET_TRAIN, 8)
    task = TokenizerTrainTask(cfg, DistEnv(), images64, tmp_path)
    n_tok = sum(p.numel() for p in task.tokenizer.parameters())
    assert n_tok == sum(full["parameters"]["modules"]["tokenizer"].values())  # the architecture is the full-size one
    phases = task.phases()
    assert [p.name for p in phases] == ["generator", "discriminator"]
    step = cfg.loss.disc_start  # the first step with the adversarial terms on and D training
    before = {p.name: [q.detach().clone() for q in p.module.parameters()][:4] for p in phases}
    engine = Engine(cfg.train, DistEnv(), tmp_path)
    metrics = engine.train_step(task, next(task.batches(step)), step).floats()
    for key in ("loss", "quant", "g_adv", "d_loss", "d_total"):
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics)
    if cfg.loss.lecam_weight > 0:
        assert math.isfinite(metrics["lecam"])
    for p in phases:
        after = list(p.module.parameters())[:4]
        assert any(not torch.equal(a, b) for a, b in zip(after, before[p.name])), p.name
