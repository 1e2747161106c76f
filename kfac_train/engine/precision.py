"""Mixed precision: autocast contexts and the gradient scaler (fp16 only)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from kfac_train.config import PRECISIONS
from kfac_train.errors import UserError


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A function returning the forward-pass context for `precision` on `device`."""
    if precision not in PRECISIONS:
        raise UserError(f"trainer.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise UserError("trainer.precision=fp16 needs a CUDA device: use bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler enabled for fp16 only (disabled scalers pass everything through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
