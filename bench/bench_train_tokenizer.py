"""Tokenizer training step time and its breakdown: generator forward/backward, LPIPS, discriminator.

    python bench/bench_train_tokenizer.py --recipe tiny-vqgan --batch 8 --steps 5
    python bench/bench_train_tokenizer.py --recipe vqgan-f16 --batch 1 --steps 2 --lpips random-for-tests

Times each piece of one engine step separately on random images (median over --steps after one warm-up):
  g_fwd_bwd   tokenizer forward + reconstruction/quantizer loss + backward
  lpips       LPIPS-VGG forward + backward to the reconstruction (random trunk unless --lpips PATH)
  d_on_g      discriminator forward + backward to the reconstruction (the generator's adversarial term)
  d_step      discriminator loss on real and fake + backward (the discriminator phase)
  optim       both Adam steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vqtok.device import autocast, pick_device
from vqtok.losses.gan import hinge_d_loss
from vqtok.losses.lpips import LPIPS
from vqtok.losses.discriminators import build_discriminator
from vqtok.tokenizer.tokenizer import build_tokenizer
from vqtok.train.tokenizer_task import load_run_config, resolve_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps):
    fn()
    sync(device)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tiny-vqgan")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lpips", default="random-for-tests")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    cfg = load_run_config(args.recipe)
    tok_cfg = resolve_model(cfg)
    res = cfg.data.resolution
    tok = build_tokenizer(tok_cfg).to(device).train()
    disc = build_discriminator(cfg.loss.disc, res).to(device)
    lp = LPIPS(args.lpips).to(device)
    opt_g = torch.optim.Adam(tok.parameters(), lr=1e-5, foreach=True)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-5, foreach=True)
    x = torch.rand(args.batch, 3, res, res, device=device)
    recon = torch.rand_like(x).requires_grad_()

    def g():
        with autocast(device):
            out = tok(x)
            loss = (out.recon - x).abs().mean() + out.aux["loss"]
        loss.backward()

    def lpips_part():
        with autocast(device):
            d = lp(x * 2 - 1, recon * 2 - 1).mean()
        d.backward()

    def d_on_g():
        with autocast(device):
            d = -disc(recon * 2 - 1).float().mean()
        d.backward()

    def d_step():
        with autocast(device):
            d = hinge_d_loss(disc(x * 2 - 1).float(), disc(recon.detach() * 2 - 1).float())
        d.backward()

    def optim():
        opt_g.step()
        opt_d.step()

    parts = {name: timed(fn, device, args.steps) for name, fn in
             [("g_fwd_bwd", g), ("lpips", lpips_part), ("d_on_g", d_on_g), ("d_step", d_step), ("optim", optim)]}
    total = sum(parts.values())
    params = sum(p.numel() for p in tok.parameters()) / 1e6
    print(f"recipe={args.recipe} res={res} batch={args.batch} device={device} threads={torch.get_num_threads()} "
          f"tokenizer={params:.1f}M params")
    for name, t in parts.items():
        print(f"  {name:10s} {t * 1000:9.1f} ms  ({t / total:5.1%})")
    print(f"  {'step':10s} {total * 1000:9.1f} ms  -> {args.batch / total:.2f} img/s")


if __name__ == "__main__":
    main()
