"""The distillation's inner loops on a non-CPU device, without a GPU: torch's ``meta`` device.

A ``meta`` tensor has a shape, a dtype and a device but no data: anything that needs a value on
the host — ``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)`` — raises. What ``meta`` (like CUDA)
lets through, an index tensor left on the CPU (on a GPU: a blocking copy at every step), the
``DeviceGuard`` of tests/device_guard.py turns into a failure as well. So a loop that runs to the
end on ``meta`` under the guard is device-clean and does not sync with the host: what
``student.unroll`` and both meta-gradient modes must be for a GPU to run them at speed.

What cannot run on meta, and why: the outer loop (``Distiller.step``) reads every scalar of an
iteration back once, on purpose (the guards), and samples the images of the initial set with
``torch.nonzero``; expert buffers live in files. Those are covered on the CPU by test_distill.py;
``test_distiller_reads_the_host_once_per_iteration`` below counts its syncs instead.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from core_helpers import tiny_convnet
from device_guard import DeviceGuard
from mttlite.augment import DSA_STRATEGY
from mttlite.meta_gradient import meta_gradient
from mttlite.params import ParamSpec
from mttlite.student import make_plan, unroll

META = torch.device("meta")


def _problem(n=6, classes=3, im=8, soft=False):
    net = tiny_convnet(num_classes=classes, im=im, dtype=torch.float32).to(META)
    spec = ParamSpec.from_module(net)
    theta_start = torch.empty(spec.num_params, device=META)
    theta_target = torch.empty(spec.num_params, device=META)
    x = torch.empty(n, 1, im, im, device=META)
    y = torch.empty(n, classes, device=META) if soft else torch.arange(classes).repeat(n // classes).to(META)
    return net, spec, theta_start, theta_target, x, y


def _assert_meta(t: Tensor, shape) -> None:
    assert t.device.type == "meta" and tuple(t.shape) == tuple(shape)


@pytest.mark.parametrize("mode", ["unroll", "exact"])
@pytest.mark.parametrize("dsa", [DSA_STRATEGY, ""], ids=["dsa", "no-dsa"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft-labels"])
def test_meta_gradient_runs_on_a_device_without_host_syncs(mode, dsa, soft):
    net, spec, ts, tt, x, y = _problem(soft=soft)
    if soft:
        y = y.requires_grad_(True)
    plan = make_plan(x.shape[0], 4, 4, torch.Generator().manual_seed(0))  # CPU indices: moved once, inside
    alpha = torch.empty((), device=META)
    with DeviceGuard(META) as guard:
        mg = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, dsa)
    assert guard.ops > 100  # the guard saw the whole computation
    _assert_meta(mg.loss, ())
    _assert_meta(mg.images, x.shape)
    _assert_meta(mg.syn_lr, ())
    _assert_meta(mg.student_losses, (4,))
    if soft:
        _assert_meta(mg.labels, y.shape)


@pytest.mark.parametrize("mode", ["unroll", "exact"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft-labels"])
def test_fused_step_runs_on_a_device_without_host_syncs(mode, soft):
    """The fused step's functions (uncompiled: inductor has no meta backend) with ω, the batches' indices and
    weights, a prune mask and ATT's n* all on the device: the plan's data crosses once, nothing comes back,
    and no CPU tensor meets a device one inside the N steps."""
    from mttlite.fused import FusedStep

    net, spec, ts, tt, x, y = _problem(soft=soft)
    if soft:
        y = y.requires_grad_(True)
    plan = make_plan(x.shape[0], 4, 4, torch.Generator().manual_seed(0))  # a ragged last batch: padded
    fs = FusedStep(net, spec, batch=4, im_size=(8, 8), dsa_strategy=DSA_STRATEGY, device=META, compile=False)
    mask = torch.ones(spec.num_params, dtype=torch.bool, device=META)
    with DeviceGuard(META) as guard:
        mg = fs.meta_gradient(mode, ts, tt, x, y, torch.empty((), device=META), plan, auto_steps=True, mask=mask)
    assert guard.ops > 100
    _assert_meta(mg.loss, ())
    _assert_meta(mg.images, x.shape)
    _assert_meta(mg.syn_lr, ())
    _assert_meta(mg.student_losses, (4,))
    _assert_meta(mg.steps, ())
    if soft:
        _assert_meta(mg.labels, y.shape)


def test_unroll_runs_on_a_device_and_returns_its_losses_as_one_tensor():
    net, spec, ts, _, x, y = _problem()
    plan = make_plan(x.shape[0], 3, None, torch.Generator().manual_seed(1))
    with DeviceGuard(META):
        res = unroll(net, spec, ts, x, y, torch.empty((), device=META), plan, DSA_STRATEGY, return_path=True)
    _assert_meta(res.theta, ts.shape)
    _assert_meta(res.losses, (3,))
    assert len(res.path) == 4 and all(p.device.type == "meta" for p in res.path)


def test_plan_moves_its_indices_in_one_copy_and_keeps_them():
    plan = make_plan(10, 7, 4, torch.Generator().manual_seed(3))
    moved = plan.to(META)
    assert all(b.device.type == "meta" for b in moved.batches)
    assert [len(b) for b in moved.batches] == [len(b) for b in plan.batches]
    assert moved.aug_seeds == plan.aug_seeds
    assert plan.to("cpu") is plan  # already there: no copy
    cat = torch.cat(plan.batches)
    assert torch.equal(torch.cat(plan.to(torch.device("cpu")).batches), cat)


def test_a_cpu_index_or_a_host_read_in_the_loop_would_fail_here():
    """The device rules these tests rely on, so that a regression cannot pass silently."""
    x = torch.empty(6, 3, device=META)
    with pytest.raises(AssertionError, match="mixes"), DeviceGuard(META):
        torch.zeros(6, 3, device=META).index_add_(0, torch.tensor([0, 1]), x[:2])  # a CPU index
    with pytest.raises(AssertionError, match="mixes"), DeviceGuard(META):
        x[torch.tensor([0, 1])]
    with pytest.raises((RuntimeError, AssertionError)), DeviceGuard(META):
        x.sum().item()


def test_distiller_reads_the_host_once_per_iteration(monkeypatch):
    """Distiller.step: exactly one read of a floating-point value back to the host (the batched
    ``tolist`` of its scalars), whatever N. (Integer draws from the CPU generator are not device reads.)"""
    from core_helpers import sgd_trajectories

    from mttlite.distill import NUM_SCALARS, DistillConfig, Distiller

    class Data:
        name, num_classes, channel, im_size = "fashion-mnist-mini", 3, 1, (8, 8)
        train_images = torch.randn(12, 1, 8, 8)
        train_labels = torch.arange(3).repeat(4)

    net = tiny_convnet(num_classes=3, dtype=torch.float32)
    traj = sgd_trajectories(net, Data.train_images, Data.train_labels, num_experts=2, epochs=3)
    for gradient in ("unroll", "exact"):
        cfg = DistillConfig(ipc=2, syn_steps=5, expert_epochs=1, max_start_epoch=2, iterations=2, dsa_strategy="",
                            gradient=gradient)
        d = Distiller(cfg, Data, net, traj)
        reads = []
        for name in ("item", "tolist"):
            real = getattr(Tensor, name)

            def spy(self, *a, _real=real, _name=name, **k):
                if self.is_floating_point():
                    reads.append((_name, tuple(self.shape)))
                return _real(self, *a, **k)

            monkeypatch.setattr(Tensor, name, spy)
        d.step()
        monkeypatch.undo()
        assert reads == [("tolist", (NUM_SCALARS + cfg.syn_steps,))], (gradient, reads)
