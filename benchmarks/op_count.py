"""Device operations per student step, through the public loop (``Distiller.step``), per path and mode.

    python benchmarks/op_count.py                       # CPU: ConvNet-3 width 32, IPC 1 (the classroom size)
    python benchmarks/op_count.py --device cuda         # a GPU: also kernel launches and host / GPU ms per step
    python benchmarks/op_count.py --width 4 --steps 1 2 # toy size (CI)

Each row counts ``--iters`` distillation iterations at N = n1 and at N = n2 (after a warm-up iteration that
compiles the fused step) and divides the difference of the means by n2 − n1: what one more student step costs, the
iteration's fixed work (the expert snapshots, the updates of the pixels and α, the one host read)
dropping out. What counts as an operation: ``mttlite.opcount`` (an ATen operation that touches data,
a compiled kernel, a library call; views and allocations are free). On CUDA the profiler also gives
the kernels the GPU ran, the host's launch calls (a replayed CUDA graph is one), and the host and GPU
milliseconds per step. ``--time-steps N`` adds the seconds of a whole iteration at that N. Data are random
tensors of the right shape; 1×28×28 images, 10 classes, DSA.
"""
from __future__ import annotations

import argparse
import statistics
from collections import Counter
import sys
import time

from common import hardware, synthetic_distiller

import torch  # noqa: E402

from mttlite.opcount import OpCount, count_ops  # noqa: E402


def cuda_profile(d, iters: int = 3) -> dict:
    """Kernels, host launch calls, host ms and GPU ms of ``iters`` iterations of ``d`` (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            d.step()
        torch.cuda.synchronize()
        host = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch",
                                                       "cudaLaunchKernelExC", "cuLaunchKernelEx")]
    gpu_us = sum(e.device_time for e in kernels)
    return {"kernels": len(kernels) / iters, "launches": len(launches) / iters, "host_ms": 1000 * host / iters,
            "gpu_ms": gpu_us / 1000 / iters}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--steps", type=int, nargs=2, default=[2, 4], metavar=("N1", "N2"))
    p.add_argument("--paths", nargs="+", default=["eager", "fused"])
    p.add_argument("--modes", nargs="+", default=["exact", "unroll"])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--iters", type=int, default=4, help="iterations counted at each N (eager DSA's ops vary with the op drawn)")
    p.add_argument("--time-steps", type=int, default=0, help="also time iterations of this N (0: no)")
    p.add_argument("--time-iters", type=int, default=3)
    a = p.parse_args(argv)
    n1, n2 = a.steps
    print(f"# operations per student step — {hardware()}; ConvNet-3 width {a.width}, IPC {a.ipc}, 1x28x28, DSA, "
          f"N = {n1} vs {n2}, device {a.device}, precision {a.precision}")
    cuda = a.device.startswith("cuda")
    head = ("| path | mode | ops per student step | host-side ops per step (not counted) | ops per iteration at N = {} "
            "| most frequent per step |".format(n2))
    if cuda:
        head += " kernels per step | launches per step | host ms per step | GPU ms per step |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for path in a.paths:
        for mode in a.modes:
            counts, prof, hosts = [], {}, []
            for n in (n1, n2):
                d = synthetic_distiller(path, mode, n, width=a.width, ipc=a.ipc, device=a.device, precision=a.precision)
                d.step()  # warm-up (and the fused step's compile)
                runs = [count_ops(d.step)[0] for _ in range(a.iters)]  # eager DSA's ops depend on the op drawn
                counts.append(OpCount(sum(c.total for c in runs) / a.iters,
                                      sum((c.by_name for c in runs), Counter())))
                hosts.append(sum(c.host for c in runs) / a.iters)
                if cuda:
                    prof[n] = cuda_profile(d)
            per = (counts[1].total - counts[0].total) / (n2 - n1)
            diff = counts[1].by_name - counts[0].by_name
            top = ", ".join(f"{k.replace('aten::', '')} {v / (n2 - n1) / a.iters:.3g}" for k, v in diff.most_common(4))
            host = (hosts[1] - hosts[0]) / (n2 - n1)
            row = f"| {path} | {mode} | {per:.0f} | {host:.0f} | {counts[1].total:.0f} | {top} |"
            if cuda:
                row += "".join(f" {(prof[n2][k] - prof[n1][k]) / (n2 - n1):.{1 if 'ms' in k else 0}f} |"
                               for k in ("kernels", "launches", "host_ms", "gpu_ms"))
            print(row, flush=True)
    if a.time_steps:
        print(f"\n| path | mode | N | median s/iter (of {a.time_iters}) | compile s |")
        print("|---|---|---|---|---|")
        for path in a.paths:
            for mode in a.modes:
                d = synthetic_distiller(path, mode, a.time_steps, width=a.width, ipc=a.ipc, device=a.device,
                                        precision=a.precision)
                d.step()  # warm-up (the compile is in d.compile_seconds)
                times = []
                for _ in range(a.time_iters):
                    t0 = time.perf_counter()
                    d.step()  # ends in the iteration's one host read: the device is done
                    times.append(time.perf_counter() - t0)
                print(f"| {path} | {mode} | {a.time_steps} | {statistics.median(times):.4f} | {d.compile_seconds:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
