"""Stride-1 convolution patch second moments from the input's autocorrelation.

For a stride-1 ``nn.Conv2d`` (kernel ``kh × kw``, dilation ``d``, zero padding ``p`` before and
after; other padding modes are applied to the input first, leaving ``p = 0``) the left factor of
output position ``u`` at kernel offset ``i`` (per dimension) is the input pixel
``t = u + d·i − p``, so the ``C × C`` block of the patch second moment for offsets ``a = (i, j)``,
``b = (i', j')`` is

    B(a, b) = Σ_n Σ_{t ∈ W_a} x[n, :, t] x[n, :, t + δ]ᵀ,   δ = d·(b − a),

where ``W_a = W_i × W_j`` with ``W_i = [d·i − p, d·i − p + H_out)`` (pixels outside the image
are zeros). Split the sum over the whole image:

    B(a, b) = R(δ) − R_{E_i × ·}(δ) − R_{· × E_j}(δ) + R_{E_i × E_j}(δ),

with ``R_S(δ) = Σ_n Σ_{t ∈ S} x[t] x[t + δ]ᵀ`` and ``E_i = [0, H) \\ W_i`` (the rows the window
misses: at most ``|d·i − p|`` of them, for "same" padding one row on one side). Every ``R_S``
for all ``(2kh − 1)(2kw − 1)`` shifts at once is one call of the convolution weight-gradient
kernel (``torch.nn.grad.conv2d_weight``: ``S``'s pixels as the output gradient, the zero-padded
image as the input, a ``(2kh − 1) × (2kw − 1)`` kernel with dilation ``d``): for a 3×3 "same"
convolution that is 2 full-image calls (the last rows apart, so no padded copy is made) plus
8 calls on one-pixel-wide strips. Since ``R(−δ) = R(δ)ᵀ`` the full image is correlated for
``δh ≥ 0`` only, so ``R`` costs ``(2k − 1)/k`` (about 1.7x) a layer's own weight gradient, with no
patch copy and no per-shift GEMMs. ``conv_stats.patch_second_moment`` uses this for stride-1
layers in float32, float64 and bfloat16, and keeps its shifted-GEMM path for strides > 1 and
float16. In bfloat16 each kernel's result is rounded once and the strips are subtracted in
float32: the strips are a few rows of the image, so the subtraction amplifies that rounding by
little (relative error 1.4e-3 measured, as for the shifted GEMMs, at 3x their speed on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .precision import LOW_PRECISION, compute_dtype

Interval = tuple[int, int]  # (first, count)


def _missed(size: int, first: int, count: int) -> list[Interval]:
    """The intervals of ``[0, size)`` outside the window ``[first, first + count)``."""
    end = first + count
    parts = [(0, min(size, first)), (max(0, end), size - max(0, end))]
    return [(a, n) for a, n in parts if n > 0]


def _shifts(first: int, count: int, size: int, needed: range, dilation: int) -> range:
    """The shifts ``δ`` of ``needed`` (multiples of ``dilation``) for which some pixel
    ``t ∈ [first, first + count)`` has its partner ``t + δ`` inside ``[0, size)``."""
    lo, hi = max(needed.start, -(first + count - 1)), min(needed.stop - 1, size - 1 - first)
    lo, hi = -(-lo // dilation) * dilation, hi // dilation * dilation  # onto the multiples
    return range(lo, hi + 1, dilation) if hi >= lo else range(0)


def _correlation(
    x: torch.Tensor, rows: Interval, cols: Interval, shifts: tuple[range, range]
) -> torch.Tensor:
    """``R_S(δ) = Σ_{n, t ∈ S} x[n, :, t] x[n, :, t + δ]ᵀ`` (pixels outside ``x`` are zeros) for
    the rectangle ``S = rows × cols`` and every ``δ`` of ``shifts`` (two ranges with steps of
    the dilation), as a ``(len(δh), len(δw), C, C)`` tensor: one weight-gradient kernel call
    with ``S``'s pixels as the output gradient and the pixels they reach as the input."""
    (r0, nr), (c0, nc), (sh, sw) = rows, cols, shifts
    height, width = x.shape[2], x.shape[3]
    top, left = r0 + sh.start, c0 + sw.start  # the input window, possibly beyond the image
    bottom, right = r0 + nr + sh[-1], c0 + nc + sw[-1]
    window = x[:, :, max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    pads = [max(0, -left), max(0, right - width), max(0, -top), max(0, bottom - height)]
    # Zeros on both sides go to the kernel's own padding (no copy; faster kernels), the rest
    # into an explicit pad.
    even = (min(pads[2], pads[3]), min(pads[0], pads[1]))
    extra = (pads[0] - even[1], pads[1] - even[1], pads[2] - even[0], pads[3] - even[0])
    source = F.pad(window, extra) if any(extra) else window
    target = x[:, :, r0 : r0 + nr, c0 : c0 + nc]
    channels = x.shape[1]
    kernel = (channels, channels, len(sh), len(sw))
    grad = torch.nn.grad.conv2d_weight(
        source, kernel, target, padding=even, dilation=(sh.step, sw.step)
    )
    return grad.permute(2, 3, 0, 1)


def stride_one_moment(
    module: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(Σ_rows p pᵀ, totals, working_bytes)`` for a stride-1 ``module`` on ``x`` (``(B, C, H,
    W)``): the patch second moment *sum* (not yet divided by the row count), ``(C·kh·kw)²``
    with columns ``(c, i, j)``, and the batch-summed image padded as the layer pads it,
    ``(H_pad, W_pad, C)``, for the bias column.

    The kernels run in ``dtype``. float32/float64: the results are in ``dtype``. bfloat16/float16:
    ``x`` is first multiplied by ``scale`` in float32 (the caller's power-of-two ``σ/√N``, so
    every correlation lies in ``[-1, 1]``), each kernel's result is taken into float32, where the
    strips are subtracted and the results returned (still scaled: by ``scale²`` and ``scale``).
    """
    (kh, kw), (dh, dw) = tuple(module.kernel_size), tuple(module.dilation)
    left, right, top, bottom = module._reversed_padding_repeated_twice
    acc = compute_dtype(dtype) if dtype in LOW_PRECISION else dtype  # where results add up
    if scale is not None:
        x = torch.empty_like(x, dtype=torch.float32).copy_(x).mul_(scale)
    x = x.to(dtype)
    if module.padding_mode != "zeros":
        x = F.pad(x, (left, right, top, bottom), mode=module.padding_mode)
        left = right = top = bottom = 0
    channels, height, width = x.shape[1:]
    out_h, out_w = height + top + bottom - dh * (kh - 1), width + left + right - dw * (kw - 1)
    every = (
        range(-dh * (kh - 1), dh * (kh - 1) + 1, dh),
        range(-dw * (kw - 1), dw * (kw - 1) + 1, dw),
    )
    shape = (2 * kh - 1, 2 * kw - 1, channels, channels)

    def correlation(rows: Interval, cols: Interval, need_h: range, need_w: range) -> torch.Tensor:
        """``R_S`` on the full shift grid (zeros where no pair needs it or it is zero)."""
        sh = _shifts(*rows, height, need_h, dh)
        sw = _shifts(*cols, width, need_w, dw)
        grid = torch.zeros(shape, dtype=acc, device=x.device)
        if len(sh) and len(sw):
            ih, iw = (sh.start - every[0].start) // dh, (sw.start - every[1].start) // dw
            grid[ih : ih + len(sh), iw : iw + len(sw)] = _correlation(x, rows, cols, (sh, sw))
        return grid

    def needed(i: int, k: int, d: int) -> range:  # δ = d·(i' − i) for the offsets i' of b
        return range(-d * i, d * (k - 1 - i) + 1, d)

    missed_h = [_missed(height, dh * i - top, out_h) for i in range(kh)]
    missed_w = [_missed(width, dw * j - left, out_w) for j in range(kw)]
    # R(−δ) = R(δ)ᵀ: the full correlation is computed for δh ≥ 0 only (kh of the 2kh − 1 kernel
    # rows, about 40% less work for 3×3) and mirrored.
    # The last ``reach`` rows go apart, so the large call needs no copy of the padded image.
    ahead, reach = range(0, every[0].stop, dh), every[0].stop - 1
    if height > reach > 0:
        full = correlation((0, height - reach), (0, width), ahead, every[1])
        full += correlation((height - reach, reach), (0, width), ahead, every[1])
    else:
        full = correlation((0, height), (0, width), ahead, every[1])
    mirrored = full.flip(0, 1).transpose(-1, -2)
    full[: kh - 1] = mirrored[: kh - 1]
    zero = torch.zeros(shape, dtype=acc, device=x.device)
    by_row = torch.stack(
        [
            sum((correlation(r, (0, width), needed(i, kh, dh), every[1]) for r in m), zero)
            for i, m in enumerate(missed_h)
        ]
    )
    by_col = torch.stack(
        [
            sum((correlation((0, height), c, every[0], needed(j, kw, dw)) for c in m), zero)
            for j, m in enumerate(missed_w)
        ]
    )
    corner = torch.stack(
        [
            torch.stack(
                [
                    sum(
                        (
                            correlation(r, c, needed(i, kh, dh), needed(j, kw, dw))
                            for r in mh
                            for c in mw
                        ),
                        zero,
                    )
                    for j, mw in enumerate(missed_w)
                ]
            )
            for i, mh in enumerate(missed_h)
        ]
    )
    # Gather B(a, b) for every offset pair: a = (i, j) flattened i·kw + j.
    device = x.device
    i = torch.arange(kh, device=device).repeat_interleave(kw)
    j = torch.arange(kw, device=device).repeat(kh)
    kap_h, kap_w = i[None, :] - i[:, None] + kh - 1, j[None, :] - j[:, None] + kw - 1
    ia, ja = i[:, None], j[:, None]
    blocks = full[kap_h, kap_w] - by_row[ia, kap_h, kap_w] - by_col[ja, kap_h, kap_w]
    blocks += corner[ia, ja, kap_h, kap_w]  # (K, K, C, C): [a, b, c, c']
    size = channels * kh * kw
    moment = blocks.permute(2, 0, 3, 1).reshape(size, size)
    moment = (moment + moment.T) / 2  # B(b, a) = B(a, b)ᵀ up to rounding
    totals = F.pad(x.sum(0, dtype=acc), (left, right, top, bottom)).permute(1, 2, 0)
    element = torch.finfo(acc).bits // 8
    working = 2 * x.numel() * x.element_size()  # the padded input window of the full correlation
    working += (full.numel() * (2 + kh + kw + kh * kw) + 3 * moment.numel()) * element
    if scale is not None:
        working += x.numel() * 4  # the float32 scaled copy
    return moment, totals, working
