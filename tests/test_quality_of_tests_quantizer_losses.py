"""Quantizer loss values against numbers worked out by hand, and the LFQ entropy's memory, measured.

VQ entropy (LlamaGen's `compute_entropy_loss(-d)`, entropy_loss_ratio): with the codebook {0, 1} in one
dimension, squared distances d are 0 or 1, and at temperature T = 1 / ln 3 the softmax of -d / T gives
probabilities 3/4 and 1/4, so every quantity below is a closed-form number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqtok.tokenizer.quantizers.vq import VectorQuantizer

T = 1 / math.log(3)
H_ROW = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # entropy of (3/4, 1/4), every token's


def _quantizer(weight: float) -> VectorQuantizer:
    vq = VectorQuantizer(codebook_size=2, dim=1, entropy_weight=weight, entropy_temperature=T, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0], [1.0]]))
    return vq.eval()


@pytest.mark.parametrize("values, avg", [
    ([0.0, 1.0], [0.5, 0.5]),  # one token at each code
    ([0.0, 0.0, 1.0], [7 / 12, 5 / 12]),  # two at code 0: the mean distribution is (2*3/4 + 1/4) / 3, ...
])
def test_vq_entropy_loss_equals_the_hand_computation(values, avg):
    vq = _quantizer(weight=0.3)
    z = torch.tensor(values).view(1, 1, 1, -1)
    _, indices, aux = vq(z)
    assert indices.flatten().tolist() == [int(v) for v in values]
    batch_entropy = -sum(a * math.log(a + 1e-5) for a in avg)  # LlamaGen's log(avg + 1e-5)
    expected = H_ROW - batch_entropy  # sample entropy (mean over tokens) minus entropy of the mean
    assert aux["entropy_loss"].item() == pytest.approx(expected, abs=1e-6)
    # the tokens sit on their codes, so the codebook and commitment terms are 0 and the loss is the entropy term
    assert aux["loss"].item() == pytest.approx(0.3 * expected, abs=1e-6)


def test_vq_entropy_loss_value_off_the_codes():
    # z = 0.5 is equidistant: p = (1/2, 1/2); z = 0.25: d = (1/16, 9/16), logits (-1/16, -9/16) * ln 3
    vq = _quantizer(weight=1.0)
    _, _, aux = vq(torch.tensor([0.5, 0.25]).view(1, 1, 1, 2))
    a = math.exp(-math.log(3) / 16)
    b = math.exp(-9 * math.log(3) / 16)
    p = [a / (a + b), b / (a + b)]
    h = lambda q: -sum(x * math.log(x) for x in q)
    avg = [(0.5 + p[0]) / 2, (0.5 + p[1]) / 2]
    expected = (h([0.5, 0.5]) + h(p)) / 2 + sum(x * math.log(x + 1e-5) for x in avg)
    assert aux["entropy_loss"].item() == pytest.approx(expected, abs=1e-6)
    commitment = ((0.5 - 0.0) ** 2 + (0.25 - 0.0) ** 2) / 2  # 0.5 ties to code 0 (the first), 0.25 is nearer 0
    assert aux["commitment_loss"].item() == pytest.approx(commitment, abs=1e-7)


# ------------------------------------------------------------------------------------- LFQ memory

# 2,048 tokens (8 images of 16x16, Open-MAGVIT2's per-GPU batch) at 2^18 codes: one fp32 tensor over all
# codes is 2,048 * 262,144 * 4 bytes = 2 GiB, and the anchors' softmax formulation keeps several. The
# factorised entropies must stay far below one such tensor, forward and backward included. Measured in a
# fresh process as the growth of its peak resident memory (VmHWM, reset just before the step).
TOKENS, BITS = 2048, 18
LIMIT_BYTES = 256 * 2**20

_MEASURE = r"""
import json, sys, torch
from vqtok.tokenizer.quantizers.lfq import LFQ
torch.set_num_threads(1)
def peak():  # high-water mark of this process's resident memory (VmHWM, per address space), bytes
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
def reset_peak():  # Linux >= 4.0: "5" resets VmHWM to the current resident size
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # then the peak since exec, which the warm-up below already set
q = LFQ(codebook_size=2 ** 18, entropy_weight=0.1, all_reduce_avg_probs=False).train()
small = torch.randn(1, 18, 2, 2, requires_grad=True)
q(small)[2]["loss"].backward()  # warm-up: kernels, allocator arenas
z = torch.randn(8, 18, 16, 16, requires_grad=True)
reset_peak()
before = peak()
WORKLOAD
after = peak()
print(json.dumps({"before": before, "after": after, "finite": bool(torch.isfinite(z.grad).all()),
                  "codebook_entropy": float(aux["codebook_entropy"])}))
"""
LFQ_STEP = '_, _, aux = q(z)\naux["loss"].backward()'



def _measure(code: str) -> dict:
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak resident memory is read from /proc (Linux)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lfq_2_18_entropy_at_2048_tokens_stays_under_the_memory_limit():
    got = _measure(_MEASURE.replace("WORKLOAD", LFQ_STEP))
    grown = got["after"] - got["before"]
    assert got["finite"] and 0 < got["codebook_entropy"] < BITS * math.log(2)
    assert grown < LIMIT_BYTES, f"LFQ 2^18 entropy forward+backward at 2,048 tokens grew peak memory by {grown / 2**20:.0f} MiB"


def test_the_memory_measurement_sees_a_full_codebook_tensor():
    # the same measurement around one (2,048 x 2^18) fp32 softmax, the anchors' formulation: it must exceed
    # the limit, or the test above could not fail
    softmax = ('logits = torch.randn(2048, 2 ** 16); probs = logits.softmax(-1); del logits, probs\n'
               'aux = {"codebook_entropy": torch.ones(())}; z.grad = torch.zeros_like(z)')
    got = _measure(_MEASURE.replace("WORKLOAD", softmax))
    assert got["after"] - got["before"] > LIMIT_BYTES  # 2 x 512 MiB at 2^16 codes already
