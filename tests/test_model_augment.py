"""Model augmentation (Zhang et al., CVPR 2023): the filter-normalised perturbation, the early-stage pool,
and their use in DC / DM (``model_pool``, ``rho``) and MTT (``DistillConfig.expert_perturb``).

Each against an independent answer: the perturbation's per-filter norms against the formula
‖θ'_{l,j} − θ_{l,j}‖ = ρ‖θ_{l,j}‖ and its direction against the standard normal (mean, the 1σ and 2σ
masses on a million draws); the pool against a brute-force enumeration of the buffer's stored
checkpoints; DC's and DM's outer-loop starts against those checkpoints; MTT's start against the
buffer's θ*_t and, switched off, its draws against a replay of plain MTT's draws.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from core_helpers import sgd_trajectories, tiny_convnet

from mttlite import cli
from mttlite.baselines import dc as dc_module
from mttlite.baselines import dm as dm_module
from mttlite.baselines import make_set
from mttlite.data import load_dataset
from mttlite.distill import DistillConfig, Distiller
from mttlite.evaluate import EvalProtocol
from mttlite.experts import train_experts
from mttlite.model_augment import EarlyPool, perturb
from mttlite.networks import get_network
from mttlite.params import ParamSpec
from mttlite.student import make_plan
from mttlite.synset import SyntheticSet

PER_CLASS = 30
WIDTH = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def small():
    """The embedded Fashion-MNIST cut to its first PER_CLASS training images per class."""
    ds = load_dataset("fashion-mnist-mini")
    idx = torch.cat([(ds.train_labels == c).nonzero().squeeze(1)[:PER_CLASS] for c in range(ds.num_classes)])
    return replace(ds, train_images=ds.train_images[idx], train_labels=ds.train_labels[idx])


@pytest.fixture(scope="module")
def buffer(small, tmp_path_factory):
    """Two width-8 experts, epochs 0 … 3 stored."""
    return train_experts(small, tmp_path_factory.mktemp("pool"), num_experts=2, train_epochs=3, width=WIDTH,
                         progress=False)


def filter_rows(spec: ParamSpec, theta: torch.Tensor):
    """(name, (F, n) rows) of every ≥2-D tensor, and (name, tensor) of the 1-D ones."""
    multi, single = [], []
    for (name, sl), shape in zip(spec.slices().items(), spec.shapes):
        (multi if len(shape) >= 2 else single).append((name, theta[sl].reshape(shape[0], -1) if len(shape) >= 2
                                                       else theta[sl]))
    return multi, single


def assert_perturbation_of(spec, start, base, rho):
    """start = base + ρ·d with every filter moved by exactly ρ‖base_j‖ and 1-D tensors untouched."""
    (m_s, s_s), (m_b, s_b) = filter_rows(spec, start), filter_rows(spec, base)
    for (name, a), (_, b) in zip(s_s, s_b):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(m_s, m_b):
        torch.testing.assert_close((a - b).norm(dim=1), rho * b.norm(dim=1), rtol=1e-4, atol=1e-7, msg=name)


# -- the perturbation ---------------------------------------------------------------------------------
def test_perturbation_statistics_on_a_large_tensor():
    """1 M entries in 256 filters of very different norms: every filter moves by ρ‖θ_j‖, the per-element
    step scaled by √n/(ρ‖θ_j‖) is standard normal (mean 0, 68.27 % within 1σ, 95.45 % within 2σ),
    uncorrelated with θ; the tensor's std is ρ‖θ_l‖/√numel; the bias is untouched."""
    spec = ParamSpec(("w", "b"), ((256, 64, 8, 8), (256,)))
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, 256)[:, None]  # filters whose norms span 3 decades
    w = torch.randn(256, 4096, generator=g) * scales
    theta = torch.cat([w.reshape(-1), torch.randn(256, generator=g)])
    rho = 0.03
    out = perturb(theta, spec, rho, torch.Generator().manual_seed(1))
    assert out.shape == theta.shape and out.dtype == theta.dtype
    assert torch.equal(out[-256:], theta[-256:])  # 1-D: unchanged
    delta = (out - theta)[:-256].view(256, 4096)
    row = w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(delta.norm(dim=1, keepdim=True), rho * row, rtol=1e-5, atol=0)
    z = (delta * math.sqrt(4096) / (rho * row)).double().flatten()  # ~ N(0, 1) entry by entry
    N = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert abs((z.abs() < 1).double().mean() - 0.682689) < 0.003
    assert abs((z.abs() < 2).double().mean() - 0.954500) < 0.002
    corr = torch.corrcoef(torch.stack([delta.flatten() / row.expand_as(delta).flatten(), (w / row).flatten()]))[0, 1]
    assert abs(corr) < 0.005
    torch.testing.assert_close(delta.std(), rho * w.norm() / math.sqrt(w.numel()), rtol=2e-3, atol=0)


def test_rho_zero_is_the_identity_and_draws_nothing():
    spec = ParamSpec(("w", "b"), ((4, 3), (4,)))
    theta = torch.randn(16)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert perturb(theta, spec, 0.0, g) is theta
    assert torch.equal(g.get_state(), state)


def test_perturbation_is_deterministic_per_seed():
    net = get_network("convnet", 1, 10, (28, 28), width=WIDTH)
    spec = ParamSpec.from_module(net)
    theta = spec.flatten(dict(net.named_parameters())).detach()
    a = perturb(theta, spec, 0.05, torch.Generator().manual_seed(5))
    b = perturb(theta, spec, 0.05, torch.Generator().manual_seed(5))
    c = perturb(theta, spec, 0.05, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(5)
    first, second = perturb(theta, spec, 0.05, g), perturb(theta, spec, 0.05, g)
    assert torch.equal(first, a) and not torch.equal(second, a)  # the generator moves on
    assert_perturbation_of(spec, a, theta, 0.05)  # conv filters and linear rows, per filter; norms untouched


# -- the pool -----------------------------------------------------------------------------------------
def test_pool_draws_only_stored_early_epochs_uniformly(buffer):
    """Every draw is bitwise one of the buffer's checkpoints (brute force over all experts × all stored
    epochs), always of an epoch in the pool, and every member comes up about equally often."""
    everything = {(k, e): buffer.flat(k, e) for k in range(len(buffer)) for e in buffer.epochs}
    for epochs, want in ((1, {0, 1}), ([2], {2}), ("1,3", {1, 3})):
        pool = EarlyPool(buffer, epochs)
        assert pool.members == [(k, e) for k in range(len(buffer)) for e in sorted(want)]
        g = torch.Generator().manual_seed(0)
        counts = {}
        for _ in range(400):
            theta = pool.sample(g)
            hits = [key for key, ckpt in everything.items() if torch.equal(theta, ckpt)]
            assert len(hits) == 1 and hits[0][1] in want, (epochs, hits)
            counts[hits[0]] = counts.get(hits[0], 0) + 1
        assert set(counts) == set(pool.members)
        expected = 400 / len(pool)
        assert all(abs(n - expected) < 5 * math.sqrt(expected) for n in counts.values()), counts


# -- DC and DM start from the pool ----------------------------------------------------------------------
def _record(monkeypatch, module, name):
    starts = []
    original = getattr(module, name)

    def spy(*args, **kw):
        starts.append({k: v.detach().clone() for k, v in args[1].items()})  # (net/model, params, …)
        return original(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return starts


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_dc_starts_every_outer_loop_from_a_pool_checkpoint(small, buffer, monkeypatch, rho):
    starts = _record(monkeypatch, dc_module, "matching_iteration")
    s = make_set("dc", small, 1, iterations=5, outer_loop=1, inner_loop=1, batch_real=8, width=WIDTH,
                 model_pool=buffer, pool_epochs=1, rho=rho)
    spec = ParamSpec(tuple(buffer.param_names), tuple(buffer.param_shapes))
    members = {(k, e): buffer.flat(k, e) for k in range(2) for e in (0, 1)}
    assert len(starts) == 5
    for params in starts:
        theta = spec.flatten(params)
        if rho == 0:
            assert sum(torch.equal(theta, m) for m in members.values()) == 1
        else:  # a perturbation of exactly one member: the one whose 1-D tensors (never perturbed) it shares
            ones = [k for k, m in members.items() if all(torch.equal(a, b) for (_, a), (_, b) in
                                                         zip(filter_rows(spec, theta)[1], filter_rows(spec, m)[1]))]
            assert len(ones) == 1
            assert_perturbation_of(spec, theta, members[ones[0]], rho)
    assert s.config["model_pool"]["epochs"] == [0, 1] and s.config["rho"] == rho


def test_dm_embeds_with_pool_checkpoints_and_plain_dm_does_not(small, buffer, monkeypatch):
    starts = _record(monkeypatch, dm_module, "dm_iteration")
    make_set("dm", small, 1, iterations=4, batch_real=8, width=WIDTH, model_pool=buffer, pool_epochs=[3])
    make_set("dm", small, 1, iterations=2, batch_real=8, width=WIDTH)
    spec = ParamSpec(tuple(buffer.param_names), tuple(buffer.param_shapes))
    members = [buffer.flat(k, 3) for k in range(2)]
    flat = [spec.flatten({n[len("net."):]: v for n, v in p.items()}) for p in starts]
    assert all(any(torch.equal(t, m) for m in members) for t in flat[:4])
    assert not any(torch.equal(t, m) for t in flat[4:] for m in members)  # fresh inits, not checkpoints


@pytest.mark.parametrize("method, kw, field, text", [
    ("dc", dict(rho=-0.1), "rho", "[0, 1]"),
    ("dm", dict(rho=float("nan")), "rho", "[0, 1]"),
    ("dc", dict(use_pool=True, pool_epochs=7), "pool_epochs", "not stored"),
    ("dm", dict(use_pool=True, pool_epochs=-1), "pool_epochs", ">= 0"),
    ("dc", dict(use_pool=True, width=16), "model_pool", "width"),
    ("dc", dict(pool_epochs=1), "pool_epochs", "needs model_pool"),
    ("dm", dict(model_pool="/nonexistent/pool"), "model_pool", "no expert buffer"),
])
def test_bad_settings_name_the_field(small, buffer, method, kw, field, text):
    kw = dict(kw)
    if kw.pop("use_pool", False):
        kw["model_pool"] = buffer
    kw.setdefault("width", WIDTH)
    with pytest.raises(ValueError) as e:
        make_set(method, small, 1, iterations=1, batch_real=8, **kw)
    assert field in str(e.value) and text in str(e.value), str(e.value)


def test_cli_baselines_with_model_augmentation(small, buffer, tmp_path, capsys):
    out = tmp_path / "dc.safetensors"
    base = ["baselines", "dc", "--ipc", "1", "--out", str(out), "--opt", "iterations=1", "--opt", "outer_loop=1",
            "--opt", "inner_loop=1", "--opt", "batch_real=4", "--opt", f"width={WIDTH}",
            "--opt", f"model_pool={buffer.path}", "--opt", "pool_epochs=0,2"]
    assert cli.main(base + ["--opt", "rho=0.02"]) == 0
    config = SyntheticSet.load(out).config
    assert config["model_pool"]["epochs"] == [0, 2] and config["rho"] == 0.02
    capsys.readouterr()
    assert cli.main(base + ["--opt", "rho=-1"]) == 2
    assert "rho must be" in capsys.readouterr().err


# -- MTT: expert_perturb ---------------------------------------------------------------------------------
def _toy(seed=0, K=3, n=8):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(K, 1, 8, 8, generator=g)
    labels = torch.arange(K).repeat_interleave(n)
    images = protos[labels] + 0.5 * torch.randn(len(labels), 1, 8, 8, generator=g)
    return SimpleNamespace(name="toy", train_images=images, train_labels=labels, num_classes=K, channel=1,
                           im_size=(8, 8), class_names=["a", "b", "c"], mean=(0.0,), std=(1.0,), zca=None)


@pytest.fixture(scope="module")
def toy():
    ds = _toy()
    net = tiny_convnet(num_classes=3, width=4, im=8, dtype=torch.float32)
    return ds, net, sgd_trajectories(net, ds.train_images, ds.train_labels, num_experts=2, epochs=4, lr=0.1)


def _mtt_config(**kw):
    base = dict(dataset="toy", ipc=2, syn_steps=3, expert_epochs=1, max_start_epoch=3, iterations=4, lr_img=10.0,
                lr_lr=1e-4, lr_teacher=0.05, dsa_strategy="", checkpoint_every=2, seed=7)
    return DistillConfig(**{**base, **kw})


def _run_recorded(toy, monkeypatch, iterations=4, **kw):
    """Run a Distiller, recording (θ_start, θ_target) as handed to the meta-gradient, and (expert, t)."""
    from mttlite import distill

    ds, net, experts = toy
    seen, original = [], distill.meta_gradient

    def spy(mode, model, spec, theta_start, theta_target, *a, **k):
        seen.append((theta_start.detach().clone(), theta_target.detach().clone()))
        return original(mode, model, spec, theta_start, theta_target, *a, **k)

    monkeypatch.setattr(distill, "meta_gradient", spy)
    d = Distiller(_mtt_config(**kw), ds, net, experts)
    draws = [d.step() for _ in range(iterations)]
    return d, seen, [(i.expert, i.start_epoch) for i in draws]


def test_expert_perturb_off_is_plain_mtt(toy, monkeypatch):
    """ρ = 0: the student starts at the buffer's θ*_t, bitwise, and the run draws exactly plain MTT's
    (expert, t, plan) sequence — replayed here by hand — and nothing else."""
    ds, _, experts = toy
    assert DistillConfig().expert_perturb == 0.0
    old = {k: v for k, v in _mtt_config().to_dict().items() if k != "expert_perturb"}  # a config from before
    assert DistillConfig.from_dict(old) == _mtt_config()
    d, seen, draws = _run_recorded(toy, monkeypatch, expert_perturb=0.0)
    for (start, target), (k, t) in zip(seen, draws):
        assert torch.equal(start, experts.flat(k, t)) and torch.equal(target, experts.flat(k, t + 1))
    g = torch.Generator().manual_seed(7)
    for k in range(ds.num_classes):  # _init_images: one permutation per class
        torch.randperm(int((ds.train_labels == k).sum()), generator=g)
    for k, t in draws:
        assert int(torch.randint(len(experts), (1,), generator=g)) == k
        assert int(torch.randint(0, 3, (1,), generator=g)) == t
        make_plan(6, 3, None, g)
    assert torch.equal(d.generator.get_state(), g.get_state())


def test_expert_perturb_moves_only_the_start_by_rho_per_filter(toy, monkeypatch):
    _, net, experts = toy
    spec = ParamSpec.from_module(net)
    rho = 0.05
    d, seen, draws = _run_recorded(toy, monkeypatch, expert_perturb=rho)
    for (start, target), (k, t) in zip(seen, draws):
        assert not torch.equal(start, experts.flat(k, t))
        assert_perturbation_of(spec, start, experts.flat(k, t), rho)
        assert torch.equal(target, experts.flat(k, t + 1))  # the target stays θ*_{t+M}
    d2, seen2, _ = _run_recorded(toy, monkeypatch, expert_perturb=rho)  # same seed: same run, bitwise
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen, seen2)) and torch.equal(d.images, d2.images)
    plain, _, _ = _run_recorded(toy, monkeypatch, expert_perturb=0.0)
    assert not torch.equal(d.images, plain.images)  # the switch changes the run


def test_expert_perturb_bad_values_name_the_field():
    for bad in (-0.01, math.inf, 2.0, "0.1"):
        with pytest.raises(ValueError) as e:
            _mtt_config(expert_perturb=bad).validate()
        lines = str(e.value).splitlines()[1:]
        assert len(lines) == 1 and "expert_perturb" in lines[0] and "[0, 1]" in lines[0], str(e.value)


def test_cli_expert_perturb_flag():
    args = cli.build_parser().parse_args(["distill", "--buffer", "b", "--out", "o", "--expert-perturb", "0.02"])
    assert cli._config_from(args).expert_perturb == 0.02
    args = cli.build_parser().parse_args(["distill", "--buffer", "b", "--out", "o", "--expert-perturb", "-1"])
    with pytest.raises(ValueError, match="expert_perturb"):
        cli._config_from(args)


# -- the benchmark, at toy size ----------------------------------------------------------------------------
def test_benchmark_script_at_toy_size(tmp_path):
    """benchmarks/model_augmentation.py --quick, shrunk further: every (method, variant) row with its budget,
    the pool's epochs and ρ in the MA rows' sets, mean/std = np.mean/np.std of the per-network accuracies,
    and those accuracies reproduced by evaluating the saved set again under the recorded protocol."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "model_augmentation.py"), "--quick", "--out",
                        str(tmp_path), "--iterations", "dc=4,dm=4", "--num-nets", "1", "--eval-epochs", "3",
                        "--fractions", "1,0.5"], cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "model_augmentation-quick.json").read_text())
    rows = {(x["method"], x["variant"]): x for x in doc["rows"]}
    # with f < 1 a control row: the same cut budget without model augmentation
    assert set(rows) == {(m, v) for m in ("dc", "dm") for v in ("plain", "MA ×1", "plain ×0.5", "MA ×0.5")}
    for (_, v), x in rows.items():
        assert x["iterations"] == {"plain": 4, "MA ×1": 4, "plain ×0.5": 2, "MA ×0.5": 2}[v]
        if v.startswith("plain"):
            assert x["model_pool"] is None and x["rho"] == 0.0
        else:
            assert x["model_pool"]["epochs"] == [1, 2] and x["model_pool"]["members"] == 4 and x["rho"] == 0.05
        assert len(x["accs"]) == 1 and x["mean"] == pytest.approx(float(np.mean(x["accs"])), abs=1e-12)
        assert x["std"] == pytest.approx(float(np.std(x["accs"])), abs=1e-12) and x["build_seconds"] > 0
    assert doc["pool"]["trained_by_this_run"] and doc["pool"]["experts"] == 2
    assert "| method | IPC |" in r.stdout and "| method | IPC |" in (tmp_path / "model_augmentation-quick.md").read_text()
    ds = load_dataset("fashion-mnist-mini")
    idx = torch.cat([(ds.train_labels == c).nonzero().squeeze(1)[:100] for c in range(ds.num_classes)])
    ds = replace(ds, train_images=ds.train_images[idx], train_labels=ds.train_labels[idx])
    row = rows[("dc", "MA ×0.5")]
    again = SyntheticSet.load(tmp_path / "sets" / f"{row['set']}.safetensors").evaluate(
        ds, EvalProtocol(**doc["protocol"]), progress=False)
    assert again.accs == pytest.approx(row["accs"], abs=1e-12)
