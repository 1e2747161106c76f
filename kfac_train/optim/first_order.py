"""First-order base optimizers from torch and timm (none are written here).

Builders take the parameter groups and the shared `OptimConfig` and read the fields they use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kfac_train.config import OptimConfig
from kfac_train.registry import OPTIMIZERS

ParamGroups = list[dict[str, Any]]


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> ParamGroups:
    """One group with `cfg.weight_decay`, or two when biases and 1-d parameters (norm layers)
    are excluded from weight decay (`exclude_norm_and_bias_from_weight_decay`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.exclude_norm_and_bias_from_weight_decay:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@OPTIMIZERS.register("sgd")
def build_sgd(groups: ParamGroups, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


@OPTIMIZERS.register("lars")
def build_lars(groups: ParamGroups, cfg: OptimConfig) -> torch.optim.Optimizer:
    """timm's LARS: trust ratio on groups with weight decay (You et al. 2017)."""
    from timm.optim import Lars

    return Lars(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        trust_coeff=cfg.trust_coefficient,
        eps=cfg.eps,
    )


@OPTIMIZERS.register("lamb")
def build_lamb(groups: ParamGroups, cfg: OptimConfig) -> torch.optim.Optimizer:
    """timm's LAMB (You et al. 2020), with its global gradient-norm clip at 1.0 as in NVIDIA's."""
    from timm.optim import Lamb

    return Lamb(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)


@OPTIMIZERS.register("adam")
def build_adam(groups: ParamGroups, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)


@OPTIMIZERS.register("adamw")
def build_adamw(groups: ParamGroups, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The base optimizer `cfg.base` over `model`'s trainable parameters."""
    return OPTIMIZERS.build(cfg.base, parameter_groups(model, cfg), cfg)
