"""How far the bf16 (or fp16) meta-gradient is from the fp32 one it approximates, in a real distillation.

On the embedded Fashion-MNIST (``fashion-mnist-mini``): a small expert buffer is trained into
``--out``/buffer (reused when it is there), then for each N in ``--steps`` a distillation runs K =
``--iters`` iterations in fp32. Before each of its iterations, on that iteration's state (pixels, α)
and with that iteration's draw (expert, t, StepPlan), the meta-gradient is computed in fp32 and in the
low precision, in every mode of ``--modes``, and compared:

    cos x     cosine of ∂L/∂x (low) with ∂L/∂x (fp32)            1 = same direction
    rel x     ‖∂L/∂x_low − ∂L/∂x_fp32‖ / ‖∂L/∂x_fp32‖            0 = equal
    rel α     |∂L/∂α_low − ∂L/∂α_fp32| / |∂L/∂α_fp32|
    sign α    the fraction of iterations where ∂L/∂α has the same sign (its only "direction")
    rel L     |L_low − L_fp32| / L_fp32

The table reports the mean and the worst case over the K iterations. Then the distillation takes its
(fp32) step, so the states are the ones a real run visits. Seconds are printed for orientation only:
measure speed with ``benchmarks/iteration_speed.py --precision fp32,bf16`` on a quiet machine.

    python benchmarks/precision_gradient.py [--iters 20] [--steps 10,30] [--modes exact,unroll]
        [--precision bf16] [--device cpu] [--out runs/precision_gradient] [--quick]

``--quick`` (CI): width 8, 1 expert, 2 iterations, N = 10 and 30, exact mode only.
``--precision fp16`` needs a GPU; it uses a fixed loss scale ``--loss-scale`` (default 2^8) and
reports a non-finite gradient (an overflow) as such instead of retrying.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mttlite.data import load_dataset  # noqa: E402
from mttlite.distill import DistillConfig  # noqa: E402
from mttlite.experts import train_experts  # noqa: E402
from mttlite.meta_gradient import meta_gradient  # noqa: E402
from mttlite.pipeline import make_distiller  # noqa: E402
from mttlite.precision import all_finite, check_precision  # noqa: E402

QUICK = dict(width=8, experts=1, iters=2, steps="10,30", modes="exact")
FULL = dict(width=32, experts=2, iters=20, steps="10,30", modes="exact,unroll")
EXPERT_EPOCHS, MAX_START = 2, 3  # M, T+: the buffer stores epochs 0 … T+ − 1 + M


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def compare(low, ref) -> dict:
    """The comparison of one low-precision MetaGradient with the fp32 one (module docstring)."""
    gx, rx = low.images.double(), ref.images.double()
    ga, ra = float(low.syn_lr), float(ref.syn_lr)
    finite = bool(all_finite(low.images, low.syn_lr, low.loss))
    return {
        "finite": finite,
        "cos_x": float((gx * rx).sum() / (gx.norm() * rx.norm())) if finite else math.nan,
        "rel_x": float((gx - rx).norm() / rx.norm()) if finite else math.nan,
        "rel_a": abs(ga - ra) / abs(ra) if ra != 0 else math.nan,
        "sign_a": float(math.copysign(1, ga) == math.copysign(1, ra)),
        "rel_L": abs(float(low.loss) - float(ref.loss)) / float(ref.loss),
    }


def run_n(args, ds, buffer, syn_steps: int) -> list[dict]:
    """K iterations of an fp32 distillation with N = ``syn_steps``, comparing before each step."""
    cfg = DistillConfig(dataset=ds.name, ipc=args.ipc, syn_steps=syn_steps, expert_epochs=EXPERT_EPOCHS,
                        max_start_epoch=MAX_START, iterations=args.iters, lr_img=100.0, lr_lr=1e-6, lr_teacher=0.01,
                        seed=args.seed, checkpoint_every=10**6)
    d = make_distiller(cfg, buffer, dataset=ds, device=args.device)
    rows = []
    for it in range(args.iters):
        state = d.generator.get_state()
        expert, start, plan = d._draw()  # the draw the step below will make again
        d.generator.set_state(state)
        ts = d.experts.flat(expert, start, device=d.device)
        tt = d.experts.flat(expert, start + cfg.expert_epochs, device=d.device)
        alpha = d.syn_lr.detach()
        for mode in args.modes:
            out = {}
            for prec in ("fp32", args.precision):
                _sync(args.device)
                t0 = time.perf_counter()
                out[prec] = meta_gradient(mode, d.model, d.spec, ts, tt, d.images.detach(), d.labels, alpha, plan,
                                          d.dsa_strategy, precision=prec,
                                          loss_scale=args.loss_scale if prec == "fp16" else None)
                out[prec].images.sum().item()
                _sync(args.device)
                out[prec + "_s"] = time.perf_counter() - t0
            row = {"N": syn_steps, "mode": mode, "iteration": it, "expert": expert, "start": start,
                   **compare(out[args.precision], out["fp32"]),
                   "seconds_fp32": out["fp32_s"], "seconds_low": out[args.precision + "_s"]}
            rows.append(row)
        d.step()  # the real (fp32) distillation moves on
    return rows


def summarise(rows: list[dict], args) -> list[dict]:
    out = []
    for n in args.steps:
        for mode in args.modes:
            r = [x for x in rows if x["N"] == n and x["mode"] == mode]
            fin = [x for x in r if x["finite"]]
            out.append({
                "N": n, "mode": mode, "iterations": len(r), "finite": len(fin),
                "cos_x_mean": statistics.fmean(x["cos_x"] for x in fin) if fin else math.nan,
                "cos_x_min": min((x["cos_x"] for x in fin), default=math.nan),
                "rel_x_mean": statistics.fmean(x["rel_x"] for x in fin) if fin else math.nan,
                "rel_x_max": max((x["rel_x"] for x in fin), default=math.nan),
                "rel_a_mean": statistics.fmean(x["rel_a"] for x in fin) if fin else math.nan,
                "rel_a_max": max((x["rel_a"] for x in fin), default=math.nan),
                "sign_a": statistics.fmean(x["sign_a"] for x in r),
                "rel_L_max": max((x["rel_L"] for x in r), default=math.nan),
                "seconds_fp32": statistics.median(x["seconds_fp32"] for x in r),
                "seconds_low": statistics.median(x["seconds_low"] for x in r),
            })
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "precision_gradient"))
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--loss-scale", type=float, default=2.0 ** 8, help="fp16 only: the fixed loss scale S")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=None, help="K distillation iterations per N")
    p.add_argument("--steps", default=None, help="the N to compare at, comma-separated (default 10,30)")
    p.add_argument("--modes", default=None, help="meta-gradient modes, comma-separated (default exact,unroll)")
    p.add_argument("--width", type=int, default=None, help="ConvNet-3 width (default 32)")
    p.add_argument("--experts", type=int, default=None, help="experts in the buffer (default 2)")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="the CI size: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    for k in ("width", "experts", "iters", "steps", "modes"):
        if getattr(args, k) is None:
            setattr(args, k, size[k])
    args.steps = [int(s) for s in str(args.steps).split(",")]
    args.modes = [m for m in str(args.modes).split(",") if m]
    if args.threads:
        torch.set_num_threads(args.threads)
    check_precision(args.precision, args.device)  # bf16 on a CPU without it, fp16 on a CPU: one line, before work

    out = Path(args.out)
    ds = load_dataset("fashion-mnist-mini", device=args.device)
    t0 = time.perf_counter()
    buffer = train_experts(ds, out / "buffer", num_experts=args.experts, train_epochs=MAX_START - 1 + EXPERT_EPOCHS,
                           width=args.width, device=args.device, progress=False)
    t_buf = time.perf_counter() - t0
    rows = []
    for n in args.steps:
        rows += run_n(args, ds, buffer, n)
    table = summarise(rows, args)

    print(f"# {args.precision} vs fp32 meta-gradient — fashion-mnist-mini, ConvNet-3 width {args.width}, IPC {args.ipc}, "
          f"{args.experts} expert(s), K = {args.iters} iterations per N, device {args.device}, torch {torch.__version__}"
          + (f", loss scale {args.loss_scale:g}" if args.precision == "fp16" else ""))
    print("| N | mode | cos x mean | cos x min | rel x mean | rel x max | rel α mean | rel α max | sign α agrees "
          "| rel L max | finite | s fp32 | s low |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['N']} | {r['mode']} | {r['cos_x_mean']:.5f} | {r['cos_x_min']:.5f} | {r['rel_x_mean']:.4f} "
              f"| {r['rel_x_max']:.4f} | {r['rel_a_mean']:.4f} | {r['rel_a_max']:.4f} | {100 * r['sign_a']:.0f} % "
              f"| {r['rel_L_max']:.2e} | {r['finite']}/{r['iterations']} | {r['seconds_fp32']:.2f} "
              f"| {r['seconds_low']:.2f} |")
    print("(seconds: medians per meta-gradient, for orientation only — not a benchmark)")
    doc = {"precision": args.precision, "device": args.device, "width": args.width, "ipc": args.ipc,
           "experts": args.experts, "iters": args.iters, "steps": args.steps, "modes": args.modes,
           "loss_scale": args.loss_scale if args.precision == "fp16" else None, "torch": torch.__version__,
           "buffer_seconds": t_buf, "summary": table, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    print("wrote", out / "results.json")
    return doc


if __name__ == "__main__":
    main()
