"""Engine building blocks: batch arithmetic, schedules, samplers, checkpoints, launch env."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kfac_train.config import KFACConfig, ScheduleConfig
from kfac_train.data.base import ResumableDistributedSampler, ShardSampler, require_dir
from kfac_train.engine.batching import plan_batches
from kfac_train.engine.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomic,
)
from kfac_train.errors import UserError
from kfac_train.hydra_setup import launch_run_id
from kfac_train.schedules.controller import ScheduleController
from kfac_train.schedules.kfac_hparams import kfac_hyperparameter_schedules
from kfac_train.schedules.lr import lr_multiplier


# ------------------------------------------------------------------------ batch arithmetic
def test_global_batch_is_micro_batch_times_world_size_times_accumulation():
    plan = plan_batches(32768, 32, 64)
    assert (plan.micro_batch, plan.world_size, plan.accumulation_steps) == (32, 64, 16)
    assert plan_batches(256, None, 4).micro_batch == 64


@pytest.mark.parametrize(("size", "micro", "world"), [(100, 16, 1), (96, 16, 4), (10, None, 4)])
def test_an_indivisible_batch_is_a_user_error_naming_the_numbers(size, micro, world):
    with pytest.raises(UserError, match=f"batch.size={size}"):
        plan_batches(size, micro, world)


# ------------------------------------------------------------------------ schedules
def schedule(**fields) -> ScheduleConfig:
    return ScheduleConfig(**fields)


def test_warmup_rises_linearly_then_multistep_divides_at_milestones():
    f = lr_multiplier(
        schedule(name="multistep", unit="step", warmup=4, milestones=[10, 20], gamma=0.1),
        total_steps=30,
        steps_per_epoch=5,
    )
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(9) == 1.0 and f(10) == pytest.approx(0.1) and f(25) == pytest.approx(0.01)


def test_osawa_poly_decay_is_constant_then_polynomial_in_epochs():
    f = lr_multiplier(
        schedule(name="poly", unit="epoch", decay_start=1, decay_end=3, power=2),
        total_steps=100,
        steps_per_epoch=10,
    )
    assert f(0) == f(10) == 1.0
    assert f(20) == pytest.approx(0.25)  # halfway: (1 - 1/2) ** 2
    assert f(30) == 0.0 and f(99) == 0.0


def test_cosine_decays_from_the_end_of_warmup_to_the_final_factor():
    f = lr_multiplier(
        schedule(name="cosine", unit="step", warmup=10, final_factor=0.1),
        total_steps=110,
        steps_per_epoch=1,
    )
    assert f(9) == 1.0
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)


def test_tied_momentum_follows_the_learning_rate():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.2, momentum=0.9)
    controller = ScheduleController(optimizer, lambda step: 0.5, momentum_tied=True)
    assert controller.apply(0) == pytest.approx(0.1)
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.45)


def test_kfac_damping_and_intervals_follow_their_milestones():
    hyper = kfac_hyperparameter_schedules(
        KFACConfig(
            damping=0.01,
            damping_milestones=[1],
            damping_gamma=0.5,
            factor_update_steps=10,
            inv_update_steps=100,
            interval_milestones=[2],
            interval_factor=10,
        ),
        unit="epoch",
        steps_per_epoch=50,
    )
    assert hyper["damping"](49) == 0.01 and hyper["damping"](50) == 0.005
    assert hyper["inv_update_steps"](99) == 100 and hyper["inv_update_steps"](100) == 1000
    assert hyper["factor_update_steps"](100) == 100


def test_a_decay_that_ends_before_it_starts_is_a_user_error():
    with pytest.raises(UserError, match="decay ends"):
        lr_multiplier(schedule(name="poly", decay_start=5, decay_end=2), 100, 10)


# ------------------------------------------------------------------------ samplers
def test_training_shards_partition_each_epoch_and_reshuffle_between_epochs():
    shards = [
        ResumableDistributedSampler(103, rank=r, world_size=2, micro_batch=8, seed=1)
        for r in range(2)
    ]
    for shard in shards:
        shard.set_epoch(0)
    epoch0 = [list(s) for s in shards]
    assert all(len(indices) == 48 for indices in epoch0)
    assert not set(epoch0[0]) & set(epoch0[1])
    shards[0].set_epoch(1)
    assert list(shards[0]) != epoch0[0]


def test_a_sampler_resumed_mid_epoch_yields_the_rest_of_that_epoch():
    sampler = ResumableDistributedSampler(100, rank=1, world_size=2, micro_batch=5, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip_samples=15)
    assert list(sampler) == full[15:] and len(sampler) == len(full) - 15


def test_evaluation_shards_cover_every_sample_exactly_once():
    shards = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))


def test_a_missing_data_root_names_the_path_and_the_key(tmp_path: Path):
    with pytest.raises(UserError, match=r"data.root=.*nowhere.*set data.root=/path/to/imagenet"):
        require_dir(str(tmp_path / "nowhere"), "data.root", "/path/to/imagenet")
    with pytest.raises(UserError, match="data.root is not set"):
        require_dir(None, "data.root", "/x")
    assert require_dir(str(tmp_path)) == str(tmp_path)


# ------------------------------------------------------------------------ checkpoints
def test_a_file_that_is_not_a_checkpoint_is_a_user_error(tmp_path: Path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="not a kfac-train checkpoint"):
        load_checkpoint(tmp_path / "partial.pt")


def test_rng_states_survive_a_weights_only_round_trip(tmp_path: Path):
    state = capture_rng()
    save_atomic({"rng": state}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_all_ranks_of_a_launch_name_the_same_run_directory():
    slurm = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0"}
    assert launch_run_id(slurm) == "slurm-77.0"
    torchrun = {"TORCHELASTIC_RUN_ID": "abcdef123456789", "RANK": "1"}
    assert launch_run_id(torchrun).endswith("/torchrun-abcdef123456")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", launch_run_id({}))


# ------------------------------------------------------------------------ console progress
def test_without_a_terminal_progress_is_printed_as_plain_lines(caplog):
    from kfac_train.loggers.console import ConsoleLogger

    logger = ConsoleLogger("auto", total_steps=100)  # pytest captures stderr: not a TTY
    assert logger.mode == "lines" and logger.bar is None
    with caplog.at_level("INFO", logger="kfac_train"):
        logger.log(
            {
                "kind": "train",
                "step": 20,
                "total_steps": 100,
                "epoch": 0.5,
                "loss": 0.25,
                "lr": 0.1,
                "metrics": {"top1": 0.9},
                "step_time": 0.01,
            }
        )
    assert "step 20/100 | epoch 0.50 | loss 0.25 | lr 0.1 | top1 0.9" in caplog.text


def test_on_a_terminal_progress_is_a_bar(capsys):
    from kfac_train.loggers.console import ConsoleLogger

    logger = ConsoleLogger("bar", total_steps=10)
    logger.on_step(3)
    assert logger.bar is not None and logger.bar.n == 3
    logger.close({})
