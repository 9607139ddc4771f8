"""DD-Ranking's label-robust and augmentation-robust scores (LRS, ARS), from their published definitions.

A test accuracy mixes what the distilled images teach with what the evaluation recipe adds (soft
labels from a teacher, strong augmentation, a learned lr). DD-Ranking (Li et al., "DD-Ranking:
Rethinking the Evaluation of Dataset Distillation", arXiv 2505.13300, 2025) separates them by
comparing against the full real data and a random real subset of the same size. With every
accuracy a fraction in [0, 1] (final-epoch test accuracy, mean over the protocol's networks):

    HLR = Acc(real, hard) − Acc(syn, hard)                  hard-label recovery (lower is better)
    IOR = Acc(syn, any) − Acc(rdm, any)                     improvement over random (higher is better)
    α   = w · IOR − (1 − w) · HLR                           w ∈ [0, 1], 0.5 by default
    LRS = (e^α − e^{−1}) / (e − e^{−1})                     label-robust score, in [0, 1]

    β   = γ (Acc(syn, aug) − Acc(rdm, aug)) + (1 − γ)(Acc(syn, no aug) − Acc(rdm, no aug))
    ARS = (e^β − e^{−1}) / (e − e^{−1})                     augmentation-robust score, γ = 0.5 by default

"real" is the whole training set, "syn" the distilled set, "rdm" a class-balanced random real subset
with the same images per class; "hard" trains on class indices (a soft-labelled set on its arg-max
classes), "any" in the set's own evaluation setting (its labels, its learned lr, the protocol's
augmentation). Since IOR, HLR ∈ [−1, 1], α, β ∈ [−1, 1] and both scores lie in [0, 1]; with α = 0
the score is (1 − e^{−1}) / (e − e^{−1}) = 1 / (1 + e) ≈ 0.269.

Where these definitions were checked: the DD-Ranking repository's documentation
(``doc/introduction.md``: HLR, IOR, α = w IOR − (1 − w) HLR, LRS = 100 % · (e^α − e^{−1}) / (e − e^{−1});
ARS's β as above, "normalized similarly") and its code (``ddranking/metrics/hard_label.py``,
``soft_label.py``: ``alpha = lrs_lambda * ior - (1 - lrs_lambda) * hlr``, ``lrs_lambda = 0.5``;
``aug_robust.py``: ``beta = ars_lambda * with_aug_score + (1 - ars_lambda) * without_aug_score``).

Where DD-Ranking's code departs from its paper, and what mttlite does instead:

* it scores each network by the *best* test accuracy seen over its epochs (tested every 10 epochs)
  — a choice made on the test set; mttlite uses the *final-epoch* accuracy, as everywhere else;
* its accuracies are percentages, so α is in percentage points and its "LRS" is e^α for α up to
  ±100: not bounded to [0, 1] as documented; mttlite uses fractions, so the scores are in [0, 1];
* it averages the score of each evaluation round; mttlite applies the formula to the mean
  accuracies (the exponential is convex, so the two differ slightly);
* it tunes the random subset's lr over {0.001, 0.005, 0.01, 0.05, 0.1} on the test set and trains
  the full data with a separate recipe (no augmentation, lr 0.01); mttlite trains the random subset
  at η = 0.01 and at the set's own η and keeps the better one (by the validation split when there is
  one, else by test accuracy: a choice in the baseline's favour), and the full data without
  augmentation at η = 0.01 (or takes a known full-data accuracy, ``full_acc``);
* for a soft-labelled set it gives the random subset soft labels from a pretrained teacher; mttlite
  has no teacher at evaluation, so the random subset keeps its hard labels and, for soft-labelled
  sets (TESLA, DATM), IOR also credits the learned labels themselves (the result says so).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .augment import default_strategy, parse_strategy
from .evaluate import EvalProtocol, EvalResult, evaluate_set, hard_labels, random_real_subset, resolve_lr, resolve_strategy

#: e^{−1} and the span e − e^{−1} of the normalisation x -> (e^x − e^{−1}) / (e − e^{−1}).
_E_INV = math.exp(-1.0)
_SPAN = math.e - _E_INV


def _fraction(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        hint = " (accuracies are fractions in [0, 1], not percentages)" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"{name} must be an accuracy in [0, 1]; got {value!r}{hint}")
    return value


def _weight(name: str, value) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a weight in [0, 1]; got {value!r}")
    return value


def normalised_exp(x: float) -> float:
    """(e^x − e^{−1}) / (e − e^{−1}): maps x ∈ [−1, 1] monotonically onto [0, 1] (0 -> 1 / (1 + e))."""
    return (math.exp(x) - _E_INV) / _SPAN


def hard_label_recovery(acc_real_hard: float, acc_syn_hard: float) -> float:
    """HLR = Acc(real, hard) − Acc(syn, hard): how much of the full data's accuracy the set does not recover."""
    return _fraction("acc_real_hard", acc_real_hard) - _fraction("acc_syn_hard", acc_syn_hard)


def improvement_over_random(acc_syn_any: float, acc_rdm_any: float) -> float:
    """IOR = Acc(syn, any) − Acc(rdm, any): the gain over random real images of the same size, same setting."""
    return _fraction("acc_syn_any", acc_syn_any) - _fraction("acc_rdm_any", acc_rdm_any)


def label_robust_score(hlr: float, ior: float, weight: float = 0.5) -> float:
    """LRS = (e^α − e^{−1}) / (e − e^{−1}),  α = w · IOR − (1 − w) · HLR  (HLR, IOR in [−1, 1])."""
    w = _weight("weight", weight)
    for name, v in (("hlr", hlr), ("ior", ior)):
        if not -1.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be a difference of two accuracies, in [-1, 1]; got {v!r}")
    return normalised_exp(w * float(ior) - (1.0 - w) * float(hlr))


def augmentation_robust_score(acc_syn_aug: float, acc_rdm_aug: float, acc_syn_naug: float, acc_rdm_naug: float,
                              weight: float = 0.5) -> float:
    """ARS = (e^β − e^{−1}) / (e − e^{−1}),  β = γ (syn_aug − rdm_aug) + (1 − γ)(syn_naug − rdm_naug)."""
    g = _weight("weight", weight)
    with_aug = _fraction("acc_syn_aug", acc_syn_aug) - _fraction("acc_rdm_aug", acc_rdm_aug)
    without = _fraction("acc_syn_naug", acc_syn_naug) - _fraction("acc_rdm_naug", acc_rdm_naug)
    return normalised_exp(g * with_aug + (1.0 - g) * without)


#: The accuracies :func:`scores_from_accuracies` needs (fractions in [0, 1]).
ACCURACIES = ("real_hard", "syn_hard", "syn_any", "rdm_any", "syn_aug", "rdm_aug", "syn_naug", "rdm_naug")


def scores_from_accuracies(acc: dict, lrs_weight: float = 0.5, ars_weight: float = 0.5) -> dict:
    """HLR, IOR, LRS and ARS from the accuracies named in ``ACCURACIES`` (ARS only if its four are given).

    Returns ``{"hlr", "ior", "lrs", "ars" (or None), "ars_with_aug", "ars_without_aug", "lrs_weight", "ars_weight"}``.
    """
    missing = [k for k in ACCURACIES[:4] if k not in acc]
    if missing:
        raise ValueError(f"the label-robust score needs the accuracies {missing}")
    hlr = hard_label_recovery(acc["real_hard"], acc["syn_hard"])
    ior = improvement_over_random(acc["syn_any"], acc["rdm_any"])
    out = {"hlr": hlr, "ior": ior, "lrs": label_robust_score(hlr, ior, lrs_weight), "lrs_weight": float(lrs_weight),
           "ars": None, "ars_with_aug": None, "ars_without_aug": None, "ars_weight": float(ars_weight)}
    if all(k in acc for k in ACCURACIES[4:]):
        out["ars"] = augmentation_robust_score(acc["syn_aug"], acc["rdm_aug"], acc["syn_naug"], acc["rdm_naug"], ars_weight)
        out["ars_with_aug"] = acc["syn_aug"] - acc["rdm_aug"]
        out["ars_without_aug"] = acc["syn_naug"] - acc["rdm_naug"]
    return out


# ---------------------------------------------------------------------------------------------
# Measuring the accuracies the scores need
# ---------------------------------------------------------------------------------------------


def _selection_score(res: EvalResult) -> float:
    """What chooses the random subset's η: mean validation accuracy if there is a split, else mean test accuracy."""
    return float(np.mean(res.val_accs)) if res.val_accs else res.mean


def random_real_accuracy(dataset, ipc: int, protocol: EvalProtocol, syn_lr: float | None, seed: int = 0,
                         device=None, progress: bool = False) -> tuple[EvalResult, dict]:
    """The random real subset (ipc per class, ``seed``) under ``protocol``, at η = 0.01 and at the set's
    η (``resolve_lr``; one run if they agree). Returns the better result (by validation accuracy if
    the data set has a split, else by test accuracy) and every run by η."""
    images, labels = random_real_subset(dataset, ipc, seed=seed)
    etas = sorted({resolve_lr(protocol, None), resolve_lr(protocol, syn_lr)})
    runs = {}
    for eta in etas:
        res = evaluate_set(images, labels, dataset, replace(protocol, lr=eta), device=device, progress=progress)
        res.set_info.update(source="random real subset", ipc=int(ipc), subset_seed=int(seed))
        runs[eta] = res
    best = max(runs.values(), key=_selection_score)
    return best, {f"{eta:g}": r.to_dict() for eta, r in runs.items()}


def full_data_accuracy(dataset, protocol: EvalProtocol, epochs: int | None = None, device=None,
                       progress: bool = False) -> EvalResult:
    """Acc(real, hard): networks trained on the whole training set with hard labels, no augmentation,
    η = 0.01 (``protocol.lr`` if set), ``epochs`` (default the protocol's)."""
    p = replace(protocol, dsa_strategy="", epochs=int(epochs or protocol.epochs))
    res = evaluate_set(dataset.train_images, dataset.train_labels, dataset, p, lr=None, device=device, progress=progress)
    res.set_info.update(source="full training set")
    return res


def measure_scores(synset, dataset, protocol: EvalProtocol, base: EvalResult | None = None,
                   full_acc: float | None = None, full_epochs: int | None = None, random_seed: int = 0,
                   lrs_weight: float = 0.5, ars_weight: float = 0.5, device=None, progress: bool = False) -> dict:
    """Train what LRS and ARS need for ``synset`` under ``protocol`` and compute them.

    base: the set's result under ``protocol`` if already measured (Acc(syn, any)); full_acc: a known
    Acc(real, hard) in [0, 1] instead of training on the full data (which takes ``protocol.num_nets``
    networks of ``full_epochs`` epochs on every training image). "aug" is the protocol's augmentation,
    or the data set's DSA when the protocol has none; "no aug" is no augmentation.

    Returns ``{"accuracies": {name: fraction}, "runs": {name: EvalResult dict}, "hlr", "ior", "lrs",
    "ars", …, "notes": [...]}`` (``scores_from_accuracies`` plus what was measured).
    """
    if full_acc is not None:
        full_acc = _fraction("full_acc", full_acc)
    _weight("lrs_weight", lrs_weight)
    _weight("ars_weight", ars_weight)
    kw = dict(device=device, progress=progress)
    strategy = "_".join(parse_strategy(resolve_strategy(protocol, dataset.name)))  # "" for none ("none" too)
    aug = replace(protocol, dsa_strategy=strategy or default_strategy(dataset.name))
    naug = replace(protocol, dsa_strategy="")
    runs: dict[str, dict] = {}
    acc: dict[str, float] = {}

    syn_any = base if base is not None else synset.evaluate(dataset, protocol, **kw)
    runs["syn_any"], acc["syn_any"] = syn_any.to_dict(), syn_any.mean
    if synset.labels.is_floating_point():  # a soft-labelled set, trained on its arg-max classes
        syn_hard = evaluate_set(synset.images, hard_labels(synset.labels), dataset, protocol, lr=synset.syn_lr,
                                texture=synset.texture is not None, **kw)  # a texture set trains on crops
        runs["syn_hard"], acc["syn_hard"] = syn_hard.to_dict(), syn_hard.mean
    else:
        acc["syn_hard"] = acc["syn_any"]
    other = naug if strategy else aug  # the augmentation setting the protocol is not in
    syn_other = synset.evaluate(dataset, other, **kw)
    name_other, name_same = ("syn_naug", "syn_aug") if strategy else ("syn_aug", "syn_naug")
    runs[name_other], acc[name_other], acc[name_same] = syn_other.to_dict(), syn_other.mean, acc["syn_any"]

    for name, p in (("rdm_aug", aug), ("rdm_naug", naug)):
        best, by_eta = random_real_accuracy(dataset, synset.ipc, p, synset.syn_lr, seed=random_seed, **kw)
        runs[name] = {"chosen_lr": best.lr, "by_lr": by_eta}
        acc[name] = best.mean
    acc["rdm_any"] = acc["rdm_aug"] if strategy else acc["rdm_naug"]

    notes = ["accuracies are final-epoch test accuracies (fractions), mean over the protocol's networks",
             "random subset: the better of eta = 0.01 and the set's eta (by validation accuracy if there is a split, "
             "else by test accuracy)"]
    if synset.labels.is_floating_point():
        notes.append("soft-labelled set: the random subset has hard labels (no teacher), so IOR also credits the "
                     "learned labels; DD-Ranking gives the random subset a teacher's soft labels")
    if full_acc is None:
        full = full_data_accuracy(dataset, protocol, full_epochs, **kw)
        runs["real_hard"], acc["real_hard"] = full.to_dict(), full.mean
    else:
        acc["real_hard"] = full_acc
        runs["real_hard"] = {"given": full_acc}
        notes.append("Acc(real, hard) was given (full_acc), not measured")
    out = scores_from_accuracies(acc, lrs_weight, ars_weight)
    return {**out, "accuracies": acc, "runs": runs, "augmentation": aug.dsa_strategy, "notes": notes}
