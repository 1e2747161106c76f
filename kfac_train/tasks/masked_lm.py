"""BERT pretraining: masked-LM + next-sentence-prediction loss and held-out metrics.

Batches are dicts from :class:`kfac_train.data.bert_masking.MaskedLMCollator`: ``input_ids``,
``token_type_ids``, ``attention_mask``, ``labels`` (B, T) and ``next_sentence_label`` (B,). The
model is a BERT pretraining option (``kfac_train.models.bert``): it returns the MLM logits of the
masked positions, their targets and the NSP logits.

Loss of a micro-batch: mean cross-entropy over its masked tokens + mean NSP cross-entropy over
its sequences (BERT's objective). Evaluation metrics (held-out shard): ``mlm_loss``,
``mlm_accuracy`` (per masked token), ``nsp_loss``, ``nsp_accuracy`` (per sequence) and ``loss``
(their sum of losses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfac_train.config import ModelConfig, TaskConfig
from kfac_train.data.bert_masking import MaskedLMCollator, SpecialTokenIds
from kfac_train.data.wordpiece import SPECIAL_TOKENS
from kfac_train.registry import TASKS
from kfac_train.tasks.base import LossOutput, SumEvaluator, Task, sample_categorical


@dataclass
class MaskedLMConfig(TaskConfig):
    """`synthetic_seq_length`, `synthetic_max_predictions`: shape of ``data=synthetic`` batches."""

    name: str = "masked_lm"
    synthetic_seq_length: int = 128
    synthetic_max_predictions: int = 20


def pretraining_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], out: Any = None
) -> dict[str, torch.Tensor]:
    """Sums and counts of one batch: MLM/NSP summed losses, correct predictions, counts (from the
    model output `out` when given, else from a forward of `model`)."""
    if out is None:
        out = pretraining_output(model, batch)
    mlm_logits, nsp_logits = out.mlm_logits.float(), out.nsp_logits.float()
    nsp_targets = batch["next_sentence_label"]
    return {
        "mlm_loss_sum": F.cross_entropy(mlm_logits, out.mlm_targets, reduction="sum"),
        "mlm_correct": (mlm_logits.argmax(dim=1) == out.mlm_targets).sum(),
        "mlm_count": torch.tensor(float(out.mlm_targets.numel()), device=mlm_logits.device),
        "nsp_loss_sum": F.cross_entropy(nsp_logits, nsp_targets, reduction="sum"),
        "nsp_correct": (nsp_logits.argmax(dim=1) == nsp_targets).sum(),
        "nsp_count": torch.tensor(float(nsp_targets.numel()), device=nsp_logits.device),
    }


def pretraining_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """The BERT pretraining model's output (``mlm_logits``, ``mlm_targets``, ``nsp_logits``)."""
    return model(
        batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["labels"]
    )


class MaskedLMEvaluator(SumEvaluator):
    """Held-out MLM/NSP loss and accuracy, summed over ranks."""

    def __init__(self) -> None:
        super().__init__(
            {
                "mlm_loss": ("mlm_loss_sum", "mlm_count"),
                "mlm_accuracy": ("mlm_correct", "mlm_count"),
                "nsp_loss": ("nsp_loss_sum", "nsp_count"),
                "nsp_accuracy": ("nsp_correct", "nsp_count"),
            }
        )

    def update(self, model: nn.Module, batch: Any) -> None:
        for name, value in pretraining_losses(model, batch).items():
            self.add(name, value)

    def compute(self) -> dict[str, float]:
        metrics = super().compute()
        metrics["loss"] = metrics["mlm_loss"] + metrics["nsp_loss"]
        return metrics


@TASKS.register("masked_lm", schema=MaskedLMConfig)
class MaskedLMTask(Task):
    """BERT's pretraining objective (see the module docstring)."""

    cfg: MaskedLMConfig
    throughput_unit = "tokens"

    def throughput_count(self, batch: Any) -> int:
        """Tokens of the micro-batch: sequences x sequence length (``input_ids`` (B, L))."""
        return int(batch["input_ids"].numel())

    def training_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        out = pretraining_output(model, batch)
        sums = pretraining_losses(model, batch, out)
        mlm_loss = sums["mlm_loss_sum"] / sums["mlm_count"].clamp(min=1)
        nsp_loss = sums["nsp_loss_sum"] / sums["nsp_count"]
        logs = {
            "mlm_loss": mlm_loss.detach(),
            "nsp_loss": nsp_loss.detach(),
            "mlm_accuracy": sums["mlm_correct"].float() / sums["mlm_count"].clamp(min=1),
            "nsp_accuracy": sums["nsp_correct"].float() / sums["nsp_count"],
        }
        return LossOutput(mlm_loss + nsp_loss, logs, output=out)

    def sample_fisher_loss(self, output: Any, batch: Any) -> torch.Tensor:
        """The pretraining loss with every masked token and the next-sentence label drawn from
        the model's categorical predictions (the same mean-over-tokens + mean-over-sequences)."""
        mlm_logits, nsp_logits = output.mlm_logits.float(), output.nsp_logits.float()
        mlm = F.cross_entropy(mlm_logits, sample_categorical(mlm_logits), reduction="sum")
        nsp = F.cross_entropy(nsp_logits, sample_categorical(nsp_logits))
        return mlm / max(1, mlm_logits.shape[0]) + nsp

    def evaluator(self) -> MaskedLMEvaluator:
        return MaskedLMEvaluator()

    def synthetic_batch(
        self, model_cfg: ModelConfig, batch_size: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Random full-length sentence pairs over the model's vocabulary, masked as real data.

        Special tokens take the ids of ``scripts/build_vocab.py`` vocabularies (0..4).
        """
        from kfac_train.models.bert import UNCASED_VOCAB_SIZE

        vocab_size = getattr(model_cfg, "vocab_size", None) or UNCASED_VOCAB_SIZE
        ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        special = SpecialTokenIds(
            pad=ids["[PAD]"],
            cls=ids["[CLS]"],
            sep=ids["[SEP]"],
            mask=ids["[MASK]"],
            unk=ids["[UNK]"],
        )
        length = self.cfg.synthetic_seq_length
        half = (length - 3) // 2
        words = torch.randint(
            len(SPECIAL_TOKENS), vocab_size, (batch_size, length - 3), generator=generator
        ).tolist()
        labels = torch.randint(2, (batch_size,), generator=generator).tolist()
        examples = [
            {
                "input_ids": [special.cls, *w[:half], special.sep, *w[half:], special.sep],
                "token_type_ids": [0] * (half + 2) + [1] * (length - half - 2),
                "next_sentence_label": label,
            }
            for w, label in zip(words, labels, strict=True)
        ]
        collator = MaskedLMCollator(
            vocab_size=vocab_size,
            special=special,
            max_seq_length=length,
            max_predictions=self.cfg.synthetic_max_predictions,
            generator=generator,
        )
        return collator(examples)
