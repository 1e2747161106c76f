"""BERT models: sizes, the masked-position head, K-FAC's layer selection, checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kfac_train.errors import UserError
from kfac_train.kfac import KFACPreconditioner
from kfac_train.models.bert import (
    BERT_SIZES,
    KFAC_SKIP_LAYERS,
    bert_config,
    build_bert_pretraining,
    build_bert_question_answering,
    pretraining_model_class,
)

from .helpers import compose_run

VOCAB = 1000


def tiny_batch(batch: int = 3, length: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, VOCAB, (batch, length), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, 2::5] = input_ids[:, 2::5]
    return {
        "input_ids": input_ids,
        "token_type_ids": (torch.arange(length) >= length // 2).long().expand(batch, -1),
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
    }


def test_bert_large_has_the_published_shape_and_parameter_count() -> None:
    config = bert_config("bert_large", 30522)
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
    ) == (24, 1024, 16, 4096)
    assert config.vocab_size == 30528  # rounded up to a multiple of 8
    with torch.device("meta"):
        model = pretraining_model_class()(config)
    count = sum(p.numel() for p in model.parameters())
    assert 334e6 < count < 337e6
    assert BERT_SIZES["bert_base"]["hidden_size"] == 768


def test_forward_scores_exactly_the_masked_positions() -> None:
    torch.manual_seed(0)
    model = build_bert_pretraining("bert_tiny", VOCAB).eval()
    batch = tiny_batch()
    out = model(**batch)
    reference = super(type(model), model).forward(
        input_ids=batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
    )
    selected = batch["labels"] != -100
    assert out.mlm_logits.shape == (int(selected.sum()), model.config.vocab_size)
    torch.testing.assert_close(out.mlm_logits, reference.prediction_logits[selected])
    torch.testing.assert_close(out.nsp_logits, reference.seq_relationship_logits)
    assert torch.equal(out.mlm_targets, batch["input_ids"][selected])


def test_kfac_preconditions_every_linear_but_the_embeddings_and_prediction_head() -> None:
    config = compose_run("model=bert_tiny", "optim=kfac")
    assert tuple(config.kfac.skip_layers) == KFAC_SKIP_LAYERS
    model = build_bert_pretraining("bert_tiny", VOCAB)
    pre = KFACPreconditioner(model, skip_layers=config.kfac.skip_layers)
    per_layer = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    expected = [f"bert.encoder.layer.{i}.{name}" for i in range(2) for name in per_layer]
    expected += ["bert.pooler.dense", "cls.seq_relationship"]
    assert pre.layer_names == expected
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears - set(expected) == {"cls.predictions.transform.dense", "cls.predictions.decoder"}
    pre.remove_hooks()


def test_squad_model_takes_the_encoder_of_a_pretraining_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = build_bert_pretraining("bert_tiny", VOCAB)
    torch.save({"model": pretrained.state_dict(), "step": 3}, tmp_path / "ckpt.pt")
    pretrained.save_pretrained(tmp_path / "hf")
    for source in (tmp_path / "ckpt.pt", tmp_path / "hf"):
        qa = build_bert_question_answering("bert_tiny", VOCAB, init_from=source)
        encoder = {
            k: v
            for k, v in pretrained.state_dict().items()
            if k.startswith("bert.") and not k.startswith("bert.pooler.")
        }
        assert encoder.keys() == {k for k in qa.state_dict() if k.startswith("bert.")}
        for key, value in encoder.items():
            assert torch.equal(qa.state_dict()[key], value), key
        assert qa.qa_outputs.out_features == 2


def test_a_checkpoint_of_another_size_is_refused_with_the_reason(tmp_path: Path) -> None:
    torch.save(build_bert_pretraining("bert_tiny", VOCAB).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(UserError, match="does not fit the model"):
        build_bert_pretraining("bert_tiny", 2 * VOCAB, init_from=tmp_path / "tiny.pt")
    with pytest.raises(UserError, match="does not exist"):
        build_bert_pretraining("bert_tiny", VOCAB, init_from=tmp_path / "missing.pt")
