"""The convolution input factor formed without the patch matrix equals the dense oracle's.

The oracle (``tests/kfac/oracle.py``) builds ``A`` literally: ``F.unfold`` patches of the input
padded with the layer's padding mode, a ones column for the bias, every row scaled by ``1/S``,
``A = aᵀa / N``. The library forms ``A`` from shifted products of the padded input
(``kfac_train/kfac/conv_stats.py``); both run in float64 here, so they must agree to rounding.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner
from kfac_train.kfac import conv_stats
from kfac_train.kfac.layers import Conv2dHandler

from . import oracle

# Setup: expectations built in kfac-math.md's "mean" convention (the library default before
# issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")


@pytest.fixture(autouse=True)
def patch_free_at_every_size(monkeypatch):
    """These cases are small; without this they would take the small-patch shortcut."""
    monkeypatch.setattr(Conv2dHandler, "small_patch_elements", 0)


CASES = {
    "3x3-pad1": dict(kernel_size=3, padding=1),
    "3x3-stride2-pad1": dict(kernel_size=3, stride=2, padding=1),
    "3x3-dilation2-pad2": dict(kernel_size=3, dilation=2, padding=2),
    "3x3-stride2-dilation2-no-pad": dict(kernel_size=3, stride=2, dilation=2),
    "5x5-pad2": dict(kernel_size=5, padding=2),
    "5x5-stride2-pad1": dict(kernel_size=5, stride=2, padding=1),
    "1x1": dict(kernel_size=1),
    "1x1-stride2": dict(kernel_size=1, stride=2),
    "2x3-stride-2x1-pad-1x2-dilation-1x2": dict(
        kernel_size=(2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)
    ),
    "3x2-stride3-dilation2": dict(kernel_size=(3, 2), stride=3, dilation=2, padding=1),
    "same-2x3": dict(kernel_size=(2, 3), padding="same"),
    "reflect-3x3": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "reflect-5x5-stride2": dict(kernel_size=5, stride=2, padding=2, padding_mode="reflect"),
    "replicate-3x3-dilation2": dict(kernel_size=3, padding=2, dilation=2, padding_mode="replicate"),
    "circular-3x3-stride2": dict(kernel_size=3, stride=2, padding=2, padding_mode="circular"),
    "circular-2x3": dict(kernel_size=(2, 3), padding=(1, 1), padding_mode="circular"),
}


def _oracle_A(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    out = conv(x)
    capture = oracle.LayerCapture(inputs=x, output_grads=torch.zeros_like(out))
    return oracle.conv2d_factors(conv, capture)[0]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_input_factor_matches_the_unfold_oracle_in_float64(case: str, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, bias=bias, **CASES[case]).double()
    x = torch.randn(3, 3, 9, 8, dtype=torch.float64) + 0.5  # a mean: bias sums are not ~0
    statistic, working = Conv2dHandler().input_statistic(conv, x, torch.float64)
    expected = _oracle_A(conv, x)
    assert statistic.shape == expected.shape
    torch.testing.assert_close(statistic, expected, rtol=1e-12, atol=1e-14)
    assert working > 0


@pytest.mark.parametrize("case", ["3x3-stride2-pad1", "reflect-3x3", "same-2x3"])
def test_channels_last_input_gives_the_same_factor(case: str) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 2, **CASES[case]).double()
    x = torch.randn(2, 4, 7, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    statistic, _ = Conv2dHandler().input_statistic(conv, x, torch.float64)
    torch.testing.assert_close(statistic, _oracle_A(conv, x), rtol=1e-12, atol=1e-14)


def test_input_smaller_than_the_windows_overlap() -> None:
    """Output 2x1: the windows of a 5x5 kernel do not intersect, so no pair shares a core."""
    conv = nn.Conv2d(2, 2, kernel_size=5, padding=1).double()
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    statistic, _ = Conv2dHandler().input_statistic(conv, x, torch.float64)
    torch.testing.assert_close(statistic, _oracle_A(conv, x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_products_are_scaled_into_range(dtype: torch.dtype) -> None:
    """Large inputs over many rows: unscaled float16 products would overflow (|x|² N ≫ 65504)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 2, 3, padding=1).double()
    x = 300.0 * torch.randn(8, 3, 12, 12, dtype=torch.float64)
    statistic, _ = Conv2dHandler().input_statistic(conv, x, dtype)
    assert statistic.dtype == torch.float32
    expected = _oracle_A(conv, x)
    assert torch.isfinite(statistic).all()
    torch.testing.assert_close(statistic.double(), expected, rtol=2e-2, atol=2e-2 * 300**2 / 81)


def test_a_factor_update_step_never_builds_the_patch_matrix(monkeypatch) -> None:
    """The preconditioner's Conv2d factors come from ``input_statistic`` and
    ``output_grad_statistic``: neither the patch copy (``input_rows``) nor the output-gradient
    rows are built, and ``A`` and ``G`` equal the oracle's."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the patch matrix was built")

    monkeypatch.setattr(Conv2dHandler, "input_rows", forbidden)
    monkeypatch.setattr(Conv2dHandler, "output_grad_rows", forbidden)  # G: one batched product
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="replicate").double()
    pre = KFACPreconditioner(conv, factor_decay=0.0, factor_dtype=torch.float64)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    conv(x).square().mean().backward()
    pre.step()
    block = pre.blocks[next(iter(pre.blocks))]
    torch.testing.assert_close(block.A.running, _oracle_A(conv, x), rtol=1e-12, atol=1e-14)
    out = conv(x)
    grads = torch.autograd.grad(out.square().mean(), out)[0]
    capture = oracle.LayerCapture(inputs=x, output_grads=grads)
    expected_G = oracle.conv2d_factors(conv, capture)[1]
    torch.testing.assert_close(block.G.running, expected_G, rtol=1e-12, atol=1e-14)


STRIDE_ONE = sorted(c for c, kw in CASES.items() if kw.get("stride", 1) == 1)


@pytest.mark.parametrize("case", STRIDE_ONE)
def test_stride_one_takes_the_autocorrelation_path_and_matches_the_oracle(
    case: str, monkeypatch
) -> None:
    """Stride 1 in float64: the factor comes from weight-gradient kernels
    (``conv_correlation``), never from the shifted-GEMM path, and equals the oracle's."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the shifted-GEMM path was taken for a stride-1 convolution")

    monkeypatch.setattr(conv_stats, "_shifted_gemm_moment", forbidden)
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 2, **CASES[case]).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64) + 0.25
    statistic, _ = Conv2dHandler().input_statistic(conv, x, torch.float64)
    torch.testing.assert_close(statistic, _oracle_A(conv, x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["3x3-pad1", "reflect-3x3", "5x5-pad2"])
def test_bfloat16_stride_one_takes_the_autocorrelation_path_within_its_precision(
    case: str, monkeypatch
) -> None:
    """bfloat16 statistics of a stride-1 layer: the weight-gradient kernels on the scaled input
    (strips subtracted in float32), not the shifted GEMMs; float16 keeps the shifted GEMMs."""
    real = conv_stats.stride_one_moment
    taken = []

    def spy(module, x, dtype, scale=None):
        taken.append(dtype)
        return real(module, x, dtype, scale)

    monkeypatch.setattr(conv_stats, "stride_one_moment", spy)
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 2, **CASES[case]).double()
    x = 40.0 * torch.randn(4, 3, 9, 8, dtype=torch.float64) + 10.0  # scaled into range
    expected = _oracle_A(conv, x)
    for dtype in (torch.bfloat16, torch.float16):
        statistic, _ = Conv2dHandler().input_statistic(conv, x, dtype)
        assert statistic.dtype == torch.float32
        error = oracle.relative_error(statistic.double(), expected)
        assert error < 1e-2, (dtype, error)  # bfloat16 rounds to 3.9e-3, float16 to 4.9e-4
    assert taken == [torch.bfloat16]


def test_the_autocorrelation_factor_is_exactly_symmetric() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(5, 3, 3, padding=1)
    x = torch.randn(4, 5, 11, 9)
    statistic, _ = Conv2dHandler().input_statistic(conv, x, torch.float32)
    assert torch.equal(statistic, statistic.T)
    torch.testing.assert_close(
        statistic.double(), _oracle_A(conv.double(), x.double()).double(), rtol=1e-4, atol=1e-5
    )


def test_a_small_patch_matrix_is_built_and_multiplied_directly(monkeypatch) -> None:
    """At most ``small_patch_elements`` patch entries: the rows path (one copy, one GEMM), with
    the same factor; above it the patch-free path."""
    monkeypatch.setattr(Conv2dHandler, "small_patch_elements", 3 * 2 * 7 * 6 * 9)  # this input
    built = []
    original = Conv2dHandler.input_rows

    def counting(self, module, x):
        built.append(x.shape)
        return original(self, module, x)

    monkeypatch.setattr(Conv2dHandler, "input_rows", counting)
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    statistic, working = Conv2dHandler().input_statistic(conv, x, torch.float64)
    torch.testing.assert_close(statistic, _oracle_A(conv, x), rtol=1e-12, atol=1e-14)
    assert len(built) == 1 and working >= 3 * 7 * 6 * 19 * 8
    bigger = torch.randn(4, 2, 7, 6, dtype=torch.float64)
    statistic, _ = Conv2dHandler().input_statistic(conv, bigger, torch.float64)
    torch.testing.assert_close(statistic, _oracle_A(conv, bigger), rtol=1e-12, atol=1e-14)
    assert len(built) == 1  # the patch-free path


def test_a_strided_pointwise_convolution_takes_the_rows_path(monkeypatch) -> None:
    """A 1×1 convolution with stride > 1 (ResNet's downsampling shortcut) has a patch matrix
    that is a subsample of its input: whatever its size it is built and multiplied directly
    (one copy, one GEMM), with the oracle's factor; a stride-1 1×1 convolution is not."""
    built = []
    original = Conv2dHandler.input_rows

    def counting(self, module, x):
        built.append(x.shape)
        return original(self, module, x)

    monkeypatch.setattr(Conv2dHandler, "input_rows", counting)  # small_patch_elements is 0
    torch.manual_seed(8)
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    strided = nn.Conv2d(4, 5, 1, stride=2).double()
    statistic, _ = Conv2dHandler().input_statistic(strided, x, torch.float64)
    torch.testing.assert_close(statistic, _oracle_A(strided, x), rtol=1e-12, atol=1e-14)
    assert len(built) == 1
    pointwise = nn.Conv2d(4, 5, 1).double()
    statistic, _ = Conv2dHandler().input_statistic(pointwise, x, torch.float64)
    torch.testing.assert_close(statistic, _oracle_A(pointwise, x), rtol=1e-12, atol=1e-14)
    assert len(built) == 1  # the autocorrelation path
