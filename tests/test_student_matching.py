"""Stage 2 (unrolled student) and stage 3 (matching loss) against independent answers."""
import pytest
import torch
from torch import nn

from core_helpers import tiny_convnet
from mttlite.augment import dsa
from mttlite.matching import matching_breakdown, matching_loss
from mttlite.params import ParamSpec
from mttlite.student import make_plan, unroll


def test_param_spec_round_trip():
    net = tiny_convnet()
    spec = ParamSpec.from_module(net)
    params = dict(net.named_parameters())
    theta = spec.flatten(params)
    assert theta.shape == (sum(p.numel() for p in net.parameters()),)
    back = spec.unflatten(theta)
    for n, p in params.items():
        assert torch.equal(back[n], p)
    with pytest.raises(ValueError, match="flat vector"):
        spec.unflatten(theta[:-1])


@pytest.mark.parametrize("strategy", ["", "color_crop_cutout_flip_scale_rotate"])
def test_one_unroll_step_equals_torch_sgd(strategy):
    net = tiny_convnet(dtype=torch.float32)
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    alpha = 0.05
    plan = make_plan(6, 1, 4, g)
    theta0 = spec.flatten(dict(net.named_parameters())).detach()
    res = unroll(net, spec, theta0, x, y, torch.tensor(alpha), plan, strategy, create_graph=False)

    # Independent answer: the module itself, one torch.optim.SGD step on the same augmented batch.
    opt = torch.optim.SGD(net.parameters(), lr=alpha)
    idx = plan.batches[0]
    xb = dsa(x[idx], strategy, seed=plan.aug_seeds[0])
    nn.functional.cross_entropy(net(xb), y[idx]).backward()
    opt.step()
    torch.testing.assert_close(res.theta.detach(), spec.flatten(dict(net.named_parameters())).detach())


def test_plan_reshuffles_like_mtt():
    g = torch.Generator().manual_seed(3)
    plan = make_plan(10, 7, 4, g)
    sizes = [len(b) for b in plan.batches]
    # chunks of 4,4,2 popped from the end: 2,4,4 then a new permutation
    assert sizes == [2, 4, 4, 2, 4, 4, 2]
    first_epoch = torch.cat(plan.batches[:3]).sort().values
    assert torch.equal(first_epoch, torch.arange(10))
    again = make_plan(10, 7, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(plan.batches, again.batches)) and plan.aug_seeds == again.aug_seeds
    assert len(make_plan(10, 3, None, g).batches[0]) == 10
    with pytest.raises(ValueError, match="batch_syn"):
        make_plan(10, 3, 11, g)
    with pytest.raises(ValueError, match="syn_steps"):
        make_plan(10, 0, 2, g)


def test_unroll_path_and_stateless_check():
    net = tiny_convnet()
    spec = ParamSpec.from_module(net)
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    plan = make_plan(3, 4, None, torch.Generator().manual_seed(0))
    theta0 = spec.flatten(dict(net.named_parameters())).detach()
    res = unroll(net, spec, theta0, x, y, 0.1, plan, "", return_path=True)
    assert len(res.path) == 5 and torch.equal(res.path[0], theta0)
    assert res.losses[-1] < res.losses[0]  # training on the same batch lowers its loss
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3)).double()
    with pytest.raises(ValueError, match="instancenorm"):
        unroll(bn, ParamSpec.from_module(bn), torch.zeros(ParamSpec.from_module(bn).num_params, dtype=torch.float64),
               x, y, 0.1, plan, "")


def test_matching_loss_identities():
    g = torch.Generator().manual_seed(0)
    start, target = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert matching_loss(start, start, target).item() == pytest.approx(1.0)  # student did not move
    assert matching_loss(target, start, target).item() == 0.0  # landed on the target
    mid = (start + target) / 2
    assert matching_loss(mid, start, target).item() == pytest.approx(0.25)  # halfway: (1/2)^2
    with pytest.raises(ValueError, match="did not move"):
        matching_loss(start, target, target)


def test_matching_breakdown_sums_to_loss():
    net = tiny_convnet()
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(1)
    P = spec.num_params
    s, t, th = (torch.randn(P, generator=g, dtype=torch.float64) for _ in range(3))
    parts = matching_breakdown(spec, th, s, t)
    assert set(parts) == set(spec.names)
    assert sum(p["contribution"] for p in parts.values()) == pytest.approx(matching_loss(th, s, t).item())
    assert sum(p["expert_share"] for p in parts.values()) == pytest.approx(1.0)
    w = spec.slices()["0.weight"]
    assert parts["0.weight"]["normalised"] == pytest.approx(
        ((th[w] - t[w]) ** 2).sum().item() / ((s[w] - t[w]) ** 2).sum().item())
