"""kfac-train command line: ``python train.py [group=option ...] [key=value ...]``.

Composes the Hydra config in conf/ (``batch=32768`` works as typed: numeric group choices are
quoted before Hydra parses argv) and calls `kfac_train.app.train`. User errors print one line
and exit with status 2. See README.md and docs/config.md.
"""

import sys
from pathlib import Path

from kfac_train.cli import check_group_choices, launched_rank, normalise_argv, report_user_error
from kfac_train.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"

if __name__ == "__main__":
    arguments = normalise_argv(sys.argv[1:])
    try:
        check_group_choices(arguments, CONF_DIR)  # before the slow imports below
    except UserError as error:
        report_user_error(error)
        sys.exit(2)
    if launched_rank() > 0:
        arguments.append("hydra.output_subdir=null")  # rank 0 writes the run's .hydra/ files
    sys.argv = [sys.argv[0], *arguments]

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from kfac_train.app import train  # noqa: E402
from kfac_train.hydra_setup import register_configs  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except UserError as error:
        report_user_error(error)
        sys.exit(2)


if __name__ == "__main__":
    register_configs()
    main()
