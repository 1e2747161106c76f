#!/usr/bin/env python3
"""Train a WordPiece vocabulary (``vocab.txt``) on raw text, for BERT pretraining from scratch.

    python scripts/build_vocab.py --out /data/bert/vocab /data/text/*.txt
    python scripts/build_vocab.py --out /data/bert/vocab --vocab-size 30522 --cased /data/text/*.txt

Uses the ``tokenizers`` library's WordPiece trainer. Special tokens ``[PAD] [UNK] [CLS] [SEP]
[MASK]`` get ids 0..4. Uncased by default (lowercased, accents stripped), as BERT-Large uncased.
If you already have a vocabulary (e.g. Google's uncased ``vocab.txt``), skip this step and pass
it to scripts/prepare_bert_data.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfac_train.data.wordpiece import count_vocab_lines, train_wordpiece_vocab  # noqa: E402
from kfac_train.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text_files", nargs="+", type=Path, help="raw-text files")
    parser.add_argument("--out", type=Path, required=True, help="output folder for vocab.txt")
    parser.add_argument("--vocab-size", type=int, default=30522, help="at most this many tokens")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="merges need at least this many occurrences"
    )
    parser.add_argument("--cased", action="store_true", help="keep case and accents")
    args = parser.parse_args(argv)
    try:
        path = train_wordpiece_vocab(
            args.text_files,
            args.out,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            lowercase=not args.cased,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({count_vocab_lines(path)} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
