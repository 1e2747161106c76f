"""The training loop shared by every workload.

One optimizer step:
1. ``accumulation_steps`` micro-batches: forward under autocast, ``scaler.scale(loss / k)
   .backward()``, with DDP's ``no_sync()`` on all but the last micro-batch;
2. ``scaler.unscale_(optimizer)`` (a no-op unless fp16), optional gradient clipping;
3. the schedule sets this step's lr (and tied momentum);
4. ``preconditioner.step()`` — K-FAC, or the no-op preconditioner of the baselines;
5. ``scaler.step(optimizer)``, ``scaler.update()``, ``zero_grad``, ``task.after_optimizer_step``
   (with ``kfac.graft``, steps 4–5 go through `LayerwiseGraft.step`: the base optimizer steps on
   the plain gradients and K-FAC's direction takes each step's length);
6. with ``kfac.adaptive_damping``, on due steps: the last micro-batch's loss again (no grad)
   for K-FAC's Levenberg–Marquardt damping (`_adapt_damping`).

Losses stay on the device between log steps (no host sync per step). Evaluation, logging,
checkpoints, the target metric and stop signals are handled at step boundaries, in the same
order on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kfac_train.config import RunConfig
from kfac_train.data.base import DataBundle
from kfac_train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
)
from kfac_train.engine import sharding
from kfac_train.engine.batching import BatchPlan
from kfac_train.engine.checkpoint import (
    Checkpoint,
    CheckpointDirectory,
    Position,
    all_finite,
    build_checkpoint,
    capture_rng,
    load_checkpoint,
    model_mismatch,
    remove_stale_temporaries,
    restore_rng,
    state_tensors,
)
from kfac_train.engine.fisher import FisherSampling
from kfac_train.engine.outputs import RunOutputs
from kfac_train.engine.signals import (
    CONTINUE,
    REQUEUE,
    STOP,
    StopAgreement,
    StopRequest,
    stop_code,
)
from kfac_train.errors import UserError
from kfac_train.loggers.base import RunLogger
from kfac_train.optim.graft import LayerwiseGraft
from kfac_train.optim.preconditioner import Preconditioner
from kfac_train.schedules.controller import ScheduleController
from kfac_train.tasks.base import Task

log = logging.getLogger("kfac_train")


@dataclass
class Components:
    """Everything the loop drives, built by `kfac_train.app`."""

    config: RunConfig
    dist: DistInfo
    plan: BatchPlan
    task: Task
    data: DataBundle
    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    preconditioner: Preconditioner
    schedule: ScheduleController
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager]
    steps_per_epoch: int
    total_steps: int
    checkpoint_dir: Path
    config_yaml: str
    outputs: RunOutputs | None = None
    loggers: list[RunLogger] = field(default_factory=list)
    graft: LayerwiseGraft | None = None  # kfac.graft: K-FAC's direction, the base's step length


class Trainer:
    """Runs `Components` to `total_steps`, a target metric, or a stop signal."""

    def __init__(self, parts: Components) -> None:
        self.p = parts
        self.cfg = parts.config
        self.position = Position()
        self.stop = StopRequest()
        self.stop_code = CONTINUE  # the code all ranks agreed on (engine/signals.py)
        self._agreement = StopAgreement(self.stop, distributed=False)
        self._run_start_step = 0
        inner = getattr(parts.model, "_orig_mod", parts.model)  # under torch.compile
        self.ddp = inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None
        self.fisher = FisherSampling(parts.config.kfac, parts.preconditioner, parts.task)
        self._window_loss = torch.zeros((), device=parts.dist.device)
        self._window_logs: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._window_units = 0  # throughput units (samples or tokens) this rank trained on
        self._window_start = time.perf_counter()
        self._session_start = time.perf_counter()
        self._last_eval_step = -1
        self.last_metrics: dict[str, float] = {}
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None  # step of `last_checkpoint` (from its contents)
        self.checkpoints = CheckpointDirectory(
            parts.checkpoint_dir, parts.config.checkpoint.keep_last
        )
        self._started = False
        if parts.config.trainer.log_every < 1:
            raise UserError(
                f"trainer.log_every={parts.config.trainer.log_every} must be a positive number "
                "of steps: e.g. trainer.log_every=10"
            )

    # ----------------------------------------------------------------------------- resume
    def resume(self, setting: str | None) -> None:
        """Prepare the checkpoint directory and resume per ``checkpoint.resume`` (None, "auto"
        or a path); call once before `run`. Rank 0 chooses the checkpoint (`resume=auto` falls
        back past unreadable ones), every rank loads it; rank 0 decides the lineage."""
        p = self.p
        self._started = True
        checkpoint: Checkpoint | None = None
        outcome: tuple[str, str | None] = ("ok", None)
        if p.dist.is_main:
            try:
                for path in remove_stale_temporaries(p.checkpoint_dir):
                    log.warning("removed %s, left by a checkpoint write that was killed", path)
                checkpoint = self.checkpoints.choose_resume(setting)
                outcome = ("ok", str(checkpoint.info.path) if checkpoint else None)
            except UserError as error:
                outcome = ("error", str(error))
        kind, value = broadcast_object(outcome)
        if kind == "error":
            raise UserError(str(value))
        if value is not None:
            if checkpoint is None:  # ranks other than 0
                checkpoint = load_checkpoint(Path(value))
            self.resume_from(checkpoint)
        if p.dist.is_main:
            self._message(self.checkpoints.adopt(checkpoint.info if checkpoint else None))

    def resume_from(self, checkpoint: Checkpoint | Path) -> None:
        """Restore model, optimizer, preconditioner, scaler, RNG and data position.

        An SGD checkpoint in a K-FAC run restores everything but K-FAC, whose statistics start
        fresh (a warning says so); a K-FAC checkpoint in a run without K-FAC drops its K-FAC
        state. Everything else that does not fit is a one-line `UserError`.
        """
        p = self.p
        if isinstance(checkpoint, Path):
            checkpoint = load_checkpoint(checkpoint)
        info, path = checkpoint.info, checkpoint.info.path
        problem = model_mismatch(p.module.state_dict(), checkpoint.model)  # DTensors: full shapes
        if problem:
            raise UserError(
                f"checkpoint {path} does not fit model={self.cfg.model.name}: {problem}; resume "
                "with the model settings it was written with"
            )
        sharding.load_model_state(p.module, checkpoint.model)  # FSDP: shards a full dict
        base = self.cfg.optim.base
        if info.optimizer is not None and info.optimizer != base:
            raise UserError(
                f"checkpoint {path} was written with optim.base={info.optimizer}, this run uses "
                f"optim.base={base}: resume with optim.base={info.optimizer}"
            )
        try:
            sharding.load_optimizer_state(p.module, p.optimizer, checkpoint.optimizer)
        except (RuntimeError, ValueError, KeyError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(
                f"checkpoint {path}: its optimizer state does not fit optim.base={base} ({first})"
            ) from error
        kind = self.cfg.optim.preconditioner
        if info.preconditioner == kind:
            try:
                p.preconditioner.load_state_dict(checkpoint.preconditioner)
            except (ValueError, KeyError) as error:
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise UserError(
                    f"checkpoint {path}: its K-FAC state does not fit this run ({first}); "
                    "resume with the kfac.* settings it was written with"
                ) from error
        elif kind == "kfac":
            log.warning(
                "checkpoint %s was written without K-FAC: model and optimizer restored, K-FAC "
                "statistics start fresh",
                path,
            )
        else:
            log.warning("checkpoint %s holds K-FAC state; this run has none: it is dropped", path)
        if p.scaler.is_enabled():
            if checkpoint.scaler:
                p.scaler.load_state_dict(checkpoint.scaler)
            else:
                log.warning("checkpoint %s has no fp16 loss scale: it starts afresh", path)
        self.position = checkpoint.position
        rng_states = checkpoint.rng
        if len(rng_states) != self.p.dist.world_size:
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: random streams differ",
                path,
                len(rng_states),
                self.p.dist.world_size,
            )
        restore_rng(rng_states[self.p.dist.rank % len(rng_states)])
        self.last_checkpoint = path
        self.saved_step = info.step
        if self.p.outputs is not None:
            self.p.outputs.truncate_after(self.position.step)
        self._message(f"resumed from {path} at step {self.position.step}")

    # ----------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        if not self._started:
            self.resume(None)
        p = self.p
        micro_per_epoch = len(p.data.train)
        status = "completed"
        start = time.perf_counter() - self.position.elapsed
        self._window_start = self._session_start = time.perf_counter()
        self._run_start_step = self.position.step
        agreement = StopAgreement(self.stop, p.dist.is_distributed)
        with self.stop, contextlib.closing(agreement):
            self._agreement = agreement
            while self.position.step < p.total_steps and status == "completed":
                p.data.train.set_epoch(self.position.epoch, self.position.batches)
                batches: Iterator[Any] = iter(p.data.train)
                while self.position.step < p.total_steps:
                    micro_batches = list(islice(batches, p.plan.accumulation_steps))
                    if len(micro_batches) < p.plan.accumulation_steps:
                        self._next_epoch()
                        break
                    self._train_step(micro_batches)
                    epoch_done = self.position.batches + p.plan.accumulation_steps > micro_per_epoch
                    if epoch_done:
                        self._next_epoch()
                    self.position.elapsed = time.perf_counter() - start
                    status = self._after_step(epoch_done, start)
                    if status != "completed" or epoch_done:
                        break
        if status == "completed" and self._last_eval_step != self.position.step:
            self._evaluate(start)
        self.position.elapsed = time.perf_counter() - start
        unsaved = self.saved_step != self.position.step
        if status == "preempted" or (self.cfg.checkpoint.at_end and unsaved):
            self._save_checkpoint()
        return self._summary(status)

    def _next_epoch(self) -> None:
        self.position.epoch += 1
        self.position.batches = 0

    def _train_step(self, micro_batches: list[Any]) -> None:
        p = self.p
        p.model.train()
        k = p.plan.accumulation_steps
        for index, batch in enumerate(micro_batches):
            batch = p.task.move_batch(batch, p.dist.device)
            sync = (
                self.ddp.no_sync()
                if index < k - 1 and self.ddp is not None
                else contextlib.nullcontext()
            )
            with sync:
                with p.autocast(), self.fisher.recording():
                    out = p.task.training_loss(p.model, batch)
                self.fisher.add_output_grads(out, batch, lambda loss: p.scaler.scale(loss / k))
                p.scaler.scale(out.loss / k).backward()
            self._window_loss += out.loss.detach().float() / k
            self._window_units += p.task.throughput_count(batch)
            for name, value in out.logs.items():
                value = value.detach().float() / k
                self._window_logs[name] = self._window_logs.get(name, 0) + value
        p.scaler.unscale_(p.optimizer)
        if self.cfg.optim.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(p.module.parameters(), self.cfg.optim.grad_clip_norm)
        p.schedule.apply(self.position.step)
        if p.graft is None:
            p.preconditioner.step()
            p.scaler.step(p.optimizer)
        else:
            p.graft.step(p.preconditioner.step, lambda: p.scaler.step(p.optimizer))
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        p.task.after_optimizer_step(p.module)
        if p.preconditioner.adaptive_damping_due():
            self._adapt_damping(batch, out.loss.detach())
        self.position.step += 1
        self.position.batches += k
        self.position.samples += p.plan.global_batch
        self._window_steps += 1

    def _adapt_damping(self, batch: Any, loss_before: torch.Tensor) -> None:
        """Levenberg–Marquardt damping (``kfac.adaptive_damping``, on due steps only): the loss
        of the step's last micro-batch (already on the device) is evaluated again after the
        update — train mode, same autocast, no grad — and K-FAC compares the change with its
        quadratic model (all ranks average the losses). Buffers (BatchNorm running statistics)
        are restored, so the extra forward changes nothing but the damping (and RNG draws)."""
        p = self.p
        with torch.no_grad():
            buffers = [b.clone() for b in p.module.buffers()]
            with p.autocast():
                loss_after = p.task.training_loss(p.model, batch).loss.detach()
            for buffer, saved in zip(p.module.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        p.preconditioner.update_damping(loss_before.float(), loss_after.float())

    def _after_step(self, epoch_done: bool, start: float) -> str:
        """Logging, evaluation, target, checkpoint and signal handling; returns the status."""
        p, step = self.p, self.position.step
        for logger in p.loggers:
            logger.on_step(step)
        if step % self.cfg.trainer.log_every == 0 or step == p.total_steps:
            self._log_train()
        every = self.cfg.trainer.eval_every
        status = "completed"
        due = (every > 0 and step % every == 0) or (every == 0 and epoch_done)
        if (due or step == p.total_steps) and self._evaluate(start):
            status = "target_reached"
        if self._stop_requested(step):
            status = "preempted"
            self._message(f"stop signal received: checkpointing at step {step} and exiting")
        elif self.cfg.checkpoint.every > 0 and step % self.cfg.checkpoint.every == 0:
            self.position.elapsed = time.perf_counter() - start
            self._save_checkpoint()
        return status

    def _stop_requested(self, step: int) -> bool:
        """Whether a rank received a stop signal; all ranks agree, so all stop together.

        Polled at every step: one process reads its own flag, ranks read the non-blocking
        all-reduce started at the previous step (`StopAgreement`), so a signal is acted on within
        two steps whatever `trainer.log_every` is.
        """
        self.stop_code = self._agreement.poll()
        return self.stop_code != CONTINUE

    @property
    def requeue_signal(self) -> int | None:
        """The time-limit signal (USR1/USR2) the run stopped on, to requeue after; else None.

        The signal this rank received, or SIGUSR1 when only other ranks had received one.
        """
        if self.stop_code != REQUEUE:
            return None
        local = self.stop.signal_number
        return local if local is not None and stop_code(local) == REQUEUE else signal.SIGUSR1

    # ----------------------------------------------------------------------------- logging
    def _epoch_float(self) -> float:
        micro_per_epoch = len(self.p.data.train)
        return self.position.epoch + self.position.batches / max(1, micro_per_epoch)

    def _log_train(self) -> None:
        if self._window_steps == 0:
            return
        p = self.p
        names = sorted(self._window_logs)
        window = torch.stack([self._window_loss, *(self._window_logs[n] for n in names)])
        window = all_reduce_sum(window) / (p.dist.world_size * self._window_steps)
        values = window.tolist()
        loss = values[0]
        self.last_loss = loss
        if not math.isfinite(loss):
            raise UserError(
                f"training diverged: the loss is {loss} at step {self.position.step}; "
                "lower optim.lr (or raise kfac.damping)"
            )
        now = time.perf_counter()
        window_time = now - self._window_start
        record: dict[str, Any] = {
            "kind": "train",
            "step": self.position.step,
            "total_steps": p.total_steps,
            "epoch": self._epoch_float(),
            "samples": self.position.samples,
            "lr": p.schedule.lr,
            "loss": loss,
            "metrics": dict(zip(names, values[1:], strict=True)),
            "step_time": window_time / self._window_steps,
            **self._speed(window_time, now),
        }
        comm, memory = p.preconditioner.comm_bytes(), p.preconditioner.memory_bytes()
        if comm.get("total") or memory:
            record["kfac"] = {
                "comm_bytes_step": sum(comm.get("step", {}).values()),
                "comm_bytes_total": sum(comm.get("total", {}).values()),
                "comm_bytes": comm.get("total", {}),
                "memory_bytes": memory,
                **self._statistics_fraction(),
            }
            damping = getattr(p.preconditioner, "current_damping", None)
            if damping is not None:
                record["kfac"]["damping"] = damping()
            kl_clip = getattr(p.preconditioner, "kl_clip_summary", None)
            if kl_clip is not None:  # ν over the window's steps: mean, share scaled down
                record["kfac"].update(kl_clip())
        self._emit(record)
        self._window_loss = torch.zeros((), device=p.dist.device)
        self._window_logs = {}
        self._window_steps = 0
        self._window_units = 0
        self._window_start = time.perf_counter()

    def _speed(self, window_time: float, now: float) -> dict[str, float]:
        """Throughput over the log window (all ranks), peak GPU memory and time to the end.

        ``<unit>_per_s``: samples/s (tokens/s for masked LM, `Task.throughput_unit`), every
        rank counted (equal shards); ``peak_memory_gib``: this rank's peak of allocated CUDA
        memory since the start (CUDA only); ``eta_s``: remaining steps times this session's
        mean step time (evaluations included).
        """
        p = self.p
        units = self._window_units * p.dist.world_size
        speed = {f"{p.task.throughput_unit}_per_s": units / max(window_time, 1e-9)}
        if p.dist.device.type == "cuda":
            speed["peak_memory_gib"] = torch.cuda.max_memory_allocated(p.dist.device) / 2**30
        done = self.position.step - self._run_start_step
        if done > 0:
            remaining = p.total_steps - self.position.step
            speed["eta_s"] = remaining * (now - self._session_start) / done
        return speed

    def _emit(self, record: dict[str, Any]) -> None:
        if self.p.outputs is not None:
            self.p.outputs.append_metrics(record)
        for logger in self.p.loggers:
            logger.log(record)

    def _message(self, text: str) -> None:
        for logger in self.p.loggers:
            logger.message(text)
        if not self.p.loggers and self.p.dist.is_main:
            log.info(text)

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics of the task's evaluator over the whole evaluation set (every rank)."""
        p = self.p
        assert p.data.eval is not None
        broadcast_buffers(p.module)
        sharding.unshard_for_eval(p.module)  # FSDP: ranks may run different numbers of batches
        p.module.eval()
        evaluator = p.task.evaluator()
        for batch in p.data.eval:
            batch = p.task.move_batch(batch, p.dist.device)
            with p.autocast():
                evaluator.update(p.module, batch)
        metrics = evaluator.compute()
        sharding.reshard_after_eval(p.module)
        p.module.train()
        return metrics

    def _evaluate(self, start: float) -> bool:
        """Evaluate, log, check the target; True when the target metric was reached now."""
        if self.p.data.eval is None:
            return False
        started = time.perf_counter()
        metrics = self.evaluate()
        self._last_eval_step = self.position.step
        self.last_metrics = metrics
        self._emit(
            {
                "kind": "eval",
                "step": self.position.step,
                "epoch": self._epoch_float(),
                "samples": self.position.samples,
                "metrics": metrics,
                "eval_time": time.perf_counter() - started,
            }
        )
        return self._check_target(metrics, start)

    def _check_target(self, metrics: dict[str, float], start: float) -> bool:
        trainer = self.cfg.trainer
        if trainer.target_metric is None or self.position.target is not None:
            return False
        if trainer.target_metric not in metrics:
            raise UserError(
                f"trainer.target_metric={trainer.target_metric} is not an evaluation metric of "
                f"task={self.cfg.task.name}; choose one of: {', '.join(sorted(metrics))}"
            )
        if trainer.target_value is None:
            raise UserError("trainer.target_metric is set but trainer.target_value is not")
        value = metrics[trainer.target_metric]
        reached = (
            value >= trainer.target_value
            if trainer.target_mode == "max"
            else (value <= trainer.target_value)
        )
        if not reached:
            return False
        self.position.target = {
            "metric": trainer.target_metric,
            "value": value,
            "target": trainer.target_value,
            "steps": self.position.step,
            "epochs": self._epoch_float(),
            "samples": self.position.samples,
            "time": time.perf_counter() - start,
        }
        self._message(
            f"target {trainer.target_metric} {trainer.target_mode} {trainer.target_value} reached "
            f"at step {self.position.step} ({value:.4f})"
        )
        return True

    # ----------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> None:
        """Collective: every rank contributes its RNG state and K-FAC state; rank 0 writes.

        Refuses (a one-line `UserError` on every rank) when a weight or optimizer state is not
        finite, so a diverged run never writes, nor prunes good checkpoints for, a NaN one.
        """
        p = self.p
        model_state = sharding.model_state(p.module)  # full state dicts (collectives under FSDP)
        optimizer_state = sharding.optimizer_state(p.module, p.optimizer)
        finite = all_finite([*model_state.values(), *state_tensors(optimizer_state["state"])])
        if all_reduce_max(0.0 if finite else 1.0) > 0:
            raise UserError(
                f"training diverged: non-finite weights at step {self.position.step}, no "
                f"checkpoint written (last good one: {self.last_checkpoint or 'none'}); lower "
                "optim.lr (or raise kfac.damping)"
            )
        preconditioner_state = p.preconditioner.state_dict()
        rng_states = all_gather_objects(capture_rng())
        written = None
        if p.dist.is_main:
            state = build_checkpoint(
                model=model_state,
                optimizer=optimizer_state,
                preconditioner=preconditioner_state,
                scaler=p.scaler.state_dict(),
                position=self.position,
                rng=rng_states,
                lineage=self.checkpoints.lineage,
                parent=self.checkpoints.parent,
                preconditioner_kind=self.cfg.optim.preconditioner,
                optimizer_name=self.cfg.optim.base,
                config_yaml=p.config_yaml,
            )
            written = str(self.checkpoints.write(state, self.position.step))
            self._message(f"checkpoint saved: {written}")
        self.last_checkpoint = Path(broadcast_object(written))  # also waits for the write
        self.saved_step = self.position.step

    def replicas_agree(self) -> bool:
        """Whether every rank holds bitwise the same parameters (always True for one process).

        Compares per-parameter (sum, sum of squares) in float64 across ranks; a difference
        means the replicas diverged (a bug), which is logged. Buffers such as BatchNorm running
        statistics are local to each rank between DDP's broadcasts and are not compared.
        """
        if not self.p.dist.is_distributed:
            return True
        with torch.no_grad():
            fingerprint = [
                (float(t.double().sum()), float(t.double().square().sum()))
                for t in sharding.full_parameters(self.p.module)  # gathered under FSDP
            ]
        everyone = all_gather_objects(fingerprint)
        agree = all(other == everyone[0] for other in everyone[1:])
        if not agree:
            log.error("model replicas differ across ranks at step %d", self.position.step)
        return agree

    # ----------------------------------------------------------------------------- summary
    def _summary(self, status: str) -> dict[str, Any]:
        p = self.p
        if self._window_steps:
            self._log_train()
        summary: dict[str, Any] = {
            "status": status,
            "replicas_agree": self.replicas_agree(),
            "steps": self.position.step,
            "total_steps": p.total_steps,
            "epochs": self._epoch_float(),
            "samples": self.position.samples,
            "train_time": self.position.elapsed,
            "final_loss": self.last_loss,
            "metrics": self.last_metrics,
            "target": self.position.target,
            "global_batch": p.plan.global_batch,
            "micro_batch": p.plan.micro_batch,
            "accumulation_steps": p.plan.accumulation_steps,
            "world_size": p.dist.world_size,
            "steps_per_epoch": p.steps_per_epoch,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "stop_request": {CONTINUE: None, REQUEUE: "requeue", STOP: "stop"}[self.stop_code],
        }
        memory = p.preconditioner.memory_bytes(transient=True)  # + the peak a step allocates
        comm = p.preconditioner.comm_bytes().get("total", {})
        if memory or comm:
            summary["kfac"] = {
                "memory_bytes": memory,
                "comm_bytes_total": comm,
                **self._statistics_fraction(),
            }
        return summary

    def _statistics_fraction(self) -> dict[str, float]:
        """K-FAC's ``statistics_fraction`` (stale statistics, docs/kfac.md); {} for baselines."""
        fraction = getattr(self.p.preconditioner, "statistics_fraction", None)
        return {} if fraction is None else {"statistics_fraction": fraction}
