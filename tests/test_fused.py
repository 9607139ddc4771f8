"""The fused student step (mttlite.fused) and DSA as data (mttlite.omega): the same numbers as the eager path.

Independent answers: eager DSA (``mttlite.augment.dsa``, itself checked against DiffAugment's ops by hand
in test_augment.py) for ω; the eager meta-gradient (``mttlite.meta_gradient``, checked against an
independent unroll and finite differences in test_meta_gradient.py) for the fused one — in float64 to
rounding, compiled and not; an uninterrupted run for a resumed one; a pinned budget for the operations a
student step issues (``mttlite.opcount``).

Compiling costs about a minute per graph on 2 cores, so the compiled tests share three compilations:
the tiny network in float64 (module fixture ``compiled64``), the tiny network in float32 (the fused
Distillers; torch's on-disk graph cache makes every later build of the same graph cheap), and ConvNet-3
in float32 (the operation budget).
"""
from __future__ import annotations

import pytest
import torch

from core_helpers import interrupt_then_resume, sgd_trajectories, tiny_convnet, toy_dataset
from mttlite.augment import DSA_STRATEGY, DSAParams, dsa
from mttlite.distill import DistillConfig, Distiller, run
from mttlite.fused import FusedStep, choose_step, forward_gflop, fusable, plan_data
from mttlite.meta_gradient import meta_gradient
from mttlite.networks import get_network
from mttlite.omega import COLUMNS, IDENTITY, apply_omega, draw_omega
from mttlite.opcount import count_ops, ops_per_student_step
from mttlite.params import ParamSpec
from mttlite.student import make_plan

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")

# One torch thread (tests/conftest.py): the kernels compiled here then match those of the suite's other
# one-thread runs (the benchmarks at toy size, the notebooks), so torch's on-disk graph cache serves them all.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# ω: DSA's draws as data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_omega_is_eager_dsa_draw_for_draw(dtype, device):
    """For the same seed, A_ω(x) is dsa(x) bit for bit, and so is its gradient, for every op."""
    x = torch.randn(6, 3, 12, 10, dtype=dtype, device=device, requires_grad=True)
    cot = torch.randn_like(x)
    seen = set()
    for seed in range(120):
        om = draw_omega(DSA_STRATEGY, seed, 6, (12, 10), dtype=dtype)
        seen.add(OPS[int(torch.randint(0, 6, (1,), generator=torch.Generator().manual_seed(seed)))])
        a, b = dsa(x, DSA_STRATEGY, seed), apply_omega(x, om.to(device))
        assert torch.equal(a, b), seed
        ga, gb = (torch.autograd.grad(t, x, cot)[0] for t in (a, b))
        assert torch.equal(ga, gb), seed
    assert seen == set(OPS)  # every op was exercised


def test_omega_single_op_strategies_and_no_augmentation():
    x = torch.randn(4, 1, 8, 8)
    for op in OPS:
        for seed in range(10):
            assert torch.equal(apply_omega(x, draw_omega(op, seed, 4, (8, 8))), dsa(x, op, seed)), (op, seed)
    for none in (None, "", "none"):
        om = draw_omega(none, 3, 4, (8, 8))
        assert torch.equal(om, IDENTITY.float().repeat(4, 1)) and torch.equal(apply_omega(x, om), x)
    with pytest.raises(ValueError, match="step='eager'"):
        draw_omega(DSA_STRATEGY, 0, 4, (8, 8), DSAParams(texture_crop=(8, 8)))


def test_omega_draws_follow_the_documented_distributions():
    """Statistics of 3000 draws: each op chosen ~1/6 of the time; crop shifts uniform on {-s..s}; half the
    samples of a flip batch flipped (the draws are eager DSA's own, so this checks the columns' meaning)."""
    ops, shifts, flips = [], [], []
    for seed in range(3000):
        om = draw_omega(DSA_STRATEGY, seed, 8, (16, 16))
        c = {name: om[:, i] for i, name in enumerate(COLUMNS)}
        op = ("color" if c["color"].any() else "cutout" if c["cut"].any() else "crop" if
              (c["crop_y"] != 0).any() or (c["crop_x"] != 0).any() else "flip?" if not c["warp"].any() else
              "scale" if (c["t01"] == 0).all() else "rotate")
        ops.append(op)
        if op == "crop":
            shifts += c["crop_y"].tolist()
        if op == "flip?":
            flips += c["flip"].tolist()
    share = {k: ops.count(k) / len(ops) for k in set(ops)}
    for k in ("color", "cutout", "scale", "rotate"):
        assert abs(share[k] - 1 / 6) < 0.03, share
    assert abs(share["crop"] + share["flip?"] - 2 / 6) < 0.04, share  # a crop of (0, 0) looks like no op
    assert set(shifts) == set(range(-2, 3)) and abs(sum(shifts) / len(shifts)) < 0.15
    assert abs(sum(flips) / len(flips) - 0.5) < 0.05


def test_plan_data_pads_a_ragged_last_batch():
    plan = make_plan(7, 5, 3, torch.Generator().manual_seed(1))  # batches of 3, 3, 1, 3, 3
    d = plan_data(plan, 3, DSA_STRATEGY, (8, 8), DSAParams(), torch.float64)
    assert d.index.shape == (5, 3) and d.weight.shape == (5, 3) and d.omega.shape == (5, 3, len(COLUMNS))
    for i, b in enumerate(plan.batches):
        n = len(b)
        assert d.index[i, :n].tolist() == b.tolist() and (d.index[i, n:] == 0).all()
        assert torch.allclose(d.weight[i].sum(), torch.tensor(1.0, dtype=torch.float64))
        assert (d.weight[i, n:] == 0).all()
        assert torch.equal(d.omega[i, :n], draw_omega(DSA_STRATEGY, plan.aug_seeds[i], n, (8, 8), dtype=torch.float64))
        assert torch.equal(d.omega[i, n:], IDENTITY.repeat(3 - n, 1))
    with pytest.raises(ValueError, match="at most 2"):
        plan_data(plan, 2, DSA_STRATEGY, (8, 8), DSAParams(), torch.float64)


# ---------------------------------------------------------------------------------------------
# The step functions against the eager meta-gradient
# ---------------------------------------------------------------------------------------------
def _problem(dtype=torch.float64, n=12, steps=4, batch=5, seed=0, net=None):
    net = tiny_convnet(dtype=dtype, seed=seed) if net is None else net
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(seed)
    theta = spec.flatten(dict(net.named_parameters())).detach()
    target = theta + 0.05 * torch.randn(theta.shape, generator=g, dtype=dtype)
    x = torch.randn(n, *net[0].weight.shape[1:2], 8, 8, generator=g, dtype=dtype)
    hard = torch.arange(3).repeat(n // 3)
    soft = torch.softmax(torch.randn(n, 3, generator=g, dtype=dtype), 1).requires_grad_(True)
    plan = make_plan(n, steps, batch, g)
    mask = torch.rand(theta.shape, generator=g) > 0.3
    return net, spec, theta, target, x, hard, soft, torch.tensor(0.05), plan, mask  # α float32, as a Distiller's


CASES = {  # (labels, DSA, auto_steps, mask, loss scale)
    "hard": ("hard", DSA_STRATEGY, False, False, None),
    "no-dsa": ("hard", "", False, False, None),
    "soft+mask": ("soft", DSA_STRATEGY, False, True, None),
    "att+mask": ("hard", DSA_STRATEGY, True, True, None),
    "scaled": ("soft", DSA_STRATEGY, False, False, 2.0 ** 6),
}


def _compare(fs, mode, case, prob, rtol, atol=0.0, **eager_kw):
    net, spec, theta, target, x, hard, soft, alpha, plan, mask = prob
    labels, strategy, auto, use_mask, scale = CASES[case]
    y = soft if labels == "soft" else hard
    m = mask if use_mask else None
    fs.dsa_strategy = strategy  # the strategy only decides ω (data): the same graph
    want = meta_gradient(mode, net, spec, theta, target, x, y, alpha, plan, strategy, auto_steps=auto, mask=m,
                         loss_scale=scale, **eager_kw)
    got = fs.meta_gradient(mode, theta, target, x, y, alpha, plan, auto_steps=auto, loss_scale=scale, mask=m)
    for name in ("loss", "images", "labels", "syn_lr", "student_losses"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * float(b.abs().max()), msg=f"{mode} {case}: {name}")
    assert torch.equal(got.steps, want.steps)


@pytest.mark.parametrize("mode", ["exact", "unroll"])
@pytest.mark.parametrize("case", list(CASES))
def test_step_functions_equal_the_eager_meta_gradient_in_float64(mode, case):
    """The traced functions, run eagerly (compile=False): the same L, ∂L/∂x, ∂L/∂y, ∂L/∂α, ℓ_i and n* as the
    eager path to float64 rounding — with a ragged last batch (12 images in batches of 5)."""
    prob = _problem()
    fs = FusedStep(prob[0], prob[1], batch=5, im_size=(8, 8), dsa_strategy=DSA_STRATEGY, compile=False)
    _compare(fs, mode, case, prob, rtol=1e-10)


def test_fusable_network_is_the_same_function_with_the_same_names():
    torch.manual_seed(0)
    net = get_network("convnet", 1, 10, (28, 28), width=8).double()
    plain = fusable(net)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in net.named_parameters()]
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(plain(x), net(x), rtol=1e-10, atol=1e-12)
    assert {type(m).__name__ for m in plain.modules()} >= {"Im2colConv2d", "MeanPool2x2", "GroupNorm"}
    assert "Im2colConv2d" not in {type(m).__name__ for m in fusable(net, "meta").modules()}  # CPU only
    rgb = get_network("convnet", 3, 10, (32, 32), width=8).double()  # 3 channels: 27 columns, channel-major
    x3 = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fusable(rgb)(x3), rgb(x3), rtol=1e-10, atol=1e-12)


def test_fused_step_refuses_what_it_cannot_do():
    prob = _problem()
    with pytest.raises(ValueError, match="texture"):
        FusedStep(prob[0], prob[1], batch=5, im_size=(8, 8), dsa_strategy="", dsa_params=DSAParams(texture_crop=(8, 8)))
    fs = FusedStep(prob[0], prob[1], batch=5, im_size=(8, 8), dsa_strategy="", compile=False)
    with pytest.raises(ValueError, match="16, 16"):
        fs.meta_gradient("exact", prob[2], prob[3], torch.zeros(12, 1, 16, 16, dtype=torch.float64), prob[5],
                         prob[7], prob[8])
    with pytest.raises(ValueError, match="unknown gradient mode"):
        fs.meta_gradient("tesla", *prob[2:6], prob[7], prob[8])


def test_choose_step():
    assert choose_step("eager", "cuda", 10**6, 1.0) == ("eager", "set")
    assert choose_step("auto", "cuda", 1, 1.0)[0] == "fused"
    assert choose_step("auto", "cuda", 10**6, 1.0, texture=True)[0] == "eager"
    assert choose_step("auto", "meta", 10**6, 1.0)[0] == "eager"
    assert choose_step("auto", "cpu", 10, 0.05)[0] == "eager"  # a short run cannot pay for the compile
    assert choose_step("auto", "cpu", 10**6, 0.05)[0] == "fused"  # a long one can
    with pytest.raises(ValueError, match="step must be"):
        choose_step("fast", "cpu", 1, 1.0)
    net = get_network("convnet", 1, 10, (28, 28), width=32)
    # ConvNet-3 width 32 on 1×28×28: 32·32² ·9·2 + 32·32·16²·9·2 + 32·32·8²·9·2 + 2048·10·2 FLOPs per image
    want = (32 * 32 ** 2 * 9 * 2 + 32 * 32 * 16 ** 2 * 9 * 2 + 32 * 32 * 8 ** 2 * 9 * 2 + 512 * 10 * 2) * 10 / 1e9
    assert forward_gflop(net, (1, 28, 28), 10) == pytest.approx(want)


# ---------------------------------------------------------------------------------------------
# Compiled (torch.compile, fullgraph=True, dynamic=False)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled64():
    prob = _problem()
    torch._dynamo.utils.counters.clear()
    fs = FusedStep(prob[0], prob[1], batch=5, im_size=(8, 8), dsa_strategy=DSA_STRATEGY)
    return fs, prob


@pytest.mark.slow
@pytest.mark.parametrize("mode, cases", [("exact", ("hard", "no-dsa", "soft+mask", "att+mask")),
                                         ("unroll", ("soft+mask",))])
def test_compiled_step_equals_eager_in_float64(compiled64, mode, cases):
    """Compiled over torch's layers, the fused meta-gradient is the eager one to float64 rounding — the
    exact mode's two sweeps, and the unroll differentiating the compiled step gradient by autograd — with
    no graph break (fullgraph=True refuses one) and, for a new DSA strategy, no recompilation."""
    fs, prob = compiled64
    for case in cases:
        _compare(fs, mode, case, prob, rtol=1e-9, atol=1e-12)
    assert not torch._dynamo.utils.counters["graph_break"]


def _toy_setup(dtype=torch.float32):
    ds = toy_dataset()
    ds.train_images = ds.train_images.to(dtype)
    net = tiny_convnet(num_classes=3, width=4, im=8, dtype=dtype)
    experts = sgd_trajectories(net, ds.train_images, ds.train_labels, num_experts=2, epochs=4, lr=0.1)
    return ds, net, experts


def _config(**kw):
    base = dict(dataset="toy", ipc=4, syn_steps=3, expert_epochs=1, max_start_epoch=3, iterations=6, lr_img=10.0,
                lr_lr=1e-4, lr_teacher=0.05, dsa_strategy=DSA_STRATEGY, checkpoint_every=2, seed=7, batch_syn=5)
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.slow
def test_fused_distillation_matches_eager_and_resumes_bit_identically(compiled64, tmp_path):
    """Three fused iterations take the eager path's steps; an interrupted fused run resumes bit-identical to an
    uninterrupted one; the compile is timed apart from the iterations. (float64, the shapes of ``compiled64``:
    12 images in batches of 5, so torch's graph cache serves the compile.)"""
    ds, net, experts = _toy_setup(torch.float64)
    eager = run(Distiller(_config(step="eager", iterations=3), ds, net, experts), progress=False)
    fused = Distiller(_config(step="fused", iterations=3), ds, net, experts)
    assert fused.step_kind == "fused" and fused.compile_seconds == 0
    run(fused, progress=False)
    assert fused.compile_seconds > 0 and max(fused.history.seconds) < fused.compile_seconds
    torch.testing.assert_close(fused.images, eager.images, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused.syn_lr, eager.syn_lr, rtol=1e-9, atol=1e-12)
    assert fused.history.loss == pytest.approx(eager.history.loss, rel=1e-9)

    full = run(Distiller(_config(step="fused"), ds, net, experts), tmp_path / "a", progress=False)
    resumed = interrupt_then_resume(lambda: Distiller(_config(step="fused"), ds, net, experts), tmp_path / "b",
                                    stop_at=5)
    assert resumed.step_kind == "fused"
    assert torch.equal(resumed.images, full.images) and torch.equal(resumed.syn_lr, full.syn_lr)
    assert resumed.history.loss == full.history.loss


@pytest.mark.slow
def test_compiled_operations_per_step_exact_and_unroll(compiled64):
    """The fused unroll's budget, and the fused exact mode's, on the tiny network with learned soft labels (the
    graphs ``test_compiled_step_equals_eager_in_float64`` compiled)."""
    fs, prob = compiled64
    net, spec, theta, target, x, hard, soft, alpha, plan, mask = prob
    fs.dsa_strategy = DSA_STRATEGY
    per = {}
    for mode in ("exact", "unroll"):
        fs.meta_gradient(mode, theta, target, x, soft, alpha, plan)  # warm: nothing left to compile in the count
        c = [count_ops(fs.meta_gradient, mode, theta, target, x, soft, alpha, make_plan(12, n, 5, torch.Generator()))[0]
             for n in (2, 4)]
        per[mode] = (c[1].total - c[0].total) / 2
    assert 0 < per["exact"] <= TINY_BUDGET["exact"] and 0 < per["unroll"] <= TINY_BUDGET["unroll"], per


def test_auto_step_is_resolved_once_and_kept_on_resume(tmp_path):
    ds, net, experts = _toy_setup()
    d = Distiller(_config(iterations=4), ds, net, experts)
    assert d.step_kind == "eager" and "CPU" in d.step_reason  # 4 × 3 steps cannot pay for a compile
    run(d, tmp_path, progress=False)
    # the same run asked for "auto" with a length that would choose fused resumes with its checkpoint's step
    long = Distiller(_config(iterations=10**7), ds, net, experts)
    assert long.step_kind == "fused"
    long.load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert long.step_kind == "eager" and long.fused is None
    with pytest.raises(ValueError, match="exclude each other"):
        _config(step="fused", compile=True).validate()
    with pytest.raises(ValueError, match="step must be"):
        _config(step="fast").validate()


# ---------------------------------------------------------------------------------------------
# Operations per student step: a budget per path
# ---------------------------------------------------------------------------------------------
#: Measured on ConvNet-3 width 4 (1×28×28, IPC 1, all 10 images per step, DSA), CPU, torch 2.14, counted by
#: mttlite.opcount: the budget is the measurement plus a little room, so a change that adds operations to a
#: student step fails here. ``python benchmarks/op_count.py`` prints the table (docs/performance.md).
OP_BUDGET = {("eager", "exact"): 300, ("eager", "unroll"): 255, ("fused", "exact"): 80}  # measured 290.5, 245.5, 76
#: The same on the tiny network (one conv layer, 8×8) of ``compiled64``: the fused unroll's budget lives here.
TINY_BUDGET = {"exact": 44, "unroll": 44}  # measured 41 and 41 (soft labels learned)


def _convnet_builder(step, gradient):
    torch.manual_seed(0)
    net = get_network("convnet", 1, 10, (28, 28), width=4)
    ds = toy_dataset(n_per_class=2, K=10)
    ds.train_images = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ds.im_size = (28, 28)
    spec = ParamSpec.from_module(net)
    theta = spec.flatten(dict(net.named_parameters())).detach()
    experts = _Line(theta)

    def build(n):
        return Distiller(_config(dataset="toy", ipc=1, syn_steps=n, expert_epochs=1, max_start_epoch=1, batch_syn=None,
                                 step=step, gradient=gradient, iterations=100), ds, net, experts)
    return build


class _Line:
    """Two expert snapshots θ and θ + 0.01 (what the budget test needs: a target to match)."""

    def __init__(self, theta):
        self.snaps = [theta, theta + 0.01]
        self.epochs = [0, 1]

    def __len__(self):
        return 1

    def flat(self, expert, epoch, device="cpu", dtype=None):
        return self.snaps[epoch].to(device)


@pytest.mark.slow
@pytest.mark.parametrize("step, gradient", list(OP_BUDGET))
def test_operations_per_student_step_stay_within_budget(step, gradient):
    per_step, c1, c2 = ops_per_student_step(_convnet_builder(step, gradient), 2, 4)
    assert 0 < per_step <= OP_BUDGET[step, gradient], (per_step, (c2.by_name - c1.by_name).most_common(12))


@pytest.mark.slow
def test_compiled_convnet3_equals_eager_in_float32():
    """ConvNet-3 compiled (its graphs are the budget test's, cached): the meta-gradient of a real network in
    float32 within 1e-5 of the eager one, both modes' shapes of the exact mode, DSA on."""
    d = _convnet_builder("fused", "exact")(3)
    d.warm_up()
    theta = d.experts.flat(0, 0)
    target = d.experts.flat(0, 1)
    plan = make_plan(10, 3, None, torch.Generator().manual_seed(3))
    want = meta_gradient("exact", d.model, d.spec, theta, target, d.images, d.labels, d.syn_lr.detach(), plan,
                         d.dsa_strategy)
    got = d.fused.meta_gradient("exact", theta, target, d.images, d.labels, d.syn_lr.detach(), plan)
    for name in ("loss", "images", "syn_lr", "student_losses"):
        a, b = getattr(got, name), getattr(want, name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=name)


def test_count_ops_counts_leaves_not_views():
    x = torch.randn(4, 4)
    c, out = count_ops(lambda: (x.view(16) * 2).reshape(4, 4).t().contiguous() + x)
    # mul, the contiguous copy (clone, not its inner copy_), add: views and allocations are free
    assert c.by_name == {"aten::mul": 1, "aten::clone": 1, "aten::add": 1}, c.by_name
    assert torch.equal(out, (x * 2).t() + x)


@pytest.mark.slow
def test_step_cost_benchmark_at_toy_size():
    """benchmarks/step_cost.py --quick (ConvNet-3 width 4: the budget test's graphs, from torch's cache) prints
    its table and the constants of "auto"'s cost model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "step_cost.py"), "--quick"], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| 4 | 1 |"))
    eager, fused = (float(c) for c in row.strip("|").split("|")[3:5])
    assert eager > 0 and fused > 0
    assert "CPU_STEP_SAVING = ((0.00" in r.stdout and "CPU_COMPILE_S = " in r.stdout
