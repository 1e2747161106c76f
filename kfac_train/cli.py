"""Command-line helpers used by train.py before and around Hydra."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from kfac_train.errors import UserError

# `batch=32768`, `batch=4096,8192`, `override batch=...` (Hydra would parse the digits as ints,
# which cannot name a config group option).
_NUMERIC_GROUPS = ("batch",)
_NUMERIC_CHOICE = re.compile(
    r"^(?P<key>(?:~|\+|\+\+)?(?:" + "|".join(_NUMERIC_GROUPS) + r"))=(?P<values>\d+(?:,\d+)*)$"
)


def normalise_argv(argv: list[str]) -> list[str]:
    """Quote numeric group choices so Hydra reads them as option names.

    ``batch=32768`` → ``batch='32768'``; ``batch=4096,8192`` → ``batch='4096','8192'`` (a
    multirun sweep over two options). Other arguments are returned unchanged.
    """
    normalised = []
    for argument in argv:
        match = _NUMERIC_CHOICE.match(argument)
        if match:
            values = ",".join(f"'{v}'" for v in match.group("values").split(","))
            argument = f"{match.group('key')}={values}"
        normalised.append(argument)
    return normalised


def launched_rank() -> int:
    """This process's rank as set by torchrun (RANK) or srun (SLURM_PROCID); 0 when alone."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launched_world_size() -> int:
    """Ranks of this launch as set by torchrun (WORLD_SIZE) or srun (SLURM_NTASKS); 1 alone.

    The same rule as `kfac_train.distributed.launcher_env`, without importing torch.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env:
        return int(env.get("SLURM_NTASKS", "1"))
    return 1


def report_user_error(error: Exception) -> None:
    """Print a user error as one line on stderr."""
    print(f"error: {error}", file=sys.stderr)


_GROUP_CHOICE = re.compile(r"^(?:override\s+)?(?:\+\+|\+)?(?P<group>[A-Za-z_]\w*)=(?P<values>.*)$")


def group_options(conf_dir: Path, group: str) -> list[str]:
    """Option names of config group `group` (its yaml files; numeric names in numeric order)."""
    names = [path.stem for path in (conf_dir / group).glob("*.yaml")]
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """`UserError` for ``group=option`` arguments naming an option that does not exist.

    Hydra reports those too, but lists the schema entries of the ConfigStore as if they were
    options; this gives one line with the real choices. Sweeps (``model=a,b``) are checked
    option by option; sweep functions (``choice(...)``) are left to Hydra.
    """
    groups = {path.name for path in conf_dir.iterdir() if path.is_dir()}
    for argument in argv:
        match = _GROUP_CHOICE.match(argument)
        if not match or match.group("group") not in groups:
            continue
        values = match.group("values")
        if "(" in values or values in ("", "null"):
            continue
        group = match.group("group")
        options = group_options(conf_dir, group)
        for value in values.split(","):
            option = value.strip().strip("'\"")
            if option not in options:
                hint = "; any other size: batch.size=N" if group == "batch" else ""
                raise UserError(
                    f"unknown {group} {option!r}; choose one of: {', '.join(options)}{hint}"
                )
