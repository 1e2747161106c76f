#!/usr/bin/env python3
"""Input-pipeline throughput: training images/s of data=imagenet (torchvision) and
data=imagenet_dali (DALI, CPU or GPU decoding), as ratios to the torchvision pipeline measured
in the same process.

By default it writes a temporary ImageNet-layout tree of JPEGs of ImageNet's typical size
(500x375, ~100 KB at quality 90, smooth content plus noise) and reads its train split; pass
--root to read a real dataset instead. Each pipeline runs --warmup batches, then --batches timed
batches of --batch images (random-resized crop to --image-size, flip, normalise).

    python scripts/bench_input.py                         # torchvision vs DALI CPU, this machine
    python scripts/bench_input.py --pipelines torchvision,dali-cpu,dali-mixed --device cuda \\
        --workers 8 --batch 256 --root /data/imagenet     # on a GPU node

With --device cuda every batch is also copied to the GPU (pinned memory, non-blocking) and the
timing synchronises once at the end, as the training loop would consume it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfac_train.data.imagenet import ImageFolderEpochLoader, build_imagenet_datasets
from kfac_train.data.imagenet_dali import build_dali_loaders, dali_available

PIPELINES = ("torchvision", "dali-cpu", "dali-mixed")


def write_jpeg_tree(root: Path, num_images: int, num_classes: int, seed: int = 0) -> float:
    """Write ``root/{train,val}/<class>/*.JPEG`` (500x375); returns the mean file size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for split, count in (("train", num_images), ("val", num_classes)):
        for index in range(count):
            folder = root / split / f"n{index % num_classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
            pixels = np.asarray(image, dtype=np.int16) + rng.integers(-24, 25, (375, 500, 3))
            path = folder / f"{split}_{index}.JPEG"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def time_batches(batches: Iterable, warmup: int, timed: int, device: torch.device) -> float:
    """Images per second over `timed` batches after `warmup` batches."""
    iterator = iter(batches)
    for _ in range(warmup):
        images, _ = next(iterator)
    start = time.perf_counter()
    num_images = 0
    for _ in range(timed):
        images, labels = next(iterator)
        if device.type == "cuda":
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        num_images += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return num_images / (time.perf_counter() - start)


def endless(loader: ImageFolderEpochLoader) -> Iterable:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(pipeline: str, root: Path, args: argparse.Namespace, device: torch.device) -> float:
    if pipeline == "torchvision":
        train, _ = build_imagenet_datasets(root, image_size=args.image_size)
        loader = ImageFolderEpochLoader(
            train,
            micro_batch=args.batch,
            rank=0,
            world_size=1,
            seed=0,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4,
        )
        return time_batches(endless(loader), args.warmup, args.batches, device)
    decoder = "mixed" if pipeline == "dali-mixed" else "cpu"
    dali_train, _ = build_dali_loaders(
        root,
        batch_size=args.batch,
        eval_batch_size=args.batch,
        image_size=args.image_size,
        resize_size=None,
        rank=0,
        world_size=1,
        local_device=0 if decoder == "mixed" else None,
        num_threads=args.workers,
        seed=0,
        decoder=decoder,
        channels_last=args.channels_last,
    )

    def dali_endless() -> Iterable:
        while True:
            yield from dali_train

    return time_batches(dali_endless(), args.warmup, args.batches, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="existing ImageNet layout (default: generate)")
    parser.add_argument("--images", type=int, default=512, help="images to generate")
    parser.add_argument("--classes", type=int, default=8, help="classes to generate")
    parser.add_argument(
        "--pipelines",
        default="torchvision,dali-cpu",
        help=f"comma-separated, from {PIPELINES}; the first is the baseline",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers / DALI threads"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: copy every batch to the GPU, as training does",
    )
    parser.add_argument("--channels-last", action="store_true", help="DALI writes NHWC")
    args = parser.parse_args(argv)

    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        parser.error(f"unknown pipelines {unknown}; choose from {PIPELINES}")
    if any(p.startswith("dali") for p in pipelines) and not dali_available():
        parser.error("DALI is not installed: pip install nvidia-dali-cuda120==2.4.0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")

    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = Path(scratch)
            kb = write_jpeg_tree(root, args.images, args.classes)
            print(f"generated {args.images} JPEGs 500x375, mean {kb:.0f} KB, in {root}")
        print(
            f"batch {args.batch}, {args.batches} timed batches after {args.warmup}, "
            f"{args.workers} workers/threads, crop {args.image_size}, device {device}, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        )
        results: dict[str, float] = {}
        for pipeline in pipelines:
            results[pipeline] = measure(pipeline, root, args, device)
            baseline = results[pipelines[0]]
            print(
                f"{pipeline:12s} {results[pipeline]:8.1f} images/s   "
                f"x{results[pipeline] / baseline:.2f} vs {pipelines[0]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
