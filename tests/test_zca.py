"""ZCA whitening: hand-derived values, the regularised-identity covariance, an independent numpy
implementation (kornia's conventions: unbiased covariance, X_zca = (X - mu) W), round trips.

Fits and transforms run on the ``device`` fixture (tests/conftest.py; CPU by default); the numpy
references run on the CPU."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mttlite.zca import ZCA


def anisotropic(n: int, d: int, seed: int) -> torch.Tensor:
    """n samples in R^d with eigen-scales spanning 1e-2 .. 10^1.5 around a random rotation, as (n, 1, 1, d)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(1.5, -2, d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = (z * scales) @ q.T + torch.linspace(-1, 1, d, dtype=torch.float64)
    return x.float().reshape(n, 1, 1, d)


def numpy_zca(x: np.ndarray, eps: float, ddof: int = 1):
    """Independent reference: np.cov (ddof=1: unbiased, kornia's default) + SVD, W = U diag(1/sqrt(S+eps)) U^T."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    mu = flat.mean(0)
    sigma = np.cov(flat, rowvar=False, ddof=ddof)
    u, s, _ = np.linalg.svd(sigma)
    w = u @ np.diag(1 / np.sqrt(s + eps)) @ u.T
    w_inv = u @ np.diag(np.sqrt(s + eps)) @ u.T
    return mu, w, w_inv, (flat - mu) @ w


def test_hand_derived_two_dimensional_example(device):
    # kornia's docstring example: 4 points on the axes, mean 0, unbiased covariance
    # Sigma = (1/3) * sum x^T x = (2/3) I, so W = I / sqrt(2/3 + eps).
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]]).reshape(4, 1, 1, 2).to(device)
    zca = ZCA.fit(x, eps=0.1)
    assert zca.transform.device == x.device and zca.mean.device == x.device
    w = 1 / math.sqrt(2 / 3 + 0.1)
    eye = torch.eye(2, device=device)
    torch.testing.assert_close(zca.mean, torch.zeros(2, device=device))
    torch.testing.assert_close(zca.transform, w * eye)
    torch.testing.assert_close(zca.inverse_transform, eye / w)
    torch.testing.assert_close(zca(x), w * x)


def test_matches_independent_numpy_implementation(device):
    x = anisotropic(n=15, d=6, seed=1)  # small N: biased and unbiased covariances differ by 15/14
    fitted = ZCA.fit(x.to(device), eps=0.1)
    white_here = fitted(x.to(device)).reshape(15, -1).cpu().numpy()  # applied on the device
    zca = fitted.to("cpu")
    mu, w, w_inv, white = numpy_zca(x.numpy(), eps=0.1)
    np.testing.assert_allclose(zca.mean.numpy(), mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zca.transform.numpy(), w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zca.inverse_transform.numpy(), w_inv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(white_here, white, rtol=1e-4, atol=1e-4)
    # the test can tell the conventions apart: the biased covariance gives a different W
    _, w_biased, _, _ = numpy_zca(x.numpy(), eps=0.1, ddof=0)
    assert np.abs(w_biased - zca.transform.numpy()).max() > 1e-2
    # W is symmetric, so kornia's row-vector orientation (X - mu) W equals W (x - mu) per column
    torch.testing.assert_close(zca.transform, zca.transform.T)


def test_whitened_covariance_is_identity_up_to_the_regulariser(device):
    # Cov(X W) = W^T Sigma W = U diag(S/(S+eps)) U^T (derivation in mttlite/zca.py's docstring)
    eps = 0.1
    x = anisotropic(n=400, d=12, seed=2)
    flat = x.reshape(400, -1).double().numpy()
    sigma = np.cov(flat, rowvar=False)
    s, u = np.linalg.eigh(sigma)
    expected = u @ np.diag(s / (s + eps)) @ u.T

    xd = x.to(device)
    y = ZCA.fit(xd, eps=eps)(xd).reshape(400, -1).double().cpu().numpy()
    cov_y = np.cov(y, rowvar=False)
    np.testing.assert_allclose(cov_y, expected, atol=2e-5)

    # per eigen-direction: variance S/(S+eps) -> 1 where S >> eps, shrunk where S << eps
    var_along = np.einsum("di,de,ei->i", u, cov_y, u)
    big, small = s > 100 * eps, s < eps / 10
    assert big.sum() >= 3 and small.sum() >= 3
    np.testing.assert_allclose(var_along[big], 1.0, atol=1e-2)
    assert (var_along[small] < 0.1).all()
    # plain whitening would give exactly 1 everywhere; the regulariser is what makes these differ
    assert not np.allclose(cov_y, np.eye(12), atol=1e-2)


def test_inverse_restores_the_input(device):
    x = anisotropic(n=300, d=3 * 2 * 2, seed=3).reshape(300, 3, 2, 2).to(device)
    zca = ZCA.fit(x, eps=0.1)
    white = zca(x)
    assert white.shape == x.shape and white.device == x.device
    torch.testing.assert_close(zca.inverse(white), x, atol=1e-4, rtol=1e-4)
    # W^-1 W = I (to float32 precision)
    torch.testing.assert_close(zca.inverse_transform @ zca.transform, torch.eye(12, device=device), atol=1e-4, rtol=0)
    # unseen images too: the transform is affine and invertible, not a lookup
    new = anisotropic(n=7, d=12, seed=4).reshape(7, 3, 2, 2).to(device)
    torch.testing.assert_close(zca.inverse(zca(new)), new, atol=1e-4, rtol=1e-4)


def test_tensors_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    x = anisotropic(n=50, d=8, seed=5)
    zca = ZCA.fit(x, eps=0.25)
    tensors = zca.to_tensors()
    assert set(tensors) == {"zca.mean", "zca.transform", "zca.inverse_transform"}
    save_file(tensors, str(tmp_path / "zca.safetensors"))
    back = ZCA.from_tensors(load_file(str(tmp_path / "zca.safetensors")), eps=zca.eps)
    assert back.eps == 0.25
    assert torch.equal(back(x), zca(x)) and torch.equal(back.inverse(x), zca.inverse(x))
    with pytest.raises(ValueError, match="zca.transform"):
        ZCA.from_tensors({"zca.mean": tensors["zca.mean"]}, eps=0.1)
    assert zca.to("cpu").transform.device.type == "cpu"


def test_bad_input_is_rejected_clearly(device):
    x = anisotropic(n=20, d=4, seed=6).to(device)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ZCA.fit(x, eps=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        ZCA.fit(x[:1])
    with pytest.raises(ValueError, match="D = C\\*H\\*W = 4"):
        ZCA.fit(x)(torch.zeros(3, 1, 1, 5, device=device))
