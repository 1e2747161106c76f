"""The device the K-FAC numerics tests run on: ``KFAC_TEST_DEVICE`` (default ``cpu``).

``KFAC_TEST_DEVICE=cuda python -m pytest tests/kfac/test_dense_reference.py`` runs the
dense-oracle tests on the GPU (scripts/gpu_check.sh does). Asking for CUDA where there is none
fails the tests rather than skipping them.
"""

from __future__ import annotations

import pytest
import torch

from .dist_utils import chosen_device


@pytest.fixture
def device() -> torch.device:
    chosen = chosen_device()
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("KFAC_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
    return chosen
