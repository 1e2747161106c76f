"""slurm/resnet50_*.sbatch: short scripts whose one srun line composes a valid configuration."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kfac_train.cli import normalise_argv
from kfac_train.config import to_run_config
from kfac_train.hydra_setup import register_configs

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("resnet50_*.sbatch"))


def srun_overrides(script: Path, env: dict[str, str]) -> list[str]:
    """The Hydra overrides of the script's srun line, with ${VAR:-default} expanded."""
    lines = [line for line in script.read_text().splitlines() if line.startswith("srun ")]
    assert len(lines) == 1, f"{script.name} must have exactly one srun line"
    words = shlex.split(lines[0])
    assert words[:3] == ["srun", "python", "train.py"], words[:3]
    expanded = []
    for word in words[3:]:
        for name, value in env.items():
            word = word.replace(f"${{{name}:?set {name}}}", value)
        for name in ("BATCH", "MICRO_BATCH"):
            marker = f"${{{name}:-"
            if marker in word:
                default = word.split(marker, 1)[1].split("}", 1)[0]
                word = word.replace(f"{marker}{default}}}", env.get(name, default))
        expanded.append(word)
    return expanded


def test_there_is_a_script_for_kfac_and_each_baseline() -> None:
    assert [s.name for s in SCRIPTS] == [
        "resnet50_kfac.sbatch",
        "resnet50_lars.sbatch",
        "resnet50_sgd.sbatch",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_script_is_sbatch_lines_environment_and_one_srun_that_composes(script: Path) -> None:
    text = script.read_text().splitlines()
    assert text[0] == "#!/bin/bash"
    body = [line for line in text[1:] if line and not line.startswith("#")]
    assert all(line.startswith(("export ", "srun ")) for line in body), body
    assert any(line.startswith("#SBATCH --signal=USR1@") for line in text)
    overrides = srun_overrides(script, {"DATA_ROOT": "/data/imagenet"})
    assert "checkpoint.resume=auto" in overrides
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=normalise_argv(overrides))
    config = to_run_config(cfg)
    assert config.model.name == "resnet50" and config.data.root == "/data/imagenet"
    assert config.trainer.target_metric == "top1"  # the recipe of the batch size was applied
    assert os.path.basename(str(config.data.name)) == "imagenet_dali"
