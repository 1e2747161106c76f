"""The LGG pipeline reads the Kaggle layout into per-patient volumes of normalised slices."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from kfac_train.data.lgg import LggSlices, find_lgg_volumes, split_patients
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
    image, mask, volume = data[13]
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64) and volume == 1
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
    _, mask_full, _ = full[1]
    _, mask_small, _ = small[1]
    assert mask_small.shape == (1, 32, 32)
    assert set(mask_small.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask_small, mask_full[:, ::2, ::2])  # nearest neighbour


def test_training_augmentation_moves_image_and_mask_together(lgg_root):
    volumes = find_lgg_volumes(lgg_root)[:1]
    plain = LggSlices(volumes, image_size=64)
    flipped = LggSlices(volumes, image_size=64, train=True, flip=1.0, scale=0.0, rotate=0.0)
    image, mask, _ = plain[2]
    image_f, mask_f, _ = flipped[2]
    assert torch.equal(mask_f, mask.flip(-1))
    torch.testing.assert_close(image_f, image.flip(-1))
    rotated = LggSlices(volumes, image_size=64, train=True, flip=0.0, scale=0.05, rotate=15.0)
    torch.manual_seed(0)
    image_r, mask_r, _ = rotated[2]
    assert not torch.equal(mask_r, mask)
    # the lesion stays where the (transformed) mask says: bright FLAIR inside, background outside
    assert image_r[1][mask_r[0].bool()].mean() > image_r[1][~mask_r[0].bool()].mean() + 1.0


def test_missing_or_empty_data_root_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="LGG data folder not found.*data.root"):
        find_lgg_volumes(tmp_path / "absent")
    with pytest.raises(UserError, match=r"no LGG slices \(\*_mask.tif\)"):
        find_lgg_volumes(tmp_path)
