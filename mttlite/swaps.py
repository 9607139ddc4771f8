"""DC-Bench-style swaps: one set, several declared protocols, one table.

DC-Bench (Cui et al., "DC-BENCH: Dataset Condensation Benchmark", NeurIPS 2022 Datasets and
Benchmarks) showed that a method's rank moves with the evaluation recipe: the augmentation, the
network, the training length. So a set is judged under a base protocol and under swaps that change
one factor at a time,

    base                          the declared protocol
    augmentation ∈ AUGMENTATIONS  none | dsa (the data set's DSA strategy) | crop | flip
    arch ∈ archs                  another evaluation network (width kept; depth and norm its defaults)
    epochs ∈ epochs               another training length

each a full :class:`~mttlite.evaluate.EvalProtocol` (final-epoch accuracy, mean ± std over its
networks), every row of the table naming its protocol. The two torchvision-style augmentations are
single DSA ops applied to every batch (mode "S" with one op): ``crop`` translates each image by
t ~ U{−s..s}² pixels with zero fill, s = round(H/8), the distribution of
``transforms.RandomCrop(H, padding=H/8)`` (the fill is 0 in the normalised space, the mean pixel,
not black), and ``flip`` is ``transforms.RandomHorizontalFlip(0.5)``. Digits (MNIST, SVHN) get no
flip by default, as in DSA.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .augment import DIGIT_DATASETS, parse_strategy
from .evaluate import DISPLAY_NAMES, EvalProtocol, resolve_strategy

#: Augmentation name -> ``EvalProtocol.dsa_strategy`` (None: the data set's DSA strategy).
AUGMENTATIONS: dict[str, str | None] = {"none": "", "dsa": None, "crop": "crop", "flip": "flip"}


@dataclass(frozen=True)
class Swap:
    """One row of a swap table: which factor was changed, to what, and the whole protocol."""

    factor: str  # "base", "augmentation", "arch" or "epochs"
    value: str
    protocol: EvalProtocol


def _strategy(protocol: EvalProtocol, dataset_name: str) -> str:
    """The DSA ops the protocol applies, joined by '_' ("" for none, whether written "" or "none")."""
    return "_".join(parse_strategy(resolve_strategy(protocol, dataset_name)))


def default_augmentations(dataset_name: str) -> tuple[str, ...]:
    """All of ``AUGMENTATIONS``, without ``flip`` for digit data sets (a mirrored 2 is not a 2)."""
    names = tuple(AUGMENTATIONS)
    return tuple(n for n in names if n != "flip") if dataset_name.strip().lower() in DIGIT_DATASETS else names


def swap_protocols(base: EvalProtocol, dataset_name: str, augmentations=None, archs=(), epochs=()) -> list[Swap]:
    """The base protocol, then one swap per augmentation, arch and epoch count (duplicates of an
    earlier row dropped). augmentations: names in ``AUGMENTATIONS`` (None: ``default_augmentations``)."""
    augmentations = default_augmentations(dataset_name) if augmentations is None else tuple(augmentations)
    unknown = [a for a in augmentations if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from: {', '.join(AUGMENTATIONS)}")
    swaps = [Swap("base", "as declared", base)]
    swaps += [Swap("augmentation", a, replace(base, dsa_strategy=AUGMENTATIONS[a])) for a in augmentations]
    for a in archs:
        same = a == base.arch
        swaps.append(Swap("arch", a, replace(base, arch=a, depth=base.depth if same else None,
                                             norm=base.norm if same else None)))
    swaps += [Swap("epochs", str(int(e)), replace(base, epochs=int(e))) for e in epochs]
    out, seen = [], []
    for s in swaps:
        key = replace(s.protocol, dsa_strategy=_strategy(s.protocol, dataset_name))
        if key not in seen:
            seen.append(key)
            out.append(s)
    return out


def evaluate_swaps(synset, dataset, swaps: list[Swap], device=None, progress: bool = False) -> list[dict]:
    """Evaluate ``synset`` under every swap. One dict per row: factor, value, arch, augmentation (the
    resolved DSA strategy, "none" for none), epochs, lr (η used), mean, std, accs, val_mean, protocol."""
    rows = []
    for s in swaps:
        res = synset.evaluate(dataset, s.protocol, device=device, progress=progress)
        rows.append({
            "factor": s.factor, "value": s.value, "arch": s.protocol.arch,
            "augmentation": _strategy(s.protocol, dataset.name) or "none", "epochs": s.protocol.epochs,
            "lr": res.lr, "mean": res.mean, "std": res.std, "accs": res.accs,
            "val_mean": float(np.mean(res.val_accs)) if res.val_accs else None,
            "protocol": s.protocol.to_dict(),
        })
    return rows


def swaps_markdown(rows: list[dict]) -> str:
    """The swap table as Markdown: accuracies in %, mean ± std over the networks of each row."""
    val = any(r.get("val_mean") is not None for r in rows)
    head = "| swap | network | augmentation | epochs | η | test acc (%) |" + (" val acc (%) |" if val else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        swap = "base" if r["factor"] == "base" else f"{r['factor']} = {r['value']}"
        line = (f"| {swap} | {DISPLAY_NAMES.get(r['arch'], r['arch'])} | {r['augmentation']} | {r['epochs']} | "
                f"{r['lr']:.4g} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} ({len(r['accs'])} nets) |")
        if val:
            line += f" {100 * r['val_mean']:.2f} |" if r.get("val_mean") is not None else " – |"
        lines.append(line)
    return "\n".join(lines)
