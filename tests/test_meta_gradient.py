"""The meta-gradient ∂L/∂(pixels, labels, α): finite differences, and exact adjoint ≡ full unroll."""
import shutil

import pytest
import torch
from core_helpers import tiny_convnet

from mttlite.kernels import StepKernels
from mttlite.matching import matching_loss
from mttlite.meta_gradient import meta_gradient
from mttlite.params import ParamSpec
from mttlite.student import make_plan, unroll

DSA = "color_crop_cutout_flip_scale_rotate"


def _problem(n=6, N=5, batch_syn=4, seed=0, soft=False):
    net = tiny_convnet(num_classes=3, width=3, im=8)
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    if soft:
        y = torch.softmax(torch.randn(n, 3, generator=g, dtype=torch.float64), 1)
    theta_start = spec.flatten(dict(net.named_parameters())).detach()
    theta_target = theta_start + 0.05 * torch.randn(spec.num_params, generator=g, dtype=torch.float64)
    plan = make_plan(n, N, batch_syn, g)
    return net, spec, x, y, theta_start, theta_target, plan


def test_second_order_gradient_matches_finite_differences():
    """float64 gradcheck of L(x, α) through N = 3 student steps with DSA (the full second-order path)."""
    net, spec, x, y, ts, tt, plan = _problem(n=4, N=3, batch_syn=3)
    x = x[:, :, :4, :4].contiguous()  # tiny for gradcheck
    net = tiny_convnet(num_classes=3, width=2, im=4)
    spec = ParamSpec.from_module(net)
    ts = spec.flatten(dict(net.named_parameters())).detach()
    tt = ts + 0.05 * torch.randn(spec.num_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def L(images, alpha):
        res = unroll(net, spec, ts, images, y, alpha, plan, DSA, create_graph=True)
        return matching_loss(res.theta, ts, tt)

    alpha = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(L, (x.requires_grad_(True), alpha), eps=1e-6, atol=1e-7, rtol=1e-4)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("strategy", ["", DSA])
def test_exact_adjoint_equals_full_unroll(strategy):
    """Constant-memory adjoint ≡ naive unroll, float64, N = 6, several batches, DSA on."""
    net, spec, x, y, ts, tt, plan = _problem(n=6, N=6, batch_syn=4)
    alpha = torch.tensor(0.2, dtype=torch.float64)
    ref = meta_gradient("unroll", net, spec, ts, tt, x, y, alpha, plan, strategy)
    ex = meta_gradient("exact", net, spec, ts, tt, x, y, alpha, plan, strategy)
    assert ref.loss.item() == pytest.approx(ex.loss.item(), rel=1e-12)
    assert _rel(ex.images, ref.images) <= 1e-6
    assert abs(ex.syn_lr.item() - ref.syn_lr.item()) <= 1e-6 * abs(ref.syn_lr.item())
    assert ref.images.abs().sum() > 0 and ref.syn_lr.item() != 0  # a non-trivial gradient was compared


def test_exact_adjoint_equals_unroll_for_learnable_soft_labels():
    net, spec, x, y, ts, tt, plan = _problem(n=6, N=5, batch_syn=3, soft=True)
    y = y.requires_grad_(True)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    ref = meta_gradient("unroll", net, spec, ts, tt, x, y, alpha, plan, DSA)
    ex = meta_gradient("exact", net, spec, ts, tt, x, y, alpha, plan, DSA)
    assert _rel(ex.labels, ref.labels) <= 1e-6
    assert _rel(ex.images, ref.images) <= 1e-6
    assert abs(ex.syn_lr.item() - ref.syn_lr.item()) <= 1e-6 * abs(ref.syn_lr.item())


def test_unroll_gradient_matches_autograd_backward():
    """meta_gradient('unroll') returns what loss.backward() accumulates into leaves."""
    net, spec, x, y, ts, tt, plan = _problem(n=5, N=3, batch_syn=2)
    alpha = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    xl = x.clone().requires_grad_(True)
    matching_loss(unroll(net, spec, ts, xl, y, alpha, plan, DSA).theta, ts, tt).backward()
    mg = meta_gradient("unroll", net, spec, ts, tt, x, y, alpha.detach(), plan, DSA)
    torch.testing.assert_close(mg.images, xl.grad)
    torch.testing.assert_close(mg.syn_lr, alpha.grad)
    with pytest.raises(ValueError, match="unknown gradient mode"):
        meta_gradient("tesla", net, spec, ts, tt, x, y, alpha, plan, DSA)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_step_kernels_give_the_same_gradient_in_both_modes():
    """StepKernels (torch.compile of torch.func step functions) ≡ the eager unroll, float64, DSA on."""
    net, spec, x, y, ts, tt, plan = _problem(n=6, N=5, batch_syn=3, soft=True)  # one batch shape: one compile
    y = y.requires_grad_(True)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    kernels = StepKernels(net, spec, compile=True)
    ref = meta_gradient("unroll", net, spec, ts, tt, x, y, alpha, plan, DSA)
    for mode in ("exact", "unroll"):
        got = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, DSA, kernels=kernels)
        assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
        assert got.student_losses.tolist() == pytest.approx(ref.student_losses.tolist(), rel=1e-12)
        assert _rel(got.images, ref.images) <= 1e-10
        assert _rel(got.labels, ref.labels) <= 1e-10
        assert abs(got.syn_lr.item() - ref.syn_lr.item()) <= 1e-10 * abs(ref.syn_lr.item())
