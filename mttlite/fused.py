"""The fused student step: one compiled graph per student step, and on a GPU the N steps as one CUDA graph.

Eagerly, one student step of the exact mode is a few hundred small operations (the network's
forward, backward and double backward, DSA, the updates of θ and λ), each a separate kernel on a
GPU. With 10 images of 28 × 28 a kernel finishes before the host has launched the next, so the
GPU waits on Python (``docs/performance.md``). Here each step of the two sweeps of the exact
meta-gradient (``meta_gradient.py``) is ONE function, traced and compiled by ``torch.compile``
(``fullgraph=True, dynamic=False``: no graph break, one shape)::

    forward step i   (θ_i, x, y, b_i, ω_i, w_i, α)             → θ_{i+1} = θ_i − α ∇_θ ℓ_i,  ℓ_i
    adjoint step i   (θ_i, x, y, b_i, ω_i, w_i, α, λ_{i+1},     → λ_i = λ_{i+1} − α H_i λ_{i+1} + [i = n*] ∂L/∂θ_{n*},
                      ∂L/∂x, ∂L/∂y, ∂L/∂α, [i = n*], ∂L/∂θ_{n*})  ∂L/∂x − α (∂g_i/∂x)ᵀ λ_{i+1},  ∂L/∂y − α (∂g_i/∂y)ᵀ λ_{i+1},
                                                                 ∂L/∂α − g_i · λ_{i+1}

where x (n, C, H, W) and y are the whole synthetic set, b_i (B,) the batch's indices, ω_i (B, K)
its DSA draws as data (``mttlite.omega``: no Python branch, no host draw) and w_i (B,) the weight
of each sample in the batch loss, ℓ_i = Σ_b w_ib CE(f(A_ω(x_b); θ_i), y_b), w = 1/B. A last,
smaller batch (``batch_syn`` not dividing n) is padded to B with copies of image b = 0 at weight 0:
every network here treats samples independently (instance norm, no batch norm), so a padded
sample changes nothing, and one shape serves every step.

(ATT's n* and its injection, ``meta_gradient.py``, are data too: without ``auto_steps`` the indicator is 0.)
The unroll mode uses the forward step's gradient ∇_θ ℓ_i as one compiled function under ordinary
autograd (its double backward compiled by AOTAutograd). The functions are pure (θ is an argument), so
every :class:`FusedStep` of the same network shares them and their compiled graphs (:class:`StepFunctions`).

**What is traced.** A copy of the network (:func:`fusable`) with torch's own instance norm
(``nn.GroupNorm``), 2 × 2 average pooling as a reshape and a mean (its derivatives are views and
broadcasts, which the compiler fuses), and, on a CPU, the first convolution with 1–3 input
channels as an im2col matrix product (oneDNN runs a 1-channel convolution at ~6 GFLOP/s against
~150 for the others: it was the costliest layer of a classroom-size step). Same parameters, same
names, same function up to float rounding: ``tests/test_fused.py`` holds the fused meta-gradient to
the eager one in float64 (both modes, DSA, soft labels, a prune mask, ATT's n*) and float32.

**On CUDA** (``cuda_graphs``, default on) the whole meta-gradient — N forward steps, the loss, N
adjoint steps — is captured once per shape as a CUDA graph and replayed: every iteration copies its
inputs (θ*_t, θ*_{t+M}, the pixels, labels, α, the batches' indices, ω and weights, the mask) into
static buffers, replays, and clones the results. Nothing in the graph reads a value back to the host;
the distillation loop's one read per iteration stays outside it.
"""
from __future__ import annotations

import copy
import math
import os
import time
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value

from .augment import DSAParams
from .layers import torch_layers
from .matching import apply_mask
from .meta_gradient import GRADIENT_MODES, MetaGradient, _check_mask, _learn_labels, closest_step
from .omega import apply_omega, plan_omega
from .opcount import host
from .params import ParamSpec
from .precision import autocast, check_loss_scale, check_precision, upcast
from .student import StepPlan, check_stateless

#: The student-step implementations, and ``DistillConfig.step``'s choices ("auto" picks one of them).
STEPS = ("eager", "fused")
STEP_CHOICES = ("auto",) + STEPS


# ----------------------------------------------------------------------------------------------
# "auto": which step is faster for a run on a CPU, compiling included
# ----------------------------------------------------------------------------------------------
#: The cost model of ``choose_step`` on a CPU: the seconds the fused step saves per student step of the exact
#: mode, (eager − fused), against F, the forward GFLOP of one batch (ConvNet-3 widths 8–128, IPC 1–10), and the
#: seconds its compile takes. Measured with ``python benchmarks/step_cost.py`` on the project's 2-core CPU
#: (docs/performance.md); between the points the saving is interpolated in log F, beyond them held.
CPU_STEP_SAVING = ((0.005, 0.0064), (0.065, 0.0110), (0.650, 0.0365), (2.479, 0.0674), (9.677, 0.1162))
CPU_COMPILE_S = 42.0


def cpu_step_saving(gflop: float) -> float:
    """Seconds the fused step is estimated to save per student step on a CPU, for a batch of ``gflop``."""
    pts = CPU_STEP_SAVING
    if gflop <= pts[0][0]:
        return pts[0][1]
    for (f0, s0), (f1, s1) in zip(pts, pts[1:]):
        if gflop <= f1:
            w = (math.log(gflop) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return s0 + w * (s1 - s0)
    return pts[-1][1]


def forward_gflop(model: nn.Module, shape: tuple[int, ...], batch: int) -> float:
    """F: multiply-adds × 2 of the conv and linear layers of one forward over ``batch`` images of ``shape``."""
    flops = 0

    def hook(m, inp, out):
        nonlocal flops
        if isinstance(m, nn.Conv2d):
            flops += 2 * out[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        elif isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return flops * batch / 1e9


def choose_step(step: str, device, student_steps: int, gflop: float, texture: bool = False,
                compile: bool = False) -> tuple[str, str]:
    """("eager" | "fused", why): ``step`` itself unless it is "auto". "auto": eager where the fused step cannot
    run (texture canvases, ``compile=True``'s own compiled step, devices other than CPU and CUDA), fused on CUDA,
    and on a CPU fused only when the time it saves over the run's ``student_steps`` (iterations × N × samples)
    exceeds the time to compile it, by the cost model above (``gflop``: :func:`forward_gflop` of one batch)."""
    if step not in STEP_CHOICES:
        raise ValueError(f"step must be one of {STEP_CHOICES}, got {step!r}")
    if step != "auto":
        return step, "set"
    dev = torch.device(device)
    if texture:
        return "eager", "texture canvases are augmented by eager DSA"
    if compile:
        return "eager", "compile=True compiles the eager step"
    if dev.type == "cuda":
        return "fused", "CUDA: the N steps replayed as one CUDA graph"
    if dev.type != "cpu":
        return "eager", f"no fused step on {dev.type}"
    each = cpu_step_saving(gflop)
    saved = student_steps * each
    choice = "fused" if saved > CPU_COMPILE_S else "eager"
    return choice, (f"CPU: {student_steps} student steps × ~{1000 * each:.0f} ms saved each ≈ {saved:.0f} s "
                    f"{'>' if choice == 'fused' else '≤'} ~{CPU_COMPILE_S:.0f} s to compile")


# ----------------------------------------------------------------------------------------------
# The network as the compiler should see it
# ----------------------------------------------------------------------------------------------
class MeanPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` as view + mean: x (B, C, H, W) → (B, C, H/2, W/2) (odd sizes: torch's kernel)."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            return F.avg_pool2d(x, 2)
        return x.view(B, C, H // 2, 2, W // 2, 2).mean((3, 5))


class Im2colConv2d(nn.Conv2d):
    """A stride-1 convolution with few input channels as one matrix product over its patches::

        out[b, o, p] = Σ_k W[o, k] · X[b, k, p] + bias[o],   X (B, C·kh·kw, H'·W'): the shifted copies of x

    Same parameters and names as the ``nn.Conv2d`` it replaces; for the first layer of a ConvNet on
    1- or 3-channel images (9 or 27 columns), where oneDNN's direct convolution is slow."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "Im2colConv2d":
        new = copy.deepcopy(conv)
        new.__class__ = cls
        return new

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        O, _, kh, kw = self.weight.shape
        ph, pw = self.padding
        xp = F.pad(x, [pw, pw, ph, ph])
        Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
        cols = torch.stack([xp[:, :, i:i + Ho, j:j + Wo] for i in range(kh) for j in range(kw)], 2)  # (B, C, k, Ho, Wo)
        out = torch.matmul(self.weight.reshape(O, C * kh * kw), cols.reshape(B, C * kh * kw, Ho * Wo))  # (B, O, Ho·Wo)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(B, O, Ho, Wo)


def _im2col_ok(conv: nn.Conv2d) -> bool:
    return (type(conv) is nn.Conv2d and conv.in_channels <= 3 and conv.groups == 1 and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros")


def fusable(model: nn.Module, device="cpu") -> nn.Module:
    """A copy of ``model`` for tracing (module docstring): torch's own norm layers, pooling as view + mean,
    and on a CPU the few-channel convolutions as im2col products. Same parameter names and shapes."""
    model = torch_layers(model)
    cpu = torch.device(device).type == "cpu"
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.AvgPool2d and child.kernel_size in (2, (2, 2)) and child.stride in (2, (2, 2)) \
                    and child.padding in (0, (0, 0)):
                setattr(module, name, MeanPool2x2())
            elif cpu and isinstance(child, nn.Conv2d) and _im2col_ok(child):
                setattr(module, name, Im2colConv2d.from_conv(child))
    return model


# ----------------------------------------------------------------------------------------------
# The batches of a plan as data
# ----------------------------------------------------------------------------------------------
@dataclass
class PlanData:
    """A :class:`StepPlan` as three tensors of fixed shape (every batch padded to ``batch``).

    index (N, B) int64: batch i's images (padding: image 0); weight (N, B): 1/|batch i| for its images, 0 for
    padding; omega (N, B, K): DSA's draws (``mttlite.omega``; padding rows: the identity)."""

    index: Tensor
    weight: Tensor
    omega: Tensor

    def to(self, device, non_blocking: bool = False) -> "PlanData":
        return PlanData(*(t.to(device, non_blocking=non_blocking) for t in (self.index, self.weight, self.omega)))


def plan_data(plan: StepPlan, batch: int, strategy: str | None, im_size: tuple[int, int], params: DSAParams,
              dtype: torch.dtype, pin: bool = False) -> PlanData:
    """The plan's batches padded to ``batch`` images, their weights and ω, on the CPU (``pin``: page-locked)."""
    with host():  # all on the host (mttlite.opcount)
        return _plan_data(plan, batch, strategy, im_size, params, dtype, pin)


def _plan_data(plan, batch, strategy, im_size, params, dtype, pin) -> PlanData:
    N = plan.syn_steps
    index = torch.zeros(N, batch, dtype=torch.int64)
    weight = torch.zeros(N, batch, dtype=dtype)
    omegas = []
    for i, (b, seed) in enumerate(zip(plan.batches, plan.aug_seeds)):
        n = len(b)
        if not 1 <= n <= batch:
            raise ValueError(f"step {i} of the plan has {n} images; the fused step was built for batches of at most {batch}")
        index[i, :n] = b.cpu()
        weight[i, :n] = 1.0 / n
        om = plan_omega(strategy, [seed], n, im_size, params, dtype)[0]  # (n, K): the draws of an n-image batch
        if n < batch:
            om = torch.cat([om, plan_omega(None, [0], batch - n, im_size, params, dtype)[0]])  # identity rows
        omegas.append(om)
    data = PlanData(index, weight, torch.stack(omegas))
    if pin:
        data = PlanData(*(t.pin_memory() for t in (data.index, data.weight, data.omega)))
    return data


# ----------------------------------------------------------------------------------------------
# The compiled step functions
# ----------------------------------------------------------------------------------------------
def _compiler_missing(err: Exception) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("InvalidCxxCompiler", "No working C++ compiler", "CppCompileError", "g++"))


class StepFunctions:
    """The traced step functions of one network (module docstring): pure, tensors in and tensors out, so
    every :class:`FusedStep` of the same network, precision and DSA ranges shares them — and their
    compiled graphs (``shared_step_functions``)."""

    def __init__(self, net: nn.Module, spec: ParamSpec, dsa_params: DSAParams, precision: str, device, compile: bool):
        self.net, self.spec, self.dsa_params, self.precision = net, spec, dsa_params, precision
        # On a CPU: the graph's wrapper is generated in C++ (the Python one cost ~2 ms per student step of the
        # classroom size, a sixth of it), and its kernels record themselves for torch.profiler (mttlite.opcount
        # counts them; with no profiler running a record costs a flag test).
        options = ({"cpp_wrapper": True, "cpp.enable_kernel_profile": True} if torch.device(device).type == "cpu"
                   else None)

        def wrap(method):
            if not compile:
                return method
            # Each StepFunctions compiles its OWN copy of the method's code: torch.compile caches graphs per code
            # object and allows 8 per object (with fullgraph=True a ninth is an error), so networks sharing one
            # code object would run out after 8 networks or shapes in a process.
            f = method.__func__
            own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
            return torch.compile(types.MethodType(own, self), fullgraph=True, dynamic=False, options=options)

        self.forward, self.grad = wrap(self._forward_step), wrap(self._grad_step)
        self.adjoint, self.adjoint_y = wrap(self._adjoint_step), wrap(self._adjoint_step_y)

    # -- the traced functions (pure: tensors in, tensors out) -------------------------------------
    def _loss(self, theta, x_b, omega_b, y_b, w_b, scale):
        """(S ℓ, ℓ): ℓ = Σ_b w_b CE(f(A_ω(x_b); θ), y_b), in float32 (or float64); S = ``scale`` or 1."""
        x_aug = apply_omega(x_b, omega_b, self.dsa_params)
        with autocast(self.precision, x_aug.device):
            logits = functional_call(self.net, self.spec.unflatten(theta), (x_aug,))
        logits = upcast(logits)
        if y_b.is_floating_point():  # soft labels: −Σ_k y_k log softmax(f)_k
            ce = -(y_b * F.log_softmax(logits, dim=1)).sum(1)
        else:
            ce = F.cross_entropy(logits, y_b, reduction="none")
        loss = (ce * w_b.to(ce.dtype)).sum()
        return (loss if scale is None else loss * scale), loss

    def _grad_step(self, theta, x, y, index, omega, weight, scale=None):
        """(g, ℓ) of one batch: g = ∇_θ ℓ (computed as ∇_θ(S ℓ) / S)."""
        g, (_, loss) = grad_and_value(self._loss, has_aux=True)(theta, x[index], omega, y[index], weight, scale)
        return (g if scale is None else g / scale), loss

    def _forward_step(self, theta, x, y, index, omega, weight, alpha, scale=None):
        """(θ − α g, ℓ)."""
        g, loss = self._grad_step(theta, x, y, index, omega, weight, scale)
        return theta - alpha * g, loss

    def _products(self, theta, x, y, index, omega, weight, lam, scale, learn_y):
        """s = g·λ (S g·λ when scaled), and its gradients w.r.t. θ, the batch's pixels (and labels)."""
        def s_fn(th, x_b, y_b):
            g, (_, loss) = grad_and_value(self._loss, has_aux=True)(th, x_b, omega, y_b, weight, scale)
            s = (g * lam).sum()
            return s, (s, loss)
        argnums = (0, 1, 2) if learn_y else (0, 1)
        return grad(s_fn, argnums=argnums, has_aux=True)(theta, x[index], y[index])

    def _adjoint_update(self, d, s, lam, alpha, grad_x, grad_alpha, index, at_i, inject, scale):
        lam_next = lam - alpha * (d[0] if scale is None else d[0] / scale) + at_i * inject
        grad_x = grad_x.index_add(0, index, -alpha * d[1])  # ∂L/∂x −= α (∂g_i/∂x)ᵀ λ_{i+1}
        return lam_next, grad_x, (grad_alpha - s).to(grad_alpha.dtype)  # ∂L/∂α −= g_i · λ_{i+1} (in α's dtype)

    def _adjoint_step(self, theta, x, y, index, omega, weight, alpha, lam, grad_x, grad_alpha, at_i, inject, scale=None):
        """(λ_i, ∂L/∂x, ∂L/∂α) after step i (module docstring); hard or frozen labels."""
        d, (s, _) = self._products(theta, x, y, index, omega, weight, lam, scale, False)
        return self._adjoint_update(d, s, lam, alpha, grad_x, grad_alpha, index, at_i, inject, scale)

    def _adjoint_step_y(self, theta, x, y, index, omega, weight, alpha, lam, grad_x, grad_y, grad_alpha, at_i, inject,
                        scale=None):
        """The same, with learned soft labels: also ∂L/∂y −= α (∂g_i/∂y)ᵀ λ_{i+1}."""
        d, (s, _) = self._products(theta, x, y, index, omega, weight, lam, scale, True)
        lam_next, grad_x, grad_alpha = self._adjoint_update(d, s, lam, alpha, grad_x, grad_alpha, index, at_i,
                                                            inject, scale)
        return lam_next, grad_x, grad_y.index_add(0, index, -alpha * d[2]), grad_alpha

_SHARED: dict = {}


def shared_step_functions(model: nn.Module, spec: ParamSpec, dsa_params: DSAParams, precision: str, device,
                          compile: bool) -> StepFunctions:
    """The :class:`StepFunctions` of ``model``'s architecture (its ``repr`` and parameter layout), made once per
    process: a second distillation of the same network compiles nothing new."""
    net = fusable(model, device)
    key = (repr(net), spec, dsa_params, precision, str(torch.device(device)), compile)
    if key not in _SHARED:
        _SHARED[key] = StepFunctions(net.to(device), spec, dsa_params, precision, device, compile)
    return _SHARED[key]


class FusedStep:
    """The fused meta-gradient for one (network, synthetic-set shape, batch size, DSA strategy, precision).

    ``meta_gradient`` has the signature and the result of :func:`mttlite.meta_gradient.meta_gradient`.
    ``compile=False`` runs the same step functions eagerly (``torch.func``): what the ``meta`` device
    tests use, and the float64 reference of the compiled graphs. ``cuda_graphs``: capture and replay on
    CUDA (None: on for CUDA unless ``MTTLITE_CUDA_GRAPHS=0``).
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, *, batch: int, im_size: tuple[int, int],
                 dsa_strategy: str | None, dsa_params: DSAParams = DSAParams(), precision: str = "fp32",
                 device="cpu", compile: bool = True, cuda_graphs: bool | None = None):
        check_stateless(model)
        if dsa_params.texture_crop is not None:
            raise ValueError("texture distillation (texture_canvas) runs with step='eager' only: its canvases are "
                             "cropped by eager DSA")
        self.device = torch.device(device)
        self.precision = check_precision(precision, self.device)
        self.spec, self.batch, self.im_size = spec, int(batch), tuple(im_size)
        self.dsa_strategy, self.dsa_params = dsa_strategy, dsa_params
        self.fn = shared_step_functions(model, spec, dsa_params, self.precision, self.device, compile)
        self.compiled = compile
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and os.environ.get("MTTLITE_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.compile_seconds = 0.0
        self._graphs: dict = {}

    # -- the meta-gradient ------------------------------------------------------------------------
    def plan_data(self, plan: StepPlan, dtype: torch.dtype) -> PlanData:
        """The plan as data on this step's device (one non-blocking copy from page-locked memory on a GPU)."""
        pin = self.device.type == "cuda"
        data = plan_data(plan, self.batch, self.dsa_strategy, self.im_size, self.dsa_params, dtype, pin=pin)
        return data.to(self.device, non_blocking=pin)

    def meta_gradient(self, mode: str, theta_start: Tensor, theta_target: Tensor, images: Tensor, labels: Tensor,
                      syn_lr: Tensor, plan: StepPlan, auto_steps: bool = False, loss_scale: float | None = None,
                      mask: Tensor | None = None) -> MetaGradient:
        """L and ∂L/∂(pixels, labels, α), as :func:`mttlite.meta_gradient.meta_gradient` computes them."""
        if mode not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRADIENT_MODES}")
        scale = check_loss_scale(loss_scale)
        _check_mask(mask, theta_start)
        if tuple(images.shape[-2:]) != self.im_size:
            raise ValueError(f"the fused step was built for {self.im_size} images, got {tuple(images.shape[-2:])}")
        data = self.plan_data(plan, images.dtype)
        learn_y = _learn_labels(labels)
        args = (theta_start.detach(), theta_target.detach(), images.detach(), labels.detach(), syn_lr.detach(), data,
                mask)
        run = self._exact if mode == "exact" else self._unroll
        # a captured graph is specific to all of these (the loss scale S is a constant in it: one graph per S)
        key = (mode, learn_y, auto_steps, scale, mask is not None, plan.syn_steps, tuple(images.shape),
               tuple(labels.shape), images.dtype)
        if self.cuda_graphs:
            try:
                return self._replay(key, run, args, learn_y, auto_steps, scale)
            except RuntimeError as err:  # a capture that fails: the same compiled steps, launched one by one
                if key in self._graphs:
                    raise
                warnings.warn(f"CUDA graph capture of the fused step failed ({str(err).splitlines()[0]}); the "
                              "compiled steps run without it (set MTTLITE_CUDA_GRAPHS=0 to skip the attempt)",
                              stacklevel=2)
                self.cuda_graphs = False
        return run(*args, learn_y=learn_y, auto_steps=auto_steps, scale=scale)

    def _scale_tensor(self, scale: float, like: Tensor) -> Tensor | None:
        return None if scale == 1.0 else torch.full((), scale, dtype=torch.float32, device=like.device)

    def _exact(self, theta_start, theta_target, x, y, alpha, data: PlanData, mask, *, learn_y, auto_steps, scale):
        """The adjoint meta-gradient (``meta_gradient._adjoint_gradient``), one compiled call per step and sweep."""
        S = self._scale_tensor(scale, x)
        N = data.index.shape[0]
        thetas, losses = [theta_start], []
        for i in range(N):  # forward sweep: θ_0 … θ_N
            theta, loss_i = self.fn.forward(thetas[i], x, y, data.index[i], data.omega[i], data.weight[i], alpha, S)
            thetas.append(theta)
            losses.append(loss_i)
        den = apply_mask(theta_start - theta_target, mask).pow(2).sum()  # ‖m ⊙ (θ*_t − θ*_{t+M})‖²
        if auto_steps:  # ATT: L at n*, λ_n = 0 after n*, ∂L/∂θ_{n*} injected at n*
            steps, theta_n = closest_step(torch.stack(thetas[1:]), theta_target, mask)
            inject = 2 * apply_mask(theta_n - theta_target, mask) / den
            at = (torch.arange(N + 1, device=x.device) == steps).to(inject.dtype)  # [n = n*], (N+1,)
            lam = at[N] * inject
        else:
            steps = torch.full((), N, dtype=torch.int64, device=x.device)
            theta_n = thetas[N]
            lam = 2 * apply_mask(theta_n - theta_target, mask) / den  # λ_N
            inject = torch.zeros_like(lam)
            at = torch.zeros(N + 1, dtype=lam.dtype, device=x.device)
        loss = apply_mask(theta_n - theta_target, mask).pow(2).sum() / den
        if S is not None:
            lam, inject = lam * scale, inject * scale
        grad_x = torch.zeros_like(x)
        grad_y = torch.zeros_like(y) if learn_y else None
        grad_alpha = torch.zeros_like(alpha)
        for i in reversed(range(N)):  # adjoint sweep
            step = (thetas[i], x, y, data.index[i], data.omega[i], data.weight[i], alpha, lam)
            if learn_y:
                lam, grad_x, grad_y, grad_alpha = self.fn.adjoint_y(*step, grad_x, grad_y, grad_alpha, at[i], inject, S)
            else:
                lam, grad_x, grad_alpha = self.fn.adjoint(*step, grad_x, grad_alpha, at[i], inject, S)
        if S is not None:  # the sums hold S² × the gradient
            inv = 1.0 / (scale * scale)
            grad_x, grad_alpha = grad_x * inv, grad_alpha * inv
            grad_y = grad_y * inv if learn_y else None
        return MetaGradient(loss.detach(), grad_x, grad_y, grad_alpha, torch.stack(losses), steps)

    def _unroll(self, theta_start, theta_target, x, y, alpha, data: PlanData, mask, *, learn_y, auto_steps, scale):
        """The naive unroll (``meta_gradient._unroll_gradient``) through the compiled step gradient."""
        S = self._scale_tensor(scale, x)
        x = x.detach().requires_grad_(True)
        y = y.detach().requires_grad_(True) if learn_y else y
        lr = alpha.detach().requires_grad_(True)
        theta, path, losses = theta_start, [], []
        with torch.enable_grad():
            for i in range(data.index.shape[0]):
                g, loss_i = self.fn.grad(theta, x, y, data.index[i], data.omega[i], data.weight[i], S)
                theta = theta - lr * g
                path.append(theta)
                losses.append(loss_i.detach())
            if auto_steps:
                steps, theta = closest_step(torch.stack(path), theta_target, mask)
            else:
                steps = torch.full((), len(path), dtype=torch.int64, device=x.device)
            num = apply_mask(theta - theta_target, mask).pow(2).sum()
            loss = num / apply_mask(theta_start - theta_target, mask).pow(2).sum()
            inputs = [x, lr] + ([y] if learn_y else [])
            if S is None:
                grads = torch.autograd.grad(loss, inputs)
            else:
                grads = [g / (scale * scale) for g in torch.autograd.grad(loss * (scale * scale), inputs)]
        return MetaGradient(loss.detach(), grads[0], grads[2] if learn_y else None, grads[1], torch.stack(losses), steps)

    # -- CUDA graphs --------------------------------------------------------------------------------
    def _replay(self, key, run, args, learn_y, auto_steps, scale) -> MetaGradient:
        """Capture ``run`` on static copies of ``args`` once per ``key``, then copy the inputs in and replay."""
        entry = self._graphs.get(key)
        if entry is None:
            static = _clone_args(args)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up (compiles) off the capture, as torch's documentation asks
                for _ in range(2):
                    run(*static, learn_y=learn_y, auto_steps=auto_steps, scale=scale)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run(*static, learn_y=learn_y, auto_steps=auto_steps, scale=scale)
            entry = self._graphs[key] = (graph, static, out)
        graph, static, out = entry
        _copy_args(static, args)
        graph.replay()
        return MetaGradient(*(None if t is None else t.clone() for t in
                              (out.loss, out.images, out.labels, out.syn_lr, out.student_losses, out.steps)))

    # -- compiling ahead of the first iteration ---------------------------------------------------
    def warm_up(self, mode: str, theta: Tensor, images: Tensor, labels: Tensor, syn_lr: Tensor, plan: StepPlan,
                auto_steps: bool = False, loss_scale: float | None = None, mask: Tensor | None = None) -> float:
        """Compile (and on CUDA capture) on this shape now, on copies; returns the seconds it took, which also
        accumulate in ``compile_seconds``. ``theta``: any (P,) parameters (an expert's); nothing is changed."""
        t0 = time.perf_counter()
        target = theta.detach() + 1e-3 * torch.ones_like(theta)
        try:
            self.meta_gradient(mode, theta.detach().clone(), target, images.detach().clone(), labels.detach().clone(),
                               syn_lr.detach().clone(), plan, auto_steps, loss_scale, mask)
        except Exception as err:  # noqa: BLE001 - re-raised as one actionable line where we know the cause
            if _compiler_missing(err):
                raise RuntimeError("the fused student step needs a working C++ compiler for torch.compile on a CPU "
                                   "(e.g. apt-get install g++): install one, or use step='eager' (--step eager)") from err
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        secs = time.perf_counter() - t0
        self.compile_seconds += secs
        return secs


def _clone_args(args):
    return tuple(a.clone() if isinstance(a, Tensor) else
                 PlanData(a.index.clone(), a.weight.clone(), a.omega.clone()) if isinstance(a, PlanData) else a
                 for a in args)


def _copy_args(static, args) -> None:
    for s, a in zip(static, args):
        if isinstance(s, Tensor):
            s.copy_(a, non_blocking=True)
        elif isinstance(s, PlanData):
            for st, at in ((s.index, a.index), (s.weight, a.weight), (s.omega, a.omega)):
                st.copy_(at, non_blocking=True)
