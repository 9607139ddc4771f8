"""Instance norm's low-precision CPU paths against its float32 path, inside a real bf16 distillation step.

    .venv/bin/python benchmarks/norm_paths.py                  # width 128, IPC 10, N = 10, exact and unroll
    .venv/bin/python benchmarks/norm_paths.py --quick          # a smoke test (CI): width 8, IPC 1, N = 2

Under bf16 autocast on a CPU, ``mttlite.layers`` runs instance norm's backward with torch's mixed-dtype
kernel and its second derivative's full-size passes in bf16 (``layers._InstanceNormBackward``); under
``torch.func`` transforms it takes the float32 path instead (upcast, compute, downcast). This script
times both paths in ONE process on the same distiller, alternating them iteration by iteration, so a
machine shared with other jobs slows both alike: the float32 path is forced by making
``layers._functorch_wrapped`` answer True, which is exactly what a transform would make it answer.
Reports the median seconds per iteration of each and their ratio; for absolute speeds against the
reference implementation use ``benchmarks/iteration_speed.py --precision fp32,bf16`` on a quiet machine.

The experts: one ConvNet-3 of ``--width`` trained ``--epochs`` epochs on the embedded
``fashion-mnist-mini`` (cached in ``--buffer``); the distillation: ``preset("demo")`` at ``--ipc``,
N = ``--syn-steps``, M = 2, DSA, ``precision="bf16"``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import hardware  # noqa: E402

import mttlite.layers as layers  # noqa: E402
from mttlite.data import load_dataset  # noqa: E402
from mttlite.distill import preset  # noqa: E402
from mttlite.experts import train_experts  # noqa: E402
from mttlite.pipeline import make_distiller  # noqa: E402
from mttlite.precision import check_precision  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--modes", default="exact,unroll")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per path and mode (after a warm-up)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the one expert")
    p.add_argument("--buffer", default=None, help="expert cache (default runs/bench/norm_paths/buffer-w<width>)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.width, a.ipc, a.syn_steps, a.iters, a.epochs = 8, 1, 2, 1, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    check_precision("bf16", "cpu")  # one clear line on a CPU without bf16
    ds = load_dataset("fashion-mnist-mini")
    buffer = train_experts(ds, a.buffer or ROOT / "runs" / "bench" / "norm_paths" / f"buffer-w{a.width}-e{a.epochs}",
                           num_experts=1, train_epochs=a.epochs, width=a.width, seed=0, progress=False)
    real = layers._functorch_wrapped
    rows = []
    try:
        for mode in [m for m in a.modes.split(",") if m]:
            c = preset("demo", dataset=ds.name, ipc=a.ipc, syn_steps=a.syn_steps, expert_epochs=2,
                       max_start_epoch=min(2, a.epochs - 2 + 1), iterations=10 ** 6, gradient=mode, precision="bf16", step="eager",
                       seed=0, dsa_strategy="color_crop_cutout_flip_scale_rotate")
            d = make_distiller(c, buffer, dataset=ds)
            d.step()  # warm-up
            times = {"low-precision paths": [], "float32 path": []}
            for _ in range(a.iters):
                for name in times:  # alternate, so that any slowdown of the machine hits both
                    layers._functorch_wrapped = real if name == "low-precision paths" else (lambda *t: True)
                    t0 = time.perf_counter()
                    d.step()
                    times[name].append(time.perf_counter() - t0)
            low, f32 = (statistics.median(times[k]) for k in ("low-precision paths", "float32 path"))
            rows.append((mode, f32, low))
    finally:
        layers._functorch_wrapped = real
    print(f"# instance norm under bf16 autocast: float32 path vs low-precision paths — width {a.width}, IPC {a.ipc}, "
          f"N = {a.syn_steps}, DSA, {torch.get_num_threads()} thread(s); {hardware()}")
    print("| mode | float32 path s/iter | low-precision paths s/iter | speed-up |")
    print("|---|---|---|---|")
    for mode, f32, low in rows:
        print(f"| {mode} | {f32:.2f} | {low:.2f} | {f32 / low:.2f}× |")
    print(f"(median of {a.iters} alternated iterations each, after one warm-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
