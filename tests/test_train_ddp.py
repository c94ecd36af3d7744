"""Two gloo processes under torchrun train exactly what one process trains with the same global batch, on both
gradient paths: the explicit all-reduce (tokenizer) and DDP with no_sync on accumulation micro-steps (AR)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from vqtok.train.tokenizer_task import train_tokenizer
from vqtok.weights import load_state_dict_file

from test_train_ar import tokenizers, tokens  # noqa: F401  (fixtures)
from test_train_tokenizer import FAST, make_photos


def test_two_process_gloo_run_equals_single_process(tmp_path):
    photos = make_photos(tmp_path / "photos")
    # D from step 1 with adaptive weight and LeCam: every cross-rank reduction is exercised
    # Adam eps 1e-4: conv biases in front of GroupNorm (and many D weights at init) have near-zero
    # gradients; with eps 1e-8 Adam turns their float round-off, which depends on the reduction order,
    # into lr-sized steps. The larger eps keeps the comparison about the gradients themselves.
    over = FAST + ["train.steps=3", "loss.lecam_weight=0.01", "train.ema_decay=0.5",
                   "optim.generator.eps=1e-4", "optim.discriminator.eps=1e-4"]
    single = train_tokenizer(photos, "tiny-vqgan", tmp_path / "single", over)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vqtok", "train-tokenizer", str(photos), "--config", "tiny-vqgan", "--out", str(tmp_path / "ddp"),
           "--device", "cpu", *over]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("tokenizer saved to") == 1  # only rank 0 prints
    a = load_state_dict_file(single.final_dir / "model.safetensors")
    b = load_state_dict_file(tmp_path / "ddp" / "final" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    sa = torch.load(single.last_checkpoint / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "ddp" / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    for k, v in sa["modules"]["discriminator"].items():
        assert torch.allclose(v, sb["modules"]["discriminator"][k], rtol=1e-4, atol=1e-5), (k, (v - sb["modules"]["discriminator"][k]).abs().max(), v.abs().max())
    assert len(sb["rng"]) == 2  # each rank's RNG state is kept


TOY_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from test_train_engine import ToyTask
from vqtok.distributed import init_distributed
from vqtok.train.engine import Engine, EngineConfig

env = init_distributed("cpu")
out = Path(sys.argv[1])
results = {{}}
for mode in ("ddp", "explicit"):
    task = ToyTask(grad_sync=mode, rank=env.rank, world=env.world, batch=8)
    cfg = EngineConfig(steps=4, batch_size=8, grad_accum=2, amp=False, ema_decay=0.5, num_workers=0,
                       log_every=2, ckpt_every=1000, preview_every=1000)
    engine = Engine(cfg, env, out / mode)
    reductions = []
    phase = engine.prepare(task)[0]
    if mode == "ddp":
        def counted(state, bucket):
            reductions.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)
        phase.ddp.register_comm_hook(None, counted)
    else:
        assert phase.ddp is None
    engine.run(task)
    results[mode] = {{"params": [p.detach().tolist() for p in task.model.parameters()], "reductions": len(reductions)}}
(out / f"rank{{env.rank}}.json").write_text(json.dumps(results))
"""


def test_ddp_path_equals_explicit_path_and_one_process_with_accumulation(tmp_path):
    """The engine's two gradient paths over 2 gloo ranks, 4 steps of 2 accumulation micro-batches each,
    end with the parameters one process reaches on the whole batch; DDP reduces once per step (no_sync)."""
    import json

    from test_train_engine import ToyTask, run_toy

    script = tmp_path / "toy_ddp.py"
    script.write_text(TOY_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    single = ToyTask(grad_sync="explicit", batch=8)
    run_toy(tmp_path / "single", single, steps=4, grad_accum=2)
    reference = [p.detach() for p in single.model.parameters()]
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["ddp"]["reductions"] == 4  # one bucket per optimizer step, not one per micro-batch
        for mode in ("ddp", "explicit"):
            for ref, got in zip(reference, results[mode]["params"]):
                assert torch.allclose(ref, torch.tensor(got), rtol=1e-5, atol=1e-6), (mode, rank, (ref - torch.tensor(got)).abs().max())
        for a, b in zip(results["ddp"]["params"], results["explicit"]["params"]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=1e-7)


def test_ar_task_trains_the_same_with_ddp_and_explicit_all_reduce(tmp_path, tokenizers, tokens):
    """train-ar (grad_sync "ddp") on 2 gloo ranks with 2 accumulation micro-batches per step, and the same
    run forced onto the explicit all-reduce path, both end where one process ends."""
    from safetensors.torch import load_file

    from test_train_ar import BASE

    args = ["train-ar", str(tokens), "--tokenizer", str(tokenizers[0]), "--config", "rar-tiny", "--device", "cpu",
            "--anneal", "1", "3", "--anneal-unit", "steps", *BASE, "train.steps=3", "train.ema=false",
            "train.grad_accum=2", "model.dropout=0.0", "model.attn_dropout=0.0"]
    explicit = tmp_path / "explicit.py"  # `vqtok` with the AR task's gradient path switched
    explicit.write_text("import sys\nfrom vqtok.train.ar_task import ARTrainTask\nARTrainTask.grad_sync = 'explicit'\n"
                        "from vqtok.cli import main\nsys.argv[0] = 'vqtok'\nmain()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    one = subprocess.run([sys.executable, "-m", "vqtok", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, entry in (("ddp", ["-m", "vqtok"]), ("explicit", [str(explicit)])):
        proc = subprocess.run([*launch, *entry, *args, "--out", str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, name + proc.stdout[-2000:] + proc.stderr[-3000:]
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    for name in ("ddp", "explicit"):
        b = load_file(tmp_path / name / "final" / "model.safetensors")
        # the ranks sum gradients in another order than one process; Adam's first steps (lr 2e-3, update ~ lr
        # sign(g) where g is near 0) amplify that round-off to ~1e-5 on some CPUs (1.2e-5 on an AVX2 Zen 3),
        # while a wrong accumulation or averaging moves weights by a sizeable fraction of lr per step
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4, name
    d, e = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("ddp", "explicit"))
    assert max((d[k] - e[k]).abs().max().item() for k in d) < 1e-6
