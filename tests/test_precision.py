"""Mixed precision for the student (``mttlite.precision``): fp32 unchanged, bf16 measured against the
fp32 gradient it approximates, float32 accumulators, clear errors, no host syncs, and fp16's loss scaling.

bf16 runs where the CPU has native bfloat16 (AVX512-BF16 / AMX); those tests skip elsewhere. fp16 is
for GPUs: here its loss scaling is tested (1) in float32, where a power-of-two scale must change no
number at all, (2) through ``LossScaler``'s rules, and (3) on the CPU through ``precision.CPU_FP16``,
the switch that lets fp16 autocast run on a CPU for tests only. Everything is small: < 1 min on one thread.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
import torch
from core_helpers import sgd_trajectories, tiny_convnet
from device_guard import DeviceGuard
from torch.utils._python_dispatch import TorchDispatchMode

from mttlite import precision as P
from mttlite.augment import DSA_STRATEGY
from mttlite.distill import PRESETS, DistillConfig, Distiller
from mttlite.kernels import StepKernels
from mttlite.meta_gradient import meta_gradient
from mttlite.networks import get_network
from mttlite.params import ParamSpec
from mttlite.precision import LossScaler, all_finite, check_loss_scale, check_precision
from mttlite.student import make_plan, unroll

MODES = ("unroll", "exact")
FIELDS = ("loss", "images", "syn_lr", "student_losses", "steps")
needs_bf16 = pytest.mark.skipif(not P.cpu_bf16_supported(), reason="this CPU has no native bfloat16 (AVX512-BF16/AMX)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_fp16(monkeypatch):
    """fp16 autocast on the CPU, for these tests only (``mttlite.precision.CPU_FP16``)."""
    monkeypatch.setattr(P, "CPU_FP16", True)


def _problem(far=0.02, width=16, soft=False, seed=0):
    """A small float32 ConvNet-2 (16×16 inputs, 4 classes, mttlite's instance norm and pooling), 8
    images, θ*_t its initialisation and θ*_{t+M} = θ*_t + ``far``·noise."""
    torch.manual_seed(seed)
    net = get_network("convnet", 1, 4, (16, 16), width=width, depth=2)
    spec = ParamSpec.from_module(net)
    theta = spec.flatten(dict(net.named_parameters())).detach()
    target = theta + far * torch.randn(theta.shape, generator=torch.Generator().manual_seed(3))
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    y = torch.arange(4).repeat(2)
    if soft:
        y = torch.softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(5)), 1).requires_grad_(True)
    return net, spec, theta, target, x, y


def _mg(mode, prob, steps=6, batch=4, **kw):
    net, spec, theta, target, x, y = prob
    plan = make_plan(x.shape[0], steps, batch, torch.Generator().manual_seed(1))
    return meta_gradient(mode, net, spec, theta, target, x, y, torch.tensor(0.01), plan, DSA_STRATEGY, **kw)


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _equal(a, b):
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert torch.equal(a.labels, b.labels)


# -- fp32: the default, unchanged -----------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_fp32_default_is_the_explicit_fp32_path_bit_for_bit(mode, soft):
    prob = _problem(soft=soft)
    default = _mg(mode, prob)
    _equal(_mg(mode, prob, precision="fp32"), default)
    _equal(_mg(mode, prob, precision="fp32", loss_scale=None), default)
    _equal(_mg(mode, prob, precision="fp32", loss_scale=1.0), default)


def test_config_field_is_after_the_positional_ones_and_old_dicts_and_presets_still_load():
    names = [f.name for f in dataclasses.fields(DistillConfig)]
    # PRESETS build configs positionally (dataset … batch_syn): a new field must come after those
    assert names[:10] == ["dataset", "ipc", "syn_steps", "expert_epochs", "max_start_epoch", "iterations", "lr_img",
                          "lr_lr", "lr_teacher", "batch_syn"]
    assert names.index("precision") > names.index("checkpoint_every") and DistillConfig().precision == "fp32"
    old = {k: v for k, v in DistillConfig(ipc=3).to_dict().items() if k != "precision"}  # a file from before
    assert DistillConfig.from_dict(old) == DistillConfig(ipc=3)
    assert PRESETS["cifar10-ipc10"].syn_steps == 30 and PRESETS["cifar10-ipc10"].precision == "fp32"
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'fp16'\), got 'half'"):
        DistillConfig(precision="half").validate()


# -- bf16 against the fp32 gradient it approximates -----------------------------------------------

@needs_bf16
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_bf16_gradient_is_close_to_fp32(mode, soft):
    prob = _problem(soft=soft)
    ref, low = _mg(mode, prob), _mg(mode, prob, precision="bf16")
    assert _cos(low.images, ref.images) >= 0.98
    assert abs(float(low.syn_lr - ref.syn_lr)) <= 0.02 * abs(float(ref.syn_lr))  # measured: 0.07-0.4 %
    assert abs(float(low.loss - ref.loss)) <= 1e-3 * float(ref.loss)
    if soft:
        assert _cos(low.labels, ref.labels) >= 0.98
    assert not torch.equal(low.images, ref.images)  # it did run in bf16


@needs_bf16
def test_the_two_modes_agree_in_bf16():
    prob = _problem(soft=True)
    u, e = _mg("unroll", prob, precision="bf16"), _mg("exact", prob, precision="bf16")
    assert _cos(u.images, e.images) >= 0.99 and _cos(u.labels, e.labels) >= 0.99
    assert abs(float(u.syn_lr - e.syn_lr)) <= 0.01 * abs(float(e.syn_lr))
    assert torch.equal(u.loss, e.loss)  # the forward is the same arithmetic in both


@needs_bf16
@pytest.mark.parametrize("mode", MODES)
def test_eager_step_kernels_give_the_autograd_path_in_bf16(mode):
    prob = _problem()
    net, spec = prob[:2]
    ref = _mg(mode, prob, precision="bf16")
    k = _mg(mode, prob, precision="bf16", kernels=StepKernels(net, spec, compile=False, precision="bf16"))
    assert _cos(k.images, ref.images) >= 0.9999 and _rel(k.syn_lr, ref.syn_lr) <= 1e-3


class _Dtypes(TorchDispatchMode):
    """The dtypes every aten op of the wrapped code saw, by op name."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ins = [a for a in torch.utils._pytree.tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        self.seen.setdefault(func.overloadpacket.__name__, set()).update(t.dtype for t in ins if t.is_floating_point())
        return func(*args, **(kwargs or {}))


@needs_bf16
@pytest.mark.parametrize("mode", MODES)
def test_accumulators_and_theta_path_stay_float32_while_convolutions_run_in_bf16(mode):
    prob = _problem(soft=True)
    with _Dtypes() as rec:
        mg = _mg(mode, prob, precision="bf16")
    for f in ("loss", "images", "labels", "syn_lr", "student_losses"):
        assert getattr(mg, f).dtype == torch.float32, f
    assert rec.seen["convolution"] == {torch.bfloat16}  # forward and double backward
    assert rec.seen["convolution_backward"] == {torch.bfloat16}
    # float32 only: the loss (upcast), θ's updates (sub), the augmentation and the sums of ∂L/∂x over the
    # steps (exact: index_add_; unroll: index_put)
    for op in ("_log_softmax", "sub", "grid_sampler_2d", {"exact": "index_add_", "unroll": "index_put"}[mode]):
        assert rec.seen[op] == {torch.float32}, op
    # instance norm's backward: torch's mixed-dtype CPU kernel, bf16 g and x with float32 γ and statistics
    # (it accumulates in float32), no full-size casts
    assert rec.seen["native_group_norm_backward"] == {torch.bfloat16, torch.float32}
    net, spec, theta, _, x, y = prob
    plan = make_plan(8, 5, 4, torch.Generator().manual_seed(2))
    res = unroll(net, spec, theta, x, y, torch.tensor(0.01), plan, DSA_STRATEGY, precision="bf16", return_path=True)
    assert res.theta.dtype == torch.float32 and all(t.dtype == torch.float32 for t in res.path)
    assert res.losses.dtype == torch.float32


# -- clear errors ----------------------------------------------------------------------------------

def test_unknown_precision_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown precision 'half'; choose one of fp32, bf16, fp16"):
        _mg("exact", _problem(), precision="half")
    with pytest.raises(ValueError, match="choose one of fp32, bf16, fp16"):
        check_precision("float16")


def test_fp16_on_a_cpu_says_what_to_use_instead():
    for call in (lambda: _mg("exact", _problem(), precision="fp16"), lambda: check_precision("fp16", "cpu")):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "GPU" in msg and "'bf16'" in msg and "'fp32'" in msg


def test_bf16_on_a_cpu_without_bfloat16_says_use_fp32(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match=r"needs a CPU with native bfloat16 .* use 'fp32'") as e:
        _mg("unroll", _problem(), precision="bf16")
    assert "\n" not in str(e.value)
    assert check_precision("bf16", "meta") == "bf16"  # shape-only device: not a CPU


def test_the_distiller_the_cli_and_the_kernels_refuse_too(tmp_path, capsys):
    from mttlite.cli import build_parser, main
    from mttlite.errors import EXIT_BAD_INPUT

    class Data:
        name, num_classes, channel, im_size = "fashion-mnist-mini", 3, 1, (8, 8)
        train_images = torch.randn(12, 1, 8, 8)
        train_labels = torch.arange(3).repeat(4)

    net = tiny_convnet(num_classes=3, dtype=torch.float32)
    traj = sgd_trajectories(net, Data.train_images, Data.train_labels, num_experts=1, epochs=2)
    with pytest.raises(ValueError, match="precision 'fp16' is for GPUs"):
        Distiller(DistillConfig(ipc=2, syn_steps=2, expert_epochs=1, max_start_epoch=1, precision="fp16"), Data, net, traj)
    assert build_parser().parse_args(["distill", "--buffer", "b", "--out", "o", "--precision", "bf16"]).precision == "bf16"
    for value, expect in (("fp16", "precision 'fp16' is for GPUs"), ("half", "precision must be one of")):
        code = main(["distill", "--buffer", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--precision", value])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_BAD_INPUT and expect in err, err
    prob = _problem()
    with pytest.raises(ValueError, match="built for precision 'fp32', not 'bf16'"):
        _mg("exact", prob, precision="bf16", kernels=StepKernels(prob[0], prob[1], compile=False))
    for bad in (0, -2.0, float("inf"), float("nan"), True, "8"):
        with pytest.raises(ValueError, match="loss_scale"):
            check_loss_scale(bad)


# -- no host syncs: the bf16 / fp16 paths on torch's meta device -----------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_low_precision_paths_run_on_a_device_without_host_syncs(mode, prec):
    from test_device_paths import META, _assert_meta
    from test_device_paths import _problem as meta_problem

    net, spec, ts, tt, x, y = meta_problem(soft=True)
    y = y.requires_grad_(True)
    plan = make_plan(x.shape[0], 4, 4, torch.Generator().manual_seed(0))
    alpha = torch.empty((), device=META)
    for auto in (False, True):
        with DeviceGuard(META) as guard:
            mg = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, DSA_STRATEGY, auto_steps=auto,
                               precision=prec, loss_scale=2.0 ** 8 if prec == "fp16" else None)
            ok = all_finite(mg.images, mg.labels, mg.syn_lr, mg.loss)  # the scaler's check: on the device too
        assert guard.ops > 100
        _assert_meta(mg.images, x.shape)
        _assert_meta(mg.labels, y.shape)
        _assert_meta(ok, ())
        assert mg.images.dtype == mg.labels.dtype == mg.syn_lr.dtype == torch.float32


# -- fp16 loss scaling -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("auto", [False, True], ids=["N", "auto_steps"])
def test_a_power_of_two_loss_scale_changes_no_number(mode, auto):
    """The scaling logic in float32: S·ℓ, λ̃ = S λ (or S²·L), the S² products and the final unscale
    must give exactly the unscaled numbers, with and without compiled-style step kernels."""
    prob = _problem(soft=True)
    net, spec = prob[:2]
    for kernels in (None, StepKernels(net, spec, compile=False)):
        ref = _mg(mode, prob, auto_steps=auto, kernels=kernels)
        for scale in (2.0 ** 12, 2.0 ** -3):
            _equal(_mg(mode, prob, auto_steps=auto, kernels=kernels, loss_scale=scale), ref)


@pytest.mark.parametrize("mode", MODES)
def test_too_large_a_scale_overflows_and_says_so(mode):
    prob = _problem()
    mg = _mg(mode, prob, loss_scale=2.0 ** 70)  # float32: the S² = 2^140 products overflow
    assert not bool(all_finite(mg.images, mg.syn_lr, mg.loss))
    ok = _mg(mode, prob, loss_scale=2.0 ** 20)
    assert bool(all_finite(ok.images, ok.syn_lr, ok.loss))


@pytest.mark.parametrize("mode", MODES)
def test_fp16_loss_scaling_rescues_an_underflowing_gradient(mode, cpu_fp16):
    """A far target makes λ small (‖∂L/∂x‖∞ ~ 2e-7): unscaled fp16 loses it, S = 2^8 recovers it;
    and too large an S overflows (inf/NaN, what LossScaler backs off from)."""
    far = _problem(far=30.0)
    ref = _mg(mode, far)
    scaled = _mg(mode, far, precision="fp16", loss_scale=2.0 ** 8)
    assert _cos(scaled.images, ref.images) >= 0.999 and _rel(scaled.syn_lr, ref.syn_lr) <= 0.02
    if mode == "unroll":  # the cotangent entering each step's double backward is α λ: below fp16's range
        plain = _mg(mode, far, precision="fp16")
        assert not _cos(plain.images, ref.images) >= 0.99 or _rel(plain.syn_lr, ref.syn_lr) > 0.05
    near = _problem(far=0.02)
    over = _mg(mode, near, precision="fp16", loss_scale=2.0 ** 16)
    assert not bool(all_finite(over.images, over.syn_lr, over.loss))


def test_loss_scaler_backs_off_grows_and_saves():
    s = LossScaler(scale=2.0 ** 4, growth_interval=3, min_scale=1.0, max_scale=2.0 ** 5)
    assert s.found_inf() and s.scale == 8.0
    for _ in range(2):
        s.found_finite()
    assert s.scale == 8.0 and s.good_steps == 2
    assert s.found_inf() and s.scale == 4.0 and s.good_steps == 0  # an inf restarts the count
    for _ in range(3):
        s.found_finite()
    assert s.scale == 8.0 and s.good_steps == 0
    for _ in range(3):
        s.found_finite()
    assert s.scale == 16.0
    for _ in range(9):
        s.found_finite()
    assert s.scale == 32.0  # capped at max_scale
    while s.found_inf():
        pass
    assert s.scale == 1.0 and not s.found_inf()  # at min_scale: give up (the guard judges)
    t = LossScaler()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t == s
    for bad in (dict(scale=3.0), dict(scale=0.5), dict(growth_interval=0), dict(max_scale=float("inf"))):
        with pytest.raises(ValueError, match="LossScaler"):
            LossScaler(**bad)


def _distiller(precision, **over):
    class Data:
        name, num_classes, channel, im_size = "fashion-mnist-mini", 3, 1, (8, 8)
        train_images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(7))
        train_labels = torch.arange(3).repeat(4)

    net = tiny_convnet(num_classes=3, dtype=torch.float32)
    traj = sgd_trajectories(net, Data.train_images, Data.train_labels, num_experts=2, epochs=3)
    cfg = DistillConfig(ipc=2, syn_steps=4, expert_epochs=1, max_start_epoch=2, iterations=3, precision=precision, **over)
    return Distiller(cfg, Data, net, traj)


@pytest.mark.parametrize("gradient", MODES)
def test_distiller_redoes_an_overflowing_fp16_iteration_at_half_the_scale(gradient, cpu_fp16, tmp_path):
    d = _distiller("fp16", gradient=gradient)
    d.loss_scaler = LossScaler(scale=2.0 ** 30, max_scale=2.0 ** 30)  # overflows: S² ≈ 1e18 in fp16
    info = d.step()
    final = d.loss_scaler.scale
    assert final < 2.0 ** 30 and info.iteration == 1 and len(d.history.loss) == 1
    # the same iteration from the same state, started at the scale the retries ended at: the same numbers
    e = _distiller("fp16", gradient=gradient)
    e.loss_scaler = LossScaler(scale=final, max_scale=2.0 ** 30)
    assert e.step().loss == info.loss
    assert torch.equal(e.images, d.images) and torch.equal(e.alpha_raw, d.alpha_raw)
    # the scale is saved and restored with the run
    d.save_checkpoint(tmp_path / "ckpt.safetensors")
    f = _distiller("fp16", gradient=gradient)
    f.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert f.loss_scaler == d.loss_scaler


@needs_bf16
def test_bf16_distillation_runs_and_tracks_fp32():
    a, b = _distiller("fp32"), _distiller("bf16")
    x0 = a.images.detach().clone()
    assert torch.equal(b.images, x0)
    for _ in range(3):
        ia, ib = a.step(), b.step()
        assert abs(ib.loss - ia.loss) <= 0.01 * ia.loss
    assert b.images.dtype == b.alpha_raw.dtype == torch.float32
    assert _cos(b.images.detach() - x0, a.images.detach() - x0) > 0.98  # the same updates, to bf16's accuracy


# -- expert training and evaluation: a plain speed-up -----------------------------------------------

@needs_bf16
def test_bf16_experts_and_evaluation(tmp_path, monkeypatch):
    from mttlite.data import load_dataset
    from mttlite.evaluate import EvalProtocol, evaluate_set, random_real_subset
    from mttlite.experts import train_experts

    ds = load_dataset("fashion-mnist-mini")
    g = torch.Generator().manual_seed(1)
    tr, te = torch.randperm(len(ds.train_labels), generator=g)[:200], torch.randperm(len(ds.test_labels), generator=g)[:100]
    ds = replace(ds, train_images=ds.train_images[tr], train_labels=ds.train_labels[tr],
                 test_images=ds.test_images[te], test_labels=ds.test_labels[te])
    kw = dict(num_experts=1, train_epochs=2, width=8, progress=False)
    ref = train_experts(ds, tmp_path / "fp32", **kw)
    low = train_experts(ds, tmp_path / "bf16", precision="bf16", **kw)
    assert json.loads((tmp_path / "bf16" / "meta.json").read_text())["precision"] == "bf16"
    assert "precision" not in json.loads((tmp_path / "fp32" / "meta.json").read_text())  # old buffers still match
    a, b = ref.flat(0, 2), low.flat(0, 2)
    assert b.dtype == torch.float32 and _rel(b - ref.flat(0, 0), a - ref.flat(0, 0)) < 0.05
    with pytest.raises(ValueError, match="precision: stored 'bf16', requested '<absent>'"):
        train_experts(ds, tmp_path / "bf16", **kw)  # a bf16 buffer is not extended in fp32
    x, y = random_real_subset(ds, 2)
    protocol = EvalProtocol(width=8, epochs=2, num_nets=1, dsa_strategy="")
    monkeypatch.setattr(P, "CPU_FP16", True)  # past the device check: fp16 is refused for its own reason
    with pytest.raises(ValueError, match="meta-gradient only"):
        train_experts(ds, tmp_path / "x", precision="fp16", **kw)
    with pytest.raises(ValueError, match="meta-gradient only"):
        evaluate_set(x, y, ds, protocol, progress=False, precision="fp16")
    monkeypatch.undo()
    res = evaluate_set(x, y, ds, protocol, progress=False, precision="bf16")
    assert res.set_info["precision"] == "bf16" and res.protocol == protocol.to_dict()
    assert "precision" not in evaluate_set(x, y, ds, protocol, progress=False).set_info


@needs_bf16
def test_norm_paths_benchmark_at_toy_size(tmp_path):
    """benchmarks/norm_paths.py --quick: both instance-norm paths timed in one run, the library's own
    switch put back afterwards (the script restores ``layers._functorch_wrapped``)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "norm_paths.py"), "--quick", "--threads", "1",
                        "--buffer", str(tmp_path / "buffer")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| exact |") or line.startswith("| unroll |")]
    assert len(rows) == 2
    for row in rows:
        f32, low, ratio = (c.strip() for c in row.strip("|").split("|")[1:])
        assert float(f32) > 0 and float(low) > 0 and ratio.endswith("×")
