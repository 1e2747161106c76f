"""A registered Kronecker layer: its two factors, its second-order method and its gradient.

Every block the preconditioner drives (this one and :class:`.batchnorm.UnitWiseBatchNorm`)
offers the same interface, so the step has no per-type branches:

* ``factors()`` — the statistics reduced over ranks; ``on_forward(inputs, output)`` — capture a
  micro-batch (returns the output-gradient callback, or ``None``);
* ``method`` — the second-order method object (:mod:`.second_order`); ``update_second_order``;
* ``grad_shape`` / ``grad()`` / ``zero_grad()`` / ``precondition(grad)`` / ``write_grad(V)`` —
  the gradient as one matrix and back;
* ``replicated`` — ``True`` for blocks so cheap that every rank computes their second-order data
  (no placement, no broadcast); ``state_section`` / ``factor_keys`` — where the checkpoint keeps
  them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .assignment import LayerShape
from .factors import Factor
from .grads import PlainGrads, grad_matrix, write_grad_matrix
from .layers import (
    HandlerOptions,
    LayerHandler,
    per_example_scales,
)
from .precision import LOW_PRECISION, gram_mean
from .second_order import METHODS, SecondOrderMethod

GradCallback = Callable[[torch.Tensor, "torch.Tensor | float"], None]


class KFACLayer:
    """K-FAC state of one module: factors ``A`` (``a × a``) and ``G`` (``g × g``) and the
    second-order method that preconditions its ``(g, a)`` gradient."""

    replicated = False
    state_section = "layers"
    factor_keys = ("A", "G")

    def __init__(
        self, name: str, module: nn.Module, handler: LayerHandler, options: HandlerOptions
    ) -> None:
        self.name = name
        self.module = module
        self.handler = handler
        self.inv_dtype = options.inv_dtype
        self.grads = options.grads or PlainGrads()
        self.per_example = options.grad_scaling == "per_example"
        a, g = handler.factor_sizes(module)
        self.shape = LayerShape(name, a, g, diagonal_a=self.diagonal_input)
        device = module.weight.device
        self.A = self._input_factor(a, options, device)
        self.G = Factor(g, options.factor_dtype, device)
        self.method: SecondOrderMethod = self._make_method(options, a, g, device)
        #: Largest input-row matrix formed so far with the padded input copy it needed (bytes):
        #: conv patch copies dominate it.
        self.peak_rows_bytes = 0

    #: ``True`` for blocks whose ``A`` is diagonal, stored as its ``(a,)`` diagonal
    #: (:class:`~kfac_train.kfac.embedding.EmbeddingLayer`).
    diagonal_input = False

    def _input_factor(self, a: int, options: HandlerOptions, device: torch.device) -> Factor:
        """``A``: a dense ``a × a`` factor here (subclasses may store it otherwise)."""
        return Factor(a, options.factor_dtype, device)

    #: Second-order method classes by ``compute_method`` (subclasses may use others).
    method_classes: dict[str, type[SecondOrderMethod]] = METHODS

    def _make_method(
        self, options: HandlerOptions, a: int, g: int, device: torch.device
    ) -> SecondOrderMethod:
        """The second-order method object of the option ``compute_method``."""
        return self.method_classes[options.compute_method](
            self.name,
            a,
            g,
            options.inv_dtype,
            device,
            options.warner,
            options.factored_damping,
            options.precondition_dtype,
        )

    def factors(self) -> tuple[Factor, ...]:
        return self.A, self.G

    # ------------------------------------------------------------------ statistics (hooks)
    def on_forward(self, inputs: tuple[Any, ...], output: Any) -> GradCallback | None:
        """Add the micro-batch's input statistic to ``A``; the callback adds the output-gradient
        statistic to ``G`` (each only while :attr:`.Factor.active`). Under the per-example
        convention both carry the handler's location rescale (:func:`.layers.per_example_scales`),
        bound to this call's output shape."""
        s_A, s_g = (
            per_example_scales(self.handler, self.module, output) if self.per_example else (1, 1)
        )
        if self.A.active:
            self.accumulate_input(inputs[0].detach(), s_A)
        if not self.G.active:
            return None
        if s_g == 1:
            return self.accumulate_output_grad
        return lambda grad, multiplier: self.accumulate_output_grad(grad, multiplier * s_g)

    def accumulate_input(self, x: torch.Tensor, scale: float = 1.0) -> None:
        """Add ``scale ·`` the input statistic of ``x`` to ``A``."""
        statistic = getattr(self.handler, "input_statistic", None)
        if statistic is not None:  # the handler forms aᵀa / N without the rows (conv_stats)
            stat, working = statistic(self.module, x, self.A.stat_dtype)
            self.peak_rows_bytes = max(self.peak_rows_bytes, working)
            self.A.add(stat if scale == 1 else stat * scale)
            return
        rows = self.handler.input_rows(self.module, x)
        copy_bytes = getattr(self.handler, "input_copy_bytes", None)
        working = rows.numel() * rows.element_size()
        working += copy_bytes(self.module, x) if copy_bytes is not None else 0
        self.peak_rows_bytes = max(self.peak_rows_bytes, working)
        if scale == 1:
            self.A.accumulate(rows)
        else:  # scaled as an (a × a) statistic, not as (N × a) rows
            self.A.add(gram_mean(rows, self.A.stat_dtype) * scale)

    def accumulate_output_grad(
        self, grad_output: torch.Tensor, multiplier: torch.Tensor | float
    ) -> None:
        """``multiplier`` rescales ``g`` before the outer product: it undoes the ``1/k`` of
        gradient accumulation, the AMP loss scale, and applies per-example scaling when asked."""
        statistic = getattr(self.handler, "output_grad_statistic", None)
        if statistic is not None and self.G.stat_dtype not in LOW_PRECISION:
            # Scalars fold into the product: (m·g)ᵀ(m·g) = m²·gᵀg (no scaled copy of g).
            self.G.add(statistic(self.module, grad_output, self.G.stat_dtype) * multiplier**2)
            return
        rows = self.handler.output_grad_rows(self.module, grad_output)
        self.G.accumulate(rows.to(self.G.dtype) * multiplier)

    # ------------------------------------------------------------------ second-order data
    def update_second_order(self, damping: float) -> None:
        self.method.compute(self.A.running, self.G.running, damping)

    def has_second_order(self) -> bool:
        return self.method.has_data()

    def second_order_bytes(self) -> int:
        return self.method.nbytes()

    def factor_bytes(self) -> int:
        return sum(f.running_bytes() for f in self.factors())

    # ------------------------------------------------------------------ gradient
    def grad(self) -> torch.Tensor | None:
        """The layer gradient ``(g, a)``, or ``None`` if the layer got no gradient this step."""
        return grad_matrix(self.module, self.grads)

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (self.shape.g, self.shape.a)

    def zero_grad(self) -> torch.Tensor:
        """A zero ``(g, a)`` gradient: what a rank without a gradient for this layer uses."""
        weight = self.module.weight
        return torch.zeros(self.grad_shape, dtype=weight.dtype, device=weight.device)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        return self.method.precondition(grad)

    def write_grad(self, matrix: torch.Tensor) -> None:
        if self.module.weight.grad is not None:
            write_grad_matrix(self.module, matrix, self.grads)
