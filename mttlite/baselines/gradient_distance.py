"""Distances between two sets of gradients, layer by layer (DC, and the angle-focused variant).

Gradient matching compares g^T = ∇_θ ℓ(real batch) with g^S = ∇_θ ℓ(synthetic batch), given as
lists of per-parameter tensors in the same order. Every distance is a sum over parameters l.

**"dc"** — the layer-wise distance of DC (Zhao, Mopuri & Bilen 2021, Eq. 8). A weight tensor is
viewed as one row per *output node* i (conv (out, in, h, w) → (out, in·h·w); linear (out, in) as
is), and rows are compared by angle only:

    d(A, B) = Σ_i ( 1 − A_i·B_i / (‖A_i‖ ‖B_i‖ + 1e-6) )

One-dimensional parameters (biases, norm γ/β) contribute 0, as in DC's code.

**"mse"** — Σ_l ‖A_l − B_l‖² over all parameters;  **"cos"** — 1 − cos(vec A, vec B) of the whole
concatenated gradient (both options of DC's code).

**"angle"** — angle-focused, with a magnitude term (the "how to match" answer of Jiang et al. 2022,
"Delving into Effective Gradient Matching"; their exact weighting was not available offline, so
this is *our* form, stated in full). Per output node i, with θ_i the angle between A_i and B_i:

    d(A, B) = Σ_i [ θ_i / π  +  λ · (‖A_i‖ − ‖B_i‖)² / (‖A_i‖² + ‖B_i‖² + 1e-12) ],
    θ_i = arccos( clamp(cos(A_i, B_i), −1 + 1e-6, 1 − 1e-6) )

Why the angle itself: 1 − cos θ ≈ θ²/2 flattens as the gradients align, so DC's signal fades just
when matching gets fine; θ/π keeps a slope of 1/π down to θ → 0 (the clamp keeps the arccos
derivative finite). The magnitude term (λ = ``mag_weight``, 0.1 by default) is scale-free, in [0, 1],
and 0 iff the norms agree. Identical gradients give 0 up to the clamp (arccos(1 − 1e-6)/π ≈ 4.5e-4 per
output node). Biases: as "dc", 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DISTANCES = ("dc", "angle", "mse", "cos")
_EPS_DC = 1e-6  # DC's constant in the cosine's denominator
_CLAMP = 1e-6


def _rows(g: Tensor) -> Tensor | None:
    """A weight gradient as (output nodes, rest); None for 1-D parameters (biases, norms)."""
    if g.dim() <= 1:
        return None
    return g.reshape(g.shape[0], -1)


def layer_distance_dc(a: Tensor, b: Tensor) -> Tensor:
    """DC's d(A, B) = Σ_i (1 − A_i·B_i / (‖A_i‖ ‖B_i‖ + 1e-6)); 0 for 1-D parameters."""
    ra, rb = _rows(a), _rows(b)
    if ra is None:
        return torch.zeros((), dtype=a.dtype, device=a.device)
    cos = (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1) + _EPS_DC)  # (out,)
    return (1 - cos).sum()


def layer_distance_angle(a: Tensor, b: Tensor, mag_weight: float = 0.1) -> Tensor:
    """Σ_i [θ_i / π + λ (‖A_i‖ − ‖B_i‖)² / (‖A_i‖² + ‖B_i‖² + 1e-12)]; 0 for 1-D parameters."""
    ra, rb = _rows(a), _rows(b)
    if ra is None:
        return torch.zeros((), dtype=a.dtype, device=a.device)
    na, nb = ra.norm(dim=-1), rb.norm(dim=-1)  # (out,)
    cos = (ra * rb).sum(-1) / (na * nb).clamp_min(1e-12)
    angle = torch.arccos(cos.clamp(-1 + _CLAMP, 1 - _CLAMP))  # θ_i in (0, π)
    magnitude = (na - nb).pow(2) / (na.pow(2) + nb.pow(2) + 1e-12)
    return (angle / math.pi + mag_weight * magnitude).sum()


def gradient_distance(g_real: Sequence[Tensor], g_syn: Sequence[Tensor], distance: str = "dc",
                      mag_weight: float = 0.1) -> Tensor:
    """D(g^T, g^S): sum over parameters of the chosen distance (see module docstring)."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown gradient distance {distance!r}; choose one of {DISTANCES}")
    if len(g_real) != len(g_syn):
        raise ValueError(f"gradient lists differ in length: {len(g_real)} vs {len(g_syn)}")
    if distance == "dc":
        return sum(layer_distance_dc(a, b) for a, b in zip(g_real, g_syn))
    if distance == "angle":
        return sum(layer_distance_angle(a, b, mag_weight) for a, b in zip(g_real, g_syn))
    if distance == "mse":
        return sum((a - b).pow(2).sum() for a, b in zip(g_real, g_syn))
    va = torch.cat([a.reshape(-1) for a in g_real])
    vb = torch.cat([b.reshape(-1) for b in g_syn])
    return 1 - (va * vb).sum() / (va.norm() * vb.norm() + _EPS_DC)
