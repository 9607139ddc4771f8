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

``auto_steps`` (ATT, automatic trajectory length): the student still takes N steps, but is matched
at the step closest to the target::

    n* = argmin_{1≤n≤N} ‖θ̂_n − θ*_{t+M}‖²        L = ‖θ̂_{n*} − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²

(the first n on ties), and the gradient is the exact gradient of that L, i.e. of an n*-step
unroll (n* is piecewise constant in x and α). ``unroll`` keeps θ̂_1 … θ̂_N in the graph and
differentiates the one it picks. ``exact`` runs its forward to N, picks n* on the device and runs
the same N-step backward loop with λ_n = 0 for n > n* and ∂L/∂θ̂_{n*} injected at n = n*::

    λ_n = λ_{n+1} − α H_n λ_{n+1} + [n = n*] · 2 (θ̂_n − θ*_{t+M}) / ‖θ*_t − θ*_{t+M}‖²

so the N − n* steps after n* contribute exact zeros. Starting the loop at n* instead would save
those steps but needs n* on the host: a sync per iteration, which this module never makes.

``mask`` (parameter pruning, ``mttlite.pruning``): m ∈ {0,1}^P, a (P,) bool tensor; L becomes
L_m = ‖m ⊙ (θ̂_N − θ*_{t+M})‖² / ‖m ⊙ (θ*_t − θ*_{t+M})‖² (numerator and denominator) and the
adjoint starts from λ_N = 2 m ⊙ (θ̂_N − θ*_{t+M}) / ‖m ⊙ (θ*_t − θ*_{t+M})‖²; nothing else changes
(the student still steps on every parameter, so λ_i for i < N is dense). With ``auto_steps`` the
closest step is chosen on the masked distance too, n* = argmin_n ‖m ⊙ (θ̂_n − θ*_{t+M})‖²: it is the
step of smallest L_m, the loss being minimised (the unmasked distance could pick a step whose L_m
is larger, steered by the parameters the mask says to ignore). An all-True mask is bit-identical
to none.

Either mode takes ``kernels`` (:class:`mttlite.kernels.StepKernels`, ``torch.compile``-d
``torch.func`` functions of one step): the same arithmetic with the elementwise work fused. Without
it every step runs eagerly; ``docs/performance.md`` measures which combination is fastest where.

``precision`` ("fp32" default, "bf16", "fp16"; ``mttlite.precision``): the student's forward,
backward and double backward (the adjoint's three products included) run under autocast; θ_0 … θ_N,
λ, the pixels, α and every sum over steps stay float32, and "fp32" is bit-identical to no argument.
fp16 adds loss scaling with S = ``loss_scale``: each step's gradient is ∇_θ(S ℓ)/S, the outer
gradient is seeded with S·∂L/∂θ_N (``exact``: λ̃ = S λ; ``unroll``: S²·L is back-propagated), the
double-backward products come out S² times too large and ∂L/∂x, ∂L/∂y, ∂L/∂α are divided by S² in
float32 at the end. Powers of two make this exact: any S gives the same numbers as S = 1 unless a
value over- or underflows. A non-finite result means S was too large (``LossScaler``).
Measured on CPU (torch 2.14, op by op; ``mttlite.precision`` lists it): autocast casts the
convolutions and the linear layer (forward, backward, double backward) to bf16; instance norm runs
mixed (bf16 activations, float32 γ, β and statistics; its derivatives in float32), the loss
(log-softmax, NLL, soft-label cross-entropy: upcast explicitly, since CPU autocast leaves a bare
``log_softmax`` in bf16), the augmentation and every θ / λ / sum update are float32.

What bf16 costs in accuracy, measured against fp32 on the same states and plans
(``benchmarks/precision_gradient.py``, a real Fashion-MNIST-mini distillation, ConvNet-3 width 32,
IPC 1): see ``docs/performance.md`` ("Mixed precision"); ``tests/test_precision.py`` holds a small
ConvNet's bf16 gradient to a cosine ≥ 0.98 with fp32 in both modes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .augment import DSAParams, dsa
from .matching import apply_mask, matching_loss
from .params import ParamSpec
from .precision import check_loss_scale, check_precision
from .student import (
    StepPlan,
    _check_kernels,
    check_stateless,
    scaled_grad,
    student_loss,
    unroll,
)

GRADIENT_MODES = ("unroll", "exact")


@dataclass
class MetaGradient:
    loss: Tensor  # L (detached scalar)
    images: Tensor  # ∂L/∂x, (n_syn, C, H, W)
    labels: Tensor | None  # ∂L/∂y for learnable soft labels, else None
    syn_lr: Tensor  # ∂L/∂α (scalar)
    student_losses: Tensor  # (N,) ℓ at each of the N student steps (on the device; read once per iteration)
    steps: Tensor | None = None  # n*: the student steps L was measured at, a 0-dim int64 device tensor (N without auto_steps)


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
    auto_steps: bool = False,
    precision: str = "fp32",
    loss_scale: float | None = None,
    mask: Tensor | None = None,
) -> MetaGradient:
    """L and its gradient w.r.t. ``images``, ``labels`` (if floating and requiring grad) and ``syn_lr``.

    ``theta_start`` = θ*_t and ``theta_target`` = θ*_{t+M} are flat (P,) expert parameters.
    Nothing is accumulated into ``.grad``: the caller decides what to do with the result.
    ``kernels``: optional compiled step functions (see the module docstring).
    ``auto_steps``: match at n* = argmin_{1≤n≤N} ‖θ̂_n − θ*_{t+M}‖² instead of at N (ATT; module
    docstring); ``MetaGradient.steps`` holds n* (N otherwise).
    ``precision``: "fp32" (default), "bf16" or "fp16" (module docstring); ``kernels`` must have been
    built with the same one. ``loss_scale``: S (a power of two; None: 1) for fp16; the result is
    unscaled, and non-finite when S was too large for fp16 (check, or use ``precision.LossScaler``).
    ``mask``: (P,) bool on θ's device, True where θ is matched (parameter pruning; module docstring);
    None: every parameter.

    Device: everything runs on ``images.device`` (the plan's indices are moved there once) and
    nothing inside the N-step loops reads a value back to the host, so a GPU never waits for the CPU.
    """
    check_precision(precision, images.device)
    scale = check_loss_scale(loss_scale)
    _check_kernels(kernels, precision)
    _check_mask(mask, theta_start)
    plan = plan.to(images.device)
    args = (model, spec, theta_start, theta_target, images, labels, syn_lr, plan, dsa_strategy, dsa_params, kernels,
            auto_steps, precision, scale, mask)
    if mode == "unroll":
        return _unroll_gradient(*args)
    if mode == "exact":
        return _adjoint_gradient(*args)
    raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRADIENT_MODES}")


def _learn_labels(labels: Tensor) -> bool:
    return labels.is_floating_point() and labels.requires_grad


def _check_mask(mask: Tensor | None, theta: Tensor) -> None:
    """A prune mask must be a (P,) bool tensor on θ's device (metadata only: no host read)."""
    if mask is not None and (mask.dtype != torch.bool or mask.shape != theta.shape or mask.device != theta.device):
        raise ValueError(f"mask must be a bool tensor of θ's shape {tuple(theta.shape)} on {theta.device}, "
                         f"got {mask.dtype} of shape {tuple(mask.shape)} on {mask.device}")


def closest_step(path: Tensor, theta_target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ATT's stopping step: i = argmin_n ‖θ̂_n − θ*_{t+M}‖² over the rows of ``path`` (first on ties);
    with a prune ``mask`` (P,) bool, on the masked distance ‖m ⊙ (θ̂_n − θ*_{t+M})‖² (module docstring).

    path: (N, P), row n−1 = θ̂_n (n = 1 … N); theta_target: (P,). Returns (n*, θ̂_{n*}) with
    n* = i + 1 a 0-dim int64 tensor and θ̂_{n*} (P,) a row of ``path`` (in its graph, if any),
    both on the device: no host read.
    """
    dist = apply_mask(path.detach() - theta_target, mask).pow(2).sum(1)  # ‖m ⊙ (θ̂_n − θ*_{t+M})‖², (N,)
    i = dist.argmin().reshape(1)
    return i[0] + 1, path.index_select(0, i)[0]


def _steps_tensor(plan: StepPlan, like: Tensor) -> Tensor:
    """N as a 0-dim int64 tensor on ``like``'s device (made there, not copied from a device value)."""
    return torch.full((), plan.syn_steps, dtype=torch.int64, device=like.device)


def _unroll_gradient(model, spec, theta_start, theta_target, images, labels, syn_lr, plan, dsa_strategy, dsa_params,
                     kernels=None, auto_steps=False, precision="fp32", scale=1.0, mask=None):
    """Reference: back-propagate through the whole N-step second-order graph (with ``auto_steps``:
    through θ̂_{n*}, picked from the path θ̂_1 … θ̂_N kept in the graph)."""
    x = images.detach().requires_grad_(True)
    y = labels.detach().requires_grad_(True) if _learn_labels(labels) else labels.detach()
    lr = syn_lr.detach().requires_grad_(True)
    res = unroll(model, spec, theta_start, x, y, lr, plan, dsa_strategy, dsa_params, create_graph=True, kernels=kernels,
                 return_path=auto_steps, path_graph=True, precision=precision, loss_scale=scale)
    if auto_steps:
        steps, theta = closest_step(torch.stack(res.path[1:]), theta_target, mask)  # n*, θ̂_{n*}
    else:
        steps, theta = _steps_tensor(plan, x), res.theta
    loss = matching_loss(theta, theta_start, theta_target, check=False, mask=mask)  # den = 0: the caller's check
    inputs = [x, lr] + ([y] if y.requires_grad else [])
    if scale == 1.0:
        grads = torch.autograd.grad(loss, inputs)
    else:  # the double backward of every step sees S·(its true cotangent): back-propagate S²·L, then unscale
        grads = [g / (scale * scale) for g in torch.autograd.grad(loss * (scale * scale), inputs)]
    return MetaGradient(loss.detach(), grads[0], grads[2] if y.requires_grad else None, grads[1], res.losses, steps)


def _adjoint_gradient(model, spec, theta_start, theta_target, images, labels, syn_lr, plan, dsa_strategy, dsa_params,
                      kernels=None, auto_steps=False, precision="fp32", scale=1.0, mask=None):
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
            loss_i = student_loss(model, spec, th, x_all[idx], y_all[idx], dsa_strategy, seed, dsa_params, precision)
            g = scaled_grad(loss_i, th, scale)  # ∇_θ(S ℓ_i) / S
        else:
            with torch.no_grad():
                g, loss_i = kernels.grad(thetas[i], dsa(x_all[idx], dsa_strategy, seed, dsa_params), y_all[idx], scale)
        torch.sub(thetas[i], alpha * g, out=thetas[i + 1])  # θ_{i+1} = θ_i − α g_i
        losses.append(loss_i.detach())

    den = apply_mask(theta_start - theta_target, mask).pow(2).sum()  # ‖m ⊙ (θ*_t − θ*_{t+M})‖² (m = 1 without a mask)
    if auto_steps:  # ATT: L at n*; λ_n = 0 after n*, ∂L/∂θ_{n*} injected at n* (module docstring)
        steps, theta_n = closest_step(thetas[1:], theta_target, mask)
        inject = 2 * apply_mask(theta_n - theta_target, mask) / den  # ∂L/∂θ_{n*} = 2 m ⊙ (θ_{n*} − θ*_{t+M}) / den
        at = (torch.arange(N + 1, device=steps.device) == steps).to(inject.dtype)  # [n = n*], (N+1,)
        lam = at[N] * inject  # λ_N
    else:
        steps, theta_n = _steps_tensor(plan, x_all), thetas[N]
        lam = 2 * apply_mask(theta_n - theta_target, mask) / den  # λ_N = ∂L/∂θ_N = 2 m ⊙ (θ_N − θ*_{t+M}) / den
    loss = apply_mask(theta_n - theta_target, mask).pow(2).sum() / den  # L = ‖m ⊙ (θ_N − θ*_{t+M})‖² / den
    if scale != 1.0:  # loss scaling: λ̃ = S λ from here on (module docstring)
        lam = lam * scale
        if auto_steps:
            inject = inject * scale

    grad_x = torch.zeros_like(x_all)
    grad_y = torch.zeros_like(y_all) if learn_y else None
    grad_alpha = torch.zeros_like(alpha)
    for i in reversed(range(N)):
        idx, seed = plan.batches[i], plan.aug_seeds[i]
        if kernels is None:
            th = thetas[i].detach().requires_grad_(True)
            xb = x_all[idx].requires_grad_(True)
            yb = y_all[idx].requires_grad_(True) if learn_y else y_all[idx]
            loss_i = student_loss(model, spec, th, xb, yb, dsa_strategy, seed, dsa_params, precision)
            (g,) = torch.autograd.grad(loss_i if scale == 1.0 else loss_i * scale, th, create_graph=True)  # S g_i
            s = (g * lam).sum()  # s_i = g_i · λ_{i+1} (scaled: S g_i · S λ_{i+1} = S² s_i)
            # λ_0 = ∂L/∂θ*_t is not needed (the expert's θ is fixed): skip H_0 λ_1 and its convolutions
            wrt = ([th] if i > 0 else []) + [xb] + ([yb] if learn_y else [])
            d = list(torch.autograd.grad(s, wrt))
            if i == 0:
                d.insert(0, None)
        else:  # the same three products, from one compiled function of the augmented batch
            xb = x_all[idx].requires_grad_(True)
            x_aug = dsa(xb, dsa_strategy, seed, dsa_params)
            s, _, *d = kernels.adjoint(thetas[i], x_aug, y_all[idx], lam, learn_y, scale)
            if x_aug is not xb:  # chain through the augmentation: ∂s/∂x = (∂x̃/∂x)ᵀ ∂s/∂x̃
                (d[1],) = torch.autograd.grad(x_aug, xb, d[1])
        grad_x.index_add_(0, idx, -alpha * d[1])  # ∂L/∂x −= α (∂g_i/∂x)ᵀ λ_{i+1}
        if learn_y:
            grad_y.index_add_(0, idx, -alpha * d[2])
        grad_alpha -= s.detach()  # ∂L/∂α −= g_i · λ_{i+1}
        if i > 0:
            # λ_i = λ_{i+1} − α H_i λ_{i+1} (scaled: H λ̃ came out S² H λ, so one S is taken off: λ̃_i = S λ_i)
            lam = lam - alpha * (d[0] if scale == 1.0 else d[0] / scale)
            if auto_steps:
                lam = lam + at[i] * inject  # + [i = n*] ∂L/∂θ_i
    if scale != 1.0:  # the sums hold S² × the gradient: unscale, in float32, once
        inv = 1.0 / (scale * scale)
        grad_x, grad_alpha = grad_x * inv, grad_alpha * inv
        grad_y = grad_y * inv if learn_y else None
    return MetaGradient(loss.detach(), grad_x, grad_y, grad_alpha, torch.stack(losses), steps)
