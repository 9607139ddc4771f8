"""Small shared pieces for the core tests: a tiny stateless ConvNet and an in-memory trajectory."""
from __future__ import annotations

import torch
from torch import nn

from mttlite.params import ParamSpec


def tiny_convnet(channel=1, num_classes=3, width=4, im=8, dtype=torch.float64, seed=0) -> nn.Module:
    """conv3x3 → instance norm → ReLU → avg-pool → linear: the ConvNet-1 shape, in miniature."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(channel, width, 3, padding=1),
        nn.GroupNorm(width, width, affine=True),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width * (im // 2) ** 2, num_classes),
    )
    return net.to(dtype)


class MemoryTrajectories:
    """Expert trajectories kept in memory: the interface the Distiller reads (``len``, ``epochs``, ``flat``)."""

    def __init__(self, trajectories: list[list[torch.Tensor]]):
        self.trajectories = trajectories

    def __len__(self):
        return len(self.trajectories)

    @property
    def epochs(self):
        return list(range(len(self.trajectories[0])))

    def flat(self, expert, epoch, device="cpu", dtype=None):
        t = self.trajectories[expert][epoch].to(device)
        return t if dtype is None else t.to(dtype)


def sgd_trajectories(model, x, y, num_experts=2, epochs=4, lr=0.1, steps_per_epoch=3, seed=0):
    """Train ``num_experts`` copies (different inits) with plain full-batch SGD; record θ after each 'epoch'."""
    spec = ParamSpec.from_module(model)
    out = []
    for e in range(num_experts):
        torch.manual_seed(seed + e)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        theta = spec.flatten(dict(model.named_parameters())).detach().clone()
        traj = [theta.clone()]
        for _ in range(epochs):
            for _ in range(steps_per_epoch):
                th = theta.requires_grad_(True)
                logits = torch.func.functional_call(model, spec.unflatten(th), (x,))
                (g,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), th)
                theta = (th - lr * g).detach()
            traj.append(theta.clone())
        out.append(traj)
    return MemoryTrajectories(out)


def toy_dataset(n_per_class: int = 8, K: int = 3, seed: int = 0):
    """K classes of 1×8×8 float32 images: a random prototype per class plus N(0, 0.5²) noise (class-major).

    A stand-in for ``mttlite.data.Dataset`` with the fields a Distiller and an evaluation read; the
    test split is the training split."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(K, 1, 8, 8, generator=g)
    labels = torch.arange(K).repeat_interleave(n_per_class)
    images = protos[labels] + 0.5 * torch.randn(len(labels), 1, 8, 8, generator=g)
    return SimpleNamespace(name="toy", train_images=images, train_labels=labels, test_images=images,
                           test_labels=labels, num_classes=K, channel=1, im_size=(8, 8),
                           class_names=[chr(ord("a") + k) for k in range(K)], mean=(0.0,), std=(1.0,), zca=None)


class Interrupt(Exception):
    """Raised by a ``run`` callback to stop a distillation between checkpoints, as a crash would."""


def interrupt_then_resume(make_distiller, out, stop_at: int, callbacks=()):
    """Run ``make_distiller()`` into ``out`` and stop it right after iteration ``stop_at`` (its state since
    the last checkpoint is lost), then run a fresh ``make_distiller()`` on the same ``out`` to the end;
    ``callbacks`` go to that second run. Returns the resumed Distiller."""
    import pytest

    from mttlite.distill import run

    def stop(info):
        if info.iteration == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(make_distiller(), out, callbacks=(stop,), progress=False)
    return run(make_distiller(), out, callbacks=callbacks, progress=False)
