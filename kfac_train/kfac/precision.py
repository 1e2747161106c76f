"""The dtype policy of K-FAC: which dtypes each option accepts, and how data is safely cast.

Three options choose a dtype (``docs/kfac.md``, "Low precision"):

* ``factor_dtype``: the dtype of the per-micro-batch statistic ``rowsᵀ rows / N``. float32 and
  float64 factors are formed and stored in that dtype. bfloat16 and float16 only run the
  statistic's matrix product: the rows are first multiplied by a power-of-two scale so that every
  entry of the product lies in ``[-1, 1]`` (:func:`gram_mean`), and the result is unscaled and
  accumulated in float32, which also holds the running average (:func:`factor_storage_dtype`).
  Without the scale, float16 turns a convolution's ``G`` (about ``1e-19`` under the "mean"
  convention) into zeros.
* ``inv_dtype``: the dtype in which second-order data (eigenvectors and the reciprocal
  ``1/(d_G d_Aᵀ + λ)``, or the damped inverses) is stored. It is always computed in float32 or
  better and cast by :func:`to_finite`, which clamps to the dtype's finite range: with float16 and
  ``λ < 1/65504`` the reciprocal would otherwise overflow to inf. float16 with
  ``compute_method="inverse"`` and ``factored_damping`` is refused: the π-split puts one inverse
  above and the other below float16's range.
* ``precondition_dtype``: the dtype the preconditioning products (``Q_Gᵀ ∇ Q_A`` and back, or
  ``G⁻¹ ∇ A⁻¹``) run in. ``None`` (the default) is float32 or better (:func:`compute_dtype`).
  bfloat16 multiplies bfloat16 operands with float32 accumulation: 4-5x the float32 rate on
  CPUs with AVX512-BF16/AMX and on tensor-core GPUs, at a relative error in the preconditioned
  gradient of 1-3% with the eigen method (1.5x that of storing the data in bfloat16 alone;
  ``docs/kfac.md``). Pair it with ``inv_dtype=bfloat16``, so the data is multiplied as stored,
  not cast every step. Refused: float16, whose range the products' operands leave (``G`` about
  1e-19 under the "mean" convention, ``1/λ`` up to 1e8), and bfloat16 with
  ``compute_method="inverse"``, whose second damped inverse amplifies the rounding of the first
  product (5-50% error at damping 0.01).
* ``comm_dtype``: the dtype of the factor all-reduce. float16 is refused: factors span far more
  than float16's range and a common scale would cost an extra collective; bfloat16 moves the same
  bytes with float32's range. ``None`` follows ``factor_dtype`` (bfloat16 for float16 factors).

Preconditioning runs in float32 or better (:func:`compute_dtype`) unless ``precondition_dtype``
says otherwise (:func:`product_dtype`).
"""

from __future__ import annotations

import math

import torch

#: The dtypes every option accepts, by the name the app's configuration uses.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: 16-bit dtypes: statistics are formed in them but accumulated in float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_problem(
    option: str,
    dtype: torch.dtype,
    *,
    compute_method: str = "eigen",
    factored_damping: bool = False,
) -> str | None:
    """Why ``dtype`` cannot be used for ``option`` (``factor_dtype``, ``inv_dtype``,
    ``precondition_dtype`` or ``comm_dtype``), with the safe choice, or ``None`` when it can.
    The text completes a line that starts with ``"<option>=<dtype>: "``."""
    if dtype not in DTYPES.values():
        return f"choose one of {', '.join(DTYPES)}"
    if option == "comm_dtype" and dtype == torch.float16:
        return (
            "factors span far more than float16's range (a convolution's G is about 1e-19) and "
            "would underflow to zero; use bfloat16 (the same bytes, float32's range)"
        )
    if option == "precondition_dtype" and dtype == torch.float16:
        return (
            "the products' operands (G about 1e-19 under the mean convention, 1/damping up to "
            "1e8) leave float16's range; use bfloat16 (float32's range) or float32"
        )
    if option == "precondition_dtype" and dtype == torch.bfloat16 and compute_method == "inverse":
        return (
            "with compute_method=inverse the rounded product (G + damping I)^-1 grad is amplified "
            "by the other damped inverse (errors of 5-50% measured at damping 0.01); use "
            "compute_method=eigen (1-3%) or float32"
        )
    if (
        option == "inv_dtype"
        and dtype == torch.float16
        and compute_method == "inverse"
        and factored_damping
    ):
        return (
            "with compute_method=inverse and factored_damping the pi-split puts one damped "
            "inverse above float16's range and the other below it; use bfloat16 or float32"
        )
    return None


def check_dtype(option: str, dtype: torch.dtype, **context: object) -> torch.dtype:
    """Return ``dtype`` if ``option`` accepts it, else raise a one-line ``ValueError``."""
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{option} must be a torch.dtype ({', '.join(DTYPES)}), got {dtype!r}")
    problem = dtype_problem(option, dtype, **context)  # type: ignore[arg-type]
    if problem is not None:
        raise ValueError(f"{option}={dtype_name(dtype)}: {problem}")
    return dtype


def factor_storage_dtype(factor_dtype: torch.dtype) -> torch.dtype:
    """The dtype of accumulated statistics and running averages: float32 for 16-bit factors."""
    return torch.float32 if factor_dtype in LOW_PRECISION else factor_dtype


def default_comm_dtype(factor_dtype: torch.dtype) -> torch.dtype:
    """``comm_dtype=None``: the factor dtype, but bfloat16 instead of (refused) float16."""
    return torch.bfloat16 if factor_dtype == torch.float16 else factor_dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on ``dtype`` data runs in: float32 or better."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def product_dtype(grad_dtype: torch.dtype, precondition_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the preconditioning products of a ``grad_dtype`` gradient run in:
    ``precondition_dtype`` when set, else float32 or better (:func:`compute_dtype`)."""
    return precondition_dtype or compute_dtype(grad_dtype)


def all_finite(tensor: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """Whether every entry of ``tensor`` is finite, as a 0-d bool tensor on its device (no host
    synchronisation), read from one sum in :func:`compute_dtype`: one pass, no temporaries.
    ``batched=True``: one verdict per item of the leading dimension, shape ``(k,)``.

    A non-finite entry always makes the sum non-finite. Finite entries whose sum overflows
    (beyond float32's 3.4e38) also read as "not finite": a statistic is then dropped like an
    overflow, which it is in effect, and a decomposition takes the slower exact path.
    """
    dims = tuple(range(1, tensor.dim())) if batched else None
    return torch.isfinite(tensor.sum(dim=dims, dtype=compute_dtype(tensor.dtype)))


def power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """``2^-ceil(log2 amax)`` (so ``amax·scale ∈ (1/2, 1]``), or 1 when ``amax`` is 0 or not
    finite (an inf/NaN statistic then stays non-finite and is dropped). A 0-d tensor on the
    device of ``amax``: no host synchronisation."""
    amax = amax.to(torch.float32)
    usable = torch.isfinite(amax) & (amax > 0)
    exponent = torch.ceil(torch.log2(torch.where(usable, amax, torch.ones_like(amax))))
    return torch.where(usable, torch.exp2(-exponent), torch.ones_like(amax))


def gram_mean(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rowsᵀ rows / N`` for ``rows`` of shape ``(N, n)``, with the product run in ``dtype``.

    float32/float64: computed directly, returned in ``dtype``. bfloat16/float16: the rows are
    multiplied by ``s/√N`` (``s`` a power of two with ``max|rows|·s ≤ 1``) before the cast, so by
    Cauchy–Schwarz every entry of the product is at most 1 in magnitude — neither underflow of
    tiny statistics nor overflow of large ``N`` — and the product is unscaled in float32.
    """
    if dtype not in LOW_PRECISION:
        rows = rows.to(dtype)
        return rows.T @ rows / rows.shape[0]
    rows = rows.to(torch.float32)
    scale = power_of_two_scale(rows.abs().amax())
    # √N is folded into the scale in float32; N itself may exceed float16's range.
    scaled = (rows * (scale / math.sqrt(rows.shape[0]))).to(dtype)
    return (scaled.T @ scaled).to(torch.float32) / (scale * scale)


def exceeds_range(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a finite entry of ``tensor`` lies beyond ``dtype``'s largest value (host sync)."""
    if not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(tensor.dtype).max:
        return False
    limit = torch.finfo(dtype).max
    return bool((tensor.abs() > limit).logical_and(torch.isfinite(tensor)).any())


def to_finite(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to ``dtype``, clamping finite values to its range first (no inf is created)."""
    if torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
        limit = torch.finfo(dtype).max
        tensor = tensor.clamp(-limit, limit)
    return tensor.to(dtype)


def check_dtypes(
    factor_dtype: torch.dtype,
    inv_dtype: torch.dtype,
    comm_dtype: torch.dtype | None,
    precondition_dtype: torch.dtype | None,
    compute_method: str,
    factored_damping: bool,
) -> torch.dtype:
    """Validate the preconditioner's dtype options; return the comm dtype in force."""
    context = {"compute_method": compute_method, "factored_damping": factored_damping}
    check_dtype("factor_dtype", factor_dtype)
    check_dtype("inv_dtype", inv_dtype, **context)
    if precondition_dtype is not None:
        check_dtype("precondition_dtype", precondition_dtype, **context)
    if comm_dtype is None:
        return default_comm_dtype(factor_dtype)
    return check_dtype("comm_dtype", comm_dtype)
