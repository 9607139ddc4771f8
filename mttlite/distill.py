"""Stage 4 — learning the pixels and α (the outer loop, paper Algorithm 1).

Each iteration:

1. sample an expert trajectory τ* and a start epoch t < T+ (``max_start_epoch``);
2. start the student at θ̂_0 = θ*_t and unroll N = ``syn_steps`` SGD steps on the synthetic set
   with learning rate α (``student.py``);
3. compute L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² with M = ``expert_epochs`` (``matching.py``);
4. back-propagate L into the pixels and into α (``meta_gradient.py``), and take one SGD step on
   each (momentum 0.5; learning rates ``lr_img`` and ``lr_lr``).

Safety: the paper lets α go anywhere. We keep that, but stop with a message naming the knob to
turn, its value, a suggested value and how to resume, when a state or an update is not sane (the
divergence guard, thresholds below: α ≤ 0 or outside [α0/1e3, α0·1e3], α or the pixel norm jumping
by more than ×10 in one update, pixels far outside the data's range, L > 1e3 or anything
non-finite), and keep the last *sane* state: a state whose own loss was checked, reached by an
update that passed the checks. ``alpha_param="log"`` learns log α instead, so α stays positive by
construction; the trade-off is that ``lr_lr`` then acts on log α (a relative step), so the paper's
``lr_lr`` values do not carry over.

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
from .errors import Diverged
from .io import generator_state, load_tensors, save_tensors
from .kernels import StepKernels
from .meta_gradient import GRADIENT_MODES, meta_gradient
from .params import ParamSpec
from .ranks import process_group
from .student import make_plan

CHECKPOINT_FORMAT = "mttlite-checkpoint"
ALPHA_PARAMS = ("linear", "log")
PIX_INITS = ("real", "noise")

#: The largest α0 = ``lr_teacher`` accepted (10⁴ × the paper's 0.01): an SGD learning rate beyond it
#: makes every network here diverge in its first steps, so it is refused before any work.
LR_TEACHER_MAX = 100.0

# -- the divergence guard ---------------------------------------------------------------------------
# A finite state can be diverged all the same (α = 3e19, pixels of 6e23): these bounds refuse it before
# it is kept. Each iteration checks the state it starts from (its loss L) and the update it makes (α and
# the pixels after the SGD steps); a refused update is undone, and a state whose own L is refused is
# rolled back to the one before it. Healthy runs are far inside them: on the embedded Fashion-MNIST at
# the presets' rates (IPC 1 and 10, lr_lr 1e-6 and 1e-5, 30-60 iterations; tests/test_guard.py checks
# it) α moved by at most 7 % and ‖x‖ by at most 0.7 % per iteration, α stayed within ×2 of α0, the RMS
# pixel near 1 and L below 0.6. Diverging runs are far outside: lr_lr = 10 moved α ×2e4 in its first
# update, lr_lr = 0.01 ×22, lr_img = 1e15 moved ‖x‖ ×1.6e11 and lr_img = 1e5 ×16; α0 = 50 starts at
# L = 1e11. In between, lr_img = 3e4 (300× the presets') passes, with an RMS pixel of 10.
#: One update may change α by at most this factor, up or down.
ALPHA_JUMP = 10.0
#: α must stay in [α0 / ALPHA_RANGE, α0 · ALPHA_RANGE] (α0 = lr_teacher): three decades either way.
ALPHA_RANGE = 1e3
#: One update may change the pixels' norm ‖x‖ (all images together) by at most this factor, up or down.
PIXEL_JUMP = 10.0
#: Root-mean-square pixel at most this, in the normalised space the networks see (where the data has
#: mean 0 and standard deviation ~1 per channel: a pixel 1000 standard deviations out is no image).
PIXEL_RMS_MAX = 1e3
#: The normalised matching loss L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² is ~1 at the start (the
#: student stays near θ*_t); L > 1e3 means the student ended 30× farther from the target than the
#: expert's own path is long: it diverged.
LOSS_MAX = 1e3
#: Knobs that may change on resume (``Distiller.load_checkpoint``): the ones the guard asks you to turn.
RESUMABLE_KNOBS = ("lr_img", "lr_lr", "max_start_epoch")
#: How many scalars ``Distiller.step`` reads back in its one host sync, before the N student losses.
NUM_SCALARS = 10


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
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                errs.append(f"{name} must be a positive integer (>= 1), got {v!r}")
        for name in ("lr_img", "lr_teacher"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                errs.append(f"{name} must be a positive finite number, got {v!r}")
        if isinstance(self.lr_teacher, (int, float)) and self.lr_teacher > LR_TEACHER_MAX:
            errs.append(f"lr_teacher (α0) must be at most {LR_TEACHER_MAX:g} (the paper uses 0.01), got {self.lr_teacher!r}")
        if not (isinstance(self.lr_lr, (int, float)) and math.isfinite(self.lr_lr) and self.lr_lr >= 0):
            errs.append(f"lr_lr must be a finite number >= 0 (0 freezes α), got {self.lr_lr!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
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


class DistillationDiverged(Diverged):
    """Raised by the divergence guard; the distiller then holds the last sane state ("the last good one").

    ``knob``: the setting to turn, ``value`` its current value, ``suggested`` a value to try;
    ``resumable``: whether the run can resume from the kept state with the new value (``lr_img``,
    ``lr_lr``, ``max_start_epoch``), or must start over (``lr_teacher``, ``alpha_param``).
    ``iteration``: the iteration of the kept state."""

    def __init__(self, message: str, knob: str | None = None, value=None, suggested=None, iteration: int = 0):
        super().__init__(message)
        self.knob, self.value, self.suggested, self.iteration = knob, value, suggested, iteration
        self.resumable = knob in RESUMABLE_KNOBS

    def advice(self, run_dir=None) -> str:
        """How to go on, in command-line terms (``--lr-lr 1e-05`` on the same ``--out``, or ``--restart``)."""
        if self.knob is None:
            return "start over with --restart (resume=False)"
        flag = f"--{self.knob.replace('_', '-')} {self.suggested:g}"
        where = f"the same --out {run_dir}" if run_dir is not None else "the same --out"
        if self.resumable:
            return (f"to resume from it, rerun with {flag} ({self.knob}={self.suggested:g}) on {where}; "
                    "--restart (resume=False) starts over")
        return f"rerun with {flag} --restart ({self.knob}={self.suggested:g}, resume=False): {self.knob} cannot change on resume"


def suggest_lower(value: float, overshoot: float = 1.0) -> float:
    """A value to try instead of ``value``: ``value · min(0.1, 0.1 / overshoot)`` rounded down to one
    significant digit, where ``overshoot`` is the relative change the rate caused in one update (so a
    change of ×2e4 gives a rate that would have moved things by ~10 %); at least 10× lower, 1000× for a
    non-finite change."""
    factor = min(0.1, 0.1 / overshoot) if math.isfinite(overshoot) and overshoot > 0 else 1e-3
    target = value * factor
    if not (math.isfinite(target) and target > 0):
        return value / 10
    e = math.floor(math.log10(target))
    digit = max(1, math.floor(target / 10 ** e + 1e-9))
    return float(f"{digit}e{e}")


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
        self.alpha_raw = torch.tensor(float(a0), device=self.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=config.lr_img, momentum=config.momentum)
        self.opt_lr = torch.optim.SGD([self.alpha_raw], lr=config.lr_lr, momentum=config.momentum)
        self.iteration = 0
        self.history = History()
        self._previous = None  # (state before the last update, its iteration, history length, changes)

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

        The divergence guard (module constants ``LOSS_MAX``, ``ALPHA_JUMP``, ``ALPHA_RANGE``,
        ``PIXEL_JUMP``, ``PIXEL_RMS_MAX``) then judges the state the iteration started from (its loss and
        gradients) and the update it made (α and the pixels after it). A refused update is undone; a
        refused starting state is rolled back to the state before the update that produced it (when
        this process made that update). Either way :class:`DistillationDiverged` names the knob to turn.
        """
        c, g = self.config, self.generator
        t0 = time.perf_counter()
        backup = self._snapshot()  # the state this iteration starts from, its generator state included
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
        self.images.grad, self.alpha_raw.grad = grad_x, grad_raw.reshape(())
        self.opt_img.step()
        self.opt_lr.step()
        self.images.grad = self.alpha_raw.grad = None
        # The one host sync of the iteration: every scalar the guards, the history and the callbacks need.
        # (``alpha`` is a view of alpha_raw, updated in place by the step: α before it comes from the backup.)
        old_alpha_t = backup["alpha_raw"].exp() if c.alpha_param == "log" else backup["alpha_raw"]
        new_alpha_t = self.syn_lr.detach()
        scalars = torch.stack([loss, grad_a, grad_x.norm().to(alpha.dtype), old_alpha_t, new_alpha_t, still,
                               torch.isfinite(grad_x).all().to(alpha.dtype),
                               torch.isfinite(self.images).all().to(alpha.dtype),
                               backup["images"].norm().to(alpha.dtype),  # ‖x‖ before the update
                               self.images.detach().norm().to(alpha.dtype)]).double()  # ‖x‖ after it
        vals = torch.cat([scalars, student_losses.double()]).tolist()
        L, dL_da, gnorm, alpha_v, new_alpha, n_still, grad_ok, img_ok, x_norm, new_x_norm = vals[:NUM_SCALARS]
        student = vals[NUM_SCALARS:]
        if n_still > 0:
            self._restore(backup)
            raise ValueError("the expert did not move between the start and target epochs "
                             "(‖θ*_t − θ*_{t+M}‖ = 0): check the buffer (are its epochs distinct snapshots?)")
        a0 = c.lr_teacher
        if not (math.isfinite(L) and L <= LOSS_MAX and math.isfinite(dL_da) and grad_ok
                and a0 / ALPHA_RANGE <= alpha_v <= a0 * ALPHA_RANGE):  # (α: only a loaded checkpoint's can be out)
            self._restore(backup)
            raise self._state_diverged(L, alpha_v)
        problems = self._update_problems(alpha_v, new_alpha, img_ok, x_norm, new_x_norm)
        if problems:
            self._restore(backup)
            raise self._update_refused(problems)
        alpha_change = self._alpha_change(alpha_v, new_alpha)
        pixel_change = abs(new_x_norm - x_norm) / x_norm if x_norm > 0 else 0.0
        # Kept for one iteration: if the state this update made turns out to diverge (its own L, checked by
        # the next iteration), the run rolls back to ``backup``.
        self._previous = (backup, self.iteration, len(self.history.loss), alpha_change, pixel_change)
        self.iteration += 1
        secs = time.perf_counter() - t0
        self.history.loss.append(L)
        self.history.syn_lr.append(new_alpha)
        self.history.seconds.append(secs)
        expert, start, _ = draws[self.rank]
        return IterationInfo(self.iteration, L, new_alpha, gnorm, dL_da, expert, start, student, secs, self.images)

    # -- the divergence guard ------------------------------------------------------------------
    def _alpha_change(self, alpha: float, new_alpha: float) -> float:
        """How far one update moved what lr_lr steps: α (linear: |Δα|/α) or log α (log: |Δ log α|)."""
        if self.config.alpha_param == "log":
            return abs(math.log(new_alpha / alpha)) if new_alpha > 0 and math.isfinite(new_alpha) else math.inf
        return abs(new_alpha - alpha) / alpha

    def _update_problems(self, alpha, new_alpha, img_ok, x_norm, new_x_norm) -> list[tuple[str, float, str]]:
        """What is wrong with the update just made, as (knob, relative change it caused, description)."""
        c, out = self.config, []
        a0 = c.lr_teacher
        if not math.isfinite(new_alpha):
            out.append(("lr_lr", math.inf, f"α became {new_alpha:.4g}"))
        elif new_alpha <= 0:
            out.append(("lr_lr", (alpha - new_alpha) / alpha, f"α went from {alpha:.4g} to {new_alpha:.4g} ≤ 0"))
        else:
            ratio = new_alpha / alpha
            change = self._alpha_change(alpha, new_alpha)
            if not 1 / ALPHA_JUMP <= ratio <= ALPHA_JUMP:
                out.append(("lr_lr", change, f"α jumped from {alpha:.4g} to {new_alpha:.4g} (×{ratio:.3g} in one "
                                             f"update; the guard allows ×{ALPHA_JUMP:g} either way)"))
            elif not a0 / ALPHA_RANGE <= new_alpha <= a0 * ALPHA_RANGE:
                out.append(("lr_lr", change, f"α = {new_alpha:.4g} left [α0/{ALPHA_RANGE:g}, α0·{ALPHA_RANGE:g}] "
                                             f"(α0 = lr_teacher = {a0:g})"))
        rms = new_x_norm / math.sqrt(self.images.numel())
        if not (img_ok and math.isfinite(new_x_norm)):
            out.append(("lr_img", math.inf, "a pixel became non-finite"))
        elif x_norm > 0:
            ratio = new_x_norm / x_norm
            if not 1 / PIXEL_JUMP <= ratio <= PIXEL_JUMP:
                out.append(("lr_img", abs(ratio - 1), f"the pixel norm ‖x‖ jumped from {x_norm:.4g} to {new_x_norm:.4g} "
                                                      f"(×{ratio:.3g} in one update; the guard allows ×{PIXEL_JUMP:g} either way)"))
            elif rms > PIXEL_RMS_MAX:
                out.append(("lr_img", abs(ratio - 1), f"the root-mean-square pixel reached {rms:.4g} (the data's is ~1; "
                                                      f"the guard allows {PIXEL_RMS_MAX:g})"))
        return out

    def _update_refused(self, problems) -> DistillationDiverged:
        c = self.config
        knob, change, _ = problems[0]
        value = getattr(c, knob)
        suggested = suggest_lower(value, change)
        also = ""
        if any(p[0] == "lr_img" for p in problems) and knob != "lr_img":
            also = f" (lr_img = {c.lr_img:g} moved the pixels too far as well: lower it too)"
        if knob == "lr_lr" and c.alpha_param == "linear" and any("≤ 0" in p[2] for p in problems):
            also += ", or use alpha_param='log' to keep α > 0 (--alpha-param log --restart: it cannot change on resume)"
        return DistillationDiverged(
            f"iteration {self.iteration + 1}: the update was refused: {'; '.join(p[2] for p in problems)}. "
            f"{knob} = {value:g} is too large: lower it, e.g. to {suggested:g}{also}. "
            f"The state is the last good one (iteration {self.iteration}).",
            knob, value, suggested, self.iteration)

    def _state_diverged(self, L, alpha) -> DistillationDiverged:
        """The state this iteration started from is not sane (L beyond LOSS_MAX, or L or ∂L non-finite)."""
        c, it = self.config, self.iteration + 1
        what = (f"iteration {it}: the student diverges from the current state: L = {L:.4g} with α = {alpha:.4g} "
                f"(the guard wants a finite L ≤ {LOSS_MAX:g}, finite gradients and α within "
                f"[α0/{ALPHA_RANGE:g}, α0·{ALPHA_RANGE:g}]; L starts near 1).")
        if self._previous is not None:  # the update that made this state was ours: undo it
            backup, iteration, n_hist, alpha_change, pixel_change = self._previous
            self._restore(backup)
            self._previous = None  # one step back only: that state's own L was checked
            self.iteration = iteration
            for v in (self.history.loss, self.history.syn_lr, self.history.seconds):
                del v[n_hist:]
            knob, change = ("lr_lr", alpha_change) if alpha_change >= pixel_change else ("lr_img", pixel_change)
            value = getattr(c, knob)
            suggested = suggest_lower(value, change)
            return DistillationDiverged(
                f"{what} The update of iteration {it - 1} that led there is undone: {knob} = {value:g} is too large "
                f"(it moved {'α' if knob == 'lr_lr' else 'the pixels'} by {100 * change:.3g} %): lower it, e.g. to "
                f"{suggested:g}. The state is the last good one (iteration {self.iteration}).",
                knob, value, suggested, self.iteration)
        if self.iteration == 0:  # the initial state itself: α0 is too large for this student
            # L grows at least like α² (the student's path is α·Σ∇ℓ): α0/√L would bring L to ~1.
            suggested = suggest_lower(c.lr_teacher, 0.1 * math.sqrt(L) if math.isfinite(L) else math.inf)
            return DistillationDiverged(
                f"{what} This is the initial state, so α0 = lr_teacher = {c.lr_teacher:g} is too large for "
                f"syn_steps = {c.syn_steps} student steps: lower it, e.g. to {suggested:g}. "
                f"The state is the last good one (iteration 0).",
                "lr_teacher", c.lr_teacher, suggested, 0)
        return DistillationDiverged(
            f"{what} This state was loaded from a checkpoint (iteration {self.iteration}) written by a run that "
            "had already diverged: there is no sane state to resume from.", None, None, None, self.iteration)

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
        tensors, meta = load_tensors(path, CHECKPOINT_FORMAT, "distillation checkpoint",
                                     hint="start over with --restart (resume=False), which replaces it")
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
        self._previous = None  # the update that made this state was not ours: no roll-back past it


def run(
    distiller: Distiller,
    run_dir: str | Path | None = None,
    resume: bool = True,
    callbacks: tuple[Callable[[IterationInfo], None], ...] = (),
    progress: bool = True,
) -> Distiller:
    """Run the outer loop up to ``config.iterations``, checkpointing into ``run_dir``.

    With ``resume`` and an existing ``run_dir/checkpoint.safetensors`` the run continues from it.
    On divergence (:class:`DistillationDiverged`) the last sane state is saved before the
    exception propagates, and its message ends with how to resume from it (``e.advice``); after an
    interruption (Ctrl-C) the last periodic checkpoint stands.
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
    except DistillationDiverged as e:
        if ckpt is not None:
            distiller.save_checkpoint(ckpt)
            if e.knob is None:  # nothing sane to resume from: the checkpoint is of no use
                e.args = (f"{e.args[0]} Start over with --restart (resume=False).",)
            else:
                e.args = (f"{e.args[0]} It is saved in {ckpt}: {e.advice(run_dir)}.",)
        raise
    finally:
        bar.close()
    return distiller
