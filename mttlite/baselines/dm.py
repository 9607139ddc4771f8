"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

No bi-level optimisation, no network training: match the *mean embedding* of each class in many
randomly initialised networks,

    min_S  E_{θ ~ P_θ, ω}  Σ_c ‖ (1/|T_c|) Σ_{x ∈ T_c} ψ_θ(A_ω(x)) − (1/|S_c|) Σ_{s ∈ S_c} ψ_θ(A_ω(s)) ‖²

where ψ_θ = ``ConvNet.embed`` (the flattened feature map before the classifier) of a freshly
initialised ConvNet — a new θ every iteration — T_c a random real batch of class c (batch_real
images) and A_ω DSA with the same ω for both sides of class c (``dsa(·, seed=s_c, shared=True)``).
This is an empirical maximum mean discrepancy with the random networks as the kernel's features.
Images: SGD with lr_img = 1, momentum 0.5 (DM's settings), initialised from real images; the paper
runs 20 000 iterations with batch_real = 256 on width 128.

Model augmentation (Zhang et al. 2023, ``mttlite.model_augment``), off by default: with
``model_pool`` ψ_θ is an early-stage checkpoint drawn from an expert buffer's first epochs instead
of a fresh init, and with ``rho`` > 0 that θ is perturbed, every filter by ρ·‖θ_{l,j}‖.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from ..augment import default_strategy, dsa, parse_strategy
from ..evaluate import random_real_subset
from .common import (
    DEFAULT_WIDTH,
    EmbedOf,
    augmentation_record,
    augmentation_settings,
    check_ipc,
    class_indices,
    class_major_labels,
    draw_seed,
    embed_params,
    measure_cost,
    random_network,
    sample_real,
    start_params,
    to_synset,
)
from .dc import PIX_INITS


def dm_loss(pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Σ_c ‖mean_b e^T_c − mean_b e^S_c‖² for per-class embeddings (e^T_c (B_c, D), e^S_c (ipc, D))."""
    return sum((er.mean(0) - es.mean(0)).pow(2).sum() for er, es in pairs)


def dm_iteration(model: EmbedOf, params: dict[str, Tensor], images: Tensor, opt: torch.optim.Optimizer,
                 real_images: Tensor, members: Sequence[Tensor], ipc: int, batch_real: int, strategy: str,
                 gen: torch.Generator) -> Tensor:
    """One DM step for one random network ψ_θ (``model``, ``params``): L = ``dm_loss``, S ← SGD(S, ∂L/∂S).

    images: (K·ipc, C, H, W) the learned pixels (a leaf ``opt`` updates); real_images (N, C, H, W) and
    members[c] (N_c,) the indices of class c in it, all on one device. Per class c: a real batch of
    batch_real images (``sample_real``) and, with a strategy, one siamese DSA seed, both from ``gen``.
    Returns L, a detached 0-d tensor on the device (nothing is read back to the host).
    """
    pairs = []
    for c in range(len(members)):
        xr = sample_real(real_images, members[c], batch_real, gen)
        xs = images[c * ipc:(c + 1) * ipc]
        if strategy:
            s = draw_seed(gen)
            xr, xs = dsa(xr, strategy, seed=s, shared=True), dsa(xs, strategy, seed=s, shared=True)
        with torch.no_grad():
            er = functional_call(model, params, (xr,))  # ψ_θ(A(T_c)), (B, D)
        pairs.append((er, functional_call(model, params, (xs,))))  # ψ_θ(A(S_c)), (ipc, D)
    loss = dm_loss(pairs)
    (images.grad,) = torch.autograd.grad(loss, images)
    opt.step()
    return loss.detach()


def dm_set(dataset, ipc: int, iterations: int = 200, lr_img: float = 1.0, momentum: float = 0.5,
           batch_real: int = 256, dsa_strategy: str | None = None, arch: str = "convnet", width: int = DEFAULT_WIDTH,
           depth: int | None = None, norm: str | None = None, pix_init: str = "real", seed: int = 0, device="cpu",
           progress: bool = False, model_pool=None, pool_epochs=None, rho: float = 0.0):
    """Distribution matching; dsa_strategy None → the dataset's DSA strategy, "" → none.

    model_pool (an expert buffer, its directory or an ``EarlyPool``), pool_epochs (E: epochs 0 … E, or a
    list), rho: model augmentation (module docstring; off by default)."""
    ipc = check_ipc(dataset, ipc)
    strategy = default_strategy(dataset.name) if dsa_strategy is None else dsa_strategy
    parse_strategy(strategy)
    bad = [f"{n} must be an integer >= {lo}, got {v!r}" for n, v, lo in
           (("iterations", iterations, 0), ("batch_real", batch_real, 1))
           if isinstance(v, bool) or not isinstance(v, int) or v < lo]
    if pix_init not in PIX_INITS:
        bad.append(f"pix_init must be one of {PIX_INITS}, got {pix_init!r}")
    if not lr_img > 0:
        bad.append(f"lr_img must be > 0, got {lr_img!r}")
    if bad:
        raise ValueError("invalid dm settings:\n  " + "\n  ".join(bad))
    pool, rho = augmentation_settings(model_pool, pool_epochs, rho, dataset, arch, width, depth, norm, "dm")
    config = {"ipc": ipc, "iterations": iterations, "lr_img": lr_img, "momentum": momentum, "batch_real": batch_real,
              "dsa_strategy": strategy, "arch": arch, "width": width, "depth": depth, "norm": norm,
              "pix_init": pix_init, "seed": int(seed), **augmentation_record(pool, rho)}
    with measure_cost(device) as cost:
        gen = torch.Generator().manual_seed(int(seed))
        K = dataset.num_classes
        labels = class_major_labels(K, ipc, device)
        if pix_init == "real":
            images = random_real_subset(dataset, ipc, seed=seed)[0].to(device)
        else:
            images = torch.randn((K * ipc, dataset.channel, *dataset.im_size), generator=gen).to(device)
        images = images.detach().clone().requires_grad_(True)
        opt = torch.optim.SGD([images], lr=lr_img, momentum=momentum)
        real_images = dataset.train_images.to(device)  # once, so every real batch is drawn on the device
        members = [m.to(device) for m in class_indices(dataset)]
        history = []  # one loss per iteration, on the device until the end of the run
        # with a pool, one network is only the function ψ(x; θ): its own weights are never used
        template = None if pool is None else random_network(dataset, gen, arch, width, depth, norm, device)
        for _ in tqdm(range(iterations), desc="dm", disable=not progress):
            net = random_network(dataset, gen, arch, width, depth, norm, device) if pool is None else template
            model, params = EmbedOf(net), embed_params(start_params(net, pool, rho, gen))  # θ ~ P_θ or the pool (+ ρ)
            history.append(dm_iteration(model, params, images, opt, real_images, members, ipc, batch_real, strategy,
                                        gen))
        history = [round(v, 5) for v in torch.stack(history).tolist()] if history else []
        if not torch.isfinite(images).all():
            raise FloatingPointError(f"dm: the synthetic images became non-finite; lower lr_img (now {lr_img})")
    prov = {"loss_history": history,
            "init": f"{pix_init} (seed {seed})" + (", = the 'random' set of this seed" if pix_init == "real" else "")}
    return to_synset(dataset, images, labels, "dm", config, cost, prov,
                     arch=arch, arch_kwargs={"width": width, "depth": depth, "norm": norm})
