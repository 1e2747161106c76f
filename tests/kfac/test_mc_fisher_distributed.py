"""The Monte-Carlo Fisher (``kfac.fisher=mc``) under `DistributedDataParallel` on 2 gloo ranks.

The engine's sequence per micro-batch, run here on a DDP-wrapped model: the forward inside
`StatisticsCapture.sampled_output_grads`, then `add_sampled_output_grads` with the losses of
sampled labels (``torch.autograd.grad`` w.r.t. the recorded layer outputs only), then the true
loss's backward, which DDP all-reduces. The draws are fixed in advance (one label tensor per
rank and draw), so the reference is exact: a sampled label's output gradient is the output
gradient of the cross-entropy with that label, and in the per-example convention (docs/kfac.md)

    G = (1/D) Σ_d (1/N) Σ_n g_{n,d} g_{n,d}ᵀ   over the N examples of *all* ranks,

with ``g_{n,d}`` the gradient of example ``n``'s own loss for draw ``d`` w.r.t. the layer output.
The dense float64 oracle (``oracle.capture_layers``, a hook-free copy) builds it per draw from the
global batch. Checked: every rank's ``G`` equals it, ``A`` is the true-input factor as usual, the
gradient K-FAC preconditions is the true loss's (DDP's average), and the preconditioned update
is the oracle's ``(A ⊗ G + λI)⁻¹``-product of that gradient. Sensitivity: the true labels' ``G``
and the rank-local ``G`` both differ from the result, so a ``G`` taken from the wrong loss or
left unreduced would fail.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfac_train.kfac import KFACPreconditioner

from . import oracle
from .dist_utils import run_distributed

WORLD, LOCAL_BATCH, DRAWS, CLASSES, DAMPING = 2, 5, 2, 4, 0.05
LAYERS = ("0", "2")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, CLASSES)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (WORLD, B, 3), true labels (WORLD, B) and drawn labels (WORLD, DRAWS, B)."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD, LOCAL_BATCH, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(CLASSES, (WORLD, LOCAL_BATCH), generator=generator)
    drawn = torch.randint(CLASSES, (WORLD, DRAWS, LOCAL_BATCH), generator=generator)
    return x, y, drawn


def _rank_step(x: torch.Tensor, y: torch.Tensor, drawn: torch.Tensor) -> dict[str, torch.Tensor]:
    """One factor- and inverse-update step on this rank's micro-batch; its factors and update."""
    rank = dist.get_rank()
    model = DistributedDataParallel(_model())
    pre = KFACPreconditioner(
        model,
        factor_decay=0.0,  # the running factors are this step's statistics
        damping=DAMPING,
        kl_clip=None,
        grad_scaling="per_example",
        compute_method="inverse",
        factor_dtype=torch.float64,
        inv_dtype=torch.float64,
    )
    with pre.capture.sampled_output_grads():
        logits = model(x[rank])
    pre.capture.add_sampled_output_grads([F.cross_entropy(logits, d) for d in drawn[rank]])
    F.cross_entropy(logits, y[rank]).backward()
    grads = {f"grad/{n}": p.grad.clone() for n, p in model.module.named_parameters()}
    pre.step()
    out = {f"update/{n}": p.grad.clone() for n, p in model.module.named_parameters()}
    for name in LAYERS:
        out[f"A/{name}"] = pre.blocks[name].A.running.clone()
        out[f"G/{name}"] = pre.blocks[name].G.running.clone()
    return {**out, **grads}


def _oracle_g(labels: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example ``G`` of each layer for the loss with `labels` on the examples `x`."""
    model = _model()
    captured = oracle.capture_layers(
        model, LAYERS, lambda m: F.cross_entropy(m(x), labels).backward()
    )
    modules = dict(model.named_modules())
    return {n: oracle.per_example_factors(modules[n], captured[n])[1] for n in LAYERS}


def _oracle_reference(x: torch.Tensor, y: torch.Tensor, drawn: torch.Tensor) -> dict:
    everyone = x.reshape(-1, 3)
    per_draw = [_oracle_g(drawn[:, d].reshape(-1), everyone) for d in range(DRAWS)]
    sampled = {n: sum(g[n] for g in per_draw) / DRAWS for n in LAYERS}
    model = _model()
    captured = oracle.capture_layers(
        model, LAYERS, lambda m: F.cross_entropy(m(everyone), y.reshape(-1)).backward()
    )
    modules = dict(model.named_modules())
    factors = {n: oracle.per_example_factors(modules[n], captured[n])[0] for n in LAYERS}
    grads = {n: oracle.gradient_matrix(modules[n]) for n in LAYERS}
    updates = {
        n: oracle.inverse_preconditioned(factors[n], sampled[n], grads[n], DAMPING) for n in LAYERS
    }
    return {
        "A": factors,
        "G": sampled,
        "G_true_labels": _oracle_g(y.reshape(-1), everyone),
        "G_rank0_only": {
            n: sum(_oracle_g(drawn[0, d], x[0])[n] for d in range(DRAWS)) / DRAWS for n in LAYERS
        },
        "grads": grads,
        "updates": updates,
        "model": copy.deepcopy(model),
    }


def test_two_ranks_take_g_from_the_drawn_labels_of_the_whole_batch_and_the_true_gradient():
    x, y, drawn = _data()
    ranks = run_distributed(_rank_step, WORLD, x, y, drawn)
    expected = _oracle_reference(x, y, drawn)
    modules = dict(expected["model"].named_modules())
    for rank, result in enumerate(ranks):
        for name in LAYERS:
            g = result[f"G/{name}"]
            torch.testing.assert_close(g, expected["G"][name], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(result[f"A/{name}"], expected["A"][name], rtol=1e-10, atol=0)
            assert oracle.relative_error(g, expected["G_true_labels"][name]) > 1e-2, (rank, name)
            assert oracle.relative_error(g, expected["G_rank0_only"][name]) > 1e-2, (rank, name)
            layer = modules[name]
            grad = torch.cat(
                [result[f"grad/{name}.weight"], result[f"grad/{name}.bias"].unsqueeze(1)], dim=1
            )
            torch.testing.assert_close(grad, expected["grads"][name], rtol=1e-10, atol=1e-14)
            update = torch.cat(
                [result[f"update/{name}.weight"], result[f"update/{name}.bias"].unsqueeze(1)],
                dim=1,
            )
            assert update.shape == (layer.out_features, layer.in_features + 1)
            torch.testing.assert_close(update, expected["updates"][name], rtol=1e-8, atol=1e-12)
    for key in ranks[0]:
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0)
