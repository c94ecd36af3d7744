"""Conformance of vqtok's VAR generator against the official FoundationVision/VAR fixture (`var_gpt`).

`check(json_path) -> dict` is driven by the fixture JSON alone: the model and VQVAE configuration, the
file names (its `files` list), the batch, seeds and sampling settings inside each file, and the suggested
tolerances. Paths are relative to the JSON. It checks, raising AssertionError at the first failure:

- loading: the official state dict converts through vqtok.interop.var_gpt (with the fixture's quantizer)
  and loads strictly; the detected configuration equals the constructor's;
- forward: the tokenizer-built teacher-forcing input, the teacher-forced logits and the loss, and the
  recorded block-causal check (perturbing one scale changes it and leaves every earlier position exact);
- label dropout: the seeded drop mask, the effective labels and the dropped rows' logits;
- every sampling file: per scale, teacher forced with the recorded codes through the KV-cached decoder,
  the conditional / unconditional logits, the guided logits, the top-k / top-p keep masks, the codes
  replayed from the recorded exponential noise; the full-recompute decoder against the cached one; the
  noise regenerated from the seed (exact); the codes of `vqtok.ar.sampling.sample` re-seeded as the
  official sampler; f_hat; and the decoded image through the `var_vqvae` decoder when its weights exist.

The returned dict maps each compared quantity to its max abs difference (or mismatch count).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vqtok.ar.sampling import SamplingConfig, filter_logits, guidance_schedule, sample
from vqtok.ar.var import VARCachedDecoder, VARFullRecompute
from vqtok.interop import var_gpt
from vqtok.tokenizer.quantizers.multiscale import MultiScaleResidualVQ, MultiScaleVQConfig


def _load(root: Path, rel: str) -> Any:
    return torch.load(root / rel, map_location="cpu", weights_only=True)


def _merge(root: Path, files: list[dict]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in files:
        state.update(_load(root, shard["file"]))
    return state


class _Report:
    def __init__(self, tolerances: dict):
        self.tolerances = tolerances
        self.values: dict[str, float | int] = {}

    def tol(self, group: str, name: str) -> dict:
        block = self.tolerances[group]["suggested"]
        if name not in block:
            raise AssertionError(f"the fixture lists no tolerance for {group}/{name}")
        return block[name]

    def close(self, key: str, got, want, tol: dict) -> None:
        got, want = torch.as_tensor(got).detach().cpu(), torch.as_tensor(want).detach().cpu()
        if tuple(got.shape) != tuple(want.shape):
            raise AssertionError(f"{key}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
        if tol.get("exact_match_expected"):
            bad = int((got != want).sum())
            self.values[key] = bad
            if bad:
                raise AssertionError(f"{key}: {bad} of {want.numel()} entries differ (exact match expected)")
            return
        diff = (got.double() - want.double()).abs()
        self.values[key] = float(diff.max()) if diff.numel() else 0.0
        bound = tol["atol"] + tol["rtol"] * want.double().abs()
        if not bool((diff <= bound).all()):
            raise AssertionError(f"{key}: max abs diff {self.values[key]:.3g} exceeds atol {tol['atol']} + "
                                 f"rtol {tol['rtol']}*|ref|")


class ExponentialRaceDraw:
    """The recorded draw of the official sampler: per step, argmax(probs / noise) with the stored Exp(1) noise
    ((B, n_t, V) per step), which is how CPU `torch.multinomial` picks one sample."""

    def __init__(self, noise: list[torch.Tensor]):
        self.noise = noise

    def __call__(self, probs: torch.Tensor, step: int, offset: int = 0) -> torch.Tensor:
        return (probs / self.noise[step].to(probs.device).view_as(probs)).argmax(dim=-1)


def _quantizer(meta: dict, root: Path) -> MultiScaleResidualVQ:
    kw = meta["constructor"]["vae"]["kwargs"]
    q = MultiScaleResidualVQ(MultiScaleVQConfig(
        codebook_size=kw["vocab_size"], dim=kw["z_channels"], patch_nums=tuple(kw["v_patch_nums"]),
        beta=kw["beta"], quant_resi=kw["quant_resi"], share_quant_resi=kw["share_quant_resi"],
        default_qresi_counts=kw["default_qresi_counts"], using_znorm=kw["using_znorm"],
    ))
    state = _merge(root, meta["vae_quantizer_weights"]["files"])
    q.load_state_dict(state, strict=True)
    used = meta["vae_quantizer_weights"].get("phi_index_used_at_each_scale")
    if used is not None and q.phi_table != used:
        raise AssertionError(f"Phi selection {q.phi_table} != the official {used}")
    return q.eval()


def _decoder_tokenizer(meta: dict, root: Path):
    """The full vqtok tokenizer of the fixture's VQVAE, or None when its weights are absent."""
    vae = meta["constructor"]["vae"]
    files = vae.get("full_weights", {}).get("files", [])
    if not files or not all((root / f["file"]).is_file() for f in files):
        return None
    from vqtok.interop import var as var_vae
    from vqtok.tokenizer.tokenizer import Tokenizer

    state = _merge(root, files)
    kw = vae["kwargs"]
    cfg, converted = var_vae.convert(state, resolution=vae.get("image_resolution"), patch_nums=kw["v_patch_nums"])
    tok = Tokenizer(cfg)
    tok.load_state_dict(converted, strict=True)
    return tok.eval()


def _check_config(cfg, kwargs: dict) -> None:
    got = dict(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
               num_classes=cfg.num_classes, shared_aln=cfg.shared_aln, attn_l2_norm=cfg.attn_l2_norm,
               patch_nums=list(cfg.patch_nums))
    defaults = {"mlp_ratio": 4.0}  # the official constructor's default where a listing omits it
    want = {k: (list(kwargs[k]) if k == "patch_nums" else kwargs.get(k, defaults.get(k))) for k in got}
    if got != want:
        raise AssertionError(f"configuration detected from the weights {got} != the constructor's {want}")


def _sampling_files(meta: dict) -> list[str]:
    return [f["file"] for f in meta["files"] if "idx_Bl" in f.get("contents", []) and "exponential_noise" in f["contents"]]


@torch.no_grad()
def check(json_path: str | Path) -> dict[str, float | int]:
    json_path = Path(json_path)
    root = json_path.parent
    meta = json.loads(json_path.read_text())
    if meta.get("fixture") != "var_gpt":
        raise AssertionError(f"{json_path} is a '{meta.get('fixture')}' fixture, not 'var_gpt'")
    report = _Report(meta["tolerances"])
    state = _merge(root, meta["weights"]["files"])
    if list(state) != list(meta["weights"]["state_dict"]):
        raise AssertionError("the weight shards do not merge into the listed state-dict keys in order")
    quant = _quantizer(meta, root)
    kwargs = meta["constructor"]["kwargs"]
    model = var_gpt.load(state, quant)
    _check_config(model.config, kwargs)
    if list(model.state_dict()) != list(state):
        raise AssertionError("vqtok's VAR state-dict order differs from the official one")
    model.config.class_dropout = kwargs["cond_drop_rate"]
    model.config.norm_eps = kwargs["norm_eps"]

    # ---------------------------------------------------------------- teacher-forced forward
    inputs = _load(root, meta["inputs"]["file"])
    label, x, gt = inputs["label_B"], inputs["x_BLCv_wo_first_l"], inputs["gt_BL"]
    fwd_name = next(f for f in meta["outputs"] if Path(f).stem == "forward")
    fwd = _load(root, fwd_name)
    tf_tol = report.tol("forward", "logits")
    report.close("forward/teacher_forcing_input", model.teacher_forcing_input(gt), x, tf_tol)
    logits = model(label, x, drop_labels=False)
    report.close("forward/logits", logits, fwd["logits"], tf_tol)
    loss = model.loss_on_tokens(label, gt, drop_labels=False)[0]
    report.close("forward/loss", loss, fwd["loss"], report.tol("forward", "loss"))
    begin_ends = model.config.begin_ends
    first_l = model.config.first_l
    for probe in meta["outputs"][fwd_name].get("block_causal_check", {}).get("results", []):
        begin, end = probe["perturbed_positions"]
        bumped = x.clone()
        bumped[:, begin - first_l:end - first_l] += torch.randn_like(bumped[:, begin - first_l:end - first_l])
        changed = model(label, bumped, drop_labels=False)
        earlier = float((changed[:, :begin] - logits[:, :begin]).abs().max()) if begin else 0.0
        at = float((changed[:, begin:end] - logits[:, begin:end]).abs().max())
        report.values[f"forward/block_causal_scale{probe['perturbed_scale']}_earlier"] = earlier
        if earlier != 0.0 or at == 0.0:
            raise AssertionError(f"perturbing scale {probe['perturbed_scale']} changed earlier logits by {earlier} "
                                 f"and its own by {at} (want 0 and > 0)")

    # ---------------------------------------------------------------- seeded label dropout
    drop_name = next((f for f in meta["outputs"] if Path(f).stem == "forward_seeded_label_drop"), None)
    if drop_name is not None:
        ref = _load(root, drop_name)
        torch.manual_seed(int(ref["drop_seed"]))
        effective = model.drop_classes(label)
        exact = {"exact_match_expected": True}
        report.close("label_drop/effective_label_B", effective, ref["effective_label_B"], exact)
        report.close("label_drop/drop_mask", effective == model.config.null_class_id, ref["drop_mask"], exact)
        torch.manual_seed(int(ref["drop_seed"]))
        dropped = model(label, x)  # the official rule: dropout in eval mode too
        rows = ref["dropped_rows"].long()
        report.close("label_drop/logits_dropped_rows", dropped[rows], ref["logits_dropped_rows"], tf_tol)
        kept = torch.ones(label.shape[0], dtype=torch.bool)
        kept[rows] = False
        report.close("label_drop/logits_kept_rows", dropped[kept], fwd["logits"][kept], tf_tol)

    # ---------------------------------------------------------------- sampling files
    tok = _decoder_tokenizer(meta, root)
    K = len(model.config.patch_nums)
    for rel in _sampling_files(meta):
        group = Path(rel).stem
        ref = _load(root, rel)
        B = len(ref["label_B"]) if not isinstance(ref["label_B"], torch.Tensor) else ref["label_B"].shape[0]
        labels = torch.as_tensor(ref["label_B"]).long()
        official_cfg, top_k, top_p = float(ref["cfg"]), int(ref["top_k"]), float(ref["top_p"])
        sc = SamplingConfig(guidance_scale=1.0 + official_cfg, guidance_schedule="ramp",
                            top_k=top_k, top_p=top_p if top_p > 0 else 1.0)
        scales = guidance_schedule(sc, K)
        idx = [t.long() for t in ref["idx_Bl"]]
        cond_ids = torch.cat([labels, model.null_condition_ids(B, labels.device)])

        cached, full = VARCachedDecoder(model), VARFullRecompute(model)
        out_c, out_f = cached.start(cond_ids), full.start(cond_ids)
        for si in range(K):
            if si:
                fed = torch.cat([idx[si - 1], idx[si - 1]])
                out_c, out_f = cached.step(fed, si), full.step(fed, si)
            cond, uncond = out_c.float().chunk(2)
            if si < len(ref["logits_cond_first_scales"]):
                report.close(f"{group}/logits_cond_first_scales[{si}]", cond, ref["logits_cond_first_scales"][si],
                             report.tol(group, f"logits_cond_first_scales[{si}]"))
                report.close(f"{group}/logits_uncond_first_scales[{si}]", uncond,
                             ref["logits_uncond_first_scales"][si], report.tol(group, f"logits_uncond_first_scales[{si}]"))
            report.close(f"{group}/full_recompute_vs_cached[{si}]", out_f, out_c, report.tol(group, f"logits_guided[{si}]"))
            guided = uncond + (cond - uncond) * scales[si]
            report.close(f"{group}/logits_guided[{si}]", guided, ref["logits_guided"][si],
                         report.tol(group, f"logits_guided[{si}]"))
            kept = filter_logits(guided, sc.top_k, sc.top_p)
            report.close(f"{group}/keep_mask[{si}]", kept.isfinite(), ref["keep_mask"][si], {"exact_match_expected": True})
            probs = kept.softmax(dim=-1)
            replayed = ExponentialRaceDraw(ref["exponential_noise"])(probs, si)
            report.close(f"{group}/idx_Bl[{si}]_noise_replay", replayed, idx[si], report.tol(group, f"idx_Bl[{si}]"))

        # the recorded noise is the seeded generator's, one (B * pn^2, V) block per scale
        g = torch.Generator().manual_seed(int(ref["g_seed"]))
        V = model.config.vocab_size
        for si, noise in enumerate(ref["exponential_noise"]):
            regen = torch.empty(noise.numel() // V, V).exponential_(1, generator=g).view_as(noise)
            report.close(f"{group}/exponential_noise[{si}]", regen, noise, {"exact_match_expected": True})

        # the one sampling loop, re-seeded like the official sampler (KV-cached decoder, the default) and
        # replaying the noise (the full-recompute reference)
        for how, kwargs_ in (("seeded", {"generator": torch.Generator().manual_seed(int(ref["g_seed"]))}),
                             ("noise_replay", {"draw": ExponentialRaceDraw(ref["exponential_noise"]), "kv_cache": False})):
            out = sample(model, labels, sc, **kwargs_)
            got = model.quantizer.split_scales(out.tokens)
            for si in range(K):
                report.close(f"{group}/sample_{how}/idx_Bl[{si}]", got[si], idx[si], report.tol(group, f"idx_Bl[{si}]"))

        f_hat = model.quantizer.decode_scales(idx)
        report.close(f"{group}/f_hat", f_hat, ref["f_hat"], report.tol(group, "f_hat"))
        if tok is not None:
            image = tok.decode(torch.cat(idx, dim=1))
            report.close(f"{group}/image", image, ref["image"], report.tol(group, "image"))
    return report.values


def check_keys(listing_path: str | Path) -> dict[str, Any]:
    """A full-size key listing (generators/keys/var_d*.json) maps exactly onto vqtok's VAR built on the meta
    device for the listing's configuration; returns the detected configuration's numbers."""
    meta = json.loads(Path(listing_path).read_text())
    kw = meta["constructor"]["kwargs"]
    with torch.device("meta"):
        quant = MultiScaleResidualVQ(MultiScaleVQConfig(codebook_size=meta["state_dict"]["head.weight"][0],
                                                        dim=meta["state_dict"]["word_embed.weight"][1],
                                                        patch_nums=tuple(kw["patch_nums"])))
    listing = {k: tuple(v) for k, v in meta["state_dict"].items()}
    cfg, mapping = var_gpt.check_keys(listing, quant)
    _check_config(cfg, kw)
    want = var_gpt.expected_shapes(cfg)
    if list(want) != list(listing):
        raise AssertionError("vqtok's VAR state-dict order differs from the listing's")
    with torch.device("meta"):
        from vqtok.ar.var import VAR

        model = VAR(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != meta["num_parameters"]:
        raise AssertionError(f"{n_params} parameters != the official {meta['num_parameters']}")
    return {"entries": len(mapping), "num_parameters": n_params, "depth": cfg.depth}
