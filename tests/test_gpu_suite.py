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

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_bench_script(name: str):
    """bench/<name>.py as a fresh module (the bench scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_compare_official_runs_only_the_generator_cases_on_a_gpu_and_needs_one(tmp_path):
    script = REPO / "bench" / "compare_official.py"
    (tmp_path / "peers" / "VAR").mkdir(parents=True)
    base = [sys.executable, str(script), "--peers", str(tmp_path / "peers"), "--device"]
    proc = subprocess.run(base + ["cuda", "--only", "var_sampling,rar_sampling"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: on --device cuda only llamagen_sampling, llamagen_sampling_bf16, "
                                   "var_sampling, var_sampling_bf16 run; drop rar_sampling from --only")
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run(base + ["cuda", "--only", "var_sampling"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "only cpu or an available CUDA device" in proc.stderr
    proc = subprocess.run(base + ["mps", "--only", "var_sampling"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_compare_official_synchronizes_each_timed_run_only_on_a_gpu():
    import torch

    co = load_bench_script("compare_official")
    fns = {"official": lambda: None}
    assert co.synced(fns, torch.device("cpu")) is fns
    wrapped = co.synced(fns, torch.device("cuda"))
    assert list(wrapped) == ["official"] and wrapped["official"] is not fns["official"]
    co.check_codes(0.9, torch.device("cuda"), "VAR")  # recorded, not required, on a GPU
    try:
        co.check_codes(0.9, torch.device("cpu"), "VAR")
    except RuntimeError as exc:
        assert "does not reproduce the official codes" in str(exc)
    else:
        raise AssertionError("unequal codes on the CPU must fail the case")


def test_compare_official_time_budget_cuts_rounds_but_keeps_two_per_side(monkeypatch):
    import time

    co = load_bench_script("compare_official")
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


def load_gpu_suite():
    return load_bench_script("gpu_suite")


def test_gpu_suite_writes_its_report_after_every_part_and_stops_at_the_budget(tmp_path, monkeypatch):
    suite = load_gpu_suite()
    seen, now = {}, [0.0]

    def first(device, sz, work):
        now[0] = 10.0
        return {"tokenizer": "tiny-vqgan", "resolution": 64, "batch": 2, "img_s": 5.0}

    def second(device, sz, work):  # a run killed here must already have the first part on disk
        seen.update(json.loads((tmp_path / "gpu_results.json").read_text()))
        now[0] = 100.0
        raise RuntimeError("boom")

    def third(device, sz, work):
        raise AssertionError("the budget was spent: this part must not start")

    monkeypatch.setattr(suite, "PARTS", [("encode", first), ("sampling", second), ("rar_train", third)])
    monkeypatch.setattr(suite.time, "perf_counter", lambda: now[0])
    assert suite.main(["--check", "--out", str(tmp_path), "--budget-s", "50"]) == 1  # a part failed
    assert seen["encode"]["img_s"] == 5.0 and "sampling" not in seen
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert results["sampling"]["error"] == "RuntimeError: boom"
    assert results["rar_train"]["skipped"].startswith("time budget: 100 s of --budget-s 50 spent")
    table = (tmp_path / "gpu_results.md").read_text()
    assert "| encode (tiny-vqgan, 64 px, batch 2) | 5.0 img/s |" in table
    assert "| sampling | FAILED: RuntimeError: boom |" in table and "| rar_train | skipped (time budget" in table


def test_gpu_suite_refuses_an_unknown_part_to_skip(tmp_path, capsys):
    assert load_gpu_suite().main(["--check", "--out", str(tmp_path), "--skip", "sampling,samplnig"]) == 2
    assert "--skip names no part ['samplnig']" in capsys.readouterr().err


def test_gpu_run_script_runs_the_suite_from_the_checkout_and_logs_to_out(tmp_path):
    # the device-side wrapper: the checkout on PYTHONPATH, the suite's report and a log under $OUT; with the
    # budget at 0 every part is reported as skipped, so this checks the wiring in seconds
    env = dict(os.environ, OUT=str(tmp_path / "out"), BUDGET="0", PYTHON=sys.executable, COMPARE="0")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "--check"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert all("skipped" in results[part] for part in ("commands", "sampling", "rar_train", "tokenizer_train",
                                                          "encode", "generators"))
    log = (tmp_path / "out" / "gpu_suite.log").read_text()
    assert "torch " in log and "skipped for the time budget: commands, sampling" in log


def test_gpu_run_script_names_the_missing_wheel(tmp_path):
    if (REPO / ".whl").exists():
        import pytest

        pytest.skip("this checkout has a prepared .whl/ folder")
    fake = tmp_path / "python3"  # an interpreter whose image lacks lpips
    fake.write_text("#!/usr/bin/env bash\nif [ \"$1\" = - ]; then cat >/dev/null; echo lpips; else exit 9; fi\n")
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2
    assert "lpips is not installed here and .whl/ has no lpips-*.whl: run bench/gpu_prepare.sh" in proc.stderr


def test_compare_official_shared_kernel_floor_takes_the_smaller_side_per_kernel_group():
    import torch

    co = load_bench_script("compare_official")
    a, w, b = torch.randn(64, 32), torch.randn(48, 32), torch.randn(48)

    def lean():  # one GEMM and one GELU
        torch.nn.functional.gelu(torch.nn.functional.linear(a, w, b), approximate="tanh")

    def heavy():  # the same, twice more GEMMs, and unshared work that the floor must not count
        for _ in range(3):
            y = torch.nn.functional.linear(a, w, b)
        torch.nn.functional.gelu(y, approximate="tanh").exp().sum()

    out = co.shared_kernel_floor({"official": heavy, "vqtok": lean}, official_s=1.0)
    sides = out["shared_kernels_s"]
    assert set(sides) == {"official", "vqtok"} and set(sides["vqtok"]) == {"attention", "gelu", "gemm"}
    assert sides["vqtok"]["gemm"] > 0 and sides["vqtok"]["gelu"] > 0 and sides["vqtok"]["attention"] == 0
    want = sum(min(sides["official"][g], sides["vqtok"][g]) for g in sides["vqtok"])
    assert out["floor_s"] == pytest.approx(want) and out["floor_s"] <= sum(sides["official"].values())
    assert out["ratio_bound"] == pytest.approx(1.0 / out["floor_s"])
    assert "floor" in co.fmt_floor(out) and "exceed" in co.fmt_floor(out)
