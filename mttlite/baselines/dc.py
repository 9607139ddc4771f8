"""DC: Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021).

Learn the synthetic set S so that, on *many* networks and at *many* points of their training, one
SGD step on S points the same way as one step on the real data T. Per class c (Eq. 9 of DC):

    min_S  E_{θ_0 ~ P_θ0} [ Σ_{t=0}^{T−1}  Σ_c  D( ∇_θ ℓ(T_c; θ_t),  ∇_θ ℓ(S_c; θ_t) ) ]

with D the layer-wise distance of ``gradient_distance.py`` (Σ over output nodes of 1 − cos).
The algorithm (DC's Algorithm 1, the authors' ``main.py``):

    for it in 1 … iterations:                       a fresh random network θ_0 each time
        for t in 0 … outer_loop − 1:
            for each class c: a real batch T_c (batch_real images) and S_c (its ipc images)
            L = Σ_c D(g^T_c, g^S_c),   g^T_c = ∇_θ ℓ(T_c; θ_t),  g^S_c = ∇_θ ℓ(S_c; θ_t)   (graph kept)
            S ← SGD(S, ∂L/∂S; lr_img = 0.1, momentum 0.5)
            θ_{t+1} = θ_t after inner_loop epochs of SGD (lr_net = 0.01) on the current S
                                                                       (skipped after the last t)

DC's (outer_loop, inner_loop) per ipc: 1 → (1, 1), 10 → (10, 50), 20 → (20, 25), 30 → (30, 20),
40 → (40, 15), 50 → (50, 10). The paper runs 1000 iterations with batch_real = 256 on ConvNet
width 128; the CPU defaults here are smaller (``iterations``, ``batch_real``, ``width``).

The same loop serves the whole family, by two switches:

* ``dsa_strategy`` (DSA, ``dsa_matching.py``): both batches of class c go through the same
  random augmentation, ``dsa(·, seed=s_c, shared=True)``, before their gradients are taken;
* which gradients are compared (``matching_loss``):
      intra-class (DC):       Σ_c D(g^T_c, g^S_c)
      inter-class (DCC):      D(Σ_c g^T_c, Σ_c g^S_c)     = D(∇ Σ_c ℓ(T_c), ∇ Σ_c ℓ(S_c))
      multi-level (Jiang et al. 2022, ``inter_class=True``):  both terms added,
  and the distance ``distance`` ("dc", or the angle-focused "angle" with magnitude weight λ).

Synthetic images start as the random real subset of the same seed (``pix_init="real"``, DSA/DM's
choice; DC's paper started from noise, ``pix_init="noise"``). Labels are fixed, class-major.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..augment import default_strategy, dsa, parse_strategy
from ..evaluate import random_real_subset
from .common import (
    DEFAULT_WIDTH,
    augmentation_record,
    augmentation_settings,
    check_ipc,
    class_indices,
    class_major_labels,
    draw_seed,
    measure_cost,
    random_network,
    sample_real,
    start_params,
    to_synset,
)
from .gradient_distance import DISTANCES, gradient_distance

#: DC's (outer_loop, inner_loop) for each ipc (the authors' ``get_loops``).
LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
PIX_INITS = ("real", "noise")


def class_gradients(model: nn.Module, params: dict[str, Tensor], batches: Sequence[tuple[Tensor, int]],
                    create_graph: bool) -> list[list[Tensor]]:
    """For each (x_c (B_c, C, H, W), c): g_c = ∇_θ ℓ(f(x_c; θ), c), as a list over parameters.

    create_graph=True keeps g_c differentiable in x_c (the synthetic side); False detaches it.
    """
    names = list(params)
    out = []
    for x, c in batches:
        logits = functional_call(model, params, (x,))  # (B_c, K)
        y = torch.full((x.shape[0],), int(c), dtype=torch.int64, device=x.device)
        loss = F.cross_entropy(logits, y)  # ℓ = mean CE over the class batch
        g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        out.append(list(g) if create_graph else [t.detach() for t in g])
    return out


def matching_loss(g_real: Sequence[Sequence[Tensor]], g_syn: Sequence[Sequence[Tensor]], intra_class: bool = True,
                  inter_class: bool = False, distance: str = "dc", mag_weight: float = 0.1) -> Tensor:
    """L = [intra] Σ_c D(g^T_c, g^S_c)  +  [inter] D(Σ_c g^T_c, Σ_c g^S_c).

    g_real, g_syn: per class, per parameter gradients (``class_gradients``).
    """
    if not (intra_class or inter_class):
        raise ValueError("matching_loss needs intra_class and/or inter_class to be True")
    loss = 0.0
    if intra_class:
        loss = loss + sum(gradient_distance(gr, gs, distance, mag_weight) for gr, gs in zip(g_real, g_syn))
    if inter_class:
        sum_real = [sum(parts) for parts in zip(*g_real)]  # Σ_c g^T_c, per parameter
        sum_syn = [sum(parts) for parts in zip(*g_syn)]
        loss = loss + gradient_distance(sum_real, sum_syn, distance, mag_weight)
    return loss


def train_network_on_set(model: nn.Module, params: dict[str, Tensor], images: Tensor, labels: Tensor, epochs: int,
                         lr_net: float, batch_train: int, dsa_strategy: str, gen: torch.Generator) -> dict[str, Tensor]:
    """θ_{t+1}: ``epochs`` epochs of plain SGD (no momentum, as DC) on the synthetic set; returns new θ.

    images (n, C, H, W), labels (n,), θ on one device; per epoch a permutation of n from ``gen`` (CPU,
    then moved), and every mini-batch gets its own (not shared) augmentation when ``dsa_strategy`` is set.
    Runs entirely on the device: nothing is read back to the host.
    """
    x_all, n = images.detach(), images.shape[0]
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_train):
            idx = idx.to(x_all.device, non_blocking=True)  # a fresh CPU tensor: no wait for the device
            x = dsa(x_all[idx], dsa_strategy, seed=draw_seed(gen)) if dsa_strategy else x_all[idx]
            theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss = F.cross_entropy(functional_call(model, theta, (x,)), labels[idx])
            grads = torch.autograd.grad(loss, list(theta.values()))
            params = {k: (v - lr_net * g).detach() for (k, v), g in zip(theta.items(), grads)}  # θ ← θ − η g
    return {k: v.requires_grad_(True) for k, v in params.items()}


def matching_iteration(net: nn.Module, params: dict[str, Tensor], images: Tensor, labels: Tensor,
                       opt: torch.optim.Optimizer, real_images: Tensor, members: Sequence[Tensor], ipc: int,
                       outer_loop: int, inner_loop: int, intra_class: bool, inter_class: bool, distance: str,
                       mag_weight: float, strategy: str, lr_net: float, batch_real: int, batch_train: int,
                       gen: torch.Generator) -> Tensor:
    """One iteration of the loop (module docstring) for one fresh network θ_0 = ``params``.

    images: (K·ipc, C, H, W) the learned pixels (a leaf that ``opt`` updates), labels (K·ipc,);
    real_images (N, C, H, W) and members[c] (N_c,) the indices of class c in it, all on one device.
    For t = 0 … outer_loop − 1: per class a real batch (``sample_real``) and, with a strategy, one
    siamese DSA seed; L_t = ``matching_loss``; S ← SGD(S, ∂L_t/∂S); then θ trains ``inner_loop`` epochs
    on S (not after the last t). Returns the losses (outer_loop,), a tensor on the device: nothing is
    read back to the host, so a run reads its whole history once, at the end.
    """
    K = len(members)
    losses = []
    for t in range(outer_loop):
        real, syn = [], []
        for c in range(K):
            xr = sample_real(real_images, members[c], batch_real, gen)  # T_c
            xs = images[c * ipc:(c + 1) * ipc]  # S_c
            if strategy:  # siamese: one ω per class, shared by both batches and all their images
                s = draw_seed(gen)
                xr, xs = dsa(xr, strategy, seed=s, shared=True), dsa(xs, strategy, seed=s, shared=True)
            real.append((xr, c))
            syn.append((xs, c))
        g_real = class_gradients(net, params, real, create_graph=False)
        g_syn = class_gradients(net, params, syn, create_graph=True)
        loss = matching_loss(g_real, g_syn, intra_class, inter_class, distance, mag_weight)
        (images.grad,) = torch.autograd.grad(loss, images)
        opt.step()
        losses.append(loss.detach())
        if t == outer_loop - 1:
            break
        params = train_network_on_set(net, params, images, labels, inner_loop, lr_net, batch_train, strategy, gen)
    return torch.stack(losses)


def gradient_matching(dataset, ipc: int, method: str, iterations: int, outer_loop: int | None, inner_loop: int | None,
                      intra_class: bool, inter_class: bool, distance: str, mag_weight: float, dsa_strategy: str | None,
                      lr_img: float, momentum: float, lr_net: float, batch_real: int, batch_train: int, arch: str,
                      width: int, depth: int | None, norm: str | None, pix_init: str, seed: int, device, progress: bool,
                      model_pool=None, pool_epochs=None, rho: float = 0.0):
    """The DC / DSA / DCC / multi-level loop (module docstring); returns a ``SyntheticSet``.

    Model augmentation (Zhang et al. 2023, ``mttlite.model_augment``): ``model_pool`` (an expert buffer
    or an ``EarlyPool``) with ``pool_epochs`` makes each iteration start from a checkpoint drawn from
    the experts' early epochs instead of a fresh init, and ``rho`` > 0 perturbs that start, every filter
    by ρ·‖θ_{l,j}‖. The budget knobs the paper cuts are ``iterations``, ``outer_loop`` and ``inner_loop``.
    """
    ipc = check_ipc(dataset, ipc)
    if outer_loop is None or inner_loop is None:
        if ipc not in LOOPS:
            raise ValueError(f"DC defines (outer_loop, inner_loop) only for ipc in {sorted(LOOPS)}; "
                             f"pass outer_loop= and inner_loop= for ipc={ipc}")
        outer_loop = LOOPS[ipc][0] if outer_loop is None else outer_loop
        inner_loop = LOOPS[ipc][1] if inner_loop is None else inner_loop
    bad = []
    for name, v, low in (("iterations", iterations, 0), ("outer_loop", outer_loop, 1), ("inner_loop", inner_loop, 0),
                         ("batch_real", batch_real, 1), ("batch_train", batch_train, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            bad.append(f"{name} must be an integer >= {low}, got {v!r}")
    if distance not in DISTANCES:
        bad.append(f"distance must be one of {DISTANCES}, got {distance!r}")
    if pix_init not in PIX_INITS:
        bad.append(f"pix_init must be one of {PIX_INITS}, got {pix_init!r}")
    if not lr_img > 0 or not lr_net > 0:
        bad.append(f"lr_img and lr_net must be > 0, got {lr_img!r}, {lr_net!r}")
    if bad:
        raise ValueError(f"invalid {method} settings:\n  " + "\n  ".join(bad))
    parse_strategy(dsa_strategy)  # ValueError listing the valid DSA ops
    pool, rho = augmentation_settings(model_pool, pool_epochs, rho, dataset, arch, width, depth, norm, method)
    strategy = dsa_strategy or ""
    config = {"ipc": ipc, "iterations": iterations, "outer_loop": outer_loop, "inner_loop": inner_loop,
              "intra_class": intra_class, "inter_class": inter_class, "distance": distance, "mag_weight": mag_weight,
              "dsa_strategy": strategy, "lr_img": lr_img, "momentum": momentum, "lr_net": lr_net,
              "batch_real": batch_real, "batch_train": batch_train, "arch": arch, "width": width, "depth": depth,
              "norm": norm, "pix_init": pix_init, "seed": int(seed), **augmentation_record(pool, rho)}

    with measure_cost(device) as cost:
        gen = torch.Generator().manual_seed(int(seed))
        K = dataset.num_classes
        labels = class_major_labels(K, ipc, device)
        if pix_init == "real":  # the "random" baseline's images for this seed
            images = random_real_subset(dataset, ipc, seed=seed)[0].to(device)
        else:
            images = torch.randn((K * ipc, dataset.channel, *dataset.im_size), generator=gen).to(device)
        images = images.detach().clone().requires_grad_(True)  # (K·ipc, C, H, W), the learned pixels
        opt = torch.optim.SGD([images], lr=lr_img, momentum=momentum)
        real_images = dataset.train_images.to(device)  # once, so every real batch is drawn on the device
        members = [m.to(device) for m in class_indices(dataset)]
        history = []  # per iteration, its (outer_loop,) losses, on the device until the end
        # with a pool, one network is only the function f(x; θ): its own weights are never used
        template = None if pool is None else random_network(dataset, gen, arch, width, depth, norm, device)
        for _ in tqdm(range(iterations), desc=method, disable=not progress):
            net = random_network(dataset, gen, arch, width, depth, norm, device) if pool is None else template
            params = start_params(net, pool, rho, gen, requires_grad=True)  # θ_0 ~ P_θ0, or the pool (+ ρ)
            history.append(matching_iteration(net, params, images, labels, opt, real_images, members, ipc, outer_loop,
                                              inner_loop, intra_class, inter_class, distance, mag_weight, strategy,
                                              lr_net, batch_real, batch_train, gen))
        history = [sum(losses) / len(losses) for losses in torch.stack(history).tolist()] if history else []
        if not torch.isfinite(images).all():
            raise FloatingPointError(f"{method}: the synthetic images became non-finite; lower lr_img (now {lr_img})")
    prov = {"loss_history": [round(v, 5) for v in history],
            "init": f"{pix_init} (seed {seed})" + (", = the 'random' set of this seed" if pix_init == "real" else "")}
    return to_synset(dataset, images, labels, method, config, cost, prov,
                     arch=arch, arch_kwargs={"width": width, "depth": depth, "norm": norm})


def dc_set(dataset, ipc: int, iterations: int = 100, outer_loop: int | None = None, inner_loop: int | None = None,
           inter_class: bool = False, distance: str = "dc", mag_weight: float = 0.1, dsa_strategy: str | None = "",
           lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01, batch_real: int = 64,
           batch_train: int = 256, arch: str = "convnet", width: int = DEFAULT_WIDTH, depth: int | None = None,
           norm: str | None = None, pix_init: str = "real", seed: int = 0, device="cpu", progress: bool = False,
           model_pool=None, pool_epochs=None, rho: float = 0.0):
    """DC: per-class gradient matching (``inter_class=True`` adds the class-summed term: multi-level).

    dsa_strategy: "" = no augmentation (DC); None = the dataset's DSA strategy (that is DSA).
    model_pool, pool_epochs, rho: model augmentation (``gradient_matching``; off by default).
    """
    strategy = default_strategy(dataset.name) if dsa_strategy is None else dsa_strategy
    return gradient_matching(dataset, ipc, "dc", iterations, outer_loop, inner_loop, True, inter_class, distance,
                             mag_weight, strategy, lr_img, momentum, lr_net, batch_real, batch_train, arch, width,
                             depth, norm, pix_init, seed, device, progress, model_pool, pool_epochs, rho)
