"""BERT pretraining examples: raw text → tokenised sentence pairs with next-sentence labels.

Input format (the one of Google's BERT release): plain-text files with one sentence per line and
a blank line between documents. Preparation runs with HF ``datasets`` (``load_dataset("text",
sample_by="paragraph")`` gives one row per document, ``.map(batched=True, num_proc=N)`` builds
the examples, ``save_to_disk`` caches them) and writes, under the output folder:

- ``train/`` and ``validation/``: ``datasets`` splits with the columns ``input_ids``,
  ``token_type_ids`` (variable-length int lists, ``[CLS] A [SEP] B [SEP]``, no padding) and
  ``next_sentence_label`` (0: B follows A in the document, 1: B is a random sentence run from
  another document; the convention of ``BertForPreTraining``). Validation documents are held out
  whole before any pair is built, so no sentence of the held-out shard is ever trained on.
- ``vocab.txt``: the vocabulary the ids refer to.
- ``meta.json``: ``max_seq_length``, ``vocab_size``, the preparation settings and example counts.

Masking is *dynamic*: it is not stored here but drawn at collate time by
:class:`kfac_train.data.bert_masking.MaskedLMCollator`, so every epoch sees new masks.

Pair construction follows BERT's recipe: sentences of a document are accumulated into a chunk
until a target length (``max_seq_length - 3`` tokens, or with probability ``short_seq_prob`` a
random shorter one); the chunk is cut at a random sentence boundary into A and B; with
probability ``random_next_prob`` B is instead a run of sentences from another document (label 1)
and the unused sentences of the chunk are put back; the pair is truncated to fit, trimming the
longer side at a random end. ``dupe_factor`` repeats this with different random draws, giving
that many different pairings of the same text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfac_train.data.wordpiece import count_vocab_lines, load_bert_tokenizer
from kfac_train.errors import UserError

if TYPE_CHECKING:  # datasets and transformers take seconds to import: only inside functions
    import datasets
    from transformers import PreTrainedTokenizerBase

META_FILE = "meta.json"
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class PairSettings:
    """How sentence pairs are formed (see the module docstring)."""

    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    random_next_prob: float = 0.5
    dupe_factor: int = 1
    seed: int = 12345

    def __post_init__(self) -> None:
        if self.max_seq_length < 8:
            raise UserError(f"max_seq_length={self.max_seq_length} is too short; use >= 8")
        if self.dupe_factor < 1:
            raise UserError(f"dupe_factor={self.dupe_factor} must be >= 1")
        for name in ("short_seq_prob", "random_next_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name}={value} must lie in [0, 1]")


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Trim the longer of ``a``/``b`` (in place) at a random end until both fit in max_tokens."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _random_run(
    documents: Sequence[Sequence[list[int]]], skip: int, num_tokens: int, rng: random.Random
) -> list[int]:
    """Tokens of consecutive sentences from a random document other than ``skip``.

    Starts at a random sentence and stops once ``num_tokens`` tokens are gathered or the
    document ends. Requires at least two non-empty documents.
    """
    other = rng.randrange(len(documents) - 1)
    other += other >= skip
    doc = documents[other]
    out: list[int] = []
    for sentence in doc[rng.randrange(len(doc)) :]:
        out.extend(sentence)
        if len(out) >= num_tokens:
            break
    return out


def build_pairs(
    documents: Sequence[Sequence[list[int]]],
    settings: PairSettings,
    rng: random.Random,
    *,
    cls_id: int,
    sep_id: int,
) -> list[tuple[list[int], list[int], int]]:
    """Sentence pairs from tokenised documents.

    Args:
        documents: documents, each a list of sentences, each a list of token ids (no specials).
            Empty sentences and documents are ignored. Random next sentences are drawn from
            the other documents of this list; with a single document every pair is a true
            continuation.
        settings: lengths and probabilities.
        rng: the random source (seed it for reproducible examples).
        cls_id, sep_id: ids of ``[CLS]`` and ``[SEP]``.

    Returns:
        ``(input_ids, token_type_ids, next_sentence_label)`` triples, each sequence
        ``[CLS] A [SEP] B [SEP]`` with at most ``settings.max_seq_length`` tokens, segment id 0
        up to and including the first ``[SEP]`` and 1 after it.
    """
    docs = [[s for s in doc if s] for doc in documents]
    docs = [d for d in docs if d]
    max_tokens = settings.max_seq_length - 3
    pairs: list[tuple[list[int], list[int], int]] = []
    for d_idx, doc in enumerate(docs):
        target = max_tokens
        if rng.random() < settings.short_seq_prob:
            target = rng.randint(2, max_tokens)
        chunk: list[list[int]] = []
        chunk_len = 0
        i = 0
        while i < len(doc):
            chunk.append(doc[i])
            chunk_len += len(doc[i])
            if i == len(doc) - 1 or chunk_len >= target:
                a_end = 1 if len(chunk) < 2 else rng.randint(1, len(chunk) - 1)
                a = [t for s in chunk[:a_end] for t in s]
                random_next = len(chunk) == 1 or rng.random() < settings.random_next_prob
                if random_next and len(docs) > 1:
                    b = _random_run(docs, d_idx, max(1, target - len(a)), rng)
                    label = 1
                    i -= len(chunk) - a_end  # the unused sentences start the next chunk
                else:
                    b = [t for s in chunk[a_end:] for t in s]
                    label = 0
                if b:
                    _truncate_pair(a, b, max_tokens, rng)
                    input_ids = [cls_id, *a, sep_id, *b, sep_id]
                    token_type_ids = [0] * (len(a) + 2) + [1] * (len(b) + 1)
                    pairs.append((input_ids, token_type_ids, label))
                chunk = []
                chunk_len = 0
                if rng.random() < settings.short_seq_prob:
                    target = rng.randint(2, max_tokens)
                else:
                    target = max_tokens
            i += 1
    return pairs


def _documents_to_examples(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    tokenizer: PreTrainedTokenizerBase,
    settings: PairSettings,
) -> dict[str, list[Any]]:
    """``datasets.map`` function: a batch of document texts → a batch of pretraining examples."""
    doc_lines = [[ln.strip() for ln in text.split("\n") if ln.strip()] for text in batch["text"]]
    flat = [ln for lines in doc_lines for ln in lines]
    encoded = (
        tokenizer(
            flat, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]
        if flat
        else []
    )
    documents: list[list[list[int]]] = []
    pos = 0
    for lines in doc_lines:
        documents.append(encoded[pos : pos + len(lines)])
        pos += len(lines)
    pairs: list[tuple[list[int], list[int], int]] = []
    for round_ in range(settings.dupe_factor):
        # Seeded by the batch's first row, so examples do not depend on num_proc.
        rng = random.Random(f"{settings.seed}-{round_}-{indices[0] if indices else 0}")
        pairs += build_pairs(
            documents, settings, rng, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id
        )
    return {
        "input_ids": [p[0] for p in pairs],
        "token_type_ids": [p[1] for p in pairs],
        "next_sentence_label": [p[2] for p in pairs],
    }


def _example_features() -> datasets.Features:
    """Arrow schema of the prepared examples."""
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "token_type_ids": datasets.Sequence(datasets.Value("int8")),
            "next_sentence_label": datasets.Value("int8"),
        }
    )


def prepare_pretraining_data(
    text_files: Sequence[str | Path],
    vocab_file: str | Path,
    out_dir: str | Path,
    *,
    settings: PairSettings = PairSettings(),
    validation_fraction: float = 0.05,
    num_proc: int | None = None,
    docs_per_batch: int = 256,
    lowercase: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Turn raw text files into pretraining examples saved under ``out_dir``.

    Args:
        text_files: raw-text files (one sentence per line, blank line between documents).
        vocab_file: WordPiece ``vocab.txt``.
        out_dir: output folder (created); see the module docstring for its layout.
        settings: pair construction settings (sequence length, probabilities, seed).
        validation_fraction: share of *documents* held out for evaluation, in (0, 1). At least
            one document is held out.
        num_proc: worker processes for ``datasets.map`` (``None``: in-process).
        docs_per_batch: documents per ``map`` batch; random next sentences come from the same
            batch, so keep it large (hundreds) on real corpora.
        lowercase: lowercase and strip accents (uncased BERT).
        cache_dir: ``datasets`` cache folder (``None``: its default).

    Returns:
        The metadata written to ``meta.json``.
    """
    import datasets

    files = [str(f) for f in text_files]
    if not files:
        raise UserError("no text files given; pass at least one raw-text file")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise UserError(f"text files not found: {missing}")
    if not 0.0 < validation_fraction < 1.0:
        raise UserError(f"{validation_fraction=} must lie in (0, 1)")
    tokenizer = load_bert_tokenizer(vocab_file, lowercase=lowercase)
    raw = datasets.load_dataset(
        "text",
        data_files=files,
        sample_by="paragraph",
        split="train",
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    raw = raw.filter(lambda row: bool(row["text"].strip()))
    if len(raw) < 2:
        raise UserError(
            f"found {len(raw)} document(s) in {files}; need at least 2 "
            "(documents are separated by blank lines)"
        )
    num_val = max(1, round(len(raw) * validation_fraction))
    split = raw.train_test_split(test_size=num_val, seed=settings.seed, shuffle=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # an interrupted rerun must not look finished
    counts: dict[str, int] = {}
    for name, docs in (("train", split["train"]), ("validation", split["test"])):
        examples = docs.map(
            _documents_to_examples,
            batched=True,
            batch_size=docs_per_batch,
            with_indices=True,
            remove_columns=docs.column_names,
            features=_example_features(),
            num_proc=num_proc,
            fn_kwargs={"tokenizer": tokenizer, "settings": settings},
            desc=f"building {name} pairs",
        )
        examples.save_to_disk(str(out / name))
        counts[name] = len(examples)
    (out / "vocab.txt").write_text(Path(vocab_file).read_text(encoding="utf-8"), encoding="utf-8")
    meta = {
        **asdict(settings),
        "vocab_size": len(tokenizer),
        "lowercase": lowercase,
        "num_documents": {"train": len(split["train"]), "validation": len(split["test"])},
        "num_examples": counts,
        "source_files": files,
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    tmp.replace(out / META_FILE)  # meta.json last: its presence marks a finished preparation
    return meta


def read_pretraining_meta(root: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a prepared folder; ValueError naming the fix when absent."""
    path = Path(root) / META_FILE
    if not path.is_file():
        raise UserError(
            f"no prepared BERT data at {Path(root)} (missing {META_FILE}); create it with "
            "scripts/prepare_bert_data.py and set data.root to its output folder"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_pretraining_split(
    root: str | Path,
    split: str,
    *,
    max_seq_length: int | None = None,
) -> datasets.Dataset:
    """A prepared split, memory-mapped from disk.

    Nothing is read into memory here: in training, the rank-sharding sampler of
    :mod:`kfac_train.data.base` makes each rank read only the rows of its own shard.

    Args:
        root: folder written by :func:`prepare_pretraining_data`.
        split: ``"train"`` or ``"validation"``.
        max_seq_length: when given, must equal the prepared sequence length (a phase-1 folder
            used for phase 2 is an error, not a silent truncation).
    """
    if split not in SPLITS:
        raise UserError(f"{split=} is not one of {SPLITS}")
    meta = read_pretraining_meta(root)
    if max_seq_length is not None and meta["max_seq_length"] != max_seq_length:
        raise UserError(
            f"data at {root} was prepared with max_seq_length={meta['max_seq_length']}, but "
            f"{max_seq_length=} was requested; prepare the data again with "
            f"--max-seq-length {max_seq_length} or point data.root at matching data"
        )
    import datasets

    vocab_path = Path(root) / "vocab.txt"
    if count_vocab_lines(vocab_path) != meta["vocab_size"]:
        raise UserError(f"{vocab_path} does not match meta.json's vocab_size={meta['vocab_size']}")
    return datasets.load_from_disk(str(Path(root) / split))
