"""Regularised ZCA whitening, as MTT uses it for CIFAR (kornia ``ZCAWhitening(eps=0.1)``).

ZCA ("zero-phase component analysis") whitening decorrelates the pixels of an image set
while keeping the whitened images as close as possible to the originals, so they still
look like (edge-enhanced) images. Flatten every image to a row vector x in R^D
(D = C*H*W) and let

    mu    = mean_n x_n                                   (D,)
    Sigma = 1/(N-1) sum_n (x_n - mu)^T (x_n - mu)        (D, D)   unbiased, as kornia
          = U diag(S) U^T                                eigen-decomposition (= SVD, Sigma is PSD)

The regularised ZCA transform and its inverse are

    W     = U diag(1 / sqrt(S + eps)) U^T                (D, D)   symmetric
    W^-1  = U diag(sqrt(S + eps)) U^T

and an image batch X (rows) is whitened as kornia's ``linear_transform`` does it,

    X_zca = (X - mu) W            ,        X = X_zca W^-1 + mu.

Why "regularised": the covariance of the whitened training set is

    W^T Sigma W = U diag(1/sqrt(S+eps)) diag(S) diag(1/sqrt(S+eps)) U^T = U diag(S / (S+eps)) U^T,

i.e. the identity in the directions whose variance S is much larger than eps, and shrunk
towards zero in the low-variance (mostly noise) directions that plain whitening (eps = 0)
would blow up. MTT uses eps = 0.1 (Cazenavette et al. 2022, following KIP) and reports it
helps at small IPC on CIFAR.

The fit runs in float64 (the eigenvalues span many orders of magnitude); the stored
matrices are float32, like the images they are applied to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ZCA:
    """A fitted ZCA whitening transform.

    mean:              (D,)    mu, the per-pixel mean of the fitted images
    transform:         (D, D)  W = U diag(1/sqrt(S+eps)) U^T
    inverse_transform: (D, D)  W^-1 = U diag(sqrt(S+eps)) U^T
    eps:               the regulariser added to the eigenvalues S
    """

    mean: Tensor
    transform: Tensor
    inverse_transform: Tensor
    eps: float = 0.1

    # -- fitting ---------------------------------------------------------------------------

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1, chunk_size: int = 4096) -> ZCA:
        """Fit mu and W on images ``x`` of shape (N, C, H, W) (or any (N, ...)).

        The covariance is accumulated in float64 over row chunks of ``chunk_size`` images,
        so a 50000 x 3072 CIFAR training set never needs a second full float64 copy.
        """
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError(f"ZCA.fit needs a batch of at least 2 images (N, ...); got shape {tuple(x.shape)}")
        if not eps > 0:
            raise ValueError(f"ZCA eps must be > 0 (it regularises the eigenvalues S + eps); got {eps}")
        n = x.shape[0]
        device = x.device if x.device.type != "mps" else torch.device("cpu")  # MPS has no float64
        flat = x.reshape(n, -1)  # (N, D)
        d = flat.shape[1]

        # mu = mean_n x_n                                                            (D,)
        mu = torch.zeros(d, dtype=torch.float64, device=device)
        for i in range(0, n, chunk_size):
            mu += flat[i:i + chunk_size].to(device=device, dtype=torch.float64).sum(0)
        mu /= n

        # Sigma = 1/(N-1) sum_n (x_n - mu)^T (x_n - mu)   (unbiased, kornia default)   (D, D)
        sigma = torch.zeros(d, d, dtype=torch.float64, device=device)
        for i in range(0, n, chunk_size):
            xc = flat[i:i + chunk_size].to(device=device, dtype=torch.float64) - mu
            sigma += xc.T @ xc
        sigma /= n - 1

        # Sigma = U diag(S) U^T ; eigh is the SVD of a symmetric PSD matrix. Rounding can make
        # the smallest S a tiny negative number: clamp to 0 (exact PSD value).
        s, u = torch.linalg.eigh(sigma)
        s = s.clamp_min(0.0)

        w = (u * torch.rsqrt(s + eps)) @ u.T       # W    = U diag(1/sqrt(S+eps)) U^T   (D, D)
        w_inv = (u * torch.sqrt(s + eps)) @ u.T    # W^-1 = U diag(sqrt(S+eps)) U^T     (D, D)
        out = x.device
        return cls(
            mean=mu.to(device=out, dtype=torch.float32),
            transform=w.to(device=out, dtype=torch.float32),
            inverse_transform=w_inv.to(device=out, dtype=torch.float32),
            eps=float(eps),
        )

    # -- applying --------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """D = C*H*W, the flattened image size the transform was fitted on."""
        return self.mean.shape[0]

    def _flat(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(
                f"ZCA was fitted on images with D = C*H*W = {self.dim} values; got shape {tuple(x.shape)}"
            )
        return flat

    def __call__(self, x: Tensor) -> Tensor:
        """Whiten: X_zca = (X - mu) W.  x: (N, C, H, W) -> (N, C, H, W)."""
        return ((self._flat(x) - self.mean) @ self.transform).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """Un-whiten: X = X_zca W^-1 + mu.  x: (N, C, H, W) -> (N, C, H, W)."""
        return (self._flat(x) @ self.inverse_transform + self.mean).reshape(x.shape)

    # -- storing ---------------------------------------------------------------------------

    def to_tensors(self) -> dict[str, Tensor]:
        """The fitted state as a flat name -> tensor dict, ready for ``safetensors.torch.save_file``."""
        return {
            "zca.mean": self.mean.contiguous(),
            "zca.transform": self.transform.contiguous(),
            "zca.inverse_transform": self.inverse_transform.contiguous(),
        }

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], eps: float) -> ZCA:
        """Rebuild from ``to_tensors()`` output (eps is metadata, stored by the caller)."""
        keys = ("zca.mean", "zca.transform", "zca.inverse_transform")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"ZCA.from_tensors: missing keys {missing}; expected {list(keys)}")
        return cls(mean=d[keys[0]], transform=d[keys[1]], inverse_transform=d[keys[2]], eps=float(eps))

    def to(self, device) -> ZCA:
        """A copy with every tensor on ``device``."""
        return ZCA(
            mean=self.mean.to(device),
            transform=self.transform.to(device),
            inverse_transform=self.inverse_transform.to(device),
            eps=self.eps,
        )
