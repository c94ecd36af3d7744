"""Exponential moving average of a module's weights (parameters and floating-point buffers), in fp32."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, value in module.state_dict().items():
            if name not in self.shadow:
                continue
            if name in params and params[name].requires_grad:
                self.shadow[name].lerp_(value.float(), 1.0 - self.decay)
            else:
                self.shadow[name].copy_(value)  # buffers (EMA codebooks, BN stats) follow the live model

    def weights_for(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with EMA values in place of the averaged entries, in the module's dtypes."""
        state = module.state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in state.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
