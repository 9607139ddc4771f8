"""Peak memory and seconds per iteration vs N, naive unroll vs the exact constant-memory adjoint.

    python benchmarks/memory_vs_steps.py                      # CPU: N in 5 10 20 40, 1x28x28, IPC 10
    python benchmarks/memory_vs_steps.py --device cuda --steps 5 10 20 40 80 --channel 3 --im 32
    python benchmarks/memory_vs_steps.py --modes exact exact+fused --precision bf16   # the fused step

Prints a markdown table and writes runs/bench/memory_vs_steps[_<device>]_<shape>_ipc<ipc>[_malloc-default].json.
Freed memory is kept for reuse (mttlite.perf.keep_freed_memory), which makes RSS depend on the
allocator's history; MTTLITE_MALLOC=default measures with glibc's defaults, which give freed
memory back, so peak RSS then tracks what is live.
"""
import argparse
import sys

from common import hardware, malloc_mode, run_worker_from_argv, save, spawn

if __name__ == "__main__":
    if "--worker" in sys.argv:
        run_worker_from_argv()
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--modes", nargs="+", default=["unroll", "exact"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--channel", type=int, default=1)
    p.add_argument("--im", type=int, default=28)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="the student's arithmetic (mttlite.precision)")
    a = p.parse_args()
    rows = []
    mem = "peak_cuda_mib" if a.device.startswith("cuda") else "peak_rss_mib"
    malloc = malloc_mode()
    print(f"# memory vs N — {hardware()}; shape {a.channel}x{a.im}x{a.im}, IPC {a.ipc}, width {a.width}, "
          f"device {a.device}, precision {a.precision}, allocator {malloc}")
    print(f"| N | mode | s/iter | peak {'CUDA alloc' if mem == 'peak_cuda_mib' else 'RSS'} MiB | est. GFLOP/s |")
    print("|---|---|---|---|---|")
    for n in a.steps:
        for mode in a.modes:
            r = spawn(__file__, dict(mode=mode, syn_steps=n, channel=a.channel, im=a.im, ipc=a.ipc, width=a.width,
                                     iters=a.iters, device=a.device, precision=a.precision))
            rows.append(r)
            if "error" in r:
                print(f"| {n} | {mode} | error: {r['error']} | | |", flush=True)
            else:
                print(f"| {n} | {mode} | {r['sec_per_iter']:.2f} | {r[mem]:.0f} | {r['est_gflops']:.1f} |", flush=True)
    suffix = "" if a.device == "cpu" else "_" + a.device.replace(":", "")
    suffix += "_malloc-default" if malloc == "default" else ""
    print("wrote", save(rows, f"memory_vs_steps{suffix}_{a.channel}x{a.im}_ipc{a.ipc}"))
