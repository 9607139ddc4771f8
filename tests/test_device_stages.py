"""Every stage of a training step runs with all its tensors on the run's device, and never waits for it.

A GPU run is slow or wrong in two ways a CPU run cannot show: a tensor of the step left on the CPU
(an index, a DSA parameter, a label, an optimiser buffer: an error, or a blocking copy per step), and
a value read back to the host inside a loop (``.item()``, ``float(t)``, ``.tolist()``, ``if t:``),
which makes the host wait for the device's whole queue once per step. These tests run each stage
with every tensor on torch's ``meta`` device — tensors with shapes and dtypes but no data — so they
need no GPU and take milliseconds:

* ``meta`` has no data, so any read-back fails (``Tensor.item() cannot be called on meta tensors``,
  ``Cannot copy out of meta tensor``), and so does arithmetic mixing meta and CPU tensors;
* :class:`DeviceGuard` (a ``TorchDispatchMode`` wrapped around every stage) adds what ``meta`` lets
  through but a GPU would pay for: an index tensor on the CPU used with a device tensor (CUDA accepts
  it, with a blocking copy; so does meta), boolean-mask indexing and ``nonzero`` (data-dependent
  shapes: a sync on CUDA), and any copy from the device back to the host.

Random numbers are still drawn on CPU generators (determinism: the same seed gives the same draws
on every device); the guard allows pure-CPU ops and the explicit host-to-device copies of their
results, which the code makes ``non_blocking`` (a pageable CPU tensor is staged by CUDA before
the call returns, so the asynchronous copy is safe and skips the stream synchronisation).

Every stage also asserts the shapes and dtypes of its outputs (e.g. each gradient has its
parameter's shape and is on ``meta``): a stage that silently skipped its work would fail.

With ``MTTLITE_TEST_DEVICE=cuda`` each stage runs a second time on the GPU, under the same guard
and with ``torch.cuda.set_sync_debug_mode("error")``, which raises on every synchronising CUDA call
(including the blocking host-to-device copies that ``meta`` cannot detect).

**What cannot run on meta**, and is therefore not tested here (all of it runs once per run or once
per epoch, outside the inner loops, on purpose):

* the class bookkeeping — ``baselines.common.class_indices`` / ``check_ipc``,
  ``evaluate.random_real_subset`` / ``validation_indices``, ``data`` splits — uses
  ``(labels == c).nonzero()`` and ``bincount``, whose output *shapes* depend on the label values;
  it runs on a CPU copy of the labels before the loops start;
* ``evaluate._check_set``'s label-range check (``labels.min() < 0``): a Python ``if`` on values,
  once per evaluated set;
* the reads that end an epoch or a run: ``_Group.train_epoch`` / ``evaluate`` (one ``tolist`` per
  epoch), ``evaluate.train_on_set`` (the loss history, once per network), ``test_accuracy`` (one
  count), ``confusion_matrix`` (``bincount``), the baselines' loss histories and their final
  ``isfinite(images).all()`` check (once per run), the snapshot copies of θ*_e to the CPU;
* ``forgetting.most_forgotten`` (a sort of the final counts, on the CPU) and the
  ``covering_radius`` that k-center reports (one float per class).
The loops themselves are tested: ``_Group.epoch_sums``, ``evaluate.train_epochs``,
``dc.matching_iteration``, ``dm.dm_iteration``, ``forgetting.forgetting_flags``, and the greedy
``herding_order`` / ``kcenter_order``, each for several steps.

Each test was checked to fail when a stray ``.item()`` or a CPU index is put into its code path.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import test_device
from device_guard import DeviceGuard, _same_device

from mttlite import augment
from mttlite.augment import DSA_STRATEGY, dsa, parse_strategy
from mttlite.baselines.common import EmbedOf, detached_params, embed_params, random_network, sample_real
from mttlite.baselines.dc import class_gradients, matching_iteration, matching_loss, train_network_on_set
from mttlite.baselines.dm import dm_iteration, dm_loss
from mttlite.baselines.forgetting import forgetting_flags
from mttlite.baselines.gradient_distance import DISTANCES, gradient_distance
from mttlite.baselines.herding import herding_order
from mttlite.baselines.kcenter import kcenter_order
from mttlite.evaluate import EvalProtocol, fresh_network, train_epochs, train_step
from mttlite.experts import _Expert, _Group, expert_seed, init_network
from mttlite.networks import ARCHS, get_network
from mttlite.zca import ZCA

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# The devices: always meta; the GPU as well when MTTLITE_TEST_DEVICE names one
# ---------------------------------------------------------------------------------------------

_EXTRA = test_device()
STAGE_DEVICES = ["meta"] + ([str(_EXTRA)] if _EXTRA.type not in ("cpu", "meta") else [])


@pytest.fixture(params=STAGE_DEVICES)
def dev(request) -> torch.device:
    d = torch.device(request.param)
    if d.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"MTTLITE_TEST_DEVICE={d} but CUDA is not available")
    return d


@contextlib.contextmanager
def guarded(device: torch.device, host_sync_ok: bool = False):
    """Run the block under :class:`DeviceGuard` and, on CUDA, with synchronisations as errors
    (unless ``host_sync_ok``: a once-per-run stage that may legitimately wait, like a fit)."""
    guard = DeviceGuard(device)
    cuda = device.type == "cuda" and not host_sync_ok
    if cuda:
        torch.cuda.synchronize(device)
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with guard:
            yield guard
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(old)
    assert guard.ops > 0, "nothing ran on the device"
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # surface asynchronous errors (e.g. a bad index) here


def on(t: torch.Tensor, device: torch.device, shape=None, dtype=None) -> None:
    """Assert t lives on ``device`` (and has ``shape`` / ``dtype`` if given)."""
    assert _same_device(t, device), (t.device, device)
    if shape is not None:
        assert tuple(t.shape) == tuple(shape), (tuple(t.shape), tuple(shape))
    if dtype is not None:
        assert t.dtype == dtype, (t.dtype, dtype)


def fake_dataset(device, n=12, classes=3, channel=1, im=16, name="fashion-mnist"):
    """A data set with the fields the stages read, its tensors on ``device`` (real values: a GPU run
    needs in-range labels; ``meta`` drops the values)."""
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        name=name, channel=channel, num_classes=classes, im_size=(im, im),
        train_images=torch.randn(n, channel, im, im, generator=g).to(device),
        train_labels=(torch.arange(n) % classes).to(device),
    )


# ---------------------------------------------------------------------------------------------
# The guard itself can fail (so every guarded test below can)
# ---------------------------------------------------------------------------------------------


def test_guard_catches_what_a_gpu_would_pay_for():
    x = torch.ones(5, device="meta")
    checks = {
        "CPU index": lambda: x[torch.tensor([0, 2])],
        "CPU operand": lambda: x * torch.ones(5),
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "mask index": lambda: x[x > 0],
        "nonzero": lambda: (x > 0).nonzero(),
        "to host": lambda: x.cpu(),
    }
    for what, fn in checks.items():
        with pytest.raises(AssertionError, match="DeviceGuard"), DeviceGuard("meta"):
            fn()
    x[torch.tensor([0, 2])]  # meta alone lets a CPU index through (so does CUDA, with a blocking copy)
    with DeviceGuard("meta") as guard:  # and lets through what is fine
        y = x * torch.tensor(2.0) + torch.rand(5, generator=torch.Generator().manual_seed(0)).to("meta")
        y = y[torch.arange(3).to("meta", non_blocking=True)]
    on(y, torch.device("meta"), (3,))
    assert guard.ops >= 3
    with pytest.raises(AssertionError, match="nothing ran on the device"), guarded(torch.device("meta")):
        torch.ones(3) + 1  # CPU only: a guard that saw nothing must not pass silently


# ---------------------------------------------------------------------------------------------
# DSA: every op of the full strategy, forward and backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", parse_strategy(DSA_STRATEGY))
@pytest.mark.parametrize("shared", [False, True])
def test_dsa_op_forward_and_backward(dev, op, shared):
    x = torch.rand(4, 3, 12, 10).to(dev).requires_grad_(True)  # non-square: crop/cutout index maps differ per axis
    with guarded(dev):
        y = dsa(x, op, seed=5, shared=shared)
        (g,) = torch.autograd.grad((y * y).sum(), x)
    on(y, dev, x.shape, x.dtype)
    on(g, dev, x.shape, x.dtype)
    assert y.requires_grad


def test_dsa_every_sub_op_and_full_strategy(dev):
    """The sub-ops one by one (color = brightness, saturation, contrast), then all of them in mode "M"."""
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64).to(dev).requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    with guarded(dev):
        outs = [f(x, gen) for fs in augment.OPS.values() for f in fs]
        y = dsa(x, DSA_STRATEGY, seed=3, mode="M")
        (g,) = torch.autograd.grad(y.sum() + sum(o.sum() for o in outs), x)
    assert len(outs) == 8
    for t in outs + [y, g]:
        on(t, dev, x.shape, torch.float64)


# ---------------------------------------------------------------------------------------------
# ZCA: apply and inverse (and their backward)
# ---------------------------------------------------------------------------------------------


def test_zca_apply_and_inverse(dev):
    d = 3 * 4 * 4
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g)
    zca = ZCA(torch.randn(d, generator=g), a @ a.T / d + torch.eye(d), torch.eye(d), eps=0.1).to(dev)
    x = torch.randn(5, 3, 4, 4, generator=g).to(dev).requires_grad_(True)
    with guarded(dev):
        white = zca(x)
        back = zca.inverse(white)
        (gx,) = torch.autograd.grad(back.sum(), x)
    for t in (white, back, gx):
        on(t, dev, x.shape, torch.float32)


def test_zca_fit(dev):
    """The fit (float64 covariance and eigh on the device), once per data set. On CUDA ``eigh`` reads
    its convergence flag back to the host (one wait per fit, not per step), so only the guard applies."""
    x = torch.randn(20, 2, 3, 3, generator=torch.Generator().manual_seed(1)).to(dev)
    with guarded(dev, host_sync_ok=True):
        zca = ZCA.fit(x, eps=0.1, chunk_size=8)
    on(zca.mean, dev, (18,), torch.float32)
    on(zca.transform, dev, (18, 18), torch.float32)
    on(zca.inverse_transform, dev, (18, 18), torch.float32)


# ---------------------------------------------------------------------------------------------
# Networks: forward and backward of every architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_network_forward_backward(dev, arch):
    net = get_network(arch, 3, 5, (32, 32), width=8, generator=torch.Generator().manual_seed(0)).to(dev)
    x = torch.randn(2, 3, 32, 32).to(dev)
    y = torch.tensor([0, 4]).to(dev)
    params = [p for p in net.parameters()]
    with guarded(dev):
        logits = net(x)  # train mode: batch norm updates its running statistics on the device
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params)
    on(logits, dev, (2, 5), torch.float32)
    for p, gp in zip(params, grads):
        on(gp, dev, p.shape, p.dtype)
    for b in net.buffers():
        on(b, dev)


def test_convnet_second_order(dev):
    """MTT differentiates through a student step: ∇_x of a gradient norm (instance norm's double backward)."""
    net = get_network("convnet", 1, 3, (16, 16), width=4, generator=torch.Generator().manual_seed(0)).to(dev)
    x = torch.randn(2, 1, 16, 16).to(dev).requires_grad_(True)
    with guarded(dev):
        g = torch.autograd.grad(net(x).square().sum(), list(net.parameters()), create_graph=True)
        (gx,) = torch.autograd.grad(sum(t.square().sum() for t in g), x)
    on(gx, dev, x.shape, x.dtype)


# ---------------------------------------------------------------------------------------------
# Experts: one step, sequential and vmapped, and a whole epoch
# ---------------------------------------------------------------------------------------------


def _group(device, k, ds, strategy=DSA_STRATEGY):
    experts, nets = [], []
    for i in range(k):
        gen = torch.Generator().manual_seed(expert_seed(0, i))
        nets.append(init_network(ds, "convnet", 4, None, None, gen))
        experts.append(_Expert(i, expert_seed(0, i), gen, {}, [], [], []))
    opts = {"batch_real": 5, "dsa_strategy": strategy, "lr_teacher": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
    return _Group(experts, nets, vmapped=k > 1, device=device, opts=opts), nets[0]


@pytest.mark.parametrize("k", [1, 3], ids=["sequential", "vmap"])
def test_expert_train_step(dev, k):
    ds = fake_dataset(dev)
    group, net = _group(dev, k, ds)
    X, Y = ds.train_images, ds.train_labels
    shapes = {n: p.shape for n, p in net.named_parameters()}
    stack = (k,) if k > 1 else ()
    with guarded(dev):
        perms = group.permutations(X.shape[0], X.device)
        x, y = group.next_batch(X, Y, perms, 0)  # indexing + one DSA call per expert
        loss, right = group.train_step(x, y)  # first step: creates the momentum buffers
        loss2, _ = group.train_step(x, y)  # second step: uses them
    on(x, dev, stack + (5, 1, 16, 16), torch.float32)
    on(y, dev, stack + (5,), torch.int64)
    on(loss, dev, (k,), torch.float32)
    on(loss2, dev, (k,), torch.float32)
    on(right, dev, (k,), torch.int64)
    assert set(group.params) == set(shapes) == set(group.momentum_buffers)
    for n, shape in shapes.items():
        on(group.params[n], dev, stack + tuple(shape), torch.float32)
        on(group.momentum_buffers[n], dev, stack + tuple(shape), torch.float32)


@pytest.mark.parametrize("k", [1, 2], ids=["sequential", "vmap"])
def test_expert_epoch_loop(dev, k):
    """``epoch_sums``: 12 images in batches of 5 (5, 5, 2), the whole loop without a read-back."""
    ds = fake_dataset(dev)
    group, _ = _group(dev, k, ds)
    with guarded(dev):
        loss_sum, correct = group.epoch_sums(ds.train_images, ds.train_labels)
    on(loss_sum, dev, (k,), torch.float64)
    on(correct, dev, (k,), torch.float64)


# ---------------------------------------------------------------------------------------------
# Evaluation: one SGD step, and the epochs of train_on_set
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_evaluation_train_step(dev, soft):
    ds = fake_dataset(dev, classes=4)
    protocol = EvalProtocol(width=8, epochs=2, num_nets=1)
    model = fresh_network(protocol, ds, torch.Generator().manual_seed(0)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=protocol.momentum, weight_decay=protocol.weight_decay)
    xb = ds.train_images[:6]
    yb = torch.full((6, 4), 0.25).to(dev) if soft else ds.train_labels[:6]
    with guarded(dev):
        xb = dsa(xb, DSA_STRATEGY, seed=0)
        loss = train_step(model, opt, xb, yb)
    on(loss, dev, (), torch.float32)
    assert not loss.requires_grad
    for p in model.parameters():
        on(p.grad, dev, p.shape, p.dtype)
        on(opt.state[p]["momentum_buffer"], dev, p.shape, p.dtype)  # v lives beside θ


def test_evaluation_epochs(dev):
    """``train_epochs`` (the body of ``train_on_set``): 2 epochs of 12 images in batches of 5, with DSA."""
    ds = fake_dataset(dev)
    protocol = EvalProtocol(width=8, epochs=2, num_nets=1, batch_size=5)
    gen = torch.Generator().manual_seed(0)
    model = fresh_network(protocol, ds, gen).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    with guarded(dev):
        lrs, totals = train_epochs(model, opt, ds.train_images, ds.train_labels, protocol, 0.01, gen, DSA_STRATEGY)
    assert lrs == pytest.approx([0.01, 0.001])
    on(totals, dev, (2,), torch.float32)


# ---------------------------------------------------------------------------------------------
# DC / DSA / DCC: gradient matching distances, the loss and its backward, one iteration
# ---------------------------------------------------------------------------------------------


def _net_and_params(ds, dev, width=4):
    net = random_network(ds, torch.Generator().manual_seed(0), "convnet", width, None, None, dev)
    return net, detached_params(net, requires_grad=True)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradient_distance_forward_backward(dev, distance):
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 1, 3, 3), (4,), (3, 64)]
    real = [torch.randn(s, generator=g).to(dev) for s in shapes]
    syn = [torch.randn(s, generator=g).to(dev).requires_grad_(True) for s in shapes]
    with guarded(dev):
        d = gradient_distance(real, syn, distance, mag_weight=0.1)
        # "dc" and "angle" ignore 1-D parameters (their gradient is zero)
        grads = torch.autograd.grad(d, syn, allow_unused=True, materialize_grads=True)
    on(d, dev, (), torch.float32)
    for s, gs in zip(shapes, grads):
        on(gs, dev, s, torch.float32)


@pytest.mark.parametrize("intra,inter", [(True, False), (False, True), (True, True)], ids=["dc", "dcc", "multi"])
def test_dc_matching_loss_and_backward(dev, intra, inter):
    ds = fake_dataset(dev)
    net, params = _net_and_params(ds, dev)
    images = torch.randn(6, 1, 16, 16).to(dev).requires_grad_(True)  # 2 per class
    with guarded(dev):
        real = [(ds.train_images[c::3], c) for c in range(3)]
        syn = [(dsa(images[2 * c:2 * c + 2], DSA_STRATEGY, seed=c, shared=True), c) for c in range(3)]
        g_real = class_gradients(net, params, real, create_graph=False)
        g_syn = class_gradients(net, params, syn, create_graph=True)
        loss = matching_loss(g_real, g_syn, intra, inter, "dc")
        (gi,) = torch.autograd.grad(loss, images)
    on(loss, dev, (), torch.float32)
    on(gi, dev, images.shape, torch.float32)
    for gr, (n, p) in zip(g_real[0], params.items()):
        on(gr, dev, p.shape, p.dtype)


def test_dc_iteration_and_network_training(dev):
    """``matching_iteration``: 2 outer steps (real batches drawn on the device, siamese DSA, the
    image update) with ``train_network_on_set`` (1 epoch, batch 4, per-image DSA) in between."""
    ds = fake_dataset(dev)
    net, params = _net_and_params(ds, dev)
    images = torch.randn(6, 1, 16, 16).to(dev).requires_grad_(True)
    labels = torch.arange(3).repeat_interleave(2).to(dev)
    opt = torch.optim.SGD([images], lr=0.1, momentum=0.5)
    members = [torch.arange(c, 12, 3).to(dev) for c in range(3)]  # class_indices' answer, on the device
    gen = torch.Generator().manual_seed(0)
    with guarded(dev):
        losses = matching_iteration(net, params, images, labels, opt, ds.train_images, members, 2, 2, 1, True, False,
                                    "dc", 0.1, DSA_STRATEGY, 0.01, 3, 4, gen)
        trained = train_network_on_set(net, params, images, labels, 1, 0.01, 4, DSA_STRATEGY, gen)
    on(losses, dev, (2,), torch.float32)
    on(images.grad, dev, images.shape, torch.float32)
    for n, p in params.items():
        on(trained[n], dev, p.shape, p.dtype)


# ---------------------------------------------------------------------------------------------
# DM: the mean-embedding loss, its backward, one iteration
# ---------------------------------------------------------------------------------------------


def test_dm_loss_and_iteration(dev):
    ds = fake_dataset(dev)
    net = random_network(ds, torch.Generator().manual_seed(0), "convnet", 4, None, None, dev)
    model, params = EmbedOf(net), embed_params(detached_params(net))
    images = torch.randn(6, 1, 16, 16).to(dev).requires_grad_(True)
    opt = torch.optim.SGD([images], lr=1.0, momentum=0.5)
    members = [torch.arange(c, 12, 3).to(dev) for c in range(3)]
    gen = torch.Generator().manual_seed(0)
    with guarded(dev):
        xr = sample_real(ds.train_images, members[0], 3, gen)
        e_real = torch.func.functional_call(model, params, (xr,))
        e_syn = torch.func.functional_call(model, params, (images[:2],))
        loss = dm_loss([(e_real, e_syn)])
        (gi,) = torch.autograd.grad(loss, images)
        it_loss = dm_iteration(model, params, images, opt, ds.train_images, members, 2, 3, DSA_STRATEGY, gen)
    dim = 4 * 2 * 2  # width 4, 16 px (+ padding 3 on one channel: 20 → 10 → 5 → 2)
    on(xr, dev, (3, 1, 16, 16))
    on(e_real, dev, (3, dim), torch.float32)
    on(loss, dev, (), torch.float32)
    on(gi, dev, images.shape, torch.float32)
    on(it_loss, dev, (), torch.float32)
    on(images.grad, dev, images.shape, torch.float32)


# ---------------------------------------------------------------------------------------------
# The coreset loops: forgetting's training run, herding and k-center's greedy picks
# ---------------------------------------------------------------------------------------------


def test_forgetting_training_run(dev):
    ds = fake_dataset(dev)
    with guarded(dev):
        correct = forgetting_flags(ds, 2, torch.Generator().manual_seed(0), width=4, batch_real=5, device=dev)
    on(correct, dev, (2, 12), torch.bool)


def test_herding_and_kcenter_picks(dev):
    f = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)).to(dev)
    with guarded(dev):
        h = herding_order(f, 4)
        k = kcenter_order(f, 4, first=2)
    on(h, dev, (4,), torch.int64)
    on(k, dev, (4,), torch.int64)

