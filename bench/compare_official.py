"""vqtok against the official implementations, side by side in one process tree.

    python bench/compare_official.py --peers ../shared/peers --deps /work/benchdeps
    python bench/compare_official.py --peers ../shared/peers --only rar_sampling,maskgit_encode --json out.json
    python bench/compare_official.py --peers .peers --device cuda --only var_sampling,var_sampling_bf16,llamagen_sampling,llamagen_sampling_bf16

On a CUDA device (`--device cuda`, the generator cases only) both sides run there at the released models'
sizes (VAR-d16 and GPT-B, batch 32 each; the CPU sizes are below), each timed run ends with a synchronize,
and the same-seed share of equal codes is recorded but not required (the official attention and vqtok's SDPA
may round differently on a GPU). bench/gpu_run.sh runs this after the GPU suite when bench/gpu_prepare.sh
has copied the peers into .peers/.

Each case runs in its own child process (so one peer's imports and memory never touch another case). Inside
it the official model is built, its state dict is converted to vqtok through vqtok's own interop
(vqtok.interop.*), both get the same inputs, batch and `torch.set_num_threads`, and the two run ALTERNATELY
(official, vqtok, vqtok, official, ...) after a warm-up each, so load from other work hits both alike.
Printed per case: median and minimum of both, and official / vqtok (> 1: vqtok is faster), the same
ratio of the median CPU seconds of this process per run (steadier than wall time when other jobs share
the cores), and the 1-minute load average before and after. `--budget-min` (default 13) keeps the whole script
under that wall time on slower machines: each case gets an equal share of what is left when it starts and runs
fewer timed rounds (never fewer than 2 per side) when the next one would pass its share; the cut is printed.

Cases:
  rar_sampling     official `RAR.generate` vs the `vqtok sample` token loop (vqtok.app.sample.sample_tokens),
                   hidden 256 / depth 8 / 8 heads (11M), batch 16, CFG 4.0 power-cosine (pow 2.75), 256 tokens
  rar_train_h768   one training step (forward + loss + backward + clipping + AdamW), batch 8 x 256 tokens,
  rar_train_h256   random orders (r = 1), dropout 0.1, class dropout 0.1; hidden 768 / depth 4 / 16 heads and
                   hidden 256 / depth 8 / 8 heads; each side's matmul GFLOP/s as a fraction of an fp32 GEMM
                   measured in the same process
  maskgit_encode   official `PretrainedTokenizer.encode` vs vqtok's converted maskgit-vqgan-f16, 256 px,
                   batch 10; the indices must be identical
  var_sampling     official `VAR.autoregressive_infer_cfg` vs the `vqtok sample` token loop (per-sample noise, VAR's
                   KV-cached decoder), depth 6 (width 384), batch 8, cfg 1.5 ramp, top-k 900, top-p 0.96, 680
                   tokens, tokens only; the codes must be identical when vqtok draws from the official's seed.
                   On the CPU one more profiled run per side sums the time in the kernels both run (GEMMs,
                   SDPA, GELU; the smaller side's per group): `floor_s`, and `ratio_bound` = official / floor,
                   the most any sampler on those kernels could reach here
  vqgan_train_step LlamaGen's vq_train.py step (VQ-16 VQModel + VQLoss: l2 + LPIPS + PatchGAN hinge, Adam
                   (0.9, 0.95), clipping 1.0, EMA, then the discriminator step) vs one vqtok Engine step of
                   TokenizerTrainTask with the same settings; 64 px, batch 4, discriminator on from step 0,
                   the same (random) VGG16 LPIPS trunk on both sides, the official PatchGAN weights loaded
                   into vqtok's
  var_sampling_bf16 var_sampling with both timed sides under torch.autocast("cpu", bfloat16) (the official
                   demo samples under autocast; vqtok's `--dtype bf16`); only with --only (bf16 GEMMs are
                   fast only on CPUs with AVX512-BF16 / AMX). The float32 checks run first, then the two
                   sides' teacher-forced logits under autocast are compared (printed, bounded) and the share
                   of equal codes with the same seed is printed (bf16 rounds differently on each side)
  llamagen_sampling official LlamaGen `generate` vs the `vqtok sample` token loop (vqtok.ar.sampling.sample
                   with the run's per-sample noise and the family's KV-cached decoder), c2i GPT with the GPT-B
                   layout scaled to dim 384 / 6 layers / 6 heads (16M, 16384 codes), batch 8, 256 tokens, the
                   release's published FID settings (constant CFG 2.0, top-k 0, top-p 1.0, temperature 1.0);
                   the codes must be identical when vqtok draws from the re-seeded global generator as the
                   official does
  llamagen_sampling_bf16 llamagen_sampling with each side's own bf16 (only with --only): the official model
                   cast to bf16 (as its sample_c2i.py --precision bf16 does), vqtok under bf16 autocast (its
                   `--dtype bf16`); the float32 check runs first, the bf16 share of equal codes is printed

Weights are random (the timing does not depend on them): the official checkpoints cannot be downloaded
here. The official code needs a few packages vqtok does not (timm, einops, omegaconf, requests); install
them outside vqtok's environment and pass the folder with --deps:

    pip install --no-deps --target /work/benchdeps timm einops omegaconf antlr4-python3-runtime==4.9.3 \\
        requests urllib3 idna certifi charset-normalizer

What cannot be imported or run on a CPU without network is stubbed, and every stub is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

CASES = ["rar_sampling", "rar_train_h768", "rar_train_h256", "maskgit_encode", "vqgan_train_step", "var_sampling",
         "llamagen_sampling", "var_sampling_bf16", "llamagen_sampling_bf16"]
DEVICE_CASES = {"var_sampling", "var_sampling_bf16", "llamagen_sampling", "llamagen_sampling_bf16"}  # also run with --device cuda
OPT_IN = {"var_sampling_bf16", "llamagen_sampling_bf16"}  # run with --only: bf16 GEMMs are fast only on CPUs with AVX512-BF16 / AMX
PEER_OF = {"rar_sampling": "1d-tokenizer", "rar_train_h768": "1d-tokenizer", "rar_train_h256": "1d-tokenizer",
           "maskgit_encode": "1d-tokenizer", "vqgan_train_step": "LlamaGen", "var_sampling": "VAR",
           "llamagen_sampling": "LlamaGen", "var_sampling_bf16": "VAR", "llamagen_sampling_bf16": "LlamaGen"}
GOALS = {"rar_sampling": 3.0, "rar_train_h768": 1.0, "rar_train_h256": 1.0, "maskgit_encode": 1.2, "vqgan_train_step": 1.2,
         "var_sampling": 2.0, "llamagen_sampling": 2.0, "var_sampling_bf16": 2.0, "llamagen_sampling_bf16": 2.0}
# packages the official code imports that vqtok does not depend on (module -> pip name)
PEER_PACKAGES = {"1d-tokenizer": {"timm": "timm", "einops": "einops", "omegaconf": "omegaconf antlr4-python3-runtime==4.9.3"},
                 "LlamaGen": {}, "VAR": {}}
REPO = Path(__file__).resolve().parent.parent
STUBS: list[str] = []
CPU_TIMES: dict[str, list[float]] = {}  # CPU seconds of each timed run of the last `alternate`, per side
MIN_REPEATS = 2  # timed runs per side that the time budget never cuts (one A B and one B A round)
BUDGET = {"case_s": float("inf"), "t0": time.perf_counter()}  # this case's share of --budget-min, from its start


class Missing(Exception):
    """A path or package the comparison needs is absent: the message says which and what to do."""


# ------------------------------------------------------------------------------------------- setup


def check_paths(peers: Path, deps: list[Path], cases: list[str]) -> None:
    if not peers.is_dir():
        raise Missing(f"--peers {peers} does not exist (it should hold checkouts of the official repositories in 1d-tokenizer/ and LlamaGen/)")
    for name in sorted({PEER_OF[c] for c in cases}):
        if not (peers / name).is_dir():
            raise Missing(f"{peers / name} is missing: the official {name} source tree is needed for "
                          f"{', '.join(c for c in cases if PEER_OF[c] == name)}")
    for d in deps:
        if not d.is_dir():
            raise Missing(f"--deps {d} does not exist (install the peers' packages there with "
                          f"pip install --no-deps --target {d} ...)")


def stub(name: str, reason: str, **attrs) -> types.ModuleType:
    """Insert a module (and its parents) into sys.modules and record it."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            sys.modules[sub] = types.ModuleType(sub)
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[sub])
    module = sys.modules[name]
    for k, v in attrs.items():
        setattr(module, k, v)
    STUBS.append(f"{name}: {reason}")
    return module


def importable(name: str) -> str | None:
    """None when `name` imports, else the error text."""
    import importlib

    try:
        importlib.import_module(name)
        return None
    except Exception as exc:  # noqa: BLE001 (a broken install is as missing as an absent one)
        return f"{type(exc).__name__}: {exc}"


def setup_peer(peers: Path, name: str, deps: list[Path]) -> None:
    """Put the peer tree and --deps on sys.path, require its real packages, stub what only serves hubs/GPUs."""
    for d in reversed(deps):
        sys.path.insert(0, str(d))
    sys.path.insert(0, str(peers / name))
    missing = [(mod, pip, err) for mod, pip in PEER_PACKAGES[name].items() if (err := importable(mod)) is not None]
    if missing:
        lines = "; ".join(f"{mod} ({err})" for mod, _, err in missing)
        pips = " ".join(pip for _, pip, _ in missing)
        where = deps[0] if deps else "/work/benchdeps"
        raise Missing(f"the official {name} code needs packages that are not importable: {lines}. Install them with "
                      f"`pip install --no-deps --target {where} {pips}` and pass --deps {where}")
    if name == "1d-tokenizer":
        if importable("accelerate.utils.operations") is not None:
            # modeling/quantizer/quantizer.py imports accelerate's `gather` (multi-GPU stats) at module level
            stub("accelerate.utils.operations", "gather() is only called in multi-process training; identity stub",
                 gather=lambda x: x)
        if importable("huggingface_hub") is not None:
            class PyTorchModelHubMixin:  # TiTok's hub upload/download mixin; the benchmark never uses the hub
                def __init_subclass__(cls, **kwargs):
                    super().__init_subclass__()

            stub("huggingface_hub", "PyTorchModelHubMixin (hub upload/download mixin of TiTok) as an empty base class",
                 PyTorchModelHubMixin=PyTorchModelHubMixin)
    if importable("requests") is not None:
        stub("requests", "only used by the LPIPS modules to download weights, which the benchmark never does")


def load_avg() -> float:
    return os.getloadavg()[0]


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Warm each up, then time them in alternating order (A B, B A, A B, ...); returns {name: [seconds]}."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    CPU_TIMES.clear()
    for r in range(repeats):
        round_t = time.perf_counter()
        for n in (names if r % 2 == 0 else names[::-1]):
            t, c = time.perf_counter(), time.process_time()
            fns[n]()
            times[n].append(time.perf_counter() - t)
            CPU_TIMES.setdefault(n, []).append(time.process_time() - c)
        spent, last_round = time.perf_counter() - BUDGET["t0"], time.perf_counter() - round_t
        if r + 1 >= MIN_REPEATS and r + 1 < repeats and spent + last_round > BUDGET["case_s"]:
            print(f"  timed runs cut to {r + 1} per side (of {repeats}): another round would pass this case's "
                  f"{BUDGET['case_s']:.0f} s share of --budget-min", flush=True)
            break
    return times


def synced(fns: dict, device) -> dict:
    """The same callables, each followed by a CUDA synchronize on a CUDA device (so the wall time of a run
    covers the work it queued); unchanged on the CPU."""
    if device.type != "cuda":
        return fns
    import torch

    def wrap(fn):
        def run():
            fn()
            torch.cuda.synchronize(device)
        return run
    return {name: wrap(fn) for name, fn in fns.items()}


def check_codes(same: float, device, what: str) -> None:
    """On the CPU the two sides' codes from one seed must be identical (the same kernels run on both); on a
    GPU their kernels may round differently (the official's attention is not SDPA), so the share is printed
    and recorded but not required."""
    if same < 1.0 and device.type == "cpu":
        raise RuntimeError(f"vqtok's {what} does not reproduce the official codes with the same seed")


def summary(times: dict[str, list[float]]) -> dict:
    off, mine = times["official"], times["vqtok"]
    out = {"official_s": statistics.median(off), "vqtok_s": statistics.median(mine),
           "official_min_s": min(off), "vqtok_min_s": min(mine), "repeats": len(off)}
    out["ratio"] = out["official_s"] / out["vqtok_s"]
    out["ratio_min"] = out["official_min_s"] / out["vqtok_min_s"]
    if len(CPU_TIMES.get("official", [])) == len(off) and len(CPU_TIMES.get("vqtok", [])) == len(mine):
        # this process's CPU seconds per run (user + system): with other jobs on the cores, steadier than wall time
        out["official_cpu_s"], out["vqtok_cpu_s"] = statistics.median(CPU_TIMES["official"]), statistics.median(CPU_TIMES["vqtok"])
        out["ratio_cpu"] = out["official_cpu_s"] / out["vqtok_cpu_s"]
    return out


# the ATen CPU kernels that carry a transformer sampler's arithmetic, grouped by what they compute
SHARED_KERNELS = {"aten::addmm": "gemm", "aten::mm": "gemm", "aten::bmm": "gemm",
                  "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
                  "aten::gelu": "gelu", "aten::gelu_": "gelu"}


def shared_kernel_floor(fns: dict, official_s: float) -> dict:
    """Profiles one run of each side (CPU only) and sums each side's self time in SHARED_KERNELS per group.
    Per group the smaller side's time is what the computation needs from those kernels on this machine, so
    their sum (`floor_s`) is a lower bound on any run that uses the same kernels, and `ratio_bound` =
    official_s / floor_s is the largest ratio such a run could reach even if nothing else cost any time."""
    from torch.profiler import ProfilerActivity, profile

    per_side = {}
    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        groups = dict.fromkeys(sorted(set(SHARED_KERNELS.values())), 0.0)
        for event in prof.key_averages():
            if event.key in SHARED_KERNELS:
                groups[SHARED_KERNELS[event.key]] += event.self_cpu_time_total / 1e6
        per_side[name] = groups
    floor = sum(min(side[g] for side in per_side.values()) for g in next(iter(per_side.values())))
    return {"shared_kernels_s": per_side, "floor_s": floor, "ratio_bound": official_s / floor if floor else float("inf")}


def fmt_floor(floor: dict) -> str:
    sides = "; ".join(f"{name} " + ", ".join(f"{g} {s:.3f}" for g, s in groups.items())
                      for name, groups in floor["shared_kernels_s"].items())
    return (f"  shared kernels (s, one profiled run each): {sides}; floor {floor['floor_s']:.3f} s, so no run on the "
            f"same kernels could exceed {floor['ratio_bound']:.2f}x")


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------------------------- RAR


def official_rar_config(hidden: int, depth: int, heads: int, dropout: float):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "model": {
            "vq_model": {"codebook_size": 1024},
            "generator": {"hidden_size": hidden, "num_hidden_layers": depth, "num_attention_heads": heads,
                          "intermediate_size": 4 * hidden, "image_seq_len": 256, "condition_num_classes": 1000,
                          "dropout": dropout, "attn_drop": dropout, "class_label_dropout": 0.1},
        },
    })


def rar_pair(hidden: int, depth: int, heads: int, dropout: float):
    """The official RAR with random weights (non-zero adaLN) and vqtok's RAR holding the converted weights."""
    import torch
    from modeling.rar import RAR as OfficialRAR

    from vqtok.ar.rar import RAR
    from vqtok.interop import rar as rar_interop

    torch.manual_seed(0)
    official = OfficialRAR(official_rar_config(hidden, depth, heads, dropout))
    with torch.no_grad():  # adaLN-zero init makes every block an identity; give it weights a trained model has
        for block in official.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.02)
        official.adaln_before_head.adaLN_modulation[-1].weight.normal_(0, 0.02)
    sd = official.state_dict()
    cfg = rar_interop.to_config(sd)
    cfg.dropout = cfg.attn_dropout = dropout
    ours = RAR(cfg)
    ours.load_state_dict(rar_interop.convert(sd), strict=True)
    return official, ours


def case_rar_sampling(args) -> dict:
    import torch

    from vqtok.app.sample import sample_noise, sample_tokens
    from vqtok.ar.sampling import SamplingConfig

    official, ours = rar_pair(256, 8, 8, 0.0)
    official.eval()
    ours.eval()
    batch = 16
    classes = torch.arange(batch) * 61 % 1000
    # same weights: the first step's guided logits must agree (teacher-forced, raster order, no cache)
    with torch.no_grad():
        ids = torch.randint(0, 1024, (2, 5))
        cond = official.preprocess_condition(classes[:2])
        ref = official.forward_fn(ids, cond, orders=None, is_sampling=True)
        mine = ours.prefix_logits(ids, ours.condition_ids(classes[:2]), torch.arange(256).expand(2, 256))
        err = (ref - mine).abs().max().item()
    print(f"  same-weights check: max |logit difference| over 5 teacher-forced steps = {err:.2e}")
    if err > 1e-3:
        raise RuntimeError(f"the converted RAR does not reproduce the official logits (max difference {err})")
    cfg = SamplingConfig(guidance_scale=4.0, guidance_schedule="power-cosine", guidance_power=2.75)
    uniforms = sample_noise(0, range(batch), 256)

    def run_official():
        torch.manual_seed(0)
        out = official.generate(classes, guidance_scale=4.0, randomize_temperature=1.0, guidance_scale_pow=2.75)
        assert out.shape == (batch, 256)

    def run_vqtok():
        out = sample_tokens(ours, classes, cfg, uniforms)
        assert out.shape == (batch, 256)

    # no warm-up run: one batch is 256 model calls, the first of which warms the allocator for the rest
    times = alternate({"official": run_official, "vqtok": run_vqtok}, args.repeats, warmup=0)
    return summary(times) | {"detail": "11M (hidden 256, depth 8), batch 16, CFG 4.0 pow 2.75, tokens only"}


def official_weight_groups(model, weight_decay: float):
    # the rule of the official create_optimizer (utils/train_utils.py): no decay for 1-d, norm, bias, embeddings
    exclude = (lambda n, p: p.ndim < 2 or "ln" in n or "bias" in n or "embedding" in n or "norm" in n
               or "gamma" in n or "embed" in n)
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def case_rar_train(args, hidden: int, depth: int, heads: int) -> dict:
    import torch
    from modeling.modules.losses import ARLoss
    from torch import nn

    from vqtok.ar.orders import sample_orders
    from vqtok.ar.rar import ar_loss
    from vqtok.train.ar_task import weight_decay_groups
    from vqtok.train.engine import OptimizerConfig, build_optimizer

    official, ours = rar_pair(hidden, depth, heads, 0.1)
    official.train()
    ours.train()
    official.set_random_ratio(1.0)
    batch, n = 8, 256
    tokens = torch.randint(0, 1024, (batch, n))
    classes = torch.randint(0, 1000, (batch,))
    loss_module = ARLoss(official.config)
    opt_official = torch.optim.AdamW(official_weight_groups(official, 0.03), lr=4e-4, betas=(0.9, 0.96))
    ocfg = OptimizerConfig(kind="adamw", lr=4e-4, betas=(0.9, 0.96), weight_decay=0.03, grad_clip=1.0)
    opt_ours = build_optimizer(ocfg, weight_decay_groups(ours, 0.03), torch.device("cpu"))
    target = torch.arange(n)

    def step_official():  # scripts/train_rar.py -> utils/train_utils.train_one_epoch_generator
        cond = official.preprocess_condition(classes.clone(), cond_drop_prob=0.1)
        logits, labels = official(tokens, cond, return_labels=True)
        loss, _ = loss_module(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(official.parameters(), 1.0)
        opt_official.step()
        opt_official.zero_grad(set_to_none=True)

    def step_vqtok():  # what ARTrainTask + Engine run per optimizer step
        orders = sample_orders(batch, target, 1.0)
        cond = ours.condition_ids(classes, drop_prob=0.1)
        logits, labels = ours.forward_conditions(tokens, cond, orders)
        loss, _ = ar_loss(logits, labels)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt_ours.step()

    peak_before = gemm_gflops()
    times = alternate({"official": step_official, "vqtok": step_vqtok}, args.train_repeats, warmup=1)
    peak = max(peak_before, gemm_gflops())
    out = summary(times)
    mm = sum(m.weight.numel() for m in ours.modules() if isinstance(m, nn.Linear))
    flops = 6 * mm * batch * n
    out.update({
        "gemm_gflops": peak,
        "official_gemm_fraction": flops / out["official_s"] / 1e9 / peak,
        "vqtok_gemm_fraction": flops / out["vqtok_s"] / 1e9 / peak,
        "detail": f"hidden {hidden}, depth {depth}, {heads} heads, batch 8 x 256, dropout 0.1, AdamW + clip",
    })
    print(f"  fp32 GEMM 2048^3 (best, same process): {peak:.1f} GFLOP/s; matmul GFLOP/s = 6 x Linear weights x tokens / "
          f"median step: official {flops / out['official_s'] / 1e9:.1f} ({out['official_gemm_fraction']:.2f} of GEMM), "
          f"vqtok {flops / out['vqtok_s'] / 1e9:.1f} ({out['vqtok_gemm_fraction']:.2f})")
    return out


# ------------------------------------------------------------------------------------------- MaskGIT-VQGAN


def case_maskgit_encode(args) -> dict:
    import torch
    from modeling.titok import PretrainedTokenizer
    from omegaconf import OmegaConf
    from modeling.modules.maskgit_vqgan import Decoder, Encoder, VectorQuantizer

    from vqtok.interop import maskgit
    from vqtok.tokenizer.tokenizer import build_tokenizer

    torch.manual_seed(0)
    # random weights in the official layout (the conf of PretrainedTokenizer), written to a file it loads
    conf = OmegaConf.create({"channel_mult": [1, 1, 2, 2, 4], "num_resolutions": 5, "dropout": 0.0,
                             "hidden_channels": 128, "num_channels": 3, "num_res_blocks": 2, "resolution": 256,
                             "z_channels": 256})
    holder = torch.nn.Module()
    holder.encoder, holder.decoder = Encoder(conf), Decoder(conf)
    holder.quantize = VectorQuantizer(1024, 256, 0.25)
    with torch.no_grad():  # a codebook spread like a trained one's, so the argmin is not decided by rounding
        holder.quantize.embedding.weight.normal_(0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "maskgit-vqgan-random.bin"
        torch.save(holder.state_dict(), path)
        official = PretrainedTokenizer(str(path))
    cfg, state = maskgit.convert(official.state_dict())
    ours = build_tokenizer(cfg)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    images = torch.rand(10, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = official.encode(images).reshape(10, -1)
        mine = ours.encode(images)
    same = int((ref == mine).sum())
    print(f"  indices identical: {same}/{ref.numel()}")
    if same != ref.numel():
        raise RuntimeError(f"vqtok's converted MaskGIT-VQGAN gives {ref.numel() - same} different indices")

    def run_official():
        with torch.inference_mode():
            official.encode(images)

    def run_vqtok():
        with torch.inference_mode():
            ours.encode(images)

    # the identity check above was both sides' warm-up
    times = alternate({"official": run_official, "vqtok": run_vqtok}, args.encode_repeats, warmup=0)
    return summary(times) | {"indices_identical": True, "detail": "256 px, batch 10, random weights, inference mode"}


# ------------------------------------------------------------------------------------------- VQGAN training


def llamagen_lpips_stubs(lpips_module) -> None:
    """LlamaGen's LPIPS downloads the VGG16 trunk (torchvision pretrained=True) and its heads at build time."""
    import torchvision

    class _Models:  # torchvision.models with vgg16 built random: weights are copied in from vqtok's LPIPS afterwards
        def __getattr__(self, name):
            return getattr(torchvision.models, name)

        @staticmethod
        def vgg16(pretrained=False, **kwargs):
            return torchvision.models.vgg16(weights=None)

    lpips_module.models = _Models()
    lpips_module.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    STUBS.append("tokenizer.tokenizer_image.lpips.models.vgg16(pretrained=True): built random (no download); "
                 "trunk and heads then copied from vqtok's LPIPS (random trunk, the lpips wheel's heads)")
    STUBS.append("tokenizer.tokenizer_image.lpips.LPIPS.load_from_pretrained: no download (heads copied as above)")


def write_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def case_vqgan_train_step(args) -> dict:
    import copy

    import torch
    import tokenizer.tokenizer_image.lpips as llamagen_lpips

    llamagen_lpips_stubs(llamagen_lpips)
    from tokenizer.tokenizer_image.vq_loss import VQLoss
    from tokenizer.tokenizer_image.vq_model import VQ_16

    from vqtok.interop import llamagen
    from vqtok.distributed import DistEnv
    from vqtok.train.engine import Engine
    from vqtok.train.tokenizer_task import TokenizerTrainTask, load_run_config

    res, batch = 64, 4
    torch.manual_seed(0)
    vq_model = VQ_16(codebook_size=16384, codebook_embed_dim=8)
    vq_loss = VQLoss(disc_start=0, disc_weight=0.5, disc_type="patchgan", disc_loss="hinge", gen_adv_loss="hinge",
                     image_size=res, perceptual_weight=1.0, reconstruction_weight=1.0, reconstruction_loss="l2",
                     codebook_weight=1.0)
    # register_buffer("codebook_used", nn.Parameter(...)) is a leaf that requires grad; `.to("cuda")` turns it into
    # a non-leaf copy, which the in-place usage update then accepts. On CPU nothing copies it, so do by hand what
    # the move to CUDA does for its in-place writes: take it out of autograd.
    vq_model.quantize.codebook_used.requires_grad_(False)
    STUBS.append("VQModel.quantize.codebook_used.requires_grad_(False): a leaf Parameter registered as a buffer; on "
                 "CUDA `.to(device)` makes it a non-leaf copy, on CPU its in-place usage update would raise")
    ema = copy.deepcopy(vq_model)
    ema.requires_grad_(False)

    overrides = [
        f"data.resolution={res}", "data.hflip=false", "data.scale_range=[1.0,1.0]", "data.preview_images=0",
        "loss.l1_weight=0", "loss.l2_weight=1.0", "loss.perceptual_weight=1.0", "loss.lpips_weights=random-for-tests",
        "loss.quantizer_weight=1.0", "loss.disc_weight=0.5", "loss.adaptive_weight=false", "loss.disc_start=0",
        "loss.d_loss=hinge", "loss.g_loss=hinge", "loss.disc.kind=patchgan", "loss.disc.channels=64", "loss.disc.layers=3",
        "optim.generator.kind=adam", "optim.generator.lr=1e-4", "optim.generator.betas=[0.9,0.95]",
        "optim.generator.grad_clip=1.0", "optim.discriminator.kind=adam", "optim.discriminator.lr=1e-4",
        "optim.discriminator.betas=[0.9,0.95]", "optim.discriminator.grad_clip=1.0",
        f"train.batch_size={batch}", "train.ema=true", "train.ema_decay=0.9999", "train.num_workers=0",
        "train.steps=1000000",
    ]
    cfg = load_run_config({"model": {"preset": "llamagen-vq-f16"}}, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        write_images(data, batch, res)
        task = TokenizerTrainTask(cfg, DistEnv(device=torch.device("cpu")), data, Path(tmp) / "run")
        engine = Engine(cfg.train, DistEnv(device=torch.device("cpu")), Path(tmp) / "run")
    # the same weights on both sides: tokenizer through vqtok's LlamaGen interop, D and LPIPS copied
    _, state = llamagen.convert(vq_model.state_dict(), resolution=res)
    task.tokenizer.load_state_dict(state, strict=True)
    task.loss_fn.discriminator.load_state_dict(vq_loss.discriminator.state_dict(), strict=True)
    ours_lpips = task.loss_fn.lpips.net.state_dict()
    official_lpips = vq_loss.perceptual_loss.state_dict()
    vq_loss.perceptual_loss.load_state_dict({k: ours_lpips[k] for k in official_lpips}, strict=True)
    engine.prepare(task)  # EMAs as a run keeps them

    opt = torch.optim.Adam(vq_model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    opt_disc = torch.optim.Adam(vq_loss.discriminator.parameters(), lr=1e-4, betas=(0.9, 0.95))
    images01 = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(2))
    imgs = images01 * 2 - 1  # LlamaGen's data pipeline normalises to [-1, 1]; vqtok's loss does it inside
    step = {"official": 0, "vqtok": 0}

    class _Log:
        def info(self, *a, **k):
            pass

    @torch.no_grad()
    def update_ema(decay=0.9999):  # LlamaGen utils/ema.py update_ema
        ema_params = dict(ema.named_parameters())
        for name, param in vq_model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    vq_model.train()
    vq_loss.train()

    def run_official():  # tokenizer/tokenizer_image/vq_train.py, one iteration (fp32: no CUDA autocast on CPU)
        step["official"] += 1
        gs = step["official"]
        opt.zero_grad()
        recons, codebook_loss = vq_model(imgs)
        loss_gen = vq_loss(codebook_loss, imgs, recons, optimizer_idx=0, global_step=gs,
                           last_layer=vq_model.decoder.last_layer, logger=_Log(), log_every=100)
        loss_gen.backward()
        torch.nn.utils.clip_grad_norm_(vq_model.parameters(), 1.0)
        opt.step()
        update_ema()
        first.setdefault("official", float(loss_gen.detach()))
        opt_disc.zero_grad()
        loss_disc = vq_loss(codebook_loss, imgs, recons, optimizer_idx=1, global_step=gs, logger=_Log(), log_every=100)
        loss_disc.backward()
        torch.nn.utils.clip_grad_norm_(vq_loss.discriminator.parameters(), 1.0)
        opt_disc.step()

    batch_dict = {"images": images01}

    def run_vqtok():  # one real Engine step: both phases, clipping, EMA
        metrics = engine.train_step(task, batch_dict, step["vqtok"]).floats()
        first.setdefault("vqtok", metrics["loss"])
        step["vqtok"] += 1

    first: dict[str, float] = {}
    times = alternate({"official": run_official, "vqtok": run_vqtok}, args.train_repeats, warmup=1)
    # the warm-up steps started from the same weights and images: the generator losses must agree
    print(f"  same-weights check: first generator loss official {first['official']:.6f}, vqtok {first['vqtok']:.6f}")
    if abs(first["official"] - first["vqtok"]) > 1e-3 * max(1.0, abs(first["official"])):
        raise RuntimeError("the two sides' first generator losses differ: they are not training the same thing")
    return summary(times) | {"detail": "LlamaGen VQ-16 (72M) + PatchGAN + LPIPS, 64 px, batch 4, fp32, EMA"}


# ------------------------------------------------------------------------------------------- VAR


def case_var_sampling(args, bf16: bool = False) -> dict:
    """Official `VAR.autoregressive_infer_cfg` vs vqtok.ar.sampling.sample with VAR's cached decoder: the same
    random weights (loaded through vqtok.interop.var_gpt with the VQVAE's quantizer), batch 8, the README's FID
    setting (cfg 1.5 ramped, top-k 900, top-p 0.96), V 4096, Cvae 32, the 10 released scales (680 tokens).
    Tokens only: the official's final decode (fhat_to_img) is replaced by returning f_hat (a printed stub),
    and vqtok's side stops at the tokens, as rar_sampling does. The codes must be identical with the same
    seed (the official's generator and vqtok's GeneratorDraw, checked first); the timed vqtok runs are what
    `vqtok sample` runs per batch (per-sample noise streams, the cached decoder kept across batches), as in
    llamagen_sampling."""
    import torch
    from models.var import VAR as OfficialVAR
    from models.vqvae import VQVAE

    from vqtok.app.sample import batch_draw
    from vqtok.ar.sampling import SamplingConfig, sample
    from vqtok.interop import var_gpt
    from vqtok.tokenizer.quantizers.multiscale import MultiScaleResidualVQ, MultiScaleVQConfig

    dev = torch.device(args.device)
    depth, batch = (6, 8) if dev.type == "cpu" else (16, 32)  # on a GPU: the released VAR-d16's size
    patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=patch_nums)
    official = OfficialVAR(vae, depth=depth, embed_dim=64 * depth, num_heads=depth, attn_l2_norm=True,
                           patch_nums=patch_nums, flash_if_available=False, fused_if_available=False)
    official.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    with torch.no_grad():  # trained-like weights: gates and codebook away from their near-zero init
        for block in official.blocks:
            block.ada_lin[-1].weight.normal_(0, 0.02)
        vae.quantize.embedding.weight.normal_()
    official.eval()
    vae.eval()

    class FHatOnly:  # stands in for the VQVAE in the official sampler's last line only
        @staticmethod
        def fhat_to_img(f_hat):
            return f_hat

    STUBS.append("VAR vae_proxy.fhat_to_img: returns f_hat (tokens-only timing; the decode is the same conv net on both sides)")
    official.vae_proxy = (FHatOnly(),)
    quant = MultiScaleResidualVQ(MultiScaleVQConfig(codebook_size=4096, dim=32, patch_nums=patch_nums))
    quant.load_state_dict(vae.quantize.state_dict(), strict=True)
    ours = var_gpt.load(official.state_dict(), quant.eval().to(dev)).to(dev)
    official.to(dev)
    vae.to(dev)
    official.rng = torch.Generator(device=dev)  # made on dist.get_device() (the CPU here) at construction
    official.uniform_prob = official.uniform_prob.to(dev)
    classes = (torch.arange(batch) * 97 % 1000).to(dev)
    with torch.no_grad():  # same weights: the teacher-forced logits must agree
        gt = [torch.randint(0, 4096, (2, p * p), device=dev) for p in patch_nums]
        x = vae.quantize.idxBl_to_var_input(gt)
        official.cond_drop_rate = 0.0
        ref = official(classes[:2], x)
        mine = ours(classes[:2], x, drop_labels=False)
        err = (ref - mine).abs().max().item()
    print(f"  same-weights check: max |logit difference| of the teacher-forced forward = {err:.2e}")
    if err > 1e-3:
        raise RuntimeError(f"the converted VAR does not reproduce the official logits (max difference {err})")
    cfg = SamplingConfig(guidance_scale=2.5, guidance_schedule="ramp", top_k=900, top_p=0.96)
    g = torch.Generator(device=dev)

    precision = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def official_sample():
        return official.autoregressive_infer_cfg(batch, classes, g_seed=0, cfg=1.5, top_k=900, top_p=0.96)

    def share_of_equal_codes() -> tuple[float, int]:
        """vqtok's loop from the official's seed against the codes the official sampler draws (read where it
        embeds them), under the caller's autocast setting: (fraction equal, number of codes)."""
        drawn = []
        hook = vae.quantize.embedding.register_forward_hook(lambda m, inp, out: drawn.append(inp[0].clone()))
        try:
            with torch.no_grad():
                official_sample()
        finally:
            hook.remove()
        want = torch.cat(drawn, dim=1)
        got = sample(ours, classes, cfg, generator=g.manual_seed(0)).tokens
        return ((got == want).float().mean().item() if got.shape == want.shape else 0.0), want.numel()

    # same weights and seed: vqtok's loop draws the official codes
    same, n_codes = share_of_equal_codes()
    print(f"  same-weights check: {same:.4f} of the {n_codes} codes equal the official sampler's (same seed)")
    check_codes(same, dev, "VAR")
    codes_equal = {"fp32": same}

    if bf16:  # same weights under autocast: close logits (bf16 rounding), and mostly the same codes
        with torch.no_grad(), precision():
            err = (official(classes[:2], x).float() - ours(classes[:2], x, drop_labels=False).float()).abs().max().item()
            spread = ref.std().item()
        print(f"  bf16 autocast: max |logit difference| of the teacher-forced forward = {err:.2e} "
              f"(float32 logits' std {spread:.2e})")
        if err > 0.25 * spread:
            raise RuntimeError(f"under bf16 autocast the two sides' logits differ by {err} (std {spread})")
        with precision():
            same, _ = share_of_equal_codes()
        codes_equal["bf16"] = same
        print(f"  bf16 autocast: {same:.4f} of the codes equal the official sampler's (same seed; not exact in bf16)")

    def run_official():
        with precision():
            out = official_sample()
        assert out.shape == (batch, 32, 16, 16)

    decoder = ours.default_decoder(True)

    def run_vqtok():  # what `vqtok sample` runs per batch: per-sample noise, the cached decoder kept across batches
        with precision():
            out = sample(ours, classes, cfg, draw=batch_draw(0, 0, batch, 680, batch), decoder=decoder)
        assert out.tokens.shape == (batch, 680)

    sides = {"official": run_official, "vqtok": run_vqtok}
    result = summary(alternate(synced(sides, dev), args.repeats, warmup=1))
    if dev.type == "cpu":  # what the two sides' shared kernels alone take: the ratio's ceiling on this machine
        result |= shared_kernel_floor(sides, result["official_s"])
        print(fmt_floor(result), flush=True)
    n_params = sum(p.numel() for p in ours.parameters())
    return result | {"device": str(dev), "codes_equal": codes_equal,
                     "detail": f"{n_params / 1e6:.0f}M (depth {depth}, width {64 * depth}), batch {batch}, "
                               "cfg 1.5 ramp, top-k 900, top-p 0.96, 680 tokens, tokens only"
                               + (", bf16 autocast on both sides" if bf16 else "")}


# ------------------------------------------------------------------------------------------- driver


# -------------------------------------------------------------------------------------- LlamaGen GPT


def case_llamagen_sampling(args, bf16: bool = False) -> dict:
    import contextlib
    import copy

    import torch
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    from vqtok.app.sample import batch_draw
    from vqtok.ar.llamagen import LlamaGen
    from vqtok.ar.sampling import GeneratorDraw, SamplingConfig, sample
    from vqtok.interop import llamagen_gpt as llamagen_interop

    dev = torch.device(args.device)
    # on a GPU: the released GPT-B's layout (c2i_B_256) and a FID-sampling batch
    dim, layers, heads, batch, tokens = (384, 6, 6, 8, 256) if dev.type == "cpu" else (768, 12, 12, 32, 256)
    torch.manual_seed(0)
    official = Transformer(ModelArgs(dim=dim, n_layer=layers, n_head=heads, vocab_size=16384, block_size=tokens,
                                     num_classes=1000, cls_token_num=1, model_type="c2i"))
    with torch.no_grad():  # the output layer is zero at init: give it the weights a trained model has
        official.output.weight.normal_(0, 0.02)
    official.eval()
    cfg_model, state = llamagen_interop.load_official(official.state_dict(), block_size=tokens, n_head=heads)
    ours = LlamaGen(cfg_model)
    ours.load_state_dict(state, strict=True)
    ours.eval().to(dev)
    official.to(dev)
    classes = (torch.arange(batch) * 61 % 1000).to(dev)
    cfg = SamplingConfig(guidance_scale=2.0, guidance_schedule="constant", temperature=1.0, top_k=0, top_p=1.0)

    def run_official():
        torch.manual_seed(0)
        return generate(official, classes, tokens, cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=0,
                        top_p=1.0, sample_logits=True)

    precision = contextlib.nullcontext

    def share_of_equal_codes() -> float:
        """vqtok's loop re-seeded as the official re-seeds the global generator, against the official's codes;
        vqtok's side under `precision` (the official's precision is its model's)."""
        with torch.no_grad():
            want = run_official().long()
            torch.manual_seed(0)
            with precision():
                got = sample(ours, classes, cfg, draw=GeneratorDraw(None)).tokens
        return (got == want).float().mean().item()

    # same weights: re-seeding the global generator, vqtok's loop draws the official codes
    same = share_of_equal_codes()
    print(f"  same-weights check: {same:.4f} of the {batch * tokens} codes equal the official generate's (re-seeded)")
    check_codes(same, dev, "LlamaGen")
    codes_equal = {"fp32": same}
    if bf16:  # each side's own bf16: the official script casts the model, `vqtok sample --dtype bf16` autocasts
        official = copy.deepcopy(official).to(torch.bfloat16)
        precision = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731
        codes_equal["bf16"] = share_of_equal_codes()
        print(f"  bf16: {codes_equal['bf16']:.4f} of the codes equal the official generate's (re-seeded; the official "
              "runs a bf16 model, vqtok float32 weights under autocast: not the same rounding)")
    decoder = ours.default_decoder(True)

    def run_vqtok():  # what `vqtok sample` runs per batch: per-sample noise, the cached decoder kept across batches
        with precision():
            out = sample(ours, classes, cfg, draw=batch_draw(0, 0, batch, tokens, batch), decoder=decoder).tokens
        assert out.shape == (batch, tokens)

    times = alternate(synced({"official": run_official, "vqtok": run_vqtok}, dev), args.repeats, warmup=0)
    n_params = sum(p.numel() for p in ours.parameters())
    return summary(times) | {"device": str(dev), "codes_equal": codes_equal,
                             "detail": f"{n_params / 1e6:.0f}M (dim {dim}, {layers} layers, 16384 codes), batch {batch}, "
                                       "CFG 2.0 constant, 256 tokens, tokens only"
                                       + (", bf16: the official model cast to bf16, vqtok under bf16 autocast" if bf16 else "")}


def run_case(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    setup_peer(Path(args.peers), PEER_OF[name], [Path(d) for d in args.deps])
    if name == "rar_sampling":
        result = case_rar_sampling(args)
    elif name == "rar_train_h768":
        result = case_rar_train(args, 768, 4, 16)
    elif name == "rar_train_h256":
        result = case_rar_train(args, 256, 8, 8)
    elif name == "maskgit_encode":
        result = case_maskgit_encode(args)
    elif name in ("var_sampling", "var_sampling_bf16"):
        result = case_var_sampling(args, bf16=name == "var_sampling_bf16")
    elif name in ("llamagen_sampling", "llamagen_sampling_bf16"):
        result = case_llamagen_sampling(args, bf16=name == "llamagen_sampling_bf16")
    else:
        result = case_vqgan_train_step(args)
    result["threads"] = torch.get_num_threads()
    result["stubs"] = list(STUBS)
    return result


def child_main(args) -> int:
    load0 = load_avg()
    BUDGET["case_s"], BUDGET["t0"] = args.case_budget_s, time.perf_counter()
    try:
        result = run_case(args.case, args)
    except Missing as exc:
        print(json.dumps({"missing": str(exc)}), flush=True)
        return 2
    result["load_before"], result["load_after"] = load0, load_avg()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def fmt_case(name: str, r: dict) -> str:
    goal = GOALS[name]
    verdict = "meets" if r["ratio"] >= goal else "MISSES"
    return (f"{name:17s} official {r['official_s']:8.3f} s (min {r['official_min_s']:.3f})  vqtok {r['vqtok_s']:8.3f} s "
            f"(min {r['vqtok_min_s']:.3f})  ratio {r['ratio']:.2f}x (of minima {r['ratio_min']:.2f}x; goal >= {goal}x: "
            f"{verdict})" + (f"  CPU-time ratio {r['ratio_cpu']:.2f}x" if "ratio_cpu" in r else "")
            + f"  load {r['load_before']:.1f}->{r['load_after']:.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--peers", required=True, help="folder holding the official source trees (1d-tokenizer/, LlamaGen/)")
    p.add_argument("--deps", action="append", default=[], help="folder with the peers' extra packages, put first on "
                   "sys.path (repeatable)")
    p.add_argument("--only", default=None, help=f"comma-separated cases out of {','.join(CASES)}")
    p.add_argument("--json", default=None, help="write {case: {official_s, vqtok_s, ratio, ...}} here")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides (default 1: on a shared "
                   "2-core machine two OpenMP threads spin against other work and make both sides noisier)")
    p.add_argument("--device", default="cpu", help=f"cpu (default) or cuda[:N]: the cases {', '.join(sorted(DEVICE_CASES))} "
                   "also run on a CUDA device, at the released models' sizes (VAR-d16 batch 32, GPT-B batch 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side for rar_sampling")
    p.add_argument("--train-repeats", type=int, default=4, help="timed steps per side for the training cases")
    p.add_argument("--encode-repeats", type=int, default=3, help="timed batches per side for maskgit_encode")
    p.add_argument("--budget-min", type=float, default=13.0, help="wall-time budget of the whole script: each case gets "
                   "an equal share of what is left when it starts and runs fewer timed rounds (never under "
                   f"{MIN_REPEATS} per side) when the next round would pass its share; 0 = no budget (default 13; setup and the same-computation checks come on top, ~1 minute)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--case-budget-s", type=float, default=float("inf"), help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.case:
        return child_main(args)
    cases = [c for c in CASES if c not in OPT_IN] if not args.only else [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"error: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    if args.device != "cpu" and [c for c in cases if c not in DEVICE_CASES]:
        print(f"error: on --device {args.device} only {', '.join(sorted(DEVICE_CASES))} run; drop "
              f"{', '.join(c for c in cases if c not in DEVICE_CASES)} from --only", file=sys.stderr)
        return 2
    try:
        check_paths(Path(args.peers), [Path(d) for d in args.deps], cases)
    except Missing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    if args.device != "cpu":
        try:
            dev = torch.device(args.device)
        except RuntimeError as exc:
            print(f"error: --device {args.device}: {exc}", file=sys.stderr)
            return 2
        if dev.type != "cuda" or not torch.cuda.is_available():
            print(f"error: --device {args.device}: only cpu or an available CUDA device (torch.cuda.is_available() is "
                  f"{torch.cuda.is_available()})", file=sys.stderr)
            return 2
        print(f"device: {torch.cuda.get_device_name(dev)}", flush=True)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {args.threads} (both sides), load average {load_avg():.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [x for x in [env.get("PYTHONPATH")] if x])
    results: dict[str, dict] = {}
    failed = []
    t_all = time.perf_counter()
    for name in cases:
        print(f"== {name}", flush=True)
        cmd = [sys.executable, __file__, "--case", name, "--peers", args.peers, "--threads", str(args.threads),
               "--device", args.device,
               "--repeats", str(args.repeats), "--train-repeats", str(args.train_repeats),
               "--encode-repeats", str(args.encode_repeats)]
        if args.budget_min > 0:
            left = args.budget_min * 60 - (time.perf_counter() - t_all)
            cmd += ["--case-budget-s", f"{max(0.0, left) / (len(cases) - len(results) - len(failed)):.1f}"]
        for d in args.deps:
            cmd += ["--deps", d]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        result = None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            elif line.startswith('{"missing"'):
                print(f"error: {json.loads(line)['missing']}", file=sys.stderr)
                return 2
            else:
                print(line, end="", flush=True)
        proc.wait()
        if result is None:
            failed.append(name)
            print(f"  {name} FAILED (exit {proc.returncode})", flush=True)
            continue
        for s in result.pop("stubs"):
            print(f"  stubbed {s}")
        result["wall_s"] = time.perf_counter() - t0
        results[name] = result
        print("  " + fmt_case(name, result), flush=True)
        if args.json:  # after every case, so a run stopped early keeps the cases it finished
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    total = time.perf_counter() - t_all
    budget = f", budget {args.budget_min * 60:.0f} s" if args.budget_min > 0 else ""
    print(f"\nsummary ({total:.0f} s in all{budget}; ratio = official / vqtok median time, > 1 = vqtok faster)")
    for name, r in results.items():
        print("  " + fmt_case(name, r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
