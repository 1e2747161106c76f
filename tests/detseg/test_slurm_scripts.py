"""slurm/maskrcnn_*.sbatch and unet_*.sbatch: short scripts whose srun line composes the recipe."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from .helpers import compose_run

SLURM = Path(__file__).resolve().parents[2] / "slurm"
SCRIPTS = sorted([*SLURM.glob("maskrcnn_*.sbatch"), *SLURM.glob("unet_*.sbatch")])
ENV = {"DATA_ROOT": "/data/set", "BACKBONE": "/data/resnet50.pth"}


def srun_overrides(script: Path) -> list[str]:
    """The overrides of the one ``srun python train.py`` line, ${VAR...} expanded."""
    lines = [line for line in script.read_text().splitlines() if line.startswith("srun ")]
    assert len(lines) == 1, f"{script.name} must have exactly one srun line"
    words = shlex.split(lines[0])
    assert words[:3] == ["srun", "python", "train.py"]

    def expand(match: re.Match) -> str:
        name, default = match["name"], match["default"]
        return ENV[name] if default is None else default

    pattern = r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*)|:\?[^}]*)\}"
    return [re.sub(pattern, expand, word) for word in words[3:]]


def test_there_is_a_kfac_and_a_baseline_script_per_workload():
    assert [s.name for s in SCRIPTS] == [
        "maskrcnn_kfac.sbatch",
        "maskrcnn_sgd.sbatch",
        "unet_adam.sbatch",
        "unet_kfac.sbatch",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_script_is_sbatch_lines_and_one_srun_composing_the_workloads_recipe(script: Path):
    text = script.read_text().splitlines()
    assert text[0] == "#!/bin/bash"
    body = [line for line in text[1:] if line and not line.startswith("#")]
    assert all(line.startswith(("export ", "srun ")) for line in body), body
    assert any(line.startswith("#SBATCH --signal=USR1@") for line in text)
    overrides = srun_overrides(script)
    assert "checkpoint.resume=auto" in overrides
    config = compose_run(*overrides)
    workload, optim = script.stem.split("_")
    assert config.model.name == workload and config.data.root == "/data/set"
    assert config.optim.preconditioner == ("kfac" if optim == "kfac" else "none")
    assert config.trainer.target_metric in ("reached_target", "dice")  # the recipe applied
    if workload == "maskrcnn":
        assert config.model.backbone_weights == "/data/resnet50.pth"
        assert config.trainer.micro_batch == 2
