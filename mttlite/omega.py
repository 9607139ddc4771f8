"""DSA with its randomness as data: ω drawn on the host when the plan is made, applied without branches.

Eager DSA (``mttlite.augment.dsa``) draws ω from a step's seed and picks, in Python, the one op
it applies (mode "S", MTT's). That is what the authors' DiffAugment does, draw for draw, and it
stays the reference. But a CUDA graph cannot capture a Python branch or a host-side draw, and
``torch.compile`` would specialise on the op chosen. Here the *same* draws — the same generator,
seeded with the same step seed, consumed in the same order by the same ``draw_*`` helpers — are
written into one tensor per batch, ω of shape (B, K) (the columns are ``COLUMNS``), and
:func:`apply_omega` computes every op for every sample, each one the identity unless ω selects it::

    colour   x ← where(c, x + b, x);  x ← where(c, (x − m_c) s + m_c, x);  x ← where(c, (x − m) k + m, x)
    crop     x ← shift(x, t_y, t_x)                 (t = 0: every pixel read from its own place)
    cutout   x ← x · (1 − [cut] · R(top, left))     (R: the k_h × k_w rectangle)
    flip     x ← where(f, x[..., ::-1], x)
    scale / rotate   x ← where(w, grid_sample(x, affine_grid(Θ)), x)

In mode "S" one op is active per batch, so the order does not matter and, for the same seed, the
result equals eager DSA's exactly (``where`` passes x through untouched; a zero shift and a cut of
nothing are exact identities). No augmentation (``strategy`` empty) is ω with every flag off: the
same code path, the identity.

``plan_omega`` stacks an iteration's ω into one (N, B, K) tensor on the CPU (pinned when a GPU will
read it), to be moved to the device in ONE non-blocking copy: the fused student step
(``mttlite.fused``) reads each step's row from that static buffer.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from .augment import (
    DSAParams,
    OPS,
    contrast,
    cut_mask,
    cutout_extent,
    draw_brightness,
    draw_contrast,
    draw_crop,
    draw_cutout,
    draw_flip,
    draw_rotate,
    draw_saturation,
    draw_scale,
    parse_strategy,
    saturate,
    shift,
    warp,
)

#: The columns of ω, one row per sample. Flags are 1.0 (on) or 0.0 (off); shifts and offsets are
#: integers held exactly in floating point; Θ is the 2 × 3 affine matrix of scale / rotate, row-major.
COLUMNS = ("color", "brightness", "saturation", "contrast", "crop_y", "crop_x", "cut", "cut_top", "cut_left",
           "flip", "warp", "t00", "t01", "t02", "t10", "t11", "t12")
K = len(COLUMNS)
_C = {name: i for i, name in enumerate(COLUMNS)}
#: ω of a sample that no op touches.
IDENTITY = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.float64)


def draw_omega(strategy: str | None, seed: int, batch: int, im_size: tuple[int, int],
               params: DSAParams = DSAParams(), dtype: torch.dtype = torch.float32) -> Tensor:
    """ω (batch, K) on the CPU in ``dtype``: the draws ``dsa(x, strategy, seed, params)`` makes for a
    batch of ``batch`` images of size ``im_size`` in mode "S" (one op per call), as data.

    ``dtype``: the images' dtype (float32 / float64); the draws are computed as eager DSA computes them
    for images of that dtype, so ``apply_omega(x, ω)`` equals ``dsa(x, strategy, seed)`` exactly.
    Texture crops (``params.texture_crop``) are eager-only: refused here.
    """
    if params.texture_crop is not None:
        raise ValueError("texture canvases (texture_canvas) are augmented by eager DSA only: use step='eager'")
    omega = IDENTITY.to(dtype).repeat(batch, 1)
    ops = parse_strategy(strategy)
    if not ops:
        return omega
    # The images enter the draws only through their batch size and dtype (and H, W for crop / cutout).
    x = torch.empty((batch, 1, *im_size), dtype=dtype, device="meta")
    gen = torch.Generator("cpu").manual_seed(operator.index(seed))
    op = ops[int(torch.randint(0, len(ops), (1,), generator=gen))]  # mode "S": the one op of this call
    col = lambda name: omega[:, _C[name]]  # noqa: E731
    if op == "color":
        col("color").fill_(1)
        col("brightness").copy_(draw_brightness(gen, x, params))
        col("saturation").copy_(draw_saturation(gen, x, params))
        col("contrast").copy_(draw_contrast(gen, x, params))
    elif op == "crop":
        ty, tx = draw_crop(gen, x, params)
        col("crop_y").copy_(ty)
        col("crop_x").copy_(tx)
    elif op == "cutout":
        top, left = draw_cutout(gen, x, params)
        col("cut").fill_(1)
        col("cut_top").copy_(top)
        col("cut_left").copy_(left)
    elif op == "flip":
        col("flip").copy_(draw_flip(gen, x, params))
    else:  # scale / rotate: one affine grid
        theta = (draw_scale if op == "scale" else draw_rotate)(gen, x, params)  # (B, 2, 3)
        col("warp").fill_(1)
        omega[:, _C["t00"]:] = theta.reshape(batch, 6)
    assert OPS[op]  # every op of the strategy is one of the branches above
    return omega


def apply_omega(x: Tensor, omega: Tensor, params: DSAParams = DSAParams()) -> Tensor:
    """A_ω(x): every DSA op, each the identity unless ω selects it (module docstring).

    x: (B, C, H, W); omega: (B, K) on x's device, in x's dtype. Differentiable in x; no branch depends
    on a value, no host read, no allocation that depends on ω: capturable in a CUDA graph and traceable
    by ``torch.compile`` as one graph.
    """
    B, C, H, W = x.shape
    col = lambda name: omega[:, _C[name]]  # noqa: E731
    per = lambda name: col(name).view(B, 1, 1, 1)  # noqa: E731
    color = per("color") != 0
    x = torch.where(color, x + per("brightness"), x)
    x = torch.where(color, saturate(x, per("saturation")), x)
    x = torch.where(color, contrast(x, per("contrast")), x)
    x = shift(x, col("crop_y").long(), col("crop_x").long())
    cut = cut_mask(col("cut_top").long(), col("cut_left").long(), (H, W), cutout_extent((H, W), params))
    x = x * (1 - (cut & (col("cut") != 0).view(B, 1, 1)).to(x.dtype))[:, None]
    x = torch.where(per("flip") != 0, x.flip(3), x)
    theta = omega[:, _C["t00"]:].reshape(B, 2, 3)
    x = torch.where(per("warp") != 0, warp(x, theta), x)
    return x.contiguous()


def plan_omega(strategy: str | None, seeds, batch: int, im_size: tuple[int, int], params: DSAParams = DSAParams(),
               dtype: torch.dtype = torch.float32, pin: bool = False) -> Tensor:
    """ω of every step of a plan, (N, batch, K) on the CPU (``pin``: in page-locked memory, so that one
    non-blocking copy moves it to a GPU). ``seeds``: the plan's N augmentation seeds."""
    out = torch.stack([draw_omega(strategy, s, batch, im_size, params, dtype) for s in seeds])
    return out.pin_memory() if pin else out
