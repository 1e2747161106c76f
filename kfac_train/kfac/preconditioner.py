"""``KFACPreconditioner``: hooks, the step, and the distributed schedule (KAISA)."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .assignment import WorkPlan, plan_work, resolve_grad_worker_fraction
from .batchnorm import UnitWiseBatchNorm, normalised_input
from .bucketing import FactorAllReducer
from .comm import (
    FACTOR_ALLREDUCE,
    GRAD_BROADCAST,
    SECOND_ORDER_BROADCAST,
    Pending,
    flatten,
    make_communicator,
    unflatten_into,
)
from .hyperparams import Scheduled, is_due, resolve
from .kfac_layer import COMPUTE_METHODS, EIGEN, KFACLayer
from .layers import Conv2dHandler, Conv2dSpatialMeanHandler, handler_for
from .linalg import eigen_reciprocal
from .memory_model import choose_grad_worker_fraction, format_candidates
from .precision import check_dtypes, factor_storage_dtype

logger = logging.getLogger(__name__)

GRAD_SCALINGS = ("mean", "per_example")
CONV_FACTORS = ("patches", "spatial_mean")
BATCHNORM_MODES = ("skip", "unit_wise")
_SECOND_ORDER_KEYS = {EIGEN: ("Q_A", "Q_G", "recip"), "inverse": ("A_inv", "G_inv")}


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Factors are formed in ``factor_dtype``, never in an autocast dtype."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class KFACPreconditioner:
    """Distributed K-FAC gradient preconditioner (conventions: ``docs/kfac.md``).

    Use next to any optimizer: ``loss.backward(); pre.step(); optimizer.step()``. After
    :meth:`step` the ``.grad`` of each registered layer's weight and bias holds the preconditioned
    gradient; every other parameter keeps its plain gradient.

    Hooks: on steps that update factors, a forward hook adds each micro-batch's input statistic to
    ``A`` and a hook on the layer output adds the output-gradient statistic to ``G``. Forwards in
    ``eval()`` mode or without grad, and all forwards of other steps, are not touched.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_update_steps: Scheduled[int] = 1,
        inv_update_steps: Scheduled[int] = 1,
        damping: Scheduled[float] = 0.001,
        factor_decay: Scheduled[float] = 0.95,
        kl_clip: Scheduled[float] | None = 0.001,
        lr: Scheduled[float] = 0.1,
        compute_method: str = EIGEN,
        factored_damping: bool = False,
        accumulation_steps: int = 1,
        grad_scaler: torch.amp.GradScaler | Callable[[], float] | None = None,
        factor_dtype: torch.dtype = torch.float32,
        inv_dtype: torch.dtype = torch.float32,
        skip_layers: Sequence[str] = (),
        grad_scaling: str = "mean",
        batchnorm: str = "skip",
        conv_factor: str = "patches",
        grad_worker_fraction: float | str = 1.0,
        memory_budget_bytes: int | None = None,
        bucket_cap_mb: float = 25.0,
        symmetry_aware: bool = False,
        comm_dtype: torch.dtype | None = None,
        colocate_factors: bool = True,
        assignment_cost: str = "compute",
        overlap_comm: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if compute_method not in COMPUTE_METHODS:
            raise ValueError(
                f"compute_method must be one of {COMPUTE_METHODS}, got {compute_method!r}"
            )
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(
                f"accumulation_steps must be a positive int, got {accumulation_steps!r}"
            )
        if grad_scaling not in GRAD_SCALINGS:
            raise ValueError(f"grad_scaling must be one of {GRAD_SCALINGS}, got {grad_scaling!r}")
        if conv_factor not in CONV_FACTORS:
            raise ValueError(f"conv_factor must be one of {CONV_FACTORS}, got {conv_factor!r}")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        comm_dtype = check_dtypes(
            factor_dtype, inv_dtype, comm_dtype, compute_method, factored_damping
        )
        if isinstance(skip_layers, str):
            skip_layers = (skip_layers,)

        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.damping = damping
        self.factor_decay = factor_decay
        self.kl_clip = kl_clip
        self.lr = lr
        self.compute_method = compute_method
        self.factored_damping = factored_damping
        self.accumulation_steps = accumulation_steps
        self.grad_scaler = grad_scaler
        self.grad_scaling = grad_scaling
        self.overlap_comm = overlap_comm

        self.layers: dict[str, KFACLayer] = {}
        self._by_module: dict[nn.Module, KFACLayer] = {}
        self.batchnorm_layers: dict[str, UnitWiseBatchNorm] = {}
        self._bn_by_module: dict[nn.Module, UnitWiseBatchNorm] = {}
        self._hook_handles: list[Any] = []
        patterns = [re.compile(p) for p in skip_layers]
        self._conv_handler = Conv2dSpatialMeanHandler() if conv_factor == "spatial_mean" else None
        self._register(model, patterns, factor_dtype, inv_dtype)
        if batchnorm == "unit_wise":
            self._register_batchnorm(model, patterns, factor_dtype)
        if not self.layers and not self.batchnorm_layers:
            warnings.warn(
                "K-FAC: no layers were registered; step() leaves gradients as they are",
                stacklevel=2,
            )

        self.comm = make_communicator(process_group)
        if isinstance(grad_worker_fraction, str) and grad_worker_fraction.lower() == "auto":
            grad_worker_fraction = self._auto_fraction(
                memory_budget_bytes,
                compute_method=compute_method,
                factor_dtype=factor_dtype,
                inv_dtype=inv_dtype,
                comm_dtype=comm_dtype,
                symmetry_aware=symmetry_aware,
                colocate_factors=colocate_factors,
                assignment_cost=assignment_cost,
            )
        self.grad_worker_fraction = resolve_grad_worker_fraction(
            grad_worker_fraction, self.comm.world_size
        )
        self.plan: WorkPlan = plan_work(
            [layer.shape for layer in self.layers.values()],
            self.comm.world_size,
            self.grad_worker_fraction,
            colocate_factors=colocate_factors,
            cost=assignment_cost,
        )
        self.comm.setup_groups(self.plan.column_groups() + self.plan.row_groups())
        self._reducer: FactorAllReducer | None = None
        if self.comm.world_size > 1:
            self._reducer = FactorAllReducer(
                self.comm,
                [(n, (layer.shape.a, layer.shape.g)) for n, layer in reversed(self.layers.items())],
                bucket_cap_bytes=int(bucket_cap_mb * 2**20),
                symmetry_aware=symmetry_aware,
                comm_dtype=comm_dtype,
            )

        self.steps = 0
        self._calls_per_step: dict[str, int] | None = None
        self._sent_early: dict[str, int] = {}
        self._force_factor_update = False
        self._force_second_order = False
        self._collecting = self._factor_update_due(0)
        device = next(iter(self.layers.values())).A.running.device if self.layers else None
        self._dropped = torch.zeros((), dtype=torch.int64, device=device)
        self.last_kl_scale = torch.ones((), device=device)

    def _auto_fraction(self, memory_budget_bytes: int | None, **options: Any) -> float:
        """``grad_worker_fraction="auto"``: the least-traffic fraction within the budget
        (:func:`memory_model.choose_grad_worker_fraction`); logs the candidates."""
        if memory_budget_bytes is None or memory_budget_bytes <= 0:
            raise ValueError(
                'grad_worker_fraction="auto" needs memory_budget_bytes > 0 (K-FAC state per rank)'
            )
        intervals = {
            "factor_update_steps": int(resolve(self.factor_update_steps, 0)),
            "inv_update_steps": int(resolve(self.inv_update_steps, 0)),
        }
        layers = list(self.layers.values())
        chosen, candidates = choose_grad_worker_fraction(
            [layer.shape for layer in layers],
            self.comm.world_size,
            memory_budget_bytes,
            grad_dtype=layers[0].module.weight.dtype if layers else torch.float32,
            batchnorm_channels=[bn.module.num_features for bn in self.batchnorm_layers.values()],
            **intervals,
            **options,
        )
        if self.comm.rank == 0:
            logger.info(format_candidates(candidates, chosen, memory_budget_bytes, **intervals))
        return chosen.fraction

    # ------------------------------------------------------------------ registration
    def _register(
        self,
        model: nn.Module,
        patterns: list[re.Pattern[str]],
        factor_dtype: torch.dtype,
        inv_dtype: torch.dtype,
    ) -> None:
        root = model.module if isinstance(model, DistributedDataParallel) else model
        for name, module in root.named_modules():
            handler = handler_for(module)
            if handler is None:
                continue
            if self._conv_handler is not None and isinstance(handler, Conv2dHandler):
                handler = self._conv_handler
            kind = type(module).__name__
            label = name or "<root>"
            if any(p.search(name) or p.search(kind) for p in patterns):
                logger.info("K-FAC: skipping %s (%s): matches skip_layers", label, kind)
                continue
            reason = handler.skip_reason(module)
            if reason is not None:
                logger.info("K-FAC: skipping %s (%s): %s", label, kind, reason)
                continue
            if not module.weight.requires_grad:
                continue
            layer = KFACLayer(label, module, handler, factor_dtype, inv_dtype)
            self.layers[label] = layer
            self._by_module[module] = layer
            self._hook_handles.append(module.register_forward_hook(self._forward_hook))

    def _register_batchnorm(
        self, model: nn.Module, patterns: list[re.Pattern[str]], dtype: torch.dtype
    ) -> None:
        """Affine BatchNorm layers get SP-NGD's unit-wise 2×2 Fisher blocks."""
        root = model.module if isinstance(model, DistributedDataParallel) else model
        for name, module in root.named_modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
                continue
            if any(p.search(name) or p.search(type(module).__name__) for p in patterns):
                continue
            if not module.weight.requires_grad:
                continue
            storage = factor_storage_dtype(dtype)  # float32 for 16-bit factor dtypes
            self.batchnorm_layers[name] = UnitWiseBatchNorm(name, module, storage)
            self._bn_by_module[module] = self.batchnorm_layers[name]
            self._hook_handles.append(module.register_forward_hook(self._batchnorm_forward_hook))

    def _batchnorm_forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output) -> None:
        if not (self._collecting and module.training and torch.is_grad_enabled()):
            return
        self._collect_batchnorm(module, inputs, output)

    @torch.compiler.disable
    def _collect_batchnorm(self, module: nn.Module, inputs: tuple[Any, ...], output) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        layer = self._bn_by_module[module]
        with torch.no_grad(), _no_autocast(output.device):
            x_hat = normalised_input(module, inputs[0].detach().to(layer.dtype))
        output.register_hook(partial(self._batchnorm_grad_hook, layer, x_hat))

    def _batchnorm_grad_hook(
        self, layer: UnitWiseBatchNorm, x_hat: torch.Tensor, grad: torch.Tensor
    ) -> None:
        with torch.no_grad(), _no_autocast(grad.device):
            layer.accumulate(x_hat, grad.detach(), self._g_multiplier(grad))

    def remove_hooks(self) -> None:
        """Detach every hook from the model (the preconditioner stops collecting statistics)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    # ------------------------------------------------------------------ hooks
    def _factor_update_due(self, step: int) -> bool:
        return self._force_factor_update or is_due(
            self.factor_update_steps, step, "factor_update_steps"
        )

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (self._collecting and module.training and torch.is_grad_enabled()):
            return  # traced by torch.compile: non-collecting steps run without graph breaks
        self._collect_forward(module, inputs[0], output)

    @torch.compiler.disable
    def _collect_forward(self, module: nn.Module, x: torch.Tensor, output: Any) -> None:
        """Factor-update steps: ``A``'s statistic now, ``G``'s from a hook on the output's
        gradient. Kept out of compiled graphs (one graph break per layer on these steps only):
        it mutates Python state, which graphs cannot."""
        layer = self._by_module[module]
        with torch.no_grad(), _no_autocast(x.device):
            layer.accumulate_input(x.detach())
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._output_grad_hook, layer))

    def _output_grad_hook(self, layer: KFACLayer, grad: torch.Tensor) -> None:
        with torch.no_grad(), _no_autocast(grad.device):
            layer.accumulate_output_grad(grad.detach(), self._g_multiplier(grad))
        if self._reducer is None or not self.overlap_comm or self._calls_per_step is None:
            return
        calls = self._calls_per_step.get(layer.name, 0)
        if calls and layer.A.batch_count == calls and layer.G.batch_count == calls:
            self._sent_early[layer.name] = calls
            self._reducer.mark_ready(layer.name, [layer.A.batch(), layer.G.batch()])

    def _g_multiplier(self, grad: torch.Tensor) -> torch.Tensor | float:
        """``k / loss_scale`` (``× batch size`` for per-example scaling): undo the caller's
        ``1/k`` loss division and the AMP loss scale before ``g`` enters ``G``."""
        multiplier: torch.Tensor | float = float(self.accumulation_steps)
        if self.grad_scaling == "per_example":
            multiplier *= grad.shape[0]
        scale = self._loss_scale()
        return multiplier / scale if not isinstance(scale, float) or scale != 1.0 else multiplier

    def _loss_scale(self) -> torch.Tensor | float:
        scaler = self.grad_scaler
        if scaler is None:
            return 1.0
        if not isinstance(scaler, torch.amp.GradScaler):
            return float(scaler())
        if not scaler.is_enabled():
            return 1.0
        # The scale tensor stays on the device: reading it with get_scale() would sync the host.
        scale = getattr(scaler, "_scale", None)
        return scale if scale is not None else 1.0

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """Precondition the gradients in place.

        Phases and their communication (``P`` ranks, ``m`` gradient workers per layer):

        1. *Reduce factors* (factor-update steps): the layers' batch factors are averaged over all
           ranks by bucketed all-reduces, started during backward when ``overlap_comm``, and
           folded into the running averages (batches with inf/NaN are dropped).
        2. *Second-order data* (inverse-update steps): each layer's owner decomposes (eigen) or
           inverts its factors and broadcasts the result to the layer's other gradient workers
           (none under MEM-OPT).
        3. *Precondition*: each gradient worker preconditions its layers' gradients.
        4. *Broadcast gradients* (when ``m < P``): each gradient worker sends the preconditioned
           gradient to its receiver group (none under COMM-OPT).
        5. *Clip and write*: every rank scales by the KL-clip factor ν and writes ``.grad``.
        """
        step = self.steps
        if self._collecting:
            self._reduce_factors(float(resolve(self.factor_decay, step)))
        if self._force_second_order or is_due(self.inv_update_steps, step, "inv_update_steps"):
            self._update_second_order(float(resolve(self.damping, step)))
        grads = {name: layer.grad() for name, layer in self.layers.items()}
        grads = {name: g for name, g in grads.items() if g is not None}
        preconditioned = self._precondition(grads)
        self._broadcast_preconditioned(preconditioned)
        # BatchNorm blocks are tiny: every rank preconditions them itself, no communication.
        for name, bn in self.batchnorm_layers.items():
            bn_grads = bn.grads()
            if bn_grads is not None:
                grads[name] = torch.stack(bn_grads)
                preconditioned[name] = torch.stack(bn.precondition(*bn_grads))
        self._clip_and_write(preconditioned, grads, step)
        self.steps += 1
        self._collecting = self._factor_update_due(self.steps)
        self.comm.stats.end_step()

    def _reduce_factors(self, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"factor_decay must be in [0, 1] at step {self.steps}, got {decay}")
        changed = [
            name
            for name, calls in self._sent_early.items()
            if (self.layers[name].A.batch_count, self.layers[name].G.batch_count) != (calls, calls)
        ]
        if changed:
            raise RuntimeError(
                f"K-FAC: layers {changed[:3]} ran a different number of times than on the first "
                "factor-update step, after their factors were sent (overlap_comm); pass "
                "overlap_comm=False for models whose layers run a varying number of times"
            )
        self._sent_early.clear()
        if self._calls_per_step is None:
            # The first factor-update step sends everything at step() and learns how often each
            # layer runs per step (accumulation × calls per forward); later steps send a layer
            # during backward as soon as it reaches that count.
            self._calls_per_step = {
                name: layer.G.batch_count
                for name, layer in self.layers.items()
                if layer.A.batch_count == layer.G.batch_count
            }
        if self._reducer is None:
            batches = {
                name: [layer.A.batch(), layer.G.batch()] for name, layer in self.layers.items()
            }
        else:
            batches = self._reducer.finish(self._local_factors)
        for name, layer in self.layers.items():
            A_batch, G_batch = batches[name]
            if A_batch is not None and G_batch is not None:
                # An overflow step drops the layer's statistics together (A and G).
                keep = torch.isfinite(A_batch).all() & torch.isfinite(G_batch).all()
                layer.A.update_running(A_batch, decay, keep)
                layer.G.update_running(G_batch, decay, keep)
                self._dropped = self._dropped.to(keep.device) + ~keep
            layer.A.reset_batch()
            layer.G.reset_batch()
        self._reduce_batchnorm(decay)
        self._force_factor_update = False

    def _reduce_batchnorm(self, decay: float) -> None:
        """Average the BatchNorm blocks over ranks (one all-reduce) and fold them in."""
        if not self.batchnorm_layers:
            return
        batches = [bn.batch() for bn in self.batchnorm_layers.values()]
        # a layer without statistics on this rank contributes its running average
        local = [
            batch if batch is not None else bn.running
            for bn, batch in zip(self.batchnorm_layers.values(), batches, strict=True)
        ]
        if self.comm.world_size > 1:
            buffer = flatten(local)
            self.comm.allreduce_sum(buffer, FACTOR_ALLREDUCE).wait()
            buffer /= self.comm.world_size
            local = [t.clone() for t in local]
            unflatten_into(buffer, local)
        for layer, batch in zip(self.batchnorm_layers.values(), local, strict=True):
            self._dropped = self._dropped.to(batch.device) + layer.update_running(batch, decay)
            layer.reset_batch()

    def _local_factors(self, name: str) -> list[torch.Tensor]:
        """This rank's batch factors; a layer without statistics here contributes its running
        average, which leaves the average unchanged if no rank saw the layer."""
        layer = self.layers[name]
        A_batch, G_batch = layer.A.batch(), layer.G.batch()
        if A_batch is None or G_batch is None:
            return [layer.A.running, layer.G.running]
        return [A_batch, G_batch]

    def _warn_dropped(self) -> None:
        dropped = int(self._dropped.item())  # inverse-update steps synchronise anyway
        if dropped:
            warnings.warn(
                f"K-FAC: dropped {dropped} layer statistic(s) containing inf/NaN (AMP overflow?) "
                "since the last second-order update; the factors kept their previous values",
                RuntimeWarning,
                stacklevel=3,
            )
            self._dropped.zero_()

    def _update_second_order(self, damping: float) -> None:
        self._warn_dropped()
        rank, plan, method = self.comm.rank, self.plan, self.compute_method
        pending: list[Pending] = []
        finish: list[Callable[[], None]] = []
        for name, layer in self.layers.items():
            place = plan.layers[name]
            if plan.colocate_factors:
                if place.a_worker == rank:
                    if method == EIGEN:
                        layer.update_eigen_colocated(damping, self.factored_damping)
                    else:
                        damp_A, damp_G = layer.factor_dampings(damping, self.factored_damping)
                        layer.update_inverse(layer.A, damp_A)
                        layer.update_inverse(layer.G, damp_G)
                group = plan.column_group(place.column)
                if rank in group and len(group) > 1:
                    tensors = layer.second_order_tensors(method)
                    pending.append(
                        self.comm.broadcast(tensors, place.a_worker, group, SECOND_ORDER_BROADCAST)
                    )
            else:
                finish.append(self._second_order_per_factor(layer, damping, pending))
        for p in pending:
            p.wait()
        for f in finish:
            f()
        for bn in self.batchnorm_layers.values():
            bn.update_inverse(damping)
        self._force_second_order = False

    def _second_order_per_factor(
        self, layer: KFACLayer, damping: float, pending: list[Pending]
    ) -> Callable[[], None]:
        """Non-colocated factors (COMM-OPT): ``A`` and ``G`` may be owned by different ranks; each
        owner broadcasts its factor's data to all and every rank finishes the layer locally."""
        rank, everyone = self.comm.rank, tuple(range(self.comm.world_size))
        place = self.plan.layers[layer.name]
        eig: dict[str, list[torch.Tensor]] = {}
        damp_A, damp_G = layer.factor_dampings(damping, self.factored_damping)
        for key, factor, owner, factor_damping in (
            ("A", layer.A, place.a_worker, damp_A),
            ("G", layer.G, place.g_worker, damp_G),
        ):
            if self.compute_method == EIGEN:
                if owner == rank:
                    d, Q = layer.compute_eigen(factor)
                else:
                    dtype = torch.float64 if factor.dtype == torch.float64 else torch.float32
                    device = factor.running.device
                    d = torch.empty(factor.size, dtype=dtype, device=device)
                    Q = torch.empty(factor.size, factor.size, dtype=dtype, device=device)
                eig[key] = [Q, d]
                pending.append(self.comm.broadcast([Q, d], owner, everyone, SECOND_ORDER_BROADCAST))
            else:
                if owner == rank:
                    layer.update_inverse(factor, factor_damping)
                elif factor.inverse is None:
                    factor.inverse = torch.empty_like(factor.running, dtype=layer.inv_dtype)
                pending.append(
                    self.comm.broadcast([factor.inverse], owner, everyone, SECOND_ORDER_BROADCAST)
                )

        def finish() -> None:
            if self.compute_method != EIGEN:
                return
            (Q_A, d_A), (Q_G, d_G) = eig["A"], eig["G"]
            layer.A.eigvecs = Q_A.to(layer.inv_dtype).contiguous()
            layer.G.eigvecs = Q_G.to(layer.inv_dtype).contiguous()
            layer.recip = layer.to_inv_dtype(
                eigen_reciprocal(d_G, d_A, damping, self.factored_damping)
            )

        return finish

    def _precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rank, out = self.comm.rank, {}
        for name, grad in grads.items():
            layer = self.layers[name]
            if self.plan.is_grad_worker(name, rank) and layer.has_second_order():
                out[name] = layer.precondition(grad, self.compute_method)
            elif self.plan.is_grad_worker(name, rank):
                out[name] = grad.clone()  # no second-order data yet: plain gradient
            else:
                out[name] = torch.empty_like(grad)
        return out

    def _broadcast_preconditioned(self, preconditioned: dict[str, torch.Tensor]) -> None:
        plan, rank = self.plan, self.comm.rank
        if plan.num_grad_workers == plan.world_size:
            return
        row = plan.row_group(plan.row_of(rank))
        by_source: dict[int, list[torch.Tensor]] = {}
        for name, V in preconditioned.items():
            by_source.setdefault(plan.grad_source(name, rank), []).append(V)
        pending = [
            self.comm.broadcast(tensors, src, row, GRAD_BROADCAST)
            for src, tensors in sorted(by_source.items())
        ]
        for p in pending:
            p.wait()

    def _clip_and_write(
        self, preconditioned: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], step: int
    ) -> None:
        kl_clip = resolve(self.kl_clip, step)
        if not preconditioned:
            return
        if kl_clip is None:
            scale = torch.ones((), dtype=torch.float64, device=self.last_kl_scale.device)
        else:
            lr = float(resolve(self.lr, step))
            vg = (
                torch.stack(
                    [
                        (V.to(torch.float64) * grads[name].to(torch.float64)).sum()
                        for name, V in preconditioned.items()
                    ]
                )
                .sum()
                .abs()
                * lr**2
            )
            scale = torch.where(
                vg > 0, torch.sqrt(kl_clip / vg).clamp(max=1.0), torch.ones_like(vg)
            )
        self.last_kl_scale = scale
        for name, V in preconditioned.items():
            V = V * scale.to(V.dtype)
            if name in self.layers:
                self.layers[name].write_grad(V)
            else:
                self.batchnorm_layers[name].write(V[0], V[1])

    # ------------------------------------------------------------------ state
    def state_dict(self, include_factors: bool = True) -> dict[str, Any]:
        """Step counter, factors and the second-order data in force, gathered on rank 0.

        A collective in distributed runs: every rank must call it. Rank 0's result is complete;
        other ranks return what they hold.
        """
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for name, layer in self.layers.items():
            entry: dict[str, torch.Tensor] = {}
            if include_factors:
                entry["A"] = layer.A.running.detach().clone()
                entry["G"] = layer.G.running.detach().clone()
                entry.update(self._gather_second_order(layer))
            layers[name] = entry
        batchnorm = {
            name: {"F": bn.running.detach().clone()}
            | ({"F_inv": bn.inverse.detach().clone()} if bn.inverse is not None else {})
            for name, bn in self.batchnorm_layers.items()
            if include_factors
        }
        return {
            "steps": self.steps,
            "compute_method": self.compute_method,
            "layers": layers,
            "batchnorm": batchnorm,
        }

    def _gather_second_order(self, layer: KFACLayer) -> dict[str, torch.Tensor]:
        keys = _SECOND_ORDER_KEYS[self.compute_method]
        rank, place = self.comm.rank, self.plan.layers[layer.name]
        holds = layer.has_second_order() and (
            not self.plan.colocate_factors or self.plan.is_grad_worker(layer.name, rank)
        )
        root_holds = not self.plan.colocate_factors or self.plan.is_grad_worker(layer.name, 0)
        if not root_holds and self.comm.world_size > 1:
            if rank == place.a_worker:
                self.comm.send(layer.second_order_tensors(self.compute_method), dst=0)
            if rank == 0:
                # Rank 0 receives into fresh buffers without becoming a gradient worker.
                shapes = self._second_order_shapes(layer)
                tensors = [
                    torch.empty(s, dtype=layer.inv_dtype, device=layer.A.running.device)
                    for s in shapes
                ]
                self.comm.recv(tensors, src=place.a_worker)
                return dict(zip(keys, tensors, strict=True))
            return {}
        if not holds:
            return {}
        tensors = layer.second_order_tensors(self.compute_method)
        return {k: t.detach().clone() for k, t in zip(keys, tensors, strict=True)}

    def _second_order_shapes(self, layer: KFACLayer) -> list[tuple[int, ...]]:
        a, g = layer.shape.a, layer.shape.g
        if self.compute_method == EIGEN:
            return [(a, a), (g, g), (g, a)]
        return [(a, a), (g, g)]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (from any world size and strategy)."""
        missing = [name for name in self.layers if name not in state.get("layers", {})]
        if "steps" not in state or missing:
            raise ValueError(
                "K-FAC state does not match this model: "
                + (f"missing layers {missing[:5]}" if missing else "no 'steps' entry")
            )
        self.steps = int(state["steps"])
        keys = _SECOND_ORDER_KEYS[self.compute_method]
        same_method = state.get("compute_method") == self.compute_method
        for name, layer in self.layers.items():
            entry = state["layers"][name]
            if "A" not in entry or "G" not in entry:
                self._force_factor_update = True
                self._force_second_order = True
                continue
            device = layer.A.running.device
            layer.A.running = entry["A"].to(device=device, dtype=layer.A.dtype).clone()
            layer.G.running = entry["G"].to(device=device, dtype=layer.G.dtype).clone()
            if not (same_method and all(k in entry for k in keys)):
                self._force_second_order = True
                continue
            if self.plan.colocate_factors and not self.plan.is_grad_worker(name, self.comm.rank):
                continue
            targets = layer.second_order_tensors(self.compute_method)
            for target, key in zip(targets, keys, strict=True):
                target.copy_(entry[key].to(device=device, dtype=target.dtype))
        saved_bn = state.get("batchnorm", {})
        for name, bn in self.batchnorm_layers.items():
            if name not in saved_bn or "F" not in saved_bn[name]:
                self._force_factor_update = self._force_second_order = True
                continue
            bn.running = saved_bn[name]["F"].to(bn.running.device, bn.dtype).clone()
            if "F_inv" in saved_bn[name]:
                bn.inverse = saved_bn[name]["F_inv"].to(bn.running.device, bn.dtype).clone()
            else:
                self._force_second_order = True
        self._collecting = self._factor_update_due(self.steps)

    # ------------------------------------------------------------------ reporting
    def comm_bytes(self) -> dict[str, dict[str, int]]:
        """Payload bytes by kind (``factor_allreduce``, ``second_order_broadcast``,
        ``grad_broadcast``) for the last step and in total, as seen by this rank."""
        return self.comm.stats.as_dict()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of K-FAC state on this rank: running factors and second-order data."""
        held = [*self.layers.values(), *self.batchnorm_layers.values()]
        return {
            "factors": sum(layer.factor_bytes() for layer in held),
            "second_order": sum(layer.second_order_bytes() for layer in held),
        }

    def summary(self) -> str:
        """A table of the registered layers with their factor shapes and bytes."""
        world = self.comm.world_size
        header = (
            f"K-FAC: {len(self.layers)} layers, compute_method={self.compute_method}, "
            f"world_size={world}, gradient workers per layer={self.plan.num_grad_workers}"
        )
        rows = [("layer", "type", "A", "G", "factor bytes")]
        for name, layer in self.layers.items():
            a, g = layer.shape.a, layer.shape.g
            kind = type(layer.module).__name__
            rows.append((name, kind, f"{a}x{a}", f"{g}x{g}", f"{layer.factor_bytes():,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [header]
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r[:4], widths[:4], strict=True)]
            lines.append("  ".join([*cells, r[4].rjust(widths[4])]))
        mem = self.memory_bytes()
        lines.append(f"total: factors {mem['factors']:,} B, second-order {mem['second_order']:,} B")
        return "\n".join(lines)
