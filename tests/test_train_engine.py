import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vqtok.errors import UserError
from vqtok.train import checkpoint as ckpt
from vqtok.train.ema import EMA
from vqtok.distributed import DistEnv
from vqtok.train.engine import EngineConfig, OptimizerConfig, Phase
from vqtok.train.sampler import StreamBatchSampler
from vqtok.train.optim import OptimizerConfig, ScheduleConfig, learning_rate

from test_train_ar import tokenizers, tokens  # noqa: F401  (fixtures)


def test_warmup_then_cosine_and_constant():
    cos = OptimizerConfig(lr=1.0, schedule=ScheduleConfig(kind="cosine", warmup=4, end_lr=0.1))
    assert learning_rate(cos, 0, 100) == pytest.approx(0.25)
    assert learning_rate(cos, 3, 100) == pytest.approx(1.0)
    assert learning_rate(cos, 4, 100) == pytest.approx(1.0)
    assert learning_rate(cos, 52, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(cos, 100, 100) == pytest.approx(0.1)
    const = OptimizerConfig(lr=1.0, schedule=ScheduleConfig(kind="constant", warmup=2))
    assert [learning_rate(const, s, 10) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_sampler_is_a_function_of_step_and_splits_ranks():
    full = StreamBatchSampler(10, 4, seed=3, start_step=0)
    steps = [full.keys_for_step(s) for s in range(6)]
    # every epoch is a permutation of the 10 images, batches run across epoch boundaries
    slots = [k for b in steps for k in b]
    assert sorted(i for e, i in slots if e == 0) == list(range(10))
    assert [e for e, _ in slots[:10]] == [0] * 10 and slots[10][0] == 1
    # resuming at step 4 yields the same keys
    assert next(iter(StreamBatchSampler(10, 4, seed=3, start_step=4))) == steps[4]
    # two ranks together see exactly the single-process global batch
    r0, r1 = (StreamBatchSampler(10, 4, 3, 0, rank=r, world=2).keys_for_step(2) for r in (0, 1))
    assert r0 + r1 == steps[2]
    assert StreamBatchSampler(10, 4, seed=4, start_step=0).keys_for_step(0) != steps[0]
    with pytest.raises(UserError):
        StreamBatchSampler(10, 5, 0, 0, world=2)


def test_ema_tracks_parameters_and_copies_buffers():
    m = nn.BatchNorm1d(3)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(3.0)
        m.running_mean.fill_(7.0)
    ema.update(m)
    w = ema.weights_for(m)
    assert torch.allclose(w["weight"], torch.full((3,), 2.0))  # 0.5*1 + 0.5*3
    assert torch.allclose(w["running_mean"], torch.full((3,), 7.0))
    assert w["num_batches_tracked"].dtype == torch.int64


def test_rng_capture_restore_round_trip():
    state = ckpt.capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.restore_rng(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_checkpoints_are_atomic_dirs_loaded_weights_only_and_pruned(tmp_path):
    state = {"step": 1, "modules": {"m": nn.Linear(2, 2).state_dict()}, "rng": [ckpt.capture_rng()],
             "optimizers": {"m": torch.optim.Adam(nn.Linear(2, 2).parameters()).state_dict()}}
    for step in (1, 2, 3):
        ckpt.write_checkpoint(tmp_path, step, dict(state, step=step), {"step": step}, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    loaded, meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert loaded["step"] == 3 and meta["step"] == 3 and len(meta["state_sha256"]) == 64
    # a half-written directory (no meta.json) is never picked
    (tmp_path / "checkpoints" / "step-00000009").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


def test_engine_config_validation():
    with pytest.raises(UserError, match="divisible"):
        EngineConfig(batch_size=6, grad_accum=4).validate(world=1)
    with pytest.raises(UserError, match="divisible"):
        EngineConfig(batch_size=6).validate(world=4)
    EngineConfig(batch_size=8, grad_accum=2).validate(world=2)


# ------------------------------------------------------------------ the loop on a task made of plain torch


class ToyTask:
    """A two-layer regression net as a TrainTask: nothing but torch, so the engine's own behaviour shows."""

    unit = "samples/s"
    progress_keys = ("loss",)

    def __init__(self, grad_sync: str = "ddp", nan_at: int | None = None, rank: int = 0, world: int = 1,
                 batch: int = 8, through_phase: bool = True, optimizer: str = "sgd"):
        self.grad_sync, self.nan_at, self.rank, self.world, self.batch = grad_sync, nan_at, rank, world, batch
        self.through_phase = through_phase
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        if optimizer == "sgd":
            opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        else:
            opt = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self._phases = [Phase("main", self.model, opt, OptimizerConfig(lr=0.05, grad_clip=1.0), ema=True)]
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(256, 4, generator=g)
        self.y = torch.sin(self.x.sum(dim=1, keepdim=True))

    def phases(self):
        return self._phases

    def phase_active(self, phase, step):
        return True

    def batches(self, start_step):
        step = start_step
        local = self.batch // self.world
        while True:
            first = (step * self.batch) % 256 + self.rank * local
            yield {"x": self.x[first:first + local], "y": self.y[first:first + local]}
            step += 1

    def split(self, batch, parts):
        return [{"x": x, "y": y} for x, y in zip(batch["x"].chunk(parts), batch["y"].chunk(parts))]

    def batch_size(self, batch):
        return batch["x"].shape[0]

    def loss(self, phase, mb, micro_index, step):
        if self.through_phase:
            pred = self._phases[0].forward(self.model, mb["x"])
        else:
            pred = self.model(mb["x"])
        loss = (pred - mb["y"]).pow(2).mean()
        if step == self.nan_at:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach(), "mae": (pred - mb["y"]).abs().mean().detach(), "steps_seen": step}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def preview(self, step, weights):
        return None

    def save_final(self, dest, weights):
        from safetensors.torch import save_file

        dest.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights["main"].items()}, dest / "model.safetensors")


class HostReads:
    """Counts tensor -> host conversions (item, tolist, bool, float, int, numpy, cpu) while `active`."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")

    def __init__(self, monkeypatch, ignore=lambda t: False):
        import traceback

        self.active, self.calls = False, []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, _name=name, **k):
                if self.active and not ignore(t):
                    where = traceback.extract_stack(limit=3)[0]
                    self.calls.append(f"{_name} at {Path(where.filename).name}:{where.lineno}")
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def window(self, batches, first: int, last: int):
        """`batches` with counting on from batch `first` through batch `last` (0-based, relative to the
        run's first step): what the engine does with those steps' batches, not the producing of them
        (a task's data path reads host tensors, e.g. the DataLoader's output before it moves to device)."""
        for i, batch in enumerate(batches):
            self.active = first <= i <= last
            yield batch
            self.active = False


def run_toy(tmp_path, task, steps=8, **train):
    from vqtok.train.engine import Engine

    cfg = EngineConfig(steps=steps, batch_size=task.batch, seed=0, amp=False, ema_decay=0.5, num_workers=0,
                       **{"log_every": 1000, "ckpt_every": 1000, "preview_every": 1000, **train})
    return Engine(cfg, DistEnv(), tmp_path / "run").run(task)


def test_no_host_reads_on_steps_that_neither_log_nor_checkpoint(tmp_path, monkeypatch):
    reads = HostReads(monkeypatch)
    task = ToyTask()
    plain = task.batches
    task.batches = lambda start: reads.window(plain(start), 1, 6)  # steps 2..7 of 8; the log is at 8
    result = run_toy(tmp_path, task, steps=8, grad_accum=2)
    assert result.final_dir is not None
    assert reads.calls == [], reads.calls
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 8 and math.isfinite(row["loss"]) and row["steps_seen"] == pytest.approx(3.5)  # mean of 0..7

    # the counter does see the engine's read-backs: a log step inside the window reads the metrics back
    reads2 = HostReads(monkeypatch)
    task2 = ToyTask()
    plain2 = task2.batches
    task2.batches = lambda start: reads2.window(plain2(start), 1, 6)
    run_toy(tmp_path / "logged", task2, steps=8, grad_accum=2, log_every=4)
    assert any(c.startswith("tolist") for c in reads2.calls), reads2.calls


@pytest.mark.parametrize("log_every,ckpt_every,nan_at,kept,noticed", [
    (4, 4, 5, ["step-00000004"], 8),  # the NaN at a non-log step is caught at the next log + checkpoint step
    (100, 3, 4, ["step-00000003"], 6),  # ... or at the next checkpoint step when logs are rarer
])
def test_nan_at_a_non_log_step_is_caught_before_anything_is_saved(tmp_path, log_every, ckpt_every, nan_at, kept, noticed):
    from vqtok.train.engine import TrainingDiverged

    task = ToyTask(nan_at=nan_at)
    with pytest.raises(TrainingDiverged, match=rf"non-finite at step {nan_at} \(loss=nan.*\); noticed after step {noticed}.*{kept[-1]}"):
        run_toy(tmp_path, task, steps=12, log_every=log_every, ckpt_every=ckpt_every)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept
    assert not (run / "final").exists()
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(s < noticed for s in logged) and all(math.isfinite(json.loads(line)["loss"])
                                                      for line in (run / "metrics.jsonl").read_text().splitlines())
    state = torch.load(run / "checkpoints" / kept[-1] / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["modules"]["main"].values())


def test_a_ddp_task_whose_loss_bypasses_phase_forward_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="did not run through Phase.forward"):
        run_toy(tmp_path, ToyTask(through_phase=False), steps=2)
    # an explicit task may call its module directly
    assert run_toy(tmp_path / "explicit", ToyTask(grad_sync="explicit", through_phase=False), steps=2).final_dir is not None


def test_unknown_grad_sync_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="grad_sync is 'overlap'; use one of ddp, explicit"):
        run_toy(tmp_path, ToyTask(grad_sync="overlap"), steps=1)


def test_public_train_step_returns_device_metrics_and_trains(tmp_path):
    from vqtok.train.engine import Engine

    task = ToyTask()
    engine = Engine(EngineConfig(steps=10, batch_size=8, amp=False, num_workers=0), DistEnv(), tmp_path)
    batches = task.batches(0)
    before = [p.detach().clone() for p in task.model.parameters()]
    out = engine.train_step(task, next(batches), 0)
    assert set(out.metrics) == {"loss", "mae", "steps_seen", "grad_norm_main"} and out.lrs == {"main": 0.05}
    assert all(torch.is_tensor(v) for v in out.metrics.values())
    assert out.floats()["loss"] > 0 and any(not torch.equal(a, b) for a, b in zip(before, task.model.parameters()))
    assert "main" in engine.emas
    engine.check_finite(1)  # nothing non-finite yet
    task.nan_at = 1
    engine.train_step(task, next(batches), 1)
    with pytest.raises(UserError, match="non-finite at step 1"):
        engine.check_finite(2)


def test_ar_task_steps_read_nothing_back(tmp_path, monkeypatch, tokenizers, tokens):
    """The real AR task (loss, backward, clipping, AdamW, EMA) through the engine: no host reads between log steps.

    On CPU AdamW keeps its step counters as CPU tensors and reads them (`.item()`); on CUDA the engine builds
    the fused AdamW, which does not. Those counters are the one thing ignored."""
    from test_train_ar import BASE

    from vqtok.train.ar_task import ARTrainTask, load_run_config
    from vqtok.train.engine import Engine

    cfg = load_run_config("rar-tiny", BASE + ["train.steps=6", "train.log_every=6", "train.grad_accum=2", "train.ema=true"])
    task = ARTrainTask(cfg, DistEnv(), tokens, tokenizers[0])
    optimizer = task.phases()[0].optimizer
    reads = HostReads(monkeypatch, ignore=lambda t: any(t is s.get("step") for s in optimizer.state.values()))
    plain = task.batches
    task.batches = lambda start: reads.window(plain(start), 1, 4)
    result = Engine(cfg.train, DistEnv(), tmp_path / "run").run(task)
    assert result.final_dir is not None
    assert reads.calls == [], reads.calls


@pytest.mark.parametrize("kind,weight_decay", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.05)])
def test_cpu_optimizer_is_fused_and_steps_like_the_reference(kind, weight_decay):
    from vqtok.train.engine import build_optimizer

    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(11, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    cfg = OptimizerConfig(kind=kind, lr=3e-3, betas=(0.9, 0.95), weight_decay=weight_decay, eps=1e-8)
    opt = build_optimizer(cfg, params, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    reference = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind](
        ref, lr=3e-3, betas=(0.9, 0.95), weight_decay=weight_decay, eps=1e-8, foreach=False)
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_optimizer_falls_back_to_foreach_where_fused_is_refused(monkeypatch):
    from vqtok.train import engine

    class NoFusedAdam(torch.optim.Adam):
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", NoFusedAdam)
    opt = engine.build_optimizer(OptimizerConfig(kind="adam"), [torch.zeros(3, requires_grad=True)], torch.device("cpu"))
    assert isinstance(opt, NoFusedAdam) and opt.defaults["foreach"] is True and not opt.defaults["fused"]
