"""Seconds per distillation iteration on the reference configuration of issue 4.

1x28x28, IPC 10 (100 images), ConvNet width 128, N = 10, all images every step, DSA
color_crop_cutout_flip_scale_rotate, the exact meta-gradient. Reference (a straightforward
flat-parameter implementation with naive unroll): ~15 s/iteration and ~4.6 GB on 2 CPU cores.

    python benchmarks/iteration_speed.py [--device cuda] [--iters 5] [--steps 10]
        [--modes reference unroll exact unroll+fused exact+fused exact+compile] [--precision fp32,bf16]

"reference" measures that straightforward implementation here and now (the naive unroll with
torch's own GroupNorm / AvgPool2d layers and glibc's default allocator); the "speed-up" column
compares every mode with it, so the ratio does not depend on how fast the machine is today.
Freed memory is kept for reuse (mttlite.perf.keep_freed_memory) unless MTTLITE_MALLOC=default.
"+fused" runs the fused student step (mttlite.fused: each step one compiled graph, on CUDA the N steps
replayed as one CUDA graph); "+compile" the eager step through torch.compile (mttlite.kernels.StepKernels).
Either's first iteration (compiling) is excluded from the median and shown separately. On CUDA,
"+notf32" turns TF32 off (full fp32 convolutions: a stand-in for a GPU without TF32, e.g. a T4) and
"+cudnnbench" turns cudnn.benchmark on, e.g. "exact+fused+notf32". The last column compares
the estimated convolution throughput with a large fp32 matrix product on the same machine.

``--precision fp32,bf16`` (or fp16 on a GPU, loss-scaled at a fixed 2^8) runs every mode in each
precision ("exact@bf16" runs that one mode in that one precision) (mttlite.precision: the student under autocast, everything accumulated in fp32); the
reference is always the fp32 one. Columns: s/iter, speed-up vs the reference, speed-up vs the same
mode in fp32, and peak memory. What bf16 does to the gradient: benchmarks/precision_gradient.py.
"""
import argparse
import sys

from common import hardware, malloc_mode, matmul_gflops, one_config, run_worker_from_argv, save, spawn

if __name__ == "__main__":
    if "--worker" in sys.argv:
        run_worker_from_argv()
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--width", type=int, default=128, help="ConvNet width (128: the reference configuration)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=["reference", "unroll", "exact", "unroll+fused", "exact+fused"])
    p.add_argument("--in-process", choices=("auto", "yes", "no"), default="auto",
                   help="run every configuration in this process (auto: on CUDA, where peak memory is measured per "
                        "configuration and a fresh process per row would cost seconds of start-up each); on a CPU each "
                        "row has a fresh process, so that its peak RSS is its own")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16 (the reference is fp32 only)")
    a = p.parse_args()
    precisions = [q for q in a.precision.split(",") if q]
    from mttlite.precision import check_precision

    # a mode may name its own precision, "exact@bf16": that row only, instead of every precision of --precision
    plan = [(m.partition("@")[0], [m.partition("@")[2]] if "@" in m else ["fp32"] if m == "reference" else precisions)
            for m in a.modes]
    for q in {q for _, qs in plan for q in qs}:
        check_precision(q, a.device)  # one line, before any measurement
    in_process = a.in_process == "yes" or (a.in_process == "auto" and a.device.startswith("cuda"))
    peak = matmul_gflops(device=a.device)
    print(f"# iteration speed — {hardware()}; 1x28x28, IPC {a.ipc}, width {a.width}, N={a.steps}, device {a.device}, "
          f"precision {', '.join(precisions)}")
    print(f"# fp32 matrix product 3072x3072: {peak:.0f} GFLOP/s; allocator: "
          f"{malloc_mode()} (MTTLITE_MALLOC=default for glibc's defaults)")
    print("| mode | precision | median s/iter | speed-up vs reference | vs same mode fp32 | all s/iter | first iter s "
          "| peak memory MiB | est. GFLOP/s | % of fp32 matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, ref, fp32 = [], None, {}
    for mode, mode_precisions in plan:
        for prec in mode_precisions:
            cfg = dict(mode=mode, syn_steps=a.steps, iters=a.iters, device=a.device, width=a.width, ipc=a.ipc,
                       precision=prec)
            if in_process:
                try:
                    r = one_config(**cfg)
                except Exception as e:  # noqa: BLE001 - a row that fails is reported, the others still run
                    r = {**cfg, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
            else:
                r = spawn(__file__, cfg)
            rows.append(r)
            if "error" in r:
                print(f"| {mode} | {prec} | error: {r['error']} | | | | | | | |")
                continue
            if mode == "reference":
                ref = r["sec_per_iter"]
            if prec == "fp32":
                fp32[mode] = r["sec_per_iter"]
            speedup = f"{ref / r['sec_per_iter']:.2f}×" if ref else "—"
            same = f"{fp32[mode] / r['sec_per_iter']:.2f}×" if mode in fp32 else "—"
            mem = r.get("peak_cuda_mib", r["peak_rss_mib"])
            times = ", ".join(f"{t:.2f}" for t in r["times"])
            print(f"| {mode} | {prec} | {r['sec_per_iter']:.2f} | {speedup} | {same} | {times} | {r['first_iter_s']:.1f} "
                  f"| {mem:.0f} | {r['est_gflops']:.1f} | {100 * r['est_gflops'] / peak:.0f} |", flush=True)
    print("wrote", save(rows + [{"matmul_gflops": peak}], f"iteration_speed_{a.device.replace(':', '')}"))
