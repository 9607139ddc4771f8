"""Texture distillation (MTT paper, §5 "Tileable textures"): one class distilled into a toroidal canvas.

The synthetic "image" is a canvas larger than the network's input, x ∈ R^(C×Hc×Wc) with Hc ≥ H,
Wc ≥ W, and the student never sees it whole: each step sees a random crop of the canvas *rolled
with wrap-around* (a torus), so every pixel has neighbours on all four sides and the learned canvas
tiles seamlessly. A crop at offset (dy, dx) is

    crop(x; dy, dx)[c, i, j] = x[c, (i + dy) mod Hc, (j + dx) mod Wc]         i < H, j < W

which is ``torch.roll(x, (−dy, −dx), (−2, −1))[..., :H, :W]``: the authors' ``torch.roll`` by a
random shift then the top-left crop (their ``distill.py``, ``--texture``), with the shift's sign
flipped, the same distribution. The map is linear in x and its Jacobian is a 0/1 selection, so
gradients flow back exactly: ∂ℓ/∂x[c, u, v] = Σ over crop pixels (i, j) that read (u, v).

**One offset per canvas.** (dy, dx) ~ U{0 … Hc−1} × U{0 … Wc−1}, drawn independently for every
canvas of the batch, as the authors roll each image (``shared=True``: one offset for the batch).

**Randomness contract**, like ``mttlite.augment``: the offsets are a pure function of a seed (or of
the state of the CPU ``torch.Generator`` given): dy (n,) then dx (n,), ``torch.randint`` on the CPU.
The index map is built on the CPU and moved to the canvas's device without waiting for it, so a
crop never synchronises with a GPU, and the same seed gives the same crop on every device. In the
distillation the crop is the first thing :func:`mttlite.augment.dsa` does when
``DSAParams.texture_crop`` is set, from the step's own seeded generator: both meta-gradient modes
replay the identical crop in their backward pass.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

__all__ = ["crop_at", "draw_offsets", "input_size", "tile", "tile_canvas", "toroidal_crop"]


def _pair(size) -> tuple[int, int]:
    """An int s → (s, s); an (H, W) pair → (H, W), as ints."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _check(canvas: Tensor, size: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(canvas, Tensor) or canvas.dim() != 4:
        shape = tuple(canvas.shape) if isinstance(canvas, Tensor) else type(canvas).__name__
        raise ValueError(f"a texture canvas batch must have shape (n, C, Hc, Wc), got {shape}")
    Hc, Wc = canvas.shape[-2:]
    H, W = size
    if not (1 <= H <= Hc and 1 <= W <= Wc):
        raise ValueError(f"a toroidal crop of size {(H, W)} needs 1 <= H <= Hc and 1 <= W <= Wc; "
                         f"the canvas is {(Hc, Wc)}")
    return H, W


def draw_offsets(n: int, canvas_hw: tuple[int, int], generator: torch.Generator,
                 shared: bool = False) -> tuple[Tensor, Tensor]:
    """(dy, dx), each (n,) int64 on the CPU: dy ~ U{0 … Hc−1}, dx ~ U{0 … Wc−1}, one per canvas
    (one for all n with ``shared``). Draws dy, then dx, from ``generator``."""
    Hc, Wc = canvas_hw
    m = 1 if shared else n
    dy = torch.randint(0, Hc, (m,), generator=generator)
    dx = torch.randint(0, Wc, (m,), generator=generator)
    return dy.expand(n), dx.expand(n)


def crop_at(canvas: Tensor, size, dy, dx) -> Tensor:
    """The crops at given offsets: (n, C, Hc, Wc) → (n, C, H, W), differentiable in ``canvas``.

    out[b, c, i, j] = canvas[b, c, (i + dy_b) mod Hc, (j + dx_b) mod Wc]

    size: (H, W) or an int; dy, dx: ints or (n,) CPU int64 tensors (any integers: taken mod Hc, Wc).
    One ``gather`` on the flattened canvas, index (i' · Wc + j'); its backward is a scatter-add, so
    a canvas pixel read by several crop pixels (H > Hc/2 …) receives the sum of their gradients.
    """
    H, W = _check(canvas, _pair(size))
    n, C, Hc, Wc = canvas.shape
    dy = torch.as_tensor(dy, dtype=torch.int64).cpu().expand(n)
    dx = torch.as_tensor(dx, dtype=torch.int64).cpu().expand(n)
    rows = (torch.arange(H) + dy[:, None]) % Hc  # (n, H): canvas rows read
    cols = (torch.arange(W) + dx[:, None]) % Wc  # (n, W): canvas columns read
    idx = (rows[:, :, None] * Wc + cols[:, None, :]).view(n, 1, H * W)  # (n, 1, H·W), on the CPU
    idx = idx.to(canvas.device, non_blocking=True)  # a fresh pageable temporary: no wait for the device
    out = canvas.reshape(n, C, Hc * Wc).gather(2, idx.expand(n, C, H * W))  # (n, C, H·W)
    return out.view(n, C, H, W)


def toroidal_crop(canvas: Tensor, size, generator_or_seed, shared: bool = False) -> Tensor:
    """A random toroidal crop of every canvas: (n, C, Hc, Wc) → (n, C, H, W), differentiable.

    The authors' texture step: roll each canvas by a random (dy, dx) with wrap-around, keep the
    top-left (H, W). ``generator_or_seed``: an int seed (a fresh CPU generator, so the same seed gives
    bitwise the same crop) or a CPU ``torch.Generator`` to draw from (advanced by 2 draws).
    ``shared``: one offset for the whole batch instead of one per canvas.
    """
    H, W = _check(canvas, _pair(size))
    if isinstance(generator_or_seed, torch.Generator):
        gen = generator_or_seed
    else:
        gen = torch.Generator("cpu").manual_seed(operator.index(generator_or_seed))
    dy, dx = draw_offsets(canvas.shape[0], tuple(canvas.shape[-2:]), gen, shared)
    return crop_at(canvas, (H, W), dy, dx)


def tile(canvas: Tensor, reps: int = 3) -> Tensor:
    """Each canvas repeated ``reps`` × ``reps``: (..., Hc, Wc) → (..., reps·Hc, reps·Wc), for display.

    A texture is seamless when its tiling shows no seams: what the PNG export of a texture set shows."""
    if not (isinstance(reps, int) and reps >= 1):
        raise ValueError(f"reps must be a positive integer, got {reps!r}")
    return canvas.repeat(*([1] * (canvas.dim() - 2)), reps, reps)


def tile_canvas(tiles: Tensor, canvas_hw) -> Tensor:
    """A canvas laid out from images: (n, T, C, H, W) → (n, C, Hc, Wc).

    Image t goes to grid cell (t // g_w, t % g_w) of a g_h × g_w grid, g_h = ⌈Hc/H⌉, g_w = ⌈Wc/W⌉,
    T = g_h · g_w; the grid is cut to the canvas at the bottom and right. The texture set's "real"
    initialisation (the authors fill their canvas with real images of the class the same way)."""
    Hc, Wc = _pair(canvas_hw)
    n, T, C, H, W = tiles.shape
    g_h, g_w = -(-Hc // H), -(-Wc // W)
    if T != g_h * g_w:
        raise ValueError(f"a {Hc}x{Wc} canvas of {H}x{W} images needs {g_h} x {g_w} = {g_h * g_w} images each, got {T}")
    grid = tiles.view(n, g_h, g_w, C, H, W).permute(0, 3, 1, 4, 2, 5).reshape(n, C, g_h * H, g_w * W)
    return grid[..., :Hc, :Wc].contiguous()


def input_size(canvas_hw, im_size) -> tuple[int, int]:
    """Check a canvas against the network's input: returns (H, W) = ``im_size``, or raises a ValueError
    naming ``texture_canvas`` if the canvas is smaller than the input in either dimension."""
    Hc, Wc = _pair(canvas_hw)
    H, W = _pair(im_size)
    if Hc < H or Wc < W:
        raise ValueError(f"texture_canvas must be at least the images' side ({max(H, W)} for {H}x{W} images; "
                         f"the student sees {H}x{W} crops of the canvas), got a {Hc}x{Wc} canvas")
    return H, W
