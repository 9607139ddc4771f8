"""Stage 2 — the unrolled student.

The student starts on the expert's trajectory, θ̂_0 = θ*_t, and trains on the synthetic set for
N = ``syn_steps`` plain SGD steps with the learnable learning rate α = ``syn_lr`` (paper, Eq. 1)::

    θ̂_{n+1} = θ̂_n − α ∇_θ ℓ(A(D_syn,n); θ̂_n)

where D_syn,n is the n-th mini-batch of ``batch_syn`` synthetic images (the set is reshuffled
whenever it is used up, as in the authors' code) and A is differentiable augmentation (DSA).

With ``create_graph=True`` every gradient is itself part of the autograd graph, so θ̂_N is a
differentiable function of the pixels, the labels and α: back-propagating the matching loss
through this loop is the second-order "naive unroll", whose memory grows linearly with N
(see ``meta_gradient.py`` for the exact constant-memory alternative).

All randomness of one unroll (which images form each batch, which augmentation each batch gets)
is drawn *before* the unroll into a :class:`StepPlan`, so the same steps can be replayed exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .augment import DSAParams, dsa
from .opcount import host
from .params import ParamSpec
from .precision import autocast, check_loss_scale, check_precision, upcast


@dataclass(frozen=True)
class StepPlan:
    """The randomness of one unroll: batch ``n`` is ``images[batches[n]]``, augmented with ``aug_seeds[n]``."""

    batches: tuple[Tensor, ...]  # N index tensors, each (batch_syn,) or smaller at the end of an epoch
    aug_seeds: tuple[int, ...]  # N ints

    @property
    def syn_steps(self) -> int:
        return len(self.batches)

    def to(self, device) -> "StepPlan":
        """The same plan with its index tensors on ``device``, moved in ONE host-to-device copy.

        ``make_plan`` draws on a CPU generator (same seed, same plan on every device); indexing a
        GPU tensor with a CPU index would fail (``index_add_``) or copy the index at every step.
        """
        device = torch.device(device)
        if all(b.device == device for b in self.batches):
            return self
        sizes = [len(b) for b in self.batches]
        moved = torch.cat(self.batches).to(device).split(sizes)
        return StepPlan(tuple(moved), self.aug_seeds)


def make_plan(n_syn: int, syn_steps: int, batch_syn: int | None, generator: torch.Generator) -> StepPlan:
    """Draw the batches and augmentation seeds of ``syn_steps`` student steps.

    As in MTT: a random permutation of the ``n_syn`` images is split into chunks of
    ``batch_syn`` (``None`` = all images every step); chunks are consumed from the end and a new
    permutation is drawn when they run out.
    """
    if syn_steps < 1:
        raise ValueError(f"syn_steps (N) must be >= 1, got {syn_steps}")
    batch_syn = n_syn if batch_syn is None else batch_syn
    if not 1 <= batch_syn <= n_syn:
        raise ValueError(f"batch_syn must be between 1 and the synthetic set size {n_syn}, got {batch_syn}")
    chunks: list[Tensor] = []
    batches = []
    with host():  # drawn on the CPU generator: no device work (mttlite.opcount)
        for _ in range(syn_steps):
            if not chunks:
                chunks = list(torch.split(torch.randperm(n_syn, generator=generator), batch_syn))
            batches.append(chunks.pop())
        seeds = torch.randint(0, 2**31 - 1, (syn_steps,), generator=generator).tolist()
    return StepPlan(tuple(batches), tuple(int(s) for s in seeds))


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """ℓ = mean cross-entropy; ``labels`` are class indices (B,) or soft targets (B, K).

    Logits that autocast made bf16 / fp16 are turned to float32 first: the loss is never computed in
    low precision (on a CPU autocast would leave ``log_softmax`` in bf16, ``mttlite.precision``)."""
    logits = upcast(logits)
    if labels.is_floating_point():
        return -(labels * F.log_softmax(logits, dim=1)).sum(1).mean()
    return F.cross_entropy(logits, labels)


def student_loss(
    model: nn.Module,
    spec: ParamSpec,
    theta: Tensor,
    x: Tensor,
    y: Tensor,
    dsa_strategy: str | None,
    aug_seed: int,
    dsa_params: DSAParams = DSAParams(),
    precision: str = "fp32",
) -> Tensor:
    """ℓ(A(x); θ): the student's training loss on one (augmented) synthetic batch.

    theta: (P,) flat parameters; x: (B, C, H, W); y: (B,) or (B, K).
    ``precision``: "bf16" / "fp16" run the network's forward under autocast (its backward follows);
    the augmentation and the loss stay float32 (``mttlite.precision``).
    """
    x = dsa(x, dsa_strategy, seed=aug_seed, params=dsa_params)
    with autocast(precision, x.device):
        logits = functional_call(model, spec.unflatten(theta), (x,))
    return cross_entropy(logits, y)


def scaled_grad(loss: Tensor, theta: Tensor, loss_scale: float = 1.0, create_graph: bool = False) -> Tensor:
    """∇_θ ℓ through a loss-scaled backward, ∇_θ(S ℓ) / S (the division in float32; exact for S a power
    of two). S = 1: plain ``autograd.grad``, the same ops as without scaling."""
    if loss_scale == 1.0:
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]
    (g,) = torch.autograd.grad(loss * loss_scale, theta, create_graph=create_graph)
    return g / loss_scale


def check_stateless(model: nn.Module) -> None:
    """The student is a pure function of θ: networks with running statistics cannot be unrolled."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise ValueError(
            f"the student network has buffers {buffers[:3]} (e.g. batch-norm running statistics); "
            "MTT distils with networks that have none: use norm='instancenorm' (the paper's ConvNet)"
        )


def _check_kernels(kernels, precision: str) -> None:
    """Compiled step functions carry their precision (it is traced into them): it must be this one."""
    if kernels is not None and getattr(kernels, "precision", "fp32") != precision:
        raise ValueError(f"the step kernels were built for precision {kernels.precision!r}, not {precision!r}: "
                         f"build them with StepKernels(..., precision={precision!r})")


@dataclass
class UnrollResult:
    theta: Tensor  # θ̂_N, (P,)
    path: list[Tensor] | None  # [θ̂_0, ..., θ̂_N] when requested (detached unless ``path_graph``)
    losses: Tensor  # (N,) student training loss ℓ at each step, detached, on the device (read it once)


def unroll(
    model: nn.Module,
    spec: ParamSpec,
    theta0: Tensor,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor | float,
    plan: StepPlan,
    dsa_strategy: str | None,
    dsa_params: DSAParams = DSAParams(),
    create_graph: bool = True,
    return_path: bool = False,
    kernels=None,
    path_graph: bool = False,
    precision: str = "fp32",
    loss_scale: float | None = None,
) -> UnrollResult:
    """Take N = ``plan.syn_steps`` SGD steps from θ̂_0 = ``theta0`` on the synthetic set.

    θ̂_{n+1} = θ̂_n − α ∇_θ ℓ(A(x_{b_n}); θ̂_n)

    images: (n_syn, C, H, W); labels: (n_syn,) int or (n_syn, K) float; syn_lr: α (scalar tensor).
    With ``create_graph=True`` the returned θ̂_N carries the full second-order graph back to
    ``images``, ``labels`` (if they require grad) and ``syn_lr``.
    ``kernels`` (a :class:`mttlite.kernels.StepKernels`) computes each ∇_θ ℓ with compiled
    kernels instead of eager autograd: the same steps, fused.
    ``return_path``: also return [θ̂_0, …, θ̂_N], detached, or with ``path_graph`` each θ̂_n still
    in the graph (what the automatic-N meta-gradient differentiates through, ``meta_gradient.py``).
    ``precision``: "fp32" (default), "bf16" or "fp16": the network runs under autocast, θ̂_n and every
    update stay float32 (``mttlite.precision``); ``kernels`` must have been built with the same one.
    ``loss_scale``: S for fp16, each ∇_θ ℓ computed as ∇_θ(S ℓ) / S (None: 1, no scaling).
    """
    check_stateless(model)
    check_precision(precision, images.device)
    scale = check_loss_scale(loss_scale)
    _check_kernels(kernels, precision)
    plan = plan.to(images.device)
    theta = theta0.detach().requires_grad_(True)
    path = [theta.detach()] if return_path else None
    losses = []  # kept as device tensors: no host sync inside the loop
    for idx, seed in zip(plan.batches, plan.aug_seeds):
        if kernels is None:
            loss = student_loss(model, spec, theta, images[idx], labels[idx], dsa_strategy, seed, dsa_params, precision)
            grad = scaled_grad(loss, theta, scale, create_graph)
        else:
            with torch.set_grad_enabled(create_graph):
                x_aug = dsa(images[idx], dsa_strategy, seed=seed, params=dsa_params)
                grad, loss = kernels.grad(theta, x_aug, labels[idx], scale)
        theta = theta - syn_lr * grad  # θ̂_{n+1} = θ̂_n − α g_n
        if not create_graph:
            theta = theta.detach().requires_grad_(True)
        losses.append(loss.detach())
        if path is not None:
            path.append(theta if path_graph else theta.detach())
    return UnrollResult(theta, path, torch.stack(losses))
