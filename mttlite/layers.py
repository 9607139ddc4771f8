"""ConvNet's instance norm and 2×2 average pooling, with derivatives that are cheap to differentiate.

MTT differentiates *through* the student's gradient, so every layer runs three times per
student step: forward, backward, and the backward of the backward. torch's built-in formulas
for the third are generic and slow on CPU; these two layers give the same numbers (up to float
rounding), faster.

**Average pooling.** For ConvNet's 2×2 average pooling P (stride 2, H and W even) all three
are the same two linear maps::

    P(x)[n, c, i, j] = ¼ Σ_{a, b ∈ {0, 1}} x[n, c, 2i + a, 2j + b]      (B, C, H, W) → (B, C, H/2, W/2)
    Pᵀ(g) = ¼ U(g),   U(g)[n, c, h, w] = g[n, c, ⌊h/2⌋, ⌊w/2⌋]            (nearest 2× upsampling)

P is linear, so its backward is Pᵀ, whose backward is P again: two ``autograd.Function`` s that
call each other are differentiable to any order. torch's own kernels compute the same numbers to
rounding (``avg_pool2d`` and ``avg_pool2d_backward``) but are generic in window, stride and
padding: on CPU they take 2–3.5× longer than the two strided halvings and the broadcast product
below, and pooling was an eighth of a distillation step's time (``docs/performance.md``). P and Pᵀ are
two operations and one, as few as torch's (``avg_pool2d_backward`` zero-fills first).

**Instance norm** (``GroupNorm(C, C)``: statistics per sample and channel over the D = H·W
pixels). Forward and backward are torch's fused kernels; the backward is itself an
``autograd.Function`` whose backward (the second derivative) is derived by hand below, in a
dozen passes over the feature map where autograd's generic formula takes about twice as many.

Under autocast (``mttlite.precision``: bf16 / fp16 activations, float32 γ, β) the forward is torch's
mixed-dtype kernel on a CPU, and float32 on a GPU (as autocast runs torch's ``group_norm`` there).
The backward is the mixed-dtype kernel too on a CPU in eager mode (low-precision g and x, float32 γ
and statistics, float32 accumulation, no full-size casts); under ``torch.func`` transforms (vmap's
batching rule cannot take mixed dtypes) and off the CPU it upcasts to float32. The second derivative,
on a CPU in eager mode, makes its full-size passes in the low dtype and its per-(n, c) means and
coefficients in float32 (elsewhere: all in float32). Each result comes back in its input's dtype;
float32 / float64 inputs take the same ops as before, unconverted.

All functions carry ``generate_vmap_rule`` and ``setup_context``, so they work under
``torch.func`` (``grad``, ``vmap``: the experts trained in parallel) and ``torch.compile``.
Tests compare them with torch's layers (float64 ``gradcheck`` / ``gradgradcheck``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pool_sum(x: Tensor) -> Tensor:
    """¼ × the sum of each 2×2 window, as two halvings: rows first (contiguous strides), then columns.
    ``lerp(a, b, ½)`` = ½ (a + b) in one pass, so two operations in all."""
    rows = torch.lerp(x[..., 0::2, :], x[..., 1::2, :], 0.5)  # (…, H/2, W): ½ (row 2i + row 2i+1)
    return torch.lerp(rows[..., 0::2], rows[..., 1::2], 0.5)  # (…, H/2, W/2)


def _upsample(g: Tensor) -> Tensor:
    """¼ U(g): every value repeated over its 2×2 window, times ¼, in one operation (the product of a
    broadcast view writes a fresh contiguous tensor, which the reshape only views)."""
    *lead, h, w = g.shape
    return (g[..., :, None, :, None].expand(*lead, h, 2, w, 2) * 0.25).reshape(*lead, 2 * h, 2 * w)


class _AvgPool2x2(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _pool_sum(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass  # linear: nothing to save

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        return _Upsample2x2.apply(grad_out)  # Pᵀ

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return _AvgPool2x2.apply(tangent)


class _Upsample2x2(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor) -> Tensor:
        return _upsample(g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        return _AvgPool2x2.apply(grad_out)  # (Pᵀ)ᵀ = P

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return _Upsample2x2.apply(tangent)


def avg_pool_2x2(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 2)`` for x of shape (…, H, W); the fast path needs H and W even."""
    if x.dim() < 3 or x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.avg_pool2d(x, 2)  # odd sizes: torch drops the last row / column
    return _AvgPool2x2.apply(x)


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` (same repr, no parameters) computed by :func:`avg_pool_2x2`."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool_2x2(x)


# ----------------------------------------------------------------------------------------------
# Instance norm
# ----------------------------------------------------------------------------------------------
class _InstanceNorm(torch.autograd.Function):
    """y = γ x̂ + β,  x̂ = (x − μ) r,  μ = mean_hw x,  r = (var_hw x + ε)^(-1/2)  per (n, c)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
        N, C = x.shape[:2]
        return torch.native_group_norm(x, weight, bias, N, C, x[0, 0].numel(), C, eps)  # y, μ (N, C), r (N, C)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # no zero tensors for μ and r, whose gradients are never used
        ctx.save_for_backward(x, weight, mean, rstd)

    @staticmethod
    def backward(ctx, g, _g_mean, _g_rstd):
        if g is None:  # y itself did not reach the loss
            return None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _InstanceNormBackward.apply(g, x, weight, mean, rstd)
        return dx, dw, db, None


class _InstanceNormBackward(torch.autograd.Function):
    """(g, x, γ) → (∂x, ∂γ, ∂β) of instance norm, with g = ∂L/∂y and a = γ g::

        ∂x = r (a − mean(a) − x̂ mean(a x̂)),   ∂γ = Σ_{n,hw} g x̂,   ∂β = Σ_{n,hw} g

    μ and r enter as constants: the backward below differentiates through them by hand.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor):
        N, C = x.shape[:2]
        if x.dtype in _LOW or g.dtype in _LOW:
            if g.dtype == x.dtype and x.device.type == "cpu" and not _functorch_wrapped(g, x):
                # autocast on a CPU, eager: torch's mixed-dtype kernel (bf16 / fp16 g and x, float32 γ and
                # statistics, float32 accumulation; ∂x in x's dtype, ∂γ and ∂β in float32), with no full-size
                # casts: 4-5× faster than the float32 path below at 100×128×32×32 (one thread)
                return torch.ops.aten.native_group_norm_backward(g, x, mean, rstd, weight, N, C, x[0, 0].numel(), C,
                                                                 [True, True, True])
            # autocast otherwise: computed in float32, ∂x returned in x's dtype. (The mixed-dtype kernel fails
            # under vmap, whose batching rule multiplies g by γ first; it is a CPU kernel.)
            ct = _compute_dtype(g, x, weight, mean)
            dx, dw, db = torch.ops.aten.native_group_norm_backward(
                g.to(ct), x.to(ct), mean.to(ct), rstd.to(ct), weight.to(ct), N, C, x[0, 0].numel(), C, [True, True, True])
            return dx.to(x.dtype), dw.to(weight.dtype), db.to(weight.dtype)
        return torch.ops.aten.native_group_norm_backward(g, x, mean, rstd, weight, N, C, x[0, 0].numel(), C,
                                                         [True, True, True])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, u: Tensor | None, v_w: Tensor | None, v_b: Tensor | None):
        r"""Cotangents (u, v_γ, v_β) of (∂x, ∂γ, ∂β) → their gradients w.r.t. g, x and γ.

        Per (n, c), with bars for means over the D pixels (all are (N, C, 1) vectors):

            ∂/∂g = γ r (u − ū − x̂ \overline{u x̂}) + v_γ x̂ + v_β
            ∂/∂γ = Σ_n r D (\overline{u g} − ū ḡ − \overline{u x̂} \overline{g x̂})
            ∂/∂x = r (G − Ḡ − x̂ \overline{G x̂}) − s r² x̂ / D,    where
                G = ∂/∂x̂ = −r (a \overline{u x̂} + \overline{a x̂} u) + v_γ g    (a = γ g)
                s = ∂/∂r = Σ u (a − ā − x̂ \overline{a x̂})

        The first line is the backward's own structure again (it is self-adjoint in a); the
        last is the layer-norm backward applied to G plus the path through r = (var + ε)^(-1/2),
        ∂r/∂x = −r² x̂ / D. Every mean is one reduction; G never needs to be formed.
        """
        g, x, weight, mean, rstd = ctx.saved_tensors
        # ct: the dtype of the per-(n, c) means and coefficients, float32 under autocast (bf16 / fp16 g and x,
        # float32 γ, μ, r), else the inputs' own. fd: the dtype of the full-size (N, C, D) passes: the low
        # dtype itself on a CPU in eager mode (at 100×128×32×32, one thread: 3× faster than upcasting, the
        # results' relative error ~0.3 % against float64, a bf16 rounding), else ct (g, x and u upcast).
        # float32 / float64 inputs: fd = ct, no conversion at all.
        dtypes, ct = (g.dtype, x.dtype, weight.dtype), _compute_dtype(g, x, weight, mean)
        low = (x.dtype in _LOW and g.dtype == x.dtype and (u is None or u.dtype == x.dtype)
               and x.device.type == "cpu" and not _functorch_wrapped(g, x, *([] if u is None else [u])))
        fd = x.dtype if low else ct
        shape, (N, C), D = x.shape, x.shape[:2], x[0, 0].numel()
        x, g = x.reshape(N, C, D).to(fd), g.reshape(N, C, D).to(fd)
        weight, mean, rstd = weight.to(ct), mean.to(ct), rstd.to(ct)
        u = torch.zeros_like(x) if u is None else u.reshape(N, C, D).to(fd)
        v_w = torch.zeros_like(weight) if v_w is None else v_w.to(ct)
        v_b = torch.zeros_like(weight) if v_b is None else v_b.to(ct)
        r, w, v_w, v_b = rstd[..., None], weight[:, None], v_w[:, None], v_b[:, None]  # (N, C, 1), (C, 1)

        def full(c):  # a per-(n, c) coefficient, in the full-size passes' dtype
            return c.to(fd)

        x_hat = torch.addcmul(full(-mean[..., None] * r), x, full(r)) if low else (x - mean[..., None]) * r

        # Reductions of low-precision tensors accumulate in float32 inside torch's CPU kernels; only their
        # (N, C, 1) results are rounded to the low dtype, then computed on in ct. (``sum(dtype=float32)``
        # would first cast the whole tensor: 20× slower.) In float32 / float64 a mean is one operation.
        def bar(t):  # mean over the pixels, (N, C, 1)
            return t.sum(-1, keepdim=True).to(ct) / D if low else t.mean(-1, keepdim=True)

        def bar_dot(a, b):  # mean of a product, (N, C, 1)
            return torch.linalg.vecdot(a, b)[..., None].to(ct) / D if low else (a * b).mean(-1, keepdim=True)

        # The per-(n, c) coefficients, with the sums shared and the signs folded into addcmul's ``value``
        # (each line below is one or two small operations; on a GPU each is a launch):
        u_, ux_, g_, gx_, ug_ = bar(u), bar_dot(u, x_hat), bar(g), bar_dot(g, x_hat), bar_dot(u, g)
        wr = w * r
        c_g = v_w - wr * ux_  # G = c_u u + c_g g with c_u = −r \overline{a x̂} = −a,  a = wr ḡx̂
        K = torch.addcmul(ug_, u_, g_, value=-1).addcmul_(ux_, gx_, value=-1)  # \overline{ug} − ū ḡ − \overline{ux̂} \overline{gx̂}
        d_g = torch.addcmul(full(v_b - wr * u_), x_hat, full(c_g)).addcmul_(u, full(wr))
        d_w = (r * K).sum(0).flatten() * D
        a = wr * gx_
        neg_G_ = torch.addcmul(a * u_, c_g, g_, value=-1)  # −Ḡ = a ū − c_g ḡ
        Gx_ = torch.addcmul(c_g * gx_, a, ux_, value=-1)  # \overline{G x̂}
        # c_x = −r \overline{G x̂} − s r² / D with s = D w K:  −r (\overline{G x̂} + wr K)
        d_x = torch.addcmul(full(r * neg_G_), x_hat, full(r * torch.addcmul(Gx_, wr, K)), value=-1)
        d_x = d_x.addcmul_(u, full(r * a), value=-1).addcmul_(g, full(r * c_g))
        return d_g.view(shape).to(dtypes[0]), d_x.view(shape).to(dtypes[1]), d_w.to(dtypes[2]), None, None


_LOW = (torch.bfloat16, torch.float16)


def _functorch_wrapped(*tensors: Tensor) -> bool:
    """True under torch.func transforms (vmap's batched or grad's tracking tensors), False in eager mode."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the hand-written double backward computes in: float32 if any input is bf16 / fp16
    (autocast), else the inputs' common dtype (float32 / float64: unchanged arithmetic)."""
    dtype = torch.result_type(*tensors[:2]) if len(tensors) > 1 else tensors[0].dtype
    for t in tensors[2:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _LOW else dtype


def instance_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``F.group_norm(x, C, weight, bias, eps)`` for x of shape (N, C, …)."""
    if x.dtype in _LOW and weight.dtype != x.dtype and x.device.type not in ("cpu", "meta"):
        # autocast off the CPU: torch's mixed-dtype group-norm kernels are CPU ones, and autocast itself
        # runs ``group_norm`` in float32 on GPUs: so does this layer (the cast is differentiable)
        x = x.float()
    return _InstanceNorm.apply(x, weight, bias, eps)[0]


class InstanceNorm(nn.GroupNorm):
    """``nn.GroupNorm(C, C, affine=True)`` (same parameters, names and repr) via :func:`instance_norm`."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(num_channels, num_channels, eps=eps, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)


def torch_layers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with torch's own layers in place of this module's (same parameters and names).

    ``InstanceNorm`` → ``nn.GroupNorm(C, C)``, ``AvgPool2x2`` → ``nn.AvgPool2d(2, 2)``. Used where
    torch's formulas serve better: ``torch.compile`` fuses their decompositions into less memory in
    the exact mode's adjoint (``mttlite.kernels``), and benchmarks measure the plain implementation.
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, InstanceNorm):
                plain = nn.GroupNorm(child.num_channels, child.num_channels, eps=child.eps, affine=True)
                plain.to(child.weight.device, child.weight.dtype).load_state_dict(child.state_dict())
                setattr(module, name, plain)
            elif isinstance(child, AvgPool2x2):
                setattr(module, name, nn.AvgPool2d(2, 2))
    return model
