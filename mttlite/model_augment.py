"""Model augmentation (Zhang et al., "Accelerating Dataset Distillation via Model Augmentation", CVPR 2023).

Gradient matching (DC, DSA, DCC) and distribution matching (DM) learn the synthetic set S against
*many* networks, each drawn fresh from the initialisation distribution P_θ0 and (DC) trained on S
for a while. Zhang et al. keep the many-networks idea but make each network cheaper and more
informative, with two "model augmentations":

1. **Early-stage models.** θ_0 is drawn from a pool of checkpoints of networks trained a few epochs
   on the real data, instead of P_θ0. Here the pool is a mttlite expert buffer (the MTT experts'
   first epochs: :class:`EarlyPool`, expert k ∈ 0 … K−1 at epoch e ∈ ``epochs``, drawn uniformly).
   Epoch 0 is the experts' random initialisation, so ``epochs=0..E`` also holds K draws of P_θ0.
2. **Parameter perturbation** (:func:`perturb`). The drawn checkpoint is moved in a random direction,
   scaled filter by filter to the checkpoint's own size (the "filter normalisation" of Li et al.,
   "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018, that Zhang et al. use):

       θ'_{l,j} = θ_{l,j} + ρ · d_{l,j},    d_{l,j} = ε_{l,j} · ‖θ_{l,j}‖ / ‖ε_{l,j}‖,    ε ~ N(0, I)

   with θ_{l,j} the j-th filter of parameter tensor l (its j-th slice along dim 0: an output channel
   of a convolution, an output unit's row of a linear layer) and ‖·‖ the Frobenius norm. So every
   filter moves by exactly ρ·‖θ_{l,j}‖, in a uniformly random direction; per element the step has
   standard deviation ρ·‖θ_{l,j}‖/√n_{l,j} (n_{l,j} = the filter's size). One-dimensional tensors
   (biases, the norm layers' affine parameters) are not perturbed, as in the authors' code
   (``ignore='biasbn'``). The authors add two such directions with coefficients drawn from ±U(0.01,
   0.09); two independent Gaussian directions are nearly orthogonal, so that is close to one direction
   with ρ between 0.014 and 0.127. Here ρ is one fixed number (0.01–0.05 are sensible values).

Everything is a function of the ``torch.Generator`` passed in (a CPU generator: the same draws on
every device). ρ = 0 returns θ unchanged and draws nothing, so a run with the switch off is the run
without it, bit for bit.

    pool = EarlyPool(ExpertBuffer.open("buffers/fmnist"), epochs=2)      # experts × epochs 0, 1, 2
    theta = pool.sample(gen)                                               # (P,) one checkpoint
    theta = perturb(theta, ParamSpec.from_module(net), rho=0.01, generator=gen)
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .params import ParamSpec

#: ρ's accepted range. ρ = 1 already moves every filter by its own norm: anything larger is a mistake.
RHO_MAX = 1.0
#: ``pool_epochs`` when a pool is given without it: epochs 0 … 2 (the authors pre-train CIFAR pools 2 epochs).
DEFAULT_POOL_EPOCHS = 2


def check_rho(rho, field: str = "rho") -> float:
    """ρ as a float in [0, RHO_MAX], else a ValueError naming ``field`` and the valid range."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or not 0 <= rho <= RHO_MAX:
        raise ValueError(f"{field} must be a finite number in [0, {RHO_MAX:g}] (the perturbation's size relative to "
                         f"each filter's norm; Zhang et al. use about 0.01–0.09; 0 = off), got {rho!r}")
    return float(rho)


def perturb(theta: Tensor, spec: ParamSpec, rho: float, generator: torch.Generator) -> Tensor:
    """θ' = θ + ρ·d with d filter-normalised Gaussian noise (module docstring); theta (P,) → (P,).

    Per parameter tensor l of ``spec`` with at least 2 dimensions, viewed as (F_l, n_l) filters:
    d_{l,j} = ε_{l,j} ‖θ_{l,j}‖ / ‖ε_{l,j}‖ (Zhang et al. 2023, Sec. 3 "parameter perturbation", with
    Li et al. 2018's filter normalisation), so ‖θ'_{l,j} − θ_{l,j}‖ = ρ‖θ_{l,j}‖; 1-D tensors unchanged.
    ε (P,) is drawn from ``generator`` on the CPU and moved to θ's device once. ρ = 0: θ itself, no draw.
    Returns a new detached tensor of θ's dtype and device.
    """
    rho = check_rho(rho)
    if theta.dim() != 1 or theta.numel() != spec.num_params:
        raise ValueError(f"expected a flat vector of {spec.num_params} parameters, got shape {tuple(theta.shape)}")
    if rho == 0:
        return theta
    theta = theta.detach()
    eps = torch.randn(theta.shape, generator=generator).to(theta.device, theta.dtype, non_blocking=True)  # ε ~ N(0, I)
    tiny = torch.finfo(theta.dtype).tiny
    out = []
    for shape, sl in zip(spec.shapes, spec.slices().values()):
        w = theta[sl]
        if len(shape) < 2:  # biases, norm affine: not perturbed
            out.append(w)
            continue
        w, e = w.view(shape[0], -1), eps[sl].view(shape[0], -1)  # (F_l, n_l): one row per filter
        d = e * (w.norm(dim=1, keepdim=True) / e.norm(dim=1, keepdim=True).clamp_min(tiny))  # d_{l,j}
        out.append((w + rho * d).reshape(-1))  # θ'_{l,j} = θ_{l,j} + ρ d_{l,j}
    return torch.cat(out)


def parse_epochs(epochs, field: str = "pool_epochs") -> list[int]:
    """``epochs`` as a sorted list: an int E → [0, …, E]; a sequence of ints; or "1,2" (the command line's
    ``--opt pool_epochs=1,2``). A ValueError naming ``field`` otherwise."""
    if isinstance(epochs, str):
        try:
            epochs = [int(v) for v in epochs.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"{field} must be an epoch E (pool = epochs 0 … E) or a list of epochs, "
                             f"e.g. 2 or [1, 2] or '1,2'; got {epochs!r}") from None
    elif isinstance(epochs, int) and not isinstance(epochs, bool):
        if epochs < 0:
            raise ValueError(f"{field} must be an epoch >= 0 (pool = epochs 0 … E) or a list of epochs, got {epochs!r}")
        epochs = list(range(epochs + 1))
    if (not isinstance(epochs, Sequence) or not epochs
            or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs)):
        raise ValueError(f"{field} must be an epoch E >= 0 (pool = epochs 0 … E) or a non-empty list of epochs "
                         f">= 0, got {epochs!r}")
    return sorted({int(e) for e in epochs})


class EarlyPool:
    """The early-stage models: experts × ``epochs`` of an expert buffer, each drawn with equal probability.

    source: an :class:`mttlite.buffers.ExpertBuffer`, its directory, or anything with ``len()``,
    ``epochs`` (stored epoch numbers) and ``flat(expert, epoch, device)`` → (P,) (the Distiller's
    expert interface). epochs: see :func:`parse_epochs`; every one must be stored (else a ValueError
    naming ``pool_epochs``). experts: which experts (default: all). Checkpoints are read lazily, on
    first draw, and kept on the CPU (a pool is small: K · |epochs| · P floats).
    """

    def __init__(self, source, epochs=DEFAULT_POOL_EPOCHS, experts: Sequence[int] | None = None):
        if isinstance(source, (str, os.PathLike)):
            from .buffers import ExpertBuffer

            if not Path(source).exists():
                raise ValueError(f"model_pool: no expert buffer at {source} (train one with `mttlite experts --out "
                                 f"{source} --train-epochs 2` or mttlite.experts.train_experts)")
            source = ExpertBuffer.open(source)
        if not all(hasattr(source, a) for a in ("__len__", "epochs", "flat")):
            raise ValueError(f"model_pool must be an expert buffer (ExpertBuffer or its directory) or an EarlyPool, "
                             f"got {type(source).__name__}")
        self.source = source
        self.epochs = parse_epochs(epochs)
        stored = set(source.epochs)
        missing = [e for e in self.epochs if e not in stored]
        if missing:
            where = getattr(source, "path", type(source).__name__)
            raise ValueError(f"pool_epochs: epoch(s) {missing} are not stored in the buffer {where} (it stores "
                             f"{min(stored)} … {max(stored)}); choose early epochs it stores")
        n = len(source)
        if n < 1:
            raise ValueError(f"model_pool: the buffer {getattr(source, 'path', '')} holds no complete expert")
        self.experts = list(range(n)) if experts is None else [int(k) for k in experts]
        bad = [k for k in self.experts if not 0 <= k < n]
        if bad or not self.experts:
            raise ValueError(f"pool experts must be a non-empty list of expert indices in 0 … {n - 1}, got {experts!r}")
        #: (expert, epoch) of every member, expert-major: what :meth:`sample_index` draws from.
        self.members: list[tuple[int, int]] = [(k, e) for k in self.experts for e in self.epochs]
        self._cache: dict[tuple[int, int], Tensor] = {}

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        where = getattr(self.source, "path", type(self.source).__name__)
        return f"EarlyPool({str(where)!r}, experts={len(self.experts)}, epochs={self.epochs})"

    def describe(self) -> dict:
        """What the pool is, for a set's config/provenance (JSON-able)."""
        return {"buffer": str(getattr(self.source, "path", type(self.source).__name__)),
                "experts": list(self.experts), "epochs": list(self.epochs), "members": len(self)}

    def sample_index(self, generator: torch.Generator) -> tuple[int, int]:
        """(expert, epoch), uniform over :attr:`members`, one draw from ``generator``."""
        return self.members[int(torch.randint(len(self.members), (1,), generator=generator))]

    def flat(self, expert: int, epoch: int, device="cpu") -> Tensor:
        """θ*_epoch of ``expert``, (P,) float32, read once and cached on the CPU."""
        key = (expert, epoch)
        if key not in self._cache:
            self._cache[key] = self.source.flat(expert, epoch, device="cpu").float()
        return self._cache[key].to(device, non_blocking=True)

    def sample(self, generator: torch.Generator, device="cpu") -> Tensor:
        """One checkpoint θ_0 ~ U(pool), (P,) on ``device`` (a copy: the cache is never handed out)."""
        theta = self.flat(*self.sample_index(generator), device=device)
        return theta.clone() if theta.device.type == "cpu" else theta

    def check_network(self, net, dataset=None, what: str = "this run", settings: dict | None = None) -> None:
        """A ValueError naming ``model_pool`` (and each differing field) unless the pool's checkpoints are
        parameters of ``net``: the same network (compared as built: architecture, width, depth, norm,
        parameter names and shapes) and the same data set / ZCA setting, when the buffer records them.

        settings: the run's ``arch``, ``width``, ``depth``, ``norm``, named in the message where they differ."""
        spec = ParamSpec.from_module(net)
        where = getattr(self.source, "path", type(self.source).__name__)
        meta = getattr(self.source, "meta", None)
        problems = []
        if meta is not None:
            from .networks import get_network

            kw = meta.get("arch_kwargs", {})
            pool_net = get_network(meta["arch"], meta["channel"], meta["num_classes"], tuple(meta["im_size"]), **kw)
            pool_spec = ParamSpec.from_module(pool_net)
            if repr(pool_net) != repr(net) or pool_spec != spec:
                stored = {"arch": meta["arch"], **{k: kw.get(k) for k in ("width", "depth", "norm")}}
                named = [f"{k}: the pool's networks have {k} {stored[k]!r}, {what} builds {v!r}"
                         for k, v in (settings or {}).items() if k in stored and v != stored[k]]
                described = ", ".join(f"{k} {v!r}" for k, v in stored.items())
                problems += named or [(f"the pool's networks ({described}; {pool_spec.num_params} parameters) are "
                                       f"not {what}'s ({spec.num_params} parameters)")]
                problems[-1] += f" (pass the pool's settings, or a pool trained with {what}'s network)"
            if dataset is not None:
                if meta.get("dataset") != dataset.name:
                    problems.append(f"dataset: the pool was trained on {meta.get('dataset')!r}, {what} runs on "
                                    f"{dataset.name!r}")
                if bool(meta.get("zca")) != (getattr(dataset, "zca", None) is not None):
                    problems.append(f"zca: the pool was trained with zca={bool(meta.get('zca'))}, {what}'s data has "
                                    f"zca={getattr(dataset, 'zca', None) is not None}")
        else:
            P = self.flat(*self.members[0]).numel()
            if P != spec.num_params:
                problems.append(f"the pool's checkpoints have {P} parameters, {what}'s network {spec.num_params}")
        if problems:
            raise ValueError(f"model_pool {where} cannot serve {what}:\n  " + "\n  ".join(problems))


def open_pool(model_pool, pool_epochs, net, dataset=None, what: str = "this run",
              settings: dict | None = None) -> EarlyPool | None:
    """The :class:`EarlyPool` a method's options ``model_pool`` / ``pool_epochs`` describe, checked against
    ``net`` (:meth:`EarlyPool.check_network`, ``settings`` = the run's arch/width/depth/norm); None when
    ``model_pool`` is None.

    model_pool: None, an EarlyPool (then ``pool_epochs`` must be None), an ExpertBuffer or its directory.
    pool_epochs: None (= 0 … ``DEFAULT_POOL_EPOCHS``), an epoch E (0 … E), or a list of epochs."""
    if model_pool is None:
        if pool_epochs is not None:
            raise ValueError(f"pool_epochs={pool_epochs!r} needs model_pool (an expert buffer whose early epochs "
                             "form the pool); pass model_pool=<buffer directory>, or drop pool_epochs")
        return None
    if isinstance(model_pool, EarlyPool):
        if pool_epochs is not None:
            raise ValueError("pool_epochs must be None when model_pool is an EarlyPool (it has its own epochs)")
        pool = model_pool
    else:
        pool = EarlyPool(model_pool, DEFAULT_POOL_EPOCHS if pool_epochs is None else pool_epochs)
    pool.check_network(net, dataset, what, settings)
    return pool
