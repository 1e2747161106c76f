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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .precision import LOW_PRECISION, compute_dtype, power_of_two_scale


@dataclass(frozen=True)
class _Group:
    """Offset pairs ``(a, b)`` (``a ≤ b``, flattened ``i·kw + j``) sharing one core product.

    ``left``/``right``: flat positions (``h·W_pad + w``) of the core's factors (empty when the
    windows do not intersect); ``pairs``: ``(a, b, extra_left, extra_right)`` with the flat
    positions of the pair's window outside the core (``None`` when there are none).
    """

    left: torch.Tensor
    right: torch.Tensor
    pairs: tuple[tuple[int, int, torch.Tensor | None, torch.Tensor | None], ...]


@dataclass(frozen=True)
class _Plan:
    """Index plan of one geometry: the groups and, per offset ``a``, its window positions."""

    groups: tuple[_Group, ...]
    windows: torch.Tensor  # (kh·kw, H_out·W_out) flat positions
    out_size: tuple[int, int]


def _phase(k: int, dilation: int, stride: int) -> list[tuple[int, int]]:
    """``(ρ_i, q_i)`` with ``d·i = s·q_i + ρ_i`` for each kernel offset ``i``."""
    return [(dilation * i % stride, dilation * i // stride) for i in range(k)]


@lru_cache(maxsize=512)
def _plan(
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    stride: tuple[int, int],
    padded: tuple[int, int],
    device: torch.device,
) -> _Plan:
    (kh, kw), (dh, dw), (sh, sw), (hp, wp) = kernel, dilation, stride, padded
    nh, nw = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    rows, cols = _phase(kh, dh, sh), _phase(kw, dw, sw)
    keyed: dict[tuple[int, ...], list[tuple[int, int, int, int]]] = {}
    for a in range(kh * kw):
        (ri, qi), (rj, qj) = rows[a // kw], cols[a % kw]
        for b in range(a, kh * kw):
            (ri2, qi2), (rj2, qj2) = rows[b // kw], cols[b % kw]
            key = (ri, ri2, qi2 - qi, rj, rj2, qj2 - qj)
            keyed.setdefault(key, []).append((a, b, qi, qj))

    def flat(t: torch.Tensor, tau: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
        return (sh * t + rh) * wp + sw * tau + rw

    groups = []
    for (ri, ri2, dr, rj, rj2, dc), members in keyed.items():
        offset = (sh * dr + ri2 - ri) * wp + sw * dc + rj2 - rj
        t0, t1 = max(m[2] for m in members), min(m[2] for m in members) + nh
        c0, c1 = max(m[3] for m in members), min(m[3] for m in members) + nw
        t1, c1 = max(t0, t1), max(c0, c1)  # windows that do not intersect: an empty core
        t, tau = torch.meshgrid(torch.arange(t0, t1), torch.arange(c0, c1), indexing="ij")
        core = flat(t, tau, ri, rj).reshape(-1)
        pairs = []
        for a, b, qi, qj in members:
            t, tau = torch.meshgrid(
                torch.arange(qi, qi + nh), torch.arange(qj, qj + nw), indexing="ij"
            )
            outside = ~((t >= t0) & (t < t1) & (tau >= c0) & (tau < c1))
            extra = flat(t[outside], tau[outside], ri, rj)
            if extra.numel() == 0:
                pairs.append((a, b, None, None))
            else:
                pairs.append((a, b, extra.to(device), (extra + offset).to(device)))
        groups.append(_Group(core.to(device), (core + offset).to(device), tuple(pairs)))
    u, v = torch.meshgrid(torch.arange(nh), torch.arange(nw), indexing="ij")
    windows = torch.stack(
        [
            ((sh * u + dh * i) * wp + sw * v + dw * j).reshape(-1)
            for i in range(kh)
            for j in range(kw)
        ]
    )
    return _Plan(tuple(groups), windows.to(device), (nh, nw))


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
    source = x.permute(0, 2, 3, 1)
    if factor is not None:
        source = source.to(torch.float32) * factor
    image[:, top : top + height, left : left + width].copy_(source)
    return image


def _product(flat: torch.Tensor, left: torch.Tensor, right: torch.Tensor, acc: torch.dtype):
    """``Σ_n Σ_k flat[n, left[k]] flat[n, right[k]]ᵀ`` as a ``(C, C)`` matrix in ``acc``, and the
    bytes of the two gathered operands."""
    channels = flat.shape[-1]
    lhs = flat.index_select(1, left).reshape(-1, channels)
    rhs = flat.index_select(1, right).reshape(-1, channels)
    return (lhs.T @ rhs).to(acc), 2 * lhs.numel() * lhs.element_size()


def patch_second_moment(
    module: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, int, int]:
    """``(M, S, working_bytes)``: ``M = Σ_rows r rᵀ / N`` over the ``N = B·H_out·W_out`` patches
    ``r = [p, 1]`` of ``module`` applied to ``x`` (``(B, C, H, W)``, any memory format), the
    ``1`` only when the layer has a bias; shape ``(C·kh·kw [+1])²``, columns ``(c, i, j)``.

    Products run in ``dtype``; bfloat16/float16 inputs are first scaled by ``σ/√N`` (``σ`` a
    power of two with ``σ·max|x| ≤ 1``, as :func:`~kfac_train.kfac.precision.gram_mean` does),
    so no partial sum leaves ``[-1, 1]``, and ``M`` is returned in float32. ``S = H_out·W_out``;
    ``working_bytes``
    is the largest transient this call held (padded copy, operands, blocks).
    """
    acc = compute_dtype(dtype) if dtype in LOW_PRECISION else dtype
    batch, channels = x.shape[0], x.shape[1]
    kernel, bias = tuple(module.kernel_size), module.bias is not None
    factor = None
    if dtype in LOW_PRECISION:
        left, right, top, bottom = module._reversed_padding_repeated_twice
        n_est = batch * (x.shape[2] + top + bottom) * (x.shape[3] + left + right)
        amax = torch.maximum(x.detach().abs().amax().float(), torch.ones((), device=x.device))
        factor = power_of_two_scale(amax) / math.sqrt(n_est)
    image = _padded_channels_last(module, x, dtype, factor)
    plan = _plan(
        kernel,
        tuple(module.dilation),
        tuple(module.stride),
        (image.shape[1], image.shape[2]),
        image.device,
    )
    rows = batch * plan.out_size[0] * plan.out_size[1]
    flat = image.view(batch, -1, channels)
    size = kernel[0] * kernel[1]
    blocks = torch.zeros(size, size, channels, channels, dtype=acc, device=x.device)
    operands = 0
    for group in plan.groups:
        core = None
        if group.left.numel():
            core, nbytes = _product(flat, group.left, group.right, acc)
            operands = max(operands, nbytes)
        for a, b, extra_left, extra_right in group.pairs:
            if core is not None:
                blocks[a, b] = core
            if extra_left is not None:
                strip, nbytes = _product(flat, extra_left, extra_right, acc)
                blocks[a, b] += strip
                operands = max(operands, nbytes)
    upper_a, upper_b = torch.triu_indices(size, size, offset=1, device=x.device)
    blocks[upper_b, upper_a] = blocks[upper_a, upper_b].transpose(-1, -2)
    width = channels * size
    moment = torch.empty(width + bias, width + bias, dtype=acc, device=x.device)
    moment[:width, :width] = blocks.permute(2, 0, 3, 1).reshape(width, width)
    if factor is not None:
        moment[:width, :width] /= factor * factor
    if bias:
        totals = flat.sum(0, dtype=acc)  # (H_pad·W_pad, C): the batch-summed image
        sums = totals[plan.windows].sum(1).T.reshape(width)  # (C, kh·kw) → columns (c, i, j)
        if factor is not None:
            sums = sums / factor
        moment[:width, width] = sums
        moment[width, :width] = sums
        moment[width, width] = rows
    working = image.numel() * image.element_size() + operands
    working += 2 * blocks.numel() * blocks.element_size()
    return moment / rows, plan.out_size[0] * plan.out_size[1], working
