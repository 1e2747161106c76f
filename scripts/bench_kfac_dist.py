"""Distributed K-FAC benchmark: step time and bytes per strategy, against plain SGD + DDP.

Launch with torchrun (gloo on CPU, nccl when CUDA is available):

    PYTHONPATH=. torchrun --standalone --nproc_per_node=2 scripts/bench_kfac_dist.py

Every configuration trains the same CIFAR ResNet-20 (synthetic 3x32x32 inputs, 10 classes,
`--batch-size` images per rank) wrapped in DistributedDataParallel with SGD-momentum:
plain SGD and K-FAC with each of KAISA's strategies (COMM-OPT, HYBRID-OPT, MEM-OPT). The
configurations are stepped in turn (step i of each, then step i+1 of each), so that load changes
on a shared machine hit all of them alike. A step is forward, backward, `pre.step()` and
`optimizer.step()`; its time is the slowest rank's (all ranks start it together after a
barrier). The table gives the median and the mean (the mean amortises the factor and inverse
updates over their intervals) and the ratio of each to SGD's, plus K-FAC's payload per step by
kind (`pre.comm_bytes()`, averaged over ranks and over the timed steps) and its per-rank memory
(`pre.memory_bytes()`, largest rank). DDP's own gradient all-reduce, the same for every row, is
printed once in the header.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfac_train.distributed import DistInfo, init_distributed, teardown
from kfac_train.kfac import KFACPreconditioner, resolve_grad_worker_fraction
from kfac_train.models.resnet_cifar import CifarResNet, ResNet20Config

STRATEGIES = ("comm-opt", "hybrid-opt", "mem-opt")
KINDS = ("factor_allreduce", "second_order_broadcast", "grad_broadcast")
MB = 1e6


@dataclass
class Result:
    """Timings (seconds, slowest rank per step) and K-FAC accounting of one configuration."""

    name: str
    step_times: list[float]
    bytes_per_step: dict[str, float]
    memory_bytes: int

    @property
    def median(self) -> float:
        return statistics.median(self.step_times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.step_times)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--factor-update-steps", type=int, default=1)
    parser.add_argument("--inv-update-steps", type=int, default=10)
    parser.add_argument("--compute-method", choices=("eigen", "inverse"), default="eigen")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n + 2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser.parse_args()


def build_model(depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return CifarResNet(ResNet20Config(depth=depth)).to(device)


def synthetic_batches(
    info: DistInfo, batch_size: int, count: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few fixed CIFAR-shaped batches per rank, different on every rank."""
    generator = torch.Generator().manual_seed(1000 + info.rank)
    return [
        (
            torch.randn(batch_size, 3, 32, 32, generator=generator).to(info.device),
            torch.randint(0, 10, (batch_size,), generator=generator).to(info.device),
        )
        for _ in range(count)
    ]


def slowest_rank(seconds: float, device: torch.device) -> float:
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def rank_mean(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


class Configuration:
    """One model + DDP + SGD-momentum (+ K-FAC unless `strategy` is None) being benchmarked."""

    def __init__(self, name: str, strategy: str | None, args: argparse.Namespace, info: DistInfo):
        self.name = name
        self.info = info
        model = build_model(args.depth, info.device)
        self.ddp_model = DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None
        )
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.pre: KFACPreconditioner | None = None
        if strategy is not None:
            self.pre = KFACPreconditioner(
                self.ddp_model,
                factor_update_steps=args.factor_update_steps,
                inv_update_steps=args.inv_update_steps,
                damping=0.003,
                factor_decay=0.95,
                kl_clip=0.001,
                lr=0.1,
                compute_method=args.compute_method,
                grad_worker_fraction=strategy,
            )
        self.step_times: list[float] = []
        self.bytes_at_start = dict.fromkeys(KINDS, 0)

    def start_timing(self) -> None:
        """Called after the warm-up: the timed steps' bytes are counted from here."""
        if self.pre is not None:
            self.bytes_at_start = self.pre.comm_bytes()["total"]

    def step(self, x: torch.Tensor, y: torch.Tensor, timed: bool) -> None:
        """One training step, started on all ranks together; records the slowest rank's time."""
        device = self.info.device
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.ddp_model(x), y).backward()
        if self.pre is not None:
            self.pre.step()
        self.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = slowest_rank(time.perf_counter() - start, device)
        if timed:
            self.step_times.append(elapsed)

    def result(self) -> Result:
        per_step = dict.fromkeys(KINDS, 0.0)
        memory = 0
        if self.pre is not None:
            total = self.pre.comm_bytes()["total"]
            steps = len(self.step_times)
            own = [(total[k] - self.bytes_at_start[k]) / steps for k in KINDS]
            per_step = dict(zip(KINDS, rank_mean(own, self.info.device), strict=True))
            memory_here = float(sum(self.pre.memory_bytes().values()))
            memory = int(slowest_rank(memory_here, self.info.device))  # the largest rank's
        return Result(self.name, self.step_times, per_step, memory)


def run_interleaved(
    configurations: list[Configuration], args: argparse.Namespace, info: DistInfo
) -> list[Result]:
    """Step every configuration in turn, so that load changes on a shared machine hit all of
    them alike rather than whichever happened to run at the time."""
    batches = synthetic_batches(info, args.batch_size)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            for configuration in configurations:
                configuration.start_timing()
        x, y = batches[step % len(batches)]
        for configuration in configurations:
            configuration.step(x, y, timed=step >= args.warmup)
    return [configuration.result() for configuration in configurations]


def describe_strategies(args: argparse.Namespace, info: DistInfo) -> list[str]:
    """One line per strategy: its gradient workers per layer (m) on this world size."""
    lines = []
    for strategy in STRATEGIES:
        fraction = resolve_grad_worker_fraction(strategy, info.world_size)
        m = max(1, round(fraction * info.world_size))
        lines.append(f"  {strategy}: grad_worker_fraction={fraction:g}, m={m} gradient workers")
    return lines


def format_table(results: list[Result]) -> str:
    sgd = results[0]
    header = (
        f"{'configuration':<13} {'median ms':>9} {'x SGD':>6} {'mean ms':>8} {'x SGD':>6} "
        f"{'factor MB/step':>14} {'2nd-order MB/step':>17} {'grad MB/step':>12} "
        f"{'K-FAC MB/rank':>13}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(
            f"{r.name:<13} {r.median * 1e3:>9.1f} {r.median / sgd.median:>6.2f} "
            f"{r.mean * 1e3:>8.1f} {r.mean / sgd.mean:>6.2f} "
            f"{r.bytes_per_step['factor_allreduce'] / MB:>14.3f} "
            f"{r.bytes_per_step['second_order_broadcast'] / MB:>17.3f} "
            f"{r.bytes_per_step['grad_broadcast'] / MB:>12.3f} "
            f"{r.memory_bytes / MB:>13.2f}"
        )
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    info = init_distributed(args.device)
    if not info.is_distributed:
        raise SystemExit(
            "launch with torchrun, e.g. torchrun --standalone --nproc_per_node=2 "
            "scripts/bench_kfac_dist.py"
        )
    try:
        configurations = [Configuration("sgd", None, args, info)]
        configurations += [Configuration(s, s, args, info) for s in STRATEGIES]
        results = run_interleaved(configurations, args, info)
        if info.is_main:
            model = build_model(args.depth, torch.device("cpu"))
            grad_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
            layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
            print(
                f"ResNet-{args.depth}, batch {args.batch_size}/rank, {info.world_size} ranks, "
                f"backend {dist.get_backend()}, device {info.device.type}, "
                f"torch threads/rank {torch.get_num_threads()}, {layers} K-FAC layers"
            )
            print(
                f"K-FAC: {args.compute_method}, factor_update_steps={args.factor_update_steps}, "
                f"inv_update_steps={args.inv_update_steps}; {args.steps} timed steps after "
                f"{args.warmup} warm-up; DDP gradient all-reduce {grad_mb:.3f} MB/step"
            )
            print("\n".join(describe_strategies(args, info)))
            print(format_table(results))
    finally:
        teardown()


if __name__ == "__main__":
    main()
