"""Models, registered in `kfac_train.registry.MODELS` (one module per model family).

Modules of this package are imported by `MODELS.discover()`; each registers its builders with
``@MODELS.register(name, schema=...)``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from kfac_train.errors import UserError


def load_local_weights(model: nn.Module, path: str, *, strict: bool = True) -> None:
    """Load a state dict from the local file `path` into `model` (never downloads).

    Accepts a bare state dict or a kfac-train checkpoint (its "model" entry).
    """
    expanded = os.path.expanduser(path)
    if not os.path.isfile(expanded):
        raise UserError(f"model.weights={path} does not exist: give a local state-dict file")
    try:
        state = torch.load(expanded, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"model.weights={path} is not a readable state dict ({error})") from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise UserError(f"model.weights={path} does not fit the model: {first}") from error
