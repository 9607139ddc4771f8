"""Plain MTT against each member of the trajectory-matching family, alone and all together, as one table.

    .venv/bin/python benchmarks/family_table.py                           # default CPU sizes (see below)
    .venv/bin/python benchmarks/family_table.py --quick --out /tmp/fam    # smoke test, < 60 s
    .venv/bin/python benchmarks/family_table.py --variants mtt,soft --ipcs 1 --workers 2
    .venv/bin/python benchmarks/family_table.py --from-run runs/fmnist/cpu2 --ipcs 1   # full Fashion-MNIST

Variants (``DistillConfig`` switches, each on top of the same plain-MTT configuration):

    mtt     plain MTT (every switch off)
    soft    soft_labels (TESLA / DATM): learned label logits, initialised by expert 0, rate lr_y
    window  DATM's matching window: t drawn from [T−, T_cur), T_cur growing from T+/2 to T+
    auto    auto_steps (ATT): the student is matched at n* = argmin_n ‖θ̂_n − θ*_{t+M}‖²
    ema     ema_decay (FTD / DATM): the exported images are an EMA of the pixels
    all     every switch above at once

at IPC 1 and 10 on the embedded ``fashion-mnist-mini`` (CPU). What is held fixed, so that the
rows differ by their switches only:

* ONE expert buffer (``mttlite.experts.train_experts``: ConvNet-3, ``--width`` 32, ``--num-experts``
  5 × ``--train-epochs`` 10), trained once and cached in ``<out>/buffer-w<width>-n<experts>-e<epochs>``;
* the same distillation settings and the SAME iteration budget per IPC for every variant
  (``IPC_SETTINGS``: ``preset("demo")`` with N, T+ and the iterations set per IPC; the seed, hence the
  initial images of every hard-label variant, is shared). The wall seconds of each distillation
  are reported beside its accuracy (``auto`` still takes N student steps, so costs what MTT does);
* ONE evaluation protocol (``EvalProtocol``: ConvNet-3 at the experts' width, ``--eval-epochs`` 300,
  lr = the learned α, DSA, FINAL-epoch test accuracy, mean ± std (``np.std``) over ``--num-nets`` 5
  fresh networks, protocol seed 0, so every row trains networks from the same seeds), through
  ``SyntheticSet.evaluate`` / ``mttlite.evaluate.evaluate_set``.

Soft labels lift accuracy on their own (a network trained on an expert's logits learns more than
from one-hot labels, whatever the images), so for ``soft`` and ``all`` the table gives TWO numbers:
the accuracy with the learned soft labels (the set as exported), and with the same images, the
same α and the same networks under HARD labels: each image's original class (the class it was
initialised from; ``argmax_agrees`` in the JSON says how often the argmax of the learned soft label
is that class). Compare the hard-label number with MTT's to judge the images. DATM's
initialisation also starts soft-label runs from real images that expert 0 classifies correctly,
not from plain MTT's random ones: part of any difference in the hard-label column is that choice.

The switches' settings: DATM's (CIFAR-10) values, scaled to these short runs (``switches()``):

* ``lr_y`` = 2.0, DATM's value (``--lr-y``), kept after toy runs at this size (soft labels alone,
  one width-32 expert of 10 epochs, the settings below; 150 iterations at IPC 1, 30 at IPC 10): no
  divergence; the logits move by a median 0.014 (IPC 1) and 0.009 (IPC 10) per iteration, 2.4 and
  0.27 at most over the runs; the labels sharpen (mean largest probability 0.67 → 0.81 at IPC 1)
  and keep their class (argmax = the image's class for 10 of 10 at IPC 1, 99 of 100 at IPC 10).
  lr_y = 10 was stable too (IPC 1). DATM's label momentum is 0.9; here the labels share
  ``momentum`` (0.5), as the library does.
* window: T− = 0 (DATM's), T_cur from ⌊T+/2⌋ (DATM: 20 of T+ = 40) to T+, reached after 60 % of
  the run (``expansion_end_iteration`` = round(0.6 × iterations); DATM: 3000 of 5000), so the last
  40 % draw from the whole [0, T+) as MTT does. (Reaching T+ only at the last iteration, the
  library's default, would never draw t = T+ − 1.)
* ``ema_decay`` = 0.999^(5000 / iterations), rounded to 3 digits (``--ema-decay auto``): the decay
  that leaves the initial images the same weight in the exported EMA after this run as DATM's 0.999
  does after 5000 iterations (0.999^5000 = e^−5 ≈ 0.7 %). 0.99 is that value for 500 iterations;
  at 100 iterations it would still hold 37 % of the initial (real) images. A number overrides it.
* ``auto_steps`` = True (N stays the upper bound). Whether it changes anything depends on the
  student overshooting the target before step N; the table reports n* (mean, and the share of
  iterations with n* < N): where n* = N throughout, the row is plain MTT.

``--from-run DIR`` puts the table on a run of ``benchmarks/reproduce_fmnist.py`` instead (e.g. its CPU
size on the full Fashion-MNIST): the run's data, loaded by the run script's own loader (the same subset
at ``--size tiny``, the same held-out validation split; checked against the checksums in its
``data.json``), its expert buffer ``DIR/buffer``, and, per IPC, its MTT configuration
(``DIR/mtt-ipc<k>/distill.json``: N, M, T+, lr_img, lr_lr, α0, the iterations) as the plain-MTT row
and the base every switch is added to; the evaluation is the run's (ConvNet-3 at the experts' width,
the size's epochs and networks: 300 × 5 at CPU size, the same seeds). The ``mtt`` cell starts from the
run's own finished checkpoint (copied into the cell, so it is not distilled again: the same
configuration and seed would give the same set), so its accuracies are the run's own MTT row.

Resumable per cell: a finished cell writes ``<out>/cells/<variant>-ipc<k>.json`` and is read back
on a rerun (computing nothing; a cell computed with other settings is refused, use another
``--out``); an interrupted distillation resumes from its checkpoint in ``<out>/cells/<variant>-ipc<k>/``
(which also holds its ``synset.safetensors``). Outputs: ``<out>/family.md`` and ``<out>/family.json``
(every row with the per-network accuracies, the protocol, the settings, the command, the hardware).

Cost at the default sizes (measured per unit on 2 shared CPU cores, 1 thread, while two other jobs
ran; a quiet machine is faster): experts 5 × 10 epochs ~6 min; distillation ~1.1 s/iteration at
IPC 1 (N = 20) and ~4.5 s at IPC 10 (N = 10), so 6 × 300 × 1.1 s + 6 × 100 × 4.5 s ~ 78 min;
evaluation ~5 s (IPC 1) and ~31 s (IPC 10) per network, 8 sets × 5 networks each ~ 24 min: about
1 h 50 min in all on one thread (``--workers 2`` runs two cells at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = "fashion-mnist-mini"
VARIANTS = ("mtt", "soft", "window", "auto", "ema", "all")
#: The seed papers' extensions (issue 15) and the student in bf16 (issue 16), run on request
#: (``--variants mtt,prune,depth,texture,perturb,bf16``), each alone on top of plain MTT; "all" stays the family above.
EXTENSIONS = ("prune", "depth", "texture", "perturb", "bf16")
DISPLAY = {"mtt": "MTT", "soft": "+ soft labels (TESLA/DATM)", "window": "+ window (DATM)",
           "auto": "+ auto N (ATT)", "ema": "+ EMA (FTD/DATM)", "all": "all together",
           "prune": "+ pruning, mismatch (Li et al.)", "depth": "+ pruning, depth (PAD)",
           "texture": "+ texture (MTT §5)", "perturb": "+ perturbed θ*_t (model augmentation)", "bf16": "student in bf16 (same budget)"}
#: Li et al.'s share of the parameters pruned from the matching (the largest |θ̂ − θ*| after a probe unroll).
PRUNE_FRACTION = 0.1
#: PAD's depth ratio at IPC 1 is 0 (nothing masked: the row would be plain MTT), so the depth row uses
#: max(PAD's ratio for the IPC, this).
DEPTH_MIN_RATIO = 0.25
#: ρ of model augmentation's weight perturbation, applied to θ*_t (each filter moved by ρ‖θ_j‖).
EXPERT_PERTURB = 0.01
#: The texture canvas: this many times the input side (28 → 56), one canvas per class per ipc.
TEXTURE_SCALE = 2
#: The texture rows' lr_lr: at plain MTT's 1e-6 α fell steadily to 0 and the run diverged (iteration 148 of
#: 300 at IPC 1, 94 of 100 at IPC 10: L never went below 1, so the loss is least with a student that does
#: not move); at 1e-7 α cannot collapse within the budget. docs/results.md gives both.
TEXTURE_LR_LR = 1e-7
#: DATM's learning rate of the label logits.
LR_Y = 2.0
#: DATM's EMA decay and the number of iterations it is used for (the decay is scaled to the run).
DATM_EMA, DATM_ITERATIONS = 0.999, 5000
#: The share of the run by which DATM's window reaches T+ (expansion_end_iteration 3000 of 5000 iterations).
DATM_EXPANSION = 0.6

#: The expert buffer, the evaluation and, per IPC, what overrides ``preset("demo")`` (N = syn_steps,
#: T+ = max_start_epoch, the iteration budget). M = 2, lr_img = 100, lr_lr = 1e-6, α0 = 0.01 from the preset.
SIZES: dict[str, dict] = {
    "default": {
        "width": 32, "num_experts": 5, "train_epochs": 10, "eval_epochs": 300, "num_nets": 5,
        "checkpoint_every": 25,
        "ipc": {1: {"syn_steps": 20, "max_start_epoch": 4, "iterations": 300},
                10: {"syn_steps": 10, "max_start_epoch": 8, "iterations": 100}},
    },
    "quick": {
        "width": 8, "num_experts": 2, "train_epochs": 3, "eval_epochs": 5, "num_nets": 2,
        "checkpoint_every": 2,
        "ipc": {1: {"syn_steps": 4, "max_start_epoch": 2, "iterations": 3},
                10: {"syn_steps": 4, "max_start_epoch": 2, "iterations": 3}},
    },
}

_DATA = {}


# ---------------------------------------------------------------------------------------------
# The settings of one cell
# ---------------------------------------------------------------------------------------------


def ema_decay_for(iterations: int) -> float:
    """DATM's 0.999 over 5000 iterations, scaled: d = 0.999^(5000 / iterations), 3 digits (d^iterations ≈ e^−5)."""
    return round(DATM_EMA ** (DATM_ITERATIONS / iterations), 3)


def switches(variant: str, ipc_settings: dict, lr_y: float, ema: float | str, ipc: int = 1) -> dict:
    """The DistillConfig fields a variant turns on (module docstring: DATM's values scaled to the run)."""
    T_plus, its = ipc_settings["max_start_epoch"], ipc_settings["iterations"]
    each = {
        "soft": {"soft_labels": True, "lr_y": lr_y},
        "window": {"min_start_epoch": 0, "current_max_start_epoch": max(1, T_plus // 2),
                   "expansion_end_iteration": max(1, round(DATM_EXPANSION * its))},
        "auto": {"auto_steps": True},
        "ema": {"ema_decay": ema_decay_for(its) if ema == "auto" else float(ema)},
    }
    if variant == "mtt":
        return {}
    if variant == "all":
        return {k: v for part in each.values() for k, v in part.items()}
    if variant in EXTENSIONS:
        from mttlite.pruning import pad_depth_ratio

        return {"prune": {"prune_rule": "mismatch", "prune_fraction": PRUNE_FRACTION},
                "depth": {"prune_rule": "depth",
                          "prune_fraction": max(pad_depth_ratio(ipc), DEPTH_MIN_RATIO)},
                "texture": {"texture_canvas": TEXTURE_SCALE * 28, "lr_lr": TEXTURE_LR_LR},
                "perturb": {"expert_perturb": EXPERT_PERTURB},
                "bf16": {"precision": "bf16"}}[variant]
    return dict(each[variant])


def run_config(from_run: str, ipc: int):
    """The MTT configuration a reproduce_fmnist.py run distilled its IPC-``ipc`` set with (its distill.json)."""
    from mttlite.distill import DistillConfig

    path = Path(from_run) / f"mtt-ipc{ipc}" / "distill.json"
    if not path.exists():
        raise SystemExit(f"--from-run: {path} is missing: run `benchmarks/reproduce_fmnist.py --out {from_run} "
                         f"--ipc {ipc} --stages distill` first (or leave IPC {ipc} out with --ipcs)")
    return DistillConfig.from_dict(json.loads(path.read_text())["config"])


def cell_config(variant: str, ipc: int, a: dict):
    from dataclasses import replace

    from mttlite.distill import preset

    st = a["ipc_settings"][str(ipc)]
    if a.get("from_run"):  # the run's MTT configuration, plus the variant's switches
        return replace(run_config(a["from_run"], ipc), **switches(variant, st, a["lr_y"], a["ema_decay"], ipc))
    return preset("demo", dataset=a["dataset"], ipc=ipc, seed=a["seed"], checkpoint_every=a["checkpoint_every"], **st,
                  **switches(variant, st, a["lr_y"], a["ema_decay"], ipc))


def protocol_for(a: dict):
    from mttlite.evaluate import EvalProtocol

    return EvalProtocol(arch="convnet", width=a["width"], epochs=a["eval_epochs"], num_nets=a["num_nets"], seed=0)


def _key(variant: str, ipc: int) -> str:
    return f"{variant}-ipc{ipc}"


def _inputs(variant: str, ipc: int, a: dict) -> dict:
    """Everything a cell's numbers depend on: a cached cell is used only if these are unchanged."""
    return {"variant": variant, "ipc": ipc, "config": cell_config(variant, ipc, a).to_dict(),
            "protocol": protocol_for(a).to_dict(), "experts": a["experts"], "dataset": a["dataset"]}


# ---------------------------------------------------------------------------------------------
# One cell: distil (resumable), evaluate (with soft labels: also under hard labels)
# ---------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _dataset(a: dict):
    """The cell's data: the embedded set, or (``--from-run``) the run's full Fashion-MNIST with its split."""
    from mttlite.data import load_dataset

    if "ds" not in _DATA:
        if a.get("from_run"):  # the run script's own loader: the same subset (tiny) and held-out split
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import reproduce_fmnist as rf

            stored = a["split"]
            choice = "full" if stored["dataset"] == "fashion-mnist" else "mini"
            ds, info = rf.load_data(a["run_size"], rf.SIZES[a["run_size"]], "cpu", choice)
            for key in ("val_checksum", "train_checksum"):
                if abs(info[key] - stored[key]) > 1e-6 * max(1.0, abs(stored[key])):
                    raise SystemExit(f"--from-run: the data differ from the run's data.json ({key} {info[key]} vs "
                                     f"{stored[key]}): another data file, subset or split seed")
        else:
            ds = load_dataset(a["dataset"])
        _DATA["ds"] = ds
    return _DATA["ds"]


def _write_json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def cached_cell(variant: str, ipc: int, a: dict) -> dict | None:
    """The finished cell's JSON, if there is one (refused if it was computed with other settings)."""
    path = Path(a["out"]) / "cells" / f"{_key(variant, ipc)}.json"
    if not path.exists():
        return None
    from mttlite.distill import DistillConfig

    doc = json.loads(path.read_text())
    want = json.loads(json.dumps(_inputs(variant, ipc, a), default=str))
    if isinstance(doc.get("inputs", {}).get("config"), dict):  # a cell written before a field existed: its default
        doc["inputs"]["config"] = json.loads(json.dumps(DistillConfig.from_dict(doc["inputs"]["config"]).to_dict(),
                                                        default=str))
    if doc.get("inputs") != want:
        diff = sorted(k for k in set(want) | set(doc.get("inputs", {})) if doc.get("inputs", {}).get(k) != want.get(k))
        raise SystemExit(f"{path} was computed with other settings (they differ in {diff}): use another --out "
                         "for these settings, or delete that cell (its JSON and folder) to recompute it")
    return doc


def _from_run(run: Path, ipcs) -> dict:
    """What a reproduce_fmnist.py run folder fixes: its split (data.json), its experts, its MTT settings per IPC."""
    for need in ("data.json", "buffer/meta.json"):
        if not (run / need).exists():
            raise SystemExit(f"--from-run: {run / need} is missing: is {run} a benchmarks/reproduce_fmnist.py run "
                             "folder whose data and experts stages finished?")
    data = json.loads((run / "data.json").read_text())
    meta = json.loads((run / "buffer" / "meta.json").read_text())
    size = json.loads((run / "results.json").read_text())["size"] if (run / "results.json").exists() else None
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce_fmnist as rf

    if size not in rf.SIZES:
        raise SystemExit(f"--from-run: {run / 'results.json'} does not name the run's --size (one of {sorted(rf.SIZES)})")
    from mttlite.buffers import ExpertBuffer

    buf = ExpertBuffer.open(run / "buffer")
    experts = {"arch": meta["arch"], "width": meta["arch_kwargs"]["width"], "num_experts": len(buf),
               "train_epochs": buf.epochs[-1], "seed": None, "path": str(run / "buffer")}
    settings = {}
    for i in ipcs:
        c = run_config(str(run), i)
        settings[str(i)] = {"syn_steps": c.syn_steps, "max_start_epoch": c.max_start_epoch, "iterations": c.iterations}
    return {"data": data, "experts": experts, "ipc_settings": settings, "size": size,
            "eval_epochs": rf.SIZES[size]["eval_epochs"], "num_nets": rf.SIZES[size]["num_nets"]}


def _summary(res) -> dict:
    return {"accs": res.accs, "mean": res.mean, "std": res.std, "lr": res.lr, "seconds": round(res.seconds, 2),
            "train_accs": res.train_accs}


def run_cell(variant: str, ipc: int, a: dict) -> dict:
    """Distil one (variant, ipc) set, evaluate it, write ``<out>/cells/<key>.json``; return that document."""
    import torch

    from mttlite.buffers import ExpertBuffer
    from mttlite.distill import run
    from mttlite.evaluate import evaluate_set
    from mttlite.pipeline import make_distiller, to_synset

    key = _key(variant, ipc)
    cell_dir = Path(a["out"]) / "cells" / key
    t0 = time.perf_counter()
    ds = _dataset(a)
    buffer = ExpertBuffer.open(a["buffer"])
    config = cell_config(variant, ipc, a)
    protocol = protocol_for(a)
    d = make_distiller(config, buffer, dataset=ds)
    x0, y0 = d.images.detach().clone(), d.targets.clone()  # the initial state (before any checkpoint is loaded)
    run(d, cell_dir, progress=False)
    s = to_synset(d, buffer)
    s.save(cell_dir / "synset.safetensors")
    t1 = time.perf_counter()

    res = s.evaluate(ds, protocol, progress=False)
    hard = None
    classes = d.labels.detach().cpu()  # each image's original class (class-major)
    if config.soft_labels:  # the same images, α and networks, under hard labels
        hard = _summary(evaluate_set(s.images, classes, ds, protocol, lr=s.syn_lr, progress=False))
    t2 = time.perf_counter()

    N = config.syn_steps
    steps = list(d.history.student_steps)
    losses = list(d.history.loss)
    q = max(1, len(losses) // 4)
    doc = {
        "inputs": _inputs(variant, ipc, a),
        "row": {
            "variant": variant, "ipc": ipc,
            "switches": switches(variant, a["ipc_settings"][str(ipc)], a["lr_y"], a["ema_decay"], ipc),
            "iterations": d.iteration, "syn_steps": N,
            "labels": "soft" if s.labels.is_floating_point() else "hard",
            "acc": _summary(res),  # the set as exported (soft labels for soft / all)
            "acc_hard": hard,  # soft-label variants: the same images under their original class
            "syn_lr": s.syn_lr,
            "distill_seconds": round(sum(d.history.seconds), 2),  # the iterations' own time (resume-safe)
            "eval_seconds": round(res.seconds + (hard["seconds"] if hard else 0.0), 2),
            "loss_first_quarter": float(np.mean(losses[:q])), "loss_last_quarter": float(np.mean(losses[-q:])),
            "n_star": {"mean": float(np.mean(steps)), "min": float(min(steps)),
                       "share_below_N": float(np.mean([v < N for v in steps]))},
            "window": {"first": list(_window(config, 0)), "middle": list(_window(config, d.iteration // 2)),
                       "last": list(_window(config, max(0, d.iteration - 1)))},
            "images_moved": float((s.images - x0.cpu()).norm() / x0.norm()),  # ‖x_exported − x_0‖ / ‖x_0‖
            "threads": torch.get_num_threads(),
        },
        "set": str(cell_dir / "synset.safetensors"),
        "protocol_text": protocol.describe(),
        "wall_seconds": {"distill": round(t1 - t0, 2), "evaluate": round(t2 - t1, 2)},
    }
    if config.soft_labels:
        y = s.labels
        doc["row"]["label_stats"] = {
            "argmax_agrees": int((y.argmax(1) == classes).sum()), "n": len(classes),
            "max_prob_initial": float(y0.max(1).values.mean()), "max_prob_final": float(y.max(1).values.mean()),
            "max_abs_change": float((y - y0.cpu()).abs().max()),
        }
    _write_json(Path(a["out"]) / "cells" / f"{key}.json", doc)
    return doc


def _window(config, iteration: int) -> tuple[int, int]:
    from mttlite.distill import start_window

    return start_window(config, iteration)


def _train_experts(a: dict) -> tuple[str, float]:
    """The shared buffer (skips complete experts): "ran" or "cached", and the seconds it took."""
    from mttlite.buffers import ExpertBuffer
    from mttlite.experts import train_experts

    path = Path(a["buffer"])
    try:
        complete = len(ExpertBuffer.open(path)) >= a["num_experts"]
    except Exception:  # noqa: BLE001 - no buffer yet (or an incomplete one): train_experts resumes it
        complete = False
    t = time.perf_counter()
    train_experts(_dataset(a), path, num_experts=a["num_experts"], train_epochs=a["train_epochs"], width=a["width"],
                  seed=a["seed"], progress=False)
    return ("cached" if complete else "ran"), time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _pct(s: dict | None) -> str:
    return "—" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _settings_text(sw: dict) -> str:
    if not sw:
        return "—"
    short = {"soft_labels": None, "auto_steps": None, "min_start_epoch": "T−", "current_max_start_epoch": "T_cur0",
             "expansion_end_iteration": "E", "lr_y": "lr_y", "ema_decay": "ema"}
    parts = []
    for k, v in sw.items():
        name = short.get(k, k)
        parts.append(k if name is None else f"{name} {v:g}" if isinstance(v, float) else f"{name} {v}")
    return ", ".join(parts)


def tables(rows: dict, variants, ipcs) -> str:
    head = ["variant"] + [c for i in ipcs for c in (f"IPC {i} (as exported)", f"IPC {i}, hard labels",
                                                     f"Δ images vs MTT (IPC {i}, pp)")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = [DISPLAY[v]]
        for i in ipcs:
            r, base = rows.get((v, i)), rows.get(("mtt", i))
            if r is None:
                cells += ["failed", "", ""]
                continue
            img = r["acc_hard"] or r["acc"]  # the accuracy the images earn under hard labels
            delta = "" if base is None or v == "mtt" else f"{100 * (img['mean'] - base['acc']['mean']):+.1f}"
            cells += [_pct(r["acc"]) + (" (soft)" if r["labels"] == "soft" else ""),
                      _pct(r["acc_hard"]) if r["acc_hard"] else "(same: hard labels)", delta]
        lines.append("| " + " | ".join(cells) + " |")
    acc = "\n".join(lines)

    head = ["variant", "switches (IPC " + " / ".join(map(str, ipcs)) + ")"]
    head += [c for i in ipcs for c in (f"distill s (IPC {i})", f"eval s (IPC {i})", f"n* mean, share < N (IPC {i})")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        got = [rows.get((v, i)) for i in ipcs]
        texts = [_settings_text(r["switches"]) if r else "?" for r in got]
        cells = [DISPLAY[v], texts[0] if len(set(texts)) == 1 else " / ".join(texts)]
        for r in got:
            if r is None:
                cells += ["-", "-", "-"]
                continue
            n = r["n_star"]
            cells += [_secs(r["distill_seconds"]), _secs(r["eval_seconds"]),
                      f"{n['mean']:.1f} of {r['syn_steps']}, {100 * n['share_below_N']:.0f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return acc + "\n\n" + "\n".join(lines)


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


def _interpreter() -> str:
    """This interpreter, relative to the working directory when it lies under it (e.g. .venv/bin/python)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="run folder (default runs/bench/family, runs/bench/family-quick with --quick)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {','.join(VARIANTS + EXTENSIONS)} (default: the family)")
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--width", type=int, default=None, help="ConvNet width of the experts, students and evaluation (32)")
    p.add_argument("--num-experts", type=int, default=None, help="experts in the shared buffer (5)")
    p.add_argument("--train-epochs", type=int, default=None, help="epochs each expert trains (10)")
    p.add_argument("--iterations", type=int, default=None,
                   help="distillation iterations of every cell (default per IPC: 300 at IPC 1, 100 at IPC 10)")
    p.add_argument("--eval-epochs", type=int, default=None, help="epochs each evaluation network trains (300)")
    p.add_argument("--num-nets", type=int, default=None, help="fresh evaluation networks per set (5)")
    p.add_argument("--lr-y", type=float, default=LR_Y, help="learning rate of the label logits (DATM: 2)")
    p.add_argument("--ema-decay", default="auto",
                   help="EMA decay of the pixels, or 'auto' = 0.999^(5000/iterations) (DATM's 0.999 scaled to the run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the experts and the distillations")
    p.add_argument("--workers", type=int, default=1, help="cells computed at once, in separate processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--from-run", default=None, metavar="DIR",
                   help="a benchmarks/reproduce_fmnist.py run folder: its data split, expert buffer and MTT settings "
                        "per IPC (module docstring); --width/--num-experts/--train-epochs/--iterations do not apply")
    p.add_argument("--quick", action="store_true", help="tiny sizes (width 8, 2 experts x 3 epochs, 3 iterations, "
                                                        "5 eval epochs, 2 nets): checks the script in < 60 s")
    a = p.parse_args(argv)

    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS + EXTENSIONS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {','.join(VARIANTS + EXTENSIONS)}")
    ipcs = [int(i) for i in a.ipcs.split(",") if i]
    size = SIZES["quick" if a.quick else "default"]
    run_info = None
    if a.from_run:
        if a.quick or any(getattr(a, k) is not None for k in ("width", "num_experts", "train_epochs", "iterations")):
            p.error("--from-run takes the run's data, experts and iterations: drop --quick, --width, --num-experts, "
                    "--train-epochs and --iterations")
        run_info = _from_run(Path(a.from_run), ipcs)
        size = {**size, "width": run_info["experts"]["width"], "num_experts": run_info["experts"]["num_experts"],
                "train_epochs": run_info["experts"]["train_epochs"], "eval_epochs": run_info["eval_epochs"],
                "num_nets": run_info["num_nets"]}
    elif any(i not in size["ipc"] for i in ipcs):
        p.error(f"--ipcs: settings exist for IPC {sorted(size['ipc'])}")
    if a.ema_decay != "auto":
        try:
            float(a.ema_decay)
        except ValueError:
            p.error(f"--ema-decay must be 'auto' or a number in [0, 1), got {a.ema_decay!r}")
    for name in ("width", "num_experts", "train_epochs", "eval_epochs", "num_nets"):
        if getattr(a, name) is None:
            setattr(a, name, size[name])
    default_out = "runs/bench/family-quick" if a.quick else "runs/bench/family"
    if a.from_run:
        default_out = str(Path(a.from_run) / "family")
    out = Path(a.out or default_out)
    if run_info:
        ipc_settings = run_info["ipc_settings"]
        buffer = Path(a.from_run) / "buffer"
    else:
        ipc_settings = {str(i): {**size["ipc"][i], **({"iterations": a.iterations} if a.iterations else {})}
                        for i in ipcs}
        buffer = out / f"buffer-w{a.width}-n{a.num_experts}-e{a.train_epochs}"
    dataset = run_info["data"]["dataset"] if run_info else DATASET
    args = {"out": str(out), "buffer": str(buffer), "dataset": dataset, "width": a.width, "num_experts": a.num_experts,
            "train_epochs": a.train_epochs, "eval_epochs": a.eval_epochs, "num_nets": a.num_nets, "lr_y": a.lr_y,
            "ema_decay": a.ema_decay, "seed": a.seed, "threads": a.threads, "ipc_settings": ipc_settings,
            "checkpoint_every": size["checkpoint_every"],
            "from_run": a.from_run, "split": run_info["data"] if run_info else None,
            "run_size": run_info["size"] if run_info else None,
            "experts": run_info["experts"] if run_info else {"arch": "convnet", "width": a.width,
                                                             "num_experts": a.num_experts,
                                                             "train_epochs": a.train_epochs, "seed": a.seed}}
    _init_worker(a.threads)
    command = shlex.join([_interpreter(), "benchmarks/family_table.py", *(sys.argv[1:] if argv is None else argv)])

    cells = [(v, i) for i in ipcs for v in variants]
    for v, i in cells:
        cell_config(v, i, args)  # every setting checked before any work
    protocol = protocol_for(args)
    if run_info:
        d = run_info["data"]
        print(f"data: {dataset} from the run {a.from_run}: {d['train']} train / {d['val']} validation held out / "
              f"{d['test']} test")
    else:
        print(f"data: {DATASET} (embedded Fashion-MNIST: 6000 train / 1000 test, 1x28x28)")
    print(f"hardware: {_hardware()}; {a.workers} worker process(es) x {a.threads} torch thread(s)")
    print(f"protocol: {protocol.describe()}")
    for i in ipcs:
        base = cell_config("mtt", i, args)
        print(f"IPC {i}: {'the run' if run_info else 'preset demo'} with N={base.syn_steps}, M={base.expert_epochs}, T+={base.max_start_epoch}, "
              f"{base.iterations} iterations, lr_img={base.lr_img:g}, lr_lr={base.lr_lr:g}, α0={base.lr_teacher:g}")
        for v in variants:
            print(f"  {_key(v, i)}: {_settings_text(switches(v, ipc_settings[str(i)], a.lr_y, a.ema_decay, i))}")

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    status, seconds = ("the run's", 0.0) if run_info else _train_experts(args)
    print(f"experts: {a.num_experts} x {a.train_epochs} epochs, ConvNet width {a.width} -> {buffer} "
          f"({status}, {seconds:.0f} s)", flush=True)

    if run_info and "mtt" in variants:  # the run's finished MTT distillation is the mtt cell's (not redone)
        for i in ipcs:
            src = Path(a.from_run) / f"mtt-ipc{i}" / "checkpoint.safetensors"
            dst = out / "cells" / _key("mtt", i) / "checkpoint.safetensors"
            if src.exists() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
                os.replace(dst.with_name(dst.name + ".tmp"), dst)

    docs, statuses, failures = {}, {}, []
    todo = []
    for v, i in cells:
        doc = cached_cell(v, i, args)
        if doc is None:
            todo.append((v, i))
        else:
            docs[(v, i)], statuses[_key(v, i)] = doc, "cached"

    def report(v, i, doc):
        r = doc["row"]
        extra = f"; hard labels {_pct(r['acc_hard'])} %" if r["acc_hard"] else ""
        print(f"[{time.perf_counter() - t0:6.0f}s] {_key(v, i)}: {_pct(r['acc'])} %{extra} "
              f"(distill {_secs(r['distill_seconds'])} s, eval {_secs(r['eval_seconds'])} s, "
              f"n* {r['n_star']['mean']:.1f} of {r['syn_steps']})",
              flush=True)

    def failed(v, i, e):
        failures.append((_key(v, i), repr(e)))
        statuses[_key(v, i)] = "failed"
        print(f"FAILED {_key(v, i)}: {e}\n{traceback.format_exc()}", flush=True)

    if a.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(a.threads,)) as pool:
            futures = {pool.submit(run_cell, v, i, args): (v, i) for v, i in todo}
            for f in as_completed(futures):
                v, i = futures[f]
                try:
                    docs[(v, i)], statuses[_key(v, i)] = f.result(), "ran"
                    report(v, i, docs[(v, i)])
                except Exception as e:  # noqa: BLE001 - one failed cell does not lose the table
                    failed(v, i, e)
    else:
        for v, i in todo:
            try:
                docs[(v, i)], statuses[_key(v, i)] = run_cell(v, i, args), "ran"
                report(v, i, docs[(v, i)])
            except Exception as e:  # noqa: BLE001
                failed(v, i, e)
    wall = time.perf_counter() - t0

    rows = {k: d["row"] for k, d in docs.items()}
    table = tables(rows, variants, ipcs)
    title = (f"Final-epoch test accuracy (%), mean ± std over {a.num_nets} fresh ConvNet-3 (width {a.width}) per set; "
             "soft-label sets also under hard labels (the same images, α and networks)")
    print("\n" + title)
    print(table)
    print(f"\ncommand: {command}")
    print(f"total wall {wall:.0f} s this run ({sum(s == 'ran' for s in statuses.values())} cell(s) computed, "
          f"{sum(s == 'cached' for s in statuses.values())} cached); load average 1 min: {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end")
    if failures:
        print(f"failed cells: {failures}")

    settings_lines = []
    for i in ipcs:
        base = cell_config("mtt", i, args)
        origin = f"the run's (`{a.from_run}/mtt-ipc{i}/distill.json`)" if run_info else '`preset("demo")`'
        settings_lines.append(f"- IPC {i}: {origin} with N = {base.syn_steps}, M = {base.expert_epochs}, "
                              f"T+ = {base.max_start_epoch}, {base.iterations} iterations (every variant), "
                              f"lr_img = {base.lr_img:g}, lr_lr = {base.lr_lr:g}, α0 = {base.lr_teacher:g}, "
                              f"seed {base.seed}")
        for v in variants:
            if v != "mtt":
                settings_lines.append(f"  - {v}: `{json.dumps(switches(v, ipc_settings[str(i)], a.lr_y, a.ema_decay, i))}`")
    experts_text = (f"Experts: {a.num_experts} ConvNet-3 (width {a.width}) x {a.train_epochs} epochs, one buffer for "
                    f"every cell (`{buffer}`).")
    if run_info:
        d = run_info["data"]
        experts_text = (f"Data: {dataset}, the split of `{a.from_run}` ({d['train']} train / {d['val']} validation "
                        f"held out before the experts / {d['test']} test). " + experts_text + " The mtt row is the "
                        "run's own MTT set (its checkpoint), evaluated here.")
    legend = ("\"as exported\": the set `to_synset` saves (soft labels for the soft-label variants; the EMA images "
              "for ema and all). \"hard labels\": the same images under each image's original class. \"Δ images\": "
              "the hard-label accuracy minus MTT's, in percentage points. Soft-label variants also start from real "
              "images the labelling expert classifies correctly (DATM's initialisation).")
    legend2 = ("distill s: the wall seconds of the distillation's iterations (same iteration budget for every "
               "variant); eval s: the evaluation(s) of the set. n*: the student step the loss was measured at (N "
               "unless auto_steps).")
    md = [f"# The trajectory-matching family ({dataset}, CPU)", "", f"Command: `{command}`", "",
          f"Hardware: {_hardware()}; {a.workers} worker(s) x {a.threads} thread(s); wall {wall:.0f} s this run.", "",
          experts_text, "", f"Protocol: {protocol.describe()}", "", title + ".", "", legend, "", table, "", legend2,
          "", "Settings:", "", *settings_lines, ""]
    if failures:
        md += ["Failed cells:", "", *[f"- {k}: {e}" for k, e in failures], ""]
    _write_json(out / "family.json", {
        "command": command, "hardware": _hardware(), "wall_seconds_this_run": round(wall, 2),
        "workers": a.workers, "threads": a.threads, "dataset": dataset, "from_run": a.from_run, "protocol": protocol.to_dict(),
        "protocol_text": protocol.describe(), "experts": {**args["experts"], "path": str(buffer), "status": status,
                                                          "seconds_this_run": round(seconds, 2)},
        "ipc_settings": ipc_settings, "lr_y": a.lr_y, "ema_decay": a.ema_decay, "variants": variants, "ipcs": ipcs,
        "cells": statuses, "failures": failures,
        "rows": [docs[(v, i)]["row"] | {"config": docs[(v, i)]["inputs"]["config"]}
                 for v, i in cells if (v, i) in docs],
    })
    tmp = out / "family.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, out / "family.md")
    print(f"wrote {out / 'family.md'}, {out / 'family.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
