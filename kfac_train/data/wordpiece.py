"""WordPiece vocabularies for BERT: training one with `tokenizers`, loading one with `transformers`.

A vocabulary is a plain ``vocab.txt`` (one token per line, the line number is the id), the format
of Google's BERT release. Loading always goes through ``BertTokenizer(vocab=path)``, the fast
(Rust-backed) tokenizer in transformers 5: ``BertTokenizerFast(vocab_file=...)`` silently ignores
the file, so every load checks the resulting vocabulary size against the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kfac_train.errors import UserError

if TYPE_CHECKING:  # transformers takes seconds to import: only inside functions
    from transformers import BertTokenizer

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece_vocab(
    text_files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int = 30522,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> Path:
    """Train a WordPiece vocabulary on raw text files and write ``out_dir/vocab.txt``.

    The five BERT special tokens get ids 0..4 in the order of ``SPECIAL_TOKENS``. The trained
    vocabulary can be smaller than ``vocab_size`` when the corpus is small. Returns the path of
    the written ``vocab.txt``.
    """
    files = [str(f) for f in text_files]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise UserError(f"text files not found: {missing}; pass existing raw-text files")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"{vocab_size=} must exceed the {len(SPECIAL_TOKENS)} special tokens")
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase or None)
    trainer.train(
        files,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(out))
    return out / "vocab.txt"


def count_vocab_lines(vocab_file: str | Path) -> int:
    """Number of tokens in a ``vocab.txt`` (non-empty lines)."""
    with open(vocab_file, encoding="utf-8") as f:
        return sum(1 for line in f if line.rstrip("\n"))


def load_bert_tokenizer(vocab_file: str | Path, *, lowercase: bool = True) -> BertTokenizer:
    """A fast BERT WordPiece tokenizer for ``vocab_file``, checked to hold the whole vocabulary.

    Raises ValueError when the file is missing or when the tokenizer does not see every token of
    the file (the transformers-5 trap where a constructor argument is silently ignored).
    """
    from transformers import BertTokenizer

    path = Path(vocab_file)
    if not path.is_file():
        raise UserError(f"vocab file not found: {path}; train one with scripts/build_vocab.py")
    tokenizer = BertTokenizer(vocab=str(path), do_lower_case=lowercase)
    expected = count_vocab_lines(path)
    if len(tokenizer) != expected:
        raise UserError(
            f"tokenizer built from {path} has {len(tokenizer)} tokens but the file has {expected}"
        )
    missing = [t for t in SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(t) is None]
    if missing or tokenizer.unk_token_id in [
        tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t != "[UNK]"
    ]:
        raise UserError(f"vocab file {path} lacks the BERT special tokens {SPECIAL_TOKENS}")
    return tokenizer
