"""The GPU suite: every command's CUDA path on tiny data, then the GPU throughput figures.

    python bench/gpu_suite.py                      # on a CUDA machine: about 5-8 minutes (never measured yet)
    python bench/gpu_suite.py --check --out /tmp/g # on CPU: the same code paths at toy sizes (a test runs this)
    bash bench/gpu_run.sh                          # on a lent GPU machine (see bench/gpu_prepare.sh)

`--budget-s S` starts no part after S seconds (the rest are reported as skipped), and the report is rewritten
after every part, so a run stopped from outside keeps what it finished.

Part 1, the commands (the `vqtok` CLI app invoked in this process with exactly the arguments a user types,
on 8 random 64 px images in two classes): train-tokenizer (tiny-vqgan, 20 steps, bf16 autocast, discriminator on from step 1),
encode (that tokenizer), train-ar (rar-tiny, 20 steps, bf16), sample (CFG 3.0, bf16, with
`--cuda-graphs on` on CUDA). Each must exit 0 and leave its
file contract (final/model.safetensors, manifest.json, grid.png).

Part 2, the measurements (library calls, median of the timed runs):
- RAR-B (261M) guided sampling, batch 128, CFG 4.0 power-cosine, bf16 autocast: eager
  (vqtok.app.sample.sample_tokens, what `vqtok sample` runs) and with one CUDA graph per decode step
  (static KV cache and buffers, see GraphedSampler), tokens only and with MaskGIT-VQGAN (maskgit-vqgan-f16)
  decoding to 256 px pixels: img/s. Goal >= 200 img/s including decoding on an H100-class GPU.
- RAR-B training step (vectorised random orders, dropout 0.1, forward, loss, backward, clipping, fused AdamW),
  batch 64 x 256 tokens, bf16: tokens/s and MFU (model FLOPs with attention, against the GPU's dense bf16
  peak when known, and against a bf16 8192^3 GEMM measured here). Goal >= 45% MFU.
- VQGAN tokenizer training step (vqgan-f16 recipe, 256 px, batch 16, bf16, one real Engine step: both
  phases, LPIPS on the random VGG16 trunk since no weights file is present, adaptive weight, clipping, EMA):
  img/s.
- MaskGIT-VQGAN encode, 256 px, batch 64, bf16 autocast, inference mode: img/s.
- VAR-d16 (on the var-msvq-f16 codebook; cfg 1.5 ramped, top-k 900, top-p 0.96) and LlamaGen-B (CFG 2.0)
  guided sampling, batch 64, bf16, tokens only: the eager KV cache and the family's CUDA-graph decoder
  (one graph per scale / per token step), img/s, and the fraction of codes they agree on with the same noise.
Random weights throughout: speed does not depend on them.

Writes OUT/gpu_results.json and OUT/gpu_results.md (a table for bench/README.md). Exit code 1 when a part
failed (the error is in the JSON and the table), 0 otherwise. With --check, CUDA graph capture (CUDA only)
is replaced by running the graphed sampler's steps on its static buffers directly, and its tokens must equal
the eager loop's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from timing import sync, time_calls  # noqa: E402 (bench/ is on sys.path from here)

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs the MFU goal is stated for
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.1, "L4": 121.0, "RTX 4090": 165.2}

GOALS = {"rar_b_sampling_with_decode_img_s": 200.0, "rar_b_train_mfu": 0.45}


def autocast_bf16(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU: fp32, as vqtok's own autocast does


# ------------------------------------------------------------------------------------------ sizes


def sizes(check: bool) -> dict:
    if check:  # toy: seconds on a loaded 2-core CPU
        return {"cli_tok_steps": 2, "cli_ar_epochs": 2, "cli_sample_num": 2,
                "sample_model": {"hidden_size": 64, "depth": 2, "num_heads": 4, "intermediate_size": 256,
                                 "vocab_size": 512, "seq_len": 16},
                "sample_tokenizer": "tiny-vqgan", "sample_batch": 2, "sample_repeats": 1, "warmup": 0,
                "train_model": (64, 2, 4), "train_batch": 2, "train_steps": 1,
                "tok_recipe": "tiny-vqgan", "tok_res": 32, "tok_batch": 2, "tok_steps": 1,
                "encode_tokenizer": "tiny-vqgan", "encode_res": 64, "encode_batch": 2, "encode_repeats": 1,
                "var_preset": None, "var_tokenizer": "tiny-msvq", "llamagen_preset": "llamagen-tiny", "gen_batch": 2}
    return {"cli_tok_steps": 20, "cli_ar_epochs": 10, "cli_sample_num": 16,
            "sample_model": "rar-b", "sample_tokenizer": "maskgit-vqgan-f16", "sample_batch": 128, "sample_repeats": 3,
            "warmup": 1,
            "train_model": (768, 24, 16), "train_batch": 64, "train_steps": 10,
            "tok_recipe": "vqgan-f16", "tok_res": 256, "tok_batch": 16, "tok_steps": 10,
            "encode_tokenizer": "maskgit-vqgan-f16", "encode_res": 256, "encode_batch": 64, "encode_repeats": 5,
            "var_preset": "var-d16", "var_tokenizer": "var-msvq-f16", "llamagen_preset": "llamagen-b", "gen_batch": 64}


# ------------------------------------------------------------------------------------------ part 1: commands


def write_images(root: Path, per_class: int = 4, size: int = 64) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("class_a", "class_b"):
        folder = root / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # smooth random images (low-frequency noise, upsampled) rather than white noise
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")
    return root


def vqtok_cli(args: list, log: list) -> float:
    """Run one `vqtok` command in this process (the CLI app itself, as `python -m vqtok` would); its wall time."""
    from typer.testing import CliRunner

    from vqtok.cli import app

    t = time.perf_counter()
    result = CliRunner().invoke(app, [str(a) for a in args])
    wall = time.perf_counter() - t
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += "".join(traceback.format_exception(result.exception))
    log.append({"cmd": "vqtok " + " ".join(map(str, args)), "rc": result.exit_code, "wall_s": round(wall, 2),
                "tail": text[-1500:]})
    if result.exit_code != 0:
        raise RuntimeError(f"vqtok {args[0]} exited {result.exit_code}:\n{text[-3000:]}")
    return wall


def part_commands(device: torch.device, sz: dict, work: Path) -> dict:
    dev = device.type if device.index is None else f"{device.type}:{device.index}"
    data = write_images(work / "images")
    tok, tokens, ar, samples = work / "tok", work / "tokens", work / "ar", work / "samples"
    log: list = []
    out: dict = {"commands": log}
    steps = sz["cli_tok_steps"]
    out["train_tokenizer_s"] = vqtok_cli([
        "train-tokenizer", data, "--config", "tiny-vqgan", "--out", tok, "--device", dev,
        f"train.steps={steps}", "train.batch_size=4", "train.num_workers=0", "train.amp=true", "loss.disc_start=1",
        f"train.ckpt_every={steps}", f"train.preview_every={steps}", "train.log_every=5",
    ], log)
    assert (tok / "final" / "model.safetensors").is_file(), "train-tokenizer left no final/model.safetensors"
    out["encode_s"] = vqtok_cli([
        "encode", data, "--size", 64, "--tokenizer", tok / "final", "--out", tokens, "--batch-size", 4,
        "--workers", 0, "--device", dev,
    ], log)
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["num_samples"] == 8, f"encode wrote {manifest['num_samples']} samples, expected 8"
    epochs = sz["cli_ar_epochs"]  # 8 images at batch 4: 2 steps per epoch
    ar_steps = 2 * epochs
    out["train_ar_s"] = vqtok_cli([
        "train-ar", tokens, "--tokenizer", tok / "final", "--config", "rar-tiny", "--epochs", epochs,
        "--anneal", max(1, epochs // 4), max(2, epochs // 2), "--out", ar, "--device", dev,
        "train.batch_size=4", "train.amp=true", f"train.ckpt_every={ar_steps}", f"train.preview_every={ar_steps}",
        "train.log_every=5",
    ], log)
    assert (ar / "final").is_dir(), "train-ar left no final/"
    graphs = device.type == "cuda"
    out["sample_cuda_graphs"] = graphs if device.type == "cuda" else "n/a (CPU)"
    out["sample_s"] = vqtok_cli([
        "sample", "--ckpt", ar / "final", "--tokenizer", tok / "final", "--cfg", 3.0, "--num-samples", sz["cli_sample_num"],
        "--batch-size", sz["cli_sample_num"], "--out", samples, "--device", dev, "--dtype", "bf16", "--png",
        *(["--cuda-graphs", "on"] if graphs else []),
    ], log)
    assert (samples / "grid.png").is_file(), "sample left no grid.png"
    assert len(list((samples / "images").glob("*.png"))) == sz["cli_sample_num"], "sample wrote the wrong number of PNGs"
    return out


# ------------------------------------------------------------------------------------------ part 2: sampling


class GraphedSampler:
    """The product's static-buffer decoding (`vqtok sample --cuda-graphs`): vqtok.ar.cuda_graphs.CUDAGraphDecoder
    on CUDA (one captured graph per decode step), vqtok.ar.rar_decoding.StaticDecoder elsewhere (the same static
    buffers refilled in place, run eagerly; what --check tests on CPU), driven by the one sampling loop."""

    def __init__(self, model, batch: int, cfg, graphs: bool, autocast_dtype: torch.dtype | None = torch.bfloat16):
        from vqtok.ar.cuda_graphs import CUDAGraphDecoder
        from vqtok.ar.rar_decoding import StaticDecoder

        if not cfg.uses_cfg:
            raise ValueError("GraphedSampler is written for guided sampling (CFG > 1)")
        self.model, self.cfg = model, cfg
        self.device = model.lm_head.weight.device
        self.dtype = autocast_dtype if self.device.type == "cuda" else None
        order = model.generation_order(cfg.order)
        with self._autocast():  # the graphs keep the dtypes they were captured with
            self.decoder = (CUDAGraphDecoder if graphs else StaticDecoder)(model, batch, True, order)
        self.first_logits: torch.Tensor | None = None

    def _autocast(self):
        if self.dtype is not None:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def sample(self, class_ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        from vqtok.app.sample import sample_tokens

        with self._autocast():
            tokens = sample_tokens(self.model, class_ids.to(self.device), self.cfg, uniforms.to(self.device),
                                   decoder=self.decoder)
            # the first step's logits of this batch, kept for the in-place refill check
            self.first_logits = self.decoder.start(self.decoder.cond_ids.clone(), self.decoder.orders[0]).float().clone()
        return tokens


def build_rar(spec, device):
    from vqtok.ar.presets import get_preset
    from vqtok.ar.rar import RAR, RARConfig

    cfg = get_preset(spec) if isinstance(spec, str) else RARConfig(**spec)
    torch.manual_seed(0)
    model = RAR(cfg)
    with torch.no_grad():  # non-zero adaLN so no block is a cheap identity
        for block in model.blocks:
            block.adaLN_modulation[1].weight.normal_(0, 0.02)
    return model.to(device).eval()


def part_sampling(device: torch.device, sz: dict) -> dict:
    from vqtok.app.sample import sample_noise, sample_tokens
    from vqtok.ar.sampling import SamplingConfig
    from vqtok.tokenizer.tokenizer import build_tokenizer

    model = build_rar(sz["sample_model"], device)
    tok = build_tokenizer(sz["sample_tokenizer"]).to(device).eval()
    if tok.vocab_size != model.config.vocab_size:
        raise RuntimeError(f"tokenizer vocab {tok.vocab_size} != generator vocab {model.config.vocab_size}")
    B, N = sz["sample_batch"], model.config.seq_len
    cfg = SamplingConfig(guidance_scale=4.0, guidance_schedule="power-cosine", guidance_power=2.75)
    classes = torch.arange(B) * 7 % model.config.num_classes
    noise = sample_noise(0, range(B), N)
    reps, warm = sz["sample_repeats"], sz["warmup"]
    out = {"model_params_M": model.num_parameters() / 1e6, "batch": B, "dtype": "bf16" if device.type == "cuda" else "fp32"}

    def eager_tokens():
        with autocast_bf16(device):
            return sample_tokens(model, classes, cfg, noise)

    def decode(tokens):
        with torch.inference_mode(), autocast_bf16(device):
            return tok.decode(tokens)

    t = time_calls(eager_tokens, device, reps, warm)
    out["eager_tokens_img_s"] = B / statistics.median(t)
    t = time_calls(lambda: decode(eager_tokens()), device, reps, warm)
    out["eager_with_decode_img_s"] = B / statistics.median(t)
    t0 = time.perf_counter()
    graphed = GraphedSampler(model, B, cfg, graphs=device.type == "cuda")
    out["graph_capture_s"] = time.perf_counter() - t0 if device.type == "cuda" else "n/a (CPU: steps run on the static buffers)"
    t = time_calls(lambda: graphed.sample(classes, noise), device, reps, warm)
    out["graphed_tokens_img_s"] = B / statistics.median(t)
    t = time_calls(lambda: decode(graphed.sample(classes, noise)), device, reps, warm)
    out["graphed_with_decode_img_s"] = B / statistics.median(t)
    ref, got = eager_tokens(), graphed.sample(classes, noise)
    out["graphed_tokens_equal_eager"] = float((ref == got).float().mean())
    out["rar_b_sampling_with_decode_img_s"] = max(out["graphed_with_decode_img_s"], out["eager_with_decode_img_s"])
    # an in-place refill with other classes must change the result (no stale condition state)
    first = graphed.first_logits
    graphed.sample((classes + 1) % model.config.num_classes, noise)
    out["refill_changes_logits"] = not torch.equal(first, graphed.first_logits)
    del graphed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def build_generators(device: torch.device, sz: dict) -> list[tuple[str, torch.nn.Module, object]]:
    """[(name, model, SamplingConfig)]: VAR (its preset on the multi-scale tokenizer's codebook; --check: a
    2-block VAR on tiny-msvq) and LlamaGen, random weights, each with its release's FID sampling setting."""
    from vqtok.ar import llamagen, var
    from vqtok.ar.sampling import SamplingConfig
    from vqtok.tokenizer.tokenizer import build_tokenizer

    torch.manual_seed(0)
    quant = build_tokenizer(sz["var_tokenizer"]).quantize.to(device).eval()
    if sz["var_preset"]:
        var_cfg = var.PRESETS[sz["var_preset"]]()
    else:
        var_cfg = var.VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=quant.codebook_size,
                                codebook_dim=quant.dim, patch_nums=[h for h, _ in quant.scales])
    var_model = var.VAR(var_cfg, quantizer=quant).to(device).eval()
    llama = llamagen.LlamaGen(llamagen.PRESETS[sz["llamagen_preset"]]()).to(device).eval()
    with torch.no_grad():  # the zero-initialised output layer would make every logit equal
        llama.output.weight.normal_(0, 0.02)
    return [(sz["var_preset"] or "var (2 blocks)", var_model,  # VAR's README: cfg 1.5 ramped, top-k 900, top-p 0.96
             SamplingConfig(guidance_scale=2.5, guidance_schedule="ramp", top_k=900, top_p=0.96)),
            (sz["llamagen_preset"], llama, SamplingConfig(guidance_scale=2.0))]  # LlamaGen B: CFG 2.0, no filters


def part_generators(device: torch.device, sz: dict) -> dict:
    """VAR and LlamaGen guided sampling through the one sampling loop, tokens only, bf16 on CUDA: the eager KV
    cache and the family's CUDA-graph decoder (on CPU its static-buffer decoder, run eagerly), img/s, and the
    fraction of codes the two agree on (the same noise)."""
    from vqtok.app.sample import sample_noise
    from vqtok.ar.llamagen import StaticDecoder
    from vqtok.ar.sampling import InverseCDFDraw, sample
    from vqtok.ar.var_graphs import VARStaticDecoder

    B, reps, warm = sz["gen_batch"], sz["sample_repeats"], sz["warmup"]
    out: dict = {"batch": B, "dtype": "bf16" if device.type == "cuda" else "fp32"}
    for name, model, cfg in build_generators(device, sz):
        N = sum(model.generation_steps())
        classes = (torch.arange(B) * 7 % model.config.num_classes).to(device)
        noise = sample_noise(0, range(B), N).to(device)
        with autocast_bf16(device):
            t0 = time.perf_counter()
            if device.type == "cuda":
                graphed = model.graph_decoder(B, True)
            else:
                graphed = (VARStaticDecoder if hasattr(model, "quantizer") else StaticDecoder)(model, B, True)
            capture_s = time.perf_counter() - t0
        runs = {}
        for kind, decoder in (("eager", None), ("graphed", graphed)):
            def run(decoder=decoder):
                with torch.no_grad(), autocast_bf16(device):
                    return sample(model, classes, cfg, draw=InverseCDFDraw(noise), decoder=decoder).tokens
            runs[kind] = run
            out[f"{name}_{kind}_img_s"] = B / statistics.median(time_calls(run, device, reps, warm))
        out[f"{name}_graphed_equal_eager"] = float((runs["eager"]() == runs["graphed"]()).float().mean())
        out[f"{name}_capture_s"] = capture_s if device.type == "cuda" else "n/a (CPU: static buffers, no capture)"
        out[f"{name}_params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        out.setdefault("generators", []).append(name)
        del graphed
    return out


# ------------------------------------------------------------------------------------------ part 2: training, encode


def part_rar_train(device: torch.device, sz: dict) -> dict:
    from bench_train_ar import bench_model, gemm_gflops

    hidden, depth, heads = sz["train_model"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        gemm = gemm_gflops(device, 8192, dtype=torch.bfloat16) / 1e3
    else:
        gemm = gemm_gflops(device, 512) / 1e3
    r = bench_model(hidden, depth, heads, sz["train_batch"], sz["train_steps"], device, 0.1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = next((v for k, v in sorted(BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)
    out = {"hidden": hidden, "depth": depth, "batch": sz["train_batch"], "params_M": r["params_M"],
           "tok_per_s": r["tok_per_s"], "step_s": r["step_s"], "model_tflops": r["model_tflops"],
           "gemm_tflops_measured": gemm, "peak_tflops_spec": spec,
           "mfu_vs_measured_gemm": r["model_tflops"] / gemm}
    out["rar_b_train_mfu"] = r["model_tflops"] / spec if spec else out["mfu_vs_measured_gemm"]
    return out


def part_tokenizer_train(device: torch.device, sz: dict) -> dict:
    from bench_train_tokenizer import build_engine_step

    step, task, cfg = build_engine_step(sz["tok_recipe"], sz["tok_batch"], device, ["train.amp=true"],
                                        resolution=sz["tok_res"])
    times = time_calls(step, device, sz["tok_steps"], warmup=2)
    phases = [p.name for p in task.phases()]
    return {"recipe": sz["tok_recipe"], "resolution": cfg.data.resolution, "batch": sz["tok_batch"], "phases": phases,
            "step_s": statistics.median(times), "img_s": sz["tok_batch"] / statistics.median(times),
            "lpips": "random VGG16 trunk" if cfg.loss.perceptual_weight > 0 else "off (recipe)"}


def part_encode(device: torch.device, sz: dict) -> dict:
    from vqtok.tokenizer.tokenizer import build_tokenizer

    tok = build_tokenizer(sz["encode_tokenizer"]).to(device).eval()
    B, res = sz["encode_batch"], sz["encode_res"]
    images = torch.rand(B, 3, res, res, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        with torch.inference_mode(), autocast_bf16(device):
            return tok.encode(images)

    idx = run()
    assert idx.shape[0] == B
    times = time_calls(run, device, sz["encode_repeats"], sz["warmup"])
    return {"tokenizer": sz["encode_tokenizer"], "resolution": res, "batch": B, "img_s": B / statistics.median(times)}


# ------------------------------------------------------------------------------------------ report


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"GPU suite, {m['date']}, {m['device']}, torch {m['torch']}, command `{m['command']}`"
             f"{' (--check: toy sizes on CPU, not a measurement)' if results['check'] else ''}", "",
             "| part | result |", "|---|---|"]

    def row(name, text):
        lines.append(f"| {name} | {text} |")

    for part, _ in PARTS:
        r = results.get(part)
        if r is None:
            continue
        if "error" in r:
            row(part, f"FAILED: {r['error'].splitlines()[0][:200]}")
            continue
        if "skipped" in r:
            row(part, f"skipped ({r['skipped']})")
            continue
        if part == "commands":
            row("train-tokenizer / encode / train-ar / sample (tiny, bf16)",
                f"{r['train_tokenizer_s']:.1f} s / {r['encode_s']:.1f} s / {r['train_ar_s']:.1f} s / {r['sample_s']:.1f} s; "
                f"sample --cuda-graphs: {r['sample_cuda_graphs']}")
        elif part == "sampling":
            row(f"RAR sampling ({r['model_params_M']:.1f}M), batch {r['batch']}, CFG, {r['dtype']}",
                f"eager {r['eager_tokens_img_s']:.1f} img/s tokens, {r['eager_with_decode_img_s']:.1f} with decoding; "
                f"CUDA graphs {r['graphed_tokens_img_s']:.1f} / {r['graphed_with_decode_img_s']:.1f} img/s "
                f"(tokens equal eager: {r['graphed_tokens_equal_eager']:.3f}); goal >= 200 img/s with decoding")
        elif part == "rar_train":
            peak = f"{r['peak_tflops_spec']:.0f} TFLOP/s spec" if r["peak_tflops_spec"] else "no spec known"
            row(f"RAR train step (hidden {r['hidden']}, depth {r['depth']}), batch {r['batch']} x 256",
                f"{r['tok_per_s']:.0f} tok/s, {r['model_tflops']:.1f} TFLOP/s = MFU {100 * r['rar_b_train_mfu']:.1f}% "
                f"({peak}; {100 * r['mfu_vs_measured_gemm']:.1f}% of the GEMM measured here, "
                f"{r['gemm_tflops_measured']:.0f} TFLOP/s); goal >= 45%")
        elif part == "tokenizer_train":
            row(f"tokenizer train step ({r['recipe']}, {r['resolution']} px, batch {r['batch']})",
                f"{r['img_s']:.2f} img/s ({r['step_s'] * 1e3:.0f} ms/step, {'+'.join(r['phases'])}, LPIPS {r['lpips']})")
        elif part == "encode":
            row(f"encode ({r['tokenizer']}, {r['resolution']} px, batch {r['batch']})", f"{r['img_s']:.1f} img/s")
        elif part == "generators":
            for name in r["generators"]:
                row(f"{name} sampling ({r[name + '_params_M']:.0f}M), batch {r['batch']}, CFG, {r['dtype']}, tokens",
                    f"eager {r[name + '_eager_img_s']:.1f} img/s, CUDA graphs {r[name + '_graphed_img_s']:.1f} img/s "
                    f"(codes equal eager: {r[name + '_graphed_equal_eager']:.3f})")
    lines.append("")
    lines.append(f"total {results.get('total_s', 0.0):.0f} s")
    return "\n".join(lines) + "\n"


# (name, function(device, sizes, work folder)) in the order they run
PARTS = [("commands", part_commands),
         ("sampling", lambda device, sz, work: part_sampling(device, sz)),
         ("rar_train", lambda device, sz, work: part_rar_train(device, sz)),
         ("tokenizer_train", lambda device, sz, work: part_tokenizer_train(device, sz)),
         ("encode", lambda device, sz, work: part_encode(device, sz)),
         ("generators", lambda device, sz, work: part_generators(device, sz))]


def write_report(results: dict, out_dir: Path) -> str:
    """gpu_results.json and gpu_results.md as they stand (after every part, so that a run stopped at the
    device's time limit still leaves the parts it finished); returns the table."""
    from vqtok.atomic_files import atomic_write_bytes

    results["goals"] = {
        "rar_b_sampling_with_decode_img_s": {"goal": GOALS["rar_b_sampling_with_decode_img_s"],
                                             "got": results.get("sampling", {}).get("rar_b_sampling_with_decode_img_s")},
        "rar_b_train_mfu": {"goal": GOALS["rar_b_train_mfu"], "got": results.get("rar_train", {}).get("rar_b_train_mfu")},
    }
    atomic_write_bytes(out_dir / "gpu_results.json", (json.dumps(results, indent=2, default=str) + "\n").encode())
    table = markdown(results)
    atomic_write_bytes(out_dir / "gpu_results.md", table.encode())
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="CPU, toy sizes: prove every code path is wired")
    p.add_argument("--out", default="gpu_results", help="folder for gpu_results.json and gpu_results.md")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --check)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: " + ",".join(n for n, _ in PARTS))
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no part once this many seconds have passed (the rest are reported as skipped); "
                        "bench/gpu_run.sh passes 330 so that a 600-second device command ends with its report")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.check else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --check for the CPU wiring test", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {n for n, _ in PARTS}
    if unknown:
        print(f"error: --skip names no part {sorted(unknown)}; the parts: {', '.join(n for n, _ in PARTS)}",
              file=sys.stderr)
        return 2
    if args.check and device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    sz = sizes(args.check)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"check": args.check, "machine": {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
        "load_average": os.getloadavg()[0], "command": " ".join(["python bench/gpu_suite.py", *(argv or sys.argv[1:])])}}
    t_all = time.perf_counter()
    failed, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in PARTS:
            if name in skip:
                continue
            elapsed = time.perf_counter() - t_all
            if elapsed >= args.budget_s:
                results[name] = {"skipped": f"time budget: {elapsed:.0f} s of --budget-s {args.budget_s:g} spent"}
                skipped.append(name)
                continue
            t = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                r = fn(device, sz, Path(tmp))
            except Exception as exc:  # noqa: BLE001 (one part failing must not hide the others' figures)
                r = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
                failed.append(name)
                print(r["traceback"], file=sys.stderr, flush=True)
            r["part_s"] = time.perf_counter() - t
            results[name] = r
            print(json.dumps({k: v for k, v in r.items() if k not in ("commands", "traceback")}, default=str), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["total_s"] = time.perf_counter() - t_all
            write_report(results, out_dir)
    results["total_s"] = time.perf_counter() - t_all
    table = write_report(results, out_dir)
    print(table)
    if skipped:
        print(f"skipped for the time budget: {', '.join(skipped)} (rerun with --skip for the parts done)", file=sys.stderr)
    if failed:
        print(f"FAILED parts: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
