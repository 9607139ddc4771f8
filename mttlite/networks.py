"""Networks of the dataset-distillation literature (DC / DSA / DM / MTT code bases).

MTT trains *experts* on real data and stores their parameters after every epoch,
theta*_0, theta*_1, ..., theta*_E, as dictionaries keyed by parameter name
(``features.0.weight``, ..., ``classifier.bias``). A *student* starts from theta*_t and
takes N SGD steps on the synthetic set; each step is a pure function of a parameter
dict, evaluated with ``torch.func.functional_call(model, params, (x,))``:

    theta_{n+1} = theta_n - alpha * grad_theta l(f(A(x_syn); theta_n), y_syn)

So the networks here are ordinary ``nn.Module`` s whose only job is to *name* the
parameters exactly as the DC/MTT code does (expert buffers are keyed by these names)
and to compute f(x; theta). Nothing is mutated during the unroll.

The default network of every paper is **ConvNet-D** (Gidaris & Komodakis 2018, as
used by DC): D blocks of

    conv 3x3 (width channels) -> instance norm -> ReLU -> 2x2 average pooling

followed by one linear classifier on the flattened feature map. Instance norm
normalises every channel c of every sample n over its H x W pixels:

    y[n, c] = (x[n, c] - mu[n, c]) / sqrt(var[n, c] + eps) * gamma[c] + beta[c]
    mu[n, c] = mean_{h, w} x[n, c, h, w],   var[n, c] = mean_{h, w} (x[n, c, h, w] - mu[n, c])^2

DC implements it as ``nn.GroupNorm(width, width, affine=True)`` (one group per
channel, learnable gamma/beta, no running statistics), and so do we. For 1-channel
28 px images (MNIST, Fashion-MNIST) the first conv uses padding 3, which turns
28 x 28 into 32 x 32, so that ConvNet-3 ends on the same 4 x 4 map as on CIFAR:
128 * 4 * 4 = 2048 classifier inputs.

Generalisation over the original code: every flattened feature size is computed with
a dummy forward pass (under ``torch.no_grad``) instead of being hard-coded for
32 px, so every architecture works for 28, 32, 64, ... px and 1 or 3 channels. A 2x2
pooling stage that would shrink the map below 2 x 2 while convolutions still follow
(e.g. VGG-11's fourth max-pool on a 3-channel 28 px image: 3 x 3 -> 1 x 1, after which
instance norm would output the constant beta) is replaced by ``nn.Identity`` - it has
no parameters, so all parameter names stay those of DC.

Cross-architecture evaluation (MTT's cross-architecture table) uses ResNet-18 *with
batch norm*, VGG-11, AlexNet, LeNet and MLP; ``get_network`` builds all of them by name.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AvgPool2x2, InstanceNorm

ARCHS: tuple[str, ...] = ("convnet", "convnetd4", "convnetd5", "mlp", "lenet", "alexnet", "vgg11", "resnet18")
NORMS: tuple[str, ...] = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS: tuple[str, ...] = ("relu", "leakyrelu", "sigmoid")
POOLINGS: tuple[str, ...] = ("avgpooling", "maxpooling", "none")

# VGG-11 of DC: numbers are conv widths, "M" is a 2x2 max-pool.
VGG11_CFG: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


# ----------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------
def _choose(kind: str, value: str, valid: Sequence[str]) -> str:
    """Lower-cased ``value`` if it is one of ``valid``, else a ValueError listing them."""
    if not isinstance(value, str) or value.lower() not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")
    return value.lower()


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _as_im_size(im_size) -> tuple[int, int]:
    """``28`` or ``(28, 28)`` -> ``(28, 28)``; anything else is a ValueError."""
    if isinstance(im_size, int) and not isinstance(im_size, bool):
        im_size = (im_size, im_size)
    try:
        h, w = (int(s) for s in im_size)
    except (TypeError, ValueError):
        raise ValueError(f"im_size must be an int or a pair (H, W) of ints, got {im_size!r}") from None
    if h < 1 or w < 1 or (h, w) != tuple(im_size):
        raise ValueError(f"im_size must be positive ints (H, W), got {im_size!r}")
    return h, w


# ----------------------------------------------------------------------------------------
# Layer factories (DC's _get_normlayer / _get_activation / _get_pooling)
# ----------------------------------------------------------------------------------------
def make_norm(norm: str, num_channels: int) -> nn.Module | None:
    """Normalisation layer over a (B, C, H, W) feature map, or None for ``"none"``.

    instancenorm: GroupNorm(C, C)   - statistics per (sample, channel) over H x W (DC's choice)
    batchnorm:    BatchNorm2d(C)    - statistics per channel over batch x H x W, running stats
    layernorm:    GroupNorm(1, C)   - statistics per sample over C x H x W, per-channel affine
    groupnorm:    GroupNorm(4, C)   - statistics per (sample, group of C/4 channels)

    Only "layernorm" differs from DC, which uses nn.LayerNorm over (C, H, W) with a (C, H, W)
    affine; GroupNorm(1, C) normalises identically but has a per-channel affine (any H, W).
    """
    norm = _choose("norm", norm, NORMS)
    if norm == "instancenorm":
        return InstanceNorm(num_channels)  # nn.GroupNorm(C, C) with a faster double backward
    if norm == "batchnorm":
        return nn.BatchNorm2d(num_channels, affine=True)
    if norm == "layernorm":
        return nn.GroupNorm(1, num_channels, affine=True)
    if norm == "groupnorm":
        if num_channels % 4:
            raise ValueError(f"norm 'groupnorm' uses 4 groups and needs a width divisible by 4, got {num_channels}")
        return nn.GroupNorm(4, num_channels, affine=True)
    return None


def make_act(act: str) -> nn.Module:
    """Activation: relu (in place, as DC), leakyrelu (slope 0.01) or sigmoid."""
    act = _choose("act", act, ACTS)
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    return nn.Sigmoid()


def make_pool(pooling: str) -> nn.Module | None:
    """2x2 stride-2 pooling (halves H and W), or None for ``"none"``."""
    pooling = _choose("pooling", pooling, POOLINGS)
    if pooling == "avgpooling":
        return AvgPool2x2()  # nn.AvgPool2d(2, 2) with derivatives that are fast to differentiate
    if pooling == "maxpooling":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return None


def default_depth(im_size) -> int:
    """ConvNet depth D for an image size: the smallest D >= 3 with max(H, W) / 2^D <= 4.

    28 / 32 px -> 3 (ConvNet-3 of DC/MTT), 64 px -> 4 (ConvNetD4, MTT's Tiny ImageNet),
    128 px -> 5 (ConvNetD5, MTT's ImageNet subsets).
    """
    side = max(_as_im_size(im_size))
    depth = 3
    while side > 4 * 2**depth:
        depth += 1
    return depth


# ----------------------------------------------------------------------------------------
# Shape inference by a dummy forward pass
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def _run_dummy(module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """``module(x)`` in eval mode (batch norm must not update its running stats)."""
    was_training = module.training
    module.eval()
    try:
        return module(x)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{what}: input of shape {tuple(x.shape[1:])} is too small for this network "
                         f"(supported: 28 px and larger, 1 or 3 channels) - {err}") from None
    finally:
        module.train(was_training)


def _fit_pools(layers: list[nn.Module], channel: int, im_size: tuple[int, int], what: str) -> nn.Sequential:
    """``nn.Sequential(*layers)`` with the 2x2 poolings that would shrink the map too far skipped.

    A pooling H x W -> floor(H/2) x floor(W/2) is replaced by ``nn.Identity`` when its output
    would be empty, or smaller than 2 x 2 while convolutions still follow (a normalised
    1 x 1 map is constant: x - mu = 0). Example: VGG-11 on 3 x 28 x 28 goes
    28 -> 14 -> 7 -> 3 -> (skip) 3 -> 1. Found by walking a dummy (1, channel, H, W) tensor
    through the layers; Identity has no parameters, so parameter names do not change.
    """
    x = torch.zeros(1, channel, *im_size)
    for i, layer in enumerate(layers):
        if isinstance(layer, (nn.AvgPool2d, nn.MaxPool2d)) and layer.kernel_size == 2:
            convs_follow = any(isinstance(later, nn.Conv2d) for later in layers[i + 1:])
            if min(x.shape[-2:]) // 2 < (2 if convs_follow else 1):
                layers[i] = layer = nn.Identity()
        x = _run_dummy(layer, x, what)
    return nn.Sequential(*layers)


def _num_features(features: nn.Module, channel: int, im_size: tuple[int, int], what: str) -> int:
    """C' * H' * W' of ``features`` applied to one (channel, H, W) image (dummy forward)."""
    out = _run_dummy(features, torch.zeros(1, channel, *im_size), what)
    return out[0].numel()


# ----------------------------------------------------------------------------------------
# ConvNet (DC / DSA / DM / MTT default)
# ----------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """ConvNet-D of DC/MTT: D x [conv3x3(width) -> norm -> act -> pool], then Linear.

    ``features`` is one ``nn.Sequential`` exactly as DC builds it (norm / pool entries are
    left out when "none"), so with instance norm and avg-pooling the parameters are
    ``features.{4d}.weight/bias`` (conv d), ``features.{4d+1}.weight/bias`` (norm d)
    and ``classifier.weight/bias``.

    x: (B, channel, H, W) -> logits (B, num_classes)
    """

    def __init__(self, channel: int, num_classes: int, width: int = 128, depth: int = 3, act: str = "relu",
                 norm: str = "instancenorm", pooling: str = "avgpooling", im_size=(28, 28)):
        super().__init__()
        channel = _positive_int("channel", channel)
        num_classes = _positive_int("num_classes", num_classes)
        width = _positive_int("width", width)
        depth = _positive_int("depth", depth)
        im_size = _as_im_size(im_size)
        layers: list[nn.Module] = []
        in_channels = channel
        for d in range(depth):
            # padding 3 on a 1-channel first layer: 28 x 28 -> 32 x 32 (DC's MNIST trick)
            layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=3 if channel == 1 and d == 0 else 1))
            norm_layer = make_norm(norm, width)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(make_act(act))
            pool = make_pool(pooling)
            if pool is not None:
                layers.append(pool)
            in_channels = width
        self.features = _fit_pools(layers, channel, im_size, "ConvNet")
        # (1, 28, 28), D=3: 128 * 4 * 4 = 2048 inputs; (3, 32, 32): the same; (3, 64, 64), D=4: 128 * 4 * 4
        self.classifier = nn.Linear(_num_features(self.features, channel, im_size, "ConvNet"), num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features (B, width * H' * W') - the embedding used by DM."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))  # (B, num_classes)


# ----------------------------------------------------------------------------------------
# Cross-architecture networks (DC's networks.py, generalised over im_size)
# ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Three-layer perceptron of DC: flatten -> fc(width) -> ReLU -> fc(width) -> ReLU -> fc(classes).

    x: (B, channel, H, W) -> logits (B, num_classes); width is 128 in DC.
    """

    def __init__(self, channel: int, num_classes: int, im_size=(28, 28), width: int = 128):
        super().__init__()
        h, w = _as_im_size(im_size)
        width = _positive_int("width", width)
        self.fc_1 = nn.Linear(_positive_int("channel", channel) * h * w, width)
        self.fc_2 = nn.Linear(width, width)
        self.fc_3 = nn.Linear(width, _positive_int("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.fc_1(x.flatten(1)))  # (B, width)
        out = F.relu(self.fc_2(out))  # (B, width)
        return self.fc_3(out)  # (B, num_classes)


class LeNet(nn.Module):
    """LeNet-5 of DC: conv 6@5x5 (padding 2 for 1 channel) -> ReLU -> max-pool -> conv 16@5x5 ->
    ReLU -> max-pool -> fc 120 -> ReLU -> fc 84 -> ReLU -> fc classes.

    x: (B, channel, H, W) -> logits (B, num_classes); 28 px 1-channel or 32 px 3-channel
    images give the classic 16 * 5 * 5 = 400 features.
    """

    def __init__(self, channel: int, num_classes: int, im_size=(28, 28)):
        super().__init__()
        channel = _positive_int("channel", channel)
        im_size = _as_im_size(im_size)
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, kernel_size=5, padding=2 if channel == 1 else 0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.fc_1 = nn.Linear(_num_features(self.features, channel, im_size, "LeNet"), 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, _positive_int("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x).flatten(1)  # (B, 16 * H' * W')
        out = F.relu(self.fc_1(out))
        out = F.relu(self.fc_2(out))
        return self.fc_3(out)  # (B, num_classes)


class AlexNet(nn.Module):
    """DC's small AlexNet: conv 128@5 (padding 4 for 1 channel, else 2) -> pool -> conv 192@5 -> pool
    -> conv 256@3 -> conv 192@3 -> conv 192@3 -> pool -> fc classes (ReLU after every conv).

    x: (B, channel, H, W) -> logits (B, num_classes); 28 px 1-channel or 32 px 3-channel
    images give 192 * 4 * 4 features.
    """

    def __init__(self, channel: int, num_classes: int, im_size=(28, 28)):
        super().__init__()
        channel = _positive_int("channel", channel)
        im_size = _as_im_size(im_size)
        layers = [
            nn.Conv2d(channel, 128, kernel_size=5, stride=1, padding=4 if channel == 1 else 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ]
        self.features = _fit_pools(layers, channel, im_size, "AlexNet")
        self.fc = nn.Linear(_num_features(self.features, channel, im_size, "AlexNet"),
                            _positive_int("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))  # (B, num_classes)


class VGG11(nn.Module):
    """VGG-11 of DC: cfg [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M], each number a
    conv3x3 -> norm -> ReLU (first conv padding 3 for 1 channel), then Linear.

    DC's default norm is instance norm (GroupNorm(C, C)); ``norm="batchnorm"`` is DC's VGG11BN.
    x: (B, channel, H, W) -> logits (B, num_classes); 32 px ends on 512 * 1 * 1 features.
    """

    def __init__(self, channel: int, num_classes: int, im_size=(28, 28), norm: str = "instancenorm"):
        super().__init__()
        channel = _positive_int("channel", channel)
        im_size = _as_im_size(im_size)
        layers: list[nn.Module] = []
        in_channels = channel
        for i, v in enumerate(VGG11_CFG):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=3 if channel == 1 and i == 0 else 1))
            norm_layer = make_norm(norm, v)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(nn.ReLU(inplace=True))
            in_channels = v
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))  # an identity, kept for DC's layer indices
        self.features = _fit_pools(layers, channel, im_size, "VGG11")
        self.classifier = nn.Linear(_num_features(self.features, channel, im_size, "VGG11"),
                                    _positive_int("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # (B, num_classes)


def _resnet_norm(norm: str, num_channels: int) -> nn.Module:
    """``make_norm`` for ResNet blocks; "none" becomes Identity so that block attributes exist."""
    layer = make_norm(norm, num_channels)
    return nn.Identity() if layer is None else layer


class BasicBlock(nn.Module):
    """ResNet basic block: relu(norm(conv3x3(relu(norm(conv3x3(x))))) + shortcut(x)).

    The first conv has the block's stride; the shortcut is 1x1 conv (stride) + norm when the
    shape changes, else the identity. x: (B, in_planes, H, W) -> (B, planes, H/stride, W/stride)
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "batchnorm"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _resnet_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _resnet_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                _resnet_norm(norm, self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 of DC: conv3x3 (stride 1, no max-pool) -> norm -> ReLU ->
    4 stages of 2 BasicBlocks (64, 128, 256, 512 planes; strides 1, 2, 2, 2) ->
    global average pooling -> Linear(512, classes).

    ``norm="batchnorm"`` (default; DC's ResNet18BN, used by MTT's cross-architecture table)
    or "instancenorm" (DC's ResNet18). DC pools with avg_pool2d(4) on the 4 x 4 map of
    32 px inputs; adaptive pooling to 1 x 1 is the same there and works for any size.
    x: (B, channel, H, W) -> logits (B, num_classes)
    """

    def __init__(self, channel: int, num_classes: int, im_size=(28, 28), norm: str = "batchnorm"):
        super().__init__()
        channel = _positive_int("channel", channel)
        im_size = _as_im_size(im_size)
        self.conv1 = nn.Conv2d(channel, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _resnet_norm(norm, 64)
        in_planes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            blocks = [BasicBlock(in_planes, planes, stride, norm), BasicBlock(planes, planes, 1, norm)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = planes * BasicBlock.expansion
        self.classifier = nn.Linear(512 * BasicBlock.expansion, _positive_int("num_classes", num_classes))
        _run_dummy(self, torch.zeros(1, channel, *im_size), "ResNet18")  # fail now, not in training

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features (B, 512)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512, H/8, W/8)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))  # (B, num_classes)


# ----------------------------------------------------------------------------------------
# Factory and parameter utilities
# ----------------------------------------------------------------------------------------
def get_network(arch: str, channel: int, num_classes: int, im_size=(28, 28), width: int = 128,
                depth: int | None = None, norm: str | None = None, act: str = "relu",
                pooling: str = "avgpooling", generator: torch.Generator | None = None) -> nn.Module:
    """Build a network by (case-insensitive) name; see ``ARCHS``.

    convnet:             ConvNet with ``depth`` (None -> default_depth(im_size)), ``width``,
                         ``norm`` (None -> "instancenorm"), ``act``, ``pooling``.
    convnetd4/convnetd5: ConvNet forced to depth 4 / 5 (MTT's Tiny ImageNet / ImageNet nets).
    mlp:                 ``width`` is the hidden size (128 in DC).
    lenet, alexnet:      fixed as in DC (no norm).
    vgg11:               ``norm`` None -> "instancenorm" (DC's VGG11).
    resnet18:            ``norm`` None -> "batchnorm" (MTT's cross-architecture ResNet-18).

    ``width``, ``act`` and ``pooling`` configure ConvNet (and width the MLP); the fixed
    architectures ignore width and pooling and only accept act="relu".
    ``generator``: if given, parameters are re-drawn from it with PyTorch's default
    initialisation (see ``reset_parameters``), independent of the global RNG, which is left
    untouched (the modules' own initialisation draws from it and is undone).
    """
    if generator is not None:
        with torch.random.fork_rng(devices=[]):  # restores the global CPU RNG on exit
            net = get_network(arch, channel, num_classes, im_size, width, depth, norm, act, pooling)
        return reset_parameters(net, generator)
    key = arch.lower() if isinstance(arch, str) else arch
    if key not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")
    _choose("act", act, ACTS)
    _choose("pooling", pooling, POOLINGS)
    if norm is not None:
        _choose("norm", norm, NORMS)
    im_size = _as_im_size(im_size)

    if key.startswith("convnet"):
        forced = {"convnetd4": 4, "convnetd5": 5}.get(key)
        if forced is not None and depth is not None and depth != forced:
            raise ValueError(f"arch {arch!r} has depth {forced}; got depth={depth} (use arch 'convnet' to choose)")
        depth = forced or (default_depth(im_size) if depth is None else depth)
        net: nn.Module = ConvNet(channel, num_classes, width=width, depth=depth, act=act,
                                 norm=norm or "instancenorm", pooling=pooling, im_size=im_size)
    else:
        if depth is not None:
            raise ValueError(f"depth only applies to the convnet archs, not {arch!r}; pass depth=None")
        if act.lower() != "relu":
            raise ValueError(f"arch {arch!r} is a ReLU network; act={act!r} only applies to the convnet archs")
        if key in ("mlp", "lenet", "alexnet") and norm is not None and norm.lower() != "none":
            raise ValueError(f"arch {arch!r} has no normalisation layers; pass norm=None")
        if key == "mlp":
            net = MLP(channel, num_classes, im_size=im_size, width=width)
        elif key == "lenet":
            net = LeNet(channel, num_classes, im_size=im_size)
        elif key == "alexnet":
            net = AlexNet(channel, num_classes, im_size=im_size)
        elif key == "vgg11":
            net = VGG11(channel, num_classes, im_size=im_size, norm=norm or "instancenorm")
        else:
            net = ResNet18(channel, num_classes, im_size=im_size, norm=norm or "batchnorm")
    return net


@torch.no_grad()
def reset_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise ``model`` in place with PyTorch's default init, drawing only from ``generator``.

    Conv / Linear: weight ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm layers: gamma = 1, beta = 0, fresh
    running statistics. Modules are visited in registration (= construction) order, so a
    generator seeded with s reproduces ``torch.manual_seed(s); get_network(...)`` exactly.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()  # in_channels * kH * kW, or in_features
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
            module.reset_parameters()
    return model


def count_params(model: nn.Module) -> int:
    """Number of trainable scalars, sum of numel over parameters.

    ConvNet-3 (width 128, 10 classes): 317,706 on 1 x 28 x 28, 320,010 on 3 x 32 x 32.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flat_param_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters in ``named_parameters`` order - the keys of an expert snapshot."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
