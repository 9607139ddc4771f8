"""Throughput of expert training: K experts vmapped together vs the same K experts one at a time.

    python benchmarks/experts_throughput.py                       # ConvNet-3 width 128, 1024 images, 1 epoch
    python benchmarks/experts_throughput.py --width 32 --images 512 --ks 1,4,8
    python benchmarks/experts_throughput.py --device cuda --images 10000

Each measurement is a complete ``train_experts`` call into a fresh temporary directory (DSA on,
batch 256, SGD, test evaluation on --test-images images, files written), so it is what
``mttlite experts`` costs. Throughput = K · images · epochs / wall-clock seconds.
Prints a markdown table and writes JSON to runs/bench/experts_throughput.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mttlite.buffers import write_json_atomic
from mttlite.data import load_dataset
from mttlite.experts import train_experts
from mttlite.perf import keep_freed_memory


def subset(ds, n_train: int, n_test: int):
    """The first n_train / n_test images (repeated if the set is smaller)."""

    def take(x, n):
        reps = -(-n // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()

    return dataclasses.replace(
        ds,
        train_images=take(ds.train_images, n_train),
        train_labels=take(ds.train_labels, n_train),
        test_images=take(ds.test_images, n_test),
        test_labels=take(ds.test_labels, n_test),
    )


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_run(ds, K: int, parallel: int, args) -> float:
    """Wall-clock seconds of train_experts for K experts, `parallel` at a time."""
    with tempfile.TemporaryDirectory() as d:
        sync(args.device)
        t0 = time.perf_counter()
        train_experts(
            ds, d, num_experts=K, train_epochs=args.epochs, width=args.width, batch_real=args.batch,
            parallel=parallel, device=args.device, progress=False, seed=args.seed,
        )
        sync(args.device)
        return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist-mini")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--images", type=int, default=1024, help="training images per expert per epoch")
    p.add_argument("--test-images", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=256, help="batch_real")
    p.add_argument("--ks", default="1,4,8,16", help="comma-separated numbers of experts K")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/experts_throughput.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = os.environ.get("MTTLITE_MALLOC", "default")  # MTTLITE_MALLOC=keep: mttlite.perf.keep_freed_memory()
    if malloc == "keep":
        keep_freed_memory()
    ks = [int(k) for k in args.ks.split(",")]

    ds = subset(load_dataset(args.dataset, device=args.device), args.images, args.test_images)
    time_run(subset(ds, args.batch, 64), 2, 2, argparse.Namespace(**{**vars(args), "epochs": 1}))  # warm-up

    rows = []
    for K in ks:
        seq = time_run(ds, K, 1, args)
        par = time_run(ds, K, K, args)
        n = K * args.images * args.epochs
        rows.append({"K": K, "seconds_one_at_a_time": seq, "seconds_vmap": par,
                     "img_per_s_one_at_a_time": n / seq, "img_per_s_vmap": n / par, "speedup": seq / par})
        print(f"K={K}: one at a time {n / seq:,.0f} img/s, vmap {n / par:,.0f} img/s", file=sys.stderr)

    print(f"\nConvNet-3 width {args.width}, {ds.channel}x{ds.im_size[0]}x{ds.im_size[1]}, {args.images} images x "
          f"{args.epochs} epoch(s) per expert, batch {args.batch}, DSA on, device {args.device}, "
          f"{torch.get_num_threads()} threads, allocator {malloc}\n")
    print("| K experts | one at a time (img/s) | vmap, K at once (img/s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['K']} | {r['img_per_s_one_at_a_time']:,.0f} | {r['img_per_s_vmap']:,.0f} | {r['speedup']:.2f}x |")

    result = {
        "benchmark": "experts_throughput",
        "settings": {**vars(args), "threads": torch.get_num_threads(), "malloc": malloc, "channel": ds.channel, "im_size": list(ds.im_size)},
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device_name": torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else platform.processor(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
