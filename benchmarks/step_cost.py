"""The cost model behind ``step="auto"`` on a CPU: seconds per student step, eager and fused, against size.

    python benchmarks/step_cost.py                 # the sizes below, ~10 minutes on 2 cores
    python benchmarks/step_cost.py --quick         # one toy size (CI)

For each ConvNet-3 size (width, IPC; 1×28×28, all images every step, DSA, the exact mode) it times
``Distiller.step`` with the eager and the fused student step (median of ``--iters`` iterations of N
steps, after a warm-up that compiles) and the compile itself, in one process per size, and prints,
against F = the forward GFLOP of one batch (``mttlite.fused.forward_gflop``), the constants
``mttlite.fused``'s ``CPU_STEP_SAVING`` (eager − fused per step, interpolated in log F) and ``CPU_COMPILE_S`` hold. "auto" picks fused
when iterations × N × (eager − fused) exceeds the compile time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from common import hardware, spawn

SIZES = [(8, 1), (32, 1), (32, 10), (64, 10), (128, 10)]


def measure(width: int, ipc: int, steps: int, iters: int) -> dict:
    """One size: eager and fused seconds per step, the fused compile's seconds, F."""
    from common import synthetic_distiller

    from mttlite.fused import forward_gflop
    from mttlite.perf import keep_freed_memory

    keep_freed_memory()
    out = {"width": width, "ipc": ipc, "steps": steps}
    for path in ("eager", "fused"):
        d = synthetic_distiller(path, "exact", steps, width=width, ipc=ipc)
        out["gflop"] = forward_gflop(d.model, (1, 28, 28), 10 * ipc)
        t0 = time.perf_counter()
        d.step()
        first = time.perf_counter() - t0
        if path == "fused":
            out["compile_s"] = d.compile_seconds
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            d.step()
            times.append(time.perf_counter() - t0)
        out[f"{path}_s_per_step"] = statistics.median(times) / steps
        out[f"{path}_first_s"] = first
    return out


def main(argv=None) -> int:
    if "--worker" in sys.argv:
        cfg = json.loads(sys.argv[sys.argv.index("--worker") + 1])
        print(json.dumps(measure(**cfg)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one toy size (width 4), one iteration")
    a = p.parse_args(argv)
    sizes = [(4, 1)] if a.quick else SIZES
    steps, iters = (2, 1) if a.quick else (a.steps, a.iters)
    print(f"# seconds per student step, exact mode — {hardware()}; ConvNet-3, 1x28x28, DSA, N = {steps}")
    print("| width | IPC | F (GFLOP per batch forward) | eager s/step | fused s/step | fused ÷ eager | compile s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for width, ipc in sizes:
        r = spawn(__file__, dict(width=width, ipc=ipc, steps=steps, iters=iters))
        if "error" in r:
            print(f"| {width} | {ipc} | error: {r['error']} | | | | |", flush=True)
            continue
        rows.append(r)
        print(f"| {width} | {ipc} | {r['gflop']:.3f} | {r['eager_s_per_step']:.4f} | {r['fused_s_per_step']:.4f} | "
              f"{r['fused_s_per_step'] / r['eager_s_per_step']:.2f} | {r['compile_s']:.1f} |", flush=True)
    if rows:
        pts = ", ".join(f"({r['gflop']:.3f}, {r['eager_s_per_step'] - r['fused_s_per_step']:.4f})" for r in rows)
        print(f"\nCPU_STEP_SAVING = ({pts})  # (F GFLOP, eager − fused s/step)")
        print(f"CPU_COMPILE_S = {max(r['compile_s'] for r in rows):.0f}  # the longest compile measured")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
