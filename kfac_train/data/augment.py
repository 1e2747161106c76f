"""Batch-level augmentations of the SP-NGD recipe (Osawa et al., arXiv 2002.06015, Sec. 6).

Both run on the device, on a whole micro-batch, after the input pipeline (torchvision or DALI),
so the two pipelines get identical augmentation; neither forces a host sync.

- :class:`RunningMixup`: x̃_t = λ·x_t + (1 − λ)·x̃_{t−1} (the previous step's *mixed* batch),
  same for one-hot labels; λ ~ Beta(α, α) per sample, then λ ← max(λ, 1 − λ) (as in the
  authors' Chainer code, tyohei/chainerkfac ``ResNet50._mixup``). The first batch, or one whose
  shape differs from the stored one, is passed through with one-hot labels.
- :class:`BatchRandomErasing`: per sample with probability ``p``, zero a rectangle of area
  fraction U(0.02, 0.25), aspect U(0.3, 1) with a random H/W swap, at a uniformly random valid
  position. Applied after mixup, as in the authors' code. Zero is the mean pixel for
  normalised inputs.

torchvision's ``v2.RandomErasing`` draws its box on the host with ``.item()`` and fills with a
CPU tensor, one image at a time; on a GPU batch that is one host sync per image, so the batched
version here draws all boxes as device tensors and applies one mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RunningMixup:
    """Running mixup over successive micro-batches of one process.

    Call with ``(images, labels)``: images (B, C, H, W) float, labels (B,) int64 class indices.
    Returns ``(mixed_images, soft_targets)`` with soft_targets (B, num_classes) in the images'
    dtype, rows summing to 1; feed them to ``F.cross_entropy(logits, soft_targets)``.

    ``running=False`` gives plain "mix with the previous batch" mixup (the stored batch is the
    unmixed input). The stored batch is per process and is not checkpointed: after a resume the
    first batch is passed through unmixed.
    """

    def __init__(self, alpha: float, num_classes: int, *, running: bool = True) -> None:
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha=}")
        if num_classes < 2:
            raise ValueError(f"mixup needs num_classes >= 2, got {num_classes=}")
        self.alpha = alpha
        self.num_classes = num_classes
        self.running = running
        self._prev_images: torch.Tensor | None = None
        self._prev_targets: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the stored batch (the next call passes its input through)."""
        self._prev_images = None
        self._prev_targets = None

    def _sample_lambda(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        concentration = torch.full((batch_size,), self.alpha, device=like.device)
        # validate_args=False: argument checks would read device values back to the host.
        beta = torch.distributions.Beta(concentration, concentration, validate_args=False)
        lam = beta.sample()
        return torch.maximum(lam, 1.0 - lam).to(like.dtype)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = F.one_hot(labels.long(), self.num_classes).to(images.dtype)
        prev = self._prev_images
        if prev is None or prev.shape != images.shape or prev.device != images.device:
            mixed_images, mixed_targets = images, targets
        else:
            assert self._prev_targets is not None
            lam = self._sample_lambda(images.shape[0], images)
            lam_img = lam.view(-1, *([1] * (images.dim() - 1)))
            mixed_images = torch.lerp(prev, images, lam_img)  # lam·x + (1 − lam)·prev
            mixed_targets = torch.lerp(self._prev_targets, targets, lam.view(-1, 1))
        if self.running:
            self._prev_images, self._prev_targets = mixed_images, mixed_targets
        else:
            self._prev_images, self._prev_targets = images, targets
        return mixed_images, mixed_targets


class BatchRandomErasing:
    """Random erasing of one rectangle per sample, drawn on the device for the whole batch.

    Args:
        p: probability that a sample is erased.
        area: (min, max) fraction of the image area to erase.
        min_aspect: the aspect ratio h/w is U(min_aspect, 1), then h and w swap with
            probability 1/2 (so ratios span [min_aspect, 1/min_aspect]).
        value: fill value (0 = the mean pixel of normalised inputs).
    """

    def __init__(
        self,
        p: float = 0.5,
        area: tuple[float, float] = (0.02, 0.25),
        min_aspect: float = 0.3,
        value: float = 0.0,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random erasing probability must be in [0, 1], got {p=}")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"random erasing area must satisfy 0 < min <= max <= 1, got {area=}")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"random erasing min_aspect must be in (0, 1], got {min_aspect=}")
        self.p = p
        self.area = area
        self.min_aspect = min_aspect
        self.value = value

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → a new tensor with the erased rectangles filled."""
        batch, _, height, width = images.shape
        dev = images.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.empty(batch, device=dev).uniform_(low, high)

        erase_area = uniform(*self.area) * (height * width)
        aspect = uniform(self.min_aspect, 1.0)
        box_h = torch.floor(torch.sqrt(erase_area * aspect) + 0.5)
        box_w = torch.floor(torch.sqrt(erase_area / aspect) + 0.5)
        swap = torch.rand(batch, device=dev) < 0.5
        box_h, box_w = torch.where(swap, box_w, box_h), torch.where(swap, box_h, box_w)
        box_h = box_h.clamp(max=height)
        box_w = box_w.clamp(max=width)
        top = torch.floor(torch.rand(batch, device=dev) * (height - box_h + 1))
        left = torch.floor(torch.rand(batch, device=dev) * (width - box_w + 1))
        erase = torch.rand(batch, device=dev) < self.p

        rows = torch.arange(height, device=dev)
        cols = torch.arange(width, device=dev)
        in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (B, H)
        in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (B, W)
        mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]  # (B, H, W)
        return images.masked_fill(mask[:, None], self.value)
