"""Stale statistics (``stale="adaptive"``): SP-NGD Alg. 2's per-statistic refresh intervals.

References: the interval rule and similarity test as published (papers.md §2.3, written out
here by hand), dense float64 batch factors from the oracle, and two real gloo ranks.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner
from kfac_train.kfac.memory_model import predict_footprint
from kfac_train.kfac.stale import StaleStatistics, next_interval

from . import oracle
from .dist_utils import run_distributed

# Setup: expectations built in kfac-math.md's "mean" convention (the library default before
# issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")

KEY = ("layer", 0)


# ---------------------------------------------------------------------- the published rule
@pytest.mark.parametrize(
    ("similar_last", "similar_before", "intervals", "expected"),
    [
        (False, True, (5, 3), 2),  # not similar to X₋₁: halve (floor)
        (False, False, (1, 1), 1),  # ... but never below 1
        (True, False, (5, 3), 5),  # similar to X₋₁ only: keep
        (True, True, (5, 3), 8),  # similar to both: Δ₋₁ + Δ₋₂
    ],
)
def test_the_interval_rule_is_sp_ngd_algorithm_2(similar_last, similar_before, intervals, expected):
    assert next_interval(similar_last, similar_before, intervals) == expected


def refresh_steps(schedule: StaleStatistics, values, steps: int) -> list[int]:
    """Drive one statistic for ``steps`` factor steps; ``values(k)`` is its value at step k."""
    refreshed = []
    for k in range(steps):
        if schedule.due(KEY):
            refreshed.append(k)
            schedule.observe({KEY: values(k)})
        else:
            schedule.observe({})
    return refreshed


def test_a_constant_statistic_is_refreshed_at_fibonacci_spaced_steps():
    schedule = StaleStatistics([KEY], adaptive=True, threshold=0.1)
    x = torch.eye(3)
    # Δ: 1 (no X₋₁), 1 (no X₋₂), then 1+1, 2+1, 3+2, 5+3, 8+5.
    assert refresh_steps(schedule, lambda k: x, 40) == [0, 1, 2, 4, 7, 12, 20, 33]
    assert schedule.fraction == pytest.approx(8 / 40)


def test_a_statistic_that_changes_more_than_alpha_halves_its_interval():
    schedule = StaleStatistics([KEY], adaptive=True, threshold=0.1)
    # Relative change 0.05 < α up to step 12, then 0.5 > α at step 12: Δ = ⌊5/2⌋ = 2.
    values = lambda k: torch.eye(2) * (1.0 if k < 12 else 1.5)  # noqa: E731
    # 12: not similar to X₋₁ (step 7's): Δ = ⌊5/2⌋ = 2; 14: similar to X₋₁ (step 12's) but
    # not to X₋₂ (step 7's): Δ = Δ₋₁ = 2; 16: similar to both: Δ = 2 + 2.
    assert refresh_steps(schedule, values, 20) == [0, 1, 2, 4, 7, 12, 14, 16]


def test_similarity_is_the_relative_frobenius_distance_against_alpha():
    schedule = StaleStatistics([KEY], adaptive=True, threshold=0.1)
    base = torch.eye(4)  # ‖base‖_F = 2
    nudge = torch.zeros(4, 4)
    nudge[0, 1] = 0.19  # ‖Δ‖_F / ‖X‖_F = 0.095 < 0.1: similar
    assert refresh_steps(schedule, lambda k: base + (k % 2) * nudge, 8) == [0, 1, 2, 4, 7]
    schedule = StaleStatistics([KEY], adaptive=True, threshold=0.1)
    nudge[0, 1] = 0.21  # 0.105 > 0.1: never similar, refreshed every factor step
    assert refresh_steps(schedule, lambda k: base + (k % 2) * nudge, 8) == list(range(8))


def test_off_refreshes_everything_and_reports_a_fraction_of_one():
    schedule = StaleStatistics([KEY, ("layer", 1)], adaptive=False, threshold=0.1)
    for _ in range(5):
        assert schedule.due(KEY) and schedule.due(("layer", 1))
        schedule.observe({KEY: torch.eye(2), ("layer", 1): torch.eye(2)})
    assert schedule.fraction == 1.0


# ---------------------------------------------------------------------- in the preconditioner
def two_layer_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def run_steps(pre: KFACPreconditioner, model: nn.Module, batches) -> list[dict]:
    """Train-free steps (the weights do not change); per step the statistics computed and the
    dense float64 batch factors of the oracle."""
    records = []
    for x, y in batches:
        active = {
            (n, i): f.active for n, b in pre.blocks.items() for i, f in enumerate(b.factors())
        }
        expected, _ = oracle.batch_statistics(
            two_layer_model(),
            model,
            pre.layer_names,
            lambda m, x=x, y=y: nn.functional.cross_entropy(m(x), y).backward(),
        )
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        records.append({"active": active, "expected": expected})
    return records


def test_a_stale_statistic_is_neither_computed_nor_folded_and_a_due_one_is_exact(monkeypatch):
    model = two_layer_model()
    pre = KFACPreconditioner(
        model,
        stale="adaptive",
        factor_decay=0.0,
        kl_clip=None,
        inv_update_steps=1000,
        factor_dtype=torch.float64,
    )
    calls = {"input": 0}
    first = pre.blocks["0"]
    original = first.accumulate_input

    def counting_input(x, *scale):
        calls["input"] += 1
        original(x, *scale)

    monkeypatch.setattr(first, "accumulate_input", counting_input)
    torch.manual_seed(1)
    x = torch.randn(16, 5, dtype=torch.float64)  # the same batch: A of layer "0" never changes
    batches = [(x, torch.randint(3, (16,))) for _ in range(12)]
    previous = {n: [f.running.clone() for f in b.factors()] for n, b in pre.blocks.items()}
    a_refreshes = 0
    for batch in batches:
        (record,) = run_steps(pre, model, [batch])
        for (name, index), active in record["active"].items():
            running = pre.blocks[name].factors()[index].running
            if active:
                torch.testing.assert_close(running, record["expected"][name][index])
            else:
                assert torch.equal(running, previous[name][index])
        a_refreshes += record["active"][("0", 0)]
        previous = {n: [f.running.clone() for f in b.factors()] for n, b in pre.blocks.items()}
    # A of the first layer sees an identical input: Fibonacci refreshes 0, 1, 2, 4, 7 in 12.
    assert a_refreshes == 5 and calls["input"] == 5
    assert pre.statistics_fraction < 1.0


def test_a_refresh_after_delta_factor_steps_decays_the_running_average_delta_times():
    # The refreshed value stands for every factor step since the previous refresh:
    # running = decay^Δ · running + (1 − decay^Δ) · batch, so the factor in force ages with the
    # steps, not with the refreshes, and the similarity test sees the stale gap.
    model = two_layer_model()
    decay = 0.5
    pre = KFACPreconditioner(
        model,
        stale="adaptive",
        factor_decay=decay,
        kl_clip=None,
        inv_update_steps=1000,
        factor_dtype=torch.float64,
    )
    torch.manual_seed(1)
    x = torch.randn(16, 5, dtype=torch.float64)
    # A of layer "0" drifts by 0.2% per step: similar (α = 0.1) at every refresh.
    batches = [(x * (1 + 0.001 * k), torch.randint(3, (16,))) for k in range(14)]
    running = pre.blocks["0"].factors()[0].running.clone()
    last, gaps = -1, []
    for step, batch in enumerate(batches):
        (record,) = run_steps(pre, model, [batch])
        if record["active"][("0", 0)]:
            gap, last = step - last, step
            gaps.append(gap)
            weight = decay**gap
            running = weight * running + (1 - weight) * record["expected"]["0"][0]
        torch.testing.assert_close(pre.blocks["0"].factors()[0].running, running)
    # The first folds move the average off its initial value by more than α (gaps of 1); once it
    # settles, the gaps grow and the catch-up weight 1 − decay^Δ is exercised.
    assert gaps == [1, 1, 1, 1, 1, 2, 3]


def test_the_elapsed_factor_steps_are_the_gap_since_the_previous_refresh():
    schedule = StaleStatistics([KEY], adaptive=True, threshold=0.1)
    gaps = []
    for _ in range(13):
        if schedule.due(KEY):
            gaps.append(schedule.elapsed(KEY))
            schedule.observe({KEY: torch.eye(2)})
        else:
            schedule.observe({})
    assert gaps == [1, 1, 1, 2, 3, 5]
    plain = StaleStatistics([KEY], adaptive=False, threshold=0.1)
    assert plain.elapsed(KEY) == 1


def test_the_fraction_counts_computed_statistics_over_all_of_them_at_every_factor_step():
    model = two_layer_model()
    pre = KFACPreconditioner(
        model, stale="adaptive", factor_update_steps=2, kl_clip=None, factor_decay=0.0
    )
    torch.manual_seed(2)
    x = torch.randn(8, 5, dtype=torch.float64)
    computed = 0
    for step in range(20):
        if step % 2 == 0:
            computed += sum(f.active for b in pre.blocks.values() for f in b.factors())
        else:
            assert not any(f.active for b in pre.blocks.values() for f in b.factors())
        model.zero_grad()
        nn.functional.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
        pre.step()
    assert pre.statistics_fraction == pytest.approx(computed / (10 * 4))
    # One fixed batch, no running average: every statistic stays the same, refreshed at factor
    # steps 0, 1, 2, 4, 7.
    assert pre.statistics_fraction == pytest.approx(5 / 10)


def test_off_keeps_a_fraction_of_one():
    model = two_layer_model()
    pre = KFACPreconditioner(model, kl_clip=None)
    x = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(3):
        model.zero_grad()
        model(x).sum().backward()
        pre.step()
    assert pre.statistics_fraction == 1.0


def test_the_schedule_is_checkpointed_and_a_resumed_run_takes_the_same_decisions():
    def fresh():
        model = two_layer_model()
        return model, KFACPreconditioner(model, stale="adaptive", kl_clip=None)

    torch.manual_seed(3)
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.randint(3, (8,))) for _ in range(14)]
    model, straight = fresh()
    decisions = [r["active"] for r in run_steps(straight, model, batches)]
    model, first = fresh()
    run_steps(first, model, batches[:7])
    state = first.state_dict()
    assert "statistics_schedule" in state
    model, resumed = fresh()
    resumed.load_state_dict(state)
    assert [r["active"] for r in run_steps(resumed, model, batches[7:])] == decisions[7:]
    assert resumed.statistics_fraction == straight.statistics_fraction


def test_a_checkpoint_without_the_schedule_still_loads_and_refreshes_everything_next():
    model = two_layer_model()
    pre = KFACPreconditioner(model, stale="adaptive", kl_clip=None)
    x = torch.randn(8, 5, dtype=torch.float64)
    run_steps(pre, model, [(x, torch.zeros(8, dtype=torch.long))] * 6)
    state = pre.state_dict()
    del state["statistics_schedule"]  # as written before stale statistics existed
    model = two_layer_model()
    other = KFACPreconditioner(model, stale="adaptive", kl_clip=None)
    other.load_state_dict(state)
    assert all(f.active for b in other.blocks.values() for f in b.factors())
    assert other.steps == 6


def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match="stale must be one of"):
        KFACPreconditioner(two_layer_model(), stale="sometimes")


# ---------------------------------------------------------------------- two gloo ranks
def _distributed_stale(overlap: bool) -> dict:
    rank = dist.get_rank()
    model = two_layer_model()
    pre = KFACPreconditioner(
        model, stale="adaptive", kl_clip=None, overlap_comm=overlap, bucket_cap_mb=1e-4
    )
    generator = torch.Generator().manual_seed(10 + rank)  # different data per rank
    x = torch.randn(8, 5, dtype=torch.float64, generator=generator)
    decisions, sent = [], []
    for step in range(16):
        active = [f.active for b in pre.blocks.values() for f in b.factors()]
        decisions.append(active)
        noise = 0.3 * torch.randn(8, 5, dtype=torch.float64, generator=generator) * (step < 3)
        model.zero_grad()
        nn.functional.cross_entropy(model(x + noise), torch.zeros(8, dtype=torch.long)).backward()
        pre.step()
        sent.append(pre.comm_bytes()["step"].get("factor_allreduce", 0))
    bytes_per = {
        (n, i): f.running.numel() * f.running.element_size()
        for n, b in pre.blocks.items()
        for i, f in enumerate(b.factors())
    }
    factors = [f.running for b in pre.blocks.values() for f in b.factors()]
    return {
        "decisions": decisions,
        "sent": sent,
        "bytes": list(bytes_per.values()),
        "factors": factors,
        "fraction": pre.statistics_fraction,
    }


@pytest.mark.parametrize("overlap", [True, False])
def test_two_ranks_take_the_same_decisions_and_send_only_due_statistics(overlap):
    rank0, rank1 = run_distributed(_distributed_stale, 2, overlap)
    assert rank0["decisions"] == rank1["decisions"]
    assert rank0["fraction"] == rank1["fraction"] < 0.6
    for a, b in zip(rank0["factors"], rank1["factors"], strict=True):
        assert torch.equal(a, b)
    # Each step's factor all-reduce carries exactly the due statistics (in the factor dtype).
    for active, sent in zip(rank0["decisions"], rank0["sent"], strict=True):
        assert sent == sum(b for b, on in zip(rank0["bytes"], active, strict=True) if on)
    assert any(not all(step) for step in rank0["decisions"])  # some statistics were skipped


def test_memory_bytes_count_the_two_kept_copies_of_every_statistic():
    model = two_layer_model()
    pre = KFACPreconditioner(model, stale="adaptive", kl_clip=None, factor_dtype=torch.float64)
    torch.manual_seed(3)
    for _ in range(3):  # every statistic is refreshed at factor steps 0 and 1
        model.zero_grad()
        x = torch.randn(8, 5, dtype=torch.float64)
        nn.functional.cross_entropy(model(x), torch.randint(3, (8,))).backward()
        pre.step()
    memory = pre.memory_bytes()
    assert (
        memory["stale_history"] == 2 * memory["factors"] == pre.reduction.schedule.history_bytes()
    )
    predicted = predict_footprint(
        [layer.shape for layer in pre.layers.values()],
        1,
        1.0,
        factor_dtype=torch.float64,
        stale_history=True,
    )
    assert predicted.memory[0] == memory
    off = KFACPreconditioner(two_layer_model(), kl_clip=None)
    assert "stale_history" not in off.memory_bytes()
