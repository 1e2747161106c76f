"""scripts/build_vocab.py and scripts/prepare_bert_data.py: raw text → vocabulary → examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from kfac_train.data.bert_demo import write_cpython_corpus
from kfac_train.data.bert_pretraining import load_pretraining_split, read_pretraining_meta

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raw_text_files_become_a_vocabulary_and_phase_data(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "text" / "topics.txt"
    counts = write_cpython_corpus(corpus)
    assert counts["documents"] > 50 and counts["sentences"] > 1500
    # The same corpus split in two files, as a user's shards would be.
    documents = corpus.read_text().split("\n\n")
    half = len(documents) // 2
    first, second = tmp_path / "text" / "a.txt", tmp_path / "text" / "b.txt"
    first.write_text("\n\n".join(documents[:half]))
    second.write_text("\n\n".join(documents[half:]))

    build_vocab = load_script("build_vocab")
    assert (
        build_vocab.main(
            [str(first), str(second), "--out", str(tmp_path / "vocab"), "--vocab-size", "3000"]
        )
        == 0
    )
    assert "tokens" in capsys.readouterr().out

    prepare = load_script("prepare_bert_data")
    out = tmp_path / "phase2"
    assert (
        prepare.main(
            [
                str(first),
                str(second),
                "--vocab",
                str(tmp_path / "vocab/vocab.txt"),
                "--out",
                str(out),
                "--max-seq-length",
                "256",
                "--validation-fraction",
                "0.05",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    meta = read_pretraining_meta(out)
    assert meta["max_seq_length"] == 256 and meta["vocab_size"] <= 3000
    train = load_pretraining_split(out, "train", max_seq_length=256)
    assert max(len(ids) for ids in train["input_ids"]) == 256
    assert len(load_pretraining_split(out, "validation")) > 0


@pytest.mark.parametrize("script", ["build_vocab", "prepare_bert_data"])
def test_missing_input_is_one_line_and_exit_status_2(script: str, tmp_path: Path, capsys) -> None:
    args = [str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]
    if script == "prepare_bert_data":
        args += ["--vocab", str(tmp_path / "vocab.txt")]
    assert load_script(script).main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "missing.txt" in err
