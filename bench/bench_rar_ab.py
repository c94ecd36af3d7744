"""Before/after timing of RAR performance changes in one process: a baseline rar.py against the current one.

Both models get identical weights and run interleaved (A, B, A, B, ...), so load from other work on the
machine hits both alike; best-of-N is reported. Cases:
  sample: `vqtok.ar.sampling.sample`, 11M model (hidden 256, depth 8, 8 heads), batch 16, CFG (32 rows), 256 tokens
  floor:  one cached decode step of 32 rows at a half-full cache
  train:  forward + loss + backward of one batch (8 x 256 tokens) at hidden 768 (16 heads) and 256 (8 heads)

    python bench/bench_rar_ab.py --baseline 6956848 --threads 1 --cases floor,sample,train
    python bench/bench_rar_ab.py --baseline-file /tmp/rar_before.py     # any rar.py on disk

--baseline takes a commit (anything `git rev-parse` accepts): its vqtok/ar/rar.py is the "before" side, the
working tree's the "after" side. The baseline must be given: comparing against HEAD when HEAD already holds
the change under test would show x1.00 by construction. The `sample` case drives both sides through the
current sampling loop, so it needs a baseline with the same prefill/decode API (commit 7aa22ea
or later); `floor` and `train` work with older baselines too.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqtok.ar import rar as current
from vqtok.ar.sampling import SamplingConfig, sample


REPO = Path(__file__).resolve().parent.parent


def baseline_source(commit: str) -> str:
    """vqtok/ar/rar.py as of `commit`, or a clear exit when the commit or file is unknown."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                             check=True, capture_output=True, text=True).stdout.strip()
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{sha}:vqtok/ar/rar.py"],
                              check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        print(f"error: --baseline {commit}: {exc.stderr.strip() or 'not a commit of this repository'}", file=sys.stderr)
        sys.exit(2)
    print(f"baseline: vqtok/ar/rar.py at {sha[:12]} ({commit})")
    return text


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("rar_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def pair(baseline, **cfg):
    torch.manual_seed(0)
    new = current.RAR(current.RARConfig(**cfg))
    with torch.no_grad():  # random non-zero modulation so no block is a cheap identity
        for block in new.blocks:
            block.adaLN_modulation[1].weight.normal_(0, 0.02)
    old = baseline.RAR(baseline.RARConfig(**cfg))
    old.load_state_dict(new.state_dict())
    return old, new


def interleaved(fns: dict, repeats: int) -> dict:
    best = {name: float("inf") for name in fns}
    for name, fn in fns.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


@torch.no_grad()
def floor_fn(model, rows: int = 32):
    N = model.config.seq_len
    cond = model.condition_ids(torch.arange(rows) % (rows // 2))  # CFG-like: every class twice
    orders = torch.arange(N).expand(rows, N)
    cache = model.new_cache(rows)
    model.prefill(cond, orders, cache)
    token = torch.zeros(rows, dtype=torch.long)
    # rar.py before the one-sampling-loop refactor took the condition embeddings in every decode step;
    # since then prefill stores them in the cache
    old_api = "emb" in inspect.signature(model.decode_step).parameters
    extra = (model.embeddings(cond),) if old_api else ()

    def step_at(step):
        model.decode_step(token, step, *extra, orders, cache)

    for step in range(1, N // 2):
        step_at(step)

    def run():
        cache.length = 1 + N // 2
        step_at(N // 2)
    return run


def sample_fn(model, batch: int = 16):
    classes = torch.arange(batch) % model.config.num_classes
    cfg = SamplingConfig(guidance_scale=4.0, guidance_schedule="power-cosine", guidance_power=2.75)
    return lambda: sample(model, classes, cfg, generator=torch.Generator().manual_seed(0))


def train_fn(model, batch: int = 8):
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (batch, model.config.seq_len))
    classes = torch.randint(0, model.config.num_classes, (batch,))

    def run():
        logits, labels = model(tokens, classes)
        loss, _ = model.loss(logits, labels)
        model.zero_grad(set_to_none=True)
        loss.backward()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline", help="commit whose vqtok/ar/rar.py is the 'before' side")
    which.add_argument("--baseline-file", help="path of a rar.py to use as the 'before' side instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default="floor,sample,train")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.1, help="attention/MLP dropout of the train case")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.baseline:
        tmp = tempfile.NamedTemporaryFile("w", suffix="_rar_baseline.py", delete=False)
        tmp.write(baseline_source(args.baseline))
        tmp.close()
        baseline = load_module(tmp.name)
        os.unlink(tmp.name)
    else:
        baseline = load_module(args.baseline_file)
    cases = args.cases.split(",")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    small = dict(hidden_size=256, depth=8, num_heads=8, intermediate_size=1024)
    if "floor" in cases:
        old, new = pair(baseline, **small)
        r = interleaved({"before": floor_fn(old.eval()), "after": floor_fn(new.eval())}, 20 * args.repeats)
        print(f"floor (32 rows, 11M): before {r['before'] * 1e3:.1f} ms, after {r['after'] * 1e3:.1f} ms, "
              f"x{r['before'] / r['after']:.2f}")
    if "sample" in cases:
        old, new = pair(baseline, **small)
        r = interleaved({"before": sample_fn(old.eval()), "after": sample_fn(new.eval())}, args.repeats)
        print(f"sample (batch 16 + CFG, 11M): before {r['before']:.2f} s, after {r['after']:.2f} s, "
              f"x{r['before'] / r['after']:.2f}")
    if "train" in cases:
        for hidden, depth, heads in ((768, 2, 16), (256, 8, 8)):
            old, new = pair(baseline, hidden_size=hidden, depth=depth, num_heads=heads, intermediate_size=4 * hidden,
                            dropout=args.dropout, attn_dropout=args.dropout)
            r = interleaved({"before": train_fn(old), "after": train_fn(new)}, args.repeats)
            print(f"train fwd+bwd (hidden {hidden}, depth {depth}, dropout {args.dropout}): before {r['before']:.2f} s, "
                  f"after {r['after']:.2f} s, x{r['before'] / r['after']:.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
