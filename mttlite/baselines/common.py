"""What every baseline shares: class-balanced bookkeeping, fresh networks, cost, the artefact.

Every method of this package ends the same way, so that a table compares like with like:

    D = {(x_i, y_i)}_{i=1}^{K·ipc},   y = [0]*ipc + [1]*ipc + … + [K−1]*ipc   (class-major, hard labels)

returned as a :class:`mttlite.synset.SyntheticSet` with ``syn_lr=None`` (the evaluation then
trains with the field's η = 0.01), the method's name, its full configuration, and its cost:

    provenance["cost"] = {"seconds": wall time,
                          "peak_rss_mib": the process's resident-set high-water mark afterwards,
                          "rss_growth_mib": how much that high-water mark rose while the method ran,
                          "cuda_peak_mib": torch.cuda.max_memory_allocated (CUDA only)}

``ru_maxrss`` is a per-process high-water mark, so ``peak_rss_mib`` also counts what the process
held before (the data set, earlier methods); ``rss_growth_mib`` is a lower bound on the method's own
extra memory (0 when an earlier step of the process already peaked higher).

Randomness: every method draws from one ``torch.Generator`` seeded with its ``seed``; networks are
built under ``fork_rng`` so that the caller's global RNG is never touched.
"""
from __future__ import annotations

import contextlib
import platform
import resource
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..networks import get_network
from ..synset import SyntheticSet

#: The baselines' network size on CPU. The papers use ConvNet-3 width 128; 32 keeps every
#: method minutes-sized on the embedded set (pass ``width=128`` for the paper's network).
DEFAULT_WIDTH = 32


# ---------------------------------------------------------------------------------------------
# Cost: wall time and peak memory
# ---------------------------------------------------------------------------------------------


def max_rss_mib() -> float:
    """The process's peak resident set size so far, MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


@contextlib.contextmanager
def measure_cost(device="cpu") -> Iterator[dict]:
    """``with measure_cost(device) as cost: ...`` fills ``cost`` (seconds, peak memory) on exit."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cost: dict = {}
    rss0 = max_rss_mib()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            cost["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        cost["seconds"] = round(time.perf_counter() - t0, 3)
        peak = max_rss_mib()
        cost["peak_rss_mib"] = round(peak, 1)
        cost["rss_growth_mib"] = round(peak - rss0, 1)
        cost["device"] = str(device)
        cost["threads"] = torch.get_num_threads()
        cost["cpu"] = platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Classes and images per class
# ---------------------------------------------------------------------------------------------


def check_ipc(dataset, ipc) -> int:
    """``ipc`` as an int in 1 … (smallest class size), else a ValueError saying which class limits it."""
    counts = torch.bincount(dataset.train_labels.cpu(), minlength=dataset.num_classes)
    smallest = int(counts.min())
    if isinstance(ipc, bool) or not isinstance(ipc, (int, np.integer)) or not 1 <= ipc <= smallest:
        c = int(counts.argmin())
        raise ValueError(
            f"ipc must be an integer between 1 and the smallest class size {smallest} "
            f"(class {c} {dataset.class_names[c]!r} of {dataset.name}); got ipc={ipc!r}"
        )
    return int(ipc)


def class_indices(dataset) -> list[Tensor]:
    """For every class c, the (N_c,) int64 indices of its training images (CPU, ascending)."""
    labels = dataset.train_labels.cpu()
    return [(labels == c).nonzero().squeeze(1) for c in range(dataset.num_classes)]


def class_major_labels(num_classes: int, ipc: int, device="cpu") -> Tensor:
    """(K·ipc,) int64 = [0]*ipc + [1]*ipc + … : the label layout of every set in this package."""
    return torch.arange(num_classes, device=device).repeat_interleave(ipc)


def sample_real(images, members: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """n real images drawn without replacement from ``members`` (indices): (min(n, N_c), C, H, W).

    images: the training images (N, C, H, W), or a data set (its ``train_images``); members (N_c,)
    indices into them. As DC's ``get_images(c, n)``: a fresh random permutation of the class (drawn
    from ``gen`` on the CPU), its first n. With ``images`` and ``members`` on one device the pick
    happens there, without a round trip to the host.
    """
    images = getattr(images, "train_images", images)
    perm = torch.randperm(members.numel(), generator=gen)[:n].to(members.device, non_blocking=True)
    return images[members[perm].to(images.device, non_blocking=True)]


def draw_seed(gen: torch.Generator) -> int:
    """An int seed (e.g. for one DSA call) drawn from ``gen``."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def random_network(dataset, gen: torch.Generator, arch: str = "convnet", width: int = DEFAULT_WIDTH,
                   depth: int | None = None, norm: str | None = None, device="cpu") -> nn.Module:
    """A freshly initialised network whose weights come from ``gen`` only (global RNG untouched).

    Built on the CPU (the same weights on every device), then moved to ``device`` without waiting for
    the device: DM builds one per step, and a blocking copy would drain the GPU's queue each time."""
    with torch.random.fork_rng(devices=[]):
        net = get_network(arch, dataset.channel, dataset.num_classes, im_size=tuple(dataset.im_size),
                          width=width, depth=depth, norm=norm, generator=gen)
    return net.to(device, non_blocking=True)


def detached_params(net: nn.Module, requires_grad: bool = False) -> dict[str, Tensor]:
    """θ as a name-keyed dict of detached copies (``functional_call`` input)."""
    return {n: p.detach().clone().requires_grad_(requires_grad) for n, p in net.named_parameters()}


def start_params(net: nn.Module, pool=None, rho: float = 0.0, gen: torch.Generator | None = None,
                 requires_grad: bool = False) -> dict[str, Tensor]:
    """θ_0 of one outer iteration, as a name-keyed dict of fresh leaves (``functional_call`` input).

    Plain (pool None, ρ = 0): ``net``'s own weights (:func:`detached_params`; a fresh init), nothing drawn.
    Model augmentation (``mttlite.model_augment``): with a pool, θ_0 = a checkpoint drawn from it
    (``EarlyPool.sample``) instead; with ρ > 0, θ_0 ← ``perturb(θ_0, ρ)``, every filter moved by ρ·‖θ_{l,j}‖.
    Both draw from ``gen`` (the pool's index first, then the noise), on the CPU.
    """
    if pool is None and rho == 0:
        return detached_params(net, requires_grad)
    from ..model_augment import perturb
    from ..params import ParamSpec

    spec = ParamSpec.from_module(net)
    device = next(net.parameters()).device
    theta = pool.sample(gen, device) if pool is not None else spec.flatten(detached_params(net))  # (P,)
    theta = perturb(theta, spec, rho, gen)
    return {n: p.clone().requires_grad_(requires_grad) for n, p in spec.unflatten(theta).items()}


def augmentation_settings(model_pool, pool_epochs, rho, dataset, arch: str, width: int, depth, norm, method: str):
    """Check a method's model-augmentation options before any work: (pool or None, ρ), else a ValueError
    naming the field (``rho``, ``pool_epochs``, ``model_pool``). The pool must hold checkpoints of the
    network the method builds (arch, width, depth, norm) on the same data set."""
    from ..model_augment import check_rho, open_pool

    rho = check_rho(rho, "rho")
    with torch.random.fork_rng(devices=[]):  # a probe network, only to compare with the pool's
        probe = get_network(arch, dataset.channel, dataset.num_classes, im_size=tuple(dataset.im_size), width=width,
                            depth=depth, norm=norm, generator=torch.Generator().manual_seed(0))
    pool = open_pool(model_pool, pool_epochs, probe, dataset, f"method {method!r}",
                     {"arch": arch, "width": width, "depth": depth, "norm": norm})
    return pool, rho


def augmentation_record(pool, rho: float) -> dict:
    """The model-augmentation part of a set's config: the pool (buffer, experts, epochs) and ρ."""
    return {"model_pool": None if pool is None else pool.describe(), "rho": rho}


class EmbedOf(nn.Module):
    """``forward = net.embed``, so that the embedding too is called as ``functional_call(EmbedOf(net), θ', x)``.

    Parameter names gain the prefix ``"net."`` (use :func:`embed_params`).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        if not hasattr(net, "embed"):
            raise ValueError(f"{type(net).__name__} has no embed(x); use arch 'convnet' (DM's) or 'resnet18'")
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.embed(x)


def embed_params(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """θ of a network → θ of its :class:`EmbedOf` wrapper (names prefixed with ``"net."``)."""
    return {f"net.{n}": p for n, p in params.items()}


# ---------------------------------------------------------------------------------------------
# The artefact
# ---------------------------------------------------------------------------------------------


def to_synset(dataset, images: Tensor, labels: Tensor, method: str, config: dict, cost: dict,
              provenance: dict | None = None, arch: str = "convnet", arch_kwargs: dict | None = None) -> SyntheticSet:
    """Wrap a finished set as a :class:`SyntheticSet` (no learned lr: ``syn_lr=None``)."""
    prov = {"cost": dict(cost)}
    prov.update(provenance or {})
    return SyntheticSet(
        images=images.detach().cpu().clone(), labels=labels.detach().cpu().clone(), syn_lr=None,
        dataset=dataset.name, class_names=list(dataset.class_names), mean=dataset.mean, std=dataset.std,
        zca=dataset.zca, arch=arch, arch_kwargs=dict(arch_kwargs or {}), method=method, config=dict(config),
        provenance=prov,
    )
