"""DD-Ranking's scores: the formulas against hand-computed values, their bounds and refusals, and
``measure_scores`` wiring the right accuracies into them (a toy data set, tiny protocol)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mttlite.data import Dataset, holdout_validation
from mttlite.evaluate import EvalProtocol, random_real_subset
from mttlite.scores import (
    augmentation_robust_score,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    measure_scores,
    normalised_exp,
    random_real_accuracy,
    scores_from_accuracies,
)
from mttlite.synset import SyntheticSet

TINY = EvalProtocol(width=8, epochs=2, num_nets=1, batch_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the formulas, by hand ----------------------------------------------------------------------
# e = 2.718281828, 1/e = 0.367879441, e - 1/e = 2.350402387


def test_normalisation_hand_values():
    assert normalised_exp(-1.0) == pytest.approx(0.0, abs=1e-15)
    assert normalised_exp(1.0) == pytest.approx(1.0)
    assert normalised_exp(0.0) == pytest.approx(0.268941421, abs=1e-9)  # (1 - 1/e)/(e - 1/e) = 1/(1 + e)
    assert normalised_exp(0.2) == pytest.approx(0.363139232, abs=1e-9)  # (1.221402758 - 0.367879441)/2.350402387


def test_lrs_hand_values():
    # full 0.90, syn hard 0.60 -> HLR 0.30; syn 0.70, random 0.50 -> IOR 0.20
    hlr, ior = hard_label_recovery(0.90, 0.60), improvement_over_random(0.70, 0.50)
    assert (hlr, ior) == (pytest.approx(0.30), pytest.approx(0.20))
    # α = 0.5·0.20 − 0.5·0.30 = −0.05;  (e^−0.05 − 1/e)/(e − 1/e) = (0.951229425 − 0.367879441)/2.350402387
    assert label_robust_score(hlr, ior) == pytest.approx(0.248191538, abs=1e-9)
    # w = 1: IOR alone (α = 0.2); w = 0: −HLR alone (α = −0.3 -> (0.740818221 − 0.367879441)/2.350402387)
    assert label_robust_score(hlr, ior, weight=1.0) == pytest.approx(0.363139232, abs=1e-9)
    assert label_robust_score(hlr, ior, weight=0.0) == pytest.approx(0.158670184, abs=1e-8)
    # the ends of the scale: a set that recovers everything and beats random by 1 / the opposite
    assert label_robust_score(-1.0, 1.0) == pytest.approx(1.0) and label_robust_score(1.0, -1.0) == pytest.approx(0.0)


def test_ars_hand_value():
    # with aug: 0.80 − 0.55 = 0.25; without: 0.75 − 0.60 = 0.15; β = 0.5·0.25 + 0.5·0.15 = 0.2
    assert augmentation_robust_score(0.80, 0.55, 0.75, 0.60) == pytest.approx(0.363139232, abs=1e-9)
    # γ = 1: the augmented difference only (β = 0.25 -> (1.284025417 − 0.367879441)/2.350402387)
    assert augmentation_robust_score(0.80, 0.55, 0.75, 0.60, weight=1.0) == pytest.approx(0.389782609, abs=1e-8)


def test_scores_from_accuracies():
    acc = dict(real_hard=0.9, syn_hard=0.6, syn_any=0.7, rdm_any=0.5)
    out = scores_from_accuracies(acc)
    assert out["lrs"] == pytest.approx(0.248191538, abs=1e-9) and out["ars"] is None
    out = scores_from_accuracies({**acc, "syn_aug": 0.8, "rdm_aug": 0.55, "syn_naug": 0.75, "rdm_naug": 0.6})
    assert out["ars"] == pytest.approx(0.363139232, abs=1e-9)
    assert (out["ars_with_aug"], out["ars_without_aug"]) == (pytest.approx(0.25), pytest.approx(0.15))
    with pytest.raises(ValueError, match="rdm_any"):
        scores_from_accuracies({"real_hard": 0.9, "syn_hard": 0.6, "syn_any": 0.7})


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="not percentages"):
        hard_label_recovery(90.0, 60.0)  # DD-Ranking's code works in percent; the formula wants fractions
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        improvement_over_random(0.5, float("nan"))
    with pytest.raises(ValueError, match="weight"):
        label_robust_score(0.1, 0.1, weight=1.5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        label_robust_score(30.0, 20.0)


# --- measuring what the scores need -------------------------------------------------------------


def _toy():
    """3 classes of 1x12x12 images (class c brighter in band c), 20 train / 10 test per class."""
    gen = torch.Generator().manual_seed(0)

    def split(per_class):
        y = torch.arange(3).repeat_interleave(per_class)
        x = 0.5 * torch.randn(len(y), 1, 12, 12, generator=gen)
        for c in range(3):
            x[y == c, :, 4 * c:4 * c + 4] += 1.0
        return x, y

    (xtr, ytr), (xte, yte) = split(20), split(10)
    return Dataset("toy", xtr, ytr, xte, yte, ["a", "b", "c"], (0.0,), (1.0,))


def _set(ds, soft=False, syn_lr=0.05):
    x, y = random_real_subset(ds, 2, seed=1)
    if soft:
        y = 0.9 * torch.nn.functional.one_hot(y, 3).float() + 0.05
    return SyntheticSet(images=x, labels=y, syn_lr=syn_lr, dataset="toy", class_names=ds.class_names,
                        mean=ds.mean, std=ds.std)


def test_measure_scores_wires_the_accuracies():
    ds = _toy()
    s = _set(ds)
    base = s.evaluate(ds, TINY, progress=False)
    out = measure_scores(s, ds, TINY, base=base, full_acc=0.9)
    a = out["accuracies"]
    # the protocol uses the data set's DSA: Acc(syn, any) is Acc(syn, aug), and hard labels change nothing
    assert a["syn_any"] == a["syn_aug"] == a["syn_hard"] == base.mean and a["real_hard"] == 0.9
    assert a["rdm_any"] == a["rdm_aug"]
    assert out["runs"]["syn_naug"]["protocol"]["dsa_strategy"] == ""
    assert set(out["runs"]["rdm_aug"]["by_lr"]) == {"0.01", "0.05"}  # η = 0.01 and the set's η
    assert out["hlr"] == pytest.approx(0.9 - a["syn_hard"]) and out["ior"] == pytest.approx(a["syn_any"] - a["rdm_any"])
    alpha = 0.5 * out["ior"] - 0.5 * out["hlr"]
    assert out["lrs"] == pytest.approx((math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1)))
    beta = 0.5 * (a["syn_aug"] - a["rdm_aug"]) + 0.5 * (a["syn_naug"] - a["rdm_naug"])
    assert out["ars"] == pytest.approx((math.exp(beta) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert 0.0 <= out["lrs"] <= 1.0 and 0.0 <= out["ars"] <= 1.0


def test_measure_scores_soft_labels_and_full_data():
    ds = _toy()
    s = _set(ds, soft=True)
    no_aug = replace(TINY, dsa_strategy="none")  # "none" is no augmentation, as "" is
    out = measure_scores(s, ds, no_aug, full_epochs=1)
    a = out["accuracies"]
    assert "syn_hard" in out["runs"] and out["runs"]["syn_hard"]["set_info"]["labels"] == "hard"
    assert a["syn_any"] == a["syn_naug"] and a["rdm_any"] == a["rdm_naug"]  # the protocol has no augmentation
    assert out["augmentation"] == "color_crop_cutout_flip_scale_rotate"  # ARS's "aug": the data set's DSA
    full = out["runs"]["real_hard"]
    assert full["set_info"]["n"] == 60 and full["protocol"]["epochs"] == 1 and full["protocol"]["dsa_strategy"] == ""
    assert full["lr"] == 0.01 and a["real_hard"] == full["mean"]


def test_random_subset_lr_is_chosen_on_validation_when_there_is_one():
    ds = holdout_validation(_toy(), 3)
    best, by_lr = random_real_accuracy(ds, 2, replace(TINY, dsa_strategy="", epochs=3), syn_lr=0.3)
    assert set(by_lr) == {"0.01", "0.3"}
    vals = {k: sum(r["val_accs"]) / len(r["val_accs"]) for k, r in by_lr.items()}
    assert f"{best.lr:g}" == max(vals, key=lambda k: (vals[k], -float(k)))
    with pytest.raises(ValueError, match="not percentages"):
        measure_scores(_set(ds), ds, TINY, full_acc=85.0)
