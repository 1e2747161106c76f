"""Fixtures: generated COCO-format and LGG-layout data sets (one per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .synthetic_data import CocoSet, write_calibrated_resnet50, write_coco_split, write_lgg_tree


@pytest.fixture(scope="session")
def coco_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CocoSet]:
    root = tmp_path_factory.mktemp("coco")
    return {
        "train": write_coco_split(root, "train2017", num_images=4, seed=0),
        "val": write_coco_split(root, "val2017", num_images=3, seed=1, first_image_id=100),
    }


@pytest.fixture(scope="session")
def lgg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lgg_tree(
        tmp_path_factory.mktemp("lgg"), num_patients=6, slices=12, size=64, seed=0
    )


@pytest.fixture(scope="session")
def calibrated_backbone(tmp_path_factory: pytest.TempPathFactory, coco_sets) -> Path:
    from kfac_train.data.coco import build_coco_dataset, resolve_coco_split

    train = coco_sets["train"]
    split = resolve_coco_split(train.root, train.images, train.annotations)
    dataset = build_coco_dataset(split, train=False).dataset
    images = [dataset[i][0] for i in range(len(dataset))]
    return write_calibrated_resnet50(tmp_path_factory.mktemp("weights") / "resnet50.pth", images)
