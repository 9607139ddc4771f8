"""How many device operations a computation issues: what each student step asks a GPU to launch.

On a GPU every operation is at least one kernel launch, and when the tensors are small (10 images
of 28 × 28) a launch costs the host more time than the kernel costs the device: the GPU waits.
:func:`count_ops` counts them on any device, from ``torch.profiler``'s record of the host side:

* an eager ATen operation counts once if it works on tensor data (``aten::mul``, ``aten::copy_``, a
  convolution), and the operations it calls in turn do not count (a convolution's own helpers,
  the host-side conversion of a Python number it was given) — the count of a ``TorchDispatchMode``,
  which sees each operation as the dispatcher hands it over; views, reshapes, allocations and other
  metadata operations count nothing (``NO_KERNEL``); an operation that is only a composition of
  others (``CompositeImplicitAutograd`` in every overload, e.g. ``aten::linear``) counts as the
  operations it is made of;
* work the host does for the device — drawing a plan's batches and DSA's ω on the CPU generator, the
  eager DSA's index maps built on the CPU — runs inside :func:`host` and is not counted: on a GPU it
  launches nothing (on a CPU it is the same kind of operation, which is why it must be marked);
* a compiled graph counts each of its generated kernels (``cpp_fused_*`` on a CPU, recorded when the
  graph was compiled with ``torch._inductor.config.cpp.enable_kernel_profile``, which
  ``mttlite.fused`` does) and each library call it makes (a convolution, a matrix product).

Per student step: ``benchmarks/op_count.py`` counts one distillation iteration at two values of N
and divides the difference by their difference, so the fixed work of an iteration drops out.
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

#: The profiler scope of host-side work (``host``): nothing recorded inside it is a device operation.
HOST_SCOPE = "mttlite.host"


def host() -> contextlib.AbstractContextManager:
    """Mark host-side work for :func:`count_ops` (a ``torch.profiler.record_function`` scope; with no
    profiler running it costs about a microsecond)."""
    return record_function(HOST_SCOPE)

#: ATen operations that launch nothing: views, reshapes, allocations, metadata.
NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "view", "_unsafe_view", "view_as", "reshape", "_reshape_alias", "as_strided", "as_strided_", "expand", "expand_as",
    "permute", "t", "transpose", "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind",
    "chunk", "narrow", "alias", "detach", "detach_", "lift_fresh", "empty", "empty_like", "empty_strided", "resize_",
    "flatten", "unflatten", "resolve_conj", "resolve_neg", "movedim", "diagonal", "set_", "result_type", "to",
    "contiguous", "numpy_T", "_nested_tensor_from_mask_left_aligned", "is_nonzero", "requires_grad_", "retain_grad",
    "_has_compatible_shallow_copy_type", "output_nr", "_version", "is_same_size", "align_tensors", "broadcast_tensors",
    "_shape_as_tensor", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "unfold", "indices", "values",
    "real", "imag", "conj", "_conj", "_neg_view", "view_as_real", "view_as_complex", "matrix_H", "mT", "mH",
    "swapaxes", "swapdims", "moveaxis", "_unsafe_split", "_unsafe_split_with_sizes", "tensor_split", "hsplit",
    "vsplit", "dsplit", "split_copy", "atleast_1d", "atleast_2d", "atleast_3d", "type_as", "_to_copy_meta",
))


def _is_kernel(name: str) -> bool:
    """An event that does work on device data (module docstring)."""
    if "cpp_fused" in name or name.startswith("aoti_torch_cpu_") or name.startswith("triton_"):
        return True
    return name.startswith("aten::") and name not in NO_KERNEL and not _composite(name)


@functools.lru_cache(maxsize=None)
def _composite(name: str) -> bool:
    """Whether every overload of the ATen operation ``name`` is CompositeImplicitAutograd (made of others)."""
    try:
        packet = getattr(torch.ops.aten, name.split("::", 1)[1])
        overloads = packet.overloads()
    except (AttributeError, RuntimeError):
        return False
    full = [name if o == "default" else f"{name}.{o}" for o in overloads]
    try:
        return bool(full) and all(torch._C._dispatch_has_kernel_for_dispatch_key(f, "CompositeImplicitAutograd")
                                  for f in full)
    except RuntimeError:
        return False


@dataclass
class OpCount:
    """The operations one call issued: ``total`` and, by name, ``by_name`` (a Counter); ``host``: those run
    inside :func:`host` (host-side work, not in ``total``)."""

    total: int
    by_name: Counter = field(default_factory=Counter)
    host: int = 0

    def top(self, k: int = 10) -> list[tuple[str, int]]:
        return self.by_name.most_common(k)


def count_ops(fn, *args, **kwargs) -> tuple[OpCount, object]:
    """Run ``fn(*args, **kwargs)`` once under ``torch.profiler`` and count its operations (module docstring).
    Returns (the count, fn's result)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    counts, host_counts = Counter(), Counter()
    for ev in prof.events():
        if ev.cpu_parent is None:
            _count(ev, counts, host_counts)
    return OpCount(sum(counts.values()), counts, sum(host_counts.values())), out


def _count(ev, counts: Counter, host_counts: Counter) -> None:
    """Count ``ev`` if it is a kernel, else look inside it (a scope, a composite, a compiled graph's call);
    what runs inside the host scope goes to ``host_counts``."""
    if ev.name == HOST_SCOPE:
        counts = host_counts
    elif _is_kernel(ev.name):
        counts[ev.name] += 1
        return
    for child in ev.cpu_children:
        _count(child, counts, host_counts)


def ops_per_student_step(build, n1: int = 2, n2: int = 4, iters: int = 1) -> tuple[float, OpCount, OpCount]:
    """Operations per student step through the public loop: ``build(N)`` returns a fresh
    :class:`mttlite.distill.Distiller` with N student steps; ``iters`` iterations of each of N = n1 and N = n2
    are counted (after a first one that warms up, and compiles a fused step), and the difference of the
    means is divided by n2 − n1. (Eager DSA's work depends on the op each step draws: average over a few
    iterations to compare configurations.) Returns (ops per step, the last count at n1, the last at n2)."""
    means, last = [], []
    for n in (n1, n2):
        d = build(n)
        d.step()  # warm-up: allocators, and the fused step's compile
        counts = [count_ops(d.step)[0] for _ in range(iters)]
        means.append(sum(c.total for c in counts) / iters)
        last.append(counts[-1])
    return (means[1] - means[0]) / (n2 - n1), last[0], last[1]
