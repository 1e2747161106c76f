"""The second moment of convolution patches, computed from the input without the patch matrix.

For ``nn.Conv2d`` (``groups == 1``) with kernel ``kh × kw``, dilation ``d``, stride ``s`` and the
input already padded with the layer's padding mode, the patch of output position ``(u, v)``
holds ``x[:, s_h·u + d_h·i, s_w·v + d_w·j]`` at kernel offset ``(i, j)``; its columns are ordered
``(c, i, j)`` as in ``weight.reshape(C_out, -1)`` and :func:`torch.nn.functional.unfold`. With
``N = B·H_out·W_out`` rows ``r = [p, 1]`` (the ``1`` only with a bias) we want
``M = Σ r rᵀ / N``, whose ``C × C`` block for offsets ``a = (i, j)``, ``b = (i', j')`` is
``Σ_{n,u,v} x[n, :, s·u + d·i] x[n, :, s·u + d·i']ᵀ`` (per dimension).

Writing ``d·i = s·q_i + ρ_i``, the row ``s·u + d·i = s·t + ρ_i`` with ``t = u + q_i`` and its
partner ``s·(t + δ) + ρ_{i'}`` with ``δ = q_{i'} − q_i``: the summand depends on ``(ρ_i, ρ_{i'},
δ)`` and ``t`` only, and ``t`` runs over the window ``[q_i, q_i + H_out)``. Kernel-offset pairs
with the same key (per dimension) share the products over the intersection of their windows
(the *core*, one GEMM per key); each pair adds the products over the few positions of its own
window outside the core (a strip at most ``max q − min q`` wide). For a 3×3 stride-1 kernel:
13 core GEMMs over ``N`` rows of width ``C`` plus strips, instead of the ``(9C)²·N`` product of
the patch matrix. Only the upper block triangle ``a ≤ b`` is computed (``M`` is symmetric), and
every sum is an addition of exact partial sums: no cancellation. The bias column holds the patch
sums ``Σ p`` (window sums of the batch-summed image) and its corner is ``1``.

Memory: one channels-last copy of the padded input in the statistic dtype and, at a time, the
two gathered operands of one GEMM (at most ``B·H_out·W_out·C`` elements each).

Stride-1 layers take a faster route (:mod:`.conv_correlation`: the same blocks from the input's
autocorrelation, by convolution weight-gradient kernels); this module's GEMMs serve the other
strides and float16 statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .conv_correlation import stride_one_moment
from .precision import LOW_PRECISION, compute_dtype, power_of_two_scale

Rect = tuple[int, int, int, int]  # (first t, count, first τ, count): window coordinates


@dataclass(frozen=True)
class _Group:
    """Offset pairs ``(a, b)`` (``a ≤ b``, flattened ``i·kw + j``) sharing one core product.

    Positions ``(t, τ)`` of the left factor sit at ``(s_h·t + ρ_h, s_w·τ + ρ_w)`` of the padded
    image (``phase``), the right factor ``shift`` further. ``core``: the rectangle shared by
    all pairs (``None`` when their windows do not intersect); ``pairs``: ``(a, b, extras)``
    with the rectangles of the pair's window outside the core.
    """

    phase: tuple[int, int]
    shift: tuple[int, int]
    core: Rect | None
    pairs: tuple[tuple[int, int, tuple[Rect, ...]], ...]


def _phase(k: int, dilation: int, stride: int) -> list[tuple[int, int]]:
    """``(ρ_i, q_i)`` with ``d·i = s·q_i + ρ_i`` for each kernel offset ``i``."""
    return [(dilation * i % stride, dilation * i // stride) for i in range(k)]


def _outside(start: int, count: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The (start, count) intervals of ``[start, start + count)`` outside ``[lo, hi)``."""
    parts = [
        (start, min(lo, start + count) - start),
        (max(hi, start), start + count - max(hi, start)),
    ]
    return [(first, n) for first, n in parts if n > 0]


@lru_cache(maxsize=512)
def _plan(
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    stride: tuple[int, int],
    out: tuple[int, int],
) -> tuple[_Group, ...]:
    """The groups of one geometry (``out``: the output size ``(H_out, W_out)``)."""
    (kh, kw), (sh, sw), (nh, nw) = kernel, stride, out
    rows, cols = _phase(kh, dilation[0], sh), _phase(kw, dilation[1], sw)
    keyed: dict[tuple[int, ...], list[tuple[int, int, int, int]]] = {}
    for a in range(kh * kw):
        (ri, qi), (rj, qj) = rows[a // kw], cols[a % kw]
        for b in range(a, kh * kw):
            (ri2, qi2), (rj2, qj2) = rows[b // kw], cols[b % kw]
            key = (ri, ri2, qi2 - qi, rj, rj2, qj2 - qj)
            keyed.setdefault(key, []).append((a, b, qi, qj))
    groups = []
    for (ri, ri2, dr, rj, rj2, dc), members in keyed.items():
        t0, t1 = max(m[2] for m in members), min(m[2] for m in members) + nh
        c0, c1 = max(m[3] for m in members), min(m[3] for m in members) + nw
        t1, c1 = max(t0, t1), max(c0, c1)  # windows that do not intersect: an empty core
        core = (t0, t1 - t0, c0, c1 - c0) if t1 > t0 and c1 > c0 else None
        pairs = []
        for a, b, qi, qj in members:
            extras = [(t, n, qj, nw) for t, n in _outside(qi, nh, t0, t1)]
            extras += [(t0, t1 - t0, c, n) for c, n in _outside(qj, nw, c0, c1) if t1 > t0]
            pairs.append((a, b, tuple(extras)))
        shift = (sh * dr + ri2 - ri, sw * dc + rj2 - rj)
        groups.append(_Group((ri, rj), shift, core, tuple(pairs)))
    return tuple(groups)


def _padded_channels_last(
    module: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype, factor: torch.Tensor | None
) -> torch.Tensor:
    """``(B, H_pad, W_pad, C)`` contiguous: the input padded as the layer pads it, cast to
    ``dtype`` (multiplied by ``factor`` first when given)."""
    left, right, top, bottom = module._reversed_padding_repeated_twice
    if module.padding_mode != "zeros":
        x = F.pad(x, (left, right, top, bottom), mode=module.padding_mode)
        left = right = top = bottom = 0
    batch, channels, height, width = x.shape
    shape = (batch, height + top + bottom, width + left + right, channels)
    padding = any((left, right, top, bottom))
    image = (torch.zeros if padding else torch.empty)(shape, dtype=dtype, device=x.device)
    if factor is not None:  # scaled in float32 before the cast to the low precision
        x = torch.empty_like(x, dtype=torch.float32).copy_(x).mul_(factor)
    # Written through a view of the image (no view of x is made: x may be channels-last).
    image.permute(0, 3, 1, 2)[:, :, top : top + height, left : left + width].copy_(x)
    return image


def _take(
    image: torch.Tensor, rects: tuple[Rect, ...], origin: tuple[int, int], stride
) -> torch.Tensor:
    """The pixels of ``rects`` (window coordinates: pixel ``origin + stride·(t, τ)``) of the
    ``(B, H_pad, W_pad, C)`` image, as ``(B·count, C)`` rows."""
    (y, x), (sh, sw), channels = origin, stride, image.shape[-1]
    parts = [
        image[
            :,
            y + sh * t : y + sh * (t + nt - 1) + 1 : sh,
            x + sw * c : x + sw * (c + nc - 1) + 1 : sw,
        ].reshape(-1, channels)
        for t, nt, c, nc in rects
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _product(
    image: torch.Tensor, group: _Group, rects: tuple[Rect, ...], stride, acc: torch.dtype
) -> tuple[torch.Tensor, int]:
    """``Σ left·rightᵀ`` over the pixels of ``rects`` as a ``(C, C)`` matrix in ``acc``, and the
    bytes of the two gathered operands."""
    (rh, rw), (dy, dx) = group.phase, group.shift
    lhs = _take(image, rects, (rh, rw), stride)
    rhs = _take(image, rects, (rh + dy, rw + dx), stride)
    copies = 2 if len(rects) > 1 else 1  # the concatenated parts and their concatenation
    return (lhs.T @ rhs).to(acc), 2 * copies * lhs.numel() * lhs.element_size()


def _low_precision_scale(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``σ/√N`` for 16-bit statistics: ``σ`` a power of two with ``σ·max(|x|, 1) ≤ 1`` and ``N``
    the pixels of the padded batch, so that no partial sum of products leaves ``[-1, 1]``
    (Cauchy–Schwarz). A 0-d float32 tensor on ``x``'s device (no host synchronisation)."""
    left, right, top, bottom = module._reversed_padding_repeated_twice
    n_est = x.shape[0] * (x.shape[2] + top + bottom) * (x.shape[3] + left + right)
    amax = torch.maximum(x.detach().abs().amax().float(), torch.ones((), device=x.device))
    return power_of_two_scale(amax) / math.sqrt(n_est)


def _shifted_gemm_moment(
    module: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype, factor: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Any stride and dtype: ``(Σ_rows p pᵀ, totals, working_bytes)`` from one GEMM per group of
    offset pairs plus strips (module docstring), and the batch-summed padded image ``totals``
    ``(H_pad, W_pad, C)``. 16-bit inputs are multiplied by ``factor`` first (the results stay
    scaled: by ``factor²`` and ``factor``), and the products are accumulated in float32."""
    acc = compute_dtype(dtype) if dtype in LOW_PRECISION else dtype
    channels = x.shape[1]
    image = _padded_channels_last(module, x, dtype, factor)
    kernel, dilation, stride = (
        tuple(module.kernel_size),
        tuple(module.dilation),
        tuple(module.stride),
    )
    out = _output_size(image.shape[1:3], kernel, dilation, stride)
    size = kernel[0] * kernel[1]
    blocks = torch.zeros(size, size, channels, channels, dtype=acc, device=x.device)
    operands = 0
    for group in _plan(kernel, dilation, stride, out):
        core = None
        if group.core is not None:
            core, nbytes = _product(image, group, (group.core,), stride, acc)
            operands = max(operands, nbytes)
        for a, b, extras in group.pairs:
            if core is not None:
                blocks[a, b] = core
            if extras:
                strip, nbytes = _product(image, group, extras, stride, acc)
                blocks[a, b] += strip
                operands = max(operands, nbytes)
    upper_a, upper_b = torch.triu_indices(size, size, offset=1, device=x.device)
    blocks[upper_b, upper_a] = blocks[upper_a, upper_b].transpose(-1, -2)
    width = channels * size
    inner = blocks.permute(2, 0, 3, 1).reshape(width, width)
    totals = image.sum(0, dtype=acc)  # (H_pad, W_pad, C): the batch-summed image
    copies = (module.padding_mode != "zeros") + (factor is not None)  # padded / scaled input
    working = image.numel() * image.element_size() + copies * image.numel() * 4
    working += operands + 3 * blocks.numel() * blocks.element_size()  # blocks, their copies
    return inner, totals, working + totals.numel() * totals.element_size()


def _output_size(padded: tuple[int, int], kernel, dilation, stride) -> tuple[int, int]:
    return tuple(
        (n - d * (k - 1) - 1) // s + 1
        for n, k, d, s in zip(padded, kernel, dilation, stride, strict=True)
    )


def patch_second_moment(
    module: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, int, int]:
    """``(M, S, working_bytes)``: ``M = Σ_rows r rᵀ / N`` over the ``N = B·H_out·W_out`` patches
    ``r = [p, 1]`` of ``module`` applied to ``x`` (``(B, C, H, W)``, any memory format), the
    ``1`` only when the layer has a bias; shape ``(C·kh·kw [+1])²``, columns ``(c, i, j)``.

    Stride 1 (except float16): from the input's autocorrelation (:mod:`.conv_correlation`,
    convolution weight-gradient kernels); otherwise from shifted GEMMs (module docstring).
    bfloat16/float16 inputs are first scaled by ``σ/√N`` (:func:`_low_precision_scale`, as
    :func:`~kfac_train.kfac.precision.gram_mean` does), so no partial sum leaves ``[-1, 1]``,
    and ``M`` is returned in float32. ``S = H_out·W_out``;
    ``working_bytes`` is the largest transient this call held (padded copy, operands, blocks).
    """
    kernel, dilation, stride = (
        tuple(module.kernel_size),
        tuple(module.dilation),
        tuple(module.stride),
    )
    factor = _low_precision_scale(module, x) if dtype in LOW_PRECISION else None
    # float16 keeps the shifted GEMMs: its weight-gradient kernels lose precision on CPU
    # (relative error 1.4e-3 against 1.7e-4) and are slower there for wide layers.
    if stride == (1, 1) and dtype != torch.float16:
        inner, totals, working = stride_one_moment(module, x, dtype, factor)
    else:
        inner, totals, working = _shifted_gemm_moment(module, x, dtype, factor)
    if factor is not None:
        inner, totals = inner / (factor * factor), totals / factor
    out = _output_size(totals.shape[:2], kernel, dilation, stride)
    rows = x.shape[0] * out[0] * out[1]
    width, bias = inner.shape[0], module.bias is not None
    moment = torch.empty(width + bias, width + bias, dtype=inner.dtype, device=x.device)
    moment[:width, :width] = inner
    if bias:
        (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
        sums = torch.stack(
            [
                totals[
                    dh * i : dh * i + sh * (out[0] - 1) + 1 : sh,
                    dw * j : dw * j + sw * (out[1] - 1) + 1 : sw,
                ].sum((0, 1))
                for i in range(kh)
                for j in range(kw)
            ],
            dim=1,
        ).reshape(width)  # (C, kh·kw) → columns (c, i, j)
        moment[:width, width] = sums
        moment[width, :width] = sums
        moment[width, width] = rows
    working += 2 * moment.numel() * moment.element_size()
    return moment / rows, out[0] * out[1], working
