"""Reporting: the memory figures of a preconditioner on this rank (``memory_bytes()``) and its
layer table (``summary()``).

* ``factors``: the running statistics (every rank);
* ``second_order``: the second-order data this rank holds;
* ``transient_peak``: a bound on the extra bytes a K-FAC step allocates on top of those and of
  the plain training step, at its worst moment. It is the sum of what can be alive together:

  - the batch sums of one step and their averaged copies (both held while factors are reduced);
  - distributed: the factor all-reduce buckets (``comm_dtype``) and the gradient-broadcast
    buffers;
  - the layer gradients as matrices and their preconditioned versions (``Σ g·a``, gradient
    dtype) — all held between preconditioning and writing;
  - BatchNorm's normalised inputs ``x̂`` kept from forward to backward;
  - the largest single working set: a conv patch copy (``peak_rows_bytes``, known once a
    factor-update step has run) with its statistic, one block's fold of the running averages,
    one decomposition with the old data still alive, or one preconditioning product chain.

``tests/kfac/test_memory.py`` measures the live bytes of every tensor K-FAC allocates during a
training step (a ``TorchDispatchMode`` that follows storages until they are freed) and checks
the bound against them.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _block_working_set(block: Any) -> int:
    """The largest transient working set of one block's step phases, in bytes."""
    factors = block.factors()
    weight = block.module.weight
    grad_size = _size(weight.dtype)
    # the fused fold (torch.lerp), and on an accelerator its torch.where selection too
    fold = max(f.running_bytes() for f in factors) * (1 if weight.device.type == "cpu" else 2)
    rows = block.peak_rows_bytes + max(f.running_bytes() for f in factors)
    method = block.method
    shapes = method.shapes()
    new_data = sum(torch.Size(s).numel() for s in shapes) * _size(method.dtype)
    grad_elems = math.prod(block.grad_shape)
    # the stacked (and identity-masked) factor copies, the outputs next to the old data and,
    # for the inverse method, the Cholesky factor of the damped copy
    running = sum(f.running_bytes() for f in factors)
    decomposition = new_data + 2 * running + (2 * new_data if method.name == "inverse" else 0)
    precondition = 5 * grad_elems * grad_size
    clip = 2 * grad_elems * 8 + grad_elems * grad_size  # float64 casts and the scaled copy
    return max(fold, rows, decomposition, precondition, clip)


def memory_bytes(pre: Any) -> dict[str, int]:
    """``{"factors", "second_order", "transient_peak"}`` in bytes for preconditioner ``pre``,
    and ``"stale_history"`` (the bound on the stale schedule's two kept copies of every
    statistic) under ``stale="adaptive"``."""
    blocks = pre.blocks.values()
    factors = sum(block.factor_bytes() for block in blocks)
    second_order = sum(block.second_order_bytes() for block in blocks)
    batch_sums = sum(f.batch_bytes() for block in blocks for f in block.factors())
    grads = sum(
        math.prod(block.grad_shape) * block.module.weight.element_size() for block in blocks
    )
    x_hat = sum(block.peak_rows_bytes for block in blocks if block.replicated)
    distributed = 0
    if pre.reduction.reducer is not None:
        distributed += pre.reduction.reducer.bucket_bytes()
        if pre.plan.num_grad_workers < pre.plan.world_size:
            distributed += grads  # one flattened buffer per source
    working = max((_block_working_set(block) for block in blocks), default=0)
    transient = 2 * batch_sums + 2 * grads + x_hat + distributed + working
    figures = {"factors": factors, "second_order": second_order, "transient_peak": transient}
    if pre.reduction.schedule.adaptive:
        figures["stale_history"] = 2 * factors  # X₋₁ and X₋₂ of every statistic (.stale)
    return figures


def summary(pre: Any) -> str:
    """A table of the registered Kronecker layers with their factor shapes and bytes."""
    header = (
        f"K-FAC: {len(pre.layers)} layers, compute_method={pre.compute_method}, "
        f"world_size={pre.comm.world_size}, "
        f"gradient workers per layer={pre.plan.num_grad_workers}"
    )
    rows = [("layer", "type", "A", "G", "factor bytes")]
    for name, layer in pre.layers.items():
        a, g = layer.shape.a, layer.shape.g
        kind = type(layer.module).__name__
        a_text = f"diag {a}" if layer.shape.diagonal_a else f"{a}x{a}"
        rows.append((name, kind, a_text, f"{g}x{g}", f"{layer.factor_bytes():,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [header]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:4], widths[:4], strict=True)]
        lines.append("  ".join([*cells, r[4].rjust(widths[4])]))
    mem = memory_bytes(pre)
    lines.append(
        f"total: factors {mem['factors']:,} B, second-order {mem['second_order']:,} B, "
        f"transient peak {mem['transient_peak']:,} B"
    )
    return "\n".join(lines)
