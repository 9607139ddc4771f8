"""K-center greedy: cover the class with as few, as spread-out samples as possible (Sener & Savarese 2018).

The k-center problem picks k centres C from a point set X (here: e(x) of one class, see
``embedding.py``) minimising the covering radius

    r(C) = max_{x ∈ X} min_{c ∈ C} ‖e(x) − e(c)‖

It is NP-hard; the greedy rule (Gonzalez 1985)

    c_1 = a random point (from the seed, as DeepCore)
    c_{k+1} = argmax_{x ∈ X} min_{c ∈ {c_1..c_k}} ‖e(x) − e(c)‖        the point farthest from the centres

is a 2-approximation: r(C_greedy) ≤ 2 · r(C_opt). Proof sketch: the k + 1-th farthest point is at
distance r(C_greedy) from all k greedy centres, which are pairwise ≥ that far apart too; two of
these k + 1 points share an optimal centre, so r(C_greedy) ≤ 2 r(C_opt) by the triangle inequality.
Where coreset *herding* picks typical images, k-center picks *diverse* ones (outliers included).
Ties go to the lowest index; distances are computed in float64.
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


def kcenter_greedy(features: Tensor, k: int, first: int = 0) -> Tensor:
    """Indices (k,) int64 on the CPU into ``features`` (n, D) in greedy order, starting from centre ``first``.

    Keeps d(x) = min over chosen centres ‖e(x) − e(c)‖ (n,), updated with each new centre. The picks
    are made on the features' device (:func:`kcenter_order`) and read back once.
    """
    return kcenter_order(features, k, first).cpu()


def kcenter_order(features: Tensor, k: int, first: int = 0) -> Tensor:
    """:func:`kcenter_greedy`'s picks as a (k,) int64 tensor on the features' device.

    The argmax of every step is a 0-d device tensor, used as an index without being read back.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-center needs 1 <= k <= n = {n} samples, got k={k}")
    if not 0 <= first < n:
        raise ValueError(f"first centre must be an index in [0, {n}), got {first}")
    f = features.detach().double()
    out = [torch.full((1,), int(first), dtype=torch.int64, device=f.device)]
    d = (f - f[first]).norm(dim=1)  # (n,) distance to the nearest centre so far
    for _ in range(k - 1):
        j = d.argmax().view(1)  # the point farthest from every centre, (1,) on the device
        out.append(j)
        d = torch.minimum(d, (f - f.index_select(0, j)).norm(dim=1))
    return torch.cat(out)


def covering_radius(features: Tensor, centres: Tensor) -> float:
    """r(C) = max_x min_{c ∈ C} ‖e(x) − e(c)‖ for features (n, D) and centre indices (k,)."""
    f = features.detach().double()
    return float(torch.cdist(f, f[centres.to(f.device)]).min(dim=1).values.max())


def kcenter_set(dataset, ipc: int, seed: int = 0, buffer=None, expert: int = 0, epoch: int | None = None,
                arch: str = "convnet", width: int = DEFAULT_WIDTH, depth: int | None = None, norm: str | None = None,
                device="cpu"):
    """K-center greedy per class in ``ConvNet.embed`` space; the first centre of each class is seeded."""
    ipc = check_ipc(dataset, ipc)
    config = embedding_config(ipc, seed, buffer, expert, epoch, arch, width, depth, norm)
    with measure_cost(device) as cost:
        feats, info, gen = embed_train_set(dataset, seed, buffer, expert, epoch, arch, width, depth, norm, device)
        picks, radii = [], []
        for members in class_indices(dataset):
            fc = feats[members.to(feats.device)]
            first = int(torch.randint(members.numel(), (1,), generator=gen))
            local = kcenter_greedy(fc, ipc, first)
            radii.append(round(covering_radius(fc, local), 4))
            picks.append(members[local])
        idx = torch.cat(picks)
        images = dataset.train_images[idx.to(dataset.train_images.device)]
    return to_synset(dataset, images, class_major_labels(dataset.num_classes, ipc), "kcenter", config, cost,
                     {"embedding": info, "indices": idx.tolist(), "covering_radius_per_class": radii})
