# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mttlite/mttlite/blob/main/notebooks/07_memory_and_speed.ipynb)
#
# # 07 · Memory and speed: the naive unroll vs the exact constant-memory gradient
#
# **In the paper:** the memory constraints of the method section — back-propagating through $N$
# steps of Eq. 1 (Algorithm 1's meta-gradient) stores every step, which is why the paper splits the
# synthetic set into mini-batches; the symbols are defined in [`docs/method.md`](../docs/method.md)
# ("Memory").
#
# The meta-gradient $\partial\mathcal{L}/\partial(x, \alpha)$ goes back through all $N$ student steps. The
# paper builds the whole second-order graph and calls `backward` (the **naive unroll**): every step's
# activations stay in memory, so memory grows linearly with $N$ — the reason the authors cap $N$ and
# split the synthetic set into `batch_syn` chunks.
#
# mttlite also computes the **same** gradient (not an approximation) with a reverse-mode adjoint
# that keeps only the $N+1$ parameter vectors and one step's graph at a time
# (`meta_gradient(mode="exact")`).
#
# What you will learn: the derivation; a numerical check that both modes agree; memory and time vs
# $N$, **measured live** (peak RSS of a fresh subprocess per configuration on CPU,
# `torch.cuda.max_memory_allocated` on GPU).
#
# **Run time.** Opened without a GPU, the notebook picks the classroom CPU profile
# (`profile = "auto"`, see `notebooks/README.md`): **0.4 min on 2 CPU cores from a cold
# start**, the experts included (24 s, measured on a 2-core AMD EPYC with
# `python benchmarks/notebook_times.py --notebooks 07`).
# The teaching parameters (what a GPU gets): about 1 min on a Colab T4 GPU (estimate, not yet
# measured); forced on 2 CPU cores about 2 min (estimated). CI parameters: 18 s on 2 CPU cores
# (measured).

# %%
# Set-up. On Colab this installs mttlite from its repository (without the `[notebooks]` extra:
# Colab has plotly and ipywidgets); where mttlite is importable already (a local clone, CI) it
# installs nothing. MTTLITE_REQUIREMENT is written from pyproject.toml by `make notebooks`.
import importlib.util
import subprocess
import sys

MTTLITE_REQUIREMENT = "mttlite[colab] @ git+https://github.com/mttlite/mttlite.git"
if importlib.util.find_spec("mttlite") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", MTTLITE_REQUIREMENT], check=True)
    importlib.invalidate_caches()

from mttlite.notebook import choose_profile, setup

# "cuda" if torch.cuda.is_available() else "cpu", printed with the GPU's name; on Colab setup() also
# turns on the widget manager that the sliders and progress bars need
device = setup()

# %%
import json
import tempfile
import textwrap
from pathlib import Path

import ipywidgets as widgets
import torch
from IPython.display import display
from plotly.subplots import make_subplots

from mttlite.meta_gradient import meta_gradient
from mttlite.networks import get_network
from mttlite.params import ParamSpec
from mttlite.student import make_plan

# %% tags=["parameters"]
profile = "auto"  # "auto": "cpu" without a GPU, "teaching" with one; or "teaching", "cpu", "ci"
width = 128  # ConvNet-3 width
ipc = 1  # images per class (10 classes, 1x28x28): the set every student step sees
syn_steps_list = [10, 20, 40, 80]  # the N values to measure
modes = ["unroll", "exact"]
dsa_strategy = "color_crop_cutout_flip_scale_rotate"
check_steps = 4  # N for the float64 agreement check
check_width = 8
fused_width = 128  # section 4: the network of the eager-vs-fused comparison (ConvNet-3 width, IPC 1, 10 images)
fused_steps = 50  # N of its timed iterations
seed = 0
results_path = None

# %%
profile = choose_profile(profile, device)  # mttlite.notebook.PROFILES
if profile == "cpu":  # the classroom CPU profile: <= 5 min on 2 cores from a cold start, experts included
    width, syn_steps_list = 32, [10, 20, 40]
    fused_width, fused_steps = 32, 10  # the classroom size
elif profile == "ci":  # CI size, see notebooks/README.md
    width, ipc, syn_steps_list = 16, 2, [2, 8, 16]
    fused_width, fused_steps = 4, 2  # the test suite's shapes: its compiled graphs are cached

torch.manual_seed(seed)

# %% [markdown]
# ## 1. The derivation
#
# The student's steps and the loss are
#
# $$\theta_{i+1} = \theta_i - \alpha\, g_i, \quad g_i = \nabla_\theta\, \ell_i(\theta_i, x), \qquad
#   \mathcal{L} = \frac{\lVert\theta_N - \theta^*_{t+M}\rVert^2}{\lVert\theta^*_t - \theta^*_{t+M}\rVert^2}.$$
#
# Define the **adjoint** $\lambda_i = \partial\mathcal{L}/\partial\theta_i$ (a vector of size $P$). At the end,
#
# $$\lambda_N = \frac{2\,(\theta_N - \theta^*_{t+M})}{\lVert\theta^*_t - \theta^*_{t+M}\rVert^2}.$$
#
# One step's Jacobian is $\partial\theta_{i+1}/\partial\theta_i = I - \alpha H_i$ with the Hessian
# $H_i = \partial g_i/\partial\theta_i$ (symmetric), so the chain rule runs backwards, $i = N-1, \dots, 0$:
#
# $$\lambda_i = \lambda_{i+1} - \alpha\, H_i \lambda_{i+1}.$$
#
# $x$ and $\alpha$ enter every step, so their gradients are sums over steps:
#
# $$\frac{\partial\mathcal{L}}{\partial x} = -\alpha \sum_{i=0}^{N-1} \Big(\frac{\partial g_i}{\partial x}\Big)^{\!\top} \lambda_{i+1},
#   \qquad \frac{\partial\mathcal{L}}{\partial\alpha} = -\sum_{i=0}^{N-1} g_i \cdot \lambda_{i+1}.$$
#
# All three products come from **one** `autograd.grad` of the scalar $s_i = g_i \cdot \lambda_{i+1}$
# ($\lambda_{i+1}$ held constant): $\nabla_\theta s_i = H_i\lambda_{i+1}$ and $\nabla_x s_i = (\partial g_i/\partial x)^\top\lambda_{i+1}$
# — Hessian-vector products, never a $P \times P$ matrix.
#
# So the backward pass needs, at step $i$, only $\theta_i$ (stored in the forward pass: $N+1$ vectors
# of $P$ floats), the step's batch and augmentation (replayed from the `StepPlan`), and $\lambda_{i+1}$.
# Step $i$'s graph is rebuilt, used and freed before step $i-1$:
#
# | | naive unroll | exact adjoint |
# |---|---|---|
# | memory | $O(N \cdot \text{activations})$ | $O(N \cdot P + \text{one step's activations})$ |
# | compute | forward + double backward | + one extra forward/backward per step |
# | gradient | exact | **the same**, exact (not truncated) |

# %% [markdown]
# ## 2. The two modes give the same gradient
#
# In float64 on a tiny ConvNet: both modes, same plan (batches and augmentations), same numbers.

# %%
gen = torch.Generator().manual_seed(seed)
net64 = get_network("convnet", 1, 10, (28, 28), width=check_width, generator=gen).double()
spec64 = ParamSpec.from_module(net64)
th_start = spec64.flatten(dict(net64.named_parameters())).detach()
th_target = th_start + 0.01 * torch.randn(th_start.shape, generator=gen, dtype=torch.float64)
x64 = torch.randn(10, 1, 28, 28, generator=gen, dtype=torch.float64)
y64 = torch.arange(10)
plan = make_plan(10, check_steps, None, gen)
alpha64 = torch.tensor(0.01, dtype=torch.float64)
g_unroll = meta_gradient("unroll", net64, spec64, th_start, th_target, x64, y64, alpha64, plan, dsa_strategy)
g_exact = meta_gradient("exact", net64, spec64, th_start, th_target, x64, y64, alpha64, plan, dsa_strategy)
torch.testing.assert_close(g_exact.loss, g_unroll.loss, rtol=1e-10, atol=0)
torch.testing.assert_close(g_exact.images, g_unroll.images, rtol=1e-6, atol=1e-12)
torch.testing.assert_close(g_exact.syn_lr, g_unroll.syn_lr, rtol=1e-6, atol=1e-12)
rel_err_images = float((g_exact.images - g_unroll.images).norm() / g_unroll.images.norm())
rel_err_alpha = float(abs(g_exact.syn_lr - g_unroll.syn_lr) / abs(g_unroll.syn_lr))
print(f"‖∂L/∂x (exact) − ∂L/∂x (unroll)‖ / ‖∂L/∂x (unroll)‖ = {rel_err_images:.2e}; ∂L/∂α relative error {rel_err_alpha:.2e}")

# %% [markdown]
# ### Exercises: the adjoint by hand
#
# Replace `None` in each answer cell with your code; as shipped it falls back to the hidden
# solution (the collapsed cell below), and the next cell checks the answer against
# `meta_gradient` and prints "correct". Both use the float64 network of section 2 (`net64`, `spec64`,
# `th_start`, `th_target`, `x64`, `y64`, `alpha64`). One step's gradient $g_n$ at $\theta$ is the
# gradient of `F.cross_entropy(functional_call(net64, spec64.unflatten(θ), (dsa(x64[idx], dsa_strategy, seed=s),)), y64[idx])`
# with `idx, s = plan.batches[n], plan.aug_seeds[n]` (`F` is `torch.nn.functional`,
# `functional_call` is `torch.func.functional_call`, `dsa` is `mttlite.augment.dsa`).
#
# **Exercise 1 · One step.** For the one-step plan `plan1`, compute $\partial\mathcal{L}/\partial\alpha = -g_0\cdot\lambda_1$ with
# $\theta_1 = \theta_0 - \alpha g_0$ and $\lambda_1 = 2(\theta_1 - \theta^*_{t+M}) / \lVert\theta^*_t - \theta^*_{t+M}\rVert^2$ (a float).

# %% cellView="form" jupyter={"source_hidden": true} tags=["solution"]
#@title Solutions (hidden: try the exercises first)
import torch.nn.functional as F
from torch.func import functional_call

from mttlite.augment import dsa


def _grad_at(theta, step_plan, n, create_graph=False):
    """g_n = ∇_θ ℓ_n at theta (a fresh leaf, returned too, for a Hessian-vector product)."""
    th = theta.detach().requires_grad_(True)
    idx = step_plan.batches[n]
    x = dsa(x64[idx], dsa_strategy, seed=step_plan.aug_seeds[n])
    loss = F.cross_entropy(functional_call(net64, spec64.unflatten(th), (x,)), y64[idx])
    (g,) = torch.autograd.grad(loss, th, create_graph=create_graph)
    return g, th


def _solution_1(step_plan):
    den = (th_start - th_target).pow(2).sum()  # ‖θ*_t − θ*_{t+M}‖²
    g0, _ = _grad_at(th_start, step_plan, 0)
    th1 = th_start - alpha64 * g0  # θ_1
    lam1 = 2 * (th1 - th_target) / den  # λ_1 = ∂L/∂θ_1
    return float(-(g0 @ lam1))  # ∂L/∂α = −g_0 · λ_1


def _solution_2(step_plan):
    den = (th_start - th_target).pow(2).sum()
    g0, _ = _grad_at(th_start, step_plan, 0)
    th1 = th_start - alpha64 * g0
    g1, th1_leaf = _grad_at(th1, step_plan, 1, create_graph=True)  # keep g_1's graph for H_1 λ_2
    th2 = th1 - alpha64 * g1.detach()
    lam2 = 2 * (th2 - th_target) / den  # λ_2
    (h1_lam2,) = torch.autograd.grad(g1 @ lam2, th1_leaf)  # H_1 λ_2 = ∇_θ (g_1 · λ_2), λ_2 held constant
    lam1 = lam2 - alpha64 * h1_lam2  # λ_1 = λ_2 − α H_1 λ_2
    return float(-(g0 @ lam1 + g1.detach() @ lam2))  # ∂L/∂α = −Σ_i g_i · λ_{i+1}


# %%
plan1 = make_plan(10, 1, None, torch.Generator().manual_seed(seed + 1))
answer_1 = None  # your code here: a float
if answer_1 is None:
    answer_1 = _solution_1(plan1)

# %%
# the check: the library's exact meta-gradient for the same one-step plan
expected_1 = meta_gradient("exact", net64, spec64, th_start, th_target, x64, y64, alpha64, plan1, dsa_strategy).syn_lr
torch.testing.assert_close(answer_1, float(expected_1), rtol=1e-7, atol=1e-12)
print(f"correct: ∂L/∂α = {answer_1:.6g}")

# %% [markdown]
# **Exercise 2 · Two steps: the recursion.** For the two-step plan `plan2`, run the backward recursion
# yourself: $\lambda_2 = 2(\theta_2 - \theta^*_{t+M})/\lVert\theta^*_t - \theta^*_{t+M}\rVert^2$, then
# $\lambda_1 = \lambda_2 - \alpha H_1 \lambda_2$ with the Hessian-vector product $H_1\lambda_2 = \nabla_\theta (g_1\cdot\lambda_2)$ at $\theta_1$
# ($\lambda_2$ held constant; take $g_1$ with `create_graph=True`), and
# $\partial\mathcal{L}/\partial\alpha = -(g_0\cdot\lambda_1 + g_1\cdot\lambda_2)$.

# %%
plan2 = make_plan(10, 2, None, torch.Generator().manual_seed(seed + 2))
answer_2 = None  # your code here: a float
if answer_2 is None:
    answer_2 = _solution_2(plan2)

# %%
# the check: the library's meta-gradient for the same two-step plan, both modes
for mode in ("unroll", "exact"):
    expected_2 = meta_gradient(mode, net64, spec64, th_start, th_target, x64, y64, alpha64, plan2, dsa_strategy).syn_lr
    torch.testing.assert_close(answer_2, float(expected_2), rtol=1e-7, atol=1e-12)
print(f"correct: ∂L/∂α = {answer_2:.6g}")

# %% [markdown]
# ## 3. Measuring memory and time
#
# Each configuration runs in a fresh Python process, so one measurement cannot inherit another's
# peak: it builds the network and a random synthetic set, runs one warm-up gradient with $N = 1$,
# records the memory in use, computes the meta-gradient once and reports the increase of the peak.
# On **CPU** the peak is the process's peak resident set size (`VmHWM` in `/proc/self/status`, reset
# after the warm-up by writing 5 to `/proc/self/clear_refs`; Linux, so Colab too); on **GPU** it is
# `torch.cuda.max_memory_allocated` (reset after the warm-up).

# %%
MEASURE = textwrap.dedent('''
    import json, sys, time
    import torch
    from mttlite.meta_gradient import meta_gradient
    from mttlite.networks import get_network
    from mttlite.params import ParamSpec
    from mttlite.student import make_plan

    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    net = get_network("convnet", 1, 10, (28, 28), width=cfg["width"], generator=gen).to(device)
    spec = ParamSpec.from_module(net)
    th0 = spec.flatten(dict(net.named_parameters())).detach()
    target = th0 + 0.01 * torch.randn(th0.shape, generator=gen).to(device)
    n = 10 * cfg["ipc"]
    x = torch.randn(n, 1, 28, 28, generator=gen).to(device)
    y = torch.arange(10).repeat_interleave(cfg["ipc"]).to(device)
    alpha = torch.tensor(0.01, device=device)

    def grad(N):
        plan = make_plan(n, N, None, gen)
        return meta_gradient(cfg["mode"], net, spec, th0, target, x, y, alpha, plan, cfg["dsa"])

    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def reset_peak():
        """Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    grad(1)  # warm-up: allocator, kernels, lazy imports
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        exact_peak = reset_peak()
        base = status_kib("VmRSS" if exact_peak else "VmHWM") * 1024  # bytes resident now (or the peak so far)
    t0 = time.perf_counter()
    g = grad(cfg["N"])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    used = (torch.cuda.max_memory_allocated() if device == "cuda" else status_kib("VmHWM") * 1024) - base
    print(json.dumps({"mode": cfg["mode"], "N": cfg["N"], "mb": max(used, 0) / 2**20, "seconds": seconds,
                      "loss": g.loss.item(), "num_params": spec.num_params}))
''')
script = Path(tempfile.mkdtemp()) / "measure_meta_gradient.py"
script.write_text(MEASURE)


def measure(mode, N):
    """One configuration in a fresh Python process: {'mb', 'seconds', 'loss', 'num_params'}."""
    cfg = {"mode": mode, "N": N, "width": width, "ipc": ipc, "dsa": dsa_strategy, "seed": seed,
           "device": device, "threads": torch.get_num_threads()}
    out = subprocess.run([sys.executable, str(script), json.dumps(cfg)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


rows = []
for N in syn_steps_list:
    for mode in modes:
        r = measure(mode, N)
        rows.append(r)
        print(f"{mode:7s} N = {N:4d}: {r['mb']:8.1f} MB above the warm-up, {r['seconds']:6.2f} s")

# %%
P = rows[0]["num_params"]
fig = make_subplots(rows=1, cols=2, subplot_titles=("extra peak memory (MB)", "time of one meta-gradient (s)"))
for mode, color in zip(modes, ["#d62728", "#1f77b4"]):
    rs = [r for r in rows if r["mode"] == mode]
    fig.add_scatter(x=[r["N"] for r in rs], y=[r["mb"] for r in rs], mode="lines+markers", name=mode,
                    line={"color": color}, row=1, col=1)
    fig.add_scatter(x=[r["N"] for r in rs], y=[r["seconds"] for r in rs], mode="lines+markers", name=mode,
                    line={"color": color}, showlegend=False, row=1, col=2)
fig.add_scatter(x=syn_steps_list, y=[(N + 1) * P * 4 / 2**20 for N in syn_steps_list], mode="lines",
                line={"dash": "dot", "color": "gray"}, name="θ_0 … θ_N (N+1)·P floats", row=1, col=1)
fig.update_xaxes(title_text="N (syn_steps)")
fig.update_layout(title=f"ConvNet width {width}, {10 * ipc} synthetic images, P = {P:,}, {device}", height=420)
fig.show()


# %%
def slope(mode, key):
    """Least-squares slope of `key` against N for one mode (MB or s per student step)."""
    rs = [r for r in rows if r["mode"] == mode]
    n = torch.tensor([float(r["N"]) for r in rs])
    v = torch.tensor([float(r[key]) for r in rs])
    n0 = n - n.mean()
    return float((n0 * (v - v.mean())).sum() / n0.pow(2).sum())


for mode in modes:
    print(f"{mode:7s}: {slope(mode, 'mb'):7.2f} MB and {1000 * slope(mode, 'seconds'):7.1f} ms per student step")

# %% [markdown]
# The unroll's memory grows by roughly one step's activations (with their second-order graph) per
# student step; the adjoint's grows only by one parameter vector ($4P$ bytes) per step. The price is
# time: the adjoint replays every step's forward and backward once more.
#
# Three speed-ups that change no result beyond float rounding (`docs/performance.md` measures them at the paper's scale,
# width 128, N = 10, on 2 CPU cores):
#
# - `mttlite.layers`: the ConvNet's instance norm and 2×2 average pooling are torch's layers with
#   faster derivatives. Every student step differentiates them twice, and torch's generic
#   second-derivative formulas for them are slow on CPU. With these layers the unroll is about 10 % faster.
# - `mttlite.perf.keep_freed_memory()` stops glibc from handing every large activation back to the
#   kernel and faulting it in again on the next step: 1.6–1.8× faster on CPU (`mttlite distill` calls it).
# - `DistillConfig(step="fused")` compiles each student step into one graph (`mttlite.fused`, section 4
#   below): the same gradient with the elementwise work fused, and on a GPU the $N$ steps replayed as one
#   CUDA graph.
#
# Measure one more point:

# %%
def measure_live(mode, N):
    r = measure(mode, N)
    print(f"{mode}, N = {N}: {r['mb']:.1f} MB above the warm-up, {r['seconds']:.2f} s")


display(widgets.interactive(
    measure_live, {"manual": True, "manual_name": "measure"},
    mode=widgets.ToggleButtons(options=modes, value="exact"),
    N=widgets.IntSlider(value=syn_steps_list[-1], min=1, max=max(200, syn_steps_list[-1])),
))

# %% [markdown]
# ## 4. Why a GPU waits on the host: operations per step, eager and fused
#
# A GPU runs one *kernel* per operation, and launching one costs the host a few microseconds (Python,
# PyTorch's dispatcher, the CUDA driver). A kernel over 10 images of 28 × 28 often finishes sooner. So
# with a few hundred small operations per student step, the device mostly waits for the next launch:
# the host sets the pace. (Profiled once on an H200: one IPC 1 iteration at $N = 50$ took 612 ms of host
# time for 62 ms of GPU time.)
#
# The **fused step** (`DistillConfig(step="fused")`, `mttlite.fused`) traces one student step — DSA with
# its random draws as data, the forward, backward and double backward, the updates of $\theta$, $\lambda$,
# $\partial\mathcal{L}/\partial x$ — and compiles it with `torch.compile` into a few fused kernels, the
# same gradient up to float rounding. On CUDA the $N$ steps of an iteration are then recorded once as a
# **CUDA graph** and replayed with a single launch. Below: the operations one student step issues
# (`mttlite.opcount`: an iteration at $N = 4$ minus one at $N = 2$, halved, so the iteration's fixed work
# drops out) and the time of one meta-gradient, eager and fused, side by side. The first fused call
# compiles (about a minute on 2 CPU cores; timed apart).

# %%
import time

from mttlite.fused import FusedStep
from mttlite.opcount import count_ops

gen_f = torch.Generator().manual_seed(seed)
net_f = get_network("convnet", 1, 10, (28, 28), width=fused_width, generator=gen_f).to(device)
spec_f = ParamSpec.from_module(net_f)
th_f = spec_f.flatten(dict(net_f.named_parameters())).detach()
target_f = th_f + 0.01 * torch.randn(th_f.shape, generator=gen_f).to(device)
x_f = torch.randn(10, 1, 28, 28, generator=gen_f).to(device)
y_f = torch.arange(10).to(device)
alpha_f = torch.tensor(0.01, device=device)
fused = FusedStep(net_f, spec_f, batch=10, im_size=(28, 28), dsa_strategy=dsa_strategy, device=device)


def eager_step(plan):
    return meta_gradient("exact", net_f, spec_f, th_f, target_f, x_f, y_f, alpha_f, plan, dsa_strategy)


def fused_step(plan):
    return fused.meta_gradient("exact", th_f, target_f, x_f, y_f, alpha_f, plan)


t0 = time.perf_counter()
plan_f = make_plan(10, fused_steps, None, gen_f)
g_fused = fused_step(plan_f)
g_fused.loss.item()
compile_seconds = time.perf_counter() - t0
# the same gradient (float32 rounding apart) as the eager step's, for the same plan
g_eager = eager_step(plan_f)
torch.testing.assert_close(g_fused.images, g_eager.images, rtol=1e-3, atol=1e-4 * float(g_eager.images.abs().max()))
torch.testing.assert_close(g_fused.syn_lr, g_eager.syn_lr, rtol=1e-3, atol=0.0)
print(f"compiled the fused step in {compile_seconds:.1f} s; fused and eager agree")


def ops_per_step(step):
    """Operations of one student step: an iteration at N = 4 minus one at N = 2, halved."""
    c2, c4 = (count_ops(step, make_plan(10, n, None, gen_f))[0].total for n in (2, 4))
    return (c4 - c2) / 2


def seconds_per_iteration(step, repeats=3):
    """Median seconds of a meta-gradient at N = fused_steps (it ends reading L back: the device is done)."""
    times = []
    for _ in range(repeats):
        plan = make_plan(10, fused_steps, None, gen_f)
        t0 = time.perf_counter()
        step(plan).loss.item()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


speed = {name: {"ops": ops_per_step(step), "seconds": seconds_per_iteration(step)}
         for name, step in (("eager", eager_step), ("fused", fused_step))}
for name, r in speed.items():
    print(f"{name:5s}: {r['ops']:5.0f} operations per student step, {r['seconds']:.3f} s per iteration (N = {fused_steps})")
print(f"fused: {speed['eager']['ops'] / speed['fused']['ops']:.1f}× fewer operations, "
      f"{speed['eager']['seconds'] / speed['fused']['seconds']:.1f}× faster per iteration on {device}")

# %%
fig = make_subplots(rows=1, cols=2, subplot_titles=("operations per student step", f"seconds per iteration (N = {fused_steps})"))
for col, key in ((1, "ops"), (2, "seconds")):
    fig.add_bar(x=list(speed), y=[speed[k][key] for k in speed], marker_color=["#d62728", "#1f77b4"], showlegend=False,
                row=1, col=col)
fig.update_layout(title=f"exact meta-gradient, ConvNet-3 width {fused_width}, 10 images, {device}", height=380)
fig.show()

# %% [markdown]
# On a CPU the fused step gains by doing less work per operation (fused loops instead of dozens of
# passes over each activation, the first convolution as one matrix product). On a GPU it gains by
# *launching* less: the replayed CUDA graph is one launch per iteration, so the device no longer waits
# for the host. `DistillConfig(step="auto")` (the default) picks the fused step on CUDA, and on a CPU
# only when the run is long enough to pay back the compile (`mttlite distill --help`).

# %% [markdown]
# ## Takeaway
#
# * The meta-gradient runs the chain rule backwards through the $N$ student steps: $\lambda_i = \lambda_{i+1} - \alpha H_i\lambda_{i+1}$,
#   with Hessian-vector products only, never a $P \times P$ matrix.
# * The naive unroll keeps every step's activations (memory grows with $N$); the adjoint keeps the
#   $N+1$ parameter vectors and rebuilds one step at a time — the same gradient, for some extra time.
# * That is why `gradient="exact"` is the default: a run that does not fit in memory is worth nothing.
* Speed on small sets is about operations, not arithmetic: the fused step compiles each student step into
  a few kernels, and on a GPU replays the $N$ steps as one CUDA graph.

# %%
results = {
    "rows": rows,
    "rel_err_images": rel_err_images,
    "rel_err_alpha": rel_err_alpha,
    "slope_mb": {m: slope(m, "mb") for m in modes},
    "slope_seconds": {m: slope(m, "seconds") for m in modes},
    "num_params": P,
    "speed": speed,
    "compile_seconds": compile_seconds,
}
print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=1))
if results_path:
    Path(results_path).write_text(json.dumps(results, indent=1))
