"""The meta-gradient ∂L/∂(pixels, labels, α) — two exact ways to compute it.

``unroll``   (the paper's way, the reference): build the whole N-step graph with
             ``create_graph=True`` and call backward. Memory grows linearly with N because every
             step's activations are kept.

``exact``    (reverse-mode adjoint, constant activation memory): the student update is
             θ_{i+1} = θ_i − α g_i with g_i = ∇_θ ℓ_i(θ_i, x). Writing λ_i = ∂L/∂θ_i, the chain rule
             through one step gives, for i = N−1 … 0::

                 λ_N     = ∂L/∂θ_N = 2 (θ_N − θ*_{t+M}) / ‖θ*_t − θ*_{t+M}‖²
                 ∂L/∂x  −= α (∂g_i/∂x)ᵀ λ_{i+1}          (pixels; labels alike)
                 ∂L/∂α  −= g_i · λ_{i+1}
                 λ_i     = λ_{i+1} − α H_i λ_{i+1}        (H_i = ∂g_i/∂θ_i, a Hessian-vector product)

             All three products come from ONE ``autograd.grad`` of the scalar s_i = g_i · λ_{i+1}
             with respect to (θ_i, x_batch, y_batch): ∇_θ s_i = H_i λ_{i+1}, ∇_x s_i = (∂g_i/∂x)ᵀ λ_{i+1}.
             The forward pass keeps only θ_0 … θ_N (N parameter vectors, tiny next to N steps of
             activations) and the StepPlan (batch indices and augmentation seeds) to replay step i
             exactly; step i's graph is rebuilt, used and freed before step i−1. The price is one
             extra forward/backward per step.

This is the *same* gradient as the unroll (not the truncated TESLA one): tests check the two
agree to 1e-6 in float64.

Either mode takes ``kernels`` (:class:`mttlite.kernels.StepKernels`, ``torch.compile``-d
``torch.func`` functions of one step): the same arithmetic with the elementwise work fused. Without
it every step runs eagerly; ``docs/performance.md`` measures which combination is fastest where.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .augment import DSAParams, dsa
from .matching import matching_loss
from .params import ParamSpec
from .student import StepPlan, check_stateless, student_loss, unroll

GRADIENT_MODES = ("unroll", "exact")


@dataclass
class MetaGradient:
    loss: Tensor  # L (detached scalar)
    images: Tensor  # ∂L/∂x, (n_syn, C, H, W)
    labels: Tensor | None  # ∂L/∂y for learnable soft labels, else None
    syn_lr: Tensor  # ∂L/∂α (scalar)
    student_losses: Tensor  # (N,) ℓ at each of the N student steps (on the device; read once per iteration)


def meta_gradient(
    mode: str,
    model: nn.Module,
    spec: ParamSpec,
    theta_start: Tensor,
    theta_target: Tensor,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor,
    plan: StepPlan,
    dsa_strategy: str | None,
    dsa_params: DSAParams = DSAParams(),
    kernels=None,
) -> MetaGradient:
    """L and its gradient w.r.t. ``images``, ``labels`` (if floating and requiring grad) and ``syn_lr``.

    ``theta_start`` = θ*_t and ``theta_target`` = θ*_{t+M} are flat (P,) expert parameters.
    Nothing is accumulated into ``.grad``: the caller decides what to do with the result.
    ``kernels``: optional compiled step functions (see the module docstring).

    Device: everything runs on ``images.device`` (the plan's indices are moved there once) and
    nothing inside the N-step loops reads a value back to the host, so a GPU never waits for the CPU.
    """
    plan = plan.to(images.device)
    args = (model, spec, theta_start, theta_target, images, labels, syn_lr, plan, dsa_strategy, dsa_params, kernels)
    if mode == "unroll":
        return _unroll_gradient(*args)
    if mode == "exact":
        return _adjoint_gradient(*args)
    raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRADIENT_MODES}")


def _learn_labels(labels: Tensor) -> bool:
    return labels.is_floating_point() and labels.requires_grad


def _unroll_gradient(model, spec, theta_start, theta_target, images, labels, syn_lr, plan, dsa_strategy, dsa_params,
                     kernels=None):
    """Reference: back-propagate through the whole N-step second-order graph."""
    x = images.detach().requires_grad_(True)
    y = labels.detach().requires_grad_(True) if _learn_labels(labels) else labels.detach()
    lr = syn_lr.detach().requires_grad_(True)
    res = unroll(model, spec, theta_start, x, y, lr, plan, dsa_strategy, dsa_params, create_graph=True, kernels=kernels)
    loss = matching_loss(res.theta, theta_start, theta_target, check=False)  # den = 0: the caller's check
    inputs = [x, lr] + ([y] if y.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    return MetaGradient(loss.detach(), grads[0], grads[2] if y.requires_grad else None, grads[1], res.losses)


def _adjoint_gradient(model, spec, theta_start, theta_target, images, labels, syn_lr, plan, dsa_strategy, dsa_params,
                      kernels=None):
    """Exact gradient with one step's activations alive at a time (see module docstring)."""
    check_stateless(model)
    x_all, alpha = images.detach(), syn_lr.detach()
    learn_y = _learn_labels(labels)
    y_all = labels.detach()

    # Forward: θ_0 … θ_N, no graph kept beyond one step. They live in ONE block allocated up front
    # (rows padded to 64 floats, so every row is aligned): N separate vectors allocated between the
    # steps' activations would pin heap pages and make peak memory creep up with N.
    N, P = plan.syn_steps, theta_start.numel()
    thetas = theta_start.new_empty(N + 1, -(-P // 64) * 64)[:, :P]
    thetas[0] = theta_start.detach()
    losses = []  # ℓ_i as device tensors (no host sync in the loop)
    for i, (idx, seed) in enumerate(zip(plan.batches, plan.aug_seeds)):
        if kernels is None:
            th = thetas[i].detach().requires_grad_(True)
            loss_i = student_loss(model, spec, th, x_all[idx], y_all[idx], dsa_strategy, seed, dsa_params)
            (g,) = torch.autograd.grad(loss_i, th)
        else:
            with torch.no_grad():
                g, loss_i = kernels.grad(thetas[i], dsa(x_all[idx], dsa_strategy, seed, dsa_params), y_all[idx])
        torch.sub(thetas[i], alpha * g, out=thetas[i + 1])  # θ_{i+1} = θ_i − α g_i
        losses.append(loss_i.detach())

    den = (theta_start - theta_target).pow(2).sum()
    theta_n = thetas[N]
    loss = (theta_n - theta_target).pow(2).sum() / den
    lam = 2 * (theta_n - theta_target) / den  # λ_N = ∂L/∂θ_N

    grad_x = torch.zeros_like(x_all)
    grad_y = torch.zeros_like(y_all) if learn_y else None
    grad_alpha = torch.zeros_like(alpha)
    for i in reversed(range(N)):
        idx, seed = plan.batches[i], plan.aug_seeds[i]
        if kernels is None:
            th = thetas[i].detach().requires_grad_(True)
            xb = x_all[idx].requires_grad_(True)
            yb = y_all[idx].requires_grad_(True) if learn_y else y_all[idx]
            loss_i = student_loss(model, spec, th, xb, yb, dsa_strategy, seed, dsa_params)
            (g,) = torch.autograd.grad(loss_i, th, create_graph=True)
            s = (g * lam).sum()  # s_i = g_i · λ_{i+1}
            # λ_0 = ∂L/∂θ*_t is not needed (the expert's θ is fixed): skip H_0 λ_1 and its convolutions
            wrt = ([th] if i > 0 else []) + [xb] + ([yb] if learn_y else [])
            d = list(torch.autograd.grad(s, wrt))
            if i == 0:
                d.insert(0, None)
        else:  # the same three products, from one compiled function of the augmented batch
            xb = x_all[idx].requires_grad_(True)
            x_aug = dsa(xb, dsa_strategy, seed, dsa_params)
            s, _, *d = kernels.adjoint(thetas[i], x_aug, y_all[idx], lam, learn_y)
            if x_aug is not xb:  # chain through the augmentation: ∂s/∂x = (∂x̃/∂x)ᵀ ∂s/∂x̃
                (d[1],) = torch.autograd.grad(x_aug, xb, d[1])
        grad_x.index_add_(0, idx, -alpha * d[1])  # ∂L/∂x −= α (∂g_i/∂x)ᵀ λ_{i+1}
        if learn_y:
            grad_y.index_add_(0, idx, -alpha * d[2])
        grad_alpha -= s.detach()  # ∂L/∂α −= g_i · λ_{i+1}
        if i > 0:
            lam = lam - alpha * d[0]  # λ_i = λ_{i+1} − α H_i λ_{i+1}
    return MetaGradient(loss.detach(), grad_x, grad_y, grad_alpha, torch.stack(losses))
