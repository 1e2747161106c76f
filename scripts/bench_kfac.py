"""Single-process K-FAC benchmark: the step time of K-FAC + SGD against plain SGD.

    python scripts/bench_kfac.py                              # CPU: ResNet-20 and the MLP
    python scripts/bench_kfac.py --device cuda --bf16         # adds ResNet-50 in bf16 autocast

Models (synthetic inputs, fixed batches, cross-entropy): a CIFAR ResNet-20 at batch 128
(3x32x32), an MLP 784-1024-1024-10 at batch 1024 and, with `--bf16`, torchvision's ResNet-50 at
batch 64 (3x224x224) under bf16 autocast. Configurations per model: plain SGD-momentum, then
K-FAC + SGD-momentum with intervals (factor_update_steps, inv_update_steps) = (1, 1) and
(10, 100), for the eigen and the inverse method.

A step is zero_grad, forward, loss, backward, `pre.step()`, `optimizer.step()`. The
configurations of a model are stepped in turn (step i of each, then step i + 1) so that load
changes on a shared machine hit them alike. N, the number of timed steps, is a multiple of 100,
so a (10, 100) run contains exactly N/10 factor updates and N/100 second-order updates.
Reported, each also as a ratio to SGD: the median step; the amortised step, Σ over the kinds of
step (plain, factor update, second-order update) of count · median / N, which the occasional
multi-second stall of a shared machine cannot distort; the mean step (total / N, the same
amortisation without that protection); and the bytes of K-FAC state (`pre.memory_bytes()`).
The (1, 1) configurations do the same work every step and are timed over `--dense-steps` steps.
A phase table splits each (10, 100) step into forward+backward, `pre.step()` and
`optimizer.step()` by kind of step (factor statistics are formed in hooks during backward).
`--profile` prints torch.profiler's top operators for one configuration.

Memory (`--memory`, CPU): after the timed steps, one untimed step of SGD and one factor-update
step of each (10, 100) configuration run under a `TorchDispatchMode` that follows every storage
an operator creates (views of operands excluded) until it is freed; the peak of the live bytes
over the step (forward, backward with K-FAC's hooks, `pre.step()`, `optimizer.step()`) is
reported with its ratio to SGD's. `--bf16-kfac` adds the eigen configurations again with
second-order data and preconditioning products in bfloat16 (factor statistics and the model stay
float32). `--patch-matrix` adds the (10, 100) configurations again with
the Conv2d input factor formed from the full patch matrix (the path before `conv_stats`), for a
before/after in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kfac_train.kfac import KFACPreconditioner
from kfac_train.kfac.layers import Conv2dHandler
from kfac_train.models.resnet_cifar import CifarResNet, ResNet20Config

MB = 1e6
# KAISA's "mean" convention, the one the peer (kfac-pytorch) implements and this damping was
# tuned with; the cost of either convention is the same.
KFAC_HYPERPARAMETERS = {
    "damping": 0.003,
    "factor_decay": 0.95,
    "kl_clip": 0.001,
    "lr": 0.1,
    "grad_scaling": "mean",
}
INTERVALS = {"1/1": (1, 1), "10/100": (10, 100)}
#: ``--bf16-kfac``: the K-FAC dtype options set to bfloat16 (docs/kfac.md, "Low precision"):
#: second-order data and preconditioning products; factor statistics stay float32 (exact).
BF16_KFAC_OPTIONS = ("inv_dtype", "precondition_dtype")
PHASES = ("forward+backward", "pre.step", "optimizer.step")


@dataclass
class Workload:
    """A model and the shape of its synthetic batch."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    bf16: bool = False


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def _resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


WORKLOADS = {
    "resnet20": Workload("ResNet-20", lambda: CifarResNet(ResNet20Config()), (128, 3, 32, 32), 10),
    "mlp": Workload("MLP 784-1024-1024-10", _mlp, (1024, 784), 10),
    "resnet50": Workload("ResNet-50 bf16", _resnet50, (64, 3, 224, 224), 1000, bf16=True),
}


@dataclass
class Configuration:
    name: str
    compute_method: str | None  # None: plain SGD
    intervals: tuple[int, int] = (1, 1)
    patch_matrix: bool = False  # Conv2d input factor from the materialised patch matrix
    async_inverse: bool = False
    bf16_kfac: bool = False  # second-order data and preconditioning products in bf16

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """The K-FAC dtype options of this configuration (none: the float32 defaults)."""
        if not self.bf16_kfac:
            return {}
        return {name: torch.bfloat16 for name in BF16_KFAC_OPTIONS}


class PatchMatrixConv2d(Conv2dHandler):
    """The Conv2d statistic as before ``conv_stats``: ``aᵀa / N`` of the patch rows."""

    input_statistic = None


class PeakBytes(TorchDispatchMode):
    """Peak live bytes of the CPU storages operators create while active (views of an
    operand are not allocations); each storage is followed until freed (``weakref``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        operands = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in operands or key in self._tracked or storage.nbytes() == 0:
                continue
            self._tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


@dataclass
class Result:
    """Per-step seconds of one configuration; phases[kind][phase] lists seconds per step."""

    configuration: Configuration
    step_seconds: list[float]
    memory_bytes: int
    phases: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    step_peak_bytes: int | None = None  # --memory: peak of an SGD / a factor-update step

    @property
    def median(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def mean(self) -> float:
        """Total time / N: the amortised step, but sensitive to load spikes."""
        return sum(self.step_seconds) / len(self.step_seconds)

    @property
    def amortised(self) -> float:
        """Σ_kinds count · median step of that kind / N: the amortised step, robust to the
        occasional multi-second stall of a shared machine."""
        if not self.phases:
            return self.median
        total = sum(
            len(times["pre.step"])
            * statistics.median(
                [sum(parts) for parts in zip(*(times[p] for p in PHASES), strict=True)]
            )
            for times in self.phases.values()
        )
        return total / len(self.step_seconds)


def configurations() -> list[Configuration]:
    configs = [Configuration("sgd", None)]
    for method in ("eigen", "inverse"):
        for label, intervals in INTERVALS.items():
            configs.append(Configuration(f"{method} {label}", method, intervals))
    return configs


def bf16_kfac_configurations() -> list[Configuration]:
    """``--bf16-kfac``: the eigen configurations again with second-order data and
    preconditioning products in bfloat16 (float32 accumulation); factors and model float32.
    (bfloat16 products with the inverse method are refused: docs/kfac.md, "Low precision".)"""
    return [
        Configuration(f"{c.name} bf16", c.compute_method, c.intervals, bf16_kfac=True)
        for c in configurations()
        if c.compute_method == "eigen"
    ]


def all_configurations() -> list[Configuration]:
    """Every configuration any option can add, for lookups by name."""
    return (
        configurations()
        + bf16_kfac_configurations()
        + patch_matrix_configurations()
        + async_configurations()
    )


def patch_matrix_configurations() -> list[Configuration]:
    """The (10, 100) configurations with the Conv2d factor from the patch matrix."""
    return [
        Configuration(f"{method} 10/100 rows", method, INTERVALS["10/100"], patch_matrix=True)
        for method in ("eigen", "inverse")
    ]


def async_configurations() -> list[Configuration]:
    """``--async``: the (10, 100) configurations again with ``async_inverse=True`` (the
    second-order update of step t computed on a worker thread, installed at step t + 1)."""
    return [
        Configuration(f"{method} 10/100 async", method, INTERVALS["10/100"], async_inverse=True)
        for method in ("eigen", "inverse")
    ]


#: The step after an asynchronous second-order update: it installs the data, waiting for the
#: worker if it is not done, so it is timed as a kind of its own (else the plain steps' median
#: would hide the wait from the amortised figure).
ASYNC_APPLY = "async install"


def _async_step_kind(step: int, config: Configuration) -> str:
    if config.async_inverse and step % config.intervals[1] == 1:
        return ASYNC_APPLY
    return _step_kind(step, config.intervals)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="resnet20,mlp", help=f"comma-separated, from {sorted(WORKLOADS)}"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="timed steps for SGD and (10, 100); a multiple of 100",
    )
    parser.add_argument(
        "--dense-steps", type=int, default=20, help="timed steps for the (1, 1) configurations"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="add ResNet-50 at batch 64 under bf16 autocast (GPU case)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--conv-factor",
        choices=("patches", "spatial_mean"),
        default="patches",
        help="K-FAC conv input factor: exact patches or Ba et al.'s spatial mean",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="CPU: peak bytes of one SGD step and one factor-update step (TorchDispatchMode)",
    )
    parser.add_argument(
        "--patch-matrix",
        action="store_true",
        help="add (10, 100) configurations whose Conv2d factor uses the full patch matrix",
    )
    parser.add_argument(
        "--async",
        dest="async_inverse",
        action="store_true",
        help="add (10, 100) configurations with async_inverse=True (see async_configurations)",
    )
    parser.add_argument(
        "--factor-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="K-FAC factor_dtype of every configuration (bfloat16: 16-bit statistics)",
    )
    parser.add_argument(
        "--bf16-kfac",
        action="store_true",
        help="add the eigen configurations with inv_dtype and precondition_dtype bfloat16 "
        "(see bf16_kfac_configurations)",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=20, help="steps (after warm-up) under --profile"
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="MODEL:CONFIG",
        help='profile one configuration instead, e.g. "resnet20:eigen 10/100"',
    )
    args = parser.parse_args()
    if args.steps <= 0 or args.steps % 100 != 0:
        parser.error(
            f"--steps={args.steps}: use a positive multiple of 100 so that a (10, 100) "
            "run amortises its updates exactly"
        )
    models = [name for name in args.models.split(",") if name]
    unknown = sorted(set(models) - set(WORKLOADS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(WORKLOADS)}")
    if args.bf16 and "resnet50" not in models:
        models.append("resnet50")
    args.models = models
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda: no CUDA device is available")
    return args


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_kind(step: int, intervals: tuple[int, int]) -> str:
    factor_every, inverse_every = intervals
    if step % inverse_every == 0:
        return "second-order update"
    if step % factor_every == 0:
        return "factor update"
    return "plain"


class Runner:
    """One configuration's model, optimizer and preconditioner, stepped one step at a time so
    that all configurations of a model can be interleaved (step i of each, then step i + 1):
    load changes on a shared machine then hit every configuration alike."""

    def __init__(
        self,
        workload: Workload,
        config: Configuration,
        num_steps: int,
        warmup: int,
        device: torch.device,
    ) -> None:
        self.config, self.num_steps, self.warmup, self.device = config, num_steps, warmup, device
        torch.manual_seed(0)
        self.model = workload.build().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.pre = None
        if config.compute_method is not None:
            factor_every, inverse_every = config.intervals
            self.pre = KFACPreconditioner(
                self.model,
                factor_update_steps=factor_every,
                inv_update_steps=inverse_every,
                compute_method=config.compute_method,
                **({"async_inverse": True} if config.async_inverse else {}),
                **config.dtypes,
                **KFAC_HYPERPARAMETERS,
            )
            if config.patch_matrix:
                for block in self.pre.blocks.values():
                    if type(getattr(block, "handler", None)) is Conv2dHandler:
                        block.handler = PatchMatrixConv2d()
        generator = torch.Generator().manual_seed(1)
        self.batches = [
            (
                torch.randn(workload.input_shape, generator=generator).to(device),
                torch.randint(
                    0, workload.num_classes, workload.input_shape[:1], generator=generator
                ).to(device),
            )
            for _ in range(2)
        ]
        self.autocast = workload.bf16
        self.steps_done = 0
        self.step_seconds: list[float] = []
        self.phases: dict[str, dict[str, list[float]]] = {}

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.warmup + self.num_steps

    def step(self) -> None:
        """One training step on alternating synthetic batches, timed by phase."""
        inputs, labels = self.batches[self.steps_done % 2]
        kind = _async_step_kind(self.steps_done, self.config)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        _synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(self.model(inputs), labels)
        loss.backward()
        _synchronize(self.device)
        backward_done = time.perf_counter()
        if self.pre is not None:
            self.pre.step()
        _synchronize(self.device)
        pre_done = time.perf_counter()
        self.optimizer.step()
        _synchronize(self.device)
        end = time.perf_counter()
        if not self.finished and self.steps_done >= self.warmup:  # later steps: --memory
            self.step_seconds.append(end - start)
            per_kind = self.phases.setdefault(kind, {phase: [] for phase in PHASES})
            per_kind["forward+backward"].append(backward_done - start)
            per_kind["pre.step"].append(pre_done - backward_done)
            per_kind["optimizer.step"].append(end - pre_done)
        self.steps_done += 1

    def step_peak_bytes(self) -> int:
        """Peak bytes allocated during one untimed step: the next factor-update step of a
        (10, 100) configuration, any step of SGD."""
        # SGD: any step (its configuration's intervals are nominal, so every step would count
        # as a second-order update and a search for a "plain" one never ends).
        while self.pre is not None and (
            _step_kind(self.steps_done, self.config.intervals) != "factor update"
        ):
            self.step()
        with PeakBytes() as tracker:
            self.step()
        return tracker.peak

    def result(self) -> Result:
        # The peer's preconditioner (bench_kfac_peer.py) reports no memory figures.
        memory = sum(self.pre.memory_bytes().values()) if hasattr(self.pre, "memory_bytes") else 0
        return Result(self.config, self.step_seconds, memory, self.phases)


def run_interleaved(runners: list[Runner]) -> list[Result]:
    while not all(runner.finished for runner in runners):
        for runner in runners:
            if not runner.finished:
                runner.step()
    return [runner.result() for runner in runners]


def format_results(results: list[Result]) -> str:
    sgd = results[0]
    width = max(15, *(len(r.configuration.name) for r in results))
    header = (
        f"{'configuration':<{width}} {'steps':>5} {'median ms':>9} {'x SGD':>6} "
        f"{'amortised ms':>12} {'x SGD':>6} {'mean ms':>8} {'x SGD':>6} {'K-FAC state MB':>14}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(
            f"{r.configuration.name:<{width}} {len(r.step_seconds):>5} {r.median * 1e3:>9.1f} "
            f"{r.median / sgd.median:>6.2f} {r.amortised * 1e3:>12.1f} "
            f"{r.amortised / sgd.amortised:>6.2f} {r.mean * 1e3:>8.1f} "
            f"{r.mean / sgd.mean:>6.2f} {r.memory_bytes / MB:>14.2f}"
        )
    return "\n".join(rows)


def format_phases(result: Result) -> str:
    """Median milliseconds per phase for each kind of step of one configuration."""
    header = f"  {result.configuration.name}: {'kind of step':<20} {'count':>5} " + " ".join(
        f"{phase:>16}" for phase in PHASES
    )
    rows = [header]
    for kind in ("plain", "factor update", "second-order update", ASYNC_APPLY):
        if kind not in result.phases:
            continue
        times = result.phases[kind]
        rows.append(
            f"  {'':<{len(result.configuration.name) + 1}} {kind:<20} "
            f"{len(times['pre.step']):>5} "
            + " ".join(f"{statistics.median(times[p]) * 1e3:>16.1f}" for p in PHASES)
        )
    return "\n".join(rows)


def format_memory(results: list[Result]) -> str:
    sgd = results[0].step_peak_bytes
    rows = [f"peak bytes allocated in one step (--memory): sgd step {sgd / MB:.1f} MB"]
    for r in results[1:]:
        if r.step_peak_bytes is not None:
            rows.append(
                f"  {r.configuration.name:<17} factor-update step {r.step_peak_bytes / MB:8.1f} MB"
                f"  {r.step_peak_bytes / sgd:5.2f} x SGD"
            )
    return "\n".join(rows)


def profile(spec: str, args: argparse.Namespace, device: torch.device) -> None:
    """Print torch.profiler's top operators (self CPU time) for one configuration."""
    model_name, _, config_name = spec.partition(":")
    by_name = {c.name: c for c in all_configurations()}
    if model_name not in WORKLOADS or config_name not in by_name:
        raise SystemExit(
            f"--profile={spec!r}: use MODEL:CONFIG with MODEL in "
            f"{sorted(WORKLOADS)} and CONFIG in {sorted(by_name)}"
        )
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    runner = Runner(
        WORKLOADS[model_name], by_name[config_name], args.profile_steps, args.warmup, device
    )
    with torch.profiler.profile(activities=activities) as profiler:
        run_interleaved([runner])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=25))


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    KFAC_HYPERPARAMETERS["conv_factor"] = args.conv_factor
    KFAC_HYPERPARAMETERS["factor_dtype"] = getattr(torch, args.factor_dtype)
    device = torch.device(args.device)
    if args.profile is not None:
        profile(args.profile, args, device)
        return
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", CPU threads {torch.get_num_threads()}; K-FAC {KFAC_HYPERPARAMETERS}; "
        f"{args.warmup} warm-up steps"
    )
    for model_name in args.models:
        workload = WORKLOADS[model_name]
        runners = []
        extra = patch_matrix_configurations() if args.patch_matrix else []
        extra += async_configurations() if args.async_inverse else []
        extra += bf16_kfac_configurations() if args.bf16_kfac else []
        for config in configurations() + extra:
            dense = config.compute_method is not None and config.intervals == (1, 1)
            num_steps = args.dense_steps if dense else args.steps
            runners.append(Runner(workload, config, num_steps, args.warmup, device))
        results = run_interleaved(runners)
        if args.memory:
            for runner, result in zip(runners, results, strict=True):
                if runner.pre is None or runner.config.intervals == INTERVALS["10/100"]:
                    result.step_peak_bytes = runner.step_peak_bytes()
        print(f"\n{workload.name}, batch {workload.input_shape[0]}")
        print(format_results(results))
        if args.memory:
            print(format_memory(results))
        print("phases (median ms):")
        for result in results:
            if result.configuration.compute_method is not None:
                print(format_phases(result))


if __name__ == "__main__":
    main()
