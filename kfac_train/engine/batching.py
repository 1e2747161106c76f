"""Global batch = micro_batch × world_size × accumulation_steps."""

from __future__ import annotations

from dataclasses import dataclass

from kfac_train.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's `global_batch` samples are split over ranks and micro-batches."""

    global_batch: int
    micro_batch: int
    world_size: int
    accumulation_steps: int


def plan_batches(global_batch: int, micro_batch: int | None, world_size: int) -> BatchPlan:
    """Derive the accumulation steps; `UserError` naming the numbers when they do not divide.

    `micro_batch` None means one micro-batch per rank (``global_batch / world_size``).
    """
    if global_batch <= 0:
        raise UserError(f"batch.size={global_batch} must be positive")
    if micro_batch is None:
        if global_batch % world_size:
            raise UserError(
                f"batch.size={global_batch} is not divisible by the world size {world_size}: "
                "choose another batch.size or set trainer.micro_batch"
            )
        micro_batch = global_batch // world_size
    if micro_batch <= 0:
        raise UserError(f"trainer.micro_batch={micro_batch} must be positive")
    per_round = micro_batch * world_size
    if global_batch % per_round:
        raise UserError(
            f"batch.size={global_batch} is not divisible by trainer.micro_batch={micro_batch} x "
            f"world size {world_size} = {per_round}: choose a micro-batch that divides "
            f"{global_batch // world_size if global_batch % world_size == 0 else global_batch}"
        )
    return BatchPlan(global_batch, micro_batch, world_size, global_batch // per_round)
