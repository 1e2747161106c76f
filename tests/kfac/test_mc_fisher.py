"""The Monte-Carlo Fisher (``kfac.fisher=mc``): ``G`` from losses of labels sampled from the
model, through `StatisticsCapture.sampled_output_grads` / `add_sampled_output_grads`.

Reference: the exact Fisher's ``G`` in closed form. For softmax cross-entropy with logits ``z``
and a label ``y ~ p = softmax(z)``, ``∇_z = p − e_y`` and ``E_y[∇_z ∇_zᵀ] = diag(p) − ppᵀ``; for
a hidden layer with output ``h`` the output gradient is ``Jᵀ (p − e_y)`` with ``J = ∂z/∂h``.
With ``grad_scaling="per_example"`` (``g`` of each example's own loss) a layer's ``G`` is
``(1/N) Σ_n g_n g_nᵀ``, so the exact ``G = (1/N) Σ_n Jₙᵀ (diag(pₙ) − pₙpₙᵀ) Jₙ``.

Tolerance: ``D`` draws give ``Ĝ = (1/D) Σ_d (1/N) Σ_n X_{n,d}`` with independent
``X_{n,d} = v v ᵀ``, ``v = Jₙᵀ(pₙ − e_y)``. Each entry's standard deviation is
``σ_ij = sqrt(Σ_n Var(X_n[i, j]) / (D N²))`` with ``Var(X_n[i,j]) = Σ_y p_y (v_i v_j)² −
(E X_n[i,j])²`` enumerated exactly over the classes. The test allows ``6 σ_ij`` per entry
(a false failure has probability below 1e-8 per entry).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kfac_train.kfac import KFACPreconditioner

DRAWS = 3000
N, D_IN, HIDDEN, CLASSES = 6, 3, 4, 4


def model_and_batch() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    y = torch.randint(CLASSES, (N,))
    return model, x, y


def exact_g_and_std(
    model: nn.Sequential, x: torch.Tensor, draws: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the exact Fisher's ``G`` and the std of the mean of ``draws`` one-draw ``G``s."""
    with torch.no_grad():
        h = model[1](model[0](x))
        p = torch.softmax(model[2](h), dim=1)
    jacobians = {  # J_n = ∂z/∂(layer output): identity for the head, W2 diag(tanh') for layer 0
        "2": [torch.eye(CLASSES, dtype=torch.float64)] * N,
        "0": [model[2].weight.detach() * (1 - h[n] ** 2) for n in range(N)],
    }
    out = {}
    for name, jac in jacobians.items():
        mean, variance = 0.0, 0.0
        for n in range(N):
            # v_y = Jᵀ(p − e_y) for every class y, rows of (CLASSES, size).
            v = (p[n].unsqueeze(0) - torch.eye(CLASSES, dtype=torch.float64)) @ jac[n]
            outer = v.unsqueeze(2) * v.unsqueeze(1)  # (y, i, j)
            first = (p[n].view(-1, 1, 1) * outer).sum(0)
            second = (p[n].view(-1, 1, 1) * outer**2).sum(0)
            mean = mean + first
            variance = variance + (second - first**2)
        out[name] = (mean / N, (variance / (draws * N**2)).sqrt())
    return out


def sampled_g(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int, seed: int):
    """One factor-update step whose G comes from ``draws`` sampled losses; returns G per layer
    (factor_decay=0: the running factor is the step's statistic) and the parameter grads."""
    pre = KFACPreconditioner(
        model,
        factor_decay=0.0,
        grad_scaling="per_example",
        factor_dtype=torch.float64,
        kl_clip=None,
    )
    torch.manual_seed(seed)
    model.zero_grad()
    with pre.capture.sampled_output_grads():
        logits = model(x)
    losses = [
        F.cross_entropy(logits, torch.multinomial(logits.softmax(1), 1).squeeze(1))
        for _ in range(draws)
    ]
    pre.capture.add_sampled_output_grads(losses)
    F.cross_entropy(logits, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    pre.step()
    return {name: pre.blocks[name].G.running.clone() for name in ("0", "2")}, grads


def test_the_mean_of_sampled_g_matches_the_exact_fisher_within_six_sigma():
    model, x, y = model_and_batch()
    reference = exact_g_and_std(model, x, DRAWS)
    estimated, _ = sampled_g(model, x, y, DRAWS, seed=1)
    for name, (exact, std) in reference.items():
        deviation = (estimated[name] - exact).abs()
        assert (deviation <= 6 * std + 1e-12).all(), (name, (deviation / std).max().item())
        assert deviation.max() > 0  # a real estimate, not the closed form


def test_g_from_the_true_labels_is_not_the_fisher_the_check_above_would_refuse_it():
    """The empirical Fisher of the same batch lies far outside the tolerance: the check above
    tells the two estimators apart."""
    model, x, y = model_and_batch()
    reference = exact_g_and_std(model, x, DRAWS)
    pre = KFACPreconditioner(
        model, factor_decay=0.0, grad_scaling="per_example", factor_dtype=torch.float64
    )
    F.cross_entropy(model(x), y).backward()
    pre.step()
    exact, std = reference["2"]
    assert ((pre.blocks["2"].G.running - exact).abs() > 6 * std).any()


def test_the_parameter_gradient_is_still_the_true_losss():
    model, x, y = model_and_batch()
    _, grads = sampled_g(model, x, y, draws=3, seed=2)
    plain, _, _ = model_and_batch()
    F.cross_entropy(plain(x), y).backward()
    for got, expected in zip(grads, (p.grad for p in plain.parameters()), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_one_draw_gives_exactly_that_draws_statistic():
    """With one draw, G is exactly the outer product of that draw's output gradients (checked
    against the same draw replayed by hand)."""
    model, x, y = model_and_batch()
    g, _ = sampled_g(model, x, y, draws=1, seed=5)
    torch.manual_seed(5)
    with torch.no_grad():
        probs = model(x).softmax(1)
    labels = torch.multinomial(probs, 1).squeeze(1)
    per_example = probs - F.one_hot(labels, CLASSES).double()  # ∇_z of each example's own loss
    torch.testing.assert_close(g["2"], per_example.T @ per_example / N)
