"""Name → builder registries, one per component kind.

Every component kind (models, data, tasks, optimizers, schedules, loggers) has one `Registry`.
A builder is registered under the option name used on the command line (``model=resnet50``) and,
for groups with per-option schemas (model, data, task), together with the dataclass schema of
that option (`kfac_train.hydra_setup.register_configs` stores it in Hydra's ConfigStore as
``<group>/<name>_schema``)::

    @MODELS.register("resnet20", schema=ResNet20Config)
    def build_resnet20(cfg: ResNet20Config, ctx: BuildContext) -> nn.Module: ...

Builders are found by importing every module of the component's package
(`discover_components`), so a new file in ``kfac_train/models/`` is picked up without editing
any list. This module imports neither Hydra nor the config schemas; `BuildContext` (what
builders receive) lives in `kfac_train.context` and is re-exported here for plug-in modules.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kfac_train.context import BuildContext
from kfac_train.errors import UserError

__all__ = [
    "ALL_REGISTRIES",
    "DATA",
    "LOGGERS",
    "MODELS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TASKS",
    "BuildContext",
    "Registry",
    "discover_all",
    "discover_components",
]

B = TypeVar("B", bound=Callable[..., Any])


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
        self._schemas: dict[str, type] = {}

    def register(self, name: str, *, schema: type | None = None) -> Callable[[B], B]:
        """Decorator registering `builder` under `name`, with its option schema if any."""
        if schema is not None and self.group is None:
            raise TypeError(f"the {self.kind} registry has one shared schema; got {schema=}")

        def decorate(builder: B) -> B:
            if name in self._builders and self._builders[name] is not builder:
                raise ValueError(f"{self.kind} option {name!r} is registered twice")
            self._builders[name] = builder
            if schema is not None:
                self._schemas[name] = schema
            return builder

        return decorate

    def get(self, name: str) -> B:
        """The builder registered as `name`; ValueError listing the choices otherwise."""
        self.discover()
        if name not in self._builders:
            raise UserError(
                f"unknown {self.kind[:-1]} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._builders[name]

    def schemas(self) -> dict[str, type]:
        """Option name → schema dataclass of every option registered with one."""
        self.discover()
        return dict(self._schemas)

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
