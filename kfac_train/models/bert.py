"""BERT models built from configuration with transformers (no download).

Options: ``model=bert_large`` (24 layers, hidden 1024, 16 heads, FFN 4096; 335 M parameters
with the 30,522-token uncased vocabulary), ``bert_base`` (12, 768, 12, 3072), ``bert_tiny`` (2,
128, 2, 512; for CPU runs and tests), all masked-LM + NSP pretraining models, and
``bert_squad``: ``BertForQuestionAnswering`` whose encoder comes from a pretraining checkpoint.

- The pretraining model is ``BertForPreTraining`` (same modules, same state-dict keys, so
  ``save_pretrained`` folders interoperate) whose forward evaluates the masked-LM head at the
  masked positions only, as NVIDIA's and KAISA's BERT code do: the (hidden × vocab) decoder then
  runs on ~15% of the tokens and no (B, T, vocab) tensor is materialised.
- ``model.weights``: a checkpoint to initialise from, either a ``save_pretrained`` folder or a
  ``torch.save`` file with a state dict (bare, or under ``"model"`` as in this app's
  checkpoints). Phase 2 starts from phase 1 this way (KAISA did the same); all 512 position
  embeddings exist from phase 1 on.
- The vocabulary size comes from ``model.vocab_size``, else from the checkpoint's word
  embeddings, else from the data's vocabulary; it is rounded up to a multiple of 8.
- K-FAC: the model options set ``kfac.skip_layers`` to :data:`KFAC_SKIP_LAYERS`.

transformers is imported inside the builders (it takes seconds to import, and every run imports
every model module).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from kfac_train.config import ModelConfig
from kfac_train.data.bert_masking import IGNORE_INDEX
from kfac_train.errors import UserError
from kfac_train.registry import MODELS, BuildContext

if TYPE_CHECKING:
    from transformers import BertConfig, BertForQuestionAnswering

BERT_SIZES: dict[str, dict[str, int]] = {
    "bert_tiny": {
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "intermediate_size": 512,
    },
    "bert_base": {
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "bert_large": {
        "num_hidden_layers": 24,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}

UNCASED_VOCAB_SIZE = 30522
"""Google's uncased WordPiece vocabulary (used when neither data nor checkpoint say otherwise,
e.g. with ``data=synthetic``)."""

KFAC_SKIP_LAYERS: tuple[str, ...] = ("embeddings", r"cls\.predictions\.")
"""K-FAC ``skip_layers`` default for BERT (KAISA's choice): every ``nn.Linear`` except the
embeddings and the masked-LM prediction head (its transform and the tied vocabulary decoder,
whose input factor would be vocab × vocab). The encoder, the pooler and the two-way NSP
classifier (``cls.seq_relationship``) stay registered. Patterns are unanchored regexes, so they
also match under a wrapper prefix."""

WORD_EMBEDDINGS_KEY = "bert.embeddings.word_embeddings.weight"


def bert_config(
    size: str,
    vocab_size: int,
    *,
    max_position_embeddings: int = 512,
    dropout: float = 0.1,
    pad_vocab_to_multiple_of: int = 8,
    attn_implementation: str = "sdpa",
) -> BertConfig:
    """A ``BertConfig`` for one of ``BERT_SIZES``.

    ``vocab_size`` is rounded up to ``pad_vocab_to_multiple_of`` (tensor-core friendly decoder
    shapes); the extra rows are ids that never occur in the data.
    """
    from transformers import BertConfig

    if size not in BERT_SIZES:
        raise UserError(f"unknown BERT size {size!r}; choose one of {sorted(BERT_SIZES)}")
    if vocab_size < 6:
        raise UserError(f"{vocab_size=} is too small for a BERT vocabulary")
    multiple = max(1, pad_vocab_to_multiple_of)
    config = BertConfig(
        vocab_size=math.ceil(vocab_size / multiple) * multiple,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **BERT_SIZES[size],
    )
    config._attn_implementation = attn_implementation
    return config


class PretrainingOutput(NamedTuple):
    """Outputs of the pretraining model's forward.

    ``mlm_logits``: (N, V) scores at the N masked positions of the batch (row-major order);
    ``mlm_targets``: (N,) their original token ids; ``nsp_logits``: (B, 2), class 0 = B follows A.
    """

    mlm_logits: torch.Tensor
    mlm_targets: torch.Tensor
    nsp_logits: torch.Tensor


@functools.cache
def pretraining_model_class() -> type[nn.Module]:
    """``BertPretrainingModel``: ``BertForPreTraining`` scoring masked positions only.

    Created on first use so that importing this module does not import transformers.
    """
    from transformers import BertForPreTraining

    class BertPretrainingModel(BertForPreTraining):
        """``BertForPreTraining`` whose forward evaluates the MLM head at masked positions only."""

        def forward(  # type: ignore[override]
            self,
            input_ids: torch.Tensor,
            token_type_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            labels: torch.Tensor,
        ) -> PretrainingOutput:
            """Score a batch.

            Args:
                input_ids, token_type_ids, attention_mask: (B, T) int64, as from
                    :class:`kfac_train.data.bert_masking.MaskedLMCollator`.
                labels: (B, T) original ids at masked positions, ``IGNORE_INDEX`` elsewhere.
            """
            outputs = self.bert(
                input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
            )
            sequence, pooled = outputs[0], outputs[1]
            selected = labels != IGNORE_INDEX
            mlm_logits = self.cls.predictions(sequence[selected])
            nsp_logits = self.cls.seq_relationship(pooled)
            return PretrainingOutput(mlm_logits, labels[selected], nsp_logits)

    return BertPretrainingModel


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a ``save_pretrained`` folder or a ``torch.save`` checkpoint file.

    A checkpoint file may hold the state dict itself or a dict with it under ``"model"``; a DDP
    ``module.`` prefix is removed. Files are read with ``weights_only=True``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        safetensors_file = p / "model.safetensors"
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_file))
        bin_file = p / "pytorch_model.bin"
        if bin_file.is_file():
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        raise UserError(
            f"model.weights={path} holds neither model.safetensors nor pytorch_model.bin"
        )
    if not p.is_file():
        raise UserError(
            f"model.weights={path} does not exist: give a checkpoint file or a "
            "save_pretrained folder"
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"model.weights={path} is not a readable checkpoint ({error})") from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights={path} does not hold a model state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    may_miss: tuple[str, ...],
    may_drop: tuple[str, ...],
    source: str | Path,
) -> None:
    """Load ``state`` into ``model``; only keys starting with ``may_miss`` may be absent from the
    state and only keys starting with ``may_drop`` may be left unused."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [k for k, v in state.items() if k in shapes and v.shape != shapes[k]]
    if wrong:
        raise UserError(
            f"model.weights={source} does not fit the model: {wrong[0]} has shape "
            f"{tuple(state[wrong[0]].shape)}, the model {tuple(shapes[wrong[0]])} "
            "(check the model size and model.vocab_size)"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(may_miss)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(may_drop)]
    if missing or unexpected:
        raise UserError(
            f"model.weights={source} does not fit the model (check the model size): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def build_bert_pretraining(
    size: str,
    vocab_size: int,
    *,
    init_from: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
    dropout: float = 0.1,
    pad_vocab_to_multiple_of: int = 8,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A randomly initialised BERT for pretraining, or one loaded from ``init_from``.

    ``state``: the already loaded weights of ``init_from`` (saves reading a large file twice).
    """
    config = bert_config(
        size,
        vocab_size,
        dropout=dropout,
        pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
        attn_implementation=attn_implementation,
    )
    model = pretraining_model_class()(config)
    if init_from:
        state = load_model_state(init_from) if state is None else state
        # The decoder weight is tied to the word embeddings; a state dict may omit it.
        _load_into(
            model,
            state,
            may_miss=("cls.predictions.decoder.weight",),
            may_drop=(),
            source=init_from,
        )
        model.tie_weights()
    return model


def build_bert_question_answering(
    size: str,
    vocab_size: int,
    *,
    init_from: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
    dropout: float = 0.1,
    pad_vocab_to_multiple_of: int = 8,
    attn_implementation: str = "sdpa",
) -> BertForQuestionAnswering:
    """``BertForQuestionAnswering`` whose encoder comes from a pretraining checkpoint.

    The span classifier ``qa_outputs`` (hidden → 2: start and end logits) is new; the
    pretraining heads (``cls.*``) and the pooler of the checkpoint are dropped. Without
    ``init_from`` the encoder is random (only sensible for tests). ``state``: as in
    :func:`build_bert_pretraining`.
    """
    from transformers import BertForQuestionAnswering

    config = bert_config(
        size,
        vocab_size,
        dropout=dropout,
        pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
        attn_implementation=attn_implementation,
    )
    model = BertForQuestionAnswering(config)
    if init_from:
        state = load_model_state(init_from) if state is None else state
        _load_into(
            model,
            state,
            may_miss=("qa_outputs.",),
            may_drop=("cls.", "bert.pooler."),
            source=init_from,
        )
    return model


# ---------------------------------------------------------------------------------------------
# Config options.
# ---------------------------------------------------------------------------------------------
@dataclass
class BertConfigBase(ModelConfig):
    """Options common to the BERT models.

    Attributes:
        size: bert_tiny, bert_base or bert_large (layers, hidden size, heads).
        vocab_size: None = from the checkpoint in `weights`, else from the data's vocabulary.
        dropout: hidden and attention dropout.
        pad_vocab_to_multiple_of: round the vocabulary (embedding rows) up to this multiple.
        attn_implementation: transformers attention kernel: sdpa or eager.
    """

    name: str = "bert_large"
    baseline_optim: str = "lamb"
    size: str = "bert_large"
    vocab_size: int | None = None
    dropout: float = 0.1
    pad_vocab_to_multiple_of: int = 8
    attn_implementation: str = "sdpa"


@dataclass
class BertLargeConfig(BertConfigBase):
    name: str = "bert_large"
    size: str = "bert_large"


@dataclass
class BertBaseConfig(BertConfigBase):
    name: str = "bert_base"
    size: str = "bert_base"


@dataclass
class BertTinyConfig(BertConfigBase):
    name: str = "bert_tiny"
    size: str = "bert_tiny"


@dataclass
class BertSquadConfig(BertConfigBase):
    """BERT for SQuAD; `weights` (the pretraining checkpoint) is required for real runs."""

    name: str = "bert_squad"
    baseline_optim: str = "adamw"
    size: str = "bert_large"
    require_weights: bool = True


def resolve_vocab_size(
    cfg: BertConfigBase, ctx: BuildContext, state: dict[str, torch.Tensor] | None
) -> int:
    """``model.vocab_size``, else the checkpoint's (``state``), else the data's vocabulary size;
    a data vocabulary larger than the model's is an error."""
    data_vocab: int | None = None
    vocab_file = getattr(ctx.config.data, "bert_vocab_file", None)
    if callable(vocab_file):
        from kfac_train.data.wordpiece import count_vocab_lines

        data_vocab = count_vocab_lines(vocab_file())
    size = cfg.vocab_size
    if size is None and state is not None:
        if WORD_EMBEDDINGS_KEY not in state:
            raise UserError(f"model.weights={cfg.weights} has no {WORD_EMBEDDINGS_KEY}")
        size = int(state[WORD_EMBEDDINGS_KEY].shape[0])
    if size is None:
        size = data_vocab if data_vocab is not None else UNCASED_VOCAB_SIZE
    if data_vocab is not None and data_vocab > size:
        raise UserError(
            f"the data's vocabulary has {data_vocab} tokens but the model only {size}: use the "
            "vocabulary the model was pretrained with (data.vocab_file) or raise model.vocab_size"
        )
    return size


def _build_kwargs(cfg: BertConfigBase, ctx: BuildContext) -> dict[str, Any]:
    """Arguments of the ``build_bert_*`` functions for an option (reads the checkpoint once)."""
    state = load_model_state(cfg.weights) if cfg.weights else None
    return {
        "vocab_size": resolve_vocab_size(cfg, ctx, state),
        "init_from": cfg.weights,
        "state": state,
        "dropout": cfg.dropout,
        "pad_vocab_to_multiple_of": cfg.pad_vocab_to_multiple_of,
        "attn_implementation": cfg.attn_implementation,
    }


def build_pretraining_option(cfg: BertConfigBase, ctx: BuildContext) -> nn.Module:
    """Builder of the pretraining options (inputs and outputs: see ``PretrainingOutput``)."""
    return build_bert_pretraining(cfg.size, **_build_kwargs(cfg, ctx))


MODELS.register("bert_large", schema=BertLargeConfig)(build_pretraining_option)
MODELS.register("bert_base", schema=BertBaseConfig)(build_pretraining_option)
MODELS.register("bert_tiny", schema=BertTinyConfig)(build_pretraining_option)


@MODELS.register("bert_squad", schema=BertSquadConfig)
def build_squad_option(cfg: BertSquadConfig, ctx: BuildContext) -> nn.Module:
    """``BertForQuestionAnswering`` from the pretraining checkpoint in ``model.weights``."""
    if cfg.require_weights and not cfg.weights:
        raise UserError(
            "model=bert_squad fine-tunes a pretrained BERT: set model.weights=<phase-2 "
            "checkpoint> (or model.require_weights=false to start from random weights)"
        )
    return build_bert_question_answering(cfg.size, **_build_kwargs(cfg, ctx))
