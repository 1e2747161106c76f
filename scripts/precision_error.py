"""How much accuracy each way of running K-FAC's preconditioning in bfloat16 costs.

    python scripts/precision_error.py                   # about 10 s on 2 CPU cores

A 64-256-256-10 MLP is trained for 200 steps of SGD-momentum on scikit-learn's digits (real
images shipped with the package), then one batch of 1024 gives each Linear layer its factors
``A``, ``G`` (per-example convention) and its gradient, in float64. For each damping, the
preconditioned gradient ``V`` of the eigen and the inverse method is computed by the library's
own products (``kfac_train.kfac.linalg``) three ways:

* ``float32``: data stored and multiplied in float32 (the default);
* ``bf16 data``: second-order data stored in bfloat16, products in float32
  (``inv_dtype=bfloat16``);
* ``bf16 data+products``: the same data, products in bfloat16 with float32 accumulation
  (``inv_dtype=bfloat16, precondition_dtype=bfloat16``).

Printed: the relative error ``‖V − V₆₄‖ / ‖V₆₄‖`` against float64, per layer, and the time of one
1024×1024 by 1024×1025 product in float32 and in bfloat16 on this machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from kfac_train.kfac import linalg

WAYS = {
    "float32": (torch.float32, None),
    "bf16 data": (torch.bfloat16, None),
    "bf16 data+products": (torch.bfloat16, torch.bfloat16),
}


def trained_layers(steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(A, G, grad)`` in float64 for each Linear layer of the trained MLP (bias column last)."""
    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        index = torch.randint(0, len(x), (128,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    inputs: dict[nn.Module, torch.Tensor] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs[module] = args[0].detach()
        output.register_hook(lambda grad: outputs.__setitem__(module, grad.detach()))

    for layer in linears:
        layer.register_forward_hook(keep)
    index = torch.arange(batch) % len(x)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x[index]), y[index]).backward()
    layers = []
    for layer in linears:
        a = torch.cat([inputs[layer], torch.ones(batch, 1)], 1).double()
        g = outputs[layer].double() * batch  # per-example output gradients
        grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
        layers.append((a.T @ a / batch, g.T @ g / batch, grad))
    return layers


def errors(A, G, grad, damping: float) -> dict[str, dict[str, float]]:
    """Relative error against float64 of each way, for the eigen and the inverse method."""
    d_A, Q_A = torch.linalg.eigh(A)
    d_G, Q_G = torch.linalg.eigh(G)
    recip = linalg.eigen_reciprocal(d_G.clamp_min(0), d_A.clamp_min(0), damping)
    # The inverse method damps each factor by the damping (second_order.InverseMethod).
    A_inv = torch.linalg.inv(A + damping * torch.eye(len(A), dtype=A.dtype))
    G_inv = torch.linalg.inv(G + damping * torch.eye(len(G), dtype=G.dtype))
    exact = {
        "eigen": linalg.precondition_eigen(grad, Q_A, Q_G, recip),
        "inverse": linalg.precondition_inverse(grad, A_inv, G_inv),
    }
    grad32 = grad.float()
    out: dict[str, dict[str, float]] = {}
    for way, (stored, products) in WAYS.items():
        eigen = linalg.precondition_eigen(
            grad32, Q_A.to(stored), Q_G.to(stored), recip.to(stored), products
        )
        inverse = linalg.precondition_inverse(grad32, A_inv.to(stored), G_inv.to(stored), products)
        out[way] = {
            name: float((V.double() - exact[name]).norm() / exact[name].norm())
            for name, V in (("eigen", eigen), ("inverse", inverse))
        }
    return out


def product_ms(dtype: torch.dtype, repeats: int = 20) -> float:
    left, right = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1025, dtype=dtype)
    for _ in range(3):
        left @ right
    start = time.perf_counter()
    for _ in range(repeats):
        left @ right
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="SGD steps before measuring")
    parser.add_argument("--batch", type=int, default=1024, help="examples in the factors")
    parser.add_argument("--dampings", default="1e-3,1e-2,1e-1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = trained_layers(args.steps, args.batch)
    print("relative error of V against float64 (per layer, in model order)")
    print(f"{'damping':>8} {'method':<8} " + " ".join(f"{way:>26}" for way in WAYS))
    for damping in (float(d) for d in args.dampings.split(",")):
        per_layer = [errors(A, G, grad, damping) for A, G, grad in layers]
        for method in ("eigen", "inverse"):
            cells = [" ".join(f"{e[way][method]:.1e}" for e in per_layer).rjust(26) for way in WAYS]
            print(f"{damping:>8g} {method:<8} " + " ".join(cells))
    f32, bf16 = product_ms(torch.float32), product_ms(torch.bfloat16)
    print(
        f"1024x1024 @ 1024x1025: float32 {f32:.2f} ms, bfloat16 {bf16:.2f} ms "
        f"({f32 / bf16:.1f}x), {args.threads} thread(s)"
    )


if __name__ == "__main__":
    main()
