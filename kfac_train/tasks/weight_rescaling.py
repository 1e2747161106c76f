"""Weight rescaling in place of weight decay (SP-NGD, Osawa et al., arXiv 2002.06015, Sec. 6).

After every optimizer step each convolution and fully-connected weight W (shape (d_out, ...))
is rescaled towards the norm ``sqrt(2 · d_out)``: ``W ← W · min(1, sqrt(2·d_out) / (‖W‖ + ε))``
with ε = 1e-9. The paper states "rescaled to the norm"; the authors' Chainer hook
(tyohei/chainerkfac ``NormalizeWeightUR``) only ever scales *down*, which is the default here
(``only_shrink=True``); ``only_shrink=False`` rescales both ways. BatchNorm parameters and biases
are left alone, as in the paper.

Everything stays on the device (one fused ``_foreach`` norm and multiply): no host sync.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rescalable_weights(model: nn.Module) -> list[torch.Tensor]:
    """The trainable weights of every ``nn.Conv2d`` and ``nn.Linear`` in ``model``."""
    return [
        module.weight
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.requires_grad
    ]


class WeightRescaler:
    """Rescales conv/linear weights after each optimizer step.

    Use ``rescaler.attach(optimizer)`` (registers an optimizer step post-hook, returns its
    handle) or call ``rescaler()`` yourself after ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module, *, only_shrink: bool = True, eps: float = 1e-9) -> None:
        self.weights = rescalable_weights(model)
        if not self.weights:
            raise ValueError("weight rescaling found no nn.Conv2d / nn.Linear weight to rescale")
        self.only_shrink = only_shrink
        self.eps = eps
        self._target_norms = [math.sqrt(2.0 * w.shape[0]) for w in self.weights]

    @torch.no_grad()
    def __call__(self) -> None:
        norms = torch._foreach_norm(self.weights)
        torch._foreach_add_(norms, self.eps)
        scales = torch._foreach_reciprocal(norms)
        torch._foreach_mul_(scales, self._target_norms)
        if self.only_shrink:
            torch._foreach_clamp_max_(scales, 1.0)
        torch._foreach_mul_(self.weights, scales)

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Run after every ``optimizer.step()``."""
        return optimizer.register_step_post_hook(lambda *_: self())
