"""Milliseconds per call: mttlite.layers against torch's layers, and the alternatives that lost.

    python benchmarks/layer_kernels.py [--batch 100] [--width 128] [--size 32 16] [--repeats 10]

On a (batch, width, size, size) map, as in ConvNet-3 on 1x28x28 (the first conv pads to 32 x 32):

- instance norm: forward; forward + backward; forward + backward + double backward (the gradient of
  a random linear function of the first derivatives), for ``nn.GroupNorm(C, C)`` and
  ``mttlite.layers.instance_norm``; and ``torch.var_mean`` over H x W against ``native_group_norm``;
- 2x2 average pooling: ``avg_pool2d`` / ``avg_pool2d_backward`` against mttlite's strided sums /
  upsampling, and pooling by reshape + sum.

Freed memory is kept for reuse (mttlite.perf.keep_freed_memory), as in the distillation benchmarks,
unless MTTLITE_MALLOC=default. Best of ``--repeats`` timings after two warm-up calls.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from common import hardware, malloc_mode

from mttlite.layers import _pool_sum, _upsample, instance_norm
from mttlite.perf import keep_freed_memory


def best_ms(fn, repeats: int) -> float:
    fn(), fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def norm_rows(x, w, b, repeats):
    g = torch.Generator().manual_seed(1)
    gy, v = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    rows = []
    for name, norm in [("nn.GroupNorm(C, C)", lambda x, w, b: F.group_norm(x, x.shape[1], w, b, 1e-5)),
                       ("mttlite.layers.instance_norm", instance_norm)]:
        def fwd_bwd():
            return torch.autograd.grad((norm(x, w, b) * gy).sum(), (x, w, b))

        def fwd_bwd_dbl():
            dx, dw, db = torch.autograd.grad((norm(x, w, b) * gy).sum(), (x, w, b), create_graph=True)
            return torch.autograd.grad((dx * v).sum() + dw.sum() + db.sum(), (x, w), allow_unused=True)

        with torch.no_grad():
            f = best_ms(lambda: norm(x, w, b), repeats)
        rows.append((f"instance norm, {name}", f, best_ms(fwd_bwd, repeats), best_ms(fwd_bwd_dbl, repeats)))
    xd = x.detach()
    rows.append(("instance norm statistics, torch.var_mean over H×W", best_ms(
        lambda: torch.var_mean(xd, dim=(-2, -1), correction=0), repeats), None, None))
    rows.append(("instance norm statistics, native_group_norm", best_ms(
        lambda: torch.native_group_norm(xd, None, None, *xd.shape[:2], xd[0, 0].numel(), xd.shape[1], 1e-5),
        repeats), None, None))
    return rows


def pool_rows(x, repeats):
    xd = x.detach()
    gd = torch.randn(*xd.shape[:2], xd.shape[2] // 2, xd.shape[3] // 2)
    B, C, H, W = xd.shape
    return [
        ("pooling forward, F.avg_pool2d", best_ms(lambda: F.avg_pool2d(xd, 2), repeats), None, None),
        ("pooling forward, mttlite (two strided sums)", best_ms(lambda: _pool_sum(xd), repeats), None, None),
        ("pooling forward, reshape + sum over two axes", best_ms(
            lambda: xd.view(B, C, H // 2, 2, W // 2, 2).sum((3, 5)), repeats), None, None),
        ("pooling backward, avg_pool2d_backward", best_ms(lambda: torch.ops.aten.avg_pool2d_backward(
            gd, xd, [2, 2], [2, 2], [0, 0], False, True, None), repeats), None, None),
        ("pooling backward, mttlite (two stacks)", best_ms(lambda: _upsample(gd), repeats), None, None),
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--size", type=int, nargs="+", default=[32, 16])
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    if malloc_mode() == "keep":
        keep_freed_memory()
    print(f"# layer kernels — {hardware()}; {torch.get_num_threads()} threads, allocator {malloc_mode()}")
    print("| map | op | forward ms | forward + backward ms | + double backward ms |")
    print("|---|---|---|---|---|")
    for size in a.size:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.batch, a.width, size, size, generator=g).requires_grad_()
        w = (1 + 0.1 * torch.randn(a.width, generator=g)).requires_grad_()
        b = (0.1 * torch.randn(a.width, generator=g)).requires_grad_()
        for name, *ms in norm_rows(x, w, b, a.repeats) + pool_rows(x, a.repeats):
            cells = " | ".join("" if m is None else f"{m:.1f}" for m in ms)
            print(f"| {a.batch}×{a.width}×{size}×{size} | {name} | {cells} |", flush=True)
