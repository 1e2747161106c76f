"""``data=imagenet``: ImageNet-layout image folders through torchvision.

Layout expected under ``data.root`` (what ``scripts/prepare_imagenet.py`` produces)::

    root/train/<wnid>/*.JPEG
    root/val/<wnid>/*.JPEG

Class indices are the sorted folder names (torchvision ``ImageFolder``); the DALI pipeline
(``data=imagenet_dali``) sorts them the same way, so both yield the same labels.

Micro-batches are ``(images, labels)``: images float32 (B, 3, S, S) normalised with the
ImageNet mean/std, labels int64 (B,). Training: random-resized crop to S (area
U(``min_crop_area``, 1), aspect U(3/4, 4/3)) + horizontal flip. Evaluation: resize the short
side to ``eval_resize`` (256 for S = 224) + centre crop S.

Sharding (samplers of :mod:`kfac_train.data.base`): training shuffles with ``seed + epoch`` and
gives each rank the same number of full micro-batches; evaluation gives rank r the indices
r, r + world, ...: every validation image is counted exactly once across ranks, so summed
counts give exact top-1/top-5 over the whole set.

Undecodable files: by default the first one stops the run with an error naming the file. With
``data.skip_corrupt=true`` each one is skipped with a warning naming it and a running count
(shared by all loader workers; also logged after every epoch). In training its slot in the
micro-batch is filled by the next decodable image of the dataset, so micro-batches keep their
size; in evaluation it is dropped (metrics cover the readable images exactly once).
"""

from __future__ import annotations

import logging
import multiprocessing
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision import datasets
from torchvision.transforms import v2

from kfac_train.config import AT_LEAST_ONE, NON_NEGATIVE, within
from kfac_train.data.base import DataBundle, TorchEpochLoader, make_eval_loader
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

__all__ = [  # the shared names are importable from here too
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageError",
    "ImageNetDataConfig",
    "build_imagenet",
    "build_imagenet_datasets",
    "check_imagenet_root",
    "default_resize_size",
    "resolve_image_size",
]

log = logging.getLogger(__name__)

# Errors PIL raises for a file that is not a decodable image (unknown format, truncated data,
# broken headers, decompression bombs).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)
# In training, how many following images are tried in place of an undecodable one.
_MAX_SUBSTITUTES = 16


def _reraise_from_worker(err: CorruptImageError) -> CorruptImageError:
    """The one-line message of a :class:`CorruptImageError` raised in a loader worker.

    torch re-raises worker exceptions with the worker's whole traceback as the message; the
    original message is its last line, after the exception's class name.
    """
    marker = f"{CorruptImageError.__name__}: "
    lines = [line for line in str(err).splitlines() if marker in line]
    if not lines:
        return err
    return CorruptImageError(lines[-1].split(marker, 1)[1])


@dataclass
class ImageNetDataConfig(ImageNetFoldersConfig):
    """``data=imagenet`` (torchvision ``ImageFolder`` over ``root/train`` and ``root/val``).

    The options shared with ``data=imagenet_dali`` are documented in `ImageNetFoldersConfig`.

    Attributes:
        prefetch_factor: batches prefetched per worker.
        pin_memory: page-locked host batches (None = when training on CUDA).
    """

    name: str = "imagenet"
    num_workers: int = within(8, NON_NEGATIVE)
    prefetch_factor: int = within(4, AT_LEAST_ONE)
    pin_memory: bool | None = None


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully into an RGB PIL image; raises one of ``DECODE_ERRORS``."""
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")  # forces the full decode while the file is open


def train_transform(image_size: int, min_crop_area: float = 0.08) -> v2.Compose:
    """PIL image → float32 (3, S, S): random-resized crop, horizontal flip, normalise."""
    if not 0.0 < min_crop_area <= 1.0:
        raise UserError(f"data.min_crop_area must be in (0, 1], got {min_crop_area}")
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(min_crop_area, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int, resize_size: int | None = None) -> v2.Compose:
    """PIL image → float32 (3, S, S): resize short side, centre crop S, normalise."""
    resize = resize_size if resize_size is not None else default_resize_size(image_size)
    if resize < image_size:
        raise UserError(f"data.eval_resize={resize} is smaller than the crop {image_size}")
    return v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class CheckedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` that names the file when an image cannot be decoded.

    ``skip_corrupt=False``: an undecodable file raises :class:`CorruptImageError` naming it.
    ``skip_corrupt=True``: a warning names it and the shared counter :attr:`num_skipped`
    (shared memory, so counts made in DataLoader worker processes are visible here) grows by
    one; then, with ``substitute=True`` (training), the next decodable image of the dataset is
    returned in its place, and with ``substitute=False`` (evaluation) ``None`` is returned,
    which :func:`collate_skipping_none` drops.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Any,
        *,
        skip_corrupt: bool = False,
        substitute: bool = False,
    ) -> None:
        super().__init__(str(root), transform=transform)
        self.skip_corrupt = skip_corrupt
        self.substitute = substitute
        self._num_skipped = multiprocessing.get_context().Value("q", 0)

    @property
    def num_skipped(self) -> int:
        """Skips of undecodable files so far, all worker processes together (a file met again in
        a later epoch counts again)."""
        return int(self._num_skipped.value)

    def _load(self, index: int) -> Image.Image | None:
        """The decoded image, or None after a counted warning (skip mode)."""
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except DECODE_ERRORS as err:
            if not self.skip_corrupt:
                raise CorruptImageError(
                    f"cannot decode image {path!r} ({type(err).__name__}: {err}); "
                    "remove or replace it, or set data.skip_corrupt=true to skip such files"
                ) from err
            with self._num_skipped.get_lock():
                self._num_skipped.value += 1
                count = self._num_skipped.value
            warnings.warn(
                f"skipped undecodable image {path!r} ({type(err).__name__}: {err}); "
                f"{count} skipped so far",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        tries = _MAX_SUBSTITUTES if self.substitute else 1
        for offset in range(tries):
            position = (index + offset) % len(self.samples)
            image = self._load(position)
            if image is not None:
                label = self.samples[position][1]
                return (self.transform(image) if self.transform else image), label
        if not self.substitute:
            return None
        raise CorruptImageError(
            f"{tries} consecutive images from {self.samples[index][0]!r} on do not decode; "
            "check the dataset with `python scripts/prepare_imagenet.py verify DATA_ROOT`"
        )


def collate_skipping_none(batch: Sequence[Any]) -> Any:
    """``default_collate`` of the samples that are not ``None``; ``None`` if none is left."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


def _image_folder(split_dir: Path, transform: Any, **options: bool) -> CheckedImageFolder:
    """`CheckedImageFolder` over `split_dir`; a one-line `UserError` if it holds no images."""
    try:
        return CheckedImageFolder(split_dir, transform, **options)
    except FileNotFoundError as error:  # torchvision: no class folder, or no image file in them
        raise UserError(
            f"ImageNet folder {str(split_dir)!r} holds no images in <wnid>/ class folders: set "
            "data.root to a folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
            "(see scripts/prepare_imagenet.py)"
        ) from error


def build_imagenet_datasets(
    root: str | Path | None,
    *,
    image_size: int = 224,
    eval_resize: int | None = None,
    min_crop_area: float = 0.08,
    skip_corrupt: bool = False,
) -> tuple[CheckedImageFolder, CheckedImageFolder]:
    """Train and validation datasets over ``root/train`` and ``root/val`` (same classes)."""
    train_dir, val_dir = check_imagenet_root(root)
    train = _image_folder(
        train_dir,
        train_transform(image_size, min_crop_area),
        skip_corrupt=skip_corrupt,
        substitute=True,
    )
    val = _image_folder(val_dir, eval_transform(image_size, eval_resize), skip_corrupt=skip_corrupt)
    if train.classes != val.classes:
        differing = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise UserError(
            f"train/ and val/ under data.root={root} hold different class folders "
            f"(e.g. {differing}); both need the same <wnid> folders"
        )
    return train, val


class ImageFolderEpochLoader(TorchEpochLoader):
    """The base `TorchEpochLoader` with persistent workers over a :class:`CheckedImageFolder`,
    turning a worker's :class:`CorruptImageError` back into its one-line message and reporting
    skipped (undecodable) images."""

    def __init__(
        self,
        dataset: CheckedImageFolder,
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int,
    ) -> None:
        super().__init__(
            dataset,
            micro_batch=micro_batch,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=True,
            prefetch_factor=prefetch_factor,
        )

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from super().__iter__()
        except CorruptImageError as err:
            raise _reraise_from_worker(err) from None
        if self.dataset.num_skipped:
            log.warning("undecodable training images skipped so far: %d", self.dataset.num_skipped)


class ImageFolderEvalLoader:
    """This rank's share of the validation set (`make_eval_loader`), in order; batches whose
    images were all undecodable (skip mode) are left out."""

    def __init__(self, dataset: CheckedImageFolder, loader: DataLoader[Any]) -> None:
        self.dataset, self.loader = dataset, loader

    def __iter__(self) -> Iterator[Any]:
        try:
            for batch in self.loader:
                if batch is not None:
                    yield batch
        except CorruptImageError as err:
            raise _reraise_from_worker(err) from None
        if self.dataset.num_skipped:
            log.warning("undecodable validation images skipped: %d", self.dataset.num_skipped)

    def __len__(self) -> int:
        return len(self.loader)


@DATA.register("imagenet", schema=ImageNetDataConfig)
def build_imagenet(cfg: ImageNetDataConfig, ctx: BuildContext) -> DataBundle:
    """Loaders of ``data=imagenet`` for this rank (see the module docstring)."""
    image_size = resolve_image_size(cfg.image_size, ctx)
    train, val = build_imagenet_datasets(
        cfg.root,
        image_size=image_size,
        eval_resize=cfg.eval_resize,
        min_crop_area=cfg.min_crop_area,
        skip_corrupt=cfg.skip_corrupt,
    )
    pin = ctx.device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
    dist = ctx.dist
    train_loader = ImageFolderEpochLoader(
        train,
        micro_batch=ctx.micro_batch,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=ctx.config.seed,
        num_workers=cfg.num_workers,
        pin_memory=pin,
        prefetch_factor=cfg.prefetch_factor,
    )
    eval_loader = ImageFolderEvalLoader(
        val,
        make_eval_loader(
            val,
            ctx,
            batch_size=cfg.eval_batch_size or ctx.micro_batch,
            num_workers=cfg.num_workers,
            collate_fn=collate_skipping_none,
            pin_memory=pin,
            persistent_workers=True,
        ),
    )
    return DataBundle(
        train=train_loader, eval=eval_loader, num_train_samples=len(train), image_channels=3
    )
