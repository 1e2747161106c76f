"""data=imagenet_dali in DALI's CPU-only mode: same batches and sharding as data=imagenet."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from kfac_train.config import ClassifierConfig, RunConfig, TaskConfig
from kfac_train.data import imagenet_dali
from kfac_train.data.imagenet import CorruptImageError
from kfac_train.data.imagenet_dali import (
    DALIImageLoader,
    ImageNetDALIDataConfig,
    build_dali_loaders,
    build_imagenet_dali,
    check_dali_setup,
)
from kfac_train.distributed import DistInfo
from kfac_train.errors import UserError
from kfac_train.registry import BuildContext

from .fake_data import CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, image_ids, write_tree

SIZE = 16


def loaders(
    root: Path, rank: int = 0, world_size: int = 1, channels_last: bool = False
) -> tuple[DALIImageLoader, DALIImageLoader]:
    return build_dali_loaders(
        root,
        batch_size=4,
        eval_batch_size=4,
        image_size=SIZE,
        resize_size=None,
        rank=rank,
        world_size=world_size,
        local_device=None,
        num_threads=1,
        seed=0,
        decoder="cpu",
        channels_last=channels_last,
    )


def test_cpu_pipeline_yields_normalised_crops_with_imagefolder_labels(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, labels = imagenet_tree
    train, _ = loaders(root)
    images, targets = next(iter(train))
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and targets.shape == (4,)
    assert [labels["train"][i] for i in image_ids(images)] == targets.tolist()


def test_channels_last_output_is_an_nchw_view_of_nhwc_memory(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, labels = imagenet_tree
    _, evaluation = loaders(root, channels_last=True)
    images, targets = next(iter(evaluation))
    assert images.shape == (4, 3, SIZE, SIZE)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert [labels["val"][i] for i in image_ids(images)] == targets.tolist()


def test_two_ranks_evaluate_every_validation_image_exactly_once_every_pass(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, labels = imagenet_tree
    for _ in range(2):  # the second pass must read the same shards again
        shards = []
        for rank in range(2):
            _, evaluation = loaders(root, rank=rank, world_size=2)
            shards.append([i for images, _ in evaluation for i in image_ids(images)])
        assert sorted(shards[0] + shards[1]) == sorted(labels["val"])
    assert sum(len(s) for s in shards) == len(CLASSES) * VAL_PER_CLASS


def test_two_ranks_train_on_disjoint_shards_with_the_same_number_of_steps(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, _ = imagenet_tree
    ids = []
    for rank in range(2):
        train, _ = loaders(root, rank=rank, world_size=2)
        assert len(train) == (len(CLASSES) * TRAIN_PER_CLASS) // 8
        ids.append([i for images, _ in train for i in image_ids(images)])
    assert len(ids[0]) == len(ids[1]) == len(train) * 4
    assert not set(ids[0]) & set(ids[1])


def test_yielded_batches_are_not_overwritten_by_later_ones(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, _ = imagenet_tree
    train, _ = loaders(root)
    train.set_epoch(0)
    iterator = iter(train)
    first, _ = next(iterator)
    snapshot = first.clone()
    collections.deque(iterator, maxlen=0)  # drain the epoch: later batches must not overwrite
    assert torch.equal(first, snapshot)


def test_resume_shortens_the_epoch_by_the_consumed_batches(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, _ = imagenet_tree
    train, _ = loaders(root)
    train.set_epoch(2, skip_batches=1)
    assert len(train) == len(list(train)) == (len(CLASSES) * TRAIN_PER_CLASS) // 4 - 1


def test_registered_builder_follows_trainer_channels_last(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, _ = imagenet_tree
    config = RunConfig(
        model=ClassifierConfig(name="resnet20", num_classes=3, image_size=SIZE),
        data=ImageNetDALIDataConfig(root=str(root), decoder="cpu", num_threads=1),
        task=TaskConfig(name="classification"),
    )
    config.trainer.channels_last = True
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ctx = BuildContext(config=config, dist=dist, micro_batch=4, accumulation_steps=1)
    bundle = build_imagenet_dali(config.data, ctx)  # type: ignore[arg-type]
    images, _ = next(iter(bundle.train))
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert bundle.num_train_samples == len(bundle.train) * 4


def test_undecodable_file_is_reported_with_the_way_to_find_it(tmp_path: Path) -> None:
    write_tree(tmp_path, corrupt_in="val")
    _, evaluation = loaders(tmp_path)
    with pytest.raises(CorruptImageError, match="prepare_imagenet.py verify"):
        list(evaluation)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_mixed_decoding_without_a_gpu_says_to_use_the_cpu_decoder() -> None:
    with pytest.raises(UserError, match="data.decoder=cpu"):
        check_dali_setup("mixed")


def test_missing_dali_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imagenet_dali, "dali_available", lambda: False)
    with pytest.raises(UserError, match="pip install nvidia-dali-cuda120.*data=imagenet"):
        check_dali_setup("cpu")


def test_unknown_decoder_lists_the_choices() -> None:
    with pytest.raises(UserError, match="'cpu', 'mixed'"):
        check_dali_setup("gpu")


def test_skip_corrupt_is_refused_with_the_alternatives(imagenet_tree: tuple[Path, dict]) -> None:
    root, _ = imagenet_tree
    config = RunConfig(
        model=ClassifierConfig(name="resnet20", num_classes=3, image_size=SIZE),
        data=ImageNetDALIDataConfig(root=str(root), decoder="cpu", skip_corrupt=True),
        task=TaskConfig(name="classification"),
    )
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ctx = BuildContext(config=config, dist=dist, micro_batch=4, accumulation_steps=1)
    with pytest.raises(UserError, match="prepare_imagenet.py verify.*data=imagenet"):
        build_imagenet_dali(config.data, ctx)  # type: ignore[arg-type]
