"""CUDA-graph replay of the KV-cached decode steps (`vqtok sample --cuda-graphs`).

A decode step of a big generator at a modest batch launches hundreds of small kernels (rar-b: 24 layers x
~20 kernels), and on a fast GPU the launch cost, not the arithmetic, sets the speed. The static decoder
(vqtok.ar.rar_decoding.StaticDecoder) keeps every tensor a step touches at a fixed address, so each step's
kernels can be recorded once in a CUDA graph and relaunched with one call per step.

One graph per decode step (steps 1..N-1: the attention length differs per step), all captured for one
batch size and sharing one memory pool. Sharing is safe because the graphs are replayed one at a time in
capture order and each copies its result into the one static logits buffer, so no graph reads memory that
another graph's intermediates own. The prefill runs eagerly (once per batch) into the same static cache.

Capture follows the CUDA-graph rules of PyTorch: warm-up iterations on a side stream first (cuBLAS
handles, allocator state), static inputs refilled with `copy_` before each replay, static outputs read
after it, nothing in a step that synchronises with the host, and autocast with its weight-cast cache
disabled during capture (a cached cast made inside one capture would be freed while graphs still use it).
"""

from __future__ import annotations

import contextlib

import torch

from vqtok.ar.rar import RAR
from vqtok.ar.rar_decoding import StaticDecoder
from vqtok.errors import UserError

WARMUP_STEPS = 3


def _capture_autocast(device: torch.device):
    """The caller's autocast setting for `device`, with the cast cache off (required under capture)."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)


def capture_decode_steps(device: torch.device, start, run, num_steps: int, pool) -> list[torch.cuda.CUDAGraph]:
    """Capture decode steps 1..num_steps-1 of a static decoder as one CUDA graph each, family-neutral.

    `start()` prefills from the decoder's static buffers and `run(step)` runs decode step `step` from them
    into its static outputs; a few eager steps on a side stream warm the allocator and the kernels first.
    Call it under the autocast setting the sampling will use, in no_grad and eval mode.
    """
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), _capture_autocast(device):
        start()  # the buffers hold valid ids (class 0 / the null class), so the warm-up is a real decode
        for step in range(1, min(WARMUP_STEPS, num_steps - 1) + 1):
            run(step)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graphs = []
    with _capture_autocast(device):
        for step in range(1, num_steps):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run(step)
            graphs.append(graph)
    return graphs


def capture_static_steps(decoder, device: torch.device, start, num_steps: int) -> None:
    """Capture a static decoder's steps 1..num_steps-1 (its `_run(step)`) in one new memory pool, warmed up
    by `start(mix)`: the decoder class's eager start from its own buffers, given a valid guidance setting
    when the decoder is guided (LlamaGen's and VAR's static decoders mix CFG before the head). Sets
    `decoder.device`, `.pool` and `.graphs`."""
    from vqtok.ar.sampling import HeadMix

    decoder.device, decoder.pool = device, torch.cuda.graph_pool_handle()
    warm_mix = HeadMix(1.0) if decoder.guided else None
    with capturing(decoder.model, device):
        decoder.graphs = capture_decode_steps(device, lambda: start(warm_mix), decoder._run, num_steps, decoder.pool)


@contextlib.contextmanager
def capturing(model: torch.nn.Module, device: torch.device):
    """eval mode (the graphs keep the kernels they were captured with: no dropout), no_grad, on the model's GPU."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.cuda.device(device):
            yield
    finally:
        model.train(was_training)


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise UserError(f"CUDA graphs need the generator on a CUDA device, it is on {device}")


class CUDAGraphDecoder(StaticDecoder):
    """RAR's StaticDecoder whose decode steps replay CUDA graphs captured at construction.

    Build it under the autocast setting the sampling will use (the captured kernels keep their dtypes).
    """

    def __init__(self, model: RAR, batch: int, guided: bool, order: torch.Tensor):
        device = model.lm_head.weight.device
        require_cuda(device)
        super().__init__(model, batch, guided, order)
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        with capturing(model, device):
            self.graphs = capture_decode_steps(device, lambda: StaticDecoder.start(self, self.cond_ids.clone(), self.orders[0]),
                                               self._run, model.config.seq_len, self.pool)

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.token.copy_(tokens[:, 0])
        self.graphs[step - 1].replay()  # decode step `step`: reads token, orders, cache; writes cache, logits
        return self.logits
