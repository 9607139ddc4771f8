"""Every method × IPC × evaluation architecture, built and judged under ONE protocol, as a table.

    .venv/bin/python benchmarks/baselines_table.py                      # the CPU run of docs/results.md
    .venv/bin/python benchmarks/baselines_table.py --quick              # a smoke test (seconds-sized)
    .venv/bin/python benchmarks/baselines_table.py --methods random,dm --ipcs 1 --archs convnet,mlp

For each (method, ipc, seed) a set is built with ``mttlite.baselines.make_set`` (MTT: expert buffer
trained once into a cached directory, then ``pipeline.distill_set`` with ``preset("demo", ...)``),
saved, and evaluated with ``evaluate.evaluate_set`` under one ``EvalProtocol`` per architecture. The
protocol (``describe()`` and ``to_dict()``) is printed, and saved beside every result JSON and in
the table's JSON. Cells run in ``--workers`` processes with one torch thread each; finished cells are
cached under ``--out`` (rerun to resume, ``--fresh`` to rebuild).

Outputs: ``<out>/sets/*.safetensors``, ``<out>/results/*.json`` (EvalResult + set cost), and
``runs/bench/baselines.{md,csv,json}`` (``--table-prefix``): mean ± std of the final test accuracy
over (seeds × nets) networks, and the wall time to build each set.

Sizes are CPU-sized (METHOD_SETTINGS below, printed with the table) — NOT the papers' protocol.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Per method and ipc: the options passed to make_set (besides seed and width). Chosen so the whole
#: default run fits in about 25 minutes on 2 CPU cores; the papers run 10-100x longer.
METHOD_SETTINGS: dict[str, dict[int, dict]] = {
    "random": {1: {}, 10: {}},
    "herding": {1: {}, 10: {}},  # embedding: randomly initialised ConvNet (width as below)
    "kcenter": {1: {}, 10: {}},
    "forgetting": {1: {"epochs": 4}, 10: {"epochs": 4}},
    "dc": {1: {"iterations": 200, "batch_real": 64},
           10: {"iterations": 15, "outer_loop": 10, "inner_loop": 10, "batch_real": 64}},
    "dsa": {1: {"iterations": 200, "batch_real": 64},
            10: {"iterations": 15, "outer_loop": 10, "inner_loop": 10, "batch_real": 64}},
    "dcc": {1: {"iterations": 200, "batch_real": 64},
            10: {"iterations": 15, "outer_loop": 10, "inner_loop": 10, "batch_real": 64}},
    "dm": {1: {"iterations": 300, "batch_real": 128}, 10: {"iterations": 300, "batch_real": 128}},
    # preset("demo") (N=10, M=2, T+=3, lr_img=100, lr_lr=1e-6, α0=0.01) with the settings that the full
    # Fashion-MNIST's held-out validation split chose (benchmarks/tune_mtt.py; docs/results.md): IPC 1 as
    # that run (N=20, T+=2, lr_img=3000, lr_lr=1e-7), IPC 10 α0=0.03 and T+=6 (needs 8 stored epochs)
    "mtt": {1: {"iterations": 200, "syn_steps": 20, "max_start_epoch": 2, "lr_img": 3000.0, "lr_lr": 1e-7},
            10: {"iterations": 60, "max_start_epoch": 6, "lr_teacher": 0.03, "lr_lr": 1e-5}},
}
QUICK_SETTINGS: dict[str, dict] = {
    "forgetting": {"epochs": 2},
    "dc": {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 16},
    "dsa": {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 16},
    "dcc": {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 16},
    "dm": {"iterations": 3, "batch_real": 16},
    "mtt": {"iterations": 3},
}
#: Rough relative cost, to start the longest cells first.
COST_HINT = {"dc": 5, "dsa": 5, "dcc": 5, "mtt": 6, "dm": 4, "forgetting": 2, "herding": 1, "kcenter": 1, "random": 0}
DATASET = "fashion-mnist-mini"

_DATA = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _dataset():
    from mttlite.data import load_dataset

    if "ds" not in _DATA:
        _DATA["ds"] = load_dataset(DATASET)
    return _DATA["ds"]


def _protocol(arch: str, args):
    from mttlite.evaluate import EvalProtocol

    width = args.width if arch in ("convnet", "convnetd4", "convnetd5", "mlp") else 128
    return EvalProtocol(arch=arch, width=width, epochs=args.eval_epochs, num_nets=args.num_nets, seed=0)


def _key(method: str, ipc: int, seed: int) -> str:
    return f"{method}-ipc{ipc}-s{seed}"


def _train_experts_rank(rank: int, world: int, args_dict: dict) -> str:
    """One rank of the MTT expert buffer (experts i with i % world == rank)."""
    from mttlite.experts import train_experts

    train_experts(_dataset(), args_dict["buffer"], num_experts=args_dict["num_experts"],
                  train_epochs=args_dict["expert_epochs"], width=args_dict["width"], progress=False,
                  rank=rank, world_size=world)
    return f"rank {rank} done"


def run_cell(method: str, ipc: int, seed: int, settings: dict, args_dict: dict) -> list[dict]:
    """Build one set, save it, evaluate it on every arch; returns one row per arch (cached as JSON)."""
    import torch

    from mttlite.baselines import make_set
    from mttlite.synset import SyntheticSet

    args = argparse.Namespace(**args_dict)
    out = Path(args.out)
    key = _key(method, ipc, seed)
    ds = _dataset()
    set_path = out / "sets" / f"{key}.safetensors"
    if set_path.exists() and not args.fresh:
        s = SyntheticSet.load(set_path)
    else:
        kw = dict(settings)
        if method == "mtt":
            kw.update(buffer=args.buffer, preset="demo")
        elif method != "random":
            kw["width"] = args.width
        s = make_set(method, ds, ipc, seed=seed, **kw)
        s.save(set_path)
    rows = []
    for arch in args.archs:
        res_path = out / "results" / f"{key}-{arch}.json"
        if res_path.exists() and not args.fresh:
            rows.append(json.loads(res_path.read_text())["row"])
            continue
        protocol = _protocol(arch, args)
        res = s.evaluate(ds, protocol, progress=False)
        cost = s.provenance.get("cost", {})
        row = {"method": method, "ipc": ipc, "seed": seed, "arch": arch, "mean": res.mean, "std": res.std,
               "accs": res.accs, "eval_lr": res.lr, "build_seconds": cost.get("seconds"),
               "peak_rss_mib": cost.get("peak_rss_mib"), "eval_seconds": round(res.seconds, 2),
               "settings": settings, "threads": torch.get_num_threads()}
        doc = {"row": row, "result": res.to_dict(), "protocol": protocol.to_dict(), "protocol_text": protocol.describe(),
               "set_config": s.config, "set_provenance": {k: v for k, v in s.provenance.items() if k != "indices"}}
        res_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = res_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, res_path)
        rows.append(row)
    return rows


def _hardware() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, no GPU used"


def _aggregate(rows: list[dict]) -> dict:
    """(method, ipc, arch) -> pooled accs over seeds and nets, per-seed means, mean build seconds."""
    agg = {}
    for r in rows:
        a = agg.setdefault((r["method"], r["ipc"], r["arch"]), {"accs": [], "seed_means": [], "build": []})
        a["accs"] += r["accs"]
        a["seed_means"].append(r["mean"])
        a["build"].append(r["build_seconds"] or 0.0)
    return agg


def _table(agg: dict, methods, ipcs, archs) -> str:
    head = ["method"] + [f"{a} IPC {i}" for a in archs for i in ipcs] + [f"build s (IPC {i})" for i in ipcs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [m]
        for a in archs:
            for i in ipcs:
                v = agg.get((m, i, a))
                if v is None:
                    cells.append("-")
                else:
                    n = len(v["accs"])
                    cells.append(f"{100 * np.mean(v['accs']):.1f} ± {100 * np.std(v['accs']):.1f} (n={n})")
        for i in ipcs:
            v = agg.get((m, i, archs[0]))
            cells.append("-" if v is None else f"{np.mean(v['build']):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="random,herding,kcenter,forgetting,dc,dsa,dm,dcc,mtt")
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--archs", default="convnet", help="evaluation architectures, comma-separated")
    p.add_argument("--width", type=int, default=32, help="ConvNet width for building and evaluating")
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--num-nets", type=int, default=3)
    p.add_argument("--seeds", default="0", help="method seeds for every cell")
    p.add_argument("--extra-seeds-ipc1", default="random:1,2;dc:1;dm:1;mtt:1",
                   help="additional seeds at IPC 1 for the ordering check, 'method:s1,s2;...'")
    p.add_argument("--num-experts", type=int, default=5)
    p.add_argument("--expert-epochs", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", default="runs/bench/baselines")
    p.add_argument("--table-prefix", default="runs/bench/baselines")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script end to end in ~a minute")
    p.add_argument("--fresh", action="store_true", help="ignore cached sets and results")
    a = p.parse_args(argv)

    methods = [m for m in a.methods.split(",") if m]
    ipcs = [int(i) for i in a.ipcs.split(",")]
    archs = [x for x in a.archs.split(",") if x]
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.quick:
        a.eval_epochs, a.num_nets, a.width, a.num_experts, a.expert_epochs = 5, 1, 8, 1, 4
        a.out, a.table_prefix = a.out + "-quick", a.table_prefix + "-quick"
    from mttlite.baselines import METHODS

    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    extra = {}
    for part in filter(None, a.extra_seeds_ipc1.split(";")):
        m, ss = part.split(":")
        extra[m] = [int(s) for s in ss.split(",") if s]

    out = Path(a.out)
    a.buffer = str(out / f"buffer-w{a.width}-n{a.num_experts}-e{a.expert_epochs}")
    args_dict = {**vars(a), "archs": archs}
    protocols = {arch: _protocol(arch, a) for arch in archs}
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else str(argv)
    print(f"data: {DATASET} (embedded Fashion-MNIST: 6000 train / 1000 test, 1x28x28)")
    print(f"hardware: {_hardware()}; {a.workers} worker processes x {a.threads} torch thread(s)")
    for arch, pr in protocols.items():
        print(f"protocol [{arch}]: {pr.describe()}")
        print(f"  {json.dumps(pr.to_dict())}")

    jobs = []
    for m in methods:
        for i in ipcs:
            settings = QUICK_SETTINGS.get(m, {}) if a.quick else METHOD_SETTINGS[m].get(i, {})
            for s in seeds + (extra.get(m, []) if i == 1 else []):
                jobs.append((m, i, s, settings))
    jobs.sort(key=lambda j: -(COST_HINT.get(j[0], 1) * (3 if j[1] > 1 else 1)))
    for m, i, s, st in sorted(jobs):
        print(f"  cell {_key(m, i, s)}: {json.dumps(st)}")

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows, failures = [], []
    ctx = get_context("spawn")
    with ProcessPoolExecutor(a.workers, mp_context=ctx, initializer=_init_worker, initargs=(a.threads,)) as pool:
        if "mtt" in methods:
            t = time.perf_counter()
            world = min(a.workers, a.num_experts)
            for f in [pool.submit(_train_experts_rank, r, world, args_dict) for r in range(world)]:
                f.result()
            print(f"experts: {a.num_experts} x {a.expert_epochs} epochs, ConvNet width {a.width} -> {a.buffer} "
                  f"({time.perf_counter() - t:.0f} s, cached)")
        futures = {pool.submit(run_cell, m, i, s, st, args_dict): (m, i, s) for m, i, s, st in jobs}
        for f in as_completed(futures):
            m, i, s = futures[f]
            try:
                got = f.result()
            except Exception as e:  # noqa: BLE001 - one failed cell does not lose the table
                failures.append((_key(m, i, s), repr(e)))
                print(f"FAILED {_key(m, i, s)}: {e}\n{traceback.format_exc()}", flush=True)
                continue
            rows += got
            for r in got:
                print(f"[{time.perf_counter() - t0:6.0f}s] {_key(m, i, s)} {r['arch']}: "
                      f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} %  (build {r['build_seconds']:.0f} s, "
                      f"eval {r['eval_seconds']:.0f} s)", flush=True)
    wall = time.perf_counter() - t0

    agg = _aggregate(rows)
    table = _table(agg, methods, ipcs, archs)
    print("\nFinal-epoch test accuracy (%), mean ± std over all networks of all seeds (n); build = wall s to make the set")
    print(table)

    sanity = []
    base = agg.get(("random", 1, archs[0]))
    if base is not None and 1 in ipcs:
        rb = float(np.mean(base["accs"]))
        sanity.append(f"Ordering at IPC 1 ({archs[0]}), vs random real = {100 * rb:.1f} % "
                      f"(per-seed means {', '.join(f'{100 * v:.1f}' for v in base['seed_means'])}):")
        for m in methods:
            v = agg.get((m, 1, archs[0]))
            if m == "random" or v is None:
                continue
            margin = 100 * (float(np.mean(v["accs"])) - rb)
            verdict = "beats" if margin > 0 else "does NOT beat"
            sanity.append(f"  {m:10s} {100 * np.mean(v['accs']):5.1f} %  margin {margin:+5.1f} pp  ({verdict} random; "
                          f"per-seed means {', '.join(f'{100 * s:.1f}' for s in v['seed_means'])})")
    print("\n" + "\n".join(sanity))
    print(f"\ntotal wall {wall:.0f} s; load average 1 min: {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    if failures:
        print(f"failed cells: {failures}")

    prefix = Path(a.table_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.csv.tmp", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "ipc", "seed", "arch", "mean", "std", "accs", "eval_lr", "build_seconds",
                    "peak_rss_mib", "eval_seconds", "settings"])
        for r in sorted(rows, key=lambda r: (r["method"], r["ipc"], r["seed"], r["arch"])):
            w.writerow([r["method"], r["ipc"], r["seed"], r["arch"], f"{r['mean']:.4f}", f"{r['std']:.4f}",
                        " ".join(f"{x:.4f}" for x in r["accs"]), r["eval_lr"], r["build_seconds"], r["peak_rss_mib"],
                        r["eval_seconds"], json.dumps(r["settings"])])
    os.replace(f"{prefix}.csv.tmp", f"{prefix}.csv")
    md = [f"# Baselines table ({DATASET}, CPU, small sizes)", "", f"Command: `{command}`", "",
          f"Hardware: {_hardware()}; {a.workers} workers x {a.threads} thread(s); total wall {wall:.0f} s", ""]
    md += [f"Protocol [{arch}]: {pr.describe()}" for arch, pr in protocols.items()]
    md += ["", table, "", *sanity, "", "Settings per cell:", ""]
    md += [f"- {_key(m, i, s)}: `{json.dumps(st)}`" for m, i, s, st in sorted(jobs)]
    Path(f"{prefix}.md.tmp").write_text("\n".join(md) + "\n")
    os.replace(f"{prefix}.md.tmp", f"{prefix}.md")
    doc = {"command": command, "hardware": _hardware(), "wall_seconds": wall, "workers": a.workers,
           "threads": a.threads, "protocols": {k: v.to_dict() for k, v in protocols.items()},
           "protocol_text": {k: v.describe() for k, v in protocols.items()}, "rows": rows, "failures": failures,
           "sanity": sanity, "expert_buffer": a.buffer if "mtt" in methods else None}
    Path(f"{prefix}.json.tmp").write_text(json.dumps(doc, indent=1, default=str))
    os.replace(f"{prefix}.json.tmp", f"{prefix}.json")
    print(f"wrote {prefix}.md, {prefix}.csv, {prefix}.json")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
