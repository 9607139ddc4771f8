"""Differentiable Siamese Augmentation (DSA), exactly as used by DC / DSA / MTT.

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation" (ICML 2021).

**The idea.** A synthetic set is learned by back-propagating a loss through a network
that *trains on* the synthetic images. If those images are augmented on the way in,
the augmentation must be a differentiable function of the pixels:

    x_aug = A_omega(x),      d loss / d x = (d A_omega / d x)^T  d loss / d x_aug

where omega are the random parameters (a shift, an angle, a brightness offset, ...).
omega itself is *not* learned: it is drawn, then held fixed, so every op below is an
affine (mostly linear) map of x and its Jacobian is exact.

*Siamese* means the same omega can be applied to two batches (real and synthetic in
DC/DSA gradient matching), so the two are compared under the identical transform.
Here omega is a pure function of an integer ``seed``: calling ``dsa`` twice with the
same seed gives bitwise the same transform, which is also how exact-gradient code can
*replay* an augmentation instead of storing it.

**The ops** (``ParamDiffAug`` defaults of the reference code; u ~ U[0, 1) per sample):

    brightness   x + (u - 0.5) * brightness                          (brightness = 1.0)
    saturation   (x - mean_c x) * (u * saturation) + mean_c x         (saturation = 2.0)
    contrast     (x - mean_chw x) * (u + contrast) + mean_chw x       (contrast   = 0.5)
    crop         shift by t in {-s..s}, s = round(H * 0.125), zero fill (pad 1 + clamp)
    cutout       zero a square of side round(H * 0.5) centred at o ~ {0..H-1+[side even]}
    flip         x[..., ::-1] with probability 0.5
    scale        sample grid (u, v) -> (sx u, sy v),  sx, sy ~ U[1/1.2, 1.2]
    rotate       sample grid rotated by phi ~ U[-15, 15] degrees

'color' in a strategy string means brightness, then saturation, then contrast.
Strategies are op names joined by '_', e.g. ``"color_crop_cutout_flip_scale_rotate"``.

**Modes.** ``"S"`` (the DSA default, used by MTT): ONE op of the strategy is chosen per
call, uniformly, and applied to the whole batch. ``"M"``: every op, in order.

**Randomness contract** (what "replay by seed" relies on). One CPU generator
``torch.Generator("cpu").manual_seed(seed)`` feeds, in this order:

0. texture only (``DSAParams.texture_crop`` set): the offsets of the canvas's toroidal crop, dy (B,) then
   dx (B,) (``mttlite.texture.draw_offsets``); the crop (B, C, Hc, Wc) -> (B, C, H, W) is applied first;
1. mode "S" only: the op index, ``torch.randint(0, n_ops, (1,))``;
2. each (sub-)op applied, in order, draws its parameters as listed in its docstring,
   ``n = B`` values per draw (``n = 1`` if ``shared=True``, then broadcast to the batch).

Everything is drawn and turned into tensors (theta matrices, index maps) on the CPU
and only then moved to ``x.device``: the same seed gives the same omega on CPU and GPU,
and the global RNG is never touched.

**Device.** The move is ``non_blocking`` (``_to_device``): a blocking host-to-GPU copy waits for
the GPU's queue to drain (``cudaStreamSynchronize``), once per augmented batch. The CPU tensors
are fresh, pageable temporaries, which CUDA stages before the call returns, so the asynchronous
copy is safe. No op reads a value back: ``dsa`` never synchronises with the device, which
tests/test_device_stages.py checks by running every op on torch's ``meta`` device.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .opcount import host
from .texture import toroidal_crop

__all__ = [
    "DSA_STRATEGY",
    "DSA_STRATEGY_DIGITS",
    "OPS",
    "DSAParams",
    "default_strategy",
    "dsa",
    "parse_strategy",
    "rand_brightness",
    "rand_contrast",
    "rand_crop",
    "rand_cutout",
    "rand_flip",
    "rand_rotate",
    "rand_saturation",
    "rand_scale",
]

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# No flip for digits: a mirrored "2" is not a "2".
DSA_STRATEGY_DIGITS = "color_crop_cutout_scale_rotate"

DIGIT_DATASETS = ("mnist", "svhn")
MODES = ("S", "M")


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the random parameters omega (``ParamDiffAug`` in the reference code)."""

    brightness: float = 1.0  # additive offset in [-0.5, 0.5) * brightness
    saturation: float = 2.0  # channel-deviation factor in [0, saturation)
    contrast: float = 0.5  # image-deviation factor in [contrast, contrast + 1)
    ratio_crop_pad: float = 0.125  # max shift, as a fraction of H (resp. W)
    ratio_cutout: float = 0.5  # cutout side, as a fraction of H (resp. W)
    prob_flip: float = 0.5  # probability of a horizontal flip
    ratio_scale: float = 1.2  # sx, sy ~ U[1 / ratio_scale, ratio_scale]
    ratio_rotate: float = 15.0  # angle ~ U[-ratio_rotate, ratio_rotate] degrees
    # Texture distillation (``mttlite.texture``): (H, W) of a random toroidal crop of each canvas, taken
    # before the ops; None (the default) = no crop, the input is the image itself.
    texture_crop: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------
# Drawing omega. Each helper returns a CPU tensor of shape (B,): B draws per sample,
# or a single draw broadcast to all B samples when shared=True (siamese "batchmode").
# ---------------------------------------------------------------------------------


def _param_dtype(x: Tensor) -> torch.dtype:
    """Compute omega in at least float32 (float64 stays float64), cast to x.dtype at the end."""
    return torch.promote_types(x.dtype, torch.float32)


def _uniform(gen: torch.Generator, x: Tensor, shared: bool) -> Tensor:
    """u ~ U[0, 1), shape (B,), float32 draw (as the reference) on the CPU."""
    batch = x.shape[0]
    u = torch.rand(1 if shared else batch, generator=gen)
    return u.expand(batch).to(_param_dtype(x))


def _randint(
    gen: torch.Generator, low: int, high: int, x: Tensor, shared: bool
) -> Tensor:
    """k ~ uniform integers in [low, high), shape (B,), int64 on the CPU."""
    batch = x.shape[0]
    k = torch.randint(low, high, (1 if shared else batch,), generator=gen)
    return k.expand(batch)


def _to_device(t: Tensor, x: Tensor) -> Tensor:
    """A CPU tensor ``t`` (already in its final dtype) on x's device, without waiting for the device.

    ``non_blocking`` skips the stream synchronisation of a blocking host-to-device copy; safe here
    because ``t`` is a pageable temporary (CUDA copies it to a staging buffer before returning).
    """
    return t.to(x.device, non_blocking=True)


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """(B,) CPU parameter -> (B, 1, 1, 1) on x's device and dtype, ready to broadcast."""
    return _to_device(v.to(x.dtype), x).view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------
# The ops. Signature: op(x, gen, p, shared) -> x_aug, x: (B, C, H, W).
# ---------------------------------------------------------------------------------


def draw_brightness(gen: torch.Generator, x: Tensor, p: DSAParams = DSAParams(), shared: bool = False) -> Tensor:
    """b = (u - 0.5) * brightness, (B,) on the CPU in x's dtype.   Draws: u (B,)."""
    return ((_uniform(gen, x, shared) - 0.5) * p.brightness).to(x.dtype)


def rand_brightness(
    x: Tensor, gen: torch.Generator, p: DSAParams = DSAParams(), shared: bool = False
) -> Tensor:
    """x + b,  b = (u - 0.5) * brightness.   Draws: u (B,)."""
    with host():
        b = draw_brightness(gen, x, p, shared)
    return x + _per_sample(b, x)


def draw_saturation(gen: torch.Generator, x: Tensor, p: DSAParams = DSAParams(), shared: bool = False) -> Tensor:
    """s = u * saturation, (B,) on the CPU in x's dtype.   Draws: u (B,)."""
    return (_uniform(gen, x, shared) * p.saturation).to(x.dtype)


def saturate(x: Tensor, s: Tensor) -> Tensor:
    """(x - m) * s + m,  m = mean over channels (B, 1, H, W); s (B, 1, 1, 1) on x's device."""
    m = x.mean(dim=1, keepdim=True)  # (B, 1, H, W): the "grey" image
    return (x - m) * s + m


def rand_saturation(
    x: Tensor, gen: torch.Generator, p: DSAParams = DSAParams(), shared: bool = False
) -> Tensor:
    """(x - m) * s + m,  m = mean over channels (B, 1, H, W),  s = u * saturation.   Draws: u (B,).

    With a single channel m = x, so saturation is the identity on grey images.
    """
    with host():
        s = draw_saturation(gen, x, p, shared)
    return saturate(x, _per_sample(s, x))


def draw_contrast(gen: torch.Generator, x: Tensor, p: DSAParams = DSAParams(), shared: bool = False) -> Tensor:
    """c = u + contrast, (B,) on the CPU in x's dtype.   Draws: u (B,)."""
    return (_uniform(gen, x, shared) + p.contrast).to(x.dtype)


def contrast(x: Tensor, c: Tensor) -> Tensor:
    """(x - m) * c + m,  m = mean over (C, H, W) (B, 1, 1, 1); c (B, 1, 1, 1) on x's device."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - m) * c + m


def rand_contrast(
    x: Tensor, gen: torch.Generator, p: DSAParams = DSAParams(), shared: bool = False
) -> Tensor:
    """(x - m) * c + m,  m = mean over (C, H, W) (B, 1, 1, 1),  c = u + contrast.   Draws: u (B,)."""
    with host():
        c = draw_contrast(gen, x, p, shared)
    return contrast(x, _per_sample(c, x))


def crop_extent(size: tuple[int, int], p: DSAParams = DSAParams()) -> tuple[int, int]:
    """(s_h, s_w): the largest crop shift, round(H * ratio_crop_pad) and round(W * ratio_crop_pad)."""
    return int(size[0] * p.ratio_crop_pad + 0.5), int(size[1] * p.ratio_crop_pad + 0.5)


def draw_crop(gen: torch.Generator, x: Tensor, p: DSAParams = DSAParams(), shared: bool = False) -> tuple[Tensor, Tensor]:
    """(ty, tx): row and column shifts, (B,) int64 each on the CPU, ty ~ {-s_h..s_h}, tx ~ {-s_w..s_w}."""
    s_h, s_w = crop_extent(tuple(x.shape[-2:]), p)
    ty = _randint(gen, -s_h, s_h + 1, x, shared)  # (B,) row shift
    tx = _randint(gen, -s_w, s_w + 1, x, shared)  # (B,) column shift
    return ty, tx


def shift(x: Tensor, ty: Tensor, tx: Tensor) -> Tensor:
    """out[i, j] = x[i + ty, j + tx], 0 outside; ty, tx (B,) int64 on x's device (0, 0: x itself, exactly).

    As in DSA: pad one zero pixel on each side, then read row clamp(i + ty + 1, 0, H + 1) and column
    clamp(j + tx + 1, 0, W + 1) of the padded image, so every out-of-range index lands on the zero border.
    """
    B, C, H, W = x.shape
    # (B, H) rows and (B, W) columns to read in the padded image
    rows = (torch.arange(H, device=ty.device) + ty[:, None] + 1).clamp(0, H + 1)
    cols = (torch.arange(W, device=tx.device) + tx[:, None] + 1).clamp(0, W + 1)
    # one gather on the flattened padded image: index = row * (W + 2) + col, (B, 1, H*W)
    idx = (rows[:, :, None] * (W + 2) + cols[:, None, :]).view(B, 1, H * W)
    x_pad = F.pad(x, [1, 1, 1, 1]).reshape(B, C, (H + 2) * (W + 2))
    out = x_pad.gather(2, idx.expand(B, C, H * W))  # (B, C, H*W)
    return out.view(B, C, H, W)


def rand_crop(
    x: Tensor, gen: torch.Generator, p: DSAParams = DSAParams(), shared: bool = False
) -> Tensor:
    """Translate by (ty, tx) pixels with zero fill: out[i, j] = x[i + ty, j + tx] (0 outside).

    s_h = round(H * ratio_crop_pad), ty ~ {-s_h..s_h};  likewise tx with W.   Draws: ty (B,), tx (B,).
    The index map is built on the CPU and moved once (``shift`` builds it on x's device).
    """
    B, C, H, W = x.shape
    with host():
        ty, tx = draw_crop(gen, x, p, shared)
        rows = (torch.arange(H) + ty[:, None] + 1).clamp(0, H + 1)
        cols = (torch.arange(W) + tx[:, None] + 1).clamp(0, W + 1)
        idx = (rows[:, :, None] * (W + 2) + cols[:, None, :]).view(B, 1, H * W)
    x_pad = F.pad(x, [1, 1, 1, 1]).reshape(B, C, (H + 2) * (W + 2))
    out = x_pad.gather(2, _to_device(idx, x).expand(B, C, H * W))  # (B, C, H*W)
    return out.view(B, C, H, W)


def cutout_extent(size: tuple[int, int], p: DSAParams = DSAParams()) -> tuple[int, int]:
    """(k_h, k_w): the cut rectangle's sides, round(H * ratio_cutout) and round(W * ratio_cutout)."""
    return int(size[0] * p.ratio_cutout + 0.5), int(size[1] * p.ratio_cutout + 0.5)


def draw_cutout(gen: torch.Generator, x: Tensor, p: DSAParams = DSAParams(), shared: bool = False) -> tuple[Tensor, Tensor]:
    """(top, left): the cut rectangle's first row and column, (B,) int64 each on the CPU (may be < 0).

    Centre row o_y ~ {0 .. H - 1 + (1 - k_h mod 2)}, top = o_y - k_h // 2; likewise columns.
    Draws: o_y (B,), o_x (B,)."""
    H, W = x.shape[-2:]
    k_h, k_w = cutout_extent((H, W), p)
    o_y = _randint(gen, 0, H + (1 - k_h % 2), x, shared)  # (B,) centre row
    o_x = _randint(gen, 0, W + (1 - k_w % 2), x, shared)  # (B,) centre column
    return o_y - k_h // 2, o_x - k_w // 2


def cut_mask(top: Tensor, left: Tensor, size: tuple[int, int], extent: tuple[int, int]) -> Tensor:
    """(B, H, W) bool, True inside the k_h x k_w rectangle at (top, left) clipped to the image; top,
    left (B,) on any device (the mask is made there)."""
    (H, W), (k_h, k_w) = size, extent
    i, j = torch.arange(H, device=top.device), torch.arange(W, device=left.device)
    in_rows = (i >= top[:, None]) & (i < top[:, None] + k_h)  # (B, H)
    in_cols = (j >= left[:, None]) & (j < left[:, None] + k_w)  # (B, W)
    return in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W), True = zeroed


def rand_cutout(
    x: Tensor, gen: torch.Generator, p: DSAParams = DSAParams(), shared: bool = False
) -> Tensor:
    """Zero a k_h x k_w rectangle: out = x * (1 - mask).

    k_h = round(H * ratio_cutout); centre row o_y ~ {0 .. H - 1 + (1 - k_h mod 2)}; the rectangle covers
    rows [o_y - k_h // 2, o_y - k_h // 2 + k_h) clipped to the image (it may hang over the border,
    then fewer pixels are cut). Likewise columns.   Draws: o_y (B,), o_x (B,).
    (DSA writes the same mask with a clamped index scatter; clipping an interval is identical.)
    """
    H, W = x.shape[-2:]
    with host():
        top, left = draw_cutout(gen, x, p, shared)
        cut = cut_mask(top, left, (H, W), cutout_extent((H, W), p))  # on the CPU
        keep = (~cut).to(x.dtype)
    keep = _to_device(keep, x)  # (B, H, W)
    return x * keep[:, None]


def draw_flip(gen: torch.Generator, x: Tensor, p: DSAParams = DSAParams(), shared: bool = False) -> Tensor:
    """Which samples are flipped, (B,) bool on the CPU.   Draws: u (B,); flipped where u < prob_flip."""
    return _uniform(gen, x, shared) < p.prob_flip


def rand_flip(
    x: Tensor, gen: torch.Generator, p: DSAParams = DSAParams(), shared: bool = False
) -> Tensor:
    """Horizontal flip of the samples with u < prob_flip.   Draws: u (B,)."""
    with host():
        flip = draw_flip(gen, x, p, shared)  # (B,) bool
    return torch.where(_to_device(flip, x).view(-1, 1, 1, 1), x.flip(3), x)


def warp(x: Tensor, theta: Tensor) -> Tensor:
    """out(u, v) = x(theta @ [u, v, 1]) in normalised coordinates ([-1, 1] = corner pixel centres).

    theta: (B, 2, 3) on x's device, in x's dtype. Bilinear, zero outside, align_corners=True (as DSA).
    Linear in x: the grid depends on omega only.
    """
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)  # (B, H, W, 2)
    return F.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """``warp`` with theta (B, 2, 3) on the CPU (moved to x's device and dtype)."""
    if x.numel() == 0:  # affine_grid rejects empty sizes; nothing to sample
        return x.clone()
    with host():
        theta = theta.to(x.dtype)
    return warp(x, _to_device(theta, x))


def _theta(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Stack (B,) entries into affine matrices [[a, b, 0], [c, d, 0]] of shape (B, 2, 3)."""
    zero = torch.zeros_like(a)
    return torch.stack(
        [torch.stack([a, b, zero], -1), torch.stack([c, d, zero], -1)], 1
    )


def draw_scale(gen: torch.Generator, x: Tensor, p: DSAParams = DSAParams(), shared: bool = False) -> Tensor:
    """theta = [[sx, 0, 0], [0, sy, 0]], (B, 2, 3) on the CPU in x's dtype; sx, sy ~ U[1/r, r].
    Draws: sx (B,), sy (B,)."""
    r = p.ratio_scale
    sx = _uniform(gen, x, shared) * (r - 1.0 / r) + 1.0 / r  # (B,)
    sy = _uniform(gen, x, shared) * (r - 1.0 / r) + 1.0 / r  # (B,)
    zero = torch.zeros_like(sx)
    return _theta(sx, zero, zero, sy).to(x.dtype)


def rand_scale(
    x: Tensor, gen: torch.Generator, p: DSAParams = DSAParams(), shared: bool = False
) -> Tensor:
    """Sample at (sx u, sy v): sx, sy ~ U[1/r, r], r = ratio_scale (s > 1 shrinks the content).

    theta = [[sx, 0, 0], [0, sy, 0]].   Draws: sx (B,), sy (B,).
    """
    with host():
        theta = draw_scale(gen, x, p, shared)
    return _warp(x, theta)


def draw_rotate(gen: torch.Generator, x: Tensor, p: DSAParams = DSAParams(), shared: bool = False) -> Tensor:
    """theta = [[cos phi, -sin phi, 0], [sin phi, cos phi, 0]], (B, 2, 3) on the CPU in x's dtype,
    phi = (u - 0.5) * 2 * ratio_rotate degrees.   Draws: u (B,)."""
    u = _uniform(gen, x, shared)  # (B,)
    phi = (u - 0.5) * 2 * p.ratio_rotate / 180 * math.pi  # (B,) radians
    cos, sin = torch.cos(phi), torch.sin(phi)
    return _theta(cos, -sin, sin, cos).to(x.dtype)


def rand_rotate(
    x: Tensor, gen: torch.Generator, p: DSAParams = DSAParams(), shared: bool = False
) -> Tensor:
    """Sample at R(phi) [u, v], phi = (u - 0.5) * 2 * ratio_rotate degrees.   Draws: u (B,).

    theta = [[cos phi, -sin phi, 0], [sin phi, cos phi, 0]]. For square images this is a
    rotation about the image centre by phi degrees, counter-clockwise on screen (as
    torchvision's rotate); for non-square images the normalised coordinates are
    anisotropic, as in the reference code.
    """
    with host():
        theta = draw_rotate(gen, x, p, shared)
    return _warp(x, theta)


Op = Callable[[Tensor, torch.Generator, DSAParams, bool], Tensor]

# Strategy name -> the functions it applies, in order.
OPS: dict[str, tuple[Op, ...]] = {
    "color": (rand_brightness, rand_saturation, rand_contrast),
    "crop": (rand_crop,),
    "cutout": (rand_cutout,),
    "flip": (rand_flip,),
    "scale": (rand_scale,),
    "rotate": (rand_rotate,),
}


# ---------------------------------------------------------------------------------
# The public entry points.
# ---------------------------------------------------------------------------------


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """Split a strategy: "color_crop_flip" -> ("color", "crop", "flip").

    None / "" / "none" -> () (no augmentation). Unknown op -> ValueError listing the valid ops.
    """
    if strategy is None:
        return ()
    if not isinstance(strategy, str):
        raise TypeError(
            f"strategy must be a str like {DSA_STRATEGY!r} or None, got {type(strategy).__name__}"
        )
    if strategy.strip().lower() in ("", "none"):
        return ()
    ops = tuple(strategy.strip().split("_"))
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(
            f"unknown DSA op(s) {bad} in strategy {strategy!r}; valid ops: {', '.join(OPS)} "
            f"(join them with '_', e.g. {DSA_STRATEGY!r}), or 'none'"
        )
    return ops


def dsa(
    x: Tensor,
    strategy: str | None,
    seed: int,
    params: DSAParams = DSAParams(),
    mode: str = "S",
    shared: bool = False,
) -> Tensor:
    """Augment a batch x: (B, C, H, W) -> (B, C, H, W), differentiably in x.

    strategy: ops joined by '_' (see ``OPS``); None / "" / "none" returns x itself.
    seed:     fixes omega completely (same seed -> bitwise identical output).
    mode:     "S" = one op of the strategy, chosen from the seed;  "M" = all ops in order.
    shared:   one omega for the whole batch (siamese: the same seed gives the same transform to
              batches of any size), instead of one omega per sample.
    params.texture_crop = (H, W): x holds texture canvases (B, C, Hc, Wc); each is first cropped
              toroidally at a random offset drawn from the seed (``mttlite.texture``), then augmented,
              so the result is (B, C, H, W) (even with no ops).
    """
    if mode not in MODES:
        raise ValueError(
            f"unknown DSA mode {mode!r}; valid modes: 'S' (one op per call), 'M' (all ops)"
        )
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"dsa expects images x of shape (B, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"dsa expects a floating-point x, got dtype {x.dtype}")
    ops = parse_strategy(strategy)
    if not ops and params.texture_crop is None:
        return x

    with host():
        gen = torch.Generator("cpu").manual_seed(operator.index(seed))
    if params.texture_crop is not None:  # texture: the canvas's toroidal crop comes first (contract, step 0)
        x = toroidal_crop(x, params.texture_crop, gen, shared)
    if mode == "S" and ops:
        with host():
            ops = (ops[int(torch.randint(0, len(ops), (1,), generator=gen))],)
    for op in ops:
        for f in OPS[op]:
            x = f(x, gen, params, shared)
    return x.contiguous()


def default_strategy(dataset_name: str) -> str:
    """DSA strategy of the papers: no flip for digits (MNIST, SVHN), the full strategy otherwise."""
    is_digits = dataset_name.strip().lower() in DIGIT_DATASETS
    return DSA_STRATEGY_DIGITS if is_digits else DSA_STRATEGY
