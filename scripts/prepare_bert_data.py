#!/usr/bin/env python3
"""Turn raw text into BERT pretraining examples for ``data=bert_phase1`` / ``bert_phase2``.

Input: plain-text files with one sentence per line and a blank line between documents (the
format of Google's BERT release; Wikipedia and BookCorpus dumps are converted to it by the
usual extraction tools). Output folder: ``train/`` and ``validation/`` (HF ``datasets`` on
disk), ``vocab.txt`` and ``meta.json``; see kfac_train/data/bert_pretraining.py.

    # phase 1 (sequence 128) and phase 2 (sequence 512) from the same text and vocabulary
    python scripts/prepare_bert_data.py --vocab vocab/vocab.txt --max-seq-length 128 \\
        --out /data/bert/phase1 --num-proc 32 /data/text/*.txt
    python scripts/prepare_bert_data.py --vocab vocab/vocab.txt --max-seq-length 512 \\
        --out /data/bert/phase2 --num-proc 32 /data/text/*.txt

Masking is not stored: it is drawn when batches are formed (dynamic masking), with the cap on
predictions per sequence set by the data option (20 for phase 1, 80 for phase 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kfac_train.data.bert_pretraining import PairSettings, prepare_pretraining_data  # noqa: E402
from kfac_train.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text_files", nargs="+", type=Path, help="raw-text files")
    parser.add_argument("--vocab", type=Path, required=True, help="WordPiece vocab.txt")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument(
        "--short-seq-prob",
        type=float,
        default=0.1,
        help="share of pairs with a random shorter target length",
    )
    parser.add_argument(
        "--random-next-prob",
        type=float,
        default=0.5,
        help="share of pairs whose B segment comes from another document",
    )
    parser.add_argument(
        "--dupe-factor",
        type=int,
        default=1,
        help="pairings of the corpus, each with different random draws",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.01,
        help="share of documents held out for evaluation",
    )
    parser.add_argument(
        "--docs-per-batch",
        type=int,
        default=1000,
        help="documents per map batch (random next sentences come from it)",
    )
    parser.add_argument("--num-proc", type=int, default=None, help="worker processes")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--cased", action="store_true", help="the vocabulary is cased")
    parser.add_argument("--cache-dir", type=Path, default=None, help="datasets cache folder")
    args = parser.parse_args(argv)
    try:
        settings = PairSettings(
            max_seq_length=args.max_seq_length,
            short_seq_prob=args.short_seq_prob,
            random_next_prob=args.random_next_prob,
            dupe_factor=args.dupe_factor,
            seed=args.seed,
        )
        meta = prepare_pretraining_data(
            args.text_files,
            args.vocab,
            args.out,
            settings=settings,
            validation_fraction=args.validation_fraction,
            num_proc=args.num_proc,
            docs_per_batch=args.docs_per_batch,
            lowercase=not args.cased,
            cache_dir=args.cache_dir,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = meta["num_examples"]
    print(
        f"wrote {args.out}: {counts['train']} training and {counts['validation']} held-out "
        f"examples of at most {meta['max_seq_length']} tokens (vocabulary {meta['vocab_size']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
