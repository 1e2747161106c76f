"""Layer-wise grafting (``kfac.graft``): K-FAC's direction, the base optimizer's step length.

Specification (``kfac_train/optim/graft.py``): each grafted tensor moves by
``−‖Δ_base‖ · V/‖V‖``, where ``Δ_base`` is what the base optimizer does from the plain gradient
and ``V`` K-FAC's preconditioned gradient; other parameters take the base update; the base
optimizer's state is built from plain gradients; a skipped base step or a zero ``V`` moves
nothing; two gloo ranks stay identical; the app refuses it without K-FAC, with FSDP and with
adaptive damping (whose quadratic model predicts the step ``−lr·V``).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from kfac_train.app import train
from kfac_train.config import to_run_config
from kfac_train.errors import UserError
from kfac_train.kfac import KFACPreconditioner
from kfac_train.optim.graft import LayerwiseGraft
from kfac_train.validation import validate
from tests.kfac.dist_utils import run_distributed

from .conftest import FAST, compose_config


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 3))


def _backward(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def test_a_grafted_tensor_moves_along_v_by_the_base_steps_length() -> None:
    model = _net()
    grafted = [model[0].weight, model[0].bias]
    target = {id(t): torch.randn_like(t) for t in grafted}  # the "preconditioned" gradients

    def precondition() -> None:
        for t in grafted:
            t.grad.copy_(target[id(t)])

    reference = copy.deepcopy(model)  # the base optimizer alone, on the plain gradients
    _backward(model)
    _backward(reference)
    base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    alone = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=0.9)
    start = [t.detach().clone() for t in model.parameters()]
    LayerwiseGraft(grafted).step(precondition, base.step)
    alone.step()

    moved = dict(zip(model.parameters(), start, strict=True))
    for t, r in zip(model.parameters(), reference.parameters(), strict=True):
        step_alone = r.detach() - moved[t]
        if any(t is g for g in grafted):
            V = target[id(t)]
            expected = moved[t] - step_alone.norm() / V.norm() * V
            torch.testing.assert_close(t.detach(), expected)
        else:
            torch.testing.assert_close(t.detach(), r.detach())  # the base update itself
    # The base optimizer's state comes from the plain gradients, not from V.
    for t, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(
            base.state[t]["momentum_buffer"], alone.state[r]["momentum_buffer"]
        )


def test_with_kfac_and_lamb_each_block_moves_along_its_preconditioned_gradient() -> None:
    from timm.optim import Lamb

    model = _net()
    pre = KFACPreconditioner(model, layernorm="unit_wise", kl_clip=None)
    graft = LayerwiseGraft.for_preconditioner(pre)
    names = {id(t): n for n, t in model.named_parameters()}
    assert sorted(names[id(t)] for t in graft.tensors) == [
        "0.bias", "0.weight", "2.bias", "2.weight", "3.bias", "3.weight"
    ]  # fmt: skip
    reference, probe = copy.deepcopy(model), copy.deepcopy(model)
    probe_pre = KFACPreconditioner(probe, layernorm="unit_wise", kl_clip=None)
    _backward(model)
    _backward(reference)
    _backward(probe)
    probe_pre.step()  # the same preconditioner on the same statistics: V of every tensor
    lamb = Lamb(model.parameters(), lr=0.01)
    alone = Lamb(reference.parameters(), lr=0.01)
    start = [t.detach().clone() for t in model.parameters()]
    graft.step(pre.step, lamb.step)
    alone.step()
    for t, r, p, s in zip(
        model.parameters(), reference.parameters(), probe.parameters(), start, strict=True
    ):
        step, step_alone = t.detach() - s, r.detach() - s
        assert step.norm() == pytest.approx(float(step_alone.norm()), rel=1e-5)
        cosine = torch.nn.functional.cosine_similarity(step.flatten(), -p.grad.flatten(), dim=0)
        assert cosine == pytest.approx(1.0, abs=1e-5)


def test_a_skipped_base_step_or_a_zero_direction_moves_nothing() -> None:
    model = _net()
    tensors = [model[0].weight]
    _backward(model)
    start = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    LayerwiseGraft(tensors).step(lambda: None, lambda: None)  # e.g. GradScaler skipped it
    assert torch.equal(model[0].weight.detach(), start)

    def zero() -> None:
        model[0].weight.grad.zero_()

    LayerwiseGraft(tensors).step(zero, optimizer.step)
    assert torch.equal(model[0].weight.detach(), start)


def _rank_job(steps: int) -> list[torch.Tensor]:
    """On every rank: DDP + K-FAC + grafting over SGD, on rank-dependent batches."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model = _net()
    ddp = nn.parallel.DistributedDataParallel(model)
    pre = KFACPreconditioner(model, kl_clip=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    graft = LayerwiseGraft.for_preconditioner(pre)
    for step in range(steps):
        _backward(ddp, seed=10 * step + rank)
        graft.step(pre.step, optimizer.step)
    return [t.detach() for t in model.parameters()]


def test_two_gloo_ranks_stay_identical() -> None:
    ranks = run_distributed(_rank_job, 2, 3, timeout=120)
    initial = list(_net().parameters())
    for mine, theirs, start in zip(ranks[0], ranks[1], initial, strict=True):
        assert torch.equal(mine, theirs)
        assert not torch.equal(mine, start.detach())  # it trained


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim=sgd", "kfac.graft=true"], "kfac.graft=true grafts K-FAC's direction"),
        (
            ["optim=kfac", "kfac.graft=true", "trainer.parallelism=fsdp"],
            "kfac.graft=true needs whole parameters",
        ),
        (
            ["optim=kfac", "kfac.graft=true", "kfac.adaptive_damping=true"],
            "kfac.graft=true with kfac.adaptive_damping=true",
        ),
    ],
)
def test_the_app_refuses_grafting_without_kfac_with_sharding_or_with_adaptive_damping(
    overrides, message
):
    config = to_run_config(compose_config(overrides))
    with pytest.raises(UserError) as error:
        validate(config, world_size=1)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_grafted_run_trains_and_resumes_bit_exactly(tmp_path: Path) -> None:
    def run(directory: Path, steps: int, *extra: str) -> dict:
        return train(
            compose_config(
                [
                    *FAST,
                    "optim=kfac",
                    "kfac.graft=true",
                    f"trainer.max_steps={steps}",
                    "checkpoint.every=3",
                    f"output_dir={directory}",
                    *extra,
                ]
            )
        )

    straight = run(tmp_path / "straight", 6)
    # Resume a second run from the straight run's step-3 checkpoint (same schedule length).
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    middle = tmp_path / "straight" / "checkpoints" / "step_00000003.pt"
    shutil.copy(middle, tmp_path / "resumed" / "checkpoints" / middle.name)
    resumed = run(tmp_path / "resumed", 6, "checkpoint.resume=auto")
    assert straight["status"] == resumed["status"] == "completed"
    assert resumed["steps"] == straight["steps"] == 6
    final = "checkpoints/step_00000006.pt"
    a = torch.load(tmp_path / "straight" / final, weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / final, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
