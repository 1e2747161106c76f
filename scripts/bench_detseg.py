"""Step time and memory of K-FAC against the baseline optimizer for Mask R-CNN and the U-Net.

Mask R-CNN: SGD vs K-FAC + SGD (K-FAC on the ROI heads, KAISA's choice); U-Net: Adam vs
K-FAC + Adam (all Conv2d layers). Synthetic batches shaped like the real data, one process.

K-FAC's cost depends on the step: every step preconditions the gradients ("apply"), every
``--factor-every`` steps the Kronecker factors are also updated ("factors"), every
``--inverse-every`` steps the eigendecompositions are recomputed too ("full"). The three kinds are
timed separately (medians over ``--steps`` steps each, after ``--warmup`` steps) and combined into
the amortised K-FAC step at the given intervals (KAISA's by default: Mask R-CNN 50 / 500,
U-Net 20 / 200)::

    amortised = apply + (factors - apply) / factor_every + (full - factors) / inverse_every

Ratios are against the baseline measured in the same process. Memory: the bytes of K-FAC state
(factors + eigendata) and, on CUDA, the peak allocated memory of each kind of step.

CPU at a small size (the default here)::

    python scripts/bench_detseg.py --workload both --threads 2

The papers' per-GPU batch on a GPU (Mask R-CNN 2 images at 800 x 1333, U-Net 16 slices at 256²)::

    python scripts/bench_detseg.py --workload both --device cuda --paper
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfac_train.kfac import KFACPreconditioner  # noqa: E402
from kfac_train.models.maskrcnn import ROI_HEADS_ONLY_SKIP_LAYERS, build_maskrcnn  # noqa: E402
from kfac_train.models.unet import UNet  # noqa: E402
from kfac_train.tasks.detection import synthetic_detection_batch  # noqa: E402
from kfac_train.tasks.dice import dice_loss  # noqa: E402
from kfac_train.tasks.segmentation import synthetic_segmentation_batch  # noqa: E402

NEVER = 10**9  # an update interval that never comes round after step 0


@dataclass
class Workload:
    """One model, its batches, loss, baseline optimizer and K-FAC settings."""

    name: str
    baseline: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    skip_layers: tuple[str, ...]
    factor_every: int
    inverse_every: int
    description: str


def maskrcnn_workload(args: argparse.Namespace, device: torch.device) -> Workload:
    # the COCO recipe's ratio: shorter side min_size, longer side capped at 1333/800 of it
    min_size, max_size = (800, 1333) if args.paper else (args.size, round(args.size * 1333 / 800))
    height, width = (800, 1067) if args.paper else (args.size, round(args.size * 4 / 3))
    batch_size = 2 if args.paper else args.batch

    def batch(generator: torch.Generator) -> Any:
        images, targets = synthetic_detection_batch(batch_size, (height, width), 91, generator)
        images = [image.to(device) for image in images]
        targets = [{k: _to(v, device) for k, v in t.items()} for t in targets]
        return images, targets

    def loss(model: nn.Module, data: Any) -> torch.Tensor:
        return torch.stack(list(model(*data).values())).sum()

    return Workload(
        name="maskrcnn",
        baseline="sgd",
        build=lambda: build_maskrcnn(min_size=min_size, max_size=max_size),
        batch=batch,
        loss=loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9, weight_decay=1e-4),
        skip_layers=ROI_HEADS_ONLY_SKIP_LAYERS,
        factor_every=args.factor_every or 50,
        inverse_every=args.inverse_every or 500,
        description=f"Mask R-CNN R50-FPN, {batch_size} images {height}x{width} "
        f"(min_size {min_size}, max_size {max_size})",
    )


def unet_workload(args: argparse.Namespace, device: torch.device) -> Workload:
    size = 256 if args.paper else args.unet_size
    batch_size = 16 if args.paper else args.unet_batch

    def batch(generator: torch.Generator) -> Any:
        images, masks = synthetic_segmentation_batch(batch_size, 3, size, generator)[:2]
        return images.to(device), masks.to(device)

    return Workload(
        name="unet",
        baseline="adam",
        build=UNet,
        batch=batch,
        loss=lambda model, data: dice_loss(model(data[0]), data[1]),
        optimizer=lambda p: torch.optim.Adam(p, lr=4e-4),
        skip_layers=(),
        factor_every=args.factor_every or 20,
        inverse_every=args.inverse_every or 200,
        description=f"U-Net (Buda et al.), {batch_size} slices {size}x{size}",
    )


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    workload: Workload, device: torch.device, kind: str, args: argparse.Namespace
) -> dict[str, float]:
    """Median step time (s) of one kind: baseline, apply, factors or full; peak CUDA memory."""
    torch.manual_seed(0)
    model = workload.build().to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = workload.optimizer(params)
    pre = None
    if kind != "baseline":
        factor_every = 1 if kind in ("factors", "full") else NEVER
        inverse_every = 1 if kind == "full" else NEVER
        pre = KFACPreconditioner(
            model,
            factor_update_steps=factor_every,
            inv_update_steps=inverse_every,
            damping=0.003,
            lr=lambda step: optimizer.param_groups[0]["lr"],
            skip_layers=workload.skip_layers,
        )
    generator = torch.Generator().manual_seed(1)
    batches = [workload.batch(generator) for _ in range(2)]
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # step 0 always updates factors and eigendata: it is part of the warmup for every kind
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        workload.loss(model, batches[step % 2]).backward()
        if pre is not None:
            pre.step()
        optimizer.step()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"step_s": statistics.median(times)}
    if pre is not None:
        memory = pre.memory_bytes()
        result["kfac_state_mb"] = (memory["factors"] + memory["second_order"]) / 2**20
        result["kfac_layers"] = len(pre.layer_names)
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def bench(workload: Workload, device: torch.device, args: argparse.Namespace) -> None:
    print(f"\n## {workload.description} on {device}")
    print(
        f"K-FAC intervals: factors every {workload.factor_every}, eigendecompositions every "
        f"{workload.inverse_every}; median of {args.steps} steps after {args.warmup} warmup"
    )
    results = {
        kind: time_steps(workload, device, kind, args)
        for kind in ("baseline", "apply", "factors", "full")
    }
    base = results["baseline"]["step_s"]
    apply, factors, full = (results[k]["step_s"] for k in ("apply", "factors", "full"))
    amortised = (
        apply
        + (factors - apply) / workload.factor_every
        + (full - factors) / workload.inverse_every
    )
    rows = [
        (workload.baseline, base),
        ("K-FAC apply-only step", apply),
        ("K-FAC factor-update step", factors),
        ("K-FAC eigendecomposition step", full),
        ("K-FAC amortised", amortised),
    ]
    print("| step | time (s) | vs baseline |\n|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {seconds / base:.2f}x |")
    state = results["full"]
    print(f"K-FAC layers: {state['kfac_layers']}, K-FAC state: {state['kfac_state_mb']:.1f} MiB")
    if device.type == "cuda":
        print(
            "peak CUDA memory (MiB): "
            + ", ".join(f"{k} {v['peak_mb']:.0f}" for k, v in results.items())
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["maskrcnn", "unet", "both"], default="both")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    parser.add_argument("--paper", action="store_true", help="the papers' per-GPU batch sizes")
    parser.add_argument("--size", type=int, default=320, help="Mask R-CNN min_size (CPU)")
    parser.add_argument("--batch", type=int, default=2, help="Mask R-CNN images per step")
    parser.add_argument("--unet-size", type=int, default=128, help="U-Net slice side (CPU)")
    parser.add_argument("--unet-batch", type=int, default=4, help="U-Net slices per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per kind")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per kind (>= 1)")
    parser.add_argument("--factor-every", type=int, default=None)
    parser.add_argument("--inverse-every", type=int, default=None)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (step 0 always updates K-FAC's eigendata)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.workload in ("maskrcnn", "both"):
        bench(maskrcnn_workload(args, device), device, args)
    if args.workload in ("unet", "both"):
        bench(unet_workload(args, device), device, args)


if __name__ == "__main__":
    main()
