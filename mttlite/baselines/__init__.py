"""Baselines behind one interface: every method the field compares MTT against, judged the same way.

    from mttlite.baselines import METHODS, make_set
    s = make_set("dm", dataset, ipc=10, iterations=200, seed=0)      # -> SyntheticSet
    s.evaluate(dataset, EvalProtocol(...))

==============  =========================================================  ===================
method          what it does                                               module
==============  =========================================================  ===================
``random``      ipc random real images per class                           ``random_select``
``herding``     greedy running-mean matching per class, in ConvNet.embed    ``herding``
``kcenter``     k-center greedy (farthest point) per class, same space     ``kcenter``
``forgetting``  the most-forgotten real images in a short training run     ``forgetting``
``dc``          per-class gradient matching over random networks           ``dc``
``dsa``         DC + the same (siamese) augmentation on real and synthetic  ``dsa_matching``
``dm``          per-class mean-embedding matching in random ConvNets        ``dm``
``dcc``         gradient matching on the class-summed loss (contrastive)   ``dcc``
``mtt``         trajectory matching (the library's core; needs buffer=)    ``mtt``
==============  =========================================================  ===================

Multi-level gradient matching is an option of the DC family: ``inter_class=True`` (intra- and
inter-class gradients) and ``distance="angle"`` (``gradient_distance.py`` gives the equation).
Model augmentation (Zhang et al. 2023, ``mttlite.model_augment``) is an option of the DC family and
DM: ``model_pool=<expert buffer>`` (networks start from its experts' early epochs ``pool_epochs``,
default 0 … 2, instead of a fresh init) and ``rho`` (each start perturbed, every filter by ρ·‖θ_{l,j}‖).

Every method returns a :class:`mttlite.synset.SyntheticSet` with hard, class-major labels, its name
in ``method``, every setting in ``config``, and ``provenance["cost"]`` (wall seconds, peak memory).
Coresets and the DC family carry no learned lr (``syn_lr=None``: evaluation uses η = 0.01); MTT
carries its α. Everything is a function of ``seed`` (same seed, same CPU result).
"""
from __future__ import annotations

import inspect

from .dc import dc_set
from .dcc import dcc_set
from .dm import dm_set
from .dsa_matching import dsa_set
from .forgetting import forgetting_set
from .herding import herding_set
from .kcenter import kcenter_set
from .mtt import mtt_set
from .random_select import random_set

_BUILDERS = {
    "random": random_set,
    "herding": herding_set,
    "kcenter": kcenter_set,
    "forgetting": forgetting_set,
    "dc": dc_set,
    "dsa": dsa_set,
    "dm": dm_set,
    "dcc": dcc_set,
    "mtt": mtt_set,
}
#: Method names accepted by :func:`make_set`.
METHODS: tuple[str, ...] = tuple(_BUILDERS)
#: The selection (coreset) methods: real images, unchanged.
CORESETS: tuple[str, ...] = ("random", "herding", "kcenter", "forgetting")
#: The synthesis methods: learned pixels.
SYNTHESIS: tuple[str, ...] = ("dc", "dsa", "dm", "dcc", "mtt")


def options(method: str) -> dict:
    """The keyword options of ``method`` and their defaults (``make_set(method, dataset, ipc, **options)``)."""
    fn = _builder(method)
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if n not in ("dataset", "ipc") and p.kind is p.POSITIONAL_OR_KEYWORD}


def _builder(method: str):
    key = method.strip().lower() if isinstance(method, str) else method
    if key not in _BUILDERS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return _BUILDERS[key]


def make_set(method: str, dataset, ipc: int, **kw):
    """Build the ``ipc``-images-per-class set of ``method`` on ``dataset`` -> ``SyntheticSet``.

    dataset: a ``mttlite.data.Dataset`` or a data set name (loaded with ``load_dataset(name)``).
    kw: the method's options (``options(method)`` lists them with their defaults), e.g. ``seed``,
    ``iterations``, ``width``, ``device``; an unknown option is a ValueError listing the valid ones.
    """
    fn = _builder(method)
    sig = inspect.signature(fn)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in kw if k not in sig.parameters or k in ("dataset", "ipc")]
    if unknown and not takes_any:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options: {', '.join(options(method))}")
    if isinstance(dataset, str):
        from ..data import load_dataset

        dataset = load_dataset(dataset, device=kw.get("device", "cpu"))
    return fn(dataset, ipc, **kw)


__all__ = [
    "CORESETS",
    "METHODS",
    "SYNTHESIS",
    "dc_set",
    "dcc_set",
    "dm_set",
    "dsa_set",
    "forgetting_set",
    "herding_set",
    "kcenter_set",
    "make_set",
    "mtt_set",
    "options",
    "random_set",
]
