"""On 2 gloo ranks, the COCO and Dice evaluators score the whole evaluation set, every rank
getting the same numbers as one process that saw everything."""

from __future__ import annotations

import torch
import torch.distributed as dist

from kfac_train.data.coco import build_coco_dataset, collate_detection, resolve_coco_split
from kfac_train.tasks.detection import CocoEvaluator, DetectionConfig
from kfac_train.tasks.dice import VolumeDice
from tests.kfac.dist_utils import run_distributed

from .helpers import ReplayDetector


def _predictions(targets: list[dict], perfect: bool) -> list[dict[str, torch.Tensor]]:
    """The targets themselves with score 1 (perfect), or no detection at all."""
    out = []
    for target in targets:
        keep = slice(None) if perfect else slice(0, 0)
        out.append(
            {
                "boxes": target["boxes"][keep],
                "labels": target["labels"][keep],
                "scores": torch.ones(len(target["labels"][keep])),
                "masks": target["masks"][keep, None].float(),
            }
        )
    return out


def _coco_ap(root: str, images: str, annotations: str, shards: list[list[int]]) -> dict:
    """Evaluate rank r's shard (perfect predictions on rank 0's, none on rank 1's)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    data = build_coco_dataset(resolve_coco_split(root, images, annotations), train=False)
    evaluator = CocoEvaluator(data.coco, DetectionConfig())
    for shard_rank, shard in enumerate(shards):
        if dist.is_initialized() and shard_rank != rank:
            continue
        batch = collate_detection([data.dataset[i] for i in shard])
        model = ReplayDetector(_predictions(batch[1], perfect=shard_rank == 0))
        evaluator.update(model, batch)
    return evaluator.compute()


def _volume_dice(seed: int) -> float:
    """Random slices of 3 volumes; rank r takes every other slice (by position)."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.rand(10, 1, 6, 6, generator=generator)
    masks = (torch.rand(10, 1, 6, 6, generator=generator) > 0.6).float()
    volumes = torch.randint(3, (10,), generator=generator)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dice = VolumeDice(3)
    dice.update(probabilities[rank::world], masks[rank::world], volumes[rank::world])
    return dice.compute()


def _both(coco_args: tuple, dice_seed: int) -> tuple[dict, float]:
    return _coco_ap(*coco_args), _volume_dice(dice_seed)


def test_coco_ap_and_volume_dice_cover_every_rank_and_agree_with_one_process(coco_sets):
    val = coco_sets["val"]
    coco_args = (str(val.root), val.images, val.annotations, [[0], [1, 2]])
    single_ap, single_dice = _both(coco_args, 3)
    per_rank = run_distributed(_both, 2, coco_args, 3, timeout=120)
    assert per_rank[0][0] == per_rank[1][0] == single_ap
    # rank 1's images were missed: a rank that scored only its own share would report 1.0
    assert 0.0 < single_ap["bbox_ap"] < 1.0
    assert per_rank[0][1] == per_rank[1][1]
    assert abs(per_rank[0][1] - single_dice) < 1e-12
