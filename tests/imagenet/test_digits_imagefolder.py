"""Real images through the real layout: scikit-learn's digits exported as an ImageFolder tree and
trained through ``data=imagenet`` (the app's `train`) to a real accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.datasets import load_digits

from kfac_train.app import train
from kfac_train.hydra_setup import register_configs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def export_digits(root: Path, size: int = 16) -> tuple[int, int]:
    """Write digits as ``root/{train,val}/<digit>/<index>.png`` (every 5th image is val),
    upsampled from 8x8 to `size`; returns (train count, val count)."""
    digits = load_digits()
    counts = {"train": 0, "val": 0}
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "val" if index % 5 == 0 else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BILINEAR).save(
            folder / f"{index}.png"
        )
        counts[split] += 1
    return counts["train"], counts["val"]


def test_small_resnet_reaches_92_percent_on_digits_exported_to_imagefolder(
    tmp_path: Path,
) -> None:
    num_train, num_val = export_digits(tmp_path / "digits")
    assert (num_train, num_val) == (1437, 360)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "model=resnet20",
                "model.depth=8",
                "model.width=16",
                "model.image_size=16",
                "data=imagenet",
                f"data.root={tmp_path / 'digits'}",
                "data.num_workers=0",
                "data.min_crop_area=0.5",
                "task=imagenet",
                "task.topk=[1]",
                "optim=sgd",
                "optim.lr=0.1",
                "optim.weight_decay=5e-4",
                "schedule=cosine",
                "batch.size=64",
                "trainer.max_epochs=8",
                "trainer.target_metric=top1",
                "trainer.target_value=0.92",
                "logger.progress=off",
                "checkpoint.at_end=false",
                f"output_dir={tmp_path / 'run'}",
            ],
        )
    summary = train(cfg)
    assert summary["status"] == "target_reached", summary
    assert summary["metrics"]["top1"] >= 0.92
