"""The multi-process test harness itself: results come back per rank, failures never hang."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from .dist_utils import DistributedRankError, DistributedTimeoutError, run_distributed


def _all_reduce_rank_plus_one() -> dict[str, object]:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "sum": value,
        "threads": torch.get_num_threads(),
    }


def _raise_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()


def _exit_hard_on_rank_zero() -> None:
    if dist.get_rank() == 0:
        os._exit(3)
    dist.barrier()


def _sleep_forever_on_rank_one() -> None:
    if dist.get_rank() == 1:
        while True:
            time.sleep(0.1)
    dist.barrier()


def test_each_rank_result_comes_back_in_rank_order_from_a_real_gloo_group() -> None:
    results = run_distributed(_all_reduce_rank_plus_one, 2)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 for r in results)
    assert all(torch.equal(r["sum"], torch.tensor([3.0])) for r in results)
    assert all(r["threads"] == 1 for r in results)


def test_a_rank_that_raises_fails_the_run_naming_that_rank_and_its_traceback() -> None:
    started = time.monotonic()
    with pytest.raises(DistributedRankError) as caught:
        run_distributed(_raise_on_rank_one, 2, timeout=300)
    message = str(caught.value)
    assert "rank 1 failed first" in message
    assert "ValueError: deliberate failure on rank one" in message
    assert "_raise_on_rank_one" in message
    # It failed at once: rank 0, left waiting in a barrier, did not hold the run to its timeout.
    assert time.monotonic() - started < 150


def test_a_rank_that_dies_without_a_traceback_is_reported_by_exit_code() -> None:
    with pytest.raises(DistributedRankError, match=r"rank 0 failed first:\nexited with code 3"):
        run_distributed(_exit_hard_on_rank_zero, 2, timeout=60)


def test_a_hung_rank_times_out_naming_the_rank_and_where_it_was_stuck() -> None:
    with pytest.raises(DistributedTimeoutError) as caught:
        run_distributed(_sleep_forever_on_rank_one, 2, timeout=5)
    message = str(caught.value)
    assert "timed out after 5 s; ranks still running: [0, 1]" in message
    assert "rank 1 stack:" in message
    assert "_sleep_forever_on_rank_one" in message  # rank 1 sleeps; rank 0 waits in barrier


def test_ranks_that_do_not_join_the_group_in_time_fail_the_startup_clock() -> None:
    with pytest.raises(DistributedTimeoutError, match=r"did not start within 0.01 s"):
        run_distributed(_all_reduce_rank_plus_one, 2, startup_timeout=0.01)


def test_invalid_world_size_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_all_reduce_rank_plus_one, 0)
