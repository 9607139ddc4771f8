"""Model augmentation (Zhang et al., CVPR 2023) measured: DC and DM with and without it, accuracy vs wall time.

    .venv/bin/python benchmarks/model_augmentation.py                 # the CPU run (tens of minutes)
    .venv/bin/python benchmarks/model_augmentation.py --quick         # a smoke test (< 60 s on one thread)
    .venv/bin/python benchmarks/model_augmentation.py --methods dc,dsa,dm --rho 0.03 --fractions 1,0.5,0.25

On the embedded ``fashion-mnist-mini``, for each method (``--methods``; any of dc, dsa, dcc, dm) and IPC:

    plain      networks drawn fresh from the initialisation, I iterations (the method's usual run)
    plain ×f   the same for ⌈f·I⌉ iterations, each f < 1 of ``--fractions``: the control for MA ×f (what the
               cut budget alone costs)
    MA ×f      model augmentation: every network starts from a checkpoint of the pool (experts × epochs
               ``--pool-epochs`` of an expert buffer), perturbed with ``--rho``, for ⌈f·I⌉ iterations,
               f in ``--fractions`` (f = 1: the same budget; f < 1: the paper's claim, a cut budget)

Each set is built with ``mttlite.baselines.make_set`` (its wall time is the set's ``provenance.cost``,
after one untimed 1-iteration warm-up of the method)
and judged under ONE ``EvalProtocol`` (final-epoch test accuracy, mean ± std over ``--num-nets``
networks). The pool is an expert buffer trained once (``--num-experts`` × ``--pool-train-epochs``, cached
under ``--out``; or any buffer given with ``--pool``, e.g. the one MTT uses): its training time is a
one-off cost, reported apart, that every later run and MTT share. "cost ×" is a row's build time over the
plain row's; "Δacc" its mean accuracy minus the plain row's, in points.

Outputs: the markdown table (printed, and ``model_augmentation.md``), ``model_augmentation.json``
({"hardware", "rows", "protocol", "pool", "command"}, as ``benchmarks/common.save`` writes) under
``runs/bench/`` (``--quick``: ``model_augmentation-quick``), or under ``--out`` when given; the sets in
``<work>/sets``. CPU sizes, NOT the paper's (ConvNet-3 width 128, CIFAR, 1000s of iterations).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import hardware  # noqa: E402

DATASET = "fashion-mnist-mini"
#: Per method and IPC: the plain run's options (besides width and seed), as in benchmarks/baselines_table.py.
SETTINGS: dict[str, dict[int, dict]] = {
    "dc": {1: {"iterations": 200, "batch_real": 64},
           10: {"iterations": 15, "outer_loop": 10, "inner_loop": 10, "batch_real": 64}},
    "dsa": {1: {"iterations": 200, "batch_real": 64},
            10: {"iterations": 15, "outer_loop": 10, "inner_loop": 10, "batch_real": 64}},
    "dcc": {1: {"iterations": 200, "batch_real": 64},
            10: {"iterations": 15, "outer_loop": 10, "inner_loop": 10, "batch_real": 64}},
    "dm": {1: {"iterations": 300, "batch_real": 128}, 10: {"iterations": 300, "batch_real": 128}},
}
QUICK: dict[str, dict] = {
    "dc": {"iterations": 20, "outer_loop": 1, "inner_loop": 1, "batch_real": 16},
    "dsa": {"iterations": 20, "outer_loop": 1, "inner_loop": 1, "batch_real": 16},
    "dcc": {"iterations": 20, "outer_loop": 1, "inner_loop": 1, "batch_real": 16},
    "dm": {"iterations": 20, "batch_real": 16},
}


def _csv(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def subset(ds, per_class: int | None):
    """The first ``per_class`` training images of each class (all when None); the test split unchanged."""
    if per_class is None:
        return ds
    idx = torch.cat([(ds.train_labels == c).nonzero().squeeze(1)[:per_class] for c in range(ds.num_classes)])
    return replace(ds, train_images=ds.train_images[idx], train_labels=ds.train_labels[idx])


def pool_buffer(ds, a, work: Path):
    """The pool's expert buffer and its one-off training seconds (the experts' recorded wall time)."""
    from mttlite.buffers import ExpertBuffer
    from mttlite.experts import train_experts

    if a.pool is not None:
        buf = ExpertBuffer.open(a.pool)
        trained_here = False
    else:
        path = work / f"pool-w{a.width}-n{a.num_experts}-e{a.pool_train_epochs}-pc{a.per_class}"
        buf = train_experts(ds, path, num_experts=a.num_experts, train_epochs=a.pool_train_epochs, width=a.width,
                            seed=a.seed, progress=False)
        trained_here = True
    seconds = sum(float(buf.metrics(k).get("wall_time_s", 0.0)) for k in range(len(buf)))
    return buf, {"buffer": str(buf.path), "experts": len(buf), "stored_epochs": buf.epochs,
                 "train_seconds": round(seconds, 2), "trained_by_this_run": trained_here}


def run_row(method: str, ipc: int, variant: str, kw: dict, ds, protocol, work: Path) -> dict:
    """Build one set (timed by make_set's cost record), save it, evaluate it under ``protocol``."""
    from mttlite.baselines import make_set

    s = make_set(method, ds, ipc, **kw)
    name = f"{method}-ipc{ipc}-{variant.replace(' ', '').replace('×', 'x')}"
    (work / "sets").mkdir(parents=True, exist_ok=True)
    s.save(work / "sets" / f"{name}.safetensors")
    res = s.evaluate(ds, protocol, progress=False)
    cfg = s.config
    return {"method": method, "ipc": ipc, "variant": variant, "set": name, "iterations": cfg["iterations"],
            "outer_loop": cfg.get("outer_loop"), "inner_loop": cfg.get("inner_loop"),
            "model_pool": cfg.get("model_pool"), "rho": cfg.get("rho"), "build_seconds": s.provenance["cost"]["seconds"],
            "accs": res.accs, "mean": res.mean, "std": res.std, "eval_lr": res.lr, "eval_seconds": round(res.seconds, 2),
            "options": {k: (str(getattr(v, "path", v)) if k == "model_pool" else v) for k, v in kw.items()}}


def table(rows: list[dict]) -> str:
    head = ["method", "IPC", "networks", "iterations", "build s", "cost ×", "final test acc % (mean ± std)", "Δacc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    plain = {(r["method"], r["ipc"]): r for r in rows if r["variant"] == "plain"}
    for r in rows:
        p = plain.get((r["method"], r["ipc"]))
        cost = "-" if p is None or not p["build_seconds"] else f"{r['build_seconds'] / p['build_seconds']:.2f}"
        delta = "-" if p is None or r is p else f"{100 * (r['mean'] - p['mean']):+.1f}"
        nets = ("fresh init" if r["model_pool"] is None else f"pool epochs {r['model_pool']['epochs']}") + (
            f", ρ {r['rho']:g}" if r["rho"] else "")
        loops = f" ({r['outer_loop']}×{r['inner_loop']})" if r["outer_loop"] is not None else ""
        lines.append(f"| {r['method']} | {r['ipc']} | {nets} | {r['iterations']}{loops} | {r['build_seconds']:.1f} | "
                     f"{cost} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} (n={len(r['accs'])}) | {delta} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="dc,dm", help="comma-separated, from dc, dsa, dcc, dm")
    p.add_argument("--ipcs", default="1")
    p.add_argument("--width", type=int, default=None, help="ConvNet width of the pool, the methods and evaluation (32)")
    p.add_argument("--rho", type=float, default=0.05, help="ρ of the perturbation (Zhang et al.: ~0.01-0.09)")
    p.add_argument("--pool", default=None, help="an existing expert buffer as the pool (default: train one)")
    p.add_argument("--pool-epochs", default="1,2", help="the pool's epochs, e.g. '1,2' or '0,1,2' (default 1,2)")
    p.add_argument("--num-experts", type=int, default=None, help="experts in the pool when trained here (5)")
    p.add_argument("--pool-train-epochs", type=int, default=None, help="epochs those experts train (2)")
    p.add_argument("--fractions", default="1,0.25", help="budgets of the MA rows, as fractions of the plain iterations")
    p.add_argument("--iterations", default=None, help="plain iterations per method, e.g. 'dc=100,dm=200'")
    p.add_argument("--per-class", type=int, default=None, help="training images per class (default: all 600)")
    p.add_argument("--eval-epochs", type=int, default=None, help="epochs of each evaluation network (300)")
    p.add_argument("--num-nets", type=int, default=None, help="evaluation networks per set (5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="folder for the JSON, the table, the pool and the sets "
                                               "(default: runs/bench, work files in runs/bench/model_augmentation)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (width 8, 100 images per class, 2 experts x 2 "
                                                        "epochs, 20 iterations, 2 nets x 50 epochs): < 60 s")
    a = p.parse_args(argv)
    defaults = dict(width=32, num_experts=5, pool_train_epochs=2, eval_epochs=300, num_nets=5, per_class=None)
    if a.quick:
        defaults.update(width=8, num_experts=2, pool_train_epochs=2, eval_epochs=50, num_nets=2, per_class=100)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    methods, ipcs, fractions = _csv(a.methods), _csv(a.ipcs, int), _csv(a.fractions, float)
    bad = [m for m in methods if m not in SETTINGS]
    if bad:
        p.error(f"--methods: {bad} are not gradient- or distribution-matching methods; choose from {', '.join(SETTINGS)}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        p.error(f"--fractions must be in (0, 1], got {a.fractions!r}")
    iters = dict(part.split("=") for part in _csv(a.iterations)) if a.iterations else {}
    torch.set_num_threads(a.threads)
    name = "model_augmentation-quick" if a.quick else "model_augmentation"
    out = Path(a.out) if a.out else ROOT / "runs" / "bench"
    work = Path(a.out) if a.out else out / name
    out.mkdir(parents=True, exist_ok=True)

    from mttlite.data import load_dataset
    from mttlite.evaluate import EvalProtocol
    from mttlite.model_augment import parse_epochs

    pool_epochs = parse_epochs(a.pool_epochs, "--pool-epochs")
    ds = subset(load_dataset(DATASET), a.per_class)
    protocol = EvalProtocol(width=a.width, epochs=a.eval_epochs, num_nets=a.num_nets, seed=0)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (sys.argv[1:] if argv is None else list(argv)))
    print(f"data: {DATASET}, {len(ds.train_labels)} training images, {len(ds.test_labels)} test images")
    print(f"hardware: {hardware()}; {a.threads} torch thread(s)")
    print(f"protocol: {protocol.describe()}")
    t0 = time.perf_counter()
    buf, pool = pool_buffer(ds, a, work)
    pool.update(epochs=pool_epochs, rho=a.rho)
    print(f"pool: {pool}")

    rows = []
    for method in methods:
        for ipc in ipcs:
            base = dict(QUICK[method] if a.quick else SETTINGS[method].get(ipc, SETTINGS[method][1]))
            if method in iters:
                base["iterations"] = int(iters[method])
            base.update(width=a.width, seed=a.seed)
            from mttlite.baselines import make_set

            make_set(method, ds, ipc, **{**base, "iterations": 1})  # warm-up, not timed: first calls are slower
            variants = [("plain", base)]
            for f in fractions:
                n = max(1, math.ceil(f * base["iterations"]))
                if f < 1:  # the control: the same cut budget without model augmentation
                    variants.append((f"plain ×{f:g}", {**base, "iterations": n}))
                variants.append((f"MA ×{f:g}", {**base, "iterations": n, "model_pool": buf, "pool_epochs": pool_epochs,
                                                "rho": a.rho}))
            for variant, kw in variants:
                row = run_row(method, ipc, variant, kw, ds, protocol, work)
                rows.append(row)
                print(f"  {method} ipc{ipc} {variant}: {row['iterations']} it, {row['build_seconds']:.1f} s, "
                      f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f} %", flush=True)
    md = table(rows)
    note = (f"\nPool: {pool['experts']} experts, epochs {pool_epochs} of {pool['buffer']} (training them took "
            f"{pool['train_seconds']:.1f} s once, shared by every run and by MTT); ρ = {a.rho:g}. "
            f"Protocol: {protocol.describe()}. Hardware: {hardware()}, {a.threads} thread(s). "
            f"Total {time.perf_counter() - t0:.0f} s.\n`{command}`")
    print(md + "\n" + note)
    doc = {"hardware": hardware(), "rows": rows, "protocol": protocol.to_dict(), "protocol_text": protocol.describe(),
           "pool": pool, "command": command, "threads": a.threads}
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    (out / f"{name}.md").write_text(md + "\n" + note + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
