"""Stage 4 — learning the pixels and α (the outer loop, paper Algorithm 1).

Each iteration:

1. sample an expert trajectory τ* and a start epoch t < T+ (``max_start_epoch``);
2. start the student at θ̂_0 = θ*_t and unroll N = ``syn_steps`` SGD steps on the synthetic set
   with learning rate α (``student.py``);
3. compute L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² with M = ``expert_epochs`` (``matching.py``);
4. back-propagate L into the pixels and into α (``meta_gradient.py``), and take one SGD step on
   each (momentum 0.5; learning rates ``lr_img`` and ``lr_lr``).

Safety: the paper lets α go anywhere. We keep that, but stop with a message naming the knob to
turn when α ≤ 0 or when the loss, the gradient or a pixel becomes non-finite, and keep the last
good state. ``alpha_param="log"`` learns log α instead, so α stays positive by construction; the
trade-off is that ``lr_lr`` then acts on log α (a relative step), so the paper's ``lr_lr`` values
do not carry over.

Every ``checkpoint_every`` iterations the whole state (pixels, α, the optimisers' momentum
buffers and the random generator) is written atomically; an interrupted run resumes from it and,
on CPU with the same seed, ends bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .augment import default_strategy, parse_strategy
from .io import generator_state, load_tensors, save_tensors
from .kernels import StepKernels
from .meta_gradient import GRADIENT_MODES, meta_gradient
from .params import ParamSpec
from .ranks import process_group
from .student import make_plan

CHECKPOINT_FORMAT = "mttlite-checkpoint"
ALPHA_PARAMS = ("linear", "log")
PIX_INITS = ("real", "noise")


@dataclass
class DistillConfig:
    """All knobs of one distillation; names follow the paper and the authors' ``distill.py``."""

    dataset: str = "fashion-mnist-mini"
    ipc: int = 1  # images per class
    syn_steps: int = 20  # N: student steps per iteration
    expert_epochs: int = 2  # M: expert epochs the student must cover
    max_start_epoch: int = 5  # T+: start epochs t are drawn from 0 … T+−1
    iterations: int = 500  # outer iterations (paper: 5000)
    lr_img: float = 100.0  # SGD learning rate of the pixels
    lr_lr: float = 1e-5  # SGD learning rate of α
    lr_teacher: float = 0.01  # α's initial value (the experts' learning rate)
    batch_syn: int | None = None  # images per student step (None = the whole set)
    momentum: float = 0.5  # momentum of both outer optimisers (paper: 0.5)
    zca: bool = False  # ZCA-whitened data (must match the buffer)
    dsa_strategy: str | None = None  # None → the dataset's default DSA strategy; "" → none
    pix_init: str = "real"  # "real": random real images of each class; "noise": N(0, 1)
    gradient: str = "exact"  # "exact" (adjoint, constant memory) or "unroll" (the paper's naive unroll)
    alpha_param: str = "linear"  # "linear" (paper) or "log" (α = exp(a) > 0 always)
    compile: bool = False  # torch.compile the student step (same arithmetic, fused; ~1 min to compile)
    # (expert, t) samples whose meta-gradients are averaged per iteration; None = one per rank
    # (1 in a single process: the paper's algorithm). Under torch.distributed each rank computes S / W.
    samples_per_iteration: int | None = None
    seed: int = 0
    checkpoint_every: int = 50

    def validate(self) -> "DistillConfig":
        """Raise ValueError naming every bad field."""
        errs = []
        for name in ("ipc", "syn_steps", "expert_epochs", "max_start_epoch", "iterations", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "iterations" else 1):
                errs.append(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr_img", "lr_teacher"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                errs.append(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(self.lr_lr, (int, float)) and math.isfinite(self.lr_lr) and self.lr_lr >= 0):
            errs.append(f"lr_lr must be >= 0 (0 freezes α), got {self.lr_lr!r}")
        if not 0 <= self.momentum < 1:
            errs.append(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.samples_per_iteration is not None and (
                not isinstance(self.samples_per_iteration, int) or isinstance(self.samples_per_iteration, bool)
                or self.samples_per_iteration < 1):
            errs.append(f"samples_per_iteration must be None (one per rank) or a positive integer, "
                        f"got {self.samples_per_iteration!r}")
        if self.batch_syn is not None and (not isinstance(self.batch_syn, int) or self.batch_syn < 1):
            errs.append(f"batch_syn must be None (all images) or a positive integer, got {self.batch_syn!r}")
        if self.pix_init not in PIX_INITS:
            errs.append(f"pix_init must be one of {PIX_INITS}, got {self.pix_init!r}")
        if self.gradient not in GRADIENT_MODES:
            errs.append(f"gradient must be one of {GRADIENT_MODES}, got {self.gradient!r}")
        if not isinstance(self.compile, bool):
            errs.append(f"compile must be True or False, got {self.compile!r}")
        if self.alpha_param not in ALPHA_PARAMS:
            errs.append(f"alpha_param must be one of {ALPHA_PARAMS}, got {self.alpha_param!r}")
        try:
            parse_strategy(self.dsa_strategy)
        except ValueError as e:
            errs.append(str(e))
        if errs:
            raise ValueError("invalid DistillConfig:\n  " + "\n  ".join(errs))
        return self

    @property
    def needed_epochs(self) -> int:
        """The last expert epoch a distillation reads: T+ − 1 + M (so T+ + M − 1 must be stored)."""
        return self.max_start_epoch - 1 + self.expert_epochs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DistillConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


# The authors' settings for ConvNet-3 (METHOD.md, dc-bench copy), plus our Fashion-MNIST choices.
PRESETS: dict[str, DistillConfig] = {
    "cifar10-ipc1": DistillConfig("cifar10", 1, 50, 2, 2, 5000, 100.0, 1e-7, 0.01, None, zca=True),
    "cifar10-ipc10": DistillConfig("cifar10", 10, 30, 2, 20, 5000, 100.0, 1e-5, 0.001, None, zca=True),
    "cifar10-ipc50": DistillConfig("cifar10", 50, 30, 2, 40, 5000, 1000.0, 1e-5, 0.001, None, zca=False),
    "cifar100-ipc1": DistillConfig("cifar100", 1, 20, 3, 20, 5000, 1000.0, 1e-5, 0.01, None, zca=True),
    "cifar100-ipc10": DistillConfig("cifar100", 10, 20, 2, 20, 5000, 1000.0, 1e-5, 0.01, None, zca=False),
    "cifar100-ipc50": DistillConfig("cifar100", 50, 80, 2, 40, 5000, 1000.0, 1e-5, 0.01, 125, zca=True),
    "tiny-imagenet-ipc1": DistillConfig("tiny-imagenet", 1, 10, 2, 10, 5000, 1e4, 1e-4, 0.01, None),
    "tiny-imagenet-ipc10": DistillConfig("tiny-imagenet", 10, 20, 2, 40, 5000, 1e4, 1e-4, 0.01, 200),
    "tiny-imagenet-ipc50": DistillConfig("tiny-imagenet", 50, 20, 2, 40, 5000, 1e4, 1e-4, 0.01, 300),
    # Fashion-MNIST: CIFAR-10's schedule without ZCA (our choice; see docs/results.md when measured).
    "fashion-mnist-ipc1": DistillConfig("fashion-mnist", 1, 50, 2, 2, 5000, 100.0, 1e-7, 0.01, None),
    "fashion-mnist-ipc10": DistillConfig("fashion-mnist", 10, 30, 2, 20, 5000, 100.0, 1e-5, 0.01, None),
    "fashion-mnist-ipc50": DistillConfig("fashion-mnist", 50, 30, 2, 40, 5000, 1000.0, 1e-5, 0.01, None),
    # Teaching size: minutes on 2 CPU cores with the embedded set (used by `make demo`).
    "demo": DistillConfig("fashion-mnist-mini", 1, 10, 2, 3, 50, 100.0, 1e-6, 0.01, None, checkpoint_every=25),
}


def preset(name: str, **overrides) -> DistillConfig:
    """A copy of a preset with fields overridden, e.g. ``preset("cifar10-ipc10", iterations=100)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides).validate()


class DistillationDiverged(RuntimeError):
    """Raised when α ≤ 0 or the loss, gradients or pixels become non-finite; the state is the last good one."""


@dataclass
class IterationInfo:
    """What a callback sees after each outer iteration."""

    iteration: int  # 1-based count of finished iterations
    loss: float  # L
    syn_lr: float  # α after the update
    grad_norm_images: float  # ‖∂L/∂x‖
    grad_syn_lr: float  # ∂L/∂α
    expert: int
    start_epoch: int  # t
    student_losses: list[float]  # ℓ at each student step
    seconds: float  # wall time of this iteration
    images: Tensor  # the current synthetic images (a live reference: clone to keep)


@dataclass
class History:
    loss: list[float] = field(default_factory=list)
    syn_lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


class Distiller:
    """The state of one distillation and the outer-loop step.

    ``expert_source`` gives flat expert parameters: it needs ``__len__``, ``epochs`` (stored
    epoch numbers), and ``flat(expert, epoch, device)`` → (P,) — an :class:`ExpertBuffer` does.
    """

    def __init__(self, config: DistillConfig, dataset, model, expert_source, device="cpu"):
        self.config = config.validate()
        self.dataset, self.model, self.experts = dataset, model.to(device), expert_source
        self.device = torch.device(device)
        self.spec = ParamSpec.from_module(model)
        self.kernels = StepKernels(self.model, self.spec) if config.compile else None
        self.dsa_strategy = default_strategy(dataset.name) if config.dsa_strategy is None else config.dsa_strategy
        self._check_epochs()
        if len(expert_source) < 1:
            raise ValueError("the expert buffer holds no complete expert: run `mttlite experts` first")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rank, self.world_size = process_group()
        S = config.samples_per_iteration or self.world_size
        if S % self.world_size:
            raise ValueError(f"samples_per_iteration={S} must be a multiple of the number of ranks ({self.world_size})")
        self.samples_per_iteration = S
        self.images, self.labels = self._init_images()
        n = self.images.shape[0]
        if config.batch_syn is not None and config.batch_syn > n:
            raise ValueError(f"batch_syn={config.batch_syn} is larger than the synthetic set ({n} images = ipc × classes)")
        a0 = math.log(config.lr_teacher) if config.alpha_param == "log" else config.lr_teacher
        self.alpha_raw = torch.tensor(a0, device=self.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=config.lr_img, momentum=config.momentum)
        self.opt_lr = torch.optim.SGD([self.alpha_raw], lr=config.lr_lr, momentum=config.momentum)
        self.iteration = 0
        self.history = History()

    # -- set-up ------------------------------------------------------------------------------------
    def _check_epochs(self):
        stored = set(self.experts.epochs)
        c = self.config
        missing = [e for e in range(c.max_start_epoch + c.expert_epochs) if e not in stored]
        if missing:
            raise ValueError(
                f"the expert buffer stores epochs up to {max(stored)}, but max_start_epoch (T+) = {c.max_start_epoch} "
                f"with expert_epochs (M) = {c.expert_epochs} needs epochs 0 … {c.max_start_epoch + c.expert_epochs - 1}: "
                "lower max_start_epoch / expert_epochs, or train experts for more epochs"
            )

    def _init_images(self) -> tuple[Tensor, Tensor]:
        """x: (ipc·K, C, H, W) from random real images of each class (or noise); y: (ipc·K,) class-major."""
        c, ds = self.config, self.dataset
        K = ds.num_classes
        counts = torch.bincount(ds.train_labels.cpu(), minlength=K)
        if c.ipc > int(counts.min()):
            raise ValueError(f"ipc={c.ipc} is larger than the smallest class of {ds.name} ({int(counts.min())} images)")
        labels = torch.arange(K).repeat_interleave(c.ipc)
        if c.pix_init == "real":
            picks = []
            for k in range(K):
                idx = torch.nonzero(ds.train_labels.cpu() == k).flatten()
                picks.append(idx[torch.randperm(len(idx), generator=self.generator)[: c.ipc]])
            images = ds.train_images[torch.cat(picks).to(ds.train_images.device)].detach().clone()
        else:
            images = torch.randn((K * c.ipc, ds.channel, *ds.im_size), generator=self.generator)
        return images.to(self.device).requires_grad_(True), labels.to(self.device)

    @property
    def syn_lr(self) -> Tensor:
        """α (a scalar tensor in the graph of ``alpha_raw``)."""
        return self.alpha_raw.exp() if self.config.alpha_param == "log" else self.alpha_raw

    # -- one outer iteration -------------------------------------------------------------------
    def _draw(self):
        """One sample of the iteration's randomness: (expert, t, StepPlan), in the original draw order."""
        c, g = self.config, self.generator
        expert = int(torch.randint(len(self.experts), (1,), generator=g))
        start = int(torch.randint(c.max_start_epoch, (1,), generator=g))  # t ~ U{0, …, T+−1}
        return expert, start, make_plan(self.images.shape[0], c.syn_steps, c.batch_syn, g)

    def step(self) -> IterationInfo:
        """One outer iteration: S = ``samples_per_iteration`` samples (expert, t), their meta-gradients
        averaged, one SGD step on the pixels and on α.

        All S samples are drawn on every rank from the shared generator (so every rank, and a resumed
        run, stays in step); rank r computes samples r, r + W, … and the sums are all-reduced.
        Nothing is read back to the host until the end, where every scalar of the iteration (the
        guards' too) comes back in ONE sync.
        """
        c, g = self.config, self.generator
        t0 = time.perf_counter()
        rng_before = g.get_state()
        draws = [self._draw() for _ in range(self.samples_per_iteration)]
        alpha = self.syn_lr.detach()
        grad_x = torch.zeros_like(self.images)
        grad_a = torch.zeros_like(alpha)
        loss = torch.zeros_like(alpha)
        still = torch.zeros_like(alpha)  # how many samples had an expert that did not move (den = 0)
        student_losses = None
        for expert, start, plan in draws[self.rank::self.world_size]:
            theta_start = self.experts.flat(expert, start, device=self.device)  # θ*_t
            theta_target = self.experts.flat(expert, start + c.expert_epochs, device=self.device)  # θ*_{t+M}
            den = (theta_start - theta_target).pow(2).sum()  # ‖θ*_t − θ*_{t+M}‖²
            still += (den == 0).to(still.dtype)
            mg = meta_gradient(c.gradient, self.model, self.spec, theta_start, theta_target,
                               self.images, self.labels, alpha, plan, self.dsa_strategy, kernels=self.kernels)
            grad_x += mg.images
            grad_a += mg.syn_lr.reshape(())
            loss += mg.loss.to(loss.dtype)
            if student_losses is None:
                student_losses = mg.student_losses
        if self.world_size > 1:  # Σ over ranks, one collective: [∂L/∂x, ∂L/∂α, L, still]
            packed = torch.cat([grad_x.flatten(), torch.stack([grad_a, loss, still]).to(grad_x.dtype)])
            torch.distributed.all_reduce(packed)
            grad_x = packed[:grad_x.numel()].view_as(grad_x)
            grad_a, loss, still = (v.to(alpha.dtype) for v in packed[grad_x.numel():])
        S = self.samples_per_iteration
        if S > 1:  # the mean over the S samples
            grad_x, grad_a, loss = grad_x / S, grad_a / S, loss / S

        # ∂L/∂a for α = a (linear) or α = exp(a) (log): chain rule by hand.
        grad_raw = grad_a * (alpha if c.alpha_param == "log" else 1.0)
        backup = self._snapshot()
        self.images.grad, self.alpha_raw.grad = grad_x, grad_raw.reshape(())
        self.opt_img.step()
        self.opt_lr.step()
        self.images.grad = self.alpha_raw.grad = None
        # The one host sync of the iteration: every scalar the guards, the history and the callbacks need.
        new_alpha_t = self.syn_lr.detach()
        scalars = torch.stack([loss, grad_a, grad_x.norm().to(alpha.dtype), alpha, new_alpha_t, still,
                               torch.isfinite(grad_x).all().to(alpha.dtype),
                               torch.isfinite(self.images).all().to(alpha.dtype)]).double()
        vals = torch.cat([scalars, student_losses.double()]).tolist()
        L, dL_da, gnorm, alpha_v, new_alpha, n_still, grad_ok, img_ok = vals[:8]
        student = vals[8:]
        if n_still > 0:
            self._restore(backup)
            g.set_state(rng_before)
            raise ValueError("the expert did not move between the start and target epochs "
                             "(‖θ*_t − θ*_{t+M}‖ = 0): check the buffer (are its epochs distinct snapshots?)")
        if not (math.isfinite(L) and math.isfinite(dL_da) and grad_ok):
            self._restore(backup)
            g.set_state(rng_before)
            raise DistillationDiverged(
                f"iteration {self.iteration + 1}: the matching loss or its gradient is not finite "
                f"(L = {L:.4g}, α = {alpha_v:.4g}). The student diverged: lower lr_img "
                f"(now {c.lr_img:g}), lr_lr (now {c.lr_lr:g}) or max_start_epoch (now {c.max_start_epoch}). "
                f"The state is the last good one (iteration {self.iteration})."
            )
        if not (math.isfinite(new_alpha) and new_alpha > 0 and img_ok):
            self._restore(backup)
            g.set_state(rng_before)
            knob = "lr_lr" if not new_alpha > 0 else "lr_img"
            raise DistillationDiverged(
                f"iteration {self.iteration + 1}: the update made α = {new_alpha:.4g} "
                f"{'≤ 0' if new_alpha <= 0 else 'non-finite'} or a pixel non-finite; lower {knob} "
                f"(lr_lr = {c.lr_lr:g}, lr_img = {c.lr_img:g}), or use alpha_param='log' to keep α > 0. "
                f"The state is the last good one (iteration {self.iteration})."
            )
        self.iteration += 1
        secs = time.perf_counter() - t0
        self.history.loss.append(L)
        self.history.syn_lr.append(new_alpha)
        self.history.seconds.append(secs)
        expert, start, _ = draws[self.rank]
        return IterationInfo(self.iteration, L, new_alpha, gnorm, dL_da, expert, start, student, secs, self.images)

    def _snapshot(self):
        return {k: v.clone() for k, v in self._tensors().items()}

    def _restore(self, snap):
        self._load_tensors(snap)

    # -- checkpoints ---------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        t = {"images": self.images.detach(), "labels": self.labels, "alpha_raw": self.alpha_raw.detach(),
             "rng_state": generator_state(self.generator)}
        for name, opt, p in (("images", self.opt_img, self.images), ("alpha", self.opt_lr, self.alpha_raw)):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                t[f"momentum.{name}"] = buf
        return t

    def _load_tensors(self, t: dict[str, Tensor]):
        with torch.no_grad():
            self.images.copy_(t["images"])
            self.alpha_raw.copy_(t["alpha_raw"])
        self.labels = t["labels"].to(self.device)
        self.generator.set_state(t["rng_state"].cpu())
        for name, opt, p in (("images", self.opt_img, self.images), ("alpha", self.opt_lr, self.alpha_raw)):
            key = f"momentum.{name}"
            opt.state.pop(p, None)
            if key in t:
                opt.state[p] = {"momentum_buffer": t[key].to(self.device).clone()}

    def save_checkpoint(self, path) -> Path:
        meta = {"iteration": self.iteration, "config": self.config.to_dict(), "history": asdict(self.history)}
        return save_tensors(path, self._tensors(), f"{CHECKPOINT_FORMAT}/1", meta)

    def load_checkpoint(self, path) -> None:
        tensors, meta = load_tensors(path, CHECKPOINT_FORMAT, "distillation checkpoint")
        saved = DistillConfig.from_dict(meta["config"])
        # The knobs a divergence message asks you to turn may change on resume; nothing else may.
        ignore = {"iterations", "checkpoint_every", "lr_img", "lr_lr", "max_start_epoch"}
        diff = [f"{f.name}: checkpoint {getattr(saved, f.name)!r} vs now {getattr(self.config, f.name)!r}"
                for f in fields(DistillConfig) if f.name not in ignore and getattr(saved, f.name) != getattr(self.config, f.name)]
        if diff:
            raise ValueError(f"cannot resume from {path}: the configuration differs ({'; '.join(diff)}). "
                             "Use another run directory or pass the original settings.")
        if tensors["images"].shape != self.images.shape:
            raise ValueError(f"cannot resume from {path}: images of shape {tuple(tensors['images'].shape)} "
                             f"but this run has {tuple(self.images.shape)}")
        self._load_tensors(tensors)
        self.iteration = int(meta["iteration"])
        self.history = History(**meta["history"])


def run(
    distiller: Distiller,
    run_dir: str | Path | None = None,
    resume: bool = True,
    callbacks: tuple[Callable[[IterationInfo], None], ...] = (),
    progress: bool = True,
) -> Distiller:
    """Run the outer loop up to ``config.iterations``, checkpointing into ``run_dir``.

    With ``resume`` and an existing ``run_dir/checkpoint.safetensors`` the run continues from it.
    On divergence (:class:`DistillationDiverged`) the last good state is saved before the
    exception propagates; after an interruption (Ctrl-C) the last periodic checkpoint stands.
    Under ``torch.distributed`` every rank holds the same state; rank 0 alone writes and shows progress.
    """
    c = distiller.config
    ckpt = Path(run_dir) / "checkpoint.safetensors" if run_dir is not None else None
    if ckpt is not None and resume and ckpt.exists():
        distiller.load_checkpoint(ckpt)
    if distiller.rank != 0:
        ckpt, progress = None, False
    bar = tqdm(total=c.iterations, initial=distiller.iteration, disable=not progress, desc="distill", unit="it")
    try:
        while distiller.iteration < c.iterations:
            info = distiller.step()
            bar.set_postfix(loss=f"{info.loss:.4f}", alpha=f"{info.syn_lr:.3g}")
            bar.update(1)
            if ckpt is not None and (distiller.iteration % c.checkpoint_every == 0 or distiller.iteration == c.iterations):
                distiller.save_checkpoint(ckpt)
            for cb in callbacks:
                cb(info)
    except DistillationDiverged:
        if ckpt is not None:
            distiller.save_checkpoint(ckpt)
        raise
    finally:
        bar.close()
    return distiller
