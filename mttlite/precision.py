"""Mixed precision for the student: ``precision="fp32" | "bf16" | "fp16"``.

What runs in low precision: the student network's forward under ``torch.autocast`` (convolutions and
the classifier's matrix product in bf16 / fp16), and with it the backward and the double backward of
those ops (their saved activations are low precision, so are their derivatives). What stays float32,
always: θ (the flat parameters θ_0 … θ_N: autocast casts a *copy* of each weight, and the gradient
comes back through that cast as float32), λ, the pixels x, the labels, α, the loss ℓ and every
accumulation across student steps (θ_{n+1} = θ_n − α g_n, ∂L/∂x, ∂L/∂α, ∂L/∂y). ``"fp32"`` (the
default) enters no autocast context and changes nothing: the same ops, the same numbers, bit for bit.

Which ops autocast leaves in float32 on a CPU (torch 2.14; measured op by op with a
``TorchDispatchMode`` on the ConvNet, ``mttlite.layers`` and torch's own layers alike):

* cast to bf16: ``convolution`` / ``convolution_backward`` and ``addmm`` / ``mm`` (the linear layer),
  forward, backward and double backward; ReLU and the 2×2 average pooling (strided adds in
  ``mttlite.layers``, ``avg_pool2d`` in torch's) follow their bf16 inputs.
* instance norm is *not* on autocast's lists (``native_group_norm`` is called directly): its
  forward runs mixed, bf16 activations with float32 γ, β and float32 statistics μ, r (torch's
  ``nn.GroupNorm`` alike; on GPUs, where autocast runs ``group_norm`` in float32 and torch has no
  mixed-dtype kernel, ``mttlite.layers`` upcasts its input to float32). ``mttlite.layers`` computes its backward and its hand-written second
  derivative in float32 (upcast, then each result returned in its input's dtype): torch's
  mixed-dtype backward kernel fails under ``vmap`` (parallel experts), and the second derivative's
  per-(n, c) means are long reductions.
* ``F.cross_entropy`` on class indices: autocast upcasts it (``log_softmax`` + ``nll_loss`` in
  float32). But ``F.log_softmax`` / ``softmax`` alone are *not* upcast on a CPU: the soft-label loss
  −Σ y log softmax(z) would run in bf16. So :func:`upcast` turns the logits to float32 before any
  loss (``mttlite.student.cross_entropy`` is always computed in float32).
* the matching loss, the λ recursion and every SGD step of θ: float32 outside any autocast region.

bf16 keeps float32's exponent range: no loss scaling. fp16 (GPU only) does not (normal numbers
≥ 6.1e-5, largest 65504), so the meta-gradient is loss-scaled by a power of two S:

* first order: every student step's gradient is ∇_θ(S·ℓ) / S: the backward through the network
  runs on values S times larger, the division is float32 (exact for a power of two);
* second order: the outer gradient is seeded with S·∂L/∂θ_N: ``exact`` carries λ̃ = S λ (λ̃_N =
  S·∂L/∂θ_N, and λ̃_i = λ̃_{i+1} − α (∇_θ s̃_i) / S keeps it so), ``unroll`` back-propagates S²·L.
  The cotangent entering each step's double backward is then S times the true one and the products
  that leave it, (∂g/∂x)ᵀλ̃, H λ̃ and g·λ̃ computed from the scaled gradient, are S² times the true
  ones; ∂L/∂x, ∂L/∂y and ∂L/∂α are accumulated so in float32 and divided by S² once, at the end.
  With S a power of two every scaled value is the unscaled one times S or S², exactly (in float32
  and float64: tests check equality), so scaling changes nothing but the range.
* overflow: an fp16 inf or NaN anywhere reaches the result (∂L/∂x, ∂L/∂α or L non-finite).
  :class:`LossScaler` is the dynamic scale of a distillation (``Distiller``): on a non-finite result
  the iteration is undone and redone with S/2 (the same draws), down to S = 1; after
  ``growth_interval`` finite iterations in a row S doubles, up to ``max_scale``. The decision reads
  nothing extra from the device: the iteration's one host sync already holds L, ∂L/∂α and whether
  ∂L/∂x is finite. A result still non-finite at S = 1 is a real divergence (or a student that does
  not fit fp16) and goes to the divergence guard.

Devices: ``"bf16"`` needs a CPU with native bfloat16 (AVX512-BF16 or AMX-BF16, with oneDNN; elsewhere
torch emulates it, slower than float32) or a GPU that supports it; ``"fp16"`` is for GPUs. torch's
``meta`` device (shape-only tests) has no autocast: there every op keeps its dtype, and the rest of
the low-precision path (upcasts, scaling) runs as it would on a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

#: The valid values of every ``precision`` argument.
PRECISIONS = ("fp32", "bf16", "fp16")
#: The autocast dtype of each precision (None: no autocast).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOW_DTYPES = (torch.bfloat16, torch.float16)
#: fp16 autocast on a CPU is refused (torch emulates it: slower than fp32, and no target of this
#: project). Tests set this to True to run the fp16 path, loss scaling included, on a CPU.
CPU_FP16 = False


@functools.cache
def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (x86: AVX512-BF16 or AMX-BF16; others: oneDNN's
    own check), so that bf16 autocast is a speed-up rather than an emulation."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        caps = None
    if caps and caps.get("architecture") == "x86_64":
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    if caps is None and hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        return bool(torch.cpu._is_avx512_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device=None) -> str:
    """``precision`` if it is valid (and, given ``device``, usable there), else one ValueError line
    saying what to use instead."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device is None or precision == "fp32":
        return precision
    dev = torch.device(device)
    if dev.type == "meta":  # shape-only tests: no autocast, the rest of the path runs
        return precision
    if dev.type == "cpu":
        if precision == "fp16" and not CPU_FP16:
            raise ValueError("precision 'fp16' is for GPUs (loss-scaled fp16 autocast); on a CPU use 'bf16' "
                             "(CPUs with AVX512-BF16 or AMX) or 'fp32'")
        if precision == "bf16" and not cpu_bf16_supported():
            raise ValueError("precision 'bf16' needs a CPU with native bfloat16 (AVX512-BF16 or AMX-BF16) and "
                             "oneDNN; this one has none (torch would emulate it, slower than fp32): use 'fp32'")
        return precision
    if dev.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"precision 'bf16': {torch.cuda.get_device_name(dev)} has no native bfloat16; "
                         "use 'fp16' (loss-scaled) or 'fp32'")
    if not torch.amp.is_autocast_available(dev.type):
        raise ValueError(f"precision {precision!r}: torch has no autocast for device {dev.type!r}; use 'fp32'")
    return precision


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a device or a tensor's device type);
    ``"fp32"`` (and the ``meta`` device): a no-op context."""
    dtype = AUTOCAST_DTYPES[precision]
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if dtype is None or dev_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev_type, dtype=dtype)


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 if autocast made it bf16 / fp16; any other tensor unchanged (float64 stays)."""
    return t.float() if t.dtype in LOW_DTYPES else t


def check_loss_scale(loss_scale) -> float:
    """S as a float: None → 1 (no scaling); else a positive finite number (a power of two keeps every
    scaled value exact)."""
    if loss_scale is None:
        return 1.0
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
        raise ValueError(f"loss_scale must be None or a positive number (a power of two), got {loss_scale!r}")
    s = float(loss_scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"loss_scale must be a positive finite number (a power of two), got {loss_scale!r}")
    return s


def all_finite(*tensors: Tensor | None) -> Tensor:
    """A 0-dim bool tensor on the first tensor's device: every value of every tensor is finite (no host read)."""
    ts = [t for t in tensors if t is not None]
    ok = torch.isfinite(ts[0]).all()
    for t in ts[1:]:
        ok = ok & torch.isfinite(t).all()
    return ok


@dataclass
class LossScaler:
    """The dynamic loss scale S of an fp16 distillation (module docstring): a host-side power of two.

    ``found_inf()`` after a non-finite result: S ← S / 2 and True (redo the iteration), or False when
    S is already ``min_scale`` (give up: the result is non-finite for another reason).
    ``found_finite()`` after a finite one: S doubles after ``growth_interval`` of them in a row.
    """

    scale: float = 2.0 ** 8
    growth_interval: int = 50
    min_scale: float = 1.0
    max_scale: float = 2.0 ** 16
    good_steps: int = 0  # finite results since the last change of S

    def __post_init__(self):
        for name in ("scale", "min_scale", "max_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0 and math.log2(v).is_integer()):
                raise ValueError(f"LossScaler.{name} must be a positive power of two, got {v!r}")
        if not self.min_scale <= self.scale <= self.max_scale:
            raise ValueError(f"LossScaler: need min_scale <= scale <= max_scale, got "
                             f"{self.min_scale:g} <= {self.scale:g} <= {self.max_scale:g}")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) or self.growth_interval < 1:
            raise ValueError(f"LossScaler.growth_interval must be a positive integer, got {self.growth_interval!r}")

    def found_inf(self) -> bool:
        """A non-finite result at S: halve S and return True (retry), or False at ``min_scale``."""
        self.good_steps = 0
        if self.scale <= self.min_scale:
            return False
        self.scale = max(self.min_scale, self.scale / 2)
        return True

    def found_finite(self) -> None:
        """A finite result at S: count it; after ``growth_interval`` in a row, double S (up to ``max_scale``)."""
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.good_steps = 0
            self.scale = min(self.max_scale, self.scale * 2)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in LossScaler(**state).state_dict().items():  # validated
            setattr(self, k, v)
