"""Random selection: ipc real training images per class, uniformly at random (DeepCore's "Uniform").

The floor every other row of a table must clear: no network, no optimisation,

    S_c = the first ipc entries of a random permutation of class c's training images

DeepCore (Guo, Zhao & Bai 2022) finds it a strong baseline that many selection rules do not beat.
The draw is ``evaluate.random_real_subset(dataset, ipc, seed)``: the same images the evaluation
module's random-real baseline and the synthesis methods' ``pix_init="real"`` start from, so a
synthesis method with seed s starts exactly at the "random" set with seed s.
"""
from __future__ import annotations

from ..evaluate import random_real_subset
from .common import check_ipc, measure_cost, to_synset


def random_set(dataset, ipc: int, seed: int = 0, device="cpu"):
    """The class-balanced random real subset as a ``SyntheticSet`` (method "random")."""
    ipc = check_ipc(dataset, ipc)
    with measure_cost(device) as cost:
        images, labels = random_real_subset(dataset, ipc, seed=seed)
    return to_synset(dataset, images, labels, "random", {"ipc": ipc, "seed": int(seed)}, cost,
                     {"selection": "uniform per class (evaluate.random_real_subset)"})
