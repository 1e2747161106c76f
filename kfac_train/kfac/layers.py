"""Per-module-type statistics: how a layer's inputs and output gradients become factor rows.

A :class:`LayerHandler` turns one forward input into the rows ``a`` of the input factor
``A = aᵀa / N`` and one output gradient into the rows ``g`` of ``G = gᵀg / N``, following
``kfac-math.md``. Handlers are looked up in an open registry keyed by module type
(:func:`register_handler`), so new layer types plug in without touching the optimizer.

Two optional handler methods make the registry open to options and to other block kinds:

* ``configure(options) -> handler | None``: the handler to use under the preconditioner's
  :class:`HandlerOptions` (``None``: leave the module alone). ``Conv2dHandler`` returns the
  spatial-mean variant for ``conv_factor="spatial_mean"``; the BatchNorm handler returns ``None``
  unless ``batchnorm="unit_wise"``.
* ``make_block(name, module, options)``: build a non-Kronecker block (unit-wise BatchNorm);
  without it the module becomes a :class:`~kfac_train.kfac.kfac_layer.KFACLayer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .conv_stats import patch_second_moment
from .precision import gram_mean

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerOptions:
    """What handlers and blocks may depend on (set once by the preconditioner)."""

    factor_dtype: Any  # torch.dtype
    inv_dtype: Any  # torch.dtype
    precondition_dtype: Any = None  # torch.dtype of the preconditioning products; None: float32+
    compute_method: str = "eigen"
    factored_damping: bool = False
    conv_factor: str = "patches"
    batchnorm: str = "skip"
    embedding: str = "skip"
    layernorm: str = "skip"
    world_size: int = 1
    grad_scaling: str = "per_example"  # the factor convention (docs/kfac.md)
    warner: Any = None  # diagnostics.RateLimitedWarner
    grads: Any = None  # GradAccess; None = PlainGrads (sharded.ShardedGrads under FSDP2)


def configure(handler: Any, options: HandlerOptions) -> Any:
    """``handler.configure(options)`` when the handler has it, else the handler itself."""
    hook = getattr(handler, "configure", None)
    return handler if hook is None else hook(options)


class LayerHandler(Protocol):
    """Statistics and gradient layout of one module type."""

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Rows ``a`` of shape ``(N, a)``, already scaled so that ``A = aᵀa / N``."""

    def output_grad_rows(self, module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        """Rows ``g`` of shape ``(N, g)``, already scaled so that ``G = gᵀg / N``."""

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        """``(a, g)``: side lengths of ``A`` and ``G``."""

    def skip_reason(self, module: nn.Module) -> str | None:
        """Why this module cannot be handled, or ``None`` when it can."""

    # Optional: ``per_example_scales(module, output) -> (s_A, s_g)``, the scalars that turn the
    # rows above into the per-example convention's factors (see :func:`per_example_scales`).


def per_example_scales(
    handler: Any, module: nn.Module, output: torch.Tensor
) -> tuple[float, float]:
    """``(s_A, s_g)`` of the per-example convention (``docs/kfac.md``): ``A`` is multiplied by
    ``s_A`` and the rows ``g`` by ``s_g`` (on top of the examples count ``C`` the capture applies),
    so that ``A = mean over rows of a aᵀ`` and ``G = (R/C)·mean over rows of (Cg)(Cg)ᵀ`` with
    ``R/C`` rows per example. Handlers without the method get the Linear rule."""
    scales = getattr(handler, "per_example_scales", None)
    if scales is not None:
        return scales(module, output)
    return 1.0, _locations_per_example(output) ** 0.5


def _locations_per_example(output: torch.Tensor) -> int:
    """Rows per example of a feature-last output ``(B, ..., out)``: the product of the middle
    dimensions (sequence positions), 1 for ``(B, out)`` or unbatched outputs."""
    return output[0, ..., 0].numel() if output.dim() > 2 else 1


def _with_bias_column(rows: torch.Tensor, has_bias: bool) -> torch.Tensor:
    if not has_bias:
        return rows
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, ones], dim=1)


class LinearHandler:
    """``nn.Linear``: all leading input dimensions (batch, sequence, ...) collapse into rows."""

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return _with_bias_column(rows, module.bias is not None)

    def output_grad_rows(self, module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features + (module.bias is not None), module.out_features

    def skip_reason(self, module: nn.Module) -> str | None:
        # nn.MultiheadAttention reads out_proj.weight directly without calling the module, so its
        # hooks never fire and no statistics could be collected.
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return "its forward() is bypassed by nn.MultiheadAttention"
        return None


class Conv2dHandler:
    """``nn.Conv2d`` with ``groups == 1``: im2col patches, each scaled by ``1/S``.

    ``S = H_out·W_out`` is the spatial size of the output; ``N = B·S`` rows. Factor updates use
    :meth:`input_statistic` (:mod:`.conv_stats`: no patch matrix); :meth:`input_rows` states
    the convention.
    """

    #: Patch matrices of at most this many elements are built and multiplied (one copy, one
    #: GEMM): below it that beats the patch-free paths' several kernel calls (measured on CPU,
    #: docs/benchmarks.md); above it the patch-free paths win by up to 7x.
    small_patch_elements: int = 1 << 18

    def input_statistic(
        self, module: nn.Module, x: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, int]:
        """``(aᵀa / N, working bytes)`` for the rows ``a`` of :meth:`input_rows`: from the
        input's shifted products (:mod:`.conv_stats`) or, for a patch matrix of at most
        :attr:`small_patch_elements` elements or a strided 1×1 convolution, from the rows
        themselves (products in ``dtype``)."""
        pointwise_strided = module.kernel_size == (1, 1) and module.stride != (1, 1)
        if pointwise_strided or self._patch_elements(module, x) <= self.small_patch_elements:
            # (a strided 1×1 convolution's patch matrix is a subsample of its input, 1/(sh·sw)
            # of it: one copy and one GEMM beat the shifted products, measured on CPU)
            rows = self.input_rows(module, x)
            working = rows.numel() * rows.element_size() + self.input_copy_bytes(module, x)
            return gram_mean(rows, dtype), working
        moment, spatial, working = patch_second_moment(module, x, dtype)
        return moment / (spatial * spatial), working

    @staticmethod
    def _patch_elements(module: nn.Module, x: torch.Tensor) -> int:
        """``B·H_out·W_out·C·kh·kw``: the size of the patch matrix of ``x``."""
        left, right, top, bottom = module._reversed_padding_repeated_twice
        (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
        h_out = (x.shape[-2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
        w_out = (x.shape[-1] + left + right - dw * (kw - 1) - 1) // sw + 1
        return x.shape[0] * h_out * w_out * x.shape[1] * kh * kw

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kh, kw = module.kernel_size
        patches = self._patch_view(module, self._padded(module, x))
        batch, channels, h_out, w_out = patches.shape[:4]
        spatial, width = h_out * w_out, channels * kh * kw
        has_bias = module.bias is not None
        rows = torch.empty(
            batch * spatial, width + has_bias, dtype=x.dtype, device=x.device
        )  # one copy, bias column included; rows ordered (B, H_out, W_out), columns (C, kh, kw)
        rows[:, :width].view(batch, h_out, w_out, channels, kh, kw).copy_(
            patches.permute(0, 2, 3, 1, 4, 5)
        )
        if has_bias:
            rows[:, width] = 1.0
        return rows.div_(spatial)

    @staticmethod
    def _patch_view(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Strided (no-copy) view of the patches: ``(B, C, H_out, W_out, kh, kw)``.

        Far cheaper on CPU than ``F.unfold`` (im2col); dilation keeps every d-th element of a
        window of span ``d(k − 1) + 1``.
        """
        kh, kw = module.kernel_size
        (dh, dw), (sh, sw) = module.dilation, module.stride
        patches = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        return patches[..., ::dh, ::dw]

    def input_copy_bytes(self, module: nn.Module, x: torch.Tensor) -> int:
        """Bytes of the padded input copy :meth:`input_rows` makes (0 without padding)."""
        if module.padding_mode == "zeros" and not (
            isinstance(module.padding, str) or any(module.padding)
        ):
            return 0
        left, right, top, bottom = module._reversed_padding_repeated_twice
        height, width = x.shape[-2] + top + bottom, x.shape[-1] + left + right
        return x[..., :1, :1].numel() * height * width * x.element_size()

    @staticmethod
    def _padded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input with the layer's padding applied (any padding mode, ``"same"``/``"valid"``)."""
        if module.padding_mode != "zeros":
            return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        if isinstance(module.padding, str) or any(module.padding):
            return F.pad(x, module._reversed_padding_repeated_twice)
        return x

    def output_grad_rows(self, module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        channels = grad_output.shape[1]
        spatial = grad_output.shape[2] * grad_output.shape[3]
        rows = grad_output.permute(0, 2, 3, 1).reshape(-1, channels)
        return rows / spatial

    def output_grad_statistic(
        self, module: nn.Module, grad_output: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """``gᵀg / N`` for the rows ``g`` of :meth:`output_grad_rows` (``N = B·S`` rows, each
        carrying ``1/S``): ``Σ_n g_n g_nᵀ / (B·S³)`` with ``g_n`` the ``(C, S)`` gradient of
        example ``n``, one batched product, no row copy (float32/float64 ``dtype``)."""
        batch, channels = grad_output.shape[:2]
        spatial = grad_output.shape[2] * grad_output.shape[3]
        g = grad_output.to(dtype).reshape(batch, channels, spatial)
        return torch.bmm(g, g.transpose(1, 2)).sum(0) / (batch * float(spatial) ** 3)

    def per_example_scales(self, module: nn.Module, output: torch.Tensor) -> tuple[float, float]:
        """KFC's block ``S·E[p pᵀ] ⊗ E[(Cg)(Cg)ᵀ]`` from rows that carry ``1/S`` each:
        ``A ×S²`` (patches averaged over locations) and ``g ×S·√S`` (the ``1/S`` undone, the
        block rescaled by the ``S`` locations)."""
        spatial = output.shape[-2] * output.shape[-1]
        return float(spatial) ** 2, float(spatial) ** 1.5

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw + (module.bias is not None), module.out_channels

    def skip_reason(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported"
        return None

    def configure(self, options: HandlerOptions) -> Conv2dHandler:
        """The exact patches factor, or Ba et al.'s spatial mean (``conv_factor``)."""
        return _SPATIAL_MEAN if options.conv_factor == "spatial_mean" else self


class Conv2dSpatialMeanHandler(Conv2dHandler):
    """Ba et al.'s cheaper convolution input factor (ICLR 2017, App. A).

    Patches are averaged over the ``S`` output positions *before* the outer product: one row per
    example, ``ā_n = [mean_t p_{n,t}, 1] / S`` and ``A = Σ_n ā_n ā_nᵀ / B``. This equals the exact
    factor when the patches do not vary across positions and costs ``S`` times less to form. ``G``
    is unchanged.
    """

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        patches = self._patch_view(module, self._padded(module, x))
        batch, spatial = patches.shape[0], patches.shape[2] * patches.shape[3]
        rows = patches.mean(dim=(2, 3)).reshape(batch, -1)  # (B, C_in·kh·kw), a reduction
        return _with_bias_column(rows, module.bias is not None) / spatial

    def configure(self, options: HandlerOptions) -> Conv2dHandler:
        return self

    input_statistic = None  # one row per example: the rows path is already cheap


_SPATIAL_MEAN = Conv2dSpatialMeanHandler()
_HANDLERS: dict[type[nn.Module], LayerHandler] = {}


def register_handler(module_type: type[nn.Module], handler: LayerHandler) -> None:
    """Register ``handler`` for ``module_type`` and its subclasses."""
    _HANDLERS[module_type] = handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler for ``module``'s type (nearest registered base class), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


register_handler(nn.Linear, LinearHandler())
register_handler(nn.Conv2d, Conv2dHandler())
