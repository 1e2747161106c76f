"""``data=bert_demo``: a small real English corpus from the text that ships with CPython.

CPython's ``pydoc_data.topics`` holds the language reference sections shown by ``help()``
(~80 documents, ~0.45 MB of English prose and code listings). This module turns it into the raw
text format of :mod:`kfac_train.data.bert_pretraining` (one sentence per line, a blank line
between documents; code listings, grammar rules and heading underlines dropped), trains a small
WordPiece vocabulary on it and prepares pretraining examples, all cached on disk. No download.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kfac_train.data.bert_pretraining import META_FILE, PairSettings, prepare_pretraining_data
from kfac_train.data.wordpiece import train_wordpiece_vocab

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")


def _is_prose(paragraph: list[str]) -> bool:
    """True for a paragraph of running text (not code, grammar, a heading or a list of names)."""
    first = paragraph[0]
    if first.startswith((" ", "\t", ">>>", "...")) or _HEADING_RULE.match(first.strip()):
        return False
    if any(_HEADING_RULE.match(line.strip()) for line in paragraph):
        return False
    text = " ".join(paragraph)
    words = text.split()
    return len(words) >= 6 and sum(w.isalpha() for w in words) >= 0.6 * len(words)


def topic_to_sentences(text: str) -> list[str]:
    """Sentences of the prose paragraphs of one pydoc topic, whitespace-normalised."""
    sentences: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip()]
        if not lines or not _is_prose(lines):
            continue
        paragraph = " ".join(ln.strip() for ln in lines)
        sentences.extend(s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip())
    return sentences


def write_cpython_corpus(path: str | Path) -> dict[str, int]:
    """Write the pydoc-topics corpus to ``path``; returns document and sentence counts."""
    from pydoc_data.topics import topics

    documents = [topic_to_sentences(topics[name]) for name in sorted(topics)]
    documents = [doc for doc in documents if len(doc) >= 2]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(doc) for doc in documents) + "\n")
    return {"documents": len(documents), "sentences": sum(len(d) for d in documents)}


def _demo_key(max_seq_length: int, vocab_size: int, dupe_factor: int, seed: int) -> str:
    return f"seq{max_seq_length}_vocab{vocab_size}_dupe{dupe_factor}_seed{seed}"


def _publish(built: Path, target: Path, marker: str) -> None:
    """Rename ``built`` to ``target`` unless a concurrent builder already published it."""
    try:
        os.replace(built, target)
    except OSError:
        if not (target / marker).is_file():  # not a concurrent builder that won: fail
            raise


def demo_vocabulary(root: str | Path, vocab_size: int = 4000) -> Path:
    """The demo's WordPiece ``vocab.txt`` under ``root`` (trained on first use, then reused).

    One vocabulary serves every sequence length, so a phase-1 demo model can continue on
    phase-2 demo data (the ``tokenizers`` trainer does not give the same vocabulary twice).
    """
    target = Path(root) / f"vocab{vocab_size}"
    if (target / "vocab.txt").is_file():
        return target / "vocab.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        corpus = work / "cpython_topics.txt"
        write_cpython_corpus(corpus)
        train_wordpiece_vocab([corpus], work / "vocab", vocab_size=vocab_size)
        _publish(work / "vocab", target, "vocab.txt")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / "vocab.txt"


def build_demo_data(
    root: str | Path,
    *,
    max_seq_length: int = 128,
    vocab_size: int = 4000,
    validation_fraction: float = 0.1,
    dupe_factor: int = 3,
    seed: int = 12345,
) -> Path:
    """Prepared demo data under ``root`` (built on first use, then reused); returns its folder.

    The folder has the layout of :func:`prepare_pretraining_data` (``train/``, ``validation/``,
    ``vocab.txt``, ``meta.json``); the vocabulary is :func:`demo_vocabulary`'s. Folders are built
    in a temporary sibling and renamed into place, so concurrent builders (several ranks) never
    see a half-written one.
    """
    target = Path(root) / _demo_key(max_seq_length, vocab_size, dupe_factor, seed)
    if (target / META_FILE).is_file():
        return target
    vocab = demo_vocabulary(root, vocab_size)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        corpus = work / "corpus" / "cpython_topics.txt"
        write_cpython_corpus(corpus)
        prepare_pretraining_data(
            [corpus],
            vocab,
            work / "data",
            settings=PairSettings(
                max_seq_length=max_seq_length, dupe_factor=dupe_factor, seed=seed
            ),
            validation_fraction=validation_fraction,
            docs_per_batch=1000,
            cache_dir=work / "hf_cache",
        )
        _publish(work / "data", target, META_FILE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def demo_meta(folder: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a demo folder."""
    return json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
