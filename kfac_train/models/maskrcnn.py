"""Mask R-CNN with a ResNet-50-FPN backbone (torchvision), built without any download.

Three ways to initialise it, all from local files:

- nothing: random initialisation, trainable BatchNorm and all backbone stages trainable
  (torchvision's choice for a model trained from scratch);
- ``model.backbone_weights``: an ImageNet ResNet-50 ``state_dict`` (e.g. torchvision's
  ``resnet50-0676ba61.pth``) loaded into the backbone, which then uses frozen BatchNorm and trains
  only its last ``trainable_backbone_layers`` stages (the MLPerf / KAISA setting);
- ``model.weights``: a full Mask R-CNN ``state_dict`` (e.g. torchvision's COCO checkpoint), for
  fine-tuning or evaluation; same frozen-BatchNorm backbone.

The model takes a list of ``(3, H_i, W_i)`` float images in [0, 1] and resizes and normalises them
itself (``min_size`` / ``max_size``); in training mode it also takes the targets and returns a
dict of losses, in eval mode it returns per-image dicts of ``boxes`` (N, 4) XYXY in the input
image's pixels, ``labels`` (N,), ``scores`` (N,) and ``masks`` (N, 1, H_i, W_i) probabilities.

K-FAC: conf/model/maskrcnn.yaml sets ``kfac.skip_layers`` to `ROI_HEADS_ONLY_SKIP_LAYERS`, so
``optim=kfac`` preconditions the ROI heads only, as KAISA did (``kfac.skip_layers=[...]`` changes
it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from kfac_train.config import ModelConfig
from kfac_train.errors import UserError
from kfac_train.models import load_local_weights
from kfac_train.registry import MODELS, BuildContext

# KAISA's Mask R-CNN run preconditions only the ROI heads: it skips the ResNet body, the FPN, the
# RPN and the box head's two-layer MLP (whose fc6 input factor would be 12545 x 12545). These
# patterns name the same modules in torchvision's model (regexes on `named_modules()` names).
# What remains: box_predictor.{cls_score,bbox_pred}, the four mask_head convs and
# mask_predictor.mask_fcn_logits (the transposed conv5_mask is not a K-FAC layer type).
ROI_HEADS_ONLY_SKIP_LAYERS: tuple[str, ...] = (
    r"^backbone\.",
    r"^rpn\.",
    r"^roi_heads\.box_head\.",
)

# torchvision's COCO convention: category ids 1..90 used as labels directly, 0 = background.
COCO_NUM_CLASSES = 91


@dataclass
class MaskRCNNConfig(ModelConfig):
    """Mask R-CNN R50-FPN.

    Attributes:
        num_classes: classes including the background; labels are COCO category ids, so it must
            exceed the largest category id (91 for COCO).
        min_size, max_size: the model's internal resize (shorter side, longer-side cap), pixels.
        weights: a local full Mask R-CNN state dict (fine-tuning / evaluation).
        backbone_weights: a local ImageNet ResNet-50 state dict for the backbone.
        trainable_backbone_layers: backbone stages trained (0-5) when weights are loaded.
        box_batch_size_per_image: proposals sampled per image for the ROI heads' losses (512;
            a quarter of them positive at most, which also bounds the mask head's work).
        box_score_thresh: detections scoring below are dropped at inference (0.05).
        box_detections_per_img: at most this many detections per image (100, as COCO scores).
    """

    name: str = "maskrcnn"
    baseline_optim: str = "sgd"
    num_classes: int = COCO_NUM_CLASSES
    min_size: int = 800
    max_size: int = 1333
    backbone_weights: Optional[str] = None
    trainable_backbone_layers: int = 3
    box_batch_size_per_image: int = 512
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100


def _load_backbone_weights(backbone: BackboneWithFPN, path: str) -> None:
    """Load an ImageNet ResNet-50 state_dict (its ``fc.*`` entries ignored) into the body."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(
            f"model.backbone_weights={path} does not exist: give a local ResNet-50 state-dict file"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint wrapping the model's state_dict
    body_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    incompatible = backbone.body.load_state_dict(body_state, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise UserError(
            f"model.backbone_weights={path} is not a ResNet-50 state dict (missing "
            f"{incompatible.missing_keys[:3]}, unexpected {incompatible.unexpected_keys[:3]})"
        )


def build_maskrcnn(
    *,
    num_classes: int = COCO_NUM_CLASSES,
    min_size: int = 800,
    max_size: int = 1333,
    weights: str | None = None,
    backbone_weights: Optional[str] = None,
    trainable_backbone_layers: int = 3,
    box_batch_size_per_image: int = 512,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
) -> MaskRCNN:
    """torchvision's Mask R-CNN R50-FPN from local weights only (see the module doc)."""
    options = {
        "min_size": min_size,
        "max_size": max_size,
        "box_batch_size_per_image": box_batch_size_per_image,
        "box_score_thresh": box_score_thresh,
        "box_detections_per_img": box_detections_per_img,
    }
    if num_classes < 2:
        raise UserError(f"model.num_classes={num_classes}: Mask R-CNN needs background + 1")
    if min_size < 32 or max_size < min_size:
        raise UserError(
            f"model.min_size={min_size}, model.max_size={max_size}: need 32 <= min_size <= max_size"
        )
    if weights is None and backbone_weights is None:
        return maskrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            **options,
        )
    if not 0 <= trainable_backbone_layers <= 5:
        raise UserError(
            f"model.trainable_backbone_layers={trainable_backbone_layers}: must be in [0, 5]"
        )
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=trainable_backbone_layers,
    )
    if backbone_weights is not None and weights is None:
        _load_backbone_weights(backbone, backbone_weights)
    model = MaskRCNN(backbone, num_classes=num_classes, **options)
    if weights is not None:
        load_local_weights(model, weights)
    return model


@MODELS.register("maskrcnn", schema=MaskRCNNConfig)
def build_maskrcnn_model(cfg: MaskRCNNConfig, ctx: BuildContext) -> MaskRCNN:
    """Images: list of (3, H_i, W_i) in [0, 1]; see the module doc for inputs and outputs."""
    return build_maskrcnn(
        num_classes=cfg.num_classes,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        weights=cfg.weights,
        backbone_weights=cfg.backbone_weights,
        trainable_backbone_layers=cfg.trainable_backbone_layers,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.box_score_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
    )
