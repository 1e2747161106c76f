"""SQuAD v1.1 preprocessing and span decoding on a small hand-made SQuAD-format file.

The first context is long enough that a 64-token window holds only part of it, so answers near
its end are reachable only through the doc-stride windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kfac_train.data.squad import build_features, decode_predictions, read_squad_file
from kfac_train.tasks.squad_metrics import squad_scores

MAX_SEQ, STRIDE, MAX_QUERY = 64, 16, 8

FILLER = [
    f"The report lists station number {i} along the river and describes its history."
    for i in range(1, 13)
]
LONG_CONTEXT = " ".join(
    FILLER[:4]
    + ["The first bridge over the river was built in 1848 by local merchants."]
    + FILLER[4:10]
    + ["The harbour at the mouth of the river is called Port Alder."]
    + FILLER[10:]
    + ["Its source lies in the Black Forest, far from the sea."]
)
SHORT_CONTEXT = "Python was created by Guido van Rossum and first released in 1991."

QUESTIONS = [
    # (id, context, question, answer texts)
    ("q_bridge", LONG_CONTEXT, "When was the first bridge over the river built?", ["1848"]),
    ("q_harbour", LONG_CONTEXT, "What is the harbour at the mouth called?", ["Port Alder"]),
    (
        "q_source",
        LONG_CONTEXT,
        "Where does the river that this very long question is about have its source?",
        ["the Black Forest", "Black Forest"],
    ),
    ("q_creator", SHORT_CONTEXT, "Who created Python?", ["Guido van Rossum"]),
]


def write_squad_file(path: Path) -> Path:
    by_context: dict[str, list[dict]] = {}
    for qid, context, question, answers in QUESTIONS:
        by_context.setdefault(context, []).append(
            {
                "id": qid,
                "question": question,
                "answers": [{"text": a, "answer_start": context.index(a)} for a in answers],
            }
        )
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "Hand made",
                "paragraphs": [{"context": c, "qas": qas} for c, qas in by_context.items()],
            }
        ],
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture()
def squad_examples(tmp_path: Path):
    return read_squad_file(write_squad_file(tmp_path / "dev-v1.1.json"))


def features(examples, tokenizer, training: bool):
    return build_features(
        examples,
        tokenizer,
        training=training,
        max_seq_length=MAX_SEQ,
        doc_stride=STRIDE,
        max_query_length=MAX_QUERY,
    )


def test_reading_flattens_articles_into_one_row_per_question(squad_examples) -> None:
    assert squad_examples["id"] == [q[0] for q in QUESTIONS]
    row = squad_examples[2]
    assert row["answer_texts"] == ["the Black Forest", "Black Forest"]
    assert [
        row["context"][s : s + len(t)]
        for s, t in zip(row["answer_starts"], row["answer_texts"], strict=True)
    ] == row["answer_texts"]


def test_long_contexts_are_split_into_overlapping_windows_with_truncated_questions(
    squad_examples, demo_tokenizer
) -> None:
    train = features(squad_examples, demo_tokenizer, training=True)
    evals = features(squad_examples, demo_tokenizer, training=False)
    assert len(train) == len(evals) > len(squad_examples)
    windows_of = {qid: evals["example_id"].count(qid) for qid, *_ in QUESTIONS}
    assert windows_of["q_creator"] == 1 and windows_of["q_bridge"] >= 3
    for row in train:
        assert len(row["input_ids"]) == MAX_SEQ
        # [CLS] question [SEP] has segment 0: at most MAX_QUERY question tokens.
        assert sum(1 for t in row["token_type_ids"][: sum(row["attention_mask"])] if t == 0) <= (
            MAX_QUERY + 2
        )
    # Consecutive windows of one context share exactly STRIDE context tokens.
    offsets = [[tuple(o) for o in row if o[0] >= 0] for row in evals["context_offsets"]]
    bridge = [o for o, qid in zip(offsets, evals["example_id"], strict=True) if qid == "q_bridge"]
    for left, right in zip(bridge, bridge[1:], strict=False):
        assert left[-STRIDE:] == right[:STRIDE]


def test_training_targets_map_back_to_the_answer_characters_in_every_window(
    squad_examples, demo_tokenizer
) -> None:
    train = features(squad_examples, demo_tokenizer, training=True)
    evals = features(squad_examples, demo_tokenizer, training=False)
    by_id = {row["id"]: row for row in squad_examples}
    found_in_later_window_only = set()
    windows_with_answer: dict[str, list[int]] = {}
    for i, (target, window) in enumerate(zip(train, evals, strict=True)):
        example = by_id[window["example_id"]]
        context, first = example["context"], example["answer_starts"][0]
        last = first + len(example["answer_texts"][0])
        offs = window["context_offsets"]
        inside = [o for o in offs if o[0] >= 0]
        contains = inside[0][0] <= first and inside[-1][1] >= last
        if contains:
            s, e = target["start_positions"], target["end_positions"]
            assert 0 < s <= e
            assert context[offs[s][0] : offs[e][1]] == example["answer_texts"][0]
            windows_with_answer.setdefault(example["id"], []).append(i)
        else:
            assert (target["start_positions"], target["end_positions"]) == (0, 0)
    first_window = {qid: evals["example_id"].index(qid) for qid in by_id}
    for qid, windows in windows_with_answer.items():
        if first_window[qid] not in windows:
            found_in_later_window_only.add(qid)
    assert set(windows_with_answer) == set(by_id), "every answer is inside some window"
    assert {"q_harbour", "q_source"} <= found_in_later_window_only


def gold_logits(examples, evals, train) -> tuple[np.ndarray, np.ndarray]:
    """Logits that peak at the gold span in every window holding the answer."""
    start = np.zeros((len(evals), MAX_SEQ))
    end = np.zeros((len(evals), MAX_SEQ))
    for i, row in enumerate(train):
        if row["start_positions"] > 0:
            start[i, row["start_positions"]] = 10.0
            end[i, row["end_positions"]] = 10.0
    return start, end


def test_decoding_gold_logits_recovers_every_answer_with_full_scores(
    squad_examples, demo_tokenizer
) -> None:
    train = features(squad_examples, demo_tokenizer, training=True)
    evals = features(squad_examples, demo_tokenizer, training=False)
    start, end = gold_logits(squad_examples, evals, train)
    predictions = decode_predictions(
        squad_examples, evals, start, end, n_best=5, max_answer_length=10
    )
    assert predictions == {qid: answers[0] for qid, _, _, answers in QUESTIONS}
    truths = {row["id"]: row["answer_texts"] for row in squad_examples}
    assert squad_scores(predictions, truths) == {
        "exact_match": 100.0,
        "f1": 100.0,
        "num_questions": 4.0,
    }


def test_decoding_skips_inadmissible_spans(squad_examples, demo_tokenizer) -> None:
    examples = squad_examples.select([3])  # the one-window question
    evals = features(examples, demo_tokenizer, training=False)
    offs = evals[0]["context_offsets"]
    y, a, b, x, *_, c = [t for t, o in enumerate(offs) if o[0] >= 0]  # context token positions
    start = np.zeros((1, MAX_SEQ))
    end = np.zeros((1, MAX_SEQ))
    start[0, 0] = end[0, 0] = 50.0  # [CLS] .. [CLS] = 100: outside the context
    start[0, x], end[0, y] = 40.0, 40.0  # x .. y = 80: ends before it starts
    end[0, c] = 30.0  # a .. c = 55: longer than max_answer_length
    start[0, a], end[0, b] = 25.0, 25.0  # a .. b = 50: the best admissible span
    got = decode_predictions(examples, evals, start, end, n_best=10, max_answer_length=3)
    context = examples[0]["context"]
    assert got == {"q_creator": context[offs[a][0] : offs[b][1]]}


def test_missing_squad_file_names_data_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.root"):
        read_squad_file(tmp_path / "train-v1.1.json")
