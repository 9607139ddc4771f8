"""mttlite.layers against torch's own layers: values, first and second derivatives, torch.func.

Everything runs on the ``device`` fixture (tests/conftest.py; CPU by default), in float64 where the
comparison is exact to rounding; the random inputs are drawn on the CPU and moved there."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from mttlite.layers import AvgPool2x2, InstanceNorm, avg_pool_2x2, instance_norm


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float64, requires_grad=True, device="cpu"):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype).to(device).requires_grad_(requires_grad)


def _native_in(x, w, b, eps=1e-5):
    return F.group_norm(x, x.shape[1], w, b, eps)


def _second_order(norm, x, w, b, seed=7):
    """Gradients w.r.t. (x, γ, β) of a random linear function of (∂x, ∂γ, ∂β): the double backward."""
    g = torch.Generator().manual_seed(seed)
    y = norm(x, w, b)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)  # same draws in any dtype
    first = torch.autograd.grad((y * gy).sum() + (y ** 3).sum(), (x, w, b), create_graph=True)
    s = sum((d * torch.randn(d.shape, generator=g, dtype=torch.float64).to(d.device, d.dtype)).sum() for d in first)
    return torch.autograd.grad(s, (x, w, b), allow_unused=True)


# ---------------------------------------------------------------------------------------------
# 2x2 average pooling
# ---------------------------------------------------------------------------------------------
def test_avg_pool_matches_torch_and_its_derivatives_check_numerically(device):
    x = _rand(2, 3, 6, 8, device=device)
    torch.testing.assert_close(avg_pool_2x2(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(avg_pool_2x2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool_2x2, (x,))
    v = _rand(2, 3, 3, 4, seed=1, requires_grad=False, device=device)
    (ours,) = torch.autograd.grad(avg_pool_2x2(x), x, v)
    (ref,) = torch.autograd.grad(F.avg_pool2d(x, 2), x, v)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)


def test_avg_pool_odd_sizes_fall_back_to_torch(device):
    x = _rand(2, 3, 7, 6, device=device)
    out = avg_pool_2x2(x)
    assert out.shape == (2, 3, 3, 3)
    torch.testing.assert_close(out, F.avg_pool2d(x, 2), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch.func.jvp
def test_avg_pool_under_torch_func_matches_torch(device):
    xs = _rand(4, 2, 3, 6, 8, requires_grad=False, device=device)

    def loss(pool):
        return lambda x: (pool(x) ** 3).sum()

    ref_pool = lambda x: F.avg_pool2d(x, 2)  # noqa: E731
    torch.testing.assert_close(vmap(grad(loss(avg_pool_2x2)))(xs), vmap(grad(loss(ref_pool)))(xs))
    hvp = lambda f: vmap(lambda x: jvp(grad(f), (x,), (torch.ones_like(x),))[1])(xs)  # noqa: E731
    torch.testing.assert_close(hvp(loss(avg_pool_2x2)), hvp(loss(ref_pool)))


# ---------------------------------------------------------------------------------------------
# Instance norm
# ---------------------------------------------------------------------------------------------
def test_instance_norm_matches_group_norm_and_its_derivatives_check_numerically(device):
    x, w, b = _rand(3, 4, 5, 6, device=device), _rand(4, seed=1, device=device), _rand(4, seed=2, device=device)
    torch.testing.assert_close(instance_norm(x, w, b), _native_in(x, w, b))
    assert torch.autograd.gradcheck(instance_norm, (x, w, b))
    assert torch.autograd.gradgradcheck(instance_norm, (x, w, b))  # the hand-derived double backward


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 7), (4, 2, 1, 9)])
def test_instance_norm_double_backward_equals_torch(shape, device):
    x = _rand(*shape, device=device)
    w, b = _rand(shape[1], seed=1, device=device), _rand(shape[1], seed=2, device=device)
    ours, ref = _second_order(instance_norm, x, w, b), _second_order(_native_in, x, w, b)
    for a, r in zip(ours, ref):  # β reaches them through ℓ's curvature: ∂ℓ/∂y = gy + 3y² depends on y
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_instance_norm_double_backward_when_only_some_first_derivatives_are_used(device):
    """Unused cotangents arrive as None: e.g. a loss of ∂γ alone (as for a frozen input)."""
    x, w, b = _rand(3, 4, 5, 6, device=device), _rand(4, seed=1, device=device), _rand(4, seed=2, device=device)
    v = _rand(4, seed=3, requires_grad=False, device=device)
    gy = _rand(3, 4, 5, 6, seed=4, requires_grad=False, device=device)
    for norm in (instance_norm, _native_in):
        y = norm(x, w, b)
        (dw,) = torch.autograd.grad((y * gy).sum() + (y ** 3).sum(), w, create_graph=True)
        out = torch.autograd.grad((dw * v).sum(), (x, w))
        if norm is instance_norm:
            ours = out
        else:
            for a, r in zip(ours, out):
                torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_instance_norm_float32_close_to_torch(device):
    f32 = {"dtype": torch.float32, "device": device}
    x, w, b = _rand(8, 16, 32, 32, **f32), _rand(16, seed=1, **f32), _rand(16, seed=2, **f32)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ours, ref = _second_order(instance_norm, x, w, b), _second_order(_native_in, x64, w64, b64)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_instance_norm_low_precision_first_and_second_derivatives_close_to_float64(dtype):
    """Autocast's case on a CPU: low-precision x and g, float32 γ and β. The backward (torch's mixed-dtype
    kernel) and the second derivative (full-size passes in the low dtype, means in float32) agree with
    float64 to the low dtype's rounding, and each result comes back in its input's dtype."""
    x = _rand(8, 16, 12, 12, seed=0).detach().mul(2).add(0.5)
    w, b = _rand(16, seed=1).detach().abs().add(0.5), _rand(16, seed=2).detach()
    x_lo = x.to(dtype).requires_grad_()
    w32, b32 = w.float().requires_grad_(), b.float().requires_grad_()
    x64 = x_lo.detach().double().requires_grad_()  # the same (rounded) input in float64
    w64, b64 = w32.detach().double().requires_grad_(), b32.detach().double().requires_grad_()
    gy = torch.randn(x.shape, generator=_gen(5), dtype=torch.float64)
    v = torch.randn(x.shape, generator=_gen(6), dtype=torch.float64)

    def derivatives(xx, ww, bb):
        y = instance_norm(xx, ww, bb)
        dx, dw = torch.autograd.grad(y, (xx, ww), gy.to(y.dtype), create_graph=True)
        second = torch.autograd.grad((dx * v.to(dx.dtype)).sum() + (dw ** 2).sum(), (xx, ww))
        return (dx, dw, *second)

    ours, ref = derivatives(x_lo, w32, b32), derivatives(x64, w64, b64)
    assert [t.dtype for t in ours] == [dtype, torch.float32, dtype, torch.float32]
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]  # a few roundings (measured: 0.2-0.5 %, 0.02-0.04 %)
    for a, r in zip(ours, ref):
        a, r = a.detach(), r.detach()
        rel = float((a.double() - r).norm() / r.norm())
        assert rel < tol, (a.dtype, rel)


def test_instance_norm_grad_of_grad_under_torch_func(device):
    const = {"requires_grad": False, "device": device}
    x, w, b = _rand(3, 4, 5, 6, **const), _rand(4, seed=1, **const), _rand(4, seed=2, **const)
    v = _rand(3, 4, 5, 6, seed=3, requires_grad=False, device=device)

    def s(norm):  # x ↦ ∂ℓ/∂x · v, then its gradient: a Hessian-vector product
        return grad(lambda x: (grad(lambda x: (norm(x, w, b) ** 3).sum())(x) * v).sum())(x)

    torch.testing.assert_close(s(instance_norm), s(_native_in))


# ---------------------------------------------------------------------------------------------
# The modules are drop-in replacements
# ---------------------------------------------------------------------------------------------
def test_modules_keep_torch_classes_names_and_shapes(device):
    norm, ref = InstanceNorm(8).to(device), nn.GroupNorm(8, 8, affine=True).to(device)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 8
    assert norm.state_dict().keys() == ref.state_dict().keys()
    norm.load_state_dict({"weight": torch.rand(8), "bias": torch.rand(8)})
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(2, 8, 6, 6).to(device)
    torch.testing.assert_close(norm(x), ref(x))
    pool = AvgPool2x2()
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
    torch.testing.assert_close(pool(x), nn.AvgPool2d(2, 2)(x))


def test_torch_layers_swaps_back_without_touching_the_original(device):
    from mttlite.layers import torch_layers
    from mttlite.networks import get_network

    net = get_network("convnet", 1, 10, (28, 28), width=8, generator=_gen(0)).double().to(device)
    with torch.no_grad():  # γ, β not representable in float32: a copy through float32 would show
        for p in net.parameters():
            p.add_(1e-12 * torch.randn(p.shape, generator=_gen(9), dtype=p.dtype).to(device))
    plain = torch_layers(net)
    kinds = {type(m) for m in plain.modules()}
    assert InstanceNorm not in kinds and AvgPool2x2 not in kinds
    assert nn.GroupNorm in kinds and nn.AvgPool2d in kinds
    assert all(q.device == p.device for p, q in zip(net.parameters(), plain.parameters()))
    assert any(isinstance(m, InstanceNorm) for m in net.modules())  # a copy: the original keeps its layers
    for (name, p), (name_plain, q) in zip(net.named_parameters(), plain.named_parameters()):
        assert name == name_plain and q.dtype == p.dtype and torch.equal(p, q), name
    x = _rand(4, 1, 28, 28, seed=5, requires_grad=False, device=device)
    torch.testing.assert_close(plain(x), net(x), rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(m(x).square().sum(), list(m.parameters())) for m in (net, plain)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
