"""Stage 3 — the matching loss.

After N student steps from θ*_t the student should stand where the expert stood M epochs later
(paper, Eq. 2)::

    L = ‖θ̂_{t+N} − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²

The denominator is the squared distance the expert itself travelled. Without it, the loss of
late epochs (where experts barely move) would be drowned by the loss of early ones, and layers
with large weights would dominate small ones. L = 1 means "the student did not get closer than
where it started", L = 0 means "it landed on the target".

With a prune mask m ∈ {0, 1}^P (``mask``, a (P,) bool tensor; ``mttlite.pruning`` builds it) both
norms run over the kept entries only::

    L_m = ‖m ⊙ (θ̂_N − θ*_{t+M})‖² / ‖m ⊙ (θ*_t − θ*_{t+M})‖²

m ⊙ v is computed as ``torch.where(m, v, 0)``: an all-True mask gives exactly (bit for bit) the
unmasked loss, and a pruned entry that is not finite cannot leak into the sums (0 · ∞ would).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .params import ParamSpec


def apply_mask(diff: Tensor, mask: Tensor | None) -> Tensor:
    """m ⊙ diff: ``diff`` (P,) with the pruned entries (mask False) set to 0; ``diff`` itself when mask is None."""
    return diff if mask is None else torch.where(mask, diff, 0)


def matching_loss(theta_student: Tensor, theta_start: Tensor, theta_target: Tensor, check: bool = True,
                  mask: Tensor | None = None) -> Tensor:
    """L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²; all arguments are flat (P,) vectors.

    ``mask``: (P,) bool, True where θ is matched: L_m = ‖m ⊙ (θ̂_N − θ*_{t+M})‖² / ‖m ⊙ (θ*_t − θ*_{t+M})‖²
    (module docstring); None: every entry.
    A zero denominator (the expert did not move, on the kept entries) is a ValueError on the CPU when
    ``check``. On a GPU the check would cost a host sync, so it is left to the caller there (the
    distillation loop reads every scalar of an iteration in one sync and reports it then, and passes
    ``check=False``).
    """
    num = apply_mask(theta_student - theta_target, mask).pow(2).sum()  # ‖m ⊙ (θ̂_N − θ*_{t+M})‖²
    den = apply_mask(theta_start - theta_target, mask).pow(2).sum()  # ‖m ⊙ (θ*_t − θ*_{t+M})‖²
    if check and den.device.type == "cpu" and den.item() == 0:
        where = " on the parameters the prune mask keeps" if mask is not None else ""
        raise ValueError(f"the expert did not move between the start and target epochs{where} "
                         "(‖θ*_t − θ*_{t+M}‖ = 0)")
    return num / den


def matching_breakdown(
    spec: ParamSpec, theta_student: Tensor, theta_start: Tensor, theta_target: Tensor, mask: Tensor | None = None
) -> dict[str, dict[str, float]]:
    """Per-layer view of the loss, for teaching.

    For each parameter tensor ℓ (with a ``mask``, every norm over its kept entries only):
      ``contribution``: ‖θ̂_N[ℓ] − θ*_{t+M}[ℓ]‖² / ‖θ*_t − θ*_{t+M}‖² (global denominator); these sum to L.
      ``normalised``:   ‖θ̂_N[ℓ] − θ*_{t+M}[ℓ]‖² / ‖θ*_t[ℓ] − θ*_{t+M}[ℓ]‖² (the layer's own L; NaN if it
                        did not move, or is pruned whole).
      ``expert_share``: the layer's share of the expert's own squared movement.
      ``masked``:       the share of the layer's entries the mask prunes (0 without a mask, 1 if all).
    """
    num_all = apply_mask(theta_student - theta_target, mask).pow(2)  # (P,)
    den_all = apply_mask(theta_start - theta_target, mask).pow(2)  # (P,)
    den = den_all.sum().item()
    out = {}
    for name, sl in spec.slices().items():
        num_l = num_all[sl].sum().item()
        den_l = den_all[sl].sum().item()
        out[name] = {
            "contribution": num_l / den,
            "normalised": num_l / den_l if den_l > 0 else float("nan"),
            "expert_share": den_l / den,
            "masked": 0.0 if mask is None else (~mask[sl]).sum().item() / (sl.stop - sl.start),
        }
    return out
