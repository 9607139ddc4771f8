"""Baselines: every method builds a valid set; herding, k-center and forgetting satisfy their defining
properties against brute force / hand-built answers; the DC distances and the DM loss match
hand-computed values; gradient matching lowers its loss on a tiny problem.

Tests that build sets or compute losses take the ``device`` fixture (tests/conftest.py; CPU by
default): the data set is moved there and the methods run with ``device=``. The bitwise-determinism
test stays on the CPU (same seed, same CPU result; GPU kernels are not bit-reproducible)."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from mttlite.baselines import CORESETS, METHODS, make_set, options
from mttlite.baselines.dc import class_gradients, matching_loss
from mttlite.baselines.dm import dm_loss
from mttlite.baselines.forgetting import (
    count_forgetting,
    forgetting_correctness,
    most_forgotten,
)
from mttlite.baselines.gradient_distance import (
    gradient_distance,
    layer_distance_angle,
    layer_distance_dc,
)
from mttlite.baselines.herding import herding
from mttlite.baselines.kcenter import covering_radius, kcenter_greedy
from mttlite.data import load_dataset
from mttlite.experts import train_experts
from mttlite.networks import get_network
from mttlite.synset import SyntheticSet

PER_CLASS = 30  # images per class of the test subset of the embedded set


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest on one intra-op thread, above all on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def small():
    """The embedded Fashion-MNIST cut to the first PER_CLASS training images of each class (same object type)."""
    ds = load_dataset("fashion-mnist-mini")
    idx = torch.cat([(ds.train_labels == c).nonzero().squeeze(1)[:PER_CLASS] for c in range(ds.num_classes)])
    return replace(ds, train_images=ds.train_images[idx], train_labels=ds.train_labels[idx])


@pytest.fixture(scope="module")
def buffer(small, tmp_path_factory):
    """One width-8 expert, 2 epochs, on the small set (for MTT and the expert embedding)."""
    out = tmp_path_factory.mktemp("buffer")
    return train_experts(small, out, num_experts=1, train_epochs=2, width=8, progress=False)


# Small sizes for every method (width 8, one or two iterations): validity, not quality.
FAST = {
    "random": {},
    "herding": {"width": 8},
    "kcenter": {"width": 8},
    "forgetting": {"width": 8, "epochs": 2},
    "dc": {"width": 8, "iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 8},
    "dsa": {"width": 8, "iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 8},
    "dcc": {"width": 8, "iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 8},
    "dm": {"width": 8, "iterations": 2, "batch_real": 8},
    "mtt": {"syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 1, "iterations": 2},
}
MULTI_LEVEL = {"width": 8, "iterations": 1, "outer_loop": 2, "inner_loop": 1, "batch_real": 8,
               "inter_class": True, "distance": "angle"}


def _check_valid(s: SyntheticSet, ds, ipc: int, method: str):
    k = ds.num_classes
    assert isinstance(s, SyntheticSet) and s.method == method
    assert s.images.shape == (k * ipc, ds.channel, *ds.im_size) and s.images.dtype == torch.float32
    assert s.labels.dtype == torch.int64
    assert torch.equal(s.labels, torch.arange(k).repeat_interleave(ipc))  # class-major, balanced
    assert torch.isfinite(s.images).all()
    cost = s.provenance["cost"]
    assert cost["seconds"] >= 0 and cost["peak_rss_mib"] > 0 and cost["rss_growth_mib"] >= 0
    assert s.config["ipc"] == ipc
    s.check_dataset(ds)


@pytest.mark.parametrize("ipc", [1, 10])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_a_valid_set(method, ipc, small, buffer, device):
    kw = dict(FAST[method], buffer=buffer) if method == "mtt" else dict(FAST[method])
    s = make_set(method, small.to(device), ipc, seed=3, device=device, **kw)
    _check_valid(s, small, ipc, method)
    assert s.provenance["cost"]["device"] == str(device)
    if method in CORESETS:  # selections are real training images of the right class
        idx = torch.tensor(s.provenance["indices"]) if method != "random" else None
        if idx is not None:
            assert torch.equal(s.images, small.train_images[idx])
            assert torch.equal(small.train_labels[idx], s.labels)
            assert len(set(idx.tolist())) == len(idx)  # no image twice
        else:
            flat = small.train_images.flatten(1)
            for x, y in zip(s.images.flatten(1), s.labels):
                hit = (flat == x).all(1).nonzero().squeeze(1)
                assert hit.numel() >= 1 and (small.train_labels[hit] == y).any()
    elif method != "mtt":
        # synthesis starts at the 'random' set of the same seed and moves away from it
        start = make_set("random", small, ipc, seed=3).images
        assert not torch.equal(s.images, start)
        assert s.provenance["loss_history"] and all(math.isfinite(v) for v in s.provenance["loss_history"])
    else:
        assert s.syn_lr is not None and s.syn_lr > 0


def test_multi_level_angle_option_and_determinism(small):
    a = make_set("dc", small, 2, seed=1, **MULTI_LEVEL)
    b = make_set("dc", small, 2, seed=1, **MULTI_LEVEL)
    _check_valid(a, small, 2, "dc")
    assert a.config["inter_class"] and a.config["distance"] == "angle"
    assert torch.equal(a.images, b.images)  # same seed, same CPU result
    c = make_set("dc", small, 2, seed=2, **MULTI_LEVEL)
    assert not torch.equal(a.images, c.images)


def test_embedding_from_expert_is_recorded(small, buffer):
    s = make_set("herding", small, 2, buffer=buffer)
    info = s.provenance["embedding"]
    assert info["source"] == "trained expert" and info["epoch"] == 2 and info["width"] == 8
    r = make_set("kcenter", small, 2, width=8)
    assert r.provenance["embedding"]["source"] == "random init"


def test_make_set_errors(small):
    with pytest.raises(ValueError, match="choose one of: random, herding"):
        make_set("gradient-magic", small, 1)
    with pytest.raises(ValueError, match="has no option"):
        make_set("dm", small, 1, lr_teacher=0.1)
    with pytest.raises(ValueError, match="smallest class size 30"):
        make_set("herding", small, 31)
    with pytest.raises(ValueError, match="needs buffer="):
        make_set("mtt", small, 1)
    with pytest.raises(ValueError, match="DistillConfig fields"):
        make_set("mtt", small, 1, buffer="unused", syn_stepz=3)
    with pytest.raises(ValueError, match="outer_loop= and inner_loop="):
        make_set("dc", small, 3, iterations=1)
    with pytest.raises(ValueError, match="distance must be one of"):
        make_set("dc", small, 1, distance="euclid", iterations=1)
    assert options("dm")["lr_img"] == 1.0 and options("dc")["lr_img"] == 0.1


# ----------------------------------------------------------------------------------------------
# Herding and k-center: defining properties on toy 2-D problems
# ----------------------------------------------------------------------------------------------


def test_herding_greedy_step_is_the_brute_force_best(device):
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        pts = torch.randn(14, 2, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 0.5], dtype=torch.float64)
        order = herding(pts.to(device), 8).tolist()  # picked on the device, returned on the CPU
        mu = pts.mean(0)
        chosen = []
        for j in order:
            # brute force: the running-mean error of every candidate not yet chosen
            errs = {i: float((mu - pts[chosen + [i]].mean(0)).norm()) for i in range(14) if i not in chosen}
            assert errs[j] == pytest.approx(min(errs.values()), abs=1e-12)
            chosen.append(j)
        assert len(set(order)) == 8


def test_kcenter_picks_farthest_and_is_within_twice_optimal(device):
    gen = torch.Generator().manual_seed(1)
    for trial in range(6):
        pts = torch.rand(9, 2, generator=gen, dtype=torch.float64)
        k = 3
        opt = min(covering_radius(pts, torch.tensor(c)) for c in itertools.combinations(range(9), k))
        for first in range(9):
            order = kcenter_greedy(pts.to(device), k, first).tolist()
            assert order[0] == first
            for step in range(1, k):
                centres = order[:step]
                # brute force: each point's distance to its nearest centre, by a python loop
                dmin = [min(math.dist(pts[i].tolist(), pts[c].tolist()) for c in centres) for i in range(9)]
                assert dmin[order[step]] == pytest.approx(max(dmin), abs=1e-12)
            r = covering_radius(pts.to(device), torch.tensor(order))
            assert opt <= r <= 2 * opt + 1e-12


def test_covering_radius_by_hand():
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert covering_radius(pts, torch.tensor([0])) == pytest.approx(10.0)
    assert covering_radius(pts, torch.tensor([1])) == pytest.approx(5.0)


# ----------------------------------------------------------------------------------------------
# Forgetting
# ----------------------------------------------------------------------------------------------


def test_forgetting_counts_hand_built_sequences(device):
    # columns = examples, rows = presentations
    seqs = [
        [1, 0, 1, 0, 1],  # forgotten twice (t = 1 and t = 3)
        [0, 0, 0, 1, 1],  # learned late, never forgotten
        [1, 1, 0, 0, 0],  # forgotten once
        [0, 1, 1, 1, 0],  # forgotten once, at the end
        [1, 1, 1, 1, 1],  # unforgettable
        [0, 0, 0, 0, 0],  # never learned: 0 events (DeepCore's bookkeeping)
        [1, 0, 0, 1, 0],  # twice
    ]
    correct = torch.tensor(seqs, dtype=torch.bool).T.to(device)  # (T=5, n=7)
    assert count_forgetting(correct).tolist() == [2, 0, 1, 1, 0, 0, 2]
    assert count_forgetting(correct[:1]).tolist() == [0] * 7  # one presentation: no event possible


def test_most_forgotten_ties_broken_by_seed(device):
    counts = torch.tensor([2, 0, 1, 1, 0, 2, 1]).to(device)
    seen = set()
    for seed in range(20):
        pick = most_forgotten(counts, 3, torch.Generator().manual_seed(seed)).tolist()
        assert set(pick[:2]) == {0, 5} and pick[2] in (2, 3, 6)  # the two 2s, then one of the 1s
        again = most_forgotten(counts, 3, torch.Generator().manual_seed(seed)).tolist()
        assert pick == again
        seen.add(pick[2])
    assert seen == {2, 3, 6}  # the tie really is broken by the seed, not by position


def test_forgetting_run_records_every_presentation(small, device):
    gen = torch.Generator().manual_seed(0)
    correct, accs = forgetting_correctness(small.to(device), 3, gen, width=8, batch_real=64, device=device)
    assert correct.shape == (3, len(small.train_labels)) and correct.dtype == torch.bool
    assert accs == pytest.approx(correct.float().mean(1).tolist())
    assert 0.0 < accs[-1] < 1.0  # a real training run: some right, some wrong
    again, _ = forgetting_correctness(small.to(device), 3, torch.Generator().manual_seed(0), width=8, batch_real=64,
                                      device=device)
    if device.type == "cpu":  # bitwise on the CPU; GPU kernels may flip a near-tie
        assert torch.equal(correct, again)
    else:
        assert (correct != again).float().mean() < 0.02
    s = make_set("forgetting", small, 3, epochs=3, width=8, batch_real=64, seed=0)
    counts = count_forgetting(correct)
    idx = torch.tensor(s.provenance["indices"])
    assert s.provenance["events_of_selected"] == counts[idx].tolist()
    for c in range(small.num_classes):  # the kept ones are the most forgotten of their class
        members = (small.train_labels == c).nonzero().squeeze(1)
        kept = counts[idx[3 * c:3 * c + 3]]
        rest = counts[members[~torch.isin(members, idx)]]
        assert kept.min() >= rest.max()


# ----------------------------------------------------------------------------------------------
# Gradient distances and the DM loss, by hand
# ----------------------------------------------------------------------------------------------


def test_dc_distance_by_hand(device):
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, device=device)
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]], dtype=torch.float64, device=device)
    # row 0: 1 − 1/(1·√2 + 1e-6);  row 1: 1 − (−1)/(1·1 + 1e-6)
    want = (1 - 1 / (math.sqrt(2) + 1e-6)) + (1 + 1 / (1 + 1e-6))
    assert layer_distance_dc(a, b).item() == pytest.approx(want, rel=1e-12)
    # a conv weight (out, in, h, w) is compared per output node over in·h·w
    assert layer_distance_dc(a.view(2, 1, 1, 2), b.view(2, 1, 2, 1)).item() == pytest.approx(want, rel=1e-12)
    bias_a, bias_b = torch.tensor([1.0, 2.0], device=device), torch.tensor([-5.0, 3.0], device=device)
    assert layer_distance_dc(bias_a, bias_b).item() == 0.0  # DC ignores 1-D parameters
    assert gradient_distance([a, bias_a], [b, bias_b], "dc").item() == pytest.approx(want, rel=1e-12)
    # DC code's other two options
    assert gradient_distance([a, bias_a], [b, bias_b], "mse").item() == pytest.approx(1 + 4 + 36 + 1)
    va, vb = [1, 0, 0, 1, 1, 2], [1, 1, 0, -1, -5, 3]
    cos = sum(x * y for x, y in zip(va, vb)) / (math.hypot(*va) * math.hypot(*vb) + 1e-6)
    assert gradient_distance([a, bias_a], [b, bias_b], "cos").item() == pytest.approx(1 - cos, rel=1e-6)


def test_angle_distance_by_hand(device):
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, device=device)
    b = torch.tensor([[1.0, 1.0], [1.0, math.sqrt(3)]], dtype=torch.float64, device=device)
    lam = 0.1
    # row 0: angle π/4, norms 1 and √2;  row 1: angle π/6, norms 1 and 2
    want = (0.25 + lam * (1 - math.sqrt(2)) ** 2 / 3) + (1 / 6 + lam * (1 - 2) ** 2 / 5)
    assert layer_distance_angle(a, b, lam).item() == pytest.approx(want, rel=1e-9)
    assert gradient_distance([a], [b], "angle", mag_weight=0.0).item() == pytest.approx(0.25 + 1 / 6, rel=1e-9)
    # identical gradients: 0 up to the clamp (arccos(1 − 1e-6)/π per output node)
    assert layer_distance_angle(a, a).item() == pytest.approx(2 * math.acos(1 - 1e-6) / math.pi, rel=1e-6)


def test_matching_loss_intra_inter_and_sum(device):
    e0, e1 = torch.tensor([[1.0, 0.0]], device=device), torch.tensor([[0.0, 1.0]], device=device)
    g1r, g1s = [e0], [e1]  # class 1: orthogonal
    g2r, g2s = [e1], [e0]  # class 2: orthogonal
    intra = matching_loss([g1r, g2r], [g1s, g2s], True, False).item()
    inter = matching_loss([g1r, g2r], [g1s, g2s], False, True).item()
    both = matching_loss([g1r, g2r], [g1s, g2s], True, True).item()
    assert intra == pytest.approx(2.0, abs=1e-5)  # 1 − cos 90° per class
    assert inter == pytest.approx(0.0, abs=1e-5)  # both sums are (1, 1): aligned
    assert both == pytest.approx(intra + inter)
    with pytest.raises(ValueError):
        matching_loss([g1r], [g1s], False, False)


def test_dm_loss_by_hand(device):
    pairs = [
        (torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0]])),  # means (2, 3) vs (0, 0): 13
        (torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 2.0]])),  # means equal: 0
        (torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[4.0, 1.0]])),  # (1, 0) vs (4, 1): 9 + 1
    ]
    pairs = [(a.to(device), b.to(device)) for a, b in pairs]
    loss = dm_loss(pairs)
    assert loss.device == pairs[0][0].device and loss.item() == pytest.approx(23.0)


def test_gradient_matching_loss_decreases_on_a_tiny_problem(small, device):
    """Fixed network and real batches; SGD on 2 noise images per class lowers Σ_c D(g^T_c, g^S_c)."""
    gen = torch.Generator().manual_seed(0)
    net = get_network("convnet", 1, 10, (28, 28), width=4, depth=2, generator=gen).to(device)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    classes = [0, 1, 2]
    real = [(small.train_images[small.train_labels == c][:16].to(device), c) for c in classes]
    g_real = class_gradients(net, params, real, create_graph=False)
    syn = torch.randn(6, 1, 28, 28, generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=0.1, momentum=0.5)
    losses = []
    for _ in range(15):
        g_syn = class_gradients(net, params, [(syn[2 * i:2 * i + 2], c) for i, c in enumerate(classes)], True)
        loss = matching_loss(g_real, g_syn)
        (syn.grad,) = torch.autograd.grad(loss, syn)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 10  # mostly monotone
