"""Parameter pruning of the matching loss: which entries of θ the student is asked to match.

A mask m ∈ {0, 1}^P (a (P,) bool tensor, True = matched, False = pruned) restricts both norms of the
matching loss (``matching.py``) to the same entries::

    L_m = ‖m ⊙ (θ̂_N − θ*_{t+M})‖² / ‖m ⊙ (θ*_t − θ*_{t+M})‖²

so a pruned parameter neither counts as error nor as distance the expert travelled, and
∂L_m/∂θ̂_N = 2 m ⊙ (θ̂_N − θ*_{t+M}) / ‖m ⊙ (θ*_t − θ*_{t+M})‖² is zero on it (``meta_gradient.py``
keeps both gradient modes exact with the mask). The student still trains every parameter; only
the comparison at the end ignores the pruned ones. Two rules build m:

``"mismatch"`` (Li, Togo, Ogawa, Haseyama, "Dataset Distillation Using Parameter Pruning", IEICE
    Trans. Fundamentals 2024, arXiv 2209.14609): a few parameters are hard for the student to match
    and dominate the loss; prune the fraction β of them with the largest mismatch
    |θ̂_N − θ*_{t+M}| (per entry, after the student's N steps; :func:`mismatch_mask`).
    **When** (our choice, stated because the paper prunes "during the distillation process" without
    a schedule we could reproduce): ONCE, before the first iteration, from one probe unroll: the
    initial pixels, labels and α0 = ``lr_teacher``, N steps from θ*_t of one (expert, t) drawn from a
    generator of its own seeded with ``seed`` (the run's own draws are untouched; every rank draws
    the same probe, so every rank holds the same mask). The mask then stays fixed for the run:
    a single mask is what a resumed run recomputes bit for bit, and what evaluation networks would
    have to be pruned with (the paper does; mttlite's evaluation does not, yet).

``"depth"`` (PAD, Li et al., "Prioritize Alignment in Dataset Distillation", 2024): mask the
    shallow layers' parameters, which inject low-level information: the first ⌊r·P⌋ entries of θ in
    layer order (``ParamSpec.names``: the order ``named_parameters`` registers them, input to output
    for every network here), cutting inside a layer where the count ends, as PAD's
    ``PAD_depth.py`` does (``keep = indices[int(depth_ratio · P):]``; :func:`depth_mask`).
    The ratio r grows with IPC; :data:`PAD_DEPTH_RATIOS` are PAD's released CIFAR-10 ConvNet
    settings (:func:`pad_depth_ratio`).

β (``prune_fraction``) is a fraction of the P parameters by count: k = ⌊β·P⌋ are pruned, with
β ∈ [0, 1), so at least one parameter is always left; a mask that leaves nothing to match (no
parameter, or an expert that did not move on the kept ones) is refused by :func:`check_mask`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .augment import DSAParams
from .params import ParamSpec
from .student import StepPlan, unroll

PRUNE_RULES = ("mismatch", "depth")

#: PAD's depth ratio r by IPC: its released CIFAR-10 ConvNet-3 configurations
#: (``configs/CIFAR-10/ConvIN/IPC{1,10,50,500,1000}.yaml``, field ``depth_ratio``). Nothing masked at
#: IPC 1, half of the parameters (the first half, by count) from IPC 10 on. (Its CIFAR-100 files do not
#: grow with IPC: 0.5 at IPC 1 and 10, 0.0 at IPC 50; these are CIFAR-10's, used for every data set.)
PAD_DEPTH_RATIOS: dict[int, float] = {1: 0.0, 10: 0.5, 50: 0.5, 500: 0.5, 1000: 0.5}


def pad_depth_ratio(ipc: int) -> float:
    """PAD's r for ``ipc``: the entry of :data:`PAD_DEPTH_RATIOS` at the largest IPC ≤ ``ipc``
    (IPC 2…9 → IPC 1's 0.0; beyond 1000 → 1000's)."""
    if not (isinstance(ipc, int) and not isinstance(ipc, bool) and ipc >= 1):
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    return PAD_DEPTH_RATIOS[max(k for k in PAD_DEPTH_RATIOS if k <= ipc)]


def fraction_error(fraction, field: str = "prune_fraction") -> str | None:
    """The message for a pruning fraction outside [0, 1) (or not a number), else None."""
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction < 1
    if ok:
        return None
    return (f"{field} must be in [0, 1) (the fraction β of the parameters pruned from the matching loss; "
            f"1 would prune them all), got {fraction!r}")


def _check_fraction(fraction, field: str) -> None:
    err = fraction_error(fraction, field)
    if err is not None:
        raise ValueError(err)


def pruned_count(num_params: int, fraction: float) -> int:
    """k = ⌊β·P⌋, the number of parameters a fraction β prunes (PAD's ``int(ratio · P)``); k < P for β < 1."""
    return math.floor(fraction * num_params)


def mismatch_mask(theta_student: Tensor, theta_target: Tensor, fraction: float, field: str = "prune_fraction") -> Tensor:
    """Li et al.'s criterion: prune the k = ⌊β·P⌋ entries with the largest mismatch
    d_i = |θ̂_N,i − θ*_{t+M},i|.

    theta_student = θ̂_N, theta_target = θ*_{t+M}: flat (P,). Returns m, (P,) bool on their device,
    False at the pruned entries. Ties are broken by position (the earlier entry is pruned first); a
    non-finite d_i counts as the largest. No host read (a stable sort on the device).
    """
    _check_fraction(fraction, field)
    d = (theta_student.detach() - theta_target.detach()).abs()  # d_i = |θ̂_N − θ*_{t+M}|_i, (P,)
    k = pruned_count(d.numel(), fraction)
    order = torch.sort(d, descending=True, stable=True).indices  # largest mismatch first
    mask = torch.ones(d.numel(), dtype=torch.bool, device=d.device)
    mask[order[:k]] = False
    return mask


def depth_mask(spec: ParamSpec, ratio: float, device=None, field: str = "prune_fraction") -> Tensor:
    """PAD's rule: prune the first k = ⌊r·P⌋ entries of θ in layer order (the shallowest layers'
    parameters; the cut may fall inside a layer). Returns m, (P,) bool on ``device``."""
    _check_fraction(ratio, field)
    P = spec.num_params
    mask = torch.ones(P, dtype=torch.bool, device=device)
    mask[:pruned_count(P, ratio)] = False
    return mask


def probe_mismatch_mask(
    model: nn.Module,
    spec: ParamSpec,
    theta_start: Tensor,
    theta_target: Tensor,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor,
    plan: StepPlan,
    dsa_strategy: str | None,
    fraction: float,
    dsa_params: DSAParams | None = None,
    precision: str = "fp32",
) -> Tensor:
    """The "mismatch" mask from one probe: θ̂_N = N student steps from θ*_t = ``theta_start`` on
    (images, labels) with rate ``syn_lr`` (no graph), then :func:`mismatch_mask` (θ̂_N, θ*_{t+M}).

    images: (n, C, H, W); labels: (n,) or (n, K); theta_start, theta_target: (P,). Returns (P,) bool."""
    res = unroll(model, spec, theta_start, images.detach(), labels.detach(), syn_lr.detach(), plan, dsa_strategy,
                 DSAParams() if dsa_params is None else dsa_params, create_graph=False, precision=precision)
    return mismatch_mask(res.theta, theta_target, fraction)


def check_mask(mask: Tensor, theta_start: Tensor | None = None, theta_target: Tensor | None = None,
               field: str = "prune_fraction") -> Tensor:
    """Refuse a mask that leaves nothing to match (a ValueError naming ``field``); returns ``mask``.

    mask: (P,) bool. With θ*_t and θ*_{t+M} given, the expert must also have moved on the kept
    entries: ‖m ⊙ (θ*_t − θ*_{t+M})‖ > 0 (else L_m is 0/0). Reads the host: for set-up, not for loops.
    """
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"{field}: the prune mask must be a (P,) bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    kept = int(mask.sum())
    if kept == 0:
        raise ValueError(f"{field}: the prune mask prunes all {mask.numel()} parameters: nothing is left to match")
    if theta_start is not None and theta_target is not None:
        if float(torch.where(mask, theta_start - theta_target, 0).pow(2).sum()) == 0:
            raise ValueError(f"{field}: the expert did not move on the {kept} parameters the prune mask keeps "
                             "(‖m ⊙ (θ*_t − θ*_{t+M})‖ = 0): nothing is left to match; lower it")
    return mask


def mask_counts(spec: ParamSpec, mask: Tensor) -> dict[str, dict[str, int]]:
    """Per parameter tensor: {"masked": pruned entries, "total": its size}. One host read."""
    pruned = (~mask).to(torch.int64).cpu()
    return {name: {"masked": int(pruned[sl].sum()), "total": sl.stop - sl.start} for name, sl in spec.slices().items()}
