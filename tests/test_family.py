"""The trajectory-matching family as switches on DistillConfig: soft labels (TESLA/DATM), the
matching window (DATM), automatic N (ATT) and the EMA of the pixels (FTD/DATM).

Each against an independent answer: n* against a brute-force argmin over an explicit unroll path,
the ATT gradient against the plain gradient of an n*-step unroll and the two gradient modes
against each other (float64), the label step against autograd through the softmax, the window
against exact rational arithmetic, the EMA against its closed form. Off, each changes nothing:
the plain draws are the old ``t ~ U{0 … T+−1}``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, fields, replace
from fractions import Fraction

import pytest
import torch
from torch.func import functional_call

from core_helpers import MemoryTrajectories, interrupt_then_resume, sgd_trajectories, tiny_convnet, toy_dataset
from device_guard import DeviceGuard
from mttlite.distill import (
    NUM_SCALARS,
    DistillationDiverged,
    DistillConfig,
    Distiller,
    run,
    softmax_backward,
    start_window,
)
from mttlite.meta_gradient import meta_gradient
from mttlite.params import ParamSpec
from mttlite.student import StepPlan, make_plan, unroll

DSA = "color_crop_cutout_flip_scale_rotate"
SWITCHES = dict(soft_labels=True, auto_steps=True, ema_decay=0.9, min_start_epoch=1, current_max_start_epoch=2,
                expansion_end_iteration=4)


# -- a toy distillation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    ds = toy_dataset()
    net = tiny_convnet(num_classes=3, width=4, im=8, dtype=torch.float32)
    experts = sgd_trajectories(net, ds.train_images, ds.train_labels, num_experts=2, epochs=4, lr=0.1)
    return ds, net, experts


def _config(**kw):
    base = dict(dataset="toy", ipc=2, syn_steps=4, expert_epochs=1, max_start_epoch=3, iterations=6, lr_img=10.0,
                lr_lr=1e-4, lr_teacher=0.05, dsa_strategy=DSA, checkpoint_every=2, seed=7)
    base.update(kw)
    return DistillConfig(**base)


# -- defaults and bad settings ------------------------------------------------------------------------
def test_every_switch_is_off_by_default_and_old_files_load():
    c = DistillConfig()
    assert (c.soft_labels, c.auto_steps, c.ema_decay, c.min_start_epoch, c.current_max_start_epoch,
            c.expansion_end_iteration) == (False, False, None, 0, None, None)
    old = {k: v for k, v in c.to_dict().items()
           if k not in ("soft_labels", "lr_y", "min_start_epoch", "current_max_start_epoch",
                        "expansion_end_iteration", "auto_steps", "ema_decay")}  # a config written before them
    assert DistillConfig.from_dict(old) == c
    assert DistillConfig.from_dict(_config(**SWITCHES).to_dict()) == _config(**SWITCHES)
    _config(soft_labels=True, auto_steps=True, gradient="unroll").validate()  # any combination is fine


@pytest.mark.parametrize("kw, field, valid", [
    (dict(lr_y=0.0), "lr_y", "> 0"),
    (dict(lr_y=-2.0), "lr_y", "> 0"),
    (dict(lr_y=math.inf), "lr_y", "> 0"),
    (dict(ema_decay=1.0), "ema_decay", "[0, 1)"),
    (dict(ema_decay=-0.1), "ema_decay", "[0, 1)"),
    (dict(min_start_epoch=3), "min_start_epoch", "[0, 2]"),  # T− ≥ T+ = 3
    (dict(min_start_epoch=-1), "min_start_epoch", ">= 0"),
    (dict(min_start_epoch=1, current_max_start_epoch=1), "current_max_start_epoch", "[2, 3]"),
    (dict(current_max_start_epoch=4), "current_max_start_epoch", "[1, 3]"),
    (dict(expansion_end_iteration=0), "expansion_end_iteration", ">= 1"),
    (dict(soft_labels="yes"), "soft_labels", "True or False"),
    (dict(auto_steps=1), "auto_steps", "True or False"),
])
def test_bad_settings_name_the_field_and_its_range(kw, field, valid):
    with pytest.raises(ValueError) as e:
        _config(**kw).validate()
    lines = [ln for ln in str(e.value).splitlines()[1:]]
    assert len(lines) == 1 and field in lines[0] and valid in lines[0], str(e.value)


class _From2(MemoryTrajectories):
    """A buffer that kept epochs 2 … 4 only (numbered as stored): fine for T− ≥ 2, not below."""

    @property
    def epochs(self):
        return [2, 3, 4]

    def flat(self, expert, epoch, device="cpu", dtype=None):
        if epoch not in self.epochs:
            raise KeyError(epoch)
        return super().flat(expert, epoch - 2, device, dtype)


def test_the_window_must_lie_in_the_stored_epochs(setup):
    ds, net, experts = setup
    src = _From2([t[2:] for t in experts.trajectories])
    with pytest.raises(ValueError, match=r"min_start_epoch \(T−\) = 1, max_start_epoch \(T\+\) = 3 .*needs epochs 1 … 3"):
        Distiller(_config(min_start_epoch=1, max_start_epoch=3), ds, net, src)
    with pytest.raises(ValueError, match=r"min_start_epoch \(T−\) = 2, max_start_epoch \(T\+\) = 5 .*needs epochs 2 … 5"):
        Distiller(_config(min_start_epoch=2, max_start_epoch=5), ds, net, src)
    d = Distiller(_config(min_start_epoch=2, max_start_epoch=4, iterations=3, syn_steps=2), ds, net, src)
    starts = []
    run(d, progress=False, callbacks=(lambda info: starts.append(info.start_epoch),))
    assert len(starts) == 3 and set(starts) <= {2, 3}


# -- the matching window (DATM) -------------------------------------------------------------------------
def _t_cur(T0, T_plus, E, it):
    """DATM's upper bound in exact rational arithmetic: min(T+, T0 + ⌊(T+ − T0)·it/E⌋)."""
    return min(T_plus, T0 + math.floor(Fraction((T_plus - T0) * it, E)))


def test_start_window_grows_linearly_from_the_initial_bound_to_t_plus():
    c = _config(min_start_epoch=2, current_max_start_epoch=4, max_start_epoch=10, expansion_end_iteration=6)
    assert [start_window(c, it) for it in (0, 1, 3, 5, 6, 100)] == [(2, 4), (2, 5), (2, 7), (2, 9), (2, 10), (2, 10)]
    for T0, T_plus, E in ((1, 3, 4), (20, 40, 3000), (3, 50, 7)):
        cfg = _config(current_max_start_epoch=T0, max_start_epoch=T_plus, expansion_end_iteration=E, iterations=E + 5)
        assert all(start_window(cfg, it) == (0, _t_cur(T0, T_plus, E, it)) for it in range(E + 5))
    # E = None: over the whole run (``iterations``)
    cfg = _config(current_max_start_epoch=1, max_start_epoch=3, iterations=8)
    assert [start_window(cfg, it)[1] for it in range(9)] == [_t_cur(1, 3, 8, it) for it in range(9)]
    # the defaults: MTT's fixed window [0, T+)
    assert {start_window(_config(), it) for it in range(50)} == {(0, 3)}


def test_plain_draws_are_the_old_ones(setup):
    """Off, the window draws exactly what ``torch.randint(T+)`` drew before it existed (same generator calls)."""
    ds, net, experts = setup
    d = Distiller(_config(max_start_epoch=3), ds, net, experts)
    g = torch.Generator()
    g.set_state(d.generator.get_state())
    for _ in range(20):
        expert, start, plan = d._draw()
        assert expert == int(torch.randint(len(experts), (1,), generator=g))
        assert start == int(torch.randint(3, (1,), generator=g))  # t ~ U{0, …, T+−1}, as before
        ref = make_plan(d.images.shape[0], 4, None, g)
        assert all(torch.equal(a, b) for a, b in zip(plan.batches, ref.batches)) and plan.aug_seeds == ref.aug_seeds


def test_draws_stay_in_the_growing_window(setup):
    ds, net, experts = setup
    c = _config(min_start_epoch=1, current_max_start_epoch=2, max_start_epoch=3, expansion_end_iteration=10)
    d = Distiller(c, ds, net, experts)
    seen = {}
    for it in (0, 4, 9, 10, 30):
        d.iteration = it
        seen[it] = {d._draw()[1] for _ in range(40)}
    assert seen[0] == seen[4] == seen[9] == {1}  # T_cur = 2 until iteration 10
    assert seen[10] == seen[30] == {1, 2}


# -- automatic N (ATT) -----------------------------------------------------------------------------------
def _att_problem(n=6, N=6, batch_syn=4, soft=False, seed=0, near=3):
    """float64 problem whose target lies near the student's own θ̂_near: n* is inside (1, N)."""
    net = tiny_convnet(num_classes=3, width=3, im=8)
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    if soft:
        y = torch.softmax(torch.randn(n, 3, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    ts = spec.flatten(dict(net.named_parameters())).detach()
    plan = make_plan(n, N, batch_syn, g)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    path = unroll(net, spec, ts, x, y.detach(), alpha, plan, DSA, create_graph=False, return_path=True).path
    step = (path[near] - path[near - 1]).norm()
    tt = path[near] + 0.2 * step * torch.randn(spec.num_params, generator=g, dtype=torch.float64) / math.sqrt(spec.num_params)
    return net, spec, x, y, ts, tt, plan, alpha


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["unroll", "exact"])
def test_n_star_is_the_brute_force_argmin_over_the_unroll_path(mode):
    for seed, near in ((0, 3), (1, 2), (2, 5)):
        net, spec, x, y, ts, tt, plan, alpha = _att_problem(seed=seed, near=near)
        path = unroll(net, spec, ts, x, y, alpha, plan, DSA, create_graph=False, return_path=True).path
        dists = [(th - tt).pow(2).sum().item() for th in path[1:]]  # ‖θ̂_n − θ*_{t+M}‖², n = 1 … N
        n_star = 1 + min(range(len(dists)), key=dists.__getitem__)
        mg = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, DSA, auto_steps=True)
        assert mg.steps.dtype == torch.int64 and mg.steps.dim() == 0
        assert int(mg.steps) == n_star and 1 < n_star < plan.syn_steps
        assert mg.loss.item() == pytest.approx(dists[n_star - 1] / (ts - tt).pow(2).sum().item(), rel=1e-12)
        assert mg.student_losses.shape == (plan.syn_steps,)  # the student still took N steps
        plain = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, DSA)
        assert int(plain.steps) == plan.syn_steps  # without auto_steps: N


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft-labels"])
def test_auto_steps_gradient_is_the_gradient_of_the_n_star_step_unroll_in_both_modes(soft):
    net, spec, x, y, ts, tt, plan, alpha = _att_problem(soft=soft)
    got = {m: meta_gradient(m, net, spec, ts, tt, x, y, alpha, plan, DSA, auto_steps=True) for m in ("unroll", "exact")}
    n_star = int(got["unroll"].steps)
    assert int(got["exact"].steps) == n_star and 1 < n_star < plan.syn_steps
    prefix = StepPlan(plan.batches[:n_star], plan.aug_seeds[:n_star])  # the same first n* steps
    for mode, mg in got.items():
        ref = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, prefix, DSA)  # plain MTT with N = n*
        assert mg.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
        assert _rel(mg.images, ref.images) <= 1e-10
        assert abs(mg.syn_lr.item() - ref.syn_lr.item()) <= 1e-10 * abs(ref.syn_lr.item())
        if soft:
            assert _rel(mg.labels, ref.labels) <= 1e-10
    # the two modes agree (float64), and the gradient is not the N-step one
    ex, un = got["exact"], got["unroll"]
    assert ex.loss.item() == pytest.approx(un.loss.item(), rel=1e-12)
    assert _rel(ex.images, un.images) <= 1e-6
    assert abs(ex.syn_lr.item() - un.syn_lr.item()) <= 1e-6 * abs(un.syn_lr.item())
    if soft:
        assert _rel(ex.labels, un.labels) <= 1e-6
    full = meta_gradient("unroll", net, spec, ts, tt, x, y, alpha, plan, DSA)
    assert _rel(un.images, full.images) > 1e-3


@pytest.mark.parametrize("mode", ["unroll", "exact"])
def test_auto_steps_and_soft_labels_run_on_a_device_without_host_syncs(mode):
    meta = torch.device("meta")
    net = tiny_convnet(num_classes=3, dtype=torch.float32).to(meta)
    spec = ParamSpec.from_module(net)
    ts, tt = torch.empty(spec.num_params, device=meta), torch.empty(spec.num_params, device=meta)
    x, y = torch.empty(6, 1, 8, 8, device=meta), torch.empty(6, 3, device=meta).requires_grad_(True)
    plan = make_plan(6, 4, 4, torch.Generator().manual_seed(0))
    with DeviceGuard(meta) as guard:
        mg = meta_gradient(mode, net, spec, ts, tt, x, y, torch.empty((), device=meta), plan, DSA, auto_steps=True)
    assert guard.ops > 100
    assert mg.steps.device.type == "meta" and mg.steps.shape == () and mg.labels.shape == (6, 3)


# -- soft labels (TESLA / DATM) -----------------------------------------------------------------------
def test_softmax_backward_is_the_chain_rule_through_softmax():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.softmax(z, 1)
    (ref,) = torch.autograd.grad(y, z, grad_y)
    torch.testing.assert_close(softmax_backward(y.detach(), grad_y), ref, rtol=1e-12, atol=1e-14)


def _expert_logits(net, experts, x, epoch=None):
    spec = ParamSpec.from_module(net)
    theta = experts.flat(0, max(experts.epochs) if epoch is None else epoch)
    with torch.no_grad():
        return functional_call(net, spec.unflatten(theta), (x,))


def test_soft_labels_start_from_the_expert_on_images_it_classifies_correctly(setup):
    ds, net, experts = setup
    c = _config(soft_labels=True, ipc=3)
    d = Distiller(c, ds, net, experts)
    n, K = 9, 3
    # The labels are expert 0's logits (last stored epoch) on the initial images; y = softmax(z).
    assert d.label_logits.shape == (n, K) and d.label_logits.requires_grad
    torch.testing.assert_close(d.label_logits.detach(), _expert_logits(net, experts, d.images.detach()))
    y = d.targets
    assert y.shape == (n, K) and (y >= 0).all() and torch.allclose(y.sum(1), torch.ones(n))
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # the class of each image stays
    # The images: per class, the first ipc of the same random order plain MTT uses that the expert gets right.
    g = torch.Generator().manual_seed(c.seed)
    pred = _expert_logits(net, experts, ds.train_images).argmax(1)
    expected = []
    for k in range(K):
        idx = torch.nonzero(ds.train_labels == k).flatten()
        order = idx[torch.randperm(len(idx), generator=g)]
        expected += [int(i) for i in order if pred[i] == k][:c.ipc]
    assert torch.equal(d.images.detach(), ds.train_images[expected])
    assert (pred[expected] == d.labels).all()
    # pix_init="noise": the same expert labels the noise images
    noisy = Distiller(_config(soft_labels=True, pix_init="noise"), ds, net, experts)
    torch.testing.assert_close(noisy.label_logits.detach(), _expert_logits(net, experts, noisy.images.detach()))


def test_soft_labels_with_a_class_the_expert_gets_wrong_fall_back_with_a_warning(setup):
    """An expert whose last epoch is all zeros: constant logits, argmax class 0 for every image."""
    ds, net, experts = setup
    zero = MemoryTrajectories([t[:-1] + [torch.zeros_like(t[-1])] for t in experts.trajectories])
    with pytest.warns(UserWarning) as caught:
        d = Distiller(_config(soft_labels=True), ds, net, zero)
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and all(f"only 0 of the 8 training images of class {k} correctly, fewer than ipc = 2: "
                                  "2 of its synthetic images start from misclassified ones" in m
                                  for k, m in zip((1, 2), said)), said
    plain = Distiller(_config(), ds, net, zero)
    assert torch.equal(d.images, plain.images)  # nothing classified right in 1 and 2, everything in 0: the plain picks
    assert torch.equal(d.targets, torch.full((6, 3), 1 / 3))


def test_soft_labels_take_an_sgd_step_on_dL_dz(setup):
    """After one iteration z = z0 − lr_y ∂L/∂z, with ∂L/∂z from autograd through y = softmax(z) and
    ∂L/∂y from meta_gradient on the same draw."""
    ds, net, experts = setup
    c = _config(soft_labels=True, lr_y=5.0, momentum=0.0, lr_img=1.0)
    d, twin = Distiller(c, ds, net, experts), Distiller(c, ds, net, experts)
    z0 = d.label_logits.detach().clone()
    expert, start, plan = twin._draw()
    d.step()
    z = z0.clone().requires_grad_(True)
    y = torch.softmax(z, 1)
    y_leaf = y.detach().requires_grad_(True)
    mg = meta_gradient(c.gradient, net, d.spec, experts.flat(expert, start), experts.flat(expert, start + 1),
                       twin.images, y_leaf, twin.syn_lr.detach(), plan, DSA)
    (dz,) = torch.autograd.grad(y, z, mg.labels)
    assert dz.abs().max() > 0
    torch.testing.assert_close(d.label_logits.detach(), z0 - 5.0 * dz, rtol=1e-5, atol=1e-7)
    assert d.targets.sum(1).sub(1).abs().max() < 1e-6


def test_exact_and_unroll_take_the_same_steps_with_every_switch_on(setup):
    ds, net, experts = setup
    runs = [run(Distiller(_config(gradient=m, iterations=3, **SWITCHES), ds, net, experts), progress=False)
            for m in ("exact", "unroll")]
    torch.testing.assert_close(runs[0].images, runs[1].images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[0].label_logits, runs[1].label_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[0].syn_lr, runs[1].syn_lr, rtol=1e-4, atol=1e-7)
    assert runs[0].history.student_steps == runs[1].history.student_steps


def test_history_records_n_star(setup):
    ds, net, experts = setup
    plain = run(Distiller(_config(iterations=3), ds, net, experts), progress=False)
    assert plain.history.student_steps == [4.0, 4.0, 4.0]
    seen = []
    auto = run(Distiller(_config(iterations=6, auto_steps=True), ds, net, experts), progress=False,
               callbacks=(lambda info: seen.append(info.student_steps),))
    assert auto.history.student_steps == seen and len(seen) == 6
    assert all(float(s).is_integer() and 1 <= s <= 4 for s in seen) and min(seen) < 4, seen


def test_non_finite_labels_are_refused_and_name_lr_y(setup, tmp_path, monkeypatch):
    """Constructed: an infinite step on the logits (∂L/∂z = ∞), so z leaves the finite numbers."""
    from mttlite import distill as D

    ds, net, experts = setup
    c = _config(soft_labels=True, iterations=3)
    d = Distiller(c, ds, net, experts)
    z0 = d.label_logits.detach().clone()
    monkeypatch.setattr(D, "softmax_backward", lambda y, grad_y: torch.full_like(grad_y, math.inf))
    with pytest.raises(DistillationDiverged, match="label logit became non-finite") as e:
        run(d, tmp_path, progress=False)
    monkeypatch.undo()
    assert e.value.knob == "lr_y" and e.value.resumable and "--lr-y" in str(e.value)
    assert torch.equal(d.label_logits.detach(), z0) and d.iteration == 0  # the last good state: the initial one
    d2 = run(Distiller(replace(c, lr_y=e.value.suggested), ds, net, experts), tmp_path, progress=False)
    assert d2.iteration == 3 and torch.isfinite(d2.label_logits).all()


# -- EMA of the pixels (FTD / DATM) --------------------------------------------------------------------
def test_ema_is_the_closed_form_over_the_recorded_images(setup):
    ds, net, experts = setup
    decay, k = 0.8, 5
    d = Distiller(_config(ema_decay=decay, iterations=k, lr_img=100.0), ds, net, experts)
    xs = [d.images.detach().clone().double()]
    run(d, progress=False, callbacks=(lambda info: xs.append(info.images.detach().clone().double()),))
    # x̄_k = d^k x_0 + (1 − d) Σ_{j=1..k} d^{k−j} x_j
    closed = decay ** k * xs[0] + (1 - decay) * sum(decay ** (k - j) * xs[j] for j in range(1, k + 1))
    torch.testing.assert_close(d.images_ema.double(), closed, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(d.images_ema, d.images)  # it is not the last image
    assert torch.equal(d.synset_images, d.images_ema)


def test_the_exported_set_holds_the_ema_images_and_the_soft_labels(setup):
    from mttlite.pipeline import to_synset

    class Buffer(MemoryTrajectories):
        meta, path = {"arch": "convnet", "arch_kwargs": {"width": 4}}, "memory"

    ds, net, experts = setup
    d = run(Distiller(_config(iterations=2, soft_labels=True, ema_decay=0.5), ds, net, experts), progress=False)
    s = to_synset(d, Buffer(experts.trajectories))
    assert torch.equal(s.images, d.images_ema) and not torch.equal(s.images, d.images.detach())
    assert s.labels.dtype == torch.float32 and s.labels.shape == (6, 3)
    torch.testing.assert_close(s.labels, torch.softmax(d.label_logits.detach(), 1))
    assert s.config["soft_labels"] and s.config["ema_decay"] == 0.5
    plain = to_synset(run(Distiller(_config(iterations=1), ds, net, experts), progress=False), Buffer([]))
    assert plain.labels.dtype == torch.int64


# -- checkpoints and the one host read -----------------------------------------------------------------
def test_resume_is_bit_identical_with_every_switch_on(setup, tmp_path):
    ds, net, experts = setup
    cfg = _config(**SWITCHES)
    full = run(Distiller(cfg, ds, net, experts), tmp_path / "a", progress=False)

    # stopped after iteration 5; the last checkpoint is iteration 4
    resumed = interrupt_then_resume(lambda: Distiller(cfg, ds, net, experts), tmp_path / "b", stop_at=5)
    for name in ("images", "label_logits", "images_ema", "alpha_raw"):
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    assert torch.equal(resumed.opt_y.state[resumed.label_logits]["momentum_buffer"],
                       full.opt_y.state[full.label_logits]["momentum_buffer"])
    assert asdict(resumed.history) | {"seconds": 0} == asdict(full.history) | {"seconds": 0}
    with pytest.raises(ValueError, match="soft_labels"):  # a switch cannot change on resume
        run(Distiller(replace(cfg, soft_labels=False, iterations=8), ds, net, experts), tmp_path / "b", progress=False)


def test_the_distiller_still_reads_the_host_once_per_iteration(setup, monkeypatch):
    ds, net, experts = setup
    for gradient in ("unroll", "exact"):
        d = Distiller(_config(gradient=gradient, **SWITCHES), ds, net, experts)
        reads = []
        for name in ("item", "tolist"):
            real = getattr(torch.Tensor, name)

            def spy(self, *a, _real=real, _name=name, **k):
                if self.is_floating_point():
                    reads.append((_name, tuple(self.shape)))
                return _real(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)
        d.step()
        monkeypatch.undo()
        assert reads == [("tolist", (NUM_SCALARS + 4,))], (gradient, reads)


def test_command_line_flags():
    from mttlite.cli import build_parser, _config_from

    args = build_parser().parse_args(
        "distill --buffer b --out o --soft-labels --lr-y 3 --min-start-epoch 1 --current-max-start-epoch 3 "
        "--expansion-end-iteration 10 --auto-steps --ema-decay 0.99".split())
    c = _config_from(args)
    assert (c.soft_labels, c.lr_y, c.min_start_epoch, c.current_max_start_epoch, c.expansion_end_iteration,
            c.auto_steps, c.ema_decay) == (True, 3.0, 1, 3, 10, True, 0.99)
    c = _config_from(build_parser().parse_args("distill --buffer b --out o --soft-labels false".split()))
    assert c.soft_labels is False and c.ema_decay is None and c == DistillConfig()
    with pytest.raises(ValueError, match=r"ema_decay must be None \(off\) or in \[0, 1\)"):
        _config_from(build_parser().parse_args("distill --buffer b --out o --ema-decay 1".split()))
    assert {f.name for f in fields(DistillConfig)} >= set(SWITCHES) | {"lr_y"}
