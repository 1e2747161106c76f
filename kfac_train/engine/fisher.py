"""``kfac.fisher``: which loss the K-FAC output-gradient statistics ``G`` come from.

``empirical`` (default): the true loss's backward feeds ``G`` through the capture hooks.
``mc`` (Ba et al. Eq. 1, SP-NGD's F_1mc): on factor-update steps the forward records the
registered layers' outputs (`StatisticsCapture.sampled_output_grads`); ``G`` comes from the
output gradients of the loss of ``kfac.mc_samples`` label draws from the model's predictive
distribution (`Task.sample_fisher_loss`), taken with ``torch.autograd.grad`` w.r.t. those
outputs only, so no parameter gradient and no DDP gradient hook is touched. The true loss's
backward then computes the gradient as usual, with ``G`` capture off. Sampled losses are scaled
like the true loss (``1/k`` and the AMP loss scale), which the capture's ``g`` multiplier undoes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from kfac_train.config import KFACConfig
from kfac_train.tasks.base import LossOutput, Task


class FisherSampling:
    """The engine's side of ``kfac.fisher=mc``: a no-op for ``empirical`` and for baselines."""

    def __init__(self, kfac: KFACConfig, preconditioner: Any, task: Task) -> None:
        self.capture = getattr(preconditioner, "capture", None)  # K-FAC runs only
        self.enabled = kfac.fisher == "mc" and self.capture is not None
        self.samples = kfac.mc_samples
        self.task = task

    def _active(self) -> bool:
        return self.enabled and self.capture.collecting

    def recording(self) -> contextlib.AbstractContextManager:
        """Wrap the micro-batch's forward: records layer outputs on factor-update steps."""
        return self.capture.sampled_output_grads() if self._active() else contextlib.nullcontext()

    def add_output_grads(
        self, out: LossOutput, batch: Any, scale: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Before the true loss's backward: ``G`` from ``mc_samples`` sampled losses."""
        if not self._active():
            return
        losses = [
            scale(self.task.sample_fisher_loss(out.output, batch)) for _ in range(self.samples)
        ]
        self.capture.add_sampled_output_grads(losses)
