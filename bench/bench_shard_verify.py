"""Start-up cost of train-ar's token-shard verification.

Writes one tar shard of N samples of (views, tokens) uint16 with TokenShardWriter, then times
`vqtok.train.ar_data._scan_tar` three ways: the header scan alone (what train-ar did before), plus the
per-sample npy-header / token-range / class checks, plus the shard's sha256. The verification runs once
per shard at start-up, before the first step, so it never shows in the step time; this measures how much
it adds to the start-up scan.

    python bench/bench_shard_verify.py --samples 20000 --views 10 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from vqtok.data.token_shards import TokenShardWriter
from vqtok.train.ar_data import SampleCheck, _scan_tar


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        writer = TokenShardWriter(out, 0, "wds", np.uint16, args.views, args.tokens)
        rng = np.random.default_rng(0)
        for i in range(args.samples):
            writer.write(f"k{i:08d}", rng.integers(0, args.vocab, (args.views, args.tokens)).astype(np.uint16), i % 1000)
        writer.close()
        shard = out / "tokens-000000.tar"
        sha = json.loads((out / "progress" / "tokens-000000.json").read_text())["sha256"]
        expect = SampleCheck(np.dtype(np.uint16), (args.views, args.tokens), args.vocab, 1000)
        size_mb = shard.stat().st_size / 1e6
        for label, check, digest in (("header scan only", None, None), ("+ npy/range/class checks", expect, None),
                                     ("+ sha256", expect, sha)):
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                _scan_tar(shard, check, digest)
                best = min(best, time.perf_counter() - t)
            print(f"{label:28s} {best:7.3f} s  {best / args.samples * 1e6:6.1f} us/sample  ({args.samples} samples, {size_mb:.0f} MB)")


if __name__ == "__main__":
    main()
