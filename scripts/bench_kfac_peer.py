"""Side by side with the peer: this project's K-FAC against kfac-pytorch on the same work.

    python scripts/bench_kfac_peer.py                    # needs `kfac-pytorch` importable
    /tmp/peer/bin/python scripts/bench_kfac_peer.py      # e.g. from a scratch virtualenv

kfac-pytorch is *not* a project dependency and nothing here installs it; make it importable
first, e.g. ``python -m venv /tmp/peer --system-site-packages && /tmp/peer/bin/pip install
kfac-pytorch``. Without it the script says so and exits with status 2.

Each measurement runs in a fresh process (``--worker``): one model, one K-FAC configuration of
one implementation ("ours" or "peer"), stepped interleaved with plain SGD-momentum in that same
process exactly as in ``scripts/bench_kfac.py`` (same models, synthetic inputs, hyperparameters
and timing). The parent alternates the implementations (ours, peer, then peer, ours, ...) over
``--rounds`` rounds, so load changes on a shared machine hit both alike, and prints medians over
rounds: the amortised step as a ratio to SGD, the *overhead* (amortised step minus SGD's) and the
peer's overhead divided by ours, and the median ``pre.step()`` time of each kind of step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_kfac  # noqa: E402  (the sibling script: models, runner, timing)

IMPLEMENTATIONS = ("ours", "peer")
CONFIGS = ("eigen 1/1", "eigen 10/100", "inverse 1/1", "inverse 10/100")
#: ``--configs`` may also name the eigen bfloat16 variants ("eigen 10/100 bf16"): ours with
#: inv_dtype and precondition_dtype bfloat16, the peer with inv_dtype bfloat16 (its
#: preconditioning products run in inv_dtype, so the work is the same); float32 factors in both.
BF16_CONFIGS = tuple(f"{name} bf16" for name in CONFIGS if name.startswith("eigen"))


def peer_available() -> bool:
    return importlib.util.find_spec("kfac") is not None and (
        importlib.util.find_spec("kfac.preconditioner") is not None
    )


def _peer_preconditioner(model, config: bench_kfac.Configuration):
    from kfac.preconditioner import KFACPreconditioner as PeerPreconditioner

    factor_every, inverse_every = config.intervals
    hyper = dict(bench_kfac.KFAC_HYPERPARAMETERS)
    hyper.pop("conv_factor", None)
    hyper.pop("grad_scaling", None)  # the peer has only the "mean" convention
    if config.bf16_kfac:
        hyper.update(inv_dtype=torch.bfloat16)
    return PeerPreconditioner(
        model,
        # The peer folds its factors in the backward hook by default; here it folds them in
        # step(), as this project does, so the step() phases compare the same work.
        update_factors_in_hook=False,
        factor_update_steps=factor_every,
        inv_update_steps=inverse_every,
        compute_method=config.compute_method,
        **hyper,
    )


def worker(model_name: str, config_name: str, implementation: str, args) -> dict:
    """Run SGD and one K-FAC configuration interleaved; return the figures as a dict."""
    torch.set_num_threads(args.threads)
    workload = bench_kfac.WORKLOADS[model_name]
    config = {c.name: c for c in bench_kfac.all_configurations()}[config_name]
    device = torch.device("cpu")
    steps = args.dense_steps if config.intervals == (1, 1) else args.steps
    sgd = bench_kfac.Runner(workload, bench_kfac.configurations()[0], args.steps, 2, device)
    if implementation == "ours":
        kfac = bench_kfac.Runner(workload, config, steps, 2, device)
    else:  # same model, inputs and optimizer; the peer's preconditioner instead of ours
        kfac = bench_kfac.Runner(workload, bench_kfac.configurations()[0], steps, 2, device)
        kfac.config = config
        kfac.pre = _peer_preconditioner(kfac.model, config)
    bench_kfac.run_interleaved([sgd, kfac])
    sgd_result = bench_kfac.Result(sgd.config, sgd.step_seconds, 0, sgd.phases)
    kfac_result = bench_kfac.Result(config, kfac.step_seconds, 0, kfac.phases)
    return {
        "sgd": sgd_result.amortised,
        "kfac": kfac_result.amortised,
        "pre_step": {k: statistics.median(v["pre.step"]) for k, v in kfac.phases.items()},
    }


def parent(args) -> None:
    figures: dict[tuple, list[dict]] = {}
    for model_name in args.models:
        for config_name in args.configs:
            for round_index in range(args.rounds):
                order = IMPLEMENTATIONS if round_index % 2 == 0 else IMPLEMENTATIONS[::-1]
                for implementation in order:
                    command = [
                        sys.executable,
                        __file__,
                        "--worker",
                        model_name,
                        config_name,
                        implementation,
                        "--threads",
                        str(args.threads),
                        "--steps",
                        str(args.steps),
                        "--dense-steps",
                        str(args.dense_steps),
                    ]
                    out = subprocess.run(command, capture_output=True, text=True, check=True)
                    key = (model_name, config_name, implementation)
                    figures.setdefault(key, []).append(json.loads(out.stdout.splitlines()[-1]))
    print(f"medians over {args.rounds} round(s), {args.threads} CPU thread(s)")
    print(
        f"{'model':<9} {'config':<19} {'ours xSGD':>9} {'peer xSGD':>9} "
        f"{'overhead ms ours/peer':>22} {'peer/ours':>9}  pre.step ms by kind (ours/peer)"
    )
    for model_name in args.models:
        for config_name in args.configs:
            med = {}
            for impl in IMPLEMENTATIONS:
                runs = figures[(model_name, config_name, impl)]
                sgd = statistics.median(r["sgd"] for r in runs)
                kfac = statistics.median(r["kfac"] for r in runs)
                kinds = {
                    k: statistics.median(r["pre_step"][k] for r in runs)
                    for k in runs[0]["pre_step"]
                }
                med[impl] = (kfac / sgd, (kfac - sgd) * 1e3, kinds)
            phases = ", ".join(
                f"{k} {med['ours'][2][k] * 1e3:.0f}/{med['peer'][2].get(k, float('nan')) * 1e3:.0f}"
                for k in med["ours"][2]
            )
            print(
                f"{model_name:<9} {config_name:<19} {med['ours'][0]:>9.2f} {med['peer'][0]:>9.2f} "
                f"{med['ours'][1]:>10.0f}/{med['peer'][1]:<11.0f} "
                f"{med['peer'][1] / med['ours'][1]:>9.2f}  {phases}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,mlp")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"from {CONFIGS + BF16_CONFIGS}"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="SGD and (10, 100) steps")
    parser.add_argument("--dense-steps", type=int, default=8, help="(1, 1) steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "CONFIG", "IMPL"))
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(args.configs) - set(CONFIGS + BF16_CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {CONFIGS + BF16_CONFIGS}")
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    if not peer_available():
        print(
            "error: kfac-pytorch is not importable; install it into a scratch virtualenv "
            "(python -m venv /tmp/peer --system-site-packages && /tmp/peer/bin/pip install "
            "kfac-pytorch) and run this script with /tmp/peer/bin/python",
            file=sys.stderr,
        )
        raise SystemExit(2)
    parent(args)


if __name__ == "__main__":
    main()
