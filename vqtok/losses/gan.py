"""Adversarial losses, taming's adaptive generator weight, the discriminator schedule, LeCam and R1.

Conventions:
- logits are raw D outputs: (B,) per image or (B,1,h,w) patch maps; losses average over every logit.
- non-saturating losses call `binary_cross_entropy_with_logits(logits, target)`: logits first. LlamaGen
  swaps the two arguments in its discriminator loss, which silently turns the D fake term into a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.distributed import mean_over_ranks


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def non_saturating_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (BCE(D(x), 1) + BCE(D(x_hat), 0)); the 'vanilla' taming loss is the same quantity."""
    real_term = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    fake_term = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    return 0.5 * (real_term + fake_term)


def non_saturating_g_loss(fake: torch.Tensor, per_image_mean: bool = False) -> torch.Tensor:
    """BCE(D(x_hat), 1). `per_image_mean` averages patch logits per image first (Open-MAGVIT2)."""
    if per_image_mean and fake.dim() > 1:
        fake = fake.flatten(1).mean(1)
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return hinge_g_loss(fake)
    if kind == "non_saturating":
        return non_saturating_g_loss(fake, per_image_mean=True)
    raise ValueError(f"unknown generator GAN loss {kind}")


def disc_factor(step: int, start: int, warmup: int = 0) -> float:
    """0 before `start` (neither G's adversarial term nor D trains), then a linear ramp over `warmup` steps."""
    if step < start:
        return 0.0
    if warmup <= 0:
        return 1.0
    return min(1.0, (step - start + 1) / warmup)


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """taming: ||grad_W nll|| / (||grad_W g|| + 1e-4), clamped to [0, max_weight], detached.

    `nll_grad` and `g_grad` are the gradients of the reconstruction loss and of the generator's GAN loss
    at W, the decoder's final conv weight (`reconstruction_grads` computes them). Norms are taken in fp32
    (in fp16 they overflow to NaN). Under DDP the gradients are averaged over ranks first, so the weight is
    that of the global batch (and every rank applies the same one).
    """
    nll_grad, g_grad = mean_over_ranks(nll_grad.detach().float()), mean_over_ranks(g_grad.detach().float())
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def reconstruction_grads(
    nll: torch.Tensor, g: torch.Tensor, recon: torch.Tensor, last_layer: nn.Parameter,
    g_at_recon: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d nll / d recon, d g / d recon, d nll / dW, d g / dW) for the adaptive GAN weight.

    Each loss is back-propagated once to the reconstruction - nll through LPIPS (when on), g through the
    discriminator - and the two gradients at the last layer W come from those by a backward through the
    last layer alone. The caller then drives the tokenizer's backward with the combined reconstruction
    gradient, so neither LPIPS nor D is back-propagated a second time. The graph below `recon` is kept
    for that backward. A loss that does not depend on the reconstruction has zero gradients.
    `g_at_recon`: d g / d recon when the caller has it already (a D forward shared with D's own pass).
    """
    at_recon = []
    for loss, known in ((nll, None), (g, g_at_recon)):
        if known is not None:
            at_recon.append(known)
        elif loss.requires_grad:
            at_recon.append(torch.autograd.grad(loss, recon, retain_graph=True)[0])
        else:
            at_recon.append(torch.zeros_like(recon))
    at_w = [torch.autograd.grad(recon, last_layer, grad_outputs=r, retain_graph=True)[0] for r in at_recon]
    return at_recon[0], at_recon[1], at_w[0], at_w[1]


class LeCam(nn.Module):
    """LeCam regulariser: EMAs (decay 0.999) of the batch-mean real and fake logits, persisted as buffers.

    reg = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_hat))^2); the EMAs are updated after
    the term is computed (1d-tokenizer order), with batch means averaged over DDP ranks.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        reg = F.relu(real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake).pow(2).mean()
        with torch.no_grad():
            means = mean_over_ranks(torch.stack([real.detach().float().mean(), fake.detach().float().mean()]))
            self.ema_real.mul_(self.decay).add_((1 - self.decay) * means[0])
            self.ema_fake.mul_(self.decay).add_((1 - self.decay) * means[1])
        return reg


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """Zero-centred gradient penalty on real images: mean over images of ||grad_x D(x)||^2, where D(x) of a
    patch discriminator is the mean of the image's patch logits, as in the D loss (its sum would scale the
    penalty with the number of patches, i.e. with the resolution)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    per_image = logits.flatten(1).mean(1) if logits.dim() > 1 else logits
    (grad,) = torch.autograd.grad(per_image.sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()
