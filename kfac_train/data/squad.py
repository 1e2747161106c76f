"""SQuAD v1.1: reading the JSON files, windowed features, and span decoding.

Files: ``train-v1.1.json`` and ``dev-v1.1.json`` (the official layout: ``data`` → articles →
``paragraphs`` → ``context`` + ``qas`` → ``id``, ``question``, ``answers`` [``text``,
``answer_start`` (character offset in the context)]).

Features: ``[CLS] question [SEP] context-window [SEP]``, padded to ``max_seq_length``. The
question is cut to ``max_query_length`` tokens. A context longer than the room left is split
into overlapping windows by the fast tokenizer (``return_overflowing_tokens``); consecutive
windows share ``doc_stride`` context tokens (the ``stride`` of transformers' tokenizers). The
offset mapping ties every context token back to its characters, which is how answers are mapped
to token spans (training) and spans back to text (evaluation). A training window that does not
contain the whole answer gets the target span (0, 0), the ``[CLS]`` token.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kfac_train.errors import UserError

if TYPE_CHECKING:  # datasets and transformers take seconds to import: only inside functions
    import datasets
    from transformers import PreTrainedTokenizerBase

SQUAD_FILES = {"train": "train-v1.1.json", "validation": "dev-v1.1.json"}


def read_squad_file(path: str | Path) -> datasets.Dataset:
    """Flatten a SQuAD v1.1 JSON file into one row per question.

    Columns: ``id``, ``title``, ``context``, ``question``, ``answer_texts`` (list of str),
    ``answer_starts`` (list of int, character offsets into ``context``).
    """
    import datasets

    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"SQuAD file not found: {p}; download SQuAD v1.1 ({', '.join(SQUAD_FILES.values())}) "
            "into one folder and set data.root to it"
        )
    with open(p, encoding="utf-8") as f:
        articles = json.load(f).get("data")
    if not isinstance(articles, list):
        raise UserError(f"{p} is not a SQuAD file: no top-level 'data' list")
    rows: list[dict[str, Any]] = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = qa.get("answers", [])
                rows.append(
                    {
                        "id": str(qa["id"]),
                        "title": article.get("title", ""),
                        "context": context,
                        "question": qa["question"],
                        "answer_texts": [a["text"] for a in answers],
                        "answer_starts": [int(a["answer_start"]) for a in answers],
                    }
                )
    if not rows:
        raise UserError(f"no questions in {p}; give a SQuAD v1.1 file")
    return datasets.Dataset.from_list(rows)


def _truncate_questions(
    questions: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_query_length: int
) -> list[str]:
    """Questions cut after their ``max_query_length``-th token (leading spaces removed)."""
    enc = tokenizer(
        [q.lstrip() for q in questions], add_special_tokens=False, return_offsets_mapping=True
    )
    out = []
    for q, offsets in zip(questions, enc["offset_mapping"], strict=True):
        q = q.lstrip()
        out.append(q[: offsets[max_query_length - 1][1]] if len(offsets) > max_query_length else q)
    return out


def _encode(
    batch: dict[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
) -> Any:
    return tokenizer(
        _truncate_questions(batch["question"], tokenizer, max_query_length),
        batch["context"],
        truncation="only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def train_features(
    batch: dict[str, list[Any]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
) -> dict[str, list[Any]]:
    """``datasets.map`` function: questions → training windows with target token spans.

    Output columns: ``input_ids``, ``token_type_ids``, ``attention_mask`` (lists of
    ``max_seq_length`` ints) and ``start_positions``/``end_positions`` (token indices of the first
    answer's first and last token, both 0 when the window does not contain the whole answer).
    """
    enc = _encode(batch, tokenizer, max_seq_length, doc_stride, max_query_length)
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        example = enc["overflow_to_sample_mapping"][i]
        texts, chars = batch["answer_texts"][example], batch["answer_starts"][example]
        if not texts:
            raise UserError(f"question {batch['id'][example]} has no answer to train on")
        first_char, last_char = chars[0], chars[0] + len(texts[0])
        sequence_ids = enc.sequence_ids(i)
        context = [t for t, s in enumerate(sequence_ids) if s == 1]
        start = end = 0
        if offsets[context[0]][0] <= first_char and offsets[context[-1]][1] >= last_char:
            start = next(t for t in context if offsets[t][1] > first_char)
            end = next(t for t in reversed(context) if offsets[t][0] < last_char)
        starts.append(start)
        ends.append(end)
    return {
        "input_ids": enc["input_ids"],
        "token_type_ids": enc["token_type_ids"],
        "attention_mask": enc["attention_mask"],
        "start_positions": starts,
        "end_positions": ends,
    }


def eval_features(
    batch: dict[str, list[Any]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
) -> dict[str, list[Any]]:
    """``datasets.map`` function: questions → evaluation windows.

    Output columns: ``input_ids``, ``token_type_ids``, ``attention_mask``, ``example_id`` (the
    question id), ``context_offsets`` (per token ``[char_start, char_end]`` into the context,
    ``[-1, -1]`` for tokens outside the context: question, specials, padding), and the
    question's ``context`` and ``answer_texts``, so that a window can be decoded and scored on
    its own.
    """
    enc = _encode(batch, tokenizer, max_seq_length, doc_stride, max_query_length)
    example_ids, context_offsets, contexts, answers = [], [], [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        example = enc["overflow_to_sample_mapping"][i]
        example_ids.append(batch["id"][example])
        contexts.append(batch["context"][example])
        answers.append(batch["answer_texts"][example])
        sequence_ids = enc.sequence_ids(i)
        context_offsets.append(
            [list(o) if s == 1 else [-1, -1] for o, s in zip(offsets, sequence_ids, strict=True)]
        )
    return {
        "input_ids": enc["input_ids"],
        "token_type_ids": enc["token_type_ids"],
        "attention_mask": enc["attention_mask"],
        "example_id": example_ids,
        "context_offsets": context_offsets,
        "context": contexts,
        "answer_texts": answers,
    }


def build_features(
    examples: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    training: bool,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Windowed features of ``examples`` (see :func:`train_features`, :func:`eval_features`)."""
    if max_query_length + doc_stride + 3 >= max_seq_length:
        raise UserError(
            f"{max_seq_length=} leaves no room for new context per window with "
            f"{max_query_length=} and {doc_stride=}; lower doc_stride or max_query_length"
        )
    fn = train_features if training else eval_features
    return examples.map(
        fn,
        batched=True,
        remove_columns=examples.column_names,
        num_proc=num_proc,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_seq_length": max_seq_length,
            "doc_stride": doc_stride,
            "max_query_length": max_query_length,
        },
        desc="SQuAD features",
    )


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    context_offsets: Sequence[Sequence[int]],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> tuple[float, int, int] | None:
    """The best admissible answer span of one window: ``(score, first char, end char)``.

    Args:
        start_logits, end_logits: (max_seq_length,) scores of each token starting / ending the
            answer.
        context_offsets: per token ``[char_start, char_end]`` in the context, ``[-1, -1]`` outside.
        n_best: candidate starts and ends considered (the highest-scoring of each).
        max_answer_length: longest admissible answer, in tokens.

    A candidate span (s, e) needs both tokens inside the context and ``s <= e < s +
    max_answer_length``; its score is ``start_logits[s] + end_logits[e]``. Returns None when no
    candidate is admissible.
    """
    top_starts = np.argsort(start_logits)[::-1][:n_best]
    top_ends = np.argsort(end_logits)[::-1][:n_best]
    best: tuple[float, int, int] | None = None
    for s in top_starts:
        if context_offsets[s][0] < 0:
            continue
        for e in top_ends:
            if context_offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(context_offsets[s][0]), int(context_offsets[e][1]))
    return best


def decode_predictions(
    examples: datasets.Dataset,
    features: datasets.Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """The best answer text of every question from the logits of its windows.

    Args:
        examples: rows from :func:`read_squad_file`.
        features: rows from :func:`eval_features`, aligned with the logits.
        start_logits, end_logits: (num_features, max_seq_length) arrays.
        n_best, max_answer_length: see :func:`best_span`.

    The best span over all windows of a question wins; its text is the context between its first
    and last character. Questions without an admissible span get the empty answer.
    """
    if len(features) != len(start_logits) or len(features) != len(end_logits):
        raise ValueError(
            f"{len(features)} features but {len(start_logits)} start and {len(end_logits)} end "
            "logit rows; evaluate every feature exactly once, in order"
        )
    by_example: dict[str, list[int]] = defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        by_example[example_id].append(i)
    all_offsets = features["context_offsets"]
    predictions: dict[str, str] = {}
    for example in examples:
        spans = [
            best_span(
                start_logits[i],
                end_logits[i],
                all_offsets[i],
                n_best=n_best,
                max_answer_length=max_answer_length,
            )
            for i in by_example.get(example["id"], [])
        ]
        found = [span for span in spans if span is not None]
        if found:
            _, first, last = max(found)
            predictions[example["id"]] = example["context"][first:last]
        else:
            predictions[example["id"]] = ""
    return predictions
