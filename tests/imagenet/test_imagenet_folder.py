"""data=imagenet: torchvision ImageFolder pipeline, sharding, exact evaluation, corrupt files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kfac_train.config import ClassifierConfig, RunConfig, TaskConfig
from kfac_train.data.base import DataBundle
from kfac_train.data.imagenet import (
    CorruptImageError,
    ImageNetDataConfig,
    build_imagenet,
    build_imagenet_datasets,
)
from kfac_train.distributed import DistInfo
from kfac_train.errors import UserError
from kfac_train.registry import BuildContext

from .fake_data import CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, image_ids, write_tree

SIZE = 16


def make_ctx(rank: int = 0, world_size: int = 1, micro_batch: int = 4) -> BuildContext:
    config = RunConfig(
        model=ClassifierConfig(name="resnet20", num_classes=len(CLASSES), image_size=SIZE),
        data=ImageNetDataConfig(),
        task=TaskConfig(name="classification"),
    )
    dist = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    return BuildContext(config=config, dist=dist, micro_batch=micro_batch, accumulation_steps=1)


def build(root: Path, rank: int = 0, world_size: int = 1, **overrides: object) -> DataBundle:
    settings: dict = {"num_workers": 0, **overrides}
    cfg = ImageNetDataConfig(root=str(root), **settings)
    return build_imagenet(cfg, make_ctx(rank, world_size))


def test_train_batches_are_normalised_crops_of_the_model_image_size_with_folder_labels(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, labels = imagenet_tree
    bundle = build(root)
    bundle.train.set_epoch(0)
    images, targets = next(iter(bundle.train))
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert targets.dtype == torch.int64
    assert [labels["train"][i] for i in image_ids(images)] == targets.tolist()
    assert bundle.num_train_samples == len(CLASSES) * TRAIN_PER_CLASS


def test_class_indices_are_the_sorted_folder_names(imagenet_tree: tuple[Path, dict]) -> None:
    root, _ = imagenet_tree
    train, val = build_imagenet_datasets(root, image_size=SIZE)
    assert train.classes == val.classes == sorted(CLASSES)


def test_eval_images_are_resized_and_centre_cropped(imagenet_tree: tuple[Path, dict]) -> None:
    root, labels = imagenet_tree
    bundle = build(root)
    assert bundle.eval is not None
    images, targets = next(iter(bundle.eval))
    assert images.shape[1:] == (3, SIZE, SIZE)
    assert [labels["val"][i] for i in image_ids(images)] == targets.tolist()


def test_two_ranks_train_on_disjoint_shards_of_equal_length(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, _ = imagenet_tree
    seen = []
    for rank in range(2):
        loader = build(root, rank=rank, world_size=2).train
        loader.set_epoch(3)
        ids = [i for images, _ in loader for i in image_ids(images)]
        assert len(loader) == len(ids) // 4 == (len(CLASSES) * TRAIN_PER_CLASS // 2) // 4
        seen.append(ids)
    assert len(seen[0]) == len(seen[1])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) == len(seen[0])


def test_epochs_reshuffle_and_resume_skips_consumed_batches(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, _ = imagenet_tree
    loader = build(root).train
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        orders.append([targets.tolist() for _, targets in loader])
    assert orders[0] != orders[1]
    loader.set_epoch(1, skip_batches=2)
    assert [targets.tolist() for _, targets in loader] == orders[1][2:]


def test_two_ranks_evaluate_every_validation_image_exactly_once(
    imagenet_tree: tuple[Path, dict],
) -> None:
    root, labels = imagenet_tree
    shards = []
    for rank in range(2):
        evaluation = build(root, rank=rank, world_size=2).eval
        assert evaluation is not None
        shards.append([i for images, _ in evaluation for i in image_ids(images)])
    assert sorted(shards[0] + shards[1]) == sorted(labels["val"])
    assert {len(shards[0]), len(shards[1])} == {VAL_PER_CLASS * 3 // 2, VAL_PER_CLASS * 3 // 2 + 1}


def test_missing_train_folder_is_a_one_line_error_naming_path_and_key(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        build(tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "train") in message and "data.root=" in message
    assert "\n" not in message


def test_corrupt_image_stops_with_an_error_naming_the_file(tmp_path: Path) -> None:
    write_tree(tmp_path, corrupt_in="val")
    evaluation = build(tmp_path).eval
    assert evaluation is not None
    with pytest.raises(CorruptImageError, match="broken.JPEG.*data.skip_corrupt=true"):
        list(evaluation)


def test_corrupt_image_error_from_a_loader_worker_is_one_line(tmp_path: Path) -> None:
    write_tree(tmp_path, corrupt_in="val")
    evaluation = build(tmp_path, num_workers=1).eval
    assert evaluation is not None
    with pytest.raises(CorruptImageError) as error:
        list(evaluation)
    assert "broken.JPEG" in str(error.value) and "\n" not in str(error.value)


def test_skip_corrupt_drops_the_file_from_evaluation_with_a_warning(tmp_path: Path) -> None:
    labels = write_tree(tmp_path, corrupt_in="val")
    evaluation = build(tmp_path, skip_corrupt=True).eval
    assert evaluation is not None
    with pytest.warns(RuntimeWarning, match=r"skipped undecodable image .*broken.JPEG.*1 skipped"):
        ids = [i for images, _ in evaluation for i in image_ids(images)]
    assert sorted(ids) == sorted(labels["val"])


def test_skip_count_includes_files_skipped_in_loader_workers(tmp_path: Path) -> None:
    write_tree(tmp_path, corrupt_in="val")
    evaluation = build(tmp_path, skip_corrupt=True, num_workers=1).eval
    assert evaluation is not None
    num_images = sum(images.shape[0] for images, _ in evaluation)
    assert num_images == len(CLASSES) * VAL_PER_CLASS
    assert evaluation.dataset.num_skipped == 1  # type: ignore[attr-defined]


def test_skip_corrupt_keeps_training_micro_batches_full(tmp_path: Path) -> None:
    write_tree(tmp_path, corrupt_in="train")
    num_files = len(CLASSES) * TRAIN_PER_CLASS + 1  # 22: two per micro-batch uses them all
    cfg = ImageNetDataConfig(root=str(tmp_path), num_workers=0, skip_corrupt=True)
    loader = build_imagenet(cfg, make_ctx(micro_batch=2)).train
    loader.set_epoch(0)
    with pytest.warns(RuntimeWarning, match="broken.JPEG"):
        sizes = [images.shape[0] for images, _ in loader]
    assert sizes == [2] * (num_files // 2)
    assert loader.dataset.num_skipped == 1  # type: ignore[attr-defined]
