"""VAR's static-buffer decoder and its CUDA-graph replay (`vqtok sample --cuda-graphs` with a VAR generator).

Every scale's step has fixed shapes: scale k feeds pn_{k-1}^2 codes, writes pn_k^2 positions of the KV cache
after the begin_k positions of the coarser scales, and gives pn_k^2 logits. So, as for LlamaGen's per-token
steps, each of the steps 1..K-1 can be recorded once as a CUDA graph, provided every tensor a step reads or
writes keeps its address: the condition rows' block and head modulations, the fed-back codes, the f_hat
canvas, the cache, the guidance setting and the logits. At VAR's coarse scales (1, 4, 9 ... tokens) a step is
hundreds of tiny kernels, where launches, not arithmetic, set the speed on a GPU.

VARStaticDecoder runs that layout eagerly on any device (so it is tested on CPU against the eager
VARCachedDecoder, bitwise); VARCUDAGraphDecoder captures its steps on a CUDA device. Like the eager decoder,
under CFG it runs [conditional; null] rows sharing their codes, keeps f_hat for the B drawn rows and mixes
the two halves before the head (a StaticHeadMix whose scale is a buffer value, so VAR's CFG ramp replays).
"""

from __future__ import annotations

import torch

from vqtok.ar.kv_cache import KVCache
from vqtok.ar.sampling import HeadMix, StaticHeadMix, attention_dtype, load_mix
from vqtok.ar.var import VAR


def _keep(static: list[torch.Tensor] | None, fresh: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy `fresh` into the static tensors (allocated from the first values), so their addresses stay."""
    if static is None:
        return [t.clone() for t in fresh]
    for s, t in zip(static, fresh):
        s.copy_(t)
    return static


class VARStaticDecoder:
    """VAR decoding of a fixed batch over buffers at fixed addresses; `start` prefills scale 0 eagerly and
    `step(codes of scale k-1, k)` copies the codes in and runs `_run(k)`, the work a CUDA graph records."""

    def __init__(self, model: VAR, batch: int, guided: bool):
        cfg = model.config
        quant = model.quantizer  # a UserError now when no tokenizer is bound
        self.model, self.batch, self.guided = model, batch, guided
        self.guides_before_head = guided
        rows = self.rows = 2 * batch if guided else batch
        device = model.head.weight.device
        self.sides = list(cfg.patch_nums)
        self.cond_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.cache = KVCache(cfg.depth, rows, cfg.num_heads, cfg.seq_len, cfg.head_dim, device,
                                attention_dtype(device, model.head.weight.dtype))
        most = max(side * side for side in self.sides)
        self.codes = torch.zeros(batch, most, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch, most, cfg.vocab_size, device=device)
        self.f_hat = torch.zeros(batch, quant.dim, self.sides[-1], self.sides[-1], device=device)
        self.mix = StaticHeadMix(device) if guided else None
        self.conditions: list[torch.Tensor] | None = None  # [head modulation, block modulations...] once started
        self.affine: list[torch.Tensor] | None = None  # the quantizer's per-scale gains and offsets

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor | None = None, mix: HeadMix | None = None) -> torch.Tensor:
        if cond_ids.shape != (self.rows,):
            raise ValueError(f"this static decoder runs {self.rows} rows, got conditions {tuple(cond_ids.shape)}")
        model, quant = self.model, self.model.quantizer
        load_mix(self.mix, mix)
        self.cond_ids.copy_(cond_ids)
        cond, mods, head_mod = model.conditions(self.cond_ids)
        self.conditions = _keep(self.conditions, [head_mod, *mods])
        if quant.config.scale_gain:  # read once here: the graphs may not test the quantizer's buffers
            self.affine = _keep(self.affine, [quant.gains(), quant.offsets()])
        self.f_hat.zero_()
        self.cache.length = 0
        n = self.sides[0] ** 2
        self.logits[:, :n].copy_(self._blocks_and_head(model.first_scale_input(cond)))
        return self.logits[:, :n]

    def _blocks_and_head(self, x: torch.Tensor) -> torch.Tensor:
        head_mod, *mods = self.conditions
        return self.model._logits(self.model._blocks(x, mods, None, self.cache), head_mod, self.mix)

    def _run(self, step: int) -> torch.Tensor:
        """Scale `step` from the codes of scale step-1 in the buffer: f_hat, the scale's input, its logits."""
        model, cfg = self.model, self.model.config
        prev, n = self.sides[step - 1] ** 2, self.sides[step] ** 2
        affine = tuple(self.affine) if self.affine is not None else None
        _, nxt = model.quantizer.next_scale_input(self.f_hat, self.codes[:, :prev], step - 1, check=False, affine=affine)
        x = model.embed_scale(nxt, step)
        self.cache.length = cfg.begin_ends[step][0]  # the coarser scales' positions; this scale writes after them
        self.logits[:, :n].copy_(self._blocks_and_head(torch.cat([x, x]) if self.guided else x))
        return self.logits[:, :n]

    def _feed(self, codes: torch.Tensor, step: int, mix: HeadMix | None) -> None:
        prev = self.sides[step - 1] ** 2
        if codes.shape != (self.batch, prev):
            raise ValueError(f"scale {step - 1} of a static decoder of batch {self.batch} takes ({self.batch}, {prev}) "
                             f"codes, got {tuple(codes.shape)}")
        load_mix(self.mix, mix)
        self.codes[:, :prev].copy_(codes)

    def step(self, codes: torch.Tensor, step: int, mix: HeadMix | None = None) -> torch.Tensor:
        self._feed(codes, step, mix)
        return self._run(step)


class VARCUDAGraphDecoder(VARStaticDecoder):
    """VARStaticDecoder whose steps 1..K-1 replay CUDA graphs captured at construction (one per scale, one
    memory pool; safe for the reasons given in vqtok.ar.cuda_graphs). Build it under the autocast setting the
    sampling will use; the prefill (scale 0) runs eagerly into the same static buffers."""

    def __init__(self, model: VAR, batch: int, guided: bool):
        from vqtok.ar.cuda_graphs import capture_static_steps, require_cuda

        device = model.head.weight.device
        require_cuda(device)
        super().__init__(model, batch, guided)
        capture_static_steps(self, device, lambda mix: VARStaticDecoder.start(self, self.cond_ids.clone(), mix=mix),
                             len(self.sides))

    def step(self, codes: torch.Tensor, step: int, mix: HeadMix | None = None) -> torch.Tensor:
        self._feed(codes, step, mix)
        self.graphs[step - 1].replay()  # scale `step`: reads codes, f_hat, conditions, mix, cache; writes them, logits
        n = self.sides[step] ** 2
        return self.logits[:, :n]
