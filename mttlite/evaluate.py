"""The evaluation protocol: how every accuracy in the dataset-distillation literature is produced.

A distilled set D_syn is judged by what it teaches a network that has never seen the real data.
DC, DSA, DM and MTT (and DC-Bench, which fixed it as a benchmark) all use the same recipe:

    for each of k = ``num_nets`` fresh, randomly initialised networks:
        train on D_syn only, for E = ``epochs`` epochs of mini-batch SGD
            v ← μ v + (∇ℓ(A(x_B); θ) + λ θ)            μ = momentum 0.9, λ = weight decay 5e-4
            θ ← θ − η_e v                               batch |B| = 256
            η_e = η for e < E/2,  0.1 η afterwards     η = learned α (MTT) or 0.01 (DC/DSA/DM)
        acc_i = accuracy of the final θ on the real test set
    report  mean_i acc_i ± std_i acc_i

A is DSA augmentation (a fresh random transform on every mini-batch); the papers train for
1000 epochs with DSA and 300 without. Everything that changes the number is a field of
:class:`EvalProtocol`, which is printed and saved beside every result.

Honest reporting. The papers report the *best* evaluation point seen during distillation, i.e.
a checkpoint chosen on the test set. This module always reports the *final-epoch* test accuracy
of each network, and says so. To choose a distillation checkpoint without touching the test
set, set ``val_fraction > 0``: a fixed, class-balanced slice of the *training* set is then
scored as well (``EvalResult.val_accs``).

Precision. ``train_on_set`` / ``evaluate_set`` take ``precision="bf16"`` (CPUs with AVX512-BF16/AMX,
GPUs): each training step's forward runs under autocast, a plain training speed-up
(``mttlite.precision``); the loss, the SGD update and the test predictions stay float32. It is a
keyword of the call, not a protocol field (``EvalProtocol.to_dict()`` is what resumable benchmarks
compare); a result trained in bf16 says so in ``set_info["precision"]``. No "fp16" (it would need
loss scaling): it exists for the distillation only.

Texture sets (MTT §5, ``texture=True``): the images are toroidal canvases (n, C, Hc, Wc) larger than
the networks' input (H, W). Every training batch is then a fresh random wrap-around crop of each of its
canvases (one offset per canvas per batch, ``mttlite.texture.toroidal_crop``, seeded from the network's
generator), taken before DSA: this is how the MTT authors train on textures (their ``utils.epoch``
with ``texture=True`` rolls and crops every training batch the same way), and the only way a network
with a fixed input size can learn from a canvas. ``train_acc`` is scored on the top-left crops.

Networks with batch norm (ResNet-18, VGG-11 with ``norm="batchnorm"``) are trained in train
mode and tested in eval mode (running statistics). Every random choice (initialisation, batch
order, augmentation) comes from one ``torch.Generator`` per network, so a protocol seed gives
the same numbers on every CPU run.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .augment import default_strategy, dsa, parse_strategy
from .io import atomic_write
from .networks import ARCHS, get_network
from .precision import autocast, check_precision
from .ranks import process_group
from .student import cross_entropy
from .texture import crop_at, toroidal_crop

#: DC/DSA/DM's evaluation learning rate, used when the set carries no learned α.
DEFAULT_LR = 0.01
#: The learning rate is multiplied by this once, at epoch E // 2.
LR_DECAY = 0.1
#: How results name the evaluation networks.
DISPLAY_NAMES = {
    "convnet": "ConvNet", "convnetd4": "ConvNetD4", "convnetd5": "ConvNetD5", "mlp": "MLP",
    "lenet": "LeNet", "alexnet": "AlexNet", "vgg11": "VGG-11", "resnet18": "ResNet-18",
}
#: Seed of the validation split: fixed, so every evaluation of every checkpoint scores the same images.
VAL_SEED = 0


# ---------------------------------------------------------------------------------------------
# The declared protocol and its result
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalProtocol:
    """Everything that determines an evaluation number. Defaults: docs/method.md, "How a distilled set is judged".

    arch, width, depth, norm: the evaluation network (``networks.get_network``; None = its default)
    epochs:        E; the papers use 1000 with DSA (300 without)
    lr:            η; None -> the set's learned α (MTT), or 0.01 if it has none
    momentum, weight_decay, batch_size: SGD's μ, λ and |B|
    dsa_strategy:  None -> the dataset's default DSA strategy; "" -> no augmentation
    num_nets:      k, networks trained (mean ± std over them)
    val_fraction:  share of each training class scored as a validation split (0 = none)
    seed:          seeds every network's generator (network i's seed is drawn from it)
    """

    arch: str = "convnet"
    width: int = 128
    depth: int | None = None
    norm: str | None = None
    epochs: int = 300
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa_strategy: str | None = None
    num_nets: int = 5
    val_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown evaluation arch {self.arch!r}; choose one of: {', '.join(ARCHS)}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("num_nets", 1), ("width", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EvalProtocol.{name} must be an integer >= {low}, got {value!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"EvalProtocol.lr must be a positive number or None (use the set's α), got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"EvalProtocol.momentum must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"EvalProtocol.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"EvalProtocol.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        parse_strategy(self.dsa_strategy)  # raises a ValueError listing the valid DSA ops

    @property
    def decay_epoch(self) -> int:
        """The epoch from which η is multiplied by 0.1: E // 2 (never 0, so E = 1 trains at η)."""
        return max(1, self.epochs // 2)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line a reader can reproduce the number from."""
        shown = ("width", "depth", "norm") if self.arch.startswith("convnet") else ("width",) if self.arch == "mlp" else ("norm",)
        net = ", ".join(f"{k}={getattr(self, k)}" for k in shown if getattr(self, k) is not None)
        lr = "learned α (0.01 if none)" if self.lr is None else f"{self.lr:g}"
        aug = {None: "dataset default", "": "none"}.get(self.dsa_strategy, self.dsa_strategy)
        val = f", val split {self.val_fraction:g} of train" if self.val_fraction > 0 else ""
        return (
            f"{self.arch}({net}) | SGD lr {lr}, momentum {self.momentum:g}, weight decay {self.weight_decay:g}, "
            f"batch {self.batch_size} | {self.epochs} epochs, lr x{LR_DECAY:g} at epoch {self.decay_epoch} | "
            f"DSA {aug} | final-epoch test accuracy, mean +- std over {self.num_nets} nets, seed {self.seed}{val}"
        )


@dataclass
class EvalResult:
    """Final-epoch accuracies (fractions in [0, 1]) of ``len(accs)`` networks and their summary.

    std is the population standard deviation (``np.std``, as the authors' code reports it).
    """

    accs: list[float]  # final test accuracy of each network (not the best on test)
    mean: float
    std: float
    val_accs: list[float] | None  # accuracy on the validation split, if val_fraction > 0
    train_accs: list[float]  # accuracy on the (un-augmented) set trained on
    protocol: dict
    lr: float  # the η actually used
    seconds: float
    set_info: dict = field(default_factory=dict)  # what was evaluated: size, label kind, source

    def __str__(self) -> str:
        arch = self.protocol.get("arch", "?")
        name = DISPLAY_NAMES.get(arch, arch)
        text = (
            f"{name}: {100 * self.mean:.2f} +- {100 * self.std:.2f} % (final test acc, {len(self.accs)} nets, "
            f"{self.protocol.get('epochs', '?')} epochs, lr {self.lr:.4g})"
        )
        if self.val_accs:
            text += f"; val {100 * float(np.mean(self.val_accs)):.2f} +- {100 * float(np.std(self.val_accs)):.2f} %"
        return text

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> Path:
        """Write the result and its protocol as one JSON file (atomically)."""
        text = json.dumps(self.to_dict(), indent=2)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------------------
# Resolving the protocol's "None = default" fields
# ---------------------------------------------------------------------------------------------


def resolve_lr(protocol: EvalProtocol, syn_lr: float | None) -> float:
    """η: the protocol's explicit lr, else the set's learned α, else 0.01."""
    if protocol.lr is not None:
        return float(protocol.lr)
    if syn_lr is None:
        return DEFAULT_LR
    syn_lr = float(syn_lr)
    if not (math.isfinite(syn_lr) and syn_lr > 0):
        raise ValueError(f"the set's learned lr α = {syn_lr} is not a positive number; pass EvalProtocol(lr=...)")
    return syn_lr


def resolve_strategy(protocol: EvalProtocol, dataset_name: str) -> str:
    """The DSA strategy: the protocol's, or the dataset's default when None ("" = none)."""
    return default_strategy(dataset_name) if protocol.dsa_strategy is None else protocol.dsa_strategy


def _draw_int(gen: torch.Generator) -> int:
    return int(torch.randint(2**31, (1,), generator=gen))


def fresh_network(protocol: EvalProtocol, dataset, gen: torch.Generator) -> nn.Module:
    """A randomly initialised evaluation network whose weights depend on ``gen`` only.

    torch's default initialisers draw from the global CPU RNG, so the network is built on the CPU
    under ``fork_rng`` with that generator seeded from ``gen``: the caller's global RNG state is left
    untouched. Only the CPU generator is seeded (``torch.manual_seed`` would also reseed every CUDA
    generator, which ``fork_rng(devices=[])`` does not restore).
    """
    init_seed = _draw_int(gen)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(init_seed)
        return get_network(
            protocol.arch,
            dataset.channel,
            dataset.num_classes,
            im_size=tuple(dataset.im_size),
            width=protocol.width,
            depth=protocol.depth,
            norm=protocol.norm,
        )


# ---------------------------------------------------------------------------------------------
# Training one network on a set, and scoring it
# ---------------------------------------------------------------------------------------------


def _check_set(images: Tensor, labels: Tensor, dataset, texture: bool = False) -> None:
    shape = (dataset.channel, *dataset.im_size)
    if texture:  # canvases (n, C, Hc, Wc) with Hc ≥ H, Wc ≥ W
        if images.dim() != 4 or images.shape[1] != shape[0] or any(a < b for a, b in zip(images.shape[2:], shape[1:])):
            raise ValueError(f"texture canvases must have shape (n, {shape[0]}, Hc, Wc) with Hc >= {shape[1]} and "
                             f"Wc >= {shape[2]} for {dataset.name}; got {tuple(images.shape)}")
    elif images.dim() != 4 or tuple(images.shape[1:]) != shape:
        raise ValueError(f"images must have shape (n, {', '.join(map(str, shape))}) for {dataset.name}; got {tuple(images.shape)}")
    n, k = images.shape[0], dataset.num_classes
    if n == 0:
        raise ValueError("cannot evaluate an empty set")
    if labels.is_floating_point():
        if tuple(labels.shape) != (n, k):
            raise ValueError(f"soft labels must have shape (n, K) = ({n}, {k}); got {tuple(labels.shape)}")
    elif labels.dtype == torch.int64:
        if tuple(labels.shape) != (n,):
            raise ValueError(f"hard labels must have shape (n,) = ({n},); got {tuple(labels.shape)}")
        low, high = torch.stack([labels.min(), labels.max()]).tolist()  # one read, once per evaluated set
        if low < 0 or high >= k:
            raise ValueError(f"hard labels must lie in [0, {k}); got [{low}, {high}]")
    else:
        raise ValueError(f"labels must be int64 class indices (n,) or float soft labels (n, K); got dtype {labels.dtype}")


def hard_labels(labels: Tensor) -> Tensor:
    """(n,) class indices; soft labels (n, K) -> their argmax class."""
    return labels.argmax(1) if labels.is_floating_point() else labels


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: Tensor, yb: Tensor, precision: str = "fp32") -> Tensor:
    """One training step of the evaluation network on one (already augmented) batch.

        ℓ = CE(f(x_B; θ), y_B)                 (soft labels: −mean_b Σ_k p_bk log softmax(f(x_b))_k)
        v ← μ v + (∇_θ ℓ + λ θ);   θ ← θ − η_e v                    (``opt``: torch.optim.SGD)

    xb: (B, C, H, W), yb: (B,) int64 or (B, K) soft, on the model's device. Returns ℓ, a detached
    0-d tensor on that device: nothing is read back to the host, so a loop of steps never waits
    for the device. ``precision`` "bf16": the forward under autocast (the loss in float32)."""
    with autocast(precision, xb.device):
        logits = model(xb)
    loss = cross_entropy(logits, yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()  # v ← μ v + (g + λ θ);  θ ← θ − η_e v
    return loss.detach()


def train_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    protocol: EvalProtocol,
    lr: float,
    gen: torch.Generator,
    strategy: str,
    progress: bool = False,
    precision: str = "fp32",
    crop: tuple[int, int] | None = None,
) -> tuple[list[float], Tensor]:
    """The protocol's ``protocol.epochs`` epochs of :func:`train_step` on (x, y), on x's device.

    x: (n, C, H, W), y: (n,) or (n, K), on the model's device. Per epoch e: η_e on ``opt``, a
    permutation of the n images from ``gen`` (CPU, then moved), batches of ``protocol.batch_size``,
    each augmented with a fresh DSA seed from ``gen`` (if ``strategy``). Returns η_e per epoch and
    totals (E,), a tensor on the device: totals[e] = Σ_b |B| ℓ_b. Nothing is read back to the
    host, except (with ``progress``) one loss for the progress bar every E/10 epochs.
    ``crop`` = (H, W): x holds texture canvases; each batch is first a random toroidal crop of each
    canvas, seeded by a draw from ``gen`` made before the batch's DSA seed (module docstring)."""
    n = x.shape[0]
    lr_per_epoch, totals = [], []
    report_every = max(1, protocol.epochs // 10)
    epochs = tqdm(range(protocol.epochs), desc="epochs", leave=False, disable=not progress)
    for epoch in epochs:
        # η_e = η before E // 2, 0.1 η from then on (the only schedule change)
        lr_e = lr * (LR_DECAY if epoch >= protocol.decay_epoch else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_e
        model.train()
        total = torch.zeros((), device=x.device)  # Σ_b |B| ℓ_b, summed on the device (no sync per step)
        for idx in torch.randperm(n, generator=gen).split(protocol.batch_size):
            idx = idx.to(x.device, non_blocking=True)  # a fresh CPU tensor: no need to wait for the device
            xb = x[idx]  # (B, C, H, W); texture: canvases (B, C, Hc, Wc)
            if crop is not None:
                xb = toroidal_crop(xb, crop, _draw_int(gen))  # (B, C, H, W), a fresh offset per canvas
            if strategy:
                xb = dsa(xb, strategy, seed=_draw_int(gen))  # A_ω(x_B), a fresh ω per batch
            total += train_step(model, opt, xb, y[idx], precision) * idx.numel()
        lr_per_epoch.append(lr_e)
        totals.append(total)
        if progress and ((epoch + 1) % report_every == 0 or epoch + 1 == protocol.epochs):
            epochs.set_postfix(loss=f"{total.item() / n:.3f}")  # one read every E/10 epochs
    return lr_per_epoch, torch.stack(totals)


def train_on_set(
    images: Tensor,
    labels: Tensor,
    dataset,
    protocol: EvalProtocol,
    lr: float,
    seed: int,
    device=None,
    progress: bool = False,
    precision: str = "fp32",
    texture: bool = False,
) -> tuple[nn.Module, dict]:
    """Train one fresh network on (images, labels) only, as the protocol says.

    images: (n, C, H, W) in the space the networks see; labels: (n,) int64 or (n, K) soft.
    Soft labels use ℓ = −mean_b Σ_k p_bk log softmax(f(x_b))_k.
    Randomness (init, then per epoch a permutation of the n images and one DSA seed per batch)
    comes from ``torch.Generator().manual_seed(seed)``; the draws are made on the CPU and moved
    to ``device``. The epochs are :func:`train_epochs`; their losses stay on the device and are
    read once, after the last epoch. ``precision``: "fp32" (default) or "bf16" (module docstring).
    ``texture``: images are canvases (n, C, Hc, Wc); every batch is a fresh random toroidal crop of them
    to the dataset's (H, W) (one more seed drawn per batch); train_acc is on the top-left crops.

    Returns the trained network (eval mode) and ``info``: lr_per_epoch, loss_per_epoch (mean
    training loss on the augmented batches), train_acc (un-augmented set), dsa_strategy, seed, seconds.
    """
    t0 = time.perf_counter()
    _check_set(images, labels, dataset, texture)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    device = torch.device(device) if device is not None else images.device
    _check_precision(precision, device)
    x, y = images.detach().to(device), labels.detach().to(device)
    n = x.shape[0]
    strategy = resolve_strategy(protocol, dataset.name)
    gen = torch.Generator().manual_seed(int(seed))

    model = fresh_network(protocol, dataset, gen).to(device, non_blocking=True)  # fresh CPU tensors: no wait
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)
    crop = tuple(dataset.im_size) if texture else None
    lr_per_epoch, totals = train_epochs(model, opt, x, y, protocol, lr, gen, strategy, progress, precision, crop)
    loss_per_epoch = [t / n for t in totals.tolist()]  # the run's one read of the losses

    model.eval()
    info = {
        "seed": int(seed),
        "lr_per_epoch": lr_per_epoch,
        "loss_per_epoch": loss_per_epoch,
        "train_acc": test_accuracy(model, x if crop is None else crop_at(x, crop, 0, 0), hard_labels(y)),
        "dsa_strategy": strategy,
        "seconds": time.perf_counter() - t0,
    }
    return model, info


def _check_precision(precision: str, device) -> None:
    check_precision(precision, device)
    if precision == "fp16":
        raise ValueError("precision 'fp16' is for the distillation's meta-gradient only (it needs loss scaling); "
                         "evaluation takes 'bf16' (no scaling needed: CPUs with AVX512-BF16/AMX, GPUs) or 'fp32'")


def _predictions(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """argmax_k f(x)_k, (n,) int64 on the model's device; images may live elsewhere (moved per chunk)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            preds = [model(xb.to(device)).argmax(1) for xb in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=device)


def predict(model: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    """argmax_k f(x)_k for every image, in eval mode (batch norm uses running statistics). -> (n,) int64 on the CPU."""
    return _predictions(model, images, batch_size).cpu()


def test_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``images`` (n, C, H, W) whose predicted class equals ``labels`` (n,).

    Counted on the model's device; one host synchronisation (the final count)."""
    if images.shape[0] == 0:
        raise ValueError("test_accuracy needs at least one image")
    pred = _predictions(model, images, batch_size)
    correct = (pred == labels.to(pred.device)).sum().item()
    return correct / images.shape[0]


def confusion_matrix(model: nn.Module, images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, K) int64 counts; entry [i, j] = test images of true class i predicted as class j."""
    pred, true = predict(model, images), labels.cpu()
    return torch.bincount(true * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)


# ---------------------------------------------------------------------------------------------
# The protocol: k networks, mean ± std
# ---------------------------------------------------------------------------------------------


def validation_indices(dataset, val_fraction: float, seed: int = VAL_SEED) -> Tensor:
    """Indices into ``dataset.train_images`` of a class-balanced validation split.

    From every class c, round(val_fraction · N_c) (at least 1) images chosen by a fixed seed;
    sorted by class. Exclude them from distillation to keep the validation score unbiased.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    gen = torch.Generator().manual_seed(int(seed))
    labels = dataset.train_labels.cpu()
    out = []
    for c in range(dataset.num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        take = max(1, round(val_fraction * idx.numel()))
        out.append(idx[torch.randperm(idx.numel(), generator=gen)[:take]])
    return torch.cat(out)


def evaluate_set(
    images: Tensor,
    labels: Tensor,
    dataset,
    protocol: EvalProtocol | None = None,
    lr: float | None = None,
    device=None,
    progress: bool = True,
    precision: str = "fp32",
    texture: bool = False,
) -> EvalResult:
    """Train ``protocol.num_nets`` fresh networks on (images, labels) and score them on the real test set.

    images: (n, C, H, W) in the dataset's (normalised, possibly ZCA) space; labels: (n,) or (n, K).
    protocol: None -> ``EvalProtocol()``, the papers' protocol.
    lr: the set's learned α (None for a set without one); ``protocol.lr`` overrides it.
    precision: "fp32" (default) or "bf16", the networks' training arithmetic (module docstring).
    texture: images are toroidal canvases (n, C, Hc, Wc), trained on through random crops (module docstring).
    """
    t0 = time.perf_counter()
    protocol = EvalProtocol() if protocol is None else protocol
    _check_set(images, labels, dataset, texture)
    _check_precision(precision, device if device is not None else images.device)
    eta = resolve_lr(protocol, lr)
    if protocol.val_fraction > 0:
        val_idx = validation_indices(dataset, protocol.val_fraction).to(dataset.train_images.device)
        val = (dataset.train_images[val_idx], dataset.train_labels[val_idx])
    elif getattr(dataset, "val_images", None) is not None:  # a split held out before anything trained
        val = (dataset.val_images, dataset.val_labels)
    else:
        val = None
    # network i trains with seed_i, the i-th draw of the protocol's generator (so k=3 and k=5 share 3 nets)
    seeds = torch.randint(2**31, (protocol.num_nets,), generator=torch.Generator().manual_seed(protocol.seed)).tolist()

    # Under torch.distributed, rank r trains networks r, r + W, …; the results are gathered so every
    # rank returns the whole table (the same numbers as one process: each network has its own seed).
    rank, world = process_group()
    mine = list(range(rank, len(seeds), world))
    rows = {}
    nets = tqdm(mine, desc=f"evaluating {protocol.arch}", disable=not progress or rank != 0)
    for i in nets:
        model, info = train_on_set(images, labels, dataset, protocol, eta, seeds[i], device=device, precision=precision,
                                   texture=texture)
        acc = test_accuracy(model, dataset.test_images, dataset.test_labels)
        rows[i] = (acc, info["train_acc"], test_accuracy(model, *val) if val is not None else None)
        if progress:
            nets.set_postfix(acc=f"{100 * acc:.2f}%")
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        rows = {i: r for part in gathered for i, r in part.items()}
    accs = [rows[i][0] for i in range(len(seeds))]
    train_accs = [rows[i][1] for i in range(len(seeds))]
    val_accs = [rows[i][2] for i in range(len(seeds))]

    set_info = {
        "n": int(images.shape[0]),
        "labels": "soft" if labels.is_floating_point() else "hard",
        "dataset": dataset.name,
        "dsa_strategy": resolve_strategy(protocol, dataset.name),
    }
    if precision != "fp32":  # only then: fp32 results keep the keys they always had
        set_info["precision"] = precision
    if texture:  # likewise: the canvas size, the crops taken of it
        set_info["texture"] = {"canvas": list(images.shape[-2:]), "input": list(dataset.im_size)}
    return EvalResult(
        accs=accs,
        mean=float(np.mean(accs)),
        std=float(np.std(accs)),
        val_accs=val_accs if val is not None else None,
        train_accs=train_accs,
        protocol=protocol.to_dict(),
        lr=eta,
        seconds=time.perf_counter() - t0,
        set_info=set_info,
    )


# ---------------------------------------------------------------------------------------------
# The baseline every table starts with: a random real subset
# ---------------------------------------------------------------------------------------------


def random_real_subset(dataset, ipc: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """ipc random real training images of every class, chosen by ``seed``.

    Returns images (K·ipc, C, H, W) sorted by class and labels (K·ipc,) int64 = [0]*ipc + [1]*ipc + ...
    """
    labels = dataset.train_labels.cpu()
    counts = torch.bincount(labels, minlength=dataset.num_classes)
    smallest = int(counts.min())
    if isinstance(ipc, bool) or not isinstance(ipc, (int, np.integer)) or not 1 <= ipc <= smallest:
        c = int(counts.argmin())
        raise ValueError(
            f"ipc must be an integer between 1 and the smallest class size {smallest} "
            f"(class {c} {dataset.class_names[c]!r} of {dataset.name}); got ipc={ipc!r}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    idx = []
    for c in range(dataset.num_classes):
        members = (labels == c).nonzero().squeeze(1)
        idx.append(members[torch.randperm(members.numel(), generator=gen)[:ipc]])
    idx = torch.cat(idx).to(dataset.train_images.device)
    return dataset.train_images[idx].clone(), dataset.train_labels[idx].clone()


def evaluate_random_real(
    dataset, ipc: int, protocol: EvalProtocol | None = None, seed: int = 0, progress: bool = True
) -> EvalResult:
    """The random-real baseline under the same protocol (η = 0.01 unless ``protocol.lr``)."""
    protocol = EvalProtocol() if protocol is None else protocol
    images, labels = random_real_subset(dataset, ipc, seed=seed)
    result = evaluate_set(images, labels, dataset, protocol, lr=None, progress=progress)
    result.set_info.update(source="random real subset", ipc=int(ipc), subset_seed=int(seed))
    return result
