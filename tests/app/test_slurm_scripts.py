"""Every training script in slurm/ survives its time limit: at SIGUSR1 the run checkpoints,
rank 0 requeues the job (``scontrol requeue``), and the requeued job resumes in the same run
directory. Slurm itself is simulated with stub ``sbatch``, ``scontrol`` and ``srun`` commands."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import FAST, REPO

SLURM = REPO / "slurm"
TRAINING_SCRIPTS = sorted(p for p in SLURM.glob("*.sbatch") if p.name != "bert_prepare.sbatch")

# Stand-ins for Slurm. `sbatch` runs the batch script, and runs it again (same job id, restart
# count + 1) whenever `scontrol requeue` was called during it, as Slurm does with a requeued job.
# `srun` runs its command as task 0 of 1 and, in the first segment when SIGNAL_AT_STEP is set,
# sends SIGUSR1 (the `--signal=USR1@<s>` warning) once that step was logged.
SBATCH = """
export SLURM_JOB_ID="$STUB_JOB_ID" SLURM_JOB_NODELIST=node01 SLURM_RESTART_COUNT=0
while :; do
  rm -f "$STUB_DIR/requeued"
  bash "$@"
  [ -e "$STUB_DIR/requeued" ] || break
  SLURM_RESTART_COUNT=$((SLURM_RESTART_COUNT + 1))
done
"""
SCONTROL = """
echo "$@" >> "$STUB_DIR/scontrol.log"
[ "$1" = requeue ] && [ "$2" = "$SLURM_JOB_ID" ] && touch "$STUB_DIR/requeued"
exit 0
"""
SRUN = """
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURM_STEP_ID=0
"$@" $STUB_EXTRA_ARGS &
task=$!
if [ "$SLURM_RESTART_COUNT" = 0 ] && [ -n "$SIGNAL_AT_STEP" ]; then
  metrics="outputs/slurm-$SLURM_JOB_ID.0/metrics.jsonl"
  until grep -qs "\\"step\\": $SIGNAL_AT_STEP," "$metrics" || ! kill -0 $task 2>/dev/null; do
    sleep 0.02
  done
  kill -USR1 $task
fi
wait $task
"""


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body.lstrip())
    path.chmod(0o755)


def submit(
    tmp_path: Path, script: Path, *args: str, job: str, signal_at: int | None, extra: str = ""
) -> subprocess.CompletedProcess:
    """`sbatch script args` on the stub cluster; the job's cwd is `tmp_path`."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        stub(bin_dir, "sbatch", SBATCH)
        stub(bin_dir, "scontrol", SCONTROL)
        stub(bin_dir, "srun", SRUN)
        stub(bin_dir, "python", f'exec {sys.executable} "$@"')
        (tmp_path / "train.py").symlink_to(REPO / "train.py")
        (tmp_path / "conf").symlink_to(REPO / "conf")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "STUB_DIR": str(tmp_path),
        "STUB_JOB_ID": job,
        "SIGNAL_AT_STEP": str(signal_at or ""),
        "STUB_EXTRA_ARGS": extra,
        "OMP_NUM_THREADS": "1",
        "DATA_ROOT": "/nonexistent",
    }
    for name in list(env):
        if name.startswith("SLURM_"):
            del env[name]
    return subprocess.run(
        ["sbatch", str(script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def body_lines(script: Path) -> list[str]:
    return [line for line in script.read_text().splitlines()[1:] if line and line[0] != "#"]


@pytest.mark.parametrize("script", TRAINING_SCRIPTS, ids=lambda p: p.stem)
def test_training_scripts_are_short_and_ask_for_the_warning_signal_and_requeueing(script: Path):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    body = body_lines(script)
    assert all(line.startswith(("export ", "srun ")) for line in body), body
    (srun,) = [line for line in body if line.startswith("srun ")]
    assert "checkpoint.resume=auto" in shlex.split(srun)  # the requeued job resumes
    assert any(line.startswith("#SBATCH --signal=USR1@") for line in lines)
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines
    # one requeue mechanism, in the application: no script requeues by itself
    assert not any("requeue" in line for line in body)


def test_the_torchrun_agent_passes_the_warning_signal_on_and_waits_for_the_checkpoint():
    (srun,) = [line for line in body_lines(SLURM / "train_torchrun.sbatch") if "srun" in line]
    words = shlex.split(srun)
    handled = [w.split("=", 1)[1] for w in words if w.startswith("--signals-to-handle=")]
    assert handled and "SIGUSR1" in handled[0].split(",") and "SIGTERM" in handled[0].split(",")
    (timeout,) = [int(w.split("=", 1)[1]) for w in words if w.startswith("--shutdown-timeout=")]
    signal_lead = int(
        next(
            line
            for line in (SLURM / "train_torchrun.sbatch").read_text().splitlines()
            if "--signal=USR1@" in line
        ).rsplit("@", 1)[1]
    )
    assert 0 < timeout < signal_lead  # the workers get the time to checkpoint, not more


def test_a_finished_job_is_not_requeued(tmp_path: Path):
    result = submit(
        tmp_path, SLURM / "train.sbatch", *FAST, "trainer.max_steps=2", job="98", signal_at=None
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "outputs/slurm-98.0/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["stop_request"] is None
    assert not (tmp_path / "scontrol.log").exists()


def final_state(run_dir: Path, step: int) -> dict:
    state = torch.load(run_dir / f"checkpoints/step_{step:08d}.pt", weights_only=True)
    return {key: state[key] for key in ("model", "optimizer", "preconditioner", "rng")}


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{index}")
    else:
        assert a == b, where


# K-FAC with augmentation, evaluations; log every step so that the stub can aim its signal
RUN = [
    *FAST,
    "logger.progress=lines",
    "trainer.max_steps=40",
    "trainer.log_every=1",
    "trainer.eval_every=10",
    "seed=5",
]


def test_a_job_warned_of_its_time_limit_requeues_and_ends_as_if_never_interrupted(
    tmp_path: Path,
):
    result = submit(tmp_path, SLURM / "train.sbatch", *RUN, job="99", signal_at=6)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "99"]  # exactly once
    run_dir = tmp_path / "outputs/slurm-99.0"
    log = (run_dir / "train.log").read_text()
    assert "stop signal received: checkpointing at step" in log
    assert "resumed from" in log and "requeued Slurm job 99" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40

    reference = submit(tmp_path, SLURM / "train.sbatch", *RUN, job="100", signal_at=None)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "99"]
    reference_dir = tmp_path / "outputs/slurm-100.0"
    assert_same(final_state(run_dir, 40), final_state(reference_dir, 40))
    expected = json.loads((reference_dir / "summary.json").read_text())
    assert (
        summary["metrics"] == expected["metrics"]
        and summary["final_loss"] == expected["final_loss"]
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference_records = [
        json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["kind"], r["step"]) for r in records] == [
        (r["kind"], r["step"]) for r in reference_records
    ]  # the requeued job dropped nothing and logged nothing twice
    losses = [r.get("loss") for r in records]
    assert losses == [r.get("loss") for r in reference_records]


def test_a_workload_script_requeues_the_same_way(tmp_path: Path):
    # unet_kfac.sbatch's own srun line, shrunk to a CPU run on synthetic slices
    shrink = (
        "data=synthetic model.image_size=32 model.init_features=4 batch.size=4 "
        "trainer.micro_batch=4 trainer.max_steps=12 trainer.log_every=1 trainer.device=cpu "
        "kfac.inv_update_steps=4 kfac.factor_update_steps=2 trainer.cpu_threads=1 "
        "logger.progress=lines schedule.warmup=2"
    )
    result = submit(tmp_path, SLURM / "unet_kfac.sbatch", job="7", signal_at=4, extra=shrink)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "7"]
    run_dir = tmp_path / "outputs/slurm-7.0"
    assert "resumed from" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
