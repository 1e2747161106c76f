"""slurm/bert_*.sbatch: short scripts whose one srun line runs what docs/bert.md describes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from .helpers import compose_run

SLURM = Path(__file__).resolve().parents[2] / "slurm"
ENV = {
    "DATA_ROOT": "/data/bert",
    "PHASE1": "/ckpt/p1.pt",
    "PHASE2": "/ckpt/p2.pt",
    "SQUAD_ROOT": "/data/squad",
    "VOCAB": "/data/bert/vocab.txt",
    "TEXT_GLOB": "/data/text/*.txt",
    "OUT": "/data/out",
}


def srun_words(script: Path) -> list[str]:
    """Words of the script's single srun line, ${VAR:?...} from ENV and ${VAR:-x} as x."""
    text = script.read_text().splitlines()
    assert text[0] == "#!/bin/bash"
    body = [line for line in text[1:] if line and not line.startswith("#")]
    assert all(line.startswith(("export ", "srun ")) for line in body), body
    (line,) = [line for line in body if line.startswith("srun ")]
    line = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: ENV[m.group(1)], line)
    line = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), line)
    return shlex.split(line)


@pytest.mark.parametrize(
    "phase, batch, optim, lr", [(1, 65536, "lamb", 6e-3), (2, 32768, "kfac", 4e-3)]
)
def test_phase_scripts_compose_the_phase_recipes(phase, batch, optim, lr) -> None:
    words = srun_words(SLURM / f"bert_phase{phase}.sbatch")
    assert words[:3] == ["srun", "python", "train.py"]
    config = compose_run(*words[3:])
    assert (config.model.name, config.batch.size, config.optim.lr) == ("bert_large", batch, lr)
    assert config.optim.preconditioner == ("kfac" if optim == "kfac" else "none")
    assert config.data.name == f"bert_phase{phase}" and config.data.root == ENV["DATA_ROOT"]
    assert config.checkpoint.resume == "auto" and config.trainer.precision == "fp16"
    if phase == 2:
        assert config.model.weights == ENV["PHASE1"]


def test_squad_script_fine_tunes_the_phase_two_checkpoint() -> None:
    config = compose_run(*srun_words(SLURM / "bert_squad.sbatch")[3:])
    assert (config.model.name, config.model.weights, config.data.name) == (
        "bert_squad",
        ENV["PHASE2"],
        "squad",
    )
    assert config.data.vocab_file == ENV["VOCAB"]  # type: ignore[attr-defined]
    assert config.batch.size == 32 and config.trainer.max_epochs == 3


def test_prepare_script_runs_the_preparation_with_the_node_cores() -> None:
    words = srun_words(SLURM / "bert_prepare.sbatch")
    assert words[:3] == ["srun", "python", "scripts/prepare_bert_data.py"]
    assert words[words.index("--max-seq-length") + 1] == "128"
    assert (SLURM.parent / words[2]).is_file()
