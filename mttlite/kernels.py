"""One student step as pure functions, optionally compiled into fused kernels (``torch.compile``).

Both meta-gradient modes need, for a step i on the augmented batch x̃ = A(x_b) (shapes: θ (P,),
x̃ (B, C, H, W), y (B,) or (B, K), λ (P,))::

    grad     (θ, x̃, y)    → g = ∇_θ ℓ(x̃; θ),  ℓ                                    (first order)
    adjoint  (θ, x̃, y, λ) → s = g · λ,  ∇_θ s = H λ,  ∇_x̃ s = (∂g/∂x̃)ᵀ λ  [, ∇_y s]    (second order)

Written with ``torch.func`` (``grad_and_value`` of ℓ, then ``grad_and_value`` of s = g·λ), each is
one traceable function: ``torch.compile`` turns its forward, backward and double backward into a
single graph, fuses the elementwise work of instance norm / ReLU / pooling and their derivatives
into a few loops, and leaves the convolutions to oneDNN / cuDNN. Eagerly, that elementwise work is
dozens of separate passes over activation-sized tensors. On CPU, with the hand-written
derivatives of ``mttlite.layers``, eager is about as fast; ``docs/performance.md`` measures both.
The adjoint traces a copy of the model with torch's own norm and pooling layers
(``mttlite.layers.torch_layers``): compiled, their decompositions keep less memory alive.

Augmentation stays outside the compiled functions: A draws its randomness from a seeded
``torch.Generator`` (so a step can be replayed exactly) and costs little. The gradient that
reaches the pixels is chained through A with ordinary autograd, ∂s/∂x = (∂x̃/∂x)ᵀ ∂s/∂x̃.

``compile=False`` gives the same functions eagerly (``torch.func``); the meta-gradient then uses
plain ``torch.autograd`` instead, which is faster than eager ``torch.func`` on CPU.

``precision`` ("bf16" / "fp16", ``mttlite.precision``) puts the autocast context *inside* the traced
loss, around the network's forward only: compiled, the casts are part of the graph; the backward and
double backward follow the forward's dtypes, and the loss is float32. ``scale`` (fp16 loss scaling):
the loss is multiplied by S inside, ``grad`` returns ∇_θ(S ℓ) / S = g and ``adjoint`` the products of
the scaled gradient, S·(s, H λ, (∂g/∂x̃)ᵀ λ, …); S is a 0-dim tensor, so a new S does not recompile.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value

from .layers import torch_layers
from .params import ParamSpec
from .precision import autocast, check_precision
from .student import cross_entropy


class StepKernels:
    """``grad`` and ``adjoint`` of one student step for one (model, parameter layout).

    Compiled lazily on first use, once per input shape (the last, smaller batch of an epoch
    compiles a second time). Inputs must already be augmented; see the module docstring.
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, compile: bool = True, precision: str = "fp32"):
        self.model, self.spec, self.compiled = model, spec, compile
        self.precision = check_precision(precision)
        # The adjoint traces torch's own norm / pooling layers: compiled, their decompositions fuse
        # into a graph that keeps less alive (exact + compile: 1.6 GB peak RSS instead of 2.5 GB).
        plain = torch_layers(model) if compile else model

        def loss_of(net: nn.Module):
            def loss_fn(theta: Tensor, x_aug: Tensor, y: Tensor, scale: Tensor | None = None):
                with autocast(precision, x_aug.device):  # fp32: no context at all
                    logits = functional_call(net, spec.unflatten(theta), (x_aug,))
                loss = cross_entropy(logits, y)  # ℓ(x̃; θ), float32
                return (loss if scale is None else loss * scale), loss  # (S ℓ, ℓ)
            return loss_fn

        grad_value = grad_and_value(loss_of(model), has_aux=True)  # (θ, x̃, y, S) → (∇(Sℓ), (Sℓ, ℓ))
        grad_value_plain = grad_and_value(loss_of(plain), has_aux=True)  # the same, through torch's layers

        def grad_fn(theta, x_aug, y, scale=None):
            g, (_, loss) = grad_value(theta, x_aug, y, scale)
            return (g if scale is None else g / scale), loss  # (g, ℓ)

        def s_fn(theta, x_aug, y, lam, scale=None):
            g, (_, loss) = grad_value_plain(theta, x_aug, y, scale)
            s = (g * lam).sum()  # s = g · λ (S g · λ when scaled)
            return s, (s, loss)

        def adjoint(theta, x_aug, y, lam, scale=None):
            (d_theta, d_x), (s, loss) = grad(s_fn, argnums=(0, 1), has_aux=True)(theta, x_aug, y, lam, scale)
            return s, loss, d_theta, d_x

        def adjoint_soft(theta, x_aug, y, lam, scale=None):  # soft labels learnt too: ∇_y s as well
            (d_theta, d_x, d_y), (s, loss) = grad(s_fn, argnums=(0, 1, 2), has_aux=True)(theta, x_aug, y, lam, scale)
            return s, loss, d_theta, d_x, d_y

        wrap = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        self._grad, self._adjoint, self._adjoint_soft = wrap(grad_fn), wrap(adjoint), wrap(adjoint_soft)

    @staticmethod
    def _scale(scale: float, like: Tensor) -> Tensor | None:
        """S as a 0-dim float32 tensor on ``like``'s device (made there, no copy), None for S = 1."""
        return None if scale == 1.0 else torch.full((), scale, dtype=torch.float32, device=like.device)

    def grad(self, theta: Tensor, x_aug: Tensor, y: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """(g, ℓ); differentiable by outer autograd (the naive unroll back-propagates through it).
        ``scale``: S, with g computed as ∇_θ(S ℓ) / S."""
        return self._grad(theta, x_aug, y, self._scale(scale, theta))

    def adjoint(self, theta: Tensor, x_aug: Tensor, y: Tensor, lam: Tensor, learn_y: bool = False,
                scale: float = 1.0):
        """(s, ℓ, H λ, (∂g/∂x̃)ᵀ λ) and, with ``learn_y``, (∂g/∂y)ᵀ λ; all detached. ``scale``: S, the
        gradient in them is ∇_θ(S ℓ) (so s and the products are S times those of ``lam``; ℓ is not)."""
        args = (theta.detach(), x_aug.detach(), y.detach(), lam.detach(), self._scale(scale, theta))
        return self._adjoint_soft(*args) if learn_y else self._adjoint(*args)
