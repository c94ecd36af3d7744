import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from vqtok.errors import UserError
from vqtok.train import checkpoint as ckpt
from vqtok.train.ema import EMA
from vqtok.train.engine import EngineConfig
from vqtok.train.sampler import StreamBatchSampler
from vqtok.train.optim import OptimizerConfig, ScheduleConfig, learning_rate


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
