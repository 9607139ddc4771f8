"""Command line: ``python -m mttlite {experts,distill,evaluate,baselines,export,presets,demo}``.

    mttlite experts  --dataset fashion-mnist --out buffers/fmnist --num-experts 10 --train-epochs 50
    mttlite distill  --buffer buffers/fmnist --preset fashion-mnist-ipc10 --out runs/fmnist10
    mttlite evaluate runs/fmnist10/synset.safetensors --epochs 1000 --num-nets 5 --random-real
    mttlite evaluate logged_files/CIFAR10/run/images_5000.pt --dataset cifar10 --space zca --scores
    mttlite baselines dm --dataset fashion-mnist-mini --ipc 10 --out runs/dm10.safetensors
    mttlite export   runs/fmnist10/synset.safetensors --png grid.png --imagefolder runs/fmnist10/images
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import traceback
from dataclasses import fields, replace
from pathlib import Path

from .errors import (EXIT_BAD_INPUT, EXIT_BUG, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OS, Diverged,
                     install_interrupt_handler, one_line, restore_interrupt_handler)

SYMBOLS = {
    "ipc": "images per class in the synthetic set D_syn",
    "syn_steps": "N: SGD steps the student takes on D_syn per iteration (more = longer-range matching, more compute)",
    "expert_epochs": "M: expert epochs the N student steps must cover (the target is θ*_{t+M})",
    "max_start_epoch": "T+: the start epoch t is drawn from 0 … T+−1 (the authors raise T+ until unstable; "
                       "T− … T_cur−1 with the window settings below)",
    "iterations": "outer iterations of learning D_syn and α (paper: 5000)",
    "lr_img": "learning rate of the pixels (SGD, momentum 0.5)",
    "lr_lr": "learning rate of α, the student's learnable learning rate (SGD, momentum 0.5)",
    "lr_teacher": "α0: initial α, normally the experts' learning rate",
    "batch_syn": "synthetic images per student step (default: all)",
    "momentum": "momentum of the pixel and α optimisers",
    "zca": "use ZCA-whitened data (must match how the experts were trained)",
    "dsa_strategy": "DSA augmentation ops joined by '_' (default: the data set's; '' for none)",
    "pix_init": "initial pixels: 'real' (random real images of each class) or 'noise'",
    "gradient": "'exact' (adjoint: the paper's gradient, memory flat in N) or 'unroll' (naive, memory grows with N)",
    "compile": "torch.compile each student step (same gradient, elementwise work fused; compiling takes about a "
               "minute per batch shape; on CPU about as fast as eager, docs/performance.md)",
    "step": "the student step: 'eager' (op by op), 'fused' (each step one compiled graph, DSA and the updates "
            "inside; on CUDA the N steps replayed as one CUDA graph) or 'auto' (default): fused on CUDA; on a CPU "
            "fused only when the time it is estimated to save over the run (iterations × N student steps, by a cost "
            "model measured in docs/performance.md) exceeds the ~40 s it takes to compile on 2 cores, else eager. The two "
            "compute the same gradient up to float rounding; the compile time is printed once",
    "alpha_param": "'linear' (paper; α may go negative and is then stopped) or 'log' (α = exp(a) > 0)",
    "seed": "random seed (same seed, same CPU result)",
    "checkpoint_every": "write a resumable checkpoint every this many iterations",
    "samples_per_iteration": "(expert, t) samples whose meta-gradients are averaged per iteration (default: one "
                             "per torchrun rank, i.e. 1 in one process: the paper's algorithm)",
    "dataset": "data set name (see `mttlite presets` for names)",
    "soft_labels": "TESLA/DATM: learn the labels too (logits, initialised from expert 0's final epoch; the student "
                   "and the exported set use their softmax); with pix_init 'real' the initial images are ones that "
                   "expert classifies correctly (default: off)",
    "lr_y": "learning rate of the label logits with --soft-labels (SGD, same momentum; DATM: 2)",
    "min_start_epoch": "T−: the start epoch t is drawn from T− … T_cur−1 (DATM; default 0)",
    "current_max_start_epoch": "T_cur at the first iteration, growing linearly to T+ (DATM's sequential generation, "
                               "e.g. 20 → 40 on CIFAR-10; default: T+ throughout)",
    "expansion_end_iteration": "the iteration at which T_cur reaches T+ (DATM: 3000; default: --iterations)",
    "auto_steps": "ATT: match at the student step n* ≤ N closest to θ*_{t+M} instead of at N (default: off)",
    "ema_decay": "FTD/DATM: export an exponential moving average of the pixels with this decay, in [0, 1) "
                 "(DATM: 0.999; default: none)",
    "expert_perturb": "model augmentation (Zhang et al. 2023): ρ in [0, 1], start the student from θ*_t perturbed "
                      "by Gaussian noise scaled to ρ × each filter's norm (the target stays θ*_{t+M}; 0.01–0.05; "
                      "default 0 = off)",
    "precision": "the student's arithmetic: fp32 (default), bf16 (CPUs with AVX512-BF16/AMX, GPUs) or fp16 "
                 "(GPUs, loss-scaled); pixels, α and every update stay fp32",
    "texture_canvas": "texture distillation (MTT §5): each synthetic image is an S×S toroidal canvas, S ≥ the images' "
                      "side (the authors' default: 2×), seen through random wrap-around crops; synset.png shows each "
                      "canvas tiled 3×3; not with --zca (default: off)",
    "prune_rule": "parameter pruning of the matching loss (both norms): 'mismatch' (Li et al.: prune the fraction "
                  "--prune-fraction of the parameters the student matches worst, from a probe unroll at the start) "
                  "or 'depth' (PAD: prune the first --prune-fraction of the parameters, the shallow layers); "
                  "default: off",
    "prune_fraction": "β in [0, 1): the fraction of the parameters --prune-rule prunes (default with 'depth': "
                      "PAD's CIFAR-10 ratio for the IPC, 0 at IPC 1 and 0.5 from IPC 10; 'mismatch' needs it)",
}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _opt_int(s: str):
    return None if s.lower() in ("none", "all") else int(s)


def _opt_float(s: str):
    return None if s.lower() in ("none", "off") else float(s)


# argparse names the type function in its message ("invalid <__name__> value: 'abc'").
_bool.__name__ = "true/false"
_opt_int.__name__ = "integer (or 'all')"
_opt_float.__name__ = "number (or 'none')"


def _opt_str(s: str):
    return None if s.lower() in ("none", "off") else s


def _count(s: str) -> int:
    return int(s)


_count.__name__ = "integer"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from .distill import DistillConfig

    g = p.add_argument_group("distillation settings (override the preset; paper symbols in brackets)")
    for f in fields(DistillConfig):
        typ = {"int": _count, "float": float, "bool": _bool, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        if f.name in ("batch_syn", "samples_per_iteration", "current_max_start_epoch", "expansion_end_iteration",
                      "texture_canvas"):
            typ = _opt_int
        if f.name in ("ema_decay", "prune_fraction"):
            typ = _opt_float
        if f.name == "prune_rule":
            typ = _opt_str
        # a true/false setting also works as a bare flag: `--soft-labels` = `--soft-labels true`
        flag = dict(nargs="?", const=True) if typ is _bool else {}
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=typ, default=None, help=SYMBOLS.get(f.name, ""),
                       **flag)


def _config_from(args):
    from .distill import DistillConfig, preset

    base = preset(args.preset) if args.preset else DistillConfig()
    over = {f.name: getattr(args, f.name) for f in fields(DistillConfig) if getattr(args, f.name) is not None}
    return replace(base, **over).validate()


def cmd_experts(args):
    from .data import load_dataset
    from .experts import _check_args, train_experts
    from .io import check_writable_dir

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    _check_args(args.num_experts, args.train_epochs, args.keep_epochs, args.batch_real, args.parallel, args.dtype,
                rank, world, args.lr_teacher)
    if args.width < 1 or (args.depth is not None and args.depth < 1):
        raise ValueError(f"--width and --depth must be >= 1, got {args.width} and {args.depth}")
    check_writable_dir(args.out)
    ds = load_dataset(args.dataset, root=args.data_root, device=args.device, zca=args.zca, download=args.download)
    buf = train_experts(ds, args.out, num_experts=args.num_experts, train_epochs=args.train_epochs, arch=args.arch,
                        width=args.width, depth=args.depth, lr_teacher=args.lr_teacher, batch_real=args.batch_real,
                        seed=args.seed, dtype=args.dtype, keep_epochs=args.keep_epochs, parallel=args.parallel,
                        device=args.device)
    print(f"{buf}\n{buf.bytes_per_expert() / 2**20:.2f} MiB per expert")


def cmd_distill(args):
    from .buffers import read_meta
    from .io import RunLock, check_writable_dir
    from .pipeline import distill_set
    from .precision import check_precision
    from .report import write_run_report

    config = _config_from(args)
    check_precision(config.precision, args.device)  # bf16 / fp16 where they cannot run: before any work
    read_meta(args.buffer)  # a missing or foreign buffer: before the data set is loaded
    if torch_rank() == 0:  # the rank that writes
        check_writable_dir(args.out)
    print("config:", config.to_dict())
    lock = RunLock(args.out, "`mttlite distill` run") if torch_rank() == 0 else contextlib.nullcontext()
    with lock:  # a second distill on the same --out stops at once instead of racing this one
        s = distill_set(config, args.buffer, args.out, data_root=args.data_root, device=args.device,
                        resume=not args.restart)
        if torch_rank() != 0:  # torchrun: rank 0 wrote the set
            return
        s.save_png_grid(f"{args.out}/synset.png")
        write_run_report(args.out)  # report.html: L and α per iteration, the set at a few iterations
    print(f"saved {args.out}/synset.safetensors ({len(s.labels)} images, learned α = {s.syn_lr:.5g}), "
          f"{args.out}/synset.png and {args.out}/report.html")


def cmd_evaluate(args):
    from .commands import run_evaluate

    run_evaluate(args)  # every input checked before work; results.json written at the end


def cmd_baselines(args):
    from .commands import run_baselines

    run_baselines(args)


def cmd_export(args):
    from .io import check_writable_dir, check_writable_file
    from .synset import SyntheticSet

    if not (args.png or args.imagefolder):
        raise ValueError("nothing to do: give --png PATH and/or --imagefolder DIR")
    if args.png:
        check_writable_file(args.png, "--png")
    if args.imagefolder:
        d = Path(args.imagefolder)
        if d.exists() and d.is_dir() and any(d.iterdir()):
            raise ValueError(f"--imagefolder {d}: the folder exists and is not empty; choose a new folder or remove it")
        check_writable_dir(d, "--imagefolder")
    s = SyntheticSet.load(args.set)
    if args.png:
        print("wrote", s.save_png_grid(args.png))
    if args.imagefolder:
        print("wrote", s.export_imagefolder(args.imagefolder))


def cmd_presets(args):
    from .data import DATASETS
    from .distill import PRESETS

    print("data sets:", ", ".join(DATASETS))
    keys = ["dataset", "ipc", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_teacher", "batch_syn", "zca"]
    print("| preset | " + " | ".join(keys) + " |")
    for name, c in PRESETS.items():
        print(f"| {name} | " + " | ".join(str(getattr(c, k)) for k in keys) + " |")


def cmd_demo(args):
    from .io import check_writable_dir
    from .pipeline import run_demo

    check_writable_dir(args.out)
    run_demo(args.out, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mttlite", description="Dataset distillation by Matching Training Trajectories.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
        sp.add_argument("--data-root", default="data", help="where data sets are looked for / downloaded")
        return sp

    e = common(sub.add_parser("experts", help="stage 1: train expert trajectories into a buffer"))
    e.add_argument("--dataset", default="fashion-mnist-mini")
    e.add_argument("--out", required=True, help="buffer directory (existing experts are kept; resumable)")
    e.add_argument("--num-experts", type=_count, default=10)
    e.add_argument("--train-epochs", type=_count, default=50, help="E: epochs per expert (paper: 50)")
    e.add_argument("--arch", default="convnet")
    e.add_argument("--width", type=_count, default=128)
    e.add_argument("--depth", type=_count, default=None)
    e.add_argument("--lr-teacher", type=float, default=0.01, help="experts' SGD learning rate (paper: 0.01)")
    e.add_argument("--batch-real", type=_count, default=256)
    e.add_argument("--seed", type=_count, default=0)
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="storage precision")
    e.add_argument("--keep-epochs", type=_count, default=None, help="store only epochs 0…K (distillation needs T+ + M)")
    e.add_argument("--parallel", type=_count, default=1, help="train K experts at once with torch.func.vmap")
    e.add_argument("--zca", action="store_true")
    e.add_argument("--download", action="store_true")
    e.set_defaults(func=cmd_experts)

    d = common(sub.add_parser("distill", help="stages 2–4: learn the synthetic images and α"))
    d.add_argument("--buffer", required=True, help="expert buffer directory (from `mttlite experts`)")
    d.add_argument("--out", required=True, help="run directory: checkpoint, synset.safetensors, synset.png, report.html")
    d.add_argument("--preset", default=None, help="start from a preset (see `mttlite presets`)")
    d.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    _add_config_args(d)
    d.set_defaults(func=cmd_distill)

    v = common(sub.add_parser("evaluate", help="train fresh networks on a set, report test accuracy, write results.json"))
    v.add_argument("set", help="the set: a mttlite .safetensors; the MTT authors' images_<tag>.pt (or its folder); "
                               "an ImageFolder of PNGs; a .safetensors/.pt with images, labels, syn_lr")
    v.add_argument("--format", default="auto", choices=["auto", "mttlite", "authors", "folder", "tensor"],
                   help="how the set is stored (default: told from the path)")
    v.add_argument("--space", default=None, choices=["normalised", "zca", "pixels"],
                   help="the space of an imported set's images (authors, tensor): normalised (x = (p - mean) / std), "
                        "zca (MTT's --zca runs) or pixels (p in [0, 1]); required, never guessed")
    v.add_argument("--dataset", default=None, help="the data set an imported set belongs to (required unless mttlite)")
    v.add_argument("--arch", default=None, help="evaluation architecture (default: the distillation's)")
    v.add_argument("--width", type=_count, default=None, help="network width (default: the distillation's, else 128)")
    v.add_argument("--epochs", type=_count, default=None, help="training epochs per network (default 300; papers: 1000 with DSA)")
    v.add_argument("--num-nets", type=_count, default=None, help="networks trained (default 5)")
    v.add_argument("--batch", type=_count, default=None, help="SGD batch size (default 256)")
    v.add_argument("--dsa-strategy", default=None, help=SYMBOLS["dsa_strategy"])
    v.add_argument("--lr", type=float, default=None, help="default: the learned α (0.01 for sets without one)")
    v.add_argument("--seed", type=_count, default=None, help="protocol seed (default 0)")
    v.add_argument("--protocol", default=None, metavar="FILE",
                   help="a JSON object of EvalProtocol fields (flags given override it)")
    v.add_argument("--val-per-class", type=_count, default=None, metavar="N",
                   help="hold N training images per class out as a validation split and report its accuracy too")
    v.add_argument("--random-real", action="store_true", help="also evaluate random real images of the same size")
    v.add_argument("--swaps", action="store_true",
                   help="DC-Bench-style table: the protocol with augmentation none/dsa/crop/flip, --swap-archs, --swap-epochs")
    v.add_argument("--swap-archs", default=None, metavar="A,B", help="evaluation networks for --swaps, e.g. mlp,lenet")
    v.add_argument("--swap-epochs", default=None, metavar="E,F", help="epoch counts for --swaps, e.g. 100,1000")
    v.add_argument("--scores", action="store_true",
                   help="DD-Ranking's LRS and ARS (trains a random real subset, and the full data unless --full-acc)")
    v.add_argument("--full-acc", type=float, default=None,
                   help="a known full-data accuracy in [0, 1] for --scores, instead of training on the full data")
    v.add_argument("--full-epochs", type=_count, default=None, help="epochs on the full data for --scores (default --epochs)")
    v.add_argument("--out", default=None, help="results file (.json) or folder (default: results.json beside the set)")
    v.add_argument("--download", action="store_true")
    v.set_defaults(func=cmd_evaluate)

    b = common(sub.add_parser("baselines", help="build a baseline set (random, herding, kcenter, forgetting, dc, dsa, "
                                                "dm, dcc, mtt) and save it; `baselines list` shows their options"))
    b.add_argument("method", help="a method name, or `list`")
    b.add_argument("--dataset", default="fashion-mnist-mini")
    b.add_argument("--ipc", type=_count, default=None, help=SYMBOLS["ipc"])
    b.add_argument("--out", default=None, help="the set's .safetensors file")
    b.add_argument("--seed", type=_count, default=0)
    b.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable), e.g. --opt iterations=200; `baselines list` names them. "
                        "Model augmentation (dc, dsa, dcc, dm): --opt model_pool=BUFFER_DIR --opt pool_epochs=2 "
                        "--opt rho=0.01")
    b.add_argument("--val-per-class", type=_count, default=None, metavar="N",
                   help="hold N training images per class out (the method never sees them)")
    b.add_argument("--zca", action="store_true")
    b.add_argument("--download", action="store_true")
    b.set_defaults(func=cmd_baselines)

    x = sub.add_parser("export", help="write a synthetic set as a PNG grid and/or an ImageFolder tree")
    x.add_argument("set")
    x.add_argument("--png", default=None)
    x.add_argument("--imagefolder", default=None)
    x.set_defaults(func=cmd_export)

    sub.add_parser("presets", help="list the presets and data sets").set_defaults(func=cmd_presets)
    m = common(sub.add_parser("demo", help="experts → distil → evaluate on the embedded Fashion-MNIST (minutes on CPU)"))
    m.add_argument("--out", default="runs/demo")
    m.set_defaults(func=cmd_demo)
    return p


def resolve_device(device: str) -> str:
    """The device this process uses: under torchrun (``LOCAL_RANK`` set) a bare ``cuda`` means
    ``cuda:LOCAL_RANK``, one GPU per rank; anything else is returned as given, after checking it exists."""
    import os

    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device torch knows ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
        if dev.index is None and "LOCAL_RANK" in os.environ:
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) here")
    return str(dev)


def torch_rank() -> int:
    from .ranks import process_group

    return process_group()[0]


def _say(args, message) -> None:
    print(f"mttlite {args.command}: error: {one_line(message)}", file=sys.stderr)


def _os_message(e: OSError) -> str:
    """An OSError as one sentence, with what to do for the usual causes."""
    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    hint = {errno.ENOSPC: "free some space",
            errno.EDQUOT: "free some space (disk quota exceeded)",
            errno.EROFS: "the file system is read-only: choose another --out",
            errno.EACCES: "no permission: choose another --out or fix the permissions"}.get(e.errno, "")
    hint = f"; {hint}" if hint else ""
    return (f"{what}{where}{hint}. Files are written atomically, so nothing partial was left; "
            "rerun the same command once it is fixed (runs resume from what was saved)")


def _saved_state(args) -> str:
    """What an interrupted command leaves behind, and how to go on (the Ctrl-C message)."""
    from .buffers import list_experts
    from .io import read_meta_only

    out = getattr(args, "out", None)
    if args.command == "experts":
        n = len(list_experts(out)) if out and Path(out).is_dir() else 0
        return (f"{n} complete expert(s) are saved in {out} (the one in training is lost); "
                "rerun the same command to train the rest")
    if args.command == "distill":
        ckpt = Path(out) / "checkpoint.safetensors"
        if ckpt.is_file():
            it = read_meta_only(ckpt).get("iteration", "?")
            return (f"the checkpoint of iteration {it} is saved in {ckpt}; rerun the same command to resume from it "
                    "(--restart starts over)")
        return "no checkpoint was written yet (one every --checkpoint-every iterations); rerun the same command to start again"
    if args.command == "demo":
        return f"rerun the same command: the complete experts and the last distillation checkpoint under {out} are reused"
    return "nothing was written"


def main(argv=None) -> int:
    """The command line. Expected errors end as one line on stderr and an exit code (``mttlite.errors``):
    2 bad input, 3 divergence, 1 system error (disk full, read-only), 130 Ctrl-C; a bug keeps its
    traceback, followed by a line asking for a report (exit code 70)."""
    args = build_parser().parse_args(argv)
    previous = install_interrupt_handler()  # put back on the way out: an in-process caller keeps its own
    try:
        return _main(args)
    except KeyboardInterrupt:
        print(f"\nmttlite {args.command}: interrupted (Ctrl-C): {_saved_state(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Diverged as e:
        _say(args, e)
        return EXIT_DIVERGED
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        _say(args, e)
        return EXIT_BAD_INPUT
    except OSError as e:
        _say(args, _os_message(e))
        return EXIT_OS
    except Exception:
        traceback.print_exc()
        from . import __version__

        print(f"mttlite {args.command}: internal error: this is a bug in mttlite {__version__}, not in your settings; "
              "please report it with the command line and the traceback above", file=sys.stderr)
        return EXIT_BUG
    finally:
        restore_interrupt_handler(previous)


def _main(args) -> int:
    if hasattr(args, "device"):
        args.device = resolve_device(args.device)
    if args.command in ("distill", "demo") and getattr(args, "device", "cpu") == "cpu":
        from .perf import keep_freed_memory

        # A one-command CPU process: reuse freed pages instead of faulting in new ones (measured: 1.6–1.8×
        # per distillation iteration). Not for `experts`: vmap-parallel experts keep more memory, and
        # K = 16 at width 128 ran out of 24 GiB with it (docs/performance.md). Not on GPUs: there it
        # only makes host memory grow.
        keep_freed_memory()
    if args.command in ("distill", "evaluate"):
        from .ranks import init_distributed

        # torchrun: distill samples one (expert, t) per rank and all-reduces the meta-gradients;
        # evaluate trains network i on rank i % W. Rank 0 alone writes files and prints results.
        if init_distributed(args.device) and torch_rank() != 0:
            sys.stdout = open(os.devnull, "w")  # every rank holds the same results: print them once
    args.func(args)
    return 0
