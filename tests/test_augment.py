"""Tests for mttlite.augment (DSA): exact gradients, replayable randomness, hand-checked ops.

Where a test needs the drawn parameters omega it replays them from the documented
randomness contract (one CPU generator seeded with `seed`: the op index in mode "S",
then each op's draws in order) and checks the output against an independent
per-sample, loop-based NumPy computation, or against torchvision.

The images live on the ``device`` fixture (tests/conftest.py: ``MTTLITE_TEST_DEVICE``, default
CPU); omega is drawn on the CPU whatever the device, so the same references apply.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from mttlite.augment import (
    DSA_STRATEGY,
    DSA_STRATEGY_DIGITS,
    OPS,
    DSAParams,
    default_strategy,
    dsa,
    parse_strategy,
    rand_brightness,
    rand_crop,
    rand_flip,
)

ALL_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def replay(seed: int, n_ops: int | None = 1) -> torch.Generator:
    """The generator dsa() uses, after the mode-"S" op choice (n_ops=None: mode "M", no choice)."""
    g = torch.Generator("cpu").manual_seed(seed)
    if n_ops is not None:
        torch.randint(0, n_ops, (1,), generator=g)
    return g


def bilinear_affine_reference(img: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """affine_grid + grid_sample(bilinear, zeros, align_corners=True), one image, written out by hand.

    img: (C, H, W); theta: (2, 3). Output pixel (i, j) has normalised coordinates
    u = -1 + 2 j / (W - 1), v = -1 + 2 i / (H - 1); it reads the input at theta @ (u, v, 1),
    converted back to pixels, with bilinear weights and zero outside the image.
    """
    _, H, W = img.shape
    out = np.zeros_like(img)
    for i in range(H):
        for j in range(W):
            u, v = -1 + 2 * j / (W - 1), -1 + 2 * i / (H - 1)
            us, vs = theta @ np.array([u, v, 1.0])
            xs, ys = (us + 1) * (W - 1) / 2, (vs + 1) * (H - 1) / 2
            x0, y0 = math.floor(xs), math.floor(ys)
            for yy, wy in ((y0, 1 - (ys - y0)), (y0 + 1, ys - y0)):
                for xx, wx in ((x0, 1 - (xs - x0)), (x0 + 1, xs - x0)):
                    if 0 <= yy < H and 0 <= xx < W:
                        out[:, i, j] += wy * wx * img[:, yy, xx]
    return out


# ----------------------------------------------------------------------------- API


def test_parse_strategy():
    assert parse_strategy(DSA_STRATEGY) == ALL_OPS
    assert parse_strategy(DSA_STRATEGY_DIGITS) == (
        "color",
        "crop",
        "cutout",
        "scale",
        "rotate",
    )
    assert set(OPS) == set(ALL_OPS)
    for empty in (None, "", "none", "None"):
        assert parse_strategy(empty) == ()


@pytest.mark.parametrize("bad", ["color_blur", "colour", "crop__flip", "Color"])
def test_unknown_op_lists_valid_ops(bad):
    with pytest.raises(ValueError) as err:
        parse_strategy(bad)
    for op in ALL_OPS:
        assert op in str(err.value)


def test_default_strategy():
    assert default_strategy("mnist") == DSA_STRATEGY_DIGITS
    assert default_strategy("MNIST") == DSA_STRATEGY_DIGITS
    assert default_strategy("svhn") == DSA_STRATEGY_DIGITS
    assert default_strategy("fashion_mnist") == DSA_STRATEGY  # clothes may be mirrored
    assert default_strategy("cifar10") == DSA_STRATEGY


def test_bad_inputs_raise(device):
    x = torch.rand(2, 1, 6, 6).to(device)
    with pytest.raises(ValueError, match="mode"):
        dsa(x, DSA_STRATEGY, 0, mode="X")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        dsa(torch.rand(1, 6, 6).to(device), DSA_STRATEGY, 0)
    with pytest.raises(ValueError, match="floating"):
        dsa(torch.ones(2, 1, 6, 6, dtype=torch.long).to(device), DSA_STRATEGY, 0)
    with pytest.raises(ValueError, match="valid ops"):
        dsa(x, "crop_blur", 0)


@pytest.mark.parametrize("empty", [None, "", "none"])
def test_empty_strategy_is_identity(empty, device):
    x = torch.rand(3, 2, 5, 5).to(device).requires_grad_(True)
    y = dsa(x, empty, seed=123)
    assert y is x


# ------------------------------------------------------------- randomness contract


def test_same_seed_bitwise_different_seed_differs_global_rng_untouched(device):
    x = torch.rand(6, 3, 8, 8).to(device)
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    for mode in ("S", "M"):
        assert torch.equal(
            dsa(x, DSA_STRATEGY, 7, mode=mode), dsa(x, DSA_STRATEGY, 7, mode=mode)
        )
        assert not torch.equal(
            dsa(x, "color", 7, mode=mode), dsa(x, "color", 8, mode=mode)
        )
    outs = [dsa(x, DSA_STRATEGY, s) for s in range(10)]
    assert len({o.cpu().numpy().tobytes() for o in outs}) == 10
    assert torch.equal(
        torch.get_rng_state(), state
    )  # only the explicit generator was used
    if cuda_state is not None:  # the device's generator was not touched either
        assert torch.equal(torch.cuda.get_rng_state(device), cuda_state)


def test_determinism_across_calls_and_dtypes(device):
    """Replays agree bitwise; float32 and float64 runs receive the same omega."""
    x64 = torch.rand(4, 3, 8, 8, dtype=torch.float64).to(device)
    x32 = x64.float()
    for seed in range(4):
        a = dsa(x32, DSA_STRATEGY, seed, mode="M")
        b = dsa(x32.clone(), DSA_STRATEGY, seed, mode="M")
        assert torch.equal(a, b)
        c = dsa(x64, DSA_STRATEGY, seed, mode="M")
        torch.testing.assert_close(a.double(), c, atol=1e-5, rtol=1e-5)


def test_cpu_and_device_receive_the_same_transform(device):
    if device.type == "cpu":
        pytest.skip("compares the CPU with another device: set MTTLITE_TEST_DEVICE=cuda (or mps)")
    x = torch.rand(5, 3, 8, 8)
    for op in ALL_OPS:
        for seed in range(3):
            cpu = dsa(x, op, seed)
            dev = dsa(x.to(device), op, seed).cpu()
            torch.testing.assert_close(dev, cpu, atol=1e-5, rtol=1e-5)


def test_mode_s_picks_one_op_uniformly(device):
    """'flip_cutout' on positive images: a call either cuts (zeros appear) or only flips."""
    x = (torch.rand(4, 1, 8, 8) + 0.1).to(device)
    n_cut = 0
    for seed in range(60):
        y = dsa(x, "flip_cutout", seed)
        cut = bool((y == 0).any())
        if not cut:  # then every sample is x or its mirror image
            assert all(
                torch.equal(y[b], x[b]) or torch.equal(y[b], x[b].flip(-1))
                for b in range(4)
            )
        expected = (
            int(
                torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(seed))
            )
            == 1
        )
        assert cut == expected
        n_cut += cut
    assert 15 <= n_cut <= 45


def test_mode_m_applies_every_op_in_order(device):
    x = torch.rand(3, 2, 8, 8).to(device)
    g = replay(5, n_ops=None)
    expected = rand_flip(rand_crop(x, g), g)
    assert torch.equal(dsa(x, "crop_flip", 5, mode="M"), expected)


# ---------------------------------------------------------------------- gradients


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("shared", [False, True])
def test_gradient_matches_central_finite_differences(op, shared, device):
    """Every op is affine in x for fixed omega, so central differences are exact up to rounding."""
    channels = 3 if op == "color" else 1  # saturation is the identity on one channel
    x = torch.rand(2, channels, 6, 6, dtype=torch.float64).to(device).requires_grad_(True)
    f = lambda x: dsa(x, op, seed=11, shared=shared)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradient_full_strategy_mode_m(device):
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: dsa(x, DSA_STRATEGY, 3, mode="M"), (x,), eps=1e-6, atol=1e-8
    )


def test_differentiable_in_x_only(device):
    x = torch.rand(2, 3, 6, 6).to(device)
    for op in ALL_OPS:
        assert not dsa(x, op, 0, mode="M").requires_grad  # omega carries no graph
        assert dsa(x.requires_grad_(), op, 0, mode="M").requires_grad
        x = x.detach()


# ---------------------------------------------------------- ops vs hand computation


def test_flip_against_replayed_draws(device):
    x = torch.rand(8, 2, 5, 5)
    seed = 0
    y = dsa(x.to(device), "flip", seed).cpu()
    flipped = torch.rand(8, generator=replay(seed)) < 0.5
    assert 0 < int(flipped.sum()) < 8  # this seed exercises both branches
    for b in range(8):
        assert torch.equal(y[b], x[b].flip(-1) if flipped[b] else x[b])


def test_brightness_offset(device):
    x = torch.rand(5, 3, 4, 4)
    y = rand_brightness(x.to(device), torch.Generator().manual_seed(9)).cpu()
    offset = torch.rand(5, generator=torch.Generator().manual_seed(9)) - 0.5
    torch.testing.assert_close(
        y - x, offset.view(5, 1, 1, 1).expand_as(x), atol=1e-6, rtol=0
    )


def test_color_against_numpy(device):
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    seed = 2
    y = dsa(x.to(device), "color", seed).cpu().numpy()
    g = replay(seed)
    ub, us, uc = (torch.rand(4, generator=g).double().numpy() for _ in range(3))
    p = DSAParams()
    for b in range(4):
        z = x[b].numpy() + (ub[b] - 0.5) * p.brightness
        m = z.mean(axis=0, keepdims=True)
        z = (z - m) * (us[b] * p.saturation) + m
        m = z.mean()
        z = (z - m) * (uc[b] + p.contrast) + m
        np.testing.assert_allclose(y[b], z, rtol=0, atol=1e-12)


def test_crop_is_a_zero_filled_shift(device):
    H, W = 16, 24  # non-square: the row and column shift ranges differ
    x = torch.rand(6, 2, H, W)
    seed = 4
    y = dsa(x.to(device), "crop", seed).cpu()
    g = replay(seed)
    s_h, s_w = 2, 3  # round(16 * 0.125), round(24 * 0.125)
    ty = torch.randint(-s_h, s_h + 1, (6,), generator=g)
    tx = torch.randint(-s_w, s_w + 1, (6,), generator=g)
    assert len(set(ty.tolist())) > 1 and len(set(tx.tolist())) > 1
    for b in range(6):
        ref = torch.zeros(2, H, W)
        for i in range(H):
            for j in range(W):
                if 0 <= i + ty[b] < H and 0 <= j + tx[b] < W:
                    ref[:, i, j] = x[b, :, i + ty[b], j + tx[b]]
        assert torch.equal(y[b], ref)


def test_cutout_zeroes_the_expected_square(device):
    x = torch.rand(32, 3, 16, 16) + 0.1  # strictly positive: zeros mark the cut
    seed = 1
    y = dsa(x.to(device), "cutout", seed).cpu()
    g = replay(seed)
    k = 8  # round(16 * 0.5), even -> centres in {0..16}
    oy, ox = (
        torch.randint(0, 17, (32,), generator=g),
        torch.randint(0, 17, (32,), generator=g),
    )
    n_inside = 0
    for b in range(32):
        zeros = y[b] == 0  # (3, 16, 16)
        assert torch.equal(zeros[0], zeros[1]) and torch.equal(
            zeros[0], zeros[2]
        )  # same for all channels
        rows = [r for r in range(oy[b] - k // 2, oy[b] - k // 2 + k) if 0 <= r < 16]
        cols = [c for c in range(ox[b] - k // 2, ox[b] - k // 2 + k) if 0 <= c < 16]
        assert int(zeros[0].sum()) == len(rows) * len(cols)
        assert bool(zeros[0][rows][:, cols].all())
        if (
            len(rows) == k and len(cols) == k
        ):  # square away from the borders: exactly k*k pixels
            assert int(zeros[0].sum()) == k * k
            n_inside += 1
        torch.testing.assert_close(y[b][~zeros], x[b][~zeros], rtol=0, atol=0)
    assert 0 < n_inside < 32  # both interior and border-clipped squares were checked


def test_scale_against_hand_bilinear(device):
    x = torch.rand(3, 2, 7, 9, dtype=torch.float64)
    seed = 6
    y = dsa(x.to(device), "scale", seed).cpu().numpy()
    g = replay(seed)
    r = 1.2
    sx = torch.rand(3, generator=g).double().numpy() * (r - 1 / r) + 1 / r
    sy = torch.rand(3, generator=g).double().numpy() * (r - 1 / r) + 1 / r
    for b in range(3):
        theta = np.array([[sx[b], 0, 0], [0, sy[b], 0]])
        np.testing.assert_allclose(
            y[b], bilinear_affine_reference(x[b].numpy(), theta), atol=1e-12
        )


def test_rotate_against_torchvision_and_hand_bilinear(device):
    x = torch.rand(3, 2, 9, 9, dtype=torch.float64)
    seed = 8
    y = dsa(x.to(device), "rotate", seed).cpu()
    deg = (torch.rand(3, generator=replay(seed)).double() - 0.5) * 2 * 15.0
    for b in range(3):
        ref_tv = TF.rotate(
            x[b : b + 1], float(deg[b]), interpolation=InterpolationMode.BILINEAR
        )[0]
        torch.testing.assert_close(y[b], ref_tv, atol=1e-12, rtol=0)
        phi = math.radians(float(deg[b]))
        theta = np.array(
            [[math.cos(phi), -math.sin(phi), 0], [math.sin(phi), math.cos(phi), 0]]
        )
        np.testing.assert_allclose(
            y[b].numpy(), bilinear_affine_reference(x[b].numpy(), theta), atol=1e-12
        )


# ------------------------------------------------------------------- siamese mode


@pytest.mark.parametrize("strategy", list(ALL_OPS) + [DSA_STRATEGY])
def test_shared_gives_same_transform_across_batch_sizes(strategy, device):
    real = torch.rand(7, 3, 8, 8).to(device)
    syn = real[[4, 1]].clone()  # a smaller batch holding two of the same images
    for mode in ("S", "M"):
        for seed in range(3):
            y_real = dsa(real, strategy, seed, mode=mode, shared=True)
            y_syn = dsa(syn, strategy, seed, mode=mode, shared=True)
            torch.testing.assert_close(y_syn, y_real[[4, 1]], atol=1e-6, rtol=1e-6)


def test_shared_uses_one_draw_for_the_batch(device):
    x = torch.rand(6, 1, 8, 8).to(device)
    d = dsa(x, "color", 3, shared=True) - x  # one channel: brightness, then contrast
    # contrast scales deviations from each image's mean by the same factor c for every sample
    dev_in = x - x.mean(dim=(1, 2, 3), keepdim=True)
    dev_out = (d + x) - (d + x).mean(dim=(1, 2, 3), keepdim=True)
    c = (dev_out / dev_in).flatten(1).median(dim=1).values
    torch.testing.assert_close(c, c[:1].expand(6), atol=1e-4, rtol=1e-4)
    flips = [
        torch.equal(y, xb.flip(-1)) for y, xb in zip(dsa(x, "flip", 0, shared=True), x)
    ]
    assert len(set(flips)) == 1
