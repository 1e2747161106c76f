"""Mask R-CNN trains through the app with K-FAC on its ROI heads and is scored by COCOeval."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kfac_train.app import train
from kfac_train.models.maskrcnn import ROI_HEADS_ONLY_SKIP_LAYERS

from .helpers import QUIET, compose_run, records

# K-FAC layers KAISA keeps in the ROI heads (torchvision names); conv5_mask is a transposed conv
ROI_HEAD_LAYERS = [
    "roi_heads.box_predictor.cls_score",
    "roi_heads.box_predictor.bbox_pred",
    "roi_heads.mask_head.0.0",
    "roi_heads.mask_head.1.0",
    "roi_heads.mask_head.2.0",
    "roi_heads.mask_head.3.0",
    "roi_heads.mask_predictor.mask_fcn_logits",
]


@pytest.fixture(scope="module")
def maskrcnn_run(coco_sets, calibrated_backbone: Path, tmp_path_factory) -> dict:
    """Two K-FAC + SGD steps at 64 px (frozen calibrated backbone), then COCO evaluation."""
    run_dir = tmp_path_factory.mktemp("maskrcnn")
    config = compose_run(
        "model=maskrcnn",
        "optim=kfac",
        f"data.root={coco_sets['train'].root}",
        "model.num_classes=4",
        "model.min_size=64",
        "model.max_size=64",
        f"model.backbone_weights={calibrated_backbone}",
        "model.trainable_backbone_layers=0",
        "model.box_batch_size_per_image=32",
        "model.box_score_thresh=0.0",
        "model.box_detections_per_img=10",
        "kfac.compute_method=inverse",
        "batch.size=2",
        "trainer.micro_batch=2",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.log_every=1",
        "optim.lr=1e-3",
        "schedule.warmup=0",
        f"output_dir={run_dir}",
        *QUIET,
    )
    summary = train(config)
    assert summary["status"] == "completed", summary
    return {"summary": summary, "run_dir": run_dir}


def test_kfac_preconditions_exactly_the_roi_head_layers(maskrcnn_run):
    checkpoint = torch.load(
        Path(maskrcnn_run["summary"]["checkpoint"]), map_location="cpu", weights_only=True
    )
    layers = list(checkpoint["preconditioner"]["layers"])
    assert layers == ROI_HEAD_LAYERS
    assert all(
        layer["A"].abs().sum() > 0 for layer in checkpoint["preconditioner"]["layers"].values()
    )


def test_training_steps_log_finite_mask_rcnn_losses(maskrcnn_run):
    steps = records(maskrcnn_run["run_dir"], "train")
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert math.isfinite(record["loss"])
        assert set(record["metrics"]) >= {"loss_classifier", "loss_mask", "loss_objectness"}
        assert record["loss"] == pytest.approx(
            sum(record["metrics"][k] for k in record["metrics"] if k.startswith("loss_")), rel=1e-4
        )


def test_cocoeval_scores_the_predictions_on_the_validation_images(maskrcnn_run):
    metrics = maskrcnn_run["summary"]["metrics"]
    for iou_type in ("bbox", "segm"):
        assert 0.0 <= metrics[f"{iou_type}_ap"] <= 1.0
        assert 0.0 <= metrics[f"{iou_type}_ap50"] <= 1.0
        # COCOeval itself ran: it marks the size range without ground truth (large) with -1
        assert metrics[f"{iou_type}_ap_large"] == -1.0
    assert metrics["reached_target"] == 0.0


def test_the_default_skip_patterns_are_kaisas_roi_heads_only_choice():
    config = compose_run("model=maskrcnn")
    assert tuple(config.kfac.skip_layers) == ROI_HEADS_ONLY_SKIP_LAYERS
    assert compose_run("model=maskrcnn", "kfac.skip_layers=[]").kfac.skip_layers == []
