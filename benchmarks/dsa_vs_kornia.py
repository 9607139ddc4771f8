"""Wall time of mttlite's hand-written DSA vs the nearest kornia.augmentation equivalents.

    .venv/bin/python benchmarks/dsa_vs_kornia.py [--runs 20] [--threads 1]

Times forward + backward (d sum(A(x)) / dx) on the CPU, median of --runs calls after
2 warm-up calls, for a Fashion-MNIST-like batch (256, 1, 28, 28) and a CIFAR-like
batch (100, 3, 32, 32). Then prints a few measured semantic differences.
kornia is optional (it is NOT a project dependency): without it only the DSA column is filled.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mttlite.augment import DSA_STRATEGY, DSAParams, dsa

try:
    import kornia
    import kornia.augmentation as K
except ImportError:  # pragma: no cover - kornia is optional
    kornia = None

SHAPES = [(256, 1, 28, 28), (100, 3, 32, 32)]
OPS = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def kornia_ops(shape) -> dict[str, nn.Module]:
    """The closest kornia module to each DSA op, with DSA's ranges (see docs/decisions.md)."""
    _, C, H, W = shape
    p = DSAParams()
    pad = int(H * p.ratio_crop_pad + 0.5)
    r = p.ratio_scale
    ops = {
        # brightness offset in [-0.5, 0.5], contrast in [0.5, 1.5], saturation in [0, 2] (needs RGB);
        # DSA's order: brightness, saturation, contrast
        "color": K.ColorJiggle(
            brightness=p.brightness / 2,
            contrast=p.contrast,
            saturation=(p.saturation / 2 if C == 3 else 0.0),
            order=(0, 2, 1) if C == 3 else (0, 1),
            p=1.0,
        ),
        "crop": K.RandomCrop((H, W), padding=pad, fill=0.0, padding_mode="constant"),
        "cutout": K.RandomErasing(
            scale=(p.ratio_cutout**2,) * 2, ratio=(1.0, 1.0), value=0.0, p=1.0
        ),
        "flip": K.RandomHorizontalFlip(p=p.prob_flip),
        "scale": K.RandomAffine(
            degrees=0.0, scale=(1 / r, r, 1 / r, r), align_corners=True, p=1.0
        ),
        "rotate": K.RandomRotation(degrees=p.ratio_rotate, align_corners=True, p=1.0),
    }
    return ops


def median_ms(fn: Callable[[int], torch.Tensor], x: torch.Tensor, runs: int) -> float:
    """Median wall time (ms) of forward + backward through fn(call_index)."""
    times = []
    for i in range(runs + 2):
        xg = x.detach().requires_grad_()
        t0 = time.perf_counter()
        fn(xg, i).sum().backward()
        t1 = time.perf_counter()
        if i >= 2:  # warm-up
            times.append(t1 - t0)
    return 1e3 * statistics.median(times)


def fmt(v: float | None) -> str:
    return "   n/a" if v is None else f"{v:6.2f}"


def timing_table(runs: int) -> None:
    print(
        f"| op (forward+backward, CPU, ms, median of {runs}) | shape | DSA (mttlite) | kornia | kornia/DSA |"
    )
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.rand(shape)
        kops = kornia_ops(shape) if kornia else {}
        rows = [
            (op, lambda xg, i, op=op: dsa(xg, op, seed=i), kops.get(op)) for op in OPS
        ]
        rows.append(
            (
                "all six, mode M",
                lambda xg, i: dsa(xg, DSA_STRATEGY, seed=i, mode="M"),
                nn.Sequential(*kops.values()) if kops else None,
            )
        )
        rows.append(
            (
                "one random op, mode S",
                lambda xg, i: dsa(xg, DSA_STRATEGY, seed=i, mode="S"),
                K.AugmentationSequential(*kops.values(), random_apply=1)
                if kops
                else None,
            )
        )
        for name, ours, theirs in rows:
            t_dsa = median_ms(ours, x, runs)
            t_k = (
                median_ms(lambda xg, i, m=theirs: m(xg), x, runs)
                if theirs is not None
                else None
            )
            ratio = f"{t_k / t_dsa:5.2f}x" if t_k is not None else "n/a"
            print(f"| {name} | {tuple(shape)} | {fmt(t_dsa)} | {fmt(t_k)} | {ratio} |")


def semantics_table() -> None:
    """Measured differences in what the two libraries compute (not in speed)."""
    torch.manual_seed(0)  # kornia draws from the global RNG
    shape = (256, 1, 28, 28)
    x = torch.rand(shape) + 0.1  # positive: zeros mark erased pixels
    cut_dsa = (dsa(x, "cutout", seed=0) == 0).float().mean().item()
    print("| check (256 x 1 x 28 x 28) | DSA (mttlite) | kornia |")
    print("|---|---|---|")
    if kornia is None:
        print(f"| mean fraction of pixels cut out | {cut_dsa:.3f} | n/a |")
        return
    cut_k = (kornia_ops(shape)["cutout"](x) == 0).float().mean().item()
    print(
        f"| mean fraction of pixels cut out (nominal 14x14 = 0.250) | {cut_dsa:.3f} | {cut_k:.3f} |"
    )

    z = torch.randn(shape)  # normalised images (mean 0, std 1), as MTT distils them
    for name, f in [
        ("color", lambda t: dsa(t, "color", seed=0)),
        ("kornia", kornia_ops(shape)["color"]),
    ]:
        zg = z.clone().requires_grad_()
        f(zg).sum().backward()
        frac = (zg.grad == 0).float().mean().item()
        if name == "color":
            zero_dsa = frac
        else:
            zero_k = frac
    print(
        f"| colour op on normalised images: fraction of pixels with zero gradient | {zero_dsa:.3f} | {zero_k:.3f} |"
    )

    # replay: DSA re-creates omega from an int; kornia needs the stored params of the call
    a, b = dsa(x, DSA_STRATEGY, seed=3), dsa(x, DSA_STRATEGY, seed=3)
    rot = kornia_ops(shape)["rotate"]
    ka, kb = rot(x), rot(x)
    print(
        f"| two calls, same seed / no stored params: identical output | {torch.equal(a, b)} | {torch.equal(ka, kb)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 = stable on a shared machine)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kv = kornia.__version__ if kornia else "not installed"
    print(
        f"torch {torch.__version__}, kornia {kv}, threads {torch.get_num_threads()}\n"
    )
    timing_table(args.runs)
    print()
    semantics_table()


if __name__ == "__main__":
    main()
