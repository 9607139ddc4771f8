"""``DeviceGuard``: fails any op a run on a device would have to wait for or copy for.

Shared by tests/test_device_stages.py (the stages of a training step) and tests/test_device_paths.py
(the distillation's inner loops). ``meta`` alone refuses value reads, but it lets an index tensor on
the CPU through (so does CUDA, with a blocking copy per call): the guard catches that too.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops whose result the host must wait for (a value, or an output shape that depends on values).
_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.is_nonzero, aten.bincount,
          aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.repeat_interleave, aten.item}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _same_device(t, device: torch.device) -> bool:
    """Whether tensor (or device) ``t`` is on ``device`` ("cuda" matches any "cuda:i")."""
    d = torch.device(t.device if isinstance(t, torch.Tensor) else t)
    return d.type == device.type and (device.index is None or d.index == device.index)


class DeviceGuard(TorchDispatchMode):
    """Fails any op of the wrapped code that a run on ``device`` would have to wait for or copy for.

    * an op with inputs on ``device`` and a non-scalar input elsewhere (a CPU index, a CPU label, a
      CPU parameter), except the explicit copies ``aten._to_copy`` / ``aten.copy_`` that move a CPU
      tensor *to* the device;
    * a copy from ``device`` to anywhere else (``.cpu()``, ``.tolist()``, ``.numpy()``);
    * a read of values: ``item``/``float()``/``int()``/``bool()`` (``_local_scalar_dense``),
      ``nonzero``, ``masked_select``, ``bincount``, ``unique``, ``equal``, and boolean-mask indexing.
    Ops with no input on ``device`` (drawing random numbers on the CPU) are allowed.
    """

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.ops = 0  # how many ops ran on the device: a guard that saw nothing guarded nothing

    def _fail(self, func, why: str):
        raise AssertionError(f"DeviceGuard({self.device}): {func} {why}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = [t for t in tensors if _same_device(t, self.device)]
        packet = func.overloadpacket
        if on:
            self.ops += 1
            if packet in _READS:
                self._fail(func, "reads device values back to the host")
            indices = [t for t in args[1] if isinstance(t, torch.Tensor)] if packet in _INDEXING else []
            if any(t.dtype in (torch.bool, torch.uint8) for t in indices):
                self._fail(func, "indexes with a boolean mask (a data-dependent shape: nonzero, a sync)")
            if packet is aten.copy_:
                if _same_device(args[1], self.device) and not _same_device(args[0], self.device):
                    self._fail(func, f"copies a device tensor to {args[0].device}")
            elif packet is aten._to_copy:
                target = kwargs.get("device")
                if target is not None and not _same_device(target, self.device):
                    self._fail(func, f"copies a device tensor to {target}")
            else:
                off = [t for t in tensors if not _same_device(t, self.device) and t.dim() > 0]
                if off:
                    shapes = [(tuple(t.shape), str(t.device)) for t in off]
                    self._fail(func, f"mixes {self.device} tensors with tensors elsewhere {shapes}")
        return func(*args, **kwargs)
