#!/usr/bin/env python3
"""BERT pretraining throughput: LAMB vs K-FAC + LAMB in one process, and K-FAC's memory.

    # CPU: the 2-layer BERT on the CPython-text demo corpus
    python scripts/bench_bert.py --model bert_tiny --micro-batch 32 --seq 128 --steps 20
    # GPU: BERT-Large at a small micro-batch (phase 1 / phase 2 shapes), fp16 as in KAISA
    python scripts/bench_bert.py --model bert_large --device cuda --precision fp16 \\
        --micro-batch 16 --seq 128 --max-predictions 20 --steps 30
    python scripts/bench_bert.py --model bert_large --device cuda --precision fp16 \\
        --micro-batch 8 --seq 512 --max-predictions 80 --steps 30
    # memory of K-FAC state for BERT-Large without running it (model on the meta device)
    python scripts/bench_bert.py --model bert_large --memory-only

Per optimizer: mean step time over ``--steps`` timed steps (after ``--warmup`` untimed ones;
K-FAC updates factors every step and its eigendecompositions every ``--inv-every`` steps, so
use a multiple of it), tokens per second (sequences × sequence length / step time), and the
ratio to LAMB. Memory: bytes of K-FAC state (``KFACPreconditioner.memory_bytes()``) against the
bytes of parameters + LAMB state, and on CUDA the peak allocated memory of each run. Batches
are random full-length sentence pairs masked like real data (``--data synthetic``, default) or
batches of the demo corpus (``--data demo``).

``--memory-only`` builds the model on the meta device (no memory, no compute) and reports the
bytes of parameters, LAMB state (two fp32 moments per parameter), K-FAC's running factors
(``memory_bytes()``, fp32) and its eigen data (``Q_A``, ``Q_G`` and the ``g × a`` reciprocal per
layer, in fp32 and in KAISA's fp16; all of it on every rank under COMM-OPT, about half under
HYBRID-OPT with 1/2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kfac_train.config import OptimConfig  # noqa: E402
from kfac_train.kfac import KFACPreconditioner  # noqa: E402
from kfac_train.models.bert import KFAC_SKIP_LAYERS, build_bert_pretraining  # noqa: E402
from kfac_train.optim.first_order import build_optimizer  # noqa: E402
from kfac_train.tasks.masked_lm import pretraining_losses  # noqa: E402


def synthetic_batches(args: argparse.Namespace, vocab_size: int) -> Iterator[dict[str, Any]]:
    from kfac_train.models.bert import BertTinyConfig
    from kfac_train.tasks.masked_lm import MaskedLMConfig, MaskedLMTask

    task = MaskedLMTask(
        MaskedLMConfig(
            synthetic_seq_length=args.seq, synthetic_max_predictions=args.max_predictions
        ),
        None,
    )  # type: ignore[arg-type]  # synthetic batches need no context
    model_cfg = BertTinyConfig(vocab_size=vocab_size)
    generator = torch.Generator().manual_seed(0)
    while True:
        yield task.synthetic_batch(model_cfg, args.micro_batch, generator)


def demo_batches(args: argparse.Namespace) -> tuple[Iterator[dict[str, Any]], int]:
    from kfac_train.data.bert_masking import MaskedLMCollator
    from kfac_train.data.bert_options import BertDemoDataConfig, special_ids_of
    from kfac_train.data.bert_pretraining import load_pretraining_split, read_pretraining_meta

    folder = BertDemoDataConfig(max_seq_length=args.seq).prepared_dir()
    vocab_size = read_pretraining_meta(folder)["vocab_size"]
    dataset = load_pretraining_split(folder, "train", max_seq_length=args.seq)
    collate = MaskedLMCollator(
        vocab_size=vocab_size,
        special=special_ids_of(folder / "vocab.txt"),
        max_seq_length=args.seq,
        max_predictions=args.max_predictions,
        generator=torch.Generator().manual_seed(0),
    )

    def batches() -> Iterator[dict[str, Any]]:
        while True:
            for start in range(0, len(dataset) - args.micro_batch + 1, args.micro_batch):
                yield collate([dataset[i] for i in range(start, start + args.micro_batch)])

    return batches(), vocab_size


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run(
    args: argparse.Namespace, use_kfac: bool, batches: list[dict[str, Any]], vocab_size: int
) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_bert_pretraining(args.model, vocab_size).to(device)
    optimizer = build_optimizer(
        model,
        OptimConfig(
            base="lamb",
            lr=1e-3,
            weight_decay=0.01,
            eps=1e-6,
            exclude_norm_and_bias_from_weight_decay=True,
        ),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    pre = None
    if use_kfac:
        pre = KFACPreconditioner(
            model,
            factor_update_steps=1,
            inv_update_steps=args.inv_every,
            damping=0.003,
            factor_decay=0.95,
            kl_clip=0.001,
            lr=lambda step: optimizer.param_groups[0]["lr"],
            skip_layers=KFAC_SKIP_LAYERS,
            grad_scaler=scaler if scaler.is_enabled() else None,
            inv_dtype=torch.float16 if args.fp16_inverses else torch.float32,
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(batch: dict[str, Any]) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            sums = pretraining_losses(model, batch)
            loss = (
                sums["mlm_loss_sum"] / sums["mlm_count"] + sums["nsp_loss_sum"] / sums["nsp_count"]
            )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if pre is not None:
            pre.step()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync()
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        step(batches[(args.warmup + i) % len(batches)])
        sync()
        times.append(time.perf_counter() - start)
    params = tensor_bytes(model.parameters())
    opt_state = tensor_bytes(v for state in optimizer.state.values() for v in state.values())
    out = {
        "step_time": statistics.mean(times),
        "step_time_median": statistics.median(times),
        "tokens_per_s": args.micro_batch * args.seq / statistics.mean(times),
        "param_bytes": params,
        "optimizer_bytes": opt_state,
        "kfac_bytes": sum(pre.memory_bytes().values()) if pre is not None else 0,
    }
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    if pre is not None:
        pre.remove_hooks()
    return out


def memory_only(args: argparse.Namespace) -> None:
    """K-FAC state of ``args.model`` against parameters + LAMB state, on the meta device."""
    with torch.device("meta"):
        model = build_bert_pretraining(args.model, args.vocab_size)
    pre = KFACPreconditioner(model, skip_layers=KFAC_SKIP_LAYERS)
    params = tensor_bytes(model.parameters())
    lamb = 2 * sum(p.numel() * 4 for p in model.parameters())
    factors = pre.memory_bytes()["factors"]
    eigen_elements = 0
    for name in pre.layer_names:
        layer = model.get_submodule(name)
        a = layer.in_features + (layer.bias is not None)
        g = layer.out_features
        eigen_elements += a * a + g * g + g * a
    base = params + lamb
    print(
        f"{args.model}: {len(pre.layer_names)} K-FAC layers; parameters "
        f"{params / 2**20:.1f} MiB + LAMB state {lamb / 2**20:.1f} MiB = {base / 2**20:.1f} MiB"
    )
    print(f"  running factors (fp32) {factors / 2**20:9.1f} MiB {100 * factors / base:6.1f}%")
    for label, size in (("fp32", 4), ("fp16", 2)):
        eig = eigen_elements * size
        print(f"  eigen data ({label})    {eig / 2**20:9.1f} MiB {100 * eig / base:6.1f}%")
    pre.remove_hooks()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="bert_tiny", choices=["bert_tiny", "bert_base", "bert_large"]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--micro-batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--max-predictions", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=30522, help="synthetic data only")
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "demo"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--inv-every", type=int, default=10, help="K-FAC inverse interval")
    parser.add_argument("--fp16-inverses", action="store_true", help="KAISA's inv_dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--memory-only", action="store_true", help="only K-FAC's memory, on the meta device"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        memory_only(args)
        return 0
    if args.data == "demo":
        stream, vocab_size = demo_batches(args)
    else:
        vocab_size = args.vocab_size
        stream = synthetic_batches(args, vocab_size)
    batches = [next(stream) for _ in range(min(args.warmup + args.steps, 50))]
    print(
        f"{args.model} on {args.device} ({args.precision}, {torch.get_num_threads()} threads): "
        f"micro-batch {args.micro_batch} x {args.seq} tokens, {args.data} data, vocabulary "
        f"{vocab_size}; {args.steps} timed steps after {args.warmup}; K-FAC inverse every "
        f"{args.inv_every}"
    )
    results = {
        name: run(args, name == "kfac+lamb", batches, vocab_size) for name in ("lamb", "kfac+lamb")
    }
    base = results["lamb"]
    print(
        f"{'optimizer':<10} {'step s':>9} {'median s':>9} {'tokens/s':>10} {'vs LAMB':>8}"
        + (f" {'peak MiB':>9}" if "peak_bytes" in base else "")
    )
    for name, r in results.items():
        line = (
            f"{name:<10} {r['step_time']:>9.4f} {r['step_time_median']:>9.4f} "
            f"{r['tokens_per_s']:>10.0f} {base['step_time'] / r['step_time']:>8.2f}"
        )
        if "peak_bytes" in r:
            line += f" {r['peak_bytes'] / 2**20:>9.0f}"
        print(line)
    k = results["kfac+lamb"]
    model_bytes = k["param_bytes"] + k["optimizer_bytes"]
    print(
        f"K-FAC state {k['kfac_bytes'] / 2**20:.1f} MiB = "
        f"{100 * k['kfac_bytes'] / model_bytes:.1f}% of parameters + LAMB state "
        f"({model_bytes / 2**20:.1f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
