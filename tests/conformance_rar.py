"""Conformance harness against the official RAR (bytedance/1d-tokenizer), driven by the fixture folder.

`check_rar_fixture(json_path)` is driven by the fixture JSON alone (config, file names, tolerances), so
fixtures with other sizes, seeds and batch sizes work unchanged. It loads the official state dict through
vqtok.interop.rar and checks:
  - forward logits / labels / loss / accuracy in raster order and in the recorded random order;
  - for every generate_*.pt: the guided per-step distributions, obtained by teacher-forcing vqtok's
    KV-cached sampler with the recorded tokens, as probabilities and as log-probabilities; the per-step
    CFG scale; and that the sampler returns the forced tokens.
`check_rar_keys(json_path)` checks a full-size key listing (fixtures/keys/rar_*.json) on the meta device.
Both raise AssertionError naming the first quantity out of tolerance and return a dict of max differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import fixture_files

from vqtok.ar.rar import RAR, RARConfig, ar_loss
from vqtok.ar.sampling import SamplingConfig, guidance_schedule, sample
from vqtok.interop import rar as rar_interop


def load_rar_fixture(json_path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(fixture JSON, official state dict merged from its shards in the listed order)."""
    return fixture_files.load_fixture(json_path, "rar")


def config_from_constructor(constructor_config: dict) -> RARConfig:
    """The official OmegaConf config (`model.generator`, `model.vq_model`) as a RARConfig."""
    g = constructor_config["model"]["generator"]
    return RARConfig(
        hidden_size=g["hidden_size"],
        depth=g["num_hidden_layers"],
        num_heads=g["num_attention_heads"],
        intermediate_size=g["intermediate_size"],
        vocab_size=constructor_config["model"]["vq_model"]["codebook_size"],
        seq_len=g["image_seq_len"],
        num_classes=g["condition_num_classes"],
        dropout=g.get("dropout", 0.1),
        attn_dropout=g.get("attn_drop", 0.1),
        class_dropout=g.get("class_label_dropout", 0.1),
        grad_checkpointing=bool(g.get("use_checkpoint", False)),
    )


def _arch(cfg: RARConfig) -> tuple:
    return (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size, cfg.seq_len, cfg.num_classes)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: dict, report: dict) -> None:
    got, want = torch.as_tensor(got).detach().cpu(), torch.as_tensor(want).detach().cpu()
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if tol.get("exact_match_expected"):
        mismatches = int((got != want).sum())
        report[name] = mismatches
        if mismatches:
            raise AssertionError(f"{name}: {mismatches} of {want.numel()} entries differ (exact match expected)")
        return
    got, want = got.double(), want.double()
    diff = (got - want).abs()
    report[name] = float(diff.max()) if diff.numel() else 0.0
    bound = tol["atol"] + tol["rtol"] * want.abs()
    if not bool((diff <= bound).all()):
        worst = int((diff - bound).argmax())
        raise AssertionError(
            f"{name}: max abs diff {report[name]:.3g} exceeds atol {tol['atol']} + rtol {tol['rtol']}·|ref| "
            f"(worst at flat index {worst}: got {got.flatten()[worst]:.6g}, want {want.flatten()[worst]:.6g})"
        )


@torch.no_grad()
def check_rar_fixture(json_path: str | Path) -> dict[str, Any]:
    json_path = Path(json_path)
    root = json_path.parent
    meta, sd = load_rar_fixture(json_path)
    cfg = config_from_constructor(meta["constructor"]["config"])
    detected = rar_interop.to_config(sd)
    if _arch(detected) != _arch(cfg):
        raise AssertionError(f"size detected from the weights {_arch(detected)} != fixture config {_arch(cfg)}")

    model = RAR(cfg)
    model.load_state_dict(rar_interop.convert(sd), strict=True)
    model.eval()
    report: dict[str, Any] = {}

    inputs = torch.load(root / meta["inputs"]["file"], map_location="cpu", weights_only=True)
    tokens, classes = inputs["tokens"], inputs["class_labels"]
    cond = model.condition_ids(classes)
    _close("condition_ids", cond, inputs["condition_ids"], {"exact_match_expected": True}, report)
    _close("null_condition_ids", model.null_condition_ids(len(classes)), inputs["null_condition_ids"], {"exact_match_expected": True}, report)

    tol = meta["tolerances"]["forward"]["suggested"]
    runs = {"raster": None, "random_order": inputs["random_orders"]}
    for file in meta["outputs"]:
        kind = "random_order" if "random_order" in file else "raster" if "forward" in file else None
        if kind is None:
            continue
        ref = torch.load(root / file, map_location="cpu", weights_only=True)
        logits, labels = model(tokens, classes, runs[kind])
        loss, acc = ar_loss(logits, labels)
        _close(f"{kind}.logits", logits, ref["logits"], tol[f"{kind}.logits"], report)
        _close(f"{kind}.labels", labels, ref["labels"], tol[f"{kind}.labels"], report)
        _close(f"{kind}.loss", loss, ref["loss"], tol[f"{kind}.loss"], report)
        _close(f"{kind}.correct_tokens", acc, ref["correct_tokens"], tol[f"{kind}.correct_tokens"], report)

    for file in meta["outputs"]:
        stem = Path(file).stem
        if not stem.startswith("generate"):
            continue
        ref = torch.load(root / file, map_location="cpu", weights_only=True)
        tol = meta["tolerances"][stem]["suggested"]
        scfg = SamplingConfig(
            guidance_scale=float(ref["guidance_scale"]),
            guidance_schedule="power-cosine",
            guidance_power=float(ref["guidance_scale_pow"]),
            temperature=float(ref["randomize_temperature"]),
        )
        # exact: the schedule is computed with the same float32 ops as the official generate
        _close(f"{stem}.cfg_scale", guidance_schedule(scfg, cfg.seq_len), ref["cfg_scale"], {"atol": 0.0, "rtol": 0.0}, report)
        out = sample(model, ref["class_labels"], scfg, forced_tokens=ref["forced_tokens"], return_probs=True)
        _close(f"{stem}.returned_ids", out.tokens, ref["returned_ids"], tol["returned_ids"], report)
        _close(f"{stem}.probs", out.probs, ref["probs"], tol["probs"], report)
        _close(f"{stem}.log_probs", out.probs.log(), ref["probs"].log(), tol["log_probs_derived_not_saved"], report)
    return report


def check_rar_keys(json_path: str | Path) -> dict[str, Any]:
    """A full-size official key listing maps exactly onto vqtok's RAR, checked without allocating weights."""
    meta = json.loads(Path(json_path).read_text())
    listing = {k: tuple(v) for k, v in meta["state_dict"].items()}
    fake = {k: torch.empty(shape, device="meta") for k, shape in listing.items()}
    cfg = rar_interop.to_config(fake)
    if "constructor" in meta:
        want = config_from_constructor(meta["constructor"]["config"])
        if _arch(want) != _arch(cfg):
            raise AssertionError(f"size detected from the shapes {_arch(cfg)} != listed constructor {_arch(want)}")
    converted = rar_interop.convert(fake)  # asserts every key is used and every shape
    with torch.device("meta"):
        model = RAR(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if list(ours) != list(listing):
        extra, missing = set(ours) - set(listing), set(listing) - set(ours)
        raise AssertionError(f"state-dict keys differ: vqtok-only {sorted(extra)[:3]}, official-only {sorted(missing)[:3]}, or order")
    bad = [k for k in listing if ours[k] != listing[k] or tuple(converted[k].shape) != listing[k]]
    if bad:
        raise AssertionError(f"{bad[0]}: vqtok shape {ours[bad[0]]} != official {listing[bad[0]]}")
    n = model.num_parameters()
    if "num_parameters" in meta and n != meta["num_parameters"]:
        raise AssertionError(f"vqtok RAR has {n} parameters, the official one {meta['num_parameters']}")
    return {"config": cfg, "num_parameters": n, "num_keys": len(ours)}
