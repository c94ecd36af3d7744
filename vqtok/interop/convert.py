"""Turn an official weights file into a vqtok checkpoint directory (what `vqtok convert` runs)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from vqtok.errors import UserError
from vqtok.interop import by_name, detect
from vqtok.weights import load_state_dict_file


def convert_checkpoint(
    path: str | Path, out: str | Path, arch: str | None = None, trust_pickle: bool = False, key: str | None = None,
    tokenizer: str | Path | None = None, n_head: int | None = None, block_size: int | None = None,
) -> dict[str, Any]:
    """Load `path` safely, detect (or take) its architecture, write `out` atomically; return a summary.

    `key` picks an entry of a checkpoint dict (LlamaGen keeps "model" and, when trained with EMA, "ema");
    without it the usual containers are tried in order: model, ema, state_dict, module. `tokenizer` (a
    vqtok tokenizer checkpoint) is what a VAR generator needs: its codebook and scales are not in the file.
    `n_head` and `block_size` are the head count and tokens per image of a LlamaGen generator, for files the
    official size table and file names do not describe.
    """
    state = load_state_dict_file(path, trust_pickle=trust_pickle, key=key)
    module = by_name(arch) if arch else detect(state)
    if arch and not module.matches(state):
        raise UserError(f"{path} does not look like a {module.NAME} checkpoint (its keys do not match)")
    if tokenizer is not None and module.NAME != "var_gpt":
        raise UserError(f"--tokenizer applies to VAR generators only; {path} is a {module.NAME} checkpoint")
    for flag, value in (("--heads", n_head), ("--tokens", block_size)):
        if value is not None and module.NAME != "llamagen_gpt":
            raise UserError(f"{flag} applies to LlamaGen generators only; {path} is a {module.NAME} checkpoint")
    if hasattr(module, "save_converted"):  # generator formats write their own checkpoint type
        kwargs: dict[str, Any] = {"tokenizer": tokenizer} if module.NAME == "var_gpt" else {}
        if module.NAME == "llamagen_gpt":
            kwargs.update(n_head=n_head, block_size=block_size)
        # a format whose file name carries facts the weights do not (LlamaGen: c2i_B_384.pt = 576 tokens) reads it
        if "source" in inspect.signature(module.save_converted).parameters:
            kwargs["source"] = path
        written = module.save_converted(state, out, **kwargs)
        return {"arch": module.NAME, "out": str(written or out), "kind": "generator"}
    from vqtok.tokenizer.tokenizer import Tokenizer

    cfg, converted = module.convert(state)
    tokenizer = Tokenizer(cfg)
    tokenizer.load_state_dict(converted, strict=True)
    tokenizer.save(out)
    identity = tokenizer.identity()
    return {
        "arch": module.NAME,
        "out": str(out),
        "kind": "tokenizer",
        "preset": cfg.preset or "(custom)",
        "parameters": sum(p.numel() for p in tokenizer.parameters()),
        "tensors": len(converted),
        **{k: identity[k] for k in ("vocab_size", "tokens_per_image", "resolution", "hash")},
    }
