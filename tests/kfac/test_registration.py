"""Which layers are registered, and that everything else keeps its plain gradient exactly."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner


class MixedModel(nn.Module):
    """Registered kinds (Conv2d, Linear) next to kinds K-FAC must leave alone: an embedding,
    batch norm, grouped and depthwise convolutions, and a frozen linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4 * 4 * 4 + 4, 3)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.grouped(torch.relu(self.norm(self.conv(images)))))
        token_features = self.frozen(self.embedding(tokens).mean(dim=1))
        return self.head(torch.cat([x.flatten(1), token_features], dim=1))


def _model_and_loss():
    torch.manual_seed(0)
    model = MixedModel()
    images, tokens = torch.randn(5, 2, 4, 4), torch.randint(0, 10, (5, 3))
    labels = torch.randint(0, 3, (5,))

    def run_backward(m: nn.Module) -> None:
        nn.functional.cross_entropy(m(images, tokens), labels).backward()

    return model, run_backward


def _gradients_after_step(skip_layers: tuple[str, ...] = ()):
    """(pre, {param name: .grad after pre.step()}, {param name: plain gradient})."""
    model, run_backward = _model_and_loss()
    plain_model = copy.deepcopy(model)
    run_backward(plain_model)
    pre = KFACPreconditioner(model, damping=1e-2, skip_layers=skip_layers)
    run_backward(model)
    pre.step()
    after = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    plain = {name: p.grad for name, p in plain_model.named_parameters() if p.grad is not None}
    assert after.keys() == plain.keys()
    return pre, after, plain


def _changed_layers(after: dict, plain: dict) -> set[str]:
    return {name.rsplit(".", 1)[0] for name in after if not torch.equal(after[name], plain[name])}


def test_only_linear_and_ungrouped_conv_layers_with_trainable_weights_are_registered() -> None:
    pre, after, plain = _gradients_after_step()
    assert pre.layer_names == ["conv", "head"]
    assert _changed_layers(after, plain) == {"conv", "head"}


def test_grouped_and_depthwise_convolutions_are_skipped_with_a_log_line(caplog) -> None:
    model, _ = _model_and_loss()
    with caplog.at_level(logging.DEBUG):
        KFACPreconditioner(model)
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "grouped" in logged and "depthwise" in logged


@pytest.mark.parametrize(
    ("skip_layers", "registered"),
    [
        (("^head$",), ["conv"]),
        (("Conv2d",), ["head"]),
        (("Linear",), ["conv"]),
        (("co",), ["head"]),  # re.search: a partial match of the name is enough
        (("nothing-matches",), ["conv", "head"]),
    ],
)
def test_skip_layers_matches_module_names_and_class_names(
    skip_layers: tuple[str, ...], registered: list[str]
) -> None:
    pre, after, plain = _gradients_after_step(skip_layers)
    assert pre.layer_names == registered
    assert _changed_layers(after, plain) == set(registered)


def test_summary_lists_every_registered_layer_with_its_type() -> None:
    model, _ = _model_and_loss()
    summary = KFACPreconditioner(model).summary()
    for text in ("conv", "head", "Conv2d", "Linear"):
        assert text in summary


def test_memory_bytes_counts_both_factors_of_every_layer_in_the_factor_dtype() -> None:
    model, run_backward = _model_and_loss()
    pre = KFACPreconditioner(model, factor_dtype=torch.float32)
    run_backward(model)
    pre.step()
    # conv: A is (2·3·3 + 1)², G is 4²; head: A is (68 + 1)², G is 3²; 4 bytes each.
    expected = 4 * ((19**2 + 4**2) + (69**2 + 3**2))
    memory = pre.memory_bytes()
    assert memory["factors"] == expected
    assert memory["second_order"] > 0


def test_comm_bytes_are_zero_on_one_process() -> None:
    model, run_backward = _model_and_loss()
    pre = KFACPreconditioner(model)
    run_backward(model)
    pre.step()
    counts = pre.comm_bytes()
    assert set(counts) == {"step", "total"}
    for scope in counts.values():
        assert scope == {"factor_allreduce": 0, "second_order_broadcast": 0, "grad_broadcast": 0}


@pytest.mark.parametrize(
    "bad_argument",
    [
        {"compute_method": "cholesky"},
        {"grad_scaling": "sum"},
        {"accumulation_steps": 0},
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(bad_argument: dict) -> None:
    model, _ = _model_and_loss()
    ((name, _),) = bad_argument.items()
    with pytest.raises(ValueError, match=name):
        KFACPreconditioner(model, **bad_argument)
