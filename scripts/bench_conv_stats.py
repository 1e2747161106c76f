"""Time the Conv2d input factor: the patch-free statistic (``conv_stats``) against the patch rows.

    PYTHONPATH=. python scripts/bench_conv_stats.py --batch 128 --threads 2 --repeats 5

For ResNet-20's convolution shapes (CIFAR-size inputs) it times, in one process, the statistic
K-FAC forms on a factor-update step both ways: ``aᵀa / N`` from the materialised patch rows (the
path before issue 12) and :func:`kfac_train.kfac.conv_stats.patch_second_moment` (shifted
products of the padded input), prints the medians, the speed-up and the largest difference
between the two results (they are the same statistic).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from kfac_train.kfac import precision
from kfac_train.kfac.layers import Conv2dHandler

#: (in channels, out channels, input side, stride): ResNet-20's 3x3 convolutions.
SHAPES = [(16, 16, 32, 1), (32, 32, 16, 1), (64, 64, 8, 1), (16, 32, 32, 2), (32, 64, 16, 2)]


def median_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    handler = Conv2dHandler()
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, batch {args.batch}")
    print("conv (in->out @ side, stride)   patch rows ms   conv_stats ms   speed-up   max diff")
    for c_in, c_out, side, stride in SHAPES:
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        x = torch.randn(args.batch, c_in, side, side)

        def rows(conv=conv, x=x) -> torch.Tensor:
            return precision.gram_mean(handler.input_rows(conv, x), torch.float32)

        def shifted(conv=conv, x=x) -> torch.Tensor:
            return handler.input_statistic(conv, x, torch.float32)[0]

        old, new = median_seconds(rows, args.repeats), median_seconds(shifted, args.repeats)
        diff = float((rows() - shifted()).abs().max())
        label = f"{c_in}->{c_out} @ {side}, stride {stride}"
        print(f"{label:<31} {old * 1e3:>13.1f} {new * 1e3:>15.1f} {old / new:>10.2f} {diff:>10.1e}")


if __name__ == "__main__":
    main()
