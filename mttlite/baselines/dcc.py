"""DCC: Dataset Condensation with Contrastive signals (Lee, Chun, Jung, Yun & Yoon, ICML 2022).

DC matches each class on its own, so nothing in its loss asks the synthetic images of class a to be
*different* from those of class b: for fine-grained data the shared, non-discriminative features
dominate. DCC matches the gradient of the loss summed over all classes instead,

    L = D( ∇_θ Σ_c ℓ(T_c; θ),  ∇_θ Σ_c ℓ(S_c; θ) ) = D( Σ_c g^T_c,  Σ_c g^S_c )

Because D is not additive (the cosine of a sum is not a sum of cosines), the per-class gradients
now interact inside D: a class's synthetic images must produce a gradient that combines with the
other classes' the way the real classes' do — the "contrastive signal". Everything else (loops,
network updates, lr_img, D = DC's layer-wise distance) is DC's ``dc.gradient_matching``.
``intra_class=True`` adds DC's per-class term as well (the multi-level combination).
"""
from __future__ import annotations

from ..augment import default_strategy
from .common import DEFAULT_WIDTH
from .dc import gradient_matching


def dcc_set(dataset, ipc: int, iterations: int = 100, outer_loop: int | None = None, inner_loop: int | None = None,
            intra_class: bool = False, distance: str = "dc", mag_weight: float = 0.1, dsa_strategy: str | None = "",
            lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01, batch_real: int = 64,
            batch_train: int = 256, arch: str = "convnet", width: int = DEFAULT_WIDTH, depth: int | None = None,
            norm: str | None = None, pix_init: str = "real", seed: int = 0, device="cpu", progress: bool = False,
            model_pool=None, pool_epochs=None, rho: float = 0.0):
    """DCC: gradient matching on the class-summed loss. dsa_strategy: "" none (default), or a DSA strategy."""
    strategy = default_strategy(dataset.name) if dsa_strategy is None else dsa_strategy
    return gradient_matching(dataset, ipc, "dcc", iterations, outer_loop, inner_loop, intra_class, True, distance,
                             mag_weight, strategy, lr_img, momentum, lr_net, batch_real, batch_train, arch, width,
                             depth, norm, pix_init, seed, device, progress, model_pool, pool_epochs, rho)
