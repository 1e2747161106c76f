"""Every user-facing value is checked when the config is composed, before anything runs.

Through the real command line (``python train.py ...``): a bad value gives exit status 2, one
line on stderr naming the key, no traceback, and an existing run directory is left untouched
(validation runs before Hydra makes or writes the run directory). In-process: more bad values,
the accepted edge values, and every shipped recipe passes.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kfac_train.config import DECAY, FRACTION, POSITIVE, KFACConfig, Range, to_run_config
from kfac_train.errors import UserError
from kfac_train.kfac import KFACPreconditioner
from kfac_train.validation import validate

from .conftest import CONF, FAST, REPO, compose_config

# case name -> (command-line overrides, the key the error line must name)
CLI_CASES: dict[str, tuple[list[str], str]] = {
    "negative_damping": (["kfac.damping=-1"], "kfac.damping"),
    "zero_factor_interval": (["kfac.factor_update_steps=0"], "kfac.factor_update_steps"),
    "negative_inverse_interval": (["kfac.inv_update_steps=-5"], "kfac.inv_update_steps"),
    "inverse_interval_not_a_multiple": (
        ["kfac.factor_update_steps=3", "kfac.inv_update_steps=10"],
        "kfac.inv_update_steps",
    ),
    "factor_decay_one": (["kfac.factor_decay=1.0"], "kfac.factor_decay"),
    "zero_kl_clip": (["kfac.kl_clip=0"], "kfac.kl_clip"),
    "unknown_compute_method": (["kfac.compute_method=cholesky"], "kfac.compute_method"),
    "unknown_batchnorm_mode": (["kfac.batchnorm=full"], "kfac.batchnorm"),
    "unknown_factor_dtype": (["kfac.factor_dtype=int8"], "kfac.factor_dtype"),
    "bad_skip_layers_regex": (["kfac.skip_layers=['conv(']"], "kfac.skip_layers"),
    "damping_milestones_out_of_order": (
        ["kfac.damping_milestones=[5,2]"],
        "kfac.damping_milestones",
    ),
    "zero_interval_factor": (["kfac.interval_factor=0"], "kfac.interval_factor"),
    "zero_async_delay": (["kfac.async_delay=0"], "kfac.async_delay"),
    "grad_worker_fraction_above_one": (
        ["strategy.grad_worker_fraction=1.5"],
        "strategy.grad_worker_fraction",
    ),
    "unknown_strategy_name": (
        ["strategy.grad_worker_fraction=most-opt"],
        "strategy.grad_worker_fraction",
    ),
    "unknown_comm_dtype": (["strategy.comm_dtype=int32"], "strategy.comm_dtype"),
    "zero_batch": (["batch.size=0"], "batch.size"),
    "micro_batch_not_dividing": (
        ["batch.size=64", "trainer.micro_batch=24"],
        "trainer.micro_batch",
    ),
    "nan_lr": (["optim.lr=nan"], "optim.lr"),
    "momentum_one": (["optim.momentum=1.0"], "optim.momentum"),
    "negative_weight_decay": (["optim.weight_decay=-1e-4"], "optim.weight_decay"),
    "unknown_base_optimizer": (["optim.base=adagrad"], "optim.base"),
    "unknown_schedule_unit": (["schedule.unit=hour"], "schedule.unit"),
    "zero_log_every": (["trainer.log_every=0"], "trainer.log_every"),
    "negative_eval_every": (["trainer.eval_every=-1"], "trainer.eval_every"),
    "unknown_precision": (["trainer.precision=fp8"], "trainer.precision"),
    "negative_keep_last": (["checkpoint.keep_last=-1"], "checkpoint.keep_last"),
    "negative_checkpoint_every": (["checkpoint.every=-1"], "checkpoint.every"),
}

MARKER = "marker.txt"


def run_case(name: str, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    run_dir = tmp / name
    run_dir.mkdir()
    (run_dir / MARKER).write_text("an existing run directory\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *FAST, *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def cli_outcomes(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every case through ``python train.py``, a few processes at a time."""
    tmp = tmp_path_factory.mktemp("validation")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(run_case, name, args, tmp) for name, (args, _) in CLI_CASES.items()
        }
        return tmp, {name: future.result() for name, future in futures.items()}


def test_the_table_has_at_least_twenty_bad_inputs() -> None:
    assert len(CLI_CASES) >= 20


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_a_bad_value_gives_one_line_naming_the_key_and_exit_status_2(cli_outcomes, case):
    tmp, outcomes = cli_outcomes
    result = outcomes[case]
    key = CLI_CASES[case][1]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert key in lines[0], lines[0]
    # Nothing was written into the (existing) run directory: no .hydra/, no log file.
    assert sorted(p.name for p in (tmp / case).iterdir()) == [MARKER]


def test_the_line_names_the_value_and_the_allowed_range(cli_outcomes):
    _, outcomes = cli_outcomes
    assert "kfac.damping=-1.0 is not allowed: must be > 0" in outcomes["negative_damping"].stderr
    factor = outcomes["zero_factor_interval"].stderr
    assert "kfac.factor_update_steps=0 is not allowed: must be >= 1" in factor
    decay = outcomes["factor_decay_one"].stderr
    assert "kfac.factor_decay=1.0" in decay and "[0, 1)" in decay
    method = outcomes["unknown_compute_method"].stderr
    assert "'cholesky'" in method and "eigen, inverse" in method
    multiple = outcomes["inverse_interval_not_a_multiple"].stderr
    assert "kfac.inv_update_steps=10" in multiple and "kfac.factor_update_steps=3" in multiple


# ------------------------------------------------------------------------------ in-process
def check(overrides: list[str]) -> None:
    validate(to_run_config(compose_config(overrides)), world_size=1)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["kfac.damping=0"], "kfac.damping"),
        (["kfac.factor_decay=-0.1"], "kfac.factor_decay"),
        (["kfac.conv_factor=mean"], "kfac.conv_factor"),
        (["kfac.grad_scaling=sum"], "kfac.grad_scaling"),
        (["kfac.inv_dtype=float8"], "kfac.inv_dtype"),
        (["kfac.interval_milestones=[-1]"], "kfac.interval_milestones"),
        (["kfac.damping_gamma=0"], "kfac.damping_gamma"),
        (["strategy.bucket_cap_mb=0"], "strategy.bucket_cap_mb"),
        (["strategy.assignment_cost=time"], "strategy.assignment_cost"),
        (["trainer.micro_batch=0"], "trainer.micro_batch"),
        (["optim.lr=-0.1"], "optim.lr"),
        (["optim.lr=inf"], "optim.lr"),
        (["optim.betas=[0.9,1.5]"], "optim.betas"),
        (["optim.preconditioner=shampoo"], "optim.preconditioner"),
        (["schedule.milestones=[30,10]"], "schedule.milestones"),
        (["schedule.warmup=-1"], "schedule.warmup"),
        (["schedule.decay_start=5", "schedule.decay_end=2"], "schedule.decay_end"),
        (["schedule.final_factor=2"], "schedule.final_factor"),
        (["trainer.device=tpu"], "trainer.device"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["trainer.max_epochs=0"], "trainer.max_epochs"),
        (["trainer.target_metric=top1"], "trainer.target_value"),
        (["trainer.cpu_threads=0"], "trainer.cpu_threads"),
        (["logger.progress=fancy"], "logger.progress"),
        (["data.num_workers=-1"], "data.num_workers"),
    ],
)
def test_more_bad_values_are_refused_in_one_line(overrides: list[str], key: str) -> None:
    with pytest.raises(UserError) as error:
        check(overrides)
    assert key in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["kfac.kl_clip=null"],
        ["kfac.factor_decay=0"],  # SP-NGD's recipes: only the latest batch
        ["kfac.factor_update_steps=5", "kfac.inv_update_steps=5"],
        ["strategy=mem_opt"],
        ["strategy.grad_worker_fraction=mem_opt"],  # the library's spelling works in the app too
        ["strategy.grad_worker_fraction=0.5"],
        ["optim.momentum=0"],
        ["schedule.warmup_start_factor=1"],
        ["kfac.damping_milestones=[1,1,2]"],
    ],
)
def test_values_at_the_edges_of_the_allowed_ranges_are_accepted(overrides: list[str]) -> None:
    check(overrides)


def test_a_micro_batch_is_checked_against_the_launch_world_size() -> None:
    config = to_run_config(compose_config(["batch.size=64", "trainer.micro_batch=16"]))
    validate(config, world_size=4)
    with pytest.raises(UserError, match="trainer.micro_batch=16 x world size 8"):
        validate(config, world_size=8)


def shipped_recipe_combinations() -> list[list[str]]:
    """``model=<m> batch=<b> optim=<o>`` for every recipe file in conf/recipe_optim/."""
    combinations = []
    models = sorted((p.stem for p in (CONF / "model").glob("*.yaml")), key=len, reverse=True)
    for path in sorted((CONF / "recipe_optim").glob("*.yaml")):
        model = next(m for m in models if path.stem.startswith(f"{m}_"))
        size, optim = path.stem[len(model) + 1 :].split("_")
        combinations.append([f"model={model}", f"batch={size}", f"optim={optim}"])
    return combinations


@pytest.mark.parametrize("overrides", shipped_recipe_combinations(), ids=" ".join)
def test_every_shipped_recipe_passes_validation(overrides: list[str]) -> None:
    check(overrides)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "strategy").glob("*.yaml")))
def test_every_strategy_option_passes_validation(option: str) -> None:
    check([f"strategy={option}"])


def test_ranges_say_what_they_allow() -> None:
    assert str(POSITIVE) == "> 0"
    assert str(DECAY) == "in [0, 1)"
    assert str(FRACTION) == "in (0, 1]"
    assert not POSITIVE.admits(float("nan")) and not Range().admits(float("inf"))
    assert DECAY.admits(0.0) and not DECAY.admits(1.0)


def test_the_kfac_defaults_are_the_librarys() -> None:
    parameters = inspect.signature(KFACPreconditioner).parameters
    kfac = KFACConfig()
    for name in ("damping", "factor_decay", "kl_clip"):
        assert getattr(kfac, name) == parameters[name].default
