"""The multi-scale quantizer's per-scale dead-code accounting (`scale_dead_code_threshold`): each scale keeps
an EMA of each code's hits over the scale's mean hits per code, and a code that a scale with enough tokens
per code leaves unused restarts from that scale's residual, although other scales still use it (the summed
hits of `dead_code_threshold` never see it). Covers the effect on a coarse scale's usage from a skewed
start, the accounting, which scales may restart, state-dict resume, `--init` without the buffer and
agreement of two gloo ranks."""

import pytest
import torch
import torch.nn.functional as F

from gloo_ranks import run_on_gloo_ranks
from quantizer_resume import trained_then_resumed
from vqtok.errors import ConfigError
from vqtok.tokenizer.quantizers.multiscale import MultiScaleResidualVQ

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_sided_coarse_latents(seed: int, n: int = 64) -> torch.Tensor:
    """(n, 4, 4, 4) latents whose 2x2 scale lies on one side of the origin (channel 0 between 1.5 and 3.5)
    while the detail around it is centred: a codebook drawn around the origin serves the fine scale
    everywhere and the coarse one only with the few codes on its side."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 4, 2, 2, generator=g)
    coarse[:, 0] = 1.5 + 2.0 * torch.rand(n, 2, 2, generator=g)
    return F.interpolate(coarse, size=(4, 4), mode="nearest") + torch.randn(n, 4, 4, 4, generator=g)


def _make(**kw) -> MultiScaleResidualVQ:
    torch.manual_seed(0)
    q = MultiScaleResidualVQ(codebook_size=32, dim=4, patch_nums=(2, 4), quant_resi=0.0, **kw).train()
    with torch.no_grad():
        q.embedding.weight.normal_()  # the skewed start: a codebook around the origin, no k-means
    return q


def _care(q: MultiScaleResidualVQ, steps: int, start: int = 0, n: int = 64) -> MultiScaleResidualVQ:
    """Forwards and codebook updates only (no optimizer): the codebook moves by restarts alone."""
    for s in range(start, start + steps):
        q(_one_sided_coarse_latents(s, n))
        q.update_codebook(s)
    return q


@torch.no_grad()
def _usage(q: MultiScaleResidualVQ) -> list[float]:
    """Per-scale usage on held-out latents (1024 tokens at 2x2, 4096 at 4x4 for 32 codes)."""
    z = _one_sided_coarse_latents(1000, 256)
    return [s.unique().numel() / q.codebook_size for s in q.eval().encode_scales(z)]


def test_per_scale_restarts_let_the_one_sided_coarse_scale_use_the_codebook_the_summed_rule_keeps():
    summed = _care(_make(dead_code_threshold=0.5), 30)
    per_scale = _care(_make(dead_code_threshold=0.5, scale_dead_code_threshold=0.2, scale_dead_code_decay=0.8), 30)
    before, summed_usage, usage = _usage(_make()), _usage(summed), _usage(per_scale)
    # measured: start [0.59, 1.0]; summed hits only [0.59, 1.0] (the fine scale hits every code, so none is
    # dead by the sum); per-scale [0.97, 1.0]: the codes the coarse scale never chose moved to its residuals,
    # and the fine scale, whose residual is what the coarse codes leave, still uses all of them
    assert before[0] <= 0.7 and summed_usage[0] <= 0.7, (before, summed_usage)
    assert usage[0] >= 0.9 and usage[1] >= 0.9, usage
    assert int(per_scale.codebook_updates) == 30


def test_the_accounting_is_hits_over_the_scales_mean_hits_per_code():
    q = _make(scale_dead_code_threshold=0.8, scale_dead_code_decay=0.75, scale_dead_code_min_tokens=1e9)
    assert torch.equal(q.scale_code_hits, torch.ones(2, 32))  # a fair share before anything is measured
    z = _one_sided_coarse_latents(0, 8)
    _, idx, _ = q(z)
    codes = q.embedding.weight.detach().clone()
    update = q.update_codebook(0)
    hits = torch.stack([torch.bincount(s.reshape(-1), minlength=32) for s in q.split_scales(idx)]).float()
    share = hits * 32 / hits.sum(1, keepdim=True)  # 32 coarse and 128 fine tokens
    torch.testing.assert_close(q.scale_code_hits, 0.75 + 0.25 * share)
    # no scale's window holds 1e9 tokens per code: nothing restarts, although codes are below threshold
    assert bool((q.scale_code_hits < 0.8).any())
    assert update.replaced is None and torch.equal(q.embedding.weight, codes)
    # a step without training forwards (anywhere) leaves the EMA alone
    before = q.scale_code_hits.clone()
    q.update_codebook(1)
    assert torch.equal(q.scale_code_hits, before)


def test_only_scales_with_enough_tokens_per_code_restart_and_from_their_own_residuals():
    # batch 8: 32 coarse tokens (1 per code per step), 128 fine (4); decay 0.5: a window of 2 steps, so
    # after one step a code never hit sits at 0.5, one hit once at the fine scale at 0.5 + 0.5 * 0.25
    kw = dict(scale_dead_code_threshold=0.6, scale_dead_code_decay=0.5)
    z = _one_sided_coarse_latents(0, 8)
    stay = _care(_make(scale_dead_code_min_tokens=1e9, **kw), 1, n=8)  # no scale eligible: the accounting
    low_coarse, low_fine = stay.scale_code_hits[0] < 0.6, stay.scale_code_hits[1] < 0.6
    assert bool((low_coarse & ~low_fine).any()) and bool(low_fine.any())
    q = _care(_make(scale_dead_code_min_tokens=2.5, **kw), 1, n=8)  # only the fine scale's window (8) is enough
    moved = (q.embedding.weight != stay.embedding.weight).any(1)
    assert torch.equal(moved, low_fine)  # codes low only at the coarse scale are kept
    assert torch.equal(q.scale_code_hits[:, moved], torch.ones(2, int(moved.sum())))  # grace at every scale
    # a restarted code is one of the step's fine residuals (no scale_gain: in latent units)
    with torch.no_grad():
        coarse_idx = stay.encode_scales(z)[0].view(8, 2, 2)
        up = F.interpolate(_make().embedding(coarse_idx).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                           align_corners=False)
    fine_rows = (z - up).permute(0, 2, 3, 1).reshape(-1, 4)
    for code in q.embedding.weight.detach()[moved]:
        assert bool(((fine_rows - code).abs().max(1).values < 1e-5).any())
    # both scales eligible: a code low at both restarts from the coarser one
    both = _care(_make(scale_dead_code_min_tokens=0.0, **kw), 1, n=8)
    coarse_rows = F.interpolate(z, size=(2, 2), mode="area").permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal((both.embedding.weight != stay.embedding.weight).any(1), low_coarse | low_fine)
    for code in both.embedding.weight.detach()[low_coarse]:
        assert bool(((coarse_rows - code).abs().max(1).values < 1e-5).any())


def test_defaults_leave_vars_keys_alone_and_bad_values_are_refused():
    keys = MultiScaleResidualVQ(codebook_size=8, dim=4, patch_nums=(1, 2)).state_dict()
    assert "scale_code_hits" not in keys and "codebook_updates" not in keys
    for bad in (dict(scale_dead_code_threshold=-1.0), dict(scale_dead_code_min_tokens=-1.0),
                dict(scale_dead_code_decay=1.0), dict(scale_dead_code_decay=0.0)):
        with pytest.raises(ConfigError, match="scale_dead_code"):
            MultiScaleResidualVQ(codebook_size=8, dim=4, patch_nums=(1, 2), **bad)


def test_per_scale_dead_code_state_resumes_exactly_with_the_gained_search():
    def make():
        return MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(2, 4), quant_resi=0.0, kmeans_init=True,
                                    dead_code_threshold=0.5, scale_gain=True, scale_center=True,
                                    scale_dead_code_threshold=0.3, scale_dead_code_decay=0.8).train()

    def steps(q, opt, start, n):
        replaced = 0
        for s in range(start, start + n):
            _, _, aux = q(_one_sided_coarse_latents(s, 16))
            opt.zero_grad()
            aux["loss"].backward()
            opt.step()
            update = q.update_codebook(s)
            replaced += 0 if update.replaced is None else int(update.replaced.sum())
        return replaced

    a, opt_a, b, opt_b = trained_then_resumed(make, steps)
    torch.testing.assert_close(b.scale_code_hits, a.scale_code_hits, rtol=0, atol=0)
    replaced = steps(a, opt_a, 5, 6)
    assert steps(b, opt_b, 5, 6) == replaced and replaced > 0  # restarts happened after the resume
    torch.testing.assert_close(b.scale_code_hits, a.scale_code_hits, rtol=0, atol=0)
    torch.testing.assert_close(b.embedding.weight, a.embedding.weight, rtol=0, atol=0)


def test_init_from_weights_without_the_per_scale_hits_starts_them_fresh():
    import dataclasses

    from vqtok.tokenizer.presets import tiny_msvq
    from vqtok.tokenizer.tokenizer import build_tokenizer
    from vqtok.train.tokenizer_init import InitSource, load_into_tokenizer

    plain_cfg = tiny_msvq()
    q = plain_cfg.quantizer
    cfg = dataclasses.replace(plain_cfg, quantizer=dataclasses.replace(
        q, params={**q.params, "scale_dead_code_threshold": 0.2}))
    plain, model = build_tokenizer(plain_cfg), build_tokenizer(cfg)
    notes = load_into_tokenizer(model, InitSource("plain", plain.state_dict()), "plain")
    assert notes == ["started fresh: codebook_updates, scale_code_hits"], notes
    assert torch.equal(model.quantize.scale_code_hits, torch.ones(6, 512))


# accounting only (no scale has enough tokens to restart), then restarts at every scale with the gained search
_CARE = [dict(scale_dead_code_min_tokens=1e9),
         dict(scale_dead_code_min_tokens=0.0, kmeans_init=True, scale_gain=True, scale_center=True)]


def _codebook_care(z_steps, **kw):
    torch.manual_seed(0)
    q = MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(1, 2, 4), quant_resi=0.0,
                             scale_dead_code_threshold=0.5, scale_dead_code_decay=0.7, **kw).train()
    replaced = 0
    for s, z in enumerate(z_steps):
        q(z)
        update = q.update_codebook(s)
        replaced += 0 if update.replaced is None else int(update.replaced.sum())
    return q.scale_code_hits.clone(), q.embedding.weight.detach().clone(), replaced



def _every_care(z_steps):  # one rank's results for every setting in _CARE
    return [_codebook_care(z_steps, **kw) for kw in _CARE]

def test_two_gloo_ranks_count_the_whole_batch_and_restart_the_same_codes(tmp_path):
    steps = [_one_sided_coarse_latents(s, 8) for s in range(4)]
    halves = [[z[:4] for z in steps], [z[4:] for z in steps]]
    out = run_on_gloo_ranks(_every_care, halves, tmp_path)
    # the accounting all-reduces the hits: both ranks hold what one process over the whole batch holds
    hits_single, codes_single, _ = _codebook_care(steps, **_CARE[0])
    for rank in range(2):
        hits, codes, replaced = out[rank][0]
        assert torch.equal(hits, hits_single) and torch.equal(codes, codes_single) and replaced == 0
    assert not torch.equal(hits_single, torch.ones_like(hits_single))
    # with restarts (replacements drawn from every rank's residuals) the ranks end with the same codebook
    (hits0, codes0, n0), (hits1, codes1, n1) = out[0][1], out[1][1]
    assert torch.equal(hits0, hits1) and torch.equal(codes0, codes1) and n0 == n1 and n0 > 16


def test_marginal_only_entropy_term_is_minus_each_scales_batch_entropy():
    from vqtok.tokenizer.quantizers.vq import squared_distances

    z = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(3))

    def aux(**kw):
        torch.manual_seed(0)
        q = MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(4,), quant_resi=0.0, entropy_weight=1.0,
                                 entropy_temperature=0.5, **kw).train()
        with torch.no_grad():
            q.embedding.weight.normal_()
        return q, q(z).aux

    q, marginal = aux(entropy_sample_term=False)
    _, both = aux()
    rows = z.permute(0, 2, 3, 1).reshape(-1, 4)
    probs = (-squared_distances(rows, q.embedding.weight.detach()) / 0.5).softmax(-1)
    avg = probs.mean(0)
    batch_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    sample_entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(marginal["entropy_loss"], -batch_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both["entropy_loss"], sample_entropy - batch_entropy, atol=1e-5, rtol=1e-5)
