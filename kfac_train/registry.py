"""Name → builder registries, one per component kind, and the context builders receive.

Every component kind (models, data, tasks, optimizers, schedules, loggers) has one `Registry`.
A builder is registered under the option name used on the command line (``model=resnet50``) and,
for groups with per-option schemas (model, data, task), together with the dataclass schema of
that option, which is stored in Hydra's ConfigStore as ``<group>/<name>_schema``::

    @MODELS.register("resnet20", schema=ResNet20Config)
    def build_resnet20(cfg: ResNet20Config, ctx: BuildContext) -> nn.Module: ...

Builders are found by importing every module of the component's package
(`discover_components`), so a new file in ``kfac_train/models/`` is picked up without editing
any list.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from hydra.core.config_store import ConfigStore

if TYPE_CHECKING:
    import torch

    from kfac_train.config import RunConfig
    from kfac_train.distributed import DistInfo
    from kfac_train.tasks.base import Task

B = TypeVar("B", bound=Callable[..., Any])


@dataclass
class BuildContext:
    """What every builder may read besides its own config node.

    Attributes:
        config: the whole typed run configuration (read-only by convention).
        dist: rank, world size, local rank and the device of this process.
        micro_batch: samples per forward/backward on this rank.
        accumulation_steps: micro-batches per optimizer step.
        task: the task of this run (set before data and model are built; None while the task
            itself is being built).
    """

    config: RunConfig
    dist: DistInfo
    micro_batch: int
    accumulation_steps: int
    task: Task | None = None

    @property
    def device(self) -> torch.device:
        return self.dist.device


class Registry(Generic[B]):
    """A mapping from option names to builders of one component kind.

    Args:
        kind: plural noun used in messages ("models").
        group: the Hydra config group whose option schemas this registry stores, or None when the
            group has one shared schema (optim, schedule, logger).
        package: the package whose modules register builders (imported by `discover`).
    """

    def __init__(self, kind: str, group: str | None, package: str) -> None:
        self.kind = kind
        self.group = group
        self.package = package
        self._builders: dict[str, B] = {}

    def register(self, name: str, *, schema: type | None = None) -> Callable[[B], B]:
        """Decorator registering `builder` under `name` (and its schema in the ConfigStore)."""
        if schema is not None and self.group is None:
            raise TypeError(f"the {self.kind} registry has one shared schema; got {schema=}")

        def decorate(builder: B) -> B:
            if name in self._builders and self._builders[name] is not builder:
                raise ValueError(f"{self.kind} option {name!r} is registered twice")
            self._builders[name] = builder
            if schema is not None:
                ConfigStore.instance().store(group=self.group, name=f"{name}_schema", node=schema)
            return builder

        return decorate

    def get(self, name: str) -> B:
        """The builder registered as `name`; ValueError listing the choices otherwise."""
        self.discover()
        if name not in self._builders:
            from kfac_train.errors import UserError

            raise UserError(
                f"unknown {self.kind[:-1]} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._builders[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._builders)

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the builder registered as `name` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def discover(self) -> None:
        """Import every module of `package` so that their decorators run (idempotent)."""
        discover_components(self.package)

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._builders


_discovered: set[str] = set()


def discover_components(package: str) -> None:
    """Import `package` and all its submodules once (registration happens at import time)."""
    if package in _discovered:
        return
    _discovered.add(package)
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)


MODELS: Registry[Callable[..., Any]] = Registry("models", "model", "kfac_train.models")
DATA: Registry[Callable[..., Any]] = Registry("datasets", "data", "kfac_train.data")
TASKS: Registry[Callable[..., Any]] = Registry("tasks", "task", "kfac_train.tasks")
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizers", None, "kfac_train.optim")
SCHEDULES: Registry[Callable[..., Any]] = Registry("schedules", None, "kfac_train.schedules")
LOGGERS: Registry[Callable[..., Any]] = Registry("loggers", None, "kfac_train.loggers")

ALL_REGISTRIES = (MODELS, DATA, TASKS, OPTIMIZERS, SCHEDULES, LOGGERS)


def discover_all() -> None:
    """Import every component package (registers all builders and option schemas)."""
    for registry in ALL_REGISTRIES:
        registry.discover()
