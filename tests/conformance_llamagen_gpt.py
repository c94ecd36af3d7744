"""Conformance against the official LlamaGen c2i GPT (FoundationVision/LlamaGen): the `llamagen_gpt` fixture.

`check(json_path)` is driven by the fixture JSON alone: the model config (`constructor.model_args`), the
file names (`files`, sampling files recognised by their contents), the tolerances (`tolerances.<file stem>.
suggested`), all paths relative to the JSON. It loads the official state dict through
vqtok.interop.llamagen_gpt and checks
  - the training forward (train() with the class dropout off): logits and loss;
  - the seeded label dropout: the drop mask of `torch.manual_seed(drop_seed)`, the effective labels, the
    dropped rows' logits and the batch loss;
  - per sampling file, teacher forced with the recorded codes through the KV-cached decoder: the cond and
    uncond logits of the first steps, the guided logits of every step and the top-k / top-p keep masks;
  - per sampling file, the codes `vqtok.ar.sampling.sample` returns, once replaying the recorded Exp(1)
    noise (argmax(probs / noise)) and once re-seeding torch's default generator with the recorded seed
    (then the noise the draws consume is regenerated bit for bit, which is checked too).
It raises AssertionError naming the first quantity out of tolerance and returns {quantity: max abs diff}.
`check_keys(json_path)` checks a full-size key listing (generators/keys/llamagen_gpt_*.json) on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import fixture_files

from vqtok.ar import llamagen
from vqtok.ar.llamagen import LlamaGen, LlamaGenConfig
from vqtok.interop import llamagen_gpt as interop

SAMPLING_CONTENTS = {"returned", "logits_guided", "keep_mask", "exponential_noise"}


def load_fixture(json_path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(fixture JSON, official state dict merged from its shards in the listed order)."""
    return fixture_files.load_fixture(json_path, "llamagen_gpt")


def config_from_model_args(args: dict[str, Any]) -> LlamaGenConfig:
    """The official ModelArgs as a LlamaGenConfig (the text-to-image and cache-size fields are not used)."""
    if args.get("model_type", "c2i") != "c2i":
        raise AssertionError(f"only c2i LlamaGen models are supported, got {args.get('model_type')}")
    fields = LlamaGenConfig.__dataclass_fields__
    return LlamaGenConfig(**{k: v for k, v in args.items() if k in fields})


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: dict[str, float], out: dict[str, float]) -> None:
    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    out[name] = (got - want).abs().max().item() if got.numel() else 0.0
    torch.testing.assert_close(got, want, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


def _exact(name: str, got: torch.Tensor, want: torch.Tensor, out: dict[str, float]) -> None:
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    mismatches = int((got.long() != want.long()).sum()) if got.dtype != torch.float32 else int((got != want).sum())
    out[name] = float(mismatches)
    if mismatches:
        first = (got.long() != want.long()).nonzero()[0].tolist() if got.dtype != torch.float32 else (got != want).nonzero()[0].tolist()
        raise AssertionError(f"{name}: {mismatches} entries differ (first at {first})")


class NoiseReplayDraw:
    """Replays recorded Exp(1) noise (B, N, V): the token is argmax(probs / noise), what CPU torch.multinomial
    does for one sample per row."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def __call__(self, probs: torch.Tensor, step: int, offset: int | None = None) -> torch.Tensor:
        start = step if offset is None else offset
        noise = self.noise[:, start:start + probs.shape[1]] if probs.dim() == 3 else self.noise[:, start]
        return (probs / noise.to(probs.device)).argmax(dim=-1)


def teacher_forced_steps(model: LlamaGen, cond: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond logits, uncond logits), each (B, N, V), of every step of KV-cached decoding fed the given codes."""
    B, N = codes.shape
    rows = torch.cat([cond, model.null_condition_ids(B)])
    decoder = llamagen.CachedDecoder(model)
    logits = [decoder.start(rows)]
    for step in range(1, N):
        logits.append(decoder.step(torch.cat([codes[:, step - 1:step]] * 2), step))
    both = torch.cat(logits, dim=1)  # (2B, N, V)
    return both[:B], both[B:]


def _sampling_files(meta: dict[str, Any]) -> list[str]:
    return [f["file"] for f in meta["files"] if SAMPLING_CONTENTS <= set(f.get("contents", []))]


def check(json_path: str | Path) -> dict[str, float]:
    from vqtok.ar.sampling import SamplingConfig, filter_logits

    json_path = Path(json_path)
    root = json_path.parent
    meta, official = load_fixture(json_path)
    cfg = config_from_model_args(meta["constructor"]["model_args"])
    got_cfg, state = interop.load_official(official, block_size=cfg.block_size, n_head=cfg.n_head)
    if (got_cfg.dim, got_cfg.n_layer, got_cfg.kv_heads, got_cfg.ffn_hidden, got_cfg.vocab_size, got_cfg.num_classes) != (
            cfg.dim, cfg.n_layer, cfg.kv_heads, cfg.ffn_hidden, cfg.vocab_size, cfg.num_classes):
        raise AssertionError(f"the architecture read from the weights {got_cfg} differs from the fixture's {cfg}")
    model = LlamaGen(cfg)
    model.load_state_dict(state, strict=True)
    tols = meta["tolerances"]
    out: dict[str, float] = {}
    files = {f["file"]: set(f.get("contents", [])) for f in meta["files"]}
    inputs_file = next(name for name, contents in files.items() if {"idx", "cond_idx"} <= contents)
    inputs = torch.load(root / inputs_file, weights_only=True)
    idx, cond_idx = inputs["idx"], inputs["cond_idx"]

    with torch.no_grad():
        # training forward: train() (dropouts are 0 in the fixture config), class dropout off
        forward_file = next(name for name, contents in files.items() if contents == {"logits", "loss"})
        fwd_tol = tols[Path(forward_file).stem]["suggested"]
        ref = torch.load(root / forward_file, weights_only=True)
        model.train()
        prob = model.config.class_dropout_prob
        model.config.class_dropout_prob = 0.0
        logits = model(idx, cond_idx)
        model.config.class_dropout_prob = prob
        _close("forward_train.logits", logits, ref["logits"], fwd_tol["logits"], out)
        _close("forward_train.loss", llamagen.loss(logits, idx), ref["loss"], fwd_tol["loss"], out)

        # the seeded label dropout: the forward's first draw from the global generator
        drop_file = next((name for name, contents in files.items() if "drop_mask" in contents), None)
        if drop_file is not None:
            ref = torch.load(root / drop_file, weights_only=True)
            torch.manual_seed(int(ref["drop_seed"]))
            effective = model.condition_ids(cond_idx, model.config.class_dropout_prob)
            _exact("label_drop.drop_mask", effective == cfg.null_class_id, ref["drop_mask"], out)
            _exact("label_drop.effective_cond_idx", effective, ref["effective_cond_idx"], out)
            torch.manual_seed(int(ref["drop_seed"]))
            logits = model(idx, cond_idx)  # train(): draws the same mask first
            rows = ref["dropped_rows"].long()
            _close("label_drop.logits_dropped_rows", logits[rows], ref["logits_dropped_rows"], fwd_tol["logits"], out)
            _close("label_drop.loss", llamagen.loss(logits, idx), ref["loss"], fwd_tol["loss"], out)
        model.eval()

        for name in _sampling_files(meta):
            stem = Path(name).stem
            tol = tols[stem]["suggested"]
            ref = torch.load(root / name, weights_only=True)
            codes = ref["returned"].long()
            cond = torch.as_tensor(ref["cond"]).long()
            scale = float(ref["cfg_scale"])
            top_p = float(ref["top_p"])
            scfg = SamplingConfig(
                guidance_scale=scale, guidance_schedule="constant", temperature=float(ref["temperature"]),
                top_k=int(ref["top_k"]), top_p=1.0 if top_p == 0 else top_p,  # the official 0 means "off"
            )
            c_logits, u_logits = teacher_forced_steps(model, cond, codes)
            first = ref["logits_cond_first_steps"].shape[1]
            _close(f"{stem}.logits_cond_first_steps", c_logits[:, :first], ref["logits_cond_first_steps"], tol["logits_cond_first_steps"], out)
            _close(f"{stem}.logits_uncond_first_steps", u_logits[:, :first], ref["logits_uncond_first_steps"], tol["logits_uncond_first_steps"], out)
            guided = u_logits + (c_logits - u_logits) * scale
            _close(f"{stem}.logits_guided", guided, ref["logits_guided"], tol["logits_guided"], out)
            # the keep masks from the recorded guided logits, so a mismatch is the filter's, not the model's
            kept = filter_logits(ref["logits_guided"] / max(scfg.temperature, 1e-5), scfg.top_k, scfg.top_p) > float("-inf")
            _exact(f"{stem}.keep_mask", kept, ref["keep_mask"], out)
            kept = filter_logits(guided / max(scfg.temperature, 1e-5), scfg.top_k, scfg.top_p) > float("-inf")
            _exact(f"{stem}.keep_mask_from_our_logits", kept, ref["keep_mask"], out)
            out.update(_sampled_codes(model, stem, ref, cond, codes, scfg, tol))
    return out


def _sampled_codes(model: LlamaGen, stem: str, ref: dict, cond: torch.Tensor, codes: torch.Tensor, scfg,
                   tol: dict) -> dict[str, float]:
    """The one sampling loop: its distributions teacher forced with the recorded codes, then its codes when
    replaying the recorded noise and when re-seeding the global generator."""
    from vqtok.ar.sampling import GeneratorDraw, sample

    out: dict[str, float] = {}
    forced = sample(model, cond, scfg, forced_tokens=codes, return_probs=True)
    _exact(f"{stem}.returned_forced", forced.tokens, codes, out)
    kept = ref["logits_guided"].masked_fill(~ref["keep_mask"], float("-inf"))
    want = (kept / max(scfg.temperature, 1e-5)).softmax(dim=-1)
    _close(f"{stem}.probs", forced.probs, want, tol["probs_derived_not_saved"], out)
    noise = ref["exponential_noise"]
    got = sample(model, cond, scfg, draw=NoiseReplayDraw(noise)).tokens
    _exact(f"{stem}.returned_noise_replay", got, codes, out)

    torch.manual_seed(int(ref["seed"]))
    got = sample(model, cond, scfg, draw=GeneratorDraw(None)).tokens
    _exact(f"{stem}.returned_reseeded", got, codes, out)

    # the generator draws exactly the recorded noise: one (B, V) Exp(1) fill per token
    torch.manual_seed(int(ref["seed"]))
    regenerated = torch.stack([torch.empty(noise.shape[0], noise.shape[2]).exponential_(1) for _ in range(noise.shape[1])], dim=1)
    _exact(f"{stem}.exponential_noise", regenerated, noise, out)
    return out


def check_keys(json_path: str | Path) -> dict[str, Any]:
    """A full-size key listing maps exactly: the detected config's vqtok model (built on the meta device) has
    the listed keys in order with the listed shapes, and the parameter count matches."""
    listing = json.loads(Path(json_path).read_text())
    shapes = {k: tuple(v) for k, v in listing["state_dict"].items()}
    args = listing["constructor"]["model_args"]
    cfg = interop.to_config(shapes, block_size=args["block_size"])
    want = config_from_model_args(args)
    if (cfg.dim, cfg.n_layer, cfg.n_head, cfg.ffn_hidden) != (want.dim, want.n_layer, want.n_head, want.ffn_hidden):
        raise AssertionError(f"detected {cfg} but the listing was built from {want}")
    interop.check_shapes(shapes, interop.expected_shapes(cfg))
    interop.check_shapes(shapes, interop.shapes_from_weights(shapes))
    with torch.device("meta"):
        model = LlamaGen(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if list(ours) != list(shapes):
        first = next((a, b) for a, b in zip(list(ours) + [None] * len(shapes), list(shapes) + [None] * len(ours)) if a != b)
        raise AssertionError(f"state-dict keys differ from the listing (first: ours {first[0]}, official {first[1]})")
    bad = [k for k in ours if ours[k] != shapes[k]]
    if bad:
        raise AssertionError(f"shape of {bad[0]}: ours {ours[bad[0]]}, official {shapes[bad[0]]}")
    num = sum(v.numel() for v in model.state_dict().values())
    if num != listing["num_parameters"]:
        raise AssertionError(f"{num} parameters, the listing has {listing['num_parameters']}")
    return {"entries": len(ours), "num_parameters": num, "head_dim": cfg.head_dim, "ffn_hidden": cfg.ffn_hidden}
