"""The work of ``mttlite evaluate`` and ``mttlite baselines`` (``cli.py`` parses the flags, this does the rest).

``evaluate`` judges any distilled set under one declared protocol and writes everything it measured to
one JSON document, ``results.json`` (format ``"mttlite-evaluation/1"``), atomically:

    set         where it came from: path, format, space, method, ipc, labels, learned lr, provenance
    dataset     name, split sizes, the validation split (``--val-per-class``), ZCA or not
    protocol    ``EvalProtocol.to_dict()`` and its one-line description
    result      ``EvalResult.to_dict()``: the final-epoch test accuracy of every network (and validation)
    random_real the same protocol on random real images of the same size (``--random-real``)
    swaps       DC-Bench-style rows (``--swaps``, ``mttlite.swaps``)
    scores      DD-Ranking's LRS and ARS and every accuracy behind them (``--scores``, ``mttlite.scores``)

Every input is checked before a data set is loaded or a network trained: the set's files
(``importers.read_*``), its space, the protocol, the output path. Nothing is written before the end.
"""
from __future__ import annotations

import json
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

RESULTS_FORMAT = "mttlite-evaluation/1"
#: Protocol fields set from the set itself when the evaluation network is the one it was distilled with.
_ARCH_KWARGS = ("width", "depth", "norm")


def protocol_from(set_arch: str, set_arch_kwargs: dict, file: str | None, flags: dict):
    """The evaluation protocol: ``EvalProtocol()`` defaults <- the set's network (its width, depth, norm,
    when the evaluation arch is the set's) <- the JSON file ``file`` <- the flags given (not None)."""
    from .evaluate import EvalProtocol

    names = {f.name for f in fields(EvalProtocol)}
    from_file = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"--protocol {file}: no such file")
        try:
            from_file = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--protocol {file} is not valid JSON ({e})") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"--protocol {file} must hold a JSON object of EvalProtocol fields, e.g. "
                             '{"epochs": 1000, "num_nets": 5}')
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise ValueError(f"--protocol {file}: unknown field(s) {unknown}; the fields are: {', '.join(sorted(names))}")
    given = {k: v for k, v in flags.items() if v is not None}
    arch = given.get("arch", from_file.get("arch", set_arch))
    base = {"arch": arch}
    if arch == set_arch:
        base.update({k: v for k, v in set_arch_kwargs.items() if k in _ARCH_KWARGS})
    return EvalProtocol(**{**base, **from_file, **given})


def results_path(set_path, out: str | None) -> Path:
    """Where results.json goes: ``--out`` (a ``.json`` file, or a folder to hold results.json), else
    beside the set (the folder holding a set file, or the set's folder itself)."""
    if out is not None:
        out = Path(out)
        return out if out.suffix == ".json" else out / "results.json"
    p = Path(set_path)
    return (p if p.is_dir() else p.parent) / "results.json"


def _csv(text: str | None, flag: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in (text or "").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a comma-separated list of {cast.__name__}s, e.g. 100,1000") from None


def _check_fraction(name: str, value) -> None:
    import math

    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be an accuracy in [0, 1] (a fraction, not a percentage); got {value!r}")


def run_evaluate(args) -> dict:
    """``mttlite evaluate``: load/import the set, evaluate it, print and write results.json. Returns the document."""
    from . import __version__
    from .data import holdout_validation, load_dataset
    from .evaluate import evaluate_random_real
    from .importers import FORMATS, detect_format, read_set, resolve_space, to_synset
    from .io import atomic_write, check_writable_file
    from .ranks import process_group
    from .synset import SyntheticSet, _jsonable

    # -- 1. the set's files, its data set and space (no data loaded yet) -----------------------
    fmt = detect_format(args.set) if args.format == "auto" else args.format
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: choose one of auto, {', '.join(FORMATS)}")
    if fmt == "mttlite":
        if args.space is not None:
            raise ValueError(f"{args.set} is a mttlite set, which records its own space: drop --space")
        s = SyntheticSet.load(args.set, device=args.device)
        if args.dataset is not None and args.dataset != s.dataset:
            raise ValueError(f"{args.set} was distilled from {s.dataset!r}, not --dataset {args.dataset!r}")
        name, zca, space, raw = s.dataset, s.zca is not None, None, None
        set_arch, set_arch_kwargs = s.arch, s.arch_kwargs
    else:
        raw = read_set(args.set, fmt)
        if args.dataset is None:
            raise ValueError(f"{args.set}: a set in the {fmt} format does not say which data set it was made from; "
                             "pass --dataset NAME (see `mttlite presets` for names)")
        name = args.dataset
        space = resolve_space(raw, args.space, name)
        zca = space == "zca"
        set_arch, set_arch_kwargs = "convnet", {}

    # -- 2. the protocol and everything else that is checked before work -----------------------
    dsa = args.dsa_strategy
    if dsa is not None and dsa.strip().lower() in ("", "none"):
        dsa = ""
    flags = {"arch": args.arch, "width": args.width, "epochs": args.epochs, "num_nets": args.num_nets,
             "batch_size": args.batch, "dsa_strategy": dsa, "lr": args.lr, "seed": args.seed}
    protocol = protocol_from(set_arch, set_arch_kwargs, args.protocol, flags)
    if args.val_per_class is not None and protocol.val_fraction > 0:
        raise ValueError("give either --val-per-class or a protocol val_fraction, not both")
    _check_fraction("--full-acc", args.full_acc)
    swaps = None
    if args.swaps:
        from .swaps import swap_protocols

        swaps = swap_protocols(protocol, name, archs=_csv(args.swap_archs, "--swap-archs"),
                               epochs=_csv(args.swap_epochs, "--swap-epochs", int))
    elif args.swap_archs or args.swap_epochs:
        raise ValueError("--swap-archs and --swap-epochs need --swaps")
    if (args.full_acc is not None or args.full_epochs is not None) and not args.scores:
        raise ValueError("--full-acc and --full-epochs are used by --scores; add --scores")
    out = results_path(args.set, args.out)
    check_writable_file(out, "--out")

    # -- 3. data, then the set in the data set's space -----------------------------------------
    ds = load_dataset(name, root=args.data_root, device=args.device, zca=zca, download=args.download)
    if args.val_per_class is not None:
        ds = holdout_validation(ds, args.val_per_class)
    if raw is not None:
        s = to_synset(raw, ds, space, method="mtt" if fmt == "authors" else "imported")
    else:
        s.check_dataset(ds)
    for note in s.provenance.get("notes", []) + s.provenance.get("import_warnings", []):
        print(f"note: {note}")

    # -- 4. the evaluations ---------------------------------------------------------------------
    kw = dict(device=args.device)
    print("protocol:", protocol.describe())
    result = s.evaluate(ds, protocol, **kw)
    print(result)
    doc = {
        "format": RESULTS_FORMAT,
        "accuracy": "final-epoch test accuracy of each network (fractions in [0, 1]); never the best over epochs",
        "set": {"path": str(args.set), "format": fmt, "space": space or "recorded in the set (mttlite)",
                "dataset": s.dataset, "method": s.method, "ipc": s.ipc, "n": int(len(s.images)),
                "labels": "soft" if s.labels.is_floating_point() else "hard", "syn_lr": s.syn_lr,
                "zca": s.zca is not None, "config": _jsonable(s.config), "provenance": _jsonable(s.provenance)},
        "dataset": {"name": ds.name, "train": int(len(ds.train_labels)), "test": int(len(ds.test_labels)),
                    "val": 0 if ds.val_labels is None else int(len(ds.val_labels)), "val_spec": ds.val_spec,
                    "zca": ds.zca is not None},
        "protocol": protocol.to_dict(), "protocol_text": protocol.describe(),
        "result": result.to_dict(), "random_real": None, "swaps": None, "scores": None,
    }
    if args.random_real:
        rr = evaluate_random_real(ds, s.ipc, protocol, seed=protocol.seed)
        print("random real:", rr)
        doc["random_real"] = rr.to_dict()
    if swaps is not None:
        from .swaps import evaluate_swaps, swaps_markdown

        doc["swaps"] = evaluate_swaps(s, ds, swaps, **kw)
        print(swaps_markdown(doc["swaps"]))
    if args.scores:
        from .scores import measure_scores

        sc = measure_scores(s, ds, protocol, base=result, full_acc=args.full_acc, full_epochs=args.full_epochs,
                            random_seed=protocol.seed, **kw)
        doc["scores"] = sc
        a = sc["accuracies"]
        print(f"DD-Ranking: HLR {sc['hlr']:+.4f} (full {a['real_hard']:.4f} − syn hard {a['syn_hard']:.4f}), "
              f"IOR {sc['ior']:+.4f} (syn {a['syn_any']:.4f} − random {a['rdm_any']:.4f}), "
              f"LRS {sc['lrs']:.4f}, ARS {sc['ars']:.4f} (fractions; LRS, ARS in [0, 1])")

    # -- 5. one file, written once, by one process ---------------------------------------------
    doc.update(mttlite=__version__, created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    if process_group()[0] == 0:
        text = json.dumps(doc, indent=2)
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {out}")
    return doc


# ---------------------------------------------------------------------------------------------
# mttlite baselines
# ---------------------------------------------------------------------------------------------


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value): none -> None, true/false -> bool, then int, float, else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--opt {text!r}: expected KEY=VALUE, e.g. --opt iterations=200")
    v = value.strip()
    low = v.lower()
    if low in ("none", "null"):
        return key.strip(), None
    if low in ("true", "false"):
        return key.strip(), low == "true"
    for cast in (int, float):
        try:
            return key.strip(), cast(v)
        except ValueError:
            pass
    return key.strip(), v


def run_baselines(args):
    """``mttlite baselines METHOD``: build the method's set with ``baselines.make_set`` and save it
    (``list``: print the methods and their options). Returns the set (None for ``list``)."""
    from .baselines import METHODS, make_set, options
    from .data import holdout_validation, load_dataset
    from .io import check_writable_file

    if args.method == "list":
        for m in METHODS:
            print(f"{m}: " + ", ".join(f"{k}={v!r}" for k, v in options(m).items()))
        return None
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose one of: {', '.join(METHODS)} (or `list`)")
    if args.ipc is None or args.out is None:
        raise ValueError("give --ipc N and --out FILE.safetensors")
    valid = options(args.method)
    kw = dict(parse_option(t) for t in args.opt)
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise ValueError(f"method {args.method!r} has no option(s) {unknown}; its options: {', '.join(valid)}")
    for k, v in (("seed", args.seed), ("device", args.device), ("progress", True)):
        if k in valid and k not in kw:
            kw[k] = v
    if Path(args.out).suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: a set is saved as one .safetensors file; give a name ending in .safetensors")
    check_writable_file(args.out, "--out")
    ds = load_dataset(args.dataset, root=args.data_root, device=args.device, zca=args.zca, download=args.download)
    if args.val_per_class is not None:
        ds = holdout_validation(ds, args.val_per_class)
    s = make_set(args.method, ds, args.ipc, **kw)
    s.provenance["val_split"] = ds.val_spec
    s.save(args.out)
    print(f"saved {args.out}: {s}")
    return s
