"""Embedding (diagonal input factor) and LayerNorm (unit-wise 2×2 blocks) handlers.

References, in float64, built without the library:

* Embedding: the one-hot input rows ``a`` (padding tokens as zero rows), ``A = aᵀa / N`` as a
  dense ``V × V`` matrix (diagonal by construction), ``G = gᵀg / N`` from the output gradients,
  and the explicit Kronecker solve of :mod:`.oracle` on ``∇Wᵀ`` (``(D, V)``).
* LayerNorm: per-example gradients of ``(γ, β)`` taken by autograd from each example's own loss
  term (LayerNorm does not mix examples), the block-diagonal Fisher with one 2×2 block per
  feature formed from them, and a dense solve.

Then: both handlers are opt-in (and ``skip_layers`` still applies); 2 gloo ranks agree with one
process accumulating the same micro-batches (COMM-OPT, MEM-OPT, split factors); the memory and
byte predictor (``strategy=auto``) equals the measurement; a checkpoint resumes bit-exactly.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kfac_train.kfac import KFACPreconditioner, LayerShape, predict_footprint

from . import oracle
from .dist_utils import run_distributed

DAMPING = 1e-3
VOCAB, DIM, PAD = 7, 3, 0
EXACT = {"factor_decay": 0.0, "kl_clip": None, "factor_dtype": torch.float64}


# --------------------------------------------------------------------------- embedding
class TokenNet(nn.Module):
    """Embedding(7, 3, padding_idx=0) → Linear(3, 4) → LayerNorm(4) → Linear(4, 2) per token,
    mean over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.proj = nn.Linear(DIM, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(self.emb(ids)))).mean(dim=1)


def _token_net() -> TokenNet:
    torch.manual_seed(0)
    return TokenNet().double()


def _token_batch(seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (batch, 5), generator=generator)  # token 6 never occurs
    ids[:, -1] = PAD  # every sequence ends with padding
    return ids, torch.randint(0, 2, (batch,), generator=generator)


def _embedding_reference(model: TokenNet, ids, y, method: str, factored: bool):
    reference = _token_net()
    reference.load_state_dict(model.state_dict())
    seen = oracle.capture_layers(
        reference, ["emb"], lambda m: nn.functional.cross_entropy(m(ids), y).backward()
    )["emb"]
    a = nn.functional.one_hot(seen.inputs.reshape(-1), VOCAB).to(torch.float64)
    a[seen.inputs.reshape(-1) == PAD] = 0.0  # padding tokens get no weight gradient
    A = a.T @ a / a.shape[0]
    g = seen.output_grads.reshape(-1, DIM).to(torch.float64)
    G = g.T @ g / g.shape[0]
    grad = reference.emb.weight.grad.T
    if not factored:
        return oracle.preconditioned(method, A, G, grad, DAMPING), A, G, grad
    pi = math.sqrt((float(A.trace()) / VOCAB) / (float(G.trace()) / DIM))
    root = math.sqrt(DAMPING)
    damped = torch.kron(
        A + pi * root * torch.eye(VOCAB, dtype=torch.float64),
        G + root / pi * torch.eye(DIM, dtype=torch.float64),
    )
    return oracle.unvec(torch.linalg.solve(damped, oracle.vec(grad)), DIM), A, G, grad


@pytest.mark.parametrize(
    ("method", "factored"),
    [("eigen", False), ("inverse", False), ("eigen", True), ("inverse", True)],
)
def test_embedding_update_matches_the_dense_kronecker_solve(method: str, factored: bool) -> None:
    model = _token_net()
    ids, y = _token_batch(0)
    expected, A, G, grad = _embedding_reference(model, ids, y, method, factored)
    assert torch.equal(A, torch.diag(A.diagonal()))  # the one-hot second moment is diagonal
    assert A[PAD, PAD] == 0 and A[VOCAB - 1, VOCAB - 1] == 0
    if not factored:
        oracle.assert_sensitive_to_both_factors(method, A, G, grad, DAMPING)
    pre = KFACPreconditioner(
        model,
        embedding="diagonal",
        compute_method=method,
        factored_damping=factored,
        damping=DAMPING,
        inv_dtype=torch.float64,
        skip_layers=["Linear"],
        grad_scaling="mean",  # setup: the reference solve is built in the "mean" convention
        **EXACT,
    )
    assert pre.layer_names == ["emb"]
    nn.functional.cross_entropy(model(ids), y).backward()
    pre.step()
    got = model.emb.weight.grad.T
    assert oracle.relative_error(got, expected) < 1e-9
    assert torch.count_nonzero(model.emb.weight.grad[PAD]) == 0  # padding row: still no gradient
    # A is stored as its diagonal: V + D² factor entries, not V² + D²
    assert pre.memory_bytes()["factors"] == (VOCAB + DIM * DIM) * 8


class TwinTokenNet(nn.Module):
    """Two Embedding(7, 3) of equal shape, summed → Linear(3, 2) per token, mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.emb2 = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids) + self.emb2(ids.flip(1))).mean(dim=1)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_two_small_embeddings_of_equal_shape_each_match_their_dense_kronecker_solve(
    method: str,
) -> None:
    # Equal second-order shapes small enough to stack: a diagonal block must still be
    # preconditioned on its own (it has no dense Q_A / A_inv for the batched products).
    torch.manual_seed(0)
    model = TwinTokenNet().double()
    ids, y = _token_batch(0)
    reference = TwinTokenNet().double()
    reference.load_state_dict(model.state_dict())
    seen = oracle.capture_layers(
        reference, ["emb", "emb2"], lambda m: nn.functional.cross_entropy(m(ids), y).backward()
    )
    pre = KFACPreconditioner(
        model,
        embedding="diagonal",
        compute_method=method,
        damping=DAMPING,
        inv_dtype=torch.float64,
        skip_layers=["Linear"],
        grad_scaling="mean",  # setup: the reference solve is built in the "mean" convention
        **EXACT,
    )
    assert pre.layer_names == ["emb", "emb2"]
    nn.functional.cross_entropy(model(ids), y).backward()
    pre.step()
    for name in ("emb", "emb2"):
        a = nn.functional.one_hot(seen[name].inputs.reshape(-1), VOCAB).to(torch.float64)
        g = seen[name].output_grads.reshape(-1, DIM).to(torch.float64)
        A, G = a.T @ a / a.shape[0], g.T @ g / g.shape[0]
        grad = getattr(reference, name).weight.grad.T
        expected = oracle.preconditioned(method, A, G, grad, DAMPING)
        got = getattr(model, name).weight.grad.T
        assert oracle.relative_error(got, expected) < 1e-9, name


# --------------------------------------------------------------------------- LayerNorm
class NormNet(nn.Module):
    """Linear(4, 6) → LayerNorm(normalized_shape) over (2, 3) or (6,) → Linear(6, 3), mean over
    the 3 tokens of each example."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.inp = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(shape)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.norm(h.reshape(*h.shape[:-1], *self.shape)).reshape(h.shape)
        return self.out(torch.tanh(h)).mean(dim=1)


def _norm_net(shape: tuple[int, ...]) -> NormNet:
    torch.manual_seed(0)
    net = NormNet(shape).double()
    with torch.no_grad():  # non-trivial scale and shift
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return net


def _layernorm_reference(model: NormNet, x, y, scale: float) -> torch.Tensor:
    """``(F + λI)⁻¹ ∇`` with ``F`` block-diagonal over features, each block the mean of
    ``u uᵀ`` over examples, ``u`` the example's own gradient of ``(γ_c, β_c)``."""
    reference = _norm_net(model.shape)
    reference.load_state_dict(model.state_dict())
    batch = x.shape[0]
    per_example = []
    for n in range(batch):
        loss = nn.functional.cross_entropy(reference(x[n : n + 1]), y[n : n + 1]) / batch
        d_gamma, d_beta = torch.autograd.grad(loss, [reference.norm.weight, reference.norm.bias])
        per_example.append(torch.stack([d_gamma.reshape(-1), d_beta.reshape(-1)], dim=1) * scale)
    u = torch.stack(per_example)  # (B, C, 2)
    features = u.shape[1]
    fisher = torch.zeros(2 * features, 2 * features, dtype=torch.float64)
    for c in range(features):
        fisher[2 * c : 2 * c + 2, 2 * c : 2 * c + 2] = u[:, c].T @ u[:, c] / batch
    grad = u.sum(0) / scale  # the batch gradient (checked against autograd by the caller)
    solved = torch.linalg.solve(
        fisher + DAMPING * torch.eye(2 * features, dtype=torch.float64), grad.reshape(-1)
    )
    return solved.reshape(features, 2), grad


@pytest.mark.parametrize("shape", [(6,), (2, 3)])
@pytest.mark.parametrize("grad_scaling", ["mean", "per_example"])
def test_layernorm_update_matches_the_per_feature_fisher_of_per_example_gradients(
    shape: tuple[int, ...], grad_scaling: str
) -> None:
    model = _norm_net(shape)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (5,), generator=generator)
    scale = 5.0 if grad_scaling == "per_example" else 1.0
    expected, grad = _layernorm_reference(model, x, y, scale)
    pre = KFACPreconditioner(
        model,
        layernorm="unit_wise",
        grad_scaling=grad_scaling,
        damping=DAMPING,
        skip_layers=["Linear"],
        **EXACT,
    )
    assert list(pre.blocks) == ["norm"] and not pre.layers
    nn.functional.cross_entropy(model(x), y).backward()
    batch_grad = torch.stack([model.norm.weight.grad.reshape(-1), model.norm.bias.grad.reshape(-1)])
    torch.testing.assert_close(batch_grad.T, grad, rtol=1e-12, atol=1e-14)
    pre.step()
    got = torch.stack([model.norm.weight.grad.reshape(-1), model.norm.bias.grad.reshape(-1)], 1)
    assert oracle.relative_error(got, expected) < 1e-9
    assert oracle.relative_error(got, grad) > 1e-2  # the preconditioner did change it


# --------------------------------------------------------------------------- opt-in
def test_embedding_and_layernorm_are_opt_in_and_obey_skip_layers() -> None:
    model = _token_net()
    assert list(KFACPreconditioner(model).blocks) == ["proj", "head"]  # default: Linear only
    both = KFACPreconditioner(model, embedding="diagonal", layernorm="unit_wise")
    assert list(both.blocks) == ["emb", "proj", "norm", "head"]
    skipped = KFACPreconditioner(model, embedding="diagonal", skip_layers=["emb", "proj"])
    assert list(skipped.blocks) == ["head"]
    odd = nn.ModuleDict(
        {
            "sparse": nn.Embedding(5, 2, sparse=True),
            "by_freq": nn.Embedding(5, 2, scale_grad_by_freq=True),
            "no_affine": nn.LayerNorm(4, elementwise_affine=False),
            "no_bias": nn.LayerNorm(4, bias=False),
        }
    )
    with pytest.warns(UserWarning, match="no layers were registered"):
        assert not KFACPreconditioner(odd, embedding="diagonal", layernorm="unit_wise").blocks
    for option, value in (("embedding", "dense"), ("layernorm", "on")):
        with pytest.raises(ValueError, match=f"{option} must be one of"):
            KFACPreconditioner(model, **{option: value})


# --------------------------------------------------------------------------- distributed
SETTINGS = {
    "embedding": "diagonal",
    "layernorm": "unit_wise",
    "factor_decay": 0.5,
    "damping": DAMPING,
    "kl_clip": None,
    "factor_dtype": torch.float64,
    "inv_dtype": torch.float64,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "comm-opt/eigen": {"grad_worker_fraction": 1.0},
    "mem-opt/inverse": {"grad_worker_fraction": 0.5, "compute_method": "inverse"},
    "split-factors/eigen": {"colocate_factors": False},
    "split-factors/inverse/factored": {
        "colocate_factors": False,
        "compute_method": "inverse",
        "factored_damping": True,
    },
}
STEPS = 3


def _train(model: nn.Module, pre: KFACPreconditioner, micro_batches) -> list[torch.Tensor]:
    for _ in range(STEPS):
        model.zero_grad()
        for ids, y in micro_batches:
            loss = nn.functional.cross_entropy(model(ids), y) / len(micro_batches)
            loss.backward()
        pre.step()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return [p.detach().clone() for p in model.parameters()]


def _rank_run() -> dict[str, Any]:
    rank = dist.get_rank()
    out: dict[str, Any] = {}
    for label, variant in VARIANTS.items():
        model = nn.parallel.DistributedDataParallel(_token_net())
        pre = KFACPreconditioner(
            model, factor_update_steps=1, inv_update_steps=2, **SETTINGS, **variant
        )
        out[label] = _train(model, pre, [_token_batch(rank)])
        out[label + "/memory"] = pre.memory_bytes()
        out[label + "/bytes"] = pre.comm_bytes()["total"]
    return out


def _expected_footprint(world: int, variant: dict[str, Any]):
    shapes = [
        LayerShape("emb", VOCAB, DIM, diagonal_a=True),
        LayerShape("proj", DIM + 1, 4),
        LayerShape("head", 5, 2),
    ]
    options = {k: v for k, v in variant.items() if k != "factored_damping"}
    options.setdefault("grad_worker_fraction", 1.0)
    fraction = options.pop("grad_worker_fraction")
    return predict_footprint(
        shapes, world, fraction, inv_dtype=torch.float64, factor_dtype=torch.float64,
        grad_dtype=torch.float64,
        unit_wise_channels=[4], **options,
    )  # fmt: skip


def test_two_ranks_match_one_process_and_the_predicted_footprint() -> None:
    results = run_distributed(_rank_run, 2, timeout=240)
    for label, variant in VARIANTS.items():
        model = _token_net()
        pre = KFACPreconditioner(
            model,
            accumulation_steps=2,
            factor_update_steps=1,
            inv_update_steps=2,
            **SETTINGS,
            **{k: v for k, v in variant.items() if k != "grad_worker_fraction"},
        )
        expected = _train(model, pre, [_token_batch(0), _token_batch(1)])
        predicted = _expected_footprint(2, variant)
        for rank, result in enumerate(results):
            where = f"{label}, rank {rank}"
            for got, want in zip(result[label], expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=where)
            assert result[label + "/memory"] == predicted.memory[rank], where
            # steps 0 and 2 update factors and second-order data, step 1 factors only
            steps = [(True, True), (True, False), (True, True)]
            total = {"factor_allreduce": 0, "second_order_broadcast": 0, "grad_broadcast": 0}
            for factor_update, inverse_update in steps:
                step = predicted.step_bytes(
                    rank, factor_update=factor_update, inverse_update=inverse_update
                )
                total = {k: total[k] + step[k] for k in total}
            assert result[label + "/bytes"] == total, where


def test_predictor_counts_the_embedding_diagonal_not_its_square() -> None:
    bert_words = [LayerShape("word_embeddings", 30522, 768, diagonal_a=True)]
    one = predict_footprint(bert_words, 1, 1.0)
    assert one.memory[0]["factors"] == (30522 + 768 * 768) * 4
    assert one.memory[0]["second_order"] == (768 * 768 + 768 * 30522) * 4  # Q_G and the recip
    inverse = predict_footprint(bert_words, 2, 1.0, compute_method="inverse", symmetry_aware=True)
    assert inverse.memory[0]["second_order"] == (30522 + 768 * 768) * 4
    assert inverse.factor_allreduce == (30522 + 768 * 769 // 2) * 4


# --------------------------------------------------------------------------- checkpoints
def test_state_round_trip_continues_identically() -> None:
    settings = {**SETTINGS, "factor_update_steps": 2, "inv_update_steps": 3}
    data = [_token_batch(i) for i in range(7)]

    def train(model, pre, batches):
        for ids, y in batches:
            model.zero_grad()
            nn.functional.cross_entropy(model(ids), y).backward()
            pre.step()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad

    straight = _token_net()
    train(straight, KFACPreconditioner(straight, **settings), data)
    first = _token_net()
    pre = KFACPreconditioner(first, **settings)
    train(first, pre, data[:4])
    state, weights = pre.state_dict(), first.state_dict()
    assert state["layers"]["emb"]["A"].shape == (VOCAB,) and "Q_A" not in state["layers"]["emb"]
    assert set(state["layernorm"]["norm"]) == {"F", "F_inv"}
    resumed = _token_net()
    resumed.load_state_dict(weights)
    pre2 = KFACPreconditioner(resumed, **settings)
    pre2.load_state_dict(state)
    train(resumed, pre2, data[4:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
