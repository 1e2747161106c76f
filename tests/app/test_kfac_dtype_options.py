"""The app's K-FAC dtype options (kfac.factor_dtype, kfac.inv_dtype, kfac.precondition_dtype,
strategy.comm_dtype) follow the library's dtype policy: unsafe or unknown names stop with one line
naming the safe choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_train.config import KFACConfig, StrategyConfig
from kfac_train.errors import UserError
from kfac_train.optim.preconditioner import build_preconditioner


def _build(kfac: KFACConfig, strategy: StrategyConfig):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    return build_preconditioner(
        "kfac",
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        kfac=kfac,
        strategy=strategy,
        schedule_unit="step",
        steps_per_epoch=10,
        accumulation_steps=1,
        grad_scaler=None,
    )


@pytest.mark.parametrize(
    ("kfac", "strategy", "start", "fix"),
    [
        ({}, {"comm_dtype": "float16"}, "strategy.comm_dtype=float16: ", "use bfloat16"),
        ({"factor_dtype": "half"}, {}, "kfac.factor_dtype='half': ", "choose one of float32"),
        (
            {"inv_dtype": "float16", "compute_method": "inverse", "factored_damping": True},
            {},
            "kfac.inv_dtype=float16: ",
            "use bfloat16 or float32",
        ),
        ({"precondition_dtype": "float16"}, {}, "kfac.precondition_dtype=float16: ", "bfloat16"),
        ({"precondition_dtype": "bf16"}, {}, "kfac.precondition_dtype='bf16': ", "bfloat16"),
        (
            {"precondition_dtype": "bfloat16", "compute_method": "inverse"},
            {},
            "kfac.precondition_dtype=bfloat16: ",
            "use compute_method=eigen",
        ),
    ],
)
def test_unsafe_dtype_options_stop_with_one_line_naming_the_fix(kfac, strategy, start, fix):
    with pytest.raises(UserError) as error:
        _build(KFACConfig(**kfac), StrategyConfig(**strategy))
    message = str(error.value)
    assert message.startswith(start) and fix in message and "\n" not in message


def test_every_safe_sixteen_bit_choice_builds_a_preconditioner():
    pre = _build(
        KFACConfig(factor_dtype="float16", inv_dtype="float16"),
        StrategyConfig(comm_dtype="bfloat16"),
    )
    layer = next(iter(pre.layers.values()))
    assert (layer.A.stat_dtype, layer.A.dtype, layer.inv_dtype) == (
        torch.float16,
        torch.float32,
        torch.float16,
    )


def test_precondition_dtype_reaches_every_layers_method_and_defaults_to_float32_or_better():
    default = _build(KFACConfig(), StrategyConfig())
    chosen = _build(KFACConfig(precondition_dtype="bfloat16"), StrategyConfig())
    assert {layer.method.precondition_dtype for layer in default.layers.values()} == {None}
    assert {layer.method.precondition_dtype for layer in chosen.layers.values()} == {torch.bfloat16}
