"""Fixtures of the ImageNet tests (trees are written by `fake_data.write_tree`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .fake_data import write_tree


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(root, labels) of a clean tree, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("imagenet")
    return root, write_tree(root)


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; the CI machine's 2 cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
