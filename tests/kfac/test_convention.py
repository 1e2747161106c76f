"""The default factor convention: the Kronecker block approximates the per-example Fisher.

``A ⊗ G ≈ F = (1/C) Σ_n vec(∇ℓ_n) vec(∇ℓ_n)ᵀ`` for a loss that averages ``C`` per-example losses
``ℓ_n`` (docs/kfac.md, "Factor conventions"). Checked against the dense float64 oracle three ways:

* the factors equal their definition (``oracle.per_example_factors``) for Linear, sequence
  Linear and Conv2d layers of every shape the dense-reference tests use;
* on data where the Kronecker factorisation is exact (one input shared by every example and
  location; output gradients decorrelated across locations by a Hadamard pattern) ``A ⊗ G``
  equals the per-example Fisher built from per-example gradients computed one example at a time;
* the factors do not depend on how the examples are split: over micro-batches (accumulation) or
  over 2 gloo ranks they equal those of the whole batch in one pass.

Also: the "mean" convention stays available and differs, and a damping that swamps the curvature
is reported once per layer.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner

from . import oracle
from .dist_utils import run_distributed
from .models import small_cnn
from .test_dense_reference import LAYER_CASES

FLOAT64 = {"factor_dtype": torch.float64, "inv_dtype": torch.float64}
TOLERANCE = 1e-10


def _mean_squared_error(inputs: torch.Tensor, target: torch.Tensor):
    """``mean_n ½‖model(x_n) − t_n‖²``: a loss that averages over the leading dimension."""

    def run_backward(model: nn.Module) -> None:
        per_example = 0.5 * ((model(inputs) - target) ** 2).flatten(1).sum(1)
        per_example.mean().backward()

    return run_backward


def _kfac_factors(pre: KFACPreconditioner, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = pre.layers[name]
    return layer.A.running, layer.G.running


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = oracle.relative_error(actual, expected)
    assert error < TOLERANCE, f"{what}: relative error {error:.2e}"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_default_factors_are_the_per_example_definition(case: str) -> None:
    builder, input_shape = LAYER_CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(builder(), nn.Tanh()).double()
    inputs = torch.randn(input_shape, dtype=torch.float64)
    target = torch.randn_like(model(inputs))
    run_backward = _mean_squared_error(inputs, target)
    capture = oracle.capture_layers(copy.deepcopy(model), ["0"], run_backward)["0"]
    expected_A, expected_G = oracle.per_example_factors(model[0], capture)
    mean_A, mean_G = oracle.layer_factors(model[0], capture, "mean")

    pre = KFACPreconditioner(model, factor_decay=0.0, **FLOAT64)  # the default convention
    run_backward(model)
    pre.step()

    A, G = _kfac_factors(pre, "0")
    _assert_close(A, expected_A, "A")
    _assert_close(G, expected_G, "G")
    # Not the old convention: G differs by orders of magnitude (C² for Linear, more for conv).
    assert oracle.relative_error(G, mean_G) > 0.5
    if isinstance(model[0], nn.Conv2d):
        assert oracle.relative_error(A, mean_A) > 0.5  # locations averaged, not 1/S² scaled


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("case", ["linear-3d-bias", "conv-pad-stride-dilation-2x3"])
def test_default_step_matches_the_dense_per_example_reference(case: str, method: str) -> None:
    builder, input_shape = LAYER_CASES[case]
    torch.manual_seed(1)
    model = nn.Sequential(builder(), nn.Tanh()).double()
    inputs = torch.randn(input_shape, dtype=torch.float64)
    target = torch.randn_like(model(inputs))
    run_backward = _mean_squared_error(inputs, target)
    reference = copy.deepcopy(model)
    capture = oracle.capture_layers(reference, ["0"], run_backward)["0"]
    A, G = oracle.per_example_factors(reference[0], capture)
    grad = oracle.gradient_matrix(reference[0])
    damping = oracle.damping_inside_spectrum(method, A, G)
    oracle.assert_sensitive_to_both_factors(method, A, G, grad, damping)
    expected = oracle.preconditioned(method, A, G, grad, damping)

    pre = KFACPreconditioner(
        model, damping=damping, factor_decay=0.0, kl_clip=None, compute_method=method, **FLOAT64
    )
    run_backward(model)
    pre.step()
    _assert_close(oracle.gradient_matrix(model[0]), expected, "preconditioned gradient")


# ------------------------------------------------------------------ exact factorisation cases
HADAMARD = torch.tensor(
    [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
)


def _hadamard_coefficients(examples: int, locations: int, features: int) -> torch.Tensor:
    """``w[n, t] = ε[n, t]·u_t`` with ``Σ_n ε[n,t] ε[n,t'] = C·δ(t, t')``: per-example output
    gradients whose cross-location terms cancel over the batch (KFC's assumption, made exact)."""
    torch.manual_seed(7)
    u = torch.randn(locations, features, dtype=torch.float64)
    return HADAMARD[:examples, :locations, None] * u[None]


def _exact_case(kind: str):
    """(model, per-example losses ``model -> (C,)`` from one forward of the whole batch, C)."""
    torch.manual_seed(3)
    examples = 4
    if kind == "linear":
        layer = nn.Linear(3, 2).double()
        x = torch.randn(1, 3, dtype=torch.float64).expand(examples, 3)  # one shared input
        labels = torch.tensor([0, 1, 1, 0])

        def losses(model: nn.Module) -> torch.Tensor:
            return nn.functional.cross_entropy(model(x), labels, reduction="none")

    elif kind == "sequence-linear":
        layer = nn.Linear(3, 2).double()
        x = torch.randn(1, 1, 3, dtype=torch.float64).expand(examples, 4, 3)  # (C, T=4, in)
        w = _hadamard_coefficients(examples, 4, 2)

        def losses(model: nn.Module) -> torch.Tensor:
            return (model(x) * w).sum(dim=(1, 2))

    else:  # conv: a spatially constant image, 2×2 kernel on 3×3 → S = 4 identical patches
        layer = nn.Conv2d(2, 3, kernel_size=2).double()
        x = torch.randn(1, 2, 1, 1, dtype=torch.float64).expand(examples, 2, 3, 3)
        w = _hadamard_coefficients(examples, 4, 3).reshape(examples, 2, 2, 3).permute(0, 3, 1, 2)

        def losses(model: nn.Module) -> torch.Tensor:
            return (model(x) * w).sum(dim=(1, 2, 3))

    return nn.Sequential(layer), losses, examples


@pytest.mark.parametrize("kind", ["linear", "sequence-linear", "conv"])
def test_kronecker_block_equals_the_per_example_fisher_where_it_is_exact(kind: str) -> None:
    model, losses, examples = _exact_case(kind)
    fisher = oracle.per_example_fisher(
        copy.deepcopy(model), "0", lambda m, n: losses(m)[n], examples
    )
    assert fisher.abs().max() > 1e-3  # a non-trivial block

    blocks = {}
    for convention in ("per_example", "mean"):
        m = copy.deepcopy(model)
        pre = KFACPreconditioner(m, factor_decay=0.0, grad_scaling=convention, **FLOAT64)
        losses(m).mean().backward()  # the loss averages over the C examples
        pre.step()
        blocks[convention] = torch.kron(*_kfac_factors(pre, "0"))
    _assert_close(blocks["per_example"], fisher, "A ⊗ G vs the per-example Fisher")
    assert oracle.relative_error(blocks["mean"], fisher) > 0.9  # the old convention is off


# ------------------------------------------------------------------ split invariance
def _cnn_batch(size: int = 8):
    torch.manual_seed(11)
    return torch.randn(size, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (size,))


def _one_batch_factors(model: nn.Module, inputs, labels) -> dict[str, tuple]:
    reference = copy.deepcopy(model)
    captures = oracle.capture_layers(
        reference,
        ["conv", "head"],
        lambda m: nn.functional.cross_entropy(m(inputs), labels).backward(),
    )
    modules = dict(reference.named_modules())
    return {n: oracle.per_example_factors(modules[n], c) for n, c in captures.items()}


def test_accumulated_micro_batches_give_the_factors_of_the_whole_batch() -> None:
    model = small_cnn().double()
    inputs, labels = _cnn_batch()
    expected = _one_batch_factors(model, inputs, labels)
    pre = KFACPreconditioner(model, factor_decay=0.0, accumulation_steps=4, **FLOAT64)
    for x, y in zip(inputs.split(2), labels.split(2), strict=True):
        (nn.functional.cross_entropy(model(x), y) / 4).backward()
    pre.step()
    for name, (A, G) in expected.items():
        _assert_close(_kfac_factors(pre, name)[0], A, f"{name}.A")
        _assert_close(_kfac_factors(pre, name)[1], G, f"{name}.G")


def _two_rank_factors(state: dict, inputs: torch.Tensor, labels: torch.Tensor) -> dict:
    import torch.distributed as dist

    model = small_cnn().double()
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)
    pre = KFACPreconditioner(ddp, factor_decay=0.0, **FLOAT64)
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = inputs.chunk(world)[rank], labels.chunk(world)[rank]
    nn.functional.cross_entropy(ddp(x), y).backward()
    pre.step()
    return {n: [t.clone() for t in _kfac_factors(pre, n)] for n in ("conv", "head")}


def test_two_ranks_give_the_factors_of_the_whole_batch() -> None:
    model = small_cnn().double()
    inputs, labels = _cnn_batch()
    expected = _one_batch_factors(model, inputs, labels)
    per_rank = run_distributed(_two_rank_factors, 2, model.state_dict(), inputs, labels)
    for factors in per_rank:
        for name, (A, G) in expected.items():
            _assert_close(factors[name][0], A, f"{name}.A")
            _assert_close(factors[name][1], G, f"{name}.G")


# ------------------------------------------------------------------ swamped curvature
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_damping_that_swamps_the_curvature_is_reported_once_per_layer(method: str) -> None:
    model = small_cnn().double()
    inputs, labels = _cnn_batch()

    def run(pre: KFACPreconditioner, steps: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                model.zero_grad()
                nn.functional.cross_entropy(model(inputs), labels).backward()
                pre.step()
        return [str(w.message) for w in caught if "swamps" in str(w.message)]

    # "mean" convention: conv G ~ 1e-9 here, so damping 1e-3 exceeds max eig(A)·max eig(G)
    # by far more than 100x; three inverse updates, reported once for each layer.
    swamped = KFACPreconditioner(
        model, grad_scaling="mean", damping=1e-3, factor_decay=0.0, compute_method=method
    )
    messages = run(swamped, steps=3)
    swamped.remove_hooks()
    assert len(messages) == 1 and "'conv'" in messages[0], messages
    assert "damping=0.001" in messages[0]
    # the per-example convention with the same damping: curvature on the damping's scale.
    assert run(KFACPreconditioner(model, damping=1e-3, compute_method=method), steps=2) == []
