"""Stage 3 — the matching loss.

After N student steps from θ*_t the student should stand where the expert stood M epochs later
(paper, Eq. 2)::

    L = ‖θ̂_{t+N} − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²

The denominator is the squared distance the expert itself travelled. Without it, the loss of
late epochs (where experts barely move) would be drowned by the loss of early ones, and layers
with large weights would dominate small ones. L = 1 means "the student did not get closer than
where it started", L = 0 means "it landed on the target".
"""
from __future__ import annotations

from torch import Tensor

from .params import ParamSpec


def matching_loss(theta_student: Tensor, theta_start: Tensor, theta_target: Tensor, check: bool = True) -> Tensor:
    """L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²; all arguments are flat (P,) vectors.

    A zero denominator (the expert did not move) is a ValueError on the CPU when ``check``. On a
    GPU the check would cost a host sync, so it is left to the caller there (the distillation loop
    reads every scalar of an iteration in one sync and reports it then, and passes ``check=False``).
    """
    num = (theta_student - theta_target).pow(2).sum()  # ‖θ̂_N − θ*_{t+M}‖²
    den = (theta_start - theta_target).pow(2).sum()  # ‖θ*_t − θ*_{t+M}‖²
    if check and den.device.type == "cpu" and den.item() == 0:
        raise ValueError("the expert did not move between the start and target epochs (‖θ*_t − θ*_{t+M}‖ = 0)")
    return num / den


def matching_breakdown(
    spec: ParamSpec, theta_student: Tensor, theta_start: Tensor, theta_target: Tensor
) -> dict[str, dict[str, float]]:
    """Per-layer view of the loss, for teaching.

    For each parameter tensor ℓ:
      ``contribution``: ‖θ̂_N[ℓ] − θ*_{t+M}[ℓ]‖² / ‖θ*_t − θ*_{t+M}‖² (global denominator); these sum to L.
      ``normalised``:   ‖θ̂_N[ℓ] − θ*_{t+M}[ℓ]‖² / ‖θ*_t[ℓ] − θ*_{t+M}[ℓ]‖² (the layer's own L).
      ``expert_share``: the layer's share of the expert's own squared movement.
    """
    den = (theta_start - theta_target).pow(2).sum().item()
    out = {}
    for name, sl in spec.slices().items():
        num_l = (theta_student[sl] - theta_target[sl]).pow(2).sum().item()
        den_l = (theta_start[sl] - theta_target[sl]).pow(2).sum().item()
        out[name] = {
            "contribution": num_l / den,
            "normalised": num_l / den_l if den_l > 0 else float("nan"),
            "expert_share": den_l / den,
        }
    return out
