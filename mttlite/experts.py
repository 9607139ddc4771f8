"""Stage 1 of MTT: train the experts and record their trajectories.

An *expert* is an ordinary network trained on the real data; its *trajectory* is the sequence of
its parameters after every epoch (Cazenavette et al. 2022, Sec. 3.1, the authors' ``buffer.py``):

    τ* = (θ*_0, θ*_1, ..., θ*_E),    θ*_0 = random initialisation,  E = train_epochs

One epoch is plain mini-batch SGD over a fresh shuffle of the training set, with DSA
augmentation A_ω (a new ω for every batch) and cross entropy:

    for every batch (x, y) of size batch_real:
        g = ∇_θ ℓ(f(A_ω(x); θ), y)
        d = g + weight_decay · θ                       (weight decay, 0 in the paper)
        b ← momentum · b + d,   d = b                 (momentum buffer, momentum = 0 in the paper)
        θ ← θ − lr_teacher · d                         (lr_teacher = 0.01)

The network is a pure function ``functional_call(net, θ, (x,))`` of a name-keyed dict θ, and the
update above is written out explicitly (``sgd_step``): no optimizer object, no mutated module.
It gives the same numbers as ``torch.optim.SGD`` (tests/test_experts.py checks it).

**Randomness.** Expert i draws *everything* (its initialisation, its batch order and the seed of
every augmentation) from its own ``torch.Generator`` seeded with ``expert_seed(seed, i)``. So an
expert does not depend on which other experts were trained before it, in which process, or in
which group: a resumed run, an extended buffer and a torchrun run all give the same files.

**Parallel experts.** ``parallel=K`` trains K experts at once: their parameters are stacked with
``torch.func.stack_module_state`` to shape (K, ...) and the loss gradient is ``vmap``-ed over
(θ, x, y), each expert with its own batch (augmented separately, then stacked to (K, B, C, H, W)).
Same trajectories as one-by-one training up to float rounding (~1e-8 here), fewer, larger
kernels: meant for GPUs, where one width-128 ConvNet leaves most of the device idle. On a CPU it
is *slower* (benchmarks/experts_throughput.py: 0.5-0.7x for K = 4..16 on one core), because the
vmapped convolutions become grouped convolutions and GroupNorm's batching rule falls back to
separate elementwise ops for the per-expert affine parameters.

**Device.** Every tensor of a step lives on ``device``: the data set, θ, the momentum buffers,
the batch indices (each expert's permutation is drawn on the CPU and moved once per epoch, without
waiting for the device) and the DSA parameters (``augment.dsa``). A step (``_Group.next_batch``
then ``_Group.train_step``) reads nothing back to the host; the epoch's loss and accuracy sums stay
on the device (``_Group.epoch_sums``) and are read once per epoch. tests/test_device_stages.py runs
both paths on torch's ``meta`` device to check it.

**Precision.** ``precision="bf16"`` (CPUs with AVX512-BF16/AMX, GPUs) runs each expert's forward
under autocast (its backward follows; ``mttlite.precision``): a plain training speed-up. θ, the
momentum buffers, the SGD update and the loss stay float32; the snapshots are stored in ``dtype`` as
always. A bf16 buffer is not an fp32 one: ``meta.json`` records ``"precision"`` (only when not fp32,
so buffers written before the option still match), and a rerun must ask for the same.
``"fp16"`` is not offered here (it would need loss scaling; it exists for the distillation only).

**Resuming.** An expert's file is written (atomically) only once it is complete. Rerunning on the
same directory skips complete experts after checking ``meta.json`` matches the request; a larger
``num_experts`` extends the buffer.

**Several processes / GPUs.** No process group is needed: rank r trains the experts
i with i % world_size == r and writes only their files. With torchrun:

    torchrun --nproc_per_node=8 -m mttlite experts --dataset cifar10 --zca --num-experts 100 \\
        --train-epochs 50 --device cuda --out runs/buffers/cifar10-zca

(``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are read from the environment torchrun sets; with
``device="cuda"`` rank r uses ``cuda:LOCAL_RANK``.)
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from . import augment
from .buffers import (
    DTYPES,
    FORMAT_VERSION,
    ExpertBuffer,
    list_experts,
    save_expert,
    write_or_check_meta,
)
from .errors import Diverged, check_interrupt
from .io import RunLock
from .networks import get_network
from .precision import autocast, check_precision, upcast

Params = dict  # {param_name: Tensor}


# ---------------------------------------------------------------------------------------------
# Seeds: everything expert i does is a function of (seed, i)
# ---------------------------------------------------------------------------------------------


def expert_seed(seed: int, i: int) -> int:
    """Seed of expert i's generator: a 63-bit hash of (seed, i). Hashing (rather than seed + i)
    keeps the experts of runs with neighbouring seeds unrelated."""
    digest = hashlib.sha256(f"mttlite-expert/{int(seed)}/{int(i)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_seed(gen: torch.Generator) -> int:
    """A fresh int seed (e.g. for one DSA call) drawn from ``gen``."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))


# ---------------------------------------------------------------------------------------------
# The network as a function of θ, and one SGD step
# ---------------------------------------------------------------------------------------------


def init_network(dataset, arch: str, width: int, depth, norm, gen: torch.Generator) -> nn.Module:
    """A freshly initialised network whose initial weights θ*_0 are drawn from ``gen`` only
    (PyTorch's default init, see ``networks.reset_parameters``), built on the CPU so that θ*_0 is
    the same whatever device the expert then trains on."""
    return get_network(
        arch,
        dataset.channel,
        dataset.num_classes,
        im_size=tuple(dataset.im_size),
        width=width,
        depth=depth,
        norm=norm,
        generator=gen,
    )


def trainable_params(net: nn.Module, device) -> Params:
    """θ as a name-keyed dict of detached copies, in ``net.named_parameters()`` order."""
    return {n: p.detach().to(device).clone() for n, p in net.named_parameters() if p.requires_grad}


def sgd_step(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    momentum_buffers: Mapping[str, Tensor] | None = None,
) -> tuple[Params, Params]:
    """One SGD step on name-keyed dicts, exactly ``torch.optim.SGD`` (dampening 0, no Nesterov).

        d = g + weight_decay · θ
        b ← d (first step),  b ← momentum · b + d (later);   d = b      (only if momentum > 0)
        θ ← θ − lr · d

    Works elementwise, so θ may be one expert's (shape) or K stacked experts' (K, shape).
    Returns (new θ, new momentum buffers); nothing is modified in place."""
    new_params, new_buffers = {}, {}
    for n, theta in params.items():
        d = grads[n]
        if weight_decay != 0:
            d = d.add(theta, alpha=weight_decay)  # g + wd·θ
        if momentum != 0:
            b = None if momentum_buffers is None else momentum_buffers.get(n)
            b = d.clone() if b is None else b.mul(momentum).add(d)  # b ← μ·b + d
            new_buffers[n] = b
            d = b
        new_params[n] = theta.add(d, alpha=-lr)  # θ ← θ − lr·d
    return new_params, new_buffers


def loss_and_logits(net: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
                    precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """ℓ = CE(f(x; θ), y) (mean over the batch, float32) and the logits (B, num_classes); with
    ``precision`` "bf16" the network's forward runs under autocast (``mttlite.precision``)."""
    with autocast(precision, x.device):
        logits = functional_call(net, dict(params), (x,))
    return F.cross_entropy(upcast(logits), y), logits


# ---------------------------------------------------------------------------------------------
# A group of K experts trained side by side
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Expert:
    """Book-keeping of one expert while it trains."""

    index: int
    seed: int
    gen: torch.Generator
    trajectory: dict  # {epoch: {name: Tensor (stored dtype, CPU)}}
    train_loss: list
    train_acc: list
    test_acc: list


class _Group:
    """K experts: θ stacked to (K, ...) when vectorised (``vmapped``), else K=1 and unstacked.

    Both paths draw the same random numbers in the same order from each expert's generator:
    at each epoch a permutation of the training set, then one DSA seed per batch."""

    def __init__(self, experts: list[_Expert], nets: list[nn.Module], vmapped: bool, device, opts: dict):
        self.experts, self.vmapped, self.device, self.opts = experts, vmapped, device, opts
        self.momentum_buffers: Params | None = None
        if not vmapped:
            assert len(nets) == 1
            self.net = nets[0].to(device)
            self.params = trainable_params(self.net, device)
            return
        if any(True for _ in nets[0].buffers()):
            raise ValueError(
                f"parallel training vmaps over parameters only, but {type(nets[0]).__name__} has buffers "
                "(e.g. batch-norm running statistics); use parallel=1 for this architecture"
            )
        stacked, _ = stack_module_state(nets)  # {name: (K, *shape)}
        names = [n for n, p in nets[0].named_parameters() if p.requires_grad]
        self.params = {n: stacked[n].detach().to(device) for n in names}
        self.net = copy.deepcopy(nets[0]).to("meta")  # a skeleton: only its forward is used
        # ∇_θ ℓ for K experts at once: vmap over (θ, x, y), each (K, ...).
        precision = opts.get("precision", "fp32")
        self._grad = vmap(grad_and_value(lambda p, x, y: loss_and_logits(self.net, p, x, y, precision), has_aux=True))
        self._forward = vmap(lambda p, x: self._logits(p, x), in_dims=(0, None))

    def _logits(self, params, x: Tensor) -> Tensor:
        """f(x; θ) for one expert, under the run's autocast (``precision``)."""
        with autocast(self.opts.get("precision", "fp32"), x.device):
            return functional_call(self.net, params, (x,))

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot(self, epoch: int, dtype: torch.dtype) -> None:
        """Store θ*_epoch of every expert (on the CPU, in the storage dtype)."""
        for k, ex in enumerate(self.experts):
            ex.trajectory[epoch] = {
                n: (p[k] if self.vmapped else p).detach().to("cpu", dtype, copy=True) for n, p in self.params.items()
            }

    # -- one batch ------------------------------------------------------------------------------

    def next_batch(self, X: Tensor, Y: Tensor, perms: list[Tensor], start: int) -> tuple[Tensor, Tensor]:
        """The batch at position ``start`` of every expert's permutation, augmented.

        X (N, C, H, W), Y (N,) and perms (K tensors (N,), on X's device) -> x, y of shapes
        (K, B, C, H, W), (K, B) when vmapped, else (B, C, H, W), (B,). Draws one DSA seed per expert
        from its generator (CPU), in expert order; the augmentation itself runs on X's device.
        """
        o = self.opts
        xs, ys = [], []
        for ex, perm in zip(self.experts, perms):
            idx = perm[start : start + o["batch_real"]]
            x = X[idx]
            if o["dsa_strategy"]:
                x = augment.dsa(x, o["dsa_strategy"], seed=draw_seed(ex.gen))  # A_ω(x), ω from expert's gen
            xs.append(x)
            ys.append(Y[idx])
        if self.vmapped:
            return torch.stack(xs), torch.stack(ys)  # (K, B, C, H, W), (K, B)
        return xs[0], ys[0]

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One SGD step of every expert on its batch (``next_batch``'s shapes); θ is replaced.

            g_k = ∇_θ ℓ(f(x_k; θ_k), y_k),   θ_k ← ``sgd_step``(θ_k, g_k)        for k = 1..K

        Returns, measured before the step and left on the device (no host synchronisation):
        loss (K,) the mean cross entropy of each expert's batch (training dtype), and
        correct (K,) int64 how many of its B samples it classified right."""
        o = self.opts
        if self.vmapped:
            grads, (loss, logits) = self._grad(self.params, x, y)  # grads (K, ...), loss (K,)
        else:
            theta = {n: p.requires_grad_(True) for n, p in self.params.items()}
            loss, logits = loss_and_logits(self.net, theta, x, y, o.get("precision", "fp32"))
            g = torch.autograd.grad(loss, list(theta.values()))
            grads = dict(zip(theta, g))
            loss, logits, y = loss[None], logits[None], y[None]  # as if K = 1
        with torch.no_grad():
            self.params, self.momentum_buffers = sgd_step(
                {n: p.detach() for n, p in self.params.items()},
                grads,
                lr=o["lr_teacher"],
                momentum=o["momentum"],
                weight_decay=o["weight_decay"],
                momentum_buffers=self.momentum_buffers,
            )
            return loss.detach(), (logits.argmax(-1) == y).sum(-1)

    # -- one epoch ------------------------------------------------------------------------------

    def permutations(self, N: int, device) -> list[Tensor]:
        """One fresh permutation of range(N) per expert, drawn from its generator (CPU), on ``device``."""
        return [torch.randperm(N, generator=ex.gen).to(device, non_blocking=True) for ex in self.experts]

    def epoch_sums(self, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        """One pass over (X, Y) for every expert (``next_batch`` then ``train_step`` per batch).

        Returns loss_sum (K,) = Σ_batches B·ℓ and correct (K,) = Σ_batches (right answers), both
        float64 on X's device: nothing is read back to the host during the epoch."""
        N, B = X.shape[0], self.opts["batch_real"]
        perms = self.permutations(N, X.device)
        K = len(self.experts)
        loss_sum = torch.zeros(K, device=X.device, dtype=torch.float64)
        correct = torch.zeros(K, device=X.device, dtype=torch.float64)
        for start in range(0, N, B):
            x, y = self.next_batch(X, Y, perms, start)
            loss, n_right = self.train_step(x, y)
            loss_sum += loss.double() * y.shape[-1]
            correct += n_right.double()
        return loss_sum, correct

    def train_epoch(self, X: Tensor, Y: Tensor) -> list[int]:
        """One pass over (X, Y) for every expert; appends train loss and accuracy (measured on the
        augmented batches, before each step, like the reference ``epoch('train', ...)``).

        The sums stay on the device during the epoch (``epoch_sums``) and are read once, at its end,
        together with whether each expert's parameters are all finite. Returns the indices of the
        experts whose parameters are not (diverged: they must not be saved)."""
        N, K = X.shape[0], len(self.experts)
        loss_sum, correct = self.epoch_sums(X, Y)
        finite = torch.stack([torch.isfinite(p).reshape(K, -1).all(1) if self.vmapped else torch.isfinite(p).all()[None]
                              for p in self.params.values()]).all(0).to(loss_sum.dtype)
        sums = torch.stack([loss_sum, correct, finite]).tolist()  # the epoch's one host synchronisation
        loss_sum, correct, finite = sums
        for k, ex in enumerate(self.experts):
            ex.train_loss.append(loss_sum[k] / N)
            ex.train_acc.append(correct[k] / N)
        return [ex.index for k, ex in enumerate(self.experts) if not finite[k]]

    @torch.no_grad()
    def evaluate(self, X: Tensor, Y: Tensor, chunk: int) -> None:
        """Test accuracy of every expert, no augmentation; appended to ``test_acc``."""
        K = len(self.experts)
        correct = torch.zeros(K, device=X.device, dtype=torch.float64)
        for start in range(0, X.shape[0], chunk):
            x, y = X[start : start + chunk], Y[start : start + chunk]
            if self.vmapped:
                logits = self._forward(self.params, x)  # (K, b, classes)
            else:
                logits = self._logits(self.params, x)[None]
            correct += (logits.argmax(-1) == y).sum(-1).double()
        correct = correct.tolist()  # one host synchronisation per evaluation
        for k, ex in enumerate(self.experts):
            ex.test_acc.append(correct[k] / X.shape[0])


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def _version() -> str:
    import mttlite

    return getattr(mttlite, "__version__", "0.1.0")


def _resolve_device(device, world_size: int):
    """``"cuda"`` under torchrun → ``cuda:LOCAL_RANK`` (one GPU per rank)."""
    if str(device) == "cuda" and world_size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


#: The largest lr_teacher accepted (10⁴ × the paper's 0.01): beyond it SGD diverges at once.
LR_TEACHER_MAX = 100.0


class ExpertDiverged(Diverged):
    """An expert's parameters became non-finite; nothing of it was saved."""


def _check_args(num_experts, train_epochs, keep_epochs, batch_real, parallel, dtype, rank, world_size,
                lr_teacher=0.01, momentum=0.0, weight_decay=0.0, precision="fp32", device=None) -> None:
    """Every argument of ``train_experts`` that can be checked before any work, or a ValueError naming it."""
    def bad(msg):
        raise ValueError(msg)

    check_precision(precision, device)
    if precision == "fp16":
        bad("precision 'fp16' is for the distillation's meta-gradient only (it needs loss scaling); expert training "
            "takes 'bf16' (no scaling needed: CPUs with AVX512-BF16/AMX, GPUs) or 'fp32'")

    if not (isinstance(lr_teacher, (int, float)) and math.isfinite(lr_teacher) and 0 < lr_teacher <= LR_TEACHER_MAX):
        bad(f"lr_teacher must be a positive finite number at most {LR_TEACHER_MAX:g} (the experts' SGD learning "
            f"rate; the paper uses 0.01), got {lr_teacher!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        bad(f"momentum must be in [0, 1), got {momentum!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        bad(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")

    if int(num_experts) != num_experts or num_experts < 0:
        bad(f"num_experts must be an integer >= 0, got {num_experts!r}")
    if int(train_epochs) != train_epochs or train_epochs < 0:
        bad(f"train_epochs must be an integer >= 0, got {train_epochs!r}")
    if keep_epochs is not None and not 0 <= keep_epochs <= train_epochs:
        bad(
            f"keep_epochs must be in 0..train_epochs={train_epochs} (a distillation reads epochs up to "
            f"max_start_epoch - 1 + expert_epochs), got {keep_epochs!r}"
        )
    if batch_real < 1:
        bad(f"batch_real must be >= 1, got {batch_real!r}")
    if parallel < 1:
        bad(f"parallel must be >= 1 (the number of experts trained at once), got {parallel!r}")
    if dtype not in DTYPES:
        bad(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if world_size < 1 or not 0 <= rank < world_size:
        bad(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def train_experts(
    dataset,
    out_dir: str | os.PathLike,
    num_experts: int,
    train_epochs: int = 50,
    arch: str = "convnet",
    width: int = 128,
    depth: int | None = None,
    norm: str | None = None,
    lr_teacher: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_real: int = 256,
    dsa_strategy: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    keep_epochs: int | None = None,
    parallel: int = 1,
    device="cpu",
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    callback: Callable[[int, int, dict], None] | None = None,
    precision: str = "fp32",
) -> ExpertBuffer:
    """Train experts 0..num_experts-1 on ``dataset`` into the buffer directory ``out_dir``.

    dataset:      a ``mttlite.data.Dataset`` (train_images (N, C, H, W), train_labels (N,), test_*)
    train_epochs: E; the trajectory is θ*_0 .. θ*_E
    keep_epochs:  store only θ*_0 .. θ*_keep_epochs (still training all E epochs); a distillation
                  reads up to θ*_{T+ − 1 + M} (start t < T+ = max_start_epoch, target t + M), so
                  keep_epochs = T+ + M (e.g. 20 + 2 for CIFAR-10 IPC10) is always enough
    dsa_strategy: None → ``augment.default_strategy(dataset.name)``; "" → no augmentation
    dtype:        storage dtype of the snapshots ("float32", "float16", "bfloat16"); training is fp32
    parallel:     K experts trained at once with vmap (same trajectories up to float rounding)
    rank, world_size: this process trains the experts i with i % world_size == rank
                  (default: the RANK / WORLD_SIZE environment variables, else 0 / 1)
    callback:     called as callback(expert_index, epoch, metrics_so_far) after every epoch
    precision:    "fp32" (default) or "bf16": the networks' forward under autocast (module docstring);
                  recorded in meta.json when not fp32
    Returns the ``ExpertBuffer`` opened on ``out_dir`` (all complete experts, any rank's).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    _check_args(num_experts, train_epochs, keep_epochs, batch_real, parallel, dtype, rank, world_size,
                lr_teacher, momentum, weight_decay, precision, _resolve_device(device, world_size))
    strategy = augment.default_strategy(dataset.name) if dsa_strategy is None else dsa_strategy
    augment.parse_strategy(strategy)  # fail early on a typo, with the valid ops listed
    if not bool(torch.isfinite(dataset.train_images).all()):  # else every expert would "diverge"
        raise ValueError(f"the training images of {dataset.name} hold non-finite values (NaN/inf): check the data files")
    keep = train_epochs if keep_epochs is None else int(keep_epochs)
    stored_epochs = list(range(keep + 1))
    store_dtype = DTYPES[dtype]
    device = _resolve_device(device, world_size)
    out = Path(out_dir)

    # meta.json first: it fixes the recipe every later run (and every other rank) must match.
    probe = init_network(dataset, arch, width, depth, norm, torch.Generator().manual_seed(expert_seed(seed, 0)))
    named = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]
    meta = {
        "format": FORMAT_VERSION,
        "dataset": dataset.name,
        "num_train": int(dataset.train_images.shape[0]),
        "channel": int(dataset.channel),
        "im_size": list(dataset.im_size),
        "num_classes": int(dataset.num_classes),
        "zca": dataset.zca is not None,
        "zca_eps": None if dataset.zca is None else float(dataset.zca.eps),
        "arch": arch,
        "arch_kwargs": {"width": width, "depth": depth, "norm": norm},
        "param_names": [n for n, _ in named],
        "param_shapes": [list(p.shape) for _, p in named],
        "epochs": stored_epochs,
        "train_epochs": int(train_epochs),
        "lr_teacher": float(lr_teacher),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "batch_real": int(batch_real),
        "dsa_strategy": strategy,
        # the experts' augmentation settings; texture_crop (a distillation-only option) is not one of
        # them, and recording it would make every buffer written before it existed look different
        "dsa_params": {k: v for k, v in dataclasses.asdict(augment.DSAParams()).items() if k != "texture_crop"},
        "dsa_mode": "S",
        "seed": int(seed),
        "dtype": dtype,
        "mttlite_version": _version(),
        "torch_version": torch.__version__,
    }
    if precision != "fp32":  # only then: buffers written before the option (fp32) keep matching
        meta["precision"] = precision
    if getattr(dataset, "val_spec", None):  # the experts never saw this held-out validation split
        meta["val_holdout"] = dict(dataset.val_spec)
    # One writer per (buffer, rank): a second `mttlite experts` on the same --out stops here with a clear
    # message (torchrun's ranks write disjoint experts, each under its own lock).
    with RunLock(out, "`mttlite experts` run", name=f".mttlite.lock.rank{rank}"):
        return _train(dataset, out, meta, num_experts, train_epochs, arch, width, depth, norm, batch_real, strategy,
                      seed, dtype, keep, store_dtype, parallel, device, progress, rank, world_size, callback,
                      lr_teacher, momentum, weight_decay, precision)


def _train(dataset, out, meta, num_experts, train_epochs, arch, width, depth, norm, batch_real, strategy, seed, dtype,
           keep, store_dtype, parallel, device, progress, rank, world_size, callback, lr_teacher, momentum,
           weight_decay, precision="fp32") -> ExpertBuffer:
    fresh = not (out / "meta.json").exists()
    write_or_check_meta(out, meta)

    done = set(list_experts(out))
    todo = [i for i in range(num_experts) if i % world_size == rank and i not in done]
    X, Y = dataset.train_images.to(device), dataset.train_labels.to(device)
    Xt, Yt = dataset.test_images.to(device), dataset.test_labels.to(device)
    opts = {
        "batch_real": batch_real,
        "dsa_strategy": strategy,
        "lr_teacher": lr_teacher,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "precision": precision,
    }

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(todo) * train_epochs,
        disable=not progress,
        desc=f"experts (rank {rank}/{world_size})" if world_size > 1 else "experts",
        unit="epoch",
    )
    try:
        for g0 in range(0, len(todo), parallel):
            t0 = time.perf_counter()
            experts, nets = [], []
            for i in todo[g0 : g0 + parallel]:
                s = expert_seed(seed, i)
                gen = torch.Generator().manual_seed(s)
                nets.append(init_network(dataset, arch, width, depth, norm, gen))  # θ*_0 from gen
                experts.append(_Expert(i, s, gen, {}, [], [], []))
            group = _Group(experts, nets, vmapped=parallel > 1, device=device, opts=opts)
            group.snapshot(0, store_dtype)
            for epoch in range(1, train_epochs + 1):
                check_interrupt()  # a Ctrl-C whose KeyboardInterrupt Python dropped (mttlite.errors)
                diverged = group.train_epoch(X, Y)
                if diverged:
                    if fresh and not list_experts(out):  # nothing of this buffer exists yet: leave no trace
                        _remove_fresh_buffer(out)
                    raise ExpertDiverged(
                        f"expert(s) {diverged} diverged in epoch {epoch}: their parameters became non-finite (NaN/inf) "
                        f"with lr_teacher = {lr_teacher:g}; lower it (e.g. --lr-teacher {lr_teacher / 10:g}; the "
                        f"paper uses 0.01). Nothing of them was saved"
                        + ("." if fresh and not list_experts(out) else
                           f"; the buffer in {out} keeps its complete experts (and its recipe: use another --out "
                           "for another lr_teacher).")
                    )
                group.evaluate(Xt, Yt, chunk=batch_real)
                if epoch <= keep:
                    group.snapshot(epoch, store_dtype)
                bar.update(len(experts))
                bar.set_postfix(
                    expert=experts[-1].index,
                    train_acc=f"{experts[-1].train_acc[-1]:.3f}",
                    test_acc=f"{experts[-1].test_acc[-1]:.3f}",
                )
                if callback is not None:
                    for ex in experts:
                        callback(ex.index, epoch, _metrics(ex, None, len(experts), device))
            wall = (time.perf_counter() - t0) / len(experts)  # amortised over the group
            for ex in experts:  # only now, complete, is an expert written
                save_expert(out, ex.index, ex.trajectory, _metrics(ex, wall, len(experts), device), dtype=dtype)
    finally:
        bar.close()
    return ExpertBuffer.open(out)


def _remove_fresh_buffer(out: Path) -> None:
    """Undo the meta.json of a buffer whose first expert diverged (``RunLock`` then removes the
    directory if this run created it)."""
    try:
        (out / "meta.json").unlink()
    except OSError:
        pass


def _metrics(ex: _Expert, wall: float | None, group_size: int, device) -> dict:
    """What goes into the expert file's header (one entry per epoch 1..E for the lists)."""
    return {
        "index": ex.index,
        "seed": ex.seed,
        "train_loss": list(ex.train_loss),
        "train_acc": list(ex.train_acc),
        "test_acc": list(ex.test_acc),
        "wall_time_s": wall,
        "group_size": group_size,
        "device": str(device),
    }
