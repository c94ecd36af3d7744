"""`vqtok sample` run twice, as is and with its per-run decoder replaced by a static-buffer decoder (what
--cuda-graphs replays on CUDA), for the tests that compare the two runs' tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def eager_and_static_tokens(run, make_static, monkeypatch, tmp_path: Path):
    """`run(out_dir)` invokes `vqtok sample` writing to out_dir and returns the CLI result; the second run builds
    its decoder with `make_static(model, cfg, batch)`. Returns (eager tokens, static tokens, the decoders made)."""
    import vqtok.app.sample as generate

    made = []

    def static_decoder(model, cfg, batch, graphs):
        made.append(make_static(model, cfg, batch))
        return made[-1]

    eager = run(tmp_path / "eager")
    assert eager.exit_code == 0, eager.output
    monkeypatch.setattr(generate, "_make_decoder", static_decoder)
    static = run(tmp_path / "static")
    assert static.exit_code == 0, static.output
    return np.load(tmp_path / "eager" / "tokens.npy"), np.load(tmp_path / "static" / "tokens.npy"), made
