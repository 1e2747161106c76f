"""Dynamic masked-LM masking at collate time (BERT's 15% / 80-10-10 rule with a cap).

Masking is drawn per batch, so each epoch masks the same prepared pair differently (dynamic
masking, as in RoBERTa; BERT's original release stored a few static maskings instead).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kfac_train.errors import UserError

IGNORE_INDEX = -100
"""Label of positions that are not predicted (the ``ignore_index`` of cross-entropy)."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of BERT's special tokens in a vocabulary."""

    pad: int
    cls: int
    sep: int
    mask: int
    unk: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokenIds:
        """Read the ids from a transformers BERT tokenizer."""
        return cls(
            pad=tokenizer.pad_token_id,
            cls=tokenizer.cls_token_id,
            sep=tokenizer.sep_token_id,
            mask=tokenizer.mask_token_id,
            unk=tokenizer.unk_token_id,
        )

    def as_tuple(self) -> tuple[int, ...]:
        return (self.pad, self.cls, self.sep, self.mask, self.unk)


class MaskedLMCollator:
    """Pads pretraining examples to a fixed length and draws the masked-LM targets.

    Per sequence with ``n`` maskable tokens (every token but ``[CLS]``, ``[SEP]``, ``[PAD]``;
    ``[UNK]`` may be masked), ``k = min(max_predictions, max(1, round(n * mask_prob)))`` distinct
    positions are chosen uniformly. Each chosen position is replaced by ``[MASK]`` with
    probability ``mask_token_prob`` (0.8), by a uniformly drawn non-special token with
    probability ``random_token_prob`` (0.1), and kept otherwise; its label is the original id.
    Every sequence with a maskable token has at least one target, so the MLM loss of a batch is
    never an average over zero tokens (which gives NaN).

    Randomness: ``generator`` (``None``: torch's global generator, which DataLoader workers seed
    per worker). With ``fixed_per_example=True`` every example is masked with a generator seeded
    by a checksum of its tokens instead, so an evaluation set gets the same masks at every
    evaluation and on any number of ranks.

    Returns a dict of tensors, ``B`` examples, ``T = max_seq_length``:
    ``input_ids``, ``token_type_ids``, ``attention_mask``, ``labels`` (``IGNORE_INDEX`` where not
    predicted) of shape (B, T), int64; ``next_sentence_label`` of shape (B,), int64.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        special: SpecialTokenIds,
        max_seq_length: int,
        max_predictions: int,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
        generator: torch.Generator | None = None,
        fixed_per_example: bool = False,
    ) -> None:
        if max_predictions < 1:
            raise UserError(f"{max_predictions=} must be >= 1")
        if not 0.0 < mask_prob <= 1.0:
            raise UserError(f"{mask_prob=} must lie in (0, 1]")
        if mask_token_prob < 0 or random_token_prob < 0 or mask_token_prob + random_token_prob > 1:
            raise UserError(
                f"{mask_token_prob=} and {random_token_prob=} must be >= 0 and sum to <= 1"
            )
        self.vocab_size = vocab_size
        self.special = special
        self.max_seq_length = max_seq_length
        self.max_predictions = max_predictions
        self.mask_prob = mask_prob
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob
        self.generator = generator
        self.fixed_per_example = fixed_per_example
        specials = torch.tensor(sorted(set(special.as_tuple())))
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[specials] = False
        self._random_pool = keep.nonzero().squeeze(1)

    def _pad(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = len(examples)
        length = self.max_seq_length
        input_ids = torch.full((batch, length), self.special.pad, dtype=torch.long)
        token_type_ids = torch.zeros((batch, length), dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, ex in enumerate(examples):
            ids = ex["input_ids"]
            if len(ids) > length:
                raise UserError(
                    f"example of {len(ids)} tokens exceeds max_seq_length={length}; "
                    "prepare the data with the same max_seq_length as the data config"
                )
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            token_type_ids[row, : len(ids)] = torch.as_tensor(ex["token_type_ids"])
            attention_mask[row, : len(ids)] = 1
        nsp = torch.as_tensor([int(ex["next_sentence_label"]) for ex in examples], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "next_sentence_label": nsp,
        }

    def mask(
        self, input_ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked inputs and labels for padded ``input_ids`` of shape (B, T)."""
        g = generator if generator is not None else self.generator
        maskable = (input_ids != self.special.pad) & (input_ids != self.special.cls)
        maskable &= (input_ids != self.special.sep) & (input_ids != self.special.mask)
        num_maskable = maskable.sum(dim=1)
        k = torch.clamp((num_maskable.double() * self.mask_prob).round().long(), min=1)
        k = torch.minimum(torch.clamp(k, max=self.max_predictions), num_maskable)
        # A random order of the maskable positions of each row; the first k are chosen.
        scores = torch.rand(input_ids.shape, generator=g)
        scores[~maskable] = 2.0
        ranks = scores.argsort(dim=1).argsort(dim=1)
        chosen = ranks < k.unsqueeze(1)
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        how = torch.rand(input_ids.shape, generator=g)
        to_mask = chosen & (how < self.mask_token_prob)
        to_random = chosen & (how >= self.mask_token_prob)
        to_random &= how < self.mask_token_prob + self.random_token_prob
        picks = torch.randint(len(self._random_pool), input_ids.shape, generator=g)
        masked = input_ids.clone()
        masked[to_mask] = self.special.mask
        masked[to_random] = self._random_pool[picks[to_random]]
        return masked, labels

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._pad(examples)
        if not self.fixed_per_example:
            batch["input_ids"], batch["labels"] = self.mask(batch["input_ids"])
            return batch
        rows = []
        for row in batch["input_ids"]:
            seed = zlib.crc32(row.numpy().tobytes())
            rows.append(self.mask(row.unsqueeze(0), torch.Generator().manual_seed(seed)))
        batch["input_ids"] = torch.cat([r[0] for r in rows])
        batch["labels"] = torch.cat([r[1] for r in rows])
        return batch
