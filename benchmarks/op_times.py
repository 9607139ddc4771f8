"""Where one distillation iteration spends its time: every aten op timed, grouped by op and shapes.

    python benchmarks/op_times.py [--mode exact|unroll] [--layers mttlite|torch] [--precision fp32|bf16] [--top 30]
    py-spy record --native -- python benchmarks/op_times.py --mode unroll --no-dispatch --iters 3

The reference configuration of issue 4 (1x28x28, IPC 10, width 128, N = 10, DSA). After one
warm-up iteration, one iteration runs plain (its wall-clock time is printed) and one under a
``TorchDispatchMode`` that times every aten op it sees (composite ops appear as the ops they
decompose into). The table lists the ``--top`` op/shape groups by total time, then the totals per
layer kind. ``--layers torch`` swaps torch's GroupNorm / AvgPool2d back in
(``mttlite.layers.torch_layers``). ``--precision bf16`` runs the student under bf16 autocast
(``mttlite.precision``), so the table shows which ops run in bf16 and which stay fp32 (the
``dtypes`` column). ``--no-dispatch --iters K`` only runs K plain iterations, for
an outside profiler.
"""
import argparse
import time
from collections import defaultdict

import torch
from common import hardware, malloc_mode
from torch.utils._python_dispatch import TorchDispatchMode

from mttlite.augment import DSA_STRATEGY
from mttlite.layers import torch_layers
from mttlite.meta_gradient import meta_gradient
from mttlite.networks import get_network
from mttlite.params import ParamSpec
from mttlite.perf import keep_freed_memory
from mttlite.student import make_plan

# aten ops by the layer they belong to (forward, backward and double backward)
KINDS = {
    "convolution": ("convolution", "convolution_backward"),
    "pooling (with every stack)": ("avg_pool2d", "avg_pool2d_backward", "stack"),
    "instance norm (torch's kernels)": ("native_group_norm", "native_group_norm_backward"),
    "ReLU": ("relu_", "threshold_backward"),
}


class OpTimer(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.stats = defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        shapes = tuple(tuple(a.shape) for a in tensors)
        dtypes = "/".join(sorted({str(a.dtype).removeprefix("torch.") for a in tensors}))
        entry = self.stats[(func.overloadpacket.__name__, shapes, dtypes)]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="exact", choices=["exact", "unroll"])
    p.add_argument("--layers", default="mttlite", choices=["mttlite", "torch"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--no-dispatch", action="store_true")
    p.add_argument("--iters", type=int, default=1)
    a = p.parse_args()
    if malloc_mode() == "keep":
        keep_freed_memory()
    torch.manual_seed(0)
    net = get_network("convnet", 1, 10, (28, 28), width=128)
    if a.layers == "torch":
        net = torch_layers(net)
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(10)
    theta = spec.flatten(dict(net.named_parameters())).detach()
    target = theta + 0.01 * torch.randn(theta.shape, generator=g)

    def iteration() -> float:
        plan = make_plan(100, a.steps, None, g)
        t0 = time.perf_counter()
        meta_gradient(a.mode, net, spec, theta, target, x, y, torch.tensor(0.01), plan, DSA_STRATEGY,
                      precision=a.precision)
        return time.perf_counter() - t0

    iteration()  # warm-up
    print(f"# op times — {hardware()}; {a.mode}, {a.layers} layers, {a.precision}, N={a.steps}, allocator {malloc_mode()}")
    for _ in range(a.iters):
        print(f"plain iteration: {iteration():.2f} s")
    if a.no_dispatch:
        raise SystemExit(0)
    timer = OpTimer()
    with timer:
        timed = iteration()
    total = sum(t for _, t in timer.stats.values())
    print(f"timed iteration: {timed:.2f} s, of which inside aten ops: {total:.2f} s\n")
    print("| s | calls | op | input shapes | dtypes |")
    print("|---|---|---|---|---|")
    for (op, shapes, dtypes), (n, t) in sorted(timer.stats.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"| {t:.3f} | {n} | {op} | {' '.join(str(list(s)) for s in shapes)} | {dtypes} |")
    print("\n| layer kind | s | % of the ops' time |")
    print("|---|---|---|")
    for kind, ops in KINDS.items():
        t = sum(t for (op, _, _), (_, t) in timer.stats.items() if op in ops)
        print(f"| {kind} | {t:.2f} | {100 * t / total:.0f} |")
