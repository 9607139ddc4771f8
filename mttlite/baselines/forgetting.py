"""Forgetting events: keep the examples a network keeps un-learning (Toneva et al. 2019; DeepCore).

Train a network on the real data and, every time example i is presented (once per epoch, inside
its mini-batch), note whether the network classified it correctly *before* the step:

    acc_i(t) = 1[ argmax f(A(x_i); θ_t) = y_i ]            t = 1, 2, … presentations of i

A **forgetting event** is a drop from correct to incorrect between consecutive presentations,

    forget_i = Σ_{t ≥ 2} acc_i(t − 1) · (1 − acc_i(t))

(DeepCore's bookkeeping: the state before the first presentation counts as "incorrect", so the
first presentation can never be a forgetting event, and an example never learned has 0 events).
Examples forgotten often sit near the decision boundary; unforgettable ones are redundant.
DeepCore keeps the hardest: per class, the ipc examples with the **most** forgetting events, ties
broken by a seeded random order.

The network is trained with the experts' recipe (``experts.py``: ConvNet, SGD lr_teacher = 0.01,
momentum 0, weight decay 0, batch_real = 256, DSA on every batch), for ``epochs`` epochs — a short
run of its own, so the selection needs no buffer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from ..augment import default_strategy, dsa
from ..experts import sgd_step
from .common import (
    DEFAULT_WIDTH,
    check_ipc,
    class_indices,
    class_major_labels,
    detached_params,
    draw_seed,
    measure_cost,
    random_network,
    to_synset,
)


def count_forgetting(correct: Tensor) -> Tensor:
    """Forgetting events per example from its correctness at each presentation.

    correct: (T, n) bool, row t = correctness of every example at its t-th presentation.
    Returns (n,) int64: Σ_{t ≥ 1} correct[t − 1] ∧ ¬correct[t].
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be a (presentations, examples) bool tensor, got shape {tuple(correct.shape)}")
    c = correct.bool()
    return (c[:-1] & ~c[1:]).sum(0)


def most_forgotten(counts: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Indices (k,) of the k largest ``counts`` (n,), ties broken by a random order drawn from ``gen``.

    The order is drawn on the CPU and moved to ``counts``' device; the result lives there too."""
    n = counts.numel()
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep k={k} of {n} examples")
    perm = torch.randperm(n, generator=gen).to(counts.device)  # the tie-break order
    order = torch.sort(-counts[perm], stable=True).indices  # most events first; ties keep perm's order
    return perm[order[:k]]


def forgetting_flags(dataset, epochs: int, gen: torch.Generator, arch: str = "convnet", width: int = DEFAULT_WIDTH,
                     depth: int | None = None, norm: str | None = None, lr_teacher: float = 0.01,
                     batch_real: int = 256, dsa_strategy: str | None = None, device="cpu") -> Tensor:
    """The training run of :func:`forgetting_correctness`, left on the device: correct (epochs, N) bool.

    Per epoch a permutation of the N training images from ``gen`` (CPU, then moved); per batch of
    batch_real: A_ω (one DSA seed from ``gen``), the logits, the flags argmax f(A(x); θ) = y written
    into ``correct`` on the device, then θ ← θ − lr_teacher ∇_θ ℓ (``experts.sgd_step``). Nothing is
    read back to the host.
    """
    strategy = default_strategy(dataset.name) if dsa_strategy is None else dsa_strategy
    net = random_network(dataset, gen, arch, width, depth, norm, device)
    params = detached_params(net)
    X, Y = dataset.train_images.to(device), dataset.train_labels.to(device)
    n = X.shape[0]
    correct = torch.zeros(epochs, n, dtype=torch.bool, device=X.device)
    for e in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_real):
            idx = idx.to(X.device, non_blocking=True)  # a fresh CPU tensor: no wait for the device
            x, y = X[idx], Y[idx]
            if strategy:
                x = dsa(x, strategy, seed=draw_seed(gen))  # A_ω(x), a fresh ω per batch
            theta = {k: v.requires_grad_(True) for k, v in params.items()}
            logits = functional_call(net, theta, (x,))  # (B, K)
            loss = F.cross_entropy(logits, y)
            grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
            correct[e, idx] = logits.detach().argmax(1) == y  # acc_i before the step
            with torch.no_grad():
                params, _ = sgd_step({k: v.detach() for k, v in theta.items()}, grads, lr=lr_teacher)
    return correct


def forgetting_correctness(dataset, epochs: int, gen: torch.Generator, arch: str = "convnet",
                           width: int = DEFAULT_WIDTH, depth: int | None = None, norm: str | None = None,
                           lr_teacher: float = 0.01, batch_real: int = 256, dsa_strategy: str | None = None,
                           device="cpu") -> tuple[Tensor, list[float]]:
    """Train a fresh network ``epochs`` epochs (the experts' recipe) and record the correctness flags.

    Returns correct (epochs, N) bool on the CPU — row e = correctness of every training image at its
    presentation in epoch e, measured on the augmented batch before the step — and the
    per-epoch training accuracy. The flags are collected on the device (:func:`forgetting_flags`)
    and read back once, at the end.
    """
    correct = forgetting_flags(dataset, epochs, gen, arch, width, depth, norm, lr_teacher, batch_real,
                               dsa_strategy, device).cpu()
    return correct, correct.float().mean(1).tolist()


def forgetting_set(dataset, ipc: int, seed: int = 0, epochs: int = 4, arch: str = "convnet",
                   width: int = DEFAULT_WIDTH, depth: int | None = None, norm: str | None = None,
                   lr_teacher: float = 0.01, batch_real: int = 256, dsa_strategy: str | None = None, device="cpu"):
    """Per class, the ipc most-forgotten training images over an ``epochs``-epoch training run."""
    ipc = check_ipc(dataset, ipc)
    if epochs < 2:
        raise ValueError(f"forgetting needs epochs >= 2 (an event compares two presentations), got {epochs}")
    config = {"ipc": ipc, "seed": int(seed), "epochs": epochs, "arch": arch, "width": width, "depth": depth,
              "norm": norm, "lr_teacher": lr_teacher, "batch_real": batch_real, "dsa_strategy": dsa_strategy}
    with measure_cost(device) as cost:
        gen = torch.Generator().manual_seed(int(seed))
        correct, accs = forgetting_correctness(dataset, epochs, gen, arch, width, depth, norm, lr_teacher,
                                               batch_real, dsa_strategy, device)
        counts = count_forgetting(correct)  # (N,)
        picks = [members[most_forgotten(counts[members], ipc, gen)] for members in class_indices(dataset)]
        idx = torch.cat(picks)
        images = dataset.train_images[idx.to(dataset.train_images.device)]
    prov = {"train_acc_per_epoch": [round(a, 4) for a in accs], "indices": idx.tolist(),
            "events_of_selected": counts[idx].tolist(), "max_events": int(counts.max()),
            "never_correct": int((~correct.any(0)).sum()),
            "network": "random init from seed, trained with the experts' recipe (SGD, DSA)"}
    return to_synset(dataset, images, class_major_labels(dataset.num_classes, ipc), "forgetting", config, cost, prov)
