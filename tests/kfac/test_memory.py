"""``memory_bytes(transient=True)["transient_peak"]`` bounds what a K-FAC step really allocates.

Measurement (CPU has no allocator peak counter): a ``TorchDispatchMode`` sees every tensor an
operator returns, follows its storage with a ``weakref.finalize`` (torch keeps one Python object
per storage, so the finalizer runs when the memory is freed) and keeps the running sum of live
bytes and its peak. Only what K-FAC's hooks and ``step()`` allocate is counted (kept until freed,
so batch sums made in the hooks stay counted into ``step()``). Storages that existed before (the
K-FAC state) are adopted: their release counts negative, so replacing a running factor by its
update is net zero. The bound must hold and lie within a factor 2 of the measurement.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kfac_train.kfac import KFACPreconditioner


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.counting = True
        self._tracked: set[int] = set()

    def counted(self, fn):
        """``fn`` with its allocations counted (and only those, once ``counting`` is off)."""

        def wrapper(*args, **kwargs):
            before, self.counting = self.counting, True
            try:
                return fn(*args, **kwargs)
            finally:
                self.counting = before

        return wrapper

    def _track(self, storage: torch.UntypedStorage, sign: int) -> None:
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in self._tracked:
            return
        self._tracked.add(key)
        if sign > 0:
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def adopt(self, tensors) -> None:
        """Follow tensors made before: freeing them lowers the live bytes."""
        for t in tensors:
            self._track(t.untyped_storage(), sign=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.counting:
            return out
        # A view (detach, permute, reshape) of an operand allocates nothing: not counted.
        operands = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        for t in tree_flatten(out)[0]:
            is_cpu = isinstance(t, torch.Tensor) and t.device.type == "cpu"
            if is_cpu and t.untyped_storage().data_ptr() not in operands:
                self._track(t.untyped_storage(), sign=1)
        return out


class ConvBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, bias=False)
        self.head = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.conv2(x)).flatten(1))


def _state_tensors(pre: KFACPreconditioner) -> list[torch.Tensor]:
    tensors = []
    for block in pre.blocks.values():
        tensors += [f.running for f in block.factors()]
        tensors += list(block.method.tensors or ())
    return tensors


def _kfac_peak(model: nn.Module, x, y, pre: KFACPreconditioner) -> int:
    """Peak live bytes of what K-FAC allocates in one training step: in its hooks (forward and
    output-gradient) and in ``step()``."""
    model.zero_grad(set_to_none=True)
    with LiveBytes() as live:
        live.adopt(_state_tensors(pre))
        live.counting = False
        originals = {name: block.on_forward for name, block in pre.blocks.items()}
        for block in pre.blocks.values():
            on_forward = block.on_forward

            def counted_forward(inputs, output, on_forward=on_forward):
                callback = on_forward(inputs, output)
                return None if callback is None else live.counted(callback)

            block.on_forward = live.counted(counted_forward)
        try:
            nn.functional.cross_entropy(model(x), y).backward()
            live.counted(pre.step)()
        finally:
            for name, block in pre.blocks.items():
                block.on_forward = originals[name]
    return live.peak


@pytest.mark.parametrize("batch", [4, 128])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_the_transient_peak_bounds_what_a_step_allocates(method: str, batch: int) -> None:
    torch.manual_seed(0)
    model = ConvBNNet()
    pre = KFACPreconditioner(model, compute_method=method, batchnorm="unit_wise")
    x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))
    _kfac_peak(model, x, y, pre)  # the first step creates the state and sees the input sizes

    measured = _kfac_peak(model, x, y, pre)
    predicted = pre.memory_bytes(transient=True)["transient_peak"]
    assert measured <= predicted <= 2 * measured, (measured, predicted)
