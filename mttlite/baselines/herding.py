"""Herding: greedily pick the samples whose running mean tracks the class mean (Welling 2009; DeepCore).

In an embedding e (``embedding.py``), class c has mean μ = (1/N_c) Σ_i e(x_i). Herding builds the
selection one sample at a time, each time taking the sample that brings the mean of the
selected set closest to μ:

    S_0 = ∅
    s_{k+1} = argmin_{x ∉ S_k} ‖ μ − (Σ_{s ∈ S_k} e(s) + e(x)) / (k + 1) ‖
            = argmin_{x ∉ S_k} ‖ (k + 1) μ − Σ_{s ∈ S_k} e(s) − e(x) ‖        (same argmin: × (k + 1))

so ‖μ − mean(S_k)‖ shrinks like O(1/k) — the selected images are "representative" of the class
mean in feature space. Ties go to the lowest index. Distances are computed in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import (
    DEFAULT_WIDTH,
    check_ipc,
    class_indices,
    class_major_labels,
    measure_cost,
    to_synset,
)
from .embedding import embed_train_set, embedding_config


def herding(features: Tensor, k: int) -> Tensor:
    """Indices (k,) int64 on the CPU into ``features`` (n, D), in the order herding picks them.

    At step k the pick minimises ‖(k + 1) μ − S − e(x)‖ over the unpicked x, where S is the sum of
    the picked features and μ the mean of all n (see the module docstring). The picks are made on the
    features' device (:func:`herding_order`) and read back once.
    """
    return herding_order(features, k).cpu()


def herding_order(features: Tensor, k: int) -> Tensor:
    """:func:`herding`'s picks as a (k,) int64 tensor on the features' device.

    Every step stays on the device — the argmin is a 0-d device tensor, used as an index without
    being read back — so the k steps never wait for the device.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"herding needs 1 <= k <= n = {n} samples, got k={k}")
    f = features.detach().double()
    mu = f.mean(0)  # (D,)
    picked = torch.zeros(n, dtype=torch.bool, device=f.device)
    total = torch.zeros_like(mu)  # Σ_{s ∈ S_k} e(s)
    out = []
    for step in range(k):
        target = (step + 1) * mu - total  # (D,): the e(x) that would make the running mean exactly μ
        dist = (f - target).pow(2).sum(1)  # (n,) ‖(k+1)μ − S − e(x)‖²
        dist.masked_fill_(picked, float("inf"))
        j = dist.argmin().view(1)  # (1,) on the device
        picked.index_fill_(0, j, True)
        total += f.index_select(0, j)[0]
        out.append(j)
    return torch.cat(out)


def herding_set(dataset, ipc: int, seed: int = 0, buffer=None, expert: int = 0, epoch: int | None = None,
                arch: str = "convnet", width: int = DEFAULT_WIDTH, depth: int | None = None, norm: str | None = None,
                device="cpu"):
    """Herding per class in ``ConvNet.embed`` space (random init from ``seed``, or an expert if ``buffer``)."""
    ipc = check_ipc(dataset, ipc)
    config = embedding_config(ipc, seed, buffer, expert, epoch, arch, width, depth, norm)
    with measure_cost(device) as cost:
        feats, info, _ = embed_train_set(dataset, seed, buffer, expert, epoch, arch, width, depth, norm, device)
        picks = []
        for members in class_indices(dataset):
            picks.append(members[herding(feats[members.to(feats.device)], ipc)])
        idx = torch.cat(picks)
        images = dataset.train_images[idx.to(dataset.train_images.device)]
    return to_synset(dataset, images, class_major_labels(dataset.num_classes, ipc), "herding", config, cost,
                     {"embedding": info, "indices": idx.tolist()})
