"""SQuAD v1.1 fine-tuning: span loss, and exact match / F1 of decoded answers.

Training batches (``data=squad``): ``input_ids``, ``token_type_ids``, ``attention_mask`` (B, T)
and ``start_positions``/``end_positions`` (B,); the loss is ``BertForQuestionAnswering``'s mean
of the start and end cross-entropies. Evaluation batches are
:class:`kfac_train.data.bert_options.SquadEvalBatch`: each window is reduced to its best
admissible span (:func:`kfac_train.data.squad.best_span`), the windows of all ranks are
gathered, the best span per question wins, and ``exact_match`` / ``f1`` (percent, official v1.1
definitions in :mod:`kfac_train.tasks.squad_metrics`) are computed over all questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kfac_train.config import TaskConfig
from kfac_train.distributed import all_gather_objects
from kfac_train.registry import TASKS
from kfac_train.tasks.base import Evaluator, LossOutput, Task, move_to_device
from kfac_train.tasks.squad_metrics import squad_scores


@dataclass
class SquadTaskConfig(TaskConfig):
    """`n_best`: candidate starts/ends per window; `max_answer_length`: in tokens."""

    name: str = "squad"
    n_best: int = 20
    max_answer_length: int = 30


class SquadEvaluator(Evaluator):
    """Best span per window on this rank; answers and scores over all ranks in `compute`."""

    def __init__(self, n_best: int, max_answer_length: int) -> None:
        self.n_best = n_best
        self.max_answer_length = max_answer_length
        # question id -> (best score, answer text); question id -> ground truths
        self.best: dict[str, tuple[float, str]] = {}
        self.truths: dict[str, list[str]] = {}

    def update(self, model: nn.Module, batch: Any) -> None:
        from kfac_train.data.squad import best_span

        out = model(**batch.inputs)
        starts = out.start_logits.float().cpu().numpy()
        ends = out.end_logits.float().cpu().numpy()
        for i, qid in enumerate(batch.example_ids):
            self.truths[qid] = list(batch.answers[i])
            span = best_span(
                starts[i],
                ends[i],
                batch.context_offsets[i],
                n_best=self.n_best,
                max_answer_length=self.max_answer_length,
            )
            if span is not None and (qid not in self.best or span[0] > self.best[qid][0]):
                self.best[qid] = (span[0], batch.contexts[i][span[1] : span[2]])

    def compute(self) -> dict[str, float]:
        best: dict[str, tuple[float, str]] = {}
        truths: dict[str, list[str]] = {}
        for rank_best, rank_truths in all_gather_objects((self.best, self.truths)):
            truths.update(rank_truths)
            for qid, (score, text) in rank_best.items():
                if qid not in best or score > best[qid][0]:
                    best[qid] = (score, text)
        if not truths:
            return {"exact_match": float("nan"), "f1": float("nan")}
        scores = squad_scores({qid: text for qid, (_, text) in best.items()}, truths)
        return {"exact_match": scores["exact_match"], "f1": scores["f1"]}


@TASKS.register("squad", schema=SquadTaskConfig)
class SquadTask(Task):
    """Extractive question answering with ``BertForQuestionAnswering``."""

    cfg: SquadTaskConfig

    def move_batch(self, batch: Any, device: torch.device) -> Any:
        if hasattr(batch, "inputs"):  # an evaluation batch: only the tensors move
            batch.inputs = move_to_device(batch.inputs, device)
            return batch
        return move_to_device(batch, device)

    def batch_size(self, batch: Any) -> int:
        inputs = batch.inputs if hasattr(batch, "inputs") else batch
        return int(inputs["input_ids"].shape[0])

    def training_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        out = model(**batch)
        return LossOutput(out.loss)

    def evaluator(self) -> SquadEvaluator:
        return SquadEvaluator(self.cfg.n_best, self.cfg.max_answer_length)
