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
