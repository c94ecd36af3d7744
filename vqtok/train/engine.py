"""The ONE training engine, shared by `train-tokenizer` and `train-ar`.

A trainer is a `TrainTask`: it builds its models, optimizers and data, and computes a loss for a named
*phase* on a micro-batch. The engine owns everything else: device and bf16 autocast, optional
torch.compile (done by the task on the modules it chooses), gradient accumulation, gradient averaging
across ranks (DDP or the explicit all-reduce, as the task's `grad_sync` says; see vqtok/train/ddp.py),
clipping, LR schedules, EMA, checkpoints and exact resume, SIGINT/SIGTERM, NaN stops, progress,
metrics.jsonl, preview grids and the final export.

One engine step = for each active phase in order (e.g. "generator" then "discriminator"):
zero grads -> for each of `grad_accum` micro-batches: loss/accum backward -> average grads over ranks
-> clip -> optimizer step -> EMA update. The task sees the same micro-batches in every phase, so a
discriminator phase can reuse the reconstructions its generator phase cached.

No host sync on ordinary steps: the engine never reads a device value back on a step that neither logs,
previews nor checkpoints. Metric sums stay device tensors until the next log step; non-finite losses are
flagged on device (with the first bad step and its metrics) and checked at every log, preview and
checkpoint step and before the final export, always before anything is written, so a NaN never
overwrites a good checkpoint. After a NaN the steps up to that check run on NaN weights, which are then
discarded with the process. The per-step stop-signal vote goes over a CPU (gloo) group.
"""

from __future__ import annotations

import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from vqtok.config import save_config
from vqtok.device import autocast
from vqtok.errors import UserError
from vqtok.run_lock import run_lock
from vqtok.signals import STOP_SIGNALS, Interrupted, signal_name
from vqtok.validation import check_fields
from vqtok.train import checkpoint as ckpt
from vqtok.distributed import DistEnv, average_gradients, barrier, mean_over_ranks
from vqtok.train.ddp import HostVote, grad_sync_mode, wrap_ddp
from vqtok.train.ema import EMA
from vqtok.train.progress import MetricsLog, Progress
from vqtok.train.optim import OptimizerConfig, learning_rate


@dataclass
class EngineConfig:
    """The `train` section of every training recipe."""

    steps: int = 1000
    batch_size: int = 8  # global: all ranks x all accumulation micro-steps
    grad_accum: int = 1
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    compile: bool = False
    ema: bool = True
    ema_decay: float = 0.999
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    preview_every: int = 500
    num_workers: int = 2

    def check_ranges(self, where: str = "train") -> None:
        check_fields(self, where, {
            "steps": {"low": 1}, "batch_size": {"low": 1}, "grad_accum": {"low": 1}, "log_every": {"low": 1},
            "ckpt_every": {"low": 1}, "preview_every": {"low": 1}, "keep_last": {"low": 0}, "num_workers": {"low": 0},
            "ema_decay": {"low": 0.0, "high": 1.0, "high_open": True},
        })

    def validate(self, world: int) -> None:
        self.check_ranges("train")
        if self.steps < 1:
            raise UserError("train.steps must be at least 1")
        if self.batch_size % (self.grad_accum * world):
            raise UserError(
                f"train.batch_size {self.batch_size} must be divisible by train.grad_accum ({self.grad_accum}) "
                f"x the number of processes ({world})"
            )
        for name in ("log_every", "ckpt_every", "preview_every"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError("train.ema_decay must lie in [0, 1)")


def build_optimizer(cfg: OptimizerConfig, params, device: torch.device) -> torch.optim.Optimizer:
    cfg.check_ranges("optim")  # configs from recipes were checked at load, under their own key path
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.kind not in kinds:
        raise UserError(f"unknown optimizer '{cfg.kind}'; use adam or adamw")
    params = list(params)
    settings = {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay, "eps": cfg.eps}
    # The fused kernel (one pass over each parameter, its gradient and both moments) on CUDA and on CPU,
    # where torch's default is one tensor at a time and its multi-tensor (foreach) form writes every
    # intermediate out; a torch whose fused kernel refuses the device or the dtypes gets the foreach form.
    try:
        return kinds[cfg.kind](params, fused=True, **settings)
    except (RuntimeError, ValueError, TypeError):
        return kinds[cfg.kind](params, foreach=True, **settings)


@dataclass
class Phase:
    """One optimizer update per step: the module it trains, its optimizer and schedule, optional EMA."""

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    config: OptimizerConfig
    ema: bool = False  # keep an EMA of this module (when train.ema is on)
    ddp: nn.Module | None = field(default=None, repr=False, compare=False)  # set by the engine (grad_sync "ddp")
    forwarded: bool = field(default=False, repr=False, compare=False)

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        """Run the loss's forward computation `fn(*args, **kwargs)` over this phase's module.

        Tasks with grad_sync "ddp" must compute their loss through this: with several ranks it runs inside
        the module's DDP wrapper, so the following backward reduces gradient buckets as they become ready.
        Otherwise it is a plain call.
        """
        self.forwarded = True
        if self.ddp is None:
            return fn(*args, **kwargs)
        return self.ddp(fn, *args, **kwargs)


class TrainTask(Protocol):
    """What a trainer supplies to the engine."""

    unit: str  # throughput unit for the progress line, e.g. "img/s" or "tok/s"
    progress_keys: tuple[str, ...]  # metric names shown on the progress line

    def phases(self) -> list[Phase]: ...

    def phase_active(self, phase: str, step: int) -> bool: ...

    def batches(self, start_step: int) -> Iterator[Any]:
        """This rank's share of the global batch for steps start_step, start_step+1, ..., on device."""

    def split(self, batch: Any, parts: int) -> list[Any]: ...

    def batch_size(self, batch: Any) -> int: ...

    def loss(self, phase: str, micro_batch: Any, micro_index: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def preview(self, step: int, weights: dict[str, dict[str, torch.Tensor]] | None) -> torch.Tensor | None:
        """An image grid (3,H,W) in [0,1] for RUN/previews, or None."""

    def save_final(self, dest: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None: ...

    # Optional attributes and hooks (looked up with getattr):
    # grad_sync: "ddp" or "explicit" (default), how gradients are averaged over ranks (vqtok/train/ddp.py);
    #   a "ddp" task computes its loss through Phase.forward.
    # point_metrics: metric names logged at the log step itself instead of averaged over the window.
    # after_optimizer_step(phase, optimizer, ema_or_None, step): after the phase's optimizer step, before
    #   its EMA update, on every rank (it may issue collectives).
    # on_log(step) -> (metrics, messages): at each log step on every rank (it may issue collectives).


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops without writing anything over the last good checkpoint."""


@dataclass
class RunResult:
    step: int
    interrupted: bool
    final_dir: Path | None
    last_checkpoint: Path | None
    signal: int | None = None  # the stop signal of an interrupted run (the CLI exits 128 + it)


class _StopFlag:
    """SIGINT/SIGTERM request a clean stop at the end of the current step; a second SIGINT aborts.

    DataLoader workers ignore both (vqtok.signals.ignore_stop_signals), so a signal sent to the whole
    process group (SLURM, Ctrl-C) reaches only this handler and the workers stay alive until shut down.
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise Interrupted(signum)
        self.requested = True
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class StepOutput:
    """What one `Engine.train_step` returns: this rank's metrics, still on device (nothing was synced), and
    the learning rate of every phase."""

    metrics: dict[str, torch.Tensor]
    lrs: dict[str, float]

    def floats(self) -> dict[str, float]:
        """The metrics as Python floats (reads them back: a host sync)."""
        return {k: float(v) for k, v in self.metrics.items()}


class _MetricWindow:
    """Per-metric sums and counts since the last log step; the sums stay tensors (no host sync)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.last = metrics

    def means(self, env: DistEnv) -> dict[str, float]:
        """The window's means, averaged over ranks: one read-back for all metrics."""
        names = sorted(self.sums)
        if not names:
            return {}
        values = torch.stack([self.sums[n].to(env.device, torch.float64) / self.counts[n] for n in names])
        if env.enabled:
            values = mean_over_ranks(values, env)
        return dict(zip(names, values.tolist()))


class _FiniteWatch:
    """Non-finite losses flagged on device: for each phase (and set of metric names) the first step whose
    loss was not finite (-1: none yet) and that step's metrics. Read back only by `first_bad`."""

    def __init__(self, phases: list[str]):
        self.phases = phases
        self.entries: dict[tuple[str, tuple[str, ...]], list[torch.Tensor]] = {}

    def observe(self, phase: str, step: int, loss_sum: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        names = tuple(metrics)
        device = loss_sum.device
        entry = self.entries.get((phase, names))
        if entry is None:
            entry = [torch.full((), -1, dtype=torch.int64, device=device), torch.zeros(len(names), device=device)]
            self.entries[(phase, names)] = entry
        first, values = entry
        new = ~torch.isfinite(loss_sum) & (first < 0)
        if names:
            now = torch.stack([metrics[n].to(device, torch.float32).reshape(()) for n in names])
            entry[1] = torch.where(new, now, values)
        entry[0] = torch.where(new, torch.full_like(first, step), first)

    def first_bad(self, env: DistEnv) -> tuple[int, str, str] | None:
        """(step, phase, this rank's metrics at that step) of the earliest non-finite loss on any rank, or None."""
        if not env.enabled and not self.entries:
            return None
        never = torch.iinfo(torch.int64).max
        per_phase = []
        for name in self.phases:  # the same order on every rank, whatever each has seen
            firsts = [e[0] for (ph, _), e in self.entries.items() if ph == name]
            earliest = torch.full((), never, dtype=torch.int64, device=env.device)
            for f in firsts:
                earliest = torch.minimum(earliest, torch.where(f < 0, torch.full_like(f, never), f).to(env.device))
            per_phase.append(earliest)
        steps = torch.stack(per_phase)
        if env.enabled:
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
        steps_host = steps.tolist()
        step = min(steps_host)
        if step == never:
            return None
        phase = self.phases[steps_host.index(step)]
        terms = "on another rank"
        for (ph, names), (first, values) in self.entries.items():
            if ph == phase and int(first) == step:
                terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values.tolist()))
                break
        return step, phase, terms


class Engine:
    def __init__(self, cfg: EngineConfig, env: DistEnv, run_dir: Path, resolved_config: Any = None):
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        self.resolved_config = resolved_config
        cfg.validate(env.world)
        self.emas: dict[str, EMA] = {}
        self._prepared: tuple[Any, list[Phase]] | None = None
        self._watch: _FiniteWatch | None = None
        self._vote: HostVote | None = None

    # -- helpers -------------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def _set_lr(self, phase: Phase, step: int) -> float:
        lr = learning_rate(phase.config, step, self.cfg.steps)
        for group in phase.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _ema_weights(self, phases: list[Phase]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for p in phases:
            ema = self.emas.get(p.name)
            out[p.name] = ema.weights_for(p.module) if ema is not None else p.module.state_dict()
        return out

    def _state(self, phases: list[Phase], task: TrainTask, step: int) -> dict[str, Any]:
        rng = ckpt.capture_rng()
        if self.env.enabled:
            gathered: list[Any] = [None] * self.env.world
            torch.distributed.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        return {
            "step": step,
            "modules": {p.name: p.module.state_dict() for p in phases},
            "optimizers": {p.name: p.optimizer.state_dict() for p in phases},
            "ema": {name: e.state_dict() for name, e in self.emas.items()},
            "task": task.state_dict(),
            "rng": rng_all,
        }

    def save_checkpoint(self, phases: list[Phase], task: TrainTask, step: int) -> Path:
        state = self._state(phases, task, step)  # collective: every rank calls it
        dest = ckpt.checkpoint_dir(self.run_dir, step)
        if self.env.is_main:
            meta = {"step": step, "world_size": self.env.world, "batch_size": self.cfg.batch_size, "time": time.time()}
            dest = ckpt.write_checkpoint(self.run_dir, step, state, meta, self.cfg.keep_last)
        barrier(self.env)
        return dest

    def _load(self, path: Path, phases: list[Phase], task: TrainTask) -> int:
        state, meta = ckpt.read_checkpoint(path)
        saved_step = int(state["step"])
        if saved_step > self.cfg.steps:
            raise UserError(
                f"{path} is at step {saved_step}, past the end of this run at step {self.cfg.steps}; "
                "to train longer, resume with a larger length (train.steps or epochs), or use the run's final/ weights"
            )
        if meta.get("batch_size") != self.cfg.batch_size:
            raise UserError(
                f"{path} was trained with global batch {meta.get('batch_size')}, the config now says {self.cfg.batch_size}; "
                "an exact resume needs the same train.batch_size"
            )
        for p in phases:
            p.module.load_state_dict(state["modules"][p.name])
            p.optimizer.load_state_dict(state["optimizers"][p.name])
        for name, e in self.emas.items():
            if name not in state["ema"]:
                raise UserError(f"{path} has no EMA for {name}; resume with the same train.ema setting")
            e.load_state_dict(state["ema"][name])
        task.load_state_dict(state["task"])
        rngs = state["rng"]
        ckpt.restore_rng(rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0])
        return int(state["step"])

    # -- one step (public: the loop below and the benchmarks use these) ---------------------------------

    def prepare(self, task: TrainTask) -> list[Phase]:
        """The task's phases, made ready for `train_step`: EMAs (train.ema), DDP wrappers (grad_sync "ddp",
        several ranks), the non-finite watch and the stop vote. Every rank calls it; once per task."""
        if self._prepared is not None and self._prepared[0] is task:
            return self._prepared[1]
        phases = task.phases()
        mode = grad_sync_mode(task)
        if mode == "ddp" and self.env.enabled:
            for p in phases:
                p.ddp = wrap_ddp(p.module, self.env.device)
        self.emas = {p.name: EMA(p.module, self.cfg.ema_decay) for p in phases if p.ema} if self.cfg.ema else {}
        self._watch = _FiniteWatch([p.name for p in phases])
        self._vote = HostVote(self.env.enabled)
        self._grad_sync = mode
        self._prepared = (task, phases)
        return phases

    def train_step(self, task: TrainTask, batch: Any, step: int) -> StepOutput:
        """One optimizer step of every active phase on `batch` (this rank's share of step `step`), as the
        training loop runs it: no logging, checkpoint or non-finite check (see `check_finite`), no host sync."""
        phases = self.prepare(task)
        cfg, env = self.cfg, self.env
        micro = task.split(batch, cfg.grad_accum)
        metrics: dict[str, torch.Tensor] = {}
        lrs: dict[str, float] = {}
        for phase in phases:
            lrs[phase.name] = self._set_lr(phase, step)
            if not task.phase_active(phase.name, step):
                continue
            phase.optimizer.zero_grad(set_to_none=True)
            phase_metrics: dict[str, torch.Tensor] = {}
            losses = []
            # without DDP the backward reaches this phase's parameters only: nothing else's gradient is
            # computed (e.g. a graph the phase shares with another ends at an input that needs none)
            params = [p for p in phase.module.parameters() if p.requires_grad]
            inputs = params if phase.ddp is None and params else None
            for i, mb in enumerate(micro):
                # DDP: reduce once per optimizer step, on the last micro-batch's backward
                local = phase.ddp.no_sync() if phase.ddp is not None and i < len(micro) - 1 else nullcontext()
                phase.forwarded = False
                with local:
                    with autocast(env.device, enabled=cfg.amp):
                        loss, m = task.loss(phase.name, mb, i, step)
                    if self._grad_sync == "ddp" and not phase.forwarded:
                        raise RuntimeError(
                            f"{type(task).__name__} has grad_sync 'ddp' but its {phase.name} loss did not run through "
                            "Phase.forward; its gradients would not be averaged over ranks"
                        )
                    (loss / len(micro)).backward(inputs=inputs)
                losses.append(loss.detach().float())
                for k, v in m.items():
                    v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                    phase_metrics[k] = phase_metrics[k] + v / len(micro) if k in phase_metrics else v / len(micro)
            self._watch.observe(phase.name, step, torch.stack(losses).sum(), phase_metrics)
            if phase.ddp is None:
                average_gradients(params, env)
            if phase.config.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, phase.config.grad_clip)
                phase_metrics[f"grad_norm_{phase.name}"] = norm.detach().float()
            phase.optimizer.step()
            ema = self.emas.get(phase.name)
            after_step = getattr(task, "after_optimizer_step", None)  # optional: e.g. codebook restarts
            if after_step is not None:
                after_step(phase.name, phase.optimizer, ema, step)
            if ema is not None:
                ema.update(phase.module)
            metrics.update(phase_metrics)
        return StepOutput(metrics, lrs)

    def check_finite(self, step: int) -> None:
        """Raise TrainingDiverged if any rank's loss was non-finite at a step since training began (a host
        sync, and a collective: every rank calls it at the same steps). `step`: the steps trained so far."""
        if self._watch is None:
            return
        found = self._watch.first_bad(self.env)
        if found is None:
            return
        bad_step, phase, terms = found
        last = ckpt.latest_checkpoint(self.run_dir)
        raise TrainingDiverged(
            f"the {phase} loss became non-finite at step {bad_step} ({terms}); noticed after step {step}, stopped "
            f"without saving, the last good checkpoint is {last if last is not None else 'none'}; lower the learning "
            "rate or enable gradient clipping and resume with --resume auto"
        )

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, task: TrainTask, resume: bool = False, stop_after: int | None = None) -> RunResult:
        """Train to `train.steps` (or stop early after `stop_after` total steps, for tests and demos),
        holding the run directory's lock; leftovers of a killed run are removed (and listed) first."""
        with run_lock(self.run_dir, "train"):
            removed = ckpt.clean_leftovers(self.run_dir) if self.env.is_main else []
            if removed:
                self.log(f"removed leftovers of an interrupted run in {self.run_dir}: {', '.join(removed)}")
            return self._run(task, resume, stop_after)

    def _run(self, task: TrainTask, resume: bool = False, stop_after: int | None = None) -> RunResult:
        cfg, env = self.cfg, self.env
        phases = self.prepare(task)
        start = 0
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None and not resume:
            raise UserError(f"{self.run_dir} already holds checkpoints; pass --resume auto to continue that run or choose another --out")
        if resume and latest is not None:
            start = self._load(latest, phases, task)
            self.log(f"resumed from {latest} at step {start}")
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resolved_config is not None:
                save_config(self.resolved_config, self.run_dir / "config.yaml")
        barrier(env)
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", start if resume else None) if env.is_main else None
        if not resume and metrics_log is not None:
            metrics_log.fh.truncate(0)
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        progress = Progress(cfg.steps, start, task.unit, env.is_main, task.progress_keys)
        last_ckpt, step, interrupted, stop_signal = latest, start, False, None
        window_t, window_samples = time.perf_counter(), 0
        window = _MetricWindow()
        try:
            with _StopFlag() as stop:
                batches = task.batches(start)
                while step < end:
                    batch = next(batches)
                    out = self.train_step(task, batch, step)
                    step += 1
                    window_samples += task.batch_size(batch) * env.world
                    window.add(out.metrics)
                    log_now = step % cfg.log_every == 0 or step == end
                    preview_now = step % cfg.preview_every == 0
                    stop_now = self._vote.any(stop.requested)  # host-side: no device read-back
                    ckpt_now = step % cfg.ckpt_every == 0 or stop_now
                    if log_now or preview_now or ckpt_now:
                        self.check_finite(step)  # before anything below writes
                    if log_now:
                        elapsed = time.perf_counter() - window_t
                        averaged = window.means(env)
                        # schedule values (e.g. RAR's r) are reported at the logged step, not averaged over the window
                        averaged.update({k: float(window.last[k]) for k in getattr(task, "point_metrics", ()) if k in window.last})
                        on_log = getattr(task, "on_log", None)  # optional: statistics reduced at log steps only
                        extra, notes = on_log(step) if on_log is not None else ({}, [])
                        averaged.update(extra)
                        throughput = window_samples / max(elapsed, 1e-9)
                        if metrics_log is not None:
                            row = {"step": step, "epoch": task.epoch(step) if hasattr(task, "epoch") else None}
                            row.update({f"lr_{n}" if n != phases[0].name else "lr": v for n, v in out.lrs.items()})
                            row.update(averaged)
                            row["throughput"] = throughput
                            metrics_log.write(row)
                        progress.update(step, throughput, averaged, out.lrs[phases[0].name])
                        for note in notes:
                            progress.message(note)
                        window = _MetricWindow()
                        window_t, window_samples = time.perf_counter(), 0
                    if preview_now:
                        self._preview(task, phases, step)
                    if ckpt_now:
                        last_ckpt = self.save_checkpoint(phases, task, step)
                    if stop_now:
                        interrupted = True
                        stop_signal = stop.signum or signal.SIGTERM  # another rank may have received it
                        progress.message(
                            f"stopped by {signal_name(stop_signal)} at step {step} of {cfg.steps}; saved {last_ckpt}; "
                            "to continue, rerun the same command with --resume auto"
                        )
                        break
        finally:
            progress.close()
            if metrics_log is not None:
                metrics_log.close()
        final_dir = None
        if not interrupted:
            self.check_finite(step)
            if last_ckpt is None or ckpt.checkpoint_dir(self.run_dir, step) != last_ckpt:
                last_ckpt = self.save_checkpoint(phases, task, step)
            if step >= cfg.steps:
                final_dir = self.run_dir / "final"
                weights = self._ema_weights(phases)
                self._preview(task, phases, step)
                if env.is_main:
                    task.save_final(final_dir, weights)
                barrier(env)
        return RunResult(step=step, interrupted=interrupted, final_dir=final_dir, last_checkpoint=last_ckpt, signal=stop_signal)

    def _preview(self, task: TrainTask, phases: list[Phase], step: int) -> None:
        # Every rank runs the forward (models may hold collectives, e.g. all-reduced codebook stats);
        # only rank 0 writes the PNG.
        grid = task.preview(step, self._ema_weights(phases) if self.emas else None)
        if grid is None or not self.env.is_main:
            return
        from vqtok.image_grid import save_image_grid

        save_image_grid(grid, self.run_dir / "previews" / f"step-{step:08d}.png")
