"""scripts/gpu_check.sh on a machine without a GPU: syntax, the dry run, and bad arguments."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ("env", "oracle", "ddp", "resnet50", "bert", "dali", "compile")


def _run(*args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"OUT": str(out)} if out is not None else {})}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=env
    )


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    fetch = REPO / "scripts" / "fetch_gpu_wheels.sh"
    assert subprocess.run(["bash", "-n", str(fetch)], capture_output=True).returncode == 0


def test_dry_run_lists_every_step_with_its_command_and_a_total_within_eight_minutes(
    tmp_path: Path,
) -> None:
    result = _run("--dry-run", out=tmp_path / "report")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^step (\w+) \(budget (\d+)s\)", result.stdout, flags=re.M)
    assert [name for name, _ in listed] == list(STEPS)
    assert sum(int(budget) for _, budget in listed) <= 8 * 60
    for needle in (
        "KFAC_TEST_DEVICE=cuda",
        "tests/kfac/test_dense_reference.py",
        "test_distributed_kfac.py",
        "trainer.precision=bf16 trainer.channels_last=true",
        "--model bert_large --device cuda",
        "--seq 512",
        "--pipelines torchvision,dali-mixed --device cuda",
        "trainer.compile=true",
    ):
        assert needle in result.stdout, needle
    assert not (tmp_path / "report").exists()  # a dry run writes nothing


def test_only_selects_steps_in_the_order_given() -> None:
    result = _run("--dry-run", "--only", "bert,oracle")
    assert re.findall(r"^step (\w+)", result.stdout, flags=re.M) == ["bert", "oracle"]


def test_bad_arguments_exit_2_with_one_line() -> None:
    for args in (["--bogus"], ["--only", "nope"], ["--only"]):
        result = _run(*args)
        assert result.returncode == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert result.stdout == ""
