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

The trajectory-matching family, as switches on :class:`DistillConfig` (each off by default, and
off it changes nothing: plain MTT draws and computes exactly what it did without them):

* ``soft_labels`` (TESLA, DATM): the labels are learned too. They are logits z (n, K) and the
  student trains on y = softmax(z) (rows ≥ 0, summing to 1) with the soft cross-entropy
  ℓ = −mean_b Σ_k y_bk log softmax(f(x_b))_k; z takes SGD steps of rate ``lr_y`` (momentum
  ``momentum``) on ∂L/∂z = y ⊙ (∂L/∂y − Σ_k y_k ∂L/∂y_k). Initialisation, DATM's way: z = the logits
  of expert 0 at its last stored epoch on the initial images, and with ``pix_init="real"`` those
  images are drawn among the real images that expert classifies correctly. The exported set
  carries y (n, K), so evaluation trains on soft labels.
* the matching window (DATM): t is drawn from [T−, T_cur) with T− = ``min_start_epoch`` and T_cur
  growing linearly from ``current_max_start_epoch`` to T+ = ``max_start_epoch`` by iteration
  ``expansion_end_iteration`` (:func:`start_window`).
* ``auto_steps`` (ATT): the student is matched at n* = argmin_{1≤n≤N} ‖θ̂_n − θ*_{t+M}‖², with the
  exact gradient of that shorter unroll (``meta_gradient.py``); ``History.student_steps`` keeps n*.
* ``ema_decay`` (FTD, DATM): an exponential moving average of the pixels, x̄ ← d·x̄ + (1−d)·x after
  each update (x̄ = x at the start), is what the exported set holds.

``precision`` ("fp32" default, "bf16", "fp16"; ``mttlite.precision``) runs the student under autocast
(forward, backward, double backward); the pixels, α, the labels, the experts' θ and every update stay
float32. With "fp16" the meta-gradient is loss-scaled by a dynamic S (``precision.LossScaler``): an
iteration whose gradient overflows is undone and redone with S/2 (same draws), so it never reaches
the guard; S is saved in checkpoints.

Texture distillation (MTT §5, ``mttlite.texture``), off by default: ``texture_canvas`` = s makes each
synthetic image an s × s toroidal canvas (one per class per ipc) instead of an H × W image; every
student step sees a random wrap-around crop of each canvas (taken before DSA, from the step's seed, so
both gradient modes replay it exactly). ``pix_init="real"`` lays the canvas out as a grid of real
images of its class (the authors' way; the seams take long to smooth out), ``"noise"`` draws N(0, 1).
ZCA is refused (a whitening matrix acts on a whole H × W image, which a canvas is not; the authors
refuse the combination too). With ``soft_labels`` the initial logits are the expert's on the canvas's
top-left crop, which with ``pix_init="real"`` is the image the plain initialisation would have picked.

Parameter pruning of the matching loss (``mttlite.pruning``), off by default: ``prune_rule`` builds a mask
m ∈ {0,1}^P once, before the first iteration, and every iteration matches
L_m = ‖m ⊙ (θ̂_N − θ*_{t+M})‖² / ‖m ⊙ (θ*_t − θ*_{t+M})‖² with the exact gradient of L_m (both modes).
"mismatch" (Li et al.): prune the fraction β = ``prune_fraction`` of the parameters with the largest
|θ̂_N − θ*_{t+M}| in a probe unroll from the initial state; "depth" (PAD): prune the first ⌊β·P⌋ entries of
θ in layer order (the shallow layers), β = PAD's ratio for the IPC when ``prune_fraction`` is None.
``Distiller.prune_counts`` (saved in checkpoints' metadata) gives the pruned entries per parameter tensor.

Model augmentation of the expert (Zhang et al. 2023, ``mttlite.model_augment``), off by default:
``expert_perturb`` = ρ > 0 starts the student from a perturbed θ̃*_t = θ*_t + ρ·d (d Gaussian, scaled filter
by filter so that each filter of θ*_t moves by ρ·‖θ*_{t,l,j}‖; 1-D tensors untouched), the noise drawn from a
seed that the run's generator draws after the iteration's samples (ranks and resumed runs stay in step). The
target θ*_{t+M} is not perturbed, and the denominator uses the perturbed start,
L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ̃*_t − θ*_{t+M}‖², so that L = 1 still means "no closer than where the student
started" (the guard's LOSS_MAX keeps its meaning) and both gradient modes differentiate that same L.

DATM's own settings (its CIFAR-10 configuration): ``soft_labels`` with lr_y = 2 and label momentum
0.9 (here the labels share ``momentum``, 0.5 by default), ``ema_decay`` = 0.999,
``current_max_start_epoch`` = 20 growing to T+ = 40 by ``expansion_end_iteration`` = 3000, T− = 0.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from .augment import DSAParams, default_strategy, parse_strategy
from .errors import Diverged, check_interrupt
from .io import generator_state, load_tensors, save_tensors
from .fused import STEP_CHOICES, FusedStep, choose_step, forward_gflop
from .kernels import StepKernels
from .matching import apply_mask
from .meta_gradient import GRADIENT_MODES, meta_gradient
from .model_augment import check_rho, perturb
from .params import ParamSpec
from .precision import PRECISIONS, LossScaler, check_precision
from .ranks import process_group
from .pruning import PRUNE_RULES, check_mask, depth_mask, fraction_error, mask_counts, pad_depth_ratio, probe_mismatch_mask
from .student import make_plan
from .texture import crop_at, tile_canvas
from .texture import input_size as texture_input_size

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
RESUMABLE_KNOBS = ("lr_img", "lr_lr", "max_start_epoch", "lr_y")
#: How many scalars ``Distiller.step`` reads back in its one host sync, before the N student losses.
NUM_SCALARS = 12
#: Real images the labelling expert classifies per forward pass when it picks the initial images
#: (``soft_labels`` with ``pix_init="real"``; DATM's batch).
LABEL_CHUNK = 256


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
    # -- the trajectory-matching family (module docstring; each off by default = plain MTT) ---------
    soft_labels: bool = False  # TESLA/DATM: learn logits z of the labels; the student sees y = softmax(z)
    lr_y: float = 2.0  # SGD learning rate of the label logits z (DATM: 2)
    min_start_epoch: int = 0  # T−: t is drawn from T− … T_cur − 1 (DATM's lower bound)
    current_max_start_epoch: int | None = None  # T_cur at iteration 0, growing to T+ (DATM); None: T_cur = T+
    expansion_end_iteration: int | None = None  # the iteration T_cur reaches T+ (DATM: 3000); None: ``iterations``
    auto_steps: bool = False  # ATT: match at n* = argmin_{1≤n≤N} ‖θ̂_n − θ*_{t+M}‖² instead of at N
    ema_decay: float | None = None  # FTD/DATM: export the EMA of the pixels with this decay (DATM: 0.999)
    # model augmentation (Zhang et al. 2023): ρ of the filter-normalised perturbation of θ*_t (0 = off; 0.01–0.05)
    expert_perturb: float = 0.0
    # texture distillation (MTT §5): each synthetic image is a texture_canvas × texture_canvas toroidal canvas,
    # ≥ the images' side, seen through random wrap-around crops (mttlite.texture); None = off
    texture_canvas: int | None = None
    # the student's arithmetic (mttlite.precision): "fp32", "bf16" (CPUs with AVX512-BF16/AMX, GPUs),
    # "fp16" (GPUs, loss-scaled); the pixels, α, θ and every update stay float32
    precision: str = "fp32"
    # parameter pruning of the matching loss (mttlite.pruning): None = off, "mismatch" (Li et al.: the β of the
    # parameters hardest to match, from a probe unroll) or "depth" (PAD: the first β of θ, the shallow layers)
    prune_rule: str | None = None
    # β in [0, 1): the fraction of the P parameters pruned; None: with "depth", PAD's ratio for ipc (pad_depth_ratio)
    prune_fraction: float | None = None
    # the student step (mttlite.fused): "eager" (op by op), "fused" (one compiled graph per step; on CUDA the
    # N steps replayed as a CUDA graph) or "auto" (fused on CUDA; on a CPU the one estimated faster for this
    # run's length, compiling included: mttlite.fused.choose_step)
    step: str = "auto"

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
        if self.step not in STEP_CHOICES:
            errs.append(f"step must be one of {STEP_CHOICES}, got {self.step!r}")
        elif self.step == "fused" and self.compile is True:
            errs.append("compile=True (torch.compile of the eager step) and step='fused' (the compiled fused step) "
                        "exclude each other: use step='fused' alone")
        elif self.step == "fused" and self.texture_canvas is not None:
            errs.append("texture_canvas runs with step='eager' only (its canvases are cropped by eager DSA)")
        if self.alpha_param not in ALPHA_PARAMS:
            errs.append(f"alpha_param must be one of {ALPHA_PARAMS}, got {self.alpha_param!r}")
        if self.precision not in PRECISIONS:
            errs.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        errs += self._family_errors()
        try:  # model augmentation's ρ (mttlite.model_augment)
            check_rho(self.expert_perturb, "expert_perturb")
        except ValueError as e:
            errs.append(str(e))
        errs += self._texture_errors()
        errs += self._prune_errors()
        try:
            parse_strategy(self.dsa_strategy)
        except ValueError as e:
            errs.append(str(e))
        if errs:
            raise ValueError("invalid DistillConfig:\n  " + "\n  ".join(errs))
        return self

    def _texture_errors(self) -> list[str]:
        """Texture distillation's settings (the canvas against the images' size is checked by ``Distiller``)."""
        s = self.texture_canvas
        if s is None:
            return []
        if not (_is_int(s) and s >= 1):
            return [f"texture_canvas must be None (off) or a positive integer, the canvas side in pixels "
                    f"(>= the images' side, e.g. 2x it as the authors' default), got {s!r}"]
        if self.zca:
            return ["texture_canvas cannot be used with zca=True: ZCA whitening is a linear map of whole HxW images "
                    "and a canvas is not one (the MTT authors refuse texture with zca too); use zca=False"]
        return []

    def _prune_errors(self) -> list[str]:
        """Parameter pruning's settings (``mttlite.pruning``); a mask that leaves nothing is refused by ``Distiller``."""
        rule, beta = self.prune_rule, self.prune_fraction
        if rule is not None and rule not in PRUNE_RULES:
            return [f"prune_rule must be None (off) or one of {PRUNE_RULES}, got {rule!r}"]
        if beta is not None and fraction_error(beta) is not None:
            return [fraction_error(beta)]
        if beta is not None and rule is None:
            return [f"prune_fraction = {beta!r} is set but prune_rule is None (off): give prune_rule 'mismatch' or 'depth'"]
        if beta is None and rule == "mismatch":
            return ["prune_fraction must be given, in [0, 1), with prune_rule 'mismatch' (β: the fraction of the "
                    "parameters with the largest mismatch that is pruned)"]
        return []

    def _family_errors(self) -> list[str]:
        """The trajectory-matching family's settings (soft labels, window, automatic N, EMA)."""
        errs = []
        for name in ("soft_labels", "auto_steps"):
            if not isinstance(getattr(self, name), bool):
                errs.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        v = self.lr_y
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            errs.append(f"lr_y must be a positive finite number (> 0; DATM uses 2), got {v!r}")
        d = self.ema_decay
        if d is not None and not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1):
            errs.append(f"ema_decay must be None (off) or in [0, 1) (DATM uses 0.999), got {d!r}")
        T_plus = self.max_start_epoch if _is_int(self.max_start_epoch) and self.max_start_epoch >= 1 else None
        low = self.min_start_epoch
        if not (_is_int(low) and low >= 0):
            errs.append(f"min_start_epoch (T−) must be an integer >= 0, got {low!r}")
            low = None
        elif T_plus is not None and low >= T_plus:
            errs.append(f"min_start_epoch (T−) must be in [0, max_start_epoch − 1] = [0, {T_plus - 1}] "
                        f"(t is drawn from T− … T+ − 1), got {low!r}")
            low = None
        cur = self.current_max_start_epoch
        if cur is not None and T_plus is not None and low is not None and not (_is_int(cur) and low < cur <= T_plus):
            errs.append(f"current_max_start_epoch (the initial T_cur) must be None or an integer in "
                        f"[min_start_epoch + 1, max_start_epoch] = [{low + 1}, {T_plus}], got {cur!r}")
        end = self.expansion_end_iteration
        if end is not None and not (_is_int(end) and end >= 1):
            errs.append(f"expansion_end_iteration must be None (= iterations) or an integer >= 1, got {end!r}")
        return errs

    @property
    def needed_epochs(self) -> int:
        """The last expert epoch a distillation reads: T+ − 1 + M (so T+ + M − 1 must be stored)."""
        return self.max_start_epoch - 1 + self.expert_epochs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        """The inverse of ``to_dict``; fields it lacks (a file written before they existed) take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DistillConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


# The authors' settings for ConvNet-3 (docs/method.md, as collected by DC-Bench), plus our Fashion-MNIST choices.
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def start_window(config: DistillConfig, iteration: int) -> tuple[int, int]:
    """(low, high): the start epochs t drawn at ``iteration`` (0-based) are low … high − 1.

    low = T− (``min_start_epoch``); high = T_cur, DATM's sequential generation::

        T_cur = min(T+, T0 + ⌊(T+ − T0) · iteration / E⌋)

    with T0 = ``current_max_start_epoch`` (None: T0 = T+, a fixed window), T+ = ``max_start_epoch``
    and E = ``expansion_end_iteration`` (None: ``iterations``, so T_cur reaches T+ at the end of the
    run). Plain MTT (the defaults): (0, T+) at every iteration.
    """
    T_plus = config.max_start_epoch
    T0 = T_plus if config.current_max_start_epoch is None else config.current_max_start_epoch
    E = config.iterations if config.expansion_end_iteration is None else config.expansion_end_iteration
    return config.min_start_epoch, min(T_plus, T0 + (T_plus - T0) * iteration // E)


def softmax_backward(y: Tensor, grad_y: Tensor) -> Tensor:
    """∂L/∂z for y = softmax(z) (row-wise), from ∂L/∂y: ∂L/∂z_ik = y_ik (∂L/∂y_ik − Σ_j y_ij ∂L/∂y_ij).

    y, grad_y: (n, K). The soft labels' chain rule (the labels are learned as logits z)."""
    return y * (grad_y - (y * grad_y).sum(1, keepdim=True))


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
    student_steps: float  # n*, the student step L was measured at (N unless auto_steps; mean over samples)


@dataclass
class History:
    loss: list[float] = field(default_factory=list)
    syn_lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    # n* per iteration (N unless auto_steps; the mean over the samples when samples_per_iteration > 1)
    student_steps: list[float] = field(default_factory=list)


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
        check_precision(config.precision, self.device)  # bf16 on a CPU without it, fp16 on a CPU: refused here
        self.kernels = StepKernels(self.model, self.spec, precision=config.precision) if config.compile else None
        # fp16: the dynamic loss scale of the meta-gradient (host state; saved in checkpoints)
        self.loss_scaler = LossScaler() if config.precision == "fp16" else None
        self.dsa_strategy = default_strategy(dataset.name) if config.dsa_strategy is None else config.dsa_strategy
        # texture: each step's batch of canvases is first cropped toroidally to the input size (augment.dsa)
        self.dsa_params = DSAParams(texture_crop=self._texture_input()) if config.texture_canvas else DSAParams()
        self._check_epochs()
        if len(expert_source) < 1:
            raise ValueError("the expert buffer holds no complete expert: run `mttlite experts` first")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rank, self.world_size = process_group()
        S = config.samples_per_iteration or self.world_size
        if S % self.world_size:
            raise ValueError(f"samples_per_iteration={S} must be a multiple of the number of ranks ({self.world_size})")
        self.samples_per_iteration = S
        self.images, self.labels, self.label_logits = self._init_images()
        n = self.images.shape[0]
        if config.batch_syn is not None and config.batch_syn > n:
            raise ValueError(f"batch_syn={config.batch_syn} is larger than the synthetic set ({n} images = ipc × classes)")
        a0 = math.log(config.lr_teacher) if config.alpha_param == "log" else config.lr_teacher
        self.alpha_raw = torch.tensor(float(a0), device=self.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=config.lr_img, momentum=config.momentum)
        self.opt_lr = torch.optim.SGD([self.alpha_raw], lr=config.lr_lr, momentum=config.momentum)
        self.opt_y = (torch.optim.SGD([self.label_logits], lr=config.lr_y, momentum=config.momentum)
                      if self.label_logits is not None else None)
        # x̄, the EMA of the pixels (ema_decay): starts at the initial images
        self.images_ema = self.images.detach().clone() if config.ema_decay is not None else None
        # parameter pruning: m, (P,) bool on the device (None: off), and its pruned entries per parameter tensor
        self.prune_mask = self._prune_mask()
        self.prune_counts = None if self.prune_mask is None else mask_counts(self.spec, self.prune_mask)
        # the student step (mttlite.fused): "auto" resolved once, from the configuration alone (deterministic)
        steps = config.iterations * config.syn_steps * self.samples_per_iteration // self.world_size
        gflop = forward_gflop(self.model, (self.images.shape[1], *self.dataset.im_size), config.batch_syn or n)
        choice, self.step_reason = choose_step(config.step, self.device, steps, gflop,
                                               texture=config.texture_canvas is not None, compile=config.compile)
        self._use_step(choice)
        self.iteration = 0
        self.history = History()
        self._previous = None  # (state before the last update, its iteration, history length, changes)

    # -- set-up ------------------------------------------------------------------------------------
    def _use_step(self, choice: str) -> None:
        """Run the student with ``choice`` ("eager" or "fused"); the fused step compiles at the first iteration."""
        self.step_kind = choice
        self.fused = None
        self.compile_seconds = 0.0
        if choice == "fused":
            self.fused = FusedStep(self.model, self.spec, batch=self.config.batch_syn or self.images.shape[0],
                                   im_size=tuple(self.images.shape[-2:]), dsa_strategy=self.dsa_strategy,
                                   dsa_params=self.dsa_params, precision=self.config.precision, device=self.device)

    def warm_up(self) -> float:
        """Compile the fused step for this run's shapes now (a no-op for the eager step, or when done): the
        seconds it took, also in ``compile_seconds``. ``step`` calls it before its clock starts, so no
        iteration's time includes compiling. Nothing of the run's state or random draws is touched."""
        if self.fused is None or self.compile_seconds:
            return 0.0
        c = self.config
        plan = make_plan(self.images.shape[0], c.syn_steps, c.batch_syn, torch.Generator().manual_seed(0))
        y = self.targets.requires_grad_(True) if self.label_logits is not None else self.labels
        theta = self.experts.flat(0, min(self.experts.epochs), device=self.device)
        self.compile_seconds = self.fused.warm_up(
            c.gradient, theta, self.images, y, self.syn_lr.detach(), plan, auto_steps=c.auto_steps,
            loss_scale=None if self.loss_scaler is None else self.loss_scaler.scale, mask=self.prune_mask)
        return self.compile_seconds

    def _prune_mask(self) -> Tensor | None:
        """m for ``prune_rule`` (``mttlite.pruning``), built once from the initial state; None when off.

        "mismatch" probes one (expert, t, plan) drawn from a generator of its own seeded with ``seed`` (the
        run's draws stay those of a run without pruning) and unrolls N steps with the initial pixels, labels
        and α0; a mask that leaves nothing to match is a ValueError naming ``prune_fraction``."""
        c = self.config
        if c.prune_rule is None:
            return None
        beta = pad_depth_ratio(c.ipc) if c.prune_fraction is None else c.prune_fraction
        if c.prune_rule == "depth":
            return check_mask(depth_mask(self.spec, beta, device=self.device))
        g = torch.Generator().manual_seed(c.seed)
        expert = int(torch.randint(len(self.experts), (1,), generator=g))
        start = int(torch.randint(*start_window(c, 0), (1,), generator=g))
        plan = make_plan(self.images.shape[0], c.syn_steps, c.batch_syn, g)
        theta_start = self.experts.flat(expert, start, device=self.device)  # θ*_t
        theta_target = self.experts.flat(expert, start + c.expert_epochs, device=self.device)  # θ*_{t+M}
        mask = probe_mismatch_mask(self.model, self.spec, theta_start, theta_target, self.images, self.targets,
                                   self.syn_lr, plan, self.dsa_strategy, beta, self.dsa_params, c.precision)
        return check_mask(mask, theta_start, theta_target)

    def _check_epochs(self):
        stored = set(self.experts.epochs)
        c = self.config
        low, last = c.min_start_epoch, c.max_start_epoch + c.expert_epochs - 1
        missing = [e for e in range(low, last + 1) if e not in stored]
        if missing:
            window = f"min_start_epoch (T−) = {low}, " if low else ""
            raise ValueError(
                f"the expert buffer stores epochs up to {max(stored)}, but {window}max_start_epoch (T+) = {c.max_start_epoch} "
                f"with expert_epochs (M) = {c.expert_epochs} needs epochs {low} … {last}: "
                "lower max_start_epoch / expert_epochs, or train experts for more epochs"
            )

    def _texture_input(self) -> tuple[int, int]:
        """(H, W) of the crops the student sees of each canvas (the data's image size); refuses a canvas
        smaller than that, or ZCA-whitened data, naming ``texture_canvas``."""
        if getattr(self.dataset, "zca", None) is not None:
            raise ValueError("texture_canvas cannot be used with ZCA-whitened data (a whitening acts on whole HxW "
                             "images, which a canvas is not): load the data set with zca=False")
        return texture_input_size(self.config.texture_canvas, tuple(self.dataset.im_size))

    @property
    def texture(self) -> dict | None:
        """Texture mode: {"canvas": [Hc, Wc], "input": [H, W]} (what the exported set records); else None."""
        if self.config.texture_canvas is None:
            return None
        return {"canvas": list(self.images.shape[-2:]), "input": list(self.dsa_params.texture_crop)}

    def _init_images(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """x: (ipc·K, C, H, W) from random real images of each class (or noise); y: (ipc·K,) class-major;
        with ``soft_labels`` the label logits z (ipc·K, K), learnable, else None.

        Soft labels, DATM's way: z = f(x; θ*) with θ* expert 0 at its last stored epoch, and the real
        images are the first ``ipc`` of each class's random order that this expert classifies correctly.

        Texture (``texture_canvas`` = s): x is (ipc·K, C, s, s). "real": a grid of ⌈s/H⌉ × ⌈s/W⌉ real images
        of the class cut to the canvas (``texture.tile_canvas``), its top-left cell the image the plain
        initialisation picks, the others the next ones in the class's random order (cycling through a
        small class); no extra random draws. "noise": N(0, 1) on the whole canvas. Soft labels: z is the
        expert's logits on the top-left crop."""
        c, ds = self.config, self.dataset
        K = ds.num_classes
        counts = torch.bincount(ds.train_labels.cpu(), minlength=K)
        if c.ipc > int(counts.min()):
            raise ValueError(f"ipc={c.ipc} is larger than the smallest class of {ds.name} ({int(counts.min())} images)")
        labels = torch.arange(K).repeat_interleave(c.ipc)
        theta = self._label_expert() if c.soft_labels else None
        canvas = c.texture_canvas
        cells = math.ceil(canvas / ds.im_size[0]) * math.ceil(canvas / ds.im_size[1]) if canvas else 1
        if c.pix_init == "real":
            picks, fill = [], []
            for k in range(K):
                idx = torch.nonzero(ds.train_labels.cpu() == k).flatten()
                order = idx[torch.randperm(len(idx), generator=self.generator)]
                picks.append(order[: c.ipc] if theta is None else self._classified_correctly(k, order, theta))
                if canvas:  # the canvases' other grid cells: the class's next images
                    fill.append(order[(c.ipc + torch.arange(c.ipc * (cells - 1))) % len(order)])
            images = ds.train_images[torch.cat(picks).to(ds.train_images.device)].detach().clone()
            if canvas:  # (n, cells, C, H, W) → (n, C, s, s)
                rest = ds.train_images[torch.cat(fill).to(ds.train_images.device)]
                rest = rest.view(K * c.ipc, cells - 1, *images.shape[1:])
                images = tile_canvas(torch.cat([images[:, None], rest], 1), canvas)
        else:
            shape = (canvas, canvas) if canvas else tuple(ds.im_size)
            images = torch.randn((K * c.ipc, ds.channel, *shape), generator=self.generator)
        images = images.to(self.device)
        logits = None
        if theta is not None:  # z = f(x; θ*): the expert's logits, learnable (texture: on the top-left crop)
            seen = crop_at(images, tuple(ds.im_size), 0, 0) if canvas else images
            logits = self._expert_logits(theta, seen).to(images.dtype).requires_grad_(True)
        return images.requires_grad_(True), labels.to(self.device), logits

    def _label_expert(self) -> Tensor:
        """θ* that labels the set (``soft_labels``): expert 0 at its last stored epoch (DATM: ``buffer[0][-1]``), (P,)."""
        return self.experts.flat(0, max(self.experts.epochs), device=self.device)

    def _expert_logits(self, theta: Tensor, x: Tensor) -> Tensor:
        """f(x; θ), (n, K), without a graph, ``LABEL_CHUNK`` images at a time; x: (n, C, H, W) anywhere."""
        params = self.spec.unflatten(theta)
        with torch.no_grad():
            return torch.cat([functional_call(self.model, params, (xb.to(self.device, theta.dtype),))
                              for xb in x.split(LABEL_CHUNK)])

    def _classified_correctly(self, k: int, order: Tensor, theta: Tensor) -> Tensor:
        """The first ``ipc`` indices of ``order`` (class k's training images, in random order) whose image
        the expert θ classifies as k; a class with fewer is filled up with misclassified ones, with a warning."""
        ipc, right, wrong, found = self.config.ipc, [], [], 0
        for part in order.split(max(LABEL_CHUNK, ipc)):
            x = self.dataset.train_images[part.to(self.dataset.train_images.device)]
            ok = self._expert_logits(theta, x).argmax(1).cpu() == k
            right.append(part[ok])
            wrong.append(part[~ok])
            found += int(ok.sum())
            if found >= ipc:
                break
        if found < ipc:
            warnings.warn(f"soft_labels: the labelling expert (expert 0, last stored epoch) classifies only {found} "
                          f"of the {len(order)} training images of class {k} correctly, fewer than ipc = {ipc}: "
                          f"{ipc - found} of its synthetic images start from misclassified ones", stacklevel=4)
        return torch.cat(right + wrong)[:ipc]

    @property
    def syn_lr(self) -> Tensor:
        """α (a scalar tensor in the graph of ``alpha_raw``)."""
        return self.alpha_raw.exp() if self.config.alpha_param == "log" else self.alpha_raw

    @property
    def targets(self) -> Tensor:
        """The labels the student trains on (and the exported set carries): (n,) class indices, or with
        ``soft_labels`` y = softmax(z), (n, K), detached: every row ≥ 0 and summing to 1."""
        if self.label_logits is None:
            return self.labels
        return torch.softmax(self.label_logits.detach(), dim=1)

    @property
    def synset_images(self) -> Tensor:
        """The images to export, detached: the EMA x̄ with ``ema_decay``, else the current images."""
        return (self.images if self.images_ema is None else self.images_ema).detach()

    # -- one outer iteration -------------------------------------------------------------------
    def _draw(self):
        """One sample of the iteration's randomness: (expert, t, StepPlan), in the original draw order."""
        c, g = self.config, self.generator
        expert = int(torch.randint(len(self.experts), (1,), generator=g))
        low, high = start_window(c, self.iteration)
        start = int(torch.randint(low, high, (1,), generator=g))  # t ~ U{T−, …, T_cur−1} (plain MTT: U{0, …, T+−1})
        return expert, start, make_plan(self.images.shape[0], c.syn_steps, c.batch_syn, g)

    def step(self) -> IterationInfo:
        """One outer iteration: S = ``samples_per_iteration`` samples (expert, t), their meta-gradients
        averaged, one SGD step on the pixels and on α (and on the label logits with ``soft_labels``;
        then the pixels' EMA with ``ema_decay``).

        All S samples are drawn on every rank from the shared generator (so every rank, and a resumed
        run, stays in step); rank r computes samples r, r + W, … and the sums are all-reduced.
        Nothing is read back to the host until the end, where every scalar of the iteration (the
        guards' too) comes back in ONE sync.

        The divergence guard (module constants ``LOSS_MAX``, ``ALPHA_JUMP``, ``ALPHA_RANGE``,
        ``PIXEL_JUMP``, ``PIXEL_RMS_MAX``) then judges the state the iteration started from (its loss and
        gradients) and the update it made (α and the pixels after it). A refused update is undone; a
        refused starting state is rolled back to the state before the update that produced it (when
        this process made that update). Either way :class:`DistillationDiverged` names the knob to turn.

        With ``precision="fp16"`` a non-finite L or gradient first halves the loss scale and redoes the
        iteration from the same state and draws (``precision.LossScaler``); only at scale 1 is it judged.
        """
        self.warm_up()  # the fused step's compile, once, outside the iteration's clock
        t0 = time.perf_counter()
        while True:
            info = self._attempt(t0)
            if info is not None:
                return info

    def _attempt(self, t0: float) -> IterationInfo | None:
        """One try of :meth:`step`; None when an fp16 gradient overflowed and the loss scale was halved:
        the state (generator included) is then as before, and the caller tries again."""
        c = self.config
        backup = self._snapshot()  # the state this iteration starts from, its generator state included
        draws = [self._draw() for _ in range(self.samples_per_iteration)]
        # expert_perturb: one noise seed per sample, drawn after all the samples (off: nothing drawn)
        noise = [int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)) if c.expert_perturb else None
                 for _ in draws]
        alpha = self.syn_lr.detach()
        soft = self.label_logits is not None
        y = self.targets.requires_grad_(True) if soft else self.labels  # y = softmax(z): ∂L/∂y wanted
        grad_x = torch.zeros_like(self.images)
        grad_y = torch.zeros_like(y) if soft else None
        grad_a = torch.zeros_like(alpha)
        loss = torch.zeros_like(alpha)
        still = torch.zeros_like(alpha)  # how many samples had an expert that did not move (den = 0)
        steps = torch.zeros_like(alpha)  # Σ n* over the samples (N each without auto_steps)
        student_losses = None
        for (expert, start, plan), seed in zip(draws[self.rank::self.world_size], noise[self.rank::self.world_size]):
            theta_start = self.experts.flat(expert, start, device=self.device)  # θ*_t
            if seed is not None:  # θ̃*_t = θ*_t + ρ·d, the start and the denominator's (module docstring)
                theta_start = perturb(theta_start, self.spec, c.expert_perturb, torch.Generator().manual_seed(seed))
            theta_target = self.experts.flat(expert, start + c.expert_epochs, device=self.device)  # θ*_{t+M}
            den = apply_mask(theta_start - theta_target, self.prune_mask).pow(2).sum()  # ‖m ⊙ (θ*_t − θ*_{t+M})‖²
            still += (den == 0).to(still.dtype)
            scale = None if self.loss_scaler is None else self.loss_scaler.scale
            if self.fused is not None:
                mg = self.fused.meta_gradient(c.gradient, theta_start, theta_target, self.images, y, alpha, plan,
                                              auto_steps=c.auto_steps, loss_scale=scale, mask=self.prune_mask)
            else:
                mg = meta_gradient(c.gradient, self.model, self.spec, theta_start, theta_target, self.images, y, alpha,
                                   plan, self.dsa_strategy, self.dsa_params, kernels=self.kernels,
                                   auto_steps=c.auto_steps, precision=c.precision, loss_scale=scale,
                                   mask=self.prune_mask)
            grad_x += mg.images
            if soft:
                grad_y += mg.labels
            grad_a += mg.syn_lr.reshape(())
            loss += mg.loss.to(loss.dtype)
            steps += mg.steps.to(steps.dtype)
            if student_losses is None:
                student_losses = mg.student_losses
        if self.world_size > 1:  # Σ over ranks, one collective: [∂L/∂x, (∂L/∂y), ∂L/∂α, L, still, n*]
            grads = [grad_x.flatten()] + ([grad_y.flatten()] if soft else [])
            packed = torch.cat(grads + [torch.stack([grad_a, loss, still, steps]).to(grad_x.dtype)])
            torch.distributed.all_reduce(packed)
            grad_x, *rest = packed.split([g.numel() for g in grads] + [4])
            grad_x = grad_x.view_as(self.images)
            if soft:
                grad_y = rest.pop(0).view_as(y)
            grad_a, loss, still, steps = (v.to(alpha.dtype) for v in rest[0])
        S = self.samples_per_iteration
        if S > 1:  # the mean over the S samples
            grad_x, grad_a, loss, steps = grad_x / S, grad_a / S, loss / S, steps / S
            grad_y = grad_y / S if soft else None

        # ∂L/∂a for α = a (linear) or α = exp(a) (log): chain rule by hand.
        grad_raw = grad_a * (alpha if c.alpha_param == "log" else 1.0)
        self.images.grad, self.alpha_raw.grad = grad_x, grad_raw.reshape(())
        self.opt_img.step()
        self.opt_lr.step()
        self.images.grad = self.alpha_raw.grad = None
        if soft:  # the labels' own step, on ∂L/∂z (softmax chain rule)
            self.label_logits.grad = softmax_backward(y.detach(), grad_y)
            self.opt_y.step()
            self.label_logits.grad = None
        if self.images_ema is not None:  # x̄ ← d·x̄ + (1 − d)·x
            self.images_ema.mul_(c.ema_decay).add_(self.images.detach(), alpha=1 - c.ema_decay)
        # The one host sync of the iteration: every scalar the guards, the history and the callbacks need.
        # (``alpha`` is a view of alpha_raw, updated in place by the step: α before it comes from the backup.)
        old_alpha_t = backup["alpha_raw"].exp() if c.alpha_param == "log" else backup["alpha_raw"]
        new_alpha_t = self.syn_lr.detach()
        grads_finite = torch.isfinite(grad_x).all()
        if soft:
            grads_finite = grads_finite & torch.isfinite(grad_y).all()
        labels_finite = torch.isfinite(self.label_logits).all().to(alpha.dtype) if soft else torch.ones_like(alpha)
        scalars = torch.stack([loss, grad_a, grad_x.norm().to(alpha.dtype), old_alpha_t, new_alpha_t, still,
                               grads_finite.to(alpha.dtype),
                               torch.isfinite(self.images).all().to(alpha.dtype),
                               backup["images"].norm().to(alpha.dtype),  # ‖x‖ before the update
                               self.images.detach().norm().to(alpha.dtype),  # ‖x‖ after it
                               steps, labels_finite]).double()
        vals = torch.cat([scalars, student_losses.double()]).tolist()
        (L, dL_da, gnorm, alpha_v, new_alpha, n_still, grad_ok, img_ok, x_norm, new_x_norm, n_steps,
         labels_ok) = vals[:NUM_SCALARS]
        student = vals[NUM_SCALARS:]
        if n_still > 0:
            self._restore(backup)
            kept = " on the parameters prune_rule keeps (lower prune_fraction)" if self.prune_mask is not None else ""
            raise ValueError(f"the expert did not move between the start and target epochs{kept} "
                             "(‖θ*_t − θ*_{t+M}‖ = 0): check the buffer (are its epochs distinct snapshots?)")
        overflow = not (math.isfinite(L) and math.isfinite(dL_da) and grad_ok)
        if self.loss_scaler is not None:  # fp16: an overflow means S was too large, not that the run diverged
            if overflow:
                if self.loss_scaler.found_inf():  # S ← S/2: redo this iteration (same draws)
                    self._restore(backup)
                    return None
            else:
                self.loss_scaler.found_finite()
        a0 = c.lr_teacher
        if not (math.isfinite(L) and L <= LOSS_MAX and math.isfinite(dL_da) and grad_ok
                and a0 / ALPHA_RANGE <= alpha_v <= a0 * ALPHA_RANGE):  # (α: only a loaded checkpoint's can be out)
            self._restore(backup)
            raise self._state_diverged(L, alpha_v, fp16_overflow=overflow and self.loss_scaler is not None)
        problems = self._update_problems(alpha_v, new_alpha, img_ok, x_norm, new_x_norm, labels_ok)
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
        self.history.student_steps.append(n_steps)
        expert, start, _ = draws[self.rank]
        return IterationInfo(self.iteration, L, new_alpha, gnorm, dL_da, expert, start, student, secs, self.images,
                             student_steps=n_steps)

    # -- the divergence guard ------------------------------------------------------------------
    def _alpha_change(self, alpha: float, new_alpha: float) -> float:
        """How far one update moved what lr_lr steps: α (linear: |Δα|/α) or log α (log: |Δ log α|)."""
        if self.config.alpha_param == "log":
            return abs(math.log(new_alpha / alpha)) if new_alpha > 0 and math.isfinite(new_alpha) else math.inf
        return abs(new_alpha - alpha) / alpha

    def _update_problems(self, alpha, new_alpha, img_ok, x_norm, new_x_norm, labels_ok=1.0) -> list[tuple[str, float, str]]:
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
        if not labels_ok:  # soft labels: the logits z must stay finite
            out.append(("lr_y", math.inf, "a label logit became non-finite"))
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

    def _state_diverged(self, L, alpha, fp16_overflow: bool = False) -> DistillationDiverged:
        """The state this iteration started from is not sane (L beyond LOSS_MAX, or L or ∂L non-finite)."""
        c, it = self.config, self.iteration + 1
        what = (f"iteration {it}: the student diverges from the current state: L = {L:.4g} with α = {alpha:.4g} "
                f"(the guard wants a finite L ≤ {LOSS_MAX:g}, finite gradients and α within "
                f"[α0/{ALPHA_RANGE:g}, α0·{ALPHA_RANGE:g}]; L starts near 1).")
        if fp16_overflow:
            what += (" (precision fp16: still non-finite at loss scale 1; if the same run is stable in fp32 or bf16, "
                     "the student overflows fp16: use --precision bf16 or fp32.)")
        if self._previous is not None:  # the update that made this state was ours: undo it
            backup, iteration, n_hist, alpha_change, pixel_change = self._previous
            self._restore(backup)
            self._previous = None  # one step back only: that state's own L was checked
            self.iteration = iteration
            for v in vars(self.history).values():
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
    def _optimizers(self):
        """(name, optimiser, its one tensor): the state an SGD step keeps (momentum buffers)."""
        out = [("images", self.opt_img, self.images), ("alpha", self.opt_lr, self.alpha_raw)]
        if self.opt_y is not None:
            out.append(("labels", self.opt_y, self.label_logits))
        return out

    def _tensors(self) -> dict[str, Tensor]:
        t = {"images": self.images.detach(), "labels": self.labels, "alpha_raw": self.alpha_raw.detach(),
             "rng_state": generator_state(self.generator)}
        if self.label_logits is not None:
            t["label_logits"] = self.label_logits.detach()
        if self.images_ema is not None:
            t["images_ema"] = self.images_ema
        for name, opt, p in self._optimizers():
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                t[f"momentum.{name}"] = buf
        return t

    def _load_tensors(self, t: dict[str, Tensor]):
        with torch.no_grad():
            self.images.copy_(t["images"])
            self.alpha_raw.copy_(t["alpha_raw"])
            if self.label_logits is not None:
                self.label_logits.copy_(t["label_logits"])
            if self.images_ema is not None:
                self.images_ema.copy_(t["images_ema"])
        self.labels = t["labels"].to(self.device)
        self.generator.set_state(t["rng_state"].cpu())
        for name, opt, p in self._optimizers():
            key = f"momentum.{name}"
            opt.state.pop(p, None)
            if key in t:
                opt.state[p] = {"momentum_buffer": t[key].to(self.device).clone()}

    def save_checkpoint(self, path) -> Path:
        meta = {"iteration": self.iteration, "config": self.config.to_dict(), "history": asdict(self.history)}
        if self.prune_counts is not None:  # parameter pruning: the pruned entries per parameter tensor
            meta["prune_counts"] = self.prune_counts
        if self.loss_scaler is not None:
            meta["loss_scaler"] = self.loss_scaler.state_dict()
        meta["step"] = self.step_kind  # "auto" resolved: a resumed run keeps the same student step
        return save_tensors(path, self._tensors(), f"{CHECKPOINT_FORMAT}/1", meta)

    def load_checkpoint(self, path) -> None:
        tensors, meta = load_tensors(path, CHECKPOINT_FORMAT, "distillation checkpoint",
                                     hint="start over with --restart (resume=False), which replaces it")
        saved = DistillConfig.from_dict(meta["config"])
        # The knobs a divergence message asks you to turn may change on resume; nothing else may.
        ignore = {"iterations", "checkpoint_every", "lr_img", "lr_lr", "max_start_epoch", "lr_y", "step"}
        diff = [f"{f.name}: checkpoint {getattr(saved, f.name)!r} vs now {getattr(self.config, f.name)!r}"
                for f in fields(DistillConfig) if f.name not in ignore and getattr(saved, f.name) != getattr(self.config, f.name)]
        if diff:
            raise ValueError(f"cannot resume from {path}: the configuration differs ({'; '.join(diff)}). "
                             "Use another run directory or pass the original settings.")
        if tensors["images"].shape != self.images.shape:
            raise ValueError(f"cannot resume from {path}: images of shape {tuple(tensors['images'].shape)} "
                             f"but this run has {tuple(self.images.shape)}")
        self._load_tensors(tensors)
        if self.config.step == "auto" and meta.get("step", self.step_kind) != self.step_kind:
            self._use_step(meta["step"])  # the step this run started with (its arithmetic differs by rounding)
            self.step_reason = "resumed with the checkpoint's step"
        self.iteration = int(meta["iteration"])
        self.history = History(**meta["history"])
        if self.loss_scaler is not None and "loss_scaler" in meta:
            self.loss_scaler.load_state_dict(meta["loss_scaler"])
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
    if progress and distiller.iteration < c.iterations:
        print(f"student step: {distiller.step_kind} ({distiller.step_reason})", flush=True)
        secs = distiller.warm_up()
        if secs:
            print(f"compiled the fused student step in {secs:.1f} s (once; not counted in any iteration's time)",
                  flush=True)
    bar = tqdm(total=c.iterations, initial=distiller.iteration, disable=not progress, desc="distill", unit="it")
    try:
        while distiller.iteration < c.iterations:
            check_interrupt()  # a Ctrl-C whose KeyboardInterrupt Python dropped (mttlite.errors)
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
