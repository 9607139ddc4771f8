"""The evaluation protocol: defaults, the SGD/lr-decay loop against a hand-written update,
determinism, soft labels, the random-real baseline, confusion matrices, architectures, and a
quality check on the embedded Fashion-MNIST.

Tests that train or score take the ``device`` fixture (tests/conftest.py; CPU by default): the data
set and the evaluated set are moved there and ``train_on_set`` trains where its images are. Saving
a result (file I/O) stays on the CPU. Bitwise equalities that hold on the CPU are checked to
``close_kw``'s tolerance elsewhere (GPU kernels are not bit-reproducible)."""
from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mttlite.data import Dataset, load_dataset
from mttlite.evaluate import (
    DEFAULT_LR,
    EvalProtocol,
    EvalResult,
    confusion_matrix,
    evaluate_random_real,
    evaluate_set,
    fresh_network,
    predict,
    random_real_subset,
    resolve_lr,
    train_on_set,
    validation_indices,
)
from mttlite.evaluate import (
    test_accuracy as accuracy_of,  # renamed: pytest would collect test_*
)
from mttlite.networks import ARCHS

TINY = EvalProtocol(width=8, epochs=2, num_nets=1, dsa_strategy="")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest on one intra-op thread, above all on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ds(device):
    return load_dataset("fashion-mnist-mini").to(device)


def _toy_dataset():
    """3 classes of 1x12x12 images (class c is brighter in band c), 20 train / 10 test per class (CPU)."""
    gen = torch.Generator().manual_seed(0)

    def split(per_class):
        y = torch.arange(3).repeat_interleave(per_class)
        x = 0.5 * torch.randn(len(y), 1, 12, 12, generator=gen)
        for c in range(3):
            x[y == c, :, 4 * c:4 * c + 4] += 1.0
        return x, y

    (xtr, ytr), (xte, yte) = split(20), split(10)
    return Dataset("toy", xtr, ytr, xte, yte, ["a", "b", "c"], (0.0,), (1.0,))


@pytest.fixture(scope="module")
def toy(device):
    """The toy data set on the test device."""
    return _toy_dataset().to(device)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def tiny_set(toy):
    return random_real_subset(toy, 4, seed=3)  # 12 images


# --- the declared protocol ---------------------------------------------------------------------


def test_protocol_defaults_are_the_papers():
    p = EvalProtocol()
    # docs/method.md: SGD momentum 0.9, weight decay 5e-4, batch 256, 5 networks, lr = learned α or 0.01
    assert (p.momentum, p.weight_decay, p.batch_size, p.num_nets) == (0.9, 5e-4, 256, 5)
    assert p.lr is None and p.arch == "convnet" and p.width == 128 and p.dsa_strategy is None
    assert p.decay_epoch == p.epochs // 2 == 150
    assert EvalProtocol(**p.to_dict()) == p
    line = p.describe()
    assert "\n" not in line and "momentum 0.9" in line and "batch 256" in line and "final-epoch test accuracy" in line
    assert resolve_lr(p, None) == DEFAULT_LR == 0.01
    assert resolve_lr(p, 0.0123) == 0.0123
    assert resolve_lr(replace(p, lr=0.05), 0.0123) == 0.05


def test_protocol_rejects_bad_values():
    with pytest.raises(ValueError, match="convnet"):
        EvalProtocol(arch="nope")
    with pytest.raises(ValueError, match="crop"):
        EvalProtocol(dsa_strategy="crop_blur")
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"val_fraction": 1.0}, {"num_nets": 0}, {"momentum": 1.0}):
        with pytest.raises(ValueError):
            EvalProtocol(**bad)


# --- one network: the update rule and the lr schedule -------------------------------------------


def test_train_on_set_is_sgd_with_momentum_wd_and_lr_decay_at_half(toy, close_kw):
    """Hand-written SGD from the same init and batch order (train_on_set's documented draws from
    its generator: the init seed, then per epoch a permutation split into batches):
    v ← μv + g + λθ,  θ ← θ − η_e v,  η_e = η for e < E//2, 0.1 η after."""
    x, y = random_real_subset(toy, 3, seed=0)  # 9 images, batches of 4, 4, 1
    protocol = EvalProtocol(width=8, epochs=4, num_nets=1, dsa_strategy="", batch_size=4)
    lr, seed = 0.05, 11
    model, info = train_on_set(x, y, toy, protocol, lr=lr, seed=seed)
    assert info["lr_per_epoch"] == pytest.approx([lr, lr, 0.1 * lr, 0.1 * lr])

    def run(decay_at):
        gen = torch.Generator().manual_seed(seed)
        net = fresh_network(protocol, toy, gen).to(x.device)
        theta = {k: v.detach().clone() for k, v in net.named_parameters()}
        vel = {k: torch.zeros_like(v) for k, v in theta.items()}
        for epoch in range(4):
            eta = lr * (0.1 if epoch >= decay_at else 1.0)
            for idx in torch.randperm(9, generator=gen).to(x.device).split(4):
                leaves = {k: v.requires_grad_(True) for k, v in theta.items()}
                loss = F.cross_entropy(functional_call(net, leaves, (x[idx],)), y[idx])
                g = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
                theta = {k: v.detach() for k, v in leaves.items()}
                for k in theta:
                    vel[k] = 0.9 * vel[k] + g[k] + 5e-4 * theta[k]
                    theta[k] = theta[k] - eta * vel[k]
        return torch.cat([v.reshape(-1) for v in theta.values()])

    got = _flat(model)
    want, no_decay = run(decay_at=2), run(decay_at=99)
    assert got.device == x.device and len(info["loss_per_epoch"]) == 4
    torch.testing.assert_close(got, want, **(close_kw or {"rtol": 1e-5, "atol": 1e-6}))
    # the test can tell the schedules apart: without the decay the weights are far off
    assert (got - no_decay).abs().max() > 1e-2


def test_train_on_set_is_deterministic_and_leaves_global_rng_alone(toy, tiny_set, device, close_kw):
    x, y = tiny_set
    protocol = replace(TINY, dsa_strategy=None)  # with the default DSA augmentation
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    a, ia = train_on_set(x, y, toy, protocol, lr=0.01, seed=5)
    b, ib = train_on_set(x, y, toy, protocol, lr=0.01, seed=5)
    c, _ = train_on_set(x, y, toy, protocol, lr=0.01, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(device), cuda_state)
    pa, pb, pc = (_flat(m) for m in (a, b, c))
    assert pa.device == x.device
    if close_kw:  # GPU kernels: the same draws, equal up to rounding
        torch.testing.assert_close(pa, pb, **close_kw)
    else:
        assert torch.equal(pa, pb) and ia["loss_per_epoch"] == ib["loss_per_epoch"]
    assert not torch.allclose(pa, pc)


def test_one_hot_soft_labels_train_like_hard_labels(toy, tiny_set, close_kw):
    """Soft cross-entropy −Σ p log softmax with one-hot p equals hard cross-entropy."""
    x, y = tiny_set
    hard, _ = train_on_set(x, y, toy, TINY, lr=0.01, seed=1)
    soft, _ = train_on_set(x, F.one_hot(y, 3).float(), toy, TINY, lr=0.01, seed=1)
    for p, q in zip(hard.parameters(), soft.parameters()):
        torch.testing.assert_close(p, q, **(close_kw or {"rtol": 1e-5, "atol": 1e-7}))
    # genuinely soft labels (label smoothing) go through the whole protocol
    smooth = 0.8 * F.one_hot(y, 3).float() + 0.02
    res = evaluate_set(x, smooth, toy, TINY, progress=False)
    assert res.set_info["labels"] == "soft" and 0.0 <= res.mean <= 1.0 and len(res.accs) == 1


def test_bad_sets_are_rejected(toy, tiny_set):
    x, y = tiny_set
    with pytest.raises(ValueError, match="shape"):
        evaluate_set(x[:, :, :10], y, toy, TINY, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        evaluate_set(x, y + 5, toy, TINY, progress=False)
    with pytest.raises(ValueError, match="soft labels"):
        evaluate_set(x, torch.ones(len(x), 10, device=x.device), toy, TINY, progress=False)


# --- scoring -----------------------------------------------------------------------------------


def test_confusion_matrix_and_accuracy_agree(ds):
    x, y = random_real_subset(ds, 2, seed=0)
    model, _ = train_on_set(x, y, ds, replace(TINY, epochs=5), lr=0.01, seed=0)
    model.train()
    cm = confusion_matrix(model, ds.test_images, ds.test_labels, 10)
    assert model.training  # predict restores the mode it found
    assert cm.shape == (10, 10) and int(cm.sum()) == len(ds.test_labels) == 1000
    assert torch.equal(cm.sum(1), torch.bincount(ds.test_labels.cpu(), minlength=10))  # rows = true class
    assert torch.equal(cm.sum(0), torch.bincount(predict(model, ds.test_images), minlength=10))  # cols = prediction
    acc = accuracy_of(model, ds.test_images, ds.test_labels)
    assert acc == int(cm.trace()) / int(cm.sum())
    # independent: plain forward pass
    with torch.no_grad():
        model.eval()
        ref = (model(ds.test_images).argmax(1) == ds.test_labels).sum().item() / 1000
    assert acc == ref


def test_evaluate_set_summary_and_validation(toy, ds, tiny_set):
    x, y = tiny_set
    res = evaluate_set(x, y, toy, replace(TINY, num_nets=2, val_fraction=0.05), lr=0.02, progress=False)
    a, b = res.accs
    assert res.mean == pytest.approx((a + b) / 2) and res.std == pytest.approx(abs(a - b) / 2)  # population std
    assert res.lr == 0.02 and len(res.val_accs) == 2 and len(res.train_accs) == 2
    assert res.protocol == replace(TINY, num_nets=2, val_fraction=0.05).to_dict()
    text = str(res)
    assert re.search(rf"{100 * res.mean:.2f} \+- {100 * res.std:.2f} % \(final test acc, 2 nets, 2 epochs, lr 0.02\)", text)
    assert "val" in text
    # network i is the same whatever num_nets is
    one = evaluate_set(x, y, toy, replace(TINY, num_nets=1), lr=0.02, progress=False)
    if toy.train_images.device.type == "cpu":
        assert one.accs == [a]
    else:  # GPU kernels are not bit-reproducible: at most one of the 30 test images may flip
        assert len(one.accs) == 1 and abs(one.accs[0] - a) <= 1 / 30 + 1e-12
    idx = validation_indices(ds, 0.05)
    assert torch.equal(torch.bincount(ds.train_labels.cpu()[idx], minlength=10), torch.full((10,), 30))
    assert torch.equal(idx, validation_indices(ds, 0.05)) and len(set(idx.tolist())) == 300


def test_result_saves_as_json(tmp_path):
    """File I/O: on the CPU whatever the test device."""
    import json

    toy = _toy_dataset()
    res = evaluate_set(*random_real_subset(toy, 4, seed=3), toy, TINY, progress=False)
    path = res.save(tmp_path / "r.json")
    back = EvalResult(**json.loads(path.read_text()))
    assert back == res


# --- the random-real baseline -------------------------------------------------------------------


def test_random_real_subset_is_balanced_real_and_seeded(ds):
    x, y = random_real_subset(ds, 7, seed=1)
    assert x.shape == (70, 1, 28, 28) and y.dtype == torch.int64 and x.device == y.device == ds.train_images.device
    assert torch.equal(y.cpu(), torch.arange(10).repeat_interleave(7))
    for c in (0, 9):  # every image is a real training image of its class
        members = ds.images_of_class(c).flatten(1)
        for img in x[y == c]:
            assert (members == img.flatten()).all(1).any()
    x2, y2 = random_real_subset(ds, 7, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, random_real_subset(ds, 7, seed=2)[0])
    assert len({tuple(r.tolist()) for r in x.flatten(1)[:, ::7].cpu()}) == 70  # no repeats


@pytest.mark.parametrize("ipc", [0, 601, -3])
def test_random_real_subset_bad_ipc(ds, ipc):
    with pytest.raises(ValueError) as e:
        random_real_subset(ds, ipc)
    assert str(ipc) in str(e.value) and "600" in str(e.value)


def test_quality_ipc10_real_images_beat_chance_by_far(ds):
    """10 real images per class, ConvNet width 16, 100 epochs (1 batch each) with the default DSA:
    > 40 % test accuracy (chance: 10 %).

    Measured on the embedded set: 73.0 % (margin 33 points over the threshold), ~3-7 s on 2 shared cores.
    """
    protocol = EvalProtocol(width=16, epochs=100, num_nets=1)
    t = time.perf_counter()
    res = evaluate_random_real(ds, 10, protocol, seed=0, progress=False)
    seconds = time.perf_counter() - t
    print(f"ipc-10 random real: {res}  [{seconds:.1f}s]")
    assert res.lr == 0.01 and res.set_info["ipc"] == 10 and res.set_info["dsa_strategy"].startswith("color_crop")
    assert res.mean > 0.40
    assert res.train_accs[0] > 0.8  # it fits the 100 images it saw (measured 0.88)


# --- other architectures -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_evaluates(toy, tiny_set, arch):
    """Every network of ``ARCHS`` goes through the protocol (1x12x12 toy images keep the big ones cheap)."""
    x, y = tiny_set
    protocol = replace(TINY, arch=arch, epochs=1)
    res = evaluate_set(x, y, toy, protocol, progress=False)
    assert 0.0 <= res.mean <= 1.0 and res.protocol["arch"] == arch


def test_batch_norm_nets_train_in_train_mode_and_test_in_eval_mode(toy, tiny_set):
    x, y = tiny_set
    model, _ = train_on_set(x, y, toy, replace(TINY, arch="resnet18", epochs=1), lr=0.01, seed=0)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(int(m.num_batches_tracked) == 1 for m in bn)  # 1 epoch = 1 batch of 12 updated the stats...
    stats = {k: v.clone() for k, v in model.named_buffers()}
    assert all(v.device == x.device for v in stats.values())  # the running statistics live beside θ
    model.train()
    acc = accuracy_of(model, toy.test_images, toy.test_labels)
    assert model.training  # mode restored
    for k, v in model.named_buffers():  # ...testing did not (eval mode: running statistics are used, not updated)
        assert torch.equal(v, stats[k]), k
    with torch.no_grad():
        model.eval()
        ref = (model(toy.test_images).argmax(1) == toy.test_labels).sum().item() / len(toy.test_labels)
    assert acc == ref
