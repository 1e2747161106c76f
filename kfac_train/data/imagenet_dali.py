"""ImageNet-layout folders through an NVIDIA DALI pipeline (same semantics as ``imagenet.py``).

Training: file reader sharded by rank and reshuffled globally every epoch
(``shuffle_after_epoch``: one permutation shared by all ranks, so shards stay disjoint), fused
decode + random-resized crop (area U(0.08, 1), aspect U(3/4, 4/3), as torchvision's
``RandomResizedCrop``), resize to S×S, coin-flip mirror, ImageNet mean/std normalisation.
Evaluation: decode, resize the short side to ``resize_size``, centre crop S, normalise; each rank
reads its own fixed shard exactly once (``stick_to_shard``, ``pad_last_batch`` with the padding
trimmed by the iterator), so summed counts give exact whole-set metrics.

Decoding runs on the GPU (``decoder="mixed"``, nvJPEG; outputs are CUDA tensors) or on the CPU
(``decoder="cpu"``; outputs are CPU tensors, which is how CI tests this module). Labels are the
sorted class-folder indices, identical to torchvision's ``ImageFolder``.

Images are float32 (B, 3, S, S). With ``channels_last=True`` DALI writes HWC and the tensor is
returned as a channels-last *view* of shape (B, 3, S, S): no transpose copy before a
channels-last model.

DALI aborts on an undecodable file without naming it; :class:`DALIImageLoader` turns that into a
one-line error pointing at ``scripts/prepare_imagenet.py verify`` (which lists such files) and at
``data=imagenet``, whose loader names the file or skips it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kfac_train.config import AT_LEAST_ONE, one_of, within
from kfac_train.data.base import DataBundle
from kfac_train.data.imagenet_common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    ImageNetFoldersConfig,
    check_imagenet_root,
    default_resize_size,
    resolve_image_size,
)
from kfac_train.errors import UserError
from kfac_train.registry import DATA, BuildContext

DECODERS = ("cpu", "mixed")


@dataclass
class ImageNetDALIDataConfig(ImageNetFoldersConfig):
    """``data=imagenet_dali``: the ImageNet folders through an NVIDIA DALI pipeline.

    The options shared with ``data=imagenet`` are documented in `ImageNetFoldersConfig`
    (``skip_corrupt`` must stay false: DALI aborts on an undecodable file).

    Attributes:
        decoder: "mixed" (nvJPEG on the GPU; needs CUDA) or "cpu".
        num_threads: DALI CPU threads per rank.
        channels_last: write NHWC (returned as channels-last NCHW views); None =
            ``trainer.channels_last``.
        prefetch_queue_depth: batches DALI prepares ahead.
    """

    name: str = "imagenet_dali"
    decoder: str = one_of("mixed", DECODERS)
    num_threads: int = within(4, AT_LEAST_ONE)
    channels_last: bool | None = None
    prefetch_queue_depth: int = within(2, AT_LEAST_ONE)


_DALI_INSTALL_HINT = (
    "data=imagenet_dali needs NVIDIA DALI: pip install nvidia-dali-cuda120==2.4.0 "
    "(see requirements.txt), or use data=imagenet (torchvision)"
)


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported."""
    return importlib.util.find_spec("nvidia") is not None and (
        importlib.util.find_spec("nvidia.dali") is not None
    )


def check_dali_setup(decoder: str) -> None:
    """Raise a one-line error when DALI is missing or ``decoder`` cannot run here."""
    if decoder not in DECODERS:
        raise UserError(f"unknown DALI decoder {decoder!r}; set data.decoder to one of {DECODERS}")
    if not dali_available():
        raise UserError(_DALI_INSTALL_HINT)
    if decoder == "mixed" and not torch.cuda.is_available():
        raise UserError(
            "data.decoder=mixed decodes JPEGs on the GPU, but no CUDA GPU is available; "
            "set data.decoder=cpu (or use data=imagenet)"
        )


def build_dali_pipeline(
    split_dir: str | Path,
    *,
    train: bool,
    batch_size: int,
    image_size: int,
    resize_size: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 4,
    device_id: int | None = None,
    seed: int = 0,
    decoder: str = "cpu",
    channels_last: bool = False,
    min_crop_area: float = 0.08,
    prefetch_queue_depth: int = 2,
) -> Any:
    """A built DALI ``Pipeline`` over ``split_dir/<class>/*`` yielding ``(images, labels)``.

    ``device_id`` is the local GPU for ``decoder="mixed"`` (``None`` means CPU-only; it is
    required for mixed decoding). ``seed`` seeds the augmentation; give each rank its own
    (e.g. ``seed + rank``): the training shuffle uses DALI's fixed reader seed on every rank, so
    the shards stay disjoint whatever the augmentation seeds are.
    """
    check_dali_setup(decoder)
    from nvidia.dali import fn, pipeline_def, types

    if decoder == "mixed" and device_id is None:
        raise ValueError("decoder='mixed' needs device_id (the local GPU index)")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got {shard_id=} {num_shards=}")
    resize = resize_size if resize_size is not None else default_resize_size(image_size)
    mean = [255.0 * m for m in IMAGENET_MEAN]
    std = [255.0 * s for s in IMAGENET_STD]
    layout = "HWC" if channels_last else "CHW"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if decoder == "mixed" else None,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    def pipeline() -> tuple[Any, Any]:
        encoded, labels = fn.readers.file(
            file_root=str(split_dir),
            shard_id=shard_id,
            num_shards=num_shards,
            shuffle_after_epoch=train,
            stick_to_shard=not train,
            pad_last_batch=not train,
            name="Reader",
        )
        if train:
            images = fn.decoders.image_random_crop(
                encoded,
                device=decoder,
                output_type=types.RGB,
                random_area=[min_crop_area, 1.0],
                random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0],
                num_attempts=10,
            )
            images = fn.resize(images, size=[image_size, image_size], antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=resize, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images,
            crop=(image_size, image_size),
            mirror=mirror,
            mean=mean,
            std=std,
            dtype=types.FLOAT,
            output_layout=layout,
        )
        if decoder == "mixed":
            labels = labels.gpu()
        return images, labels

    pipe = pipeline()
    pipe.build()
    return pipe


class DALIImageLoader:
    """Iterates ``(images, labels)`` batches from a DALI pipeline, like a torch DataLoader.

    images: float32 (B, 3, S, S) (a channels-last view when the pipeline writes HWC);
    labels: int64 (B,). Tensors are on the pipeline's device (CUDA for mixed decoding).

    Training (``steps_per_epoch`` given): the reader runs as an endless stream and one epoch is
    exactly ``steps_per_epoch`` full batches on every rank, so ranks never disagree on the
    number of steps. ``set_epoch(e, skip_batches)`` shortens the next epoch by the batches a
    resumed run already consumed (the stream itself cannot be rewound, so a resumed epoch sees
    other random images than the interrupted one). Evaluation (``steps_per_epoch=None``): one
    pass over this rank's shard, the last batch partial, no sample twice.
    """

    def __init__(self, pipeline: Any, *, steps_per_epoch: int | None, channels_last: bool) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch=}")
        self.steps_per_epoch = steps_per_epoch
        self.channels_last = channels_last
        self._skip_batches = 0
        if steps_per_epoch is None:
            self._iterator = DALIGenericIterator(
                pipeline,
                ["images", "labels"],
                reader_name="Reader",
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=True,
            )
        else:
            self._iterator = DALIGenericIterator(pipeline, ["images", "labels"], size=-1)

    def __len__(self) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch - self._skip_batches
        return len(self._iterator)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Position at ``epoch`` (DALI reshuffles by itself) minus ``skip_batches`` batches."""
        if self.steps_per_epoch is not None and not 0 <= skip_batches < self.steps_per_epoch:
            raise ValueError(f"{skip_batches=} outside an epoch of {self.steps_per_epoch} steps")
        self._skip_batches = skip_batches

    def _convert(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"]
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # (B, H, W, C) storage, (B, C, H, W) shape
        labels = batch["labels"].reshape(-1).long()
        return images, labels

    def _next(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._iterator)[0]
        except RuntimeError as err:
            if "decoders.image" in str(err) or "nvImageCodec" in str(err):
                raise CorruptImageError(
                    "DALI could not decode an image (it does not say which); list undecodable "
                    "files with `python scripts/prepare_imagenet.py verify DATA_ROOT`, or use "
                    "data=imagenet, which names them (and skips them with data.skip_corrupt=true)"
                ) from err
            raise

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.steps_per_epoch is None:
            while True:
                try:
                    batch = self._next()
                except StopIteration:
                    return
                yield self._convert(batch)
        else:
            for _ in range(len(self)):
                yield self._convert(self._next())


def build_dali_loaders(
    root: str | Path,
    *,
    batch_size: int,
    eval_batch_size: int,
    image_size: int,
    resize_size: int | None,
    rank: int,
    world_size: int,
    local_device: int | None,
    num_threads: int,
    seed: int,
    decoder: str,
    channels_last: bool,
    min_crop_area: float = 0.08,
    prefetch_queue_depth: int = 2,
) -> tuple[DALIImageLoader, DALIImageLoader]:
    """Train and evaluation loaders over ``root/train`` and ``root/val`` for this rank.

    Steps per training epoch: ⌊#train images / (world_size · batch_size)⌋, the same on every
    rank.
    """
    train_dir, val_dir = check_imagenet_root(root)
    check_dali_setup(decoder)
    common: dict[str, Any] = {
        "image_size": image_size,
        "resize_size": resize_size,
        "shard_id": rank,
        "num_shards": world_size,
        "num_threads": num_threads,
        "device_id": local_device,
        "decoder": decoder,
        "channels_last": channels_last,
        "min_crop_area": min_crop_area,
        "prefetch_queue_depth": prefetch_queue_depth,
    }
    train_pipe = build_dali_pipeline(
        train_dir, train=True, batch_size=batch_size, seed=seed + rank, **common
    )
    num_train = train_pipe.epoch_size("Reader")
    steps = num_train // (world_size * batch_size)
    if steps < 1:
        raise UserError(
            f"{num_train} training images under {str(train_dir)!r} do not fill one global batch "
            f"of {world_size * batch_size}; lower the batch size"
        )
    eval_pipe = build_dali_pipeline(
        val_dir, train=False, batch_size=eval_batch_size, seed=seed + rank, **common
    )
    return (
        DALIImageLoader(train_pipe, steps_per_epoch=steps, channels_last=channels_last),
        DALIImageLoader(eval_pipe, steps_per_epoch=None, channels_last=channels_last),
    )


@DATA.register("imagenet_dali", schema=ImageNetDALIDataConfig)
def build_imagenet_dali(cfg: ImageNetDALIDataConfig, ctx: BuildContext) -> DataBundle:
    """Loaders of ``data=imagenet_dali`` for this rank (see the module docstring)."""
    if cfg.skip_corrupt:
        raise UserError(
            "data.skip_corrupt=true is not supported by data=imagenet_dali (DALI aborts on an "
            "undecodable file); find them with `python scripts/prepare_imagenet.py verify "
            "DATA_ROOT`, or use data=imagenet"
        )
    channels_last = (
        ctx.config.trainer.channels_last if cfg.channels_last is None else cfg.channels_last
    )
    device = ctx.device
    local_device = None
    if device.type == "cuda":
        local_device = device.index if device.index is not None else torch.cuda.current_device()
    train, evaluation = build_dali_loaders(
        cfg.root,
        batch_size=ctx.micro_batch,
        eval_batch_size=cfg.eval_batch_size or ctx.micro_batch,
        image_size=resolve_image_size(cfg.image_size, ctx),
        resize_size=cfg.eval_resize,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
        local_device=local_device,
        num_threads=cfg.num_threads,
        seed=ctx.config.seed,
        decoder=cfg.decoder,
        channels_last=channels_last,
        min_crop_area=cfg.min_crop_area,
        prefetch_queue_depth=cfg.prefetch_queue_depth,
    )
    assert train.steps_per_epoch is not None
    num_train = train.steps_per_epoch * ctx.micro_batch * ctx.dist.world_size
    return DataBundle(train=train, eval=evaluation, num_train_samples=num_train, image_channels=3)
