"""Stage 1: expert training (mttlite.experts) and the on-disk buffer format (mttlite.buffers).

Everything runs on a 200-image subset of the embedded Fashion-MNIST set with width-8 ConvNets,
so a whole expert trains in a fraction of a second.

Training tests take the ``device`` fixture (tests/conftest.py; CPU by default). Tests of the file
format, of resuming / ranks and of bitwise reproducibility compare files byte for byte and stay on
the CPU (GPU kernels are not bit-reproducible run to run). Off the CPU, float32 comparisons against
a reference computed with other kernels use ``close_kw``'s looser tolerance (TF32, cuDNN).
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mttlite import buffers as buffers_mod
from mttlite.augment import default_strategy, dsa
from mttlite.buffers import (
    ExpertBuffer,
    expert_filename,
    save_expert,
    tensor_key,
    write_or_check_meta,
)
from mttlite.data import load_dataset
from mttlite.experts import (
    draw_seed,
    expert_seed,
    init_network,
    loss_and_logits,
    sgd_step,
    train_experts,
)

W = 8  # network width for every test


def _subset(ds, n_train, n_test):
    g = torch.Generator().manual_seed(1234)
    tr = torch.randperm(ds.train_images.shape[0], generator=g)[:n_train]
    te = torch.randperm(ds.test_images.shape[0], generator=g)[:n_test]
    return dataclasses.replace(
        ds,
        train_images=ds.train_images[tr].contiguous(),
        train_labels=ds.train_labels[tr].contiguous(),
        test_images=ds.test_images[te].contiguous(),
        test_labels=ds.test_labels[te].contiguous(),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to other processes on the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def full():
    return load_dataset("fashion-mnist-mini")


@pytest.fixture(scope="module")
def ds(full):
    return _subset(full, 200, 50)


def _train(ds, path, **kw):
    kw = {"num_experts": 1, "train_epochs": 2, "width": W, "batch_real": 100, "progress": False, **kw}
    return train_experts(ds, path, **kw)


def _tol(close_kw, rtol, atol):
    """``assert_close`` tolerances: (rtol, atol) on the CPU, ``close_kw``'s looser ones elsewhere."""
    return close_kw or {"rtol": rtol, "atol": atol}


def _tensors(buf, i):
    return load_file(str(buf.path / expert_filename(buf.expert_ids[i])))


def _assert_same_files(a: ExpertBuffer, b: ExpertBuffer):
    assert a.expert_ids == b.expert_ids
    for i in range(len(a)):
        ta, tb = _tensors(a, i), _tensors(b, i)
        assert ta.keys() == tb.keys()
        for k in ta:  # bitwise: same bytes
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k


# ---------------------------------------------------------------------------------------------
# The SGD step and the training loop against torch's own optimiser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
def test_functional_sgd_step_equals_torch_optim_sgd(ds, momentum, weight_decay, device, close_kw):
    gen = torch.Generator().manual_seed(0)
    net = init_network(ds, "convnet", W, None, None, gen).to(device)
    ds = ds.to(device)
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    bufs = None
    for step in range(4):
        x, y = ds.train_images[step * 32 : (step + 1) * 32], ds.train_labels[step * 32 : (step + 1) * 32]
        # reference: the module + torch.optim.SGD
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        # ours: functional_call on a dict + explicit update
        leaves = {n: t.requires_grad_(True) for n, t in theta.items()}
        loss, _ = loss_and_logits(net, leaves, x, y)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        with torch.no_grad():
            theta, bufs = sgd_step(leaves, grads, 0.05, momentum, weight_decay, bufs)
    for n, p in net.named_parameters():
        assert theta[n].device == p.device and (bufs == {} or bufs[n].device == p.device)
        torch.testing.assert_close(theta[n], p.detach(), **_tol(close_kw, 1e-6, 1e-7))
    fresh = init_network(ds, "convnet", W, None, None, torch.Generator().manual_seed(0))
    assert not torch.allclose(theta["classifier.weight"].cpu(), fresh.classifier.weight)  # the steps moved θ


def test_stored_trajectory_equals_module_trained_with_torch_optim(ds, tmp_path, device, close_kw):
    """End to end: expert 0 replayed by hand with nn.Module + torch.optim.SGD, drawing from the
    documented randomness contract (init, then per epoch randperm, per batch one DSA seed)."""
    strategy = default_strategy(ds.name)
    buf = _train(ds.to(device), tmp_path / "b", seed=3, dsa_strategy=None, batch_real=64, device=device)
    assert buf.meta["dsa_strategy"] == strategy != ""
    assert buf.metrics(0)["device"] == str(device)

    gen = torch.Generator().manual_seed(expert_seed(3, 0))
    net = init_network(ds, "convnet", W, None, None, gen)
    ref = [{n: p.detach().clone() for n, p in net.named_parameters()}]
    net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    X, Y = ds.train_images.to(device), ds.train_labels.to(device)
    N = X.shape[0]
    for _ in range(2):
        perm = torch.randperm(N, generator=gen)
        for s in range(0, N, 64):
            idx = perm[s : s + 64].to(device)
            x = dsa(X[idx], strategy, seed=draw_seed(gen))
            opt.zero_grad()
            F.cross_entropy(net(x), Y[idx]).backward()
            opt.step()
        ref.append({n: p.detach().cpu().clone() for n, p in net.named_parameters()})

    assert buf.epochs == [0, 1, 2] and buf.param_names == list(ref[0])
    for e in range(3):
        got = buf.params(0, e)
        if e == 0:  # θ*_0 round-trips bitwise
            assert all(torch.equal(got[n], ref[0][n]) for n in ref[0])
        for n in ref[e]:
            torch.testing.assert_close(got[n], ref[e][n], **_tol(close_kw, 1e-5, 1e-6))
    assert not torch.allclose(buf.flat(0, 0), buf.flat(0, 2))  # it did train


# ---------------------------------------------------------------------------------------------
# Format: round trips, dtypes, lazy loading
# ---------------------------------------------------------------------------------------------


def _fake_meta(shapes, epochs, dtype="float32", **over):
    m = {
        "format": "mttlite-buffer/1",
        "dataset": "fashion-mnist",
        "channel": 1,
        "im_size": [28, 28],
        "num_classes": 10,
        "zca": False,
        "zca_eps": None,
        "arch": "convnet",
        "arch_kwargs": {"width": 8, "depth": 3, "norm": None},
        "param_names": list(shapes),
        "param_shapes": [list(s) for s in shapes.values()],
        "epochs": list(epochs),
        "train_epochs": max(epochs),
        "dtype": dtype,
    }
    m.update(over)
    return m


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"features.0.weight": (4, 1, 3, 3), "features.0.bias": (4,), "classifier.weight": (10, 16)}
    traj = {e: {n: torch.randn(s, generator=g) * 10 for n, s in shapes.items()} for e in range(3)}
    write_or_check_meta(tmp_path, _fake_meta(shapes, range(3), dtype))
    save_expert(tmp_path, 0, traj, {"train_acc": [0.5, 0.75], "seed": 7}, dtype=dtype)
    buf = ExpertBuffer.open(tmp_path)
    assert len(buf) == 1 and buf.num_params == 36 + 4 + 160
    dt = buffers_mod.DTYPES[dtype]
    for e in range(3):
        p = buf.params(0, e)
        for n, shape in shapes.items():
            assert p[n].dtype == torch.float32 and p[n].shape == shape
            want = traj[e][n].to(dt).float()  # float32: identity; else torch's own rounding
            assert torch.equal(p[n], want)
            rel = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
            assert ((p[n] - traj[e][n]).abs() <= rel * traj[e][n].abs()).all()
        flat = buf.flat(0, e, dtype=torch.float64)
        assert flat.dtype == torch.float64 and flat.shape == (buf.num_params,)
        assert torch.equal(flat, torch.cat([p[n].reshape(-1) for n in shapes]).double())
    assert buf.metrics(0) == {"train_acc": [0.5, 0.75], "seed": 7}
    assert buf.bytes_per_expert() == 200 * 3 * dt.itemsize
    size = os.path.getsize(tmp_path / expert_filename(0))
    assert buf.bytes_per_expert() < size < buf.bytes_per_expert() + 4096  # payload + small JSON header


def test_fp16_buffer_is_fp32_trajectory_rounded(ds, tmp_path):
    b32 = _train(ds, tmp_path / "f32", dtype="float32", dsa_strategy="")
    b16 = _train(ds, tmp_path / "f16", dtype="float16", dsa_strategy="")
    assert _tensors(b16, 0)["002/classifier.weight"].dtype == torch.float16
    for e in b32.epochs:
        assert torch.equal(b16.flat(0, e), b32.flat(0, e).half().float())


def test_loading_one_epoch_reads_only_that_epochs_tensors(ds, tmp_path, monkeypatch):
    buf = _train(ds, tmp_path / "b", train_epochs=3, dsa_strategy="")
    requested = []

    real_safe_open = buffers_mod.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_safe_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            requested.append(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(buffers_mod, "safe_open", Spy)
    theta = buf.flat(0, 2)
    assert sorted(requested) == sorted(tensor_key(2, n) for n in buf.param_names)
    assert len(requested) == len(buf.param_names) < len(_tensors(buf, 0))
    monkeypatch.undo()
    assert torch.equal(theta, buf.flat(0, 2))


# ---------------------------------------------------------------------------------------------
# Parallel (vmap) training
# ---------------------------------------------------------------------------------------------


def test_vmap_parallel_equals_sequential(ds, tmp_path, device, close_kw):
    ds = ds.to(device)
    seq = _train(ds, tmp_path / "seq", num_experts=3, parallel=1, batch_real=64, device=device)
    par = _train(ds, tmp_path / "par", num_experts=3, parallel=3, batch_real=64, device=device)
    ragged = _train(ds, tmp_path / "ragged", num_experts=3, parallel=2, batch_real=64, device=device)  # {0, 1}, {2}
    assert len(seq) == len(par) == len(ragged) == 3
    tol = _tol(close_kw, 1e-5, 1e-6)
    for i in range(3):
        assert torch.equal(seq.flat(i, 0), par.flat(i, 0))  # same init, on any device
        for e in (1, 2):
            torch.testing.assert_close(par.flat(i, e), seq.flat(i, e), **tol)
            torch.testing.assert_close(ragged.flat(i, e), seq.flat(i, e), **tol)
        ms, mp = seq.metrics(i), par.metrics(i)
        assert ms["seed"] == mp["seed"] == expert_seed(0, i)
        for key in ("train_acc", "test_acc"):
            assert max(abs(a - b) for a, b in zip(ms[key], mp[key])) <= 0.02
    # the experts really are different networks (own init, own batches)
    assert not torch.allclose(par.flat(0, 2), par.flat(1, 2))


# ---------------------------------------------------------------------------------------------
# Resume, extend, ranks
# ---------------------------------------------------------------------------------------------


def test_resume_extend_and_ranks_equal_a_fresh_run(ds, tmp_path):
    fresh = _train(ds, tmp_path / "fresh", num_experts=2)

    # extend: 1 expert, then ask for 2
    assert len(_train(ds, tmp_path / "ext", num_experts=1)) == 1
    _assert_same_files(_train(ds, tmp_path / "ext", num_experts=2), fresh)

    # interrupt while expert 1 trains, then rerun
    def boom(i, epoch, metrics):
        if i == 1 and epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(ds, tmp_path / "int", num_experts=2, callback=boom)
    assert sorted(os.listdir(tmp_path / "int")) == [expert_filename(0), "meta.json"]  # no partial file
    seen = []
    resumed = _train(ds, tmp_path / "int", num_experts=2, callback=lambda i, e, m: seen.append(i))
    assert set(seen) == {1}  # expert 0 was skipped
    _assert_same_files(resumed, fresh)

    # two torchrun ranks, each training its own experts into the same directory
    r1 = _train(ds, tmp_path / "ranks", num_experts=2, rank=1, world_size=2)
    assert r1.expert_ids == [1]
    _assert_same_files(_train(ds, tmp_path / "ranks", num_experts=2, rank=0, world_size=2), fresh)


def test_rank_and_world_size_from_environment(ds, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    buf = _train(ds, tmp_path / "b", num_experts=5, train_epochs=0)
    assert buf.expert_ids == [1, 4]


def test_keep_epochs_stores_a_prefix_but_trains_all_epochs(ds, tmp_path):
    full = _train(ds, tmp_path / "full", train_epochs=3)
    kept = _train(ds, tmp_path / "kept", train_epochs=3, keep_epochs=1)
    assert kept.epochs == [0, 1] and full.epochs == [0, 1, 2, 3]
    for e in (0, 1):
        assert torch.equal(kept.flat(0, e), full.flat(0, e))
    assert len(kept.metrics(0)["test_acc"]) == 3  # trained for all train_epochs
    assert kept.metrics(0)["test_acc"] == full.metrics(0)["test_acc"]
    assert kept.bytes_per_expert() * 2 == full.bytes_per_expert()
    with pytest.raises(ValueError, match="epoch 2 is not stored"):
        kept.params(0, 2)
    with pytest.raises(ValueError, match="keep_epochs"):
        _train(ds, tmp_path / "bad", train_epochs=3, keep_epochs=4)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_rerun_with_different_settings_names_the_field(ds, tmp_path):
    _train(ds, tmp_path / "b", train_epochs=0)
    with pytest.raises(ValueError, match=r"lr_teacher: stored 0\.01, requested 0\.02"):
        _train(ds, tmp_path / "b", train_epochs=0, lr_teacher=0.02)
    with pytest.raises(ValueError, match="num_train: stored 200, requested 100"):
        _train(_subset(ds, 100, 10), tmp_path / "b", train_epochs=0)
    with pytest.raises(ValueError, match="dtype"):
        _train(ds, tmp_path / "b", train_epochs=0, dtype="float16")
    assert len(_train(ds, tmp_path / "b", train_epochs=0)) == 1  # the same request still resumes


def test_check_compatible(ds, tmp_path):
    buf = _train(ds, tmp_path / "b", train_epochs=3, keep_epochs=2)
    ok = {"dataset": ds.name, "channel": 1, "im_size": (28, 28), "num_classes": 10, "zca": False, "arch": "convnet"}
    ok["width"] = W
    buf.check_compatible(needed_epochs=2, **ok)  # T+ - 1 + M = 2 <= last stored epoch
    with pytest.raises(ValueError, match="trained on 'fashion-mnist-mini' but the distillation asks for 'mnist'"):
        buf.check_compatible(needed_epochs=2, **{**ok, "dataset": "mnist"})
    with pytest.raises(ValueError, match=r"max_start_epoch - 1 \+ expert_epochs = 22.*epochs 0\.\.2") as e:
        buf.check_compatible(needed_epochs=22, **{**ok, "zca": True, "width": 128})
    msg = str(e.value)
    assert "zca" in msg and "width" in msg and "dataset" not in msg  # every mismatch, only those


def test_truncated_and_corrupt_expert_files(ds, tmp_path):
    buf = _train(ds, tmp_path / "b", num_experts=2, train_epochs=1)
    f = buf.path / expert_filename(1)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])  # truncated copy
    with pytest.raises(ValueError, match=r"expert_00001\.safetensors.*truncated or corrupt.*mttlite experts"):
        ExpertBuffer.open(buf.path)
    f.write_bytes(b"\x00" * 64)  # garbage
    with pytest.raises(ValueError, match=r"expert_00001\.safetensors.*delete it"):
        ExpertBuffer.open(buf.path)
    os.remove(f)  # deleting the file and rerunning regenerates it
    _assert_same_files(_train(ds, buf.path, num_experts=2, train_epochs=1), _train(ds, tmp_path / "c", num_experts=2, train_epochs=1))


def test_foreign_missing_and_unsupported_buffers(ds, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExpertBuffer.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ExpertBuffer.open(tmp_path / "empty")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"model": "ConvNet", "epochs": 50}))
    with pytest.raises(ValueError, match="not a mttlite buffer"):
        ExpertBuffer.open(foreign)
    (foreign / "meta.json").write_text("not json {")
    with pytest.raises(ValueError, match="not valid JSON"):
        ExpertBuffer.open(foreign)
    buf = _train(ds, tmp_path / "b", train_epochs=0)
    meta = json.loads((buf.path / "meta.json").read_text())
    (buf.path / "meta.json").write_text(json.dumps({**meta, "format": "mttlite-buffer/2"}))
    with pytest.raises(ValueError, match="unsupported buffer version 'mttlite-buffer/2'"):
        ExpertBuffer.open(buf.path)
    # an expert file from another buffer (other epochs) is caught too
    (buf.path / "meta.json").write_text(json.dumps({**meta, "epochs": [0, 1]}))
    with pytest.raises(ValueError, match="does not match"):
        ExpertBuffer.open(buf.path)
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*float16"):
        _train(ds, tmp_path / "c", dtype="float8")


# ---------------------------------------------------------------------------------------------
# Metrics, and the experts actually learn
# ---------------------------------------------------------------------------------------------


def test_metrics_recorded_and_training_accuracy_improves(full, tmp_path, device):
    data = _subset(full, 400, 300)
    buf = train_experts(data.to(device), tmp_path / "b", num_experts=1, train_epochs=2, width=W, batch_real=25,
                        dsa_strategy="", progress=False, device=device)
    m = buf.metrics(0)
    assert m["seed"] == expert_seed(0, 0) and m["index"] == 0 and m["wall_time_s"] > 0
    assert len(m["train_acc"]) == len(m["test_acc"]) == len(m["train_loss"]) == 2
    assert all(0.0 <= a <= 1.0 for a in m["train_acc"] + m["test_acc"])
    assert m["train_acc"][1] > m["train_acc"][0] + 0.1, m["train_acc"]  # 32 SGD steps at lr 0.01
    assert m["train_loss"][1] < m["train_loss"][0] - 0.1, m["train_loss"]
    assert m["test_acc"][1] > 0.25, m["test_acc"]  # chance is 0.1

    # test accuracy recomputed independently from the stored θ*_E with the plain module
    net = init_network(data, "convnet", W, None, None, torch.Generator().manual_seed(0))
    net.load_state_dict(buf.params(0, 2), strict=False)
    with torch.no_grad():
        acc = (net(data.test_images).argmax(1) == data.test_labels).double().mean().item()
    # on the CPU the same number; elsewhere (other kernels) at most one test image may flip
    assert abs(acc - m["test_acc"][1]) < (1e-9 if device.type == "cpu" else 1.5 / 300)
