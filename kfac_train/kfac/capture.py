"""Registration and statistics capture: which modules become blocks, and the hooks that feed
their factors.

:func:`register_blocks` walks the model and asks the handler registry (:mod:`.layers`) for each
module; :class:`StatisticsCapture` owns the hooks. On steps that update factors, a forward hook
gives each micro-batch's input to its block and a hook on the layer output gives the output
gradient (rescaled by :meth:`StatisticsCapture.g_multiplier`). Forwards in ``eval()`` mode or
without grad, and all forwards of other steps, are not touched.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import batchnorm, embedding, layernorm  # noqa: F401  (register their handlers)
from .kfac_layer import GradCallback, KFACLayer
from .layers import HandlerOptions, configure, handler_for

logger = logging.getLogger(__name__)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Factors are formed in ``factor_dtype``, never in an autocast dtype."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def register_blocks(
    model: nn.Module, skip_layers: str | Sequence[str], options: HandlerOptions
) -> dict[str, Any]:
    """One block per handled module, in model order (names as in ``named_modules()``, without a
    DDP ``module.`` prefix; the root is ``"<root>"``), except those a ``skip_layers`` regex
    ``re.search``-matches by name or class name."""
    if isinstance(skip_layers, str):
        skip_layers = (skip_layers,)
    patterns = [re.compile(p) for p in skip_layers]
    root = model.module if isinstance(model, DistributedDataParallel) else model
    blocks: dict[str, Any] = {}
    for name, module in root.named_modules():
        handler = handler_for(module)
        handler = configure(handler, options) if handler is not None else None
        if handler is None:
            continue
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
        make_block = getattr(handler, "make_block", None)
        if make_block is not None:
            blocks[label] = make_block(label, module, options)
        else:
            blocks[label] = KFACLayer(label, module, handler, options)
    return blocks


class StatisticsCapture:
    """The hooks of every block, and the ``g`` rescaling they share.

    ``on_complete(block)`` is called after a block received an output gradient (the reduction
    uses it to start all-reduces during backward).
    """

    def __init__(
        self,
        blocks: dict[str, Any],
        *,
        accumulation_steps: int,
        grad_scaling: str,
        grad_scaler: torch.amp.GradScaler | Callable[[], float] | None,
        on_complete: Callable[[Any], None],
    ) -> None:
        self.blocks = blocks
        self.accumulation_steps = accumulation_steps
        self.grad_scaling = grad_scaling
        self.grad_scaler = grad_scaler
        self.on_complete = on_complete
        #: Whether this step collects statistics (set by the preconditioner).
        self.collecting = False
        #: Inside :meth:`sampled_output_grads`: outputs recorded for the sampled losses.
        self.defer_output_grads = False
        self._deferred: list[tuple[Any, GradCallback, torch.Tensor]] = []
        self._by_module = {block.module: block for block in blocks.values()}
        self._handles = [
            block.module.register_forward_hook(self._forward_hook) for block in blocks.values()
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (self.collecting and module.training and torch.is_grad_enabled()):
            return  # traced by torch.compile: non-collecting steps run without graph breaks
        self._collect(module, inputs, output)

    @torch.compiler.disable
    def _collect(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """Factor-update steps: the input statistic now, the output-gradient one from a hook on
        the output's gradient. Kept out of compiled graphs (one graph break per registered layer
        on these steps only): it mutates Python state, which graphs cannot."""
        block = self._by_module[module]
        if not any(f.active for f in block.factors()):
            return  # every statistic of the block is stale this step (.stale)
        with torch.no_grad(), no_autocast(inputs[0].device):
            callback = block.on_forward(inputs, output)
        if callback is not None and isinstance(output, torch.Tensor) and output.requires_grad:
            if self.defer_output_grads:
                self._deferred.append((block, callback, output))
            else:
                output.register_hook(partial(self._output_grad_hook, block, callback))

    @contextlib.contextmanager
    def sampled_output_grads(self) -> Iterator[None]:
        """Forwards within record each block's output instead of hooking its gradient: the
        output-gradient statistics then come from :meth:`add_sampled_output_grads` (the
        Monte-Carlo Fisher), and a later backward of the true loss leaves them alone."""
        self.defer_output_grads = True
        try:
            yield
        finally:
            self.defer_output_grads = False

    def add_sampled_output_grads(self, losses: Sequence[torch.Tensor]) -> None:
        """Output-gradient statistics of the outputs recorded under :meth:`sampled_output_grads`
        from ``losses``, each the loss of one draw of labels sampled from the model (scaled
        like the true loss: ``1/k`` and the AMP loss scale). With ``S`` draws a block's ``g``
        rows of all draws form one statistic: the mean over draws of the one-draw statistic.

        Uses ``torch.autograd.grad`` with respect to the recorded outputs only (the graph is
        kept for the true loss's backward): no parameter gradient is touched, so DDP's gradient
        hooks do not fire.
        """
        recorded, self._deferred = self._deferred, []
        if not recorded or not losses:
            return
        outputs = [output for _, _, output in recorded]
        draws = [
            torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
            for loss in losses
        ]
        for i, (block, callback, _) in enumerate(recorded):
            grads = [draw[i] for draw in draws if draw[i] is not None]
            if grads:
                with torch.no_grad(), no_autocast(grads[0].device):
                    callback(torch.cat(grads).detach(), self.g_multiplier(grads[0]))
                self.on_complete(block)

    def _output_grad_hook(self, block: Any, callback: GradCallback, grad: torch.Tensor) -> None:
        with torch.no_grad(), no_autocast(grad.device):
            callback(grad.detach(), self.g_multiplier(grad))
        self.on_complete(block)

    def g_multiplier(self, grad: torch.Tensor) -> torch.Tensor | float:
        """``k / loss_scale``, times the examples count ``C`` under the per-example convention:
        undo the caller's ``1/k`` loss division and the AMP loss scale before ``g`` enters the
        statistics, and (per-example) turn the gradient of the mean loss into per-example ones.

        ``C`` is the leading (batch) dimension of the output gradient — the examples the
        micro-batch loss averages over — or 1 for an unbatched output. Blocks add their
        location rescale on top (:func:`.layers.per_example_scales`)."""
        multiplier: torch.Tensor | float = float(self.accumulation_steps)
        if self.grad_scaling == "per_example":
            multiplier *= grad.shape[0] if grad.dim() > 1 else 1
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
