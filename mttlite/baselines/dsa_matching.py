"""DSA: gradient matching with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

DC (``dc.py``) with one change: before the gradients of class c are taken, the real batch T_c
and the synthetic batch S_c go through the *same* random transform A_ω,

    L = Σ_c D( ∇_θ ℓ(A_{ω_c}(T_c); θ),  ∇_θ ℓ(A_{ω_c}(S_c); θ) ),     ω_c fresh each time

here ``augment.dsa(x, strategy, seed=s_c, shared=True)`` on both batches with the same seed s_c
(``shared=True``: one ω for every image of the batch, the reference code's "Siamese" mode, so the
two batches see an identical transform whatever their sizes). The augmentation is differentiable,
so ∂L/∂S flows back through A. The network updates between outer steps also train on augmented
synthetic batches (a fresh, per-image ω per batch). Everything else — loops, distance, lr_img = 0.1
with momentum 0.5 — is DC's.
"""
from __future__ import annotations

from ..augment import default_strategy
from .common import DEFAULT_WIDTH
from .dc import gradient_matching


def dsa_set(dataset, ipc: int, iterations: int = 100, outer_loop: int | None = None, inner_loop: int | None = None,
            inter_class: bool = False, distance: str = "dc", mag_weight: float = 0.1, dsa_strategy: str | None = None,
            lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01, batch_real: int = 64,
            batch_train: int = 256, arch: str = "convnet", width: int = DEFAULT_WIDTH, depth: int | None = None,
            norm: str | None = None, pix_init: str = "real", seed: int = 0, device="cpu", progress: bool = False,
            model_pool=None, pool_epochs=None, rho: float = 0.0):
    """DSA = DC + siamese augmentation; dsa_strategy None → the dataset's strategy (no flip for digits)."""
    strategy = default_strategy(dataset.name) if dsa_strategy is None else dsa_strategy
    if not strategy:
        raise ValueError("DSA needs an augmentation strategy (got none); use method 'dc' for no augmentation")
    return gradient_matching(dataset, ipc, "dsa", iterations, outer_loop, inner_loop, True, inter_class, distance,
                             mag_weight, strategy, lr_img, momentum, lr_net, batch_real, batch_train, arch, width,
                             depth, norm, pix_init, seed, device, progress, model_pool, pool_epochs, rho)
