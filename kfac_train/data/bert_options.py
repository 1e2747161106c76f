"""The BERT data options: ``data=bert_phase1``, ``bert_phase2``, ``bert_demo`` and ``squad``.

- ``bert_phase1`` / ``bert_phase2``: pretraining examples prepared by
  ``scripts/prepare_bert_data.py`` at ``data.root`` (sequence length 128 / 512; at most 20 / 80
  masked-LM predictions per sequence, as in BERT and KAISA). Training batches are masked
  dynamically; the held-out ``validation`` split is masked with fixed per-example masks.
- ``bert_demo``: the same pipeline on CPython's ``pydoc_data`` text, built on first use and
  cached under ``data.root`` (default ``~/.cache/kfac-train/bert_demo``); no download.
- ``squad``: SQuAD v1.1 (``train-v1.1.json``, ``dev-v1.1.json`` at ``data.root``) tokenised with
  the pretraining vocabulary ``data.vocab_file``.

Every option's config offers ``bert_vocab_file()``, which the BERT model builders use to size
the embeddings when no checkpoint says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kfac_train.config import DataConfig
from kfac_train.data.base import DataBundle, make_eval_loader, make_train_loader, require_dir
from kfac_train.data.bert_masking import MaskedLMCollator, SpecialTokenIds
from kfac_train.errors import UserError
from kfac_train.registry import DATA, BuildContext


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------
@dataclass
class BertPretrainingDataConfig(DataConfig):
    """Prepared pretraining data at `root` (the output folder of scripts/prepare_bert_data.py).

    Attributes:
        max_seq_length: tokens per sequence; must match the prepared data.
        max_predictions: cap on masked-LM predictions per sequence.
        mask_prob: share of maskable tokens chosen for prediction.
        eval_samples: held-out examples evaluated (the first ones; None = all).
    """

    name: str = "bert_phase1"
    max_seq_length: int = 128
    max_predictions: int = 20
    mask_prob: float = 0.15
    eval_samples: int | None = 10000

    def prepared_dir(self) -> Path:
        """The folder holding ``train/``, ``validation/``, ``vocab.txt`` and ``meta.json``."""
        return Path(require_dir(self.root, "data.root", "/path/to/prepared/bert/data"))

    def bert_vocab_file(self) -> Path:
        return self.prepared_dir() / "vocab.txt"


@dataclass
class BertPhase1DataConfig(BertPretrainingDataConfig):
    name: str = "bert_phase1"
    max_seq_length: int = 128
    max_predictions: int = 20


@dataclass
class BertPhase2DataConfig(BertPretrainingDataConfig):
    name: str = "bert_phase2"
    max_seq_length: int = 512
    max_predictions: int = 80


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kfac-train`` (default ``~/.cache/kfac-train``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kfac-train"


@dataclass
class BertDemoDataConfig(BertPretrainingDataConfig):
    """CPython's pydoc text as a small corpus; `root` is the cache folder (None: the default).

    Attributes:
        vocab_size: size of the WordPiece vocabulary trained on the corpus (at most).
        dupe_factor: times the corpus is paired into examples with different random draws.
    """

    name: str = "bert_demo"
    max_seq_length: int = 128
    max_predictions: int = 20
    vocab_size: int = 4000
    dupe_factor: int = 3
    eval_samples: int | None = None

    def prepared_dir(self) -> Path:
        from kfac_train.data.bert_demo import build_demo_data

        root = Path(os.path.expanduser(self.root)) if self.root else default_cache_dir()
        return build_demo_data(
            root / "bert_demo",
            max_seq_length=self.max_seq_length,
            vocab_size=self.vocab_size,
            dupe_factor=self.dupe_factor,
        )


def special_ids_of(vocab_file: Path) -> SpecialTokenIds:
    """Ids of the special tokens, read from the lines of ``vocab.txt``."""
    with open(vocab_file, encoding="utf-8") as f:
        ids = {line.rstrip("\n"): i for i, line in enumerate(f)}
    try:
        return SpecialTokenIds(
            pad=ids["[PAD]"],
            cls=ids["[CLS]"],
            sep=ids["[SEP]"],
            mask=ids["[MASK]"],
            unk=ids["[UNK]"],
        )
    except KeyError as missing:
        raise UserError(f"{vocab_file} lacks the special token {missing}") from None


def build_pretraining_data(cfg: BertPretrainingDataConfig, ctx: BuildContext) -> DataBundle:
    """Masked-LM + NSP batches (see :class:`MaskedLMCollator`) of the prepared data."""
    from kfac_train.data.bert_pretraining import load_pretraining_split, read_pretraining_meta

    folder = cfg.prepared_dir()
    meta = read_pretraining_meta(folder)
    train = load_pretraining_split(folder, "train", max_seq_length=cfg.max_seq_length)
    held_out = load_pretraining_split(folder, "validation", max_seq_length=cfg.max_seq_length)
    if cfg.eval_samples is not None:
        held_out = held_out.select(range(min(len(held_out), cfg.eval_samples)))
    settings: dict[str, Any] = {
        "vocab_size": meta["vocab_size"],
        "special": special_ids_of(folder / "vocab.txt"),
        "max_seq_length": cfg.max_seq_length,
        "max_predictions": cfg.max_predictions,
        "mask_prob": cfg.mask_prob,
    }
    return DataBundle(
        train=make_train_loader(
            train, ctx, num_workers=cfg.num_workers, collate_fn=MaskedLMCollator(**settings)
        ),
        eval=make_eval_loader(
            held_out,
            ctx,
            num_workers=cfg.num_workers,
            collate_fn=MaskedLMCollator(**settings, fixed_per_example=True),
        ),
        num_train_samples=len(train),
    )


DATA.register("bert_phase1", schema=BertPhase1DataConfig)(build_pretraining_data)
DATA.register("bert_phase2", schema=BertPhase2DataConfig)(build_pretraining_data)
DATA.register("bert_demo", schema=BertDemoDataConfig)(build_pretraining_data)


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------------
@dataclass
class SquadDataConfig(DataConfig):
    """SQuAD v1.1 JSON files at `root`.

    Attributes:
        vocab_file: the WordPiece vocabulary of the pretrained model (its ``vocab.txt``).
        lowercase: uncased tokenisation (as the pretraining data).
        max_seq_length: tokens per window.
        doc_stride: context tokens shared by consecutive windows of a long context.
        max_query_length: question tokens kept.
        train_file, eval_file: file names under `root`.
        eval_questions: evaluate only the first this many questions (None = all).
        num_proc: processes for tokenisation (None = in-process).
    """

    name: str = "squad"
    vocab_file: str | None = None
    lowercase: bool = True
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    train_file: str = "train-v1.1.json"
    eval_file: str = "dev-v1.1.json"
    eval_questions: int | None = None
    num_proc: int | None = None

    def bert_vocab_file(self) -> Path:
        if not self.vocab_file:
            raise UserError(
                "data=squad needs the pretraining vocabulary: set "
                "data.vocab_file=<prepared pretraining data>/vocab.txt"
            )
        path = Path(os.path.expanduser(self.vocab_file))
        if not path.is_file():
            raise UserError(f"data.vocab_file={self.vocab_file} does not exist")
        return path


@dataclass
class SquadEvalBatch:
    """Evaluation windows with what span decoding needs.

    ``inputs``: ``input_ids``, ``token_type_ids``, ``attention_mask`` tensors (B, T);
    per window: ``example_ids`` (question id), ``context_offsets`` (T pairs of context character
    offsets, ``[-1, -1]`` outside the context), ``contexts`` and ``answers`` (ground truths).
    """

    inputs: dict[str, torch.Tensor]
    example_ids: list[str]
    context_offsets: list[list[list[int]]]
    contexts: list[str]
    answers: list[list[str]]


INPUT_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


def collate_squad_train(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Training windows → int64 tensors: inputs (B, T) and start/end positions (B,)."""
    keys = (*INPUT_COLUMNS, "start_positions", "end_positions")
    return {k: torch.tensor([row[k] for row in rows], dtype=torch.long) for k in keys}


def collate_squad_eval(rows: list[dict[str, Any]]) -> SquadEvalBatch:
    return SquadEvalBatch(
        inputs={k: torch.tensor([row[k] for row in rows], dtype=torch.long) for k in INPUT_COLUMNS},
        example_ids=[row["example_id"] for row in rows],
        context_offsets=[row["context_offsets"] for row in rows],
        contexts=[row["context"] for row in rows],
        answers=[row["answer_texts"] for row in rows],
    )


@DATA.register("squad", schema=SquadDataConfig)
def build_squad_data(cfg: SquadDataConfig, ctx: BuildContext) -> DataBundle:
    """Training windows with answer spans; evaluation windows with decoding metadata."""
    from kfac_train.data.squad import build_features, read_squad_file
    from kfac_train.data.wordpiece import load_bert_tokenizer

    root = Path(require_dir(cfg.root, "data.root", "/path/to/squad-v1.1"))
    tokenizer = load_bert_tokenizer(cfg.bert_vocab_file(), lowercase=cfg.lowercase)
    train_examples = read_squad_file(root / cfg.train_file)
    eval_examples = read_squad_file(root / cfg.eval_file)
    if cfg.eval_questions is not None:
        eval_examples = eval_examples.select(range(min(len(eval_examples), cfg.eval_questions)))
    windows = {
        "max_seq_length": cfg.max_seq_length,
        "doc_stride": cfg.doc_stride,
        "max_query_length": cfg.max_query_length,
        "num_proc": cfg.num_proc,
    }
    train = build_features(train_examples, tokenizer, training=True, **windows)
    evaluation = build_features(eval_examples, tokenizer, training=False, **windows)
    return DataBundle(
        train=make_train_loader(
            train, ctx, num_workers=cfg.num_workers, collate_fn=collate_squad_train
        ),
        eval=make_eval_loader(
            evaluation, ctx, num_workers=cfg.num_workers, collate_fn=collate_squad_eval
        ),
        num_train_samples=len(train),
    )
