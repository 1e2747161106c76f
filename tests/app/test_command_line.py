"""Argument handling before Hydra: numeric batch choices and unknown options."""

from __future__ import annotations

import pytest

from kfac_train.cli import check_group_choices, group_options, normalise_argv
from kfac_train.errors import UserError

from .conftest import CONF, compose_config


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("batch=32768", "batch='32768'"),
        ("batch=4096,8192", "batch='4096','8192'"),
        ("+batch=64", "+batch='64'"),
        ("batch.size=8", "batch.size=8"),
        ("batch='2048'", "batch='2048'"),
        ("trainer.max_steps=3", "trainer.max_steps=3"),
        ("optim.lr=0.05,0.1", "optim.lr=0.05,0.1"),
    ],
)
def test_numeric_batch_choices_are_quoted_and_everything_else_is_kept(argument, expected):
    assert normalise_argv([argument]) == [expected]


def test_batch_32768_composes_exactly_as_typed():
    config = compose_config(["batch=32768", "batch.size=8"])
    assert config.batch.size == 8  # the option's recipe still applies, the size is overridden


def test_unknown_options_are_reported_with_the_real_choices():
    with pytest.raises(UserError, match=r"unknown optim 'kfca'; choose one of: .*kfac"):
        check_group_choices(["optim=kfca"], CONF)
    with pytest.raises(UserError, match=r"unknown model 'resnet5'"):
        check_group_choices(["-m", "model=resnet50,resnet5"], CONF)
    with pytest.raises(UserError, match=r"batch\.size=N"):
        check_group_choices(["batch='123'"], CONF)
    check_group_choices(["model=resnet50", "batch='32768'", "optim.lr=3", "seed=1"], CONF)


def test_batch_options_are_listed_in_numeric_order():
    sizes = group_options(CONF, "batch")
    assert [int(s) for s in sizes] == sorted(int(s) for s in sizes)
