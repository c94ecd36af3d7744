"""The tokenizer training loss: reconstruction + perceptual + quantizer aux + adversarial, all weighted.

Generator:  l1_weight*|x-x̂| + l2_weight*(x-x̂)^2 + perceptual_weight*LPIPS(x,x̂)            (= nll)
            + quantizer_weight*aux["loss"] + factor(step)*w_adv*G_loss(D(x̂))
with w_adv = disc_weight * ||∇nll|| / (||∇G|| + 1e-4) on the decoder's last layer (taming) when
`adaptive_weight` is on, else disc_weight (LlamaGen / Open-MAGVIT2 / 1d-tokenizer). The adaptive weight
costs no second pass through LPIPS or D: nll and G are each back-propagated once to the reconstruction,
their gradients at the last layer come from those, and the loss returned for the backward carries the
combined reconstruction gradient (its value is the true loss).
With `share_fake_forward` (default; a discriminator without BatchNorm, one micro-batch per step) D's
forward on the reconstruction runs once per step: the generator pass runs it on a detached copy with D's
parameters trainable, back-propagates G_loss to that copy only, and hands the graph to the discriminator
pass, whose backward reaches D's parameters from it. With the adaptive weight the ops are those of two
forwards; without it G's gradient differs by rounding (D's backward from 1, then scaled by the weight). The
step saves one D forward.
Discriminator: factor(step) * (d_loss_weight*D_loss(D(x), D(x̂)) + lecam_weight*LeCam + lazy R1 every `r1_every`
steps): the regularisers follow the same start/warm-up ramp as the loss they regularise. LlamaGen multiplies
D's loss by its disc_weight too (vq_loss.py: `disc_weight * self.disc_loss(...)`), hence `d_loss_weight`.
R1 needs a discriminator without BatchNorm (its gradient through batch statistics couples the images of a
batch, and the extra forward moves the running statistics): a BatchNorm D with r1_weight > 0 is refused.
Images arrive in [0,1]; all terms are computed on the [-1,1] scale the anchors use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.errors import ConfigError
from vqtok.losses.discriminators import DiscriminatorConfig, build_discriminator
from vqtok.losses.gan import D_LOSSES, LeCam, adaptive_weight, disc_factor, g_loss, r1_penalty, reconstruction_grads
from vqtok.losses.lpips import build_lpips


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    # None: the torch hub cache; a path to vgg16-397923af.pth; or 'random-for-tests' (not a real metric).
    # `train-tokenizer --lpips-weights PATH` sets it when the config is loaded.
    lpips_weights: str | None = None
    quantizer_weight: float = 1.0
    disc_weight: float = 0.8  # 0 disables the discriminator entirely
    d_loss_weight: float = 1.0  # multiplies D's own loss (LlamaGen: its disc_weight, 0.5)
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1e4
    disc_start: int = 0
    disc_warmup: int = 0
    d_loss: Literal["hinge", "non_saturating"] = "hinge"
    g_loss: Literal["hinge", "non_saturating"] = "hinge"
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    r1_weight: float = 0.0  # gamma; the lazy penalty is gamma/2 * r1_every * R1
    r1_every: int = 16
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    # collapse monitor (vqtok/train/codebook_monitor.py): codebook usage over the last `usage_window` steps
    # (all ranks); a warning when it stays under usage_warn for 3 log rows (None: 0.5 for vq/msvq, off otherwise)
    usage_window: int = 100
    usage_warn: float | None = None
    # one D forward on the reconstruction per step, shared by the generator and discriminator passes (see
    # the module docstring; the trainer uses it only with grad_accum 1 and a D without BatchNorm)
    share_fake_forward: bool = True

    def check_ranges(self, where: str = "loss") -> None:
        from vqtok.validation import check_fields

        non_negative = {"low": 0.0}
        check_fields(self, where, {
            **{k: non_negative for k in ("l1_weight", "l2_weight", "perceptual_weight", "quantizer_weight", "disc_weight",
                                          "lecam_weight", "r1_weight")},
            "adaptive_weight_max": {"low": 0.0, "low_open": True}, "disc_start": {"low": 0}, "disc_warmup": {"low": 0},
            "lecam_decay": {"low": 0.0, "high": 1.0, "high_open": True}, "r1_every": {"low": 1},
        })


class TokenizerLoss(nn.Module):
    def __init__(self, cfg: LossConfig, resolution: int):
        super().__init__()
        self.cfg = cfg
        self.lpips = build_lpips(cfg.lpips_weights) if cfg.perceptual_weight > 0 else None
        self.discriminator = build_discriminator(cfg.disc, resolution) if cfg.disc_weight > 0 else None
        self.lecam = LeCam(cfg.lecam_decay) if (self.discriminator is not None and cfg.lecam_weight > 0) else None
        if self.discriminator is not None and cfg.r1_weight > 0 and _has_batchnorm(self.discriminator):
            raise ConfigError(
                f"loss.r1_weight {cfg.r1_weight:g} needs a discriminator without BatchNorm, and loss.disc.kind "
                f"'{cfg.disc.kind}' uses BatchNorm; set loss.disc.kind=stylegan or maskgit, or loss.r1_weight=0"
            )
        if cfg.d_loss_weight <= 0:
            raise ConfigError(f"loss.d_loss_weight must be positive, got {cfg.d_loss_weight:g}")
        # BatchNorm's running statistics would see the reconstruction once per step instead of twice
        self.can_share_fake = (self.discriminator is not None and cfg.share_fake_forward
                               and not _has_batchnorm(self.discriminator))

    @property
    def uses_random_lpips(self) -> bool:
        return self.lpips is not None and self.lpips.random_trunk

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and disc_factor(step, self.cfg.disc_start, self.cfg.disc_warmup) > 0

    def generator_loss(
        self,
        images: torch.Tensor,
        recon: torch.Tensor,
        aux: dict[str, torch.Tensor],
        step: int,
        last_layer: nn.Parameter | None,
        keep_fake: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(loss, metrics, D's logits of the reconstruction for `discriminator_loss`, or None).

        `keep_fake` (needs `can_share_fake`): D runs on a detached copy of the reconstruction with its
        parameters trainable, and its logits come back with their graph for the discriminator pass of the
        same step; G_loss reaches the tokenizer through the returned loss's reconstruction gradient.
        """
        cfg = self.cfg
        x, xr = images * 2 - 1, recon * 2 - 1
        metrics: dict[str, torch.Tensor] = {}
        nll = x.new_zeros((), dtype=torch.float32)
        if cfg.l1_weight > 0:
            metrics["rec_l1"] = (x - xr).abs().float().mean()
            nll = nll + cfg.l1_weight * metrics["rec_l1"]
        if cfg.l2_weight > 0:
            metrics["rec_l2"] = F.mse_loss(xr.float(), x.float())
            nll = nll + cfg.l2_weight * metrics["rec_l2"]
        if self.lpips is not None:
            metrics["lpips"] = self.lpips(x, xr).mean()
            nll = nll + cfg.perceptual_weight * metrics["lpips"]
        quant = aux["loss"].float()
        metrics["quant"] = quant
        total = nll + cfg.quantizer_weight * quant
        factor = disc_factor(step, cfg.disc_start, cfg.disc_warmup) if self.discriminator is not None else 0.0
        fake = None
        if factor > 0:
            grads = torch.is_grad_enabled() and recon.requires_grad
            g_rec = None  # d g / d recon, when computed here
            if keep_fake and grads:
                if not self.can_share_fake:
                    raise ValueError("keep_fake needs a discriminator without BatchNorm and loss.share_fake_forward")
                xr_d = xr.detach().requires_grad_(True)
                fake = self.discriminator(xr_d)
                g = g_loss(cfg.g_loss, fake.float())
                (g_xr,) = torch.autograd.grad(g, xr_d, retain_graph=True)  # D's input only: its weights wait
                g_rec = g_xr * 2  # xr = 2 recon - 1
            else:
                # D's parameters are frozen for this pass: G's loss must not train D.
                requires = [p.requires_grad for p in self.discriminator.parameters()]
                self.discriminator.requires_grad_(False)
                try:
                    g = g_loss(cfg.g_loss, self.discriminator(xr).float())
                finally:
                    for p, r in zip(self.discriminator.parameters(), requires):
                        p.requires_grad_(r)
            surrogate = None
            if cfg.adaptive_weight and last_layer is not None and grads:
                nll_rec, g_rec, nll_w, g_w = reconstruction_grads(nll, g, recon, last_layer, g_rec)
                w = adaptive_weight(nll_w, g_w, cfg.adaptive_weight_max) * cfg.disc_weight
                # LPIPS and D were back-propagated above: the tokenizer's backward starts from their combined
                # gradient at the reconstruction, d(nll + factor * w * g) / d recon with w a constant (plus
                # the quantizer term, which does not pass through it)
                surrogate = (recon * (nll_rec + (factor * w) * g_rec)).sum() + cfg.quantizer_weight * quant
            else:
                w = torch.tensor(cfg.disc_weight, device=g.device)
                if g_rec is not None:  # the shared forward: g's graph ends at D's input copy
                    surrogate = total + (recon * ((factor * w) * g_rec)).sum()  # total: nll + quantizer term
            metrics["g_adv"] = g
            metrics["adv_weight"] = w * factor
            total = total + factor * w * g
            if surrogate is not None:
                # the returned loss has the surrogate's gradient and the true loss's value; the metrics are
                # detached so LPIPS's and D's graphs go now (a kept `fake` keeps D's)
                metrics = {k: v.detach() for k, v in metrics.items()}
                true_total = total.detach()
                total = surrogate + (true_total - surrogate.detach())
                metrics["loss"] = true_total
        for name, value in aux.items():
            if name != "loss" and torch.is_tensor(value) and value.numel() == 1:
                metrics[f"q_{name}"] = value.detach().float().reshape(())
        metrics.setdefault("loss", total)
        return total, metrics, fake

    def discriminator_loss(
        self, images: torch.Tensor, recon: torch.Tensor, step: int, fake: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss; `fake`: D's logits of this reconstruction kept by `generator_loss` (else D runs on it)."""
        cfg = self.cfg
        d = self.discriminator
        x = images * 2 - 1
        # separate calls: BatchNorm sees real and fake apart (taming)
        real = d(x).float()
        fake = (d(recon.detach() * 2 - 1) if fake is None else fake).float()
        factor = disc_factor(step, cfg.disc_start, cfg.disc_warmup)
        d_main = D_LOSSES[cfg.d_loss](real, fake)
        total = cfg.d_loss_weight * d_main
        metrics = {"d_loss": d_main, "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
        if self.lecam is not None:
            metrics["lecam"] = self.lecam(real, fake)
            total = total + cfg.lecam_weight * metrics["lecam"]
        if cfg.r1_weight > 0 and step % cfg.r1_every == 0:
            metrics["r1"] = r1_penalty(d, x)
            total = total + 0.5 * cfg.r1_weight * cfg.r1_every * metrics["r1"]
        total = factor * total  # D's loss and its regularisers share the start / warm-up ramp
        metrics["d_total"] = total
        return total, metrics


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
