"""bench/gpu_suite.py --check: every part of the GPU suite runs at toy sizes on CPU and reports sane results.

The suite is written to run first time on a CUDA machine; this test proves its wiring (the four commands
through the CLI, the sampling measurements including the static-buffer sampler the CUDA graphs replay, the
RAR and tokenizer training steps, encode, and the JSON + markdown report) on every CI run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_suite_check_runs_every_part_on_cpu(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [x for x in [env.get("PYTHONPATH")] if x])
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--check", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert results["check"] is True
    for part in ("commands", "sampling", "rar_train", "tokenizer_train", "encode", "generators"):
        assert part in results and "error" not in results[part], (part, results.get(part))
    commands = results["commands"]["commands"]
    assert [c["cmd"].split()[1] for c in commands] == ["train-tokenizer", "encode", "train-ar", "sample"]
    assert all(c["rc"] == 0 for c in commands)
    sampling = results["sampling"]
    # the static-buffer (graphed) sampler reproduces the eager loop exactly, and refilling its condition
    # buffers in place with other classes changes the guided logits (no stale condition state)
    assert sampling["graphed_tokens_equal_eager"] == 1.0
    assert sampling["refill_changes_logits"] is True
    for key in ("eager_tokens_img_s", "eager_with_decode_img_s", "graphed_tokens_img_s", "graphed_with_decode_img_s"):
        assert sampling[key] > 0
    assert results["rar_train"]["tok_per_s"] > 0 and 0 < results["rar_train"]["mfu_vs_measured_gemm"]
    assert results["tokenizer_train"]["phases"] == ["generator", "discriminator"]
    assert results["tokenizer_train"]["img_s"] > 0 and results["encode"]["img_s"] > 0
    generators = results["generators"]
    assert len(generators["generators"]) == 2 and generators["generators"][1] == "llamagen-tiny"
    for name in generators["generators"]:  # the static-buffer decoders give the eager codes, VAR's and LlamaGen's
        assert generators[f"{name}_graphed_equal_eager"] == 1.0, name
        assert generators[f"{name}_eager_img_s"] > 0 and generators[f"{name}_graphed_img_s"] > 0
    table = (tmp_path / "gpu_results.md").read_text()
    assert "--check: toy sizes on CPU, not a measurement" in table and "FAILED" not in table


def test_compare_official_names_a_missing_peers_path(tmp_path):
    script = REPO / "bench" / "compare_official.py"
    proc = subprocess.run([sys.executable, str(script), "--peers", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"--peers {tmp_path / 'nowhere'} does not exist" in proc.stderr
    (tmp_path / "peers" / "1d-tokenizer").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(script), "--peers", str(tmp_path / "peers")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "LlamaGen is missing" in proc.stderr and "vqgan_train_step" in proc.stderr
    proc = subprocess.run([sys.executable, str(script), "--peers", str(tmp_path / "peers"), "--only", "rar_sampling",
                           "--deps", str(tmp_path / "nodeps")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--deps" in proc.stderr and "does not exist" in proc.stderr


def test_compare_official_time_budget_cuts_rounds_but_keeps_two_per_side(monkeypatch):
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("compare_official_under_test", REPO / "bench" / "compare_official.py")
    co = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(co)
    calls = []

    def fn(name):
        def run():
            calls.append(name)
            time.sleep(0.02)
        return run

    fns = {"official": fn("official"), "vqtok": fn("vqtok")}
    co.BUDGET.update(case_s=float("inf"), t0=time.perf_counter())
    assert [len(v) for v in co.alternate(fns, 5, warmup=0).values()] == [5, 5]
    calls.clear()
    co.BUDGET.update(case_s=0.0, t0=time.perf_counter())  # spent at once: the budget cuts to the minimum
    times = co.alternate(fns, 5, warmup=1)
    assert [len(v) for v in times.values()] == [co.MIN_REPEATS, co.MIN_REPEATS] == [2, 2]
    assert calls == ["official", "vqtok", "official", "vqtok", "vqtok", "official"]  # warm-up, then A B, B A
    co.BUDGET.update(case_s=0.2, t0=time.perf_counter())  # room for a few rounds of ~0.04 s, not all 20
    n = len(co.alternate(fns, 20, warmup=0)["vqtok"])
    assert 2 <= n < 20
