"""DD-Ranking's scores (LRS, ARS) and DC-Bench's swaps for several distilled sets, as two tables.

    .venv/bin/python benchmarks/scores_table.py --table embedded          # MTT, DM, random of the embedded table
    .venv/bin/python benchmarks/scores_table.py --table fmnist-cpu        # the same sets of the full-data run
    .venv/bin/python benchmarks/scores_table.py --sets mtt=A.safetensors dm=B.safetensors --dataset fashion-mnist-mini
    .venv/bin/python benchmarks/scores_table.py --quick --out /tmp/scores  # smoke test on tiny sets it builds

Each set is judged by ``mttlite evaluate SET --scores --swaps`` (one subprocess per set, so exactly
what a user's command gives), under ONE protocol for every set (``--epochs``, ``--num-nets``,
``--width``; the set's learned α as η, DSA) and the same swaps (augmentation none / DSA / crop /
flip, ``--swap-archs``, ``--swap-epochs``). The full-data accuracy that LRS needs (Acc(real, hard))
is measured once per data set (``mttlite.scores.full_data_accuracy``: no augmentation, η = 0.01,
``--full-epochs``, at the sets' own width, which they must share unless ``--width`` is given) and
handed to every set, or given with ``--full-acc``.

Resumable: each set's ``results.json`` is kept in ``<out>/sets/<name>.json`` and reused when its
protocol is the one asked for; the full-data accuracy in ``<out>/full-<dataset>.json``. Outputs:
``<out>/scores.md`` (both tables, the commands, the hardware) and ``<out>/scores.json``.

Accuracies are final-epoch test accuracies (never the best over epochs); what departs from
DD-Ranking's own code is listed in ``mttlite/scores.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Named tables: (name, set path, data set). "embedded": benchmarks/baselines_table.py's sets (seed 0);
#: "fmnist-cpu": IPC 1 from benchmarks/reproduce_fmnist.py --size cpu --out runs/fmnist/cpu2; IPC 10 from its
#: rebuild on CPU (docs/results.md): reproduce_fmnist.py --size cpu --ipc 10 --methods mtt random dm
#: --stages experts distill baselines --baseline-iterations dm=464 --out runs/fmnist/cpu3.
TABLES: dict[str, list[tuple[str, str, str]]] = {
    "embedded": [(f"{m}-ipc{i}", f"runs/bench/baselines/sets/{m}-ipc{i}-s0.safetensors", "fashion-mnist-mini")
                 for i in (1, 10) for m in ("mtt", "dm", "random")],
    "fmnist-cpu": [(f"{m}-ipc{i}", p, "fashion-mnist")
                   for i, run in ((1, "cpu2"), (10, "cpu3"))
                   for m, p in (("mtt", f"runs/fmnist/{run}/mtt-ipc{i}/synset.safetensors"),
                                ("dm", f"runs/fmnist/{run}/sets/dm-ipc{i}.safetensors"),
                                ("random", f"runs/fmnist/{run}/sets/random-ipc{i}.safetensors"))],
}


def _write_json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def _protocol_flags(a) -> list[str]:
    flags = ["--epochs", str(a.epochs), "--num-nets", str(a.num_nets), "--seed", "0"]
    if a.width is not None:
        flags += ["--width", str(a.width)]
    return flags


def set_width(paths: list[str]) -> int | None:
    """The one ConvNet width the sets were made for (what ``mttlite evaluate`` uses without --width);
    a ValueError when they differ (then the table needs --width)."""
    from mttlite.synset import SyntheticSet

    widths = {SyntheticSet.load(ROOT / p if (ROOT / p).exists() else p).arch_kwargs.get("width") for p in paths}
    if len(widths) > 1:
        raise ValueError(f"the sets were made for different widths {sorted(widths, key=str)}: pass --width "
                         "so that every set and the full-data accuracy share one protocol")
    return widths.pop()


def full_accuracy(dataset: str, a, out: Path, width: int | None) -> float:
    """Acc(real, hard) for ``dataset`` under the table's protocol (at ``width``, the sets' width unless
    --width): given, cached, or measured once."""
    if a.full_acc is not None:
        return a.full_acc
    path = out / f"full-{dataset}.json"
    want = {"dataset": dataset, "epochs": a.full_epochs, "num_nets": a.num_nets, "width": width}
    if path.exists():
        doc = json.loads(path.read_text())
        if doc.get("inputs") == want:
            return doc["mean"]
    import torch

    from mttlite.data import load_dataset
    from mttlite.evaluate import EvalProtocol
    from mttlite.scores import full_data_accuracy

    torch.set_num_threads(a.threads)
    ds = load_dataset(dataset, root=a.data_root)
    kw = {} if width is None else {"width": width}
    res = full_data_accuracy(ds, EvalProtocol(epochs=a.epochs, num_nets=a.num_nets, seed=0, **kw), a.full_epochs)
    _write_json(path, {"inputs": want, "mean": res.mean, "std": res.std, "accs": res.accs, "seconds": res.seconds})
    print(f"full data ({dataset}, {a.full_epochs} epochs, {a.num_nets} nets): {100 * res.mean:.2f} %", flush=True)
    return res.mean


def evaluate_one(name: str, path: str, dataset: str, full_acc: float, a, out: Path) -> dict:
    """``mttlite evaluate PATH --scores --swaps …`` into ``<out>/sets/<name>.json`` (reused when its protocol matches)."""
    res_path = out / "sets" / f"{name}.json"
    cmd = [sys.executable, "-m", "mttlite", "evaluate", str(path), "--data-root", a.data_root, *_protocol_flags(a),
           "--scores", "--full-acc", repr(full_acc), "--swaps", "--out", str(res_path)]
    if a.swap_archs:
        cmd += ["--swap-archs", a.swap_archs]
    if a.swap_epochs:
        cmd += ["--swap-epochs", a.swap_epochs]
    if res_path.exists():
        doc = json.loads(res_path.read_text())
        if doc.get("command") == cmd[3:]:
            print(f"{name}: cached ({res_path})", flush=True)
            return doc
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{name}: `{shlex.join(cmd)}` failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    doc = json.loads(res_path.read_text())
    doc["command"] = cmd[3:]
    doc["wall_seconds"] = round(time.perf_counter() - t0, 1)
    _write_json(res_path, doc)
    print(f"{name}: LRS {100 * doc['scores']['lrs']:.1f}, ARS {100 * doc['scores']['ars']:.1f} "
          f"({doc['wall_seconds']:.0f} s)", flush=True)
    return doc


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def tables(docs: dict[str, dict]) -> str:
    head = ("| set | IPC | η | Acc(syn) | Acc(rdm) | Acc(real) | HLR | IOR | LRS | Acc(syn/rdm, aug) | "
            "Acc(syn/rdm, no aug) | ARS |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, d in docs.items():
        sc, acc = d["scores"], d["scores"]["accuracies"]
        lines.append(f"| {name} | {d['set']['ipc']} | {d['result']['lr']:.4g} | {_pct(acc['syn_any'])} | "
                     f"{_pct(acc['rdm_any'])} | {_pct(acc['real_hard'])} | {_pct(sc['hlr'])} | {_pct(sc['ior'])} | "
                     f"**{_pct(sc['lrs'])}** | {_pct(acc['syn_aug'])} / {_pct(acc['rdm_aug'])} | "
                     f"{_pct(acc['syn_naug'])} / {_pct(acc['rdm_naug'])} | **{_pct(sc['ars'])}** |")
    score_table = "\n".join(lines)

    names = list(docs)
    rows: dict[str, dict[str, str]] = {}
    for name, d in docs.items():
        for r in d["swaps"]:
            swap = "base (as declared)" if r["factor"] == "base" else f"{r['factor']} = {r['value']}"
            rows.setdefault(swap, {})[name] = f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"
    lines = ["| swap | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for swap, cells in rows.items():
        lines.append(f"| {swap} | " + " | ".join(cells.get(n, "–") for n in names) + " |")
    return score_table + "\n\n" + "\n".join(lines)


def _quick_sets(out: Path) -> list[tuple[str, str, str]]:
    """Two tiny IPC 1 sets of the embedded data, made here: the random real subset the scores compare with
    (seed 0, so its IOR is exactly 0), and the same images carrying α = 0.02."""
    from mttlite.data import load_dataset
    from mttlite.evaluate import random_real_subset
    from mttlite.synset import SyntheticSet

    ds = load_dataset("fashion-mnist-mini")
    x, y = random_real_subset(ds, 1, seed=0)  # the subset mttlite.scores draws (random_seed 0)
    sets = []
    for name, lr in (("random", None), ("random-lr", 0.02)):
        s = SyntheticSet(images=x.clone(), labels=y.clone(), syn_lr=lr, dataset=ds.name, class_names=list(ds.class_names),
                         mean=tuple(ds.mean), std=tuple(ds.std), arch="convnet", arch_kwargs={"width": 8},
                         method="random")
        path = out / "quick-sets" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        s.save(path)
        sets.append((name, str(path), ds.name))
    return sets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=sorted(TABLES), help="a named list of sets (module docstring)")
    p.add_argument("--sets", nargs="+", default=[], metavar="NAME=PATH", help="sets to score (with --dataset)")
    p.add_argument("--dataset", default=None, help="the data set of the --sets")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/scores-<table>)")
    p.add_argument("--epochs", type=int, default=300, help="epochs per evaluation network (300)")
    p.add_argument("--num-nets", type=int, default=3, help="networks per accuracy (3)")
    p.add_argument("--width", type=int, default=None, help="network width (default: each set's own)")
    p.add_argument("--swap-archs", default="mlp", help="evaluation networks for the swaps (mlp)")
    p.add_argument("--swap-epochs", default="100", help="epoch counts for the swaps (100)")
    p.add_argument("--full-acc", type=float, default=None, help="a known Acc(real, hard) in [0, 1] (else measured)")
    p.add_argument("--full-epochs", type=int, default=20, help="epochs on the whole training set (20)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="two tiny sets, width 8, 3 epochs, 2 nets: < 2 min")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.num_nets, a.width, a.full_epochs, a.swap_epochs = 3, 2, 8, 1, "2"
    out = Path(a.out or f"runs/bench/scores-{a.table or ('quick' if a.quick else 'sets')}")
    if a.quick:
        sets = _quick_sets(out)
    elif a.table:
        sets = TABLES[a.table]
    elif a.sets and a.dataset:
        sets = [(s.split("=", 1)[0], s.split("=", 1)[1], a.dataset) for s in a.sets if "=" in s]
        if len(sets) != len(a.sets):
            p.error("--sets takes NAME=PATH pairs")
    else:
        p.error("give --table, --quick, or --sets NAME=PATH … with --dataset")
    missing = [path for _, path, _ in sets if not (ROOT / path).exists() and not Path(path).exists()]
    if missing:
        p.error(f"missing set file(s): {missing} (build them first: the module docstring says with which command)")

    t0 = time.perf_counter()
    try:
        width = a.width if a.width is not None else set_width([path for _, path, _ in sets])
    except ValueError as e:
        p.error(str(e))
    full = {ds: full_accuracy(ds, a, out, width) for ds in sorted({d for _, _, d in sets})}
    docs = {name: evaluate_one(name, path, ds, full[ds], a, out) for name, path, ds in sets}
    command = shlex.join(["benchmarks/scores_table.py", *(sys.argv[1:] if argv is None else argv)])
    from common import hardware  # benchmarks/common.py (imported here, so --help needs no torch)

    text = "\n".join([
        f"DD-Ranking's scores and DC-Bench's swaps — {', '.join(sorted(full))}; every accuracy a final-epoch test "
        f"accuracy, mean ± std over {a.num_nets} networks, {a.epochs} epochs, DSA, η = the set's α (0.01 without one); "
        f"Acc(real, hard) = " + ", ".join(f"{100 * v:.2f} % ({k})" for k, v in full.items()) + ".", "",
        tables(docs), "", f"Command: `{command}`; hardware: {hardware()}; wall {time.perf_counter() - t0:.0f} s this run.",
    ])
    (out / "scores.md").write_text(text + "\n")
    _write_json(out / "scores.json", {"full_acc": full, "sets": docs, "command": command, "hardware": hardware()})
    print("\n" + text)
    print(f"wrote {out / 'scores.md'}, {out / 'scores.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
