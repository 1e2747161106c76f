"""``KFACPreconditioner``: the constructor, the step's phases and reporting (the phases' own
modules: capture, reduction, placement, precondition_phase, state; map in docs/kfac.md)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import state as checkpoint
from .assignment import WorkPlan, plan_work, resolve_grad_worker_fraction
from .async_inverse import STATE_KEY, AsyncSecondOrder
from .auto_strategy import auto_grad_worker_fraction
from .batched import StackedPreconditioner
from .capture import StatisticsCapture, register_blocks
from .comm import make_communicator
from .damping import AdaptiveDamping, DampingMixin, make_controller, report_swamped
from .diagnostics import RateLimitedWarner
from .hyperparams import DEFAULT_DAMPING, Scheduled, check_choices, is_due, resolve
from .layers import HandlerOptions
from .memory import memory_bytes, summary
from .placement import broadcast_preconditioned, update_second_order
from .precision import check_dtypes
from .precondition_phase import KLClipMonitor, kl_scale, precondition_all
from .reduction import FactorReduction
from .second_order import EIGEN
from .sharded import ShardedGrads
from .stale import DEFAULT_THRESHOLD


class KFACPreconditioner(DampingMixin):
    """Distributed K-FAC gradient preconditioner (conventions: ``docs/kfac.md``).

    Use next to any optimizer: ``loss.backward(); pre.step(); optimizer.step()``. After
    :meth:`step` the ``.grad`` of each registered layer's weight and bias holds the preconditioned
    gradient; every other parameter keeps its plain gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_update_steps: Scheduled[int] = 1,
        inv_update_steps: Scheduled[int] = 1,
        damping: Scheduled[float] = DEFAULT_DAMPING,
        factor_decay: Scheduled[float] = 0.95,
        kl_clip: Scheduled[float] | None = 0.001,
        lr: Scheduled[float] = 0.1,
        compute_method: str = EIGEN,
        factored_damping: bool = False,
        accumulation_steps: int = 1,
        grad_scaler: torch.amp.GradScaler | Callable[[], float] | None = None,
        factor_dtype: torch.dtype = torch.float32,
        inv_dtype: torch.dtype = torch.float32,
        precondition_dtype: torch.dtype | None = None,
        skip_layers: Sequence[str] = (),
        grad_scaling: str = "per_example",
        batchnorm: str = "skip",
        embedding: str = "skip",
        layernorm: str = "skip",
        conv_factor: str = "patches",
        grad_worker_fraction: float | str = 1.0,
        memory_budget_bytes: int | None = None,
        bucket_cap_mb: float = 25.0,
        symmetry_aware: bool = False,
        comm_dtype: torch.dtype | None = None,
        colocate_factors: bool = True,
        assignment_cost: str = "compute",
        overlap_comm: bool = True,
        stale: str = "off",
        stale_threshold: float = DEFAULT_THRESHOLD,
        process_group: dist.ProcessGroup | None = None,
        adaptive_damping: AdaptiveDamping | None = None,
        async_inverse: bool = False,
        async_delay: int = 1,
    ) -> None:
        check_choices(
            compute_method=compute_method,
            grad_scaling=grad_scaling,
            conv_factor=conv_factor,
            batchnorm=batchnorm,
            embedding=embedding,
            layernorm=layernorm,
            accumulation_steps=accumulation_steps,
            bucket_cap_mb=bucket_cap_mb,
        )
        dtypes = (factor_dtype, inv_dtype, comm_dtype, precondition_dtype)
        comm_dtype = check_dtypes(*dtypes, compute_method, factored_damping)

        self.factor_update_steps, self.inv_update_steps = factor_update_steps, inv_update_steps
        self.damping, self.factor_decay = damping, factor_decay
        self.kl_clip = kl_clip
        self.lr = lr
        self.compute_method = compute_method
        self.warner = RateLimitedWarner()

        self.comm = make_communicator(process_group)
        options = HandlerOptions(
            factor_dtype=factor_dtype,
            inv_dtype=inv_dtype,
            precondition_dtype=precondition_dtype,
            compute_method=compute_method,
            factored_damping=factored_damping,
            conv_factor=conv_factor,
            batchnorm=batchnorm,
            embedding=embedding,
            layernorm=layernorm,
            world_size=self.comm.world_size,
            grad_scaling=grad_scaling,
            warner=self.warner,
            grads=ShardedGrads(),  # FSDP2 DTensor gradients gathered; plain ones as they are
        )
        #: Every registered block in model order: Kronecker layers and unit-wise norm layers.
        self.blocks = register_blocks(model, skip_layers, options)
        sections = checkpoint.by_section(self.blocks)
        self.layers, self.batchnorm_layers = sections["layers"], sections["batchnorm"]
        if not self.blocks:
            warnings.warn(
                "K-FAC: no layers were registered; step() leaves gradients as is", stacklevel=2
            )
        if isinstance(grad_worker_fraction, str) and grad_worker_fraction.lower() == "auto":
            grad_worker_fraction = auto_grad_worker_fraction(
                self.blocks,
                self.comm,
                memory_budget_bytes,
                factor_update_steps=int(resolve(factor_update_steps, 0)),
                inv_update_steps=int(resolve(inv_update_steps, 0)),
                compute_method=compute_method,
                factor_dtype=factor_dtype,
                inv_dtype=inv_dtype,
                comm_dtype=comm_dtype,
                symmetry_aware=symmetry_aware,
                colocate_factors=colocate_factors,
                assignment_cost=assignment_cost,
                stale_history=stale == "adaptive",
            )
        self.grad_worker_fraction = resolve_grad_worker_fraction(
            grad_worker_fraction, self.comm.world_size
        )
        self._planned = {n: b for n, b in self.blocks.items() if not b.replicated}
        self.plan: WorkPlan = plan_work(
            [block.shape for block in self._planned.values()],
            self.comm.world_size,
            self.grad_worker_fraction,
            colocate_factors=colocate_factors,
            cost=assignment_cost,
        )
        self.comm.setup_groups(self.plan.column_groups() + self.plan.row_groups())
        self.reduction = FactorReduction(
            self.blocks,
            self.comm,
            overlap_comm=overlap_comm,
            bucket_cap_bytes=int(bucket_cap_mb * 2**20),
            symmetry_aware=symmetry_aware,
            comm_dtype=comm_dtype,
            stale=stale,
            stale_threshold=stale_threshold,
        )
        self.capture = StatisticsCapture(
            self.blocks,
            accumulation_steps=accumulation_steps,
            grad_scaling=grad_scaling,
            grad_scaler=grad_scaler,
            on_complete=self.reduction.on_complete,
        )
        self.steps = 0
        self._refresh_factors = self._refresh_second_order = False
        self._arm()
        self.kl_monitor = KLClipMonitor(self.reduction.dropped.device)  # ν of every step
        self.adaptive = make_controller(adaptive_damping, resolve(damping, 0))  # or None
        self._stacker = StackedPreconditioner()
        #: async_inverse: data of inverse-update step t computed aside, installed at t + delay
        self.async_ = AsyncSecondOrder(
            self.blocks, self.plan, self.comm, async_delay, async_inverse
        )

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def remove_hooks(self) -> None:
        """Detach every hook from the model (the preconditioner stops collecting statistics)."""
        self.capture.remove()

    def _arm(self) -> None:  # before the next forward: collect statistics? which (.stale)?
        due = is_due(self.factor_update_steps, self.steps, "factor_update_steps")
        self.reduction.prepare(collecting=self._refresh_factors or due, capture=self.capture)

    @property
    def statistics_fraction(self) -> float:  # refreshes computed / all at every factor step
        return self.reduction.schedule.fraction

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """Precondition the gradients in place. Phases (``P`` ranks, ``m`` gradient workers):
        1. *reduce factors* on factor-update steps (:mod:`.reduction`: bucketed all-reduces,
        folded into the running averages; stale statistics skipped, :mod:`.stale`); 2.
        *second-order data* on inverse-update steps: each layer's owner decomposes or inverts
        and broadcasts to its other gradient workers (none under MEM-OPT), replicated blocks on
        every rank; 3. *precondition* on the gradient workers; 4. *broadcast gradients* when
        ``m < P`` (none under COMM-OPT); 5. *clip and write* (KL-clip ν). A block without a
        gradient on a rank counts as zero (same collectives everywhere; ``.grad`` stays None)."""
        step = self.steps
        if self.capture.collecting:
            self.reduction.reduce(float(resolve(self.factor_decay, step)), step)
            self._refresh_factors = False
        self.async_.apply_due(step)
        if self._refresh_second_order or is_due(self.inv_update_steps, step, "inv_update_steps"):
            self._update_second_order(self.current_damping(step), step)
        grads = {name: block.grad() for name, block in self.blocks.items()}
        preconditioned = precondition_all(self.blocks, grads, self._holds, self._stacker)
        broadcast_preconditioned(self.plan, self.comm, self._planned, preconditioned)
        self._clip_and_write(preconditioned, grads, step)
        self._record_quadratic_model(step, grads, preconditioned)
        self.steps += 1
        self._arm()
        self.comm.stats.end_step()

    def _update_second_order(self, damping: float, step: int) -> None:
        self.reduction.warn_dropped()  # inverse-update steps synchronise anyway
        if self.async_.enabled and not self._refresh_second_order:
            self.async_.launch(step, damping)
        else:  # synchronous; also the refresh after loading a checkpoint without this data
            update_second_order(self.blocks, self.plan, self.comm, damping)
        report_swamped(self.warner)  # one read for all layers (async: the last install's)
        self._refresh_second_order = False

    def _holds(self, name: str) -> bool:
        """Whether this rank preconditions block ``name`` (a gradient worker, or replicated)."""
        return self.blocks[name].replicated or self.plan.is_grad_worker(name, self.comm.rank)

    def _clip_and_write(
        self,
        preconditioned: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor | None],
        step: int,
    ) -> None:
        present = {name: grad for name, grad in grads.items() if grad is not None}
        if not present:
            return
        lr, kl_clip = float(resolve(self.lr, step)), resolve(self.kl_clip, step)
        scale = kl_scale(preconditioned, present, kl_clip, lr, self.kl_monitor.last.device)
        self.kl_monitor.add(scale)
        for name in present:
            V = preconditioned[name]
            self.blocks[name].write_grad(V * scale.to(V.dtype))

    # ------------------------------------------------------------------ state (see .state)
    def state_dict(self, include_factors: bool = True) -> dict[str, Any]:
        """Step counter, factors and second-order data, gathered on rank 0 (a collective in
        distributed runs: every rank must call it; only rank 0's result is complete)."""
        state = (
            checkpoint.state_dict(
                self.blocks,
                self.plan,
                self.comm,
                steps=self.steps,
                compute_method=self.compute_method,
                include_factors=include_factors,
                schedule=self.reduction.schedule,
            )
            | self._damping_state()
        )
        if self.async_.pending:
            state[STATE_KEY] = self.async_.state_dict()  # pending snapshots: see .async_inverse
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (from any world size and strategy)."""
        steps, refresh_factors, refresh_second_order = checkpoint.load_state_dict(
            self.blocks, self.plan, self.comm, state, self.reduction.schedule
        )
        self.steps = steps
        self._load_damping_state(state)
        self.async_.load_state_dict(state.get(STATE_KEY, []))
        self._refresh_factors |= refresh_factors
        self._refresh_second_order |= refresh_second_order
        self._arm()

    # ------------------------------------------------------------------ reporting
    def comm_bytes(self) -> dict[str, dict[str, int]]:
        """Payload bytes by kind (``factor_allreduce``, ``second_order_broadcast``,
        ``grad_broadcast``) for the last step and in total, as seen by this rank."""
        return self.comm.stats.as_dict()

    def memory_bytes(self, transient: bool = False) -> dict[str, int]:
        """K-FAC bytes on this rank (:mod:`.memory`): persistent ``factors``, ``second_order``
        (and ``stale_history`` if ``stale="adaptive"``); ``transient=True`` adds
        ``transient_peak``, the most a step allocates on top. Size a job by the sum."""
        figures = memory_bytes(self)
        return figures if transient else {k: v for k, v in figures.items() if k != "transient_peak"}

    def summary(self) -> str:
        """A table of the registered layers with their factor shapes and bytes."""
        return summary(self)
