"""Parameters as one flat vector θ ∈ R^P, and back to a name-keyed dict.

MTT measures distances between whole networks, ‖θ − θ*‖², and the student takes plain SGD steps
θ ← θ − α g on *all* parameters at once. Both are one line on a flat vector. The network itself
is only ever called through ``torch.func.functional_call(model, spec.unflatten(θ), (x,))``:
the module is a pure function of the dict we hand it, and is never mutated.

    spec = ParamSpec.from_module(net)
    theta = spec.flatten(dict(net.named_parameters()))      # (P,)
    params = spec.unflatten(theta)                          # {name: view of theta}
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamSpec:
    """Ordered names and shapes of a network's trainable parameters."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_module(cls, model: nn.Module) -> "ParamSpec":
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @property
    def num_params(self) -> int:
        """P, the length of the flat vector."""
        return sum(self.numels)

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        """{name: tensor} → θ of shape (P,), concatenated in ``names`` order."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"parameters missing from the dict: {missing}")
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """θ of shape (P,) → {name: view with the parameter's shape}. Differentiable (views)."""
        if theta.dim() != 1 or theta.numel() != self.num_params:
            raise ValueError(f"expected a flat vector of {self.num_params} parameters, got shape {tuple(theta.shape)}")
        chunks = torch.split(theta, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def slices(self) -> dict[str, slice]:
        """Where each named parameter lives inside θ (for per-layer breakdowns)."""
        out, start = {}, 0
        for n, k in zip(self.names, self.numels):
            out[n] = slice(start, start + k)
            start += k
        return out
