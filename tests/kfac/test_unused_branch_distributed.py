"""A layer without a gradient on some rank is handled the same way on every rank.

Model: ``a → (b on rank 0 only) → h``. Gradients are averaged like DDP does (a missing gradient
counts as zero) but ``b.grad`` stays ``None`` on rank 1, where ``b`` never ran. The
preconditioner must not hang or mismatch its collectives (MEM-OPT broadcasts every layer's
preconditioned gradient), and the layers every rank has must get the same update everywhere and
in every strategy. The KL clip is off: its factor is computed from each rank's own gradients,
which differ here by construction (see docs/kfac.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kfac_train.kfac import KFACPreconditioner

from .dist_utils import run_distributed

STRATEGIES = ("comm-opt", "mem-opt")
SETTINGS = {
    "damping": 1e-2,
    "factor_decay": 0.5,
    "kl_clip": None,
    "factor_dtype": torch.float64,
    "inv_dtype": torch.float64,
}


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 6)
        self.h = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        x = torch.tanh(self.a(x))
        if use_b:
            x = torch.tanh(self.b(x))
        return self.h(x)


def _average_gradients(model: nn.Module) -> None:
    """DDP-like averaging, except that a rank without a gradient keeps ``None``."""
    for p in model.parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        if p.grad is not None:
            p.grad.copy_(grad / dist.get_world_size())


def _rank_run() -> dict[str, list]:
    rank, results = dist.get_rank(), {}
    for strategy in STRATEGIES:
        torch.manual_seed(0)
        model = Branchy().double()
        pre = KFACPreconditioner(model, grad_worker_fraction=strategy, **SETTINGS)
        generator = torch.Generator().manual_seed(7 + rank)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            x = torch.randn(4, 5, generator=generator, dtype=torch.float64)
            y = torch.randint(0, 3, (4,), generator=generator)
            nn.functional.cross_entropy(model(x, use_b=rank == 0), y).backward()
            _average_gradients(model)
            pre.step()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
        results[strategy] = {
            "shared": [p.detach().clone() for p in (*model.a.parameters(), *model.h.parameters())],
            "b_has_grad": model.b.weight.grad is not None,
        }
    return results


def test_a_layer_unused_on_one_rank_neither_hangs_nor_changes_the_other_updates() -> None:
    rank0, rank1 = run_distributed(_rank_run, 2, timeout=90)
    assert rank0["comm-opt"]["b_has_grad"] and not rank1["comm-opt"]["b_has_grad"]
    reference = rank0["comm-opt"]["shared"]
    for strategy in STRATEGIES:
        for rank, result in enumerate((rank0, rank1)):
            for got, want in zip(result[strategy]["shared"], reference, strict=True):
                torch.testing.assert_close(
                    got, want, rtol=1e-10, atol=1e-12, msg=f"rank {rank}, {strategy}"
                )
