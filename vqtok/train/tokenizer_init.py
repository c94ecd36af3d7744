"""`train-tokenizer --init SOURCE`: start a tokenizer run from existing weights (fine-tuning).

SOURCE may be
- a vqtok run directory (its latest checkpoint) or one checkpoint (RUN/checkpoints/step-N): tokenizer,
  discriminator and optimizer states;
- a tokenizer checkpoint directory (RUN/final, or `vqtok convert` output): tokenizer weights only;
- an official weights file (MaskGIT-VQGAN, VAR, LlamaGen .bin/.pt/.pth/.safetensors), converted in memory;
- any of these on the Hugging Face Hub, as `hf://OWNER/REPO[@REVISION]/PATH` (read through its cache).

The run's config must build the same architecture (for official weights: model.preset=maskgit-vqgan-f16,
var-msvq-f16 or llamagen-vq-f16). Anti-collapse buffers the source lacks (k-means flag, cluster sizes,
update count, multi-scale search statistics) start fresh, and a source codebook is never re-seeded by k-means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from vqtok.errors import UserError

# Buffers of the anti-collapse guards: absent from official checkpoints and from runs without guards.
GUARD_BUFFERS = ("initialized", "codebook_updates", "ema_cluster_size", "ema_embed_sum")
# The multi-scale search statistics (scale_gain) may start fresh when the source lacks them; a source that
# has them needs a model that uses them (its codes mean something else without the gains).
FRESH_IF_MISSING = GUARD_BUFFERS + ("scale_rms", "scale_mean", "scale_code_hits")


@dataclass
class InitSource:
    description: str
    tokenizer: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor] | None = None
    optimizers: dict[str, Any] = field(default_factory=dict)
    preset: str = ""


def read_init_source(path: str | Path, trust_pickle: bool = False) -> InitSource:
    from vqtok.train import checkpoint as ckpt
    from vqtok.weights import local_source

    path = local_source(path)
    if not path.exists():
        raise UserError(f"--init {path} does not exist")
    if path.is_dir():
        step_dir = path if (path / "state.pt").is_file() else ckpt.latest_checkpoint(path)
        if step_dir is not None:
            state, meta = ckpt.read_checkpoint(step_dir)
            modules = state.get("modules", {})
            if "generator" not in modules:
                raise UserError(f"--init {step_dir} is not a tokenizer training checkpoint (no generator weights)")
            preset = ""
            cfg_file = step_dir.parent.parent / "config.yaml"
            if cfg_file.is_file():
                preset = ((yaml.safe_load(cfg_file.read_text()) or {}).get("model") or {}).get("preset", "")
            return InitSource(f"vqtok checkpoint {step_dir} (step {meta.get('step', '?')})", modules["generator"],
                              modules.get("discriminator"), state.get("optimizers", {}), preset)
        if (path / "final").is_dir() and not (path / "model.safetensors").is_file():
            path = path / "final"
        from vqtok.tokenizer.tokenizer import IDENTITY_FILE
        from vqtok.weights import read_model_dir

        weights, config_text, _ = read_model_dir(path, IDENTITY_FILE)
        preset = (yaml.safe_load(config_text) or {}).get("preset", "")
        return InitSource(f"tokenizer checkpoint {path}", weights, preset=preset)
    from vqtok.interop import detect
    from vqtok.weights import load_state_dict_file

    state = load_state_dict_file(path, trust_pickle=trust_pickle)
    module = detect(state)
    if hasattr(module, "save_converted"):
        raise UserError(f"--init {path} holds {module.NAME} generator weights, not a tokenizer")
    cfg, converted = module.convert(state)
    return InitSource(f"official {module.NAME} weights {path}", converted, preset=cfg.preset)


def load_into_tokenizer(tokenizer, source: InitSource, path: str | Path) -> list[str]:
    """Copy the source weights into `tokenizer`; returns notes about buffers that start fresh."""
    expected = tokenizer.state_dict()
    preset = tokenizer.config.preset
    hint = (f"; the source is a {source.preset} tokenizer: add model.preset={source.preset}"
            if source.preset and source.preset != preset else "")
    unexpected = [k for k in source.tokenizer if k not in expected and k.rsplit(".", 1)[-1] not in GUARD_BUFFERS]
    missing = [k for k in expected if k not in source.tokenizer and k.rsplit(".", 1)[-1] not in FRESH_IF_MISSING]
    if unexpected or missing:
        what = f"has {unexpected[0]}, which this model lacks" if unexpected else f"lacks {missing[0]}"
        raise UserError(f"--init {path} does not fit the configured model: the source {what}{hint}")
    for k, v in source.tokenizer.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"--init {path} does not fit the configured model: {k} is {list(v.shape)}, "
                            f"the model needs {list(expected[k].shape)}{hint}")
    state = {k: v for k, v in source.tokenizer.items() if k in expected}
    tokenizer.load_state_dict(state, strict=False)
    fresh = sorted({k.rsplit(".", 1)[-1] for k in expected if k not in state})
    q = tokenizer.quantize
    if "initialized" in q._buffers and not any(k.endswith("quantize.initialized") for k in state):
        q.initialized.fill_(True)  # a trained codebook is kept, never re-seeded by k-means
    return [f"started fresh: {', '.join(fresh)}"] if fresh else []


def parse_freeze(spec: str) -> list[str]:
    parts = [p.strip() for p in str(spec or "").split(",") if p.strip()]
    bad = [p for p in parts if p not in FREEZABLE]
    if bad:
        raise UserError(f"train.freeze: unknown part '{bad[0]}'; choose from {', '.join(FREEZABLE)} (comma-separated)")
    return parts


# what each freezable part covers in the Tokenizer's modules
FREEZABLE = {"encoder": ("encoder", "quant_conv"), "quantizer": ("quantize",), "decoder": ("post_quant_conv", "decoder")}


def freeze_parts(tokenizer, parts: list[str]) -> int:
    """Turn off gradients for the named parts; returns the number of frozen parameters."""
    n = 0
    for part in parts:
        for name in FREEZABLE[part]:
            module = getattr(tokenizer, name, None)
            if module is None:
                continue
            for p in module.parameters():
                if p.requires_grad:
                    n += p.numel()
                p.requires_grad_(False)
    if "quantizer" in parts:
        tokenizer.quantize.codebook_frozen = True
    return n
