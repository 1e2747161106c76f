"""The Mask R-CNN and U-Net options compose into KAISA's recipes and reject bad inputs clearly."""

from __future__ import annotations

import pytest

from kfac_train.app import train
from kfac_train.config import RunConfig
from kfac_train.data.coco import CocoDataConfig
from kfac_train.data.lgg import LggDataConfig
from kfac_train.errors import UserError
from kfac_train.models.maskrcnn import MaskRCNNConfig
from kfac_train.models.unet import UNetConfig
from kfac_train.tasks.detection import DetectionConfig
from kfac_train.tasks.segmentation import SegmentationConfig

from .helpers import QUIET, compose_run


def _kfac_settings(config: RunConfig) -> tuple:
    k = config.kfac
    return (k.factor_update_steps, k.inv_update_steps, k.damping, k.factor_decay, k.kl_clip)


def test_maskrcnn_brings_coco_detection_and_kaisas_batch_64_recipe():
    config = compose_run("model=maskrcnn")
    assert isinstance(config.model, MaskRCNNConfig)
    assert isinstance(config.data, CocoDataConfig) and isinstance(config.task, DetectionConfig)
    assert config.batch.size == 64 and config.trainer.micro_batch == 2
    assert (config.optim.preconditioner, config.optim.base) == ("kfac", "sgd")
    assert (config.optim.lr, config.optim.momentum, config.optim.weight_decay) == (0.08, 0.9, 1e-4)
    assert _kfac_settings(config) == (50, 500, 0.003, 0.95, 0.001)
    schedule = config.schedule
    assert (schedule.name, schedule.unit, schedule.warmup) == ("multistep", "step", 800)
    assert config.trainer.target_metric == "reached_target"


def test_maskrcnn_sgd_baseline_shares_the_schedule_and_rate_without_kfac():
    kfac, sgd = compose_run("model=maskrcnn"), compose_run("model=maskrcnn", "optim=sgd")
    assert sgd.optim.preconditioner == "none"
    assert sgd.optim.lr == kfac.optim.lr and sgd.schedule == kfac.schedule


def test_maskrcnn_at_batch_128_follows_the_64_gpu_schedule():
    config = compose_run("model=maskrcnn", "batch=128")
    assert config.optim.lr == 0.16 and config.trainer.max_steps == 12000
    assert config.schedule.milestones == [7000, 11000]


def test_coco_paths_follow_the_year():
    data = compose_run("model=maskrcnn", "data.year=2014").data
    assert (data.train_images, data.val_annotations) == (
        "train2014",
        "annotations/instances_val2014.json",
    )


def test_unet_brings_lgg_segmentation_and_kaisas_adam_recipe():
    config = compose_run("model=unet")
    assert isinstance(config.model, UNetConfig) and config.model.image_size == 256
    assert isinstance(config.data, LggDataConfig) and config.data.num_val_patients == 10
    assert isinstance(config.task, SegmentationConfig)
    assert config.batch.size == 64 and config.trainer.micro_batch == 16
    assert (config.optim.preconditioner, config.optim.base, config.optim.lr) == (
        "kfac",
        "adam",
        4e-4,
    )
    assert _kfac_settings(config) == (20, 200, 0.003, 0.95, 0.001)
    assert (config.schedule.unit, config.schedule.warmup) == ("step", 500)
    assert (config.trainer.target_metric, config.trainer.target_value) == ("dice", 0.91)
    adam = compose_run("model=unet", "optim=adam")
    assert (adam.optim.preconditioner, adam.optim.base, adam.optim.lr) == ("none", "adam", 4e-4)


def test_coco_data_with_another_task_is_a_user_error(coco_sets, tmp_path):
    config = compose_run(
        "model=maskrcnn",
        "task=classification",
        f"data.root={coco_sets['train'].root}",
        f"output_dir={tmp_path}",
        *QUIET,
    )
    with pytest.raises(UserError, match="data=coco needs task=detection"):
        train(config)


def test_too_few_classes_for_the_category_ids_names_the_setting(coco_sets, tmp_path):
    config = compose_run(
        "model=maskrcnn",
        f"data.root={coco_sets['train'].root}",
        "model.num_classes=3",
        f"output_dir={tmp_path}",
        *QUIET,
    )
    with pytest.raises(
        UserError, match=r"model.num_classes=3 .* category id 3: set model.num_classes=4"
    ):
        train(config)


def test_unet_without_data_root_names_the_missing_setting(tmp_path):
    config = compose_run("model=unet", f"output_dir={tmp_path}", *QUIET)
    with pytest.raises(UserError, match="data.root is not set"):
        train(config)
