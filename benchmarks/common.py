"""Shared pieces of the distillation benchmarks: one outer iteration on a given shape, measured.

Each configuration runs in a fresh subprocess (``--worker``) so that peak RSS belongs to that
configuration alone. Data are random tensors of the right shape: speed and memory do not depend
on pixel values, and the benchmark then needs no data set.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mttlite.augment import DSA_STRATEGY  # noqa: E402
from mttlite.fused import FusedStep  # noqa: E402
from mttlite.kernels import StepKernels  # noqa: E402
from mttlite.layers import torch_layers  # noqa: E402
from mttlite.meta_gradient import meta_gradient  # noqa: E402
from mttlite.networks import get_network  # noqa: E402
from mttlite.params import ParamSpec  # noqa: E402
from mttlite.perf import keep_freed_memory  # noqa: E402
from mttlite.student import make_plan  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def conv_flops_per_image(net, shape) -> float:
    """Forward multiply-adds ×2 of the conv and linear layers for one image (the dominant cost)."""
    flops = 0
    hooks = []

    def hook(m, inp, out):
        nonlocal flops
        if isinstance(m, torch.nn.Conv2d):
            flops += 2 * out[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        elif isinstance(m, torch.nn.Linear):
            flops += 2 * m.in_features * m.out_features

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return flops


def malloc_mode() -> str:
    """"keep" (mttlite.perf.keep_freed_memory, as the CLI runs) unless MTTLITE_MALLOC=default (glibc's defaults)."""
    return os.environ.get("MTTLITE_MALLOC", "keep")


def matmul_gflops(n: int = 3072, repeats: int = 3, device="cpu") -> float:
    """The machine's practical fp32 peak: GFLOP/s of the best of ``repeats`` n×n matrix products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def one_config(mode: str, syn_steps: int, channel=1, im=28, ipc=10, num_classes=10, width=128, iters=3,
               device="cpu", strategy=DSA_STRATEGY, seed=0, precision="fp32") -> dict:
    """Median seconds of ``iters`` outer iterations (after one warm-up) and peak memory.

    ``mode``: "unroll" or "exact", then options joined by "+": "compile" (``StepKernels``, the eager
    step's torch.compile), "fused" (``mttlite.fused.FusedStep``: one compiled graph per step, on CUDA the
    N steps as one CUDA graph); with either the warm-up iteration includes compiling and is reported as
    ``first_iter_s``. On CUDA also "notf32" (TF32 off for convolutions and matrix products: full fp32, a
    stand-in for a GPU without TF32 such as a T4) and "cudnnbench" (``torch.backends.cudnn.benchmark``).
    "reference": the straightforward implementation that issue 4 compares with, measured on the same
    machine in the same run: the naive unroll, eager, with torch's own instance norm and pooling
    layers (``mttlite.layers.torch_layers``) and glibc's default allocator.
    ``precision``: the student's arithmetic (``mttlite.precision``: "fp32", "bf16", "fp16"; fp16 with a
    fixed loss scale of 2^8).
    """
    reference = mode == "reference"
    if reference:
        mode = "unroll"
    elif malloc_mode() == "keep":
        keep_freed_memory()
    torch.manual_seed(seed)
    dev = torch.device(device)
    grad_mode, *options = mode.split("+")
    bad = set(options) - {"compile", "fused", "notf32", "cudnnbench"}
    if bad or {"compile", "fused"} <= set(options):
        raise ValueError(f"unknown or clashing mode options {sorted(bad) or options} in {mode!r}; use e.g. 'exact+fused'")
    if dev.type == "cuda":
        tf32 = "notf32" not in options
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default for matrix products
        torch.backends.cudnn.allow_tf32 = tf32  # PyTorch's default: True for convolutions
        torch.backends.cudnn.benchmark = "cudnnbench" in options
    net = get_network("convnet", channel, num_classes, (im, im), width=width).to(dev)
    if reference:
        net = torch_layers(net)
    spec = ParamSpec.from_module(net)
    kernels = StepKernels(net, spec, precision=precision) if "compile" in options else None
    fused = (FusedStep(net, spec, batch=ipc * num_classes, im_size=(im, im), dsa_strategy=strategy, precision=precision,
                       device=dev) if "fused" in options else None)
    g = torch.Generator().manual_seed(seed)
    n = ipc * num_classes
    x = torch.randn(n, channel, im, im, generator=g).to(dev)
    y = torch.arange(num_classes).repeat_interleave(ipc).to(dev)
    theta = spec.flatten(dict(net.named_parameters())).detach()
    target = theta + 0.01 * torch.randn(theta.shape, generator=g).to(dev)
    alpha = torch.tensor(0.01, device=dev)
    base_rss = peak_rss_mib()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    times = []
    for i in range(iters + 1):
        plan = make_plan(n, syn_steps, None, g)
        t0 = time.perf_counter()
        scale = 2.0 ** 8 if precision == "fp16" else None
        if fused is not None:
            mg = fused.meta_gradient(grad_mode, theta, target, x, y, alpha, plan, loss_scale=scale)
        else:
            mg = meta_gradient(grad_mode, net, spec, theta, target, x, y, alpha, plan, strategy, kernels=kernels,
                               precision=precision, loss_scale=scale)
        mg.images.sum().item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first iteration warms up allocators and kernels (and compiles)
            times.append(time.perf_counter() - t0)
        else:
            first = time.perf_counter() - t0
    flops = conv_flops_per_image(net.cpu(), (channel, im, im))
    # Convolution work per student step, in multiples of one forward (each conv layer o = conv(a, w)):
    # forward 1; backward 2 (∂a = convᵀ(∂o, w), ∂w = corr(a, ∂o)); double backward 6 (each of those
    # three convolutions is differentiated w.r.t. both of its inputs). unroll: 1 + 2 + 6 = 9;
    # exact: the forward sweep's 1 + 2, then the backward sweep's 9 again.
    units = {"exact": 3 + 9, "unroll": 9}[grad_mode]
    work = flops * n * syn_steps * units
    out = {
        "mode": "reference" if reference else mode, "precision": precision, "syn_steps": syn_steps, "shape": [channel, im, im], "ipc": ipc,
        "n_syn": n, "width": width,
        "device": str(dev), "sec_per_iter": statistics.median(times), "times": times, "first_iter_s": first,
        "peak_rss_mib": peak_rss_mib(), "base_rss_mib": base_rss, "est_gflops": work / statistics.median(times) / 1e9,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "malloc": "default" if reference else malloc_mode(),
    }
    if dev.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["base_cuda_mib"] = base_cuda
        out["gpu"] = torch.cuda.get_device_name()
    return out


def run_worker_from_argv() -> None:
    cfg = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    print(json.dumps(one_config(**cfg)))


def spawn(script: str, cfg: dict, timeout: float = 3600) -> dict:
    """Run one configuration in a fresh interpreter; returns its JSON result (or the error)."""
    r = subprocess.run([sys.executable, script, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        return {**cfg, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}{gpu}"


def save(rows: list[dict], name: str) -> Path:
    out = ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"hardware": hardware(), "rows": rows}, indent=2))
    return path


class _TwoSnapshots:
    """An expert source with one expert and two epochs, θ and θ + 0.01·noise: something to match."""

    def __init__(self, theta: torch.Tensor, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.snaps = [theta, theta + 0.01 * torch.randn(theta.shape, generator=g)]
        self.epochs = [0, 1]

    def __len__(self):
        return 1

    def flat(self, expert, epoch, device="cpu", dtype=None):
        return self.snaps[epoch].to(device)


def synthetic_distiller(step: str, gradient: str, syn_steps: int, width=32, ipc=1, channel=1, im=28, num_classes=10,
                        device="cpu", precision="fp32", batch_syn=None, seed=0):
    """A ``Distiller`` on random images of the right shape (speed and operation counts do not depend on
    pixel values): ConvNet-3, DSA, the given student ``step`` ("eager" / "fused") and ``gradient`` mode."""
    from types import SimpleNamespace

    from mttlite.distill import DistillConfig, Distiller

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = get_network("convnet", channel, num_classes, (im, im), width=width)
    spec = ParamSpec.from_module(net)
    labels = torch.arange(num_classes).repeat_interleave(max(ipc, 2))
    ds = SimpleNamespace(name="synthetic", train_images=torch.randn(len(labels), channel, im, im, generator=g),
                         train_labels=labels, num_classes=num_classes, channel=channel, im_size=(im, im), zca=None)
    experts = _TwoSnapshots(spec.flatten(dict(net.named_parameters())).detach(), seed)
    cfg = DistillConfig(dataset="synthetic", ipc=ipc, syn_steps=syn_steps, expert_epochs=1, max_start_epoch=1,
                        iterations=1000, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.01, batch_syn=batch_syn,
                        dsa_strategy=DSA_STRATEGY, gradient=gradient, precision=precision, step=step, seed=seed)
    return Distiller(cfg, ds, net, experts, device=device)
