"""Parameter pruning of the matching loss (Li et al.'s mismatch criterion, PAD's depth rule).

Each against an independent answer: the masked loss against numbers worked out by hand, the masked
meta-gradient of both modes against each other and against float64 central finite differences of a
plain forward unroll (with and without ATT's automatic N), the mask builders against a brute-force
sort and layer counts in plain Python, an all-True mask against no mask (bit for bit), and the
Distiller's masked loss and mismatch mask against the same quantities rebuilt by hand.
"""
from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch

from core_helpers import MemoryTrajectories, interrupt_then_resume, sgd_trajectories, tiny_convnet, toy_dataset
from device_guard import DeviceGuard
from mttlite.distill import NUM_SCALARS, DistillConfig, Distiller, run, start_window
from mttlite.io import load_tensors
from mttlite.matching import matching_breakdown, matching_loss
from mttlite.meta_gradient import meta_gradient
from mttlite.params import ParamSpec
from mttlite.pruning import (
    PAD_DEPTH_RATIOS,
    check_mask,
    depth_mask,
    mask_counts,
    mismatch_mask,
    pad_depth_ratio,
)
from mttlite.student import make_plan, unroll

DSA = "color_crop_cutout_flip_scale_rotate"


# -- the masked loss --------------------------------------------------------------------------------
def test_masked_loss_by_hand():
    """θ̂ = (1, 0, 3, 0), θ* = 0, θ*_t = (2, 1, 0, 5), m = (1, 1, 1, 0): L_m = (1 + 9) / (4 + 1) = 2."""
    student = torch.tensor([1.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    target = torch.zeros(4, dtype=torch.float64)
    start = torch.tensor([2.0, 1.0, 0.0, 5.0], dtype=torch.float64)
    m = torch.tensor([True, True, True, False])
    assert matching_loss(student, start, target, mask=m).item() == 2.0
    assert matching_loss(student, start, target).item() == pytest.approx(10 / 30, rel=1e-15)  # unmasked: 10 / 30
    student[3] = math.inf  # a pruned entry cannot leak into the sums (0·∞ would)
    assert matching_loss(student, start, target, mask=m).item() == 2.0
    with pytest.raises(ValueError, match="did not move .* on the parameters the prune mask keeps"):
        matching_loss(student, start, target, mask=torch.tensor([False, False, True, False]))


def test_breakdown_shows_what_is_masked():
    net = tiny_convnet()
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(1)
    P = spec.num_params
    s, t, th = (torch.randn(P, generator=g, dtype=torch.float64) for _ in range(3))
    sl = spec.slices()
    m = torch.ones(P, dtype=torch.bool)
    m[sl["0.weight"]] = False  # the first conv, whole
    m[sl["5.weight"].start: sl["5.weight"].start + 7] = False  # 7 entries of the linear layer
    parts = matching_breakdown(spec, th, s, t, mask=m)
    assert sum(p["contribution"] for p in parts.values()) == pytest.approx(matching_loss(th, s, t, mask=m).item())
    assert sum(p["expert_share"] for p in parts.values()) == pytest.approx(1.0)
    n5 = sl["5.weight"].stop - sl["5.weight"].start
    assert {k: p["masked"] for k, p in parts.items()} == {k: {"0.weight": 1.0, "5.weight": 7 / n5}.get(k, 0.0) for k in sl}
    assert math.isnan(parts["0.weight"]["normalised"]) and parts["0.weight"]["contribution"] == 0.0
    w = slice(sl["5.weight"].start + 7, sl["5.weight"].stop)  # the linear layer's own L over its kept entries
    assert parts["5.weight"]["normalised"] == pytest.approx(((th[w] - t[w]) ** 2).sum().item() / ((s[w] - t[w]) ** 2).sum().item())
    assert all(p["masked"] == 0.0 for p in matching_breakdown(spec, th, s, t).values())


# -- the mask builders --------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.37, 0.5, 0.999])
def test_mismatch_mask_is_the_brute_force_top_k(beta):
    g = torch.Generator().manual_seed(3)
    P = 211
    student = torch.randn(P, generator=g, dtype=torch.float64)
    target = student + torch.randn(P, generator=g, dtype=torch.float64).mul(4).round() / 4  # many ties in |d|
    d = (student - target).abs().tolist()
    k = math.floor(beta * P)
    pruned = sorted(range(P), key=lambda i: (-d[i], i))[:k]  # largest mismatch first, the earlier on a tie
    expected = [i not in set(pruned) for i in range(P)]
    assert mismatch_mask(student, target, beta).tolist() == expected
    assert int((~mismatch_mask(student, target, beta)).sum()) == k < P


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_depth_mask_prunes_the_first_layers_by_count(ratio):
    spec = ParamSpec.from_module(tiny_convnet(width=4))
    P = spec.num_params
    k = int(ratio * P)  # PAD: keep = indices[int(depth_ratio * P):]
    m = depth_mask(spec, ratio)
    assert m.dtype == torch.bool and m.shape == (P,)
    assert m.tolist() == [i >= k for i in range(P)]
    counts, start = {}, 0  # layer by layer, in plain arithmetic: a layer is cut where the count ends
    for name, shape in zip(spec.names, spec.shapes):
        n = math.prod(shape)
        counts[name] = {"masked": min(max(k - start, 0), n), "total": n}
        start += n
    assert mask_counts(spec, m) == counts


def test_pad_depth_ratio_table():
    assert PAD_DEPTH_RATIOS == {1: 0.0, 10: 0.5, 50: 0.5, 500: 0.5, 1000: 0.5}
    assert [pad_depth_ratio(i) for i in (1, 2, 9, 10, 49, 50, 100, 1000, 5000)] == [0.0, 0.0, 0.0] + [0.5] * 6
    with pytest.raises(ValueError, match="ipc"):
        pad_depth_ratio(0)


def test_builders_on_a_device_do_not_read_the_host():
    meta = torch.device("meta")
    spec = ParamSpec.from_module(tiny_convnet())
    a, b = torch.empty(spec.num_params, device=meta), torch.empty(spec.num_params, device=meta)
    with DeviceGuard(meta) as guard:
        m1, m2 = mismatch_mask(a, b, 0.3), depth_mask(spec, 0.5, device=meta)
    assert guard.ops > 0 and m1.device.type == m2.device.type == "meta" and m1.dtype == m2.dtype == torch.bool


# -- bad settings -------------------------------------------------------------------------------------
def _config(**kw):
    base = dict(dataset="toy", ipc=2, syn_steps=4, expert_epochs=1, max_start_epoch=3, iterations=3, lr_img=10.0,
                lr_lr=1e-4, lr_teacher=0.05, dsa_strategy=DSA, checkpoint_every=2, seed=7)
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize("kw, field, valid", [
    (dict(prune_rule="depth", prune_fraction=1.0), "prune_fraction", "[0, 1)"),
    (dict(prune_rule="depth", prune_fraction=-0.1), "prune_fraction", "[0, 1)"),
    (dict(prune_rule="mismatch", prune_fraction=math.nan), "prune_fraction", "[0, 1)"),
    (dict(prune_rule="mismatch", prune_fraction=True), "prune_fraction", "[0, 1)"),
    (dict(prune_rule="mismatch", prune_fraction="0.5"), "prune_fraction", "[0, 1)"),
    (dict(prune_rule="mismatch"), "prune_fraction", "[0, 1)"),  # β is required with 'mismatch'
    (dict(prune_fraction=0.3), "prune_fraction", "prune_rule is None"),  # β without a rule would do nothing
    (dict(prune_rule="random", prune_fraction=0.3), "prune_rule", "('mismatch', 'depth')"),
])
def test_bad_settings_name_the_field_and_its_range(kw, field, valid):
    with pytest.raises(ValueError) as e:
        _config(**kw).validate()
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith(field) and valid in lines[0], str(e.value)


def test_a_mask_that_leaves_nothing_to_match_is_refused():
    P = 10
    with pytest.raises(ValueError, match=r"prune_fraction must be in \[0, 1\)"):
        mismatch_mask(torch.zeros(P), torch.ones(P), 1.0)
    with pytest.raises(ValueError, match=r"prune_fraction must be in \[0, 1\)"):
        depth_mask(ParamSpec(("w",), ((P,),)), -0.5)
    with pytest.raises(ValueError, match="prune_fraction: the prune mask prunes all 10 parameters"):
        check_mask(torch.zeros(P, dtype=torch.bool))
    start, target = torch.zeros(P), torch.zeros(P)
    target[:3] = 1.0  # the expert moved on the first 3 entries only
    m = torch.arange(P) >= 3
    with pytest.raises(ValueError, match="prune_fraction: the expert did not move on the 7 parameters"):
        check_mask(m, start, target)
    assert check_mask(~m, start, target) is not None
    net = tiny_convnet(num_classes=3, width=2, im=4)
    spec = ParamSpec.from_module(net)
    theta = spec.flatten(dict(net.named_parameters())).detach()
    x, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.arange(3)
    plan = make_plan(3, 2, None, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        meta_gradient("exact", net, spec, theta, theta + 1, x, y, torch.tensor(0.1, dtype=torch.float64), plan, "",
                      mask=torch.ones(spec.num_params))


# -- the meta-gradient with a mask: exact ---------------------------------------------------------------
def _problem(n=6, N=5, batch_syn=4, seed=0, soft=False):
    net = tiny_convnet(num_classes=3, width=3, im=8)
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    if soft:
        y = torch.softmax(torch.randn(n, 3, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    ts = spec.flatten(dict(net.named_parameters())).detach()
    tt = ts + 0.05 * torch.randn(spec.num_params, generator=g, dtype=torch.float64)
    plan = make_plan(n, N, batch_syn, g)
    mask = torch.rand(spec.num_params, generator=g) > 0.4  # ~40 % pruned, scattered over every layer
    return net, spec, x, y, ts, tt, plan, mask


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _fd_loss(net, spec, ts, tt, x, y, alpha, plan, mask, auto):
    """L_m from a plain forward unroll (no graph): at N, or with ``auto`` at the brute-force masked argmin."""
    path = unroll(net, spec, ts, x, y, alpha, plan, DSA, create_graph=False, return_path=True).path
    den = ((ts - tt)[mask] ** 2).sum()
    dists = [((th - tt)[mask] ** 2).sum() for th in path[1:]]
    n = min(range(len(dists)), key=lambda i: dists[i].item()) if auto else len(dists) - 1
    return (dists[n] / den).item(), n + 1


@pytest.mark.parametrize("auto", [False, True], ids=["N", "auto_steps"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft-labels"])
def test_masked_gradient_exact_equals_unroll_equals_finite_differences(auto, soft):
    net, spec, x, y, ts, tt, plan, mask = _problem(soft=soft)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    got = {m: meta_gradient(m, net, spec, ts, tt, x, y, alpha, plan, DSA, auto_steps=auto, mask=mask)
           for m in ("unroll", "exact")}
    ex, un = got["exact"], got["unroll"]
    assert ex.loss.item() == pytest.approx(un.loss.item(), rel=1e-12) and int(ex.steps) == int(un.steps)
    assert _rel(ex.images, un.images) <= 1e-6
    assert abs(ex.syn_lr.item() - un.syn_lr.item()) <= 1e-6 * abs(un.syn_lr.item())
    if soft:
        assert _rel(ex.labels, un.labels) <= 1e-6
    # against float64 central differences of L_m along random directions (x, α and the labels)
    yd = y.detach()
    L0, n0 = _fd_loss(net, spec, ts, tt, x, yd, alpha, plan, mask, auto)
    assert ex.loss.item() == pytest.approx(L0, rel=1e-12) and int(ex.steps) == n0
    g = torch.Generator().manual_seed(9)
    eps = 1e-6
    for _ in range(2):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        (lp, np_), (lm, nm) = (_fd_loss(net, spec, ts, tt, x + s * eps * v, yd, alpha, plan, mask, auto) for s in (1, -1))
        assert np_ == nm == n0  # n* does not switch inside the difference
        assert (ex.images * v).sum().item() == pytest.approx((lp - lm) / (2 * eps), rel=1e-5)
    lp, _ = _fd_loss(net, spec, ts, tt, x, yd, alpha + eps, plan, mask, auto)
    lm, _ = _fd_loss(net, spec, ts, tt, x, yd, alpha - eps, plan, mask, auto)
    assert ex.syn_lr.item() == pytest.approx((lp - lm) / (2 * eps), rel=1e-5)
    if soft:
        u = torch.randn(yd.shape, generator=g, dtype=torch.float64)
        lp, _ = _fd_loss(net, spec, ts, tt, x, yd + eps * u, alpha, plan, mask, auto)
        lm, _ = _fd_loss(net, spec, ts, tt, x, yd - eps * u, alpha, plan, mask, auto)
        assert (ex.labels * u).sum().item() == pytest.approx((lp - lm) / (2 * eps), rel=1e-5)
    # the mask matters: the unmasked gradient is another one
    plain = meta_gradient("exact", net, spec, ts, tt, x, y, alpha, plan, DSA, auto_steps=auto)
    assert _rel(plain.images, ex.images) > 1e-2


@pytest.mark.parametrize("mode", ["unroll", "exact"])
@pytest.mark.parametrize("auto", [False, True], ids=["N", "auto_steps"])
def test_an_all_true_mask_is_bit_identical_to_none(mode, auto):
    net, spec, x, y, ts, tt, plan, _ = _problem(soft=True)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    ones = torch.ones(spec.num_params, dtype=torch.bool)
    a = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, DSA, auto_steps=auto, mask=ones)
    b = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, DSA, auto_steps=auto)
    for name in ("loss", "images", "labels", "syn_lr", "steps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(matching_loss(ts + 1, ts, tt, mask=ones), matching_loss(ts + 1, ts, tt))


def test_auto_steps_picks_the_closest_step_on_the_masked_distance():
    """θ*_{t+M} = θ̂_2 on the kept entries and θ̂_N on the pruned ones: n* = 2 with the mask, N without."""
    net, spec, x, y, ts, _, plan, _ = _problem(N=6)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    path = unroll(net, spec, ts, x, y, alpha, plan, DSA, create_graph=False, return_path=True).path
    mask = depth_mask(spec, 0.8)  # the first 80 % pruned
    tt = torch.where(mask, path[2], path[6]) + 1e-6 * torch.randn(spec.num_params, dtype=torch.float64,
                                                                  generator=torch.Generator().manual_seed(2))
    for mode in ("unroll", "exact"):
        assert int(meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, DSA, auto_steps=True, mask=mask).steps) == 2
        assert int(meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, DSA, auto_steps=True).steps) == 6


@pytest.mark.parametrize("mode", ["unroll", "exact"])
def test_masked_meta_gradient_runs_on_a_device_without_host_syncs(mode):
    meta = torch.device("meta")
    net = tiny_convnet(num_classes=3, dtype=torch.float32).to(meta)
    spec = ParamSpec.from_module(net)
    ts, tt = torch.empty(spec.num_params, device=meta), torch.empty(spec.num_params, device=meta)
    x, y = torch.empty(6, 1, 8, 8, device=meta), torch.arange(6, device=meta) % 3
    plan = make_plan(6, 4, 4, torch.Generator().manual_seed(0))
    with DeviceGuard(meta) as guard:
        mg = meta_gradient(mode, net, spec, ts, tt, x, y, torch.empty((), device=meta), plan, DSA, auto_steps=True,
                           mask=depth_mask(spec, 0.5, device=meta))
    assert guard.ops > 100 and mg.images.device.type == "meta"


# -- the Distiller ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    ds = toy_dataset()
    net = tiny_convnet(num_classes=3, width=4, im=8, dtype=torch.float32)
    experts = sgd_trajectories(net, ds.train_images, ds.train_labels, num_experts=2, epochs=4, lr=0.1)
    return ds, net, experts


def test_pruning_is_off_by_default_and_old_files_load(setup):
    c = DistillConfig()
    assert (c.prune_rule, c.prune_fraction) == (None, None)
    old = {k: v for k, v in c.to_dict().items() if k not in ("prune_rule", "prune_fraction")}
    assert DistillConfig.from_dict(old) == c
    ds, net, experts = setup
    d = Distiller(_config(), ds, net, experts)
    assert d.prune_mask is None and d.prune_counts is None
    # β = 0 prunes nothing: the same run, bit for bit (the probe leaves the run's draws alone)
    plain = run(Distiller(_config(iterations=2), ds, net, experts), progress=False)
    for rule in ("mismatch", "depth"):
        zero = run(Distiller(_config(iterations=2, prune_rule=rule, prune_fraction=0.0), ds, net, experts), progress=False)
        assert zero.prune_mask.all() and torch.equal(zero.images, plain.images) and zero.history.loss == plain.history.loss


def _masked_loss_of_first_iteration(d, twin, net, experts, mask):
    """L_m of the draw ``d.step()`` makes, rebuilt from a forward unroll of its twin (same seed, untouched)."""
    c = d.config
    expert, start, plan = twin._draw()
    ts, tt = experts.flat(expert, start), experts.flat(expert, start + c.expert_epochs)
    theta = unroll(net, d.spec, ts, twin.images.detach(), twin.labels, twin.syn_lr.detach(), plan, DSA,
                   create_graph=False).theta
    return matching_loss(theta, ts, tt, mask=mask).item()


def test_depth_rule_in_the_distiller(setup, tmp_path):
    ds, net, experts = setup
    c = _config(prune_rule="depth", prune_fraction=0.6)
    d, twin = Distiller(c, ds, net, experts), Distiller(c, ds, net, experts)
    P = d.spec.num_params
    hand = torch.arange(P) >= int(0.6 * P)
    assert torch.equal(d.prune_mask, hand)
    expected = _masked_loss_of_first_iteration(d, twin, net, experts, hand)
    info = d.step()
    assert info.loss == pytest.approx(expected, rel=1e-5)
    run(d, tmp_path, progress=False)
    _, meta = load_tensors(tmp_path / "checkpoint.safetensors", "mttlite-checkpoint", "checkpoint")
    assert meta["prune_counts"] == mask_counts(d.spec, hand) == d.prune_counts
    assert sum(v["masked"] for v in meta["prune_counts"].values()) == int(0.6 * P)
    # prune_fraction None: PAD's ratio for the IPC (ipc 2 → IPC 1's 0.0: an all-True mask, the plain run)
    pad = Distiller(_config(prune_rule="depth"), ds, net, experts)
    assert pad.prune_mask.all()
    pad10 = Distiller(_config(prune_rule="depth", ipc=10, batch_syn=6), toy_dataset(n_per_class=10), net, experts)
    assert int((~pad10.prune_mask).sum()) == int(0.5 * P)


def test_mismatch_rule_in_the_distiller(setup):
    ds, net, experts = setup
    c = _config(prune_rule="mismatch", prune_fraction=0.2)
    d, twin = Distiller(c, ds, net, experts), Distiller(c, ds, net, experts)
    plain = Distiller(_config(), ds, net, experts)
    assert torch.equal(d.generator.get_state(), plain.generator.get_state())  # the run's draws are untouched
    # the probe, by hand: its own generator seeded with `seed`, N steps from the initial state, then the top k
    g = torch.Generator().manual_seed(c.seed)
    expert = int(torch.randint(len(experts), (1,), generator=g))
    start = int(torch.randint(*start_window(c, 0), (1,), generator=g))
    plan = make_plan(d.images.shape[0], c.syn_steps, c.batch_syn, g)
    theta = unroll(net, d.spec, experts.flat(expert, start), plain.images.detach(), plain.labels,
                   torch.tensor(c.lr_teacher), plan, DSA, create_graph=False).theta
    diff = (theta - experts.flat(expert, start + c.expert_epochs)).abs().tolist()
    P = len(diff)
    pruned = set(sorted(range(P), key=lambda i: (-diff[i], i))[:int(0.2 * P)])
    hand = torch.tensor([i not in pruned for i in range(P)])
    assert torch.equal(d.prune_mask, hand)
    expected = _masked_loss_of_first_iteration(d, twin, net, experts, hand)
    assert d.step().loss == pytest.approx(expected, rel=1e-5)


def test_exact_and_unroll_take_the_same_steps_with_pruning_and_auto_steps(setup):
    ds, net, experts = setup
    for rule, beta in (("mismatch", 0.3), ("depth", 0.5)):
        runs = [run(Distiller(_config(gradient=m, iterations=2, prune_rule=rule, prune_fraction=beta, auto_steps=True),
                              ds, net, experts), progress=False) for m in ("exact", "unroll")]
        torch.testing.assert_close(runs[0].images, runs[1].images, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(runs[0].syn_lr, runs[1].syn_lr, rtol=1e-4, atol=1e-7)
        assert runs[0].history.student_steps == runs[1].history.student_steps
        assert runs[0].history.loss == pytest.approx(runs[1].history.loss, rel=1e-5)


def test_resume_is_bit_identical_with_the_mismatch_mask(setup, tmp_path):
    ds, net, experts = setup
    cfg = _config(prune_rule="mismatch", prune_fraction=0.25, iterations=4)
    full = run(Distiller(cfg, ds, net, experts), tmp_path / "a", progress=False)

    # stopped after iteration 3; the last checkpoint is iteration 2
    resumed = interrupt_then_resume(lambda: Distiller(cfg, ds, net, experts), tmp_path / "b", stop_at=3)
    assert torch.equal(resumed.images, full.images) and torch.equal(resumed.alpha_raw, full.alpha_raw)
    with pytest.raises(ValueError, match="prune_fraction"):  # the mask cannot change on resume
        run(Distiller(replace(cfg, prune_fraction=0.5, iterations=5), ds, net, experts), tmp_path / "b", progress=False)


def test_an_expert_that_does_not_move_on_the_kept_parameters_is_refused(setup):
    """The experts move their linear bias (the last 3 entries) only, and by far the most: 'mismatch' prunes
    exactly those, leaving an expert that did not move; 'depth' keeps only entries that never move."""
    ds, net, experts = setup
    theta0 = experts.trajectories[0][0]
    step = torch.zeros_like(theta0)
    step[-3:] = 100.0
    frozen = MemoryTrajectories([[theta0 + e * step for e in range(5)] for _ in range(2)])
    with pytest.raises(ValueError, match="prune_fraction: the expert did not move on the"):
        Distiller(_config(prune_rule="mismatch", prune_fraction=0.05), ds, net, frozen)
    still = MemoryTrajectories([[torch.where(torch.arange(len(theta0)) < len(theta0) - 10, theta0 + e, theta0)
                                 for e in range(5)] for _ in range(2)])
    d = Distiller(_config(prune_rule="depth", prune_fraction=0.99), ds, net, still)
    with pytest.raises(ValueError, match="did not move .* on the parameters prune_rule keeps \\(lower prune_fraction\\)"):
        d.step()


def test_the_distiller_still_reads_the_host_once_per_iteration(setup, monkeypatch):
    ds, net, experts = setup
    for gradient in ("unroll", "exact"):
        d = Distiller(_config(gradient=gradient, prune_rule="mismatch", prune_fraction=0.3, auto_steps=True),
                      ds, net, experts)
        reads = []
        for name in ("item", "tolist"):
            real = getattr(torch.Tensor, name)

            def spy(self, *a, _real=real, _name=name, _reads=reads, **k):
                if self.is_floating_point():
                    _reads.append((_name, tuple(self.shape)))
                return _real(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)
        d.step()
        monkeypatch.undo()
        assert reads == [("tolist", (NUM_SCALARS + 4,))], (gradient, reads)


def test_command_line_flags():
    from mttlite.cli import _config_from, build_parser

    def parse(line):
        return _config_from(build_parser().parse_args(("distill --buffer b --out o " + line).split()))

    c = parse("--prune-rule depth --prune-fraction 0.25")
    assert (c.prune_rule, c.prune_fraction) == ("depth", 0.25)
    assert parse("--prune-rule depth").prune_fraction is None  # PAD's ratio for the IPC
    assert parse("--prune-rule none") == DistillConfig()
    with pytest.raises(ValueError, match=r"prune_fraction must be in \[0, 1\)"):
        parse("--prune-rule mismatch --prune-fraction 1")
    with pytest.raises(ValueError, match="prune_fraction must be given"):
        parse("--prune-rule mismatch")
    assert {"prune_rule", "prune_fraction"} <= {f.name for f in fields(DistillConfig)}
