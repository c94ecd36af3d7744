"""Held-out tokenizer quality of the tiny recipes at a fixed step budget.

Training data: random crops (short side 128..384 px, then a 64 px crop) of 9 of the photos scikit-image ships.
Held-out set: 6 other whole photos, never seen in training, each resized to short sides 128, 256 and 384 and
tiled into non-overlapping 64 px crops (about 340 crops, 21k tokens: ~40 per code of a 512-code book).

For each row it reports, on the held-out set: codebook usage, perplexity and dead codes (per scale for
multi-scale), PSNR, SSIM and LPIPS (only when the VGG16 file is in the torch hub cache or --lpips-weights).
The `vqp` row puts lucidrains' vector-quantize-pytorch `VectorQuantize` (its anti-collapse settings: k-means
init, dead-code threshold, rotation trick, cosine codes like tiny-vqgan's) into the same tiny-vqgan
autoencoder, data, losses and budget. vector-quantize-pytorch is NOT a vqtok dependency: install it
outside the venv, e.g.

    pip install --no-deps --target /work/benchdeps vector-quantize-pytorch einops einx
    python bench/bench_tokenizer_quality.py --steps 600 --vqp-path /work/benchdeps

Rows: tiny-vqgan tiny-fsq tiny-lfq tiny-msvq vqp (pick with --rows). Results: --out DIR/results.json and a
markdown table on stdout (paste it into bench/README.md with date, machine and command). Rows run as
separate processes (one --out each) are joined with `--table DIR1/results.json DIR2/results.json ...`.
Run-to-run noise: `--seed N` sets train.seed for every row (initial weights, the quantizer's k-means and
restart draws, and the training crops); `--table` over several seeds' results also prints each row's mean
and spread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TRAIN_PHOTOS = {"astronaut": "astronaut.png", "cat": "chelsea.png", "coffee": "coffee.png", "microscopy": "ihc.png",
                "motorcycle": "motorcycle_left.png", "rocket": "rocket.jpg", "space": "hubble_deep_field.jpg",
                "texture_a": "brick.png", "texture_b": "grass.png"}
HELD_OUT_PHOTOS = ("motorcycle_right.png", "retina.jpg", "moon.png", "gravel.png", "camera.png", "coins.png")
HELD_OUT_SIDES = (128, 256, 384)
RES = 64


def photo(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def build_train_folder(data_dir: Path, out: Path) -> Path:
    for cls, name in TRAIN_PHOTOS.items():
        (out / "train" / cls).mkdir(parents=True, exist_ok=True)
        photo(data_dir / name).save(out / "train" / cls / f"{cls}.png")
    return out


def held_out_tiles(data_dir: Path) -> torch.Tensor:
    tiles = []
    for name in HELD_OUT_PHOTOS:
        img = photo(data_dir / name)
        for side in HELD_OUT_SIDES:
            w, h = img.size
            s = side / min(w, h)
            arr = np.asarray(img.resize((max(RES, round(w * s)), max(RES, round(h * s))), Image.BICUBIC))
            for y in range(0, arr.shape[0] - RES + 1, RES):
                for x in range(0, arr.shape[1] - RES + 1, RES):
                    tiles.append(arr[y:y + RES, x:x + RES])
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------- the vector-quantize-pytorch row


def install_vqp_quantizer(vqp_path: str | None):
    """Make tiny-vqgan's 'vq' quantizer kind build vector-quantize-pytorch's VectorQuantize (bench only);
    returns the function that undoes it."""
    if vqp_path:
        sys.path.insert(0, vqp_path)
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError as exc:
        raise SystemExit(f"the vqp row needs vector-quantize-pytorch ({exc}); install it outside the venv and pass "
                         "--vqp-path DIR, or leave the row out with --rows") from None
    import vqtok.tokenizer.tokenizer as tokenizer_module
    from vqtok.tokenizer.quantizers.base import Quantizer, QuantizerOutput, usage_stats
    from vqtok.tokenizer.quantizers.vq import VQConfig

    class VQPQuantizer(Quantizer):
        def __init__(self, cfg: VQConfig):
            super().__init__()
            self.codebook_size, self.dim = cfg.codebook_size, cfg.dim
            # the library's README settings against collapse, with cosine codes like tiny-vqgan
            self.vq = VectorQuantize(dim=cfg.dim, codebook_size=cfg.codebook_size, use_cosine_sim=cfg.l2_norm,
                                     kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=2,
                                     rotation_trick=True, commitment_weight=cfg.beta, decay=0.8,
                                     accept_image_fmap=True)

        def forward(self, z):
            z_q, idx, commit = self.vq(z)
            self.record_counts(idx)
            aux = {"loss": commit.reshape(()).float() if commit.numel() == 1 else commit.sum().float()}
            aux.update(usage_stats(idx, self.codebook_size))
            return QuantizerOutput(z_q, idx, aux)

        def indices_to_codes(self, indices):
            return self.vq.get_output_from_indices(indices).permute(0, 3, 1, 2)

    original = tokenizer_module.quantizer_classes
    tokenizer_module.quantizer_classes = lambda kind: (VQPQuantizer, VQConfig) if kind == "vq" else original(kind)

    def restore() -> None:
        tokenizer_module.quantizer_classes = original

    return restore


# ---------------------------------------------------------------- train + evaluate one row


def train_row(recipe: str, data: Path, run_dir: Path, steps: int, extra: list[str]):
    from vqtok.distributed import DistEnv
    from vqtok.train.engine import Engine
    from vqtok.train.tokenizer_task import TokenizerTrainTask, load_run_config

    over = [f"train.steps={steps}", "data.scale_range=[2.0,6.0]", f"train.log_every={max(1, steps // 10)}",
            f"train.ckpt_every={steps}", f"train.preview_every={steps}", "train.num_workers=1", *extra]
    cfg = load_run_config(recipe, over)
    env = DistEnv(device=torch.device("cpu"))
    task = TokenizerTrainTask(cfg, env, data, run_dir)
    engine = Engine(cfg.train, env, run_dir, resolved_config=cfg)
    t0 = time.perf_counter()
    result = engine.run(task)
    seconds = time.perf_counter() - t0
    if result.interrupted:  # a stopped run is not the budget: record nothing for this row
        raise SystemExit(f"{recipe} stopped at step {result.step} of {steps}; no row recorded")
    task.tokenizer.load_state_dict(engine._ema_weights(task.phases())["generator"])  # what final/ exports
    return task.tokenizer.eval(), seconds


@torch.no_grad()
def evaluate(tok, tiles: torch.Tensor, lpips_model=None) -> dict:
    from vqtok.eval.codebook import CodebookStats
    from vqtok.eval.image_metrics import psnr, ssim

    stats = CodebookStats(tok.vocab_size, tok.scales)
    p, s, lp = [], [], []
    for i in range(0, tiles.shape[0], 32):
        x = tiles[i:i + 32]
        out = tok(x)
        rec = out.recon.clamp(0, 1)
        stats.update(out.indices)
        p.append(psnr(rec, x))
        s.append(ssim(rec, x))
        if lpips_model is not None:
            lp.append(lpips_model(x * 2 - 1, rec * 2 - 1).flatten())
    rep = stats.report()
    row = {"usage": rep["usage"], "codes_used": rep["codes_used"], "perplexity": rep["perplexity"],
           "dead_codes": tok.vocab_size - rep["codes_used"], "vocab": tok.vocab_size,
           "psnr": float(torch.cat([v.flatten() for v in p]).mean()), "ssim": float(torch.cat([v.flatten() for v in s]).mean()),
           "lpips": float(torch.cat(lp).mean()) if lp else None, "tokens": rep["tokens"]}
    if "per_scale" in rep:
        row["per_scale"] = [{k: sc[k] for k in ("scale", "usage", "codes_used", "perplexity", "tokens")} for sc in rep["per_scale"]]
    return row


def row_key(name: str, seed: int | None, sets: list[str]) -> str:
    """The row's key in results.json: its name, plus (with --seed) its --set overrides and its seed, so runs of
    several seeds and settings join with --table without overwriting each other."""
    if seed is None:
        return name
    return f"{name} [{' '.join(sets)}] seed {seed}" if sets else f"{name} seed {seed}"


def seed_summary(rows: dict[str, dict]) -> str:
    """Mean and spread (min..max, sample standard deviation) of usage, perplexity, PSNR and SSIM over the
    seeds of each row run with --seed (rows with the same name, steps and other --set overrides); empty when
    no row has two seeds."""
    groups: dict[tuple[str, int, tuple[str, ...]], list[dict]] = {}
    for r in rows.values():
        if r.get("seed") is not None:
            other = tuple(o for o in r.get("overrides", []) if not o.startswith("train.seed="))
            groups.setdefault((r.get("name", "?"), r["steps"], other), []).append(r)
    lines = []
    for (name, steps, other), rs in groups.items():
        if other:
            name = f"{name} ({' '.join(other)})"
        if len(rs) < 2:
            continue
        cells = []
        for key, fmt in (("usage", "{:.1%}"), ("perplexity", "{:.0f}"), ("psnr", "{:.2f}"), ("ssim", "{:.3f}")):
            v = np.array([r[key] for r in rs], dtype=float)
            cells.append(f"{fmt.format(v.mean())} ({fmt.format(v.min())}..{fmt.format(v.max())}, sd {fmt.format(v.std(ddof=1))})")
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(f"| {name} | {steps} | {seeds} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["| row (each cell: mean (min..max, sd)) | steps | seeds | usage | perplexity | PSNR dB | SSIM |",
            "|---|---:|---|---:|---:|---:|---:|"]
    return "\n".join(head + lines)


def table(rows: dict[str, dict]) -> str:
    lines = ["| row | steps | train s | usage | codes | perplexity | dead | PSNR dB | SSIM | LPIPS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lp = f"{r['lpips']:.3f}" if r.get("lpips") is not None else "n/a"
        lines.append(f"| {name} | {r['steps']} | {r['train_seconds']:.0f} | {r['usage']:.1%} | {r['codes_used']}/{r['vocab']} | "
                     f"{r['perplexity']:.0f} | {r['dead_codes']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {lp} |")
        for sc in r.get("per_scale", []):
            tpc = sc["tokens"] / r["vocab"]
            lines.append(f"| {name} @ {sc['scale']} ({tpc:.1f} tok/code) | | | {sc['usage']:.1%} | {sc['codes_used']}/{r['vocab']} | "
                         f"{sc['perplexity']:.0f} | | | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rows", default="tiny-vqgan,tiny-fsq,tiny-msvq,vqp,tiny-lfq")
    ap.add_argument("--out", type=Path, default=Path("bench_out/tokenizer_quality"))
    ap.add_argument("--vqp-path", default=None, help="folder holding vector_quantize_pytorch (installed with --target)")
    ap.add_argument("--lpips-weights", default=None, help="vgg16-397923af.pth (default: the torch hub cache, if present)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every row (repeatable), e.g. model.quantizer.params.using_znorm=false")
    ap.add_argument("--seed", type=int, default=None,
                    help="train.seed for every row (weights, k-means draws and training crops all follow it); "
                         "the row is recorded as 'NAME [--set overrides] seed N' so several seeds and settings join with --table")
    ap.add_argument("--table", nargs="+", type=Path, metavar="RESULTS_JSON",
                    help="only print the table of these results files (rows run as separate processes), in order")
    args = ap.parse_args()
    if args.table:
        merged: dict[str, dict] = {}
        for path in args.table:
            merged.update(json.loads(path.read_text()))
        print(table(merged))
        summary = seed_summary(merged)
        if summary:
            print("\n" + summary)
        return 0
    torch.set_num_threads(args.threads)

    from vqtok.data.default_dataset import skimage_data_dir
    from vqtok.errors import UserError
    from vqtok.losses.lpips import resolve_vgg16_weights

    data_dir = skimage_data_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    data = build_train_folder(data_dir, args.out / "data")
    tiles = held_out_tiles(data_dir)
    print(f"held-out: {tiles.shape[0]} tiles of {RES}px from {len(HELD_OUT_PHOTOS)} photos never trained on", flush=True)
    lpips_model = None
    try:
        if resolve_vgg16_weights(args.lpips_weights) is not None:
            from vqtok.losses.lpips import build_lpips
            lpips_model = build_lpips(args.lpips_weights).eval()
    except UserError:
        print("LPIPS off: no VGG16 file (vgg16-397923af.pth) in the torch hub cache or --lpips-weights", flush=True)

    overrides = [*args.set, *([f"train.seed={args.seed}"] if args.seed is not None else [])]
    results_file = args.out / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        recipe = "tiny-vqgan" if name == "vqp" else name
        restore = install_vqp_quantizer(args.vqp_path) if name == "vqp" else None
        run_dir = args.out / "runs" / name
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        print(f"\n== {name}: {args.steps} steps of {recipe}", flush=True)
        try:
            tok, seconds = train_row(recipe, data, run_dir, args.steps, overrides)
        finally:
            if restore is not None:
                restore()
        row = evaluate(tok, tiles, lpips_model)
        row.update(name=name, seed=args.seed, steps=args.steps, train_seconds=seconds, recipe=recipe, overrides=overrides)
        rows[row_key(name, args.seed, args.set)] = row
        results_file.write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    print("\n" + table(rows))
    summary = seed_summary(rows)
    if summary:
        print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
