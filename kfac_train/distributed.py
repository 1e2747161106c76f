"""Process-group setup for torchrun and Slurm (srun) launches, and small collective helpers.

`init_distributed` reads the launcher's environment:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- srun without torchrun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the master address is
  the first host of SLURM_JOB_NODELIST (``node[01-03,07]`` is expanded here; no `scontrol`
  needed), port MASTER_PORT or 29500 + (job id mod 1000);
- otherwise a single process without a process group.
The backend is nccl when the device is CUDA, gloo otherwise; the device is ``cuda:<local
rank>`` or the CPU. `teardown` destroys the process group.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kfac_train.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: `rank` of `world_size`, `local_rank` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list: ``"gpu[01-03,07],cpu5"`` → gpu01 gpu02 gpu03 gpu07 cpu5.

    Zero padding of ranges is kept (``[08-10]`` → 08 09 10).
    """
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                low, high = part.split("-", 1)
                width = len(low)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(low), int(high) + 1))
            else:
                hosts.append(f"{prefix}{part}")
    return hosts


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for this process, or None if alone.

    torchrun's variables win over Slurm's (``srun torchrun ...`` sets both).
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "RANK": env["RANK"],
            "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        hosts = expand_nodelist(nodelist)
        if not hosts:
            raise UserError(f"cannot find the master host in SLURM_JOB_NODELIST={nodelist!r}")
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", hosts[0]),
            "MASTER_PORT": env.get("MASTER_PORT", str(29500 + job_id % 1000)),
        }
    return None


def pick_device(preference: str, local_rank: int) -> torch.device:
    """The device for `preference` ("auto", "cpu", "cuda") and this process's local rank."""
    if preference not in ("auto", "cpu", "cuda"):
        raise UserError(f"trainer.device={preference!r}: choose auto, cpu or cuda")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available: use cpu or auto")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Initialise the default process group if launched by torchrun or srun (idempotent)."""
    variables = launcher_env()
    if variables is None:
        return DistInfo(0, 1, 0, pick_device(device_preference, 0))
    os.environ.update(variables)
    rank, world = int(variables["RANK"]), int(variables["WORLD_SIZE"])
    local_rank = int(variables["LOCAL_RANK"])
    device = pick_device(device_preference, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world, local_rank, device)


def teardown() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks (a new tensor; the input when there is one process)."""
    if not _active():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_max(value: float) -> float:
    """Maximum of a Python scalar over all ranks (host sync; use off the hot path)."""
    if not _active():
        return value
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (picklable objects; one process: ``[obj]``)."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm statistics), as DDP does before forward."""
    if not _active():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if _active():
        dist.barrier()
