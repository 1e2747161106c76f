"""Vocabulary, sentence-pair examples and masking on the CPython-text corpus (real English)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kfac_train.data.bert_demo import demo_meta
from kfac_train.data.bert_masking import IGNORE_INDEX, MaskedLMCollator, SpecialTokenIds
from kfac_train.data.bert_pretraining import (
    PairSettings,
    build_pairs,
    load_pretraining_split,
    prepare_pretraining_data,
)
from kfac_train.data.wordpiece import SPECIAL_TOKENS, load_bert_tokenizer

MAX_PREDICTIONS = 20


def test_trained_vocabulary_starts_with_the_special_tokens_and_loads_whole(demo_data) -> None:
    lines = (demo_data / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert tuple(lines[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS
    tokenizer = load_bert_tokenizer(demo_data / "vocab.txt")
    assert len(tokenizer) == demo_meta(demo_data)["vocab_size"] > 1000
    ids = tokenizer("The assignment statement binds names.", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids


def test_loading_a_missing_vocabulary_names_the_script(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="build_vocab.py"):
        load_bert_tokenizer(tmp_path / "vocab.txt")


def test_examples_are_cls_a_sep_b_sep_with_matching_segment_ids(demo_data, demo_tokenizer) -> None:
    train = load_pretraining_split(demo_data, "train", max_seq_length=128)
    validation = load_pretraining_split(demo_data, "validation", max_seq_length=128)
    assert len(train) > 1000 and len(validation) > 50
    cls_id, sep_id = demo_tokenizer.cls_token_id, demo_tokenizer.sep_token_id
    for ex in train:
        ids, types = ex["input_ids"], ex["token_type_ids"]
        assert len(ids) == len(types) <= 128
        assert ids[0] == cls_id and ids[-1] == sep_id and ids.count(sep_id) == 2
        first_sep = ids.index(sep_id)
        assert first_sep >= 2 and len(ids) - first_sep >= 3  # A and B are non-empty
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        assert cls_id not in ids[1:]


def test_next_sentence_labels_are_roughly_balanced(demo_data) -> None:
    labels = load_pretraining_split(demo_data, "train")["next_sentence_label"]
    assert set(labels) == {0, 1}
    assert 0.4 < sum(labels) / len(labels) < 0.6


def test_true_pairs_continue_the_document_and_random_pairs_come_from_another() -> None:
    # Document d holds sentences of token ids d*1000 + position, so every token says where it
    # came from.
    documents = [
        [[d * 1000 + 10 * s + t for t in range(1, 4)] for s in range(12)] for d in range(1, 7)
    ]
    settings = PairSettings(max_seq_length=24, short_seq_prob=0.0)
    pairs = build_pairs(documents, settings, random.Random(0), cls_id=1, sep_id=2)
    assert {label for *_, label in pairs} == {0, 1}
    for input_ids, _, label in pairs:
        sep = input_ids.index(2)
        a, b = input_ids[1:sep], input_ids[sep + 1 : -1]
        assert len(input_ids) <= 24
        if label == 0:
            assert {t // 1000 for t in a + b} == {a[0] // 1000}
            assert a == sorted(a) and b == sorted(b) and a[-1] < b[0]
        else:
            assert {t // 1000 for t in b}.isdisjoint({t // 1000 for t in a})


def test_a_single_document_yields_only_true_continuations() -> None:
    document = [[[10 * s + t for t in range(1, 4)] for s in range(1, 30)]]
    settings = PairSettings(max_seq_length=16, short_seq_prob=0.0)
    pairs = build_pairs(document, settings, random.Random(1), cls_id=1, sep_id=2)
    assert pairs and all(label == 0 for *_, label in pairs)


def test_data_prepared_for_another_sequence_length_is_refused(demo_data) -> None:
    with pytest.raises(ValueError, match="max_seq_length=128"):
        load_pretraining_split(demo_data, "train", max_seq_length=512)


def test_preparing_reads_many_files_and_holds_whole_documents_out(tmp_path, demo_data) -> None:
    # Document d says "document <100 + d>" in each of its sentences; sentence numbers stay < 10.
    docs = [
        [f"Document {100 + d} sentence {s} is about the assignment of names." for s in range(6)]
        for d in range(20)
    ]
    files = []
    for part in range(2):
        path = tmp_path / f"part{part}.txt"
        path.write_text("\n\n".join("\n".join(d) for d in docs[part::2]) + "\n")
        files.append(path)
    meta = prepare_pretraining_data(
        files,
        demo_data / "vocab.txt",
        tmp_path / "out",
        settings=PairSettings(max_seq_length=32),
        validation_fraction=0.1,
        cache_dir=tmp_path / "cache",
    )
    assert meta["num_documents"] == {"train": 18, "validation": 2}
    tokenizer = load_bert_tokenizer(tmp_path / "out" / "vocab.txt")
    numbers = {}
    for split in ("train", "validation"):
        ds = load_pretraining_split(tmp_path / "out", split, max_seq_length=32)
        text = " ".join(tokenizer.decode(ids) for ids in ds["input_ids"])
        numbers[split] = {w for w in text.split() if w.isdigit() and int(w) >= 100}
    assert numbers["train"] and numbers["validation"]
    assert numbers["train"].isdisjoint(numbers["validation"])


def collate_demo(demo_data, demo_tokenizer, num_batches: int = 20):
    dataset = load_pretraining_split(demo_data, "train", max_seq_length=128)
    collator = MaskedLMCollator(
        vocab_size=len(demo_tokenizer),
        special=SpecialTokenIds.from_tokenizer(demo_tokenizer),
        max_seq_length=128,
        max_predictions=MAX_PREDICTIONS,
        generator=torch.Generator().manual_seed(0),
    )
    batches = []
    for i in range(num_batches):
        examples = [dataset[j] for j in range(32 * i, 32 * (i + 1))]
        batch = collator(examples)
        batches.append((examples, batch))
    return batches


def test_masking_follows_the_15_percent_and_80_10_10_rules(demo_data, demo_tokenizer) -> None:
    special = SpecialTokenIds.from_tokenizer(demo_tokenizer)
    chosen = maskable = as_mask = as_random = as_kept = 0
    for examples, batch in collate_demo(demo_data, demo_tokenizer):
        original = torch.full_like(batch["input_ids"], special.pad)
        for row, ex in enumerate(examples):
            original[row, : len(ex["input_ids"])] = torch.tensor(ex["input_ids"])
        labels, inputs = batch["labels"], batch["input_ids"]
        target = labels != IGNORE_INDEX
        # Labels are the original ids exactly where a prediction is asked for.
        assert torch.equal(labels[target], original[target])
        assert torch.equal(inputs[~target], original[~target])
        # Special tokens and padding are never chosen.
        is_special = torch.isin(original, torch.tensor([special.cls, special.sep, special.pad]))
        assert not (target & is_special).any()
        per_row = target.sum(1)
        assert (per_row >= 1).all() and (per_row <= MAX_PREDICTIONS).all()
        chosen += int(target.sum())
        maskable += int((~is_special).sum(1).clamp(max=MAX_PREDICTIONS / 0.15).sum())
        as_mask += int((inputs[target] == special.mask).sum())
        as_kept += int((inputs[target] == original[target]).sum())
        as_random += int(
            ((inputs[target] != special.mask) & (inputs[target] != original[target])).sum()
        )
        assert torch.equal(batch["attention_mask"], (original != special.pad).long())
    assert chosen / maskable == pytest.approx(0.15, abs=0.01)
    assert as_mask / chosen == pytest.approx(0.8, abs=0.03)
    # A random replacement can draw the original token (1 in ~3000), counted as kept here.
    assert as_random / chosen == pytest.approx(0.1, abs=0.02)
    assert as_kept / chosen == pytest.approx(0.1, abs=0.02)


def test_max_predictions_caps_long_sequences(demo_data, demo_tokenizer) -> None:
    for examples, batch in collate_demo(demo_data, demo_tokenizer, num_batches=3):
        for row, ex in enumerate(examples):
            real_tokens = len(ex["input_ids"]) - 3
            expected = min(MAX_PREDICTIONS, max(1, round(real_tokens * 0.15)))
            assert int((batch["labels"][row] != IGNORE_INDEX).sum()) == expected


def test_random_replacements_never_insert_special_tokens(demo_tokenizer) -> None:
    special = SpecialTokenIds.from_tokenizer(demo_tokenizer)
    collator = MaskedLMCollator(
        vocab_size=len(demo_tokenizer),
        special=special,
        max_seq_length=16,
        max_predictions=14,
        mask_prob=1.0,
        mask_token_prob=0.0,
        random_token_prob=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    example = {
        "input_ids": [special.cls, *range(100, 107), special.sep, *range(200, 205), special.sep],
        "token_type_ids": [0] * 9 + [1] * 6,
        "next_sentence_label": 1,
    }
    batch = collator([example] * 64)
    replaced = batch["input_ids"][batch["labels"] != IGNORE_INDEX]
    assert replaced.numel() == 64 * 12
    assert not torch.isin(replaced, torch.tensor(special.as_tuple())).any()
    assert torch.equal(batch["next_sentence_label"], torch.ones(64, dtype=torch.long))


def test_demo_data_of_every_sequence_length_shares_one_vocabulary(demo_cache, demo_data) -> None:
    from kfac_train.data.bert_options import BertDemoDataConfig

    short = BertDemoDataConfig(root=str(demo_cache), max_seq_length=64).prepared_dir()
    assert short != demo_data
    assert (short / "vocab.txt").read_bytes() == (demo_data / "vocab.txt").read_bytes()
    assert max(len(ids) for ids in load_pretraining_split(short, "train")["input_ids"]) <= 64
