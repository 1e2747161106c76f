"""Shared fixtures of the BERT tests: the CPython-text demo corpus, prepared once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``data.root`` of ``data=bert_demo`` runs in these tests."""
    return tmp_path_factory.mktemp("bert_demo_cache")


@pytest.fixture(scope="session")
def demo_data(demo_cache: Path) -> Path:
    """Prepared demo data of ``data=bert_demo`` (its defaults: sequence length 128)."""
    from kfac_train.data.bert_options import BertDemoDataConfig

    return BertDemoDataConfig(root=str(demo_cache)).prepared_dir()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_data: Path):
    from kfac_train.data.wordpiece import load_bert_tokenizer

    return load_bert_tokenizer(demo_data / "vocab.txt")


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread: the CI machine's 2 cores are shared, and OpenMP's two spinning
    threads slow tiny kernels (eigh of a 513 x 513 factor: ~0.2 s on one thread, seconds on two
    under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
