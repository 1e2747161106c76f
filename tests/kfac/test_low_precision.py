"""Every dtype option either matches the float64 dense reference or is refused in one line.

The options are ``factor_dtype``, ``inv_dtype``, ``precondition_dtype`` and ``comm_dtype``, each
float64, float32, bfloat16 or float16 (``kfac_train.kfac.precision`` holds the policy). Each case
varies one option and keeps the others in float64, on a float64 model, so the option's dtype alone
limits the accuracy: the tolerance is a small multiple of that dtype's machine epsilon.

Two cases are the failures of issue 14. A convolution trained on a *mean* loss has ``G`` entries
far below float16's smallest number (asserted below): float16 factors used to round it to
zeros. A damping below ``1/65504`` makes ``1/(d_G d_Aᵀ + λ)`` overflow float16: float16 second-order
data used to write inf into ``.grad``; it is now capped at float16's largest value, with a warning,
and the capped result is compared with a float64 reference capped the same way.
"""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner

from . import oracle
from .dist_utils import run_distributed

# Setup: these expectations are built in kfac-math.md's "mean" convention (the library default
# before issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Relative error of the preconditioned gradient allowed when one option uses the dtype.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,  # eps 1.2e-7; eigendecompositions of conditioned factors amplify it
    torch.bfloat16: 5e-2,  # eps 7.8e-3
    torch.float16: 1e-2,  # eps 9.8e-4
}
METHODS = ("eigen", "inverse")
FLOAT16_TINY = torch.finfo(torch.float16).smallest_normal * 2**-10  # smallest subnormal, 6e-8
FLOAT16_MAX = torch.finfo(torch.float16).max


def _conv_problem(reduction: str, device: torch.device, seed: int = 0):
    """(model, run_backward): a 3→4 3x3 convolution then tanh, on 16 images of 3x8x8, float64.

    ``reduction="mean"``: ``F.mse_loss`` averaged over the batch and outputs (the "mean"
    convention: ``G`` is tiny). ``"sum"``: 50 × the summed squared error (``G`` of order 1).
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh()).double().to(device)
    inputs = torch.randn(16, 3, 8, 8, dtype=torch.float64, device=device)
    with torch.no_grad():
        target = torch.randn_like(model(inputs))

    def run_backward(net: nn.Module) -> None:
        dtype = next(net.parameters()).dtype
        output, wanted = net(inputs.to(dtype)), target.to(dtype)
        if reduction == "mean":
            F.mse_loss(output, wanted).backward()
        else:
            (50.0 * (output - wanted).pow(2).sum()).backward()

    return model, run_backward


def _reference(model: nn.Module, run_backward, method: str, damping: float | None = None):
    """(A, G, grad, damping) of layer "0", from a copy of ``model``; the damping (by default one
    inside the spectrum) is checked to leave the result sensitive to both factors."""
    reference = copy.deepcopy(model)
    capture = oracle.capture_layers(reference, ["0"], run_backward)["0"]
    A, G = oracle.layer_factors(reference[0], capture)
    grad = oracle.gradient_matrix(reference[0])
    if damping is None and method == "inverse" and G.abs().max() < FLOAT16_TINY:
        # One damping cannot sit inside both spectra (A of order 1, G below 1e-8): sit below G's.
        damping = 0.1 * float(torch.linalg.eigvalsh(G).min())
    elif damping is None:
        damping = oracle.damping_inside_spectrum(method, A, G)
    oracle.assert_sensitive_to_both_factors(method, A, G, grad, damping)
    return A, G, grad, damping


def _one_step(model: nn.Module, run_backward, method: str, damping: float, **dtypes):
    options = {"factor_dtype": torch.float64, "inv_dtype": torch.float64, **dtypes}
    pre = KFACPreconditioner(
        model, damping=damping, factor_decay=0.0, kl_clip=None, compute_method=method, **options
    )
    run_backward(model)
    pre.step()
    return pre, oracle.gradient_matrix(model[0])


# --- factor_dtype ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(DTYPES))
def test_factor_dtype_keeps_a_mean_loss_convolution_g_that_float16_cannot_hold(
    name: str, method: str, device: torch.device
) -> None:
    dtype = DTYPES[name]
    model, run_backward = _conv_problem("mean", device)
    A, G, grad, damping = _reference(model, run_backward, method)
    assert G.abs().max() < FLOAT16_TINY  # the case: G.to(float16) is all zeros

    pre, actual = _one_step(model, run_backward, method, damping, factor_dtype=dtype)

    expected = oracle.preconditioned(method, A, G, grad, damping)
    assert oracle.relative_error(pre.layers["0"].G.running, G) < TOLERANCE[dtype]
    assert oracle.relative_error(pre.layers["0"].A.running, A) < TOLERANCE[dtype]
    assert oracle.relative_error(actual, expected) < TOLERANCE[dtype]


def test_sixteen_bit_factors_are_accumulated_and_stored_in_float32() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        model, _ = _conv_problem("mean", torch.device("cpu"))
        pre = KFACPreconditioner(model, factor_dtype=dtype)
        assert pre.layers["0"].G.running.dtype == torch.float32
        assert pre.memory_bytes()["factors"] == (28**2 + 4**2) * 4


# --- inv_dtype ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(DTYPES))
def test_inv_dtype_matches_the_reference_when_its_range_holds_the_data(
    name: str, method: str, device: torch.device
) -> None:
    dtype = DTYPES[name]
    model, run_backward = _conv_problem("sum", device)
    damping = 1e-3  # > 1/65504: every reciprocal and inverse fits float16
    A, G, grad, _ = _reference(model, run_backward, method, damping)

    pre, actual = _one_step(model, run_backward, method, damping, inv_dtype=dtype)

    held = pre.layers["0"].method.tensors[0]  # Q_A (eigen) or (A + λI)⁻¹ (inverse)
    assert held.dtype == dtype
    expected = oracle.preconditioned(method, A, G, grad, damping)
    assert oracle.relative_error(actual, expected) < TOLERANCE[dtype]


def _capped_reference(method: str, A, G, grad, damping: float, cap: float) -> torch.Tensor:
    """float64 ``V`` with every reciprocal (eigen) or inverse entry (inverse) capped at ``cap``."""
    if method == "eigen":
        d_A, Q_A = torch.linalg.eigh(A)
        d_G, Q_G = torch.linalg.eigh(G)
        recip = (1.0 / (torch.outer(d_G.clamp_min(0), d_A.clamp_min(0)) + damping)).clamp(max=cap)
        return Q_G @ ((Q_G.T @ grad @ Q_A) * recip) @ Q_A.T
    eye_A, eye_G = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
    A_inv = torch.linalg.inv(A + damping * eye_A.to(A.device)).clamp(-cap, cap)
    G_inv = torch.linalg.inv(G + damping * eye_G.to(G.device)).clamp(-cap, cap)
    return G_inv @ grad @ A_inv


@pytest.mark.parametrize("method", METHODS)
def test_float16_inv_dtype_with_damping_below_its_range_caps_and_warns_instead_of_inf(
    method: str, device: torch.device
) -> None:
    model, run_backward = _conv_problem("mean", device)
    A, G, grad, _ = _reference(model, run_backward, method)
    damping = 1e-6  # 1/damping = 1e6 > 65504: the uncapped reciprocal overflows float16

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, actual = _one_step(model, run_backward, method, damping, inv_dtype=torch.float16)

    assert torch.isfinite(actual).all()
    messages = [str(w.message) for w in caught]
    assert any("inv_dtype=float16" in m and "bfloat16" in m for m in messages), messages
    expected = _capped_reference(method, A, G, grad, damping, FLOAT16_MAX)
    uncapped = oracle.preconditioned(method, A, G, grad, damping)
    assert oracle.relative_error(expected, uncapped) > 0.5  # the cap matters here
    assert oracle.relative_error(actual, expected) < TOLERANCE[torch.float16]


def test_a_bfloat16_model_is_preconditioned_in_float32_and_written_back_in_bfloat16() -> None:
    model, run_backward = _conv_problem("sum", torch.device("cpu"))
    model = model.to(torch.bfloat16).double()  # the weights the bfloat16 model will hold
    A, G, grad, damping = _reference(model, run_backward, "eigen")
    model = model.to(torch.bfloat16)
    pre = KFACPreconditioner(model, damping=damping, factor_decay=0.0, kl_clip=None)
    run_backward(model)
    pre.step()

    assert model[0].weight.grad.dtype == torch.bfloat16
    actual = oracle.gradient_matrix(model[0])
    # The bfloat16 forward and backward change the statistics themselves: a looser bound.
    assert oracle.relative_error(actual, oracle.preconditioned("eigen", A, G, grad, damping)) < 0.1


# --- precondition_dtype ------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(
    ("name", "method"),
    [(name, method) for name in ("float64", "float32") for method in METHODS]
    + [("bfloat16", "eigen")],  # bfloat16 with the inverse method is refused (below)
)
def test_precondition_dtype_runs_the_products_in_it_within_its_precision(
    name: str, method: str, reduction: str, device: torch.device
) -> None:
    # Factors and second-order data stay float64: the products' dtype alone limits accuracy.
    # "mean": G about 1e-19, which bfloat16 holds (float32's range).
    dtype = DTYPES[name]
    model, run_backward = _conv_problem(reduction, device)
    damping = 1e-3 if reduction == "sum" else None
    A, G, grad, damping = _reference(model, run_backward, method, damping)

    _, actual = _one_step(model, run_backward, method, damping, precondition_dtype=dtype)

    error = oracle.relative_error(actual, oracle.preconditioned(method, A, G, grad, damping))
    assert error < TOLERANCE[dtype]
    if dtype != torch.float64:  # the option is honoured: float64 products would be ~1e-12
        assert error > TOLERANCE[torch.float64]


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"comm_dtype": torch.float16}, "comm_dtype=float16: "),
        ({"factor_dtype": torch.int32}, "factor_dtype=int32: choose one of"),
        ({"inv_dtype": torch.float8_e4m3fn}, "inv_dtype=float8_e4m3fn: choose one of"),
        ({"comm_dtype": torch.complex64}, "comm_dtype=complex64: choose one of"),
        ({"precondition_dtype": torch.float16}, "precondition_dtype=float16: "),
        (
            {"precondition_dtype": torch.bfloat16, "compute_method": "inverse"},
            "precondition_dtype=bfloat16: with compute_method=inverse",
        ),
        (
            {"inv_dtype": torch.float16, "compute_method": "inverse", "factored_damping": True},
            "inv_dtype=float16: with compute_method=inverse and factored_damping",
        ),
    ],
)
def test_unsafe_or_unknown_dtypes_are_refused_in_one_line_naming_the_safe_choice(
    kwargs: dict, expected: str
) -> None:
    model, _ = _conv_problem("mean", torch.device("cpu"))
    with pytest.raises(ValueError) as error:
        KFACPreconditioner(model, **kwargs)
    message = str(error.value)
    assert message.startswith(expected) and "\n" not in message
    if "choose one of" not in message:
        assert "bfloat16" in message


# --- comm_dtype on 2 gloo ranks ---------------------------------------------------------------

COMM_CASES = {  # name: (factor_dtype, comm_dtype, dtype expected on the wire)
    "float64": (torch.float64, torch.float64, torch.float64),
    "float32": (torch.float64, torch.float32, torch.float32),
    "bfloat16": (torch.float64, torch.bfloat16, torch.bfloat16),
    "default-for-float16-factors": (torch.float16, None, torch.bfloat16),
    "default-for-bfloat16-factors": (torch.bfloat16, None, torch.bfloat16),
}


def _comm_job(inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """On every rank: one factor update of the mean-loss convolution on micro-batch ``rank``."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out = {}
    for name, (factor_dtype, comm_dtype, _) in COMM_CASES.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh()).double()
        pre = KFACPreconditioner(
            model, factor_decay=0.0, factor_dtype=factor_dtype, comm_dtype=comm_dtype
        )
        F.mse_loss(model(inputs[rank]), targets[rank]).backward()
        pre.step()
        layer = pre.layers["0"]
        out[name] = {
            "A": layer.A.running.double(),
            "G": layer.G.running.double(),
            "bytes": pre.comm_bytes()["total"]["factor_allreduce"],
        }
    return out


def test_comm_dtype_averages_factors_over_two_gloo_ranks_within_its_precision() -> None:
    torch.manual_seed(1)
    inputs = torch.randn(2, 8, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh()).double()
    with torch.no_grad():
        targets = torch.randn_like(torch.stack([model(x) for x in inputs]))
    per_rank = []
    for rank in range(2):

        def run_backward(net: nn.Module, rank: int = rank) -> None:
            F.mse_loss(net(inputs[rank]), targets[rank]).backward()

        factors, _ = oracle.batch_statistics(copy.deepcopy(model), model, ["0"], run_backward)
        per_rank.append(factors)
    A, G = oracle.average_factors(per_rank)["0"]
    assert G.abs().max() < FLOAT16_TINY

    results = run_distributed(_comm_job, 2, inputs, targets, timeout=120)

    elements = 28**2 + 4**2
    for name, (_, _, wire) in COMM_CASES.items():
        for rank, result in enumerate(results):
            got = result[name]
            tolerance = TOLERANCE[wire]
            assert oracle.relative_error(got["A"], A) < tolerance, (name, rank)
            assert oracle.relative_error(got["G"], G) < tolerance, (name, rank)
            assert got["bytes"] == elements * torch.empty((), dtype=wire).element_size(), name
