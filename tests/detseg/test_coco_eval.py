"""COCO AP through pycocotools on cases whose answer is known in advance."""

from __future__ import annotations

import pytest
import torch
from pycocotools.coco import COCO

from kfac_train.data.coco import build_coco_dataset, resolve_coco_split
from kfac_train.tasks.coco_eval import coco_from_targets, evaluate_coco, prediction_to_coco

from .synthetic_data import RECTANGLE


def _ground_truth_as_predictions(targets, keep=lambda label: True):
    """Each target turned into a prediction: its boxes, labels, score 1, masks as probabilities."""
    bbox, segm = [], []
    for target in targets:
        chosen = torch.tensor([keep(int(label)) for label in target["labels"]], dtype=torch.bool)
        prediction = {
            "boxes": target["boxes"][chosen],
            "labels": target["labels"][chosen],
            "scores": torch.ones(int(chosen.sum())),
            "masks": target["masks"][chosen, None].float(),
        }
        b, s = prediction_to_coco(target["image_id"], prediction)
        bbox += b
        segm += s
    return {"bbox": bbox, "segm": segm}


@pytest.fixture(scope="module")
def val_split(coco_sets):
    val = coco_sets["val"]
    data = build_coco_dataset(
        resolve_coco_split(val.root, val.images, val.annotations), train=False
    )
    targets = [data.dataset[i][1] for i in range(len(data.dataset))]
    return data.coco, targets


def test_ground_truth_fed_back_as_predictions_scores_ap_one_for_boxes_and_masks(val_split):
    coco, targets = val_split
    metrics, printed = evaluate_coco(coco, _ground_truth_as_predictions(targets))
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}_ap"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}_ap50"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}_ap75"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}_ap_large"] == -1.0  # COCO's mark: no large objects here
    assert "Average Precision" in printed  # COCOeval's summary was captured, not printed


def test_finding_only_one_of_two_categories_gives_mean_ap_one_half(val_split):
    coco, targets = val_split
    results = _ground_truth_as_predictions(targets, keep=lambda label: label == RECTANGLE)
    metrics, _ = evaluate_coco(coco, results)
    # rectangles: AP 1; ellipses: nothing found, AP 0; COCO averages over categories
    assert metrics["bbox_ap"] == pytest.approx(0.5)
    assert metrics["segm_ap"] == pytest.approx(0.5)


def test_predicting_nothing_scores_zero_without_calling_cocoeval(val_split):
    coco, _ = val_split
    metrics, printed = evaluate_coco(coco, {"bbox": [], "segm": []})
    assert metrics["bbox_ap"] == 0.0 and metrics["segm_ap50"] == 0.0
    assert "no detections" in printed


def test_evaluation_can_be_restricted_to_the_images_seen(val_split):
    coco, targets = val_split
    first = targets[:1]
    metrics, _ = evaluate_coco(
        coco, _ground_truth_as_predictions(first), image_ids=[first[0]["image_id"]]
    )
    assert metrics["bbox_ap"] == pytest.approx(1.0)
    everything, _ = evaluate_coco(coco, _ground_truth_as_predictions(first))
    assert everything["bbox_ap"] < 1.0  # the other images' objects count as missed


def test_result_records_are_coco_json_with_xywh_boxes_and_string_rle():
    prediction = {
        "boxes": torch.tensor([[2.0, 3.0, 12.0, 8.0]]),
        "labels": torch.tensor([7]),
        "scores": torch.tensor([0.25]),
        "masks": torch.zeros(1, 1, 10, 16),
    }
    prediction["masks"][0, 0, 3:8, 2:12] = 0.9
    prediction["masks"][0, 0, 0, 0] = 0.4  # below the 0.5 threshold
    bbox, segm = prediction_to_coco(42, prediction)
    assert bbox == [
        {"image_id": 42, "category_id": 7, "bbox": [2.0, 3.0, 10.0, 5.0], "score": 0.25}
    ]
    assert isinstance(segm[0]["segmentation"]["counts"], str)
    from pycocotools import mask as mask_utils

    rle = dict(segm[0]["segmentation"])
    assert mask_utils.area(rle) == 50
    assert mask_utils.toBbox(rle).tolist() == [2.0, 3.0, 10.0, 5.0]


def test_ground_truth_built_from_targets_scores_perfect_predictions_one(val_split):
    _, targets = val_split
    with_objects = [t for t in targets if len(t["labels"])]
    coco = coco_from_targets(with_objects)
    assert isinstance(coco, COCO)
    assert len(coco.getAnnIds()) == sum(len(t["labels"]) for t in with_objects)
    metrics, _ = evaluate_coco(coco, _ground_truth_as_predictions(with_objects))
    assert metrics["bbox_ap"] == pytest.approx(1.0) and metrics["segm_ap"] == pytest.approx(1.0)


def test_synthetic_batches_are_scored_against_their_own_targets():
    from kfac_train.tasks.detection import CocoEvaluator, DetectionConfig, synthetic_detection_batch

    from .helpers import ReplayDetector

    evaluator = CocoEvaluator(None, DetectionConfig(target_bbox_ap=0.9, target_segm_ap=0.9))
    for seed in range(2):
        images, targets = synthetic_detection_batch(
            2, (48, 64), 5, torch.Generator().manual_seed(seed)
        )
        perfect = [
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": torch.ones(len(t["labels"])),
                "masks": t["masks"][:, None].float(),
            }
            for t in targets
        ]
        evaluator.update(ReplayDetector(perfect), (images, targets))
    metrics = evaluator.compute()
    assert metrics["bbox_ap"] == pytest.approx(1.0) and metrics["segm_ap"] == pytest.approx(1.0)
    assert metrics["reached_target"] == 1.0
