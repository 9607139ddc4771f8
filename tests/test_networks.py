"""Tests for mttlite.networks: shapes, DC parameter names, functional_call, instance norm, vmap.

Networks are built on the CPU (their layer sizes come from a dummy forward pass there, and their
initial weights from a CPU generator); the tests that run them take the ``device`` fixture
(tests/conftest.py; CPU by default) and move the network and its inputs there."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from mttlite.networks import (
    ACTS,
    ARCHS,
    NORMS,
    POOLINGS,
    ConvNet,
    count_params,
    default_depth,
    flat_param_names,
    get_network,
)

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids OpenMP spin-waits on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, batch: int = 2, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(batch, *shape, generator=_gen(seed), dtype=dtype).to(device)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name-keyed parameters and buffers, as a student / expert buffer holds them."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
# Classifier in-features derived by hand from the layer arithmetic (conv k, padding p: H + 2p - k + 1;
# 2x2 pool: floor(H / 2)); None = not a single-classifier net.
HAND_FEATURES = {
    # ConvNet width 8: 1x28 -> pad 3 -> 32 -> 16 -> 8 -> 4; 3x32 -> 4 (D3); 3x64, D4 -> 4
    ("convnet", (1, 28, 28)): 8 * 4 * 4, ("convnet", (3, 32, 32)): 8 * 4 * 4, ("convnet", (3, 64, 64)): 8 * 4 * 4,
    # D4: 32 / 16 = 2 ; 64 / 16 = 4
    ("convnetd4", (1, 28, 28)): 8 * 2 * 2, ("convnetd4", (3, 32, 32)): 8 * 2 * 2, ("convnetd4", (3, 64, 64)): 8 * 4 * 4,
    # D5: 32 / 32 = 1 ; 64 / 32 = 2
    ("convnetd5", (1, 28, 28)): 8, ("convnetd5", (3, 32, 32)): 8, ("convnetd5", (3, 64, 64)): 8 * 2 * 2,
    ("mlp", (1, 28, 28)): 784, ("mlp", (3, 32, 32)): 3072, ("mlp", (3, 64, 64)): 12288,
    # LeNet: 1x28 pad 2 -> 28 -> 14 -> 10 -> 5; 3x32 -> 28 -> 14 -> 10 -> 5; 3x64 -> 60 -> 30 -> 26 -> 13
    ("lenet", (1, 28, 28)): 400, ("lenet", (3, 32, 32)): 400, ("lenet", (3, 64, 64)): 16 * 13 * 13,
    # AlexNet: 1x28 pad 4 -> 32 -> 16 -> 8 -> 4 ; 3x32 -> 4 ; 3x64 -> 8
    ("alexnet", (1, 28, 28)): 192 * 16, ("alexnet", (3, 32, 32)): 192 * 16, ("alexnet", (3, 64, 64)): 192 * 64,
    # VGG-11: five 2x2 max-pools; 32 -> 1, 64 -> 2
    ("vgg11", (1, 28, 28)): 512, ("vgg11", (3, 32, 32)): 512, ("vgg11", (3, 64, 64)): 512 * 4,
    ("resnet18", (1, 28, 28)): 512, ("resnet18", (3, 32, 32)): 512, ("resnet18", (3, 64, 64)): 512,
}


def _first_linear(model: nn.Module) -> nn.Linear:
    """The Linear layer right after the flatten (classifier, fc, or fc_1 of MLP/LeNet)."""
    return next(m for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_and_feature_size(arch, shape, device):
    torch.manual_seed(0)
    model = get_network(arch, shape[0], 7, shape[1:], width=8).to(device)
    with torch.no_grad():
        out = model(_x(shape, device=device))
    assert out.shape == (2, 7) and out.device.type == device.type
    assert torch.isfinite(out).all()
    assert _first_linear(model).in_features == HAND_FEATURES[(arch, shape)]


@pytest.mark.parametrize("arch", ["convnet", "convnetd5", "lenet", "alexnet", "vgg11"])
def test_three_channel_28px_works(arch, device):
    """3 x 28 x 28 (no padding trick): VGG-11 and ConvNetD5 skip the pool that would reach 1 x 1 early."""
    model = get_network(arch, 3, 10, (28, 28), width=8)
    with torch.no_grad():
        assert model.to(device)(_x((3, 28, 28), device=device)).shape == (2, 10)
    skipped = [i for i, m in enumerate(model.features) if isinstance(m, nn.Identity)]
    assert len(skipped) == (1 if arch in ("vgg11", "convnetd5") else 0)
    if arch == "vgg11":  # 28 -> 14 -> 7 -> 3 -> (skip) -> 1
        assert model.classifier.in_features == 512
    if arch == "convnet":  # 28 -> 14 -> 7 -> 3
        assert model.classifier.in_features == 8 * 3 * 3


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        get_network("lenet", 3, 10, (8, 8))


# ---------------------------------------------------------------------------------------------
# ConvNet = DC's ConvNet
# ---------------------------------------------------------------------------------------------
def _dc_convnet_spec(channel: int, num_classes: int = 10, width: int = 128) -> list[tuple[str, tuple]]:
    """(name, shape) of DC's ConvNet-3 (instance norm, avg-pool): block d at features.4d .. 4d+3."""
    spec = []
    in_ch = channel
    for d in range(3):
        spec += [(f"features.{4 * d}.weight", (width, in_ch, 3, 3)), (f"features.{4 * d}.bias", (width,)),
                 (f"features.{4 * d + 1}.weight", (width,)), (f"features.{4 * d + 1}.bias", (width,))]
        in_ch = width
    return spec + [("classifier.weight", (num_classes, width * 4 * 4)), ("classifier.bias", (num_classes,))]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_convnet_names_and_shapes_match_dc(shape):
    model = get_network("ConvNet", shape[0], 10, shape[1:])  # width 128, depth 3 by default
    spec = _dc_convnet_spec(shape[0])
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == spec
    assert flat_param_names(model) == [n for n, _ in spec]
    assert count_params(model) == sum(torch.Size(s).numel() for _, s in spec)
    # hand count: conv0 128*C*9+128, 2 x (128*128*9+128), 3 x 256 norm, 2048*10+10
    assert count_params(model) == 128 * shape[0] * 9 + 128 + 2 * (128 * 128 * 9 + 128) + 3 * 256 + 2048 * 10 + 10
    assert isinstance(model.features[1], nn.GroupNorm)
    assert model.features[1].num_groups == 128 and model.features[1].affine
    assert list(model.buffers()) == []  # instance norm keeps no running statistics
    with torch.no_grad():
        assert model.features[0](_x(shape)).shape == (2, 128, 32, 32)  # 28 + 2*3 - 3 + 1 = 32 for MNIST


def test_convnet_layer_options():
    w = 8
    kinds = {"instancenorm": (nn.GroupNorm, w), "layernorm": (nn.GroupNorm, 1), "groupnorm": (nn.GroupNorm, 4)}
    for norm, (cls, groups) in kinds.items():
        layer = ConvNet(1, 10, width=w, norm=norm).features[1]
        assert isinstance(layer, cls) and layer.num_groups == groups
    assert isinstance(ConvNet(1, 10, width=w, norm="batchnorm").features[1], nn.BatchNorm2d)
    # norm "none" leaves the norm out, as DC: conv, act, pool per block -> second conv at index 3
    no_norm = ConvNet(1, 10, width=w, norm="none")
    assert flat_param_names(no_norm) == ["features.0.weight", "features.0.bias", "features.3.weight",
                                         "features.3.bias", "features.6.weight", "features.6.bias",
                                         "classifier.weight", "classifier.bias"]
    assert isinstance(ConvNet(1, 10, width=w, act="leakyrelu").features[2], nn.LeakyReLU)
    assert isinstance(ConvNet(1, 10, width=w, act="sigmoid").features[2], nn.Sigmoid)
    assert isinstance(ConvNet(1, 10, width=w, pooling="maxpooling").features[3], nn.MaxPool2d)
    # no pooling: the map stays 32 x 32 for a padded 28 px MNIST image
    assert ConvNet(1, 10, width=w, pooling="none").classifier.in_features == w * 32 * 32


def test_vgg_and_resnet_norms():
    """DC's VGG-11 uses instance norm; MTT's cross-architecture ResNet-18 uses batch norm."""
    vgg = get_network("vgg11", 3, 10, (32, 32))
    assert isinstance(vgg.features[1], nn.GroupNorm) and vgg.features[1].num_groups == 64
    assert isinstance(get_network("vgg11", 3, 10, (32, 32), norm="batchnorm").features[1], nn.BatchNorm2d)
    resnet = get_network("resnet18", 3, 10, (32, 32))
    assert isinstance(resnet.bn1, nn.BatchNorm2d) and isinstance(resnet.layer2[0].shortcut[1], nn.BatchNorm2d)
    assert "layer4.1.bn2.running_mean" in dict(resnet.named_buffers())
    resnet_in = get_network("resnet18", 3, 10, (32, 32), norm="instancenorm")
    assert isinstance(resnet_in.layer4[1].bn2, nn.GroupNorm) and list(resnet_in.buffers()) == []
    assert flat_param_names(resnet_in) == flat_param_names(resnet)  # same names, DC's ResNet18 / ResNet18BN


def test_default_depth_and_convnet_variants():
    assert [default_depth(s) for s in (28, (32, 32), (64, 64), (128, 128))] == [3, 3, 4, 5]

    def n_convs(m):
        return sum(isinstance(x, nn.Conv2d) for x in m.modules())

    assert n_convs(get_network("convnet", 3, 10, (64, 64), width=8)) == 4
    assert n_convs(get_network("convnet", 3, 10, (64, 64), width=8, depth=2)) == 2
    assert n_convs(get_network("CONVNETD4", 1, 10, (28, 28), width=8)) == 4
    assert n_convs(get_network("convnetd5", 1, 10, (28, 28), width=8, depth=5)) == 5


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_network("resnet50", 3, 10)
    for name in ARCHS:
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs, valid", [({"norm": "bn"}, NORMS), ({"act": "gelu"}, ACTS),
                                           ({"pooling": "stride"}, POOLINGS)])
def test_bad_layer_choices_list_valid_ones(kwargs, valid):
    with pytest.raises(ValueError) as err:
        get_network("convnet", 1, 10, width=8, **kwargs)
    assert all(v in str(err.value) for v in valid)
    with pytest.raises(ValueError):
        ConvNet(1, 10, width=8, **kwargs)


@pytest.mark.parametrize("arch, kwargs", [
    ("convnetd4", {"depth": 3}), ("mlp", {"depth": 2}), ("lenet", {"norm": "batchnorm"}),
    ("resnet18", {"act": "sigmoid"}), ("convnet", {"width": 0}), ("convnet", {"im_size": (28,)}),
    ("convnet", {"norm": "groupnorm", "width": 6}),
])
def test_inconsistent_arguments_raise(arch, kwargs):
    kwargs = {"width": 8, **kwargs}
    with pytest.raises(ValueError):
        get_network(arch, 1, 10, **kwargs)


# ---------------------------------------------------------------------------------------------
# functional_call
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, norm", [("convnet", None), ("convnet", "batchnorm"), ("mlp", None),
                                        ("lenet", None), ("alexnet", None), ("resnet18", None)])
def test_functional_call_matches_module(arch, norm, device):
    model = get_network(arch, 1, 10, (28, 28), width=8, norm=norm, generator=_gen(1)).eval().to(device)
    x = _x((1, 28, 28), device=device)
    with torch.no_grad():
        assert torch.equal(functional_call(model, _state(model), (x,)), model(x))

        # perturbed parameters: functional_call == a copy into which they were loaded
        g = _gen(2)
        perturbed = {n: p + 0.05 * torch.randn(p.shape, generator=g).to(device) for n, p in model.named_parameters()}
        state = {**perturbed, **dict(model.named_buffers())}
        other = copy.deepcopy(model)
        other.load_state_dict(state)
        out = functional_call(model, state, (x,))
        assert torch.equal(out, other(x))
        assert not torch.allclose(out, model(x))  # the perturbation was really used


def test_functional_call_batchnorm_train_mode_uses_given_buffers(device):
    """In train mode batch norm normalises with batch statistics and updates the *given* buffers."""
    model = get_network("convnet", 1, 10, (28, 28), width=8, norm="batchnorm", generator=_gen(1)).to(device)
    assert model.features[1].num_batches_tracked.item() == 0  # the dummy shape pass did not count
    assert torch.equal(model.features[1].running_var, torch.ones(8, device=device))
    x = _x((1, 28, 28), batch=4, device=device)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    out = functional_call(model, {**params, **buffers}, (x,))
    ref = copy.deepcopy(model)(x)
    assert torch.equal(out, ref)
    assert buffers["features.1.num_batches_tracked"].item() == 1
    assert model.features[1].num_batches_tracked.item() == 0  # the module's own buffers untouched


# ---------------------------------------------------------------------------------------------
# Instance norm
# ---------------------------------------------------------------------------------------------
def test_instance_norm_normalises_each_channel_of_each_sample(device):
    model = ConvNet(1, 10, width=8).double().to(device)
    norm = model.features[1]
    g = _gen(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(8, generator=g, dtype=torch.float64))
        x = model.features[0](_x((1, 28, 28), batch=3, dtype=torch.float64, device=device) * 3 + 1)  # (3, 8, 32, 32)
        y = norm(x)
    # by hand, per (sample n, channel c) over the 32 x 32 pixels
    mu = x.sum(dim=(2, 3), keepdim=True) / (32 * 32)
    var = ((x - mu) ** 2).sum(dim=(2, 3), keepdim=True) / (32 * 32)
    expected = (x - mu) / torch.sqrt(var + 1e-5) * norm.weight.view(1, 8, 1, 1) + norm.bias.view(1, 8, 1, 1)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    # with gamma = 1, beta = 0 each (n, c) slice has mean 0 and variance var / (var + eps)
    z = (y - norm.bias.view(1, 8, 1, 1)) / norm.weight.view(1, 8, 1, 1)
    torch.testing.assert_close(z.mean(dim=(2, 3)), torch.zeros(3, 8, dtype=torch.float64, device=device),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(z.var(dim=(2, 3), unbiased=False), (var / (var + 1e-5)).view(3, 8))
    # per sample: changing sample 2 leaves samples 0 and 1 unchanged
    x2 = x.clone()
    x2[2] = 5 * x2[2] - 2
    with torch.no_grad():
        assert torch.equal(norm(x2)[:2], y[:2])


def test_double_backward_through_convnet_gradgradcheck(device):
    """MTT differentiates through SGD steps: second derivatives of ConvNet (float64, tiny)."""
    model = ConvNet(1, 3, width=2, im_size=(4, 4)).double().to(device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = _x((1, 4, 4), batch=2, dtype=torch.float64, device=device).requires_grad_()
    w0 = params["features.0.weight"].clone().requires_grad_()

    def f(x, w0):
        return functional_call(model, {**params, "features.0.weight": w0}, (x,))

    assert torch.autograd.gradgradcheck(f, (x, w0))


# ---------------------------------------------------------------------------------------------
# vmap over stacked experts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_vmap_over_stacked_convnets_matches_separate_runs(dtype, tol, device, close_kw, no_tf32):
    """nn.GroupNorm works under vmap (also for grad); results agree to rounding, not bit for bit.

    Off the CPU, vmap turns the convolutions into grouped convolutions (other kernels, another
    summation order), so float32 gets ``close_kw``'s looser tolerance there, with TF32 off
    (``no_tf32``: TF32 alone moves small gradient entries by ~1e-2 relative); float64 stays at 1e-12."""
    if dtype == torch.float32 and close_kw:
        tol = close_kw["rtol"]
    models = [get_network("convnet", 1, 10, (28, 28), width=8, generator=_gen(s)).to(device, dtype) for s in range(3)]
    params, buffers = stack_module_state(models)
    assert buffers == {}
    base = copy.deepcopy(models[0]).to("meta")
    xs = _x((1, 28, 28), batch=12, dtype=dtype, device=device).view(3, 4, 1, 28, 28)
    ys = torch.randint(0, 10, (3, 4), generator=_gen(4)).to(device)

    def logits(p, x):
        return functional_call(base, p, (x,))

    def loss(p, x, y):
        return F.cross_entropy(logits(p, x), y)

    out = vmap(logits)(params, xs)  # each expert its own batch
    shared = vmap(logits, in_dims=(0, None))(params, xs[0])  # all experts on one batch
    grads = vmap(grad(loss))(params, xs, ys)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(xs[i]), rtol=tol, atol=tol)
        torch.testing.assert_close(shared[i], m(xs[0]), rtol=tol, atol=tol)
        ref = torch.autograd.grad(F.cross_entropy(m(xs[i]), ys[i]), list(m.parameters()))
        for (name, _), g_ref in zip(m.named_parameters(), ref):
            torch.testing.assert_close(grads[name][i], g_ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Deterministic initialisation from an explicit generator
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, norm", [("convnet", None), ("convnet", "batchnorm"), ("mlp", None), ("lenet", None)])
def test_generator_init_reproduces_pytorch_default_init(arch, norm):
    torch.manual_seed(5)  # reference: PyTorch's own init from the global RNG
    ref = get_network(arch, 1, 10, (28, 28), width=8, norm=norm)
    torch.manual_seed(123)  # the global RNG must not matter
    a = get_network(arch, 1, 10, (28, 28), width=8, norm=norm, generator=_gen(5))
    torch.manual_seed(456)
    b = get_network(arch, 1, 10, (28, 28), width=8, norm=norm, generator=_gen(5))
    for (n, p), (_, q), (_, r) in zip(_state(ref).items(), _state(a).items(), _state(b).items()):
        assert torch.equal(p, q) and torch.equal(q, r), n


def test_generator_init_leaves_the_global_rng_untouched():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    get_network("convnet", 1, 10, (28, 28), width=8, generator=_gen(0))
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
