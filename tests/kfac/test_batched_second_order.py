"""The batched second-order phase (``kfac_train/kfac/batched.py``, docs/kfac.md "Batching").

Contract: equal-size decompositions are computed as one stacked batch and give the same
decompositions as one at a time; whether a result is usable is decided on the device, and an
inverse-update step reads every verdict with one host synchronisation; a non-finite factor is
handed back to the per-factor path (retry, fallback) without spoiling the others; layers of equal
shapes are preconditioned together and match the dense float64 reference; the KL-clip sum is
``Σ ⟨V, ∇⟩`` without float64 copies.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner
from kfac_train.kfac.batched import StackedPreconditioner, decompose_all, kl_terms
from kfac_train.kfac.placement import update_second_order

from . import oracle

# Setup: expectations built in kfac-math.md's "mean" convention (the library default before
# issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")

LAYERS = ["0", "2", "4", "6"]


def _spd(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=generator, dtype=torch.float64)
    return x.T @ x / (3 * n)


def _model() -> nn.Sequential:
    """Three hidden layers of the same shape (6 × 7 with the bias column): one stacked group."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).double()


def _run_backward(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=generator)
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()


def test_batched_eigendecompositions_reconstruct_every_factor_of_every_size() -> None:
    factors = [_spd(n, seed) for seed, n in enumerate([4, 6, 4, 4, 6])]
    results = decompose_all("eigh", [(f, None) for f in factors])
    for factor, (d, Q) in zip(factors, results, strict=True):
        torch.testing.assert_close(Q @ torch.diag(d) @ Q.T, factor, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d, torch.linalg.eigvalsh(factor).clamp_min(0))


def test_batched_damped_inverses_use_each_factors_own_damping() -> None:
    factors = [_spd(5, seed) for seed in range(3)]
    dampings = [1e-2, torch.tensor(0.5, dtype=torch.float64), 3.0]
    results = decompose_all("inverse", list(zip(factors, dampings, strict=True)))
    for factor, lam, inverse in zip(factors, dampings, results, strict=True):
        damped = factor + float(lam) * torch.eye(5, dtype=torch.float64)
        torch.testing.assert_close(inverse @ damped, torch.eye(5, dtype=torch.float64))


def test_a_non_finite_factor_goes_to_the_per_factor_path_alone() -> None:
    factors = [_spd(4, seed) for seed in range(3)]
    factors[1] = factors[1].clone()
    factors[1][0, 0] = float("nan")
    for kind, damping in (("eigh", None), ("inverse", 1e-2)):
        results = decompose_all(kind, [(f, damping) for f in factors])
        assert results[1] is None, kind
        assert results[0] is not None and results[2] is not None, kind


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_an_inverse_update_step_synchronises_the_host_once(method: str, monkeypatch) -> None:
    model = _model().float()
    pre = KFACPreconditioner(model, compute_method=method, kl_clip=None)
    for block in pre.blocks.values():  # factors as after a factor update
        for factor in block.factors():
            n = factor.running.shape[0]
            factor.running = _spd(n, n).float()
    syncs = []
    for name in ("__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            syncs.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    update_second_order(pre.blocks, pre.plan, pre.comm, 1e-2)
    monkeypatch.undo()
    assert len(syncs) == 1, syncs
    assert all(block.has_second_order() for block in pre.blocks.values())


@pytest.mark.parametrize(
    ("method", "precondition_dtype", "bounds"),
    [
        ("eigen", None, (0.0, 1e-9)),
        ("inverse", None, (0.0, 1e-9)),
        # bfloat16 products (float32 accumulation) on float64 data: they alone limit accuracy.
        # The eigen method only: with the inverse method they are refused (test_low_precision).
        ("eigen", torch.bfloat16, (1e-5, 5e-2)),
    ],
)
def test_equal_shape_layers_preconditioned_together_match_the_dense_reference(
    method, precondition_dtype, bounds
) -> None:
    # Layers "0", "2", "4" form a stacked group, "6" is preconditioned alone.
    model, damping = _model(), 1e-2
    factors, grads = oracle.batch_statistics(copy.deepcopy(model), model, LAYERS, _run_backward)
    pre = KFACPreconditioner(
        model,
        damping=damping,
        factor_decay=0.0,
        kl_clip=None,
        compute_method=method,
        factor_dtype=torch.float64,
        inv_dtype=torch.float64,
        precondition_dtype=precondition_dtype,
    )
    model.zero_grad()
    _run_backward(model)
    pre.step()
    low, high = bounds
    for name in LAYERS:
        expected = oracle.preconditioned(method, *factors[name], grads[name], damping)
        actual = oracle.gradient_matrix(dict(model.named_modules())[name])
        assert actual.dtype == torch.float64, name  # written back in the gradient's dtype
        assert low <= oracle.relative_error(actual, expected) < high, name


def test_the_stacked_data_follows_an_in_place_change_of_a_members_data() -> None:
    model = _model()
    pre = KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64)
    model.zero_grad()
    _run_backward(model)
    pre.step()
    stacker = StackedPreconditioner()
    grads = {name: pre.blocks[name].grad() for name in LAYERS[:3]}
    work = {name: (pre.blocks[name].method, grads[name]) for name in grads}
    stacker(work)
    pre.blocks["2"].method.tensors[2].mul_(2.0)  # e.g. a broadcast received in place
    after = stacker(work)
    for name in grads:
        torch.testing.assert_close(after[name], pre.blocks[name].method.precondition(grads[name]))


def test_the_kl_sum_is_the_float64_sum_of_inner_products() -> None:
    generator = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator))
        for _ in range(4)
    ]
    expected = sum((V.double() * g.double()).sum() for V, g in pairs)
    torch.testing.assert_close(kl_terms(pairs), expected, rtol=1e-6, atol=0)
    assert kl_terms(pairs).dtype == torch.float64
