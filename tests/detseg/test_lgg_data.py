"""The LGG pipeline reads the Kaggle layout into per-patient volumes of normalised slices."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from kfac_train.data.lgg import (
    LggSlices,
    crop_to_brain,
    find_lgg_volumes,
    intensity_statistics,
    pad_to_square,
    split_patients,
)
from kfac_train.errors import UserError


def test_volumes_are_patient_folders_with_slices_in_numeric_order(lgg_root):
    volumes = find_lgg_volumes(lgg_root)  # the parent of kaggle_3m/ is accepted
    assert [v.patient for v in volumes] == [f"TCGA_XX_{p:04d}_19990101" for p in range(6)]
    names = [image.name for image, _ in volumes[0].slices]
    assert names[8:11] == [
        "TCGA_XX_0000_19990101_9.tif",
        "TCGA_XX_0000_19990101_10.tif",
        "TCGA_XX_0000_19990101_11.tif",
    ]
    assert all(
        mask.name == image.name.replace(".tif", "_mask.tif") for image, mask in volumes[0].slices
    )


def test_patient_split_is_seeded_disjoint_and_complete(lgg_root):
    volumes = find_lgg_volumes(lgg_root)
    train, val = split_patients(volumes, num_val=2, seed=0)
    assert len(val) == 2 and len(train) == 4
    assert {v.patient for v in train}.isdisjoint(v.patient for v in val)
    assert split_patients(volumes, num_val=2, seed=0) == (train, val)
    others = {tuple(v.patient for v in split_patients(volumes, 2, seed)[1]) for seed in range(6)}
    assert len(others) > 1  # the seed chooses the patients
    with pytest.raises(UserError, match="num_val_patients=6"):
        split_patients(volumes, num_val=6, seed=0)


def test_slices_keep_the_drawn_masks_and_are_standardised_per_volume(lgg_root):
    volumes = find_lgg_volumes(lgg_root)[:2]
    data = LggSlices(volumes, image_size=64)
    assert len(data) == 24 and data.num_volumes == 2
    image, mask, volume, position = data[13]
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    assert (volume, position) == (1, 1)
    drawn = tifffile.imread(volumes[1].slices[1][1])
    assert torch.equal(mask[0], torch.from_numpy((drawn > 0).astype(np.float32)))
    assert mask.sum() > 0  # slice 2 holds a lesion; slices 1, 5, 9 do not
    stack = torch.stack([data[i][0] for i in range(12, 24)])  # all slices of volume 1
    assert stack.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (stack.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    lesion = stack[1, 1][mask[0].bool()].mean()  # the FLAIR channel is brighter in the lesion
    assert lesion > stack[1, 1][~mask[0].bool()].mean() + 1.0


def test_resizing_keeps_masks_binary_and_aligned(lgg_root):
    volumes = find_lgg_volumes(lgg_root)[:1]
    full, small = LggSlices(volumes, image_size=64), LggSlices(volumes, image_size=32)
    mask_full, mask_small = full[1][1], small[1][1]
    assert mask_small.shape == (1, 32, 32)
    assert set(mask_small.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask_small, mask_full[:, ::2, ::2])  # nearest neighbour


def test_training_augmentation_moves_image_and_mask_together(lgg_root):
    volumes = find_lgg_volumes(lgg_root)[:1]
    plain = LggSlices(volumes, image_size=64)
    flipped = LggSlices(volumes, image_size=64, train=True, flip=1.0, scale=0.0, rotate=0.0)
    image, mask = plain[2][:2]
    image_f, mask_f = flipped[2][:2]
    assert torch.equal(mask_f, mask.flip(-1))
    torch.testing.assert_close(image_f, image.flip(-1))
    rotated = LggSlices(volumes, image_size=64, train=True, flip=0.0, scale=0.05, rotate=15.0)
    torch.manual_seed(0)
    image_r, mask_r = rotated[2][:2]
    assert not torch.equal(mask_r, mask)
    # the lesion stays where the (transformed) mask says: bright FLAIR inside, background outside
    assert image_r[1][mask_r[0].bool()].mean() > image_r[1][~mask_r[0].bool()].mean() + 1.0


def test_missing_or_empty_data_root_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="LGG data folder not found.*data.root"):
        find_lgg_volumes(tmp_path / "absent")
    with pytest.raises(UserError, match=r"no LGG slices \(\*_mask.tif\)"):
        find_lgg_volumes(tmp_path)


def test_volumes_are_cropped_to_the_brain_over_slices_rows_and_columns():
    images = torch.zeros(4, 3, 8, 10, dtype=torch.uint8)
    images[1:3, 0, 2:5, 3:9] = 100  # the "brain": slices 1-2, rows 2-4, columns 3-8
    images[0, 1, 0, 0] = 9  # dim noise below 10% of the maximum (200) is not brain
    images[2, 2, 4, 8] = 200
    masks = torch.zeros(4, 1, 8, 10, dtype=torch.uint8)
    masks[2, 0, 3, 4] = 1
    cropped, cropped_masks = crop_to_brain(images, masks)
    assert cropped.shape == (2, 3, 3, 6) and cropped_masks.shape == (2, 1, 3, 6)
    assert cropped_masks[1, 0, 1, 1] == 1 and cropped_masks.sum() == 1
    assert cropped[1, 2, 2, 5] == 200 and cropped[:, 0].min() == 100
    square, square_masks = pad_to_square(cropped, cropped_masks)
    assert square.shape == (2, 3, 6, 6)  # 3 rows padded to 6: one above, two below
    assert square[:, :, 0].sum() == 0 and square[:, :, 4:].sum() == 0
    assert square_masks[1, 0, 2, 1] == 1


def test_intensities_are_clipped_to_the_10th_and_99th_percentiles_then_standardised():
    values = torch.arange(1000, dtype=torch.float64).reshape(10, 1, 10, 10)
    volume = torch.cat([values, 2 * values], dim=1) % 256  # two channels, uint8 range
    low, high, mean, std = intensity_statistics(volume.to(torch.uint8))
    expected = np.percentile(volume.transpose(0, 1).reshape(2, -1).numpy(), [10, 99], axis=1)
    assert torch.allclose(low.double(), torch.from_numpy(expected[0]), atol=1e-4)
    assert torch.allclose(high.double(), torch.from_numpy(expected[1]), atol=1e-4)
    clipped = volume[:, 0].clamp(float(expected[0][0]), float(expected[1][0]))
    assert mean[0].item() == pytest.approx(clipped.mean().item(), rel=1e-6)
    assert std[0].item() == pytest.approx(clipped.std().item(), rel=1e-6)
