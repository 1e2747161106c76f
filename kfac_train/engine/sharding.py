"""`trainer.parallelism=fsdp`: FSDP2 sharding of the model and full (DDP-compatible) state dicts.

`shard_model` applies `torch.distributed.fsdp.fully_shard` to every direct child that holds
parameters and then to the root, so each block's parameters, gradients and optimizer state are
split over the ranks (`Shard(0)`), and K-FAC gathers a layer's gradient only while it
preconditions it (kfac_train/kfac/sharded.py). Checkpoints stay interchangeable with DDP ones:
`model_state`/`optimizer_state` gather *full* state dicts (collectives, every rank calls them)
in the plain `nn.Module.state_dict()` / `Optimizer.state_dict()` layouts, and the loaders shard a
full state dict back. Without sharding these are the plain calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=False)


def shard_model(module: nn.Module) -> nn.Module:
    """`fully_shard` each direct child with parameters, then the root; returns `module`."""
    for child in module.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(module)
    return module


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def full_parameters(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter in full (gathered under FSDP: a collective)."""
    return [p.full_tensor() if isinstance(p, DTensor) else p for p in module.parameters()]


def model_state(module: nn.Module) -> dict[str, Any]:
    """The full model state dict (`module.state_dict()` layout; a collective under FSDP)."""
    if not is_sharded(module):
        return module.state_dict()
    return get_model_state_dict(module, options=FULL)


def load_model_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Load a full model state dict (from a DDP, one-process or FSDP run)."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    set_model_state_dict(module, state, options=FULL)


def _fqns(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the integer ids of `Optimizer.state_dict()`)."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state in `Optimizer.state_dict()`'s layout (parameters as integer ids
    in parameter-group order), so a DDP run can resume it; a collective under FSDP."""
    if not is_sharded(module):
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(module, optimizer, options=FULL)
    index = {name: i for i, name in enumerate(_fqns(module, optimizer))}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load `Optimizer.state_dict()`-layout state (from any run) into a possibly sharded run."""
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    names = _fqns(module, optimizer)
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(module, optimizer, by_name, options=FULL)


def unshard_for_eval(module: nn.Module) -> None:
    """Gather every FSDP block's parameters once and keep them through the evaluation forwards
    (ranks may evaluate different numbers of batches; FSDP's per-forward all-gathers would not
    match up). A collective: every rank calls it. No-op without sharding."""
    for block in module.modules():
        if isinstance(block, FSDPModule):
            block.set_reshard_after_forward(False, recurse=False)
            block.unshard()


def reshard_after_eval(module: nn.Module) -> None:
    """Undo :func:`unshard_for_eval`: free the gathered parameters (local, no communication)."""
    for block in module.modules():
        if isinstance(block, FSDPModule):
            block.reshard()
            block.set_reshard_after_forward(True, recurse=False)
