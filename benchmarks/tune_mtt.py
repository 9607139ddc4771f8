"""Choose MTT's hyper-parameters on the HELD-OUT VALIDATION split, never on the test set.

    .venv/bin/python benchmarks/tune_mtt.py --run runs/fmnist/cpu --size cpu --ipc 1 \\
        --iterations 100 --grid lr_teacher=0.01,0.03,0.1 lr_img=100,1000 --threads 1

A grid search over ``DistillConfig`` fields for one IPC, on a run folder that
``benchmarks/reproduce_fmnist.py`` made (it reuses the folder's data split, checked against its
``data.json``, and its expert ``buffer``). Every grid point is distilled for ``--iterations``
iterations into ``<run>/tune/ipc<k>/<point>/`` (resumable: a finished point is read back, an
interrupted one resumes from its checkpoint), then fresh ConvNet-3s at the buffer's width are
trained on the set (``reproduce_fmnist``'s protocol, ``--eval-epochs`` x ``--num-nets``) and scored
on the validation images that ``holdout_validation`` held out of the training set before the
experts were trained. The test images are not looked at: choosing by test accuracy would make the
test column of the results table optimistic.

Prints a table sorted by validation accuracy and the ``--mtt`` arguments of the best point, to
pass to ``reproduce_fmnist.py``; writes ``<run>/tune/ipc<k>/results.{json,md}``.

A point whose distillation diverges (``DistillationDiverged``: α or the pixels ran away) is kept in
the table as "diverged", with the iteration it reached.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import reproduce_fmnist as rf  # noqa: E402
from common import hardware  # noqa: E402

from mttlite.buffers import ExpertBuffer  # noqa: E402
from mttlite.distill import DistillConfig, DistillationDiverged  # noqa: E402
from mttlite.evaluate import resolve_lr, test_accuracy, train_on_set  # noqa: E402
from mttlite.pipeline import distill_set  # noqa: E402

FIELDS = {f.name: f.type for f in DistillConfig.__dataclass_fields__.values()}


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["lr_img=100,1000", "syn_steps=20"]`` -> {"lr_img": [100, 1000], "syn_steps": [20]}."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values:
            raise SystemExit(f"--grid expects KEY=V1,V2,..., got {item!r}")
        if key not in FIELDS:
            raise SystemExit(f"--grid: {key!r} is not a DistillConfig field (one of: {', '.join(sorted(FIELDS))})")
        if key in ("ipc", "iterations", "dataset"):
            raise SystemExit(f"--grid: {key} is set by --ipc / --iterations / the run folder, not searched")
        out = []
        for v in values.split(","):
            try:
                out.append(json.loads(v))
            except json.JSONDecodeError:
                out.append(v)
        grid[key] = out
    return grid


def slug(point: dict) -> str:
    return "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "preset"


def validation_accuracy(s, ds, protocol, device, partial: Path) -> dict:
    """Train ``protocol.num_nets`` fresh networks on the set (``evaluate_set``'s per-network seeds)
    and score each on ``ds.val_images`` only. Resumable per network."""
    eta = resolve_lr(protocol, s.syn_lr)
    seeds = torch.randint(2**31, (protocol.num_nets,), generator=torch.Generator().manual_seed(protocol.seed)).tolist()
    nets = []
    if partial.exists():
        done = rf.read_json(partial)
        if done.get("protocol") == protocol.to_dict():
            nets = [n for n, seed in zip(done["nets"], seeds) if n["seed"] == seed]
    for seed in seeds[len(nets):]:
        t0 = time.perf_counter()
        model, info = train_on_set(s.images, s.labels, ds, protocol, eta, seed, device=device)
        nets.append({"seed": seed, "val": test_accuracy(model, ds.val_images, ds.val_labels),
                     "train": info["train_acc"], "seconds": round(time.perf_counter() - t0, 3)})
        rf.write_json(partial, {"protocol": protocol.to_dict(), "nets": nets})
    val = [n["val"] for n in nets]
    return {"lr": eta, "val_accs": val, "val_mean": float(np.mean(val)), "val_std": float(np.std(val)),
            "eval_seconds": round(sum(n["seconds"] for n in nets), 2)}


def run_point(run: Path, ds, cfg: dict, ipc: int, iterations: int, point: dict, protocol, device,
              progress: bool) -> dict:
    folder = run / "tune" / f"ipc{ipc}" / slug(point)
    result_path = folder / "result.json"
    config = rf.mtt_config(ds, cfg, ipc, iterations, {ipc: point})
    if result_path.exists():
        rec = rf.read_json(result_path)
        # through from_dict: a record written before a field existed reads it as its default
        if DistillConfig.from_dict(rec["config"]) == config and rec["protocol"] == protocol.to_dict():
            return rec
        raise SystemExit(f"{result_path} holds another config or protocol than this command: delete {folder}")
    t0 = time.perf_counter()
    rec = {"point": point, "config": config.to_dict(), "protocol": protocol.to_dict()}
    try:
        s = distill_set(config, run / "buffer", folder, dataset=ds, device=device, progress=progress)
    except DistillationDiverged as e:
        # the message's first clause: "iteration k: the update was refused: <what> (<why>)..."
        reason = str(e).splitlines()[0].split(" (")[0].split(". ")[0]
        rec.update(status="diverged", reason=reason, seconds=round(time.perf_counter() - t0, 2))
        rf.write_json(result_path, rec)
        return rec
    rec.update(status="ok", seconds=s.provenance["seconds"], syn_lr=s.syn_lr,
               final_loss=s.provenance.get("final_loss"))
    rec.update(validation_accuracy(s, ds, protocol, device, folder / "eval.partial.json"))
    rf.write_json(result_path, rec)
    (folder / "eval.partial.json").unlink(missing_ok=True)
    return rec


def table(records: list[dict], keys: list[str]) -> str:
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: -r["val_mean"])
    bad = [r for r in records if r["status"] != "ok"]
    head = "| " + " | ".join(keys) + " | val % (mean ± std) | learned α | final L | distil s |"
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for r in ok:
        cells = [f"{r['point'][k]:g}" if isinstance(r["point"][k], float) else str(r["point"][k]) for k in keys]
        lines.append("| " + " | ".join(cells) + f" | {100 * r['val_mean']:.2f} ± {100 * r['val_std']:.2f} | "
                     f"{r['syn_lr']:.4g} | {r['final_loss']:.3f} | {r['seconds']:.0f} |")
    for r in bad:
        cells = [str(r["point"][k]) for k in keys]
        lines.append("| " + " | ".join(cells) + f" | diverged: {r['reason']} | – | – | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a reproduce_fmnist.py run folder (data.json + buffer)")
    p.add_argument("--size", choices=sorted(rf.SIZES), default="cpu", help="the size that made --run")
    p.add_argument("--ipc", type=int, required=True)
    p.add_argument("--iterations", type=int, required=True, help="MTT iterations per grid point")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="DistillConfig fields and their values; the grid is their product")
    p.add_argument("--eval-epochs", type=int, default=None, help="evaluation epochs (default: the size's)")
    p.add_argument("--num-nets", type=int, default=2, help="evaluation networks per point")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", choices=("auto", "full", "mini"), default="auto")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--cached-only", action="store_true",
                   help="compute nothing: the table of the grid points already finished (others are listed as missing)")
    args = p.parse_args(argv)

    run = Path(args.run)
    for need in (run / "data.json", run / "buffer" / "meta.json"):
        if not need.exists():
            raise SystemExit(f"{need} is missing: make the run folder first with "
                             f"benchmarks/reproduce_fmnist.py --size {args.size} --out {run} --stages experts")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = dict(rf.SIZES[args.size])
    buf = ExpertBuffer.open(run / "buffer")
    cfg["train_epochs"] = buf.epochs[-1]  # T+ is clipped to what the buffer stores
    cfg["keep_epochs"] = None
    grid = parse_grid(args.grid)
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*grid.values())] or [{}]
    protocol = rf.protocol_for("convnet", {**cfg, "width": buf.meta["arch_kwargs"]["width"]}, args.eval_epochs or cfg["eval_epochs"],
                               args.num_nets)
    print(f"tune_mtt: run {run}, IPC {args.ipc}, {len(points)} point(s) x {args.iterations} iterations, "
          f"validation: {protocol.describe()}\nhardware: {hardware()}; {torch.get_num_threads()} torch thread(s)",
          flush=True)
    log = rf.StageLog()
    ds, _ = rf.stage_data(run, args.size, cfg, device, args.data, log)
    records = []
    for i, point in enumerate(points):
        if args.cached_only and not (run / "tune" / f"ipc{args.ipc}" / slug(point) / "result.json").exists():
            print(f"[{i + 1}/{len(points)}] {slug(point)}: not computed (--cached-only)", flush=True)
            continue
        rec = run_point(run, ds, cfg, args.ipc, args.iterations, point, protocol, device, args.progress)
        records.append(rec)
        msg = (f"val {100 * rec['val_mean']:.2f} ± {100 * rec['val_std']:.2f} %, α {rec['syn_lr']:.4g}, "
               f"L {rec['final_loss']:.3f}" if rec["status"] == "ok" else f"diverged ({rec['reason']})")
        print(f"[{i + 1}/{len(points)}] {slug(point)}: {msg}, {rec['seconds']:.0f} s", flush=True)
    md = table(records, keys)
    ok = [r for r in records if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["val_mean"]) if ok else None
    out = run / "tune" / f"ipc{args.ipc}"
    rf.write_json(out / "results.json", {"ipc": args.ipc, "iterations": args.iterations, "grid": grid,
                                         "protocol": protocol.to_dict(), "hardware": hardware(),
                                         "records": records, "best": best and best["point"]})
    header = (f"MTT IPC {args.ipc}, {args.iterations} iterations per point, chosen on the held-out validation "
              f"split ({len(ds.val_labels)} images); {protocol.describe()}\n\n")
    (out / "results.md").write_text(header + md + "\n")
    print("\n" + md)
    if best:
        over = " ".join(f"{args.ipc}:{k}={v}" for k, v in best["point"].items())
        print(f"\nbest on validation: {slug(best['point'])} ({100 * best['val_mean']:.2f} %)\n"
              f"  -> reproduce_fmnist.py --mtt {over}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
