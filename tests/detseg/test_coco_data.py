"""The COCO pipeline turns COCO-format files into the targets Mask R-CNN trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kfac_train.data.coco import build_coco_dataset, collate_detection, resolve_coco_split
from kfac_train.errors import UserError


def _split(coco_set):
    return resolve_coco_split(coco_set.root, coco_set.images, coco_set.annotations)


def _expected(objects):
    kept = [o for o in objects if not o.crowd]
    boxes = torch.tensor([o.box_xyxy for o in kept], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([o.category_id for o in kept], dtype=torch.int64)
    masks = torch.from_numpy(np.stack([o.mask for o in kept])) if kept else None
    return boxes, labels, masks


def test_eval_targets_match_the_drawn_boxes_labels_and_masks_from_polygons_and_rle(coco_sets):
    data = build_coco_dataset(_split(coco_sets["val"]), train=False)
    assert len(data.dataset) == 3
    for image, target in (data.dataset[i] for i in range(len(data.dataset))):
        assert image.dtype == torch.float32 and image.shape == (3, 96, 128)
        assert image.min() >= 0.0 and image.max() <= 1.0
        boxes, labels, masks = _expected(coco_sets["val"].drawn[target["image_id"]])
        torch.testing.assert_close(target["boxes"], boxes)
        assert torch.equal(target["labels"], labels)
        if masks is None:  # the image without objects gets empty, well-shaped targets
            assert target["masks"].shape == (0, 96, 128)
        else:
            assert target["masks"].dtype == torch.uint8
            assert torch.equal(target["masks"], masks)


def test_painted_pixels_are_where_the_masks_are(coco_sets):
    data = build_coco_dataset(_split(coco_sets["val"]), train=False)
    image, target = data.dataset[1]  # the first image also holds a (dropped) crowd region
    inside = target["masks"].bool().any(0)
    # objects are painted in saturated colours on a dark (< 60/255) background
    assert (image.amax(0)[inside] > 0.8).all()
    assert (image.amax(0)[~inside] < 60 / 255 + 1e-6).all()


def test_training_drops_crowd_regions_and_images_without_objects(coco_sets):
    train = coco_sets["train"]
    data = build_coco_dataset(_split(train), train=True, horizontal_flip=0.0)
    assert len(data.dataset) == 3  # the last image has no object
    image_ids = [data.dataset[i][1]["image_id"] for i in range(len(data.dataset))]
    assert 4 not in image_ids
    _, target = data.dataset[0]
    drawn = train.drawn[target["image_id"]]
    assert any(o.crowd for o in drawn)
    assert len(target["labels"]) == sum(not o.crowd for o in drawn)


def test_horizontal_flip_moves_boxes_and_masks_together(coco_sets):
    val = coco_sets["val"]
    data = build_coco_dataset(_split(val), train=True, horizontal_flip=1.0)
    image, target = data.dataset[0]
    boxes, labels, masks = _expected(val.drawn[target["image_id"]])
    width = image.shape[-1]
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    torch.testing.assert_close(target["boxes"], flipped)
    assert torch.equal(target["masks"], masks.flip(-1))
    assert torch.equal(target["labels"], labels)


def test_collate_keeps_variable_size_images_as_lists(coco_sets):
    data = build_coco_dataset(_split(coco_sets["val"]), train=False)
    images, targets = collate_detection([data.dataset[0], data.dataset[1]])
    assert isinstance(images, list) and len(images) == 2 and len(targets) == 2
    assert data.max_category_id == 3


def test_missing_coco_folder_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match=r"COCO image folder not found: .*data\.root"):
        resolve_coco_split(tmp_path, "train2017", "annotations/instances_train2017.json")
    (tmp_path / "train2017").mkdir()
    with pytest.raises(UserError, match="COCO annotation file not found"):
        resolve_coco_split(tmp_path, "train2017", "annotations/instances_train2017.json")
