"""Dense float64 reference for the K-FAC conventions of ``kfac-math.md``.

This module is the independent oracle the K-FAC tests compare against. It builds the Kronecker
factors literally from their definitions, from layer inputs and output gradients captured with
plain torch hooks on a hook-free copy of the model, and applies second-order data with explicit
Kronecker products (``torch.kron``) and dense solves. It never imports ``kfac_train.kfac``.

Notation (per layer): ``x`` layer input, ``g`` gradient of the loss w.r.t. the layer output,
``A`` input factor of shape (in [+1]) x (in [+1]), ``G`` output factor of shape out x out,
``grad`` the layer gradient matrix ``[dW, db]`` of shape out x (in [+1]) (bias column last).
``vec`` stacks columns, so ``(A ⊗ G) vec(X) = vec(G X Aᵀ)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
DTYPE = torch.float64


@dataclass
class LayerCapture:
    """What one registered layer saw during one forward/backward pass.

    ``inputs`` is the layer input as the forward received it; ``output_grads`` is the gradient of
    the loss w.r.t. the layer output, exactly as autograd delivered it. Both keep their shapes.
    """

    inputs: Tensor
    output_grads: Tensor


def capture_layers(
    model: nn.Module, layer_names: Iterable[str], run_backward: Callable[[nn.Module], None]
) -> dict[str, LayerCapture]:
    """Run ``run_backward(model)`` and record each named layer's input and output gradient.

    The model must be hook-free (the oracle's own copy); the hooks are removed afterwards.
    A layer called more than once per pass is rejected: the tests never do that.
    """
    modules = dict(model.named_modules())
    captured_inputs: dict[str, Tensor] = {}
    captured_grads: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            assert name not in captured_inputs, f"layer {name} called twice"
            captured_inputs[name] = args[0].detach().clone()

            def grad_hook(grad: Tensor) -> None:
                captured_grads[name] = grad.detach().clone()

            output.register_hook(grad_hook)

        return hook

    for name in layer_names:
        handles.append(modules[name].register_forward_hook(make_hook(name)))
    try:
        run_backward(model)
    finally:
        for handle in handles:
            handle.remove()
    return {name: LayerCapture(captured_inputs[name], captured_grads[name]) for name in layer_names}


def _symmetrise(matrix: Tensor) -> Tensor:
    return (matrix + matrix.T) / 2


def _with_bias_column(rows: Tensor, value: float) -> Tensor:
    """Append a column filled with ``value`` to a (N, k) matrix."""
    return torch.cat([rows, torch.full_like(rows[:, :1], value)], dim=1)


def linear_factors(layer: nn.Linear, capture: LayerCapture) -> tuple[Tensor, Tensor]:
    """``A = aᵀa / N`` with ``a = [x, 1]`` (N, in [+1]); ``G = gᵀg / N`` with g (N, out).

    All leading dimensions of ``x`` and ``g`` (batch, sequence, ...) collapse into N rows.
    """
    a = capture.inputs.to(DTYPE).reshape(-1, layer.in_features)
    g = capture.output_grads.to(DTYPE).reshape(-1, layer.out_features)
    if layer.bias is not None:
        a = _with_bias_column(a, 1.0)
    return _symmetrise(a.T @ a / a.shape[0]), _symmetrise(g.T @ g / g.shape[0])


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv2d_input_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding the convolution applies to its input.

    ``padding='same'`` puts the odd extra element on the right/bottom, as PyTorch does.
    """
    kernel_h, kernel_w = _pair(conv.kernel_size)
    dilation_h, dilation_w = _pair(conv.dilation)
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        total_h, total_w = dilation_h * (kernel_h - 1), dilation_w * (kernel_w - 1)
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    pad_h, pad_w = _pair(conv.padding)
    return (pad_w, pad_w, pad_h, pad_h)


def conv2d_patches(conv: nn.Conv2d, inputs: Tensor) -> Tensor:
    """Unfolded input patches of shape (B, H_out·W_out, C_in·kh·kw) in float64.

    The patch layout (channel-major, then kernel row, then kernel column) matches
    ``conv.weight.reshape(C_out, -1)``. Padding uses the layer's ``padding_mode``.
    """
    assert conv.groups == 1, "the oracle handles groups == 1 only"
    x = inputs.to(DTYPE)
    left, right, top, bottom = conv2d_input_padding(conv)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, (left, right, top, bottom), mode=mode)
    columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return columns.transpose(1, 2)


def conv2d_factors(conv: nn.Conv2d, capture: LayerCapture) -> tuple[Tensor, Tensor]:
    """Conv2d factors with the ``1/S`` spatial scaling of ``kfac-math.md``.

    ``a``: patches (B, S, C_in·kh·kw) with a ones column appended when there is a bias, divided
    by ``S = H_out·W_out``, reshaped to (B·S, ·). ``g``: output gradient (B, C_out, H_out, W_out)
    to channels-last, divided by ``S``, reshaped to (B·S, C_out). ``A = aᵀa/N``, ``G = gᵀg/N``.
    """
    patches = conv2d_patches(conv, capture.inputs)
    batch, spatial, _ = patches.shape
    a = patches.reshape(batch * spatial, -1)
    if conv.bias is not None:
        a = _with_bias_column(a, 1.0)
    a = a / spatial
    g = capture.output_grads.to(DTYPE).permute(0, 2, 3, 1).reshape(batch * spatial, -1)
    g = g / spatial
    return _symmetrise(a.T @ a / a.shape[0]), _symmetrise(g.T @ g / g.shape[0])


def layer_factors(
    layer: nn.Module, capture: LayerCapture, convention: str = "mean"
) -> tuple[Tensor, Tensor]:
    """(A, G) of one batch for an ``nn.Linear`` or ``nn.Conv2d`` layer under ``convention``
    (``"mean"``: kfac-math.md's; ``"per_example"``: :func:`per_example_factors`)."""
    if convention == "per_example":
        return per_example_factors(layer, capture)
    if isinstance(layer, nn.Linear):
        return linear_factors(layer, capture)
    if isinstance(layer, nn.Conv2d):
        return conv2d_factors(layer, capture)
    raise TypeError(f"the oracle has no factors for {type(layer).__name__}")


def per_example_factors(layer: nn.Module, capture: LayerCapture) -> tuple[Tensor, Tensor]:
    """(A, G) of the per-example convention (docs/kfac.md), literally from its definition.

    Rows ``r`` are (example, location) pairs: ``R`` of them over ``C`` examples (the leading
    dimension; conv locations and sequence positions are the other dimensions). ``a_r`` is the
    input row (conv: the patch, no ``1/S``), ``g_r`` the output gradient of the mean loss, so
    ``C·g_r`` is the per-example gradient. ``A = (1/R) Σ_r a_r a_rᵀ`` and
    ``G = (1/C) Σ_r (C g_r)(C g_r)ᵀ``: KFC's ``E_n[Σ_t Ds_t Ds_tᵀ]``.
    """
    examples = capture.output_grads.shape[0]
    if isinstance(layer, nn.Linear):
        a = capture.inputs.to(DTYPE).reshape(-1, layer.in_features)
        g = capture.output_grads.to(DTYPE).reshape(-1, layer.out_features)
    elif isinstance(layer, nn.Conv2d):
        patches = conv2d_patches(layer, capture.inputs)
        a = patches.reshape(-1, patches.shape[-1])
        g = capture.output_grads.to(DTYPE).permute(0, 2, 3, 1).reshape(a.shape[0], -1)
    else:
        raise TypeError(f"the oracle has no factors for {type(layer).__name__}")
    if layer.bias is not None:
        a = _with_bias_column(a, 1.0)
    per_example_g = examples * g
    A = sum(torch.outer(row, row) for row in a) / a.shape[0]
    G = sum(torch.outer(row, row) for row in per_example_g) / examples
    return _symmetrise(A), _symmetrise(G)


def per_example_fisher(
    model: nn.Module, layer_name: str, example_loss: Callable[[nn.Module, int], Tensor], count: int
) -> Tensor:
    """The exact per-example Fisher block ``F = (1/C) Σ_n vec(∇ℓ_n) vec(∇ℓ_n)ᵀ`` of one layer.

    Each ``∇ℓ_n`` is computed by autograd from ``example_loss(model, n)``, the loss of example
    ``n`` alone (no factor, no capture): the definition K-FAC approximates by ``A ⊗ G``.
    """
    layer = dict(model.named_modules())[layer_name]
    rows = []
    for n in range(count):
        model.zero_grad(set_to_none=True)
        example_loss(model, n).backward()
        rows.append(vec(gradient_matrix(layer)))
    model.zero_grad(set_to_none=True)
    grads = torch.stack(rows)
    return grads.T @ grads / count


def gradient_matrix(layer: nn.Module) -> Tensor:
    """The layer gradient ``[dW, db]`` as an out x (in [+1]) float64 matrix (bias last)."""
    weight_grad = layer.weight.grad.to(DTYPE).reshape(layer.weight.shape[0], -1)
    if layer.bias is None:
        return weight_grad
    return torch.cat([weight_grad, layer.bias.grad.to(DTYPE)[:, None]], dim=1)


def split_gradient_matrix(layer: nn.Module, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`gradient_matrix`: (weight-shaped tensor, bias vector or None)."""
    if layer.bias is None:
        return matrix.reshape(layer.weight.shape), None
    return matrix[:, :-1].reshape(layer.weight.shape), matrix[:, -1]


def vec(matrix: Tensor) -> Tensor:
    """Stack the columns of ``matrix`` into one vector."""
    return matrix.T.reshape(-1)


def unvec(vector: Tensor, rows: int) -> Tensor:
    """Inverse of :func:`vec` for a matrix with ``rows`` rows."""
    return vector.reshape(-1, rows).T


def eigen_preconditioned(A: Tensor, G: Tensor, grad: Tensor, damping: float) -> Tensor:
    """Exact Tikhonov: ``vec(V) = (A ⊗ G + damping·I)⁻¹ vec(grad)``."""
    A, G, grad = A.to(DTYPE), G.to(DTYPE), grad.to(DTYPE)
    system = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=DTYPE)
    return unvec(torch.linalg.solve(system, vec(grad)), G.shape[0])


def inverse_preconditioned(A: Tensor, G: Tensor, grad: Tensor, damping: float) -> Tensor:
    """Factored Tikhonov: ``vec(V) = ((A + damping·I) ⊗ (G + damping·I))⁻¹ vec(grad)``."""
    A, G, grad = A.to(DTYPE), G.to(DTYPE), grad.to(DTYPE)
    damped_A = A + damping * torch.eye(A.shape[0], dtype=DTYPE)
    damped_G = G + damping * torch.eye(G.shape[0], dtype=DTYPE)
    return unvec(torch.linalg.solve(torch.kron(damped_A, damped_G), vec(grad)), G.shape[0])


def preconditioned(method: str, A: Tensor, G: Tensor, grad: Tensor, damping: float) -> Tensor:
    """Dispatch on the compute method name (``"eigen"`` or ``"inverse"``)."""
    if method == "eigen":
        return eigen_preconditioned(A, G, grad, damping)
    if method == "inverse":
        return inverse_preconditioned(A, G, grad, damping)
    raise ValueError(f"unknown compute method {method=}")


def kl_clip_scale(
    preconditioned_and_grads: Iterable[tuple[Tensor, Tensor]], lr: float, kl_clip: float | None
) -> float:
    """``ν = min(1, sqrt(kl_clip / |Σ lr²⟨V, ∇⟩|))``; 1 when clipping is off or the sum is 0."""
    if kl_clip is None:
        return 1.0
    total = sum(
        lr**2 * float((v.to(DTYPE) * g.to(DTYPE)).sum()) for v, g in preconditioned_and_grads
    )
    if total == 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / abs(total)))


def running_average(previous: Tensor | None, batch: Tensor, decay: float) -> Tensor:
    """``F ← decay·F + (1 − decay)·F_batch`` where the first ``F`` is the identity."""
    if previous is None:
        previous = torch.eye(batch.shape[0], dtype=DTYPE)
    return decay * previous + (1 - decay) * batch


def _positive_eigenvalues(factor: Tensor) -> Tensor:
    eigenvalues = torch.linalg.eigvalsh(factor.to(DTYPE))
    return eigenvalues[eigenvalues > 1e-10 * eigenvalues.max()]


def damping_inside_spectrum(method: str, A: Tensor, G: Tensor) -> float:
    """A damping value in the middle of the spectrum the method damps.

    Eigen: the median of the products ``d_G d_Aᵀ``. Inverse: the geometric mean of the median
    eigenvalues of A and G (the damping is added to each factor separately). Only positive
    eigenvalues count: the null space of a rank-deficient factor says nothing about its scale.
    """
    eig_A, eig_G = _positive_eigenvalues(A), _positive_eigenvalues(G)
    if method == "eigen":
        return float(torch.outer(eig_G, eig_A).median())
    return math.sqrt(float(eig_A.median()) * float(eig_G.median()))


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` in float64."""
    actual, expected = actual.to(DTYPE), expected.to(DTYPE)
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def assert_sensitive_to_both_factors(
    method: str, A: Tensor, G: Tensor, grad: Tensor, damping: float, min_change: float = 1e-2
) -> None:
    """Fail unless doubling A, or doubling G, changes the result by ``min_change`` or more.

    Guards against tests where the damping dominates one factor, which would let a wrongly
    scaled factor (a missing ``1/S``, a missing accumulation compensation...) pass unnoticed.
    """
    expected = preconditioned(method, A, G, grad, damping)
    for label, (a, g) in {"A": (2 * A, G), "G": (A, 2 * G)}.items():
        change = relative_error(preconditioned(method, a, g, grad, damping), expected)
        assert change >= min_change, (
            f"test not sensitive to {label}: doubling it changes the result by {change:.2e}"
        )


def batch_statistics(
    reference: nn.Module,
    source: nn.Module,
    layer_names: Sequence[str],
    run_backward: Callable[[nn.Module], None],
    convention: str = "mean",
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """Batch factors ``{layer: (A, G)}`` (under ``convention``, see :func:`layer_factors`) and
    gradients ``{layer: [dW, db]}`` of one pass.

    ``reference`` is a hook-free model of the same architecture as ``source``; it first takes
    ``source``'s current parameters, so the statistics are those ``source`` sees in the same pass.
    """
    reference.load_state_dict(source.state_dict())
    reference.zero_grad(set_to_none=True)
    captures = capture_layers(reference, layer_names, run_backward)
    modules = dict(reference.named_modules())
    factors = {
        name: layer_factors(modules[name], captures[name], convention) for name in layer_names
    }
    grads = {name: gradient_matrix(modules[name]) for name in layer_names}
    return factors, grads


def average_factors(
    per_micro_batch: Sequence[dict[str, tuple[Tensor, Tensor]]],
) -> dict[str, tuple[Tensor, Tensor]]:
    """Average per-micro-batch factors (sum / k), layer by layer."""
    count = len(per_micro_batch)
    return {
        name: (
            sum(factors[name][0] for factors in per_micro_batch) / count,
            sum(factors[name][1] for factors in per_micro_batch) / count,
        )
        for name in per_micro_batch[0]
    }


class ReferenceKFAC:
    """Dense reference of the K-FAC state over several steps.

    Keeps, per layer, the running-average factors (starting from the identity) and the factors
    whose second-order data is in force (a snapshot taken when second-order data is refreshed,
    so that steps in between use stale data, as they must).
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.in_force: dict[str, tuple[Tensor, Tensor]] = {}

    def update_factors(self, batch: dict[str, tuple[Tensor, Tensor]], decay: float) -> None:
        for name, (batch_A, batch_G) in batch.items():
            A, G = self.factors.get(name, (None, None))
            self.factors[name] = (
                running_average(A, batch_A, decay),
                running_average(G, batch_G, decay),
            )

    def refresh_second_order(self) -> None:
        self.in_force = dict(self.factors)

    def preconditioned(
        self, grads: dict[str, Tensor], damping: float, kl_clip: float | None, lr: float
    ) -> tuple[dict[str, Tensor], float]:
        """({layer: ν·V}, ν) for the gradients of one step."""
        unclipped = {
            name: preconditioned(self.method, *self.in_force[name], grad, damping)
            for name, grad in grads.items()
        }
        nu = kl_clip_scale([(unclipped[n], grads[n]) for n in grads], lr, kl_clip)
        return {name: nu * v for name, v in unclipped.items()}, nu


def warning_texts(recorded_warnings: Iterable, log_records: Iterable) -> list[str]:
    """Messages of Python warnings and of WARNING-or-worse log records, for assertions that
    only require that the user was warned, through either channel."""
    texts = [str(item.message) for item in recorded_warnings]
    texts += [record.getMessage() for record in log_records if record.levelno >= 30]
    return texts
