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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mttlite/mttlite/blob/main/notebooks/03_matching_loss.ipynb)
#
# # 03 · The matching loss
#
# **In the paper:** Eq. 2, the normalised matching loss $\mathcal{L}$ (and the gradient that starts the
# backward pass through Eq. 1); the symbols are defined in [`docs/method.md`](../docs/method.md).
#
# Stage 3 of MTT. After $N$ student steps from $\theta^*_t$, how far is the student from where the
# expert stood $M$ epochs later? The paper's answer (Eq. 2) is a **normalised** squared distance:
#
# $$\mathcal{L} = \frac{\lVert\hat\theta_{t+N} - \theta^*_{t+M}\rVert^2}{\lVert\theta^*_t - \theta^*_{t+M}\rVert^2}.$$
#
# What you will learn:
#
# * why the denominator is there (expert steps shrink by orders of magnitude over training, and
#   layers differ in scale);
# * the loss in three lines, checked against `mttlite.matching.matching_loss`, and its gradient
#   $\partial\mathcal{L}/\partial\hat\theta_N$, which starts the backward pass of notebook `07`;
# * which layers the loss comes from (`matching_breakdown`);
# * distance-to-target curves $L(n)$ for several $M$; widgets for $M$ and $N$ with the loss
#   recomputed live.
#
# **Run time.** Opened without a GPU, the notebook picks the classroom CPU profile
# (`profile = "auto"`, see `notebooks/README.md`): **1.1 min on 2 CPU cores from a cold
# start**, the experts included (68 s, measured on a 2-core AMD EPYC with
# `python benchmarks/notebook_times.py --notebooks 03`).
# The teaching parameters (what a GPU gets), once the experts exist: under 1 min on a Colab T4 GPU
# (estimate, not yet measured); forced on 2 CPU cores about 1-2 min (estimated). CI parameters: 7 s
# on 2 CPU cores (measured).

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

from mttlite.notebook import choose_profile, live, setup

# "cuda" if torch.cuda.is_available() else "cpu", printed with the GPU's name; on Colab setup() also
# turns on the widget manager that the sliders and progress bars need
device = setup()

# %%
import json
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
from IPython.display import display
from plotly.subplots import make_subplots

from mttlite.augment import default_strategy
from mttlite.data import load_dataset
from mttlite.evaluate import random_real_subset
from mttlite.experts import train_experts
from mttlite.matching import matching_breakdown, matching_loss
from mttlite.params import ParamSpec
from mttlite.pipeline import network_for
from mttlite.student import make_plan, unroll

# %% tags=["parameters"]
profile = "auto"  # "auto": "cpu" without a GPU, "teaching" with one; or "teaching", "cpu", "ci"
dataset = "fashion-mnist-mini"
buffer_root = "runs/notebooks/buffers"  # shared expert cache
width = 128
num_experts = 5
train_epochs = 10
ipc = 1
expert = 0
start_epoch = 0  # t (early: where the expert moves most, so these N steps land short of the target)
expert_epochs = 2  # M
syn_steps = 20  # N
syn_lr = 0.01  # alpha
seed = 0
results_path = None

# %%
profile = choose_profile(profile, device)  # mttlite.notebook.PROFILES
if profile == "cpu":  # the classroom CPU profile: <= 5 min on 2 cores from a cold start, experts included
    width, num_experts, train_epochs = 32, 3, 6
elif profile == "ci":  # CI size, see notebooks/README.md
    width, num_experts, train_epochs, start_epoch, syn_steps = 16, 2, 3, 1, 10
    buffer_root = "runs/notebooks-ci/buffers"

torch.manual_seed(seed)
buffer_dir = Path(buffer_root) / f"{dataset}-convnet-w{width}-e{train_epochs}"
print(f"expert buffer: {buffer_dir}")


# %%
ds = load_dataset(dataset, device=device)
buffer = train_experts(ds, buffer_dir, num_experts=num_experts, train_epochs=train_epochs, width=width,
                       seed=seed, device=device, progress=False)
E = buffer.epochs[-1]
net = network_for(buffer, device)
spec = ParamSpec.from_module(net)
images, labels = random_real_subset(ds, ipc, seed=seed)  # a synthetic set, not yet distilled
strategy = default_strategy(ds.name)
traj = torch.stack([buffer.flat(expert, e, device=device) for e in buffer.epochs])  # (E+1, P)
print(buffer)

# %% [markdown]
# ## 1. Why normalise?
#
# The denominator $D(t) = \lVert\theta^*_t - \theta^*_{t+M}\rVert^2$ is how far the expert itself moved in
# $M$ epochs. It shrinks as training goes on, and the layers contribute to it very unequally:

# %%
M_all = list(range(1, E + 1))
fig = make_subplots(rows=1, cols=2, subplot_titles=("D(t) = ‖θ*<sub>t</sub> − θ*<sub>t+M</sub>‖² (log scale)",
                                                    f"share of D(t) per parameter tensor, M = {expert_epochs}"))
for M in M_all[:3]:
    D = [float((traj[t] - traj[t + M]).pow(2).sum()) for t in range(E - M + 1)]
    fig.add_scatter(x=list(range(E - M + 1)), y=D, mode="lines+markers", name=f"M = {M}", row=1, col=1)
ts = list(range(E - expert_epochs + 1))
for name, sl in spec.slices().items():
    share = [float((traj[t, sl] - traj[t + expert_epochs, sl]).pow(2).sum() / (traj[t] - traj[t + expert_epochs]).pow(2).sum())
             for t in ts]
    fig.add_bar(x=ts, y=share, name=name, row=1, col=2, showlegend=False, hovertext=name)
fig.update_yaxes(type="log", row=1, col=1)
fig.update_xaxes(title_text="start epoch t", row=1, col=1)
fig.update_xaxes(title_text="start epoch t", row=1, col=2)
fig.update_layout(barmode="stack", height=420, title="The expert's own movement")
fig.show()

# %% [markdown]
# Now the student, from every start epoch $t$, with the same $N$ and $\alpha$. The *raw* distance
# $\lVert\hat\theta_{t+N} - \theta^*_{t+M}\rVert^2$ is dominated by early $t$, where everything is large;
# averaged over random $t$ (as the outer loop does) the late epochs would hardly count. The
# normalised $\mathcal{L}$ puts every $t$ on the same scale: $\mathcal{L} = 1$ means "no closer than
# where it started", $\mathcal{L} = 0$ means "on target".


# %%
def student_end(t, N, alpha, M=expert_epochs, path=False):
    p = make_plan(len(images), N, None, torch.Generator().manual_seed(seed))
    return unroll(net, spec, traj[t], images, labels, alpha, p, strategy, create_graph=False, return_path=path)


raw, norm = [], []
for t in ts:
    thN = student_end(t, syn_steps, syn_lr).theta.detach()
    raw.append(float((thN - traj[t + expert_epochs]).pow(2).sum()))
    norm.append(float(matching_loss(thN, traj[t], traj[t + expert_epochs])))
fig = make_subplots(rows=1, cols=2, subplot_titles=("raw ‖θ̂<sub>t+N</sub> − θ*<sub>t+M</sub>‖²", "normalised L"))
fig.add_scatter(x=ts, y=raw, mode="lines+markers", name="raw", row=1, col=1)
fig.add_scatter(x=ts, y=norm, mode="lines+markers", name="L", row=1, col=2)
fig.update_xaxes(title_text="start epoch t")
fig.update_layout(height=350, showlegend=False, title=f"Student, N = {syn_steps}, α = {syn_lr}, M = {expert_epochs}")
fig.show()

# %% [markdown]
# **What you see on the right, and why.** Normalising puts the *targets* on one scale: at every $t$,
# $\mathcal{L} = 1$ is "no progress" and $0$ is "on target". It does not make one student right for every
# $t$. Here the student is the same at every $t$ ($N$ steps of the same size $\alpha$ on the same images),
# while the expert's $M$-epoch movement shrinks as it converges (the previous figure, left): early on,
# the student's $N$ steps cover part of a long expert move ($\mathcal{L} < 1$); late, the same steps
# overshoot a short one, and $\mathcal{L}$ rises, past 1 where the student lands farther from the target
# than it started. (With the shipped sizes the curve rises with $t$; exactly where it crosses 1 depends
# on the width, $\alpha$ and $N$: try a smaller $\alpha$ in section 5.) This is why MTT *learns* $\alpha$
# (notebook `04`) and draws $t$ only from the early epochs, $t < T^+$, where the expert still moves a lot.

# %% [markdown]
# ## 2. The loss in three lines, and its gradient
#
# With $\hat\theta_N$ from the student and the expert's $\theta^*_t$, $\theta^*_{t+M}$ (flat vectors):

# %%
t, M = start_epoch, expert_epochs
theta_start, theta_target = traj[t], traj[t + M]  # θ*_t, θ*_{t+M}: (P,)
theta_N = student_end(t, syn_steps, syn_lr).theta.detach().requires_grad_(True)  # θ̂_{t+N}

num = (theta_N - theta_target).pow(2).sum()  # ‖θ̂_{t+N} − θ*_{t+M}‖²
den = (theta_start - theta_target).pow(2).sum()  # ‖θ*_t − θ*_{t+M}‖²
L_by_hand = num / den
L_library = matching_loss(theta_N, theta_start, theta_target)
torch.testing.assert_close(L_by_hand, L_library)

# ∂L/∂θ̂_N = 2 (θ̂_N − θ*_{t+M}) / ‖θ*_t − θ*_{t+M}‖²   (λ_N, where the exact meta-gradient's backward pass starts)
(grad_autograd,) = torch.autograd.grad(L_library, theta_N)
torch.testing.assert_close(grad_autograd, 2 * (theta_N.detach() - theta_target) / den)
print(f"L = {L_by_hand.item():.5f} (by hand) = {L_library.item():.5f} (library)")

# %% [markdown]
# ## 3. Which layers does the loss come from?
#
# `matching_breakdown` splits $\mathcal{L}$ over the parameter tensors $\ell$:
#
# * **contribution** $= \lVert\hat\theta_N[\ell] - \theta^*_{t+M}[\ell]\rVert^2 / \lVert\theta^*_t - \theta^*_{t+M}\rVert^2$ — these sum to $\mathcal{L}$;
# * **normalised** $= \lVert\hat\theta_N[\ell] - \theta^*_{t+M}[\ell]\rVert^2 / \lVert\theta^*_t[\ell] - \theta^*_{t+M}[\ell]\rVert^2$ — the layer's own $\mathcal{L}$ (1 = no progress on this layer);
# * **expert share** — the layer's share of the expert's own movement.


# %%
STILL = 1e-9  # a tensor with less than this share of the expert's movement did not move (see below)


def still_tensors(bd):
    """The tensors the expert did not move: their own normalised L is 0/0 (NaN) or a ratio of rounding errors."""
    return [n for n in bd if bd[n]["expert_share"] < STILL]


def draw_breakdown(bd, title):
    names = list(bd)
    still = still_tensors(bd)
    moving = [n for n in names if n not in still]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("contribution to L (sums to L)",
                                                        "per-layer normalised L (tensors the expert moved)"))
    fig.add_bar(x=names, y=[bd[n]["contribution"] for n in names], name="contribution", row=1, col=1)
    fig.add_bar(x=names, y=[bd[n]["expert_share"] for n in names], name="expert share", row=1, col=1, opacity=0.5)
    fig.add_bar(x=moving, y=[bd[n]["normalised"] for n in moving], name="normalised", row=1, col=2)
    fig.add_hline(y=1.0, line_dash="dot", row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=2)
    note = f"not moved by the expert (left out on the right): {', '.join(still)}" if still else ""
    fig.update_layout(title=title, height=440, barmode="group", margin={"b": 120},
                      annotations=list(fig.layout.annotations) + ([{"text": note, "showarrow": False, "xref": "paper",
                                                                    "yref": "paper", "x": 0, "y": -0.45,
                                                                    "xanchor": "left"}] if note else []))
    fig.show()


bd = matching_breakdown(spec, theta_N.detach(), theta_start, theta_target)
contrib_sum = sum(v["contribution"] for v in bd.values())
torch.testing.assert_close(contrib_sum, L_library.item(), rtol=1e-4, atol=1e-6)
draw_breakdown(bd, f"L = {L_library.item():.4f} at t = {t}, M = {M}, N = {syn_steps}")
print("tensors the expert did not move:", ", ".join(still_tensors(bd)) or "none")

# %% [markdown]
# A layer the expert hardly moved can have a per-layer $L$ far above 1 (note the log scale) and still
# contribute almost nothing to $\mathcal{L}$: with one *global* denominator each layer counts in
# proportion to how much the expert moved it. Per-layer normalisation would let such layers dominate.
#
# Some tensors the expert does not move **at all**: the biases of the convolutions directly in front of
# an instance norm (`features.0/4/8.bias` here). The norm subtracts each channel's mean, so adding a
# constant to a channel changes nothing downstream: their gradient is exactly zero, in the expert and in
# the student alike, and they keep their initial values for the whole trajectory (up to float
# rounding). Their own normalised $L$ would be $0/0$, or a ratio of rounding errors, so the
# right panel leaves them out and names them below the figure; they contribute nothing to $\mathcal{L}$.

# %% [markdown]
# ## 4. Distance-to-target curves
#
# Along the student's path, $L_M(n) = \lVert\hat\theta_n - \theta^*_{t+M}\rVert^2 / \lVert\theta^*_t - \theta^*_{t+M}\rVert^2$ for
# several $M$. Every curve starts at 1. Where a curve bottoms out tells you how many student steps
# on this set "are worth" $M$ expert epochs — the long-range match MTT optimises (notebook `06`).
# A curve that rises again after its minimum is a student that overshoots its target; one that never
# drops below 1 overshoots from the first step (its $\alpha$ is too large for that $t$ and $M$: the
# nearer target of $M = 1$ shows it first, and a later $t$ makes it worse). Hence $t = 0$ as the
# default: from there the $M = 2$ curve dips well below 1; move the $t$ slider of section 5 to 2 or 3
# and watch the same student overshoot.


# %%
def draw_curves(N=syn_steps, M=expert_epochs, alpha=syn_lr, t=start_epoch):
    path = student_end(t, N, alpha, path=True).path
    Ms = sorted({m for m in (1, 2, 3, M) if t + m <= E})
    fig = go.Figure()
    curves = {}
    for m in Ms:
        L = [float(matching_loss(th, traj[t], traj[t + m])) for th in path]
        curves[m] = L
        fig.add_scatter(y=L, mode="lines+markers", name=f"M = {m}", line={"width": 4 if m == M else 1.5})
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(title=f"L<sub>M</sub>(n) from t = {t}, α = {alpha:.3g}; the loss used is L<sub>{M}</sub>(N) = {curves[M][-1]:.4f}",
                      xaxis_title="student step n", yaxis_title="L<sub>M</sub>(n)", height=400)
    fig.show()
    return curves


curves = draw_curves()

# %% [markdown]
# ## 5. Try it: $M$ and $N$ (and $\alpha$, $t$), loss recomputed live

# %%
def draw_live(M, N, alpha, t):
    if t + M > E:
        print(f"t + M = {t + M} is beyond the buffer's last epoch {E}: lower t or M")
        return
    c = draw_curves(N, M, alpha, t)
    thN = student_end(t, N, alpha).theta.detach()
    draw_breakdown(matching_breakdown(spec, thN, traj[t], traj[t + M]), f"L = {c[M][-1]:.4f}  (t = {t}, M = {M}, N = {N})")


M_slider = widgets.IntSlider(value=expert_epochs, min=1, max=E, description="M (expert_epochs)", style={"description_width": "initial"},
                             continuous_update=False)
t_slider = widgets.IntSlider(value=start_epoch, min=0, max=E - expert_epochs, description="t", continuous_update=False)
# the target θ*_{t+M} must be in the buffer: t only goes up to E − M (a larger M pulls t back, and redraws)
M_slider.observe(lambda change: setattr(t_slider, "max", E - change["new"]), names="value")
panel = live(  # the controls, a note and the redrawn figure (tests/test_notebooks.py drives them)
    draw_live,
    M=M_slider,
    N=widgets.IntSlider(value=syn_steps, min=1, max=max(80, syn_steps), description="N (syn_steps)", style={"description_width": "initial"},
                        continuous_update=False),
    alpha=widgets.FloatLogSlider(value=syn_lr, base=10, min=-4, max=0, description="α", continuous_update=False),
    t=t_slider,
)
display(panel)

# %% [markdown]
# ## Exercises
#
# Replace `None` in each answer cell with your code; as shipped it falls back to the hidden
# solution (the collapsed cell below), and the next cell checks the answer against the library
# and prints "correct".
#
# **Exercise 1 · Predict $\mathcal{L}$.** Without running anything: what is $\mathcal{L}$ for a student that does
# not move (its $N$ steps with $\alpha = 0$), and for one that stops exactly halfway between $\theta^*_t$
# and $\theta^*_{t+M}$? Write `answer_1 = (L_still, L_halfway)`.

# %% cellView="form" jupyter={"source_hidden": true} tags=["solution"]
#@title Solutions (hidden: try the exercises first)
def _solution_1():
    # still: θ̂ = θ*_t, numerator = denominator. Halfway: θ̂ − θ*_{t+M} = (θ*_t − θ*_{t+M}) / 2, squared: 1/4
    return (1.0, 0.25)


def _solution_2(theta_student, layer):
    """One tensor's share of L: its squared distance to the target over the GLOBAL denominator."""
    sl = spec.slices()[layer]
    num_layer = (theta_student[sl] - theta_target[sl]).pow(2).sum()  # ‖θ̂_N[ℓ] − θ*_{t+M}[ℓ]‖²
    den_all = (theta_start - theta_target).pow(2).sum()  # ‖θ*_t − θ*_{t+M}‖², all parameters
    return float(num_layer / den_all)


# %%
answer_1 = None  # your answer: (L_still, L_halfway)
if answer_1 is None:
    answer_1 = _solution_1()

# %%
# the check: the library's loss for a student unrolled with α = 0, and for the midpoint
theta_still = student_end(start_epoch, syn_steps, 0.0).theta.detach()
expected = torch.stack([matching_loss(theta_still, theta_start, theta_target),
                        matching_loss((theta_start + theta_target) / 2, theta_start, theta_target)])
torch.testing.assert_close(torch.tensor(answer_1, dtype=torch.float32), expected.cpu(), rtol=1e-4, atol=1e-6)  # float rounding
print("correct")

# %% [markdown]
# **Exercise 2 · One layer's share.** Take the parameter tensor that contributes most to $\mathcal{L}$
# in section 3 (`layer` below) and compute its **contribution** by hand from `theta_N`, `theta_start`,
# `theta_target` and `spec.slices()` (a dict: tensor name → its slice of the flat vector).

# %%
layer = max(bd, key=lambda n: bd[n]["contribution"])
answer_2 = None  # your code here: a float
if answer_2 is None:
    answer_2 = _solution_2(theta_N.detach(), layer)

# %%
# the check: matching_breakdown, recomputed
library_value = matching_breakdown(spec, theta_N.detach(), theta_start, theta_target)[layer]["contribution"]
torch.testing.assert_close(answer_2, library_value, rtol=1e-4, atol=1e-7)
print(f"correct: {layer} gives {answer_2:.4f} of L = {L_library.item():.4f}")

# %% [markdown]
# ## Takeaway
#
# * $\mathcal{L}$ is a squared distance divided by how far the expert itself moved: 1 = no closer than the
#   start, 0 = on target, whatever the start epoch $t$ or the scale of the weights.
# * Its gradient, $2(\hat\theta_N - \theta^*_{t+M}) / \lVert\theta^*_t - \theta^*_{t+M}\rVert^2$, is where the backward pass
#   through the student begins (notebook `07`).
# * With one global denominator, each layer counts in proportion to how much the expert moved it.

# %%
results = {
    "L": L_library.item(),
    "hand_vs_library": abs(L_by_hand.item() - L_library.item()),
    "contribution_sum": contrib_sum,
    "layers": list(bd),
    "raw": raw,
    "normalised": norm,
    "expert_D": [float((traj[t_] - traj[t_ + expert_epochs]).pow(2).sum()) for t_ in ts],
    "curves": {str(m): v for m, v in curves.items()},
    "still": still_tensors(bd),
}
print(json.dumps({k: results[k] for k in ("L", "hand_vs_library", "contribution_sum")}, indent=1))
if results_path:
    Path(results_path).write_text(json.dumps(results, indent=1))
