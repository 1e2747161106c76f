"""Numerical events are reported, with the layer's name, but not once per step forever.

A float64 retry that succeeds used to be silent; a fallback warned on every inverse update.
Both now warn on the first occurrence per layer and then every ``every``-th one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner
from kfac_train.kfac.diagnostics import RateLimitedWarner

real_eigh = torch.linalg.eigh


def _float32_eigh_fails(matrix: torch.Tensor, *args, **kwargs):
    if matrix.dtype == torch.float32:
        raise torch.linalg.LinAlgError("injected: the algorithm failed to converge")
    return real_eigh(matrix, *args, **kwargs)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _steps(model: nn.Module, pre: KFACPreconditioner, count: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(count):
            model.zero_grad()
            generator = torch.Generator().manual_seed(step)
            x = torch.randn(8, 4, generator=generator)
            y = torch.randint(0, 3, (8,), generator=generator)
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_successful_float64_retry_warns_once_per_layer_naming_it(monkeypatch) -> None:
    monkeypatch.setattr(torch.linalg, "eigh", _float32_eigh_fails)
    model = _model()
    pre = KFACPreconditioner(model, kl_clip=None)
    texts = _steps(model, pre, 3)  # three inverse updates, every one retried for both layers
    retries = [t for t in texts if "retried in float64" in t]
    assert len(retries) == 2, texts
    assert any("layer '0'" in t for t in retries) and any("layer '2'" in t for t in retries)


def test_a_fallback_warns_once_per_layer_then_every_nth_time(monkeypatch) -> None:
    model = _model()
    pre = KFACPreconditioner(model, kl_clip=None, compute_method="inverse")
    pre.warner.every = 2
    _steps(model, pre, 1)

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    for routine in ("inv", "inv_ex", "cholesky_ex"):  # the batched inverse is Cholesky-based
        monkeypatch.setattr(torch.linalg, routine, failing)
    texts = _steps(model, pre, 3)  # each step: layer 0 and 2, factors A and G fail
    fallbacks = [t for t in texts if "keeps its previous second-order data" in t]
    # 6 fallbacks per layer (3 steps × 2 factors); reported on occurrences 1, 3, 5
    assert len([t for t in fallbacks if "layer '0'" in t]) == 3, texts
    assert len([t for t in fallbacks if "layer '2'" in t]) == 3, texts


def test_the_warner_reports_occurrences_1_then_every_nth() -> None:
    warner = RateLimitedWarner(every=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reported = [warner.warn("retry", "l", "msg") for _ in range(7)]
        warner.warn("retry", "other", "msg")
    assert reported == [True, False, False, True, False, False, True]
    assert len(caught) == 4
    with pytest.raises(ValueError, match="every"):
        RateLimitedWarner(every=0)
