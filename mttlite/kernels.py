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
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value

from .layers import torch_layers
from .params import ParamSpec
from .student import cross_entropy


class StepKernels:
    """``grad`` and ``adjoint`` of one student step for one (model, parameter layout).

    Compiled lazily on first use, once per input shape (the last, smaller batch of an epoch
    compiles a second time). Inputs must already be augmented; see the module docstring.
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, compile: bool = True):
        self.model, self.spec, self.compiled = model, spec, compile
        # The adjoint traces torch's own norm / pooling layers: compiled, their decompositions fuse
        # into a graph that keeps less alive (exact + compile: 1.6 GB peak RSS instead of 2.5 GB).
        plain = torch_layers(model) if compile else model

        def loss_of(net: nn.Module):
            def loss_fn(theta: Tensor, x_aug: Tensor, y: Tensor) -> Tensor:
                return cross_entropy(functional_call(net, spec.unflatten(theta), (x_aug,)), y)  # ℓ(x̃; θ)
            return loss_fn

        grad_value = grad_and_value(loss_of(model))  # (θ, x̃, y) → (g, ℓ)
        grad_value_plain = grad_and_value(loss_of(plain))  # the same, through torch's layers

        def s_fn(theta, x_aug, y, lam):
            g, loss = grad_value_plain(theta, x_aug, y)
            s = (g * lam).sum()  # s = g · λ
            return s, (s, loss)

        def adjoint(theta, x_aug, y, lam):
            (d_theta, d_x), (s, loss) = grad(s_fn, argnums=(0, 1), has_aux=True)(theta, x_aug, y, lam)
            return s, loss, d_theta, d_x

        def adjoint_soft(theta, x_aug, y, lam):  # soft labels learnt too: ∇_y s as well
            (d_theta, d_x, d_y), (s, loss) = grad(s_fn, argnums=(0, 1, 2), has_aux=True)(theta, x_aug, y, lam)
            return s, loss, d_theta, d_x, d_y

        wrap = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        self._grad, self._adjoint, self._adjoint_soft = wrap(grad_value), wrap(adjoint), wrap(adjoint_soft)

    def grad(self, theta: Tensor, x_aug: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(g, ℓ); differentiable by outer autograd (the naive unroll back-propagates through it)."""
        return self._grad(theta, x_aug, y)

    def adjoint(self, theta: Tensor, x_aug: Tensor, y: Tensor, lam: Tensor, learn_y: bool = False):
        """(s, ℓ, H λ, (∂g/∂x̃)ᵀ λ) and, with ``learn_y``, (∂g/∂y)ᵀ λ; all detached."""
        args = (theta.detach(), x_aug.detach(), y.detach(), lam.detach())
        return self._adjoint_soft(*args) if learn_y else self._adjoint(*args)
