"""SQuAD through the app: the evaluator decodes and scores windows split across batches, and
``model=bert_squad data=squad`` fine-tunes a pretraining checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from kfac_train.app import train
from kfac_train.data.bert_options import collate_squad_eval
from kfac_train.data.squad import build_features, read_squad_file
from kfac_train.models.bert import build_bert_pretraining
from kfac_train.tasks.squad import SquadEvaluator

from .helpers import compose_run
from .test_squad_data import MAX_QUERY, MAX_SEQ, QUESTIONS, STRIDE, write_squad_file


class OracleModel(torch.nn.Module):
    """Start/end logits peaking at the gold span of every window that holds its answer."""

    def __init__(self, gold: dict[tuple[int, ...], tuple[int, int]]) -> None:
        super().__init__()
        self.gold = gold

    def forward(self, input_ids, token_type_ids, attention_mask):
        start = torch.zeros(input_ids.shape)
        end = torch.zeros(input_ids.shape)
        for row, ids in enumerate(input_ids.tolist()):
            s, e = self.gold[tuple(ids)]
            if s > 0:
                start[row, s] = end[row, e] = 10.0
        return SimpleNamespace(start_logits=start, end_logits=end)


def test_evaluator_combines_windows_of_one_question_across_batches(
    tmp_path: Path, demo_tokenizer
) -> None:
    examples = read_squad_file(write_squad_file(tmp_path / "dev-v1.1.json"))
    windows = {"max_seq_length": MAX_SEQ, "doc_stride": STRIDE, "max_query_length": MAX_QUERY}
    train_rows = build_features(examples, demo_tokenizer, training=True, **windows)
    eval_rows = build_features(examples, demo_tokenizer, training=False, **windows)
    gold = {tuple(r["input_ids"]): (r["start_positions"], r["end_positions"]) for r in train_rows}
    evaluator = SquadEvaluator(n_best=5, max_answer_length=10)
    model = OracleModel(gold)
    for first in range(0, len(eval_rows), 3):  # batches of 3 windows cut across questions
        rows = [eval_rows[i] for i in range(first, min(first + 3, len(eval_rows)))]
        evaluator.update(model, collate_squad_eval(rows))
    assert evaluator.compute() == {"exact_match": 100.0, "f1": 100.0}
    assert {qid: text for qid, (_, text) in evaluator.best.items()} == {
        qid: answers[0] for qid, _, _, answers in QUESTIONS
    }


def test_bert_squad_fine_tunes_a_pretraining_checkpoint(tmp_path: Path, demo_data: Path) -> None:
    squad = tmp_path / "squad"
    squad.mkdir()
    write_squad_file(squad / "train-v1.1.json")
    write_squad_file(squad / "dev-v1.1.json")
    vocab_size = json.loads((demo_data / "meta.json").read_text())["vocab_size"]
    torch.save(
        {"model": build_bert_pretraining("bert_tiny", vocab_size).state_dict()},
        tmp_path / "pretrained.pt",
    )
    config = compose_run(
        "model=bert_squad",
        "model.size=bert_tiny",
        f"model.weights={tmp_path / 'pretrained.pt'}",
        f"data.root={squad}",
        f"data.vocab_file={demo_data / 'vocab.txt'}",
        f"data.max_seq_length={MAX_SEQ}",
        f"data.doc_stride={STRIDE}",
        f"data.max_query_length={MAX_QUERY}",
        "batch.size=4",
        "trainer.max_epochs=null",
        "trainer.max_steps=3",
        "schedule.unit=step",
        "schedule.warmup=1",
        "optim.lr=1e-3",
        "logger.progress=off",
        "checkpoint.at_end=false",
        f"output_dir={tmp_path / 'run'}",
    )
    summary = train(config)
    assert summary["status"] == "completed" and summary["steps"] == 3
    metrics = summary["metrics"]
    assert set(metrics) == {"exact_match", "f1"}
    assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
